// Reading packet captures: classic pcap (either byte order, microsecond or nanosecond timestamps)
// and pcapng, optionally gzip-compressed, plus stripping the link-layer header down to IP.
//
// Everything works on an in-memory Buffer: captures worth dumping by hand fit in memory, and it
// keeps the readers simple and fast. Malformed input raises CaptureFormatError, never anything
// else, so the command can print one clean line and exit 1.

import { gunzipSync } from 'node:zlib';

export class CaptureFormatError extends Error {
  override readonly name = 'CaptureFormatError';
}

export type CaptureFormat = 'pcap' | 'pcapng';

export interface CapturedPacket {
  /** 1-based position among the file's packets: the same number tshark shows as frame.number. */
  index: number;
  /** Capture time in seconds since the epoch. */
  time: number;
  /** LINKTYPE_* value of the interface the packet was captured on. */
  linkType: number;
  /** The captured bytes, starting with the link-layer header; may be cut short by the snap length. */
  data: Buffer;
  /** Length of the packet on the wire. */
  originalLength: number;
}

export interface Capture {
  format: CaptureFormat;
  gzipped: boolean;
  /** Iterates the packets in file order; throws CaptureFormatError where the file is damaged. */
  packets(): Generator<CapturedPacket>;
}

export const LinkType = {
  Null: 0,
  Ethernet: 1,
  Raw: 101,
  Loop: 108,
  LinuxSll: 113,
  Ipv4: 228,
  Ipv6: 229,
  LinuxSll2: 276,
} as const;

const PCAP_MAGIC_US = 0xa1b2c3d4;
const PCAP_MAGIC_NS = 0xa1b23c4d;
const PCAPNG_SHB = 0x0a0d0d0a;
const PCAPNG_BYTE_ORDER_MAGIC = 0x1a2b3c4d;

/** No real link layer produces frames this large; a bigger length means a corrupt record. */
const MAX_RECORD_LENGTH = 256 * 1024 * 1024;

/** Gunzips when the buffer starts with the gzip magic (1f 8b); returns it unchanged otherwise. */
export function maybeGunzip(file: Buffer): { data: Buffer; gzipped: boolean } {
  if (file.length >= 2 && file[0] === 0x1f && file[1] === 0x8b) {
    try {
      return { data: gunzipSync(file), gzipped: true };
    } catch (err) {
      throw new CaptureFormatError(`corrupt gzip data: ${(err as Error).message}`);
    }
  }
  return { data: file, gzipped: false };
}

/** Recognises the format from the first bytes; the packets are read lazily by `packets()`. */
export function openCapture(file: Buffer): Capture {
  const { data, gzipped } = maybeGunzip(file);
  if (data.length < 4) throw new CaptureFormatError('not a pcap or pcapng file (too short)');
  const le = data.readUInt32LE(0);
  const be = data.readUInt32BE(0);
  if (be === PCAPNG_SHB) return { format: 'pcapng', gzipped, packets: () => readPcapng(data) };
  for (const [magic, littleEndian] of [
    [le, true],
    [be, false],
  ] as const) {
    if (magic === PCAP_MAGIC_US || magic === PCAP_MAGIC_NS) {
      const header = readPcapHeader(data, littleEndian, magic === PCAP_MAGIC_NS);
      return { format: 'pcap', gzipped, packets: () => readPcap(data, header) };
    }
  }
  throw new CaptureFormatError(
    `not a pcap or pcapng file (starts with ${data.subarray(0, 4).toString('hex')})`,
  );
}

// ---------------------------------------------------------------------------------------------
// pcap

interface PcapHeader {
  littleEndian: boolean;
  nanoseconds: boolean;
  linkType: number;
}

function readPcapHeader(data: Buffer, littleEndian: boolean, nanoseconds: boolean): PcapHeader {
  if (data.length < 24) throw new CaptureFormatError('truncated pcap file header');
  const u16 = (o: number) => (littleEndian ? data.readUInt16LE(o) : data.readUInt16BE(o));
  const u32 = (o: number) => (littleEndian ? data.readUInt32LE(o) : data.readUInt32BE(o));
  const major = u16(4);
  if (major !== 2) throw new CaptureFormatError(`unsupported pcap version ${major}.${u16(6)}`);
  // The upper bits of the link-type word may carry FCS information; the type is the low 16 bits.
  return { littleEndian, nanoseconds, linkType: u32(20) & 0xffff };
}

function* readPcap(data: Buffer, h: PcapHeader): Generator<CapturedPacket> {
  const u32 = h.littleEndian ? (o: number) => data.readUInt32LE(o) : (o: number) => data.readUInt32BE(o);
  const fractionUnit = h.nanoseconds ? 1e9 : 1e6;
  let offset = 24;
  let index = 0;
  while (offset < data.length) {
    if (data.length - offset < 16) throw new CaptureFormatError(`truncated pcap record header at byte ${offset}`);
    const seconds = u32(offset);
    const fraction = u32(offset + 4);
    const capturedLength = u32(offset + 8);
    const originalLength = u32(offset + 12);
    if (capturedLength > MAX_RECORD_LENGTH) throw new CaptureFormatError(`corrupt pcap record at byte ${offset}`);
    const start = offset + 16;
    if (start + capturedLength > data.length)
      throw new CaptureFormatError(`truncated pcap file: packet ${index + 1} is cut short`);
    index++;
    yield {
      index,
      time: seconds + fraction / fractionUnit,
      linkType: h.linkType,
      data: data.subarray(start, start + capturedLength),
      originalLength,
    };
    offset = start + capturedLength;
  }
}

