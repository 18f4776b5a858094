// `detour pcap-dump FILE [--port N]`: one JSON line per iSCSI PDU found in a pcap/pcapng capture.
//
// Output, one object per line, in the order the PDUs completed on the wire (the packet that
// carried a PDU's last byte; both directions interleave as captured):
//   frame       packet number (1-based, as tshark's frame.number) holding the PDU's last byte
//   time        capture time of that packet, seconds since the epoch
//   conn        TCP connection number, from 0 in order of first appearance, counting every TCP
//               connection in the file (so it matches tshark's tcp.stream)
//   src, dst    "addr:port" of the sender and the receiver
//   dir         "i2t" (initiator to target) or "t2i"; the target is the side using --port
//   opcode, name, immediate, flags (BHS byte 1), itt, ahsLength (bytes), dataSegmentLength
// and where the PDU type has them: lun, ttt, cmdsn, expstatsn, statsn, expcmdsn, maxcmdsn,
// datasn, r2tsn, bufferOffset, cdb0 (first CDB byte), cdb (hex), edtl (expected data transfer
// length), status, response, residualCount, plus login details (transit, csg, nsg, isid, tsih,
// cid, statusClass, statusDetail).
//   R2T: the R2TSN is printed both as `r2tsn` and as `datasn`, since it occupies the DataSN field
//   of the BHS (tshark labels that field DataSN/R2TSN).
//   Data-In: `status` only when the S bit is set.
//   Login and Text PDUs: `keys`, an object of key -> value; a key that appears more than once
//   (TargetName/TargetAddress in a SendTargets answer) maps to an array of its values in order.
//   When a PDU has the C (continue) bit set its keys go on with the next PDU: the keys of the
//   whole sequence are printed on its final PDU, and the earlier ones get `"keysContinued": true`.
//   `missingBytes`: the data segment was partly missing from the capture (keys then omitted).
//   `error`: the BHS could be framed but not decoded (for example an unknown AHS type).
// Numbers are plain JSON numbers (tags and sequence numbers are unsigned 32-bit).
//
// Diagnostics go to stderr, one line each: gaps in the capture, resynchronisation (connection,
// direction, bytes skipped), streams that end inside a PDU, skipped IP fragments.

import { readFile } from 'node:fs/promises';
import {
  BHS_LENGTH,
  crc32cOf,
  decodePdu,
  decodeTextData,
  opcodeName,
  pduWireLength,
  type Pdu,
  type TextPair,
} from 'iscsi-node-wire';
import { UsageError, type Command } from '../control/cli.ts';
import { CaptureFormatError, networkLayer, openCapture } from './pcap/pcap-file.ts';
import { decodeIpPacket, formatEndpoint } from './pcap/packets.ts';
import { TcpReassembler, type GapInfo, type PacketRef, type Side, type TcpConnection } from './pcap/tcp-stream.ts';

export const DEFAULT_ISCSI_PORT = 3260;

export interface DumpOptions {
  /** TCP port of the target. */
  port: number;
  /** Receives output text: whole JSON lines, each ending in "\n". */
  write(text: string): void;
  /** Receives one diagnostic line (no newline). */
  warn(message: string): void;
  /**
   * Receives every PDU with its header (BHS + AHS) and whole data segment, in the order of the
   * output lines. Used by the capture replay; costs a copy of every payload.
   */
  pdu?(raw: RawPdu): void;
}

export interface RawPdu {
  conn: number;
  dir: 'i2t' | 't2i';
  header: Buffer;
  data: Buffer;
  /** Bytes of the PDU the capture did not have (then `data` has zeros there). */
  missingBytes: number;
}

export interface DumpSummary {
  packets: number;
  pdus: number;
  connections: number;
}

const USAGE = 'usage: detour pcap-dump FILE [--port N]   (FILE may be gzipped; "-" reads standard input)';

export const pcapDumpCommand: Command = async (argv) => {
  if (argv.includes('--help') || argv.includes('-h')) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const { file, port } = parseArgs(argv);
  let contents: Buffer;
  try {
    contents = file === '-' ? await readStdin() : await readFile(file);
  } catch (err) {
    process.stderr.write(`detour pcap-dump: cannot read ${file}: ${(err as Error).message}\n`);
    return 1;
  }
  // Output piped into `head` must not turn into an EPIPE crash.
  const onStdoutError = () => {};
  process.stdout.on('error', onStdoutError);
  const out = new OutputBuffer((s) => process.stdout.write(s));
  try {
    dumpCapture(contents, {
      port,
      write: (s) => out.add(s),
      warn: (m) => {
        out.flush();
        process.stderr.write(`${m}\n`);
      },
    });
    out.flush();
    return 0;
  } catch (err) {
    out.flush();
    const why = err instanceof CaptureFormatError ? err.message : `internal error: ${(err as Error).message}`;
    process.stderr.write(`detour pcap-dump: ${file}: ${why}\n`);
    return 1;
  }
};

