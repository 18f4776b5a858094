// The portal's lifecycle: stopListening() refuses new connections while sessions already open keep
// working (a shutdown lets their commands finish), and close() then ends those too.
import net from 'node:net';
import pino from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import { Portal } from '../src/front/portal.ts';
import { RawIscsiClient } from './helpers/raw-iscsi.ts';

function connectRefused(port: number): Promise<string> {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port });
    s.once('connect', () => {
      s.destroy();
      resolve('connected');
    });
    s.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message));
  });
}

describe('Portal', () => {
  let portal: Portal | undefined;
  afterEach(async () => {
    await portal?.close();
    portal = undefined;
  });

  it('stopListening refuses new connections and keeps the open ones serving', async () => {
    portal = new Portal({ host: '127.0.0.1', port: 0, targets: [], logger: pino({ level: 'silent' }) });
    await portal.listen();
    const port = portal.port;
    const open = await RawIscsiClient.connect('127.0.0.1', port);
    const login = await open.login({ initiatorName: 'iqn.2026-11.test:portal' });
    expect(login.loggedIn).toBe(true);

    portal.stopListening();
    expect(await connectRefused(port)).toBe('ECONNREFUSED');
    // The session that was already there still answers.
    const echo = Buffer.from('still here');
    expect((await open.ping(echo)).data).toEqual(echo);

    await portal.close();
    portal = undefined;
    await expect(open.ping(echo, 2000)).rejects.toThrow();
  });
});
