import fs from 'node:fs/promises';
import type { Logger } from 'pino';
import { ConflictError, NotFoundError, TimeoutError, type BackupObject, type BackupPhase, type DetourEngine, type VolumeView } from '../control/model.ts';
import type { BackupRecord } from '../store/format.ts';
import { BackupStore } from '../store/backup-store.ts';
import { Catalog } from '../store/catalog.ts';
import { BackupRun, interruptedBackupFile, journalDirFor, readInterruptedBackup, type BackupRunOptions, type InterruptedBackup } from './backup-run.ts';
import { defaultSegmentBytes, Journal } from './journal.ts';
import { JournalSpares, removeUnwantedSpares, spareDirFor } from './journal-spares.ts';
import type { Volume } from './volume.ts';

/** What the engine reports to the metrics layer (all optional). */
export interface EngineHooks {
  phase?(volume: string, phase: BackupPhase | undefined): void;
  copied?(volume: string, bytes: number, total: number): void;
  drained?(volume: string, bytes: number): void;
  cutover?(volume: string, seconds: number): void;
  journalCommit?(volume: string, seconds: number, records: number): void;
  succeeded?(volume: string, at: Date): void;
}

function recordToObject(r: BackupRecord): BackupObject {
  return {
    id: r.id,
    volume: r.volume,
    label: r.label,
    state: r.state === 'running' ? 'failed' : r.state,
    phase: r.state === 'completed' ? 'done' : 'copying',
    freezeSeq: r.freezeSeq,
    bytesTotal: r.sizeBytes,
    bytesCopied: r.state === 'completed' ? r.sizeBytes : 0,
    journal: { records: 0, bytes: 0, unreflected: 0 },
    startedAt: r.startedAt ?? r.instructedAt,
    finishedAt: r.finishedAt,
    // A backup being taken up again shows as its live run instead; this one has no record of
    // where it was in the data directory, so nothing can take it up.
    error: r.state === 'running' ? 'interrupted: detour stopped during this backup' : r.error,
    sha256: r.sha256,
  };
}

const RESUME_RETRY_MAX_MS = 30_000;

/** The backup engine behind the API: volumes, backup runs, and the store's catalog. */
export class Engine implements DetourEngine {
  readonly store: BackupStore;
  private readonly catalog: Catalog;
  private readonly runs = new Map<string, BackupRun>();
  private readonly active = new Map<string, BackupRun>();
  /** Completed/failed backups found in the store, refreshed after every run. */
  private stored: BackupObject[] = [];
  /** Volumes held for an interrupted backup until its run has taken them over. */
  private readonly held = new Map<string, InterruptedBackup>();
  /** Interrupted backups whose sessions had already gone back: only their records are finished. */
  private readonly toFinish: InterruptedBackup[] = [];
  private readonly background = new Set<Promise<void>>();
  private shuttingDown = false;
  /** Per volume with a journalSpare. */
  private readonly spares = new Map<string, JournalSpares>();
  private wakeRetries: Array<() => void> = [];

  constructor(
    private readonly volumesByName: Map<string, Volume>,
    private readonly opts: { dataDir: string; storePath: string; logger: Logger; hooks?: EngineHooks; run?: Partial<BackupRunOptions> },
  ) {
    for (const v of volumesByName.values()) {
      const target = v.config.journalSpare;
      if (target === undefined || target <= 0) continue;
      this.spares.set(
        v.name,
        new JournalSpares({
          dir: spareDirFor(opts.dataDir, v.name),
          targetBytes: target,
          fileBytes: defaultSegmentBytes(v.config.journalCapacity),
          logger: opts.logger.child({ volume: v.name }),
        }),
      );
    }
    this.store = new BackupStore({ path: opts.storePath });
    this.catalog = new Catalog(this.store);
  }

  async refreshCatalog(): Promise<void> {
    const listing = await this.catalog.list();
    for (const p of listing.problems) this.opts.logger.warn({ problem: p }, 'backup store entry skipped');
    this.stored = listing.backups.map(recordToObject);
  }

