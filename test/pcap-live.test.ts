// Records fresh iSCSI sessions (libiscsi and QEMU against a real tgtd, header digests forced on)
// with dumpcap, then checks that `detour pcap-dump` agrees with tshark on every PDU.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Tgtd } from './helpers/tgtd.ts';
import { ourPdus, parseLines, runCli, tsharkPdus } from './helpers/pcap-compare.ts';

const IQN = 'iqn.2026-11.test:live';
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'detour-live-'));
let tgtd: Tgtd | undefined;
let capture: ChildProcess | undefined;

afterAll(async () => {
  if (capture?.pid && capture.exitCode === null) capture.kill('SIGKILL');
  await tgtd?.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

async function startCapture(port: number, file: string): Promise<ChildProcess> {
  // A large kernel buffer: loopback delivers MiB bursts faster than a small one drains.
  const proc = spawn('dumpcap', ['-q', '-i', 'lo', '-B', '128', '-f', `tcp port ${port}`, '-w', file], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  await new Promise<void>((resolve, reject) => {
    proc.stderr!.on('data', (d: Buffer) => {
      err += d.toString();
      if (err.includes('File:')) resolve();
    });
    proc.once('exit', (code) => reject(new Error(`dumpcap exited (${code}) before capturing: ${err.trim()} — it needs root (or capture rights) and the Debian package wireshark-common`)));
  });
  return proc;
}

function run(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 60_000 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr || r.error?.message}`);
  return r.stdout;
}

describe('pcap-dump on sessions recorded here', () => {
  it('agrees with tshark on a capture with header digests, R2T writes and multi-PDU reads', async () => {
    tgtd = await Tgtd.start({ targets: [{ tid: 1, iqn: IQN, luns: [{ lun: 1, file: path.join(work, 'lun.img'), size: 16 << 20 }] }] });
    await tgtd.adm(['--op', 'update', '--mode', 'target', '--tid', '1', '-n', 'HeaderDigest', '-v', 'CRC32C']);
    const file = path.join(work, 'live.pcapng');
    capture = await startCapture(tgtd.port, file);
    const url = `iscsi://${tgtd.portal}/${IQN}/1`;
    run('iscsi-ls', ['-s', `iscsi://${tgtd.portal}`]);
    run('iscsi-inq', [url]);
    run('iscsi-readcapacity16', [url]);
    run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 65536 1M', '-c', 'read -P 0x5a 65536 1M', '-c', 'flush', url]);
    // Let the last segments reach the capture before stopping it.
    await new Promise((r) => setTimeout(r, 500));
    const exited = new Promise((r) => capture!.once('exit', r));
    capture.kill('SIGINT');
    await exited;

    const r = runCli([file, '--port', String(tgtd.port)]);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const ours = parseLines(r.stdout);
    const theirs = tsharkPdus(file, tgtd.port);
    expect(ours.length).toBeGreaterThan(100);
    expect(ourPdus(ours)).toEqual(theirs);
    // The capture did exercise what it is meant to: digests negotiated, R2T and Data-Out.
    // (tgt applies the target's digest setting to normal sessions only, not to discovery.)
    const normalConns = new Set(ours.filter((l) => l.opcode === 0x03 && l.keys?.SessionType === 'Normal').map((l) => l.conn));
    const loginAnswers = ours.filter((l) => l.opcode === 0x23 && normalConns.has(l.conn) && l.keys?.HeaderDigest !== undefined);
    expect(normalConns.size).toBeGreaterThanOrEqual(3);
    expect(loginAnswers.map((l) => l.keys!.HeaderDigest)).toEqual(Array.from(normalConns, () => 'CRC32C'));
    expect(ours.some((l) => l.opcode === 0x31)).toBe(true);
    expect(ours.some((l) => l.opcode === 0x05)).toBe(true);
  });
});
