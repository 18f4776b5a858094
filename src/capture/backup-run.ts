import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from 'pino';
import { buildInquiry, buildReadCapacity16, buildSyncCache10, buildWrite16, buildWriteSame16, buildRead16, ScsiStatus } from 'iscsi-node-wire';
import { InitiatorSession } from '../back/index.ts';
import type { BackupObject, BackupPhase, BackupState } from '../control/model.ts';
import type { BackupStore, BackupWriter } from '../store/backup-store.ts';
import { allocChunkBuffers } from '../store/chunk-memory.ts';
import { writeFileAtomic } from '../store/durable.ts';
import { CaptureDevice } from './capture-device.ts';
import { Journal, type JournalSpareSource, type RecordKind } from './journal.ts';
import { WriteThrottle } from './write-throttle.ts';
import { describeReservation, MainRouter, ReservationBlockedError, type MainAccess, type MainCommandOptions } from './reservations.ts';
import { SnapshotMap, type MapExtent } from './snapshot-map.ts';
import type { Volume } from './volume.ts';
import type { MainSession } from '../switch/main-control.ts';

/** detour's own InitiatorName for the sessions it opens itself (copy, base reads, drain). */
export const DETOUR_INITIATOR = 'iqn.2026-11.io.detour:engine';

// ---- the record that lets a restarted detour take a backup up again ---------------------------

/**
 * What a restarted detour needs to take up a backup it was running when it stopped. One file per
 * volume in the data directory, replaced atomically at every step that matters for a restart:
 * created before the switch-in, rewritten at the freeze, when the drain begins, and just before
 * the sessions are handed back; removed once the backup's store record is final.
 *
 * The journal (same data directory) holds the writes; the backup store's progress log holds the
 * copied chunks. This file only ties them together and says how far the backup had got.
 */
export interface InterruptedBackup {
  version: 1;
  backupId: string;
  volume: string;
  label: string | null;
  /** The main target's IQN and LUN, and its geometry, to check a restart finds the same device. */
  target: string;
  lun: number;
  blockSize: number;
  blocks: number;
  /** ISO 8601. */
  startedAt: string;
  /** null while switching in: the volume was never frozen, so a restart freezes it. */
  freezeSeq: number | null;
  /**
   * 'draining' (or later) means main has been written to since the freeze: chunks still missing
   * from the image can no longer be copied from it.
   */
  phase: BackupPhase;
  /**
   * Set just before the sessions go back to the main target. From then on the initiators write to
   * main directly, so a restart must neither take their sessions over nor replay this journal onto
   * main (it would overwrite newer data); it only finishes the store record.
   */
  handedBack: { state: 'completed' | 'failed' | 'cancelled'; error: string | null } | null;
}

export function interruptedBackupFile(dataDir: string, volume: string): string {
  return path.join(dataDir, 'volumes', volume, 'backup-in-progress.json');
}

/**
 * Space set aside on the journal's disk for the backup's own record. The journal fills its disk
 * before anything else does, and then the record that the drain has begun must still be written:
 * without it a crash would resume the copy from a main volume the drain has already written.
 * Released, and the record written into the room it leaves, once the journal has failed.
 */
export function stateReserveFile(dataDir: string, volume: string): string {
  return path.join(dataDir, 'volumes', volume, 'state-reserve');
}

/** A few state records, their temporary files and a directory block: they need a few KiB. */
const STATE_RESERVE_BYTES = 256 * 1024;

export function journalDirFor(dataDir: string, volume: string, backupId: string): string {
  return path.join(dataDir, 'volumes', volume, 'journal', backupId);
}

const PHASES: readonly BackupPhase[] = ['switching', 'copying', 'draining', 'cutover', 'done'];

/** The interrupted backup of `volume`, if detour stopped during one. Throws on a damaged file. */
export async function readInterruptedBackup(dataDir: string, volume: string): Promise<InterruptedBackup | undefined> {
  const file = interruptedBackupFile(dataDir, volume);
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  let s: Partial<InterruptedBackup>;
  try {
    s = JSON.parse(text) as Partial<InterruptedBackup>;
  } catch {
    throw new Error(`${file}: not valid JSON`);
  }
  const int = (v: unknown, min: number) => Number.isSafeInteger(v) && (v as number) >= min;
  const hb = s.handedBack;
  const ok =
    s.version === 1 &&
    typeof s.backupId === 'string' &&
    s.volume === volume &&
    (s.label === null || typeof s.label === 'string') &&
    typeof s.target === 'string' &&
    int(s.lun, 0) &&
    int(s.blockSize, 1) &&
    int(s.blocks, 1) &&
    typeof s.startedAt === 'string' &&
    !Number.isNaN(Date.parse(s.startedAt)) &&
    (s.freezeSeq === null || int(s.freezeSeq, 0)) &&
    PHASES.includes(s.phase as BackupPhase) &&
    (hb === null || (typeof hb === 'object' && ['completed', 'failed', 'cancelled'].includes(hb.state) && (hb.error === null || typeof hb.error === 'string')));
  if (!ok) throw new Error(`${file}: unexpected contents`);
  return s as InterruptedBackup;
}

// ---------------------------------------------------------------------------------------------

export interface BackupRunOptions {
  id?: string;
  label?: string;
  dataDir: string;
  store: BackupStore;
  logger: Logger;
  /** How long every initiator of the volume may take to arrive on detour. */
  switchTimeoutMs?: number;
  /** Reads in flight while copying. */
  copyQueueDepth?: number;
  /** Optional copy rate limit, bytes per second. */
  copyRateLimit?: number;
  /** Optional drain rate limit, bytes per second written to main. */
  drainRateLimit?: number;
  /** Byte limit of the journal's files (the volume's journalCapacity). Default unlimited. */
  journalCapacity?: number;
  /** Files written in advance for the journal's segments (the volume's journalSpare). */
  journalSpares?: JournalSpareSource;
  /** Take up this interrupted backup instead of starting a new one. */
  resume?: InterruptedBackup;
  hooks?: {
    phase?(run: BackupRun, phase: BackupPhase): void;
    copied?(run: BackupRun, bytes: number): void;
    drained?(run: BackupRun, bytes: number): void;
    cutover?(run: BackupRun, pauseSeconds: number): void;
    /** A commit group of the journal is durable: how long its write took, how many records. */
    journalCommit?(run: BackupRun, seconds: number, records: number): void;
    finished?(run: BackupRun): void;
  };
}

/** How the drain wrote journal records to main, for logs and tests. */
export interface DrainStats {
  /** WRITE(16) commands (write records, and fallbacks). */
  writes: number;
  /** WRITE SAME(16) commands for write-same records. */
  writeSames: number;
  /** WRITE SAME(16) commands for unmap records (with the UNMAP bit when main reads unmapped blocks as zeros). */
  unmaps: number;
}

/**
 * Largest single command detour sends to main: the copier's and the base reads' READs, the drain's
 * WRITEs. Small on purpose: tgtd takes a fresh buffer for every command, and above 64 KiB it often
 * maps and unmaps it each time. Reading a 1 GiB LUN from tgtd in 256 KiB READs cost 4096
 * mmap/munmap pairs, 266K page faults and 1.5 of its 2 CPUs for 260-330 MB/s; in 64 KiB READs there
 * were none, and 630-1000 MB/s (128 KiB READs went either way, 155-1310 MB/s, depending on what
 * tgtd had done before). Writes alike: 1 MiB WRITEs 225-235 MB/s, 64 KiB WRITEs 630 MB/s, at queue
 * depth 16. iscsi-perf shows it too: 1 MiB reads 350-440 MB/s, 64 KiB reads 1000-1260 MB/s.
 */
const MAIN_COMMAND_BYTES = 64 * 1024;
/** Chunks the copier reads at once (copyQueueDepth), each in READs of MAIN_COMMAND_BYTES. */
const DEFAULT_COPY_QUEUE_DEPTH = 8;
/**
 * READs the copier keeps in flight to main, shared among the chunks it reads at once. A deep queue
 * lets tgtd take more commands per wakeup: copying a 1 GiB LUN it used 1.4-1.8 CPU-seconds per GB
 * at 128 in flight, 1.9-2.3 at 64 and 2.6 at 32, and the copy went 375, 350 and 290 MB/s (medians;
 * 256 was no better). An initiator's read of the frozen volume queues behind at most these 8 MiB.
 */
const COPY_READS_IN_FLIGHT = 128;
/** One command of a drain round: blocks [lba, lba+blocks) of the volume, gathered from map extents. */
interface DrainJob {
  lba: number;
  blocks: number;
  pieces: Array<{ e: MapExtent; off: number; n: number }>;
  /** A write-same or unmap extent, sent as WRITE SAME while main takes it. */
  same: boolean;
}

