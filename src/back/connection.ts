import net from 'node:net';
import {
  BHS_LENGTH,
  crc32cOf,
  decodePdu,
  DIGEST_LENGTH,
  encodePdu,
  isInitiatorOpcode,
  MAX_AHS_LENGTH,
  NO_DIGESTS,
  pad4,
  readDataSegmentLength,
  readTotalAhsLength,
  type DigestSettings,
  type PduInit,
  type TargetPdu,
} from 'iscsi-node-wire';

/** RFC 7143 13.12: every Login PDU is limited to 8192 bytes of data, whatever is declared later. */
const LOGIN_MAX_RECV_DATA_SEGMENT_LENGTH = 8192;

/**
 * The socket reads into this one buffer per connection (headers, small payloads, several PDUs
 * at a time) instead of into a fresh chunk Node allocates per read: at hundreds of MB/s those
 * chunks are external memory that keeps V8 running full garbage collections.
 */
const RECEIVE_BUFFER_SIZE = 256 * 1024;
/** The rest of a payload at least this long is read by the kernel straight into its destination. */
const DIRECT_READ_MIN = 16 * 1024;
const MAX_HEADER_LENGTH = BHS_LENGTH + MAX_AHS_LENGTH + DIGEST_LENGTH;
const EMPTY = Buffer.alloc(0);

/**
 * Where the data segment of an incoming PDU goes, decided from its header before the payload is
 * read: a view of exactly `length` bytes (e.g. the right place in a read command's buffer), or
 * undefined for a buffer of its own.
 */
export type PayloadSink = (header: Buffer, length: number) => Buffer | undefined;

