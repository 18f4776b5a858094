// An I/O stall probe: one command at a time (4 KiB writes and reads at random offsets), the time of
// every completion kept, so the longest gap between two completions says how long the initiator
// saw its disk stand still. Two ways in: through qemu-nbd (libiscsi is the initiator, as in a QEMU
// guest) over a minimal NBD client, or through detour's own initiator (src/back).
import { randomBytes, randomInt } from 'node:crypto';
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import { InitiatorSession } from '../../src/back/index.ts';

/** Wall-clock milliseconds with sub-millisecond resolution, comparable with pino's `time`. */
export function nowMs(): number {
  return performance.timeOrigin + performance.now();
}

/** What the probe needs from a disk. */
export interface ProbeDisk {
  read(offset: number, length: number): Promise<Buffer>;
  write(offset: number, data: Buffer): Promise<void>;
  close(): Promise<void>;
}

// ------------------------------------------------------------------------------------------------
// NBD (the "fixed newstyle" handshake and simple replies: enough for qemu-nbd at queue depth 1)

const NBD_MAGIC = Buffer.from('NBDMAGIC');
const IHAVEOPT = 0x49484156454f5054n;
const NBD_FLAG_FIXED_NEWSTYLE = 1;
const NBD_FLAG_NO_ZEROES = 2;
const NBD_OPT_EXPORT_NAME = 1;
const NBD_REQUEST_MAGIC = 0x25609513;
const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
const NBD_CMD_READ = 0;
const NBD_CMD_WRITE = 1;
const NBD_CMD_DISC = 2;

/** Reads exact byte counts off a socket, one request at a time. */
class ByteReader {
  private chunks: Buffer[] = [];
  private length = 0;
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  private failed: Error | undefined;

  constructor(sock: net.Socket) {
    sock.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.length += d.length;
      this.pump();
    });
    const fail = (err: Error) => {
      this.failed ??= err;
      const w = this.waiter;
      this.waiter = undefined;
      w?.reject(this.failed);
    };
    sock.on('error', fail);
    sock.on('close', () => fail(new Error('NBD connection closed')));
  }

  read(n: number): Promise<Buffer> {
    if (this.waiter) return Promise.reject(new Error('one read at a time'));
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
      this.pump();
      if (this.waiter && this.failed) {
        this.waiter = undefined;
        reject(this.failed);
      }
    });
  }

  private pump(): void {
    const w = this.waiter;
    if (!w || this.length < w.n) return;
    const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
    this.waiter = undefined;
    const out = Buffer.from(all.subarray(0, w.n));
    const rest = all.subarray(w.n);
    this.chunks = rest.length ? [rest] : [];
    this.length = rest.length;
    w.resolve(out);
  }
}

export class NbdDisk implements ProbeDisk {
  private handle = 0n;
  private constructor(
    private readonly sock: net.Socket,
    private readonly reader: ByteReader,
    readonly size: number,
  ) {}

