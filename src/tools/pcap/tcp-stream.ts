// TCP reassembly for offline analysis: turns the segments of a capture into the two byte streams
// of every connection, in order, each byte delivered once.
//
// What a capture throws at us, and the answer:
// - retransmissions, whole or overlapping: bytes before the next expected sequence number were
//   already delivered and are dropped;
// - out-of-order segments: held (up to a bound) until the hole before them fills;
// - data that never shows up (the capture dropped it, or started after it): reported as a gap of
//   N bytes, and delivery continues after it. A gap is declared when the peer acknowledges data
//   beyond the hole (it was received, we just did not see it), when the hold-back buffer
//   overflows, when the connection ends, or at the end of the capture;
// - a capture that starts mid-connection: the stream starts at the first segment seen;
// - 32-bit sequence wrap-around: every comparison is RFC 1982 serial arithmetic.

import { formatEndpoint, TcpFlag, type TcpSegment } from './packets.ts';

export interface PacketRef {
  /** 1-based packet number in the capture. */
  index: number;
  /** Capture time, seconds. */
  time: number;
}

export interface Endpoint {
  addr: string;
  port: number;
}

/** 0: bytes sent by endpoints[0]; 1: bytes sent by endpoints[1]. */
export type Side = 0 | 1;

export interface TcpConnection {
  /** Connections are numbered from 0 in order of first appearance, as tshark's tcp.stream. */
  readonly id: number;
  /**
   * endpoints[0] opened the connection (sent the SYN). When the capture starts after the
   * handshake it is the sender of the first segment seen.
   */
  readonly endpoints: readonly [Endpoint, Endpoint];
  /** Whether the stream each side sends was seen from its SYN (so it starts at byte 0). */
  readonly sawSyn: [boolean, boolean];
  readonly firstPacket: PacketRef;
  /** Payload bytes seen again after they had been delivered. */
  retransmittedBytes: number;
  /** Segments that arrived ahead of a hole and had to wait. */
  outOfOrderSegments: number;
}

export interface TcpStreamListener {
  /** Whether to reassemble this connection; the rest are only numbered. Default: all. */
  wants?(conn: TcpConnection): boolean;
  data(conn: TcpConnection, side: Side, bytes: Buffer, at: PacketRef): void;
  /** Bytes of the stream are missing from the capture; the next data follows them. */
  gap(conn: TcpConnection, side: Side, gap: GapInfo, at: PacketRef): void;
  /** Both directions finished (FIN), the connection was reset, or the tuple is being reused. */
  closed?(conn: TcpConnection, at: PacketRef): void;
}

export interface GapInfo {
  length: number;
  /** The packet whose data follows the gap, when it is known. */
  resumesAt?: PacketRef;
  /** Set when the bytes belonged to this packet, which the capture's snap length cut short. */
  cutShort?: PacketRef;
}

export interface ReassemblerOptions {
  /** Out-of-order bytes held per direction before giving up on the hole. Default 32 MiB. */
  maxBufferedBytes?: number;
}

// --- RFC 1982 serial arithmetic over 32 bits

/** b - a as a signed 32-bit distance. */
function seqDiff(a: number, b: number): number {
  return (b - a) | 0;
}
function seqLt(a: number, b: number): boolean {
  return seqDiff(a, b) > 0;
}
function seqLte(a: number, b: number): boolean {
  return seqDiff(a, b) >= 0;
}
function seqAdd(a: number, n: number): number {
  return (a + n) >>> 0;
}

interface Piece {
  seq: number;
  end: number;
  /** null: bytes known to have been sent but not captured (cut by the snap length). */
  data: Buffer | null;
  /** The packet the piece came in. */
  at: PacketRef;
}

interface Half {
  /** Sequence number of the next byte to deliver; undefined until the stream's start is known. */
  next: number | undefined;
  /** Initial sequence number, from this side's SYN. */
  isn: number | undefined;
  /** Highest acknowledgement the other side has sent: everything before it was received. */
  acked: number | undefined;
  /** Sequence number just past the last byte, from this side's FIN. */
  fin: number | undefined;
  finished: boolean;
  /** Out-of-order pieces ordered by distance from `next`. */
  pending: Piece[];
  pendingBytes: number;
}

interface ConnState {
  conn: TcpConnection;
  wanted: boolean;
  halves: [Half, Half];
  closedReported: boolean;
}

function newHalf(): Half {
  return { next: undefined, isn: undefined, acked: undefined, fin: undefined, finished: false, pending: [], pendingBytes: 0 };
}

