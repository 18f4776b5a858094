import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const run = promisify(execFile);

export interface HostPort {
  host: string;
  port: number;
}

/** One connection of an initiator session on the main target. */
export interface MainSession {
  /** The main target's session id (tgt: the I_T nexus number). */
  sid: string;
  cid: string;
  initiator: string;
  address?: string;
}

/**
 * How detour makes the main target redirect or drop a volume's initiators. The switch logic is
 * the same for every main target; only these four operations differ.
 */
export interface MainTargetControl {
  readonly kind: 'tgt' | 'exec' | 'none';
  /** New logins to the volume's target are answered "target moved temporarily" to `to`. */
  redirectOn(to: HostPort): Promise<void>;
  /** Logins are accepted by the main target again. */
  redirectOff(): Promise<void>;
  /** The volume's current sessions on the main target (empty when the adapter cannot tell). */
  listSessions(): Promise<MainSession[]>;
  /** Drops one connection, or every connection of the volume's target. */
  kick(session?: MainSession): Promise<void>;
}

export class ControlError extends Error {}

/** tgt, through `tgtadm -C <controlPort>` (DESIGN: the redirect is per target). */
export class TgtControl implements MainTargetControl {
  readonly kind = 'tgt' as const;
  constructor(
    private readonly tid: number,
    private readonly controlPort: number,
    private readonly tgtadm = 'tgtadm',
  ) {}

  private async adm(args: string[]): Promise<string> {
    try {
      const { stdout } = await run(this.tgtadm, ['-C', String(this.controlPort), '--lld', 'iscsi', ...args], { timeout: 10_000 });
      return stdout;
    } catch (err) {
      const e = err as { stderr?: string; message: string };
      throw new ControlError(`tgtadm ${args.join(' ')}: ${(e.stderr ?? '').trim() || e.message}`);
    }
  }

  private param(name: string, value: string): Promise<string> {
    return this.adm(['--op', 'update', '--mode', 'target', '--tid', String(this.tid), '-n', name, '-v', value]);
  }

  async redirectOn(to: HostPort): Promise<void> {
    // Address and port first, the reason last: tgt redirects once RedirectAddress is set.
    await this.param('RedirectPort', String(to.port));
    await this.param('RedirectReason', 'Temporary');
    await this.param('RedirectAddress', to.host);
  }

  async redirectOff(): Promise<void> {
    await this.param('RedirectAddress', '');
  }

  async listSessions(): Promise<MainSession[]> {
    const out = await this.adm(['--op', 'show', '--mode', 'conn', '--tid', String(this.tid)]);
    return parseTgtConnections(out);
  }

  async kick(session?: MainSession): Promise<void> {
    const victims = session ? [session] : await this.listSessions();
    for (const s of victims) {
      try {
        await this.adm(['--op', 'delete', '--mode', 'conn', '--tid', String(this.tid), '--sid', s.sid, '--cid', s.cid]);
      } catch (err) {
        // Gone already (the initiator logged out meanwhile): that is what we wanted.
        if (!/can't find/.test((err as Error).message)) throw err;
      }
    }
  }
}

/** Parses `tgtadm --op show --mode conn --tid T`. */
export function parseTgtConnections(text: string): MainSession[] {
  const out: MainSession[] = [];
  let sid: string | undefined;
  let cur: MainSession | undefined;
  for (const line of text.split('\n')) {
    const t = line.trim();
    let m: RegExpExecArray | null;
    if ((m = /^Session:\s*(\d+)/.exec(t))) sid = m[1];
    else if ((m = /^Connection:\s*(\d+)/.exec(t)) && sid !== undefined) {
      cur = { sid, cid: m[1]!, initiator: '' };
      out.push(cur);
    } else if ((m = /^Initiator:\s*(\S+)/.exec(t)) && cur) cur.initiator = m[1]!;
    else if ((m = /^IP Address:\s*(\S+)/.exec(t)) && cur) cur.address = m[1]!;
  }
  return out;
}

/**
 * User commands, for main targets detour has no adapter for. Each runs through /bin/sh with its
 * arguments in DETOUR_* variables; `list` prints one JSON object per line:
 * {"sid": "...", "cid": "...", "initiator": "...", "address": "..."}.
 */
export class ExecControl implements MainTargetControl {
  readonly kind = 'exec' as const;
  constructor(
    private readonly commands: { redirectOn: string; redirectOff: string; kick: string; list: string },
    private readonly env: Record<string, string>,
  ) {}

  private async sh(which: keyof ExecControl['commands'], extra: Record<string, string> = {}): Promise<string> {
    try {
      // detour's own API token is not the control command's business.
      const { DETOUR_TOKEN: _token, ...inherited } = process.env;
      const { stdout } = await run('/bin/sh', ['-c', this.commands[which]], { env: { ...inherited, ...this.env, ...extra }, timeout: 30_000 });
      return stdout;
    } catch (err) {
      const e = err as { stderr?: string; message: string };
      throw new ControlError(`control ${which} command failed: ${(e.stderr ?? '').trim() || e.message}`);
    }
  }

  async redirectOn(to: HostPort): Promise<void> {
    await this.sh('redirectOn', { DETOUR_REDIRECT_HOST: to.host, DETOUR_REDIRECT_PORT: String(to.port) });
  }

  async redirectOff(): Promise<void> {
    await this.sh('redirectOff');
  }

  async listSessions(): Promise<MainSession[]> {
    const out = await this.sh('list');
    const sessions: MainSession[] = [];
    for (const line of out.split('\n')) {
      if (!line.trim()) continue;
      let v: Partial<MainSession>;
      try {
        v = JSON.parse(line) as Partial<MainSession>;
      } catch {
        throw new ControlError(`control list command printed a line that is not JSON: ${line.slice(0, 120)}`);
      }
      if (v.sid === undefined || v.cid === undefined) throw new ControlError('control list command: each line needs "sid" and "cid"');
      sessions.push({ sid: String(v.sid), cid: String(v.cid), initiator: String(v.initiator ?? ''), address: v.address });
    }
    return sessions;
  }

  async kick(session?: MainSession): Promise<void> {
    await this.sh('kick', session ? { DETOUR_SID: session.sid, DETOUR_CID: session.cid, DETOUR_INITIATOR: session.initiator } : { DETOUR_KICK_ALL: '1' });
  }
}

/** No control over the main target: switching relies on the initiators reconnecting by themselves. */
export class NoControl implements MainTargetControl {
  readonly kind = 'none' as const;
  async redirectOn(): Promise<void> {}
  async redirectOff(): Promise<void> {}
  async listSessions(): Promise<MainSession[]> {
    return [];
  }
  async kick(): Promise<void> {}
}