  static async connect(socketPath: string): Promise<NbdDisk> {
    const sock = net.connect(socketPath);
    const reader = new ByteReader(sock);
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', () => resolve());
      sock.once('error', reject);
    });
    try {
      const hello = await reader.read(18);
      if (!hello.subarray(0, 8).equals(NBD_MAGIC) || hello.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('not an NBD newstyle server');
      const serverFlags = hello.readUInt16BE(16);
      const noZeroes = (serverFlags & NBD_FLAG_NO_ZEROES) !== 0;
      const clientFlags = Buffer.alloc(4);
      clientFlags.writeUInt32BE((serverFlags & NBD_FLAG_FIXED_NEWSTYLE) | (noZeroes ? NBD_FLAG_NO_ZEROES : 0));
      const opt = Buffer.alloc(16);
      opt.writeBigUInt64BE(IHAVEOPT, 0);
      opt.writeUInt32BE(NBD_OPT_EXPORT_NAME, 8);
      opt.writeUInt32BE(0, 12); // the default export, ""
      sock.write(Buffer.concat([clientFlags, opt]));
      const info = await reader.read(10 + (noZeroes ? 0 : 124));
      return new NbdDisk(sock, reader, Number(info.readBigUInt64BE(0)));
    } catch (err) {
      sock.destroy();
      throw err;
    }
  }

  private async request(type: number, offset: number, length: number, data?: Buffer): Promise<Buffer | undefined> {
    const h = Buffer.alloc(28);
    const handle = ++this.handle;
    h.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
    h.writeUInt16BE(0, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(handle, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    this.sock.write(data ? Buffer.concat([h, data]) : h);
    if (type === NBD_CMD_DISC) return undefined;
    const reply = await this.reader.read(16);
    if (reply.readUInt32BE(0) !== NBD_SIMPLE_REPLY_MAGIC) throw new Error(`NBD reply magic 0x${reply.readUInt32BE(0).toString(16)}`);
    if (reply.readBigUInt64BE(8) !== handle) throw new Error('NBD reply for another request');
    const error = reply.readUInt32BE(4);
    if (error !== 0) throw new Error(`NBD ${type === NBD_CMD_READ ? 'read' : 'write'} at ${offset}: error ${error}`);
    return type === NBD_CMD_READ ? this.reader.read(length) : undefined;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    return (await this.request(NBD_CMD_READ, offset, length))!;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    await this.request(NBD_CMD_WRITE, offset, data.length, data);
  }

  async close(): Promise<void> {
    try {
      await this.request(NBD_CMD_DISC, 0, 0);
    } catch {
      /* closing anyway */
    }
    this.sock.end();
    this.sock.destroy();
  }
}

// ------------------------------------------------------------------------------------------------
// detour's own initiator

export class IscsiDisk implements ProbeDisk {
  private constructor(
    readonly session: InitiatorSession,
    private readonly lun: number,
    private readonly blockSize: number,
  ) {}

  /**
   * Logs in at `portal` and follows its redirect, as an initiator configured with that portal
   * would; on AsyncEvent 1 it logs out and logs in there again.
   */
  static async connect(opts: { portal: string; targetName: string; initiatorName: string; lun: number }): Promise<IscsiDisk> {
    const session = await InitiatorSession.connect({
      portal: opts.portal,
      targetName: opts.targetName,
      initiatorName: opts.initiatorName,
      reconnect: { initialDelayMs: 100, maxDelayMs: 1000 },
    });
    try {
      const { blockSize } = await session.readCapacity(opts.lun);
      return new IscsiDisk(session, opts.lun, blockSize);
    } catch (err) {
      session.close();
      throw err;
    }
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.session.read(this.lun, offset / this.blockSize, length / this.blockSize, this.blockSize);
  }

  write(offset: number, data: Buffer): Promise<void> {
    return this.session.write(this.lun, offset / this.blockSize, data, this.blockSize);
  }

  async close(): Promise<void> {
    await this.session.logout().catch(() => this.session.close());
  }
}

// ------------------------------------------------------------------------------------------------
// The probe

export interface Gap {
  /** Milliseconds between two completions (or from the last one to the end of the window). */
  ms: number;
  /** When the gap began (wall-clock ms). */
  from: number;
}

export class StallProbe {
  /** Wall-clock ms of every completed command, in order. */
  readonly completions: number[] = [];
  readonly errors: string[] = [];
  private stopping = false;
  private stoppedAt: number | undefined;
  private loop: Promise<void> | undefined;

  constructor(
    readonly name: string,
    private readonly disk: ProbeDisk,
    private readonly regionBytes: number,
  ) {}

  start(): void {
    this.loop = this.run();
  }

  private async run(): Promise<void> {
    const ioBytes = 4096;
    const slots = Math.floor(this.regionBytes / ioBytes);
    const data = randomBytes(ioBytes);
    for (let i = 0; !this.stopping; i++) {
      const offset = randomInt(slots) * ioBytes;
      try {
        if (i % 2 === 0) {
          data.writeUInt32LE(i, 0);
          await this.disk.write(offset, data);
        } else {
          const got = await this.disk.read(offset, ioBytes);
          if (got.length !== ioBytes) throw new Error(`read of ${ioBytes} bytes at ${offset} returned ${got.length}`);
        }
        this.completions.push(nowMs());
      } catch (err) {
        // A failed command is not a completion: the stall goes on until one succeeds.
        if (this.errors.length < 20) this.errors.push(`${new Date().toISOString()} ${(err as Error).message}`);
        else this.errors[19] = `... and more (last: ${(err as Error).message})`;
        if (!this.stopping) await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  /**
   * Stops after the command in flight; if that one does not finish within `graceMs`, the stall it
   * is in counts up to the moment of stopping.
   */
  async stop(graceMs = 10_000): Promise<void> {
    if (!this.loop || this.stopping) return;
    this.stopping = true;
    const t = nowMs();
    let timer: NodeJS.Timeout | undefined;
    const finished = await Promise.race([this.loop.then(() => true), new Promise<boolean>((r) => (timer = setTimeout(() => r(false), graceMs)))]);
    clearTimeout(timer);
    if (!finished) this.stoppedAt = t;
  }

  async close(): Promise<void> {
    await this.stop();
    await this.disk.close().catch(() => {});
  }

  /** Completions per second over [from, to]. */
  rate(from: number, to: number): number {
    let n = 0;
    for (const t of this.completions) if (t >= from && t <= to) n++;
    return n / Math.max(1e-3, (to - from) / 1000);
  }

  /**
   * The longest interval without a completion that overlaps [from, to]. A stall still going on
   * at `to` counts up to the next completion (or to the probe's stop, if it never completed).
   */
  longestGap(from: number, to: number): Gap {
    const ts = this.completions;
    let best: Gap = { ms: 0, from };
    let prev: number | undefined;
    for (const t of ts) {
      if (prev !== undefined && t >= from && prev <= to && t - prev > best.ms) best = { ms: t - prev, from: prev };
      prev = t;
      if (t > to) break;
    }
    if (prev !== undefined && prev <= to) {
      // No completion after `to` yet: the stall lasts at least until the probe stopped, or now.
      const end = this.stoppedAt ?? nowMs();
      if (end - prev > best.ms) best = { ms: end - prev, from: prev };
    }
    if (prev === undefined) best = { ms: Math.max(0, (this.stoppedAt ?? nowMs()) - from), from };
    return best;
  }
}
