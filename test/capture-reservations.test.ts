// Backups of a volume whose initiator holds a reservation on the main LUN, against a real tgtd.
// detour's own session is just another nexus to main: a Write Exclusive reservation refuses its
// drain writes, Exclusive Access and SPC-2 RESERVE its reads as well. detour must still get every
// acknowledged write onto main and copy the volume as it was at the freeze, through a nexus main
// allows (the holder's backend session), and when no such nexus is left it must keep the volume
// captured instead of handing back sessions whose acknowledged writes are only in the journal.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { afterEach, describe, expect, it, onTestFailed } from 'vitest';
import { buildRead16, buildWrite16 } from 'iscsi-node-wire';
import { InitiatorSession, type ScsiResult } from '../src/back/index.ts';
import { validateConfig, type DetourConfig } from '../src/control/config.ts';
import { startProxy, type RunningProxy } from '../src/control/serve.ts';
import { interruptedBackupFile, readInterruptedBackup } from '../src/capture/backup-run.ts';
import { parseReadReservation, PrType } from '../src/capture/reservations.ts';
import { InlineDevice } from '../src/proxy/inline-device.ts';
import type { ItNexus, ScsiTask } from '../src/scsi/task.ts';
import { sha256Hex } from './helpers/files.ts';
import { freePort } from './helpers/ports.ts';
import { waitUntil } from './helpers/wait.ts';
import { Tgtd } from './helpers/tgtd.ts';

const IQN = 'iqn.2026-11.test:reserved';
const HOST = 'iqn.2026-11.test:server1';
const SIZE = 16 << 20;
const BS = 512;
const GOOD = 0x00;
const CONFLICT = 0x18;

const stops: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const f of stops.splice(0).reverse()) await f();
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));


/** A command past the unit attention a new nexus gets once from tgtd. */
async function command(s: InitiatorSession, cdb: Buffer, opts: { dataOut?: Buffer; dataInLength?: number } = {}): Promise<ScsiResult> {
  for (let i = 0; ; i++) {
    const r = await s.command(1, cdb, opts);
    if (i < 3 && r.status === 0x02 && r.sense && (r.sense[2]! & 0x0f) === 0x06) continue;
    return r;
  }
}

async function prOut(s: InitiatorSession, serviceAction: number, type: number, key: bigint, saKey: bigint): Promise<void> {
  const cdb = Buffer.alloc(10);
  cdb[0] = 0x5f;
  cdb[1] = serviceAction;
  cdb[2] = type;
  cdb.writeUInt32BE(24, 5);
  const params = Buffer.alloc(24);
  params.writeBigUInt64BE(key, 0);
  params.writeBigUInt64BE(saKey, 8);
  const r = await command(s, cdb, { dataOut: params });
  expect(r.status, `PERSISTENT RESERVE OUT 0x${serviceAction.toString(16)}: sense ${r.sense?.toString('hex')}`).toBe(GOOD);
}

const register = (s: InitiatorSession, key: bigint) => prOut(s, 0x00, 0, 0n, key);
const registerIgnoringKey = (s: InitiatorSession, key: bigint) => prOut(s, 0x06, 0, 0n, key);
const reserve = (s: InitiatorSession, key: bigint, type: number) => prOut(s, 0x01, type, key, 0n);
const preempt = (s: InitiatorSession, key: bigint, victim: bigint, type: number) => prOut(s, 0x04, type, key, victim);

async function readReservation(s: InitiatorSession) {
  const cdb = Buffer.alloc(10);
  cdb[0] = 0x5e;
  cdb[1] = 0x01;
  cdb.writeUInt16BE(64, 7);
  const r = await command(s, cdb, { dataInLength: 64 });
  expect(r.status).toBe(GOOD);
  return parseReadReservation(r.data!).reservation;
}

interface Rig {
  work: string;
  lunFile: string;
  original: Buffer;
  tgtd: Tgtd;
  proxy: RunningProxy;
  config: DetourConfig;
  detourPortal: string;
  /** Stops detour as a shutdown does (backups parked) and starts it again on the same configuration. */
  restart(): Promise<void>;
  logs(): Array<Record<string, unknown>>;
  connect(name?: string, portal?: string): Promise<InitiatorSession>;
}

