import { describe, expect, it } from 'vitest';
import {
  Asc,
  IscsiSense,
  SenseDataError,
  SenseKey,
  ascName,
  buildInvalidFieldSense,
  buildSense,
  decodeSenseKeySpecific,
  describeSense,
  parseSense,
  senseKeyName,
  unwrapIscsiSense,
  wrapIscsiSense,
} from '../src/scsi/index.ts';
import type { BuildSenseOptions, SenseData, SenseKeySpecific } from '../src/scsi/index.ts';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

function catchSenseError(fn: () => unknown): SenseDataError {
  try {
    fn();
  } catch (e) {
    if (e instanceof SenseDataError) return e;
    throw e;
  }
  throw new Error('expected SenseDataError');
}

describe('constants', () => {
  it('sense keys have their SPC values', () => {
    expect(SenseKey).toEqual({
      NO_SENSE: 0x0,
      RECOVERED_ERROR: 0x1,
      NOT_READY: 0x2,
      MEDIUM_ERROR: 0x3,
      HARDWARE_ERROR: 0x4,
      ILLEGAL_REQUEST: 0x5,
      UNIT_ATTENTION: 0x6,
      DATA_PROTECT: 0x7,
      BLANK_CHECK: 0x8,
      VENDOR_SPECIFIC: 0x9,
      COPY_ABORTED: 0xa,
      ABORTED_COMMAND: 0xb,
      VOLUME_OVERFLOW: 0xd,
      MISCOMPARE: 0xe,
      COMPLETED: 0xf,
    });
    expect(senseKeyName(5)).toBe('ILLEGAL_REQUEST');
    expect(senseKeyName(0xc)).toBe('RESERVED_0xc');
  });

  it('common ASC/ASCQ pairs match the T10 list', () => {
    const expected: Array<[keyof typeof Asc, number, number]> = [
      ['INVALID_COMMAND_OPERATION_CODE', 0x20, 0x00],
      ['LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE', 0x21, 0x00],
      ['INVALID_FIELD_IN_CDB', 0x24, 0x00],
      ['LOGICAL_UNIT_NOT_SUPPORTED', 0x25, 0x00],
      ['INVALID_FIELD_IN_PARAMETER_LIST', 0x26, 0x00],
      ['PARAMETER_LIST_LENGTH_ERROR', 0x1a, 0x00],
      ['MISCOMPARE_DURING_VERIFY_OPERATION', 0x1d, 0x00],
      ['POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED', 0x29, 0x00],
      ['BUS_DEVICE_RESET_FUNCTION_OCCURRED', 0x29, 0x03],
      ['I_T_NEXUS_LOSS_OCCURRED', 0x29, 0x07],
      ['PARAMETERS_CHANGED', 0x2a, 0x00],
      ['MODE_PARAMETERS_CHANGED', 0x2a, 0x01],
      ['RESERVATIONS_PREEMPTED', 0x2a, 0x03],
      ['CAPACITY_DATA_HAS_CHANGED', 0x2a, 0x09],
      ['REPORTED_LUNS_DATA_HAS_CHANGED', 0x3f, 0x0e],
      ['WRITE_ERROR', 0x0c, 0x00],
      ['UNRECOVERED_READ_ERROR', 0x11, 0x00],
      ['LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE', 0x04, 0x00],
      ['LOGICAL_UNIT_COMMUNICATION_FAILURE', 0x08, 0x00],
      ['INTERNAL_TARGET_FAILURE', 0x44, 0x00],
      ['COMMANDS_CLEARED_BY_ANOTHER_INITIATOR', 0x2f, 0x00],
      ['WRITE_PROTECTED', 0x27, 0x00],
      ['SAVING_PARAMETERS_NOT_SUPPORTED', 0x39, 0x00],
      ['INVALID_MESSAGE_ERROR', 0x49, 0x00],
      ['DATA_PHASE_ERROR', 0x4b, 0x00],
      ['INITIATOR_DETECTED_ERROR_MESSAGE_RECEIVED', 0x48, 0x00],
      ['SOME_COMMANDS_CLEARED_BY_ISCSI_PROTOCOL_EVENT', 0x47, 0x7f],
    ];
    for (const [name, asc, ascq] of expected) {
      expect(Asc[name], name).toEqual({ asc, ascq });
      expect(ascName(asc, ascq)).toBe(name);
    }
    expect(ascName(0x24, 0x7e)).toBeUndefined();
  });

  it('no two ASC constants share a code', () => {
    const seen = new Set<number>();
    for (const c of Object.values(Asc)) {
      const k = (c.asc << 8) | c.ascq;
      expect(seen.has(k)).toBe(false);
      seen.add(k);
    }
  });

  it('iSCSI check conditions follow RFC 7143 §11.4.7.2', () => {
    expect(IscsiSense.UNEXPECTED_UNSOLICITED_DATA).toEqual({ key: 0x0b, asc: 0x0c, ascq: 0x0c });
    expect(IscsiSense.INCORRECT_AMOUNT_OF_DATA).toEqual({ key: 0x0b, asc: 0x0c, ascq: 0x0d });
    expect(IscsiSense.PROTOCOL_SERVICE_CRC_ERROR).toEqual({ key: 0x0b, asc: 0x47, ascq: 0x05 });
    expect(IscsiSense.SNACK_REJECTED).toEqual({ key: 0x0b, asc: 0x11, ascq: 0x13 });
  });
});

