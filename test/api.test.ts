import http from 'node:http';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { isLoopbackHost, startApiServer, type RunningApiServer } from '../src/control/api-server.ts';
import { createMetrics } from '../src/control/metrics.ts';
import { FAKE_VOLUME_BYTES, FakeEngine, recordingLogger } from './helpers/fake-engine.ts';

const BACKUP_FIELDS = [
  'bytesCopied',
  'bytesTotal',
  'error',
  'finishedAt',
  'freezeSeq',
  'id',
  'journal',
  'label',
  'phase',
  'sha256',
  'startedAt',
  'state',
  'volume',
];

interface Answer {
  status: number;
  headers: http.IncomingHttpHeaders;
  text: string;
  json: unknown;
}

/** Raw node:http requests, so tests control every header and byte of the body. */
function request(
  base: string,
  method: string,
  path: string,
  opts: { body?: string | Buffer; token?: string; headers?: Record<string, string> } = {},
): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string> = { ...opts.headers };
    if (opts.token !== undefined) headers.Authorization = `Bearer ${opts.token}`;
    const req = http.request(base + path, { method, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let json: unknown;
        try {
          json = JSON.parse(text);
        } catch {
          json = undefined;
        }
        resolve({ status: res.statusCode!, headers: res.headers, text, json });
      });
      res.on('error', reject);
    });
    req.on('error', reject);
    if (opts.body !== undefined) req.end(opts.body);
    else req.end();
  });
}

