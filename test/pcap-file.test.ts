import { describe, expect, it } from 'vitest';
import { decodeIpPacket, formatIpv6, type TcpSegment } from '../src/tools/pcap/packets.ts';
import { CaptureFormatError, LinkType, networkLayer, openCapture, type CapturedPacket } from '../src/tools/pcap/pcap-file.ts';
import { ACK, ethernet, gzip, ipv4Tcp, ipv6Tcp, PSH, writePcap, writePcapng, type CapturedFrame } from './pcap-writer.ts';

const spec = { src: '192.168.1.10', dst: '192.168.1.20', srcPort: 51234, dstPort: 3260, seq: 0x01020304, ack: 0xa0b0c0d0, flags: ACK | PSH, payload: Buffer.from('payload!') };

function all(file: Buffer): CapturedPacket[] {
  return [...openCapture(file).packets()];
}

function tcpOf(linkType: number, frame: Buffer): TcpSegment {
  const net = networkLayer(linkType, frame);
  if (net.kind === 'other') throw new Error(`not IP: ${net.what}`);
  const ip = decodeIpPacket(net.kind, net.payload);
  if (ip.kind !== 'tcp') throw new Error(`not TCP: ${JSON.stringify(ip)}`);
  return ip.segment;
}

const frames: CapturedFrame[] = [
  { time: 1_700_000_000.25, data: ethernet(ipv4Tcp(spec)) },
  { time: 1_700_000_001.5, data: ethernet(ipv4Tcp({ ...spec, seq: spec.seq + 8 })) },
];

describe('openCapture', () => {
  it('reads pcap in both byte orders with microsecond and nanosecond timestamps', () => {
    for (const options of [{}, { bigEndian: true }, { nanoseconds: true }, { bigEndian: true, nanoseconds: true }]) {
      const c = openCapture(writePcap(frames, options));
      expect(c.format).toBe('pcap');
      const packets = [...c.packets()];
      expect(packets.map((p) => [p.index, p.linkType, p.originalLength])).toEqual([
        [1, 1, frames[0]!.data.length],
        [2, 1, frames[1]!.data.length],
      ]);
      expect(packets[0]!.time).toBeCloseTo(1_700_000_000.25, 6);
      expect(packets[1]!.time).toBeCloseTo(1_700_000_001.5, 6);
      expect(packets[1]!.data.equals(frames[1]!.data)).toBe(true);
    }
  });

  it('reads pcapng in both byte orders, honouring if_tsresol, skipping unknown blocks', () => {
    for (const options of [{}, { bigEndian: true }, { tsresol: 6 }, { tsresol: 0x80 | 20, unknownBlocks: true }]) {
      const c = openCapture(writePcapng(frames, options));
      expect(c.format).toBe('pcapng');
      const packets = [...c.packets()];
      expect(packets.map((p) => p.index)).toEqual([1, 2]);
      expect(packets[0]!.time).toBeCloseTo(1_700_000_000.25, 5);
      expect(packets[1]!.time).toBeCloseTo(1_700_000_001.5, 5);
      expect(tcpOf(packets[0]!.linkType, packets[0]!.data).seq).toBe(spec.seq);
    }
  });

  it('reads pcapng Simple Packet Blocks', () => {
    const packets = all(writePcapng(frames, { simple: true }));
    expect(packets.map((p) => [p.index, p.time, p.data.length])).toEqual([
      [1, 0, frames[0]!.data.length],
      [2, 0, frames[1]!.data.length],
    ]);
  });

  it('reads the obsolete pcapng Packet Block, and new sections reset the interfaces', () => {
    const le32 = (v: number) => {
      const x = Buffer.alloc(4);
      x.writeUInt32LE(v);
      return x;
    };
    const block = (type: number, body: Buffer) => {
      const padded = Buffer.concat([body, Buffer.alloc((4 - (body.length % 4)) % 4)]);
      return Buffer.concat([le32(type), le32(padded.length + 12), padded, le32(padded.length + 12)]);
    };
    const shb = block(0x0a0d0d0a, Buffer.concat([le32(0x1a2b3c4d), Buffer.from([1, 0, 0, 0]), Buffer.alloc(8, 0xff)]));
    const raw = ipv4Tcp(spec);
    const idbRaw = block(1, Buffer.concat([Buffer.from([LinkType.Raw, 0, 0, 0]), le32(0)]));
    const idbEth = block(1, Buffer.concat([Buffer.from([LinkType.Ethernet, 0, 0, 0]), le32(0)]));
    // Obsolete Packet Block: interface id (16 bits), drops (16 bits), timestamp, lengths, data.
    const opb = block(2, Buffer.concat([Buffer.from([0, 0, 0, 0]), le32(0), le32(3_000_000), le32(raw.length), le32(raw.length), raw]));
    const epb = (data: Buffer) => block(6, Buffer.concat([le32(0), le32(0), le32(0), le32(data.length), le32(data.length), data]));
    const file = Buffer.concat([shb, idbRaw, opb, shb, idbEth, epb(ethernet(raw))]);
    const packets = all(file);
    expect(packets.map((p) => [p.index, p.linkType, p.time])).toEqual([
      [1, LinkType.Raw, 3],
      [2, LinkType.Ethernet, 0],
    ]);
    expect(tcpOf(packets[0]!.linkType, packets[0]!.data).payload.toString()).toBe('payload!');
    expect(tcpOf(packets[1]!.linkType, packets[1]!.data).payload.toString()).toBe('payload!');
  });

  it('accepts gzip-compressed captures', () => {
    const c = openCapture(gzip(writePcapng(frames)));
    expect(c.gzipped).toBe(true);
    expect([...c.packets()].map((p) => p.index)).toEqual([1, 2]);
  });

  it('rejects what is not a capture, and damage inside one, with CaptureFormatError', () => {
    const attempt = (file: Buffer) => () => all(file);
    expect(attempt(Buffer.from('hello, world'))).toThrow(/not a pcap or pcapng file/);
    expect(attempt(Buffer.alloc(2))).toThrow(CaptureFormatError);
    expect(attempt(Buffer.from([0x1f, 0x8b, 1, 2, 3]))).toThrow(/corrupt gzip data/);
    const pcap = writePcap(frames);
    expect(attempt(pcap.subarray(0, 20))).toThrow(/truncated pcap file header/);
    expect(attempt(pcap.subarray(0, pcap.length - 5))).toThrow(/truncated pcap file: packet 2 is cut short/);
    expect(attempt(pcap.subarray(0, 24 + 16 + frames[0]!.data.length + 7))).toThrow(/truncated pcap record header/);
    const ng = writePcapng(frames);
    expect(attempt(ng.subarray(0, ng.length - 3))).toThrow(/truncated pcapng/);
    const badTrailer = Buffer.from(ng);
    badTrailer.writeUInt32LE(12345, badTrailer.length - 4);
    expect(attempt(badTrailer)).toThrow(/trailing length mismatch/);
    const shbLength = ng.readUInt32LE(4);
    const idbLength = ng.readUInt32LE(shbLength + 4);
    const noInterface = Buffer.concat([ng.subarray(0, shbLength), ng.subarray(shbLength + idbLength)]);
    expect(attempt(noInterface)).toThrow(/names unknown interface 0/);
    const hugeBlock = Buffer.from(ng);
    hugeBlock.writeUInt32LE(0x7ffffff0, shbLength + 4);
    expect(attempt(hugeBlock)).toThrow(/corrupt pcapng block length/);
  });
});

