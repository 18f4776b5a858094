// Memory for the chunks a copier hands to the store, and the SHA-256 work done on it.
//
// The copier reads each chunk into a buffer it reuses (allocChunkBuffers). Those buffers are
// page-aligned shared memory, which lets the store do two things without copying a byte:
//
// - write the chunk file with O_DIRECT: the disk takes the data straight from the buffer. Through
//   the page cache, the kernel's copy into freshly allocated cache pages cost more CPU than both
//   SHA-256 passes together (first touches of guest memory are expensive on a virtual machine),
//   and the dirty pages only had to be written back by the fdatasync anyway.
// - hash the chunk on worker threads in place (ChunkHasher): its own SHA-256 on one, the running
//   whole-image SHA-256 on another. Hashing is most of the CPU a copy costs; on the event loop it
//   would compete with receiving the READ data, and one thread doing both passes fell behind.
//   (WebCrypto's digest() also runs on another thread, but first copies its input on the event
//   loop into a fresh allocation, which costs about as much as hashing it there.)
//
// Any other buffer works too, the slow way: written through the page cache, hashed on the event
// loop, and copied for the whole-image hash.

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
// SHA-256 on a worker thread: per chunk, and the running hash of whole images

// Plain JavaScript, evaluated: the worker must not depend on how the main program was loaded.
// Messages are handled in the order they were posted, which is what keeps an image hash in order.
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const ZEROS = new Uint8Array(1 << 20);
const streams = new Map();
function stream(id) {
  const h = streams.get(id);
  if (!h) throw new Error('image hash ' + id + ' is gone');
  return h;
}
parentPort.on('message', (m) => {
  const reply = { id: m.id };
  try {
    switch (m.op) {
      case 'open':
        streams.set(m.stream, createHash('sha256'));
        break;
      case 'close':
        streams.delete(m.stream);
        break;
      case 'zeros': {
        const h = stream(m.stream);
        for (let left = m.length; left > 0; left -= ZEROS.length) h.update(ZEROS.subarray(0, Math.min(left, ZEROS.length)));
        break;
      }
      case 'digest':
        reply.hex = stream(m.stream).copy().digest('hex');
        break;
      default: {
        const bytes = new Uint8Array(m.buffer, m.offset, m.length);
        if (m.stream !== undefined) stream(m.stream).update(bytes);
        if (m.chunk) reply.digest = createHash('sha256').update(bytes).digest();
      }
    }
  } catch (err) {
    reply.error = String((err && err.message) || err);
  }
  if (m.lent) {
    reply.lent = m.buffer;
    parentPort.postMessage(reply, [m.buffer]);
  } else {
    parentPort.postMessage(reply);
  }
});
`;

interface HashReply {
  id: number;
  digest?: Uint8Array;
  hex?: string;
  error?: string;
  /** A buffer lent to the thread, given back. */
  lent?: ArrayBuffer;
}

interface Waiter {
  resolve(reply: HashReply): void;
  reject(err: Error): void;
}

/** A running SHA-256 of a whole image, kept on the hashing thread. */
export interface ImageHash {
  readonly stream: number;
}

const MAX_SPARE = 4;

/** One worker thread running WORKER_SOURCE, and the replies it owes. */
class HashThread {
  private worker: Worker | undefined;
  private nextId = 1;
  private readonly waiting = new Map<number, Waiter>();

  post(msg: Record<string, unknown>, transfer: ArrayBuffer[] = []): Promise<HashReply> {
    const w = this.started();
    const id = this.nextId++;
    return new Promise<HashReply>((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      // Only a thread with work pending may keep the process alive.
      if (this.waiting.size === 1) w.ref();
      w.postMessage({ ...msg, id }, transfer);
    });
  }

  get running(): boolean {
    return this.worker !== undefined;
  }

  async close(): Promise<void> {
    const w = this.worker;
    if (!w) return;
    this.worker = undefined;
    this.failAll(new Error('the hashing thread was closed'));
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
      if (m.error === undefined) waiter.resolve(m);
      else waiter.reject(new Error(`hashing failed: ${m.error}`));
    });
    const gone = (err: Error) => {
      if (this.worker !== w) return;
      this.worker = undefined;
      this.failAll(err);
    };
    w.on('error', gone);
    w.on('exit', (code) => gone(new Error(`the hashing thread exited (code ${code})`)));
    this.worker = w;
    return w;
  }

  private failAll(err: Error): void {
    const waiters = [...this.waiting.values()];
    this.waiting.clear();
    for (const waiter of waiters) waiter.reject(err);
  }
}

/**
 * SHA-256 off the event loop, on two worker threads: one keeps the running hashes of whole images
 * (which must see their bytes in order, so one thread), the other takes the per-chunk hashes, so
 * the two passes over every chunk run side by side. Views of SharedArrayBuffers
 * (allocChunkBuffers) are hashed where they are: the caller must leave those bytes alone until the
 * promise settles. Anything else is hashed on the calling thread, and copied for an image hash.
 */
export class ChunkHasher {
  private readonly images = new HashThread();
  private readonly chunks = new HashThread();
  private nextStream = 1;
  /** Buffers given back by the image thread, for the next copies. */
  private readonly spare: ArrayBuffer[] = [];

  /** SHA-256 of `data`. */
  async sha256(data: Uint8Array): Promise<Buffer> {
    return (await this.hashChunk(data, undefined))!;
  }

  /**
   * SHA-256 of `data` (unless `chunk` is false), and `data` appended to `image` after everything
   * posted to it before: the order of calls is the order of hashing.
   */
  async hashChunk(data: Uint8Array, image: ImageHash | undefined, chunk = true): Promise<Buffer | undefined> {
    if (!(data.buffer instanceof SharedArrayBuffer)) return this.hashUnshared(data, image, chunk);
    const view = { buffer: data.buffer, offset: data.byteOffset, length: data.byteLength };
    const jobs: Array<Promise<HashReply>> = [];
    if (image) jobs.push(this.images.post({ ...view, stream: image.stream }));
    if (chunk) jobs.push(this.chunks.post({ ...view, chunk: true }));
    const replies = await Promise.all(jobs);
    const digest = replies.find((r) => r.digest)?.digest;
    return digest ? Buffer.from(digest.buffer, digest.byteOffset, digest.byteLength) : undefined;
  }

  /**
   * Memory the threads cannot see: the chunk's own hash is taken right here, and the image hash
   * gets a copy in a buffer lent to its thread, which gives it back with the reply (so copies are
   * reused, and never wait for a garbage collection in the other thread to be freed).
   */
  private async hashUnshared(data: Uint8Array, image: ImageHash | undefined, chunk: boolean): Promise<Buffer | undefined> {
    let fed: Promise<HashReply> | undefined;
    if (image) {
      const i = this.spare.findIndex((b) => b.byteLength >= data.byteLength);
      const lent = i >= 0 ? this.spare.splice(i, 1)[0]! : new ArrayBuffer(data.byteLength);
      new Uint8Array(lent, 0, data.byteLength).set(data);
      fed = this.images.post({ buffer: lent, offset: 0, length: data.byteLength, stream: image.stream, lent: true }, [lent]);
    }
    const digest = chunk ? createHash('sha256').update(data).digest() : undefined;
    if (fed) {
      const reply = await fed;
      if (reply.lent && this.spare.length < MAX_SPARE) this.spare.push(reply.lent);
    }
    return digest;
  }

  /** A new, empty image hash. */
  openImage(): ImageHash {
    const image = { stream: this.nextStream++ };
    this.images.post({ op: 'open', stream: image.stream }).catch(() => {});
    return image;
  }

  /** Appends `length` zero bytes to `image`, in order with the other calls. */
  zeros(image: ImageHash, length: number): Promise<void> {
    return this.images.post({ op: 'zeros', stream: image.stream, length }).then(() => undefined);
  }

  /** The image's SHA-256 so far (hex); the image hash goes on. */
  async digest(image: ImageHash): Promise<string> {
    return (await this.images.post({ op: 'digest', stream: image.stream })).hex!;
  }

  closeImage(image: ImageHash): void {
    if (this.images.running) this.images.post({ op: 'close', stream: image.stream }).catch(() => {});
  }

  /** Stops the threads (they start again on demand). Pending work fails, image hashes are lost. */
  async close(): Promise<void> {
    await Promise.all([this.images.close(), this.chunks.close()]);
  }
}

/** The process's hashing threads, shared by every backup being written. */
export const chunkHasher = new ChunkHasher();
