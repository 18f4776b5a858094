import { Histogram, Registry } from 'prom-client';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LatencyHistogram } from '../src/control/latency-histogram.ts';
import { startApiServer, type RunningApiServer } from '../src/control/api-server.ts';
import { BACKUP_PHASES, countInitiatorSessions, createMetrics, instrumentRedirects, type DetourMetrics } from '../src/control/metrics.ts';
import { FakeEngine, recordingLogger } from './helpers/fake-engine.ts';
import { findSamples, parseExposition, type Sample } from './helpers/prometheus.ts';


const find = findSamples;

function value(samples: Sample[], name: string, labels: Record<string, string>): number {
  const hits = find(samples, name, labels);
  expect(hits.length, `${name} ${JSON.stringify(labels)}`).toBe(1);
  return hits[0]!.value;
}

const CONTRACT_METRICS: [string, string, string[]][] = [
  ['detour_sessions', 'gauge', ['volume', 'mode']],
  ['detour_scsi_commands_total', 'counter', ['volume', 'op', 'status']],
  ['detour_scsi_command_duration_seconds', 'histogram', ['volume', 'op']],
  ['detour_backup_phase', 'gauge', ['volume', 'phase']],
  ['detour_backup_bytes_copied_total', 'counter', ['volume']],
  ['detour_backup_bytes_total', 'gauge', ['volume']],
  ['detour_journal_records', 'gauge', ['volume']],
  ['detour_journal_bytes', 'gauge', ['volume']],
  ['detour_journal_unreflected_records', 'gauge', ['volume']],
  ['detour_drain_bytes_total', 'counter', ['volume']],
  ['detour_cutover_pause_seconds', 'histogram', ['volume']],
  ['detour_last_backup_success_timestamp_seconds', 'gauge', ['volume']],
  // Additions to the contract.
  ['detour_login_redirects_total', 'counter', ['volume']],
  ['detour_backup_progress_ratio', 'gauge', ['volume']],
  ['detour_write_limit_bytes_per_second', 'gauge', ['volume']],
  ['detour_journal_commit_duration_seconds', 'histogram', ['volume']],
  ['detour_journal_commit_records_total', 'counter', ['volume']],
  ['detour_journal_spare_bytes', 'gauge', ['volume']],
];

const READ_10 = Buffer.from([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]);
const WRITE_16 = Buffer.alloc(16);
WRITE_16[0] = 0x8a;

