// An in-memory DetourEngine for testing the HTTP layer and the client commands without iSCSI.
// Backups advance one step each time they are read, so a client that polls sees every phase.

import pino from 'pino';
import {
  ConflictError,
  NotFoundError,
  TimeoutError,
  type BackupObject,
  type BackupPhase,
  type DetourEngine,
  type VolumeView,
} from '../../src/control/model.ts';

export const FAKE_VOLUME_BYTES = 64 * 1024 * 1024;

/** Steps a backup goes through; each read of a running backup moves it to the next one. */
const STEPS: { phase: BackupPhase; copiedFraction: number }[] = [
  { phase: 'switching', copiedFraction: 0 },
  { phase: 'copying', copiedFraction: 0.25 },
  { phase: 'copying', copiedFraction: 0.5 },
  { phase: 'copying', copiedFraction: 1 },
  { phase: 'draining', copiedFraction: 1 },
  { phase: 'cutover', copiedFraction: 1 },
  { phase: 'done', copiedFraction: 1 },
];

export interface FakeEngineOptions {
  /** Backups of these volumes end 'failed' at the draining step. */
  failingVolumes?: string[];
  /** sync() of these volumes never completes: it throws TimeoutError after timeoutMs. */
  stuckVolumes?: string[];
}

export class FakeEngine implements DetourEngine {
  readonly calls: { method: string; args: unknown[] }[] = [];
  readonly #backups = new Map<string, { obj: BackupObject; step: number }>();
  #nextId = 1;
  readonly #volumes: VolumeView[] = [
    {
      name: 'vol1',
      target: 'iqn.2026-11.test:main',
      topology: 'proxy-directed',
      phase: 'idle',
      sessions: [{ initiator: 'iqn.2026-11.test:host1', isid: '0x023d00000001', tsih: 7, mode: 'redirected' }],
    },
    { name: 'vol2', target: 'iqn.2026-11.test:second', topology: 'inline', phase: 'idle', sessions: [] },
    { name: 'broken', target: 'iqn.2026-11.test:broken', topology: 'main-directed', phase: 'idle', sessions: [] },
    { name: 'stuck', target: 'iqn.2026-11.test:stuck', topology: 'inline', phase: 'idle', sessions: [] },
  ];

  constructor(private readonly opts: FakeEngineOptions = { failingVolumes: ['broken'], stuckVolumes: ['stuck'] }) {}

  volumes(): VolumeView[] {
    this.calls.push({ method: 'volumes', args: [] });
    return this.#volumes.map((v) => {
      const running = [...this.#backups.values()].find((b) => b.obj.volume === v.name && b.obj.state === 'running');
      return { ...v, phase: running ? running.obj.phase : 'idle' };
    });
  }

  async startBackup(volume: string, opts: { label?: string }): Promise<BackupObject> {
    this.calls.push({ method: 'startBackup', args: [volume, opts] });
    if (!this.#volumes.some((v) => v.name === volume)) throw new NotFoundError(`no volume '${volume}'`);
    if ([...this.#backups.values()].some((b) => b.obj.volume === volume && b.obj.state === 'running')) {
      throw new ConflictError(`a backup of ${volume} is already running`);
    }
    const id = `bk-${String(this.#nextId++).padStart(4, '0')}`;
    const obj: BackupObject = {
      id,
      volume,
      label: opts.label ?? null,
      state: 'running',
      phase: 'switching',
      freezeSeq: null,
      bytesTotal: FAKE_VOLUME_BYTES,
      bytesCopied: 0,
      journal: { records: 0, bytes: 0, unreflected: 0 },
      startedAt: new Date().toISOString(),
      finishedAt: null,
      error: null,
      sha256: null,
    };
    this.#backups.set(id, { obj, step: 0 });
    return structuredClone(obj);
  }

  listBackups(): BackupObject[] {
    this.calls.push({ method: 'listBackups', args: [] });
    return [...this.#backups.values()].map((b) => structuredClone(b.obj));
  }

  getBackup(id: string): BackupObject | undefined {
    this.calls.push({ method: 'getBackup', args: [id] });
    const b = this.#backups.get(id);
    if (!b) return undefined;
    if (b.obj.state === 'running') this.#advance(b);
    return structuredClone(b.obj);
  }

  async cancelBackup(id: string): Promise<void> {
    this.calls.push({ method: 'cancelBackup', args: [id] });
    const b = this.#backups.get(id);
    if (!b) throw new NotFoundError(`no backup '${id}'`);
    if (b.obj.state !== 'running') throw new ConflictError(`backup ${id} is already ${b.obj.state}`);
    b.obj.state = 'cancelled';
    b.obj.finishedAt = new Date().toISOString();
  }

  async sync(volume: string, timeoutMs: number): Promise<{ reflectedSeq: number }> {
    this.calls.push({ method: 'sync', args: [volume, timeoutMs] });
    if (!this.#volumes.some((v) => v.name === volume)) throw new NotFoundError(`no volume '${volume}'`);
    if (this.opts.stuckVolumes?.includes(volume)) {
      await new Promise((r) => setTimeout(r, timeoutMs));
      throw new TimeoutError(`journal of ${volume} not reflected within ${timeoutMs} ms`);
    }
    return { reflectedSeq: 42 };
  }

  /** Runs a backup straight to its end (as many reads as it takes). */
  finish(id: string): BackupObject {
    let b = this.getBackup(id);
    while (b && b.state === 'running') b = this.getBackup(id);
    if (!b) throw new Error(`no backup ${id}`);
    return b;
  }

  #advance(b: { obj: BackupObject; step: number }): void {
    b.step = Math.min(b.step + 1, STEPS.length - 1);
    const step = STEPS[b.step]!;
    const o = b.obj;
    o.phase = step.phase;
    o.bytesCopied = Math.round(o.bytesTotal * step.copiedFraction);
    if (o.freezeSeq === null && step.phase !== 'switching') o.freezeSeq = 100;
    o.journal = { records: 10 * b.step, bytes: 4096 * 10 * b.step, unreflected: step.phase === 'done' ? 0 : b.step };
    if (this.opts.failingVolumes?.includes(o.volume) && step.phase === 'draining') {
      o.state = 'failed';
      o.error = 'main target went away during drain';
      o.finishedAt = new Date().toISOString();
      return;
    }
    if (step.phase === 'done') {
      o.state = 'completed';
      o.finishedAt = new Date().toISOString();
      o.sha256 = 'ab'.repeat(32);
    }
  }
}

/** A logger for tests: silent, but records what was logged so tests can check for leaks. */
export function recordingLogger(): { logger: pino.Logger; lines: string[] } {
  const lines: string[] = [];
  const logger = pino({ level: 'debug' }, { write: (s: string) => void lines.push(s) });
  return { logger, lines };
}
