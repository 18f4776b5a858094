// Read data buffers, reused. A target moving hundreds of MB/s of reads would otherwise allocate a
// fresh 64 KiB-1 MiB buffer per command; Node keeps those outside the V8 heap, and their churn is
// what drives V8 into repeated full garbage collections (measured: a third of the proxy's CPU on
// sequential reads). Buffers are kept per power-of-two size class, and only up to a byte budget,
// so an idle target holds little and a burst of huge reads cannot pin memory.
//
// The rule that keeps this safe: a buffer goes back only when nothing can still write into it or
// read from it. Whoever hands a pooled buffer out as ScsiOutcome.dataIn attaches the matching
// release(), and the transport calls it once the last byte has been handed to the kernel. A
// buffer whose fate is unclear (an aborted command, a failed connection) is simply not returned:
// the garbage collector takes it, which costs speed but never data.

const MIN_CLASS_SHIFT = 12; // 4 KiB: smaller reads are cheap to allocate
const MAX_CLASS_SHIFT = 24; // 16 MiB: larger ones are rare enough to allocate

export interface BufferPoolOptions {
  /** Most bytes kept idle across all classes. */
  maxIdleBytes?: number;
}

export class BufferPool {
  private readonly free: Buffer[][] = [];
  /** The idle buffers again, so a second release of one (a bug) cannot hand it out twice. */
  private readonly idleSet = new WeakSet<Buffer>();
  private idleBytes = 0;
  private readonly maxIdleBytes: number;

  constructor(opts: BufferPoolOptions = {}) {
    this.maxIdleBytes = opts.maxIdleBytes ?? 64 << 20;
    for (let s = MIN_CLASS_SHIFT; s <= MAX_CLASS_SHIFT; s++) this.free.push([]);
  }

  /** Whether a request of this many bytes is served from the pool at all. */
  static pooled(length: number): boolean {
    return length >= 1 << MIN_CLASS_SHIFT && length <= 1 << MAX_CLASS_SHIFT;
  }

  /**
   * A buffer of at least `length` bytes (contents undefined). Sizes outside the pooled range
   * get a plain allocation, which release() then ignores.
   */
  take(length: number): Buffer {
    if (!BufferPool.pooled(length)) return Buffer.allocUnsafe(length);
    const cls = classOf(length);
    const list = this.free[cls - MIN_CLASS_SHIFT]!;
    const b = list.pop();
    if (b) {
      this.idleSet.delete(b);
      this.idleBytes -= b.length;
      return b;
    }
    // Not from Node's shared 8 KiB slab: a pooled buffer must own its memory outright.
    return Buffer.allocUnsafeSlow(1 << cls);
  }

  /** Gives back a buffer from take(). Anything else (a view, a foreign buffer) is ignored. */
  release(b: Buffer): void {
    const len = b.length;
    if (b.byteOffset !== 0 || len !== b.buffer.byteLength || len < 1 << MIN_CLASS_SHIFT || len > 1 << MAX_CLASS_SHIFT || (len & (len - 1)) !== 0) return;
    if (this.idleBytes + len > this.maxIdleBytes || this.idleSet.has(b)) return;
    this.idleSet.add(b);
    this.free[classOf(len) - MIN_CLASS_SHIFT]!.push(b);
    this.idleBytes += len;
  }

  /** Bytes held idle, for tests and diagnostics. */
  get idle(): number {
    return this.idleBytes;
  }
}

function classOf(length: number): number {
  return Math.max(MIN_CLASS_SHIFT, 32 - Math.clz32(length - 1));
}

/** The pool shared by every logical unit and proxy of the process. */
export const dataBuffers = new BufferPool();