describe('metrics', () => {
  let metrics: DetourMetrics;
  let text: string;
  let parsed: ReturnType<typeof parseExposition>;

  beforeAll(async () => {
    metrics = createMetrics();
    metrics.setSessions('vol1', { redirected: 2, capture: 1 });
    metrics.observeCommand('vol1', READ_10, 0x00, 0.0003);
    metrics.observeCommand('vol1', READ_10, 0x00, 0.002);
    metrics.observeCommand('vol1', WRITE_16, 0x02, 0.04);
    metrics.observeCommand('vol1', 'TEST_UNIT_READY', 'GOOD', 0.00001);
    metrics.setPhase('vol1', 'copying');
    metrics.setBytesTotal('vol1', 1 << 30);
    metrics.addCopied('vol1', 4 << 20);
    metrics.addCopied('vol1', 4 << 20);
    metrics.setJournal('vol1', { records: 12, bytes: 49152, unreflected: 3 });
    metrics.setJournalSpare('vol1', 3 << 28);
    metrics.addDrained('vol1', 8192);
    metrics.observeCutover('vol1', 0.3);
    metrics.backupSucceeded('vol1', new Date('2026-11-03T12:00:00Z'));
    metrics.loginRedirected('vol1');
    metrics.setProgress('vol1', 8 << 20, 1 << 30);
    metrics.setWriteLimit('vol1', 1 << 20);
    metrics.observeJournalCommit('vol1', 0.0004, 13);
    metrics.observeJournalCommit('vol1', 0.002, 1);
    text = await metrics.registry.metrics();
    parsed = parseExposition(text);
  });

  it('declares every contract metric with its type', () => {
    for (const [name, type] of CONTRACT_METRICS) {
      expect(text, name).toContain(`# TYPE ${name} ${type}\n`);
      expect(parsed.types.get(name)).toBe(type);
    }
  });

  it('labels every contract metric exactly as the contract says', () => {
    for (const [name, type, labels] of CONTRACT_METRICS) {
      const sampleName = type === 'histogram' ? `${name}_count` : name;
      const samples = parsed.samples.filter((s) => s.name === sampleName);
      expect(samples.length, name).toBeGreaterThan(0);
      for (const s of samples) expect(Object.keys(s.labels).sort(), name).toEqual([...labels].sort());
    }
  });

  it('counts SCSI commands by op and status names from the wire package', () => {
    const s = parsed.samples;
    expect(value(s, 'detour_scsi_commands_total', { volume: 'vol1', op: 'READ_10', status: 'GOOD' })).toBe(2);
    expect(value(s, 'detour_scsi_commands_total', { volume: 'vol1', op: 'WRITE_16', status: 'CHECK_CONDITION' })).toBe(1);
    expect(value(s, 'detour_scsi_commands_total', { volume: 'vol1', op: 'TEST_UNIT_READY', status: 'GOOD' })).toBe(1);
    expect(value(s, 'detour_scsi_command_duration_seconds_count', { volume: 'vol1', op: 'READ_10' })).toBe(2);
    expect(value(s, 'detour_scsi_command_duration_seconds_sum', { volume: 'vol1', op: 'READ_10' })).toBeCloseTo(0.0023, 9);
    // Storage latency buckets: the smallest is 50 µs, the largest finite one 10 s.
    const buckets = find(s, 'detour_scsi_command_duration_seconds_bucket', { volume: 'vol1', op: 'READ_10' });
    const bounds = buckets.map((b) => Number(b.labels.le)).filter(Number.isFinite);
    expect(Math.min(...bounds)).toBe(0.00005);
    expect(Math.max(...bounds)).toBe(10);
    expect(value(s, 'detour_scsi_command_duration_seconds_bucket', { volume: 'vol1', op: 'READ_10', le: '0.00025' })).toBe(0);
    expect(value(s, 'detour_scsi_command_duration_seconds_bucket', { volume: 'vol1', op: 'READ_10', le: '0.0005' })).toBe(1);
    expect(value(s, 'detour_scsi_command_duration_seconds_bucket', { volume: 'vol1', op: 'READ_10', le: '+Inf' })).toBe(2);
  });

  it('sets sessions for every mode, 0 for those left out', () => {
    const s = parsed.samples;
    expect(value(s, 'detour_sessions', { volume: 'vol1', mode: 'redirected' })).toBe(2);
    expect(value(s, 'detour_sessions', { volume: 'vol1', mode: 'capture' })).toBe(1);
    expect(value(s, 'detour_sessions', { volume: 'vol1', mode: 'inline' })).toBe(0);
  });

  it('sets 1 for the current backup phase and 0 for the four others', () => {
    const phases = Object.fromEntries(BACKUP_PHASES.map((p) => [p, value(parsed.samples, 'detour_backup_phase', { volume: 'vol1', phase: p })]));
    expect(phases).toEqual({ switching: 0, copying: 1, draining: 0, cutover: 0, done: 0 });
  });

  it('records bytes, journal depth, drain, cutover and last success', () => {
    const s = parsed.samples;
    expect(value(s, 'detour_backup_bytes_total', { volume: 'vol1' })).toBe(1 << 30);
    expect(value(s, 'detour_backup_bytes_copied_total', { volume: 'vol1' })).toBe(8 << 20);
    expect(value(s, 'detour_journal_records', { volume: 'vol1' })).toBe(12);
    expect(value(s, 'detour_journal_bytes', { volume: 'vol1' })).toBe(49152);
    expect(value(s, 'detour_journal_unreflected_records', { volume: 'vol1' })).toBe(3);
    expect(value(s, 'detour_journal_spare_bytes', { volume: 'vol1' })).toBe(3 << 28);
    expect(value(s, 'detour_drain_bytes_total', { volume: 'vol1' })).toBe(8192);
    expect(value(s, 'detour_cutover_pause_seconds_count', { volume: 'vol1' })).toBe(1);
    expect(value(s, 'detour_cutover_pause_seconds_sum', { volume: 'vol1' })).toBeCloseTo(0.3, 9);
    expect(value(s, 'detour_last_backup_success_timestamp_seconds', { volume: 'vol1' })).toBe(Date.parse('2026-11-03T12:00:00Z') / 1000);
  });

  it('records each journal commit group: its write time in the histogram, its records in the counter', async () => {
    const s = parsed.samples;
    expect(value(s, 'detour_journal_commit_duration_seconds_count', { volume: 'vol1' })).toBe(2);
    expect(value(s, 'detour_journal_commit_duration_seconds_sum', { volume: 'vol1' })).toBeCloseTo(0.0024, 9);
    expect(value(s, 'detour_journal_commit_duration_seconds_bucket', { volume: 'vol1', le: '0.0005' })).toBe(1);
    expect(value(s, 'detour_journal_commit_duration_seconds_bucket', { volume: 'vol1', le: '0.0025' })).toBe(2);
    expect(value(s, 'detour_journal_commit_records_total', { volume: 'vol1' })).toBe(14);
    // Counted once, however often /metrics is read; nonsense is ignored.
    const m = createMetrics({ defaultMetrics: false });
    m.addVolume('v');
    m.observeJournalCommit('v', 0.001, 5);
    m.observeJournalCommit('v', Number.NaN, -3);
    const records = async () => value(parseExposition(await m.registry.metrics()).samples, 'detour_journal_commit_records_total', { volume: 'v' });
    expect(await records()).toBe(5);
    expect(await records()).toBe(5);
    m.observeJournalCommit('v', 0.001, 2);
    expect(await records()).toBe(7);
    expect(value(parseExposition(await m.registry.metrics()).samples, 'detour_journal_commit_duration_seconds_count', { volume: 'v' })).toBe(2);
  });

  it('includes the default process metrics', () => {
    expect(parsed.types.get('process_cpu_user_seconds_total')).toBe('counter');
    expect(parsed.types.get('process_resident_memory_bytes')).toBe('gauge');
    expect(parsed.types.get('nodejs_eventloop_lag_seconds')).toBe('gauge');
  });

  it('clears the phase when the backup ends, and ignores nonsense amounts', async () => {
    const m = createMetrics({ defaultMetrics: false });
    m.setPhase('v', 'cutover');
    m.setPhase('v', undefined);
    m.addCopied('v', 100);
    m.addCopied('v', -5);
    m.addCopied('v', Number.NaN);
    m.observeCutover('v', -1);
    const s = parseExposition(await m.registry.metrics()).samples;
    for (const p of BACKUP_PHASES) expect(value(s, 'detour_backup_phase', { volume: 'v', phase: p }), p).toBe(0);
    expect(value(s, 'detour_backup_bytes_copied_total', { volume: 'v' })).toBe(100);
    expect(find(s, 'detour_cutover_pause_seconds_count', { volume: 'v' })).toEqual([]);
  });

  it('publishes zeroes for a new volume and drops every series of a removed one', async () => {
    const m = createMetrics({ defaultMetrics: false });
    m.addVolume('fresh');
    let s = parseExposition(await m.registry.metrics()).samples;
    expect(value(s, 'detour_sessions', { volume: 'fresh', mode: 'inline' })).toBe(0);
    expect(value(s, 'detour_backup_bytes_copied_total', { volume: 'fresh' })).toBe(0);
    expect(value(s, 'detour_journal_unreflected_records', { volume: 'fresh' })).toBe(0);
    expect(find(s, 'detour_backup_phase', { volume: 'fresh' }).length).toBe(5);

    m.addVolume('kept');
    m.observeCommand('fresh', READ_10, 0, 0.001);
    m.observeCutover('fresh', 0.1);
    m.backupSucceeded('fresh', 1_700_000_000_000);
    await m.removeVolume('fresh');
    s = parseExposition(await m.registry.metrics()).samples;
    expect(s.filter((x) => x.labels.volume === 'fresh')).toEqual([]);
    expect(find(s, 'detour_sessions', { volume: 'kept' }).length).toBe(3);
    // A volume of the same name added again starts counting from zero.
    m.addVolume('fresh');
    m.observeCommand('fresh', READ_10, 0, 0.001);
    s = parseExposition(await m.registry.metrics()).samples;
    expect(value(s, 'detour_scsi_commands_total', { volume: 'fresh', op: 'READ_10', status: 'GOOD' })).toBe(1);
    expect(value(s, 'detour_scsi_command_duration_seconds_count', { volume: 'fresh', op: 'READ_10' })).toBe(1);
  });

  it('scrape hooks run before the gauges are read; a failing hook does not fail the scrape', async () => {
    const m = createMetrics({ defaultMetrics: false });
    m.addVolume('v');
    let depth = 0;
    m.onScrape(() => {
      throw new Error('the engine is gone');
    });
    m.onScrape(() => m.setJournal('v', { records: ++depth, bytes: 512 * depth, unreflected: depth }));
    for (const want of [1, 2]) {
      const s = parseExposition(await m.registry.metrics()).samples;
      expect(value(s, 'detour_journal_records', { volume: 'v' })).toBe(want);
      expect(value(s, 'detour_journal_bytes', { volume: 'v' })).toBe(512 * want);
    }
  });

  it('counts commands completed between scrapes once each, whatever the number of scrapes', async () => {
    const m = createMetrics({ defaultMetrics: false });
    const count = async () => value(parseExposition(await m.registry.metrics()).samples, 'detour_scsi_commands_total', { volume: 'v', op: 'READ_10', status: 'GOOD' });
    for (let i = 0; i < 5; i++) m.observeCommand('v', READ_10, 0, 0.0001);
    expect(await count()).toBe(5);
    expect(await count()).toBe(5);
    for (let i = 0; i < 3; i++) m.observeCommand('v', READ_10, 0, 0.0001);
    expect((await m.registry.getMetricsAsJSON()).find((x) => x.name === 'detour_scsi_commands_total')?.values[0]?.value).toBe(8);
    expect(await count()).toBe(8);
  });
});

