// `detour backup start|list|show|cancel`: the backup commands of CONTRACT.md, as a client of the
// HTTP API of a running `detour serve`.

import type { Command } from '../cli.ts';
import { UsageError } from '../cli.ts';
import { parseCommandArgs } from '../args.ts';
import { parseDuration } from '../config.ts';
import type { BackupObject } from '../model.ts';
import { CLIENT_OPTIONS, clientFromArgs, reportClientErrors, type ApiClient } from '../api-client.ts';
import { formatBytes, formatDuration, formatTable, formatTime } from './format.ts';

const CLIENT_HELP = `  --api URL         detour's API (default $DETOUR_API, else http://127.0.0.1:9270)
  --token T         bearer token (default $DETOUR_TOKEN)`;

const HELP = `usage: detour backup start VOLUME [--label TEXT] [--wait] [--json]
       detour backup list [--json]
       detour backup show ID [--json]
       detour backup cancel ID

  start     start a backup of VOLUME; prints its id (or the backup object with --json)
              --label TEXT   free text stored with the backup
              --wait         return when the backup ends: a progress bar on a terminal
                             (phase, bytes or journal records done, rate, ETA, journal
                             depth, elapsed time), plain progress lines otherwise
              --poll DUR     how often --wait asks for progress (default 500ms)
  list      every backup detour knows
  show      one backup
  cancel    stop a running backup
${CLIENT_HELP}
  --json            machine-readable output: the last line printed is the backup object

Exit status: 0 success (for --wait: the backup completed), 1 failed, cancelled or API error,
2 bad arguments.
`;

/** How often --wait prints a progress line when nobody is watching a terminal. */
const PLAIN_PROGRESS_INTERVAL_MS = 5_000;
/** How often --wait --json prints a progress object between phase changes. */
const JSON_PROGRESS_INTERVAL_MS = 2_000;
const DEFAULT_POLL_MS = 500;

/** Options of the subcommands that take a value, so the subcommand may come after them. */
const VALUE_OPTIONS = new Set(['--api', '--token', '--label', '--poll']);

/** The subcommand is the first word that is neither an option nor an option's value. */
function splitSubcommand(argv: string[]): { sub: string | undefined; rest: string[] } {
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') break;
    if (a.startsWith('-')) {
      if (a === '--help' || a === '-h') return { sub: a, rest: [...argv.slice(0, i), ...argv.slice(i + 1)] };
      if (VALUE_OPTIONS.has(a)) i++;
      continue;
    }
    return { sub: a, rest: [...argv.slice(0, i), ...argv.slice(i + 1)] };
  }
  return { sub: undefined, rest: argv };
}

export const backupCommand: Command = async (argv) => {
  const { sub, rest } = splitSubcommand(argv);
  switch (sub) {
    case 'start':
      return reportClientErrors('backup start', () => startBackup(rest));
    case 'list':
      return reportClientErrors('backup list', () => listBackups(rest));
    case 'show':
      return reportClientErrors('backup show', () => showBackup(rest));
    case 'cancel':
      return reportClientErrors('backup cancel', () => cancelBackup(rest));
    case '--help':
    case '-h':
    case 'help':
      process.stdout.write(HELP);
      return 0;
    case undefined:
      throw new UsageError(`a subcommand is required (start, list, show, cancel)\n${HELP}`);
    default:
      throw new UsageError(`unknown subcommand '${sub}' (start, list, show, cancel)`);
  }
};

function onePositional(positionals: string[], what: string, usage: string): string {
  if (positionals.length === 0) throw new UsageError(`${what} is required\nusage: detour ${usage}`);
  if (positionals.length > 1) throw new UsageError(`unexpected argument '${positionals[1]}'`);
  const value = positionals[0]!;
  if (value === '') throw new UsageError(`${what} must not be empty`);
  return value;
}

async function startBackup(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs(argv, {
    ...CLIENT_OPTIONS,
    label: { type: 'string' },
    wait: { type: 'boolean' },
    json: { type: 'boolean' },
    poll: { type: 'string' },
    help: { type: 'boolean', short: 'h' },
  });
  if (values.help) {
    process.stdout.write(HELP);
    return 0;
  }
  const volume = onePositional(positionals, 'VOLUME', 'backup start VOLUME [--label TEXT] [--wait] [--json]');
  let pollMs = DEFAULT_POLL_MS;
  if (values.poll !== undefined) {
    const ms = parseDuration(values.poll);
    if (ms === undefined || ms < 10) throw new UsageError(`--poll: '${values.poll}' is not a duration of at least 10ms (examples: 500ms, 2s)`);
    pollMs = ms;
  }
  if (values.poll !== undefined && !values.wait) throw new UsageError('--poll only makes sense with --wait');
  const client = clientFromArgs(values);

  const started = await client.startBackup(volume, values.label === undefined ? {} : { label: values.label });
  if (!values.wait) {
    process.stdout.write(values.json ? JSON.stringify(started) + '\n' : `${started.id}\n`);
    return 0;
  }
  const final = await waitForBackup(client, started, {
    pollMs,
    view: values.json ? new JsonView() : process.stderr.isTTY ? new BarView(process.stderr) : new PlainView(process.stderr),
  });
  if (values.json) {
    process.stdout.write(JSON.stringify(final) + '\n');
  } else {
    process.stdout.write(summary(final) + '\n');
  }
  return final.state === 'completed' ? 0 : 1;
}