async function readStdin(): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const chunk of process.stdin) parts.push(chunk as Buffer);
  return Buffer.concat(parts);
}

function parseArgs(argv: string[]): { file: string; port: number } {
  let file: string | undefined;
  let port = DEFAULT_ISCSI_PORT;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    let portText: string | undefined;
    if (arg === '--port') {
      portText = argv[++i];
      if (portText === undefined) throw new UsageError('--port needs a value');
    } else if (arg.startsWith('--port=')) {
      portText = arg.slice('--port='.length);
    } else if (arg.startsWith('-') && arg !== '-') {
      throw new UsageError(`unknown option ${arg}; ${USAGE}`);
    } else if (file === undefined) {
      file = arg;
      continue;
    } else {
      throw new UsageError(`unexpected argument ${arg}; ${USAGE}`);
    }
    if (!/^\d+$/.test(portText) || Number(portText) < 1 || Number(portText) > 65535)
      throw new UsageError(`--port must be a TCP port number (1-65535), not '${portText}'`);
    port = Number(portText);
  }
  if (file === undefined) throw new UsageError(`missing FILE; ${USAGE}`);
  return { file, port };
}

/** Batches small writes: one write per JSON line would dominate the run time on big captures. */
class OutputBuffer {
  private parts: string[] = [];
  private size = 0;
  constructor(private readonly sink: (s: string) => void) {}
  add(s: string): void {
    this.parts.push(s);
    this.size += s.length;
    if (this.size >= 1 << 16) this.flush();
  }
  flush(): void {
    if (this.parts.length === 0) return;
    this.sink(this.parts.join(''));
    this.parts = [];
    this.size = 0;
  }
}

/**
 * Dumps every iSCSI PDU of a capture (a pcap or pcapng file, possibly gzipped, as bytes).
 * Throws CaptureFormatError when the file is not a capture or is damaged; output produced before
 * the damage has been written by then.
 */
export function dumpCapture(file: Buffer, options: DumpOptions): DumpSummary {
  const capture = openCapture(file);
  const dumper = new IscsiDumper(options);
  const reassembler = new TcpReassembler({
    wants: (conn) => dumper.wants(conn),
    data: (conn, side, bytes, at) => dumper.data(conn, side, bytes, at),
    gap: (conn, side, gap, at) => dumper.gap(conn, side, gap, at),
    closed: (conn) => dumper.closed(conn),
  });
  let packets = 0;
  let lastAt: PacketRef = { index: 0, time: 0 };
  try {
    for (const packet of capture.packets()) {
      packets++;
      const at: PacketRef = { index: packet.index, time: packet.time };
      lastAt = at;
      const net = networkLayer(packet.linkType, packet.data);
      if (net.kind === 'other') continue;
      const ip = decodeIpPacket(net.kind, net.payload);
      if (ip.kind === 'warning') options.warn(`packet ${packet.index}: ${ip.message}`);
      if (ip.kind !== 'tcp') continue;
      reassembler.push(ip.segment, at);
      dumper.release(false);
    }
  } finally {
    // Even when the file turns out to be damaged, what was captured before is worth printing.
    reassembler.finish(lastAt);
    dumper.release(true);
  }
  return { packets, pdus: dumper.pduCount, connections: dumper.connectionCount };
}

// ---------------------------------------------------------------------------------------------
// Byte queue: the reassembled stream of one direction, waiting to be cut into PDUs. Missing
// stretches (gaps in the capture) are kept as chunks without bytes, so framing knows exactly
// which bytes are unknown.

interface Chunk {
  buf: Buffer | null;
  length: number;
  at: PacketRef;
}

interface Taken {
  /** The bytes; null if some were missing, or if they were not asked for. */
  data: Buffer | null;
  missing: number;
  last: PacketRef | undefined;
}

class ByteQueue {
  private chunks: Chunk[] = [];
  private head = 0;
  private offset = 0;
  length = 0;

  push(buf: Buffer | null, length: number, at: PacketRef): void {
    if (length === 0) return;
    this.chunks.push({ buf, length, at });
    this.length += length;
  }

