// What the benchmarks in scripts/ share: the detour process they start and stop by PID, the
// libiscsi/qemu tools they run and parse, the prefilled images, and the CPU profile summary.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { waitForPort } from '../../test/helpers/ports.ts';

export const repoRoot = path.resolve(import.meta.dirname, '../..');

/** Logical block size of every LUN the benchmarks set up (tgtd's and detour target's default). */
export const BLOCK_SIZE = 512;
export const QUEUE_DEPTH = 32;

/**
 * A `detour` CLI process, stopped by its PID. Like test/helpers/detour-process.ts, but it can pass
 * flags to node itself: --cpu-prof is refused in NODE_OPTIONS.
 */
export class DetourServer {
  private readonly logs: string[] = [];
  private readonly lineListeners: Array<(line: string) => void> = [];
  private partialLine = '';
  private constructor(readonly proc: ChildProcess) {
    proc.stdout!.on('data', (d: Buffer) => {
      this.keep(d);
      this.splitLines(d);
    });
    proc.stderr!.on('data', (d: Buffer) => this.keep(d));
  }

  /** The tail of its output, for a failure report; a long benchmark must not hoard logs. */
  private keep(d: Buffer): void {
    this.logs.push(d.toString());
    if (this.logs.length > 200) this.logs.splice(0, 100);
  }

  private splitLines(d: Buffer): void {
    if (this.lineListeners.length === 0) return;
    const parts = (this.partialLine + d.toString()).split('\n');
    this.partialLine = parts.pop() ?? '';
    for (const line of parts) for (const f of this.lineListeners) f(line);
  }

  /** Every complete stdout line from now on (detour logs one JSON object per line there). */
  onLine(f: (line: string) => void): void {
    this.lineListeners.push(f);
  }

  get output(): string {
    return this.logs.join('');
  }

  get pid(): number | undefined {
    return this.proc.pid;
  }

  /** `env` is added to this process's environment. */
  static async start(nodeArgs: string[], args: string[], listen: { host: string; port: number }, env: NodeJS.ProcessEnv = {}): Promise<DetourServer> {
    return DetourServer.spawnNode([...nodeArgs, path.join(repoRoot, 'bin/detour.js'), ...args], listen, env);
  }

  /** Any node program (the calibration relay), with the same PID-based lifecycle. */
  static spawnNode(argv: string[], listen: { host: string; port: number }, env: NodeJS.ProcessEnv = {}): Promise<DetourServer> {
    return DetourServer.spawnProgram(process.execPath, argv, listen, env);
  }