describe('API without a token (loopback)', () => {
  let engine: FakeEngine;
  let server: RunningApiServer;
  let base: string;

  beforeAll(async () => {
    engine = new FakeEngine();
    const metrics = createMetrics();
    metrics.setSessions('vol1', { redirected: 1 });
    server = await startApiServer({ host: '127.0.0.1', port: 0, engine, registry: metrics.registry, logger: recordingLogger().logger });
    base = server.url;
  });
  afterAll(() => server.close());

  it('reports its bound address', () => {
    expect(server.port).toBeGreaterThan(0);
    expect(server.address).toBe(`127.0.0.1:${server.port}`);
    expect(server.url).toBe(`http://127.0.0.1:${server.port}`);
  });

  it('GET /healthz answers {"ok":true}', async () => {
    const r = await request(base, 'GET', '/healthz');
    expect(r.status).toBe(200);
    expect(r.headers['content-type']).toMatch(/^application\/json/);
    expect(r.json).toEqual({ ok: true });
  });

  it('GET /metrics answers Prometheus text', async () => {
    const r = await request(base, 'GET', '/metrics');
    expect(r.status).toBe(200);
    expect(r.headers['content-type']).toMatch(/^text\/plain; version=0\.0\.4/);
    expect(r.text).toContain('# TYPE detour_sessions gauge');
    expect(r.text).toContain('detour_sessions{volume="vol1",mode="redirected"} 1');
    expect(r.text).toContain('process_cpu_user_seconds_total');
  });

  it('GET /v1/volumes lists volumes with their sessions', async () => {
    const r = await request(base, 'GET', '/v1/volumes');
    expect(r.status).toBe(200);
    const volumes = r.json as Record<string, unknown>[];
    expect(volumes.map((v) => v.name)).toEqual(['vol1', 'vol2', 'broken', 'stuck']);
    expect(Object.keys(volumes[0]!).sort()).toEqual(['name', 'phase', 'sessions', 'target', 'topology']);
    expect(volumes[0]).toEqual({
      name: 'vol1',
      target: 'iqn.2026-11.test:main',
      topology: 'proxy-directed',
      phase: 'idle',
      sessions: [{ initiator: 'iqn.2026-11.test:host1', isid: '0x023d00000001', tsih: 7, mode: 'redirected' }],
    });
  });

  it('POST /v1/volumes/{name}/backups answers 202 with the backup object, then 409 while it runs', async () => {
    const r = await request(base, 'POST', '/v1/volumes/vol2/backups', { body: JSON.stringify({ label: 'nightly' }) });
    expect(r.status).toBe(202);
    const b = r.json as Record<string, unknown>;
    expect(Object.keys(b).sort()).toEqual(BACKUP_FIELDS);
    expect(b).toMatchObject({ volume: 'vol2', label: 'nightly', state: 'running', phase: 'switching', bytesTotal: FAKE_VOLUME_BYTES, bytesCopied: 0 });
    expect(b.journal).toEqual({ records: 0, bytes: 0, unreflected: 0 });
    expect(engine.calls.at(-1)).toEqual({ method: 'startBackup', args: ['vol2', { label: 'nightly' }] });

    const again = await request(base, 'POST', '/v1/volumes/vol2/backups', { body: '{}' });
    expect(again.status).toBe(409);
    expect(again.json).toEqual({ error: 'a backup of vol2 is already running' });

    // The volume view reflects the backup in progress.
    const vols = (await request(base, 'GET', '/v1/volumes')).json as { name: string; phase: string }[];
    expect(vols.find((v) => v.name === 'vol2')!.phase).toBe('switching');
  });

  it('accepts a backup request without a body and without a label', async () => {
    const r = await request(base, 'POST', '/v1/volumes/vol1/backups');
    expect(r.status).toBe(202);
    expect((r.json as { label: unknown }).label).toBeNull();
    engine.finish((r.json as { id: string }).id);
  });

  it('answers 404 for a backup of an unknown volume', async () => {
    const r = await request(base, 'POST', '/v1/volumes/nope/backups', { body: '{}' });
    expect(r.status).toBe(404);
    expect((r.json as { error: string }).error).toContain('nope');
  });

  it('GET /v1/backups and /v1/backups/{id} answer backup objects; unknown id is 404', async () => {
    const list = await request(base, 'GET', '/v1/backups');
    expect(list.status).toBe(200);
    const backups = list.json as Record<string, unknown>[];
    expect(backups.length).toBeGreaterThanOrEqual(1);
    for (const b of backups) expect(Object.keys(b).sort()).toEqual(BACKUP_FIELDS);

    const id = backups[0]!.id as string;
    const one = await request(base, 'GET', `/v1/backups/${id}`);
    expect(one.status).toBe(200);
    expect((one.json as { id: string }).id).toBe(id);
    expect(Object.keys(one.json as object).sort()).toEqual(BACKUP_FIELDS);

    const missing = await request(base, 'GET', '/v1/backups/bk-9999');
    expect(missing.status).toBe(404);
    expect(missing.json).toEqual({ error: "no backup 'bk-9999'" });
  });

  it('POST /v1/backups/{id}/cancel answers 202; cancelling a finished backup is 409; unknown id is 404', async () => {
    const started = (await request(base, 'POST', '/v1/volumes/vol1/backups', { body: '{}' })).json as { id: string };
    const r = await request(base, 'POST', `/v1/backups/${started.id}/cancel`);
    expect(r.status).toBe(202);
    expect(engine.calls.at(-1)).toEqual({ method: 'cancelBackup', args: [started.id] });
    const after = (await request(base, 'GET', `/v1/backups/${started.id}`)).json as { state: string };
    expect(after.state).toBe('cancelled');

    const again = await request(base, 'POST', `/v1/backups/${started.id}/cancel`);
    expect(again.status).toBe(409);
    const missing = await request(base, 'POST', '/v1/backups/bk-9999/cancel');
    expect(missing.status).toBe(404);
  });

  it('POST /v1/volumes/{name}/sync answers {reflectedSeq}, with the default or the given timeout', async () => {
    const r = await request(base, 'POST', '/v1/volumes/vol1/sync', { body: JSON.stringify({ timeoutMs: 2500 }) });
    expect(r.status).toBe(200);
    expect(r.json).toEqual({ reflectedSeq: 42 });
    expect(engine.calls.at(-1)).toEqual({ method: 'sync', args: ['vol1', 2500] });

    const d = await request(base, 'POST', '/v1/volumes/vol1/sync');
    expect(d.status).toBe(200);
    expect(engine.calls.at(-1)).toEqual({ method: 'sync', args: ['vol1', 10_000] });
  });

  it('POST /v1/volumes/{name}/sync answers 504 when the engine times out, 404 for an unknown volume', async () => {
    const t0 = Date.now();
    const r = await request(base, 'POST', '/v1/volumes/stuck/sync', { body: JSON.stringify({ timeoutMs: 50 }) });
    expect(r.status).toBe(504);
    expect((r.json as { error: string }).error).toContain('not reflected');
    expect(Date.now() - t0).toBeGreaterThanOrEqual(45);

    const missing = await request(base, 'POST', '/v1/volumes/nope/sync', { body: '{}' });
    expect(missing.status).toBe(404);
  });

  it('answers 400 for malformed JSON and for fields of the wrong type', async () => {
    const cases: [string, string][] = [
      ['/v1/volumes/vol2/backups', '{"label": '],
      ['/v1/volumes/vol2/backups', '[1,2]'],
      ['/v1/volumes/vol2/backups', 'null'],
      ['/v1/volumes/vol2/backups', '"text"'],
      ['/v1/volumes/vol2/backups', JSON.stringify({ label: 5 })],
      ['/v1/volumes/vol2/backups', JSON.stringify({ label: 'x'.repeat(300) })],
      ['/v1/volumes/vol1/sync', JSON.stringify({ timeoutMs: 'soon' })],
      ['/v1/volumes/vol1/sync', JSON.stringify({ timeoutMs: -1 })],
      ['/v1/volumes/vol1/sync', JSON.stringify({ timeoutMs: 1e12 })],
      ['/v1/backups/bk-0001/cancel', '{oops'],
    ];
    for (const [path, body] of cases) {
      const r = await request(base, 'POST', path, { body, headers: { 'Content-Type': 'application/json' } });
      expect(r.status, `${path} ${body}`).toBe(400);
      expect(typeof (r.json as { error: unknown }).error, `${path} ${body}`).toBe('string');
    }
  });

  it('answers 413 for a body over 64 KiB, with or without Content-Length', async () => {
    const big = JSON.stringify({ label: 'x'.repeat(70 * 1024) });
    const r = await request(base, 'POST', '/v1/volumes/vol1/backups', { body: big });
    expect(r.status).toBe(413);
    expect((r.json as { error: string }).error).toMatch(/65536/);

    // Chunked: no Content-Length, the limit is enforced while reading.
    const chunked = await new Promise<number>((resolve, reject) => {
      const req = http.request(base + '/v1/volumes/vol1/sync', { method: 'POST', headers: { 'Transfer-Encoding': 'chunked' } }, (res) => {
        res.resume();
        resolve(res.statusCode!);
      });
      req.on('error', reject);
      req.write('{"timeoutMs":1,"pad":"' + 'y'.repeat(40 * 1024));
      req.write('y'.repeat(40 * 1024));
      req.end('"}');
    });
    expect(chunked).toBe(413);

    // The server is still fine afterwards.
    expect((await request(base, 'GET', '/healthz')).status).toBe(200);
  });

  it('answers 404 for unknown paths and 405 for wrong methods', async () => {
    for (const path of ['/', '/v2/volumes', '/v1/volumes/vol1', '/v1/backups/a/b/c', '/metricsx']) {
      const r = await request(base, 'GET', path);
      expect(r.status, path).toBe(404);
      expect(typeof (r.json as { error: unknown }).error).toBe('string');
    }
    const r = await request(base, 'DELETE', '/v1/backups');
    expect(r.status).toBe(405);
    expect(r.headers.allow).toBe('GET');
    const p = await request(base, 'GET', '/v1/volumes/vol1/sync');
    expect(p.status).toBe(405);
    expect(p.headers.allow).toBe('POST');
  });

  it('decodes percent-encoded path segments and rejects bad encodings', async () => {
    const ok = await request(base, 'GET', '/v1/backups/bk%2D9999');
    expect(ok.status).toBe(404);
    expect(ok.json).toEqual({ error: "no backup 'bk-9999'" });
    const bad = await request(base, 'GET', '/v1/backups/%E0%A4%A');
    expect(bad.status).toBe(400);
  });

  it('maps unexpected engine errors to 500 with a JSON error and keeps serving', async () => {
    const original = engine.listBackups.bind(engine);
    engine.listBackups = () => {
      throw new Error('catalog unreadable');
    };
    try {
      const r = await request(base, 'GET', '/v1/backups');
      expect(r.status).toBe(500);
      expect(r.json).toEqual({ error: 'internal error: catalog unreadable' });
    } finally {
      engine.listBackups = original;
    }
    expect((await request(base, 'GET', '/v1/backups')).status).toBe(200);
  });
});