describe('parseSense on sense bytes seen from real targets', () => {
  it('fixed ILLEGAL REQUEST / INVALID FIELD IN CDB (18 bytes, as tgt sends it)', () => {
    const s = parseSense(hex('70 00 05 00 00 00 00 0a 00 00 00 00 24 00 00 00 00 00'));
    expect(s).toEqual({
      format: 'fixed',
      responseCode: 0x70,
      deferred: false,
      key: SenseKey.ILLEGAL_REQUEST,
      asc: 0x24,
      ascq: 0x00,
      filemark: false,
      eom: false,
      ili: false,
      sdatOvfl: false,
      truncated: false,
    });
    expect(describeSense(s)).toBe('ILLEGAL_REQUEST INVALID_FIELD_IN_CDB (24h/00h)');
  });

  it('fixed INVALID COMMAND OPERATION CODE for an unsupported UNMAP', () => {
    const s = parseSense(hex('70 00 05 00 00 00 00 0a 00 00 00 00 20 00 00 00 00 00'));
    expect(s).toMatchObject({ key: 5, asc: 0x20, ascq: 0x00, truncated: false });
    expect(s.senseKeySpecific).toBeUndefined();
    expect(s.information).toBeUndefined();
  });

  it('fixed MEDIUM ERROR with a valid LBA and a retry count', () => {
    const s = parseSense(hex('f0 00 03 00 12 34 56 0a 00 00 00 00 11 00 00 80 00 05'));
    expect(s).toMatchObject({
      key: SenseKey.MEDIUM_ERROR,
      asc: 0x11,
      ascq: 0x00,
      information: 0x123456n,
      senseKeySpecific: { type: 'actual-retry-count', count: 5 },
    });
  });

  it('descriptor UNIT ATTENTION with no descriptors', () => {
    const s = parseSense(hex('72 06 29 00 00 00 00 00'));
    expect(s).toMatchObject({ format: 'descriptor', key: 6, asc: 0x29, ascq: 0, descriptors: [], truncated: false });
    expect(describeSense(s)).toBe('UNIT_ATTENTION POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED (29h/00h)');
  });

  it('ignores bytes beyond ADDITIONAL SENSE LENGTH (padding in a larger buffer)', () => {
    const buf = Buffer.alloc(96, 0xee);
    hex('70 00 06 00 00 00 00 06 00 00 00 00 2a 09').copy(buf);
    const s = parseSense(buf);
    expect(s).toMatchObject({ key: 6, asc: 0x2a, ascq: 0x09, truncated: false });
    // FRU and SENSE KEY SPECIFIC lie beyond the 14 announced bytes.
    expect(s.fru).toBeUndefined();
    expect(s.senseKeySpecific).toBeUndefined();
  });
});