/** The line --wait prints on stdout at the end (without --json). */
export function summary(b: BackupObject): string {
  const t = b.finishedAt ? (Date.parse(b.finishedAt) - Date.parse(b.startedAt)) / 1000 : NaN;
  const took = Number.isFinite(t) && t >= 0 ? t : undefined;
  const after = took === undefined ? '' : ` after ${formatDuration(took)}`;
  switch (b.state) {
    case 'completed': {
      const inTime = took === undefined ? '' : ` in ${formatDuration(took)}`;
      const avg = took !== undefined && took > 0 ? ` at ${formatBytes(b.bytesTotal / took)}/s` : '';
      return `backup ${b.id} of ${b.volume} completed${inTime}: ${formatBytes(b.bytesTotal)}${avg}, sha256 ${b.sha256 ?? '-'}`;
    }
    case 'failed':
      return `backup ${b.id} of ${b.volume} failed in phase ${b.phase}${after}: ${b.error ?? 'no reason given'}`;
    case 'cancelled':
      return `backup ${b.id} of ${b.volume} cancelled in phase ${b.phase}${after}`;
    default:
      return `backup ${b.id} of ${b.volume} is ${b.state} (phase ${b.phase})`;
  }
}

/** What --wait shows while it polls. */
export interface ProgressView {
  update(b: BackupObject, now: number): void;
  /** Called once with the final object, before the command prints its result. */
  finish(b: BackupObject): void;
  /** The user stopped waiting (Ctrl-C): leave the terminal tidy. */
  interrupt(): void;
}

async function waitForBackup(client: ApiClient, started: BackupObject, opts: { pollMs: number; view: ProgressView }): Promise<BackupObject> {
  const { view } = opts;
  // Ctrl-C stops the waiting, not the backup: say so, and how to stop the backup itself.
  const onSigint = () => {
    view.interrupt();
    process.stderr.write(`stopped waiting; backup ${started.id} goes on (stop it with: detour backup cancel ${started.id})\n`);
    process.exit(130);
  };
  process.once('SIGINT', onSigint);
  try {
    let b = started;
    view.update(b, Date.now());
    while (b.state === 'running') {
      await new Promise((r) => setTimeout(r, opts.pollMs));
      b = await client.getBackup(started.id);
      if (b.state === 'running') view.update(b, Date.now());
    }
    view.finish(b);
    return b;
  } catch (err) {
    view.interrupt();
    throw err;
  } finally {
    process.off('SIGINT', onSigint);
  }
}

/** Rate of a growing count over the last few seconds, so the ETA follows changes in throughput. */
export class RateMeter {
  #samples: { t: number; n: number }[] = [];
  constructor(private readonly windowMs = 10_000) {}