describe('API with a token', () => {
  const TOKEN = 'correct-horse-battery-staple-42';
  let server: RunningApiServer;
  let base: string;
  let logged: string[];

  beforeAll(async () => {
    const rec = recordingLogger();
    logged = rec.lines;
    server = await startApiServer({
      host: '127.0.0.1',
      port: 0,
      engine: new FakeEngine(),
      registry: createMetrics().registry,
      token: TOKEN,
      logger: rec.logger,
    });
    base = server.url;
  });
  afterAll(() => server.close());

  it('leaves /healthz open', async () => {
    const r = await request(base, 'GET', '/healthz');
    expect(r.status).toBe(200);
    expect(r.json).toEqual({ ok: true });
  });

  it('answers 401 with WWW-Authenticate without a token, with a wrong token, or with a malformed header', async () => {
    for (const [path, method] of [
      ['/metrics', 'GET'],
      ['/v1/volumes', 'GET'],
      ['/v1/backups', 'GET'],
      ['/v1/volumes/vol1/backups', 'POST'],
      ['/v1/volumes/vol1/sync', 'POST'],
      ['/nowhere', 'GET'],
    ] as const) {
      const variants: Record<string, string>[] = [{}, { Authorization: `Bearer ${TOKEN}x` }, { Authorization: `Bearer ${TOKEN.slice(0, -1)}` }, { Authorization: TOKEN }, { Authorization: `Basic ${TOKEN}` }];
      for (const headers of variants) {
        const r = await request(base, method, path, { headers });
        expect(r.status, `${method} ${path} ${JSON.stringify(headers)}`).toBe(401);
        expect(r.headers['www-authenticate']).toMatch(/^Bearer/);
        expect(typeof (r.json as { error: unknown }).error).toBe('string');
      }
    }
  });

  it('serves with the right token', async () => {
    expect((await request(base, 'GET', '/v1/volumes', { token: TOKEN })).status).toBe(200);
    expect((await request(base, 'GET', '/metrics', { token: TOKEN })).status).toBe(200);
    const b = await request(base, 'POST', '/v1/volumes/vol1/backups', { token: TOKEN, body: '{}' });
    expect(b.status).toBe(202);
    expect((await request(base, 'GET', '/nowhere', { token: TOKEN })).status).toBe(404);
  });

  it('logs backup requests with volume, backupId and phase', async () => {
    const b = (await request(base, 'POST', '/v1/volumes/vol2/backups', { token: TOKEN, body: JSON.stringify({ label: 'audit' }) })).json as { id: string };
    expect((await request(base, 'POST', `/v1/backups/${b.id}/cancel`, { token: TOKEN })).status).toBe(202);
    const events = logged.map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(events.find((e) => e.msg === 'backup started' && e.backupId === b.id)).toMatchObject({ volume: 'vol2', phase: 'switching', label: 'audit' });
    // The fake engine moves a backup one step each time it is read: the cancel saw it copying.
    expect(events.find((e) => e.msg === 'backup cancel requested' && e.backupId === b.id)).toMatchObject({ volume: 'vol2', phase: 'copying' });
  });

  it('never logs the token', () => {
    expect(logged.length).toBeGreaterThan(0);
    expect(logged.join('\n')).not.toContain(TOKEN);
  });
});

