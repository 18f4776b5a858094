import { execFile, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { freePort, waitForPort } from './ports.ts';

const run = promisify(execFile);

export interface TgtLun {
  lun: number;
  /** Backing file; created sparse with `size` bytes when it does not exist. */
  file: string;
  size?: number;
}

export interface TgtTarget {
  tid: number;
  iqn: string;
  luns: TgtLun[];
  /** CHAP accounts the initiator must authenticate as (one-way). */
  chap?: { user: string; password: string };
}

/**
 * A real tgtd, as the main target of a test. Each instance gets its own free iSCSI port and its
 * own control port (-C), so tests can run several side by side, and is stopped by its PID.
 */
export class Tgtd {
  private constructor(
    readonly proc: ChildProcess,
    readonly host: string,
    readonly port: number,
    readonly controlPort: number,
    readonly workDir: string,
    private readonly logs: string[],
  ) {}

  get portal(): string {
    return `${this.host}:${this.port}`;
  }

  get output(): string {
    return this.logs.join('');
  }

  /** `port` and `controlPort`: given ones, e.g. to bring a stopped main target back as it was. */
  static async start(opts: { host?: string; port?: number; controlPort?: number; targets?: TgtTarget[] } = {}): Promise<Tgtd> {
    const host = opts.host ?? '127.0.0.1';
    const workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'detour-tgtd-'));
    // The control port selects tgtd's IPC socket; a collision with another instance shows up as a
    // start failure, so retry with another number.
    for (let attempt = 0; attempt < 5; attempt++) {
      const port = opts.port ?? (await freePort(host));
      // tgtd -C takes 0..32767.
      const controlPort = opts.controlPort ?? 1000 + Math.floor(Math.random() * 31000);
      const logs: string[] = [];
      const proc = spawn('tgtd', ['-f', '-C', String(controlPort), '--iscsi', `portal=${host}:${port}`], { stdio: ['ignore', 'pipe', 'pipe'] });
      proc.stdout!.on('data', (d: Buffer) => logs.push(d.toString()));
      proc.stderr!.on('data', (d: Buffer) => logs.push(d.toString()));
      const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
      const t = new Tgtd(proc, host, port, controlPort, workDir, logs);
      try {
        await Promise.race([
          (async () => {
            await waitForPort(host, port, 10_000);
            await t.adm(['--op', 'show', '--mode', 'sys']);
          })(),
          exited.then(() => {
            throw new Error(`tgtd exited during start-up: ${logs.join('')}`);
          }),
        ]);
      } catch (err) {
        await t.stop();
        if (attempt === 4) throw err;
        continue;
      }
      for (const target of opts.targets ?? []) await t.addTarget(target);
      return t;
    }
    throw new Error('unreachable');
  }

  async adm(args: string[]): Promise<string> {
    try {
      const { stdout } = await run('tgtadm', ['-C', String(this.controlPort), '--lld', 'iscsi', ...args]);
      return stdout;
    } catch (err) {
      const e = err as { stderr?: string; message: string };
      throw new Error(`tgtadm ${args.join(' ')}: ${e.stderr?.trim() || e.message}`);
    }
  }

  private readonly tids = new Set<number>();

  async addTarget(t: TgtTarget): Promise<void> {
    await this.adm(['--op', 'new', '--mode', 'target', '--tid', String(t.tid), '-T', t.iqn]);
    this.tids.add(t.tid);
    for (const l of t.luns) {
      if (!fs.existsSync(l.file)) {
        fs.writeFileSync(l.file, '');
        fs.truncateSync(l.file, l.size ?? 16 << 20);
      }
      await this.adm(['--op', 'new', '--mode', 'logicalunit', '--tid', String(t.tid), '--lun', String(l.lun), '-b', l.file]);
    }
    await this.adm(['--op', 'bind', '--mode', 'target', '--tid', String(t.tid), '-I', 'ALL']);
    if (t.chap) {
      await this.adm(['--op', 'new', '--mode', 'account', '--user', t.chap.user, '--password', t.chap.password]);
      await this.adm(['--op', 'bind', '--mode', 'account', '--tid', String(t.tid), '--user', t.chap.user]);
    }
  }

  /** Dies as in a crash: SIGKILL, nothing cleaned up. stop() still tidies up afterwards. */
  async kill(): Promise<void> {
    const pid = this.proc.pid;
    if (pid === undefined || this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    const gone = new Promise<void>((resolve) => this.proc.once('exit', () => resolve()));
    process.kill(pid, 'SIGKILL');
    await gone;
  }

  async stop(): Promise<void> {
    const pid = this.proc.pid;
    if (pid !== undefined && this.proc.exitCode === null && this.proc.signalCode === null) {
      const gone = new Promise<void>((resolve) => this.proc.once('exit', () => resolve()));
      // tgtd takes its signals through signalfd and ignores SIGTERM; the supported way to stop
      // it is through its control port. SIGKILL by PID is the fallback.
      // "delete system" refuses while targets exist, so the targets go first.
      try {
        for (const tid of this.tids) await run('tgtadm', ['-C', String(this.controlPort), '--lld', 'iscsi', '--op', 'delete', '--mode', 'target', '--tid', String(tid), '--force'], { timeout: 2000 });
        await run('tgtadm', ['-C', String(this.controlPort), '--op', 'delete', '--mode', 'system'], { timeout: 2000 });
      } catch {
        /* fall through to SIGKILL */
      }
      const timer = setTimeout(() => {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          /* already gone */
        }
      }, 2000);
      await gone;
      clearTimeout(timer);
    }
    fs.rmSync(this.workDir, { recursive: true, force: true });
  }
}