  /** Packet of the first queued byte. */
  frontAt(): PacketRef | undefined {
    return this.chunks[this.head]?.at;
  }

  /** Length of the run of missing bytes at the front (0 if the front byte is known). */
  leadingMissing(): number {
    let n = 0;
    for (let i = this.head; i < this.chunks.length && this.chunks[i]!.buf === null; i++)
      n += this.chunks[i]!.length - (i === this.head ? this.offset : 0);
    return n;
  }

  /**
   * Bytes [from, from + n) as one buffer (a view when they sit in one chunk). null when some of
   * them are missing; undefined when they have not all arrived yet.
   */
  peek(from: number, n: number): Buffer | null | undefined {
    if (from + n > this.length) return undefined;
    let i = this.head;
    let pos = from + this.offset;
    while (pos >= this.chunks[i]!.length) {
      pos -= this.chunks[i]!.length;
      i++;
    }
    const first = this.chunks[i]!;
    if (first.buf === null) return null;
    if (pos + n <= first.length) return first.buf.subarray(pos, pos + n);
    const parts: Buffer[] = [first.buf.subarray(pos)];
    let need = n - (first.length - pos);
    while (need > 0) {
      const c = this.chunks[++i]!;
      if (c.buf === null) return null;
      parts.push(c.length <= need ? c.buf : c.buf.subarray(0, need));
      need -= Math.min(need, c.length);
    }
    return Buffer.concat(parts, n);
  }

  /** Known byte at `from`; null if missing, undefined if not arrived. */
  byteAt(from: number): number | null | undefined {
    const b = this.peek(from, 1);
    return b ? b[0]! : b;
  }

  /** Index in the front chunk's buffer of the next byte satisfying `test`, scanning at most that chunk. */
  scanFront(test: (byte: number) => boolean): number {
    const c = this.chunks[this.head];
    if (!c || c.buf === null) return 0;
    for (let i = this.offset; i < c.length; i++) if (test(c.buf[i]!)) return i - this.offset;
    return c.length - this.offset;
  }

  take(n: number, want: boolean): Taken {
    let missing = 0;
    let last: PacketRef | undefined;
    const parts: Buffer[] = [];
    let left = n;
    while (left > 0) {
      const c = this.chunks[this.head]!;
      const k = Math.min(c.length - this.offset, left);
      if (c.buf === null) missing += k;
      else if (want) parts.push(c.buf.subarray(this.offset, this.offset + k));
      last = c.at;
      left -= k;
      this.offset += k;
      if (this.offset === c.length) {
        this.head++;
        this.offset = 0;
      }
    }
    this.length -= n;
    if (this.head > 256 && this.head * 2 > this.chunks.length) {
      this.chunks = this.chunks.slice(this.head);
      this.head = 0;
    }
    let data: Buffer | null = null;
    if (want && missing === 0) data = parts.length === 1 ? parts[0]! : Buffer.concat(parts, n);
    return { data, missing, last };
  }
}

// ---------------------------------------------------------------------------------------------
// Plausibility of a BHS, for finding PDU boundaries again after lost data.

const I2T_OPCODES = new Set([0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10]);
const T2I_OPCODES = new Set([0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x31, 0x32, 0x3f]);
/** PDU types that never carry a data segment. */
const NO_DATA_OPCODES = new Set([0x02, 0x06, 0x10, 0x22, 0x26, 0x31]);
/** PDU types whose bytes 2 and 3 are reserved (zero). */
const RESERVED_2_3 = new Set([0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x10, 0x20, 0x24, 0x31, 0x32]);
/** An extended CDB AHS for the largest CDB (260 bytes) plus a bidirectional-length AHS. */
const MAX_AHS_WORDS = 70;

/** Byte 0 alone: the opcode is defined for this direction and the reserved bit is clear. */
function plausibleByte0(b0: number, i2t: boolean): boolean {
  if (b0 & 0x80) return false;
  if (i2t) return I2T_OPCODES.has(b0 & 0x3f);
  return (b0 & 0x40) === 0 && T2I_OPCODES.has(b0 & 0x3f);
}

/**
 * The reserved-field and flag checks a compliant sender always passes; random bytes rarely do.
 * Used only while hunting for a boundary: once in step, framing trusts the lengths.
 */