describe('buildSense fixed format', () => {
  it('lays out the 18 bytes of SPC fixed sense', () => {
    const b = buildSense({
      key: SenseKey.MEDIUM_ERROR,
      ...Asc.UNRECOVERED_READ_ERROR,
      information: 0x01020304,
      commandSpecificInformation: 0x0a0b0c0d,
      fru: 0x42,
      senseKeySpecific: { type: 'actual-retry-count', count: 0x0102 },
      ili: true,
    });
    expect(b).toEqual(hex('f0 00 23 01 02 03 04 0a 0a 0b 0c 0d 11 00 42 80 01 02'));
  });

  it('defaults to current fixed sense without VALID', () => {
    expect(buildSense({ key: 5, ...Asc.INVALID_FIELD_IN_CDB })).toEqual(
      hex('70 00 05 00 00 00 00 0a 00 00 00 00 24 00 00 00 00 00'),
    );
    expect(buildSense({ key: 6, ...Asc.POWER_ON_OCCURRED, deferred: true })[0]).toBe(0x71);
  });

  it('leaves VALID clear when INFORMATION does not fit in 4 bytes', () => {
    const b = buildSense({ key: 3, ...Asc.UNRECOVERED_READ_ERROR, information: 0x1_0000_0000n });
    expect(b[0]).toBe(0x70);
    expect(b.readUInt32BE(3)).toBe(0);
    expect(parseSense(b).information).toBeUndefined();
  });

  it('encodes the field pointer of ILLEGAL REQUEST', () => {
    expect(buildInvalidFieldSense('cdb', 1, 3)).toEqual(hex('70 00 05 00 00 00 00 0a 00 00 00 00 24 00 00 cb 00 01'));
    expect(buildInvalidFieldSense('parameter-list', 0x0102).subarray(12)).toEqual(hex('26 00 00 80 01 02'));
  });

  it('rejects out-of-range values', () => {
    expect(() => buildSense({ key: 16, asc: 0, ascq: 0 })).toThrow(RangeError);
    expect(() => buildSense({ key: 5, asc: 256, ascq: 0 })).toThrow(RangeError);
    expect(() => buildSense({ key: 5, asc: 0, ascq: -1 })).toThrow(RangeError);
    expect(() => buildSense({ key: 5, asc: 0, ascq: 0, information: -1 })).toThrow(RangeError);
    expect(() => buildSense({ key: 5, asc: 0, ascq: 0, commandSpecificInformation: 2 ** 32 })).toThrow(RangeError);
    expect(() => buildSense({ key: 5, asc: 0, ascq: 0, information: 2 ** 60 })).toThrow(RangeError);
    expect(() =>
      buildSense({ key: 5, asc: 0x24, ascq: 0, senseKeySpecific: { type: 'field-pointer', inCdb: true, fieldPointer: 0x10000 } }),
    ).toThrow(RangeError);
    expect(() => buildSense({ key: 5, asc: 0, ascq: 0, descriptors: [{ type: 0x80, data: Buffer.alloc(2) }] })).toThrow(
      TypeError,
    );
  });
});

