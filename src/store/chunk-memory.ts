// Memory for the chunks a copier hands to the store, and the per-chunk SHA-256 taken from it.
//
// The copier reads each chunk into a buffer it reuses (allocChunkBuffers). Those buffers are
// page-aligned shared memory, which lets the store do two things without copying a byte:
//
// - write the chunk file with O_DIRECT: the disk takes the data straight from the buffer. Through
//   the page cache, the kernel's copy into freshly allocated cache pages cost more CPU than both
//   SHA-256 passes together (first touches of guest memory are expensive on a virtual machine),
//   and the dirty pages only had to be written back by the fdatasync anyway.
// - hash the chunk on a worker thread in place (ChunkHasher), so the event loop, which receives
//   the READ data and feeds the whole-image hash, keeps its time for that. (WebCrypto's digest()
//   also runs on another thread, but first copies its input on the event loop into a fresh
//   allocation, which costs about as much as hashing it there.)
//
// Any other buffer works too, the slow way: written through the page cache, hashed inline.

import { createHash } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { Worker } from 'node:worker_threads';

/** O_DIRECT wants buffer address, file offset and length aligned to the logical block size; a page covers every disk. */
export const DIRECT_IO_ALIGN = 4096;

/** O_DIRECT, or undefined where the platform has none. */
export const O_DIRECT: number | undefined = (fsConstants as Record<string, number | undefined>).O_DIRECT;

const WASM_PAGE = 65536;

// The project's type definitions do not include the WebAssembly API: just what is used here.
interface WasmMemoryApi {
  Memory: new (descriptor: { initial: number; maximum: number; shared: boolean }) => { buffer: SharedArrayBuffer };
}
const wasm = (globalThis as unknown as { WebAssembly: WasmMemoryApi }).WebAssembly;

/** The page-aligned shared memories allocChunkBuffers() made, so a view can be recognized. */
const alignedMemory = new WeakSet<ArrayBufferLike>();

/**
 * `count` buffers of `size` bytes for chunks, in one shared, page-aligned allocation (a
 * WebAssembly memory, which V8 maps page by page), so that the store can write them with O_DIRECT
 * and hash them on its worker thread. Falls back to a plain SharedArrayBuffer, which still gets
 * the worker thread.
 */
export function allocChunkBuffers(count: number, size: number): Buffer[] {
  const stride = Math.ceil(size / DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN;
  const pages = Math.ceil((stride * count) / WASM_PAGE);
  let sab: SharedArrayBuffer;
  try {
    const memory = new wasm.Memory({ initial: pages, maximum: pages, shared: true });
    sab = memory.buffer;
    alignedMemory.add(sab);
  } catch {
    sab = new SharedArrayBuffer(stride * count);
  }
  const all = Buffer.from(sab);
  return Array.from({ length: count }, (_, k) => all.subarray(k * stride, k * stride + size));
}

/** Whether `data` may be written with O_DIRECT: from allocChunkBuffers(), and aligned at both ends. */
export function directIoCapable(data: Uint8Array): boolean {
  return O_DIRECT !== undefined && alignedMemory.has(data.buffer) && data.byteOffset % DIRECT_IO_ALIGN === 0 && data.byteLength % DIRECT_IO_ALIGN === 0;
}

// ---------------------------------------------------------------------------------------------
// Per-chunk SHA-256 on a worker thread

// Plain JavaScript, evaluated: the worker must not depend on how the main program was loaded.
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
parentPort.on('message', (m) => {
  let digest;
  try {
    digest = createHash('sha256').update(new Uint8Array(m.buffer, m.offset, m.length)).digest();
  } catch (err) {
    parentPort.postMessage({ id: m.id, error: String((err && err.message) || err) });
    return;
  }
  parentPort.postMessage({ id: m.id, digest });
});
`;

interface HashReply {
  id: number;
  digest?: Uint8Array;
  error?: string;
}

interface Waiter {
  resolve(digest: Buffer): void;
  reject(err: Error): void;
}

export class ChunkHasher {
  private worker: Worker | undefined;
  private nextId = 1;
  private readonly waiting = new Map<number, Waiter>();

  /**
   * SHA-256 of `data`. A view of a SharedArrayBuffer is hashed on the worker thread: the caller
   * must leave those bytes alone until the promise settles. Anything else is hashed right away.
   */
  sha256(data: Uint8Array): Promise<Buffer> {
    if (!(data.buffer instanceof SharedArrayBuffer)) return Promise.resolve(createHash('sha256').update(data).digest());
    const w = this.started();
    const id = this.nextId++;
    return new Promise<Buffer>((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      // Only a thread with work pending may keep the process alive.
      if (this.waiting.size === 1) w.ref();
      w.postMessage({ id, buffer: data.buffer, offset: data.byteOffset, length: data.byteLength });
    });
  }

  /** Stops the worker thread (it starts again on demand). Pending hashes fail. */
  async close(): Promise<void> {
    const w = this.worker;
    if (!w) return;
    this.worker = undefined;
    this.failAll(new Error('the chunk hasher was closed'));
    await w.terminate();
  }

  private started(): Worker {
    if (this.worker) return this.worker;
    const w = new Worker(WORKER_SOURCE, { eval: true });
    w.unref();
    w.on('message', (m: HashReply) => {
      const waiter = this.waiting.get(m.id);
      if (!waiter) return;
      this.waiting.delete(m.id);
      if (this.waiting.size === 0) w.unref();
      if (m.digest) waiter.resolve(Buffer.from(m.digest.buffer, m.digest.byteOffset, m.digest.byteLength));
      else waiter.reject(new Error(`hashing a chunk failed: ${m.error ?? 'no digest'}`));
    });
    const gone = (err: Error) => {
      if (this.worker !== w) return;
      this.worker = undefined;
      this.failAll(err);
    };
    w.on('error', gone);
    w.on('exit', (code) => gone(new Error(`the chunk hashing thread exited (code ${code})`)));
    this.worker = w;
    return w;
  }

  private failAll(err: Error): void {
    const waiters = [...this.waiting.values()];
    this.waiting.clear();
    for (const waiter of waiters) waiter.reject(err);
  }
}

/** The process's chunk hasher: one thread, shared by every backup being written. */
export const chunkHasher = new ChunkHasher();
