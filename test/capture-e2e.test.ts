// A whole backup cycle against a real tgtd, in process: switch-in, copy, drain, cutover, for the
// proxy-directed and main-directed topologies, with an initiator writing throughout. Checks bytes:
// the backup equals the volume at the freeze, and main ends up with every acknowledged write.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import { InitiatorSession } from '../src/back/index.ts';
import { validateConfig } from '../src/control/config.ts';
import { startProxy, type RunningProxy } from '../src/control/serve.ts';
import { sha256Hex } from './helpers/files.ts';
import { freePort } from './helpers/ports.ts';
import { waitUntil } from './helpers/wait.ts';
import { Tgtd } from './helpers/tgtd.ts';

const IQN = 'iqn.2026-11.test:capture';
const SIZE = 32 << 20;
const BS = 512;

let tgtd: Tgtd | undefined;
let proxy: RunningProxy | undefined;
let initiator: InitiatorSession | undefined;
const dirs: string[] = [];

afterEach(async () => {
  initiator?.close();
  await proxy?.close();
  await tgtd?.stop();
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
  initiator = undefined;
  proxy = undefined;
  tgtd = undefined;
});



for (const topology of ['proxy-directed', 'main-directed'] as const) {
  describe(`backup cycle, ${topology}`, () => {
    it('backup equals the volume at the freeze; main has every acknowledged write after cutover', async () => {
      const work = fs.mkdtempSync(path.join(os.tmpdir(), 'detour-capture-'));
      dirs.push(work);
      const lunFile = path.join(work, 'main.img');
      const original = crypto.randomBytes(SIZE);
      fs.writeFileSync(lunFile, original);
      tgtd = await Tgtd.start({ targets: [{ tid: 1, iqn: IQN, luns: [{ lun: 1, file: lunFile }] }] });
      const port = await freePort('127.0.0.2');
      const config = validateConfig(
        {
          portal: `127.0.0.2:${port}`,
          dataDir: path.join(work, 'data'),
          // A copy of at least 4 s, so the writes below overlap it however fast the copy could go.
          volumes: [{ name: 'vol1', target: IQN, main: tgtd.portal, topology, control: { type: 'tgt', tid: 1, controlPort: tgtd.controlPort }, ioTimeoutBudget: '5s', copyRateLimit: '8M' }],
        },
        path.join(work, 'detour.yaml'),
      );
      proxy = await startProxy(config, pino({ level: process.env.DETOUR_TEST_LOG ?? 'silent' }));
      // The initiator's persistent portal: detour for proxy-directed, main for main-directed.
      initiator = await InitiatorSession.connect({
        portal: topology === 'proxy-directed' ? `127.0.0.2:${port}` : tgtd.portal,
        targetName: IQN,
        initiatorName: 'iqn.2026-11.test:server1',
        localAddress: '127.0.0.3',
        reconnect: { initialDelayMs: 50, maxDelayMs: 500 },
      });
      expect(initiator.connectedPortal).toBe(tgtd.portal);

      const engine = proxy.engine;
      const started = await engine.startBackup('vol1', { label: 'test' });
      expect(started.state).toBe('running');
      const id = started.id;
      // As the acceptance says: the workload starts as soon as the copy does.
      await waitUntil(() => engine.getBackup(id)!.phase !== 'switching', 30_000, 'the copy to start');
      expect(engine.getBackup(id)!.error).toBeNull();

      const model = Buffer.from(original);
      let writes = 0;
      let stop = false;
      let writeError: unknown;
      const writer = (async () => {
        let i = 0;
        while (!stop) {
          const blocks = 1 + (i % 16);
          const lba = (i * 7919 * 8) % (SIZE / BS - blocks);
          const data = crypto.randomBytes(blocks * BS);
          try {
            await initiator!.write(1, lba, data, BS);
          } catch (err) {
            writeError = err;
            return;
          }
          data.copy(model, lba * BS);
          writes++;
          i++;
        }
      })();

      await waitUntil(() => engine.getBackup(id)!.state !== 'running', 60_000, 'the backup to finish');
      const writesAtEnd = writes;
      // Keep writing a little after the cutover: those go to main directly.
      await waitUntil(() => writes >= writesAtEnd + 20 || writeError !== undefined, 20_000, 'writes after cutover');
      stop = true;
      await writer;
      expect(writeError).toBeUndefined();
      const b = engine.getBackup(id)!;
      expect(b.error).toBeNull();
      expect(b.state).toBe('completed');
      expect(b.phase).toBe('done');
      expect(b.freezeSeq).toBe(0);
      expect(writes).toBeGreaterThan(50);

      // The backup is the volume at the freeze: the original bytes.
      const restored = path.join(work, 'restored.img');
      await engine.store.restoreToFile(id, restored);
      expect(sha256Hex(fs.readFileSync(restored))).toBe(sha256Hex(original));
      expect(b.sha256).toBe(sha256Hex(original));

      // Main holds every acknowledged write; the initiator is back on main.
      await waitUntil(() => initiator!.connectedPortal === tgtd!.portal, 10_000, 'the initiator back on main');
      await initiator.logout();
      expect(sha256Hex(fs.readFileSync(lunFile))).toBe(sha256Hex(model));
    }, 120_000);
  });
}