function plausibleBhs(h: Buffer, i2t: boolean): boolean {
  const b0 = h[0]!;
  if (!plausibleByte0(b0, i2t)) return false;
  const op = b0 & 0x3f;
  const f = h[1]!;
  const ahsWords = h[4]!;
  const dsl = (h[5]! << 16) | (h[6]! << 8) | h[7]!;
  if (op === 0x01 ? ahsWords > MAX_AHS_WORDS : ahsWords !== 0) return false;
  if (NO_DATA_OPCODES.has(op) && dsl !== 0) return false;
  if (RESERVED_2_3.has(op) && (h[2] !== 0 || h[3] !== 0)) return false;
  switch (op) {
    case 0x00:
    case 0x20:
    case 0x22:
    case 0x26:
    case 0x31:
    case 0x32:
    case 0x3f:
      if (f !== 0x80) return false;
      if ((op === 0x22 || op === 0x26 || op === 0x3f) && h[3] !== 0) return false;
      return true;
    case 0x01:
      return (f & 0x18) === 0 && (f & 0x07) <= 4;
    case 0x02:
      return (f & 0x80) !== 0 && (f & 0x7f) >= 1 && (f & 0x7f) <= 14;
    case 0x03:
    case 0x23:
      return (f & 0x30) === 0 && ((f >> 2) & 3) !== 2 && (f & 3) !== 2 && h[2] === 0 && h[3] === 0;
    case 0x04:
    case 0x24:
      return (f & 0x3f) === 0;
    case 0x05:
      return (f & 0x7f) === 0;
    case 0x06:
      return (f & 0x80) !== 0 && (f & 0x7f) <= 2;
    case 0x10:
      return (f & 0xf0) === 0x80 && (f & 0x0f) <= 3;
    case 0x21:
      return (f & 0xe1) === 0x80 && h[2]! <= 1;
    case 0x25:
      return (f & 0x38) === 0 && h[2] === 0 && ((f & 0x01) !== 0 || h[3] === 0);
    default:
      return false;
  }
}

// ---------------------------------------------------------------------------------------------
// Per-connection iSCSI state

interface Digests {
  header: boolean;
  data: boolean;
}
const NO_DIGESTS: Digests = { header: false, data: false };
/** Tried in this order when the login was not captured and the digests must be guessed. */
const DIGEST_GUESSES: Digests[] = [
  { header: false, data: false },
  { header: true, data: false },
  { header: true, data: true },
  { header: false, data: true },
];

interface Direction {
  side: Side;
  name: 'i2t' | 't2i';
  i2t: boolean;
  src: string;
  dst: string;
  queue: ByteQueue;
  /** Hunting for a PDU boundary rather than framing PDUs back to back. */
  resyncing: boolean;
  resyncReason: string;
  skipped: number;
  missingSkipped: number;
  /** Data segments of a login or text sequence whose last PDU (C=0) has not arrived. */
  textParts: Buffer[];
  textIncomplete: boolean;
}

interface IscsiConnection {
  tcp: TcpConnection;
  dirs: [Direction, Direction];
  /**
   * 'login' until the final Login Response (no digests yet), then 'full-feature'. 'unknown'
   * when the capture missed the start of the connection.
   */
  phase: 'login' | 'full-feature' | 'unknown';
  /** Digests of full-feature PDUs. */
  digests: Digests;
  /** Whether `digests` comes from the captured login or an unambiguous guess. */
  digestsKnown: boolean;
  negotiatedHeaderDigest: string | undefined;
  negotiatedDataDigest: string | undefined;
}

interface OutputRecord {
  index: number;
  order: number;
  line: string;
  raw?: RawPdu;
}

type Verdict = 'valid' | 'invalid' | 'wait' | 'unverifiable';

class IscsiDumper {
  private readonly conns = new Map<number, IscsiConnection>();
  /** Directions hunting for a PDU boundary: PDUs they find may predate ones already framed. */
  private readonly resyncing = new Set<Direction>();
  private readonly output: OutputRecord[] = [];
  private outputSorted = true;
  private order = 0;
  pduCount = 0;
  connectionCount = 0;
  /** Reused as the data segment of PDUs whose payload is not needed: decodePdu wants the length. */
  private filler = Buffer.alloc(0);

  constructor(private readonly options: DumpOptions) {}

  wants(conn: TcpConnection): boolean {
    const [a, b] = conn.endpoints;
    return a.port === this.options.port || b.port === this.options.port;
  }