async function rig(topology: 'inline' | 'proxy-directed', volumeExtra: Record<string, unknown> = {}): Promise<Rig> {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'detour-reservations-'));
  stops.push(() => fs.rmSync(work, { recursive: true, force: true }));
  const lunFile = path.join(work, 'main.img');
  const original = crypto.randomBytes(SIZE);
  fs.writeFileSync(lunFile, original);
  const tgtd = await Tgtd.start({ targets: [{ tid: 1, iqn: IQN, luns: [{ lun: 1, file: lunFile }] }] });
  stops.push(() => tgtd.stop());
  const port = await freePort('127.0.0.2');
  const config = validateConfig(
    {
      portal: `127.0.0.2:${port}`,
      dataDir: path.join(work, 'data'),
      volumes: [{ name: 'vol1', target: IQN, main: tgtd.portal, topology, control: { type: 'tgt', tid: 1, controlPort: tgtd.controlPort }, ioTimeoutBudget: '5s', ...volumeExtra }],
    },
    path.join(work, 'detour.yaml'),
  );
  const lines: string[] = [];
  const logger = pino({ level: 'info' }, { write: (l: string) => void lines.push(l) });
  onTestFailed(() => console.log(lines.join('')));
  const detourPortal = `127.0.0.2:${port}`;
  const connect = async (name = HOST, portal = detourPortal) => {
    const s = await InitiatorSession.connect({ portal, targetName: IQN, initiatorName: name, localAddress: '127.0.0.3', reconnect: { initialDelayMs: 50, maxDelayMs: 500 } });
    stops.push(() => s.close());
    return s;
  };
  const r: Rig = {
    work,
    lunFile,
    original,
    tgtd,
    proxy: await startProxy(config, logger),
    config,
    detourPortal,
    connect,
    logs: () => lines.map((l) => JSON.parse(l) as Record<string, unknown>),
    restart: async () => {
      await r.proxy.close();
      r.proxy = await startProxy(config, logger);
    },
  };
  stops.push(() => r.proxy.close());
  return r;
}

/** A nexus of its own on main, straight to tgtd: shows what the reservation refuses a stranger. */
async function strangerStatus(r: Rig, cdb: Buffer): Promise<number> {
  const s = await r.connect('iqn.2026-11.test:stranger', r.tgtd.portal);
  try {
    return (await command(s, cdb)).status;
  } finally {
    await s.logout();
  }
}

/**
 * Writes (and reads back through the capture view) until told to stop; every write is applied to
 * `model` only once acknowledged.
 */
function workload(s: InitiatorSession, model: Buffer, seed: number) {
  const st = { writes: 0, reads: 0, stop: false, error: undefined as unknown };
  const done = (async () => {
    for (let i = 0; !st.stop; i++) {
      const blocks = 1 + ((i * 5) % 16);
      const lba = ((i + seed) * 7919 * 8) % (SIZE / BS - blocks);
      try {
        if (i % 4 === 3) {
          // A read of what the initiator sees now: journal over the frozen volume.
          const got = await s.read(1, lba, blocks, BS);
          if (!got.equals(model.subarray(lba * BS, (lba + blocks) * BS))) throw new Error(`read of ${blocks} blocks at ${lba} differs from what was written`);
          st.reads++;
          continue;
        }
        const data = crypto.randomBytes(blocks * BS);
        await s.write(1, lba, data, BS);
        data.copy(model, lba * BS);
        st.writes++;
      } catch (err) {
        st.error = err;
        return;
      }
    }
  })();
  return { st, done };
}

function routeLogs(r: Rig, access: 'read' | 'write'): string[] {
  return r
    .logs()
    .filter((l) => l.access === access && String(l.msg).startsWith('main holds a reservation that refuses'))
    .map((l) => String(l.route));
}

