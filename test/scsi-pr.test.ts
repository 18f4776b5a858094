// Persistent reservations (PERSISTENT RESERVE IN/OUT) of the embedded target, with several I_T
// nexuses, through EmbeddedTarget.execute() and hand-built CDBs.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { parseSense } from '../protocol/src/scsi/sense.ts';
import { EmbeddedTarget } from '../src/scsi/embedded-target.ts';
import type { ItNexus, ScsiOutcome } from '../src/scsi/task.ts';

const TARGET = 'iqn.2026-11.test:embedded';
const GOOD = 0x00;
const CHECK_CONDITION = 0x02;
const CONFLICT = 0x18;

function nexus(host: string, isid: string, tsih: number): ItNexus {
  const name = `iqn.2026-11.test:${host}`;
  return { initiatorName: name, isid, tsih, targetName: TARGET, portalGroupTag: 1, initiatorPort: `${name},i,0x${isid}` };
}

const I1 = nexus('host1', '400001370000', 1);
const I2 = nexus('host2', '400001370001', 2);
const I3 = nexus('host3', '400001370002', 3);

const WE = 1;
const EA = 3;
const WE_RO = 5;
const EA_RO = 6;
const WE_AR = 7;
const EA_AR = 8;

let dir: string;
let target: EmbeddedTarget;

function cdb(bytes: number[]): Buffer {
  const b = Buffer.alloc(16);
  Buffer.from(bytes).copy(b);
  return b;
}

function exec(n: ItNexus, bytes: number[], dataOut: Buffer = Buffer.alloc(0)): Promise<ScsiOutcome> {
  return target.execute({ nexus: n, lun: 0, cdb: cdb(bytes), attr: 1, itt: 1, read: true, write: dataOut.length > 0, dataOut, dataInLength: 65536, signal: new AbortController().signal });
}

function params(key: bigint, saKey: bigint, flags = 0): Buffer {
  const b = Buffer.alloc(24);
  b.writeBigUInt64BE(key, 0);
  b.writeBigUInt64BE(saKey, 8);
  b[20] = flags;
  return b;
}

async function prOut(n: ItNexus, sa: number, key: bigint, saKey: bigint, type = 0, flags = 0, length = 24): Promise<ScsiOutcome> {
  return exec(n, [0x5f, sa, type, 0, 0, 0, 0, 0, length, 0], params(key, saKey, flags));
}

const register = (n: ItNexus, key: bigint, saKey: bigint) => prOut(n, 0x00, key, saKey);
const registerIgnore = (n: ItNexus, saKey: bigint) => prOut(n, 0x06, 0n, saKey);
const reserve = (n: ItNexus, key: bigint, type: number) => prOut(n, 0x01, key, 0n, type);
const release = (n: ItNexus, key: bigint, type: number) => prOut(n, 0x02, key, 0n, type);
const clear = (n: ItNexus, key: bigint) => prOut(n, 0x03, key, 0n);
const preempt = (n: ItNexus, key: bigint, victim: bigint, type: number) => prOut(n, 0x04, key, victim, type);

async function prIn(n: ItNexus, sa: number, alloc = 4096): Promise<Buffer> {
  const r = await exec(n, [0x5e, sa, 0, 0, 0, 0, 0, alloc >> 8, alloc & 0xff, 0]);
  expect(r.status).toBe(GOOD);
  return r.dataIn!;
}

async function readKeys(n = I1): Promise<{ generation: number; keys: bigint[] }> {
  const d = await prIn(n, 0x00);
  const keys: bigint[] = [];
  for (let o = 8; o < 8 + d.readUInt32BE(4); o += 8) keys.push(d.readBigUInt64BE(o));
  return { generation: d.readUInt32BE(0), keys };
}

async function readReservation(n = I1): Promise<{ key: bigint; type: number } | undefined> {
  const d = await prIn(n, 0x01);
  if (d.readUInt32BE(4) === 0) return undefined;
  expect(d.readUInt32BE(4)).toBe(16);
  expect(d[21]! >> 4).toBe(0); // scope: logical unit
  return { key: d.readBigUInt64BE(8), type: d[21]! & 0x0f };
}

async function expectUa(n: ItNexus, asc: number, ascq: number): Promise<void> {
  const r = await exec(n, [0x00, 0, 0, 0, 0, 0]);
  expect(r.status).toBe(CHECK_CONDITION);
  expect(parseSense(r.sense!)).toMatchObject({ key: 0x6, asc, ascq });
}

