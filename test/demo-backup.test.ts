// Acceptance (issue 4): scripts/demo-backup.sh, exactly as a user runs it, for each redirecting
// topology. The script owns the whole cycle against real peers (tgtd, detour serve, qemu-nbd,
// fio, qemu-io) and its own checks; this test holds it to a zero exit code and to the summary
// lines that state each acceptance condition.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { describe, expect, it } from 'vitest';

const repoRoot = path.resolve(import.meta.dirname, '..');
const script = path.join(repoRoot, 'scripts/demo-backup.sh');

interface ScriptRun {
  code: number | null;
  signal: NodeJS.Signals | null;
  output: string;
}

function runDemo(topology: string, timeoutMs: number): Promise<ScriptRun> {
  return new Promise((resolve, reject) => {
    const p = spawn('bash', [script, topology], { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    p.stdout.on('data', (d: Buffer) => (output += d.toString()));
    p.stderr.on('data', (d: Buffer) => (output += d.toString()));
    // SIGTERM first: the script's trap stops every process it started.
    const timer = setTimeout(() => p.kill('SIGTERM'), timeoutMs);
    p.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    p.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, output });
    });
  });
}

/** The value after a summary line's label, e.g. "cutover pause   297 ms" -> "297 ms". */
function summaryField(output: string, label: string): string {
  const m = new RegExp(`^  ${label} +(.+)$`, 'm').exec(output);
  if (!m) throw new Error(`no '${label}' line in the summary:\n${output}`);
  return m[1]!;
}

for (const topology of ['proxy-directed', 'main-directed'] as const) {
  describe(`scripts/demo-backup.sh ${topology}`, () => {
    it('backs up a live 256 MiB tgtd LUN under a verified fio and qemu-io load and hands the session back', async () => {
      const r = await runDemo(topology, 150_000);
      console.log(r.output.slice(r.output.indexOf('\ndetour backup demo:') + 1));
      expect(r.signal, r.output).toBeNull();
      expect(r.output).not.toMatch(/FAILED/);
      expect(r.code, r.output).toBe(0);
      expect(r.output).toContain(`detour backup demo: ${topology}: PASSED`);

      const backup = summaryField(r.output, 'backup');
      expect(backup).toMatch(/completed, phase done, freezeSeq \d+/);
      const seconds = Number(/, ([\d.]+) s \(copy/.exec(backup)?.[1]);
      // The copy is rate-limited to about 16 s so that the workload overlaps it.
      expect(seconds).toBeGreaterThan(10);

      const image = summaryField(r.output, 'backup image');
      const sha = /^SHA-256 = A \(([0-9a-f]{64})\)$/.exec(image);
      expect(sha, image).not.toBeNull();
      expect(r.output).toContain(`SHA-256 (A) ${sha![1]}`);

      const pause = Number(/^(\d+) ms$/.exec(summaryField(r.output, 'cutover pause'))?.[1]);
      // Within the volume's ioTimeoutBudget (5 s in the script's config).
      expect(pause).toBeGreaterThanOrEqual(0);
      expect(pause).toBeLessThan(5000);

      const workload = summaryField(r.output, 'workload');
      const fio = /^fio (\d+) writes, (\d+) reads; (\d+) qemu-io pattern writes \((.*)\)$/.exec(workload);
      expect(fio, workload).not.toBeNull();
      expect(Number(fio![1])).toBeGreaterThan(1000);
      expect(Number(fio![3])).toBeGreaterThan(10);
      // Pattern writes landed while copying and after the hand-back.
      expect(fio![4]).toMatch(/copying \d+/);
      expect(fio![4]).toMatch(/after \d+/);

      expect(summaryField(r.output, 'drain')).toMatch(/^[1-9]\d* round\(s\), [\d.]+ MiB written back to the main LUN$/);
      expect(summaryField(r.output, 'main LUN')).toBe("every acknowledged write present (tgtd's file, qemu-io read -P and fio read-verify against tgtd)");
      expect(summaryField(r.output, 'fio')).toBe('no I/O error, no verify error');
      expect(summaryField(r.output, 'hand-back')).toBe('initiator back on tgtd; detour has no capture session');
    }, 180_000);
  });
}