describe('buildSense descriptor format', () => {
  it('lays out header and descriptors in SPC order', () => {
    const b = buildSense({
      format: 'descriptor',
      key: SenseKey.ILLEGAL_REQUEST,
      ...Asc.INVALID_FIELD_IN_CDB,
      information: 0x0102030405060708n,
      senseKeySpecific: { type: 'field-pointer', inCdb: true, fieldPointer: 2 },
    });
    expect(b).toEqual(
      hex(`72 05 24 00 00 00 00 14
           00 0a 80 00 01 02 03 04 05 06 07 08
           02 06 00 00 c0 00 02 00`),
    );
  });

  it('reports ILI in the block commands descriptor and FILEMARK/EOM in the stream one', () => {
    const block = buildSense({ format: 'descriptor', key: 3, asc: 0x11, ascq: 0, ili: true });
    expect(block.subarray(8)).toEqual(hex('05 02 00 20'));
    const stream = buildSense({ format: 'descriptor', key: 0, asc: 0, ascq: 1, filemark: true, ili: true });
    expect(stream.subarray(8)).toEqual(hex('04 02 00 a0'));
  });

  it('keeps the total within the SPC limit of 252 bytes', () => {
    const big = { type: 0x80, data: Buffer.alloc(250) };
    expect(() => buildSense({ format: 'descriptor', key: 5, asc: 0, ascq: 0, descriptors: [big] })).toThrow(RangeError);
    const ok = buildSense({ format: 'descriptor', key: 5, asc: 0, ascq: 0, descriptors: [{ type: 0x80, data: Buffer.alloc(242) }] });
    expect(ok.length).toBe(252);
    expect(ok[7]).toBe(244);
  });
});

describe('build/parse round trip', () => {
  const specifics: Array<[number, SenseKeySpecific]> = [
    [SenseKey.ILLEGAL_REQUEST, { type: 'field-pointer', inCdb: true, fieldPointer: 8, bitPointer: 7 }],
    [SenseKey.ILLEGAL_REQUEST, { type: 'field-pointer', inCdb: false, fieldPointer: 0xfffe }],
    [SenseKey.HARDWARE_ERROR, { type: 'actual-retry-count', count: 3 }],
    [SenseKey.NOT_READY, { type: 'progress', progress: 0x8000 }],
    [SenseKey.NO_SENSE, { type: 'progress', progress: 0 }],
    [SenseKey.COPY_ABORTED, { type: 'segment-pointer', segmentDescriptor: true, fieldPointer: 16, bitPointer: 2 }],
    [SenseKey.UNIT_ATTENTION, { type: 'unit-attention-queue-overflow', overflow: true }],
    [SenseKey.DATA_PROTECT, { type: 'raw', bytes: hex('12 34 56') }],
  ];

  for (const format of ['fixed', 'descriptor'] as const) {
    for (const [key, sks] of specifics) {
      it(`${format} ${senseKeyName(key)} ${sks.type}`, () => {
        const opts: BuildSenseOptions = {
          format,
          key,
          asc: 0x3f,
          ascq: 0x0e,
          information: 0xdeadbeef,
          commandSpecificInformation: 7,
          fru: 9,
          senseKeySpecific: sks,
          deferred: key === SenseKey.HARDWARE_ERROR,
          ili: key === SenseKey.ILLEGAL_REQUEST,
        };
        const s = parseSense(buildSense(opts));
        expect(s).toMatchObject({
          format,
          deferred: opts.deferred,
          key,
          asc: 0x3f,
          ascq: 0x0e,
          information: 0xdeadbeefn,
          commandSpecificInformation: 7n,
          fru: 9,
          senseKeySpecific: sks,
          ili: opts.ili,
          filemark: false,
          eom: false,
          truncated: false,
        });
        expect(s.responseCode).toBe((format === 'fixed' ? 0x70 : 0x72) + (opts.deferred ? 1 : 0));
      });
    }
  }

  it('descriptor format carries 64-bit INFORMATION and COMMAND-SPECIFIC INFORMATION', () => {
    const s = parseSense(
      buildSense({
        format: 'descriptor',
        key: 3,
        asc: 0x11,
        ascq: 0,
        information: 0xffff_ffff_ffff_fff0n,
        commandSpecificInformation: 2 ** 40,
      }),
    );
    expect(s.information).toBe(0xffff_ffff_ffff_fff0n);
    expect(s.commandSpecificInformation).toBe(2n ** 40n);
  });

  it('descriptor format keeps vendor descriptors and reports FILEMARK/EOM', () => {
    const s = parseSense(
      buildSense({
        format: 'descriptor',
        key: 0,
        asc: 0,
        ascq: 2,
        eom: true,
        descriptors: [{ type: 0x80, data: hex('01 02 03') }],
      }),
    );
    expect(s).toMatchObject({ eom: true, filemark: false, ili: false });
    expect(s.descriptors).toEqual([
      { type: 0x04, data: hex('00 40') },
      { type: 0x80, data: hex('01 02 03') },
    ]);
  });

  it('a minimal build parses back to exactly its fields', () => {
    const expected: SenseData = {
      format: 'fixed',
      responseCode: 0x70,
      deferred: false,
      key: 0xb,
      asc: 0x47,
      ascq: 0x05,
      filemark: false,
      eom: false,
      ili: false,
      sdatOvfl: false,
      truncated: false,
    };
    expect(parseSense(buildSense(IscsiSense.PROTOCOL_SERVICE_CRC_ERROR))).toEqual(expected);
  });
});

