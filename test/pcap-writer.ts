// Builds synthetic captures for the pcap-dump tests: TCP conversations over Ethernet/IPv4 (or
// IPv6), written as pcap or pcapng. Sequence and acknowledgement numbers are tracked like a real
// stack would, so tests can then reorder, duplicate or drop packets to stage capture trouble.

import { gzipSync } from 'node:zlib';

export const FIN = 0x01;
export const SYN = 0x02;
export const RST = 0x04;
export const PSH = 0x08;
export const ACK = 0x10;

export interface TcpPacketSpec {
  src: string;
  dst: string;
  srcPort: number;
  dstPort: number;
  seq: number;
  ack: number;
  flags: number;
  payload?: Buffer;
}

function ipv4Bytes(addr: string): number[] {
  return addr.split('.').map((x) => Number(x));
}

function ipv6Bytes(addr: string): number[] {
  const [head, tail] = addr.includes('::') ? addr.split('::') : [addr, undefined];
  const h = head ? head.split(':') : [];
  const t = tail ? tail.split(':') : [];
  const groups = tail === undefined ? h : [...h, ...Array(8 - h.length - t.length).fill('0'), ...t];
  return groups.flatMap((g) => {
    const v = parseInt(g, 16);
    return [v >> 8, v & 0xff];
  });
}

function tcpHeader(p: TcpPacketSpec): Buffer {
  const t = Buffer.alloc(20);
  t.writeUInt16BE(p.srcPort, 0);
  t.writeUInt16BE(p.dstPort, 2);
  t.writeUInt32BE(p.seq >>> 0, 4);
  t.writeUInt32BE(p.ack >>> 0, 8);
  t[12] = 5 << 4;
  t[13] = p.flags;
  t.writeUInt16BE(65535, 14);
  return t;
}

/** IPv4 packet (header + TCP + payload); checksums are left zero as offloading NICs do. */
export function ipv4Tcp(p: TcpPacketSpec, ipOptions: { id?: number; fragment?: number } = {}): Buffer {
  const payload = p.payload ?? Buffer.alloc(0);
  const ip = Buffer.alloc(20);
  ip[0] = 0x45;
  ip.writeUInt16BE(20 + 20 + payload.length, 2);
  ip.writeUInt16BE(ipOptions.id ?? 0, 4);
  ip.writeUInt16BE(ipOptions.fragment ?? 0x4000, 6); // DF
  ip[8] = 64;
  ip[9] = 6;
  Buffer.from(ipv4Bytes(p.src)).copy(ip, 12);
  Buffer.from(ipv4Bytes(p.dst)).copy(ip, 16);
  return Buffer.concat([ip, tcpHeader(p), payload]);
}

export function ipv6Tcp(p: TcpPacketSpec): Buffer {
  const payload = p.payload ?? Buffer.alloc(0);
  const ip = Buffer.alloc(40);
  ip[0] = 0x60;
  ip.writeUInt16BE(20 + payload.length, 4);
  ip[6] = 6;
  ip[7] = 64;
  Buffer.from(ipv6Bytes(p.src)).copy(ip, 8);
  Buffer.from(ipv6Bytes(p.dst)).copy(ip, 24);
  return Buffer.concat([ip, tcpHeader(p), payload]);
}

/** Wraps an IP packet in an Ethernet header with zero MACs, as Linux loopback captures show. */
export function ethernet(ipPacket: Buffer): Buffer {
  const eth = Buffer.alloc(14);
  eth.writeUInt16BE(ipPacket[0]! >> 4 === 6 ? 0x86dd : 0x0800, 12);
  return Buffer.concat([eth, ipPacket]);
}

export interface CapturedFrame {
  time: number;
  data: Buffer;
  /** Length on the wire; defaults to data.length. */
  originalLength?: number;
}

export interface PcapWriteOptions {
  bigEndian?: boolean;
  nanoseconds?: boolean;
  linkType?: number;
}

export function writePcap(frames: CapturedFrame[], options: PcapWriteOptions = {}): Buffer {
  const le = !options.bigEndian;
  const u32 = (b: Buffer, v: number, o: number) => (le ? b.writeUInt32LE(v >>> 0, o) : b.writeUInt32BE(v >>> 0, o));
  const u16 = (b: Buffer, v: number, o: number) => (le ? b.writeUInt16LE(v, o) : b.writeUInt16BE(v, o));
  const header = Buffer.alloc(24);
  u32(header, options.nanoseconds ? 0xa1b23c4d : 0xa1b2c3d4, 0);
  u16(header, 2, 4);
  u16(header, 4, 6);
  u32(header, 262144, 16);
  u32(header, options.linkType ?? 1, 20);
  const parts: Buffer[] = [header];
  const unit = options.nanoseconds ? 1e9 : 1e6;
  for (const f of frames) {
    const rec = Buffer.alloc(16);
    const sec = Math.floor(f.time);
    u32(rec, sec, 0);
    u32(rec, Math.round((f.time - sec) * unit), 4);
    u32(rec, f.data.length, 8);
    u32(rec, f.originalLength ?? f.data.length, 12);
    parts.push(rec, f.data);
  }
  return Buffer.concat(parts);
}

export interface PcapngWriteOptions {
  bigEndian?: boolean;
  linkType?: number;
  /** if_tsresol byte; default 9 (nanoseconds). */
  tsresol?: number;
  /** Write packets as Simple Packet Blocks (no timestamps). */
  simple?: boolean;
  /** Put an unknown block type between the packets. */
  unknownBlocks?: boolean;
}

