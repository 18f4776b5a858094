// The initiator session against a real tgtd: login (plain, CHAP, mutual CHAP), discovery,
// data integrity at many sizes, queue depth, digests, sense pass-through, reconnect after the
// target drops the connection, and login redirection between two tgtd instances.

import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildInquiry, buildRead10, parseSense, ScsiStatus, SenseKey } from 'iscsi-node-wire';
import { InitiatorSession, LoginError, ScsiError, type InitiatorOptions } from '../src/back/index.ts';
import { Tgtd } from './helpers/tgtd.ts';
import { readFileRange } from './helpers/files.ts';

const run = promisify(execFile);
const BLOCK = 512;
const BASE = 'iqn.2024-01.org.detour.test';
const PLAIN = `${BASE}:plain`;
const CHAP = `${BASE}:chap`;
const DIGEST = `${BASE}:digest`;
const INITIATOR = `${BASE}:initiator`;
const PLAIN_SIZE = 64 << 20;
const CHAP_USER = 'detour-ini';
const CHAP_SECRET = 'initiator-secret-1';
const TARGET_USER = 'detour-tgt';
const TARGET_SECRET = 'target-secret-22';

let dir: string;
let tgt: Tgtd;
let session: InitiatorSession;
const opened: InitiatorSession[] = [];

function file(name: string): string {
  return path.join(dir, name);
}

async function open(o: Partial<InitiatorOptions> & { targetName: string }): Promise<InitiatorSession> {
  const s = await InitiatorSession.connect({ portal: tgt.portal, initiatorName: INITIATOR, ...o });
  opened.push(s);
  return s;
}

/** What the backing file holds at a byte range: checks writes landed where they should. */
function fileBytes(name: string, offset: number, length: number): Buffer {
  return readFileRange(file(name), offset, length);
}

async function connections(t: Tgtd, tid: number): Promise<Array<{ sid: string; cid: string }>> {
  const out = await t.adm(['--op', 'show', '--mode', 'conn', '--tid', String(tid)]);
  const list: Array<{ sid: string; cid: string }> = [];
  const re = /Session:\s*(\d+)\s+Connection:\s*(\d+)/g;
  for (let m = re.exec(out); m; m = re.exec(out)) list.push({ sid: m[1]!, cid: m[2]! });
  return list;
}

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'detour-back-'));
  tgt = await Tgtd.start({
    targets: [
      { tid: 1, iqn: PLAIN, luns: [{ lun: 1, file: file('plain.img'), size: PLAIN_SIZE }] },
      { tid: 2, iqn: CHAP, luns: [{ lun: 1, file: file('chap.img'), size: 8 << 20 }], chap: { user: CHAP_USER, password: CHAP_SECRET } },
      { tid: 3, iqn: DIGEST, luns: [{ lun: 1, file: file('digest.img'), size: 16 << 20 }] },
    ],
  });
  // The target's own credentials, used only when the initiator asks it to authenticate (mutual CHAP).
  await tgt.adm(['--op', 'new', '--mode', 'account', '--user', TARGET_USER, '--password', TARGET_SECRET]);
  await tgt.adm(['--op', 'bind', '--mode', 'account', '--tid', '2', '--user', TARGET_USER, '--outgoing']);
  // tgt offers digests only where configured to.
  for (const key of ['HeaderDigest', 'DataDigest']) {
    await tgt.adm(['--op', 'update', '--mode', 'target', '--tid', '3', '-n', key, '-v', 'CRC32C,None']);
  }
  session = await open({ targetName: PLAIN });
  // Clears the power-on unit attention every new I_T nexus starts with.
  await session.readCapacity(1);
});