describe('parseSense on truncated input', () => {
  const full = buildSense({
    key: 5,
    ...Asc.INVALID_FIELD_IN_CDB,
    information: 1,
    senseKeySpecific: { type: 'field-pointer', inCdb: true, fieldPointer: 4 },
  });

  it('returns the sense key from 3 bytes of fixed sense', () => {
    const s = parseSense(full.subarray(0, 3));
    expect(s).toMatchObject({ format: 'fixed', key: 5, truncated: true });
    expect(s.asc).toBeUndefined();
    expect(s.ascq).toBeUndefined();
    expect(s.information).toBeUndefined();
  });

  it('returns ASC without ASCQ when cut after byte 12', () => {
    const s = parseSense(full.subarray(0, 13));
    expect(s).toMatchObject({ key: 5, asc: 0x24, information: 1n, truncated: true });
    expect(s.ascq).toBeUndefined();
    expect(s.senseKeySpecific).toBeUndefined();
    expect(describeSense(s)).toBe('ILLEGAL_REQUEST ASC 24h/??');
  });

  it('drops the sense key specific bytes when they are cut', () => {
    const s = parseSense(full.subarray(0, 16));
    expect(s).toMatchObject({ asc: 0x24, ascq: 0, truncated: true });
    expect(s.senseKeySpecific).toBeUndefined();
    expect(parseSense(full).senseKeySpecific).toEqual({ type: 'field-pointer', inCdb: true, fieldPointer: 4 });
  });

  it('honours a short ADDITIONAL SENSE LENGTH even when more bytes follow', () => {
    const b = Buffer.from(full);
    b[7] = 5; // only up to byte 12
    const s = parseSense(b);
    expect(s).toMatchObject({ asc: 0x24, truncated: false });
    expect(s.ascq).toBeUndefined();
  });

  it('keeps complete descriptors and flags a cut one', () => {
    const d = buildSense({
      format: 'descriptor',
      key: 5,
      ...Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
      information: 0x1234n,
      senseKeySpecific: { type: 'field-pointer', inCdb: true, fieldPointer: 2 },
    });
    const s = parseSense(d.subarray(0, d.length - 3));
    expect(s).toMatchObject({ key: 5, asc: 0x21, ascq: 0, information: 0x1234n, truncated: true });
    expect(s.senseKeySpecific).toBeUndefined();
    expect(s.descriptors).toHaveLength(1);
    expect(parseSense(d.subarray(0, 2))).toMatchObject({ format: 'descriptor', key: 5, truncated: true });
    expect(parseSense(d.subarray(0, 9))).toMatchObject({ asc: 0x21, descriptors: [], truncated: true });
  });

  it('flags a descriptor that overruns ADDITIONAL SENSE LENGTH', () => {
    // Announces 6 bytes of descriptors, but the one descriptor claims 6 data bytes.
    const s = parseSense(hex('72 05 24 00 00 00 00 06 02 06 00 00 c0 00'));
    expect(s).toMatchObject({ key: 5, asc: 0x24, ascq: 0, descriptors: [], truncated: true });
    expect(s.senseKeySpecific).toBeUndefined();
  });

  it('reports SDAT_OVFL in both formats', () => {
    expect(parseSense(hex('70 00 15 00 00 00 00 0a 00 00 00 00 24 00 00 00 00 00')).sdatOvfl).toBe(true);
    expect(parseSense(hex('72 05 24 00 80 00 00 00')).sdatOvfl).toBe(true);
  });

  it('throws SenseDataError for data that is not sense at all', () => {
    expect(catchSenseError(() => parseSense(Buffer.alloc(0))).code).toBe('EMPTY');
    expect(catchSenseError(() => parseSense(hex('00 00 05'))).code).toBe('NOT_SENSE_DATA');
    expect(catchSenseError(() => parseSense(hex('74 00 05'))).code).toBe('NOT_SENSE_DATA');
    expect(catchSenseError(() => parseSense(hex('7f 00 05'))).code).toBe('VENDOR_SPECIFIC_FORMAT');
    expect(catchSenseError(() => parseSense(hex('ff 00 05'))).code).toBe('VENDOR_SPECIFIC_FORMAT');
  });
});