describe('the data-path latency histogram', () => {
  it('exposes exactly what a prom-client Histogram exposes for the same observations, as text and as JSON', async () => {
    const ours = new Registry();
    const theirs = new Registry();
    const opts = { name: 'lat_seconds', help: 'latency', labelNames: ['volume', 'op'] as const, buckets: [0.001, 0.01, 0.1, 1] };
    const h = new LatencyHistogram({ ...opts, registers: [ours] });
    const p = new Histogram({ ...opts, registers: [theirs] });
    const values = [0, 0.0005, 0.001, 0.0011, 0.05, 0.1, 0.7, 1, 3, 1e6];
    for (const [i, v] of values.entries()) {
      const labels = { volume: i % 3 === 0 ? 'a' : 'b"\\q', op: i % 2 ? 'READ_10' : 'WRITE_10' };
      h.series(labels).observe(v);
      p.observe(labels, v);
    }
    expect(await ours.metrics()).toBe(await theirs.metrics());
    // prom-client adds an empty `exemplar` to each value; detour does not use exemplars.
    const withoutExemplars = (ms: Awaited<ReturnType<Registry['getMetricsAsJSON']>>) =>
      ms.map((m) => ({ ...m, values: (m.values as Array<Record<string, unknown>>).map(({ exemplar: _e, ...v }) => v) }));
    expect(await ours.getMetricsAsJSON()).toEqual(withoutExemplars(await theirs.getMetricsAsJSON()));
    h.remove({ volume: 'a', op: 'WRITE_10' });
    p.remove({ volume: 'a', op: 'WRITE_10' });
    expect(await ours.metrics()).toBe(await theirs.metrics());
    expect(() => h.series({ volume: 'a', nope: 'x' } as never)).toThrow(/unknown label "nope"/);
    expect(() => h.series({ volume: 'a', op: 'READ_10' }).observe(Number.NaN)).toThrow(/finite/);
  });
});