async function expectNoUa(n: ItNexus): Promise<void> {
  expect((await exec(n, [0x00, 0, 0, 0, 0, 0])).status).toBe(GOOD);
}

const read10 = [0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0];
const write10 = [0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0];
const canRead = async (n: ItNexus) => (await exec(n, read10)).status === GOOD;
const canWrite = async (n: ItNexus) => (await exec(n, write10, Buffer.alloc(512, 7))).status === GOOD;

beforeEach(async () => {
  dir = mkdtempSync(path.join(tmpdir(), 'detour-scsi-pr-'));
  target = new EmbeddedTarget({ targetName: TARGET, luns: [{ file: path.join(dir, 'disk.img'), size: 1 << 20 }] });
  await target.open();
  // Every nexus starts with its power-on unit attention; consume it.
  for (const n of [I1, I2, I3]) await expectUa(n, 0x29, 0x00);
});

afterEach(async () => {
  await target.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('registration', () => {
  it('registers, refuses a wrong key, changes and removes keys, and bumps PRGENERATION', async () => {
    const g0 = (await readKeys()).generation;
    expect((await register(I1, 0n, 0xaan)).status).toBe(GOOD);
    expect(await readKeys()).toEqual({ generation: g0 + 1, keys: [0xaan] });
    // An unregistered nexus must give reservation key 0 with REGISTER.
    expect((await register(I2, 0x1n, 0xbbn)).status).toBe(CONFLICT);
    // A registered one must give its current key.
    expect((await register(I1, 0x1n, 0xccn)).status).toBe(CONFLICT);
    expect((await register(I1, 0xaan, 0xccn)).status).toBe(GOOD);
    expect((await registerIgnore(I2, 0xbbn)).status).toBe(GOOD);
    expect((await registerIgnore(I2, 0xddn)).status).toBe(GOOD);
    expect((await readKeys()).keys).toEqual([0xccn, 0xddn]);
    expect((await register(I1, 0xccn, 0n)).status).toBe(GOOD);
    expect(await readKeys()).toEqual({ generation: g0 + 5, keys: [0xddn] });
    // Unregistering a nexus that is not registered changes nothing.
    expect((await register(I1, 0n, 0n)).status).toBe(GOOD);
    expect((await readKeys()).generation).toBe(g0 + 5);
  });

  it('keeps ADDITIONAL LENGTH when the allocation length truncates the key list', async () => {
    await registerIgnore(I1, 0x11n);
    const d = await prIn(I1, 0x00, 8);
    expect(d.length).toBe(8);
    expect(d.readUInt32BE(4)).toBe(8);
  });

  it('validates the parameter list and the service action', async () => {
    const r1 = await prOut(I1, 0x00, 0n, 0x1n, 0, 0, 20);
    expect(parseSense(r1.sense!)).toMatchObject({ key: 0x5, asc: 0x1a, ascq: 0x00 });
    // APTPL is refused (nothing is persisted through power loss), as are SPEC_I_PT and ALL_TG_PT.
    for (const [flags, bit] of [
      [0x01, 0],
      [0x04, 2],
      [0x08, 3],
    ] as const) {
      const r = await prOut(I1, 0x00, 0n, 0x1n, 0, flags);
      const s = parseSense(r.sense!);
      expect(s).toMatchObject({ key: 0x5, asc: 0x26, ascq: 0x00 });
      expect(s.senseKeySpecific).toEqual({ type: 'field-pointer', inCdb: false, fieldPointer: 20, bitPointer: bit });
    }
    const badSa = await exec(I1, [0x5f, 0x07, 0, 0, 0, 0, 0, 0, 24, 0], params(0n, 1n));
    expect(parseSense(badSa.sense!)).toMatchObject({ key: 0x5, asc: 0x24, ascq: 0x00 });
    for (let sa = 4; sa < 0x20; sa++) {
      const r = await exec(I1, [0x5e, sa, 0, 0, 0, 0, 0, 0x10, 0, 0]);
      expect(r.status).toBe(CHECK_CONDITION);
    }
    expect((await readKeys()).keys).toEqual([]);
  });
});

describe('reservations', () => {
  it('reserves every type and reports it, with key 0 for all-registrants types', async () => {
    await registerIgnore(I1, 0x10n);
    for (const type of [WE, EA, WE_RO, EA_RO, WE_AR, EA_AR]) {
      expect((await reserve(I1, 0x10n, type)).status).toBe(GOOD);
      expect(await readReservation()).toEqual({ key: type >= WE_AR ? 0n : 0x10n, type });
      expect((await release(I1, 0x10n, type)).status).toBe(GOOD);
      expect(await readReservation()).toBeUndefined();
    }
  });

  it('needs a registration and the right key, and conflicts with another holder', async () => {
    expect((await reserve(I1, 0n, WE)).status).toBe(CONFLICT);
    await registerIgnore(I1, 0x10n);
    await registerIgnore(I2, 0x20n);
    expect((await reserve(I1, 0x11n, WE)).status).toBe(CONFLICT);
    expect((await reserve(I1, 0x10n, WE)).status).toBe(GOOD);
    expect((await reserve(I1, 0x10n, WE)).status).toBe(GOOD); // same reservation again
    expect((await reserve(I1, 0x10n, EA)).status).toBe(CONFLICT); // another type
    expect((await reserve(I2, 0x20n, WE)).status).toBe(CONFLICT);
    const bad = await reserve(I1, 0x10n, 2);
    expect(parseSense(bad.sense!)).toMatchObject({ key: 0x5, asc: 0x24, ascq: 0x00 });
    const scope = await exec(I1, [0x5f, 0x01, 0x10 | WE, 0, 0, 0, 0, 0, 24, 0], params(0x10n, 0n));
    expect(parseSense(scope.sense!)).toMatchObject({ key: 0x5, asc: 0x24, ascq: 0x00 });
  });

  it('lets a non-holder RELEASE do nothing and refuses a release of the wrong type', async () => {
    await registerIgnore(I1, 0x10n);
    await registerIgnore(I2, 0x20n);
    await reserve(I1, 0x10n, EA);
    expect((await release(I2, 0x20n, EA)).status).toBe(GOOD);
    expect(await readReservation()).toEqual({ key: 0x10n, type: EA });
    const wrong = await release(I1, 0x10n, WE);
    expect(parseSense(wrong.sense!)).toMatchObject({ key: 0x5, asc: 0x26, ascq: 0x04 });
    expect((await release(I1, 0x99n, EA)).status).toBe(CONFLICT);
    expect((await release(I1, 0x10n, EA)).status).toBe(GOOD);
    // Releasing a write exclusive / exclusive access reservation tells nobody.
    await expectNoUa(I2);
  });

  it('tells the other registrants when a registrants-only reservation is released', async () => {
    await registerIgnore(I1, 0x10n);
    await registerIgnore(I2, 0x20n);
    await reserve(I1, 0x10n, WE_RO);
    expect((await release(I1, 0x10n, WE_RO)).status).toBe(GOOD);
    await expectUa(I2, 0x2a, 0x04);
    await expectNoUa(I1);
    await expectNoUa(I3); // not registered
  });
});

describe('access under each reservation type', () => {
  // [registered I2 read, registered I2 write, unregistered I2 read, unregistered I2 write]
  const matrix: [string, number, boolean[]][] = [
    ['write exclusive', WE, [true, false, true, false]],
    ['exclusive access', EA, [false, false, false, false]],
    ['write exclusive, registrants only', WE_RO, [true, true, true, false]],
    ['exclusive access, registrants only', EA_RO, [true, true, false, false]],
    ['write exclusive, all registrants', WE_AR, [true, true, true, false]],
    ['exclusive access, all registrants', EA_AR, [true, true, false, false]],
  ];
  for (const [name, type, expected] of matrix) {
    it(name, async () => {
      await registerIgnore(I1, 0x10n);
      await registerIgnore(I2, 0x20n);
      expect((await reserve(I1, 0x10n, type)).status).toBe(GOOD);
      expect(await canRead(I1)).toBe(true);
      expect(await canWrite(I1)).toBe(true);
      const seen = [await canRead(I2), await canWrite(I2)];
      expect((await register(I2, 0x20n, 0n)).status).toBe(GOOD);
      seen.push(await canRead(I2), await canWrite(I2));
      expect(seen).toEqual(expected);
      // Commands SPC always allows.
      for (const c of [
        [0x12, 0, 0, 0, 96, 0],
        [0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        [0x00, 0, 0, 0, 0, 0],
        [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
      ]) {
        expect((await exec(I3, c)).status).toBe(GOOD);
      }
      // MODE SENSE and SYNCHRONIZE CACHE conflict for an unregistered nexus under every type.
      expect((await exec(I3, [0x1a, 0, 0x3f, 0, 255, 0])).status).toBe(CONFLICT);
      expect((await exec(I3, [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0])).status).toBe(CONFLICT);
      expect((await release(I1, 0x10n, type)).status).toBe(GOOD);
      expect(await canWrite(I3)).toBe(true);
    });
  }
});

describe('losing the holder', () => {
  it('releases a registrants-only reservation when its holder unregisters, telling the others', async () => {
    await registerIgnore(I1, 0x10n);
    await registerIgnore(I2, 0x20n);
    await reserve(I1, 0x10n, EA_RO);
    expect((await register(I1, 0x10n, 0n)).status).toBe(GOOD);
    expect(await readReservation(I1)).toBeUndefined();
    await expectNoUa(I1);
    await expectUa(I2, 0x2a, 0x04);
  });

  it('releases an exclusive access reservation silently when its holder unregisters', async () => {
    await registerIgnore(I1, 0x10n);
    await registerIgnore(I2, 0x20n);
    await reserve(I1, 0x10n, EA);
    await register(I1, 0x10n, 0n);
    expect(await readReservation(I1)).toBeUndefined();
    await expectNoUa(I1);
    await expectNoUa(I2);
  });

  it('keeps an all-registrants reservation until the last registrant leaves', async () => {
    await registerIgnore(I1, 0x10n);
    await registerIgnore(I2, 0x20n);
    await reserve(I1, 0x10n, WE_AR);
    await register(I1, 0x10n, 0n);
    expect(await readReservation(I1)).toEqual({ key: 0n, type: WE_AR });
    expect(await canWrite(I2)).toBe(true);
    expect(await canWrite(I1)).toBe(false);
    expect((await release(I2, 0x20n, WE_AR)).status).toBe(GOOD);
    expect(await readReservation(I1)).toBeUndefined();
    await registerIgnore(I2, 0x21n);
    await reserve(I2, 0x21n, EA_AR);
    await register(I2, 0x21n, 0n);
    expect(await readReservation(I1)).toBeUndefined();
  });
});

describe('CLEAR and PREEMPT', () => {
  it('CLEAR removes everything, tells the others and bumps PRGENERATION once', async () => {
    await registerIgnore(I1, 0x10n);
    await registerIgnore(I2, 0x20n);
    const { generation } = await readKeys();
    await reserve(I1, 0x10n, EA);
    expect((await clear(I2, 0x99n)).status).toBe(CONFLICT);
    expect((await clear(I1, 0x10n)).status).toBe(GOOD);
    expect(await readReservation()).toBeUndefined();
    expect(await readKeys()).toEqual({ generation: generation + 1, keys: [] });
    await expectUa(I2, 0x2a, 0x03);
    await expectNoUa(I1);
  });

  it('PREEMPT removes another registration', async () => {
    await registerIgnore(I1, 0x10n);
    await registerIgnore(I2, 0x20n);
    const { generation } = await readKeys();
    expect((await preempt(I2, 0x20n, 0x10n, EA)).status).toBe(GOOD);
    expect(await readKeys(I2)).toEqual({ generation: generation + 1, keys: [0x20n] });
    await expectUa(I1, 0x2a, 0x05);
    await expectNoUa(I2);
    // No registration holds the key: conflict; key zero without a reservation: invalid.
    expect((await preempt(I2, 0x20n, 0x77n, EA)).status).toBe(CONFLICT);
    const zero = await preempt(I2, 0x20n, 0n, EA);
    expect(parseSense(zero.sense!)).toMatchObject({ key: 0x5, asc: 0x26, ascq: 0x00 });
  });

  it('PREEMPT of the holder moves the reservation, and a type change releases the others', async () => {
    await registerIgnore(I1, 0x10n);
    await registerIgnore(I2, 0x20n);
    await registerIgnore(I3, 0x30n);
    await reserve(I1, 0x10n, WE);
    expect((await preempt(I2, 0x20n, 0x10n, EA)).status).toBe(GOOD);
    expect(await readReservation(I2)).toEqual({ key: 0x20n, type: EA });
    expect((await readKeys(I2)).keys).toEqual([0x20n, 0x30n]);
    await expectUa(I1, 0x2a, 0x05);
    await expectUa(I3, 0x2a, 0x04);
    expect(await canWrite(I2)).toBe(true);
    expect(await canRead(I3)).toBe(false);
    // PREEMPT AND ABORT behaves the same.
    expect((await prOut(I3, 0x05, 0x30n, 0x20n, EA)).status).toBe(GOOD);
    expect(await readReservation(I3)).toEqual({ key: 0x30n, type: EA });
  });

  it('PREEMPT with key zero takes over an all-registrants reservation', async () => {
    await registerIgnore(I1, 0x10n);
    await registerIgnore(I2, 0x20n);
    await reserve(I1, 0x10n, EA_AR);
    expect((await preempt(I2, 0x20n, 0n, WE)).status).toBe(GOOD);
    expect(await readReservation(I2)).toEqual({ key: 0x20n, type: WE });
    expect((await readKeys(I2)).keys).toEqual([0x20n]);
    await expectUa(I1, 0x2a, 0x05);
  });
});

describe('REPORT CAPABILITIES and READ FULL STATUS', () => {
  it('reports the supported types and no persistence through power loss', async () => {
    const d = await prIn(I1, 0x02);
    expect(d.length).toBe(8);
    expect(d.readUInt16BE(0)).toBe(8);
    expect(d[2]).toBe(0x10); // CRH; SIP_C, ATP_C, PTPL_C clear
    expect(d[3]! & 0x80).toBe(0x80); // TMV
    expect((d[3]! >> 4) & 0x07).toBeLessThanOrEqual(5);
    expect(d.readUInt16BE(4)).toBe(0xea01);
  });

  it('lists each registration with its holder flag and iSCSI TransportID', async () => {
    await registerIgnore(I1, 0x10n);
    await registerIgnore(I2, 0x20n);
    await reserve(I2, 0x20n, WE_RO);
    const d = await prIn(I1, 0x03);
    expect(d.readUInt32BE(4)).toBe(d.length - 8);
    const entries: { key: bigint; holder: boolean; type: number; port: number; tid: string }[] = [];
    for (let o = 8; o < d.length; ) {
      const len = d.readUInt32BE(o + 20);
      const tid = d.subarray(o + 24, o + 24 + len);
      expect(tid[0]).toBe(0x45); // format 01b, iSCSI
      expect(tid.readUInt16BE(2)).toBe(len - 4);
      expect(len % 4).toBe(0);
      entries.push({
        key: d.readBigUInt64BE(o),
        holder: (d[o + 12]! & 0x01) !== 0,
        type: d[o + 13]! & 0x0f,
        port: d.readUInt16BE(o + 18),
        tid: tid.subarray(4).toString('utf8').replace(/\0+$/, ''),
      });
      o += 24 + len;
    }
    expect(entries).toEqual([
      { key: 0x10n, holder: false, type: 0, port: 1, tid: I1.initiatorPort },
      { key: 0x20n, holder: true, type: WE_RO, port: 1, tid: I2.initiatorPort },
    ]);
  });
});

describe('coexistence with RESERVE(6)/RELEASE(6)', () => {
  const reserve6 = [0x16, 0, 0, 0, 0, 0];
  const release6 = [0x17, 0, 0, 0, 0, 0];

  it('makes RESERVE and RELEASE conflict while any registration exists', async () => {
    await registerIgnore(I1, 0x10n);
    expect((await exec(I1, reserve6)).status).toBe(CONFLICT);
    expect((await exec(I2, release6)).status).toBe(CONFLICT);
    await register(I1, 0x10n, 0n);
    expect((await exec(I1, reserve6)).status).toBe(GOOD);
    expect((await exec(I1, release6)).status).toBe(GOOD);
  });

  it('makes persistent reservation commands conflict while RESERVE(6) is held', async () => {
    expect((await exec(I1, reserve6)).status).toBe(GOOD);
    expect((await exec(I2, [0x5e, 0, 0, 0, 0, 0, 0, 0x10, 0, 0])).status).toBe(CONFLICT);
    expect((await exec(I1, [0x5e, 0, 0, 0, 0, 0, 0, 0x10, 0, 0])).status).toBe(CONFLICT);
    expect((await registerIgnore(I1, 0x10n)).status).toBe(CONFLICT);
    expect((await exec(I1, release6)).status).toBe(GOOD);
    expect((await registerIgnore(I1, 0x10n)).status).toBe(GOOD);
  });
});

describe('resets', () => {
  it('keep persistent reservations over a LUN reset but lose them at a cold reset', async () => {
    await registerIgnore(I1, 0x10n);
    await reserve(I1, 0x10n, WE);
    await target.reset(I1, 'lun', 0);
    await expectUa(I1, 0x29, 0x00);
    expect(await readReservation()).toEqual({ key: 0x10n, type: WE });
    await target.reset(I1, 'target-cold', 0);
    await expectUa(I1, 0x29, 0x00);
    expect(await readReservation()).toBeUndefined();
    expect((await readKeys()).keys).toEqual([]);
  });
});
