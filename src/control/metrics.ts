// Prometheus metrics of detour (CONTRACT.md, "Metrics"). Names and labels are binding: dashboards
// and alerts are written against them. The engine calls the typed helpers below rather than the
// prom-client objects, so label values stay consistent (SCSI op and status names come from the
// wire package, phases and session modes from the model).

import type { Logger } from 'pino';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { LatencyHistogram, type HistogramSeries } from './latency-histogram.ts';
import { scsiOpName, scsiStatusName } from 'iscsi-node-wire';
import type { BackupPhase, SessionMode } from './model.ts';

export const BACKUP_PHASES: readonly BackupPhase[] = ['switching', 'copying', 'draining', 'cutover', 'done'];
export const SESSION_MODES: readonly SessionMode[] = ['redirected', 'inline', 'capture'];

/**
 * SCSI command latency: from a cached read on a local disk (tens of microseconds) to a command
 * held across a cutover or retried by a struggling array (seconds).
 */
export const SCSI_LATENCY_BUCKETS = [
  0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
];

/**
 * Durable journal writes: a fraction of a millisecond on a local SSD, tens of milliseconds on a
 * struggling disk, and a write an initiator is waiting for all the while.
 */
export const JOURNAL_COMMIT_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1];

/** Cutover pauses are bounded by the volume's ioTimeoutBudget (5 s by default). */
export const CUTOVER_PAUSE_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30];

type VolumeLabel = 'volume';

export interface DetourMetrics {
  registry: Registry;
  sessions: Gauge<'volume' | 'mode'>;
  scsiCommands: Counter<'volume' | 'op' | 'status'>;
  scsiCommandDuration: LatencyHistogram<'volume' | 'op'>;
  backupPhase: Gauge<'volume' | 'phase'>;
  backupBytesCopied: Counter<VolumeLabel>;
  backupBytesTotal: Gauge<VolumeLabel>;
  journalRecords: Gauge<VolumeLabel>;
  journalBytes: Gauge<VolumeLabel>;
  journalUnreflected: Gauge<VolumeLabel>;
  journalSpare: Gauge<VolumeLabel>;
  drainBytes: Counter<VolumeLabel>;
  cutoverPause: Histogram<VolumeLabel>;
  lastBackupSuccess: Gauge<VolumeLabel>;
  /** Logins detour answered with "target moved temporarily" (not in the contract; an addition). */
  loginRedirects: Counter<VolumeLabel>;
  /** Share of the volume copied by the backup in progress, or by the last one (an addition). */
  backupProgress: Gauge<VolumeLabel>;
  /** Admission limit on initiator writes while a drain does not converge, 0 = none (an addition). */
  writeLimit: Gauge<VolumeLabel>;
  /** Duration of each commit group's durable write to the journal (an addition). */
  journalCommitDuration: LatencyHistogram<VolumeLabel>;
  /** Records those commit groups carried; divided by the histogram's count, records per group (an addition). */
  journalCommitRecords: Counter<VolumeLabel>;