export function writePcapng(frames: CapturedFrame[], options: PcapngWriteOptions = {}): Buffer {
  const le = !options.bigEndian;
  const block = (type: number, body: Buffer): Buffer => {
    const padded = Buffer.concat([body, Buffer.alloc((4 - (body.length % 4)) % 4)]);
    const b = Buffer.alloc(12 + padded.length);
    const total = b.length;
    if (le) {
      b.writeUInt32LE(type, 0);
      b.writeUInt32LE(total, 4);
      b.writeUInt32LE(total, total - 4);
    } else {
      b.writeUInt32BE(type, 0);
      b.writeUInt32BE(total, 4);
      b.writeUInt32BE(total, total - 4);
    }
    padded.copy(b, 8);
    return b;
  };
  const u32 = (v: number) => {
    const b = Buffer.alloc(4);
    if (le) b.writeUInt32LE(v >>> 0);
    else b.writeUInt32BE(v >>> 0);
    return b;
  };
  const u16 = (v: number) => {
    const b = Buffer.alloc(2);
    if (le) b.writeUInt16LE(v);
    else b.writeUInt16BE(v);
    return b;
  };
  const shb = block(0x0a0d0d0a, Buffer.concat([u32(0x1a2b3c4d), u16(1), u16(0), Buffer.alloc(8, 0xff)]));
  const tsresol = options.tsresol ?? 9;
  const idb = block(
    1,
    Buffer.concat([
      u16(options.linkType ?? 1),
      u16(0),
      u32(0),
      // if_tsresol option, then end of options
      u16(9),
      u16(1),
      Buffer.from([tsresol, 0, 0, 0]),
      u16(0),
      u16(0),
    ]),
  );
  const unitsPerSecond = tsresol & 0x80 ? 2 ** (tsresol & 0x7f) : 10 ** tsresol;
  const parts: Buffer[] = [shb, idb];
  for (const f of frames) {
    if (options.unknownBlocks) parts.push(block(0x0bad, Buffer.from('not a packet')));
    if (options.simple) {
      parts.push(block(3, Buffer.concat([u32(f.originalLength ?? f.data.length), f.data])));
      continue;
    }
    const units = BigInt(Math.round(f.time * 1e6)) * BigInt(unitsPerSecond) / 1_000_000n;
    parts.push(
      block(
        6,
        Buffer.concat([
          u32(0),
          u32(Number(units >> 32n)),
          u32(Number(units & 0xffffffffn)),
          u32(f.data.length),
          u32(f.originalLength ?? f.data.length),
          f.data,
        ]),
      ),
    );
  }
  return Buffer.concat(parts);
}

export function gzip(b: Buffer): Buffer {
  return gzipSync(b);
}

export interface Packet {
  spec: TcpPacketSpec;
  time: number;
}

/**
 * One TCP connection between an initiator (client) and a target (server), producing packets
 * with consistent sequence numbers. `packets` can be edited freely before `frames()`.
 */
export class Conversation {
  readonly packets: Packet[] = [];
  private nextSeq: { c: number; s: number };
  private time: number;

  constructor(
    readonly client = { addr: '10.0.0.1', port: 40000 },
    readonly server = { addr: '10.0.0.2', port: 3260 },
    isn: { c: number; s: number } = { c: 1000, s: 5000 },
    startTime = 1_700_000_000,
  ) {
    this.nextSeq = { ...isn };
    this.time = startTime;
  }

  private add(from: 'c' | 's', flags: number, payload?: Buffer, seqDelta = 0): Packet {
    const to = from === 'c' ? 's' : 'c';
    const [a, b] = from === 'c' ? [this.client, this.server] : [this.server, this.client];
    this.time += 0.001;
    const p: Packet = {
      time: this.time,
      spec: {
        src: a.addr,
        dst: b.addr,
        srcPort: a.port,
        dstPort: b.port,
        seq: (this.nextSeq[from] + seqDelta) >>> 0,
        ack: flags & ACK ? this.nextSeq[to] : 0,
        flags,
        ...(payload ? { payload } : {}),
      },
    };
    this.packets.push(p);
    return p;
  }

  handshake(): this {
    this.add('c', SYN);
    this.nextSeq.c = (this.nextSeq.c + 1) >>> 0;
    this.add('s', SYN | ACK);
    this.nextSeq.s = (this.nextSeq.s + 1) >>> 0;
    this.add('c', ACK);
    return this;
  }

  /** Sends `data` from one side in segments of at most `mss` bytes; returns the packets made. */
  send(from: 'c' | 's', data: Buffer, mss = 1460): Packet[] {
    const made: Packet[] = [];
    for (let o = 0; o < data.length; o += mss) {
      const chunk = data.subarray(o, Math.min(data.length, o + mss));
      made.push(this.add(from, ACK | PSH, chunk));
      this.nextSeq[from] = (this.nextSeq[from] + chunk.length) >>> 0;
    }
    return made;
  }

  /** A pure ACK from one side acknowledging everything the other sent. */
  ack(from: 'c' | 's'): Packet {
    return this.add(from, ACK);
  }

  fin(from: 'c' | 's'): Packet {
    const p = this.add(from, FIN | ACK);
    this.nextSeq[from] = (this.nextSeq[from] + 1) >>> 0;
    return p;
  }

  close(): this {
    this.fin('c');
    this.fin('s');
    this.ack('c');
    return this;
  }

  frames(ipv6 = false): CapturedFrame[] {
    return this.packets.map((p) => ({ time: p.time, data: ethernet(ipv6 ? ipv6Tcp(p.spec) : ipv4Tcp(p.spec)) }));
  }
}
