// The exec control adapter: each command gets its arguments in DETOUR_* variables, its `list`
// output is parsed strictly, a failing command is an error naming it, and detour's own API token
// never reaches the user's commands.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ControlError, ExecControl } from '../src/switch/main-control.ts';

describe('ExecControl', () => {
  const saved = process.env.DETOUR_TOKEN;
  beforeEach(() => {
    process.env.DETOUR_TOKEN = 'secret-token-0123456789';
  });
  afterEach(() => {
    if (saved === undefined) delete process.env.DETOUR_TOKEN;
    else process.env.DETOUR_TOKEN = saved;
  });

  const lister = (script: string) =>
    new ExecControl({ redirectOn: 'true', redirectOff: 'true', kick: 'true', list: script }, { DETOUR_VOLUME: 'vol1' });

  it('passes the volume and the arguments, never the API token', async () => {
    const c = lister(`printf '{"sid":"%s","cid":"0","initiator":"%s"}\\n' "\${DETOUR_TOKEN:-none}" "$DETOUR_VOLUME"`);
    expect(await c.listSessions()).toEqual([{ sid: 'none', cid: '0', initiator: 'vol1', address: undefined }]);
  });

  it('refuses list output that is not one JSON object per line', async () => {
    await expect(lister('echo not-json').listSessions()).rejects.toThrow(ControlError);
    await expect(lister(`echo '{"initiator":"x"}'`).listSessions()).rejects.toThrow(/sid/);
  });

  it('reports a failing command by name with its stderr', async () => {
    const c = new ExecControl({ redirectOn: 'echo nope >&2; exit 3', redirectOff: 'true', kick: 'true', list: 'true' }, {});
    await expect(c.redirectOn({ host: '127.0.0.2', port: 3260 })).rejects.toThrow(/redirectOn command failed: nope/);
  });
});