  /**
   * Publishes zero-valued series for a configured volume, so dashboards and rate() see the volume
   * from start-up rather than from its first event.
   */
  addVolume(volume: string): void;
  /** Drops every series of a volume (volume removed from the configuration). */
  removeVolume(volume: string): Promise<void>;
  /**
   * One completed SCSI command. `op` is a CDB or an scsiOpName() name; `status` a SCSI status
   * byte or an scsiStatusName() name.
   */
  observeCommand(volume: string, op: Buffer | string, status: number | string, seconds: number): void;
  /**
   * Current session counts of a volume; modes left out are 0, except `redirected` for a volume
   * under watchRedirected(), which keeps its last counted value.
   */
  setSessions(volume: string, counts: Partial<Record<SessionMode, number>>): void;
  /**
   * Counts the volume's `redirected` sessions with `count` when /metrics is scraped, at most once
   * every `maxAgeMs` (the count may be a slow call to the main target's control). A scrape waits
   * at most `waitMs` for a fresh count, then serves the previous one. A failed count keeps the
   * previous value and is reported to `onError`.
   */
  watchRedirected(volume: string, count: () => Promise<number>, opts?: { maxAgeMs?: number; waitMs?: number; onError?: (err: unknown) => void }): void;
  /** One login answered with a redirect to the main target. */
  loginRedirected(volume: string): void;
  /** Runs `hook` at every scrape, before the gauges are read: for values sampled, not pushed. */
  onScrape(hook: () => void): void;
  /** The phase of the backup in progress, or undefined when the volume has none. */
  setPhase(volume: string, phase: BackupPhase | undefined): void;
  setBytesTotal(volume: string, bytes: number): void;
  /** Bytes copied so far by the backup in progress, of its total: detour_backup_progress_ratio. */
  setProgress(volume: string, copied: number, total: number): void;
  addCopied(volume: string, bytes: number): void;
  setJournal(volume: string, journal: { records: number; bytes: number; unreflected: number }): void;
  /** Bytes of journal spares ready for the volume's next backup (its journalSpare). */
  setJournalSpare(volume: string, bytes: number): void;
  /** Bytes per second initiator writes are admitted at, or null when they are not held back. */
  setWriteLimit(volume: string, bytesPerSecond: number | null): void;
  addDrained(volume: string, bytes: number): void;
  /** One commit group made durable by the volume's journal: its write time and its records. */
  observeJournalCommit(volume: string, seconds: number, records: number): void;
  observeCutover(volume: string, seconds: number): void;
  /** A backup of the volume completed; `time` is when (Date or epoch milliseconds). */
  backupSucceeded(volume: string, time?: Date | number): void;
}