/** The connection failed below iSCSI: TCP, framing, digests, or a target PDU we cannot decode. */
export class ConnectionError extends Error {
  override readonly name = 'ConnectionError';
  constructor(
    message: string,
    readonly code: 'connect-failed' | 'connect-timeout' | 'closed' | 'framing' | 'digest' | 'malformed' | 'timeout' | 'protocol',
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

export interface Portal {
  host: string;
  port: number;
}

/** Parses "host:port", "[v6]:port" or a bare host (port 3260). */
export function parsePortal(text: string): Portal {
  const t = text.trim();
  if (t.startsWith('[')) {
    const end = t.indexOf(']');
    if (end < 0) throw new RangeError(`bad portal ${JSON.stringify(text)}`);
    const host = t.slice(1, end);
    const rest = t.slice(end + 1);
    const port = rest.startsWith(':') ? Number(rest.slice(1)) : 3260;
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new RangeError(`bad portal ${JSON.stringify(text)}`);
    return { host, port };
  }
  const colon = t.lastIndexOf(':');
  // More than one colon without brackets: a bare IPv6 address.
  if (colon < 0 || t.indexOf(':') !== colon) return { host: t, port: 3260 };
  const port = Number(t.slice(colon + 1));
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new RangeError(`bad portal ${JSON.stringify(text)}`);
  return { host: t.slice(0, colon), port };
}

export function formatPortal(p: Portal): string {
  return p.host.includes(':') ? `[${p.host}]:${p.port}` : `${p.host}:${p.port}`;
}

export interface OpenOptions {
  portal: Portal;
  localAddress?: string;
  timeoutMs: number;
}

/**
 * The receive side of one connection: cuts the byte stream into PDUs, checks digests and decodes.
 *
 * The socket reads into a buffer this object owns and reuses (Node's `onread`), so nothing of a
 * read survives it: headers are copied out (48 bytes, from Node's small-buffer pool) and every
 * payload is copied once into its final place, which the payload sink picks, e.g. the read
 * command's own buffer. When a large part of a payload is still to come, the next read goes
 * straight into its destination and even that copy disappears.
 *
 * During login the PDUs are handed out one at a time and whatever follows the last one is kept
 * unparsed, so the first full-feature PDU is never cut with login-phase settings (no digests,
 * 8192-byte limit) even when it arrived in the same TCP segment as the final Login Response.
 */
class Receiver {
  readonly buffer = Buffer.allocUnsafe(RECEIVE_BUFFER_SIZE);
  headerDigest = false;
  dataDigest = false;
  maxRecvDataSegmentLength = LOGIN_MAX_RECV_DATA_SEGMENT_LENGTH;
  sink: PayloadSink | undefined;
  /** One PDU at a time, and the rest kept (login phase); or everything as it comes. */
  private oneAtATime = true;
  /** Bytes received while oneAtATime and not parsed yet (owned copies). */
  private backlog: Buffer = EMPTY;

  private readonly headerBytes = Buffer.allocUnsafe(MAX_HEADER_LENGTH);
  private headerGot = 0;
  private headerNeed = BHS_LENGTH;
  /** The PDU whose data segment is being received. */
  private header: Buffer | undefined;
  private payload: Buffer = EMPTY;
  private payloadGot = 0;
  /** Padding and data digest after the payload. */
  private readonly tail = Buffer.allocUnsafe(3 + DIGEST_LENGTH);
  private tailGot = 0;
  private tailNeed = 0;
  /** Set when the next read should go into the payload itself rather than into `buffer`. */
  private direct: Buffer | undefined;
  /** The buffer the read in progress goes to. */
  private reading: Buffer = this.buffer;
  private failed = false;

  constructor(
    private readonly deliver: (pdu: TargetPdu) => void,
    private readonly fail: (message: string, code: 'framing' | 'digest' | 'malformed' | 'protocol', cause?: unknown) => void,
  ) {}

  /**
   * Where the socket reads next. Node asks once per read, right after delivering the previous
   * one, so a plan made in between (startStreaming) only takes effect from the read after.
   */
  nextReadBuffer(): Buffer {
    this.reading = this.direct ?? this.buffer;
    return this.reading;
  }

  /** `n` bytes arrived in the buffer nextReadBuffer() returned last. */
  onRead(n: number): void {
    if (this.failed) return;
    if (this.reading !== this.buffer) {
      this.direct = undefined;
      this.payloadGot += n;
      if (this.payloadGot === this.payload.length && this.tailNeed === 0) this.finishPdu();
      this.planDirectRead();
      return;
    }
    if (this.oneAtATime) {
      // Rare (login): keep an owned copy and let pull() take PDUs from it.
      const copy = Buffer.allocUnsafe(this.backlog.length + n);
      this.backlog.copy(copy, 0);
      this.buffer.copy(copy, this.backlog.length, 0, n);
      this.backlog = copy;
      return;
    }
    this.consume(this.buffer, 0, n, false);
    this.planDirectRead();
  }

  /** Login phase: parses up to the end of the next whole PDU in what has arrived, if any. */
  pull(): void {
    if (this.failed || this.backlog.length === 0) return;
    const used = this.consume(this.backlog, 0, this.backlog.length, true);
    this.backlog = used === this.backlog.length ? EMPTY : this.backlog.subarray(used);
  }

  /** Leaves the login phase: what is left is parsed with the full-feature settings. */
  startStreaming(): void {
    this.oneAtATime = false;
    const rest = this.backlog;
    this.backlog = EMPTY;
    if (rest.length > 0) this.consume(rest, 0, rest.length, false);
    this.planDirectRead();
  }

  /**
   * Parses src[pos, end). Anything that must outlive the call is copied, because src is the
   * reused receive buffer. Returns where it stopped (before end only when `one` is set).
   */
  private consume(src: Buffer, pos: number, end: number, one: boolean): number {
    while (pos < end && !this.failed) {
      if (this.header === undefined) {
        const n = Math.min(this.headerNeed - this.headerGot, end - pos);
        src.copy(this.headerBytes, this.headerGot, pos, pos + n);
        this.headerGot += n;
        pos += n;
        if (this.headerGot < this.headerNeed) break;
        if (this.headerNeed === BHS_LENGTH) {
          // Now the AHS length and whether a header digest follows are known.
          const full = BHS_LENGTH + readTotalAhsLength(this.headerBytes) + (this.headerDigest ? DIGEST_LENGTH : 0);
          if (full > BHS_LENGTH) {
            this.headerNeed = full;
            continue;
          }
        }
        if (!this.startPdu()) return end;
        if (this.payload.length === 0) {
          this.finishPdu();
          if (one) return pos;
        }
        continue;
      }
      if (this.payloadGot < this.payload.length) {
        const n = Math.min(this.payload.length - this.payloadGot, end - pos);
        src.copy(this.payload, this.payloadGot, pos, pos + n);
        this.payloadGot += n;
        pos += n;
        if (this.payloadGot < this.payload.length) break;
      }
      if (this.tailGot < this.tailNeed) {
        const n = Math.min(this.tailNeed - this.tailGot, end - pos);
        src.copy(this.tail, this.tailGot, pos, pos + n);
        this.tailGot += n;
        pos += n;
        if (this.tailGot < this.tailNeed) break;
      }
      this.finishPdu();
      if (one) return pos;
    }
    return pos;
  }

  /** The header is complete: check it and find the payload its destination. */
  private startPdu(): boolean {
    const headerLength = this.headerNeed - (this.headerDigest ? DIGEST_LENGTH : 0);
    const h = this.headerBytes;
    this.headerGot = 0;
    this.headerNeed = BHS_LENGTH;
    if (this.headerDigest && crc32cOf([h.subarray(0, headerLength)]) !== h.readUInt32LE(headerLength)) {
      this.stop('receive: header digest mismatch', 'digest');
      return false;
    }
    const dsl = readDataSegmentLength(h);
    if (dsl > this.maxRecvDataSegmentLength) {
      this.stop(`receive: DataSegmentLength ${dsl} exceeds the ${this.maxRecvDataSegmentLength} bytes declared`, 'framing');
      return false;
    }
    // Owned: the decoded PDU may keep views of its header.
    const header = Buffer.allocUnsafe(headerLength);
    h.copy(header, 0, 0, headerLength);
    this.header = header;
    this.payloadGot = 0;
    this.tailGot = 0;
    if (dsl === 0) {
      this.payload = EMPTY;
      this.tailNeed = 0;
      return true;
    }
    const dest = this.oneAtATime ? undefined : this.sink?.(header, dsl);
    this.payload = dest !== undefined && dest.length === dsl ? dest : Buffer.allocUnsafe(dsl);
    this.tailNeed = pad4(dsl) - dsl + (this.dataDigest ? DIGEST_LENGTH : 0);
    return true;
  }

  private finishPdu(): void {
    const header = this.header!;
    const data = this.payload;
    this.header = undefined;
    this.payload = EMPTY;
    if (this.dataDigest && data.length > 0) {
      const padLength = this.tailNeed - DIGEST_LENGTH;
      if (crc32cOf([data, this.tail.subarray(0, padLength)]) !== this.tail.readUInt32LE(padLength)) {
        // The stream is still in sync, but at ErrorRecoveryLevel 0 the only way to recover the
        // lost payload is to drop the connection and re-issue the command.
        this.stop('receive: data digest mismatch', 'digest');
        return;
      }
    }
    let pdu;
    try {
      pdu = decodePdu(header, data);
    } catch (err) {
      this.stop(`receive: ${(err as Error).message}`, 'malformed', err);
      return;
    }
    if (isInitiatorOpcode(pdu.opcode)) {
      this.stop(`target sent an initiator opcode 0x${pdu.opcode.toString(16)}`, 'protocol');
      return;
    }
    this.deliver(pdu as TargetPdu);
  }

  /** When much of the current payload is still to come, the kernel copies it into place. */
  private planDirectRead(): void {
    this.direct = undefined;
    if (this.failed || this.header === undefined) return;
    const left = this.payload.length - this.payloadGot;
    if (left >= DIRECT_READ_MIN) this.direct = this.payload.subarray(this.payloadGot);
  }

  private stop(message: string, code: 'framing' | 'digest' | 'malformed' | 'protocol', cause?: unknown): void {
    this.failed = true;
    this.header = undefined;
    this.payload = EMPTY;
    this.direct = undefined;
    this.backlog = EMPTY;
    this.fail(message, code, cause);
  }

  close(): void {
    this.failed = true;
    this.header = undefined;
    this.payload = EMPTY;
    this.direct = undefined;
    this.backlog = EMPTY;
  }
}

/**
 * One TCP connection to a target: PDU framing on the way in (see Receiver), encoding on the way
 * out. During login the owner pulls Login Responses one at a time (receiveLoginPdu); in full
 * feature phase every PDU goes synchronously to the handler as soon as it is complete.
 */
export class InitiatorConnection {
  readonly socket: net.Socket;
  readonly portal: Portal;
  private readonly rx: Receiver;
  private digests: DigestSettings = NO_DIGESTS;
  private mode: 'login' | 'full-feature' | 'closed' = 'login';
  private corked = false;
  private loginQueue: TargetPdu[] = [];
  private waiter: { resolve: (p: TargetPdu) => void; reject: (e: Error) => void; timer: NodeJS.Timeout } | undefined;
  private handler: ((pdu: TargetPdu) => void) | undefined;
  private closeError: Error | undefined;
  private closeListeners: Array<(err: Error) => void> = [];
  /** PDUs received, for idle detection without a clock read per PDU. */
  rxCount = 0;

  private constructor(socket: net.Socket, portal: Portal, rx: Receiver) {
    this.socket = socket;
    this.portal = portal;
    this.rx = rx;
    socket.setNoDelay(true);
    socket.on('error', (err) => this.fail(new ConnectionError(`connection to ${formatPortal(portal)}: ${err.message}`, 'closed', { cause: err })));
    socket.on('close', () => this.fail(new ConnectionError(`connection to ${formatPortal(portal)} closed`, 'closed')));
  }

  static open(opts: OpenOptions): Promise<InitiatorConnection> {
    return new Promise((resolve, reject) => {
      const where = formatPortal(opts.portal);
      // The receiver exists before the socket: Node asks it for the first read buffer as soon as
      // the handle is created. Its PDUs go to whichever connection object it ends up in.
      let conn: InitiatorConnection | undefined;
      const rx = new Receiver(
        (pdu) => conn?.onPdu(pdu),
        (message, code, cause) => conn?.fail(new ConnectionError(message, code, cause === undefined ? undefined : { cause })),
      );
      const socket = net.connect({
        host: opts.portal.host,
        port: opts.portal.port,
        ...(opts.localAddress !== undefined ? { localAddress: opts.localAddress } : {}),
        onread: {
          buffer: () => rx.nextReadBuffer(),
          callback: (n: number) => {
            if (conn) conn.onRead(n);
            return true;
          },
        },
      });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new ConnectionError(`connecting to ${where} timed out after ${opts.timeoutMs} ms`, 'connect-timeout'));
      }, opts.timeoutMs);
      const onError = (err: Error) => {
        clearTimeout(timer);
        reject(new ConnectionError(`connecting to ${where}: ${err.message}`, 'connect-failed', { cause: err }));
      };
      socket.once('error', onError);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.off('error', onError);
        conn = new InitiatorConnection(socket, opts.portal, rx);
        resolve(conn);
      });
    });
  }

  get closed(): boolean {
    return this.mode === 'closed';
  }

  get localAddress(): string | undefined {
    return this.socket.localAddress;
  }

  /** Called once, with the reason, when the connection ends for any cause. */
  onClose(listener: (err: Error) => void): void {
    if (this.closeError) queueMicrotask(() => listener(this.closeError!));
    else this.closeListeners.push(listener);
  }

  /**
   * Encodes and queues one PDU. Writes issued in the same tick are corked together, so a
   * command and its unsolicited Data-Out, or a burst of Data-Out PDUs, leave in one writev
   * without their payloads being copied.
   */
  send(pdu: PduInit): void {
    if (this.mode === 'closed') throw this.closeError ?? new ConnectionError('connection closed', 'closed');
    const parts = encodePdu(pdu, this.digests);
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(() => {
        this.corked = false;
        this.socket.uncork();
      });
    }
    for (const part of parts) this.socket.write(part);
  }

  /** Login phase: the next PDU from the target. */
  receiveLoginPdu(timeoutMs: number): Promise<TargetPdu> {
    if (this.mode !== 'login') return Promise.reject(new Error('receiveLoginPdu outside the login phase'));
    if (this.waiter) return Promise.reject(new Error('a login PDU is already awaited'));
    if (this.closeError) return Promise.reject(this.closeError);
    const ready = this.pullLoginPdu();
    if (ready) return Promise.resolve(ready);
    if (this.closeError) return Promise.reject(this.closeError);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = undefined;
        reject(new ConnectionError(`no Login Response within ${timeoutMs} ms`, 'timeout'));
      }, timeoutMs);
      this.waiter = { resolve, reject, timer };
    });
  }

  /**
   * Switches to full feature phase right after the final Login Response: digests apply from the
   * next PDU in both directions (RFC 7143 13.1), and incoming data segments may now be as long
   * as the MaxRecvDataSegmentLength we declared. `sink` places incoming payloads (see
   * PayloadSink).
   */
  enterFullFeature(digests: DigestSettings, maxRecvDataSegmentLength: number, handler: (pdu: TargetPdu) => void, sink?: PayloadSink): void {
    if (this.mode === 'closed') return; // the close listeners report it
    if (this.mode !== 'login') throw new Error('enterFullFeature twice');
    this.digests = { headerDigest: digests.headerDigest, dataDigest: digests.dataDigest };
    this.rx.headerDigest = digests.headerDigest;
    this.rx.dataDigest = digests.dataDigest;
    this.rx.maxRecvDataSegmentLength = maxRecvDataSegmentLength;
    this.rx.sink = sink;
    this.handler = handler;
    this.mode = 'full-feature';
    // PDUs that arrived together with the final Login Response, parsed now with the new settings.
    const early = this.loginQueue;
    this.loginQueue = [];
    for (const pdu of early) {
      if (this.mode !== 'full-feature') return;
      handler(pdu);
    }
    this.rx.startStreaming();
  }

  close(err?: Error): void {
    this.fail(err ?? new ConnectionError('connection closed locally', 'closed'));
  }

  private onRead(n: number): void {
    if (this.mode === 'closed') return;
    this.rx.onRead(n);
    if (this.mode === 'login' && this.waiter) {
      const pdu = this.pullLoginPdu();
      if (pdu) {
        const w = this.waiter;
        this.waiter = undefined;
        clearTimeout(w.timer);
        w.resolve(pdu);
      }
    }
  }

  /** Login phase: the next decoded PDU, or undefined when more bytes are needed (or it failed). */
  private pullLoginPdu(): TargetPdu | undefined {
    if (this.loginQueue.length === 0) this.rx.pull();
    return this.loginQueue.shift();
  }

  private onPdu(pdu: TargetPdu): void {
    if (this.mode === 'closed') return;
    this.rxCount++;
    if (this.mode === 'login') this.loginQueue.push(pdu);
    else this.handler!(pdu);
  }

  private fail(err: Error): void {
    if (this.mode === 'closed') return;
    this.mode = 'closed';
    this.closeError = err;
    this.rx.close();
    this.socket.destroy();
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = undefined;
      clearTimeout(w.timer);
      w.reject(err);
    }
    const listeners = this.closeListeners;
    this.closeListeners = [];
    for (const l of listeners) l(err);
  }
}