  /** Any program that listens on `listen` once it is ready, with the same PID-based lifecycle. */
  static async spawnProgram(cmd: string, argv: string[], listen: { host: string; port: number }, env: NodeJS.ProcessEnv = {}): Promise<DetourServer> {
    const args = [cmd, ...argv];
    const proc = spawn(cmd, argv, { cwd: repoRoot, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    const d = new DetourServer(proc);
    const exited = new Promise<never>((_, reject) => proc.once('exit', (code) => reject(new Error(`detour ${args.join(' ')} exited with ${code}:\n${d.output}`))));
    exited.catch(() => {});
    try {
      await Promise.race([waitForPort(listen.host, listen.port, 20_000), exited]);
    } catch (err) {
      await d.stop();
      throw err;
    }
    return d;
  }

  /** SIGTERM by PID (detour shuts down cleanly and node writes its CPU profile), SIGKILL after 15 s. */
  stop(): Promise<void> {
    return stopProcess(this.proc, 15_000);
  }
}

// ------------------------------------------------------------------------------------------------
// Running the tools

/** Aborted on Ctrl-C, so a running tool dies and the finally blocks stop the servers. */
export const interrupt = new AbortController();

export interface ToolResult {
  stdout: string;
  stderr: string;
}

export function runTool(cmd: string, args: string[], timeoutMs: number): Promise<ToolResult> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: timeoutMs, signal: interrupt.signal, maxBuffer: 64 << 20, encoding: 'utf8' }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(' ')}: ${err.message}\n${stderr}${stdout.slice(-2000)}`));
      else resolve({ stdout, stderr });
    });
  });
}

/**
 * Writes every dirty page of the host to disk (sync(1)) and waits for it. Called before each
 * measured run, so that no run pays for the writeback of the one before it: tgtd acknowledges
 * writes from the page cache, and the kernel writes them back up to 30 s later, into whatever runs
 * then. A detour capture run suffers most, because its journal writes are durable and queue
 * behind that writeback on the same disk.
 */
export async function flushDirtyPages(): Promise<void> {
  await runTool('sync', [], 300_000);
}

/** One measurement: how much work was done in how long. */
export interface Sample {
  /** Commands completed per second. */
  iops: number;
  /** Bytes per second. */
  bytesPerSec: number;
}

/**
 * iscsi-perf runs for -t seconds and ends with "iops average N (M MB/s)" over the whole run,
 * drain included. Its MB/s figure is rounded to whole MiB, so the bytes are computed from IOPS.
 */
export async function iscsiPerf(url: string, opts: { blocks: number; random: boolean; seconds: number }): Promise<Sample> {
  const args = ['-m', String(QUEUE_DEPTH), '-b', String(opts.blocks), '-t', String(opts.seconds), ...(opts.random ? ['-r'] : []), url];
  const { stdout } = await runTool('iscsi-perf', args, opts.seconds * 1000 * 4 + 30_000);
  const all = [...stdout.matchAll(/iops average (\d+)/g)];
  const last = all.at(-1);
  if (!last || !/finished\./.test(stdout)) throw new Error(`iscsi-perf ${args.join(' ')}: no final average in its output:\n${stdout.slice(-1000)}`);
  const iops = Number(last[1]);
  return { iops, bytesPerSec: iops * opts.blocks * BLOCK_SIZE };
}

/**
 * qemu-img bench issues a fixed number of requests and reports "Run completed in X seconds." The
 * final flush of the image happens after that figure is taken, on both paths alike.
 */
export async function qemuImgBench(url: string, opts: { write: boolean; bytes: number; count: number }): Promise<Sample> {
  const args = ['bench', '-f', 'raw', '-c', String(opts.count), '-d', String(QUEUE_DEPTH), '-s', String(opts.bytes)];
  // A non-zero pattern: nothing on either path may take a shortcut for zeroes.
  if (opts.write) args.push('-w', '--pattern=0xa5');
  args.push(url);
  const { stdout } = await runTool('qemu-img', args, 600_000);
  const m = /Run completed in ([\d.]+) seconds/.exec(stdout);
  if (!m) throw new Error(`qemu-img ${args.join(' ')}: no completion time in its output:\n${stdout}`);
  const secs = Number(m[1]);
  const iops = opts.count / secs;
  return { iops, bytesPerSec: iops * opts.bytes };
}

/** Logical block size and byte capacity a LUN reports (iscsi-readcapacity16). */
export async function readCapacity(url: string): Promise<{ blockSize: number; bytes: number }> {
  const { stdout } = await runTool('iscsi-readcapacity16', [url], 30_000);
  return {
    blockSize: Number(/LOGICAL BLOCK LENGTH IN BYTES:(\d+)/.exec(stdout)?.[1]),
    bytes: Number(/Total size:(\d+)/.exec(stdout)?.[1]),
  };
}

// ------------------------------------------------------------------------------------------------
// Figures

/** The host's CPU time counters (USER_HZ ticks, all CPUs), from the first line of /proc/stat. */
export interface CpuTimes {
  total: number;
  steal: number;
  /** idle and iowait. */
  idle: number;
}

export function cpuTimes(): CpuTimes {
  try {
    const fields = fs.readFileSync('/proc/stat', 'utf8').split('\n', 1)[0]!.trim().split(/\s+/).slice(1, 9).map(Number);
    return { total: fields.reduce((a, b) => a + b, 0), steal: fields[7] ?? 0, idle: (fields[3] ?? 0) + (fields[4] ?? 0) };
  } catch {
    return { total: 0, steal: 0, idle: 0 };
  }
}

/** USER_HZ: Linux reports 100 ticks per second to user space on every architecture it runs on. */
const TICKS_PER_SECOND = 100;

/**
 * CPU seconds the whole host spent working between two readings (all CPUs, all processes: the
 * target, detour, the initiator and the kernel on their behalf), steal left out.
 */
export function busyCpuSeconds(from: CpuTimes, to: CpuTimes = cpuTimes()): number {
  return (to.total - from.total - (to.idle - from.idle) - (to.steal - from.steal)) / TICKS_PER_SECOND;
}

/** The highest steal of any rep so far, for stealWarning(). */
let worstSteal = 0;

/**
 * The share of CPU time the hypervisor gave to other guests between two readings. On a shared
 * host this is what makes the same figure move from run to run: a rep with a few percent of steal
 * compares two paths that did not get the same machine.
 */
export function stealNote(from: CpuTimes, to: CpuTimes = cpuTimes()): string {
  const total = to.total - from.total;
  if (!(total > 0)) return '';
  const pct = (100 * (to.steal - from.steal)) / total;
  worstSteal = Math.max(worstSteal, pct);
  return ` (host steal ${pct.toFixed(1)}%)`;
}

/** For the summary: a warning when some rep had more than 5% steal, else nothing. */
export function stealWarning(): string {
  return worstSteal > 5
    ? `\nWARNING: the hypervisor took up to ${worstSteal.toFixed(0)}% of the CPU time during a rep; figures from such reps say more about the host than about detour. Run again when it is quiet.`
    : '';
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

export function pad(s: string, n: number, right = false): string {
  return right ? s.padStart(n) : s.padEnd(n);
}

// ------------------------------------------------------------------------------------------------
// Images

/**
 * A fully written image, so reads on every path return real data from the page cache rather than
 * holes (a first read of a hole is several times slower than a cached read and would favour
 * whichever path happens to run second). fsync so background writeback does not run into the
 * measurements.
 */
export function prefill(file: string, bytes: number): void {
  const chunk = Buffer.allocUnsafe(4 << 20);
  randomFillSync(chunk);
  const fd = fs.openSync(file, 'w');
  try {
    for (let off = 0; off < bytes; off += chunk.length) fs.writeSync(fd, chunk, 0, Math.min(chunk.length, bytes - off), off);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

// ------------------------------------------------------------------------------------------------
// CPU profile summary

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}

/** Self time per function, from a V8 .cpuprofile (samples and their time deltas). */
export function summarizeProfile(file: string, top: number): string[] {
  const prof = JSON.parse(fs.readFileSync(file, 'utf8')) as { nodes: ProfileNode[]; samples: number[]; timeDeltas: number[] };
  const byId = new Map(prof.nodes.map((n) => [n.id, n]));
  const self = new Map<string, number>();
  let total = 0;
  for (let i = 0; i < prof.samples.length; i++) {
    const n = byId.get(prof.samples[i]!);
    const dt = prof.timeDeltas[i] ?? 0;
    if (!n) continue;
    total += dt;
    const cf = n.callFrame;
    // Sources loaded through tsx report line 1 for everything: only the file is worth showing.
    const file = cf.url.replace(/^file:\/\//, '').replace(`${repoRoot}/`, '');
    const where = cf.url ? (cf.url.startsWith('node:') ? `${file}:${cf.lineNumber + 1}` : file) : '';
    const key = `${cf.functionName || '(anonymous)'} ${where}`.trim();
    self.set(key, (self.get(key) ?? 0) + dt);
  }
  const idle = self.get('(idle)') ?? 0;
  const busy = total - idle;
  const rows = [...self.entries()].filter(([k]) => k !== '(idle)').sort((a, b) => b[1] - a[1]).slice(0, top);
  const out = [`  ${path.basename(file)}: ${(total / 1e6).toFixed(1)} s sampled, ${(busy / 1e6).toFixed(1)} s busy (${((100 * busy) / Math.max(1, total)).toFixed(0)}%); share of the busy time:`];
  for (const [k, us] of rows) out.push(`    ${((100 * us) / Math.max(1, busy)).toFixed(1).padStart(5)}%  ${(us / 1e3).toFixed(0).padStart(7)} ms  ${k}`);
  return out;
}

/**
 * The main-thread profiles of the given processes in `dir`. V8 names the files
 * CPU.<date>.<time>.<pid>.<thread>.<seq>.cpuprofile; thread 0 is the main one (the other is the
 * TypeScript loader's worker, idle once the modules are loaded).
 */
export function mainThreadProfiles(dir: string, pids: ReadonlyMap<number, string>): Array<{ file: string; pid: number; label: string }> {
  return fs
    .readdirSync(dir)
    .filter((f) => f.endsWith('.cpuprofile') && pids.has(Number(f.split('.')[3])) && f.split('.')[4] === '0')
    .map((f) => ({ file: path.join(dir, f), pid: Number(f.split('.')[3]), label: pids.get(Number(f.split('.')[3]))! }));
}

/** SIGTERM by PID, SIGKILL after `graceMs`; resolves once the process has exited. */
export async function stopProcess(p: ChildProcess | undefined, graceMs: number): Promise<void> {
  if (!p || p.pid === undefined || p.exitCode !== null || p.signalCode !== null) return;
  const pid = p.pid;
  const gone = new Promise<void>((resolve) => p.once('exit', () => resolve()));
  process.kill(pid, 'SIGTERM');
  const timer = setTimeout(() => {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* already gone */
    }
  }, graceMs);
  await gone;
  clearTimeout(timer);
}

/** CPU seconds a process has used so far, user and system, all its threads (0 once it is gone). */
export function processCpuSeconds(pid: number | undefined): number {
  if (pid === undefined) return 0;
  try {
    // The fields after the command name, which may itself hold spaces and parentheses.
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / TICKS_PER_SECOND;
  } catch {
    return 0;
  }
}

/** The highest resident set size the process has had (VmHWM), in bytes. */
export function vmHwmBytes(pid: number): number {
  const m = /^VmHWM:\s+(\d+) kB$/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no VmHWM in /proc/${pid}/status`);
  return Number(m[1]) * 1024;
}
