// Bad input at detour's portal, both products: `detour serve` with an inline volume in front of a
// real tgtd, and the embedded `detour target`. Each malformed, truncated, oversized, corrupted or
// out-of-order input must get the answer RFC 7143 asks for (a Reject with the right reason and
// the offending header echoed, a refused login, silence, or a closed connection) while another
// session keeps writing and verifying random data without a single error, and the process must
// come out of it alive, still serving, and without error-level log entries.
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  buildRead10,
  buildTestUnitReady,
  buildWrite10,
  LoginStage,
  Opcode,
  parseSense,
  readDataSegmentLength,
  RejectReason,
  RESERVED_TAG,
  ScsiStatus,
  SenseKey,
  snAdd,
  type NopIn,
  type Pdu,
  type R2T,
  type Reject,
} from 'iscsi-node-wire';
import { InitiatorSession } from '../src/back/index.ts';
import { DEFAULT_LIMITS } from '../src/front/types.ts';
import { DetourProcess } from './helpers/detour-process.ts';
import { freePort } from './helpers/ports.ts';
import { writeDetourConfig } from './helpers/detour-config.ts';
import { RawIscsiClient, randomIsid, seededBytes, type RawLoginResult } from './helpers/raw-iscsi.ts';
import { Tgtd } from './helpers/tgtd.ts';

const MAIN_IQN = 'iqn.2026-11.test:bad-input-main';
const EMBEDDED_IQN = 'iqn.2026-11.test:bad-input-embedded';
const RAW_INITIATOR = 'iqn.2026-11.test:bad-input-raw';
const IO_INITIATOR = 'iqn.2026-11.test:bad-input-io';
const BLOCK = 512;
const IMAGE_SIZE = 64 << 20;
const LOGIN_TIMEOUT_MS = DEFAULT_LIMITS.loginTimeoutMs;
/** The login phase accepts 8192 bytes per PDU (RFC 7143 13.12) whatever the target declares. */
const LOGIN_MRDSL = 8192;
/** How soon a connection must go once the target has a reason to close it. */
const PROMPT_MS = 2000;
/** LBAs the raw sessions write; the I/O workers stay clear of them. */
const RAW_LBA = 1000;
const FRESH_LBA = 2000;

// ---------------------------------------------------------------------------------------------
// The verified load: write random data, read it back, compare, over and over.

class VerifiedIo {
  iterations = 0;
  readonly errors: string[] = [];
  maxIterationMs = 0;
  private running = true;
  private workers: Promise<void>[] = [];

  constructor(
    readonly session: InitiatorSession,
    private readonly lun: number,
  ) {
    const lost = (what: string) => (err?: Error) => {
      if (this.running) this.errors.push(`session ${what}: ${err?.message ?? ''}`);
    };
    session.on('disconnect', lost('disconnected'));
    session.on('close', lost('closed'));
  }

  start(regions: Array<{ lba: number; blocks: number }>): void {
    this.workers = regions.map((r) => this.worker(r));
  }

  private async worker(region: { lba: number; blocks: number }): Promise<void> {
    while (this.running) {
      // Up to 128 KiB: beyond FirstBurstLength, so both immediate data and R2T-solicited Data-Out
      // are in the mix.
      const blocks = 1 + Math.floor(Math.random() * 256);
      const lba = region.lba + Math.floor(Math.random() * (region.blocks - blocks));
      const data = randomBytes(blocks * BLOCK);
      const t0 = Date.now();
      try {
        await this.session.write(this.lun, lba, data, BLOCK);
        const back = await this.session.read(this.lun, lba, blocks, BLOCK);
        if (!back.equals(data)) this.errors.push(`lba ${lba} blocks ${blocks}: data read back differs from data written`);
        else this.iterations++;
      } catch (err) {
        if (!this.running) return;
        this.errors.push(`lba ${lba} blocks ${blocks}: ${(err as Error).message}`);
        await sleep(100);
      }
      this.maxIterationMs = Math.max(this.maxIterationMs, Date.now() - t0);
    }
  }

