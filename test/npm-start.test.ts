// `npm start` as a new user runs it: from a fresh copy of the project, with no config file, then
// the commands the README and the start-up banner show, against real initiators (libiscsi's
// iscsi-ls, QEMU's qemu-io and qemu-nbd). npm start listens on fixed ports (127.0.0.1:3261,
// 127.0.0.2:3260, 127.0.0.1:9270): the test stops with a clear message when one is taken rather
// than fight over it.

import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { BackupObject } from '../src/control/model.ts';
import { waitForPort } from './helpers/ports.ts';
import { readFileRange } from './helpers/files.ts';
import { findSamples, parseExposition, type Sample } from './helpers/prometheus.ts';

const repoRoot = path.resolve(import.meta.dirname, '..');
const IQN = 'iqn.2026-11.io.detour:main';
const PORTAL = '127.0.0.2:3260';
const LUN_URL = `iscsi://${PORTAL}/${IQN}/0`;
const API = 'http://127.0.0.1:9270';
const FIXED_PORTS: [string, number, string][] = [
  ['127.0.0.1', 3261, 'the embedded main target'],
  ['127.0.0.2', 3260, "detour's portal"],
  ['127.0.0.1', 9270, 'the API and /metrics'],
];
const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

/** The environment of a user's shell: none of detour's variables, no npm chatter. */
function userEnv(): NodeJS.ProcessEnv {
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('DETOUR_')));
  return { ...env, npm_config_update_notifier: 'false', npm_config_fund: 'false', NO_COLOR: '1' };
}

async function busyPorts(): Promise<string[]> {
  const busy: string[] = [];
  for (const [host, port, what] of FIXED_PORTS) {
    const err = await new Promise<NodeJS.ErrnoException | undefined>((resolve) => {
      const srv = net.createServer();
      srv.once('error', (e: NodeJS.ErrnoException) => resolve(e));
      srv.listen(port, host, () => srv.close(() => resolve(undefined)));
    });
    if (err) busy.push(`${host}:${port} (${what}): ${err.code}`);
  }
  return busy;
}

/** The working tree as a clone with the uncommitted work would have it: tracked and new files, not ignored ones. */
function copyProject(to: string): void {
  const files = execFileSync('git', ['ls-files', '-z', '--cached', '--others', '--exclude-standard'], { cwd: repoRoot }).toString('utf8').split('\0').filter(Boolean);
  for (const f of files) {
    const src = path.join(repoRoot, f);
    if (!fs.existsSync(src)) continue; // deleted in the working tree
    fs.mkdirSync(path.dirname(path.join(to, f)), { recursive: true });
    fs.copyFileSync(src, path.join(to, f));
  }
  // What `npm ci` would install, without installing it again.
  fs.symlinkSync(path.join(repoRoot, 'node_modules'), path.join(to, 'node_modules'), 'dir');
}

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function run(cmd: string, args: string[], opts: { cwd: string; timeoutMs?: number }): Promise<Run> {
  return new Promise((resolve) => {
    execFile(cmd, args, { cwd: opts.cwd, env: userEnv(), timeout: opts.timeoutMs ?? 60_000, maxBuffer: 64 * MiB }, (err, stdout, stderr) =>
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout, stderr }),
    );
  });
}

async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of fs.createReadStream(file, { highWaterMark: 4 * MiB })) h.update(chunk as Buffer);
  return h.digest('hex');
}

function sum(samples: Sample[], name: string, labels: Record<string, string> = {}): number {
  return findSamples(samples, name, labels).reduce((n, s) => n + s.value, 0);
}

async function scrape(cwd: string): Promise<ReturnType<typeof parseExposition>> {
  const r = await run('curl', ['-fsS', '--max-time', '20', `${API}/metrics`], { cwd });
  expect(r.code, r.stderr).toBe(0);
  return parseExposition(r.stdout);
}

async function until<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

function groupMembers(pgid: number): number[] {
  const out = execFileSync('ps', ['-e', '-o', 'pid=,pgid=,stat=']).toString();
  return out
    .split('\n')
    .map((l) => l.trim().split(/\s+/))
    .filter((f) => f.length === 3 && Number(f[1]) === pgid && !f[2]!.startsWith('Z'))
    .map((f) => Number(f[0]));
}

