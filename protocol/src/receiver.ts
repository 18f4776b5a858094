import { crc32cOf, DIGEST_LENGTH } from './digest.ts';
import { WireError } from './errors.ts';
import { DEFAULT_HARD_CAP, DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH, type Frame } from './framer.ts';
import { BHS_LENGTH, MAX_AHS_LENGTH, MAX_DATA_SEGMENT_LENGTH, pad4, readDataSegmentLength, readTotalAhsLength } from './pdu.ts';

/**
 * Where the data segment of an incoming PDU goes, decided from its header before the payload is
 * read: a view of exactly `length` bytes (e.g. the right place in a command's buffer), or
 * undefined for a buffer of its own.
 */
export type PayloadSink = (header: Buffer, length: number) => Buffer | undefined;

export interface ReceiverOptions {
  /** Size of the reused read buffer. */
  bufferSize?: number;
  /** The MaxRecvDataSegmentLength in force; 8192 during login (RFC 7143 13.12). */
  maxRecvDataSegmentLength?: number;
  /** A ceiling no negotiation can raise: bounds what one connection can make us allocate. */
  hardCap?: number;
}

/** A payload at least this long, still to come, is read by the kernel straight into place. */
const DIRECT_READ_MIN = 16 * 1024;
const MAX_HEADER_LENGTH = BHS_LENGTH + MAX_AHS_LENGTH + DIGEST_LENGTH;
const EMPTY = Buffer.alloc(0);

/**
 * The receive side of an iSCSI connection for a socket that reads into caller-supplied memory
 * (Node's `onread`): a push-style alternative to PduFramer that never makes the runtime allocate
 * a buffer per TCP read, and copies each payload at most once, into the place a PayloadSink picks
 * for it. When much of a payload is still to come, the next read targets that place directly, so
 * a large Data-In or Data-Out lands where it belongs without any copy in user space.
 *
 * Nothing delivered refers to the read buffer: headers (48 bytes) are copied out, payloads are
 * either the sink's buffer or one of their own. A frame may therefore be kept by its receiver.
 *
 * Two modes. Held (the login phase): bytes are kept unparsed and `pull()` hands out one PDU at a
 * time, so the owner can change digests and limits between the last Login Response and the first
 * full-feature PDU even when both came in one segment. Streaming: every PDU is delivered as soon
 * as it is complete.
 *
 * Errors: a header digest error or a data segment over the limit leaves no trustworthy PDU
 * boundary, so it is fatal and nothing more is parsed. A data digest error is not: the boundary
 * is sound, the PDU is dropped and reported with its header (RFC 7143 7.8), and parsing goes on.
 */
export class PduReceiver {
  readonly buffer: Buffer;
  headerDigest = false;
  dataDigest = false;
  maxRecvDataSegmentLength: number;
  readonly hardCap: number;
  sink: PayloadSink | undefined;
  onFrame: (frame: Frame) => void = () => {};
  onError: (err: WireError, fatal: boolean) => void = () => {};

  private held = true;
  /** Bytes received while held and not parsed yet (owned copies). */
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
  private reading: Buffer;
  private failed = false;
  /** PDUs finished (delivered or dropped for a data digest): how pull() knows it took one. */
  private delivered = 0;

  constructor(opts: ReceiverOptions = {}) {
    this.buffer = Buffer.allocUnsafe(opts.bufferSize ?? 256 * 1024);
    this.reading = this.buffer;
    this.maxRecvDataSegmentLength = opts.maxRecvDataSegmentLength ?? DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH;
    this.hardCap = Math.min(opts.hardCap ?? DEFAULT_HARD_CAP, MAX_DATA_SEGMENT_LENGTH);
  }

  get isFailed(): boolean {
    return this.failed;
  }

  /** In held mode (login): PDUs come out one at a time through pull(). */
  get isHeld(): boolean {
    return this.held;
  }

  /** Bytes kept while held, for tests and limits. */
  get heldBytes(): number {
    return this.backlog.length;
  }