  /** Resolves once `count` iterations have completed; fails the test if that takes too long. */
  async reach(count: number, timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.iterations < count) {
      if (Date.now() > deadline) throw new Error(`I/O stalled: ${this.iterations} of ${count} iterations; errors: ${this.errors.join('; ')}`);
      await sleep(10);
    }
  }

  async stop(): Promise<void> {
    this.running = false;
    await Promise.allSettled(this.workers);
    await this.session.logout().catch(() => this.session.close());
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

// ---------------------------------------------------------------------------------------------
// The two portals under test

interface Subject {
  label: string;
  host: string;
  port: number;
  iqn: string;
  lun: number;
  proc: DetourProcess;
  io: VerifiedIo;
  /** Stalled logins, opened in beforeAll so their login timeouts run alongside the other cases. */
  stalls: Stall[];
}

interface Stall {
  name: string;
  client: RawIscsiClient;
  /** What the target is expected to have sent before it closed. */
  check(pdus: Pdu[]): void;
}

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'detour-bad-input-'));
let tgtd: Tgtd | undefined;
const subjects: Partial<Record<'serve' | 'target', Subject>> = {};
const rawClients: RawIscsiClient[] = [];

async function raw(s: Subject, opts: { allowHalfOpen?: boolean } = {}): Promise<RawIscsiClient> {
  const c = await RawIscsiClient.connect(s.host, s.port, opts);
  rawClients.push(c);
  return c;
}

async function loggedIn(s: Subject, keys: Array<[string, string]> = []): Promise<{ c: RawIscsiClient; login: RawLoginResult }> {
  const c = await raw(s);
  const login = await c.login({ initiatorName: RAW_INITIATOR, targetName: s.iqn, isid: randomIsid(), keys });
  expect(login.status).toBe(0);
  expect(login.loggedIn).toBe(true);
  await clearUnitAttention(c, s.lun);
  return { c, login };
}

/**
 * A new I_T nexus starts with a power-on unit attention on both targets: take it with TEST UNIT
 * READY so the cases see plain GOOD status from their own commands.
 */
async function clearUnitAttention(c: RawIscsiClient, lun: number): Promise<void> {
  for (let i = 0; i < 4; i++) {
    const r = await c.result(c.sendCommand({ lun, cdb: buildTestUnitReady() }));
    if (r.status === ScsiStatus.GOOD) return;
    expect(r.status).toBe(ScsiStatus.CHECK_CONDITION);
    expect(parseSense(r.sense!).key).toBe(SenseKey.UNIT_ATTENTION);
  }
  throw new Error('unit attention did not clear');
}

async function startStalls(s: Omit<Subject, 'stalls'>): Promise<Stall[]> {
  const stalls: Stall[] = [];
  const silent = (pdus: Pdu[]) => expect(pdus.map((p) => p.opcode)).toEqual([]);

  stalls.push({ name: 'connects and sends nothing', client: await raw(s as Subject), check: silent });

  const half = await raw(s as Subject);
  half.send(loginRequestBytes(half, { continue: false, data: 'InitiatorName=x' }).subarray(0, 24));
  stalls.push({ name: 'sends half a Login Request BHS', client: half, check: silent });

  const noise = await raw(s as Subject);
  noise.send(seededBytes(7, 20));
  stalls.push({ name: 'sends 20 bytes of noise (less than a BHS)', client: noise, check: silent });

  const cont = await raw(s as Subject);
  cont.send(loginRequestBytes(cont, { continue: true, data: `InitiatorName=${RAW_INITIATOR}\0TargetName=${s.iqn}\0SessionType=No` }));
  stalls.push({
    name: 'sends a Login Request with C=1 and never continues',
    client: cont,
    // The target acknowledges the partial text with an empty Login Response, then waits.
    check: (pdus) => {
      expect(pdus.map((p) => p.opcode)).toEqual([Opcode.LoginResponse]);
      const r = pdus[0]!;
      if (r.opcode !== Opcode.LoginResponse) throw new Error('unreachable');
      expect([r.statusClass, r.statusDetail, r.transit, r.continue, r.data.length]).toEqual([0, 0, false, false, 0]);
    },
  });
  return stalls;
}