  volumes(): VolumeView[] {
    return [...this.volumesByName.values()].map((v) => ({
      name: v.name,
      target: v.config.target,
      topology: v.config.topology,
      phase: this.active.get(v.name)?.phase ?? this.held.get(v.name)?.phase ?? 'idle',
      sessions: v.sessionViews(),
    }));
  }

  private makeRun(v: Volume, o: { label?: string; resume?: InterruptedBackup }): BackupRun {
    const hooks = this.opts.hooks;
    const volume = v.name;
    const spares = this.spares.get(volume);
    return new BackupRun(v, {
      ...(o.label !== undefined ? { label: o.label } : {}),
      ...(o.resume ? { resume: o.resume } : {}),
      dataDir: this.opts.dataDir,
      store: this.store,
      logger: this.opts.logger,
      ...this.opts.run,
      ...(v.config.copyRateLimit !== undefined ? { copyRateLimit: v.config.copyRateLimit } : {}),
      ...(v.config.drainRateLimit !== undefined ? { drainRateLimit: v.config.drainRateLimit } : {}),
      ...(v.config.journalCapacity !== undefined ? { journalCapacity: v.config.journalCapacity } : {}),
      ...(spares ? { journalSpares: spares } : {}),
      hooks: {
        phase: (r, p) => hooks?.phase?.(r.volume.name, p),
        copied: (r, b) => hooks?.copied?.(r.volume.name, b, r.bytesTotal),
        drained: (r, b) => hooks?.drained?.(r.volume.name, b),
        cutover: (r, s) => hooks?.cutover?.(r.volume.name, s),
        journalCommit: (r, s, n) => hooks?.journalCommit?.(r.volume.name, s, n),
        finished: (r) => {
          if (this.active.get(volume) === r) this.active.delete(volume);
          if (o.resume && this.held.get(volume) === o.resume) this.held.delete(volume);
          hooks?.phase?.(r.volume.name, r.state === 'completed' ? 'done' : undefined);
          if (r.state === 'completed') hooks?.succeeded?.(r.volume.name, r.finishedAt ?? new Date());
          void this.refreshCatalog().catch(() => {});
          this.refillSpares(volume);
        },
      },
    });
  }

  async startBackup(volume: string, o: { label?: string }): Promise<BackupObject> {
    const v = this.volumesByName.get(volume);
    if (!v) throw new NotFoundError(`no volume named ${volume}`);
    if (this.shuttingDown) throw new ConflictError('detour is shutting down');
    if (this.active.has(volume) || this.held.has(volume)) throw new ConflictError(`a backup of ${volume} is already running`);
    const run = this.makeRun(v, o);
    this.active.set(volume, run);
    try {
      // The refill would share the disk with the journal; what it finished is the journal's.
      await this.spares.get(volume)?.pause();
      await run.start();
    } catch (err) {
      this.active.delete(volume);
      this.refillSpares(volume);
      throw err;
    }
    this.runs.set(run.id, run);
    this.opts.hooks?.phase?.(volume, run.phase);
    return run.toObject();
  }

  // ---- backups interrupted by a restart ---------------------------------------------------------

  /**
   * Looks for backups that were running when detour last stopped. Call before the portal listens:
   * a volume whose backup is taken up again has its gate closed and takes logins, so an initiator
   * reconnecting at once is neither redirected to main (its writes since the freeze are only in
   * the journal) nor served before the backup has the volume again.
   * @throws when a record in the data directory is damaged.
   */
  async findInterrupted(): Promise<InterruptedBackup[]> {
    const found: InterruptedBackup[] = [];
    for (const v of this.volumesByName.values()) {
      let st = await readInterruptedBackup(this.opts.dataDir, v.name);
      if (!st) continue;
      if (!st.handedBack) st = await this.handBackFromStore(st);
      found.push(st);
      if (st.handedBack) {
        this.toFinish.push(st);
        continue;
      }
      v.gate.close();
      v.accepting = true;
      this.held.set(v.name, st);
      this.opts.logger.info({ volume: v.name, backupId: st.backupId, phase: st.phase }, 'backup interrupted by a restart: holding the volume to take it up again');
    }
    return found;
  }