describe('backups with a reservation held on the main LUN (tgtd)', () => {
  it('Write Exclusive taken through detour before the backup (inline): the drain writes through the holder nexus, main gets every acknowledged write', async () => {
    // A copy of 8 s: the count of writes during the backup below must not depend on the host's pace.
    const r = await rig('inline', { copyRateLimit: '2M' });
    const host = await r.connect();
    expect(host.connectedPortal).toBe(r.detourPortal);
    const KEY = 0x5e11_0001n;
    await register(host, KEY);
    await reserve(host, KEY, PrType.WRITE_EXCLUSIVE);
    // The reservation is real on main: any other nexus (detour's own session is one) may read, not write.
    expect(await strangerStatus(r, buildWrite16(0, 0))).toBe(CONFLICT);
    expect(await strangerStatus(r, buildRead16(0, 0))).toBe(GOOD);

    const engine = r.proxy.engine;
    const { id } = await engine.startBackup('vol1', { label: 'we' });
    await waitUntil(() => engine.getBackup(id)!.phase !== 'switching', 30_000, 'the copy to start');
    expect(engine.getBackup(id)!.error).toBeNull();
    const model = Buffer.from(r.original);
    const w = workload(host, model, 1);
    await waitUntil(() => engine.getBackup(id)!.state !== 'running' || w.st.error !== undefined, 60_000, 'the backup to end');
    // Inline: the sessions stay on detour, the writes go on to main through the holder's nexus.
    const atEnd = w.st.writes;
    expect(atEnd).toBeGreaterThan(50);
    await waitUntil(() => w.st.writes >= atEnd + 20 || w.st.error !== undefined, 20_000, 'writes after the cutover');
    w.st.stop = true;
    await w.done;
    expect(w.st.error).toBeUndefined();
    const b = engine.getBackup(id)!;
    expect(b.error).toBeNull();
    expect(b.state).toBe('completed');
    expect(w.st.reads).toBeGreaterThan(10);

    const restored = path.join(r.work, 'restored.img');
    await engine.store.restoreToFile(id, restored);
    expect(sha256Hex(fs.readFileSync(restored))).toBe(sha256Hex(r.original));
    // The writes went through the initiator's nexus; reads stayed on detour's own session.
    const writeRoutes = routeLogs(r, 'write');
    expect(writeRoutes.length).toBeGreaterThan(0);
    for (const route of writeRoutes) expect(route.startsWith(`${HOST},i,0x`)).toBe(true);
    expect(routeLogs(r, 'read')).toEqual([]);
    // detour took nothing from the holder: the reservation is as the initiator left it.
    expect(await readReservation(host)).toEqual({ key: KEY, type: PrType.WRITE_EXCLUSIVE, scope: 0 });
    await host.logout();
    expect(sha256Hex(fs.readFileSync(r.lunFile))).toBe(sha256Hex(model));
  }, 120_000);

  for (const kind of ['Exclusive Access', 'RESERVE(6)'] as const) {
    it(`${kind} taken during the copy (proxy-directed): copy, capture-view reads and drain go through the holder nexus`, async () => {
      // Slow enough for the reservation to arrive while the copy runs.
      const r = await rig('proxy-directed', { copyRateLimit: '2M' });
      const host = await r.connect();
      expect(host.connectedPortal).toBe(r.tgtd.portal);
      const engine = r.proxy.engine;
      const { id } = await engine.startBackup('vol1', { label: kind });
      await waitUntil(() => engine.getBackup(id)!.phase !== 'switching' && host.connectedPortal === r.detourPortal, 30_000, 'the copy to start with the initiator on detour');
      expect(engine.getBackup(id)!.phase).toBe('copying');
      const KEY = 0xea00_0001n;
      if (kind === 'RESERVE(6)') {
        expect((await command(host, Buffer.from([0x16, 0, 0, 0, 0, 0]))).status).toBe(GOOD);
      } else {
        await register(host, KEY);
        await reserve(host, KEY, PrType.EXCLUSIVE_ACCESS);
      }
      // From now on main refuses any other nexus, detour's own session included, reads too.
      expect(await strangerStatus(r, buildRead16(0, 0))).toBe(CONFLICT);
      expect(engine.getBackup(id)!.phase).toBe('copying');

      const model = Buffer.from(r.original);
      const w = workload(host, model, 2);
      // Writing stops before the hand-back: once back on main the initiator is a new nexus to
      // tgtd, which ties registrations to the iSCSI session, so its Exclusive Access
      // registration would refuse it there.
      await waitUntil(() => engine.getBackup(id)!.phase === 'cutover' || engine.getBackup(id)!.state !== 'running' || w.st.error !== undefined, 60_000, 'the cutover');
      w.st.stop = true;
      await w.done;
      await waitUntil(() => engine.getBackup(id)!.state !== 'running', 30_000, 'the backup to end');
      expect(w.st.error).toBeUndefined();
      const b = engine.getBackup(id)!;
      expect(b.error).toBeNull();
      expect(b.state).toBe('completed');
      expect(w.st.writes).toBeGreaterThan(30);
      expect(w.st.reads).toBeGreaterThan(10);

      const restored = path.join(r.work, 'restored.img');
      await engine.store.restoreToFile(id, restored);
      expect(sha256Hex(fs.readFileSync(restored))).toBe(sha256Hex(r.original));
      expect(b.sha256).toBe(sha256Hex(r.original));
      for (const access of ['read', 'write'] as const) {
        const routes = routeLogs(r, access);
        expect(routes.length, `${access}s rerouted`).toBeGreaterThan(0);
        for (const route of routes) expect(route.startsWith(`${HOST},i,0x`)).toBe(true);
      }
      await waitUntil(() => host.connectedPortal === r.tgtd.portal, 10_000, 'the initiator back on main');
      await host.logout();
      expect(sha256Hex(fs.readFileSync(r.lunFile))).toBe(sha256Hex(model));
    }, 120_000);
  }

  it('holder gone with writes in the journal: the volume stays captured, across a restart too, nothing is lost; the drain completes once the reservation is preempted through detour', async () => {
    const r = await rig('proxy-directed', { copyRateLimit: '8M' });
    let host = await r.connect();
    const engine = r.proxy.engine;
    const { id } = await engine.startBackup('vol1', { label: 'holder gone' });
    await waitUntil(() => engine.getBackup(id)!.phase !== 'switching' && host.connectedPortal === r.detourPortal, 30_000, 'the copy to start with the initiator on detour');
    const KEY = 0x90e0_0001n;
    await register(host, KEY);
    await reserve(host, KEY, PrType.WRITE_EXCLUSIVE);
    const model = Buffer.from(r.original);
    const written: Array<{ lba: number; blocks: number }> = [];
    for (let i = 0; i < 40; i++) {
      const blocks = 8;
      const lba = 1000 + i * 300;
      const data = crypto.randomBytes(blocks * BS);
      await host.write(1, lba, data, BS);
      data.copy(model, lba * BS);
      written.push({ lba, blocks });
    }
    // The holder leaves. tgtd keeps its registration and reservation, tied to a session no longer
    // there: no nexus but a preempting registrant can write now.
    await host.logout();

    await waitUntil(() => /cannot be drained/.test(engine.getBackup(id)!.error ?? ''), 60_000, 'the drain to report the reservation');
    const blocked = engine.getBackup(id)!;
    expect(blocked.state).toBe('running');
    expect(blocked.phase).toBe('draining');
    expect(blocked.error).toContain('a Write Exclusive persistent reservation is held with key 0x90e00001');
    expect(blocked.journal.records).toBeGreaterThanOrEqual(40);
    const vol = r.proxy.volumes.get('vol1')!;
    expect(vol.capture).toBeDefined();
    expect(engine.volumes()[0]!.phase).toBe('draining');
    expect(r.logs().some((l) => l.msg === 'drain blocked by a reservation on the main volume: the volume stays captured, nothing is handed back')).toBe(true);
    // Still blocked a while later, and none of the 40 acknowledged writes is on main yet: they are
    // only in the journal, which is still there.
    await sleep(1500);
    expect(engine.getBackup(id)!.state).toBe('running');
    expect(vol.capture).toBeDefined();
    const onMain = fs.readFileSync(r.lunFile);
    for (const x of written) expect(onMain.subarray(x.lba * BS, (x.lba + x.blocks) * BS).equals(r.original.subarray(x.lba * BS, (x.lba + x.blocks) * BS))).toBe(true);
    const journalDir = path.join(r.work, 'data', 'volumes', 'vol1', 'journal', id);
    expect(fs.existsSync(journalDir)).toBe(true);

    // detour stops meanwhile: the backup is parked with its journal, not handed back, and the
    // next start takes it up again, still blocked.
    await r.restart();
    const parked = await readInterruptedBackup(r.config.dataDir, 'vol1');
    expect(parked).toMatchObject({ backupId: id, phase: 'draining', handedBack: null });
    expect(fs.existsSync(interruptedBackupFile(r.config.dataDir, 'vol1'))).toBe(true);
    const engine2 = r.proxy.engine;
    await waitUntil(() => /cannot be drained/.test(engine2.getBackup(id)?.error ?? ''), 60_000, 'the resumed drain to report the reservation');
    expect(engine2.getBackup(id)!.state).toBe('running');
    expect(r.proxy.volumes.get('vol1')!.capture).toBeDefined();
    const onMainAfterRestart = fs.readFileSync(r.lunFile);
    for (const x of written) expect(onMainAfterRestart.subarray(x.lba * BS, (x.lba + x.blocks) * BS).equals(r.original.subarray(x.lba * BS, (x.lba + x.blocks) * BS))).toBe(true);

    // The host comes back through detour (a new nexus), registers and preempts its old key: the
    // holder is connected through detour again and the drain goes on through it.
    host = await r.connect();
    expect(host.connectedPortal).toBe(r.detourPortal);
    const KEY2 = 0x90e0_0002n;
    await registerIgnoringKey(host, KEY2);
    await preempt(host, KEY2, KEY, PrType.WRITE_EXCLUSIVE);
    await waitUntil(() => engine2.getBackup(id)!.state !== 'running', 60_000, 'the backup to end');
    const b = engine2.getBackup(id)!;
    expect(b.error).toBeNull();
    expect(b.state).toBe('completed');
    expect(r.logs().some((l) => l.msg === 'drain no longer blocked by a reservation')).toBe(true);
    const restored = path.join(r.work, 'restored.img');
    await engine2.store.restoreToFile(id, restored);
    expect(sha256Hex(fs.readFileSync(restored))).toBe(sha256Hex(r.original));
    await waitUntil(() => host.connectedPortal === r.tgtd.portal, 10_000, 'the initiator back on main');
    await host.logout();
    expect(sha256Hex(fs.readFileSync(r.lunFile))).toBe(sha256Hex(model));
    expect(fs.existsSync(journalDir)).toBe(false);
    expect(fs.existsSync(interruptedBackupFile(r.config.dataDir, 'vol1'))).toBe(false);
  }, 120_000);
});

