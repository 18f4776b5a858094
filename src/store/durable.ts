// Crash-safe file primitives. A file is durable only once its data is fsync'd AND the directory
// entry that names it is fsync'd: a rename that was not followed by a directory fsync can vanish
// in a power cut, leaving the old name (or nothing) behind.

import { open, rename, rm } from 'node:fs/promises';
import path from 'node:path';

/** fsync a directory so that creations, renames and unlinks inside it survive a crash. */
export async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Replaces `file` atomically: readers see either the old content or the whole new content, never a
 * torn mix, and after the promise resolves the new content survives a crash. `content` may be a
 * sequence of pieces so a large document need not be built as one string.
 */
export async function writeFileAtomic(file: string, content: string | Buffer | Iterable<string>): Promise<void> {
  const tmp = `${file}.tmp`;
  const fh = await open(tmp, 'w', 0o644);
  try {
    if (typeof content === 'string' || Buffer.isBuffer(content)) {
      await fh.writeFile(content);
    } else {
      // Batch small pieces into writes of about 1 MiB: few syscalls, bounded memory.
      let batch: string[] = [];
      let batchLength = 0;
      for (const piece of content) {
        batch.push(piece);
        batchLength += piece.length;
        if (batchLength >= 1 << 20) {
          await fh.writeFile(batch.join(''));
          batch = [];
          batchLength = 0;
        }
      }
      if (batch.length) await fh.writeFile(batch.join(''));
    }
    await fh.sync();
  } catch (err) {
    await fh.close().catch(() => {});
    await rm(tmp, { force: true }).catch(() => {});
    throw err;
  }
  await fh.close();
  await rename(tmp, file);
  await fsyncDir(path.dirname(file));
}

/**
 * Group commit for an fsync-like operation: a caller gets a promise that settles after a run of
 * `op` that STARTED after the call, so its earlier writes are covered; callers arriving while a run
 * is in progress share the single run queued behind it. Under a queue depth of N this turns N
 * fsyncs into about two.
 */
export class GroupSync {
  private running: Promise<void> | undefined;
  private queued: Promise<void> | undefined;

  constructor(private readonly op: () => Promise<void>) {}

  sync(): Promise<void> {
    if (!this.running) return this.start();
    if (!this.queued) {
      this.queued = this.running
        .catch(() => {})
        .then(() => {
          this.queued = undefined;
          return this.start();
        });
    }
    return this.queued;
  }

  private start(): Promise<void> {
    const run: Promise<void> = this.op().finally(() => {
      if (this.running === run) this.running = undefined;
    });
    this.running = run;
    return run;
  }
}