describe('API start-up', () => {
  const servers: RunningApiServer[] = [];
  afterEach(async () => {
    await Promise.all(servers.splice(0).map((s) => s.close()));
  });
  const base = () => ({ port: 0, engine: new FakeEngine(), registry: createMetrics({ defaultMetrics: false }).registry, logger: recordingLogger().logger });

  it('refuses a non-loopback address without a token, naming the problem', async () => {
    for (const host of ['0.0.0.0', '::', '192.0.2.10', 'example.com']) {
      await expect(startApiServer({ ...base(), host }), host).rejects.toThrow(/without a token/);
    }
    await expect(startApiServer({ ...base(), host: '0.0.0.0', token: '' })).rejects.toThrow(/0\.0\.0\.0:0/);
  });

  it('starts on loopback addresses without a token', async () => {
    for (const host of ['127.0.0.1', 'localhost', '::1']) {
      const s = await startApiServer({ ...base(), host });
      servers.push(s);
      const r = await request(s.url, 'GET', '/healthz');
      expect(r.status, host).toBe(200);
    }
  });

  it('starts on a non-loopback address when a token is configured', async () => {
    // 0.0.0.0 binds every interface; the test only talks to it over loopback.
    const s = await startApiServer({ ...base(), host: '0.0.0.0', token: 'a-long-enough-secret-token' });
    servers.push(s);
    const r = await request(`http://127.0.0.1:${s.port}`, 'GET', '/v1/volumes');
    expect(r.status).toBe(401);
  });

  it('classifies loopback hosts', () => {
    expect(['127.0.0.1', '127.1.2.3', '::1', '[::1]', 'localhost', 'LOCALHOST', '0:0:0:0:0:0:0:1', '::ffff:127.0.0.1'].map(isLoopbackHost)).toEqual(
      Array(8).fill(true),
    );
    expect(['0.0.0.0', '::', '128.0.0.1', '10.0.0.1', 'example.com', '', '::ffff:10.0.0.1', 'localhost.example'].map(isLoopbackHost)).toEqual(
      Array(8).fill(false),
    );
  });

  it('reports a port already in use', async () => {
    const s = await startApiServer({ ...base(), host: '127.0.0.1' });
    servers.push(s);
    await expect(startApiServer({ ...base(), host: '127.0.0.1', port: s.port })).rejects.toThrow(/EADDRINUSE/);
  });
});
