import { crc32cOf, DIGEST_LENGTH } from './digest.ts';
import { WireError } from './errors.ts';
import { BHS_LENGTH, MAX_DATA_SEGMENT_LENGTH, pad4, readDataSegmentLength, readTotalAhsLength } from './pdu.ts';

export interface FramerOptions {
  headerDigest?: boolean;
  dataDigest?: boolean;
  /**
   * The MaxRecvDataSegmentLength this side declared. RFC 7143 13.12: the default is 8192, which
   * is also what applies to every Login PDU.
   */
  maxRecvDataSegmentLength?: number;
  /** A ceiling no negotiation can raise: bounds the memory one connection can make us hold. */
  hardCap?: number;
}

/** One whole PDU as it came off the wire, digests verified and stripped. */
export interface Frame {
  /** BHS followed by the AHS. */
  header: Buffer;
  /** The data segment without padding. */
  data: Buffer;
}

export type FramerOutput =
  | { frame: Frame; error?: undefined }
  /**
   * `fatal` errors (header digest, oversize segment) leave the stream without a trustworthy
   * boundary: the connection has to go. A data digest error is not fatal: the PDU boundary is
   * sound, so the receiver answers with a Reject and carries on (RFC 7143 7.8).
   */
  | { frame?: undefined; error: WireError; fatal: boolean };

export const DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH = 8192;
export const DEFAULT_HARD_CAP = MAX_DATA_SEGMENT_LENGTH;

/**
 * Streaming PDU framer: accepts TCP chunks of any size and hands out whole PDUs. Pull-based, so
 * the owner can switch digests on between two PDUs (the first PDU after the login's final
 * response) even when both arrived in the same chunk.
 *
 * Payloads that sit inside one received chunk are returned as views of it (no copy); a PDU that
 * spans chunks is gathered once. Memory held is what was pushed and not yet pulled; the owner
 * stops reading the socket while it has frames to pull, so that is at most one PDU plus one chunk.
 */
export class PduFramer {
  private chunks: Buffer[] = [];
  private head = 0; // consumed bytes of chunks[0]
  private buffered = 0;
  private failed: WireError | undefined;
  headerDigest: boolean;
  dataDigest: boolean;
  maxRecvDataSegmentLength: number;
  readonly hardCap: number;

  constructor(opts: FramerOptions = {}) {
    this.headerDigest = opts.headerDigest ?? false;
    this.dataDigest = opts.dataDigest ?? false;
    this.hardCap = Math.min(opts.hardCap ?? DEFAULT_HARD_CAP, MAX_DATA_SEGMENT_LENGTH);
    this.maxRecvDataSegmentLength = opts.maxRecvDataSegmentLength ?? DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH;
  }

  /** Bytes received and not yet returned as frames. */
  get bufferedBytes(): number {
    return this.buffered;
  }

  get isFailed(): boolean {
    return this.failed !== undefined;
  }

  push(chunk: Buffer): void {
    if (this.failed || chunk.length === 0) return; // after a fatal error nothing more is kept
    this.chunks.push(chunk);
    this.buffered += chunk.length;
  }

  /** The next complete PDU or error, or undefined when more input is needed. */
  next(): FramerOutput | undefined {
    if (this.failed) return undefined;
    if (this.buffered < BHS_LENGTH) return undefined;
    const bhs = this.peek(BHS_LENGTH);
    const dsl = readDataSegmentLength(bhs);
    const ahsLen = readTotalAhsLength(bhs);
    const limit = Math.min(this.maxRecvDataSegmentLength, this.hardCap);
    if (dsl > limit) {
      return this.fail(new WireError('data-segment-too-large', `DataSegmentLength ${dsl} exceeds the ${limit} bytes declared`, Buffer.from(bhs)));
    }
    const hd = this.headerDigest ? DIGEST_LENGTH : 0;
    const dd = this.dataDigest && dsl > 0 ? DIGEST_LENGTH : 0;
    const headerLen = BHS_LENGTH + ahsLen;
    const total = headerLen + hd + pad4(dsl) + dd;
    if (this.buffered < total) return undefined;

    // The whole PDU is here: take it. Header first so its digest can be checked before anything
    // else of the PDU is believed.
    const header = this.take(headerLen);
    if (hd) {
      const got = this.take(DIGEST_LENGTH).readUInt32LE(0);
      if (got !== crc32cOf([header])) {
        return this.fail(new WireError('header-digest', 'header digest mismatch', Buffer.from(header.subarray(0, BHS_LENGTH))));
      }
    }
    if (dsl === 0) return { frame: { header, data: EMPTY } };
    const padded = this.take(pad4(dsl));
    const data = padded.subarray(0, dsl);
    if (dd) {
      const got = this.take(DIGEST_LENGTH).readUInt32LE(0);
      if (got !== crc32cOf([padded])) {
        return { error: new WireError('data-digest', 'data digest mismatch', Buffer.from(header.subarray(0, BHS_LENGTH))), fatal: false };
      }
    }
    return { frame: { header, data } };
  }

  private fail(err: WireError): FramerOutput {
    this.failed = err;
    this.chunks = [];
    this.head = 0;
    this.buffered = 0;
    return { error: err, fatal: true };
  }

  /** n bytes from the front without consuming them; a view when they sit in one chunk. */
  private peek(n: number): Buffer {
    const first = this.chunks[0]!;
    if (first.length - this.head >= n) return first.subarray(this.head, this.head + n);
    return this.gather(n, false);
  }

  private take(n: number): Buffer {
    const first = this.chunks[0]!;
    const avail = first.length - this.head;
    if (avail >= n) {
      const out = first.subarray(this.head, this.head + n);
      this.head += n;
      this.buffered -= n;
      if (this.head === first.length) {
        this.chunks.shift();
        this.head = 0;
      }
      return out;
    }
    return this.gather(n, true);
  }

  private gather(n: number, consume: boolean): Buffer {
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    let i = 0;
    let off = this.head;
    while (filled < n) {
      const c = this.chunks[i]!;
      const k = Math.min(c.length - off, n - filled);
      c.copy(out, filled, off, off + k);
      filled += k;
      off += k;
      if (off === c.length) {
        i++;
        off = 0;
      }
    }
    if (consume) {
      this.chunks.splice(0, i);
      this.head = off;
      this.buffered -= n;
    }
    return out;
  }
}

const EMPTY = Buffer.alloc(0);