describe('InlineDevice: a nexus lent to detour keeps its unit attentions for the initiator', () => {
  it('a unit attention met by a lent command is reported on the initiator\'s next command (not INQUIRY), once', async () => {
    const work = fs.mkdtempSync(path.join(os.tmpdir(), 'detour-reservations-ua-'));
    stops.push(() => fs.rmSync(work, { recursive: true, force: true }));
    const lunFile = path.join(work, 'main.img');
    fs.writeFileSync(lunFile, Buffer.alloc(1 << 20));
    const tgtd = await Tgtd.start({ targets: [{ tid: 1, iqn: IQN, luns: [{ lun: 1, file: lunFile }] }] });
    stops.push(() => tgtd.stop());
    const dev = new InlineDevice({ volume: 'v', targetName: IQN, main: tgtd.portal, logger: pino({ level: 'silent' }) });
    stops.push(() => dev.close());
    const isid = '400001370001';
    const nexus: ItNexus = { initiatorName: HOST, isid, tsih: 7, targetName: IQN, portalGroupTag: 1, initiatorPort: `${HOST},i,0x${isid}` };
    await dev.nexusOpened(nexus);
    const task = (cdb: Buffer, dataInLength = 0): ScsiTask => ({ nexus, lun: 1, cdb, attr: 1, itt: 1, read: dataInLength > 0, write: false, dataOut: Buffer.alloc(0), dataInLength, signal: new AbortController().signal });
    const [path0] = dev.backendPaths();
    expect(path0!.name).toBe(`${HOST},i,0x${isid}/7`);
    expect(path0!.closed).toBe(false);
    // The new nexus's power-on unit attention goes to detour's command, which was not its addressee.
    const lent = await path0!.command(1, Buffer.alloc(6), {});
    expect(lent.status).toBe(0x02);
    expect(lent.sense![2]! & 0x0f).toBe(0x06);
    expect(lent.sense![12]).toBe(0x29);
    // INQUIRY does not report it; the next TEST UNIT READY does, with main's own sense; then it is gone.
    const inq = await dev.execute(task(Buffer.from([0x12, 0, 0, 0, 96, 0]), 96));
    expect(inq.status).toBe(GOOD);
    const tur = await dev.execute(task(Buffer.alloc(6)));
    expect(tur.status).toBe(0x02);
    expect(tur.sense!.equals(lent.sense!)).toBe(true);
    expect((await dev.execute(task(Buffer.alloc(6)))).status).toBe(GOOD);
    // Another one, taken by REQUEST SENSE as its parameter data.
    expect((await dev.reset(nexus, 'lun', 1))).toBe(0);
    const again = await path0!.command(1, Buffer.alloc(6), {});
    expect(again.sense![2]! & 0x0f).toBe(0x06);
    const rs = await dev.execute(task(Buffer.from([0x03, 0, 0, 0, 252, 0]), 252));
    expect(rs.status).toBe(GOOD);
    expect(rs.dataIn!.equals(again.sense!)).toBe(true);
    expect((await dev.execute(task(Buffer.alloc(6)))).status).toBe(GOOD);
    await dev.nexusClosed(nexus);
    expect(path0!.closed).toBe(true);
    expect(dev.backendPaths()).toEqual([]);
  }, 60_000);
});