describe('decodeSenseKeySpecific', () => {
  it('returns undefined when SKSV is clear', () => {
    expect(decodeSenseKeySpecific(5, hex('40 00 10'))).toBeUndefined();
    expect(decodeSenseKeySpecific(5, hex('c0'))).toBeUndefined();
  });

  it('reads the field pointer bit layout', () => {
    expect(decodeSenseKeySpecific(5, hex('cd 01 00'))).toEqual({
      type: 'field-pointer',
      inCdb: true,
      fieldPointer: 0x100,
      bitPointer: 5,
    });
    // BIT POINTER is only meaningful with BPV set.
    expect(decodeSenseKeySpecific(5, hex('85 00 03'))).toEqual({ type: 'field-pointer', inCdb: false, fieldPointer: 3 });
  });
});

describe('iSCSI SenseLength framing', () => {
  it('wraps with a 2-byte big-endian length and unwraps back', () => {
    const sense = buildSense({ key: 5, ...Asc.INVALID_FIELD_IN_CDB });
    const seg = wrapIscsiSense(sense);
    expect(seg.subarray(0, 2)).toEqual(hex('00 12'));
    expect(seg.length).toBe(20);
    expect(unwrapIscsiSense(seg)).toEqual(sense);
  });

  it('ignores response data after the sense bytes', () => {
    const seg = Buffer.concat([wrapIscsiSense(hex('72 06 29 00 00 00 00 00')), hex('de ad be ef')]);
    expect(unwrapIscsiSense(seg)).toEqual(hex('72 06 29 00 00 00 00 00'));
  });

  it('returns undefined when there is no sense', () => {
    expect(unwrapIscsiSense(Buffer.alloc(0))).toBeUndefined();
    expect(unwrapIscsiSense(hex('00'))).toBeUndefined();
    expect(unwrapIscsiSense(hex('00 00 70 00'))).toBeUndefined();
  });

  it('returns the available bytes when SenseLength overstates them', () => {
    const got = unwrapIscsiSense(hex('00 12 70 00 05'));
    expect(got).toEqual(hex('70 00 05'));
    expect(parseSense(got!)).toMatchObject({ key: 5, truncated: true });
  });

  it('refuses sense longer than SenseLength can express', () => {
    expect(() => wrapIscsiSense(Buffer.alloc(0x10000))).toThrow(RangeError);
  });
});
