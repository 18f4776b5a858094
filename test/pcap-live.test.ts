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

interface Recording {
  proc: ChildProcess;
  /** Everything dumpcap wrote to stderr, complete once it has exited. */
  stderr: () => string;
}

async function startCapture(port: number, file: string): Promise<Recording> {
  // A large kernel buffer: loopback delivers MiB bursts faster than a small one drains.
  const proc = spawn('dumpcap', ['-q', '-i', 'lo', '-B', '128', '-f', `tcp port ${port}`, '-w', file], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  proc.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  await new Promise<void>((resolve, reject) => {
    proc.stderr!.on('data', () => {
      if (err.includes('File:')) resolve();
    });
    proc.once('exit', (code) => reject(new Error(`dumpcap exited (${code}) before capturing: ${err.trim()} — it needs root (or capture rights) and the Debian package wireshark-common`)));
  });
  return { proc, stderr: () => err };
}

/**
 * Packets the capture lost, from dumpcap's closing line ("received/dropped on interface ...:
 * R/D (pcap:P/dumpcap:Q/flushed:F/ps_ifdrop:I)"). On a busy host the kernel can drop loopback
 * packets even with a large buffer; a capture with a hole is not a record of the session, and two
 * dissectors may then legitimately differ about the PDU in the hole.
 */
function droppedPackets(stderr: string): number {
  const m = /received\/dropped on interface '[^']*': (\d+)\/(\d+) \(pcap:(\d+)\/dumpcap:(\d+)\/flushed:(\d+)\/ps_ifdrop:(\d+)\)/.exec(stderr);
  if (!m) throw new Error(`dumpcap did not report its drop counts: ${stderr.trim()}`);
  return [m[2], m[3], m[4], m[5], m[6]].reduce((a, x) => a + Number(x), 0);
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
    const url = `iscsi://${tgtd.portal}/${IQN}/1`;
    // Recorded again (at most three times) only when the capture itself lost packets.
    let file = '';
    const drops: number[] = [];
    for (let attempt = 1; attempt <= 3; attempt++) {
      file = path.join(work, `live-${attempt}.pcapng`);
      const rec = await startCapture(tgtd.port, file);
      capture = rec.proc;
      run('iscsi-ls', ['-s', `iscsi://${tgtd.portal}`]);
      run('iscsi-inq', [url]);
      run('iscsi-readcapacity16', [url]);
      run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 65536 1M', '-c', 'read -P 0x5a 65536 1M', '-c', 'flush', url]);
      // Let the last segments reach the capture before stopping it.
      await new Promise((r) => setTimeout(r, 500));
      // 'close', not 'exit': the closing statistics are on stderr, read to its end only then.
      const exited = new Promise((r) => capture!.once('close', r));
      capture.kill('SIGINT');
      await exited;
      drops.push(droppedPackets(rec.stderr()));
      if (drops.at(-1) === 0) break;
    }
    expect(drops.at(-1), `packets dropped by the capture in each of ${drops.length} recordings: ${drops.join(', ')}`).toBe(0);

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