describe('metrics over HTTP', () => {
  let server: RunningApiServer;
  let metrics: DetourMetrics;

  beforeAll(async () => {
    metrics = createMetrics();
    server = await startApiServer({ host: '127.0.0.1', port: 0, engine: new FakeEngine(), registry: metrics.registry, logger: recordingLogger().logger });
  });
  afterAll(() => server.close());

  it('serves what the helpers recorded on GET /metrics', async () => {
    metrics.setSessions('vol9', { inline: 4 });
    metrics.observeCommand('vol9', READ_10, 0x18, 0.5);
    const res = await fetch(`${server.url}/metrics`);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toBe(metrics.registry.contentType);
    const body = await res.text();
    expect(body).toContain('# TYPE detour_sessions gauge\n');
    expect(body).toContain('detour_sessions{volume="vol9",mode="inline"} 4\n');
    expect(body).toContain('detour_scsi_commands_total{volume="vol9",op="READ_10",status="RESERVATION_CONFLICT"} 1\n');
    expect(body).toContain('detour_scsi_command_duration_seconds_bucket{le="0.5",volume="vol9",op="READ_10"} 1\n');
  });
});

describe('redirected sessions and redirects (proxy-directed volumes)', () => {
  const OWN = ['iqn.2026-11.io.detour:engine', 'iqn.2026-11.io.detour:probe'];

  /** A run-time volume as instrumentRedirects sees it, with a main target we script. */
  function fakeVolume(topology: string, kind: 'tgt' | 'exec' | 'none' = 'tgt') {
    const state = { listed: [] as { sid: string; cid: string; initiator: string; address?: string }[], lists: 0, fail: false, redirecting: true };
    const v = {
      name: 'pd',
      config: { topology },
      localAddress: '127.0.0.2',
      control: {
        kind,
        listSessions: async () => {
          state.lists++;
          if (state.fail) throw new Error('tgtadm: connection refused');
          return state.listed;
        },
      },
      target: {
        redirect: (_initiator: string) => (state.redirecting ? { address: '127.0.0.1:3261,1' } : undefined),
      },
    };
    return { v, state };
  }

  it('counts initiator sessions on main, leaving out detour\'s own and counting a session once', () => {
    const listed = [
      { sid: '1', initiator: 'iqn.2026-11.test:host1', address: '127.0.0.1' },
      { sid: '1', initiator: 'iqn.2026-11.test:host1', address: '127.0.0.1' },
      { sid: '2', initiator: 'iqn.2026-11.test:host2' },
      { sid: '3', initiator: 'iqn.2026-11.io.detour:engine', address: '127.0.0.2' },
      { sid: '4', initiator: 'iqn.2026-11.test:host1', address: '127.0.0.2' },
      { sid: '5', initiator: 'iqn.2026-11.io.detour:probe', address: '10.0.0.9' },
    ];
    expect(countInitiatorSessions(listed, { initiators: OWN, address: '127.0.0.2' })).toBe(2);
    expect(countInitiatorSessions([], { initiators: OWN, address: '127.0.0.2' })).toBe(0);
  });

  it('reports the main target\'s initiator sessions as redirected, counted on scrape and cached', async () => {
    const m = createMetrics({ defaultMetrics: false });
    m.addVolume('pd');
    const { v, state } = fakeVolume('proxy-directed');
    instrumentRedirects(m, v, OWN);
    state.listed = [
      { sid: '7', cid: '0', initiator: 'iqn.2026-11.test:host1', address: '127.0.0.1' },
      { sid: '8', cid: '0', initiator: 'iqn.2026-11.test:host2', address: '127.0.0.1' },
      { sid: '9', cid: '0', initiator: OWN[0]!, address: '127.0.0.2' },
    ];
    let s = parseExposition(await m.registry.metrics()).samples;
    expect(value(s, 'detour_sessions', { volume: 'pd', mode: 'redirected' })).toBe(2);
    expect(state.lists).toBe(1);
    // The 1 s sampler of the sessions on detour leaves the counted value alone.
    m.setSessions('pd', { capture: 1 });
    state.listed = [];
    s = parseExposition(await m.registry.metrics()).samples;
    expect(value(s, 'detour_sessions', { volume: 'pd', mode: 'redirected' })).toBe(2);
    expect(value(s, 'detour_sessions', { volume: 'pd', mode: 'capture' })).toBe(1);
    // Within the cache age the main target is not asked again.
    expect(state.lists).toBe(1);
  });

  it('asks again once the count is older than maxAgeMs; a failure keeps the last value and is reported once', async () => {
    const m = createMetrics({ defaultMetrics: false });
    const { v, state } = fakeVolume('proxy-directed');
    const errors: unknown[] = [];
    let listed = [{ sid: '1', cid: '0', initiator: 'iqn.2026-11.test:h' }];
    state.listed = listed;
    m.watchRedirected('pd', async () => countInitiatorSessions(await v.control.listSessions(), { initiators: OWN, address: v.localAddress }), {
      maxAgeMs: 0,
      onError: (e) => errors.push(e),
    });
    const redirected = async () => value(parseExposition(await m.registry.metrics()).samples, 'detour_sessions', { volume: 'pd', mode: 'redirected' });
    expect(await redirected()).toBe(1);
    listed = [...listed, { sid: '2', cid: '0', initiator: 'iqn.2026-11.test:i' }];
    state.listed = listed;
    expect(await redirected()).toBe(2);
    state.fail = true;
    expect(await redirected()).toBe(2);
    expect(errors.map((e) => (e as Error).message)).toEqual(['tgtadm: connection refused']);
    state.fail = false;
    state.listed = [];
    expect(await redirected()).toBe(0);
  });

  it('a scrape waits at most waitMs for a slow count, then serves the previous value', async () => {
    const m = createMetrics({ defaultMetrics: false });
    let release: (n: number) => void = () => {};
    let calls = 0;
    m.watchRedirected(
      'slow',
      () => {
        calls++;
        return new Promise<number>((resolve) => (release = resolve));
      },
      { maxAgeMs: 0, waitMs: 50 },
    );
    const t0 = Date.now();
    const s = parseExposition(await m.registry.metrics()).samples;
    expect(Date.now() - t0).toBeLessThan(1000);
    expect(find(s, 'detour_sessions', { volume: 'slow', mode: 'redirected' })).toEqual([]);
    // A second scrape while the count is still running does not start another one.
    await m.registry.metrics();
    expect(calls).toBe(1);
    release(3);
    await new Promise((r) => setTimeout(r, 10));
    expect(value(parseExposition(await m.registry.metrics()).samples, 'detour_sessions', { volume: 'slow', mode: 'redirected' })).toBe(3);
  });

  it('counts the logins answered with a redirect, and only watches proxy-directed volumes that can list main', async () => {
    const m = createMetrics({ defaultMetrics: false });
    m.addVolume('pd');
    const { v, state } = fakeVolume('proxy-directed');
    instrumentRedirects(m, v, OWN);
    expect(v.target.redirect('iqn.2026-11.test:h')).toEqual({ address: '127.0.0.1:3261,1' });
    expect(v.target.redirect('iqn.2026-11.test:h')).toEqual({ address: '127.0.0.1:3261,1' });
    state.redirecting = false; // a backup in progress: logins are accepted
    expect(v.target.redirect('iqn.2026-11.test:h')).toBeUndefined();
    let s = parseExposition(await m.registry.metrics()).samples;
    expect(value(s, 'detour_login_redirects_total', { volume: 'pd' })).toBe(2);

    for (const [topology, kind] of [
      ['main-directed', 'tgt'],
      ['inline', 'tgt'],
      ['proxy-directed', 'none'],
    ] as const) {
      const other = createMetrics({ defaultMetrics: false });
      other.addVolume('pd');
      const f = fakeVolume(topology, kind);
      f.state.listed = [{ sid: '1', cid: '0', initiator: 'iqn.2026-11.test:h' }];
      instrumentRedirects(other, f.v, OWN);
      s = parseExposition(await other.registry.metrics()).samples;
      expect(value(s, 'detour_sessions', { volume: 'pd', mode: 'redirected' }), `${topology} ${kind}`).toBe(0);
      expect(f.state.lists, `${topology} ${kind}`).toBe(0);
    }
  });

  it('backup progress: 0 at the switch, sampled while copying, 1 once the copy is whole', async () => {
    const m = createMetrics({ defaultMetrics: false });
    m.addVolume('v');
    const progress = async () => value(parseExposition(await m.registry.metrics()).samples, 'detour_backup_progress_ratio', { volume: 'v' });
    expect(await progress()).toBe(0);
    m.setPhase('v', 'switching');
    m.setPhase('v', 'copying');
    m.setProgress('v', 256, 1024);
    expect(await progress()).toBe(0.25);
    m.setProgress('v', 5, 0);
    expect(await progress()).toBe(0.25);
    m.setPhase('v', 'draining');
    expect(await progress()).toBe(1);
    m.setPhase('v', 'switching');
    expect(await progress()).toBe(0);
  });

  it('write limit: 0 while writes are not held back, the admitted rate while they are', async () => {
    const m = createMetrics({ defaultMetrics: false });
    m.addVolume('v');
    const limit = async () => value(parseExposition(await m.registry.metrics()).samples, 'detour_write_limit_bytes_per_second', { volume: 'v' });
    expect(await limit()).toBe(0);
    m.setWriteLimit('v', 2_097_152);
    expect(await limit()).toBe(2_097_152);
    m.setWriteLimit('v', null);
    expect(await limit()).toBe(0);
  });
});