  add(t: number, n: number): void {
    const last = this.#samples.at(-1);
    // A count that goes back (a copy that restarts, a new phase) starts a new window.
    if (last && n < last.n) this.#samples = [];
    this.#samples.push({ t, n });
    while (this.#samples.length > 2 && t - this.#samples[0]!.t > this.windowMs) this.#samples.shift();
  }

  reset(): void {
    this.#samples = [];
  }

  /** Units per second, or undefined until there is half a second of history. */
  rate(): number | undefined {
    const first = this.#samples[0];
    const last = this.#samples.at(-1);
    if (!first || !last || last.t - first.t < 500) return undefined;
    return ((last.n - first.n) * 1000) / (last.t - first.t);
  }
}

export interface ProgressFields {
  /** How far the current phase is, 0..1; undefined while it cannot be told (switching). */
  fraction: number | undefined;
  /** What the fraction counts: "1.2 GiB/4.0 GiB" while copying, "12/52 records" while draining. */
  done: string;
  rate: string | undefined;
  eta: string | undefined;
  /** Journal depth: records not yet on the main target, of all records, and the journal's bytes. */
  journal: string;
  elapsed: string;
}

/**
 * Figures for one progress line. The copy moves bytesCopied; the drain moves journal records to
 * the main target, so while draining the bar, rate and ETA are about records.
 */
export function progressFields(b: BackupObject, rates: { copy?: number; drain?: number }, now: number): ProgressFields {
  const { records, unreflected, bytes } = b.journal;
  const elapsedS = (now - Date.parse(b.startedAt)) / 1000;
  const f: ProgressFields = {
    fraction: undefined,
    done: `${formatBytes(b.bytesCopied)}/${formatBytes(b.bytesTotal)}`,
    rate: undefined,
    eta: undefined,
    journal: `journal ${unreflected}/${records} (${formatBytes(bytes)})`,
    elapsed: formatDuration(Math.max(0, elapsedS)),
  };
  switch (b.phase) {
    case 'copying': {
      f.fraction = b.bytesTotal > 0 ? Math.min(1, b.bytesCopied / b.bytesTotal) : 0;
      if (rates.copy !== undefined && rates.copy > 0) {
        f.rate = `${formatBytes(rates.copy)}/s`;
        f.eta = formatDuration(Math.max(0, b.bytesTotal - b.bytesCopied) / rates.copy);
      }
      break;
    }
    case 'draining': {
      f.fraction = records > 0 ? Math.min(1, (records - unreflected) / records) : 1;
      f.done = `${records - unreflected}/${records} records`;
      if (rates.drain !== undefined && rates.drain > 0) {
        f.rate = `${rates.drain >= 10 ? rates.drain.toFixed(0) : rates.drain.toFixed(1)} rec/s`;
        f.eta = formatDuration(unreflected / rates.drain);
      }
      break;
    }
    case 'cutover':
    case 'done':
      f.fraction = 1;
      break;
    case 'switching':
      break;
  }
  return f;
}

/** Copy and drain rates from successive backup objects. */
class Meters {
  readonly copy = new RateMeter();
  readonly drain = new RateMeter();
  #phase: string | undefined;
  add(b: BackupObject, now: number): { copy?: number; drain?: number } {
    // Each phase is measured from its own start: time spent switching is not copy time.
    if (b.phase !== this.#phase) {
      this.copy.reset();
      this.drain.reset();
      this.#phase = b.phase;
    }
    this.copy.add(now, b.bytesCopied);
    this.drain.add(now, b.journal.records - b.journal.unreflected);
    // Only the current phase's rate means anything: an old copy rate would mislead while draining.
    return b.phase === 'copying' ? { copy: this.copy.rate() } : b.phase === 'draining' ? { drain: this.drain.rate() } : {};
  }
}

/** The parts of a terminal stream the bar uses. */
export interface TerminalLike {
  write(text: string): unknown;
  columns?: number;
}

/** A single redrawn line on a terminal, plus one permanent line per phase change. */
export class BarView implements ProgressView {
  #phase: string | undefined;
  #meters = new Meters();
  #drawn = false;
  constructor(private readonly out: TerminalLike) {}

