// SPC commands of the embedded target, driven through EmbeddedTarget.execute() with hand-built
// CDBs against temporary image files.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { parseSense, type SenseData } from '../protocol/src/scsi/sense.ts';
import { COMMANDS, EmbeddedTarget, type EmbeddedLunOptions } from '../src/scsi/embedded-target.ts';
import type { ItNexus, ScsiOutcome } from '../src/scsi/task.ts';

const TARGET = 'iqn.2026-11.test:embedded';
const GOOD = 0x00;
const CHECK_CONDITION = 0x02;
const RESERVATION_CONFLICT = 0x18;

function nexus(name = 'iqn.2026-11.test:host1', isid = '400001370000', tsih = 1): ItNexus {
  return { initiatorName: name, isid, tsih, targetName: TARGET, portalGroupTag: 1, initiatorPort: `${name},i,0x${isid}` };
}

const A = nexus();
const B = nexus('iqn.2026-11.test:host2', '400001370001', 2);

/** A CDB as iSCSI carries it: the command bytes followed by zero padding to 16 bytes. */
function cdb(bytes: number[]): Buffer {
  const b = Buffer.alloc(Math.max(16, bytes.length));
  Buffer.from(bytes).copy(b);
  return b;
}

let dir: string;
let target: EmbeddedTarget;

async function makeTarget(luns: EmbeddedLunOptions[]): Promise<EmbeddedTarget> {
  const t = new EmbeddedTarget({ targetName: TARGET, luns });
  await t.open();
  return t;
}

async function exec(
  bytes: number[],
  opts: { nexus?: ItNexus; lun?: number; dataOut?: Buffer; dataInLength?: number; on?: EmbeddedTarget } = {},
): Promise<ScsiOutcome> {
  return (opts.on ?? target).execute({
    nexus: opts.nexus ?? A,
    lun: opts.lun ?? 0,
    cdb: cdb(bytes),
    attr: 1,
    itt: 1,
    read: true,
    write: (opts.dataOut?.length ?? 0) > 0,
    dataOut: opts.dataOut ?? Buffer.alloc(0),
    dataInLength: opts.dataInLength ?? 4096,
    signal: new AbortController().signal,
  });
}

/** The first command of a new I_T nexus reports the power-on unit attention; get it out of the way. */
async function login(n: ItNexus, on = target): Promise<void> {
  const r = await exec([0x00, 0, 0, 0, 0, 0], { nexus: n, on });
  expect(r.status).toBe(CHECK_CONDITION);
  expect(sense(r)).toMatchObject({ key: 0x6, asc: 0x29, ascq: 0x00 });
}

function sense(r: ScsiOutcome): SenseData {
  expect(r.sense).toBeDefined();
  return parseSense(r.sense!);
}

function expectCheck(r: ScsiOutcome, key: number, asc: number, ascq: number): SenseData {
  expect(r.status).toBe(CHECK_CONDITION);
  const s = sense(r);
  expect([s.key, s.asc, s.ascq]).toEqual([key, asc, ascq]);
  return s;
}

function expectFieldPointer(s: SenseData, inCdb: boolean, byte: number, bit?: number): void {
  expect(s.senseKeySpecific).toEqual(
    bit === undefined
      ? { type: 'field-pointer', inCdb, fieldPointer: byte }
      : { type: 'field-pointer', inCdb, fieldPointer: byte, bitPointer: bit },
  );
}

function data(r: ScsiOutcome): Buffer {
  expect(r.status).toBe(GOOD);
  return r.dataIn ?? Buffer.alloc(0);
}

const inquiry = (evpd: number, page: number, alloc: number): number[] => [0x12, evpd, page, alloc >> 8, alloc & 0xff, 0];
const modeSense6 = (pcPage: number, alloc = 255, b1 = 0, subpage = 0): number[] => [0x1a, b1, pcPage, subpage, alloc, 0];
const modeSense10 = (pcPage: number, alloc = 1024, b1 = 0): number[] => [0x5a, b1, pcPage, 0, 0, 0, 0, alloc >> 8, alloc & 0xff, 0];
const rsoc = (b2: number, opcode = 0, sa = 0, alloc = 65535): number[] => [
  0xa3, 0x0c, b2, opcode, sa >> 8, sa & 0xff, alloc >>> 24, (alloc >> 16) & 0xff, (alloc >> 8) & 0xff, alloc & 0xff, 0, 0,
];

beforeEach(async () => {
  dir = mkdtempSync(path.join(tmpdir(), 'detour-scsi-spc-'));
  target = await makeTarget([{ file: path.join(dir, 'lu0.img'), size: 8 << 20 }]);
});