export function createMetrics(opts: { defaultMetrics?: boolean } = {}): DetourMetrics {
  const registry = new Registry();
  if (opts.defaultMetrics !== false) collectDefaultMetrics({ register: registry });
  const registers = [registry];

  const watched = new Map<string, RedirectWatch>();
  const scrapeHooks: Array<() => void> = [];
  const sessions: Gauge<'volume' | 'mode'> = new Gauge({
    name: 'detour_sessions',
    help: 'iSCSI sessions of the volume: redirected = its initiators on the main target after a redirect by detour; inline and capture = on detour',
    labelNames: ['volume', 'mode'] as const,
    registers,
    collect: () => {
      // The first detour metric a scrape reads: the hooks bring every gauge up to date first.
      for (const hook of scrapeHooks) {
        try {
          hook();
        } catch {
          // A scrape serves what it has; the hook's owner logs its own failures.
        }
      }
      return refreshRedirected();
    },
  });
  // Once per command on the data path: commands are counted in plain numbers and handed to the
  // counter when /metrics is scraped, because prom-client hashes the label set on every inc().
  const commandSeries = new Map<string, CommandSeries>();
  const scsiCommands = new Counter({
    name: 'detour_scsi_commands_total',
    help: 'SCSI commands completed through detour, by operation and SCSI status',
    labelNames: ['volume', 'op', 'status'] as const,
    registers,
    collect() {
      for (const c of commandSeries.values()) {
        if (c.uncounted === 0) continue;
        this.inc(c.labels, c.uncounted);
        c.uncounted = 0;
      }
    },
  });
  const seriesByCode = new Map<string, Map<number, CommandSeries>>();
  const commandSeriesOf = (volume: string, op: string, status: string): CommandSeries => {
    const key = `${volume}\0${op}\0${status}`;
    let c = commandSeries.get(key);
    if (!c) {
      c = { volume, labels: { volume, op, status }, uncounted: 0, duration: scsiCommandDuration.series({ volume, op }) };
      commandSeries.set(key, c);
    }
    return c;
  };
  const scsiCommandDuration = new LatencyHistogram({
    name: 'detour_scsi_command_duration_seconds',
    help: 'Time from a SCSI command reaching detour to its response leaving detour',
    labelNames: ['volume', 'op'] as const,
    buckets: SCSI_LATENCY_BUCKETS,
    registers,
  });
  const backupPhase = new Gauge({
    name: 'detour_backup_phase',
    help: 'Phase of the backup in progress: 1 for the current phase, 0 for the others',
    labelNames: ['volume', 'phase'] as const,
    registers,
  });
  const backupBytesCopied = new Counter({
    name: 'detour_backup_bytes_copied_total',
    help: 'Bytes copied from the main target into backups',
    labelNames: ['volume'] as const,
    registers,
  });
  const backupBytesTotal = new Gauge({
    name: 'detour_backup_bytes_total',
    help: 'Size in bytes of the volume image being backed up',
    labelNames: ['volume'] as const,
    registers,
  });
  const journalRecords = new Gauge({
    name: 'detour_journal_records',
    help: 'Write records in the volume journal',
    labelNames: ['volume'] as const,
    registers,
  });
  const journalBytes = new Gauge({
    name: 'detour_journal_bytes',
    help: 'Bytes of write data in the volume journal',
    labelNames: ['volume'] as const,
    registers,
  });
  const journalSpare = new Gauge({
    name: 'detour_journal_spare_bytes',
    help: 'Journal space written in advance for the next backup of the volume (journalSpare)',
    labelNames: ['volume'] as const,
    registers,
  });
  const journalUnreflected = new Gauge({
    name: 'detour_journal_unreflected_records',
    help: 'Journal records not yet written to the main target',
    labelNames: ['volume'] as const,
    registers,
  });
  const writeLimit = new Gauge({
    name: 'detour_write_limit_bytes_per_second',
    help: 'Rate initiator writes are admitted at while the drain does not keep up with them (0: not held back)',
    labelNames: ['volume'] as const,
    registers,
  });
  const drainBytes = new Counter({
    name: 'detour_drain_bytes_total',
    help: 'Bytes of journaled writes replayed to the main target',
    labelNames: ['volume'] as const,
    registers,
  });
  const cutoverPause = new Histogram({
    name: 'detour_cutover_pause_seconds',
    help: 'How long initiator I/O was held at cutover',
    labelNames: ['volume'] as const,
    buckets: CUTOVER_PAUSE_BUCKETS,
    registers,
  });
  const lastBackupSuccess = new Gauge({
    name: 'detour_last_backup_success_timestamp_seconds',
    help: 'Unix time at which the last successful backup of the volume completed',
    labelNames: ['volume'] as const,
    registers,
  });
  const loginRedirects = new Counter({
    name: 'detour_login_redirects_total',
    help: 'Logins detour answered with "target moved temporarily" to the main target',
    labelNames: ['volume'] as const,
    registers,
  });

  // Once per commit group, up to tens of thousands a second: kept in plain numbers per volume and
  // handed to prom-client at scrape time, like the command counts.
  const commitSeries = new Map<string, { duration: HistogramSeries<VolumeLabel>; uncounted: number }>();
  const journalCommitDuration = new LatencyHistogram({
    name: 'detour_journal_commit_duration_seconds',
    help: 'Time each commit group of journal records took to become durable (one write to disk, O_DSYNC)',
    labelNames: ['volume'] as const,
    buckets: JOURNAL_COMMIT_BUCKETS,
    registers,
  });
  const journalCommitRecords = new Counter({
    name: 'detour_journal_commit_records_total',
    help: 'Journal records made durable, counted by commit group (records per group = this / detour_journal_commit_duration_seconds_count)',
    labelNames: ['volume'] as const,
    registers,
    collect() {
      for (const [volume, c] of commitSeries) {
        if (c.uncounted === 0) continue;
        this.inc({ volume }, c.uncounted);
        c.uncounted = 0;
      }
    },
  });
  const commitSeriesOf = (volume: string) => {
    let c = commitSeries.get(volume);
    if (!c) commitSeries.set(volume, (c = { duration: journalCommitDuration.series({ volume }), uncounted: 0 }));
    return c;
  };

  const backupProgress = new Gauge({
    name: 'detour_backup_progress_ratio',
    help: 'Share (0 to 1) of the volume copied by the backup in progress, or by the last one',
    labelNames: ['volume'] as const,
    registers,
  });

  /** Starts the counts that are due, and waits a little for them: a scrape must stay quick. */
  async function refreshRedirected(): Promise<void> {
    const waits: Promise<void>[] = [];
    let waitMs = 0;
    for (const [volume, w] of watched) {
      if (!w.pending && Date.now() - w.at >= w.maxAgeMs) {
        w.pending = w
          .count()
          .then(
            (n) => {
              w.value = level(n);
              if (watched.get(volume) === w) sessions.set({ volume, mode: 'redirected' }, w.value);
            },
            (err: unknown) => w.onError?.(err),
          )
          .finally(() => {
            w.at = Date.now();
            w.pending = undefined;
          });
      }
      if (w.pending) {
        waits.push(w.pending);
        waitMs = Math.max(waitMs, w.waitMs);
      }
    }
    if (waits.length === 0) return;
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([Promise.allSettled(waits), new Promise<void>((resolve) => (timer = setTimeout(resolve, waitMs)))]);
    clearTimeout(timer);
  }

  // Byte counters only ever grow; a negative or non-finite amount is a caller bug that must not
  // make prom-client throw inside the data path.
  const amount = (n: number) => (Number.isFinite(n) && n > 0 ? n : 0);
  const level = (n: number) => (Number.isFinite(n) ? n : 0);

  const setPhase = (volume: string, phase: BackupPhase | undefined) => {
    for (const p of BACKUP_PHASES) backupPhase.set({ volume, phase: p }, p === phase ? 1 : 0);
    // The copy starts with the switch and is whole once the drain begins.
    if (phase === 'switching') backupProgress.set({ volume }, 0);
    else if (phase === 'draining' || phase === 'cutover' || phase === 'done') backupProgress.set({ volume }, 1);
  };
  const setSessions = (volume: string, counts: Partial<Record<SessionMode, number>>) => {
    for (const mode of SESSION_MODES) {
      const kept = mode === 'redirected' ? watched.get(volume)?.value : undefined;
      sessions.set({ volume, mode }, level(counts[mode] ?? kept ?? 0));
    }
  };
  const setJournal = (volume: string, j: { records: number; bytes: number; unreflected: number }) => {
    journalRecords.set({ volume }, level(j.records));
    journalBytes.set({ volume }, level(j.bytes));
    journalUnreflected.set({ volume }, level(j.unreflected));
  };

  // Every metric labelled by volume: removeVolume() goes through them all.
  const byVolume = {
    sessions,
    scsiCommands,
    scsiCommandDuration,
    backupPhase,
    backupBytesCopied,
    backupBytesTotal,
    journalRecords,
    journalBytes,
    journalUnreflected,
    journalSpare,
    drainBytes,
    cutoverPause,
    lastBackupSuccess,
    loginRedirects,
    backupProgress,
    writeLimit,
    journalCommitDuration,
    journalCommitRecords,
  };

  return {
    registry,
    ...byVolume,

    addVolume(volume) {
      setSessions(volume, {});
      setPhase(volume, undefined);
      backupBytesCopied.inc({ volume }, 0);
      backupBytesTotal.set({ volume }, 0);
      setJournal(volume, { records: 0, bytes: 0, unreflected: 0 });
      journalSpare.set({ volume }, 0);
      drainBytes.inc({ volume }, 0);
      loginRedirects.inc({ volume }, 0);
      backupProgress.set({ volume }, 0);
      writeLimit.set({ volume }, 0);
      commitSeriesOf(volume);
      journalCommitRecords.inc({ volume }, 0);
    },
    setJournalSpare(volume, bytes) {
      journalSpare.set({ volume }, level(bytes));
    },
    setWriteLimit(volume, bytesPerSecond) {
      writeLimit.set({ volume }, bytesPerSecond === null ? 0 : level(bytesPerSecond));
    },
    async removeVolume(volume) {
      watched.delete(volume);
      for (const [key, c] of commandSeries) if (c.volume === volume) commandSeries.delete(key);
      seriesByCode.delete(volume);
      commitSeries.delete(volume);
      // prom-client's remove() takes a full label set, so go through the series that exist.
      for (const metric of Object.values(byVolume) as LabelledMetric[]) await removeSeriesOf(metric, volume);
    },
    observeCommand(volume, op, status, seconds) {
      let c: CommandSeries | undefined;
      if (typeof op !== 'string' && typeof status === 'number' && op.length > 0 && NO_SERVICE_ACTION[op[0]!] === 1) {
        // READ and WRITE: the series is found by opcode and status byte, without naming them.
        let byCode = seriesByCode.get(volume);
        if (!byCode) seriesByCode.set(volume, (byCode = new Map()));
        const code = (op[0]! << 8) | status;
        c = byCode.get(code);
        if (!c) byCode.set(code, (c = commandSeriesOf(volume, scsiOpName(op), scsiStatusName(status))));
      } else {
        c = commandSeriesOf(volume, typeof op === 'string' ? op : scsiOpName(op), typeof status === 'string' ? status : scsiStatusName(status));
      }
      c.uncounted++;
      if (Number.isFinite(seconds) && seconds >= 0) c.duration.observe(seconds);
    },
    setSessions,
    watchRedirected(volume, count, o = {}) {
      watched.set(volume, { count, maxAgeMs: o.maxAgeMs ?? 5_000, waitMs: o.waitMs ?? 3_000, onError: o.onError, at: 0, value: 0 });
    },
    loginRedirected(volume) {
      loginRedirects.inc({ volume });
    },
    onScrape(hook) {
      scrapeHooks.push(hook);
    },
    setPhase,
    setBytesTotal(volume, bytes) {
      backupBytesTotal.set({ volume }, level(bytes));
    },
    setProgress(volume, copied, total) {
      if (Number.isFinite(copied) && Number.isFinite(total) && total > 0) backupProgress.set({ volume }, Math.min(1, Math.max(0, copied / total)));
    },
    addCopied(volume, bytes) {
      backupBytesCopied.inc({ volume }, amount(bytes));
    },
    setJournal,
    addDrained(volume, bytes) {
      drainBytes.inc({ volume }, amount(bytes));
    },
    observeJournalCommit(volume, seconds, records) {
      const c = commitSeriesOf(volume);
      if (Number.isFinite(seconds) && seconds >= 0) c.duration.observe(seconds);
      if (Number.isInteger(records) && records > 0) c.uncounted += records;
    },
    observeCutover(volume, seconds) {
      if (Number.isFinite(seconds) && seconds >= 0) cutoverPause.observe({ volume }, seconds);
    },
    backupSucceeded(volume, time = Date.now()) {
      const ms = typeof time === 'number' ? time : time.getTime();
      lastBackupSuccess.set({ volume }, ms / 1000);
    },
  };
}