export class TcpReassembler {
  private readonly connections = new Map<string, ConnState>();
  private nextId = 0;
  private readonly maxBuffered: number;
  private lastAt: PacketRef = { index: 0, time: 0 };

  constructor(
    private readonly listener: TcpStreamListener,
    options: ReassemblerOptions = {},
  ) {
    this.maxBuffered = options.maxBufferedBytes ?? 32 * 1024 * 1024;
  }

  push(seg: TcpSegment, at: PacketRef): void {
    this.lastAt = at;
    const src = formatEndpoint(seg.srcAddr, seg.srcPort);
    const dst = formatEndpoint(seg.dstAddr, seg.dstPort);
    const key = src < dst ? `${src} ${dst}` : `${dst} ${src}`;
    const syn = (seg.flags & TcpFlag.SYN) !== 0;
    const ack = (seg.flags & TcpFlag.ACK) !== 0;

    let state = this.connections.get(key);
    if (state && syn && !ack) {
      // A fresh SYN on a known tuple: a retransmitted SYN keeps its ISN; anything else is a
      // new connection reusing the ports.
      const opener = state.conn.endpoints[0];
      const sameOpener = opener.addr === seg.srcAddr && opener.port === seg.srcPort;
      if (!sameOpener || state.halves[0].isn !== seg.seq) {
        this.close(state, at);
        state = undefined;
      }
    }
    if (!state) {
      // The receiver of a SYN-ACK opened the connection; otherwise the sender of what we see first.
      const opensFromDst = syn && ack;
      const a = { addr: seg.srcAddr, port: seg.srcPort };
      const b = { addr: seg.dstAddr, port: seg.dstPort };
      const conn: TcpConnection = {
        id: this.nextId++,
        endpoints: opensFromDst ? [b, a] : [a, b],
        sawSyn: [false, false],
        firstPacket: at,
        retransmittedBytes: 0,
        outOfOrderSegments: 0,
      };
      state = { conn, wanted: true, halves: [newHalf(), newHalf()], closedReported: false };
      state.wanted = this.listener.wants ? this.listener.wants(conn) : true;
      this.connections.set(key, state);
    }
    // After a close, stragglers (the last ACK, a retransmitted FIN) have nothing left to add.
    if (!state.wanted || state.closedReported) return;

    const e0 = state.conn.endpoints[0];
    const side: Side = e0.addr === seg.srcAddr && e0.port === seg.srcPort ? 0 : 1;
    const half = state.halves[side];

    if (seg.flags & TcpFlag.RST) {
      // The connection is gone: whatever is still held back will never be completed.
      this.segmentData(state, side, half, seg, syn, at);
      this.close(state, at);
      return;
    }

    // An acknowledgement beyond a hole in the other direction proves the hole was received by
    // the peer and only missed by the capture: nothing will fill it.
    if (ack) {
      const other = state.halves[side === 0 ? 1 : 0];
      if (other.acked === undefined || seqLt(other.acked, seg.ack)) other.acked = seg.ack;
      if (other.next !== undefined && other.pending.length > 0 && seqLt(other.next, seg.ack))
        this.skipHolesBefore(state, side === 0 ? 1 : 0, seg.ack, at);
    }

    this.segmentData(state, side, half, seg, syn, at);

    if (state.halves[0].finished && state.halves[1].finished) this.close(state, at);
  }

  /** Delivers everything still held back (with gaps for the holes) and closes every connection. */
  finish(at: PacketRef = this.lastAt): void {
    for (const state of this.connections.values()) this.close(state, at);
  }

  private segmentData(state: ConnState, side: Side, half: Half, seg: TcpSegment, syn: boolean, at: PacketRef): void {
    if (syn) {
      if (half.isn === undefined && half.next === undefined) {
        half.isn = seg.seq;
        half.next = seqAdd(seg.seq, 1);
        state.conn.sawSyn[side] = true;
      }
    }
    const start = syn ? seqAdd(seg.seq, 1) : seg.seq;
    const fin = (seg.flags & TcpFlag.FIN) !== 0;
    if (half.next === undefined) {
      // Mid-connection start. Pure ACKs do not start the stream: a keep-alive probe carries a
      // sequence number one below the real one.
      if (seg.payloadLength === 0 && !fin) return;
      half.next = start;
    }
    if (seg.payloadLength > 0) {
      const captured = seg.payload.length;
      if (captured > 0) this.addPiece(state, side, { seq: start, end: seqAdd(start, captured), data: seg.payload, at }, at);
      if (seg.payloadLength > captured)
        this.addPiece(state, side, { seq: seqAdd(start, captured), end: seqAdd(start, seg.payloadLength), data: null, at }, at);
    }
    if (fin && half.fin === undefined) half.fin = seqAdd(start, seg.payloadLength);
    this.checkFinished(half);
  }

