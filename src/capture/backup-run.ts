import fs from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from 'pino';
import { buildInquiry, buildSyncCache10, buildWrite16, buildRead16, ScsiStatus } from 'iscsi-node-wire';
import { InitiatorSession } from '../back/index.ts';
import type { BackupObject, BackupPhase, BackupState } from '../control/model.ts';
import type { BackupStore, BackupWriter } from '../store/backup-store.ts';
import { CaptureDevice } from './capture-device.ts';
import { Journal } from './journal.ts';
import { SnapshotMap } from './snapshot-map.ts';
import type { Volume } from './volume.ts';
import type { MainSession } from '../switch/main-control.ts';

/** detour's own InitiatorName for the sessions it opens itself (copy, base reads, drain). */
export const DETOUR_INITIATOR = 'iqn.2026-11.io.detour:engine';

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
  hooks?: {
    phase?(run: BackupRun, phase: BackupPhase): void;
    copied?(run: BackupRun, bytes: number): void;
    drained?(run: BackupRun, bytes: number): void;
    cutover?(run: BackupRun, pauseSeconds: number): void;
    finished?(run: BackupRun): void;
  };
}

const MiB = 1024 * 1024;

class CancelledError extends Error {}

const UNIT_ATTENTION = 0x06;

/**
 * A command on detour's own session, retried past unit attentions: the main target reports each
 * reset or new nexus once, and those reports are not detour's to act on.
 */