interface RedirectWatch {
  count: () => Promise<number>;
  maxAgeMs: number;
  waitMs: number;
  onError?: (err: unknown) => void;
  /** When the last count ended (0: never). */
  at: number;
  value: number;
  pending?: Promise<void>;
}

/** A session on the main target as a control adapter lists it (one entry per connection). */
export interface ListedMainSession {
  sid: string;
  initiator: string;
  address?: string;
}

/**
 * Initiator sessions on the main target, leaving out detour's own: its engine and probe sessions
 * (by InitiatorName) and the backend sessions it opens in initiators' names during a backup (they
 * come from detour's own address). Connections of one session count once.
 */
export function countInitiatorSessions(listed: ListedMainSession[], detour: { initiators: readonly string[]; address: string }): number {
  const sids = new Set<string>();
  for (const s of listed) {
    if (detour.initiators.includes(s.initiator)) continue;
    if (s.address !== undefined && s.address === detour.address) continue;
    sids.add(s.sid);
  }
  return sids.size;
}

/** The parts of a run-time volume that the redirect metrics need. */
export interface RedirectingVolume {
  name: string;
  config: { topology: string };
  control: { kind: string; listSessions(): Promise<ListedMainSession[]> };
  /** The address detour's own connections to the main target come from. */
  localAddress: string;
  target: { redirect?(initiatorName: string): { address: string; permanent?: boolean } | undefined };
}