/** An operational-stage Login Request heading for full feature phase, as raw bytes. */
function loginRequestBytes(c: RawIscsiClient, o: { continue: boolean; data: string; versionMax?: number; versionMin?: number; dataSegmentLength?: number }): Buffer {
  const data = Buffer.from(o.data.endsWith('\0') || o.continue ? o.data : `${o.data}\0`);
  const bytes = c.encode({
    opcode: Opcode.LoginRequest, transit: !o.continue, continue: o.continue, csg: LoginStage.Operational, nsg: o.continue ? 0 : LoginStage.FullFeature,
    versionMax: o.versionMax ?? 0, versionMin: o.versionMin ?? 0, isid: randomIsid(), tsih: 0, cid: 0, itt: c.allocItt(), cmdSN: 1, expStatSN: 0, data,
  });
  if (o.dataSegmentLength !== undefined) bytes.writeUIntBE(o.dataSegmentLength, 5, 3);
  return bytes;
}

beforeAll(async () => {
  tgtd = await Tgtd.start({ targets: [{ tid: 1, iqn: MAIN_IQN, luns: [{ lun: 1, file: path.join(work, 'main.img'), size: IMAGE_SIZE }] }] });
  const { file: config, portalPort: proxyPort } = await writeDetourConfig(work, { name: 'vol1', target: MAIN_IQN, main: tgtd.portal, topology: 'inline' });
  const embeddedPort = await freePort();
  const [proxy, embedded] = await Promise.all([
    DetourProcess.start(['serve', '--config', config], { host: '127.0.0.2', port: proxyPort }),
    DetourProcess.start(
      ['target', '--file', path.join(work, 'embedded.img'), '--size', '64M', '--listen', `127.0.0.1:${embeddedPort}`, '--iqn', EMBEDDED_IQN],
      { host: '127.0.0.1', port: embeddedPort },
    ),
  ]);
  const specs = [
    { key: 'serve' as const, label: 'detour serve (inline, in front of tgtd)', host: '127.0.0.2', port: proxyPort, iqn: MAIN_IQN, lun: 1, proc: proxy },
    { key: 'target' as const, label: 'detour target', host: '127.0.0.1', port: embeddedPort, iqn: EMBEDDED_IQN, lun: 0, proc: embedded },
  ];
  for (const { key, ...spec } of specs) {
    const session = await InitiatorSession.connect({
      portal: `${spec.host}:${spec.port}`,
      targetName: spec.iqn,
      initiatorName: IO_INITIATOR,
      // A reconnect would hide exactly the interruption this test looks for.
      reconnect: false,
      commandTimeoutMs: 10_000,
    });
    const io = new VerifiedIo(session, spec.lun);
    io.start([
      { lba: 65_536, blocks: 16_384 },
      { lba: 81_920, blocks: 16_384 },
    ]);
    const partial = { ...spec, io };
    subjects[key] = { ...partial, stalls: await startStalls(partial as Subject) };
  }
}, 60_000);

afterAll(async () => {
  for (const c of rawClients) c.destroy();
  await Promise.allSettled(Object.values(subjects).map((s) => s.io.stop()));
  await Promise.allSettled(Object.values(subjects).map((s) => s.proc.stop()));
  await tgtd?.stop();
  fs.rmSync(work, { recursive: true, force: true });
}, 30_000);

// ---------------------------------------------------------------------------------------------
// Assertions shared by the cases

/** Runs one case while the verified I/O goes on: it must keep completing iterations, error-free. */
async function underLoad(s: Subject, body: () => Promise<void>): Promise<void> {
  const before = s.io.iterations;
  await body();
  await s.io.reach(before + 3);
  expect(s.io.errors).toEqual([]);
}

/** A Reject with this reason, carrying the complete header (BHS and AHS, no digest) of `sent`. */
function expectReject(p: Pdu, reason: number, sent: Buffer): void {
  expect(p.opcode).toBe(Opcode.Reject);
  const r = p as Reject;
  expect(r.reason).toBe(reason);
  expect(r.itt).toBe(RESERVED_TAG);
  const headerLength = 48 + sent[4]! * 4;
  expect(r.data.toString('hex')).toBe(sent.subarray(0, headerLength).toString('hex'));
}