  /**
   * Where the socket reads next. Node asks once per read, right after delivering the previous
   * one, so a plan made in between only takes effect from the read after.
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
    this.accept(this.buffer, n);
  }

  /** Bytes that arrived some other way (a plain 'data' event, a test). Not retained. */
  push(chunk: Buffer): void {
    if (this.failed || chunk.length === 0) return;
    // A direct read may have been planned, but these bytes came another way: place them as usual.
    this.direct = undefined;
    this.accept(chunk, chunk.length);
  }

  private accept(src: Buffer, n: number): void {
    if (this.held) {
      // Rare (login): keep an owned copy and let pull() take PDUs from it.
      const copy = Buffer.allocUnsafe(this.backlog.length + n);
      this.backlog.copy(copy, 0);
      src.copy(copy, this.backlog.length, 0, n);
      this.backlog = copy;
      return;
    }
    this.consume(src, 0, n, false);
    this.planDirectRead();
  }

  /** Held mode: delivers the next whole PDU kept, if there is one. Returns whether it did. */
  pull(): boolean {
    if (this.failed || this.backlog.length === 0) return false;
    const before = this.delivered;
    const used = this.consume(this.backlog, 0, this.backlog.length, true);
    this.backlog = used === this.backlog.length ? EMPTY : this.backlog.subarray(used);
    return this.delivered !== before;
  }

  /** Leaves held mode: what is kept is parsed now, with the settings now in force. */
  startStreaming(): void {
    this.held = false;
    const rest = this.backlog;
    this.backlog = EMPTY;
    if (rest.length > 0) this.consume(rest, 0, rest.length, false);
    this.planDirectRead();
  }

  /** Stops parsing for good (the connection is closing). */
  close(): void {
    this.failed = true;
    this.header = undefined;
    this.payload = EMPTY;
    this.direct = undefined;
    this.backlog = EMPTY;
  }

  /**
   * Parses src[pos, end). Anything that must outlive the call is copied, because src is the
   * reused read buffer. Returns where it stopped (before end only when `one` is set).
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
          // The length is judged on the BHS alone, before waiting for an AHS that noise may
          // claim: a stream that is not iSCSI is refused at its first 48 bytes.
          if (!this.lengthAllowed()) return end;
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
      this.fatal(new WireError('header-digest', 'header digest mismatch', Buffer.from(h.subarray(0, BHS_LENGTH))));
      return false;
    }
    const dsl = readDataSegmentLength(h);
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
    const dest = this.held ? undefined : this.sink?.(header, dsl);
    this.payload = dest !== undefined && dest.length === dsl ? dest : Buffer.allocUnsafe(dsl);
    this.tailNeed = pad4(dsl) - dsl + (this.dataDigest ? DIGEST_LENGTH : 0);
    return true;
  }

  private finishPdu(): void {
    const header = this.header!;
    const data = this.payload;
    this.header = undefined;
    this.payload = EMPTY;
    this.delivered++;
    if (this.dataDigest && data.length > 0) {
      const padLength = this.tailNeed - DIGEST_LENGTH;
      if (crc32cOf([data, this.tail.subarray(0, padLength)]) !== this.tail.readUInt32LE(padLength)) {
        this.onError(new WireError('data-digest', 'data digest mismatch', header.subarray(0, BHS_LENGTH)), false);
        return;
      }
    }
    this.onFrame({ header, data });
  }

  private lengthAllowed(): boolean {
    const dsl = readDataSegmentLength(this.headerBytes);
    const limit = Math.min(this.maxRecvDataSegmentLength, this.hardCap);
    if (dsl <= limit) return true;
    this.fatal(new WireError('data-segment-too-large', `DataSegmentLength ${dsl} exceeds the ${limit} bytes declared`, Buffer.from(this.headerBytes.subarray(0, BHS_LENGTH))));
    return false;
  }

  /** When much of the current payload is still to come, the kernel copies it into place. */
  private planDirectRead(): void {
    this.direct = undefined;
    if (this.failed || this.header === undefined || this.held) return;
    const left = this.payload.length - this.payloadGot;
    if (left >= DIRECT_READ_MIN) this.direct = this.payload.subarray(this.payloadGot);
  }

  private fatal(err: WireError): void {
    this.close();
    this.onError(err, true);
  }
}
