import pino, { type Logger } from 'pino';
import { UsageError } from './cli.ts';

/**
 * Logs are one event per line. JSON (the default) is what log shippers expect; `pretty` is for a
 * person watching a terminal: time, level, message, then the fields that say which volume,
 * initiator, session and backup the event is about.
 *
 * Secrets never reach the logger: callers pass names, not credentials. The redaction list below
 * is a second line of defence, and it applies to both formats (pretty lines are made from the
 * redacted JSON).
 */

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export const LOG_FORMATS = ['json', 'pretty'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];
export type LogFormat = (typeof LOG_FORMATS)[number];

/** The parseArgs options every long-running command (serve, start, target) accepts. */
export const LOG_OPTIONS = {
  'log-level': { type: 'string' },
  'log-format': { type: 'string' },
} as const;

export const LOG_HELP = `  --log-level L     fatal, error, warn, info (default), debug, trace or silent ($DETOUR_LOG_LEVEL)
  --log-format F    json (default: one JSON object per line) or pretty ($DETOUR_LOG_FORMAT)`;

/** Field names that may hold a credential, at the top level and one or two objects down. */
const SECRET_FIELDS = ['secret', 'password', 'token', 'authorization', 'chapSecret'];
export const REDACTED_PATHS = SECRET_FIELDS.flatMap((f) => [f, `*.${f}`, `*.*.${f}`]);

/** A bad --log-level/--log-format or DETOUR_LOG_* value: a usage error naming where it came from. */
export class LogSettingsError extends UsageError {}

export interface LogSettings {
  level: LogLevel;
  format: LogFormat;
}

/** The flag, else the environment, else info/json. */
export function resolveLogSettings(flags: { 'log-level'?: string; 'log-format'?: string } = {}, env: NodeJS.ProcessEnv = process.env): LogSettings {
  const pick = <T extends string>(flag: string | undefined, variable: string, allowed: readonly T[], fallback: T, what: string): T => {
    const fromFlag = flag !== undefined;
    const raw = fromFlag ? flag : env[variable] || undefined;
    if (raw === undefined) return fallback;
    const value = raw.trim().toLowerCase();
    if ((allowed as readonly string[]).includes(value)) return value as T;
    const source = fromFlag ? `--${what.replace(' ', '-')}` : `${variable} (environment)`;
    throw new LogSettingsError(`${source}: '${raw}' is not a ${what} (${allowed.join(', ')})`);
  };
  return {
    level: pick(flags['log-level'], 'DETOUR_LOG_LEVEL', LOG_LEVELS, 'info', 'log level'),
    format: pick(flags['log-format'], 'DETOUR_LOG_FORMAT', LOG_FORMATS, 'json', 'log format'),
  };
}

export interface LoggerOptions extends Partial<LogSettings> {
  /** Where lines go (default stdout). Anything with write(string). */
  destination?: { write(line: string): unknown; isTTY?: boolean };
  /** ANSI colours in pretty mode; default: when the destination is a terminal and NO_COLOR is unset. */
  color?: boolean;
}

/**
 * The process logger. Level and format default to $DETOUR_LOG_LEVEL and $DETOUR_LOG_FORMAT
 * (checked: a bad value throws LogSettingsError), then info and json.
 */
export function createLogger(name: string, opts: LoggerOptions = {}): Logger {
  const fromEnv = opts.level === undefined || opts.format === undefined ? resolveLogSettings({}, process.env) : undefined;
  const level = opts.level ?? fromEnv!.level;
  const format = opts.format ?? fromEnv!.format;
  const options: pino.LoggerOptions = {
    name,
    level,
    base: { pid: process.pid },
    redact: { paths: REDACTED_PATHS, censor: '[redacted]' },
  };
  const out = opts.destination ?? process.stdout;
  if (format === 'json') {
    return opts.destination ? pino(options, { write: (s: string) => void out.write(s) }) : pino(options);
  }
  const color = opts.color ?? (Boolean(out.isTTY) && !process.env.NO_COLOR);
  return pino(options, { write: (s: string) => void out.write(formatPretty(s, { color }) + '\n') });
}

// ---- pretty format ------------------------------------------------------------------------------

const LEVEL_NAMES: Record<number, string> = { 10: 'TRACE', 20: 'DEBUG', 30: 'INFO', 40: 'WARN', 50: 'ERROR', 60: 'FATAL' };
const LEVEL_COLORS: Record<number, string> = { 10: '90', 20: '36', 30: '32', 40: '33', 50: '31', 60: '35' };
/** What an operator looks for first: these lead, in this order, before any other field. */
export const LEADING_FIELDS = ['volume', 'initiator', 'tsih', 'backupId', 'phase'];
/** Already shown (time, level, message) or the same on every line of the process. */
const HIDDEN_FIELDS = new Set(['time', 'level', 'msg', 'pid', 'hostname', 'name', 'v']);

function formatValue(v: unknown): string {
  if (typeof v === 'string') return /^[^\s"=]+$/.test(v) ? v : JSON.stringify(v);
  if (typeof v === 'number' || typeof v === 'boolean' || v === null) return String(v);
  if (typeof v === 'object' && v !== null && typeof (v as { message?: unknown }).message === 'string' && 'stack' in v) {
    // A serialized Error: its message; the stack is in the JSON format for whoever needs it.
    return JSON.stringify((v as unknown as { message: string }).message);
  }
  return JSON.stringify(v) ?? String(v);
}

function clock(ms: number): string {
  const d = new Date(ms);
  const p = (n: number, w = 2) => String(n).padStart(w, '0');
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
}

/**
 * One JSON log line as one readable line: `12:04:05.123 INFO  message  volume=vol1 tsih=3 ...`.
 * Newlines inside values are escaped, so an event never spans two lines.
 */
export function formatPretty(jsonLine: string, opts: { color?: boolean } = {}): string {
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(jsonLine) as Record<string, unknown>;
  } catch {
    return jsonLine.replace(/\n+$/, '').replace(/\n/g, '\\n');
  }
  const level = typeof o.level === 'number' ? o.level : 30;
  let levelText = (LEVEL_NAMES[level] ?? `L${level}`).padEnd(5);
  if (opts.color) levelText = `\x1b[${LEVEL_COLORS[level] ?? '0'}m${levelText}\x1b[0m`;
  const time = typeof o.time === 'number' ? clock(o.time) : '--:--:--.---';
  const keys = [...LEADING_FIELDS.filter((k) => k in o), ...Object.keys(o).filter((k) => !LEADING_FIELDS.includes(k) && !HIDDEN_FIELDS.has(k))];
  const fields = keys.filter((k) => o[k] !== undefined).map((k) => `${k}=${formatValue(o[k])}`);
  const msg = typeof o.msg === 'string' ? o.msg : '';
  const line = [time, levelText, msg, ...(fields.length ? [' ' + fields.join(' ')] : [])].join(' ');
  return line.replace(/\r?\n/g, '\\n');
}
