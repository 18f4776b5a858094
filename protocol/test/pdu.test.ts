import { describe, expect, it } from 'vitest';
import {
  BHS_LENGTH,
  decodePdu,
  encodePdu,
  encodePduBuffer,
  opcodeName,
  pduWireLength,
  readDataSegmentLength,
  type Pdu,
  type PduInit,
} from '../src/pdu.ts';
import { WireError } from '../src/errors.ts';
import { PduFramer } from '../src/framer.ts';
import { samples } from './samples.ts';

function decodeWire(wire: Buffer, headerDigest = false, dataDigest = false): Pdu {
  const f = new PduFramer({ headerDigest, dataDigest, maxRecvDataSegmentLength: 1 << 24 });
  f.push(wire);
  const out = f.next();
  if (!out?.frame) throw out?.error ?? new Error('no frame');
  expect(f.next()).toBeUndefined();
  return decodePdu(out.frame.header, out.frame.data);
}

function expectSameFields(init: PduInit, got: Pdu): void {
  for (const [k, v] of Object.entries(init)) {
    if (k === 'immediate' && (init.opcode >= 0x20 || init.opcode === 0x03)) continue;
    expect((got as unknown as Record<string, unknown>)[k], `field ${k} of ${opcodeName(init.opcode)}`).toEqual(v);
  }
  expect(got.dataSegmentLength).toBe(init.data?.length ?? 0);
}

describe('PDU round trip', () => {
  for (const digests of [
    { headerDigest: false, dataDigest: false },
    { headerDigest: true, dataDigest: false },
    { headerDigest: true, dataDigest: true },
  ]) {
    for (const s of samples) {
      it(`${opcodeName(s.opcode)} (0x${s.opcode.toString(16)}) with ${JSON.stringify(digests)}`, () => {
        const wire = encodePduBuffer(s, digests);
        expect(wire.length).toBe(pduWireLength(wire, digests.headerDigest, digests.dataDigest));
        expect(wire.length % 4).toBe(0);
        const got = decodeWire(wire, digests.headerDigest, digests.dataDigest);
        expect(got.opcode).toBe(s.opcode);
        expectSameFields(s, got);
        // and the decoded PDU encodes back to the very same bytes
        expect(encodePduBuffer(got, digests).equals(wire)).toBe(true);
      });
    }
  }

  it('covers every opcode of RFC 7143', () => {
    const ops = new Set(samples.map((s) => s.opcode));
    expect([...ops].sort((a, b) => a - b)).toEqual([0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x31, 0x32, 0x3f]);
  });
});

describe('PDU wire details', () => {
  it('places fields where RFC 7143 puts them (SCSI Command)', () => {
    const wire = encodePduBuffer(samples[1]!);
    expect(wire.length).toBe(48);
    expect(wire[0]).toBe(0x01);
    expect(wire[1]).toBe(0x80 | 0x40 | 0x01); // F, R, ATTR=simple
    expect(wire.subarray(8, 16)).toEqual(Buffer.from([0, 7, 0, 0, 0, 0, 0, 0]));
    expect(wire.readUInt32BE(16)).toBe(0xdeadbeef);
    expect(wire.readUInt32BE(20)).toBe(262144);
    expect(wire.readUInt32BE(24)).toBe(0xfffffffe);
    expect(wire[32]).toBe(0x28);
  });

  it('sets the I bit only on requests, and always on Login', () => {
    const nop = encodePduBuffer(samples[0]!);
    expect(nop[0]).toBe(0x40);
    const login = encodePduBuffer({ ...(samples[5] as Extract<PduInit, { opcode: 0x03 }>), immediate: false });
    expect(login[0]).toBe(0x43);
  });

  it('pads the data segment to 4 bytes with zeros and keeps DataSegmentLength exact', () => {
    const wire = encodePduBuffer(samples[0]!); // 4 bytes of data
    expect(readDataSegmentLength(wire)).toBe(4);
    const odd = encodePduBuffer({ ...(samples[10] as Extract<PduInit, { opcode: 0x20 }>) }); // 3 bytes
    expect(odd.length).toBe(48 + 4);
    expect(odd[48 + 3]).toBe(0);
  });

  it('encodes a 16+ byte CDB through an Extended CDB AHS', () => {
    const wire = encodePduBuffer(samples[3]!);
    // Extended CDB AHS: AHSLength = 32 - 15 = 17, type 1; bidi AHS: length 5, type 2
    expect(wire[4]).toBe((pad4(3 + 17) + 8) / 4);
    expect(wire.readUInt16BE(48)).toBe(17);
    expect(wire[50]).toBe(1);
  });

  it('does not copy the data segment when encoding', () => {
    const data = Buffer.alloc(262144, 1);
    const parts = encodePdu({ ...(samples[15] as Extract<PduInit, { opcode: 0x25 }>), data });
    expect(parts[1]).toBe(data);
  });

  it('computes the header digest over BHS and AHS, stored little-endian', () => {
    const wire = encodePduBuffer(samples[0]!, { headerDigest: true, dataDigest: false });
    const expected = crc(wire.subarray(0, 48));
    expect(wire.readUInt32LE(48)).toBe(expected);
  });

  it('rejects malformed headers with a typed error', () => {
    const good = encodePduBuffer(samples[8]!);
    const reserved = Buffer.from(good);
    reserved[0] |= 0x80;
    expect(() => decodePdu(reserved)).toThrow(WireError);
    const unknown = Buffer.from(good);
    unknown[0] = 0x07;
    try {
      decodePdu(unknown);
      expect.unreachable();
    } catch (e) {
      expect((e as WireError).kind).toBe('unknown-opcode');
      expect((e as WireError).header?.length).toBe(BHS_LENGTH);
    }
    expect(() => decodePdu(good.subarray(0, 40))).toThrow(/BHS/);
    // DataSegmentLength that disagrees with the data handed in
    expect(() => decodePdu(good, Buffer.alloc(4))).toThrow(/DataSegmentLength/);
  });

  it('rejects a bad AHS', () => {
    const wire = Buffer.from(encodePduBuffer(samples[3]!));
    const header = wire.subarray(0, 48 + wire[4]! * 4);
    header.writeUInt16BE(200, 48); // AHSLength overrunning TotalAHSLength
    expect(() => decodePdu(header)).toThrow(WireError);
    header.writeUInt16BE(17, 48);
    header[50] = 9; // unknown AHS type
    expect(() => decodePdu(header)).toThrow(/AHS type/);
  });
});

import { crc32c as crc } from '../src/digest.ts';
import { pad4 } from '../src/pdu.ts';