describe('networkLayer', () => {
  const ip4 = ipv4Tcp(spec);
  const ip6 = ipv6Tcp({ ...spec, src: 'fe80::1', dst: '2001:db8::42' });

  it('strips Ethernet, with VLAN tags', () => {
    expect(tcpOf(LinkType.Ethernet, ethernet(ip4)).srcPort).toBe(51234);
    const tagged = Buffer.concat([Buffer.alloc(12), Buffer.from([0x81, 0x00, 0x00, 0x05, 0x08, 0x00]), ip4]);
    expect(tcpOf(LinkType.Ethernet, tagged).dstPort).toBe(3260);
    const arp = Buffer.concat([Buffer.alloc(12), Buffer.from([0x08, 0x06]), Buffer.alloc(28)]);
    expect(networkLayer(LinkType.Ethernet, arp)).toEqual({ kind: 'other', what: 'ethertype 0x0806' });
  });

  it('strips Linux cooked headers (SLL and SLL2)', () => {
    const sll = Buffer.alloc(16);
    sll.writeUInt16BE(0x86dd, 14);
    expect(tcpOf(LinkType.LinuxSll, Buffer.concat([sll, ip6])).dstAddr).toBe('2001:db8::42');
    const sll2 = Buffer.alloc(20);
    sll2.writeUInt16BE(0x0800, 0);
    expect(tcpOf(LinkType.LinuxSll2, Buffer.concat([sll2, ip4])).srcAddr).toBe('192.168.1.10');
  });

  it('handles raw IP link types', () => {
    expect(tcpOf(LinkType.Raw, ip4).srcAddr).toBe('192.168.1.10');
    expect(tcpOf(LinkType.Raw, ip6).srcAddr).toBe('fe80::1');
    expect(tcpOf(LinkType.Ipv4, ip4).seq).toBe(spec.seq);
    expect(tcpOf(LinkType.Ipv6, ip6).ack).toBe(spec.ack);
  });

  it('handles NULL/loopback headers in either byte order', () => {
    const fam = (v: number, le: boolean) => {
      const x = Buffer.alloc(4);
      if (le) x.writeUInt32LE(v);
      else x.writeUInt32BE(v);
      return x;
    };
    expect(tcpOf(LinkType.Null, Buffer.concat([fam(2, true), ip4])).srcPort).toBe(51234);
    expect(tcpOf(LinkType.Null, Buffer.concat([fam(2, false), ip4])).srcPort).toBe(51234);
    expect(tcpOf(LinkType.Null, Buffer.concat([fam(30, true), ip6])).srcAddr).toBe('fe80::1');
    expect(tcpOf(LinkType.Null, Buffer.concat([fam(10, false), ip6])).srcAddr).toBe('fe80::1');
    expect(networkLayer(147, ip4)).toEqual({ kind: 'other', what: 'unsupported link type 147' });
  });
});