  private connection(tcp: TcpConnection): IscsiConnection {
    let ic = this.conns.get(tcp.id);
    if (ic) return ic;
    // When both ends use the port, the side that was connected to is the target.
    const targetSide: Side = tcp.endpoints[1].port === this.options.port ? 1 : 0;
    const dir = (side: Side): Direction => {
      const i2t = side !== targetSide;
      const from = tcp.endpoints[side];
      const to = tcp.endpoints[side === 0 ? 1 : 0];
      return {
        side,
        name: i2t ? 'i2t' : 't2i',
        i2t,
        src: formatEndpoint(from.addr, from.port),
        dst: formatEndpoint(to.addr, to.port),
        queue: new ByteQueue(),
        resyncing: false,
        resyncReason: '',
        skipped: 0,
        missingSkipped: 0,
        textParts: [],
        textIncomplete: false,
      };
    };
    // With either half of the handshake in the capture, both streams start with the login.
    const midStream = !tcp.sawSyn[0] && !tcp.sawSyn[1];
    ic = {
      tcp,
      dirs: [dir(0), dir(1)],
      phase: midStream ? 'unknown' : 'login',
      digests: NO_DIGESTS,
      digestsKnown: !midStream,
      negotiatedHeaderDigest: undefined,
      negotiatedDataDigest: undefined,
    };
    if (midStream) for (const d of ic.dirs) this.startResync(d, 'capture starts mid-connection');
    this.conns.set(tcp.id, ic);
    this.connectionCount++;
    return ic;
  }

  data(tcp: TcpConnection, side: Side, bytes: Buffer, at: PacketRef): void {
    const ic = this.connection(tcp);
    ic.dirs[side].queue.push(bytes, bytes.length, at);
    this.frame(ic, ic.dirs[side], false);
  }

  gap(tcp: TcpConnection, side: Side, gap: GapInfo, at: PacketRef): void {
    const ic = this.connection(tcp);
    const d = ic.dirs[side];
    const where = gap.cutShort
      ? `: packet ${gap.cutShort.index} was cut short by the snap length`
      : gap.resumesAt
        ? ` before packet ${gap.resumesAt.index}`
        : '';
    this.options.warn(`conn ${tcp.id} ${d.name}: ${gap.length} bytes missing from the capture${where}`);
    d.queue.push(null, gap.length, at);
    this.frame(ic, d, false);
  }

  closed(tcp: TcpConnection): void {
    const ic = this.conns.get(tcp.id);
    if (!ic) return;
    for (const d of ic.dirs) {
      this.frame(ic, d, true);
      this.reportLeftover(ic, d);
      this.resyncing.delete(d);
    }
    this.conns.delete(tcp.id);
  }

  /** Writes out the PDUs no resynchronising stream can still precede. */
  release(all: boolean): void {
    if (this.output.length === 0) return;
    let limit = Number.POSITIVE_INFINITY;
    if (!all) {
      for (const d of this.resyncing) if (d.queue.length > 0) limit = Math.min(limit, d.queue.frontAt()!.index);
    }
    if (!this.outputSorted) {
      this.output.sort((a, b) => a.index - b.index || a.order - b.order);
      this.outputSorted = true;
    }
    let n = 0;
    while (n < this.output.length && this.output[n]!.index < limit) {
      const rec = this.output[n++]!;
      this.options.write(rec.line);
      if (rec.raw) this.options.pdu?.(rec.raw);
    }
    if (n === this.output.length) this.output.length = 0;
    else if (n > 0) this.output.splice(0, n);
  }

  private emit(index: number, line: string, raw?: RawPdu): void {
    const prev = this.output[this.output.length - 1];
    if (prev && prev.index > index) this.outputSorted = false;
    this.output.push({ index, order: this.order++, line, raw });
    this.pduCount++;
  }

  private startResync(d: Direction, reason: string): void {
    if (d.resyncing) return;
    d.resyncing = true;
    this.resyncing.add(d);
    d.resyncReason = reason;
    d.skipped = 0;
    d.missingSkipped = 0;
    d.textParts = [];
    d.textIncomplete = false;
  }

  private currentDigests(ic: IscsiConnection): Digests {
    return ic.phase === 'login' ? NO_DIGESTS : ic.digests;
  }

