// A main target that states a small MAXIMUM TRANSFER LENGTH (Block Limits VPD) and refuses longer
// READs and WRITEs: detour's own commands to it (the copy's READs, the capture view's reads of the
// frozen volume, the drain's WRITEs) must all stay within it. The main target here is detour's
// embedded target, which enforces the limit it states; tgtd states none.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import { InitiatorSession } from '../src/back/index.ts';
import { validateConfig } from '../src/control/config.ts';
import { startProxy, type RunningProxy } from '../src/control/serve.ts';
import { Portal } from '../src/front/portal.ts';
import { EmbeddedTarget } from '../src/scsi/embedded-target.ts';
import { sha256Hex } from './helpers/files.ts';
import { freePort } from './helpers/ports.ts';
import { waitUntil } from './helpers/wait.ts';

const IQN = 'iqn.2026-12.test:small-transfers';
const SIZE = 16 << 20;
const BS = 512;
/** 8 KiB: far below the 64 KiB detour would otherwise send. */
const MAX_TRANSFER = 8192;

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});



describe('a main target with a small maximum transfer length', () => {
  it('copy, capture-view reads and drain stay within it; the backup is the volume at the freeze and main gets every write', async () => {
    const work = fs.mkdtempSync(path.join(os.tmpdir(), 'detour-limits-'));
    cleanups.push(() => fs.rmSync(work, { recursive: true, force: true }));
    const lunFile = path.join(work, 'main.img');
    const original = crypto.randomBytes(SIZE);
    fs.writeFileSync(lunFile, original);
    const device = new EmbeddedTarget({ targetName: IQN, luns: [{ lun: 1, file: lunFile, size: SIZE, blockSize: BS, maxTransferBytes: MAX_TRANSFER }] });
    await device.open();
    cleanups.push(() => device.close());
    const main = new Portal({ host: '127.0.0.1', port: 0, targets: [{ name: IQN, portalGroupTag: 1, device }], logger: pino({ level: 'silent' }) });
    await main.listen();
    cleanups.push(() => main.close());

    const port = await freePort('127.0.0.2');
    const config = validateConfig(
      {
        portal: `127.0.0.2:${port}`,
        dataDir: path.join(work, 'data'),
        // Inline: no control of main needed; a copy of at least 4 s, so the writes below overlap it.
        volumes: [{ name: 'vol1', target: IQN, main: `127.0.0.1:${main.port}`, topology: 'inline', ioTimeoutBudget: '5s', copyRateLimit: '4M' }],
      },
      path.join(work, 'detour.yaml'),
    );
    const proxy: RunningProxy = await startProxy(config, pino({ level: process.env.DETOUR_TEST_LOG ?? 'silent' }));
    cleanups.push(() => proxy.close());
    const initiator = await InitiatorSession.connect({ portal: `127.0.0.2:${port}`, targetName: IQN, initiatorName: 'iqn.2026-12.test:host', localAddress: '127.0.0.3' });
    cleanups.push(() => initiator.close());

    const engine = proxy.engine;
    const { id } = await engine.startBackup('vol1', { label: 'limits' });
    await waitUntil(() => engine.getBackup(id)!.phase !== 'switching' || engine.getBackup(id)!.state !== 'running', 30_000, 'the copy to start');
    expect(engine.getBackup(id)!.error).toBeNull();
    expect(engine.getBackup(id)!.phase).toBe('copying');

    // Writes of 8 KiB (an initiator's own commands keep main's limit), side by side over 2 MiB, so
    // the drain could merge them into longer WRITEs than main takes; and reads of the capture view
    // across written and unwritten blocks.
    const model = Buffer.from(original);
    const base = 8192;
    for (let k = 0; k < 256; k++) {
      const lba = base + k * 16;
      const data = crypto.randomBytes(MAX_TRANSFER);
      await initiator.write(1, lba, data, BS);
      data.copy(model, lba * BS);
    }
    for (const [lba, blocks] of [
      [base - 64, 16],
      [base + 100, 16],
      [0, 16],
    ] as const) {
      const got = await initiator.read(1, lba, blocks, BS);
      expect(sha256Hex(got), `capture view at ${lba}`).toBe(sha256Hex(model.subarray(lba * BS, (lba + blocks) * BS)));
    }

    await waitUntil(() => engine.getBackup(id)!.state !== 'running', 60_000, 'the backup to end');
    const b = engine.getBackup(id)!;
    expect(b.error).toBeNull();
    expect(b.state).toBe('completed');
    expect(b.phase).toBe('done');
    const restored = path.join(work, 'restored.img');
    await engine.store.restoreToFile(id, restored);
    expect(sha256Hex(fs.readFileSync(restored))).toBe(sha256Hex(original));
    initiator.close();
    expect(sha256Hex(fs.readFileSync(lunFile))).toBe(sha256Hex(model));
  }, 120_000);
});