describe('decodeIpPacket', () => {
  it('decodes IPv4/TCP and trims Ethernet padding', () => {
    const bare = ipv4Tcp({ ...spec, payload: Buffer.alloc(0) });
    const padded = Buffer.concat([bare, Buffer.alloc(6, 0xee)]);
    const r = decodeIpPacket('ipv4', padded);
    expect(r).toEqual({
      kind: 'tcp',
      segment: { srcAddr: '192.168.1.10', dstAddr: '192.168.1.20', srcPort: 51234, dstPort: 3260, seq: spec.seq, ack: spec.ack, flags: ACK | PSH, payload: Buffer.alloc(0), payloadLength: 0 },
    });
  });

  it('reports a payload cut by the snap length', () => {
    const whole = ipv4Tcp(spec);
    const r = decodeIpPacket('ipv4', whole.subarray(0, whole.length - 3));
    expect(r.kind === 'tcp' && [r.segment.payload.toString(), r.segment.payloadLength]).toEqual(['paylo', 8]);
  });

  it('skips IPv4 fragments with a warning, and ignores other protocols', () => {
    const first = ipv4Tcp(spec, { id: 77, fragment: 0x2000 });
    expect(decodeIpPacket('ipv4', first)).toEqual({ kind: 'warning', message: expect.stringMatching(/IPv4 fragment skipped \(id 77, offset 0\)/) });
    const later = ipv4Tcp(spec, { id: 77, fragment: 0x0010 });
    expect(decodeIpPacket('ipv4', later)).toEqual({ kind: 'warning', message: expect.stringMatching(/offset 128/) });
    const udp = Buffer.from(ipv4Tcp(spec));
    udp[9] = 17;
    expect(decodeIpPacket('ipv4', udp)).toEqual({ kind: 'ignored' });
    expect(decodeIpPacket('ipv4', Buffer.from([0x45, 0, 0]))).toMatchObject({ kind: 'warning' });
  });

  it('walks IPv6 extension headers and skips IPv6 fragments', () => {
    const plain = ipv6Tcp(spec2());
    const hop = Buffer.alloc(8);
    hop[0] = 6; // next header: TCP
    const withHop = Buffer.concat([plain.subarray(0, 40), hop, plain.subarray(40)]);
    withHop[6] = 0;
    withHop.writeUInt16BE(plain.length - 40 + 8, 4);
    const r = decodeIpPacket('ipv6', withHop);
    expect(r.kind === 'tcp' && r.segment.payload.toString()).toBe('payload!');
    const frag = Buffer.from(withHop);
    frag[6] = 44;
    expect(decodeIpPacket('ipv6', frag)).toMatchObject({ kind: 'warning', message: expect.stringMatching(/IPv6 fragment/) });
  });

  it('formats IPv6 addresses in RFC 5952 form', () => {
    const addr = (hex: string) => formatIpv6(Buffer.from(hex.replace(/ /g, ''), 'hex'), 0);
    expect(addr('2001 0db8 0000 0000 0000 0000 0000 0001')).toBe('2001:db8::1');
    expect(addr('0000 0000 0000 0000 0000 0000 0000 0001')).toBe('::1');
    expect(addr('2001 0db8 0000 0001 0000 0000 0001 0000')).toBe('2001:db8:0:1::1:0');
    expect(addr('2001 0db8 0001 0001 0001 0001 0000 0001')).toBe('2001:db8:1:1:1:1:0:1');
    expect(addr('0000 0000 0000 0000 0000 0000 0000 0000')).toBe('::');
  });
});

function spec2() {
  return { ...spec, src: '2001:db8::1', dst: '2001:db8::2' };
}
