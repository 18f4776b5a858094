import fs from 'node:fs';
import path from 'node:path';
import YAML from 'yaml';
import { z } from 'zod';

/** A config problem, reported as "<file>: <key path>: <problem>". */
export class ConfigError extends Error {
  constructor(
    readonly file: string,
    readonly keyPath: string,
    readonly problem: string,
  ) {
    super(`${file}: ${keyPath || '(top level)'}: ${problem}`);
  }
}

const DURATION_UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** "5s", "500ms", "2m", or a number of milliseconds. */
export function parseDuration(v: string | number): number | undefined {
  if (typeof v === 'number') return Number.isFinite(v) && v >= 0 ? v : undefined;
  const m = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h)$/.exec(v.trim());
  return m ? Math.round(Number(m[1]) * DURATION_UNITS[m[2]!]!) : undefined;
}

const SIZE_UNITS: Record<string, number> = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 };

/** "1G", "512M", or a number of bytes. */
export function parseSizeValue(v: string | number): number | undefined {
  if (typeof v === 'number') return Number.isSafeInteger(v) && v >= 0 ? v : undefined;
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$/i.exec(v.trim());
  return m ? Math.round(Number(m[1]) * SIZE_UNITS[m[2]!.toLowerCase()]!) : undefined;
}

const duration = z.union([z.string(), z.number()]).transform((v, ctx) => {
  const ms = parseDuration(v);
  if (ms === undefined) {
    ctx.addIssue({ code: 'custom', message: `'${v}' is not a duration (examples: 5s, 500ms, 2m)` });
    return z.NEVER;
  }
  return ms;
});

export interface HostPort {
  host: string;
  port: number;
}

function hostPort(defaultPort: number) {
  return z.string().transform((v, ctx): HostPort => {
    const m = /^(?:\[([^\]]+)\]|([^:\s]+))(?::(\d+))?$/.exec(v.trim());
    const port = m?.[3] !== undefined ? Number(m[3]) : defaultPort;
    if (!m || !Number.isInteger(port) || port < 1 || port > 65535) {
      ctx.addIssue({ code: 'custom', message: `'${v}' is not host:port` });
      return z.NEVER;
    }
    return { host: (m[1] ?? m[2])!, port };
  });
}

const iscsiName = z
  .string()
  .max(223)
  .regex(/^(iqn\.\d{4}-\d{2}\.[^\s:]+(:\S+)?|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$/, 'is not an iSCSI name (iqn.YYYY-MM.domain[:name], eui., naa.)');

const control = z.discriminatedUnion('type', [
  z
    .object({
      type: z.literal('tgt'),
      tid: z.number().int().min(1),
      controlPort: z.number().int().min(0).max(65535).default(0),
    })
    .strict(),
  z
    .object({
      type: z.literal('exec'),
      redirectOn: z.string().min(1),
      redirectOff: z.string().min(1),
      kick: z.string().min(1),
      list: z.string().min(1),
    })
    .strict(),
  z.object({ type: z.literal('none') }).strict(),
]);

/** A byte count with an optional K/M/G/T suffix (powers of 1024): "50M", "1G", or a plain number. */
const byteSize = z.union([z.string(), z.number()]).transform((v, ctx) => {
  const n = parseSizeValue(v);
  if (n === undefined || n === 0) {
    ctx.addIssue({ code: 'custom', message: `'${v}' is not a size (examples: 50M, 1G, 1048576)` });
    return z.NEVER;
  }
  return n;
});

const volume = z
  .object({
    name: z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/, 'must be 1-63 letters, digits, dot, dash or underscore'),
    target: iscsiName,
    main: hostPort(3260),
    topology: z.enum(['inline', 'proxy-directed', 'main-directed']),
    control: control.default({ type: 'none' }),
    ioTimeoutBudget: duration.default(5000),
    // Bytes per second the backup copy may read from the main target ("50M" = 50 MiB/s), so a
    // backup does not starve the main target's other users. Unlimited when absent.
    copyRateLimit: byteSize.optional(),
    // Bytes per second the drain may write to the main target after the copy. Unlimited when
    // absent. Initiator writes are then held to a fraction of it until the cutover (the drain must
    // outrun them), so a low limit slows the initiators' writes for the rest of the backup.
    drainRateLimit: byteSize.optional(),
    // Disk space the capture journal of one backup may use ("8G"). Unlimited when absent; keep it
    // below the free space of dataDir, where a full disk is a failure, not back-pressure. The floor
    // leaves room for the largest write detour accepts (64 MiB) twice over: a write that can never
    // fit the journal could only be failed.
    journalCapacity: byteSize.refine((n) => n >= 128 * 1024 ** 2, 'must be at least 128M').optional(),
    // Journal space written in advance, between backups ("8G"): a backup's writes go into blocks
    // the file system already holds, which makes them durable without a metadata commit each
    // (see src/capture/journal-spares.ts). It stays on dataDir's disk. None when absent.
    journalSpare: byteSize.optional(),
  })
  .strict();

const schema = z
  .object({
    portal: hostPort(3260).default({ host: '127.0.0.2', port: 3260 }),
    api: hostPort(9270).default({ host: '127.0.0.1', port: 9270 }),
    dataDir: z.string().min(1).default('./data'),
    backupStore: z.object({ path: z.string().min(1) }).strict().optional(),
    token: z.string().min(16, 'must be at least 16 characters').optional(),
    volumes: z.array(volume).min(1, 'at least one volume is required'),
  })
  .strict()
  .superRefine((c, ctx) => {
    const seen = new Set<string>();
    c.volumes.forEach((v, i) => {
      if (seen.has(v.name)) ctx.addIssue({ code: 'custom', path: ['volumes', i, 'name'], message: `volume name '${v.name}' is used twice` });
      if (v.journalSpare !== undefined && v.journalCapacity !== undefined && v.journalSpare > v.journalCapacity) {
        ctx.addIssue({ code: 'custom', path: ['volumes', i, 'journalSpare'], message: 'must not be more than journalCapacity: a journal never holds more' });
      }
      seen.add(v.name);
    });
  });