  /** Cuts as many whole PDUs off the front of the direction's queue as it holds. */
  private frame(ic: IscsiConnection, d: Direction, final: boolean): void {
    const q = d.queue;
    for (;;) {
      if (d.resyncing && !this.resync(ic, d, final)) return;
      if (q.length === 0) return;
      if (q.leadingMissing() > 0) {
        this.startResync(d, 'data missing from the capture');
        continue;
      }
      const bhs = q.peek(0, BHS_LENGTH);
      if (bhs === undefined) return;
      if (bhs === null) {
        this.startResync(d, 'data missing from the capture');
        continue;
      }
      if (!plausibleByte0(bhs[0]!, d.i2t)) {
        this.startResync(d, `lost PDU framing: byte 0x${bhs[0]!.toString(16).padStart(2, '0')} is no ${d.name} opcode`);
        continue;
      }
      const digests = this.currentDigests(ic);
      const wire = pduWireLength(bhs, digests.header, digests.data);
      if (q.length < wire) return;
      const headerLength = BHS_LENGTH + bhs[4]! * 4;
      const header = q.peek(0, headerLength);
      if (!header) {
        this.startResync(d, 'data missing from the capture');
        continue;
      }
      if (digests.header && headerDigestVerdict(q, 0, bhs, true) === 'invalid') {
        // Either the capture is corrupt here or the digest setting is wrong: both mean the
        // lengths in this header cannot be trusted.
        this.startResync(d, 'header digest mismatch');
        continue;
      }
      this.emitPdu(ic, d, header, wire, digests);
    }
  }

  /**
   * Skips to the next plausible BHS. Returns true when in step again, false when it needs more
   * data (or, with `final`, when the stream ended without one).
   */
  private resync(ic: IscsiConnection, d: Direction, final: boolean): boolean {
    const q = d.queue;
    for (;;) {
      const missing = q.leadingMissing();
      if (missing > 0) {
        q.take(missing, false);
        d.missingSkipped += missing;
        continue;
      }
      if (q.length === 0) return false;
      const skip = q.scanFront((b) => plausibleByte0(b, d.i2t));
      if (skip > 0) {
        q.take(skip, false);
        d.skipped += skip;
        continue;
      }
      const bhs = q.peek(0, BHS_LENGTH);
      if (bhs === undefined) {
        if (final) {
          d.skipped += q.length;
          q.take(q.length, false);
        }
        return false;
      }
      if (bhs !== null && plausibleBhs(bhs, d.i2t)) {
        // The AHS must have been captured too, or framing would stumble on it right away.
        const header = q.peek(0, BHS_LENGTH + bhs[4]! * 4);
        if (header === undefined && !final) return false;
        if (header) {
          const found = this.verifyCandidate(ic, d, bhs, final);
          if (found === 'wait') return false;
          if (found !== undefined) {
            this.endResync(ic, d, found);
            return true;
          }
        }
      }
      q.take(1, false);
      d.skipped++;
    }
  }

  /**
   * Tests the BHS at the front under each digest setting still possible: its header digest must
   * match when there is one, and the PDU that should follow must look like a BHS too (with a
   * matching digest of its own). Returns the digest setting to continue with, 'wait' for more
   * data, or undefined to reject the candidate.
   */
  private verifyCandidate(ic: IscsiConnection, d: Direction, bhs: Buffer, final: boolean): Digests | 'wait' | undefined {
    const q = d.queue;
    const guesses = ic.digestsKnown ? [this.currentDigests(ic)] : DIGEST_GUESSES;
    const verdicts = guesses.map((g): Verdict => {
      if (g.header) {
        const own = headerDigestVerdict(q, 0, bhs, final);
        if (own === 'invalid' || own === 'wait') return own;
      }
      const at = pduWireLength(bhs, g.header, g.data);
      const next = q.peek(at, BHS_LENGTH);
      if (next === undefined) return final ? 'unverifiable' : 'wait';
      if (next === null) return 'unverifiable';
      if (!plausibleBhs(next, d.i2t)) return 'invalid';
      return g.header ? headerDigestVerdict(q, at, next, final) : 'valid';
    });
    const valid = verdicts.filter((v) => v === 'valid').length;
    const waiting = verdicts.includes('wait');
    let i = verdicts.indexOf('valid');
    if (i < 0) {
      if (waiting) return 'wait';
      i = verdicts.indexOf('unverifiable');
      if (i < 0) return undefined;
    }
    const g = guesses[i]!;
    if (!ic.digestsKnown) {
      ic.digests = g;
      // Without the login only an unambiguous match fixes the setting; otherwise the next
      // resynchronisation may still revise it.
      if (valid === 1 && !waiting) ic.digestsKnown = true;
    }
    return g;
  }