/** The target closed the connection promptly and sent nothing first. */
async function expectSilentClose(c: RawIscsiClient, within = PROMPT_MS): Promise<void> {
  const { pdus } = await c.waitClosed(within);
  expect(pdus.map((p) => p.opcode)).toEqual([]);
  expect(c.framingError).toBeUndefined();
}

/** The session is still in step: a ping gets its echo. */
async function expectInStep(c: RawIscsiClient): Promise<void> {
  const data = randomBytes(100);
  const nopIn = await c.ping(data);
  expect(nopIn.data.equals(data)).toBe(true);
  expect(c.closed).toBe(false);
}

/** READ(10) on a raw session; the data, or the test fails. */
async function rawRead(c: RawIscsiClient, lun: number, lba: number, blocks: number): Promise<Buffer> {
  const itt = c.sendCommand({ lun, cdb: buildRead10(lba, blocks), read: true, edtl: blocks * BLOCK });
  const r = await c.result(itt);
  expect(r.status).toBe(ScsiStatus.GOOD);
  return r.data;
}

/** WRITE(10) on a raw session, answering the target's R2Ts. */
async function rawWrite(c: RawIscsiClient, lun: number, lba: number, data: Buffer, mrdsl: number): Promise<void> {
  const itt = c.sendCommand({ lun, cdb: buildWrite10(lba, data.length / BLOCK), write: true, edtl: data.length });
  for (;;) {
    const p = await c.next((x) => (x.opcode === Opcode.R2T || x.opcode === Opcode.ScsiResponse) && x.itt === itt);
    if (p.opcode === Opcode.ScsiResponse) {
      expect(p.status).toBe(ScsiStatus.GOOD);
      return;
    }
    const r2t = p as R2T;
    let dataSN = 0;
    for (let off = r2t.bufferOffset; off < r2t.bufferOffset + r2t.desiredDataTransferLength; off += mrdsl) {
      const end = Math.min(off + mrdsl, r2t.bufferOffset + r2t.desiredDataTransferLength);
      c.sendPdu({ opcode: Opcode.DataOut, final: end === r2t.bufferOffset + r2t.desiredDataTransferLength, lun, itt, ttt: r2t.ttt, expStatSN: c.expStatSN, dataSN: dataSN++, bufferOffset: off, data: data.subarray(off, end) });
    }
  }
}

/** Noise with a first "BHS" whose DataSegmentLength is beyond `limit`: framing cannot go on. */
function noiseBeyond(seed: number, size: number, limit: number): Buffer {
  const b = seededBytes(seed, size);
  // A property of the seed, checked rather than forced, so the bytes stay pure noise.
  expect(readDataSegmentLength(b)).toBeGreaterThan(limit);
  return b;
}

// ---------------------------------------------------------------------------------------------
// The cases, against each product