export type DetourConfig = z.output<typeof schema> & { backupStore: { path: string }; file: string };

/**
 * Environment variables that override keys of the config file (and of `npm start`'s embedded
 * defaults), for service managers and containers. Their values are checked like the file's, and
 * an error names the variable. An empty variable counts as unset.
 */
export const CONFIG_ENV: readonly { variable: string; key: readonly [string] | readonly [string, string] }[] = [
  { variable: 'DETOUR_PORTAL', key: ['portal'] },
  // Client commands read DETOUR_API as a URL; one variable serves both, so a URL is accepted here.
  { variable: 'DETOUR_API', key: ['api'] },
  { variable: 'DETOUR_DATA_DIR', key: ['dataDir'] },
  { variable: 'DETOUR_BACKUP_STORE_PATH', key: ['backupStore', 'path'] },
  { variable: 'DETOUR_TOKEN', key: ['token'] },
];

/** "http://host:port/" as the API's listen address "host:port"; other text is left to the schema. */
function apiListenAddress(value: string, variable: string): string {
  const v = value.trim();
  if (!/^[a-z][a-z0-9+.-]*:\/\//i.test(v)) return v;
  let url: URL;
  try {
    url = new URL(v);
  } catch {
    throw new ConfigError(`${variable} (environment)`, 'api', `'${value}' is not host:port or http://host:port`);
  }
  if (url.protocol !== 'http:') throw new ConfigError(`${variable} (environment)`, 'api', `'${value}': detour serves its API over plain http (use host:port or http://host:port)`);
  if (url.username || url.password || (url.pathname !== '/' && url.pathname !== '') || url.search || url.hash) {
    throw new ConfigError(`${variable} (environment)`, 'api', `'${value}' must be just http://host:port`);
  }
  return `${url.hostname}:${url.port || '80'}`;
}

/** The raw config with the environment's overrides applied, and which keys came from where. */
function applyConfigEnv(raw: unknown, env: Record<string, string | undefined>): { merged: unknown; fromEnv: Map<string, string> } {
  const fromEnv = new Map<string, string>();
  if (raw !== undefined && raw !== null && (typeof raw !== 'object' || Array.isArray(raw))) return { merged: raw, fromEnv };
  const merged: Record<string, unknown> = { ...(raw as Record<string, unknown> | null) };
  for (const { variable, key } of CONFIG_ENV) {
    const value = env[variable];
    if (value === undefined || value === '') continue;
    const text = variable === 'DETOUR_API' ? apiListenAddress(value, variable) : value;
    if (key.length === 1) merged[key[0]] = text;
    else {
      const parent = merged[key[0]];
      merged[key[0]] = { ...(typeof parent === 'object' && parent !== null && !Array.isArray(parent) ? parent : {}), [key[1]]: text };
    }
    fromEnv.set(key.join('.'), variable);
  }
  return { merged, fromEnv };
}
export type VolumeConfig = DetourConfig['volumes'][number];

function keyPath(p: readonly PropertyKey[]): string {
  return p.map((k, i) => (typeof k === 'number' ? `[${k}]` : i === 0 ? String(k) : `.${String(k)}`)).join('');
}

/**
 * Validates a parsed config object, after the DETOUR_* overrides of `env` (none by default).
 * Relative paths are resolved against the config file's directory, so a config works the same
 * whatever directory detour is started from; paths from the environment against the current one.
 */
export function validateConfig(raw: unknown, file: string, env: Record<string, string | undefined> = {}): DetourConfig {
  const { merged, fromEnv } = applyConfigEnv(raw, env);
  const r = schema.safeParse(merged ?? {});
  if (!r.success) {
    const issue = r.error.issues[0]!;
    let p = keyPath(issue.path);
    let message = issue.message;
    if (issue.code === 'unrecognized_keys') {
      const keys = (issue as { keys: string[] }).keys;
      p = p ? `${p}.${keys[0]}` : keys[0]!;
      message = 'unknown key';
    } else if (issue.code === 'invalid_type' && /received undefined/i.test(message)) {
      message = 'is required';
    }
    const variable = fromEnv.get(p);
    throw new ConfigError(variable ? `${variable} (environment)` : file, p, message);
  }
  const base = path.dirname(path.resolve(file));
  const baseOf = (key: string) => (fromEnv.has(key) ? process.cwd() : base);
  const dataDir = path.resolve(baseOf('dataDir'), r.data.dataDir);
  return {
    ...r.data,
    dataDir,
    backupStore: { path: r.data.backupStore ? path.resolve(baseOf('backupStore.path'), r.data.backupStore.path) : path.join(dataDir, 'backups') },
    file,
  };
}

export function loadConfig(file: string, env: Record<string, string | undefined> = process.env): DetourConfig {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError(file, '', `cannot read: ${(err as Error).message}`);
  }
  let raw: unknown;
  try {
    raw = YAML.parse(text, { prettyErrors: true });
  } catch (err) {
    throw new ConfigError(file, '', `not valid YAML: ${(err as Error).message.split('\n')[0]}`);
  }
  return validateConfig(raw, file, env);
}