async function commandGood(s: InitiatorSession, lun: number, cdb: Buffer, opts: { dataOut?: Buffer; dataInLength?: number }, what: string) {
  for (let attempt = 0; ; attempt++) {
    const r = await s.command(lun, cdb, opts);
    if (r.status === ScsiStatus.GOOD) return r;
    const key = r.sense && r.sense.length > 2 ? ((r.sense[0]! & 0x7f) >= 0x72 ? r.sense[1]! & 0x0f : r.sense[2]! & 0x0f) : -1;
    if (r.status === ScsiStatus.CHECK_CONDITION && key === UNIT_ATTENTION && attempt < 5) continue;
    throw new Error(`${what} on the main volume failed (status 0x${r.status.toString(16)}${key >= 0 ? `, sense key 0x${key.toString(16)}` : ''})`);
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * One backup of one volume, start to finish (DESIGN steps 1-6): switch the initiators over and
 * freeze, copy the frozen volume to the store, drain the journal back in rounds, cut over and
 * hand the sessions back.
 */
export class BackupRun {
  state: BackupState = 'running';
  phase: BackupPhase = 'switching';
  freezeSeq: number | null = null;
  bytesTotal = 0;
  bytesCopied = 0;
  error: string | null = null;
  sha256: string | null = null;
  readonly startedAt = new Date();
  finishedAt: Date | null = null;
  id: string;
  journal: Journal | undefined;
  map: SnapshotMap | undefined;
  private engineSession: InitiatorSession | undefined;
  private writer: BackupWriter | undefined;
  private cancelled = false;
  /** Average write rate to main during drains, bytes per second. */
  private drainRate = 0;
  /** Settles when the run has ended (completed, failed or cancelled). */
  done: Promise<void> = Promise.resolve();
  private lun = 0;
  private blockSize = 512;
  private blocks = 0;
  private readonly log: Logger;

  constructor(
    readonly volume: Volume,
    private readonly opts: BackupRunOptions,
  ) {
    this.id = opts.id ?? '';
    this.log = opts.logger.child({ volume: volume.name });
  }

  toObject(): BackupObject {
    const j = this.journal;
    return {
      id: this.id,
      volume: this.volume.name,
      label: this.opts.label ?? null,
      state: this.state,
      phase: this.phase,
      freezeSeq: this.freezeSeq,
      bytesTotal: this.bytesTotal,
      bytesCopied: this.bytesCopied,
      journal: { records: j?.records ?? 0, bytes: j?.bytes ?? 0, unreflected: j?.unreflected ?? 0 },
      startedAt: this.startedAt.toISOString(),
      finishedAt: this.finishedAt ? this.finishedAt.toISOString() : null,
      error: this.error,
      sha256: this.sha256,
    };
  }

  cancel(): void {
    this.cancelled = true;
  }

  private setPhase(p: BackupPhase): void {
    this.phase = p;
    this.log.info({ backupId: this.id, phase: p }, 'backup phase');
    this.opts.hooks?.phase?.(this, p);
  }

  private checkCancelled(): void {
    if (this.cancelled) throw new CancelledError('cancelled');
  }

  /**
   * Prepares the backup (the LUN and its identity, the store entry, the journal) so that it has
   * an id, then runs the rest in the background; `done` settles when it ends.
   */
  async start(): Promise<void> {
    try {
      await this.prepare();
    } catch (err) {
      this.engineSession?.close();
      await this.writer?.fail((err as Error).message).catch(() => {});
      throw err;
    }
    this.done = this.run();
  }

  private async prepare(): Promise<void> {
    const v = this.volume;
    this.engineSession = await InitiatorSession.connect({
      portal: v.mainPortal,
      targetName: v.config.target,
      initiatorName: DETOUR_INITIATOR,
      localAddress: v.localAddress,
      logger: this.log,
      reconnect: { initialDelayMs: 200, maxDelayMs: 5000 },
    });
    const s = this.engineSession;
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
    const vpd83 = await s.command(lun, buildInquiry(true, 0x83, 1024), { dataInLength: 1024 });
    this.writer = await this.opts.store.createBackup({
      ...(this.opts.id ? { id: this.opts.id } : {}),
      volume: v.name,
      label: this.opts.label ?? null,
      targetIqn: v.config.target,
      lun,
      sizeBytes: this.bytesTotal,
      blockSize: cap.blockSize,
      deviceIdentity: vpd83.status === ScsiStatus.GOOD && vpd83.data ? vpd83.data : null,
      instructedAt: this.startedAt,
    });
    this.id = this.writer.id;
    const journalDir = path.join(this.opts.dataDir, 'volumes', v.name, 'journal', this.id);
    this.map = new SnapshotMap({ blockSize: cap.blockSize });
    const map = this.map;
    this.journal = await Journal.open({ dir: journalDir, blockSize: cap.blockSize, reflect: (rec) => map.insert(rec) });
  }

  private async run(): Promise<void> {
    const v = this.volume;
    try {
      await this.switchIn();
      this.setPhase('copying');
      await this.copy();
      this.setPhase('draining');
      await this.drainUntilCutover();
      this.setPhase('cutover');
      await this.cutover();
      const rec = await this.writer!.complete({ finishedAt: new Date(), startedAt: this.startedAt, freezeSeq: this.freezeSeq ?? 0 });
      this.sha256 = rec.sha256 ?? null;
      this.finishedAt = new Date();
      this.state = 'completed';
      this.setPhase('done');
      await this.disposeJournal();
    } catch (err) {
      const cancelled = err instanceof CancelledError;
      this.log.error({ backupId: this.id, phase: this.phase, err: (err as Error).message }, cancelled ? 'backup cancelled' : 'backup failed');
      this.error = cancelled ? 'cancelled' : (err as Error).message;
      try {
        await this.abandon();
      } catch (e) {
        this.log.error({ backupId: this.id, err: (e as Error).message }, 'could not hand the sessions back cleanly');
      }
      this.state = cancelled ? 'cancelled' : 'failed';
      this.finishedAt = new Date();
      try {
        if (cancelled) await this.writer?.cancel('cancelled');
        else await this.writer?.fail(this.error);
      } catch {
        /* the store keeps what it has */
      }
    } finally {
      this.engineSession?.close();
      v.accepting = v.capture !== undefined;
      this.opts.hooks?.finished?.(this);
    }
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
      if (topology === 'main-directed') await v.control.redirectOn({ host: v.localAddress, port: v.portal!.port });
      const deadline = Date.now() + (this.opts.switchTimeoutMs ?? 20_000);
      // An adapter that cannot list sessions is told to drop every connection of the target.
      if ((await v.control.listSessions()).length === 0) await v.control.kick();
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
        for (const s of stray) await v.control.kick(s);
        this.checkCancelled();
        await sleep(100);
      }
    }
    // Commands that were already on their way to main finish before the freeze.
    await v.forwardIdle();
    await commandGood(this.engineSession!, this.lun, buildSyncCache10(), {}, 'SYNCHRONIZE CACHE at the freeze');
    this.freezeSeq = journal.lastSeq;
    this.log.info({ backupId: this.id, phase: 'switching', freezeSeq: this.freezeSeq, initiators: [...expected] }, 'volume frozen');
    v.gate.open();
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
    const s = this.engineSession!;
    const maxBlocks = Math.max(1, Math.floor(MiB / this.blockSize));
    if (blocks <= maxBlocks) return this.readOnce(s, lba, blocks);
    const parts: Promise<Buffer>[] = [];
    for (let o = 0; o < blocks; o += maxBlocks) parts.push(this.readOnce(s, lba + o, Math.min(maxBlocks, blocks - o)));
    return Buffer.concat(await Promise.all(parts));
  }

  private async readOnce(s: InitiatorSession, lba: number, blocks: number): Promise<Buffer> {
    const r = await commandGood(s, this.lun, buildRead16(lba, blocks), { dataInLength: blocks * this.blockSize }, `READ of ${blocks} blocks at ${lba}`);
    if (!r.data || r.data.length !== blocks * this.blockSize) throw new Error(`READ of ${blocks} blocks at ${lba} from the main volume returned ${r.data?.length ?? 0} bytes`);
    return r.data;
  }

  private async copy(): Promise<void> {
    const w = this.writer!;
    const todo = w.missingChunks();
    this.bytesCopied = this.bytesTotal - todo.reduce((n, i) => n + w.chunkLength(i), 0);
    const depth = this.opts.copyQueueDepth ?? 4;
    const rate = this.opts.copyRateLimit;
    const t0 = Date.now();
    let next = 0;
    const worker = async () => {
      while (next < todo.length) {
        this.checkCancelled();
        const i = todo[next++]!;
        const offset = w.chunkOffset(i);
        const length = w.chunkLength(i);
        const data = await this.readMain(offset / this.blockSize, length / this.blockSize);
        await w.writeChunk(i, data);
        this.bytesCopied += length;
        this.opts.hooks?.copied?.(this, length);
        if (rate) {
          // Stay at or under the limit on average: wait until the elapsed time covers the bytes.
          const ahead = (this.bytesCopied / rate) * 1000 - (Date.now() - t0);
          if (ahead > 0) await sleep(ahead);
        }
      }
    };
    await Promise.all(Array.from({ length: depth }, worker));
  }

  // ---- drain and cutover ------------------------------------------------------------------------

  /** One drain round: write the map as of now to main, make it durable, forget it. */
  private async drainRound(): Promise<number> {
    const map = this.map!;
    const journal = this.journal!;
    const snap = map.snapshot();
    if (snap.extents.length === 0) {
      if (snap.atSeq > journal.drainedSeq) await journal.markDrained(snap.atSeq);
      return 0;
    }
    const s = this.engineSession!;
    const t0 = process.hrtime.bigint();
    let bytes = 0;
    const maxBlocks = Math.max(1, Math.floor(MiB / this.blockSize));
    const jobs: Array<{ e: (typeof snap.extents)[number]; off: number; n: number }> = [];
    for (const e of snap.extents) for (let o = 0; o < e.blocks; o += maxBlocks) jobs.push({ e, off: o, n: Math.min(maxBlocks, e.blocks - o) });
    let next = 0;
    const worker = async () => {
      while (next < jobs.length) {
        const { e, off, n } = jobs[next++]!;
        const data = await journal.readData(e.location, e.offsetInRecord + off, n);
        await commandGood(s, this.lun, buildWrite16(e.lba + off, n), { dataOut: data }, `WRITE of ${n} blocks at ${e.lba + off}`);
        bytes += data.length;
      }
    };
    await Promise.all(Array.from({ length: 8 }, worker));
    await commandGood(s, this.lun, buildSyncCache10(), {}, 'SYNCHRONIZE CACHE after a drain round');
    // Only now is the data durable on main: forget it, then let the journal free its space.
    map.release(snap);
    await journal.markDrained(snap.atSeq);
    const secs = Number(process.hrtime.bigint() - t0) / 1e9;
    const rate = bytes / Math.max(secs, 1e-3);
    this.drainRate = this.drainRate === 0 ? rate : 0.5 * this.drainRate + 0.5 * rate;
    this.opts.hooks?.drained?.(this, bytes);
    this.log.info({ backupId: this.id, phase: this.phase, bytes, seconds: secs, atSeq: snap.atSeq }, 'drain round');
    return bytes;
  }

  /** Seconds the remaining drain would take at the measured rate to main. */
  estimateSeconds(): number {
    const remaining = this.map!.mappedBytes + this.journal!.unreflectedBytes;
    if (remaining === 0) return 0;
    return this.drainRate > 0 ? remaining / this.drainRate : Number.POSITIVE_INFINITY;
  }

  private async drainUntilCutover(): Promise<void> {
    const budgetSec = this.volume.config.ioTimeoutBudget / 1000;
    for (;;) {
      this.checkCancelled();
      await this.drainRound();
      // Cut over once what is left fits well inside the initiators' budget.
      if (this.estimateSeconds() < budgetSec / 2) return;
      if (this.map!.size === 0) await sleep(50);
    }
  }

  private async cutover(): Promise<void> {
    const v = this.volume;
    const device = v.capture!;
    v.gate.close();
    const t0 = Date.now();
    try {
      await device.idle();
      // Everything acknowledged is reflected (append resolves after reflection); drain the rest.
      while (this.map!.size > 0 || this.journal!.drainedSeq < this.journal!.lastSeq) await this.drainRound();
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
  private async abandon(): Promise<void> {
    const v = this.volume;
    if (!v.capture) return;
    if (this.journal && this.map && this.journal.lastSeq > this.journal.drainedSeq) {
      v.gate.close();
      try {
        await v.capture.idle();
        while (this.map.size > 0 || this.journal.drainedSeq < this.journal.lastSeq) await this.drainRound();
      } finally {
        v.capture = undefined;
        v.accepting = false;
        if (v.config.topology === 'main-directed') await v.control.redirectOff().catch(() => {});
        v.gate.open();
      }
    } else {
      v.capture = undefined;
      v.accepting = false;
      if (v.config.topology === 'main-directed') await v.control.redirectOff().catch(() => {});
      v.gate.open();
    }
    if (v.config.topology !== 'inline') v.requestLogoutAll(2);
    await this.disposeJournal();
  }

  private async disposeJournal(): Promise<void> {
    const j = this.journal;
    if (!j) return;
    await j.close();
    if (j.drainedSeq >= j.lastSeq) await fs.rm(j.dir, { recursive: true, force: true });
  }

  /** Resolves once every write accepted before the call is on main. */
  async sync(timeoutMs: number): Promise<number> {
    const j = this.journal;
    if (!j) return 0;
    const target = j.lastSeq;
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([j.waitDrained(target), new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error('timeout')), timeoutMs)))]);
    } finally {
      clearTimeout(timer);
    }
    return target;
  }
}
