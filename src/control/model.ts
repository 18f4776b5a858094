// The objects the HTTP API and the CLI exchange (CONTRACT.md), and the interface of the engine
// behind the API. Field names are binding: scripts and acceptance checks read them.

export type BackupState = 'running' | 'completed' | 'failed' | 'cancelled';
export type BackupPhase = 'switching' | 'copying' | 'draining' | 'cutover' | 'done';
export type SessionMode = 'redirected' | 'inline' | 'capture';

export interface BackupObject {
  id: string;
  volume: string;
  label: string | null;
  state: BackupState;
  phase: BackupPhase;
  /** Journal sequence number at the freeze point; null until the volume is frozen. */
  freezeSeq: number | null;
  bytesTotal: number;
  bytesCopied: number;
  journal: { records: number; bytes: number; unreflected: number };
  /** ISO 8601 times. */
  startedAt: string;
  finishedAt: string | null;
  error: string | null;
  /** SHA-256 (hex) of the full raw backup image, once completed. */
  sha256: string | null;
}

export interface SessionView {
  initiator: string;
  isid: string;
  tsih: number;
  mode: SessionMode;
}

export interface VolumeView {
  name: string;
  target: string;
  topology: 'inline' | 'proxy-directed' | 'main-directed';
  /** The phase of the backup in progress, or 'idle'. */
  phase: BackupPhase | 'idle';
  sessions: SessionView[];
}

export class ConflictError extends Error {}
export class NotFoundError extends Error {}
export class TimeoutError extends Error {}

/** What the API serves; implemented by the running proxy. */
export interface DetourEngine {
  volumes(): VolumeView[];
  startBackup(volume: string, opts: { label?: string }): Promise<BackupObject>;
  listBackups(): BackupObject[];
  getBackup(id: string): BackupObject | undefined;
  cancelBackup(id: string): Promise<void>;
  /** Resolves once every write accepted before the call has reached the main target. */
  sync(volume: string, timeoutMs: number): Promise<{ reflectedSeq: number }>;
}