afterEach(async () => {
  await target.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('unit attention on a new I_T nexus', () => {
  it('fails the first TEST UNIT READY with POWER ON, RESET, OR BUS DEVICE RESET OCCURRED, then succeeds', async () => {
    const first = await exec([0x00, 0, 0, 0, 0, 0]);
    expectCheck(first, 0x6, 0x29, 0x00);
    const second = await exec([0x00, 0, 0, 0, 0, 0]);
    expect(second.status).toBe(GOOD);
  });

  it('lets INQUIRY and REPORT LUNS through without consuming the condition', async () => {
    expect((await exec(inquiry(0, 0, 96))).status).toBe(GOOD);
    expect((await exec([0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])).status).toBe(GOOD);
    expectCheck(await exec([0x00, 0, 0, 0, 0, 0]), 0x6, 0x29, 0x00);
  });

  it('returns and clears it with REQUEST SENSE, fixed or descriptor format', async () => {
    const fixed = data(await exec([0x03, 0, 0, 0, 252, 0]));
    expect(fixed[0]).toBe(0x70);
    expect(parseSense(fixed)).toMatchObject({ key: 0x6, asc: 0x29, ascq: 0x00 });
    const none = data(await exec([0x03, 0x01, 0, 0, 252, 0]));
    expect(none[0]).toBe(0x72);
    expect(parseSense(none)).toMatchObject({ key: 0x0, asc: 0x00, ascq: 0x00 });
    expect((await exec([0x00, 0, 0, 0, 0, 0])).status).toBe(GOOD);
  });

  it('is established for each new session, and by nexusOpened before any command', async () => {
    await login(A);
    target.nexusOpened(B);
    expectCheck(await exec([0x00, 0, 0, 0, 0, 0], { nexus: B }), 0x6, 0x29, 0x00);
    // Same initiator port, new session (new TSIH): a new nexus again.
    const again = { ...A, tsih: 77 };
    expectCheck(await exec([0x00, 0, 0, 0, 0, 0], { nexus: again }), 0x6, 0x29, 0x00);
    expect((await exec([0x00, 0, 0, 0, 0, 0], { nexus: again })).status).toBe(GOOD);
  });

  it('is established for every nexus by a LOGICAL UNIT RESET', async () => {
    await login(A);
    await login(B);
    expect(await target.reset(A, 'lun', 0)).toBe(0);
    expectCheck(await exec([0x00, 0, 0, 0, 0, 0]), 0x6, 0x29, 0x00);
    expectCheck(await exec([0x00, 0, 0, 0, 0, 0], { nexus: B }), 0x6, 0x29, 0x00);
    expect(await target.reset(A, 'lun', 9)).toBe(2); // no such LUN
  });
});

describe('INQUIRY', () => {
  beforeEach(() => login(A));

  it('returns SPC-4 standard data', async () => {
    const d = data(await exec(inquiry(0, 0, 255)));
    expect(d.length).toBe(96);
    expect(d[0]).toBe(0x00); // connected direct access block device
    expect(d[1]).toBe(0x00); // not removable
    expect(d[2]).toBe(0x06); // SPC-4
    expect(d[3]).toBe(0x12); // HISUP, response data format 2
    expect(d[4]).toBe(91); // additional length
    expect(d[7]).toBe(0x02); // CMDQUE
    expect(d.subarray(8, 16).toString('ascii')).toBe('DETOUR  ');
    expect(d.subarray(16, 32).toString('ascii')).toBe('EMBEDDED-DISK   ');
    expect(d.subarray(32, 36).toString('ascii')).toBe('0001');
    const descriptors = [0, 1, 2, 3].map((i) => d.readUInt16BE(58 + 2 * i));
    expect(descriptors).toEqual([0x00a0, 0x0960, 0x0460, 0x04c0]);
  });

  it('honours the allocation length, and 511 and 512 give the same data', async () => {
    expect(data(await exec(inquiry(0, 0, 5))).length).toBe(5);
    const a = data(await exec(inquiry(0, 0, 511)));
    const b = data(await exec(inquiry(0, 0, 512)));
    expect(a.equals(b)).toBe(true);
  });

  it('rejects a page code without EVPD, pointing at byte 2', async () => {
    const s = expectCheck(await exec(inquiry(0, 0x83, 255)), 0x5, 0x24, 0x00);
    expectFieldPointer(s, true, 2);
  });

  it('lists and serves the supported VPD pages', async () => {
    const list = data(await exec(inquiry(1, 0x00, 255)));
    expect([...list.subarray(4)]).toEqual([0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    expect(list.readUInt16BE(2)).toBe(6);
    for (const page of list.subarray(4)) {
      const d = data(await exec(inquiry(1, page, 255)));
      expect(d[1]).toBe(page);
      expect(d.length).toBe(4 + d.readUInt16BE(2));
    }
    expectCheck(await exec(inquiry(1, 0x86, 255)), 0x5, 0x24, 0x00);
  });

  it('has a block limits page that matches what the target enforces', async () => {
    const d = data(await exec(inquiry(1, 0xb0, 255)));
    const lu = target.logicalUnit(0)!;
    expect(d.length).toBe(64);
    expect(d.readUInt16BE(2)).toBe(0x3c);
    expect(d[4]).toBe(0); // WSNZ
    expect(d[5]).toBe(lu.limits.maxCompareAndWriteBlocks);
    expect(d.readUInt16BE(6)).toBe(8); // optimal granularity: 4 KiB in 512-byte blocks
    expect(d.readUInt32BE(8)).toBe(131072); // 64 MiB
    expect(d.readUInt32BE(12)).toBe(2048); // 1 MiB
    expect(d.readUInt32BE(20)).toBe(lu.limits.maxUnmapBlocks);
    expect(d.readUInt32BE(24)).toBe(256);
    expect(d.readBigUInt64BE(36)).toBe(BigInt(lu.limits.maxWriteSameBlocks));
    expect(d.readUInt32BE(44)).toBe(0); // no atomic writes
  });

  it('a configured maximum transfer length is stated (optimal no larger) and enforced, one block past it refused', async () => {
    const small = await makeTarget([{ file: path.join(dir, 'small.img'), size: 1 << 20, maxTransferBytes: 8192 }]);
    try {
      await login(A, small);
      const d = data(await exec(inquiry(1, 0xb0, 255), { on: small }));
      expect(d.readUInt32BE(8)).toBe(16);
      expect(d.readUInt32BE(12)).toBe(16);
      // READ(10) of 16 blocks, then of 17.
      expect((await exec([0x28, 0, 0, 0, 0, 0, 0, 0, 16, 0], { on: small, dataInLength: 8192 })).status).toBe(0);
      expectCheck(await exec([0x28, 0, 0, 0, 0, 0, 0, 0, 17, 0], { on: small, dataInLength: 8704 }), 0x5, 0x24, 0x00);
    } finally {
      await small.close();
    }
    await expect(makeTarget([{ file: path.join(dir, 'bad.img'), size: 1 << 20, maxTransferBytes: 100 }])).rejects.toThrow(/maxTransferBytes/);
  });

  it('reports a non-rotating medium and thin provisioning with zeroed unmapped blocks', async () => {
    const b1 = data(await exec(inquiry(1, 0xb1, 255)));
    expect(b1.readUInt16BE(2)).toBe(0x3c);
    expect(b1.readUInt16BE(4)).toBe(1);
    const b2 = data(await exec(inquiry(1, 0xb2, 255)));
    expect(b2.readUInt16BE(2)).toBe(4);
    expect(b2[5]).toBe(0x80 | 0x40 | 0x20 | 0x04); // LBPU LBPWS LBPWS10 LBPRZ
    expect(b2[6]! & 0x07).toBe(0x02); // thin provisioned
  });

  it('identifies the unit with an NAA 6 designator, a T10 vendor ID and the target port', async () => {
    const d = data(await exec(inquiry(1, 0x83, 255)));
    const found: { codeSet: number; piv: boolean; assoc: number; type: number; value: Buffer }[] = [];
    for (let o = 4; o < d.length; ) {
      const len = d[o + 3]!;
      found.push({
        codeSet: d[o]! & 0x0f,
        piv: (d[o + 1]! & 0x80) !== 0,
        assoc: (d[o + 1]! >> 4) & 0x03,
        type: d[o + 1]! & 0x0f,
        value: d.subarray(o + 4, o + 4 + len),
      });
      o += 4 + len;
    }
    const naa = found.find((f) => f.type === 3)!;
    expect(naa.codeSet).toBe(1);
    expect(naa.assoc).toBe(0);
    expect(naa.value.length).toBe(16);
    expect(naa.value[0]! >> 4).toBe(6);
    expect(naa.value.equals(target.logicalUnit(0)!.naa)).toBe(true);
    const t10 = found.find((f) => f.type === 1)!;
    expect(t10.value.toString('ascii')).toBe(`DETOUR  ${target.logicalUnit(0)!.serial}`);
    const port = found.find((f) => f.type === 8 && f.assoc === 1)!;
    expect(port.piv).toBe(true);
    expect(port.value.toString('utf8').replace(/\0+$/, '')).toBe(`${TARGET},t,0x0001`);
    expect(port.value.length % 4).toBe(0);
    const rel = found.find((f) => f.type === 4)!;
    expect(rel.value.readUInt16BE(2)).toBe(1); // the portal group tag
  });

  it('keeps the serial number and NAA across restarts, and they follow the image', async () => {
    const serial = data(await exec(inquiry(1, 0x80, 255))).subarray(4).toString('ascii');
    const naa = Buffer.from(target.logicalUnit(0)!.naa);
    expect(serial).toMatch(/^[0-9A-F]{20}$/);
    await target.close();
    target = await makeTarget([{ file: path.join(dir, 'lu0.img') }]);
    await login(A);
    expect(data(await exec(inquiry(1, 0x80, 255))).subarray(4).toString('ascii')).toBe(serial);
    expect(target.logicalUnit(0)!.naa.equals(naa)).toBe(true);

    const other = await makeTarget([{ file: path.join(dir, 'other.img'), size: 1 << 20 }]);
    expect(other.logicalUnit(0)!.serial).not.toBe(serial);
    expect(other.logicalUnit(0)!.naa.equals(naa)).toBe(false);
    await other.close();

    const named = await makeTarget([{ file: path.join(dir, 'other.img'), serial: 'SN-0042' }]);
    await login(A, named);
    const page = data(await exec(inquiry(1, 0x80, 255), { on: named }));
    expect(page.subarray(4).toString('ascii')).toBe('SN-0042');
    await named.close();
  });
});

describe('LUN addressing', () => {
  beforeEach(async () => {
    await target.close();
    target = await makeTarget([
      { file: path.join(dir, 'a.img'), size: 1 << 20 },
      { file: path.join(dir, 'b.img'), size: 1 << 20, lun: 5 },
      { file: path.join(dir, 'c.img'), size: 1 << 20, lun: 300 },
    ]);
  });

  it('lists every LUN in REPORT LUNS, with flat addressing above 255', async () => {
    const d = data(await exec([0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]));
    expect(d.readUInt32BE(0)).toBe(24);
    expect([...d.subarray(8, 16)]).toEqual([0, 0, 0, 0, 0, 0, 0, 0]);
    expect([...d.subarray(16, 24)]).toEqual([0, 5, 0, 0, 0, 0, 0, 0]);
    expect([...d.subarray(24, 32)]).toEqual([0x41, 0x2c, 0, 0, 0, 0, 0, 0]);
    // Well known logical units only: there are none.
    expect(data(await exec([0xa0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0])).readUInt32BE(0)).toBe(0);
    expectCheck(await exec([0xa0, 0, 3, 0, 0, 0, 0, 0, 1, 0, 0, 0]), 0x5, 0x24, 0x00);
    expectCheck(await exec([0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0]), 0x5, 0x24, 0x00);
  });

  it('answers for a LUN with no logical unit as SPC requires', async () => {
    const inq = data(await exec(inquiry(0, 0, 96), { lun: 7 }));
    expect(inq[0]).toBe(0x7f); // peripheral qualifier 011b, device type 1Fh
    const rl = data(await exec([0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], { lun: 7 }));
    expect(rl.readUInt32BE(0)).toBe(24);
    const rs = data(await exec([0x03, 0, 0, 0, 252, 0], { lun: 7 }));
    expect(parseSense(rs)).toMatchObject({ key: 0x5, asc: 0x25, ascq: 0x00 });
    expectCheck(await exec([0x00, 0, 0, 0, 0, 0], { lun: 7 }), 0x5, 0x25, 0x00);
    expectCheck(await exec([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], { lun: 7 }), 0x5, 0x25, 0x00);
  });

  it('keeps unit attentions per logical unit', async () => {
    await login(A);
    // LUN 5 still has its own power-on condition pending.
    expectCheck(await exec([0x00, 0, 0, 0, 0, 0], { lun: 5 }), 0x6, 0x29, 0x00);
    expect((await exec([0x00, 0, 0, 0, 0, 0], { lun: 5 })).status).toBe(GOOD);
  });
});

describe('CDB validation', () => {
  beforeEach(() => login(A));

  it('rejects unknown operation codes with INVALID COMMAND OPERATION CODE', async () => {
    expectCheck(await exec([0xc1, 0, 0, 0, 0, 0]), 0x5, 0x20, 0x00);
    expectCheck(await exec([0x04, 0, 0, 0, 0, 0]), 0x5, 0x20, 0x00); // FORMAT UNIT is not offered
  });

  it('rejects unknown service actions with INVALID FIELD IN CDB at byte 1', async () => {
    const s = expectCheck(await exec([0x9e, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]), 0x5, 0x24, 0x00);
    expectFieldPointer(s, true, 1, 4);
    expectCheck(await exec([0x5e, 0x04, 0, 0, 0, 0, 0, 0, 32, 0]), 0x5, 0x24, 0x00);
  });

  it('rejects reserved bits and NACA with a field pointer to the offending bit', async () => {
    expectFieldPointer(expectCheck(await exec([0x00, 0x20, 0, 0, 0, 0]), 0x5, 0x24, 0x00), true, 1, 5);
    expectFieldPointer(expectCheck(await exec([0x00, 0, 0, 0, 0, 0x04]), 0x5, 0x24, 0x00), true, 5, 2);
    expectFieldPointer(expectCheck(await exec([0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0]), 0x5, 0x24, 0x00), true, 1, 5);
    // Vendor specific bits of the CONTROL byte are ignored.
    expect((await exec([0x00, 0, 0, 0, 0, 0xc0])).status).toBe(GOOD);
  });
});

describe('MODE SENSE', () => {
  beforeEach(() => login(A));

  it('returns all pages in order after a block descriptor', async () => {
    const d = data(await exec(modeSense6(0x3f)));
    expect(d[0]).toBe(d.length - 1); // mode data length
    expect(d[1]).toBe(0); // medium type
    expect(d[2]).toBe(0x10); // DPOFUA, not write protected
    expect(d[3]).toBe(8);
    expect(d.readUInt32BE(4)).toBe(16384); // 8 MiB / 512
    expect(d.readUIntBE(9, 3)).toBe(512);
    let o = 12;
    const pages: number[] = [];
    while (o < d.length) {
      pages.push(d[o]!);
      o += 2 + d[o + 1]!;
    }
    expect(o).toBe(d.length);
    expect(pages).toEqual([0x08, 0x0a, 0x1c]);
    const caching = d.subarray(12, 32);
    expect(caching[1]).toBe(0x12);
    expect(caching[2]! & 0x04).toBe(0x04); // WCE
    const control = d.subarray(32, 44);
    expect(control[2]! & 0x04).toBe(0); // D_SENSE off
  });

  it('omits the block descriptor with DBD and truncates to the allocation length', async () => {
    const d = data(await exec(modeSense6(0x08, 255, 0x08)));
    expect(d[3]).toBe(0);
    expect(d.length).toBe(4 + 20);
    expect(d[4]).toBe(0x08);
    expect(data(await exec(modeSense6(0x3f, 4))).length).toBe(4);
  });

  it('reports changeable and default values, and refuses saved values', async () => {
    const ch = data(await exec(modeSense6(0x40 | 0x08, 255, 0x08)));
    expect([...ch.subarray(4, 8)]).toEqual([0x08, 0x12, 0x04, 0x00]);
    const ctl = data(await exec(modeSense6(0x40 | 0x0a, 255, 0x08)));
    expect(ctl[6]).toBe(0x04); // D_SENSE is changeable
    expect(ctl[8]! & 0x08).toBe(0); // SWP is not
    const def = data(await exec(modeSense6(0x80 | 0x08, 255, 0x08)));
    expect(def[6]! & 0x04).toBe(0x04);
    const s = expectCheck(await exec(modeSense6(0xc0 | 0x08)), 0x5, 0x39, 0x00);
    expectFieldPointer(s, true, 2, 7);
  });

  it('rejects unsupported pages and subpages', async () => {
    expectFieldPointer(expectCheck(await exec(modeSense6(0x19)), 0x5, 0x24, 0x00), true, 2, 5);
    expectFieldPointer(expectCheck(await exec(modeSense6(0x08, 255, 0, 1)), 0x5, 0x24, 0x00), true, 3);
  });

  it('gives a long LBA block descriptor with MODE SENSE(10) and LLBAA', async () => {
    const d = data(await exec(modeSense10(0x0a, 1024, 0x10)));
    expect(d.readUInt16BE(0)).toBe(d.length - 2);
    expect(d[3]).toBe(0x10);
    expect(d[4]).toBe(0x01); // LONGLBA
    expect(d.readUInt16BE(6)).toBe(16);
    expect(d.readBigUInt64BE(8)).toBe(16384n);
    expect(d.readUInt32BE(20)).toBe(512);
    expect(d[24]).toBe(0x0a);
    const short = data(await exec(modeSense10(0x0a)));
    expect(short.readUInt16BE(6)).toBe(8);
  });
});

describe('MODE SELECT', () => {
  beforeEach(() => login(A));

  const cachingList = (wce: boolean): Buffer => {
    const b = Buffer.alloc(4 + 20);
    b[4] = 0x08;
    b[5] = 0x12;
    b[6] = wce ? 0x04 : 0;
    return b;
  };

  it('changes WCE and tells the other nexuses', async () => {
    await login(B);
    const list = cachingList(false);
    const r = await exec([0x15, 0x10, 0, 0, list.length, 0], { dataOut: list });
    expect(r.status).toBe(GOOD);
    expect(target.logicalUnit(0)!.wce).toBe(false);
    const d = data(await exec(modeSense6(0x08, 255, 0x08)));
    expect(d[6]! & 0x04).toBe(0);
    // The nexus that changed it gets no unit attention, the other one does.
    expect((await exec([0x00, 0, 0, 0, 0, 0])).status).toBe(GOOD);
    expectCheck(await exec([0x00, 0, 0, 0, 0, 0], { nexus: B }), 0x6, 0x2a, 0x01);
  });

  it('refuses a change to a bit that is not changeable, changing nothing', async () => {
    const list = cachingList(false);
    list[6]! |= 0x01; // RCD
    const s = expectCheck(await exec([0x15, 0x10, 0, 0, list.length, 0], { dataOut: list }), 0x5, 0x26, 0x00);
    expectFieldPointer(s, false, 6, 0);
    expect(target.logicalUnit(0)!.wce).toBe(true);
  });

  it('checks PF, SP, the page length and the list length', async () => {
    const list = cachingList(true);
    expectFieldPointer(expectCheck(await exec([0x15, 0x00, 0, 0, list.length, 0], { dataOut: list }), 0x5, 0x24, 0x00), true, 1, 4);
    expectFieldPointer(expectCheck(await exec([0x15, 0x11, 0, 0, list.length, 0], { dataOut: list }), 0x5, 0x24, 0x00), true, 1, 0);
    const wrongLength = Buffer.from(list);
    wrongLength[5] = 0x10;
    expectCheck(await exec([0x15, 0x10, 0, 0, wrongLength.length, 0], { dataOut: wrongLength }), 0x5, 0x26, 0x00);
    const cut = list.subarray(0, 12);
    expectCheck(await exec([0x15, 0x10, 0, 0, cut.length, 0], { dataOut: cut }), 0x5, 0x1a, 0x00);
    const unknown = Buffer.from([0, 0, 0, 0, 0x19, 0x02, 0, 0]);
    expectCheck(await exec([0x15, 0x10, 0, 0, unknown.length, 0], { dataOut: unknown }), 0x5, 0x26, 0x00);
    // A zero-length parameter list is not an error.
    expect((await exec([0x15, 0x10, 0, 0, 0, 0])).status).toBe(GOOD);
  });

  it('validates a block descriptor against the geometry', async () => {
    const list = Buffer.alloc(4 + 8 + 20);
    list[3] = 8;
    list.writeUIntBE(512, 9, 3);
    list[12] = 0x08;
    list[13] = 0x12;
    list[14] = 0x04;
    expect((await exec([0x15, 0x10, 0, 0, list.length, 0], { dataOut: list })).status).toBe(GOOD);
    list.writeUIntBE(4096, 9, 3);
    expectFieldPointer(expectCheck(await exec([0x15, 0x10, 0, 0, list.length, 0], { dataOut: list }), 0x5, 0x26, 0x00), false, 9);
  });

  it('switches to descriptor format sense data with D_SENSE (MODE SELECT(10))', async () => {
    const list = Buffer.alloc(8 + 12);
    list[8] = 0x0a;
    list[9] = 0x0a;
    list[10] = 0x04 | 0x02; // D_SENSE, GLTSD as it is
    list[11] = 0x10;
    list.writeUInt16BE(0xffff, 16);
    const r = await exec([0x55, 0x10, 0, 0, 0, 0, 0, 0, list.length, 0], { dataOut: list });
    expect(r.status).toBe(GOOD);
    const bad = await exec([0x28, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 1, 0]);
    expect(bad.sense![0]).toBe(0x72);
    expect(parseSense(bad.sense!)).toMatchObject({ key: 0x5, asc: 0x21, ascq: 0x00 });
  });
});

describe('REPORT SUPPORTED OPERATION CODES', () => {
  beforeEach(() => login(A));

  function parseAll(d: Buffer, rctd: boolean): { opcode: number; sa: number; servactv: boolean; ctdp: boolean; cdbLength: number }[] {
    const out = [];
    expect(d.readUInt32BE(0)).toBe(d.length - 4);
    for (let o = 4; o < d.length; ) {
      const ctdp = (d[o + 5]! & 0x02) !== 0;
      out.push({ opcode: d[o]!, sa: d.readUInt16BE(o + 2), servactv: (d[o + 5]! & 0x01) !== 0, ctdp, cdbLength: d.readUInt16BE(o + 6) });
      if (ctdp) expect(d.readUInt16BE(o + 8)).toBe(0x0a);
      o += 8 + (ctdp ? 12 : 0);
    }
    for (const c of out) expect(c.ctdp).toBe(rctd);
    return out;
  }

  it('reports exactly the command table, with and without timeout descriptors', async () => {
    const all = parseAll(data(await exec(rsoc(0x00))), false);
    expect(all.map((c) => [c.opcode, c.sa, c.servactv, c.cdbLength])).toEqual(
      COMMANDS.map((c) => [c.opcode, c.serviceAction ?? 0, c.serviceAction !== undefined, c.cdbLength]),
    );
    const withTimeouts = parseAll(data(await exec(rsoc(0x80))), true);
    expect(withTimeouts.length).toBe(all.length);
  });

  it('never lies: every reported command is dispatched, every other operation code is invalid', async () => {
    const all = parseAll(data(await exec(rsoc(0x00))), false);
    const reported = new Set(all.map((c) => c.opcode));
    for (let op = 0; op < 256; op++) {
      const r = await exec([op, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
      const s = r.sense ? parseSense(r.sense) : undefined;
      const invalidOpcode = s?.key === 0x5 && s.asc === 0x20;
      expect({ op, invalidOpcode }).toEqual({ op, invalidOpcode: !reported.has(op) });
    }
    for (const c of all.filter((x) => x.servactv)) {
      const r = await exec([c.opcode, c.sa, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
      const s = r.sense ? parseSense(r.sense) : undefined;
      const rejectedAction = s?.key === 0x5 && s.asc === 0x24 && s.senseKeySpecific?.type === 'field-pointer' && s.senseKeySpecific.fieldPointer === 1;
      expect({ op: c.opcode, sa: c.sa, rejectedAction }).toEqual({ op: c.opcode, sa: c.sa, rejectedAction: false });
    }
  });

  it('describes one command with its CDB usage data', async () => {
    const read10 = data(await exec(rsoc(0x01, 0x28)));
    expect(read10[1]! & 0x07).toBe(0x03); // supported
    expect(read10.readUInt16BE(2)).toBe(10);
    expect(read10[4]).toBe(0x28);
    expect(read10[5]! & 0x18).toBe(0x18); // DPO and FUA are honoured
    expect(read10[5]! & 0xe0).toBe(0); // RDPROTECT is not
    expect(read10.length).toBe(14);

    const rc16 = data(await exec(rsoc(0x82, 0x9e, 0x10)));
    expect(rc16[1]).toBe(0x83); // CTDP, supported
    expect(rc16.readUInt16BE(2)).toBe(16);
    expect(rc16[4]).toBe(0x9e);
    expect(rc16[5]! & 0x1f).toBe(0x10);
    expect(rc16.length).toBe(4 + 16 + 12);

    // Reporting options that do not match the command's kind are rejected.
    expectCheck(await exec(rsoc(0x01, 0x9e)), 0x5, 0x24, 0x00);
    expectCheck(await exec(rsoc(0x02, 0x28)), 0x5, 0x24, 0x00);
    expectCheck(await exec(rsoc(0x05)), 0x5, 0x24, 0x00);
    // Unsupported commands are described as such rather than rejected.
    expect([...data(await exec(rsoc(0x01, 0xc1)))]).toEqual([0, 0x01, 0, 0]);
    expect([...data(await exec(rsoc(0x02, 0x9e, 0x11)))]).toEqual([0, 0x01, 0, 0]);
  });

  it('uses the same usage data to validate CDBs', async () => {
    for (const c of COMMANDS) {
      const d = data(await exec(rsoc(c.serviceAction === undefined ? 0x01 : 0x02, c.opcode, c.serviceAction ?? 0)));
      expect([...d.subarray(4, 4 + c.cdbLength)]).toEqual([...c.usage]);
    }
  });
});

describe('RESERVE(6) and RELEASE(6)', () => {
  beforeEach(async () => {
    await login(A);
    await login(B);
  });

  const reserve6 = [0x16, 0, 0, 0, 0, 0];
  const release6 = [0x17, 0, 0, 0, 0, 0];
  const tur = [0x00, 0, 0, 0, 0, 0];

  it('keeps other nexuses out except for the commands SPC lets through', async () => {
    expect((await exec(reserve6)).status).toBe(GOOD);
    expect((await exec(reserve6)).status).toBe(GOOD); // the holder may reserve again
    expect((await exec(reserve6, { nexus: B })).status).toBe(RESERVATION_CONFLICT);
    expect((await exec(tur, { nexus: B })).status).toBe(RESERVATION_CONFLICT);
    expect((await exec(modeSense6(0x3f), { nexus: B })).status).toBe(RESERVATION_CONFLICT);
    expect((await exec([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], { nexus: B })).status).toBe(RESERVATION_CONFLICT);
    expect((await exec(inquiry(0, 0, 96), { nexus: B })).status).toBe(GOOD);
    expect((await exec([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], { nexus: B })).status).toBe(GOOD);
    expect((await exec(modeSense6(0x3f))).status).toBe(GOOD);
    // RELEASE from a nexus that holds nothing is a no-op.
    expect((await exec(release6, { nexus: B })).status).toBe(GOOD);
    expect((await exec(tur, { nexus: B })).status).toBe(RESERVATION_CONFLICT);
    expect((await exec(release6)).status).toBe(GOOD);
    expect((await exec(reserve6, { nexus: B })).status).toBe(GOOD);
    expect((await exec(release6, { nexus: B })).status).toBe(GOOD);
  });

  it('is released when the holder nexus goes away, and by a logical unit reset', async () => {
    expect((await exec(reserve6)).status).toBe(GOOD);
    target.nexusClosed(A);
    expect((await exec(reserve6, { nexus: B })).status).toBe(GOOD);
    await target.reset(B, 'lun', 0);
    await login(B);
    expect(target.logicalUnit(0)!.spc2Holder).toBeUndefined();
    const a2 = { ...A, tsih: 9 };
    await login(a2);
    expect((await exec(reserve6, { nexus: a2 })).status).toBe(GOOD);
  });
});

describe('other SPC commands', () => {
  beforeEach(() => login(A));

  it('accepts TEST UNIT READY, START STOP UNIT and PREVENT ALLOW MEDIUM REMOVAL', async () => {
    expect((await exec([0x00, 0, 0, 0, 0, 0])).status).toBe(GOOD);
    expect((await exec([0x1b, 0, 0, 0, 0x01, 0])).status).toBe(GOOD);
    expect((await exec([0x1b, 0x01, 0, 0, 0x02, 0])).status).toBe(GOOD); // LOEJ on a fixed medium: nothing to do
    expect((await exec([0x1b, 0, 0, 0, 0x30, 0])).status).toBe(GOOD); // a power condition is accepted and ignored
    expect((await exec([0x1e, 0, 0, 0, 0x01, 0])).status).toBe(GOOD);
    expect((await exec([0x1e, 0, 0, 0, 0x00, 0])).status).toBe(GOOD);
    expectCheck(await exec([0x1e, 0, 0, 0, 0x02, 0]), 0x5, 0x24, 0x00);
  });

  it('answers TASK ABORTED for a task aborted before it started', async () => {
    const ac = new AbortController();
    ac.abort();
    const r = await target.execute({ nexus: A, lun: 0, cdb: cdb([0x00, 0, 0, 0, 0, 0]), attr: 1, itt: 1, read: false, write: false, dataOut: Buffer.alloc(0), dataInLength: 0, signal: ac.signal });
    expect(r.status).toBe(0x40);
  });

  it('refuses duplicate LUNs and an empty configuration', () => {
    expect(() => new EmbeddedTarget({ targetName: TARGET, luns: [] })).toThrow(/at least one LUN/);
    expect(
      () => new EmbeddedTarget({ targetName: TARGET, luns: [{ file: 'x', lun: 1 }, { file: 'y', lun: 1 }] }),
    ).toThrow(/twice/);
    expect(() => new EmbeddedTarget({ targetName: TARGET, luns: [{ file: 'x', blockSize: 1000 }] })).toThrow(/block size/);
    expect(() => new EmbeddedTarget({ targetName: TARGET, luns: [{ file: 'x', vendor: 'WAY TOO LONG' }] })).toThrow(/vendor/);
  });
});