afterAll(async () => {
  for (const s of opened) s.close();
  await tgt?.stop();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('login and discovery', () => {
  it('discovers every target with SendTargets', async () => {
    const found = await InitiatorSession.discover(tgt.portal, INITIATOR);
    const byName = new Map(found.map((t) => [t.targetName, t.addresses]));
    expect([...byName.keys()].sort()).toEqual([CHAP, DIGEST, PLAIN].sort());
    expect(byName.get(PLAIN)).toEqual([`${tgt.portal},1`]);
  });

  it('logs in without CHAP and reads the capacity, the LUN list and INQUIRY data', async () => {
    expect(session.tsih).toBeGreaterThan(0);
    expect(session.targetPortalGroupTag).toBe(1);
    expect(session.params.authMethod).toBe('None');
    expect(await session.readCapacity(1)).toEqual({ blocks: PLAIN_SIZE / BLOCK, blockSize: BLOCK });
    expect(await session.reportLuns()).toEqual([0, 1]);

    const r = await session.command(1, buildInquiry(false, 0, 96), { dataInLength: 96 });
    expect(r.status).toBe(ScsiStatus.GOOD);
    const inq = r.data!;
    expect(inq[0]! & 0x1f).toBe(0); // direct-access block device
    // The same fields as libiscsi reads them.
    const { stdout } = await run('iscsi-inq', [`iscsi://${tgt.portal}/${PLAIN}/1`]);
    const field = (name: string) => new RegExp(`^${name}:(.*)$`, 'm').exec(stdout)![1]!;
    expect(inq.toString('latin1', 8, 16)).toBe(field('Vendor'));
    expect(inq.toString('latin1', 16, 32)).toBe(field('Product'));
    expect(inq.toString('latin1', 32, 36)).toBe(field('Revision'));
  });

  it('logs in with CHAP', async () => {
    const s = await open({ targetName: CHAP, chap: { user: CHAP_USER, secret: CHAP_SECRET } });
    expect(s.params.authMethod).toBe('CHAP');
    expect(await s.readCapacity(1)).toEqual({ blocks: (8 << 20) / BLOCK, blockSize: BLOCK });
    const data = randomBytes(8 * BLOCK);
    await s.write(1, 5, data, BLOCK);
    expect(fileBytes('chap.img', 5 * BLOCK, data.length).equals(data)).toBe(true);
    await s.logout();
  });

  it('refuses a wrong CHAP secret with LoginError 0x0201', async () => {
    const err = await InitiatorSession.connect({
      portal: tgt.portal,
      targetName: CHAP,
      initiatorName: INITIATOR,
      chap: { user: CHAP_USER, secret: 'not-the-secret-at-all' },
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(LoginError);
    expect((err as LoginError).status).toBe(0x0201);
    expect((err as LoginError).statusText).toBe('Authentication failure');
    expect((err as LoginError).local).toBe(false);
  });

  it('refuses a target without CHAP credentials when CHAP is required', async () => {
    const err = (await InitiatorSession.connect({ portal: tgt.portal, targetName: CHAP, initiatorName: INITIATOR }).catch((e: unknown) => e)) as LoginError;
    expect(err).toBeInstanceOf(LoginError);
    expect(err.statusClass).toBe(2);
  });

  it('authenticates the target with mutual CHAP, and refuses it when its secret is not the expected one', async () => {
    const s = await open({ targetName: CHAP, chap: { user: CHAP_USER, secret: CHAP_SECRET, mutual: { user: TARGET_USER, secret: TARGET_SECRET } } });
    expect(s.params.authMethod).toBe('CHAP');
    expect((await s.readCapacity(1)).blocks).toBe((8 << 20) / BLOCK);
    await s.logout();

    const err = (await InitiatorSession.connect({
      portal: tgt.portal,
      targetName: CHAP,
      initiatorName: INITIATOR,
      chap: { user: CHAP_USER, secret: CHAP_SECRET, mutual: { user: TARGET_USER, secret: 'some-other-secret' } },
    }).catch((e: unknown) => e)) as LoginError;
    expect(err).toBeInstanceOf(LoginError);
    expect(err.status).toBe(0x0201);
    expect(err.local).toBe(true);
    expect(err.message).toContain('mutual');
  });
});

describe('data', () => {
  it('writes and reads back random data from 512 B to 4 MiB at unaligned LBAs', async () => {
    const sizes = [1, 3, 8, 17, 128, 255, 1000, 2049, 8192]; // in blocks: 512 B .. 4 MiB
    let lba = 7;
    for (const blocks of sizes) {
      const data = randomBytes(blocks * BLOCK);
      await session.write(1, lba, data, BLOCK);
      const back = await session.read(1, lba, blocks, BLOCK);
      expect(back.length).toBe(data.length);
      expect(back.equals(data)).toBe(true);
      expect(fileBytes('plain.img', lba * BLOCK, data.length).equals(data)).toBe(true);
      lba += blocks + 13;
    }
  });

  it('keeps 64 commands in flight at once', async () => {
    const n = 64;
    const blocks = 32;
    const base = 60_000;
    const chunks = Array.from({ length: n }, () => randomBytes(blocks * BLOCK));
    const before = session.stats.maxInFlight;
    await Promise.all(chunks.map((c, i) => session.write(1, base + i * blocks, c, BLOCK)));
    const reads = await Promise.all(chunks.map((_, i) => session.read(1, base + i * blocks, blocks, BLOCK)));
    reads.forEach((r, i) => expect(r.equals(chunks[i]!)).toBe(true));
    expect(session.stats.maxInFlight).toBeGreaterThanOrEqual(n);
    expect(before).toBeLessThan(n);
    expect(fileBytes('plain.img', base * BLOCK, n * blocks * BLOCK).equals(Buffer.concat(chunks))).toBe(true);
  });

  it('works with header and data digests', async () => {
    const s = await open({ targetName: DIGEST, headerDigest: true, dataDigest: true });
    expect([s.params.headerDigest, s.params.dataDigest]).toEqual(['CRC32C', 'CRC32C']);
    for (const blocks of [1, 100, 8192]) {
      const data = randomBytes(blocks * BLOCK);
      await s.write(1, 11, data, BLOCK);
      expect((await s.read(1, 11, blocks, BLOCK)).equals(data)).toBe(true);
      expect(fileBytes('digest.img', 11 * BLOCK, data.length).equals(data)).toBe(true);
    }
    await s.logout();
  });

  it('passes a CHECK CONDITION through command() with its sense data', async () => {
    const blocks = PLAIN_SIZE / BLOCK;
    const r = await session.command(1, buildRead10(blocks, 1), { dataInLength: BLOCK });
    expect(r.status).toBe(ScsiStatus.CHECK_CONDITION);
    expect(r.response).toBe(0);
    const sense = parseSense(r.sense!);
    expect([sense.key, sense.asc, sense.ascq]).toEqual([SenseKey.ILLEGAL_REQUEST, 0x21, 0x00]);

    const err = (await session.read(1, blocks - 1, 2, BLOCK).catch((e: unknown) => e)) as ScsiError;
    expect(err).toBeInstanceOf(ScsiError);
    expect(err.status).toBe(ScsiStatus.CHECK_CONDITION);
    expect([err.sense?.key, err.sense?.asc, err.sense?.ascq]).toEqual([SenseKey.ILLEGAL_REQUEST, 0x21, 0x00]);
  });
});

describe('recovery and redirection', () => {
  it('reconnects after the target drops the connection and finishes the I/O', async () => {
    const before = await connections(tgt, 1);
    const s = await open({ targetName: PLAIN, reconnect: { initialDelayMs: 50, maxDelayMs: 500, maxAttempts: 20 } });
    await s.readCapacity(1);
    const oldTsih = s.tsih;
    const mine = (await connections(tgt, 1)).find((c) => !before.some((b) => b.sid === c.sid))!;
    expect(mine).toBeDefined();
    const reconnected = new Promise<{ attempt: number }>((r) => s.once('reconnect', r));
    const chunks = Array.from({ length: 16 }, () => randomBytes(256 * BLOCK));
    const base = 100_000;
    const writes = Promise.all(chunks.map((c, i) => s.write(1, base + i * 256, c, BLOCK)));
    await tgt.adm(['--op', 'delete', '--mode', 'conn', '--tid', '1', '--sid', mine.sid, '--cid', mine.cid]);
    await writes;
    expect((await reconnected).attempt).toBeGreaterThanOrEqual(1);
    expect(s.tsih).not.toBe(oldTsih);
    const back = await Promise.all(chunks.map((_, i) => s.read(1, base + i * 256, 256, BLOCK)));
    back.forEach((b, i) => expect(b.equals(chunks[i]!)).toBe(true));
    expect(fileBytes('plain.img', base * BLOCK, 16 * 256 * BLOCK).equals(Buffer.concat(chunks))).toBe(true);
    // The old session is gone: the shared session and the reinstated one remain.
    expect(await connections(tgt, 1)).toHaveLength(before.length + 1);
    await s.logout();
  });

  it('follows a temporary login redirect to a second tgtd', async () => {
    const a = await Tgtd.start({ targets: [{ tid: 1, iqn: PLAIN, luns: [{ lun: 1, file: file('redirect-a.img'), size: 4 << 20 }] }] });
    let b: Tgtd | undefined;
    try {
      b = await Tgtd.start({ targets: [{ tid: 1, iqn: PLAIN, luns: [{ lun: 1, file: file('redirect-b.img'), size: 12 << 20 }] }] });
      await a.adm(['--op', 'update', '--mode', 'target', '--tid', '1', '-n', 'RedirectAddress', '-v', b.host]);
      await a.adm(['--op', 'update', '--mode', 'target', '--tid', '1', '-n', 'RedirectPort', '-v', String(b.port)]);
      await a.adm(['--op', 'update', '--mode', 'target', '--tid', '1', '-n', 'RedirectReason', '-v', 'Temporary']);
      // tgt never redirects a login coming from the redirect address itself.
      const s = await InitiatorSession.connect({ portal: a.portal, targetName: PLAIN, initiatorName: INITIATOR, localAddress: '127.0.0.2', reconnect: false });
      opened.push(s);
      expect(s.connectedPortal).toBe(b.portal);
      expect(s.persistentPortal).toBe(a.portal);
      expect(await s.readCapacity(1)).toEqual({ blocks: (12 << 20) / BLOCK, blockSize: BLOCK });
      const data = randomBytes(4 * BLOCK);
      await s.write(1, 9, data, BLOCK);
      expect(fileBytes('redirect-b.img', 9 * BLOCK, data.length).equals(data)).toBe(true);
      expect(fileBytes('redirect-a.img', 9 * BLOCK, data.length).equals(Buffer.alloc(data.length))).toBe(true);
      expect(await connections(b, 1)).toHaveLength(1);
      expect(await connections(a, 1)).toHaveLength(0);
      await s.logout();
    } finally {
      await b?.stop();
      await a.stop();
    }
  });
});