/**
 * Drain commands in flight to main. Queue depth is what a drain of scattered small extents needs:
 * each command costs main a round trip and a backing-store write, and several such writes proceed
 * in parallel on a real target (tgt's backing store runs a pool of I/O threads).
 */
const DRAIN_WORKERS = 16;

/** A cutover estimate this short is taken at once: the pause it means is not worth another round. */
const CUTOVER_SHORT_SECONDS = 0.1;
/** Rounds the drain may add, once the estimate fits the budget, to shorten the cutover pause. */
const CUTOVER_EXTRA_ROUNDS = 3;
/** Drain rounds that may miss the cutover estimate before initiator writes are held back. */
const THROTTLE_AFTER_ROUNDS = 3;
/** The write limit goes down to this fraction of the drain rate, and no further. */
const THROTTLE_MIN_DIVISOR = 16;
/** Nor below this, so that a briefly slow main does not starve the initiators. */
const THROTTLE_FLOOR_BYTES_PER_SECOND = 256 * 1024;

/** Largest WRITE SAME the drain sends when the main target states no limit. */
const DEFAULT_MAX_WRITE_SAME_BLOCKS = 65536;
/** How long a suspending backup lets commands already executing finish. */
const PARK_IDLE_MS = 10_000;

class CancelledError extends Error {}
/** The process is stopping: the backup is parked, to be taken up by the next start. */
class SuspendedError extends Error {}
/**
 * A drain round failed on main's side (an error status, a command that could not be re-issued,
 * a journal read): handing the sessions back now would leave main without writes the initiators
 * were told are done, so the volume stays captured and the round is retried.
 */
class DrainBlockedError extends Error {}

/** A drain that cannot go on for now: a reservation on main, or any failure of a round. */
function drainBlocked(err: unknown): err is ReservationBlockedError | DrainBlockedError {
  return err instanceof ReservationBlockedError || err instanceof DrainBlockedError;
}

const UNIT_ATTENTION = 0x06;
const ILLEGAL_REQUEST = 0x05;

interface CommandResult {
  status: number;
  sense?: Buffer;
  data?: Buffer;
}

function senseKey(r: CommandResult): number {
  const s = r.sense;
  if (!s || s.length <= 2) return -1;
  return (s[0]! & 0x7f) >= 0x72 ? s[1]! & 0x0f : s[2]! & 0x0f;
}

/**
 * A command on detour's own session, retried past unit attentions: the main target reports each
 * reset or new nexus once, and those reports are not detour's to act on.
 */
async function commandPastUnitAttention(s: InitiatorSession, lun: number, cdb: Buffer, opts: { dataOut?: Buffer; dataInLength?: number }) {
  for (let attempt = 0; ; attempt++) {
    const r = await s.command(lun, cdb, opts);
    if (r.status === ScsiStatus.CHECK_CONDITION && senseKey(r) === UNIT_ATTENTION && attempt < 5) continue;
    return r;
  }
}