describe('npm start, as a new user runs it', () => {
  let dir: string;
  let npm: ChildProcess | undefined;
  let output = '';
  let stdout = '';
  let exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  let nbd: ChildProcess | undefined;
  let nbdSocket: string;
  let image: string;
  let firstBackup: BackupObject | undefined;
  /** The highest values seen on /metrics while the second backup ran. */
  const duringBackup = new Map<string, number>();
  const startedAt = Date.now() / 1000;

  beforeAll(async () => {
    const busy = await busyPorts();
    if (busy.length) {
      throw new Error(
        `npm start listens on fixed ports and one is taken, so this test cannot run now:\n  ${busy.join('\n  ')}\n` +
          'Stop whatever holds it (another `npm start` or a test run doing the same) and run the test again.',
      );
    }
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'detour-npm-start-'));
    copyProject(dir);
    image = path.join(dir, 'data', 'main.img');
    nbdSocket = path.join(dir, 'nbd.sock');
    // Its own process group, as a shell gives a foreground job: Ctrl-C reaches every process of it.
    npm = spawn('npm', ['start'], { cwd: dir, env: userEnv(), detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
    npm.stdout!.on('data', (d: Buffer) => {
      output += d.toString();
      stdout += d.toString();
    });
    npm.stderr!.on('data', (d: Buffer) => (output += d.toString()));
    exited = new Promise((resolve) => npm!.once('exit', (code, signal) => resolve({ code, signal })));
    const early = exited.then(({ code, signal }) => {
      throw new Error(`npm start exited (${code ?? signal}) before it was ready:\n${output}`);
    });
    await Promise.race([Promise.all([waitForPort('127.0.0.2', 3260, 60_000), waitForPort('127.0.0.1', 9270, 60_000)]), early]);
    early.catch(() => {});
    // The banner is written once the API listens, and reaches us through a pipe a moment after the
    // ports answer: on a busy host that moment was long enough for the first test to miss it.
    const bannerBy = Date.now() + 30_000;
    while (!output.includes('detour is running on embedded defaults.') && Date.now() < bannerBy && npm.exitCode === null) {
      await new Promise((r) => setTimeout(r, 50));
    }
  }, 120_000);

  afterAll(async () => {
    if (nbd && nbd.exitCode === null && nbd.signalCode === null) {
      nbd.kill('SIGTERM');
      await new Promise((r) => nbd!.once('exit', r));
    }
    if (npm?.pid !== undefined && npm.exitCode === null && npm.signalCode === null) {
      process.kill(-npm.pid, 'SIGINT');
      const stopped = await Promise.race([exited.then(() => true), new Promise((r) => setTimeout(() => r(false), 30_000))]);
      if (!stopped) process.kill(-npm.pid, 'SIGKILL');
    }
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  }, 60_000);

  it('prints where everything is, and the embedded target is listed through detour by iscsi-ls', async () => {
    expect(output).toContain('detour is running on embedded defaults.');
    expect(output).toContain(`iscsi-ls -s iscsi://${PORTAL}`);
    const r = await run('iscsi-ls', ['-s', `iscsi://${PORTAL}`], { cwd: dir });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain(`Target:${IQN} Portal:${PORTAL},1`);
    expect(r.stdout).toMatch(/Lun:0\s+Type:DIRECT_ACCESS/);
  });

  it('qemu-io writes and reads back through detour (redirected to the embedded target)', async () => {
    const r = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 1M', '-c', 'read -P 0x5a 0 1M', LUN_URL], { cwd: dir });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toContain('wrote 1048576/1048576 bytes at offset 0');
    expect(r.stdout).toContain('read 1048576/1048576 bytes at offset 0');
    expect(r.stdout).not.toMatch(/Pattern verification failed/);
    // The write is in the embedded target's image.
    expect(readFileRange(image, 0, MiB).equals(Buffer.alloc(MiB, 0x5a))).toBe(true);
    expect(fs.statSync(image).size).toBe(GiB);
  });

  it('an initiator session held on the main target counts as redirected', async () => {
    // qemu-nbd keeps one libiscsi session open (logged in through detour's redirect) for the rest
    // of the test, as a running VM would.
    nbd = spawn('qemu-nbd', ['-t', '-k', nbdSocket, '-f', 'raw', '--cache=none', LUN_URL], { cwd: dir, env: userEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
    let nbdOut = '';
    nbd.stdout!.on('data', (d: Buffer) => (nbdOut += d.toString()));
    nbd.stderr!.on('data', (d: Buffer) => (nbdOut += d.toString()));
    await until('qemu-nbd to serve the LUN', 30_000, async () => {
      if (nbd!.exitCode !== null) throw new Error(`qemu-nbd exited: ${nbdOut}`);
      if (!fs.existsSync(nbdSocket)) return undefined;
      const r = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x5a 0 64k', `nbd+unix:///?socket=${nbdSocket}`], { cwd: dir });
      return r.code === 0 ? true : undefined;
    });
    const redirected = await until('detour_sessions{mode="redirected"} to be 1', 60_000, async () => {
      const v = sum((await scrape(dir)).samples, 'detour_sessions', { volume: 'vol1', mode: 'redirected' });
      return v === 1 ? v : undefined;
    });
    expect(redirected).toBe(1);
  });

  it('`npx detour backup start vol1 --wait --json` completes, and `detour restore` gives the volume at the freeze', async () => {
    // Nothing writes during this backup, so the volume at the freeze is the image as it is now.
    const before = await sha256File(image);
    const r = await run('npx', ['detour', 'backup', 'start', 'vol1', '--wait', '--json'], { cwd: dir, timeoutMs: 600_000 });
    expect(r.code, r.stderr).toBe(0);
    const lines = r.stdout.split('\n').filter(Boolean);
    // --json: every line is a backup object (progress), the last one the result.
    for (const l of lines) expect(Object.keys(JSON.parse(l) as object).sort()).toEqual(Object.keys(JSON.parse(lines.at(-1)!) as object).sort());
    const b = JSON.parse(lines.at(-1)!) as BackupObject;
    expect(b).toMatchObject({ volume: 'vol1', state: 'completed', phase: 'done', bytesTotal: GiB, bytesCopied: GiB, error: null });
    expect(b.sha256).toBe(before);
    firstBackup = b;

    const restored = path.join(dir, 'restored.img');
    const rr = await run('npx', ['detour', 'restore', b.id, '--to-file', restored, '--json'], { cwd: dir, timeoutMs: 600_000 });
    expect(rr.code, rr.stderr).toBe(0);
    expect(JSON.parse(rr.stdout)).toEqual({ id: b.id, path: restored, bytes: GiB, sha256: before });
    expect(fs.statSync(restored).size).toBe(GiB);
    expect(await sha256File(restored)).toBe(before);
    expect(await sha256File(image)).toBe(before);
    fs.rmSync(restored);
  }, 900_000);

  it('a second backup while the initiator writes: every write reaches the main target', async () => {
    const backup = run('npx', ['detour', 'backup', 'start', 'vol1', '--wait', '--json', '--label', 'under load'], { cwd: dir, timeoutMs: 600_000 });
    let finished = false;
    void backup.finally(() => (finished = true));
    // Gauges are sampled: watch them while the backup runs.
    const watch = (async () => {
      while (!finished) {
        const { samples } = await scrape(dir);
        for (const [key, name, labels] of [
          ['capture', 'detour_sessions', { volume: 'vol1', mode: 'capture' }],
          ['copying', 'detour_backup_phase', { volume: 'vol1', phase: 'copying' }],
          ['records', 'detour_journal_records', { volume: 'vol1' }],
          ['bytes', 'detour_journal_bytes', { volume: 'vol1' }],
          ['unreflected', 'detour_journal_unreflected_records', { volume: 'vol1' }],
          ['progress', 'detour_backup_progress_ratio', { volume: 'vol1' }],
        ] as const) {
          duringBackup.set(key, Math.max(duringBackup.get(key) ?? 0, sum(samples, name, labels)));
        }
        await new Promise((r) => setTimeout(r, 200));
      }
    })();
    const written: { offset: number; pattern: number }[] = [];
    // Writes start with the switch: they wait for the freeze, then go to the journal.
    for (let i = 0; !finished || written.length === 0; i++) {
      const offset = 512 * MiB + (i % 2048) * 64 * 1024;
      const pattern = (i % 250) + 1;
      const w = await run('qemu-io', ['-f', 'raw', '-c', `write -P ${pattern} ${offset} 64k`, `nbd+unix:///?socket=${nbdSocket}`], { cwd: dir });
      expect(w.code, w.stdout + w.stderr).toBe(0);
      written.push({ offset, pattern });
    }
    const r = await backup;
    await watch;
    expect(r.code, r.stderr).toBe(0);
    const b = JSON.parse(r.stdout.split('\n').filter(Boolean).at(-1)!) as BackupObject;
    expect(b).toMatchObject({ volume: 'vol1', label: 'under load', state: 'completed', phase: 'done' });
    expect(b.id).not.toBe(firstBackup?.id);
    // The last write to each slot is in the embedded target's image.
    const last = new Map(written.map((w) => [w.offset, w.pattern]));
    for (const [offset, pattern] of last) expect(readFileRange(image, offset, 64 * 1024).equals(Buffer.alloc(64 * 1024, pattern)), `64 KiB at ${offset}`).toBe(true);
  }, 900_000);

  it('curl /metrics has every contract metric, non-zero where work happened', async () => {
    // The held session went back to the main target after the hand-back.
    const { types, samples } = await until('the session to be counted as redirected again', 60_000, async () => {
      const m = await scrape(dir);
      return sum(m.samples, 'detour_sessions', { volume: 'vol1', mode: 'redirected' }) === 1 ? m : undefined;
    });
    const contract: [string, string][] = [
      ['detour_sessions', 'gauge'],
      ['detour_scsi_commands_total', 'counter'],
      ['detour_scsi_command_duration_seconds', 'histogram'],
      ['detour_backup_phase', 'gauge'],
      ['detour_backup_bytes_copied_total', 'counter'],
      ['detour_backup_bytes_total', 'gauge'],
      ['detour_journal_records', 'gauge'],
      ['detour_journal_bytes', 'gauge'],
      ['detour_journal_unreflected_records', 'gauge'],
      ['detour_drain_bytes_total', 'counter'],
      ['detour_cutover_pause_seconds', 'histogram'],
      ['detour_last_backup_success_timestamp_seconds', 'gauge'],
    ];
    for (const [name, type] of contract) expect(types.get(name), name).toBe(type);
    const v = { volume: 'vol1' };
    expect(sum(samples, 'detour_sessions', { ...v, mode: 'redirected' })).toBe(1);
    expect(sum(samples, 'detour_sessions', { ...v, mode: 'capture' })).toBe(0);
    // Commands went through detour only while it held the session, during the second backup.
    expect(sum(samples, 'detour_scsi_commands_total', v)).toBeGreaterThan(0);
    expect(samples.some((s) => s.name === 'detour_scsi_commands_total' && /^WRITE_/.test(s.labels.op!) && s.labels.status === 'GOOD' && s.value > 0)).toBe(true);
    expect(sum(samples, 'detour_scsi_command_duration_seconds_count', v)).toBe(sum(samples, 'detour_scsi_commands_total', v));
    expect(sum(samples, 'detour_scsi_command_duration_seconds_sum', v)).toBeGreaterThan(0);
    expect(sum(samples, 'detour_backup_phase', { ...v, phase: 'done' })).toBe(1);
    expect(sum(samples, 'detour_backup_phase', v)).toBe(1);
    expect(sum(samples, 'detour_backup_bytes_copied_total', v)).toBe(2 * GiB);
    expect(sum(samples, 'detour_backup_bytes_total', v)).toBe(GiB);
    // While the second backup ran: the session on detour, the copy, the journal filling up.
    expect(duringBackup.get('capture')).toBe(1);
    expect(duringBackup.get('copying')).toBe(1);
    expect(duringBackup.get('records')).toBeGreaterThan(0);
    expect(duringBackup.get('bytes')).toBeGreaterThan(0);
    expect(duringBackup.get('progress')).toBeGreaterThan(0);
    // Now that it is over, the journal is gone and its writes are on the main target.
    expect(sum(samples, 'detour_journal_records', v)).toBe(0);
    expect(sum(samples, 'detour_journal_bytes', v)).toBe(0);
    expect(sum(samples, 'detour_journal_unreflected_records', v)).toBe(0);
    const drained = sum(samples, 'detour_drain_bytes_total', v);
    expect(drained).toBeGreaterThan(0);
    expect(drained % 512).toBe(0);
    expect(sum(samples, 'detour_cutover_pause_seconds_count', v)).toBe(2);
    // The writes detour took during the second backup went through the journal, in commit groups of
    // at least one record each, each group's write taking some time. Not every one: those that
    // reached detour after the cutover opened its gate, before the initiator logged out, went
    // straight to the main target (the workload is qemu-io WRITEs only, one record each).
    const writesOnDetour = samples
      .filter((s) => s.name === 'detour_scsi_commands_total' && s.labels.volume === 'vol1' && /^WRITE_/.test(s.labels.op!) && s.labels.status === 'GOOD')
      .reduce((a, s) => a + s.value, 0);
    const commits = sum(samples, 'detour_journal_commit_duration_seconds_count', v);
    expect(types.get('detour_journal_commit_duration_seconds')).toBe('histogram');
    expect(types.get('detour_journal_commit_records_total')).toBe('counter');
    expect(writesOnDetour).toBeGreaterThan(0);
    const journaled = sum(samples, 'detour_journal_commit_records_total', v);
    expect(journaled).toBeGreaterThan(0);
    expect(journaled).toBeLessThanOrEqual(writesOnDetour);
    expect(commits).toBeGreaterThan(0);
    expect(commits).toBeLessThanOrEqual(journaled);
    expect(sum(samples, 'detour_journal_commit_duration_seconds_sum', v)).toBeGreaterThan(0);
    expect(sum(samples, 'detour_last_backup_success_timestamp_seconds', v)).toBeGreaterThan(startedAt);
    expect(sum(samples, 'detour_login_redirects_total', v)).toBeGreaterThanOrEqual(3);
    expect(sum(samples, 'detour_backup_progress_ratio', v)).toBe(1);
    expect(sum(samples, 'process_cpu_user_seconds_total')).toBeGreaterThan(0);
  });

  it('logs JSON lines; backup events carry backupId, phase and volume, session events volume, initiator and tsih', () => {
    const events = stdout
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(events.length).toBeGreaterThan(10);
    const backupEvents = events.filter((e) => ['backup started', 'backup phase', 'volume frozen', 'drain round', 'cutover'].includes(e.msg as string));
    expect(new Set(backupEvents.map((e) => e.msg))).toEqual(new Set(['backup started', 'backup phase', 'volume frozen', 'drain round', 'cutover']));
    for (const e of backupEvents) {
      expect(e, JSON.stringify(e)).toMatchObject({ volume: 'vol1', backupId: expect.any(String), phase: expect.any(String) });
    }
    const sessionEvents = events.filter((e) => ['session on detour', 'backend session open'].includes(e.msg as string));
    expect(sessionEvents.length).toBeGreaterThan(0);
    for (const e of sessionEvents) expect(e, JSON.stringify(e)).toMatchObject({ volume: 'vol1', initiator: expect.any(String), tsih: expect.any(Number) });
    expect(events.filter((e) => (e.level as number) >= 50)).toEqual([]);
  });

  it('Ctrl-C stops it cleanly and leaves no process behind', async () => {
    nbd!.kill('SIGTERM');
    await new Promise((r) => (nbd!.exitCode !== null || nbd!.signalCode !== null ? r(undefined) : nbd!.once('exit', r)));
    const pgid = npm!.pid!;
    expect(groupMembers(pgid).length).toBeGreaterThan(0);
    // What a terminal does on Ctrl-C: SIGINT to every process of the foreground job.
    process.kill(-pgid, 'SIGINT');
    const { code, signal } = await Promise.race([
      exited,
      new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`npm start did not stop within 60 s:\n${output.slice(-3000)}`)), 60_000)),
    ]);
    // npm re-raises the signal its script ended on; either way it is the user's Ctrl-C.
    expect(code === 0 || signal === 'SIGINT', `code ${code}, signal ${signal}`).toBe(true);
    await until('every process of npm start to exit', 20_000, async () => (groupMembers(pgid).length === 0 ? true : undefined));
    expect(output).toContain('"msg":"shutting down"');
    expect(output).not.toContain('second signal');
    expect(fs.existsSync(path.join(dir, 'data', 'main-target.sock'))).toBe(false);
    expect(await busyPorts()).toEqual([]);
  }, 120_000);
});