// ---------------------------------------------------------------------------------------------
// pcapng

const BlockType = {
  InterfaceDescription: 0x00000001,
  ObsoletePacket: 0x00000002,
  SimplePacket: 0x00000003,
  EnhancedPacket: 0x00000006,
} as const;

const OPT_END = 0;
const OPT_IF_TSRESOL = 9;
const OPT_IF_TSOFFSET = 14;

interface Interface {
  linkType: number;
  snapLength: number;
  /** Timestamp units per second. */
  unitsPerSecond: number;
  /** Seconds added to every timestamp (if_tsoffset). */
  offsetSeconds: number;
}

interface Reader {
  littleEndian: boolean;
  u16(o: number): number;
  u32(o: number): number;
}

function reader(data: Buffer, littleEndian: boolean): Reader {
  return littleEndian
    ? { littleEndian, u16: (o) => data.readUInt16LE(o), u32: (o) => data.readUInt32LE(o) }
    : { littleEndian, u16: (o) => data.readUInt16BE(o), u32: (o) => data.readUInt32BE(o) };
}

function* readPcapng(data: Buffer): Generator<CapturedPacket> {
  let r: Reader | undefined;
  let interfaces: Interface[] = [];
  let offset = 0;
  let index = 0;
  while (offset < data.length) {
    if (data.length - offset < 12) throw new CaptureFormatError(`truncated pcapng block at byte ${offset}`);
    const typeBe = data.readUInt32BE(offset);
    if (typeBe === PCAPNG_SHB) {
      // A section header fixes the byte order of everything up to the next one, and starts a
      // fresh list of interfaces.
      const bom = data.readUInt32LE(offset + 8);
      let littleEndian: boolean;
      if (bom === PCAPNG_BYTE_ORDER_MAGIC) littleEndian = true;
      else if (bom === 0x4d3c2b1a) littleEndian = false;
      else throw new CaptureFormatError(`corrupt pcapng section header at byte ${offset}`);
      r = reader(data, littleEndian);
      interfaces = [];
    } else if (r === undefined) {
      throw new CaptureFormatError('corrupt pcapng file: no section header');
    }
    const type = r.u32(offset);
    const length = r.u32(offset + 4);
    if (length < 12 || length % 4 !== 0 || length > MAX_RECORD_LENGTH)
      throw new CaptureFormatError(`corrupt pcapng block length ${length} at byte ${offset}`);
    if (offset + length > data.length) throw new CaptureFormatError(`truncated pcapng file: block at byte ${offset} is cut short`);
    if (r.u32(offset + length - 4) !== length)
      throw new CaptureFormatError(`corrupt pcapng block at byte ${offset} (trailing length mismatch)`);
    const body = offset + 8;
    const bodyEnd = offset + length - 4;
    const need = (n: number) => {
      if (bodyEnd - body < n) throw new CaptureFormatError(`corrupt pcapng block at byte ${offset} (too short)`);
    };

    switch (type) {
      case BlockType.InterfaceDescription: {
        need(8);
        interfaces.push(readInterface(data, r, body, bodyEnd));
        break;
      }
      case BlockType.EnhancedPacket:
      case BlockType.ObsoletePacket: {
        need(20);
        const ifId = type === BlockType.EnhancedPacket ? r.u32(body) : r.u16(body);
        const iface = interfaces[ifId];
        if (!iface) throw new CaptureFormatError(`pcapng packet at byte ${offset} names unknown interface ${ifId}`);
        const tsHigh = r.u32(body + 4);
        const tsLow = r.u32(body + 8);
        const capturedLength = r.u32(body + 12);
        const originalLength = r.u32(body + 16);
        const start = body + 20;
        if (start + capturedLength > bodyEnd) throw new CaptureFormatError(`corrupt pcapng packet at byte ${offset}`);
        index++;
        yield {
          index,
          time: timestamp(iface, tsHigh, tsLow),
          linkType: iface.linkType,
          data: data.subarray(start, start + capturedLength),
          originalLength,
        };
        break;
      }
      case BlockType.SimplePacket: {
        need(4);
        const iface = interfaces[0];
        if (!iface) throw new CaptureFormatError(`pcapng simple packet at byte ${offset} with no interface`);
        const originalLength = r.u32(body);
        // The block has no captured-length field: it is the original length cut to the snap
        // length and to what the block holds.
        let capturedLength = Math.min(originalLength, bodyEnd - body - 4);
        if (iface.snapLength > 0) capturedLength = Math.min(capturedLength, iface.snapLength);
        index++;
        yield {
          index,
          time: 0, // simple packet blocks carry no timestamp
          linkType: iface.linkType,
          data: data.subarray(body + 4, body + 4 + capturedLength),
          originalLength,
        };
        break;
      }
      default:
        // Section headers were handled above; name resolution, statistics, decryption secrets,
        // custom blocks and anything newer carry no packets.
        break;
    }
    offset += length;
  }
}

