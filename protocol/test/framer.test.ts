import { describe, expect, it } from 'vitest';
import { PduFramer, type FramerOutput } from '../src/framer.ts';
import { decodePdu, encodePduBuffer, type DigestSettings } from '../src/pdu.ts';
import { WireError } from '../src/errors.ts';
import { rng } from './rng.ts';
import { samples } from './samples.ts';


function stream(digests: DigestSettings, repeat = 1): { wire: Buffer; count: number } {
  const parts: Buffer[] = [];
  for (let i = 0; i < repeat; i++) for (const s of samples) parts.push(encodePduBuffer(s, digests));
  return { wire: Buffer.concat(parts), count: parts.length };
}

function drain(f: PduFramer, out: FramerOutput[]): void {
  for (let o = f.next(); o; o = f.next()) out.push(o);
}

describe('PduFramer', () => {
  it('yields every PDU whatever the chunking, from 1 byte to the whole stream', () => {
    for (const digests of [{ headerDigest: false, dataDigest: false }, { headerDigest: true, dataDigest: true }]) {
      const { wire, count } = stream(digests, 3);
      for (const size of [1, 2, 3, 7, 47, 48, 49, 100, 4096, wire.length]) {
        const f = new PduFramer({ ...digests, maxRecvDataSegmentLength: 1 << 20 });
        const out: FramerOutput[] = [];
        for (let o = 0; o < wire.length; o += size) {
          f.push(wire.subarray(o, o + size));
          drain(f, out);
        }
        expect(out.length, `chunk size ${size}`).toBe(count);
        out.forEach((o, i) => {
          expect(o.frame, `PDU ${i} chunk size ${size}`).toBeDefined();
          const pdu = decodePdu(o.frame!.header, o.frame!.data);
          expect(pdu.opcode).toBe(samples[i % samples.length]!.opcode);
          expect(encodePduBuffer(pdu, digests)).toEqual(encodePduBuffer(samples[i % samples.length]!, digests));
        });
        expect(f.bufferedBytes).toBe(0);
      }
    }
  });

  it('returns payloads that sit in one chunk as views, without copying', () => {
    const data = Buffer.alloc(262144, 0x11);
    const wire = encodePduBuffer({ ...(samples[15] as Extract<(typeof samples)[number], { opcode: 0x25 }>), data });
    const f = new PduFramer({ maxRecvDataSegmentLength: 262144 });
    f.push(wire);
    const o = f.next()!;
    expect(o.frame!.data.buffer).toBe(wire.buffer);
    expect(o.frame!.data.byteOffset).toBe(wire.byteOffset + 48);
  });

  it('handles multi-MiB chunks holding many PDUs', () => {
    const data = Buffer.alloc(1 << 20, 0x22);
    const one = encodePduBuffer({ ...(samples[15] as Extract<(typeof samples)[number], { opcode: 0x25 }>), data });
    const wire = Buffer.concat(Array.from({ length: 8 }, () => one));
    const f = new PduFramer({ maxRecvDataSegmentLength: 1 << 20 });
    f.push(wire);
    const out: FramerOutput[] = [];
    drain(f, out);
    expect(out.length).toBe(8);
    expect(out.every((o) => o.frame?.data.length === 1 << 20)).toBe(true);
  });

  it('enforces MaxRecvDataSegmentLength as soon as the BHS is in, before buffering the payload', () => {
    const wire = encodePduBuffer(samples[7]!); // 8192-byte Data-Out
    const f = new PduFramer({ maxRecvDataSegmentLength: 4096 });
    f.push(wire.subarray(0, 48));
    const o = f.next()!;
    expect(o.error?.kind).toBe('data-segment-too-large');
    expect(o.error && 'fatal' in o && o.fatal).toBe(true);
    f.push(wire.subarray(48));
    expect(f.next()).toBeUndefined();
    expect(f.bufferedBytes).toBe(0);
  });

  it('the hard cap wins over a larger negotiated value', () => {
    const f = new PduFramer({ maxRecvDataSegmentLength: 1 << 24, hardCap: 65536 });
    const bhs = Buffer.alloc(48);
    bhs[0] = 0x05;
    bhs.writeUIntBE(65537, 5, 3);
    f.push(bhs);
    expect(f.next()!.error?.kind).toBe('data-segment-too-large');
  });

  it('a header digest error is fatal, a data digest error is not', () => {
    const d = { headerDigest: true, dataDigest: true };
    const a = Buffer.from(encodePduBuffer(samples[0]!, d));
    const b = encodePduBuffer(samples[8]!, d);
    const badData = Buffer.from(a);
    badData[48 + 4] ^= 1; // first data byte
    let f = new PduFramer(d);
    f.push(Buffer.concat([badData, b]));
    const first = f.next()!;
    expect(first.error?.kind).toBe('data-digest');
    expect(first.error && 'fatal' in first && first.fatal).toBe(false);
    expect(first.error?.header?.readUInt32BE(16)).toBe(0x01020304); // ITT of the damaged PDU
    expect(f.next()!.frame).toBeDefined(); // the next PDU still comes through

    const badHeader = Buffer.from(a);
    badHeader[20] ^= 0x80;
    f = new PduFramer(d);
    f.push(Buffer.concat([badHeader, b]));
    const o = f.next()!;
    expect(o.error?.kind).toBe('header-digest');
    expect(f.next()).toBeUndefined();
    expect(f.isFailed).toBe(true);
  });

  it('lets the owner turn digests on between two PDUs of the same chunk', () => {
    const plain = encodePduBuffer(samples[13]!); // Login Response
    const digested = encodePduBuffer(samples[10]!, { headerDigest: true, dataDigest: true });
    const f = new PduFramer({ maxRecvDataSegmentLength: 8192 });
    f.push(Buffer.concat([plain, digested]));
    expect(f.next()!.frame).toBeDefined();
    f.headerDigest = true;
    f.dataDigest = true;
    const o = f.next()!;
    expect(o.frame).toBeDefined();
    expect(decodePdu(o.frame!.header, o.frame!.data).opcode).toBe(0x20);
  });

  it('fuzz: random chunking and corruption never crash, hang or buffer without bound', () => {
    const cap = 1 << 20;
    for (let seed = 1; seed <= 400; seed++) {
      const r = rng(seed);
      const digests = { headerDigest: r() < 0.5, dataDigest: r() < 0.5 };
      const { wire } = stream(digests, 2);
      const bad = Buffer.from(wire);
      const flips = Math.floor(r() * 8);
      for (let i = 0; i < flips; i++) bad[Math.floor(r() * bad.length)] = Math.floor(r() * 256);
      // sometimes pure garbage, sometimes a truncated stream
      const input = r() < 0.1 ? Buffer.from(Array.from({ length: 5000 }, () => Math.floor(r() * 256))) : r() < 0.2 ? bad.subarray(0, Math.floor(r() * bad.length)) : bad;
      const f = new PduFramer({ ...digests, maxRecvDataSegmentLength: 65536, hardCap: cap });
      let steps = 0;
      let maxChunk = 0;
      for (let o = 0; o < input.length; ) {
        const n = 1 + Math.floor(r() * (r() < 0.5 ? 64 : 20000));
        const chunk = input.subarray(o, o + n);
        maxChunk = Math.max(maxChunk, chunk.length);
        o += n;
        f.push(chunk);
        for (let out = f.next(); out; out = f.next()) {
          steps++;
          expect(steps).toBeLessThan(10_000); // each call consumes input or fails: no livelock
          if (out.error) {
            expect(out.error).toBeInstanceOf(WireError);
            continue;
          }
          try {
            decodePdu(out.frame.header, out.frame.data);
          } catch (e) {
            expect(e, `seed ${seed}`).toBeInstanceOf(WireError);
          }
        }
        // never more than one (capped) PDU plus the chunk just pushed
        expect(f.bufferedBytes, `seed ${seed}`).toBeLessThanOrEqual(48 + 1020 + 4 + 65536 + 8 + maxChunk);
      }
    }
  });
});
