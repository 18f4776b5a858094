import type { Logger } from 'pino';
import { ConflictError, NotFoundError, TimeoutError, type BackupObject, type BackupPhase, type DetourEngine, type VolumeView } from '../control/model.ts';
import type { BackupRecord } from '../store/format.ts';
import { BackupStore } from '../store/backup-store.ts';
import { Catalog } from '../store/catalog.ts';
import { BackupRun, type BackupRunOptions } from './backup-run.ts';
import type { Volume } from './volume.ts';

/** What the engine reports to the metrics layer (all optional). */
export interface EngineHooks {
  phase?(volume: string, phase: BackupPhase | undefined): void;
  copied?(volume: string, bytes: number, total: number): void;
  drained?(volume: string, bytes: number): void;
  cutover?(volume: string, seconds: number): void;
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
    error: r.state === 'running' ? 'interrupted: detour stopped during this backup' : r.error,
    sha256: r.sha256,
  };
}

/** The backup engine behind the API: volumes, backup runs, and the store's catalog. */
export class Engine implements DetourEngine {
  readonly store: BackupStore;
  private readonly catalog: Catalog;
  private readonly runs = new Map<string, BackupRun>();
  private readonly active = new Map<string, BackupRun>();
  /** Completed/failed backups found in the store, refreshed after every run. */
  private stored: BackupObject[] = [];

  constructor(
    private readonly volumesByName: Map<string, Volume>,
    private readonly opts: { dataDir: string; storePath: string; logger: Logger; hooks?: EngineHooks; run?: Partial<BackupRunOptions> },
  ) {
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
      phase: this.active.get(v.name)?.phase ?? 'idle',
      sessions: v.sessionViews(),
    }));
  }

  async startBackup(volume: string, o: { label?: string }): Promise<BackupObject> {
    const v = this.volumesByName.get(volume);
    if (!v) throw new NotFoundError(`no volume named ${volume}`);
    if (this.active.has(volume)) throw new ConflictError(`a backup of ${volume} is already running`);
    const hooks = this.opts.hooks;
    const run = new BackupRun(v, {
      label: o.label,
      dataDir: this.opts.dataDir,
      store: this.store,
      logger: this.opts.logger,
      ...this.opts.run,
      ...(v.config.copyRateLimit !== undefined ? { copyRateLimit: v.config.copyRateLimit } : {}),
      hooks: {
        phase: (r, p) => hooks?.phase?.(r.volume.name, p),
        copied: (r, b) => hooks?.copied?.(r.volume.name, b, r.bytesTotal),
        drained: (r, b) => hooks?.drained?.(r.volume.name, b),
        cutover: (r, s) => hooks?.cutover?.(r.volume.name, s),
        finished: (r) => {
          if (this.active.get(volume) === r) this.active.delete(volume);
          hooks?.phase?.(r.volume.name, r.state === 'completed' ? 'done' : undefined);
          if (r.state === 'completed') hooks?.succeeded?.(r.volume.name, r.finishedAt ?? new Date());
          void this.refreshCatalog().catch(() => {});
        },
      },
    });
    this.active.set(volume, run);
    try {
      await run.start();
    } catch (err) {
      this.active.delete(volume);
      throw err;
    }
    this.runs.set(run.id, run);
    hooks?.phase?.(volume, run.phase);
    return run.toObject();
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
    if (!run || !run.journal) return { reflectedSeq: 0 };
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