function failure(r: CommandResult, what: string): Error {
  const key = senseKey(r);
  return new Error(`${what} on the main volume failed (status 0x${r.status.toString(16)}${key >= 0 ? `, sense key 0x${key.toString(16)}` : ''})`);
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * A rate limit kept by schedule: a command that follows `before` bytes sent since `t0` (ms) may
 * start at `t0 + before / rate`. The caller takes its slot and counts its own bytes in one
 * synchronous step, before it waits, so concurrent workers get consecutive slots and do not all
 * wake together. Undefined, synchronously, when the slot has come. The wait is sliced, so that a
 * cancel or a shutdown (`stop()`) does not sit out a long one.
 */
function waitForSlot(rate: number | undefined, before: number, t0: number, stop: () => boolean): Promise<void> | undefined {
  if (!rate) return undefined;
  const due = t0 + (before / rate) * 1000;
  if (Date.now() >= due || stop()) return undefined;
  return (async () => {
    for (let ahead = due - Date.now(); ahead > 0 && !stop(); ahead = due - Date.now()) await sleep(Math.min(ahead, 250));
  })();
}

/**
 * Runs `count` workers over shared work and waits for every one of them, even after one fails, so
 * that nothing is still reading main or writing the store when the caller goes on (to park the
 * backup, or to give it up). Rethrows the first failure.
 */
async function runWorkers(count: number, worker: (stop: () => boolean) => Promise<void>): Promise<void> {
  let failed: { err: unknown } | undefined;
  const stop = () => failed !== undefined;
  await Promise.all(
    Array.from({ length: count }, () =>
      worker(stop).catch((err: unknown) => {
        failed ??= { err };
      }),
    ),
  );
  if (failed) throw failed.err;
}

/**
 * One backup of one volume, start to finish (DESIGN steps 1-6): switch the initiators over and
 * freeze, copy the frozen volume to the store, drain the journal back in rounds, cut over and
 * hand the sessions back.
 *
 * A backup survives a restart of detour. suspend() parks it (commands in flight finish, the
 * journal and the store are closed durably, nothing is handed back); the next start with the same
 * configuration finds the record in the data directory and runs the backup again with `resume`:
 * it takes the sessions over again as a new backup would, but does not freeze (every write since
 * the freeze went to the journal, so main is still the frozen volume until the drain begins), and
 * continues the copy, the drain and the cutover from where they were.
 */
export class BackupRun {
  state: BackupState = 'running';
  phase: BackupPhase = 'switching';
  freezeSeq: number | null = null;
  bytesTotal = 0;
  bytesCopied = 0;
  error: string | null = null;
  sha256: string | null = null;
  startedAt = new Date();
  finishedAt: Date | null = null;
  id: string;
  label: string | null;
  journal: Journal | undefined;
  map: SnapshotMap | undefined;
  /** True once the backup has been parked for a restart (state stays 'running'). */
  suspended = false;
  readonly drainStats: DrainStats = { writes: 0, writeSames: 0, unmaps: 0 };
  private engineSession: InitiatorSession | undefined;
  /** Where detour's own commands for the main LUN go: see reservations.ts. */
  private mainRouter: MainRouter | undefined;
  /** Set while a reservation on main keeps the drain from writing: the error shown meanwhile. */
  private blockedNote: { base: string | null; message: string; reservation: boolean } | undefined;
  private writer: BackupWriter | undefined;
  /** Why a resumed backup has no writer: its store record could not be taken up. */
  private storeProblem: string | undefined;
  private cancelled = false;
  private suspendRequested = false;
  private shutdownWanted = false;
  /** A reason to give the backup up that arose outside the run loop (the journal filling up). */
  private abortReason: Error | undefined;
  /** The space in stateReserveFile() is this backup's (see setAsideStateReserve). */
  private stateReserveHeld = false;
  /** Cutover or give-up is under way: it runs to its end, a suspend waits for it. */
  private handingBack = false;
  private handedBack: InterruptedBackup['handedBack'] = null;
  private stateSaved = false;
  /** Average write rate to main during drains, bytes per second. */
  private drainRate = 0;
  /** Holds initiator writes back while the drain does not converge (see drainUntilCutover). */
  readonly throttle: WriteThrottle;
  /** Settles when the run has ended (completed, failed, cancelled, or parked), or failed to start. */
  readonly done: Promise<void>;
  private settleDone!: () => void;
  private lun = 0;
  private blockSize = 512;
  private blocks = 0;
  /** What main takes for the drain of write-same and unmap records. */
  private mainWriteSame = true;
  private mainUnmapZeroes = false;
  private maxWriteSameBlocks = DEFAULT_MAX_WRITE_SAME_BLOCKS;
  /** MAXIMUM TRANSFER LENGTH of main's Block Limits page, 0 when it states none. */
  private mainMaxTransferBlocks = 0;
  private readonly log: Logger;
  private readonly resumed: InterruptedBackup | undefined;

  constructor(
    readonly volume: Volume,
    private readonly opts: BackupRunOptions,
  ) {
    this.resumed = opts.resume;
    // A held write waits at most half of what the initiators tolerate as a pause.
    this.throttle = new WriteThrottle(Math.max(volume.config.ioTimeoutBudget / 2, 50));
    this.id = opts.resume?.backupId ?? opts.id ?? '';
    this.label = opts.resume ? opts.resume.label : (opts.label ?? null);
    if (opts.resume) {
      this.startedAt = new Date(opts.resume.startedAt);
      this.freezeSeq = opts.resume.freezeSeq;
      // The phase only moves forward, also across restarts: once the drain has begun, a record
      // saying 'copying' would let a later restart copy missing chunks from a main volume that is
      // no longer the frozen one. A cutover that did not get to the hand-back resumes as a drain.
      const p = opts.resume.phase;
      this.phase = p === 'cutover' || p === 'done' ? 'draining' : p;
    }
    this.log = opts.logger.child({ volume: volume.name });
    this.done = new Promise((resolve) => (this.settleDone = resolve));
  }

  /** True when this run takes up a backup interrupted by a restart. */
  get isResumed(): boolean {
    return this.resumed !== undefined;
  }

  toObject(): BackupObject {
    const j = this.journal;
    return {
      id: this.id,
      volume: this.volume.name,
      label: this.label,
      state: this.state,
      phase: this.phase,
      freezeSeq: this.freezeSeq,
      bytesTotal: this.bytesTotal,
      bytesCopied: this.bytesCopied,
      // As in the metrics: the records of this backup, and those not yet on the main target
      // (Journal.unreflected counts records not yet in the snapshot map, which is another thing).
      journal: { records: j?.lastSeq ?? 0, bytes: j?.bytes ?? 0, unreflected: j ? j.lastSeq - j.drainedSeq : 0 },
      startedAt: this.startedAt.toISOString(),
      finishedAt: this.finishedAt ? this.finishedAt.toISOString() : null,
      error: this.error,
      sha256: this.sha256,
    };
  }

  cancel(): void {
    this.cancelled = true;
  }

  /**
   * Parks the backup for a restart: new commands are held, commands executing finish, the journal
   * and the store writer are closed durably, and the record in the data directory says where the
   * backup was. The sessions are not handed back (their writes since the freeze are only in the
   * journal): the caller closes the portal and exits, and the initiators reconnect to the next
   * detour. A cutover or a give-up already under way is finished instead. Resolves when the run
   * is parked or ended.
   */
  async suspend(): Promise<void> {
    // Honoured later if the cutover or give-up under way finds the drain blocked (waitOutReservation).
    this.shutdownWanted = true;
    if (this.state === 'running' && !this.handingBack && this.phase !== 'cutover') this.suspendRequested = true;
    await this.done;
  }

  private setPhase(p: BackupPhase): void {
    this.phase = p;
    this.log.info({ backupId: this.id, phase: p }, 'backup phase');
    this.opts.hooks?.phase?.(this, p);
  }

  private stopRequested(): boolean {
    return this.cancelled || this.suspendRequested || this.abortReason !== undefined;
  }

  /** main is still the frozen volume: nothing has been drained to it yet. */
  private get beforeDrain(): boolean {
    return this.phase === 'switching' || this.phase === 'copying';
  }

  /** An operator's cancel wins over a shutdown: it ends the backup rather than parking it. */
  private checkStop(): void {
    if (this.cancelled) throw new CancelledError('cancelled');
    if (this.abortReason) throw this.abortReason;
    if (this.suspendRequested) throw new SuspendedError('suspended');
  }

  /**
   * Prepares the backup (the LUN and its identity, the store entry, the journal) so that it has
   * an id, then runs the rest in the background; `done` settles when it ends.
   */
  async start(): Promise<void> {
    try {
      if (this.resumed) await this.prepareResume();
      else await this.prepare();
    } catch (err) {
      this.engineSession?.close();
      await this.journal?.close().catch(() => {});
      if (this.resumed) {
        // The backup stays as it was on disk; the engine tries again.
        await this.writer?.close().catch(() => {});
      } else {
        await this.writer?.fail((err as Error).message).catch(() => {});
        if (this.journal) await fs.rm(this.journal.dir, { recursive: true, force: true }).catch(() => {});
        await this.removeState().catch(() => {});
      }
      this.journal = undefined;
      this.settleDone();
      throw err;
    }
    void this.run()
      .catch((err: Error) => this.log.error({ backupId: this.id, phase: this.phase, err: err.message }, 'backup run ended abnormally'))
      .finally(() => this.settleDone());
  }

  /**
   * detour's commands for the main LUN: on the engine session, or, while a reservation shuts it
   * out, on the nexus of an initiator that main allows (the holder's).
   */
  private get main(): MainRouter {
    this.mainRouter ??= new MainRouter({
      engine: () => {
        const s = this.engineSession;
        if (!s) return undefined;
        return {
          name: 'engine',
          borrowed: false,
          get closed() {
            return s.isClosed;
          },
          command: (lun, cdb, opts) => s.command(lun, cdb, opts),
        };
      },
      borrowable: () => this.volume.forwarder.backendPaths(),
      lun: () => this.lun,
      logger: this.log,
      logFields: () => ({ backupId: this.id, phase: this.phase }),
    });
    return this.mainRouter;
  }

  private async mainGood(access: MainAccess, cdb: Buffer, opts: MainCommandOptions, what: string) {
    const r = await this.main.command(access, cdb, opts);
    if (r.status !== ScsiStatus.GOOD) throw failure(r, what);
    return r;
  }

  private async connectMain(): Promise<InitiatorSession> {
    const v = this.volume;
    this.engineSession = await InitiatorSession.connect({
      portal: v.mainPortal,
      targetName: v.config.target,
      initiatorName: DETOUR_INITIATOR,
      localAddress: v.localAddress,
      logger: this.log,
      reconnect: { initialDelayMs: 200, maxDelayMs: 5000 },
      // Each of the copier's READs comes back in one Data-In PDU.
      maxRecvDataSegmentLength: MAIN_COMMAND_BYTES,
    });
    return this.engineSession;
  }

  /** What the main LUN offers the drain: WRITE SAME length limit, and whether unmapped blocks read as zeros. */
  private async probeProvisioning(s: InitiatorSession): Promise<void> {
    const rc = await commandPastUnitAttention(s, this.lun, buildReadCapacity16(32), { dataInLength: 32 });
    // LBPME and LBPRZ: only then does an unmapped block read back as the zeros the capture view showed.
    if (rc.status === ScsiStatus.GOOD && rc.data && rc.data.length >= 15) this.mainUnmapZeroes = (rc.data[14]! & 0xc0) === 0xc0;
    const bl = await commandPastUnitAttention(s, this.lun, buildInquiry(true, 0xb0, 64), { dataInLength: 64 });
    if (bl.status === ScsiStatus.GOOD && bl.data && bl.data.length >= 44 && bl.data[1] === 0xb0) {
      this.mainMaxTransferBlocks = bl.data.readUInt32BE(8);
      const max = Number(bl.data.readBigUInt64BE(36));
      if (max > 0) this.maxWriteSameBlocks = Math.min(max, DEFAULT_MAX_WRITE_SAME_BLOCKS);
    }
  }

  private async prepare(): Promise<void> {
    const v = this.volume;
    if (await readInterruptedBackup(this.opts.dataDir, v.name).catch(() => ({}))) {
      // Its journal may hold acknowledged writes that only a resume brings to main.
      throw new Error(`an interrupted backup of ${v.name} is recorded in ${interruptedBackupFile(this.opts.dataDir, v.name)}`);
    }
    const s = await this.connectMain();
    // The volume's LUN: the first direct-access LUN the main target reports.
    const luns = await s.reportLuns();
    let lun: number | undefined;
    for (const l of luns) {
      const inq = await s.inquiry(l);
      if ((inq[0]! & 0x1f) === 0x00 && (inq[0]! >> 5) === 0) {
        lun = l;
        break;
      }
    }
    if (lun === undefined) throw new Error(`main target ${v.config.target} has no disk LUN`);
    this.lun = lun;
    const cap = await s.readCapacity(lun);
    this.blockSize = cap.blockSize;
    this.blocks = cap.blocks;
    this.bytesTotal = cap.blocks * cap.blockSize;
    await this.probeProvisioning(s);
    const vpd83 = await s.command(lun, buildInquiry(true, 0x83, 1024), { dataInLength: 1024 });
    this.writer = await this.opts.store.createBackup({
      ...(this.opts.id ? { id: this.opts.id } : {}),
      volume: v.name,
      label: this.label,
      targetIqn: v.config.target,
      lun,
      sizeBytes: this.bytesTotal,
      blockSize: cap.blockSize,
      deviceIdentity: vpd83.status === ScsiStatus.GOOD && vpd83.data ? vpd83.data : null,
      instructedAt: this.startedAt,
    });
    this.id = this.writer.id;
    await this.openJournal();
    await this.saveState();
  }

  private async prepareResume(): Promise<void> {
    const st = this.resumed!;
    const v = this.volume;
    if (st.target !== v.config.target) throw new Error(`the interrupted backup ${st.backupId} is of ${st.target}; the volume is now configured with ${v.config.target}`);
    const s = await this.connectMain();
    this.lun = st.lun;
    const inq = await s.inquiry(st.lun);
    if ((inq[0]! & 0x1f) !== 0x00 || inq[0]! >> 5 !== 0) throw new Error(`LUN ${st.lun} of ${v.config.target} is no longer a disk`);
    const cap = await s.readCapacity(st.lun);
    if (cap.blockSize !== st.blockSize || cap.blocks !== st.blocks) {
      // Not the volume that was frozen: neither its image nor its journal belongs there.
      throw new Error(
        `LUN ${st.lun} of ${v.config.target} has ${cap.blocks} blocks of ${cap.blockSize} bytes, the interrupted backup ${st.backupId} had ${st.blocks} of ${st.blockSize}`,
      );
    }
    this.blockSize = cap.blockSize;
    this.blocks = cap.blocks;
    this.bytesTotal = cap.blocks * cap.blockSize;
    await this.probeProvisioning(s);
    try {
      this.writer = await this.opts.store.openBackup(st.backupId);
      this.bytesCopied = this.writer.progress().bytesDurable;
      if (this.writer.sourceWritten && this.beforeDrain) {
        // The record in dataDir did not get to say so (a failing disk): the store did.
        this.log.warn({ backupId: this.id, phase: this.phase }, 'the backup store says the drain had begun: the copy is not taken up again');
        this.phase = 'draining';
      }
    } catch (err) {
      // The image is lost, but the journal still holds acknowledged writes: they go to main all
      // the same, and the sessions are handed back; only the backup fails.
      this.storeProblem = `the backup could not be taken up after a restart: ${(err as Error).message}`;
      this.log.error({ backupId: this.id, phase: st.phase, err: (err as Error).message }, 'interrupted backup has no usable store record; draining its journal to the main volume');
    }
    await this.openJournal();
    const rec = this.journal!.recovery;
    this.stateSaved = true;
    this.log.info(
      {
        backupId: this.id,
        phase: st.phase,
        freezeSeq: st.freezeSeq,
        journal: { drainedSeq: rec.drainedSeq, records: rec.records, lastSeq: rec.lastSeq, tornTail: rec.tornTail ?? null },
        bytesCopied: this.bytesCopied,
      },
      'resuming interrupted backup',
    );
  }

  private async openJournal(): Promise<void> {
    const v = this.volume;
    try {
      await this.setAsideStateReserve();
    } catch (err) {
      // A new backup does not start without it. A resumed one still owes main its journal's
      // writes, so it goes on (typically its journal filled the disk before the restart).
      if (!this.resumed) throw err;
      this.log.warn({ backupId: this.id, phase: this.phase, err: (err as Error).message }, 'resuming without space set aside for the backup record');
    }
    this.map = new SnapshotMap({ blockSize: this.blockSize });
    const map = this.map;
    // Recovered records (those not yet drained) are reflected here in seq order, so the map is
    // rebuilt with the newest data of every block, exactly as it was before the restart.
    this.journal = await Journal.open({
      dir: journalDirFor(this.opts.dataDir, v.name, this.id),
      blockSize: this.blockSize,
      reflect: (rec) => map.insert(rec),
      ...(this.opts.hooks?.journalCommit ? { onCommit: this.opts.hooks.journalCommit.bind(undefined, this) } : {}),
      ...(this.opts.journalCapacity !== undefined ? { capacityBytes: this.opts.journalCapacity } : {}),
      ...(this.opts.journalSpares ? { spares: this.opts.journalSpares } : {}),
    });
    const j = this.journal;
    // Journal capacity policy. While the copy runs, nothing may be drained (the copy reads main as
    // the frozen image), so a journal that fills up would hold writes for as long as the copy
    // still takes: far past any initiator's command timeout, which then aborts and resets. So at
    // the high-water mark during the copy the backup is given up instead: the journal is drained
    // to main and the sessions are handed back, while the headroom above the mark still takes
    // the writes in flight. After the copy, a full journal is plain back-pressure: a write waits,
    // never acknowledged before it is durable, until a drain round frees space, which the drain
    // loop is doing all the time.
    const onHighWater = () => {
      const u = j.usage;
      this.log.warn({ backupId: this.id, phase: this.phase, usedBytes: u.usedBytes, capacityBytes: u.capacityBytes }, 'journal above its high-water mark');
      if (this.beforeDrain) {
        this.abortReason ??= new Error(
          `the journal reached ${Math.round(u.ratio * 100)}% of its capacity (${u.capacityBytes} bytes, journalCapacity) before the copy finished; the backup was given up and the journal drained to the main volume`,
        );
      }
    };
    j.on('high-water', onHighWater);
    // A journal that cannot write (a full or failing disk) takes no more writes. Its acknowledged
    // records are still readable, and still owed to main. Before the copy is done the backup
    // cannot finish: it is given up like at the high-water mark. After it, the image is whole:
    // the drain loop cuts over at once (drainUntilCutover). Either way the writes the journal
    // refused are not failed to the initiator: the volume holds them and sends them to main once
    // the journal is drained (Volume.run).
    j.on('failed', (err) => {
      const cause = err.cause instanceof Error ? err.cause.message : err.message;
      this.log.error({ backupId: this.id, phase: this.phase, err: cause }, 'journal failed: it takes no more writes');
      if (this.beforeDrain) {
        this.abortReason ??= new Error(`the journal could not write (${cause}) before the copy finished; the backup was given up and the journal drained to the main volume`);
      }
    });
    j.on('blocked', (u) => this.log.warn({ backupId: this.id, phase: this.phase, usedBytes: u.usedBytes, capacityBytes: u.capacityBytes }, 'journal full: writes wait for the drain'));
    if (j.usage.highWater) onHighWater();
  }

  private async run(): Promise<void> {
    const v = this.volume;
    try {
      this.checkStop();
      await this.switchIn();
      const drainBegun = this.phase === 'draining';
      if (this.writer) {
        if (drainBegun && this.writer.missingChunks().length > 0) {
          throw new Error('chunks of the image are missing, and the main volume has been written to since the drain began: the copy cannot be finished');
        }
        if (!drainBegun) {
          this.setPhase('copying');
          await this.saveState();
        }
        await this.copy();
        if (this.abortReason) {
          // The journal failed or passed its high-water mark while the last chunks were being
          // written: too late to matter, the image is whole. From here a full journal is
          // back-pressure and a failed one means a cutover at once, as after any copy.
          this.log.warn({ backupId: this.id, phase: this.phase, reason: this.abortReason.message }, 'the copy finished before the journal stopped it: the backup goes on');
          this.abortReason = undefined;
        }
      }
      // Before the first write to main: from here on a restart must not copy from it.
      this.setPhase('draining');
      await this.saveState();
      for (;;) {
        await this.drainUntilCutover();
        this.setPhase('cutover');
        try {
          await this.cutover();
          break;
        } catch (err) {
          // The gate is open again; the drain loop waits the block out.
          if (!drainBlocked(err)) throw err;
          this.handingBack = false;
          this.setPhase('draining');
        }
      }
      if (!this.writer) throw new Error(this.storeProblem ?? 'no store record');
      const rec = await this.writer.complete({ finishedAt: new Date(), startedAt: this.startedAt, freezeSeq: this.freezeSeq ?? 0 });
      // Settled on disk before anyone is told: a backup shown completed has no leftovers.
      try {
        await this.disposeJournal();
        await this.removeState();
      } catch (err) {
        this.log.warn({ backupId: this.id, phase: this.phase, err: (err as Error).message }, 'could not clean up after the backup');
      }
      this.sha256 = rec.sha256 ?? null;
      this.finishedAt = new Date();
      this.state = 'completed';
      this.setPhase('done');
      this.log.info({ backupId: this.id, phase: 'done', sha256: this.sha256, bytes: rec.sizeBytes, freezeSeq: this.freezeSeq ?? 0 }, 'backup completed');
    } catch (err) {
      if (err instanceof SuspendedError) {
        await this.park();
        return;
      }
      const cancelled = err instanceof CancelledError;
      this.log.error({ backupId: this.id, phase: this.phase, err: (err as Error).message }, cancelled ? 'backup cancelled' : 'backup failed');
      this.error = cancelled ? 'cancelled' : (err as Error).message;
      try {
        await this.abandon(cancelled ? 'cancelled' : 'failed', this.error);
      } catch (e) {
        // Shut down while a reservation kept the journal from main: nothing was handed back.
        if (e instanceof SuspendedError) {
          await this.park();
          return;
        }
        this.log.error({ backupId: this.id, phase: this.phase, err: (e as Error).message }, 'could not hand the sessions back cleanly');
      }
      try {
        if (cancelled) await this.writer?.cancel('cancelled');
        else await this.writer?.fail(this.error);
      } catch {
        /* the store keeps what it has */
      }
      // The sessions are back on main: the record has nothing left to resume.
      await this.removeState().catch(() => {});
      this.state = cancelled ? 'cancelled' : 'failed';
      this.finishedAt = new Date();
    } finally {
      this.engineSession?.close();
      if (!this.suspended) {
        v.accepting = v.capture !== undefined;
        this.opts.hooks?.finished?.(this);
      }
    }
  }

  // ---- the record in the data directory ---------------------------------------------------------

  private async saveState(): Promise<void> {
    const v = this.volume;
    if (this.journal?.failed) await this.releaseStateReserve();
    const s: InterruptedBackup = {
      version: 1,
      backupId: this.id,
      volume: v.name,
      label: this.label,
      target: v.config.target,
      lun: this.lun,
      blockSize: this.blockSize,
      blocks: this.blocks,
      startedAt: this.startedAt.toISOString(),
      freezeSeq: this.freezeSeq,
      phase: this.phase,
      handedBack: this.handedBack,
    };
    const file = interruptedBackupFile(this.opts.dataDir, v.name);
    await fs.mkdir(path.dirname(file), { recursive: true });
    await writeFileAtomic(file, `${JSON.stringify(s)}\n`);
    this.stateSaved = true;
  }

  private async removeState(): Promise<void> {
    await this.releaseStateReserve();
    if (!this.stateSaved) return;
    await fs.rm(interruptedBackupFile(this.opts.dataDir, this.volume.name), { force: true });
    this.stateSaved = false;
  }

  /**
   * Written, not merely allocated, and made durable: the blocks are the backup's until it ends,
   * whatever the file system does about sparse or delayed allocation. A restart keeps the one
   * already there.
   */
  private async setAsideStateReserve(): Promise<void> {
    const file = stateReserveFile(this.opts.dataDir, this.volume.name);
    try {
      const st = await fs.stat(file).catch(() => undefined);
      if (!st || st.size < STATE_RESERVE_BYTES || st.blocks * 512 < STATE_RESERVE_BYTES) {
        await fs.mkdir(path.dirname(file), { recursive: true });
        // Random, not zeros: a file system that compresses or detects zeros would store nothing.
        await writeFileAtomic(file, randomBytes(STATE_RESERVE_BYTES));
      }
      this.stateReserveHeld = true;
    } catch (err) {
      await fs.rm(file, { force: true }).catch(() => {});
      throw new Error(`could not set aside ${STATE_RESERVE_BYTES} bytes for the backup's record in ${path.dirname(file)}: ${(err as Error).message}`, { cause: err });
    }
  }

  private async releaseStateReserve(): Promise<void> {
    // Only this backup's own: a backup that could not start must not take another's.
    if (!this.stateReserveHeld) return;
    await fs.rm(stateReserveFile(this.opts.dataDir, this.volume.name), { force: true });
    this.stateReserveHeld = false;
  }

  /** Recorded before the sessions go back to main: a restart after this must not take them again. */
  private async markHandedBack(state: 'completed' | 'failed' | 'cancelled', error: string | null): Promise<void> {
    this.handedBack = { state, error };
    await this.saveState();
  }

  // ---- switch-in --------------------------------------------------------------------------

  private async switchIn(): Promise<void> {
    const v = this.volume;
    const journal = this.journal!;
    const device = new CaptureDevice(
      {
        volume: v.name,
        lun: this.lun,
        blockSize: this.blockSize,
        blocks: this.blocks,
        journal,
        map: this.map!,
        readBase: (lba, blocks) => this.readMain(lba, blocks),
        throttle: this.throttle,
      },
      v.forwarder,
    );
    // Nothing runs until every initiator is on detour: a write acknowledged by the journal while
    // another initiator still writes to main would break the freeze point.
    v.gate.close();
    v.accepting = true;
    v.capture = device;
    const topology = v.config.topology;
    const expected = new Set<string>();
    if (topology !== 'inline') {
      // Also when resuming: a main-directed redirect survives a restart, but setting it again
      // costs nothing and covers a main target that was restarted meanwhile.
      if (topology === 'main-directed') {
        await v.control.redirectOn({ host: v.localAddress, port: v.portal!.port });
        this.log.info({ backupId: this.id, phase: 'switching', to: `${v.localAddress}:${v.portal!.port}` }, 'main target redirects logins to detour');
      }
      const deadline = Date.now() + (this.opts.switchTimeoutMs ?? 20_000);
      // An adapter that cannot list sessions is told to drop every connection of the target.
      if ((await v.control.listSessions()).length === 0) await v.control.kick();
      const kicked = new Set<string>();
      for (;;) {
        // The freeze needs main to have no initiator session left: one that logged in there late
        // (a login already under way when the redirect was set, or one that followed an old
        // redirect to main) would write past the freeze, and the drain would then overwrite its
        // acknowledged writes. So main is listed again on every pass, not only once.
        const stray = (await v.control.listSessions()).filter((s) => !this.isDetourOwnSession(s));
        for (const s of stray) expected.add(s.initiator);
        const here = new Set(v.frontSessions().map((s) => s.initiatorName));
        const missing = [...expected].filter((i) => !here.has(i));
        if (stray.length === 0 && missing.length === 0) break;
        if (Date.now() > deadline) {
          const why = missing.length ? `${missing.join(', ')} did not log in to detour` : `${[...new Set(stray.map((s) => s.initiator))].join(', ')} still on the main target`;
          throw new Error(`switch-in timed out: ${why}`);
        }
        // Only the initiators' connections are dropped: detour's own session to main (freeze, copy,
        // base reads, drain) stays up.
        for (const s of stray) {
          const which = `${s.sid}/${s.cid}`;
          if (!kicked.has(which)) {
            kicked.add(which);
            this.log.info({ backupId: this.id, phase: 'switching', initiator: s.initiator, sid: s.sid, cid: s.cid }, 'dropping the initiator connection on the main target');
          }
          await v.control.kick(s);
        }
        this.checkStop();
        await sleep(100);
      }
    }
    if (this.freezeSeq === null) {
      // Commands that were already on their way to main finish before the freeze.
      await v.forwardIdle();
      await this.mainGood('write', buildSyncCache10(), {}, 'SYNCHRONIZE CACHE at the freeze');
      this.freezeSeq = journal.lastSeq;
      await this.saveState();
      this.log.info({ backupId: this.id, phase: 'switching', freezeSeq: this.freezeSeq, initiators: [...expected] }, 'volume frozen');
    } else {
      // Taken up after a restart: main has not been written since the freeze (or, once the drain
      // began, only with journal records the map still holds), so freezing again would be wrong.
      this.log.info({ backupId: this.id, phase: this.phase, freezeSeq: this.freezeSeq }, 'sessions taken over again; the volume is still frozen');
    }
    v.gate.open();
    // For the operator only (the routes follow main's answers, see reservations.ts), and after the
    // gate opens, so that it does not lengthen the pause.
    const prs = await this.main.state();
    if (prs?.reservation) this.log.warn({ backupId: this.id, phase: this.phase, reservation: describeReservation(prs) }, "the main volume is reserved: whatever main refuses on detour's own session goes through a nexus it allows");
  }

  /**
   * detour's own sessions on the main target: the engine's, and the backend sessions it opens in
   * the initiators' names, which come from detour's portal address.
   */
  private isDetourOwnSession(s: MainSession): boolean {
    return s.initiator === DETOUR_INITIATOR || (s.address !== undefined && s.address === this.volume.localAddress);
  }

  // ---- copy ---------------------------------------------------------------------------------

  private async readMain(lba: number, blocks: number): Promise<Buffer> {
    return this.readMainInto(lba, blocks, Buffer.allocUnsafe(blocks * this.blockSize));
  }

  /**
   * Reads `blocks` blocks at `lba` into `buf` (at least that long) and returns the view of `buf`
   * that holds them. Long reads go as several READs, at most `parallel` at once, each landing in
   * its own part of the buffer. `buf` may still be written to after a rejection: only reuse it
   * after a success.
   */
  private async readMainInto(lba: number, blocks: number, buf: Buffer, parallel = Infinity): Promise<Buffer> {
    const maxBlocks = this.mainCommandBlocks;
    const bs = this.blockSize;
    let o = 0;
    const parts = Math.ceil(blocks / maxBlocks);
    await runWorkers(Math.max(1, Math.min(parallel, parts)), async (stop) => {
      while (o < blocks && !stop()) {
        const at = o;
        const n = Math.min(maxBlocks, blocks - at);
        o += n;
        await this.readOnce(lba + at, n, buf.subarray(at * bs, (at + n) * bs));
      }
    });
    return buf.subarray(0, blocks * bs);
  }

  private async readOnce(lba: number, blocks: number, into: Buffer): Promise<void> {
    const length = blocks * this.blockSize;
    // Data-In lands in `into` directly on detour's own session; a route that keeps its own
    // buffers hands back another one, copied below.
    const opts = { dataInLength: length, dataInBuffer: into };
    const r = await this.mainGood('read', buildRead16(lba, blocks), opts, `READ of ${blocks} blocks at ${lba}`);
    if (!r.data || r.data.length !== length) throw new Error(`READ of ${blocks} blocks at ${lba} from the main volume returned ${r.data?.length ?? 0} bytes`);
    if (r.data.buffer !== into.buffer || r.data.byteOffset !== into.byteOffset) r.data.copy(into);
  }

  /**
   * Copies the chunks the store is missing from the frozen main volume. `depth` workers each own
   * one chunk-sized buffer, reused for every chunk they read. A worker hands its chunk to the
   * writer only once every earlier chunk has been handed over: the writer then feeds its
   * whole-image SHA-256 straight from these buffers, in order, and never reads a chunk back. The
   * writer returns as soon as the bytes are in the chunk file, so the buffer goes back to reading
   * while the chunk waits for its group commit; bytesCopied counts chunks once durable.
   */
  private async copy(): Promise<void> {
    const w = this.writer!;
    const todo = w.missingChunks();
    this.bytesCopied = this.bytesTotal - todo.reduce((n, i) => n + w.chunkLength(i), 0);
    const depth = Math.max(1, this.opts.copyQueueDepth ?? DEFAULT_COPY_QUEUE_DEPTH);
    const readsPerChunk = Math.max(1, Math.ceil(COPY_READS_IN_FLIGHT / depth));
    const rate = this.opts.copyRateLimit;
    const t0 = Date.now();
    // The rate limit counts what this process copied: after a resume the earlier part is done.
    let copiedHere = 0;
    let next = 0;
    // Settles when the chunk taken before is handed to the writer (or given up).
    let lastTurn: Promise<void> = Promise.resolve();
    const committing = new Set<Promise<void>>();
    let commitFailure: { err: unknown } | undefined;
    // Page-aligned shared memory: the store writes each chunk with O_DIRECT and hashes it on
    // another thread, both straight from here.
    const buffers = allocChunkBuffers(depth, w.chunkSize);
    // Said so, because a full disk reads the same for the store and the journal.
    const storeFailure = (err: unknown) =>
      new Error(`the backup store could not write (${err instanceof Error ? err.message : String(err)}) in ${w.dir}; the backup was given up and the journal drained to the main volume`, { cause: err });
    try {
      await runWorkers(depth, async (stop) => {
        const buf = buffers.pop()!;
        while (next < todo.length && !stop()) {
          if (commitFailure) throw commitFailure.err;
          this.checkStop();
          const i = todo[next++]!;
          const length = w.chunkLength(i);
          const myTurn = lastTurn;
          let passTurn!: () => void;
          lastTurn = new Promise<void>((resolve) => (passTurn = resolve));
          let put: Promise<{ durable: Promise<void> }>;
          try {
            const data = await this.readMainInto(w.chunkOffset(i) / this.blockSize, length / this.blockSize, buf, readsPerChunk);
            await myTurn;
            // The writer hashes within this call: the next worker may go as soon as it returns.
            put = w.putChunk(i, data);
          } finally {
            passTurn();
          }
          const { durable } = await put.catch((err: unknown) => {
            throw storeFailure(err);
          });
          const tracked = durable.then(
            () => {
              this.bytesCopied += length;
              this.opts.hooks?.copied?.(this, length);
            },
            (err: unknown) => {
              commitFailure ??= { err: storeFailure(err) };
            },
          );
          committing.add(tracked);
          void tracked.finally(() => committing.delete(tracked));
          // Paced after the chunk, not before it. Before it would keep the first chunks within the
          // rate too, but measured with bench-capture, reads forwarded to tgtd during the copy
          // then ran at 33-41% of direct instead of 55-61% (six runs each; the cause is not found,
          // and it is not detour's CPU). So each worker's first chunk goes at once.
          const slot = waitForSlot(rate, copiedHere, t0, () => stop() || this.stopRequested());
          copiedHere += length;
          if (slot) await slot;
        }
      });
    } finally {
      // Nothing may still be on its way to the store when the caller goes on (to park, to fail).
      while (committing.size) await Promise.all(committing);
    }
    if (commitFailure) throw commitFailure.err;
  }

  // ---- drain and cutover ------------------------------------------------------------------------

  /**
   * One drain round: write the map as of now to main, make it durable, forget it. A round cut off
   * by a shutdown leaves the drain point where it was; the restart writes the same records again
   * (their newest data per block, from the map rebuilt in seq order), which only repeats writes.
   */
  private async drainRound(interruptible: boolean): Promise<number> {
    try {
      return await this.drainRoundOnce(interruptible);
    } catch (err) {
      if (drainBlocked(err) || err instanceof CancelledError || err instanceof SuspendedError || err === this.abortReason) throw err;
      throw new DrainBlockedError(err instanceof Error ? err.message : String(err), { cause: err });
    }
  }

  private async drainRoundOnce(interruptible: boolean): Promise<number> {
    const map = this.map!;
    const journal = this.journal!;
    const snap = map.snapshot();
    if (snap.extents.length === 0) {
      if (snap.atSeq > journal.drainedSeq && !journal.failed) await journal.markDrained(snap.atSeq);
      return 0;
    }
    // A nexus lent by an initiator is used only while main insists: every round asks again.
    this.main.preferOwn();
    const t0 = process.hrtime.bigint();
    let bytes = 0;
    const jobs = this.drainJobs(snap.extents);
    let next = 0;
    // Bytes sent to main this round, for the rate limit (a WRITE SAME sends one block).
    let sent = 0;
    const tStart = Date.now();
    await runWorkers(DRAIN_WORKERS, async (stop) => {
      while (next < jobs.length && !stop()) {
        if (interruptible) this.checkStop();
        const job = jobs[next++];
        if (!job) break;
        const slot = waitForSlot(this.opts.drainRateLimit, sent, tStart, () => stop() || (interruptible && this.stopRequested()));
        sent += job.same ? this.blockSize : job.blocks * this.blockSize;
        if (slot) {
          await slot;
          if (interruptible) this.checkStop();
        }
        // Not `bytes += await ...`: that reads `bytes` before the await, and the workers running
        // meanwhile would lose their counts (the drain rate, and so the cutover estimate, with them).
        const written = await this.drainJob(journal, job);
        bytes += written;
      }
    });
    // The cache is the LU's: one SYNCHRONIZE CACHE covers writes sent on any nexus.
    await this.mainGood('write', buildSyncCache10(), {}, 'SYNCHRONIZE CACHE after a drain round');
    // Only now is the data durable on main: forget it, then let the journal free its space.
    map.release(snap);
    // A failed journal cannot record it; once its map is empty it is removed instead (removeDrainedJournal).
    if (!journal.failed) await journal.markDrained(snap.atSeq);
    const secs = Number(process.hrtime.bigint() - t0) / 1e9;
    const rate = bytes / Math.max(secs, 1e-3);
    this.drainRate = this.drainRate === 0 ? rate : 0.5 * this.drainRate + 0.5 * rate;
    this.opts.hooks?.drained?.(this, bytes);
    this.log.info(
      { backupId: this.id, phase: this.phase, bytes, seconds: secs, atSeq: snap.atSeq, leftBytes: this.map!.mappedBytes + journal.unreflectedBytes, rate: Math.round(this.drainRate), commands: { ...this.drainStats } },
      'drain round',
    );
    return bytes;
  }

  /** Largest READ or plain WRITE detour sends main: MAIN_COMMAND_BYTES, or less if main's Block Limits say so. */
  private get mainCommandBlocks(): number {
    const most = Math.max(1, Math.floor(MAIN_COMMAND_BYTES / this.blockSize));
    return this.mainMaxTransferBlocks > 0 ? Math.min(most, this.mainMaxTransferBlocks) : most;
  }

  /**
   * Cuts a round's extents (sorted by LBA, never overlapping) into commands for main. Extents that
   * are adjacent on the volume go out as one WRITE up to mainCommandBlocks, whichever records they
   * come from: a random small-write workload over a bounded region leaves the map full of touching
   * 4 KiB extents, and one WRITE per extent would cap the drain at main's command rate, below what
   * the initiators can write, so the backup would never cut over. A write-same or unmap extent goes
   * alone, as WRITE SAME, while main takes it (one block of data for a long range).
   */
  private drainJobs(extents: readonly MapExtent[]): DrainJob[] {
    const maxBlocks = this.mainCommandBlocks;
    const jobs: DrainJob[] = [];
    let open: DrainJob | undefined;
    for (const e of extents) {
      if (e.location.kind !== 'write' && this.mainWriteSame) {
        open = undefined;
        for (let o = 0; o < e.blocks; o += this.maxWriteSameBlocks) {
          const n = Math.min(this.maxWriteSameBlocks, e.blocks - o);
          jobs.push({ lba: e.lba + o, blocks: n, pieces: [{ e, off: o, n }], same: true });
        }
        continue;
      }
      for (let o = 0; o < e.blocks; ) {
        const lba = e.lba + o;
        if (!open || open.lba + open.blocks !== lba || open.blocks >= maxBlocks) {
          open = { lba, blocks: 0, pieces: [], same: false };
          jobs.push(open);
        }
        const n = Math.min(maxBlocks - open.blocks, e.blocks - o);
        open.pieces.push({ e, off: o, n });
        open.blocks += n;
        o += n;
      }
    }
    return jobs;
  }

  /** One drain command (or, for a WRITE SAME main refuses, its plain writes); returns the logical bytes. */
  private async drainJob(journal: Journal, job: DrainJob): Promise<number> {
    if (job.same) {
      const { e, off, n } = job.pieces[0]!;
      if (this.mainWriteSame && (await this.writeSameToMain(journal, e, e.location.kind, job.lba, n))) return n * this.blockSize;
      // Refused: the same range as plain writes.
      const maxBlocks = this.mainCommandBlocks;
      for (let o = 0; o < n; o += maxBlocks) {
        const m = Math.min(maxBlocks, n - o);
        await this.drainWrite(journal, { lba: job.lba + o, blocks: m, pieces: [{ e, off: off + o, n: m }], same: false });
      }
      return n * this.blockSize;
    }
    await this.drainWrite(journal, job);
    return job.blocks * this.blockSize;
  }

  /** Gathers a job's pieces from the journal into one buffer and writes it to main. */
  private async drainWrite(journal: Journal, job: DrainJob): Promise<void> {
    const bs = this.blockSize;
    const data = Buffer.allocUnsafe(job.blocks * bs);
    await Promise.all(job.pieces.map((p) => journal.readDataInto(p.e.location, p.e.offsetInRecord + p.off, p.n, data, (p.e.lba + p.off - job.lba) * bs)));
    await this.mainGood('write', buildWrite16(job.lba, job.blocks), { dataOut: data }, `WRITE of ${job.blocks} blocks at ${job.lba}`);
    this.drainStats.writes++;
  }

  /**
   * A write-same or unmap record as WRITE SAME(16): one block of data for the whole range. An unmap
   * record carries the UNMAP bit only when main reads unmapped blocks as zeros (LBPME and LBPRZ),
   * since the capture view showed zeros there; otherwise it is a WRITE SAME of a zero block.
   * Returns false, for a plain write instead, when main refuses WRITE SAME (ILLEGAL REQUEST).
   */
  private async writeSameToMain(journal: Journal, e: MapExtent, kind: RecordKind, lba: number, n: number): Promise<boolean> {
    const block = kind === 'write-same' ? await journal.readData(e.location, 0, 1) : Buffer.alloc(this.blockSize);
    const unmap = kind === 'unmap' && this.mainUnmapZeroes;
    const r = await this.main.command('write', buildWriteSame16(lba, n, { unmap }), { dataOut: block });
    if (r.status === ScsiStatus.GOOD) {
      if (kind === 'unmap') this.drainStats.unmaps++;
      else this.drainStats.writeSames++;
      return true;
    }
    if (r.status === ScsiStatus.CHECK_CONDITION && senseKey(r) === ILLEGAL_REQUEST) {
      if (unmap) {
        this.mainUnmapZeroes = false;
        this.log.info({ backupId: this.id, phase: this.phase }, 'main target refuses WRITE SAME with UNMAP: unmapped ranges are drained as WRITE SAME of zeros');
        return this.writeSameToMain(journal, e, kind, lba, n);
      }
      this.mainWriteSame = false;
      this.log.info({ backupId: this.id, phase: this.phase }, 'main target refuses WRITE SAME: write-same and unmap records are drained as plain writes');
      return false;
    }
    throw failure(r, `WRITE SAME of ${n} blocks at ${lba}`);
  }

  /** Seconds the remaining drain would take at the measured rate to main. */
  estimateSeconds(): number {
    const remaining = this.map!.mappedBytes + this.journal!.unreflectedBytes;
    if (remaining === 0) return 0;
    return this.drainRate > 0 ? remaining / this.drainRate : Number.POSITIVE_INFINITY;
  }

  /**
   * Drain rounds until what is left fits inside the initiators' budget. Rounds converge only while
   * the initiators write into the journal more slowly than the drain writes out of it. After
   * THROTTLE_AFTER_ROUNDS rounds that have not got there, initiator writes are admitted at a
   * fraction of the measured drain rate, halved at every further such round down to
   * 1/THROTTLE_MIN_DIVISOR: the initiators see slower writes instead of a backup that never ends.
   * The limit goes as soon as the drain stops (cutover, cancel, failure, shutdown).
   */
  private async drainUntilCutover(): Promise<void> {
    const budgetSec = this.volume.config.ioTimeoutBudget / 1000;
    let slowRounds = 0;
    let divisor = 1;
    let lastEstimate = Number.POSITIVE_INFINITY;
    let extraRounds = 0;
    try {
      for (let blocked = 0; ; ) {
        this.checkStop();
        if (this.journal!.failed) {
          this.log.warn({ backupId: this.id, phase: this.phase }, 'journal failed after the copy: cutting over now');
          return;
        }
        const admittedBefore = this.throttle.admittedBytes;
        const t0 = performance.now();
        let drained: number;
        try {
          drained = await this.drainRound(true);
        } catch (err) {
          if (!drainBlocked(err)) throw err;
          await this.waitOutBlockedDrain(err, blocked++);
          continue;
        }
        blocked = 0;
        this.drainUnblocked();
        // Cut over once what is left fits well inside the initiators' budget. The cutover pause is
        // about that estimate, so while rounds still shrink what is left quickly, a few more
        // rounds (with the initiators running) buy a shorter pause.
        const estimate = this.estimateSeconds();
        if (estimate < budgetSec / 2) {
          const shrinking = estimate < lastEstimate / 2;
          if (estimate <= CUTOVER_SHORT_SECONDS || !shrinking || ++extraRounds > CUTOVER_EXTRA_ROUNDS) return;
          lastEstimate = estimate;
          continue;
        }
        lastEstimate = estimate;
        if (drained > 0 && ++slowRounds >= THROTTLE_AFTER_ROUNDS) {
          divisor = Math.min(divisor * 2, THROTTLE_MIN_DIVISOR);
          const limit = Math.max(this.drainRate / divisor, THROTTLE_FLOOR_BYTES_PER_SECOND);
          const incoming = ((this.throttle.admittedBytes - admittedBefore) / Math.max(performance.now() - t0, 1)) * 1000;
          this.throttle.setRate(limit);
          this.log.warn(
            { backupId: this.id, phase: this.phase, rounds: slowRounds, estimateSeconds: Number(estimate.toFixed(2)), drainRate: Math.round(this.drainRate), incomingRate: Math.round(incoming), writeLimit: Math.round(limit) },
            'drain not converging: initiator writes held to a fraction of the drain rate',
          );
        }
        if (this.map!.size === 0) await sleep(50);
      }
    } finally {
      if (this.throttle.bytesPerSecond !== null) {
        this.log.info({ backupId: this.id, phase: this.phase, heldWrites: this.throttle.heldWrites, heldMs: Math.round(this.throttle.heldMs) }, 'write limit lifted');
      }
      this.throttle.open();
    }
  }

  /**
   * A reservation on main lets no session detour has write the journal there. The journal is then
   * the only copy of writes the initiators were told are done, so nothing is handed back: the
   * volume stays captured (commands flow, main keeps judging every one of them on the initiator's
   * own nexus), the backup shows why in its error, and the drain is tried again. It goes on once
   * main allows a nexus detour has (the reservation released, cleared or preempted to a nexus
   * connected through detour), or the backup is parked by a shutdown and taken up by the next start.
   */
  private async waitOutBlockedDrain(err: ReservationBlockedError | DrainBlockedError, attempt: number): Promise<void> {
    const message = `the journal cannot be drained to the main volume: ${err.message}; the volume stays captured and the drain is retried`;
    const base = this.blockedNote ? this.blockedNote.base : this.error;
    this.blockedNote = { base, message, reservation: err instanceof ReservationBlockedError };
    this.error = base ? `${base}; ${message}` : message;
    // A shutdown must be able to park it: that needs the phase a restart can take up.
    if (this.phase !== 'draining') this.setPhase('draining');
    if (attempt === 0 || attempt % 30 === 0) {
      const j = this.journal;
      const journal = j ? { records: j.records, lastSeq: j.lastSeq, drainedSeq: j.drainedSeq } : null;
      if (err instanceof ReservationBlockedError) {
        this.log.error(
          { backupId: this.id, phase: this.phase, err: err.message, access: err.access, journal },
          'drain blocked by a reservation on the main volume: the volume stays captured, nothing is handed back',
        );
      } else {
        this.log.error({ backupId: this.id, phase: this.phase, err: err.message, attempt, journal }, 'drain to the main volume failed: the volume stays captured, nothing is handed back');
      }
    }
    if (this.shutdownWanted) this.suspendRequested = true;
    const until = Date.now() + Math.min(250 * 2 ** attempt, 2000);
    while (Date.now() < until && !this.suspendRequested) await sleep(50);
    if (this.suspendRequested) throw new SuspendedError('suspended');
  }

  private drainUnblocked(): void {
    const note = this.blockedNote;
    if (!note) return;
    this.blockedNote = undefined;
    this.error = note.base;
    if (note.reservation) {
      this.log.info({ backupId: this.id, phase: this.phase, route: { write: this.main.routeName('write'), read: this.main.routeName('read') } }, 'drain no longer blocked by a reservation');
    } else {
      this.log.info({ backupId: this.id, phase: this.phase }, 'drain to the main volume works again');
    }
  }

  /**
   * Waits until no command of the capture device is executing. A write waiting for journal space
   * gets it only from a drain round, so while any wait, drain rounds run meanwhile.
   */
  private async idleWhileDraining(device: CaptureDevice): Promise<void> {
    while (device.commandsInFlight > 0) {
      if (this.journal!.usage.waitingAppends > 0 && (await this.drainRound(false)) > 0) continue;
      await Promise.race([device.idle(), sleep(20)]);
    }
  }

  private async cutover(): Promise<void> {
    const v = this.volume;
    const device = v.capture!;
    this.handingBack = true;
    v.gate.close();
    const t0 = Date.now();
    try {
      await this.idleWhileDraining(device);
      // Everything acknowledged is reflected (append resolves after reflection); drain the rest.
      while (this.undrained()) await this.drainRound(false);
      await this.removeDrainedJournal();
      await this.markHandedBack('completed', null);
      v.capture = undefined;
      v.accepting = false;
      if (v.config.topology === 'main-directed') await v.control.redirectOff();
    } finally {
      const paused = v.gate.open();
      this.opts.hooks?.cutover?.(this, paused / 1000);
      this.log.info({ backupId: this.id, phase: 'cutover', pauseMs: paused, sinceClose: Date.now() - t0 }, 'cutover');
    }
    if (v.config.topology !== 'inline') v.requestLogoutAll(2);
  }

  /**
   * A backup that fails or is cancelled still owes the initiators every acknowledged write: drain
   * the journal to main before handing the sessions back.
   */
  private async abandon(state: 'failed' | 'cancelled', error: string): Promise<void> {
    const v = this.volume;
    // Nothing to hand back: already handed back, or a new backup that ended before its switch-in.
    // A resumed one holds its volume from the start (the engine closed the gate before listening).
    if (this.handedBack || (!v.capture && !this.resumed)) {
      await this.disposeJournal();
      return;
    }
    // The drain below writes main: from here on a restart must not copy from it.
    const j = this.journal;
    if (this.undrained() && this.beforeDrain) {
      this.setPhase('draining');
      // Said in the store too: the record below may be on the disk that failed the journal.
      const w = this.writer;
      if (w && w.missingChunks().length > 0) {
        await w.markSourceWritten().catch((err: Error) => this.log.error({ backupId: this.id, phase: this.phase, err: err.message }, 'could not record in the backup store that the drain began'));
      }
      try {
        await this.saveState();
      } catch (err) {
        // The disk that failed the journal may refuse this too. Stranding the initiators on a
        // journal that takes no writes would be worse than the risk it leaves: a crash before the
        // hand-back is recorded would resume the copy from a main volume the drain has written.
        if (!j?.failed) throw err;
        this.log.error({ backupId: this.id, phase: this.phase, err: (err as Error).message }, 'could not record the drain phase; draining anyway');
      }
    }
    this.handingBack = true;
    v.gate.close();
    let keepCaptured = false;
    try {
      for (let blocked = 0; ; ) {
        try {
          // Also with nothing to drain yet: a write already executing is appended after this look.
          if (v.capture) await this.idleWhileDraining(v.capture);
          while (this.undrained()) await this.drainRound(false);
          await this.removeDrainedJournal();
          break;
        } catch (err) {
          if (!drainBlocked(err)) throw err;
          // Handing back now would lose acknowledged writes: stay captured and try again.
          this.handingBack = false;
          v.gate.open();
          try {
            await this.waitOutBlockedDrain(err, blocked++);
          } catch (stop) {
            keepCaptured = true;
            throw stop;
          }
          this.handingBack = true;
          v.gate.close();
        }
      }
      this.drainUnblocked();
    } finally {
      if (!keepCaptured) {
        // The sessions go back even if the drain failed (but not for a reservation, above).
        // Replaying this journal onto main after that would overwrite the initiators' newer
        // writes, so the record says it must not be.
        await this.markHandedBack(state, error).catch((e: Error) => this.log.error({ backupId: this.id, phase: this.phase, err: e.message }, 'could not record the hand-back'));
        v.capture = undefined;
        v.accepting = false;
        if (v.config.topology === 'main-directed') await v.control.redirectOff().catch(() => {});
        v.gate.open();
      }
    }
    if (v.config.topology !== 'inline') v.requestLogoutAll(2);
    await this.disposeJournal();
  }

  /**
   * The shutdown path. New commands are held (not failed: the initiator re-sends them to the next
   * detour), commands executing finish and are answered, the journal is closed (everything
   * admitted written and fdatasync'd), the store writer lets go with the backup still 'running'.
   */
  private async park(): Promise<void> {
    const v = this.volume;
    this.suspended = true;
    v.gate.close();
    const device = v.capture;
    if (device) {
      let timer: NodeJS.Timeout | undefined;
      const idle = await Promise.race([device.idle().then(() => true), new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), PARK_IDLE_MS)))]);
      clearTimeout(timer);
      if (!idle) {
        // Typically writes waiting for journal space, which only a drain could free, and the copy
        // forbids draining. None of them was acknowledged: the connections go first so that no
        // error status can reach the initiator, which re-sends them after it reconnects.
        this.log.warn({ backupId: this.id, phase: this.phase, commands: device.commandsInFlight }, 'commands still executing at shutdown: dropping the connections unanswered');
        for (const s of v.frontSessions()) for (const c of s.connections) c.close();
      }
    }
    try {
      await this.journal?.close();
    } catch (err) {
      this.log.error({ backupId: this.id, phase: this.phase, err: (err as Error).message }, 'could not close the journal');
    }
    try {
      await this.writer?.close();
    } catch (err) {
      this.log.error({ backupId: this.id, phase: this.phase, err: (err as Error).message }, 'could not close the backup writer');
    }
    if (this.stateSaved) await this.saveState().catch((err: Error) => this.log.error({ backupId: this.id, phase: this.phase, err: err.message }, 'could not record the backup for a restart'));
    const j = this.journal;
    this.log.info(
      {
        backupId: this.id,
        phase: this.phase,
        freezeSeq: this.freezeSeq,
        bytesCopied: this.bytesCopied,
        journal: j ? { lastSeq: j.lastSeq, drainedSeq: j.drainedSeq } : null,
      },
      'backup suspended: the next start with this configuration takes it up again',
    );
  }

  /**
   * Whether main still lacks writes the journal acknowledged: blocks in the map, or records on
   * their way into it. A failed journal takes no more records, so then only the map counts.
   */
  private undrained(): boolean {
    const j = this.journal;
    const map = this.map;
    if (!j || !map) return false;
    return map.size > 0 || (!j.failed && j.drainedSeq < j.lastSeq);
  }

  /**
   * A failed journal cannot record its drain point, so once everything it acknowledged is on main
   * it goes, before the hand-back is recorded: a restart must not replay it over the initiators'
   * newer writes. On a full disk this also frees the space the hand-back record needs.
   */
  private async removeDrainedJournal(): Promise<void> {
    if (this.journal?.failed && !this.undrained()) await this.disposeJournal();
  }

  /**
   * Never throws: its disk may refuse even this (read-only after an I/O error), and nothing that
   * follows (a hand-back, the store's final state) may be skipped for it. A journal left behind
   * is not replayed over main after a hand-back (Engine.handBackFromStore).
   */
  private async disposeJournal(): Promise<void> {
    const j = this.journal;
    if (!j) return;
    try {
      await j.close();
      if (j.drainedSeq >= j.lastSeq || (j.failed && !this.undrained())) await fs.rm(j.dir, { recursive: true, force: true });
      else this.log.error({ backupId: this.id, dir: j.dir, records: j.records }, 'journal kept: it holds writes that did not reach the main volume');
    } catch (err) {
      this.log.error({ backupId: this.id, phase: this.phase, dir: j.dir, err: (err as Error).message }, 'could not remove the journal');
    }
  }

  /** Resolves once every write accepted before the call is on main. */
  async sync(timeoutMs: number): Promise<number> {
    const deadline = Date.now() + timeoutMs;
    // A resumed backup's journal may hold writes from before the restart: wait until it is open.
    while (!this.journal && this.resumed && this.state === 'running') {
      if (Date.now() >= deadline) throw new Error('timeout');
      await sleep(50);
    }
    const j = this.journal;
    if (!j) return 0;
    const target = j.lastSeq;
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([j.waitDrained(target), new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error('timeout')), Math.max(0, deadline - Date.now()))))]);
    } finally {
      clearTimeout(timer);
    }
    return target;
  }
}