  /**
   * The store's record of a backup is made final (completed, failed, cancelled) only after its
   * sessions have gone back to main. A final one beside a record in the data directory that does
   * not say so means the data directory lost the hand-back (a failing disk, a file system restored
   * from before): the initiators may have written main since, and replaying the journal would
   * overwrite their writes with older data. So the backup is finished as handed back. A store that
   * cannot be read says nothing either way: the journal is replayed, as it must be when the
   * sessions were still captured.
   */
  private async handBackFromStore(st: InterruptedBackup): Promise<InterruptedBackup> {
    const rec = await this.store.readRecord(st.backupId).catch(() => undefined);
    if (!rec || rec.state === 'running') return st;
    this.opts.logger.warn(
      { volume: st.volume, backupId: st.backupId, phase: st.phase, storeState: rec.state },
      'the backup store has this backup ended, so its sessions went back to main before the stop: its journal is not replayed',
    );
    return { ...st, handedBack: { state: rec.state, error: rec.error } };
  }

  /** Takes the interrupted backups up again, in the background. Call once the portal listens. */
  resumeInterrupted(): void {
    for (const st of this.toFinish.splice(0)) this.track(this.finishHandedBack(st));
    for (const st of this.held.values()) this.track(this.resumeLoop(this.volumesByName.get(st.volume)!, st));
    for (const volume of this.spares.keys()) this.refillSpares(volume);
    this.track(
      removeUnwantedSpares(this.opts.dataDir, new Set(this.spares.keys()), this.opts.logger).then(
        () => undefined,
        (err: Error) => this.opts.logger.warn({ err: err.message }, 'could not remove the journal spares of volumes without journalSpare'),
      ),
    );
  }

  /** Tops up a volume's journal spares in the background, unless a backup has the volume. */
  private refillSpares(volume: string): void {
    const spares = this.spares.get(volume);
    if (!spares || this.shuttingDown || this.active.has(volume) || this.held.has(volume)) return;
    this.track(spares.refill());
  }

  /** Bytes of journal spares ready, per volume that keeps them. */
  spareBytes(): Map<string, number> {
    return new Map([...this.spares].map(([name, s]) => [name, s.readyBytes]));
  }

  private track(p: Promise<void>): void {
    const t = p.catch((err: Error) => this.opts.logger.error({ err: err.message }, 'interrupted backup'));
    this.background.add(t);
    void t.finally(() => this.background.delete(t));
  }

  /**
   * Runs the interrupted backup again until it starts. While the main target cannot be reached
   * the volume stays held: handing its initiators to main would lose the journal's writes.
   */
  private async resumeLoop(v: Volume, st: InterruptedBackup): Promise<void> {
    let delay = 1000;
    while (!this.shuttingDown) {
      const run = this.makeRun(v, { resume: st });
      this.active.set(v.name, run);
      this.runs.set(run.id, run);
      try {
        await this.spares.get(v.name)?.pause();
        await run.start();
        this.opts.hooks?.phase?.(v.name, run.phase);
        return;
      } catch (err) {
        if (this.active.get(v.name) === run) this.active.delete(v.name);
        if (this.runs.get(run.id) === run) this.runs.delete(run.id);
        this.opts.logger.error({ volume: v.name, backupId: st.backupId, err: (err as Error).message, retryInMs: delay }, 'cannot take the interrupted backup up yet; the volume stays held');
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, delay);
        this.wakeRetries.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
      delay = Math.min(delay * 2, RESUME_RETRY_MAX_MS);
    }
  }

