import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { waitForPort } from './ports.ts';

const repoRoot = path.resolve(import.meta.dirname, '../..');

/** A `detour` CLI process (as a user would start it), stopped by its PID. */
export class DetourProcess {
  readonly logs: string[] = [];
  private constructor(readonly proc: ChildProcess) {
    proc.stdout!.on('data', (d: Buffer) => this.logs.push(d.toString()));
    proc.stderr!.on('data', (d: Buffer) => this.logs.push(d.toString()));
  }

  get output(): string {
    return this.logs.join('');
  }

  /** Starts `detour ARGS` and waits until `host:port` accepts connections. */
  static async start(args: string[], listen: { host: string; port: number }, env: NodeJS.ProcessEnv = {}): Promise<DetourProcess> {
    const proc = spawn(process.execPath, [path.join(repoRoot, 'bin/detour.js'), ...args], {
      cwd: repoRoot,
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const d = new DetourProcess(proc);
    const exited = new Promise<never>((_, reject) =>
      proc.once('exit', (code) => reject(new Error(`detour ${args.join(' ')} exited with ${code}:\n${d.output}`))),
    );
    await Promise.race([waitForPort(listen.host, listen.port, 20_000), exited]);
    exited.catch(() => {});
    return d;
  }

  async stop(): Promise<number | null> {
    if (this.proc.exitCode !== null || this.proc.signalCode !== null) return this.proc.exitCode;
    const done = new Promise<number | null>((resolve) => this.proc.once('exit', (code) => resolve(code)));
    this.proc.kill('SIGTERM');
    const timer = setTimeout(() => this.proc.kill('SIGKILL'), 10_000);
    const code = await done;
    clearTimeout(timer);
    return code;
  }
}