describe.each([['serve'], ['target']] as const)('bad input at %s', (key) => {
  const s = (): Subject => {
    const x = subjects[key];
    if (!x) throw new Error(`${key} did not start`);
    return x;
  };

  describe('during login', () => {
    it.each([
      [48, 11],
      [1024, 12],
      [64 * 1024, 13],
    ])('%i bytes of noise right after connect: closed, nothing sent', async (size, seed) => {
      await underLoad(s(), async () => {
        const c = await raw(s());
        c.send(noiseBeyond(seed, size, LOGIN_MRDSL));
        await expectSilentClose(c);
      });
    });

    it('a plausible Login Request BHS with garbage fields and text: refused (class 2), closed', async () => {
      await underLoad(s(), async () => {
        const c = await raw(s());
        const bhs = seededBytes(21, 48);
        bhs[0] = 0x43; // Login Request, I=1
        bhs[1] = 0x87; // T=1, CSG=1, NSG=3
        bhs[4] = 0;
        bhs.writeUIntBE(40, 5, 3);
        c.send(Buffer.concat([bhs, seededBytes(22, 40)]));
        const { pdus } = await c.waitClosed(PROMPT_MS);
        expect(pdus.map((p) => p.opcode)).toEqual([Opcode.LoginResponse]);
        const r = pdus[0]!;
        if (r.opcode !== Opcode.LoginResponse) throw new Error('unreachable');
        expect(r.statusClass).toBe(2);
        expect(r.itt).toBe(bhs.readUInt32BE(16));
      });
    });

    it('half a BHS, then FIN: the target closes too', async () => {
      await underLoad(s(), async () => {
        const c = await raw(s());
        c.send(loginRequestBytes(c, { continue: false, data: `InitiatorName=${RAW_INITIATOR}` }).subarray(0, 24));
        await sleep(50);
        c.end();
        await expectSilentClose(c);
      });
    });

    it('a Login Request announcing 1000 data bytes, 10 sent, then FIN: the target closes too', async () => {
      await underLoad(s(), async () => {
        const c = await raw(s());
        const bytes = loginRequestBytes(c, { continue: false, data: `InitiatorName=${RAW_INITIATOR}`, dataSegmentLength: 1000 });
        c.send(bytes.subarray(0, 48 + 10));
        await sleep(50);
        c.end();
        await expectSilentClose(c);
      });
    });

    it.each([
      [LOGIN_MRDSL + 1, 'one byte above 8192'],
      [0xff_ffff, '16 MiB - 1'],
    ])('a Login Request with DataSegmentLength %i (%s): closed, nothing sent', async (dsl) => {
      await underLoad(s(), async () => {
        const c = await raw(s());
        const bhs = loginRequestBytes(c, { continue: false, data: `InitiatorName=${RAW_INITIATOR}`, dataSegmentLength: dsl }).subarray(0, 48);
        c.send(Buffer.concat([bhs, Buffer.alloc(Math.min(dsl, 64 * 1024), 0x41)]));
        await expectSilentClose(c);
      });
    });

    it('a Login Request with an unsupported version: 0x0205, then the target closes even if the peer lingers', async () => {
      await underLoad(s(), async () => {
        const c = await raw(s(), { allowHalfOpen: true });
        const login = await c.login({ initiatorName: RAW_INITIATOR, targetName: s().iqn, versionMax: 5, versionMin: 2 });
        expect(login.loggedIn).toBe(false);
        expect(login.status).toBe(0x0205);
        // A peer that ignores the refusal and keeps its side open (and keeps writing) must not
        // hold the connection on the target forever.
        const writer = setInterval(() => c.send(Buffer.alloc(1024)), 100);
        try {
          const { pdus } = await c.waitClosed(LOGIN_TIMEOUT_MS / 2);
          expect(pdus.map((p) => p.opcode)).toEqual([]);
        } finally {
          clearInterval(writer);
        }
      });
    });

    it('a second login to an existing TSIH (MaxConnections=1): refused with 0x0206; the session goes on', async () => {
      await underLoad(s(), async () => {
        const { c: first } = await loggedIn(s());
        const second = await raw(s());
        const login = await second.login({ initiatorName: RAW_INITIATOR, targetName: s().iqn, isid: first.isid, tsih: first.tsih, cid: 1 });
        expect(login.loggedIn).toBe(false);
        expect(login.status).toBe(0x0206);
        await second.waitClosed(PROMPT_MS);
        await expectInStep(first);
        expect((await rawRead(first, s().lun, RAW_LBA, 1)).length).toBe(BLOCK);
      });
    });
  });

  describe('in full feature phase', () => {
    it.each([
      [48, 33],
      [64 * 1024, 31],
      [1 << 20, 32],
    ])('%i bytes of noise after login: closed, nothing sent', async (size, seed) => {
      await underLoad(s(), async () => {
        const { c, login } = await loggedIn(s());
        const mrdsl = Number(login.targetKeys.get('MaxRecvDataSegmentLength'));
        c.send(noiseBeyond(seed, size, mrdsl));
        await expectSilentClose(c);
      });
    });

    it('a plausible NOP-Out BHS with garbage in every other field: answered like any ping', async () => {
      await underLoad(s(), async () => {
        const { c } = await loggedIn(s());
        const bhs = seededBytes(41, 48);
        bhs[0] = 0x40; // NOP-Out, immediate
        bhs[1] |= 0x80; // F
        bhs[4] = 0;
        bhs.writeUIntBE(16, 5, 3);
        bhs.writeUInt32BE(0x1234_5678, 16); // a valid ITT asks for an answer
        bhs.writeUInt32BE(RESERVED_TAG, 20);
        const data = seededBytes(42, 16);
        c.send(Buffer.concat([bhs, data]));
        const nopIn = await c.next<NopIn>((p) => p.opcode === Opcode.NopIn && p.itt === 0x1234_5678);
        expect(nopIn.data.equals(data)).toBe(true);
        await expectInStep(c);
      });
    });

    it('half a BHS after login, then FIN: the target closes too', async () => {
      await underLoad(s(), async () => {
        const { c } = await loggedIn(s());
        c.send(c.encode({ opcode: Opcode.NopOut, immediate: true, itt: 7, ttt: RESERVED_TAG, lun: 0, cmdSN: c.cmdSN, expStatSN: c.expStatSN }).subarray(0, 24));
        await sleep(50);
        c.end();
        await expectSilentClose(c);
      });
    });

    it('a WRITE announcing 4096 bytes of immediate data, 100 sent, then FIN: the target closes too', async () => {
      await underLoad(s(), async () => {
        const { c } = await loggedIn(s());
        const bytes = c.encode({
          opcode: Opcode.ScsiCommand, itt: c.allocItt(), final: true, read: false, write: true, attr: 1, lun: s().lun,
          expectedDataTransferLength: 4096, cmdSN: c.cmdSN, expStatSN: c.expStatSN, cdb: padCdb(buildWrite10(RAW_LBA, 8)), data: Buffer.alloc(4096, 0x55),
        });
        c.send(bytes.subarray(0, 48 + 100));
        await sleep(50);
        c.end();
        await expectSilentClose(c);
      });
    });

    it('a data segment of exactly MaxRecvDataSegmentLength is taken; one 4 bytes longer closes the connection', async () => {
      await underLoad(s(), async () => {
        const { c, login } = await loggedIn(s());
        const mrdsl = Number(login.targetKeys.get('MaxRecvDataSegmentLength'));
        expect(mrdsl).toBeGreaterThanOrEqual(8192);
        const full = randomBytes(mrdsl);
        expect((await c.ping(full)).data.equals(full)).toBe(true);
        c.sendPdu({ opcode: Opcode.DataOut, final: true, lun: s().lun, itt: 0x4444, ttt: RESERVED_TAG, expStatSN: c.expStatSN, dataSN: 0, bufferOffset: 0, data: Buffer.alloc(mrdsl + 4) });
        await expectSilentClose(c);
      });
    });

    describe('with HeaderDigest and DataDigest CRC32C', () => {
      const digests: Array<[string, string]> = [
        ['HeaderDigest', 'CRC32C'],
        ['DataDigest', 'CRC32C'],
        ['InitialR2T', 'Yes'],
      ];

      it('a bad header digest: closed, nothing sent', async () => {
        await underLoad(s(), async () => {
          const { c } = await loggedIn(s(), digests);
          expect(c.digests).toEqual({ headerDigest: true, dataDigest: true });
          await expectInStep(c);
          c.sendPdu({ opcode: Opcode.NopOut, immediate: true, itt: c.allocItt(), ttt: RESERVED_TAG, lun: 0, cmdSN: c.cmdSN, expStatSN: c.expStatSN }, { headerDigest: true });
          await expectSilentClose(c);
        });
      });

      it('a bad data digest on a NOP-Out: Reject (data digest error), no echo, and the connection goes on', async () => {
        await underLoad(s(), async () => {
          const { c } = await loggedIn(s(), digests);
          const itt = c.allocItt();
          const sent = c.sendPdu({ opcode: Opcode.NopOut, immediate: true, itt, ttt: RESERVED_TAG, lun: 0, cmdSN: c.cmdSN, expStatSN: c.expStatSN, data: randomBytes(512) }, { dataDigest: true });
          expectReject(await c.next(), RejectReason.DataDigestError, sent);
          // The NOP-Out was discarded: no echo follows.
          expect(await c.drain(300)).toEqual([]);
          await expectInStep(c);
        });
      });

      it('a bad data digest on a Data-Out: Reject, then after the last Data-Out CHECK CONDITION (protocol service CRC error); nothing written', async () => {
        await underLoad(s(), async () => {
          const { c, login } = await loggedIn(s(), digests);
          const mrdsl = Number(login.targetKeys.get('MaxRecvDataSegmentLength'));
          const lun = s().lun;
          const before = randomBytes(16 * BLOCK);
          await rawWrite(c, lun, RAW_LBA, before, mrdsl);

          const itt = c.sendCommand({ lun, cdb: buildWrite10(RAW_LBA, 16), write: true, edtl: 16 * BLOCK });
          const r2t = await c.next<R2T>((p) => p.opcode === Opcode.R2T && p.itt === itt);
          expect([r2t.bufferOffset, r2t.desiredDataTransferLength]).toEqual([0, 16 * BLOCK]);
          const fresh = randomBytes(16 * BLOCK);
          const dataOut = (dataSN: number, final: boolean) => ({
            opcode: Opcode.DataOut, final, lun, itt, ttt: r2t.ttt, expStatSN: c.expStatSN, dataSN,
            bufferOffset: dataSN * 8 * BLOCK, data: fresh.subarray(dataSN * 8 * BLOCK, (dataSN + 1) * 8 * BLOCK),
          }) as const;
          const bad = c.sendPdu(dataOut(0, false), { dataDigest: true });
          // RFC 7143 7.8: the PDU is discarded with a Reject, and at ErrorRecoveryLevel 0 the
          // command then fails, but only once all of its data has been received.
          expectReject(await c.next(), RejectReason.DataDigestError, bad);
          expect(await c.drain(300)).toEqual([]);
          c.sendPdu(dataOut(1, true));
          const r = await c.result(itt);
          expect(r.status).toBe(ScsiStatus.CHECK_CONDITION);
          const sense = parseSense(r.sense!);
          expect([sense.key, sense.asc, sense.ascq]).toEqual([SenseKey.ABORTED_COMMAND, 0x47, 0x05]);

          expect((await rawRead(c, lun, RAW_LBA, 16)).equals(before)).toBe(true);
          await expectInStep(c);
        });
      });
    });

    it('CmdSN far above MaxCmdSN and below ExpCmdSN: silently ignored; the next in-window command works', async () => {
      await underLoad(s(), async () => {
        const { c } = await loggedIn(s());
        const lun = s().lun;
        const exp = c.expCmdSN;
        expect(c.cmdSN).toBe(exp);
        const above = c.sendCommand({ lun, cdb: buildRead10(0, 1), read: true, edtl: BLOCK, cmdSN: snAdd(c.maxCmdSN, 1000) });
        const below = c.sendCommand({ lun, cdb: buildRead10(0, 1), read: true, edtl: BLOCK, cmdSN: snAdd(exp, -1) });
        expect(await c.drain(300)).toEqual([]);
        const itt = c.sendCommand({ lun, cdb: buildRead10(0, 1), read: true, edtl: BLOCK });
        const r = await c.result(itt);
        expect(r.status).toBe(ScsiStatus.GOOD);
        expect(r.data.length).toBe(BLOCK);
        // Only the in-window command consumed a CmdSN.
        expect(c.expCmdSN).toBe(snAdd(exp, 1));
        const late = await c.drain(200);
        expect(late.filter((p) => p.itt === above || p.itt === below)).toEqual([]);
        expect(late).toEqual([]);
      });
    });

    it('an unknown opcode: Reject (command not supported), and the session goes on', async () => {
      await underLoad(s(), async () => {
        const { c } = await loggedIn(s());
        // A vendor-specific initiator opcode nothing here implements, with an AHS and data the
        // framer must step over to stay in step.
        const header = Buffer.alloc(48 + 8);
        header[0] = 0x1c;
        header[1] = 0x80;
        header[4] = 2;
        header.writeUIntBE(8, 5, 3);
        header.writeUInt32BE(0x55, 16);
        seededBytes(51, 8).copy(header, 48);
        c.send(Buffer.concat([header, Buffer.from('garbage!')]));
        expectReject(await c.next(), RejectReason.CommandNotSupported, header);
        await expectInStep(c);
      });
    });

    it('a Data-Out for an unknown ITT: ignored', async () => {
      await underLoad(s(), async () => {
        const { c } = await loggedIn(s());
        c.sendPdu({ opcode: Opcode.DataOut, final: true, lun: s().lun, itt: 0x0bad_0bad, ttt: RESERVED_TAG, expStatSN: c.expStatSN, dataSN: 0, bufferOffset: 0, data: randomBytes(BLOCK) });
        c.sendPdu({ opcode: Opcode.DataOut, final: true, lun: s().lun, itt: 0x0bad_0bae, ttt: 0x0000_7777, expStatSN: c.expStatSN, dataSN: 0, bufferOffset: 0, data: randomBytes(BLOCK) });
        expect(await c.drain(300)).toEqual([]);
        await expectInStep(c);
      });
    });

    it('a SNACK at ErrorRecoveryLevel 0: Reject (protocol error), and the session goes on', async () => {
      await underLoad(s(), async () => {
        const { c } = await loggedIn(s());
        const sent = c.sendPdu({ opcode: Opcode.SnackRequest, type: 0, lun: 0, itt: c.allocItt(), ttt: RESERVED_TAG, expStatSN: c.expStatSN, begRun: 0, runLength: 0 });
        expectReject(await c.next(), RejectReason.ProtocolError, sent);
        await expectInStep(c);
      });
    });
  });

  describe('afterwards', () => {
    it('every stalled login was closed at the login timeout', async () => {
      const subject = s();
      const before = subject.io.iterations;
      for (const st of subject.stalls) {
        const left = LOGIN_TIMEOUT_MS + 5000 - (Date.now() - st.client.openedAt);
        const { pdus, lifetimeMs } = await st.client.waitClosed(Math.max(left, 1));
        expect(lifetimeMs, st.name).toBeGreaterThanOrEqual(LOGIN_TIMEOUT_MS - 250);
        expect(lifetimeMs, st.name).toBeLessThan(LOGIN_TIMEOUT_MS + 3000);
        st.check(pdus);
      }
      await subject.io.reach(before + 3);
      expect(subject.io.errors).toEqual([]);
    }, 30_000);

    it('the I/O session verified every iteration, the process lives, serves a fresh login, and logged no errors', async () => {
      const subject = s();
      expect(subject.io.errors).toEqual([]);
      expect(subject.io.iterations).toBeGreaterThan(50);
      // Uninterrupted: no write + read-back took long enough to hint at a stall.
      expect(subject.io.maxIterationMs).toBeLessThan(3000);
      expect(subject.proc.proc.exitCode).toBeNull();
      expect(subject.proc.proc.signalCode).toBeNull();

      const fresh = await InitiatorSession.connect({ portal: `${subject.host}:${subject.port}`, targetName: subject.iqn, initiatorName: RAW_INITIATOR, reconnect: false });
      try {
        const data = randomBytes(8 * BLOCK);
        await fresh.write(subject.lun, FRESH_LBA, data, BLOCK);
        expect((await fresh.read(subject.lun, FRESH_LBA, 8, BLOCK)).equals(data)).toBe(true);
      } finally {
        await fresh.logout();
      }

      const output = subject.proc.output;
      const severe = output
        .split('\n')
        .filter((l) => l.startsWith('{'))
        .map((l) => JSON.parse(l) as { level: number; msg?: string })
        .filter((e) => e.level >= 50);
      expect(severe).toEqual([]);
      expect(output).not.toMatch(/Uncaught|TypeError|ReferenceError|UnhandledPromiseRejection/);
    }, 30_000);
  });
});

function padCdb(cdb: Buffer): Buffer {
  const out = Buffer.alloc(16);
  cdb.copy(out);
  return out;
}
