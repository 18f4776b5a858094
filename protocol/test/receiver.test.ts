// PduReceiver against the pull framer as the reference: the same frames and errors for any way a
// stream is cut into reads, whether the bytes arrive through the reused read buffer, straight
// into a payload's destination (direct reads), or through push().
import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { PduFramer, type Frame } from '../src/framer.ts';
import { PduReceiver } from '../src/receiver.ts';
import { encodePduBuffer, type DigestSettings } from '../src/pdu.ts';
import type { WireError } from '../src/errors.ts';
import { rng } from './rng.ts';
import { samples } from './samples.ts';


/** A frame as a short comparable string: whole headers, payloads by length and hash. */
type Event = string;

function frameEvent(f: Frame): Event {
  return `frame ${f.header.toString('hex')} ${f.data.length} ${createHash('sha1').update(f.data).digest('hex')}`;
}

function errorEvent(e: WireError, fatal: boolean): Event {
  return `error ${e.kind} fatal=${fatal} ${e.header?.subarray(0, 48).toString('hex') ?? '-'}`;
}

function reference(wire: Buffer, digests: DigestSettings, limit: number): Event[] {
  const f = new PduFramer({ ...digests, maxRecvDataSegmentLength: limit });
  f.push(wire);
  const out: Event[] = [];
  for (let o = f.next(); o; o = f.next()) {
    out.push(o.frame ? frameEvent(o.frame) : errorEvent(o.error, o.fatal));
  }
  return out;
}

/**
 * Feeds `wire` the way a socket with onread would: each read fills at most the buffer the
 * receiver offers (its own, or a payload's remaining bytes), in sizes the PRNG picks; some
 * chunks go through push() instead.
 */
function receive(wire: Buffer, digests: DigestSettings, limit: number, random: () => number, sinkSpace?: Buffer): { events: Event[]; direct: number } {
  const rx = new PduReceiver({ bufferSize: 4096 + Math.floor(random() * 70000), maxRecvDataSegmentLength: limit });
  rx.headerDigest = !!digests.headerDigest;
  rx.dataDigest = !!digests.dataDigest;
  const events: Event[] = [];
  let sinkUsed = 0;
  if (sinkSpace) {
    rx.sink = (_h, length) => {
      if (random() < 0.3 || sinkUsed + length > sinkSpace.length) return undefined;
      const b = sinkSpace.subarray(sinkUsed, sinkUsed + length);
      sinkUsed += length;
      return b;
    };
  }
  rx.onFrame = (f) => events.push(frameEvent(f));
  rx.onError = (e: WireError, fatal) => events.push(errorEvent(e, fatal));
  rx.startStreaming();
  let pos = 0;
  let direct = 0;
  while (pos < wire.length && !rx.isFailed) {
    const want = 1 + Math.floor(random() * (random() < 0.5 ? 64 : 20000));
    if (random() < 0.15) {
      const n = Math.min(want, wire.length - pos);
      rx.push(wire.subarray(pos, pos + n));
      pos += n;
      continue;
    }
    const into = rx.nextReadBuffer();
    if (into !== rx.buffer) direct++;
    const n = Math.min(want, into.length, wire.length - pos);
    wire.copy(into, 0, pos, pos + n);
    pos += n;
    rx.onRead(n);
  }
  return { events, direct };
}

function bigStream(digests: DigestSettings, random: () => number): Buffer {
  const parts: Buffer[] = [];
  for (let i = 0; i < 12; i++) {
    const s = samples[Math.floor(random() * samples.length)]!;
    if (random() < 0.4 && 'data' in s) {
      const len = Math.floor(random() * 200_000);
      const data = Buffer.alloc(len);
      for (let k = 0; k < len; k += 997) data[k] = k & 0xff;
      parts.push(encodePduBuffer({ ...s, data } as typeof s, digests));
    } else parts.push(encodePduBuffer(s, digests));
  }
  return Buffer.concat(parts);
}

describe('PduReceiver', () => {
  const digestCases: DigestSettings[] = [
    { headerDigest: false, dataDigest: false },
    { headerDigest: true, dataDigest: true },
    { headerDigest: false, dataDigest: true },
  ];

  it('delivers the frames the framer does, for 300 random cuttings, with and without digests and sinks', () => {
    let directReads = 0;
    for (let seed = 1; seed <= 300; seed++) {
      const random = rng(seed);
      const digests = digestCases[seed % digestCases.length]!;
      const wire = bigStream(digests, random);
      const want = reference(wire, digests, 1 << 20);
      const got = receive(wire, digests, 1 << 20, random, seed % 2 ? Buffer.alloc(4 << 20) : undefined);
      directReads += got.direct;
      expect(got.events, `seed ${seed}`).toEqual(want);
    }
    // The direct path must actually have been exercised.
    expect(directReads).toBeGreaterThan(100);
  });

  it('matches the framer on corrupted streams: digest errors, oversize segments, noise', () => {
    for (let seed = 1; seed <= 300; seed++) {
      const random = rng(1000 + seed);
      const digests = digestCases[1 + (seed % 2)]!;
      const wire = Buffer.from(bigStream(digests, random));
      const flips = 1 + Math.floor(random() * 3);
      for (let i = 0; i < flips; i++) wire[Math.floor(random() * wire.length)] ^= 1 << Math.floor(random() * 8);
      const limit = random() < 0.3 ? 65536 : 1 << 20;
      const want = reference(wire, digests, limit);
      const got = receive(wire, digests, limit, random, seed % 2 ? Buffer.alloc(4 << 20) : undefined);
      expect(got.events, `seed ${seed}`).toEqual(want);
    }
  });

  it('holds PDUs during login and hands them out one at a time with the settings of the moment', () => {
    const plain = encodePduBuffer(samples[0]!, { headerDigest: false, dataDigest: false });
    const digested = encodePduBuffer(samples[1]!, { headerDigest: true, dataDigest: true });
    const rx = new PduReceiver();
    const frames: Frame[] = [];
    rx.onFrame = (f) => frames.push(f);
    rx.onError = (e) => {
      throw e;
    };
    rx.push(Buffer.concat([plain, digested]));
    expect(frames.length).toBe(0);
    expect(rx.pull()).toBe(true);
    expect(frames.length).toBe(1);
    // Digests start with the next PDU: switched on between the two, in the same segment.
    rx.headerDigest = true;
    rx.dataDigest = true;
    rx.startStreaming();
    expect(frames.length).toBe(2);
    expect(rx.heldBytes).toBe(0);
  });

  it('refuses a segment over the limit on the BHS alone, before any AHS it claims arrives', () => {
    const bhs = Buffer.alloc(48);
    bhs[0] = 0x01;
    bhs[4] = 255; // TotalAHSLength: 1020 bytes that never come
    bhs.writeUIntBE(9000, 5, 3);
    const rx = new PduReceiver();
    const errors: string[] = [];
    rx.onError = (e, fatal) => errors.push(`${e.kind}:${fatal}`);
    rx.startStreaming();
    rx.push(bhs);
    expect(errors).toEqual(['data-segment-too-large:true']);
    expect(rx.isFailed).toBe(true);
  });
});