  private endResync(ic: IscsiConnection, d: Direction, digests: Digests): void {
    d.resyncing = false;
    this.resyncing.delete(d);
    if (d.skipped > 0 || d.missingSkipped > 0 || d.resyncReason !== 'capture starts mid-connection') {
      const at = d.queue.frontAt();
      const missing = d.missingSkipped > 0 ? ` (plus ${d.missingSkipped} bytes missing from the capture)` : '';
      const digestNote =
        ic.phase !== 'unknown' || (!digests.header && !digests.data)
          ? ''
          : `; digests look like header=${digests.header} data=${digests.data}${ic.digestsKnown ? '' : ' (a guess)'}`;
      this.options.warn(
        `conn ${ic.tcp.id} ${d.name}: resync at packet ${at?.index ?? '?'}: skipped ${d.skipped} bytes${missing} to the next plausible PDU boundary (${d.resyncReason})${digestNote}`,
      );
    }
    d.skipped = 0;
    d.missingSkipped = 0;
  }

  private reportLeftover(ic: IscsiConnection, d: Direction): void {
    const where = `conn ${ic.tcp.id} ${d.name}`;
    if (d.resyncing) {
      if (d.skipped > 0 || d.missingSkipped > 0)
        this.options.warn(`${where}: no PDU boundary found in the last ${d.skipped + d.missingSkipped} bytes of the stream (${d.resyncReason})`);
    } else if (d.queue.length > 0) {
      const bhs = d.queue.peek(0, BHS_LENGTH);
      const wire = bhs ? pduWireLength(bhs, this.currentDigests(ic).header, this.currentDigests(ic).data) : undefined;
      this.options.warn(
        wire !== undefined
          ? `${where}: stream ends inside a PDU (${d.queue.length} of ${wire} bytes captured)`
          : `${where}: stream ends with ${d.queue.length} bytes that are not a whole PDU header`,
      );
    }
    d.queue.take(d.queue.length, false);
  }

  // -------------------------------------------------------------------------------------------

  private emitPdu(ic: IscsiConnection, d: Direction, header: Buffer, wire: number, digests: Digests): void {
    const q = d.queue;
    const opcode = header[0]! & 0x3f;
    const dsl = (header[5]! << 16) | (header[6]! << 8) | header[7]!;
    const isText = opcode === 0x03 || opcode === 0x23 || opcode === 0x04 || opcode === 0x24;

    const headPart = q.take(header.length + (digests.header ? 4 : 0), false);
    const keep = this.options.pdu !== undefined;
    const dataPart = q.take(dsl, isText || keep);
    const tail = q.take(wire - header.length - (digests.header ? 4 : 0) - dsl, false);
    const last = tail.last ?? dataPart.last ?? headPart.last!;

    const rec: Record<string, unknown> = {
      frame: last.index,
      time: last.time,
      conn: ic.tcp.id,
      src: d.src,
      dst: d.dst,
      dir: d.name,
      opcode,
      name: opcodeName(opcode),
      immediate: (header[0]! & 0x40) !== 0,
      flags: header[1]!,
      itt: header.readUInt32BE(16),
      ahsLength: header[4]! * 4,
      dataSegmentLength: dsl,
    };
    const missing = dataPart.missing + tail.missing;
    if (missing > 0) rec.missingBytes = missing;

    let data = dataPart.data;
    if (data === null) {
      if (this.filler.length < dsl) this.filler = Buffer.alloc(Math.max(dsl, this.filler.length * 2));
      data = this.filler.subarray(0, dsl);
    }
    let pdu: Pdu | undefined;
    try {
      pdu = decodePdu(header, data);
    } catch (err) {
      rec.error = (err as Error).message;
    }
    if (pdu) {
      addFields(rec, pdu);
      if (isText) this.handleKeys(ic, d, pdu, rec, dataPart.missing === 0 ? dataPart.data : null);
    }
    const raw: RawPdu | undefined = keep
      ? { conn: ic.tcp.id, dir: d.name, header: Buffer.from(header), data: Buffer.from(data), missingBytes: missing }
      : undefined;
    this.emit(last.index, JSON.stringify(rec) + '\n', raw);
  }

