// The Linux kernel initiator (open-iscsi + iscsi_tcp in a QEMU guest) through a whole backup
// cycle: it writes a tick block every second throughout; none may fail, every tick must be on
// the main LUN at the end, and the guest must be back on the main target.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { DetourProcess } from './helpers/detour-process.ts';
import { writeDetourConfig } from './helpers/detour-config.ts';
import { Tgtd } from './helpers/tgtd.ts';

const repoRoot = path.resolve(import.meta.dirname, '..');
const RUN_SH = path.resolve(repoRoot, '../shared/tools/open-iscsi-guest/run.sh');
const IQN = 'iqn.2026-11.test:guest';
const TICKS = 40;
const TICK_BLOCK = 4096;

let tgtd: Tgtd | undefined;
let detour: DetourProcess | undefined;
const dirs: string[] = [];

afterEach(async () => {
  await detour?.stop();
  await tgtd?.stop();
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
  detour = undefined;
  tgtd = undefined;
});

function cli(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [path.join(repoRoot, 'bin/detour.js'), ...args], { encoding: 'utf8', timeout: 180_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

for (const topology of ['proxy-directed', 'main-directed'] as const) {
  describe(`open-iscsi guest, ${topology}`, () => {
    it('0 write errors, every tick on main, back on the main target', async () => {
      expect(fs.existsSync(RUN_SH), `the guest runner is missing: ${RUN_SH}`).toBe(true);
      const work = fs.mkdtempSync(path.join(os.tmpdir(), 'detour-guest-'));
      dirs.push(work);
      const lun = path.join(work, 'main.img');
      tgtd = await Tgtd.start({ targets: [{ tid: 1, iqn: IQN, luns: [{ lun: 1, file: lun, size: 256 << 20 }] }] });
      const cfg = await writeDetourConfig(work, { name: 'vol1', target: IQN, main: tgtd.portal, topology, tgt: { tid: 1, controlPort: tgtd.controlPort } });
      const { file: config, portalPort: port, apiPort } = cfg;
      detour = await DetourProcess.start(['serve', '--config', config], { host: '127.0.0.2', port });
      const detourPortal = `127.0.0.2:${port}`;
      const persistent = topology === 'proxy-directed' ? detourPortal : tgtd.portal;
      const other = topology === 'proxy-directed' ? tgtd.portal : detourPortal;
      const guest = spawn('bash', [RUN_SH, '--portal', persistent, '--forward', other, '--target', IQN, '--ticks', String(TICKS), '--tick-block', String(TICK_BLOCK), '--timeout', '400'], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let out = '';
      guest.stdout.on('data', (d: Buffer) => (out += d.toString()));
      guest.stderr.on('data', (d: Buffer) => (out += d.toString()));
      const exited = new Promise<number | null>((resolve) => guest.once('exit', (code) => resolve(code)));
      try {
        const deadline = Date.now() + 240_000;
        while (!out.includes('GUEST: logged in')) {
          if (Date.now() > deadline || guest.exitCode !== null) throw new Error(`the guest did not log in:\n${out.slice(-3000)}`);
          await new Promise((r) => setTimeout(r, 200));
        }
        // A few ticks on main first, then the whole cycle while the guest keeps writing.
        await new Promise((r) => setTimeout(r, 4000));
        const r = cli(['backup', 'start', 'vol1', '--wait', '--json', '--api', `127.0.0.1:${apiPort}`]);
        const last = JSON.parse(r.stdout.trim().split('\n').pop()!) as { state: string; error: string | null; phase: string };
        expect(last.error).toBeNull();
        expect(last.state).toBe('completed');
        expect(r.status).toBe(0);
        const code = await exited;
        expect(code, out.slice(-3000)).toBe(0);
      } finally {
        if (guest.exitCode === null) guest.kill('SIGKILL');
      }
      expect(out).toMatch(/GUEST: write errors 0\b/);
      const portals = /GUEST: current portal (\S+)\s+persistent portal (\S+)/.exec(out);
      expect(portals, out.slice(-2000)).not.toBeNull();
      expect(portals![1]).toBe(tgtd.portal);
      expect(portals![2]).toBe(persistent);
      // Every tick is on the main LUN.
      const fd = fs.openSync(lun, 'r');
      const missing: number[] = [];
      for (let n = 1; n <= TICKS; n++) {
        const b = Buffer.alloc(8);
        fs.readSync(fd, b, 0, 8, (TICK_BLOCK + n) * 4096);
        if (b.toString('latin1') !== `TICK${String(n).padStart(4, '0')}`) missing.push(n);
      }
      fs.closeSync(fd);
      expect(missing).toEqual([]);
      // And detour holds no capture session any more.
      const status = cli(['status', '--json', '--api', `127.0.0.1:${apiPort}`]);
      const s = JSON.parse(status.stdout) as { volumes: Array<{ sessions: Array<{ mode: string }> }> };
      expect(s.volumes.flatMap((v) => v.sessions).filter((x) => x.mode === 'capture')).toEqual([]);
    }, 420_000);
  });
}
