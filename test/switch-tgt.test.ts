// The tgt control adapter against real tgtd instances: redirect on/off, session listing, and
// dropping connections.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InitiatorSession } from '../src/back/index.ts';
import { parseTgtConnections, TgtControl } from '../src/switch/main-control.ts';
import { Tgtd } from './helpers/tgtd.ts';

const IQN = 'iqn.2026-11.test:switch';
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'detour-switch-'));
let main: Tgtd;
let other: Tgtd;
const sessions: InitiatorSession[] = [];

beforeAll(async () => {
  main = await Tgtd.start({ targets: [{ tid: 1, iqn: IQN, luns: [{ lun: 1, file: path.join(work, 'a.img'), size: 8 << 20 }] }] });
  other = await Tgtd.start({ targets: [{ tid: 1, iqn: IQN, luns: [{ lun: 1, file: path.join(work, 'b.img'), size: 8 << 20 }] }] });
});

afterAll(async () => {
  for (const s of sessions) s.close();
  await main?.stop();
  await other?.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

async function login(initiatorName: string, reconnect = false): Promise<InitiatorSession> {
  const s = await InitiatorSession.connect({
    portal: main.portal,
    targetName: IQN,
    initiatorName,
    // tgt does not redirect logins that come from the redirect address itself.
    localAddress: '127.0.0.2',
    reconnect: reconnect ? { initialDelayMs: 50, maxDelayMs: 200 } : false,
  });
  sessions.push(s);
  return s;
}

describe('TgtControl', () => {
  it('parses tgtadm connection listings', () => {
    const text = 'Session: 3\n    Connection: 0\n        Initiator: iqn.a:b\n        IP Address: 127.0.0.2\nSession: 7\n    Connection: 1\n        Initiator: iqn.c:d\n        IP Address: 127.0.0.3\n';
    expect(parseTgtConnections(text)).toEqual([
      { sid: '3', cid: '0', initiator: 'iqn.a:b', address: '127.0.0.2' },
      { sid: '7', cid: '1', initiator: 'iqn.c:d', address: '127.0.0.3' },
    ]);
    expect(parseTgtConnections('')).toEqual([]);
  });

  it('lists the sessions of the target and drops them', async () => {
    const ctl = new TgtControl(1, main.controlPort);
    const s = await login('iqn.2026-11.test:host-a', true);
    const listed = await ctl.listSessions();
    expect(listed.map((x) => [x.initiator, x.address])).toEqual([['iqn.2026-11.test:host-a', '127.0.0.2']]);
    const reconnected = new Promise<void>((resolve) => s.once('reconnect', () => resolve()));
    await ctl.kick();
    await reconnected;
    const after = await ctl.listSessions();
    expect(after).toHaveLength(1);
    expect(after[0]!.sid).not.toBe(listed[0]!.sid);
    // The session still works after its reconnect.
    const block = Buffer.alloc(512, 0x6b);
    await s.write(1, 3, block, 512);
    expect((await s.read(1, 3, 1, 512)).equals(block)).toBe(true);
    s.close();
  });

  it('redirects new logins while on, and stops when off', async () => {
    const ctl = new TgtControl(1, main.controlPort);
    await ctl.redirectOn({ host: other.host, port: other.port });
    const redirected = await login('iqn.2026-11.test:host-b');
    expect(redirected.connectedPortal).toBe(other.portal);
    redirected.close();
    await ctl.redirectOff();
    const direct = await login('iqn.2026-11.test:host-c');
    expect(direct.connectedPortal).toBe(main.portal);
    direct.close();
  });
});
