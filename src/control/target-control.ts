import fs from 'node:fs';
import http from 'node:http';
import type { Portal } from '../front/portal.ts';
import type { FrontTarget } from '../front/types.ts';
import type { Command } from './cli.ts';
import { UsageError } from './cli.ts';
import { parseCommandArgs } from './args.ts';

/**
 * The embedded target's own control interface, so that detour can drive it like it drives tgt
 * (control type exec): login redirection on and off, the list of sessions, and dropping them.
 * It listens on a unix socket: only local users with access to the file can use it.
 */
export class TargetControlServer {
  private redirectTo: { host: string; port: number } | undefined;
  private readonly server: http.Server;

  constructor(
    private readonly portal: Portal,
    private readonly target: FrontTarget,
  ) {
    target.redirect = () => (this.redirectTo ? { address: `${this.redirectTo.host}:${this.redirectTo.port},${target.portalGroupTag}` } : undefined);
    this.server = http.createServer((req, res) => void this.handle(req, res));
  }

  async listen(socketPath: string): Promise<void> {
    fs.rmSync(socketPath, { force: true });
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(socketPath, () => resolve());
    });
    fs.chmodSync(socketPath, 0o600);
  }

  close(): Promise<void> {
    return new Promise((resolve) => this.server.close(() => resolve()));
  }

  private sessions() {
    const out: Array<{ sid: string; cid: string; initiator: string; address?: string }> = [];
    for (const s of this.portal.sessions.all()) {
      if (s.target !== this.target || s.closed) continue;
      for (const c of s.connections) out.push({ sid: String(s.tsih), cid: String(c.cid), initiator: s.initiatorName, address: c.remote.replace(/:\d+$/, '') });
    }
    return out;
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    let body = '';
    for await (const chunk of req) {
      body += chunk;
      if (body.length > 4096) return this.reply(res, 413, { error: 'body too large' });
    }
    let args: Record<string, unknown> = {};
    try {
      if (body) args = JSON.parse(body) as Record<string, unknown>;
    } catch {
      return this.reply(res, 400, { error: 'bad JSON' });
    }
    const route = `${req.method} ${req.url}`;
    if (route === 'POST /redirect') {
      const host = args.host;
      const port = Number(args.port);
      if (typeof host !== 'string' || !host || !Number.isInteger(port) || port < 1 || port > 65535) return this.reply(res, 400, { error: 'host and port required' });
      this.redirectTo = { host, port };
      return this.reply(res, 200, { redirect: this.redirectTo });
    }
    if (route === 'DELETE /redirect') {
      this.redirectTo = undefined;
      return this.reply(res, 200, { redirect: null });
    }
    if (route === 'GET /sessions') return this.reply(res, 200, this.sessions());
    if (route === 'POST /kick') {
      let n = 0;
      for (const s of this.portal.sessions.all()) {
        if (s.target !== this.target) continue;
        if (args.sid !== undefined && String(s.tsih) !== String(args.sid)) continue;
        for (const c of [...s.connections]) {
          if (args.cid !== undefined && String(c.cid) !== String(args.cid)) continue;
          c.close();
          n++;
        }
      }
      return this.reply(res, 200, { dropped: n });
    }
    return this.reply(res, 404, { error: `no route ${route}` });
  }

  private reply(res: http.ServerResponse, status: number, body: unknown): void {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  }
}

function call(socketPath: string, method: string, url: string, body?: unknown): Promise<{ status: number; body: unknown }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath, method, path: url, headers: { 'content-type': 'application/json' } }, (res) => {
      let text = '';
      res.on('data', (d: Buffer) => (text += d.toString()));
      res.on('end', () => {
        try {
          resolve({ status: res.statusCode ?? 0, body: text ? JSON.parse(text) : null });
        } catch (err) {
          reject(err as Error);
        }
      });
    });
    req.on('error', reject);
    req.end(body === undefined ? undefined : JSON.stringify(body));
  });
}

/**
 * `detour target-ctl --socket PATH redirect-on HOST PORT | redirect-off | list | kick [SID [CID]]`
 * — the client of TargetControlServer, shaped for `control: {type: exec}`: `list` prints one JSON
 * object per line.
 */
export const targetCtlCommand: Command = async (argv) => {
  const { values, positionals } = parseCommandArgs(argv, { socket: { type: 'string' } });
  if (!values.socket) throw new UsageError('--socket PATH is required');
  const [op, a, b] = positionals;
  let r: { status: number; body: unknown };
  try {
    switch (op) {
      case 'redirect-on':
        if (!a || !b) throw new UsageError('redirect-on HOST PORT');
        r = await call(values.socket, 'POST', '/redirect', { host: a, port: Number(b) });
        break;
      case 'redirect-off':
        r = await call(values.socket, 'DELETE', '/redirect');
        break;
      case 'list':
        r = await call(values.socket, 'GET', '/sessions');
        if (r.status === 200) for (const s of r.body as unknown[]) process.stdout.write(JSON.stringify(s) + '\n');
        return r.status === 200 ? 0 : 1;
      case 'kick':
        r = await call(values.socket, 'POST', '/kick', { ...(a ? { sid: a } : {}), ...(b ? { cid: b } : {}) });
        break;
      default:
        throw new UsageError(`unknown operation '${op ?? ''}' (redirect-on HOST PORT | redirect-off | list | kick [SID [CID]])`);
    }
  } catch (err) {
    if (err instanceof UsageError) throw err;
    process.stderr.write(`detour target-ctl: cannot reach ${values.socket}: ${(err as Error).message}\n`);
    return 1;
  }
  if (r.status !== 200) {
    process.stderr.write(`detour target-ctl: ${JSON.stringify(r.body)}\n`);
    return 1;
  }
  return 0;
};