  private checkFinished(half: Half): void {
    if (half.fin !== undefined && half.next !== undefined && seqLte(half.fin, half.next) && half.pending.length === 0)
      half.finished = true;
  }

  private addPiece(state: ConnState, side: Side, piece: Piece, at: PacketRef): void {
    const half = state.halves[side];
    const next = half.next!;
    if (seqLte(piece.end, next)) {
      state.conn.retransmittedBytes += seqDiff(piece.seq, piece.end);
      return;
    }
    if (seqLte(piece.seq, next)) {
      this.deliver(state, side, piece, at);
      this.drain(state, side, at);
      return;
    }
    // Ahead of a hole: hold it, ordered by distance from the next expected byte.
    const distance = (piece.seq - next) >>> 0;
    const list = half.pending;
    let lo = 0;
    let hi = list.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (((list[mid]!.seq - next) >>> 0) <= distance) lo = mid + 1;
      else hi = mid;
    }
    const before = list[lo - 1];
    if (before && before.seq === piece.seq && seqLte(piece.end, before.end)) {
      // The same out-of-order segment again.
      state.conn.retransmittedBytes += seqDiff(piece.seq, piece.end);
      return;
    }
    list.splice(lo, 0, piece);
    half.pendingBytes += seqDiff(piece.seq, piece.end);
    state.conn.outOfOrderSegments++;
    // Data past a hole the receiver has already acknowledged: the hole will never fill.
    if (half.acked !== undefined && seqLte(piece.seq, half.acked)) this.skipHolesBefore(state, side, half.acked, at);
    while (half.pendingBytes > this.maxBuffered && half.pending.length > 0) this.skipFirstHole(state, side, at);
  }

  /** Delivers the part of `piece` at and after `next`. */
  private deliver(state: ConnState, side: Side, piece: Piece, at: PacketRef): void {
    const half = state.halves[side];
    const skip = seqDiff(piece.seq, half.next!);
    const length = seqDiff(half.next!, piece.end);
    if (skip > 0) state.conn.retransmittedBytes += skip;
    half.next = piece.end;
    if (piece.data) this.listener.data(state.conn, side, skip > 0 ? piece.data.subarray(skip) : piece.data, at);
    else this.listener.gap(state.conn, side, { length, cutShort: piece.at }, at);
  }

  /** Delivers held pieces that the hole-filling just made contiguous. */
  private drain(state: ConnState, side: Side, at: PacketRef): void {
    const half = state.halves[side];
    const list = half.pending;
    let taken = 0;
    while (taken < list.length && seqLte(list[taken]!.seq, half.next!)) {
      const piece = list[taken++]!;
      half.pendingBytes -= seqDiff(piece.seq, piece.end);
      if (seqLte(piece.end, half.next!)) state.conn.retransmittedBytes += seqDiff(piece.seq, piece.end);
      else this.deliver(state, side, piece, at);
    }
    if (taken > 0) list.splice(0, taken);
    this.checkFinished(half);
  }

  /** Declares the first hole lost: reports it as a gap and delivers what follows it. */
  private skipFirstHole(state: ConnState, side: Side, at: PacketRef): void {
    const half = state.halves[side];
    const first = half.pending[0];
    if (!first) return;
    const length = seqDiff(half.next!, first.seq);
    if (length > 0) {
      this.listener.gap(state.conn, side, { length, resumesAt: first.at }, at);
      half.next = first.seq;
    }
    this.drain(state, side, at);
  }

  private skipHolesBefore(state: ConnState, side: Side, acked: number, at: PacketRef): void {
    const half = state.halves[side];
    while (half.pending.length > 0 && seqLt(half.next!, acked) && seqLte(half.pending[0]!.seq, acked))
      this.skipFirstHole(state, side, at);
  }

  private close(state: ConnState, at: PacketRef): void {
    if (state.closedReported) return;
    state.closedReported = true;
    if (state.wanted) {
      for (const side of [0, 1] as const) {
        const half = state.halves[side];
        while (half.pending.length > 0) this.skipFirstHole(state, side, at);
      }
      this.listener.closed?.(state.conn, at);
    }
  }
}
