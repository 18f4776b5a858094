// Acceptance: data through detour's inline topology reaches the main target unchanged and comes
// back unchanged. QEMU's iSCSI driver (libiscsi) copies a random image in and out with qemu-img,
// and fio runs a verified random read/write load over a long-lived libiscsi session held by
// qemu-nbd. The main target's backing file is read directly to check where the bytes landed.
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DetourProcess } from './helpers/detour-process.ts';
import { freePort } from './helpers/ports.ts';
import { Tgtd } from './helpers/tgtd.ts';

const IQN = 'iqn.2026-11.test:inline-data';
const PROXY_HOST = '127.0.0.2';
const MiB = 1 << 20;
const LUN_SIZE = 64 * MiB;
const IMAGE_SIZE = 32 * MiB;
const FIO_RUNTIME_S = 30;

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'detour-inline-data-'));
const copyLunFile = path.join(work, 'lun1.img');
const fioLunFile = path.join(work, 'lun2.img');
let tgtd: Tgtd | undefined;
let proxy: DetourProcess | undefined;
let proxyPortal = '';
/** LUN 1's contents before the test: random, so a read that misses the main target shows. */
let lun1Before: Buffer;

const started: ChildProcess[] = [];

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

function run(cmd: string, args: string[], timeoutMs: number): Promise<Run> {
  return new Promise((resolve, reject) => {
    // In the work directory: fio drops files (verify state) into its working directory.
    const p = spawn(cmd, args, { cwd: work, stdio: ['ignore', 'pipe', 'pipe'] });
    started.push(p);
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => p.kill('SIGKILL'), timeoutMs);
    p.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    p.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

function lunUrl(lun: number): string {
  return `iscsi://${proxyPortal}/${IQN}/${lun}`;
}

function sha256File(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

function fileRange(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(length);
    const n = fs.readSync(fd, b, 0, length, offset);
    return b.subarray(0, n);
  } finally {
    fs.closeSync(fd);
  }
}

async function stopChild(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return;
  const gone = new Promise<void>((resolve) => p.once('exit', () => resolve()));
  p.kill('SIGTERM');
  const timer = setTimeout(() => p.kill('SIGKILL'), 5000);
  await gone;
  clearTimeout(timer);
}


beforeAll(async () => {
  lun1Before = randomBytes(LUN_SIZE);
  fs.writeFileSync(copyLunFile, lun1Before);
  tgtd = await Tgtd.start({
    targets: [
      {
        tid: 1,
        iqn: IQN,
        luns: [
          { lun: 1, file: copyLunFile, size: LUN_SIZE },
          { lun: 2, file: fioLunFile, size: LUN_SIZE },
        ],
      },
    ],
  });
  const port = await freePort(PROXY_HOST);
  proxyPortal = `${PROXY_HOST}:${port}`;
  const config = path.join(work, 'detour.yaml');
  fs.writeFileSync(
    config,
    [
      `portal: ${proxyPortal}`,
      `api: 127.0.0.1:${await freePort()}`,
      `dataDir: ${path.join(work, 'data')}`,
      'volumes:',
      '  - name: vol1',
      `    target: ${IQN}`,
      `    main: ${tgtd.portal}`,
      '    topology: inline',
      '',
    ].join('\n'),
  );
  proxy = await DetourProcess.start(['serve', '--config', config], { host: PROXY_HOST, port });
}, 60_000);

afterAll(async () => {
  for (const p of started) await stopChild(p);
  await proxy?.stop();
  await tgtd?.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

describe('qemu-img convert through detour', () => {
  it('a random image written to the LUN lands in the main target and reads back byte for byte', async () => {
    const local = path.join(work, 'local.img');
    const back = path.join(work, 'back.img');
    const image = randomBytes(IMAGE_SIZE);
    fs.writeFileSync(local, image);

    const put = await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', local, lunUrl(1)], 120_000);
    expect(put.stderr).toBe('');
    expect(put.code).toBe(0);

    // The main target's own file: the image at offset 0, the old contents after it.
    expect(fileRange(copyLunFile, 0, IMAGE_SIZE).equals(image)).toBe(true);
    expect(fileRange(copyLunFile, IMAGE_SIZE, LUN_SIZE - IMAGE_SIZE).equals(lun1Before.subarray(IMAGE_SIZE))).toBe(true);

    const get = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', lunUrl(1), back], 120_000);
    expect(get.stderr).toBe('');
    expect(get.code).toBe(0);
    // The whole LUN comes back: the image followed by the part the copy did not touch.
    expect(fs.statSync(back).size).toBe(LUN_SIZE);
    const expected = Buffer.concat([image, lun1Before.subarray(IMAGE_SIZE)]);
    expect(sha256File(back)).toBe(createHash('sha256').update(expected).digest('hex'));
    expect(sha256File(copyLunFile)).toBe(sha256File(back));
    expect(createHash('sha256').update(fileRange(back, 0, IMAGE_SIZE)).digest('hex')).toBe(sha256File(local));
  }, 180_000);
});

interface FioJob {
  jobname: string;
  error: number;
  read: { io_bytes: number; total_ios: number };
  write: { io_bytes: number; total_ios: number };
}

/** fio's JSON report; the nbd engine prints its own lines on the same stream, around it. */
function fioReport(text: string): { jobs: FioJob[] } {
  const start = text.search(/^\{$/m);
  const end = text.lastIndexOf('\n}');
  if (start < 0 || end < start) throw new Error(`no JSON report in fio's output:\n${text}`);
  return JSON.parse(text.slice(start, end + 2)) as { jobs: FioJob[] };
}

describe('fio with crc32c verify through qemu-nbd on the detour portal', () => {
  const socket = path.join(work, 'nbd.sock');
  let nbd: ChildProcess | undefined;
  let nbdLog = '';
  const uri = `nbd+unix:///?socket=${socket}`;

  beforeAll(async () => {
    // -t keeps qemu-nbd (and its single libiscsi session to detour) up between fio's
    // connections; -e lets all of fio's jobs connect at once.
    nbd = spawn('qemu-nbd', ['-t', '-e', '16', '-k', socket, '-f', 'raw', lunUrl(2)], { stdio: ['ignore', 'pipe', 'pipe'] });
    started.push(nbd);
    nbd.stdout!.on('data', (d: Buffer) => (nbdLog += d.toString()));
    nbd.stderr!.on('data', (d: Buffer) => (nbdLog += d.toString()));
    const deadline = Date.now() + 20_000;
    for (;;) {
      if (nbd.exitCode !== null) throw new Error(`qemu-nbd exited with ${nbd.exitCode}: ${nbdLog}`);
      const up = await new Promise<boolean>((resolve) => {
        const c = net.connect({ path: socket });
        c.once('connect', () => {
          c.destroy();
          resolve(true);
        });
        c.once('error', () => resolve(false));
      });
      if (up) break;
      if (Date.now() > deadline) throw new Error(`qemu-nbd did not listen on ${socket}: ${nbdLog}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }, 30_000);

  afterAll(async () => {
    if (nbd) await stopChild(nbd);
  });

  it(`a ${FIO_RUNTIME_S} s random read/write load, 4 jobs at 4 KiB and 4 at 64 KiB, verifies every block`, async () => {
    // Each job owns its own region so no job overwrites another's verified blocks:
    // 4 KiB jobs in 0-16 MiB, 64 KiB jobs in 16-48 MiB.
    // time_based ends a job without its final verify pass, so verify_backlog verifies blocks
    // while the load runs. With rwmixread=30 the load's own reads are about 0.43 of its writes;
    // the backlog verification reads every written block once more, so reads at least as large
    // as writes show the verification ran. serialize_overlap keeps fio from racing a verify read
    // against a write it has in flight to the same block.
    const r = await run(
      'fio',
      [
        '--ioengine=nbd',
        `--uri=${uri}`,
        '--rw=randrw',
        '--rwmixread=30',
        '--numjobs=4',
        '--iodepth=8',
        '--verify=crc32c',
        '--verify_fatal=1',
        '--verify_backlog=256',
        '--verify_state_save=0',
        '--serialize_overlap=1',
        '--time_based',
        `--runtime=${FIO_RUNTIME_S}`,
        '--output-format=json',
        '--name=rw4k',
        '--bs=4k',
        '--size=4M',
        '--offset_increment=4M',
        '--name=rw64k',
        '--bs=64k',
        '--offset=16M',
        '--size=8M',
        '--offset_increment=8M',
      ],
      (FIO_RUNTIME_S + 60) * 1000,
    );
    const output = r.stdout + r.stderr;
    expect(output).not.toMatch(/verify failed|bad magic|bad header|error=/);
    expect(r.code, output).toBe(0);
    const { jobs } = fioReport(r.stdout);
    expect(jobs.map((j) => j.jobname).sort()).toEqual(['rw4k', 'rw4k', 'rw4k', 'rw4k', 'rw64k', 'rw64k', 'rw64k', 'rw64k']);
    for (const j of jobs) {
      expect(j.error, j.jobname).toBe(0);
      expect(j.write.io_bytes, j.jobname).toBeGreaterThan(0);
      expect(j.read.io_bytes, j.jobname).toBeGreaterThanOrEqual(j.write.io_bytes);
    }
    const total = jobs.reduce((n, j) => n + j.read.total_ios + j.write.total_ios, 0);
    console.log(`fio through detour: ${total} I/Os in ${FIO_RUNTIME_S} s, no verify error`);

    // What the load left behind reads the same through detour as in the main target's file.
    const back = path.join(work, 'lun2-back.img');
    const get = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', lunUrl(2), back], 120_000);
    expect(get.code, get.stderr).toBe(0);
    expect(sha256File(back)).toBe(sha256File(fioLunFile));
  }, (FIO_RUNTIME_S + 120) * 1000);

  it('the verification can fail: a block corrupted in the main target is caught on the way back through detour', async () => {
    // A region the load above did not use: 48-56 MiB.
    const job = ['--ioengine=nbd', `--uri=${uri}`, '--name=control', '--rw=write', '--bs=64k', '--offset=48M', '--size=8M', '--verify=crc32c', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json'];
    const write = await run('fio', [...job, '--do_verify=0'], 60_000);
    expect(write.code, write.stdout + write.stderr).toBe(0);
    expect(fioReport(write.stdout).jobs[0]!.write.io_bytes).toBe(8 * MiB);

    const clean = await run('fio', [...job, '--verify_only'], 60_000);
    expect(clean.code, clean.stdout + clean.stderr).toBe(0);
    expect(fioReport(clean.stdout).jobs[0]!.read.io_bytes).toBe(8 * MiB);

    // 512 bytes inside the data of the 17th block, behind the block's verify header.
    const fd = fs.openSync(fioLunFile, 'r+');
    try {
      fs.writeSync(fd, randomBytes(512), 0, 512, 48 * MiB + 16 * 65536 + 1024);
    } finally {
      fs.closeSync(fd);
    }
    const corrupt = await run('fio', [...job, '--verify_only'], 60_000);
    expect(corrupt.code).not.toBe(0);
    expect(corrupt.stdout + corrupt.stderr).toMatch(new RegExp(`crc32c: verify failed at file \\S+ offset ${48 * MiB + 16 * 65536}, length 65536`));
    expect(fioReport(corrupt.stdout).jobs[0]!.error).not.toBe(0);
  }, 120_000);
});