  /**
   * An interrupted backup whose sessions had gone back to main before the stop (its cutover or
   * give-up was recording the hand-back): main may have taken writes since, so the journal is not
   * replayed; only the store record is made final.
   */
  private async finishHandedBack(st: InterruptedBackup): Promise<void> {
    const v = this.volumesByName.get(st.volume)!;
    const log = this.opts.logger.child({ volume: st.volume, backupId: st.backupId });
    // The hand-back may not have got as far as clearing the redirect.
    if (v.config.topology === 'main-directed') await v.control.redirectOff().catch((err: Error) => log.warn({ err: err.message }, 'could not clear the main target redirect'));
    const hb = st.handedBack!;
    try {
      const rec = await this.store.readRecord(st.backupId);
      if (rec.state === 'running') {
        const w = await this.store.openBackup(st.backupId);
        if (hb.state === 'completed') {
          try {
            await w.complete({ startedAt: st.startedAt, ...(st.freezeSeq !== null ? { freezeSeq: st.freezeSeq } : {}) });
            log.info({ phase: 'done' }, 'interrupted backup completed after the restart');
          } catch (err) {
            await w.fail(`could not be completed after a restart: ${(err as Error).message}`);
          }
        } else if (hb.state === 'cancelled') {
          await w.cancel(hb.error ?? 'cancelled');
        } else {
          await w.fail(hb.error ?? 'failed');
        }
      }
    } catch (err) {
      log.error({ err: (err as Error).message }, 'could not finish the store record of the interrupted backup');
    }
    const dir = journalDirFor(this.opts.dataDir, st.volume, st.backupId);
    if (await fs.stat(dir).then(() => true, () => false)) {
      try {
        const j = await Journal.open({ dir, blockSize: st.blockSize });
        const left = j.records;
        await j.close();
        if (left === 0) await fs.rm(dir, { recursive: true, force: true });
        else log.error({ dir, records: left }, 'journal kept: it holds writes that did not reach the main volume before the sessions went back');
      } catch (err) {
        log.error({ dir, err: (err as Error).message }, 'journal of the interrupted backup could not be read');
      }
    }
    await fs.rm(interruptedBackupFile(this.opts.dataDir, st.volume), { force: true });
    await this.refreshCatalog().catch(() => {});
  }

  /**
   * Shutdown: parks every backup in progress for the next start (see BackupRun.suspend) and stops
   * taking new ones. Idempotent.
   */
  async suspendAll(): Promise<void> {
    this.shuttingDown = true;
    for (const wake of this.wakeRetries.splice(0)) wake();
    const runs = [...this.active.values()];
    if (runs.length) this.opts.logger.info({ backups: runs.map((r) => r.id) }, 'suspending backups in progress: the next start takes them up again');
    await Promise.all([...runs.map((r) => r.suspend()), ...[...this.spares.values()].map((s) => s.pause())]);
    await Promise.allSettled([...this.background]);
  }

  listBackups(): BackupObject[] {
    const live = [...this.runs.values()].map((r) => r.toObject());
    const ids = new Set(live.map((b) => b.id));
    return [...this.stored.filter((b) => !ids.has(b.id)), ...live].sort((a, b) => a.startedAt.localeCompare(b.startedAt));
  }

  getBackup(id: string): BackupObject | undefined {
    return this.runs.get(id)?.toObject() ?? this.stored.find((b) => b.id === id);
  }

  async cancelBackup(id: string): Promise<void> {
    const r = this.runs.get(id);
    if (!r) {
      if (this.stored.some((b) => b.id === id)) throw new ConflictError(`backup ${id} is not running`);
      throw new NotFoundError(`no backup ${id}`);
    }
    if (r.state !== 'running') throw new ConflictError(`backup ${id} is ${r.state}`);
    r.cancel();
  }

  async sync(volume: string, timeoutMs: number): Promise<{ reflectedSeq: number }> {
    const v = this.volumesByName.get(volume);
    if (!v) throw new NotFoundError(`no volume named ${volume}`);
    const run = this.active.get(volume);
    // Outside a capture every write goes straight to the main target.
    if (!run) return { reflectedSeq: 0 };
    try {
      return { reflectedSeq: await run.sync(timeoutMs) };
    } catch {
      throw new TimeoutError(`writes of ${volume} not on the main target within ${timeoutMs} ms`);
    }
  }

  /** Runs in progress, for graceful shutdown. */
  activeRuns(): BackupRun[] {
    return [...this.active.values()];
  }
}
