// Prometheus metrics of detour (CONTRACT.md, "Metrics"). Names and labels are binding: dashboards
// and alerts are written against them. The engine calls the typed helpers below rather than the
// prom-client objects, so label values stay consistent (SCSI op and status names come from the
// wire package, phases and session modes from the model).

import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
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

/** Cutover pauses are bounded by the volume's ioTimeoutBudget (5 s by default). */
export const CUTOVER_PAUSE_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30];

type VolumeLabel = 'volume';

export interface DetourMetrics {
  registry: Registry;
  sessions: Gauge<'volume' | 'mode'>;
  scsiCommands: Counter<'volume' | 'op' | 'status'>;
  scsiCommandDuration: Histogram<'volume' | 'op'>;
  backupPhase: Gauge<'volume' | 'phase'>;
  backupBytesCopied: Counter<VolumeLabel>;
  backupBytesTotal: Gauge<VolumeLabel>;
  journalRecords: Gauge<VolumeLabel>;
  journalBytes: Gauge<VolumeLabel>;
  journalUnreflected: Gauge<VolumeLabel>;
  drainBytes: Counter<VolumeLabel>;
  cutoverPause: Histogram<VolumeLabel>;
  lastBackupSuccess: Gauge<VolumeLabel>;

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
  /** Current session counts of a volume; modes left out are 0. */
  setSessions(volume: string, counts: Partial<Record<SessionMode, number>>): void;
  /** The phase of the backup in progress, or undefined when the volume has none. */
  setPhase(volume: string, phase: BackupPhase | undefined): void;
  setBytesTotal(volume: string, bytes: number): void;
  addCopied(volume: string, bytes: number): void;
  setJournal(volume: string, journal: { records: number; bytes: number; unreflected: number }): void;
  addDrained(volume: string, bytes: number): void;
  observeCutover(volume: string, seconds: number): void;
  /** A backup of the volume completed; `time` is when (Date or epoch milliseconds). */
  backupSucceeded(volume: string, time?: Date | number): void;
}

export function createMetrics(opts: { defaultMetrics?: boolean } = {}): DetourMetrics {
  const registry = new Registry();
  if (opts.defaultMetrics !== false) collectDefaultMetrics({ register: registry });
  const registers = [registry];

  const sessions = new Gauge({
    name: 'detour_sessions',
    help: 'iSCSI sessions of the volume, by how detour handles them (redirected, inline, capture)',
    labelNames: ['volume', 'mode'] as const,
    registers,
  });
  const scsiCommands = new Counter({
    name: 'detour_scsi_commands_total',
    help: 'SCSI commands completed through detour, by operation and SCSI status',
    labelNames: ['volume', 'op', 'status'] as const,
    registers,
  });
  const scsiCommandDuration = new Histogram({
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
  const journalUnreflected = new Gauge({
    name: 'detour_journal_unreflected_records',
    help: 'Journal records not yet written to the main target',
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

  // Byte counters only ever grow; a negative or non-finite amount is a caller bug that must not
  // make prom-client throw inside the data path.
  const amount = (n: number) => (Number.isFinite(n) && n > 0 ? n : 0);
  const level = (n: number) => (Number.isFinite(n) ? n : 0);

  const setPhase = (volume: string, phase: BackupPhase | undefined) => {
    for (const p of BACKUP_PHASES) backupPhase.set({ volume, phase: p }, p === phase ? 1 : 0);
  };
  const setSessions = (volume: string, counts: Partial<Record<SessionMode, number>>) => {
    for (const mode of SESSION_MODES) sessions.set({ volume, mode }, level(counts[mode] ?? 0));
  };
  const setJournal = (volume: string, j: { records: number; bytes: number; unreflected: number }) => {
    journalRecords.set({ volume }, level(j.records));
    journalBytes.set({ volume }, level(j.bytes));
    journalUnreflected.set({ volume }, level(j.unreflected));
  };

  return {
    registry,
    sessions,
    scsiCommands,
    scsiCommandDuration,
    backupPhase,
    backupBytesCopied,
    backupBytesTotal,
    journalRecords,
    journalBytes,
    journalUnreflected,
    drainBytes,
    cutoverPause,
    lastBackupSuccess,

    addVolume(volume) {
      setSessions(volume, {});
      setPhase(volume, undefined);
      backupBytesCopied.inc({ volume }, 0);
      backupBytesTotal.set({ volume }, 0);
      setJournal(volume, { records: 0, bytes: 0, unreflected: 0 });
      drainBytes.inc({ volume }, 0);
    },
    async removeVolume(volume) {
      const all: LabelledMetric[] = [
        sessions,
        scsiCommands,
        scsiCommandDuration,
        backupPhase,
        backupBytesCopied,
        backupBytesTotal,
        journalRecords,
        journalBytes,
        journalUnreflected,
        drainBytes,
        cutoverPause,
        lastBackupSuccess,
      ];
      // prom-client's remove() takes a full label set, so go through the series that exist.
      for (const metric of all) await removeSeriesOf(metric, volume);
    },
    observeCommand(volume, op, status, seconds) {
      const opName = typeof op === 'string' ? op : scsiOpName(op);
      const statusName = typeof status === 'string' ? status : scsiStatusName(status);
      scsiCommands.inc({ volume, op: opName, status: statusName });
      if (Number.isFinite(seconds) && seconds >= 0) scsiCommandDuration.observe({ volume, op: opName }, seconds);
    },
    setSessions,
    setPhase,
    setBytesTotal(volume, bytes) {
      backupBytesTotal.set({ volume }, level(bytes));
    },
    addCopied(volume, bytes) {
      backupBytesCopied.inc({ volume }, amount(bytes));
    },
    setJournal,
    addDrained(volume, bytes) {
      drainBytes.inc({ volume }, amount(bytes));
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