  update(b: BackupObject, now: number): void {
    const rates = this.#meters.add(b, now);
    if (b.phase !== this.#phase) {
      this.#clear();
      this.out.write(this.#phase === undefined ? `backup ${b.id} of ${b.volume}: ${b.phase}\n` : `  ${b.phase}\n`);
      this.#phase = b.phase;
    }
    const f = progressFields(b, rates, now);
    const pct = f.fraction === undefined ? '   ' : `${(f.fraction * 100).toFixed(0).padStart(3)}%`;
    const tail = [pct, f.done, f.rate, f.eta && `ETA ${f.eta}`, f.journal, `${f.elapsed} elapsed`].filter(Boolean).join('  ');
    const columns = this.out.columns || 80;
    // A fixed share of the width, so the bar does not jump as the figures change length; it goes
    // away on a narrow terminal, and the figures are cut last.
    const width = Math.min(30, columns - 100);
    let bar = '';
    if (width >= 8) bar = f.fraction === undefined ? `[${'·'.repeat(width)}]` : `[${'█'.repeat(Math.round(f.fraction * width)).padEnd(width, '░')}]`;
    let line = [b.phase.padEnd(9), bar, tail].filter(Boolean).join('  ');
    if (line.length > columns - 1) line = line.slice(0, columns - 1);
    this.out.write(`\r${line}\x1b[K`);
    this.#drawn = true;
  }

  finish(b: BackupObject): void {
    this.#clear();
    if (b.phase !== this.#phase && b.state === 'completed') this.out.write(`  ${b.phase}\n`);
  }

  interrupt(): void {
    this.#clear();
  }

  #clear(): void {
    if (this.#drawn) this.out.write('\r\x1b[K');
    this.#drawn = false;
  }
}

/** For logs and pipes: one line per phase change and at most one progress line every few seconds. */
export class PlainView implements ProgressView {
  #phase: string | undefined;
  #meters = new Meters();
  #lastLine = 0;
  constructor(
    private readonly out: { write(text: string): unknown },
    private readonly intervalMs = PLAIN_PROGRESS_INTERVAL_MS,
  ) {}

  update(b: BackupObject, now: number): void {
    const rates = this.#meters.add(b, now);
    if (b.phase !== this.#phase) {
      this.out.write(`backup ${b.id} of ${b.volume}: phase ${b.phase}\n`);
      this.#phase = b.phase;
      this.#lastLine = now;
      return;
    }
    if (now - this.#lastLine < this.intervalMs) return;
    this.#lastLine = now;
    const f = progressFields(b, rates, now);
    const parts = [f.fraction === undefined ? undefined : `${(f.fraction * 100).toFixed(0)}%`, f.done, f.rate, f.eta && `ETA ${f.eta}`, f.journal, `elapsed ${f.elapsed}`].filter(Boolean);
    this.out.write(`backup ${b.id} of ${b.volume}: ${b.phase} ${parts.join(', ')}\n`);
  }

  finish(b: BackupObject): void {
    if (b.phase !== this.#phase) this.out.write(`backup ${b.id} of ${b.volume}: phase ${b.phase}\n`);
  }

  interrupt(): void {}
}

/**
 * --wait --json: backup objects as JSON lines on stdout (on each phase change and every couple
 * of seconds), so a script can follow progress with the same parser it uses for the result. The
 * command itself prints the final object last.
 */
class JsonView implements ProgressView {
  #phase: string | undefined;
  #last = 0;
  #lastText = '';

  update(b: BackupObject, now: number): void {
    const text = JSON.stringify(b);
    if (b.phase === this.#phase && (now - this.#last < JSON_PROGRESS_INTERVAL_MS || text === this.#lastText)) return;
    this.#phase = b.phase;
    this.#last = now;
    this.#lastText = text;
    process.stdout.write(text + '\n');
  }

  finish(): void {}
  interrupt(): void {}
}

async function listBackups(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs(argv, { ...CLIENT_OPTIONS, json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } });
  if (values.help) {
    process.stdout.write(HELP);
    return 0;
  }
  if (positionals.length) throw new UsageError(`unexpected argument '${positionals[0]}'`);
  const backups = await clientFromArgs(values).listBackups();
  if (values.json) {
    process.stdout.write(JSON.stringify(backups) + '\n');
    return 0;
  }
  if (backups.length === 0) {
    process.stdout.write('no backups\n');
    return 0;
  }
  const rows = backups.map((b) => [
    b.id,
    b.volume,
    b.state,
    b.phase,
    formatTime(b.startedAt),
    formatBytes(b.bytesTotal),
    b.sha256 ? b.sha256.slice(0, 12) : '-',
  ]);
  process.stdout.write(formatTable(['ID', 'VOLUME', 'STATE', 'PHASE', 'STARTED', 'SIZE', 'SHA256'], rows) + '\n');
  return 0;
}

async function showBackup(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs(argv, { ...CLIENT_OPTIONS, json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } });
  if (values.help) {
    process.stdout.write(HELP);
    return 0;
  }
  const id = onePositional(positionals, 'ID', 'backup show ID [--json]');
  const b = await clientFromArgs(values).getBackup(id);
  if (values.json) {
    process.stdout.write(JSON.stringify(b) + '\n');
    return 0;
  }
  const pct = b.bytesTotal > 0 ? ` (${((b.bytesCopied / b.bytesTotal) * 100).toFixed(1)}%)` : '';
  const rows: [string, string][] = [
    ['id', b.id],
    ['volume', b.volume],
    ['label', b.label ?? '-'],
    ['state', b.state],
    ['phase', b.phase],
    ['freezeSeq', b.freezeSeq === null ? '-' : String(b.freezeSeq)],
    ['copied', `${formatBytes(b.bytesCopied)} of ${formatBytes(b.bytesTotal)}${pct}`],
    ['journal', `${b.journal.records} records, ${formatBytes(b.journal.bytes)}, ${b.journal.unreflected} not yet on the main target`],
    ['started', formatTime(b.startedAt)],
    ['finished', formatTime(b.finishedAt)],
    ['error', b.error ?? '-'],
    ['sha256', b.sha256 ?? '-'],
  ];
  const w = Math.max(...rows.map(([k]) => k.length));
  process.stdout.write(rows.map(([k, v]) => `${k.padEnd(w)}  ${v}`).join('\n') + '\n');
  return 0;
}

async function cancelBackup(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs(argv, { ...CLIENT_OPTIONS, json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } });
  if (values.help) {
    process.stdout.write(HELP);
    return 0;
  }
  const id = onePositional(positionals, 'ID', 'backup cancel ID');
  await clientFromArgs(values).cancelBackup(id);
  process.stdout.write(values.json ? JSON.stringify({ id, cancelRequested: true }) + '\n' : `cancel requested for backup ${id}\n`);
  return 0;
}
