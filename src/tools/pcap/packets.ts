// IPv4 / IPv6 and TCP header decoding, as far as TCP reassembly needs: addresses, ports,
// sequence numbers, flags and the payload. Checksums are not verified: captures taken on the
// sending host (and all loopback captures) show checksums the NIC or the kernel never filled in.

export const TcpFlag = { FIN: 0x01, SYN: 0x02, RST: 0x04, PSH: 0x08, ACK: 0x10 } as const;

export interface TcpSegment {
  srcAddr: string;
  dstAddr: string;
  srcPort: number;
  dstPort: number;
  seq: number;
  ack: number;
  /** Byte 13 of the TCP header: see TcpFlag. */
  flags: number;
  /** The payload bytes that were captured. */
  payload: Buffer;
  /**
   * Payload length according to the IP header. Larger than payload.length when the capture's
   * snap length cut the packet: the missing tail is data that existed but was not recorded.
   */
  payloadLength: number;
}

export type IpDecodeResult =
  | { kind: 'tcp'; segment: TcpSegment }
  /** Not TCP: nothing to say. */
  | { kind: 'ignored' }
  /** Something the reassembly cannot use and a person should hear about. */
  | { kind: 'warning'; message: string };

const PROTO_TCP = 6;
const IGNORED = { kind: 'ignored' } as const;

export function formatIpv4(b: Buffer, o: number): string {
  return `${b[o]}.${b[o + 1]}.${b[o + 2]}.${b[o + 3]}`;
}

/** RFC 5952 text form: lower case, leading zeros dropped, the longest run of zero groups as "::". */
export function formatIpv6(b: Buffer, o: number): string {
  const groups: number[] = [];
  for (let i = 0; i < 8; i++) groups.push(b.readUInt16BE(o + 2 * i));
  let bestStart = -1;
  let bestLen = 0;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLen) {
      bestStart = i;
      bestLen = j - i;
    }
    i = j;
  }
  const hex = (g: number[]) => g.map((x) => x.toString(16)).join(':');
  if (bestLen < 2) return hex(groups);
  return `${hex(groups.slice(0, bestStart))}::${hex(groups.slice(bestStart + bestLen))}`;
}

/** "addr:port", with IPv6 addresses in brackets. */
export function formatEndpoint(addr: string, port: number): string {
  return addr.includes(':') ? `[${addr}]:${port}` : `${addr}:${port}`;
}

export function decodeIpPacket(kind: 'ipv4' | 'ipv6', packet: Buffer): IpDecodeResult {
  return kind === 'ipv4' ? decodeIpv4(packet) : decodeIpv6(packet);
}

function decodeIpv4(p: Buffer): IpDecodeResult {
  if (p.length < 20 || p[0]! >> 4 !== 4) return { kind: 'warning', message: 'truncated or malformed IPv4 header' };
  const headerLength = (p[0]! & 0x0f) * 4;
  if (headerLength < 20 || p.length < headerLength) return { kind: 'warning', message: 'truncated or malformed IPv4 header' };
  const protocol = p[9]!;
  if (protocol !== PROTO_TCP) return IGNORED;
  const fragment = p.readUInt16BE(6);
  const moreFragments = (fragment & 0x2000) !== 0;
  const fragmentOffset = fragment & 0x1fff;
  if (moreFragments || fragmentOffset !== 0) {
    return {
      kind: 'warning',
      message: `IPv4 fragment skipped (id ${p.readUInt16BE(4)}, offset ${fragmentOffset * 8}): fragment reassembly is not supported`,
    };
  }
  // A total length of 0 is what TCP segmentation offload leaves in captures of large sends;
  // anything else also trims the Ethernet padding of short frames.
  const totalLength = p.readUInt16BE(2);
  const ipEnd = totalLength === 0 ? Number.POSITIVE_INFINITY : totalLength;
  if (ipEnd < headerLength) return { kind: 'warning', message: 'malformed IPv4 total length' };
  return decodeTcp(p, headerLength, ipEnd, formatIpv4(p, 12), formatIpv4(p, 16));
}

// IPv6 extension headers that may sit between the fixed header and TCP.
const EXT_HOP_BY_HOP = 0;
const EXT_ROUTING = 43;
const EXT_FRAGMENT = 44;
const EXT_AUTH = 51;
const EXT_DEST_OPTS = 60;

function decodeIpv6(p: Buffer): IpDecodeResult {
  if (p.length < 40 || p[0]! >> 4 !== 6) return { kind: 'warning', message: 'truncated or malformed IPv6 header' };
  const payloadLength = p.readUInt16BE(4);
  // Payload length 0 means a jumbogram (or offload): take what was captured.
  const ipEnd = payloadLength === 0 ? Number.POSITIVE_INFINITY : 40 + payloadLength;
  let next = p[6]!;
  let o = 40;
  for (;;) {
    if (next === PROTO_TCP) break;
    if (next === EXT_FRAGMENT) return { kind: 'warning', message: 'IPv6 fragment skipped: fragment reassembly is not supported' };
    if (next === EXT_HOP_BY_HOP || next === EXT_ROUTING || next === EXT_DEST_OPTS || next === EXT_AUTH) {
      if (p.length < o + 2) return { kind: 'warning', message: 'truncated IPv6 extension header' };
      const len = next === EXT_AUTH ? (p[o + 1]! + 2) * 4 : (p[o + 1]! + 1) * 8;
      next = p[o]!;
      o += len;
      continue;
    }
    return IGNORED;
  }
  return decodeTcp(p, o, ipEnd, formatIpv6(p, 8), formatIpv6(p, 24));
}

function decodeTcp(p: Buffer, o: number, ipEnd: number, srcAddr: string, dstAddr: string): IpDecodeResult {
  if (p.length < o + 20) return { kind: 'warning', message: 'truncated TCP header' };
  const headerLength = (p[o + 12]! >> 4) * 4;
  if (headerLength < 20 || p.length < o + headerLength) return { kind: 'warning', message: 'truncated or malformed TCP header' };
  const payloadStart = o + headerLength;
  const payloadEnd = Math.min(ipEnd, p.length);
  const payloadLength = ipEnd === Number.POSITIVE_INFINITY ? payloadEnd - payloadStart : ipEnd - payloadStart;
  if (payloadLength < 0) return { kind: 'warning', message: 'malformed TCP header (longer than the IP packet)' };
  return {
    kind: 'tcp',
    segment: {
      srcAddr,
      dstAddr,
      srcPort: p.readUInt16BE(o),
      dstPort: p.readUInt16BE(o + 2),
      seq: p.readUInt32BE(o + 4),
      ack: p.readUInt32BE(o + 8),
      flags: p[o + 13]!,
      payload: p.subarray(payloadStart, Math.max(payloadStart, payloadEnd)),
      payloadLength,
    },
  };
}