function readInterface(data: Buffer, r: Reader, body: number, bodyEnd: number): Interface {
  const iface: Interface = { linkType: r.u16(body), snapLength: r.u32(body + 4), unitsPerSecond: 1e6, offsetSeconds: 0 };
  let o = body + 8;
  while (o + 4 <= bodyEnd) {
    const code = r.u16(o);
    const len = r.u16(o + 2);
    const value = o + 4;
    if (code === OPT_END || value + len > bodyEnd) break;
    if (code === OPT_IF_TSRESOL && len >= 1) {
      const v = data[value]!;
      // Most significant bit clear: a power of ten; set: a power of two.
      iface.unitsPerSecond = v & 0x80 ? 2 ** (v & 0x7f) : 10 ** v;
    } else if (code === OPT_IF_TSOFFSET && len >= 8) {
      // A signed 64-bit count of seconds in the section's byte order.
      const high = r.u32(r.littleEndian ? value + 4 : value);
      const low = r.u32(r.littleEndian ? value : value + 4);
      iface.offsetSeconds = (high | 0) * 4294967296 + low;
    }
    o = value + ((len + 3) & ~3);
  }
  return iface;
}

function timestamp(iface: Interface, high: number, low: number): number {
  // A double cannot hold a 64-bit nanosecond count exactly, but the error (a few hundred
  // nanoseconds) is below what a double number of seconds since 1970 can show anyway.
  const units = high * 4294967296 + low;
  const whole = Math.floor(units / iface.unitsPerSecond);
  return iface.offsetSeconds + whole + (units - whole * iface.unitsPerSecond) / iface.unitsPerSecond;
}

// ---------------------------------------------------------------------------------------------
// Link layer

export type NetworkPacket =
  | { kind: 'ipv4' | 'ipv6'; payload: Buffer }
  /** Not IP (ARP, LLDP...) or an unsupported link type; `what` says which, for diagnostics. */
  | { kind: 'other'; what: string };

const ETHERTYPE_IPV4 = 0x0800;
const ETHERTYPE_IPV6 = 0x86dd;
const ETHERTYPE_VLAN = [0x8100, 0x88a8, 0x9100];

function byEthertype(ethertype: number, payload: Buffer): NetworkPacket {
  if (ethertype === ETHERTYPE_IPV4) return { kind: 'ipv4', payload };
  if (ethertype === ETHERTYPE_IPV6) return { kind: 'ipv6', payload };
  return { kind: 'other', what: `ethertype 0x${ethertype.toString(16).padStart(4, '0')}` };
}

function byVersionNibble(payload: Buffer): NetworkPacket {
  const version = payload.length > 0 ? payload[0]! >> 4 : -1;
  if (version === 4) return { kind: 'ipv4', payload };
  if (version === 6) return { kind: 'ipv6', payload };
  return { kind: 'other', what: `IP version ${version}` };
}

// BSD address families differ per OS for IPv6; Linux uses 10.
const AF_INET = 2;
const AF_INET6 = new Set([10, 24, 28, 30]);

/** Strips the link-layer header of one captured frame. */
export function networkLayer(linkType: number, frame: Buffer): NetworkPacket {
  const short = { kind: 'other', what: `truncated link-layer header (link type ${linkType})` } as const;
  switch (linkType) {
    case LinkType.Ethernet: {
      if (frame.length < 14) return short;
      let o = 12;
      let ethertype = frame.readUInt16BE(o);
      while (ETHERTYPE_VLAN.includes(ethertype)) {
        o += 4;
        if (frame.length < o + 2) return short;
        ethertype = frame.readUInt16BE(o);
      }
      return byEthertype(ethertype, frame.subarray(o + 2));
    }
    case LinkType.LinuxSll:
      if (frame.length < 16) return short;
      return byEthertype(frame.readUInt16BE(14), frame.subarray(16));
    case LinkType.LinuxSll2:
      if (frame.length < 20) return short;
      return byEthertype(frame.readUInt16BE(0), frame.subarray(20));
    case LinkType.Raw:
      return byVersionNibble(frame);
    case LinkType.Ipv4:
      return { kind: 'ipv4', payload: frame };
    case LinkType.Ipv6:
      return { kind: 'ipv6', payload: frame };
    case LinkType.Null:
    case LinkType.Loop: {
      if (frame.length < 4) return short;
      // NULL stores the address family in the capturing host's byte order, LOOP in network
      // order; a family is small, so whichever reading fits in 16 bits is the right one.
      const le = frame.readUInt32LE(0);
      const family = le <= 0xffff ? le : frame.readUInt32BE(0);
      const payload = frame.subarray(4);
      if (family === AF_INET) return { kind: 'ipv4', payload };
      if (AF_INET6.has(family)) return { kind: 'ipv6', payload };
      return byVersionNibble(payload);
    }
    default:
      return { kind: 'other', what: `unsupported link type ${linkType}` };
  }
}