  private handleKeys(ic: IscsiConnection, d: Direction, pdu: Pdu, rec: Record<string, unknown>, data: Buffer | null): void {
    const more = 'continue' in pdu && pdu.continue;
    if (data === null) d.textIncomplete = true;
    else if (data.length > 0) d.textParts.push(data);
    let pairs: TextPair[] = [];
    if (more) {
      rec.keysContinued = true;
    } else {
      const incomplete = d.textIncomplete;
      const whole = d.textParts.length === 1 ? d.textParts[0]! : Buffer.concat(d.textParts);
      d.textParts = [];
      d.textIncomplete = false;
      if (!incomplete) {
        try {
          pairs = decodeTextData(whole);
          rec.keys = keysObject(pairs);
        } catch (err) {
          rec.keysError = (err as Error).message;
        }
      }
    }
    if (pdu.opcode !== 0x03 && pdu.opcode !== 0x23) return;
    if (ic.phase === 'unknown') {
      // Caught the login after all: no digests until it ends.
      ic.phase = 'login';
      ic.digestsKnown = true;
    }
    for (const [key, value] of pairs) {
      // Only a single value is an answer; a list is still an offer.
      if (value.includes(',')) continue;
      if (key === 'HeaderDigest') ic.negotiatedHeaderDigest = value;
      else if (key === 'DataDigest') ic.negotiatedDataDigest = value;
    }
    if (pdu.opcode === 0x23 && pdu.transit && pdu.nsg === 3 && !more && pdu.statusClass === 0) {
      // The final Login Response: digests start with the next PDU in each direction.
      ic.phase = 'full-feature';
      ic.digests = { header: ic.negotiatedHeaderDigest === 'CRC32C', data: ic.negotiatedDataDigest === 'CRC32C' };
      ic.digestsKnown = true;
    }
  }
}

/** Checks the CRC32C that follows the header starting `offset` bytes into the queue. */
function headerDigestVerdict(q: ByteQueue, offset: number, bhs: Buffer, final: boolean): Verdict {
  const headerLength = BHS_LENGTH + bhs[4]! * 4;
  const h = q.peek(offset, headerLength + 4);
  if (h === undefined) return final ? 'unverifiable' : 'wait';
  if (h === null) return 'unverifiable';
  return crc32cOf([h.subarray(0, headerLength)]) === h.readUInt32LE(headerLength) ? 'valid' : 'invalid';
}

function keysObject(pairs: TextPair[]): Record<string, string | string[]> {
  const keys: Record<string, string | string[]> = Object.create(null) as Record<string, string | string[]>;
  for (const [k, v] of pairs) {
    const prev = keys[k];
    if (prev === undefined) keys[k] = v;
    else if (Array.isArray(prev)) prev.push(v);
    else keys[k] = [prev, v];
  }
  return keys;
}

function addFields(rec: Record<string, unknown>, p: Pdu): void {
  if ('lun' in p) rec.lun = p.lun;
  if ('ttt' in p) rec.ttt = p.ttt;
  if ('cmdSN' in p) rec.cmdsn = p.cmdSN;
  if ('expStatSN' in p) rec.expstatsn = p.expStatSN;
  if ('statSN' in p) rec.statsn = p.statSN;
  if ('expCmdSN' in p) rec.expcmdsn = p.expCmdSN;
  if ('maxCmdSN' in p) rec.maxcmdsn = p.maxCmdSN;
  if ('dataSN' in p) rec.datasn = p.dataSN;
  if ('bufferOffset' in p) rec.bufferOffset = p.bufferOffset;
  switch (p.opcode) {
    case 0x01:
      rec.cdb0 = p.cdb[0];
      rec.cdb = p.cdb.toString('hex');
      rec.edtl = p.expectedDataTransferLength;
      break;
    case 0x02:
      rec.function = p.function;
      rec.referencedTaskTag = p.referencedTaskTag;
      break;
    case 0x03:
    case 0x23:
      rec.transit = p.transit;
      rec.continue = p.continue;
      rec.csg = p.csg;
      rec.nsg = p.nsg;
      rec.isid = p.isid.toString('hex');
      rec.tsih = p.tsih;
      if (p.opcode === 0x03) rec.cid = p.cid;
      else {
        rec.statusClass = p.statusClass;
        rec.statusDetail = p.statusDetail;
      }
      break;
    case 0x06:
      rec.reasonCode = p.reasonCode;
      break;
    case 0x21:
      rec.response = p.response;
      rec.status = p.status;
      rec.residualCount = p.residualCount;
      break;
    case 0x22:
    case 0x26:
      rec.response = p.response;
      break;
    case 0x25:
      if (p.statusPresent) {
        rec.status = p.status;
        rec.residualCount = p.residualCount;
      }
      break;
    case 0x31:
      rec.r2tsn = p.r2tSN;
      rec.datasn = p.r2tSN;
      rec.desiredDataTransferLength = p.desiredDataTransferLength;
      break;
    case 0x32:
      rec.asyncEvent = p.asyncEvent;
      break;
    case 0x3f:
      rec.reason = p.reason;
      break;
    default:
      break;
  }
}