/**
 * `redirected` sessions and redirect counts of a proxy-directed volume. Its initiators are set up
 * with detour's portal, so every initiator session on the main target got there through a
 * redirect answered by detour: the gauge is the number of such sessions in the control adapter's
 * list of main's sessions. Volumes of other topologies, and control `none` (which cannot list),
 * report 0 redirected; main-directed initiators reach the main target without detour.
 */
export function instrumentRedirects(m: DetourMetrics, v: RedirectingVolume, detourInitiators: readonly string[], log?: Logger): void {
  if (v.config.topology !== 'proxy-directed') return;
  const decide = v.target.redirect?.bind(v.target);
  if (decide) {
    // Counted where the answer is decided, so the front end needs no knowledge of metrics.
    v.target.redirect = (initiatorName) => {
      const moved = decide(initiatorName);
      if (moved) m.loginRedirected(v.name);
      return moved;
    };
  }
  if (v.control.kind === 'none') return;
  let failing = false;
  m.watchRedirected(
    v.name,
    async () => {
      const n = countInitiatorSessions(await v.control.listSessions(), { initiators: detourInitiators, address: v.localAddress });
      if (failing) log?.info({ volume: v.name }, "main target's session list readable again");
      failing = false;
      return n;
    },
    {
      onError: (err) => {
        // Once per run of failures: a scrape every few seconds must not flood the log.
        if (!failing) log?.warn({ volume: v.name, err: (err as Error).message }, "cannot list the main target's sessions; detour_sessions{mode=\"redirected\"} keeps its last value");
        failing = true;
      },
    },
  );
}

/** Opcodes named by their first byte alone (no service action): the data path's READs and WRITEs. */
const NO_SERVICE_ACTION = (() => {
  const t = new Uint8Array(256);
  for (const op of [0x08, 0x0a, 0x28, 0x2a, 0xa8, 0xaa, 0x88, 0x8a, 0x2e, 0x8e, 0x89, 0x8b, 0x35, 0x91, 0x00]) t[op] = 1;
  return t;
})();

interface CommandSeries {
  volume: string;
  labels: { volume: string; op: string; status: string };
  /** Completed since the counter last collected. */
  uncounted: number;
  duration: HistogramSeries<'volume' | 'op'>;
}

interface LabelledMetric {
  get(): Promise<{ values: { labels: Partial<Record<string, string | number>> }[] }>;
  remove(labels: Partial<Record<string, string | number>>): void;
}

async function removeSeriesOf(metric: LabelledMetric, volume: string): Promise<void> {
  const { values } = await metric.get();
  const seen = new Set<string>();
  for (const v of values) {
    if (v.labels.volume !== volume) continue;
    // Histograms report one value per bucket with an extra `le` label; remove() wants the
    // metric's own label set.
    const { le: _le, ...labels } = v.labels;
    const key = JSON.stringify(labels);
    if (seen.has(key)) continue;
    seen.add(key);
    metric.remove(labels);
  }
}
