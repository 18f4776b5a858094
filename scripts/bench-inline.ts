// Data-path benchmark: the same three loads against tgtd directly, through `detour serve` in the
// inline topology (in front of that same tgtd), and against `detour target`, interleaved in one run,
// with the ratios the performance goals are stated in:
//
//   load                                              inline / direct   target / direct
//   iscsi-perf, 64 KiB sequential reads, QD 32        >= 0.90 (MB/s)    >= 1.00
//   qemu-img bench -w, 64 KiB sequential writes, QD 32 >= 0.90 (MB/s)   >= 1.00
//   iscsi-perf -r, 4 KiB random reads, QD 32          >= 0.80 (IOPS)    >= 1.00
//
// It is a report, not a gate: it exits 0 whether the goals are met or not, 1 only when the set-up
// failed or a measurement could not be taken, 130 when interrupted (every process is stopped).
//
//   npx tsx scripts/bench-inline.ts [--seconds 8] [--reps 3] [--loads seq-read,seq-write,rand-read]
//                                   [--relay] [--cpu-prof DIR] [--top 25]
//
// --relay adds two paths for calibration: a Node.js process, and socat (a C program, when it is
// installed), each copying bytes between the initiator and tgtd without parsing anything. They do
// the least work any inline proxy has to do (every byte in and out once), so their ratios say how
// much of a gap is detour's own and how much comes with the host: on 2 shared cores the extra
// process and the second loopback hop cost, whatever the proxy is written in.
//
// --cpu-prof runs both detour processes under `node --cpu-prof` and prints their hottest functions
// (self time) after the run; the .cpuprofile files stay in DIR for Chrome DevTools / speedscope.
//
// Only loopback addresses: tgtd on 127.0.0.1 (own -C control port), detour serve on 127.0.0.2 (its
// backend sessions leave from there too, as in production), detour target on 127.0.0.1.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { freePort } from '../test/helpers/ports.ts';
import { writeDetourConfig } from '../test/helpers/detour-config.ts';
import { Tgtd } from '../test/helpers/tgtd.ts';
import {
  BLOCK_SIZE,
  cpuTimes,
  DetourServer,
  flushDirtyPages,
  interrupt,
  iscsiPerf,
  mainThreadProfiles,
  median,
  pad,
  prefill,
  qemuImgBench,
  QUEUE_DEPTH,
  runTool,
  stealNote,
  stealWarning,
  summarizeProfile,
  vmHwmBytes,
  type Sample,
} from './lib/bench-common.ts';

const MAIN_IQN = 'iqn.2026-11.bench:main';
const EMBEDDED_IQN = 'iqn.2026-11.bench:embedded';
const LUN_BYTES = 1 << 30;

/**
 * The calibration relay, run as `node -e`: accepts on LISTEN_HOST:LISTEN_PORT and pipes every
 * connection to TO_HOST:TO_PORT, leaving from LISTEN_HOST as detour's backend sessions do.
 */
const RELAY_SOURCE = `
const net = require('node:net');
const [listenHost, listenPort, toHost, toPort] = process.argv.slice(1);
const server = net.createServer((front) => {
  front.setNoDelay(true);
  const back = net.connect({ host: toHost, port: Number(toPort), localAddress: listenHost }, () => back.setNoDelay(true));
  front.pipe(back);
  back.pipe(front);
  front.on('error', () => back.destroy());
  back.on('error', () => front.destroy());
  front.on('close', () => back.destroy());
  back.on('close', () => front.destroy());
});
server.listen(Number(listenPort), listenHost);
process.on('SIGTERM', () => process.exit(0));
`;

// ------------------------------------------------------------------------------------------------
// Options

interface Options {
  seconds: number;
  reps: number;
  loads: string[];
  cpuProfDir: string | undefined;
  top: number;
  relay: boolean;
}

function parseOptions(argv: string[]): Options {
  const o: Options = { seconds: 8, reps: 3, loads: ['seq-read', 'seq-write', 'rand-read'], cpuProfDir: undefined, top: 25, relay: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const value = (): string => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      return v;
    };
    if (a === '--seconds') o.seconds = Number(value());
    else if (a === '--reps') o.reps = Number(value());
    else if (a === '--loads') o.loads = value().split(',').map((s) => s.trim()).filter(Boolean);
    else if (a === '--cpu-prof') o.cpuProfDir = path.resolve(value());
    else if (a === '--top') o.top = Number(value());
    else if (a === '--relay') o.relay = true;
    else if (a === '--help' || a === '-h') {
      console.log('usage: npx tsx scripts/bench-inline.ts [--seconds 8] [--reps 3] [--loads seq-read,seq-write,rand-read] [--relay] [--cpu-prof DIR] [--top 25]');
      process.exit(0);
    } else throw new Error(`unknown option ${a}`);
  }
  if (!(o.seconds >= 1)) throw new Error('--seconds must be at least 1');
  if (!Number.isInteger(o.reps) || o.reps < 1) throw new Error('--reps must be a positive integer');
  for (const l of o.loads) if (!LOADS.some((x) => x.id === l)) throw new Error(`unknown load ${l} (known: ${LOADS.map((x) => x.id).join(', ')})`);
  return o;
}

// ------------------------------------------------------------------------------------------------
// Loads

interface Load {
  id: string;
  title: string;
  /** The figure the goal is stated in. */
  metric: 'MB/s' | 'IOPS';
  /** Minimum inline / direct ratio. */
  inlineGoal: number;
  /** A short unmeasured run: warms caches and JIT, and sizes count-based runs. */
  warmUp(url: string, path: PathId, opts: Options): Promise<void>;
  measure(url: string, path: PathId, opts: Options): Promise<Sample>;
}

/** qemu-img bench counts requests, not seconds: counts per path, sized by the warm-up run. */
const writeCounts = new Map<PathId, number>();

const LOADS: Load[] = [
  {
    id: 'seq-read',
    title: 'iscsi-perf 64 KiB sequential read, QD 32',
    metric: 'MB/s',
    inlineGoal: 0.9,
    async warmUp(url) {
      await iscsiPerf(url, { blocks: 65536 / BLOCK_SIZE, random: false, seconds: 2 });
    },
    measure: (url, _p, o) => iscsiPerf(url, { blocks: 65536 / BLOCK_SIZE, random: false, seconds: o.seconds }),
  },
  {
    id: 'seq-write',
    title: 'qemu-img bench -w 64 KiB sequential write, QD 32',
    metric: 'MB/s',
    inlineGoal: 0.9,
    async warmUp(url, p, o) {
      const s = await qemuImgBench(url, { write: true, bytes: 65536, count: 4000 });
      writeCounts.set(p, Math.max(4000, Math.round(s.iops * o.seconds)));
    },
    measure: (url, p, _o) => qemuImgBench(url, { write: true, bytes: 65536, count: writeCounts.get(p) ?? 4000 }),
  },
  {
    id: 'rand-read',
    title: 'iscsi-perf -r 4 KiB random read, QD 32',
    metric: 'IOPS',
    inlineGoal: 0.8,
    async warmUp(url) {
      await iscsiPerf(url, { blocks: 4096 / BLOCK_SIZE, random: true, seconds: 2 });
    },
    measure: (url, _p, o) => iscsiPerf(url, { blocks: 4096 / BLOCK_SIZE, random: true, seconds: o.seconds }),
  },
];

type PathId = 'direct' | 'inline' | 'target' | 'relay' | 'socat';
const ALL_PATHS: Array<{ id: PathId; label: string }> = [
  { id: 'direct', label: 'tgtd direct' },
  { id: 'inline', label: 'detour inline' },
  { id: 'target', label: 'detour target' },
  { id: 'relay', label: 'byte relay' },
  { id: 'socat', label: 'socat relay' },
];
let PATHS = ALL_PATHS.filter((p) => p.id !== 'relay' && p.id !== 'socat');

function figure(load: Load, s: Sample): number {
  return load.metric === 'IOPS' ? s.iops : s.bytesPerSec / 1e6;
}

// ------------------------------------------------------------------------------------------------
// Set-up

interface Started {
  tgtd?: Tgtd;
  proxy?: DetourServer;
  embedded?: DetourServer;
  relay?: DetourServer;
  socat?: DetourServer;
}

interface Bench {
  tgtd: Tgtd;
  proxy: DetourServer;
  embedded: DetourServer;
  urls: Record<PathId, string>;
}

async function setUp(work: string, opts: Options, started: Started): Promise<Bench> {
  const mainImg = path.join(work, 'main.img');
  const embeddedImg = path.join(work, 'embedded.img');
  prefill(mainImg, LUN_BYTES);
  prefill(embeddedImg, LUN_BYTES);

  const tgtd = await Tgtd.start({ host: '127.0.0.1', targets: [{ tid: 1, iqn: MAIN_IQN, luns: [{ lun: 1, file: mainImg, size: LUN_BYTES }] }] });
  started.tgtd = tgtd;

  const nodeArgs: string[] = [];
  if (opts.cpuProfDir) {
    fs.mkdirSync(opts.cpuProfDir, { recursive: true });
    nodeArgs.push('--cpu-prof', `--cpu-prof-dir=${opts.cpuProfDir}`);
  }

  const { file: config, portalPort: proxyPort } = await writeDetourConfig(work, { name: 'bench', target: MAIN_IQN, main: tgtd.portal, topology: 'inline' });
  const proxy = await DetourServer.start(nodeArgs, ['serve', '--config', config], { host: '127.0.0.2', port: proxyPort });
  started.proxy = proxy;

  const embeddedPort = await freePort('127.0.0.1');
  const embedded = await DetourServer.start(
    nodeArgs,
    ['target', '--file', embeddedImg, '--size', String(LUN_BYTES), '--block-size', String(BLOCK_SIZE), '--listen', `127.0.0.1:${embeddedPort}`, '--iqn', EMBEDDED_IQN],
    { host: '127.0.0.1', port: embeddedPort },
  );
  started.embedded = embedded;

  const urls: Record<PathId, string> = {
    direct: `iscsi://${tgtd.portal}/${MAIN_IQN}/1`,
    inline: `iscsi://127.0.0.2:${proxyPort}/${MAIN_IQN}/1`,
    target: `iscsi://127.0.0.1:${embeddedPort}/${EMBEDDED_IQN}/0`,
    relay: '',
    socat: '',
  };
  if (opts.relay) {
    const relayPort = await freePort('127.0.0.2');
    started.relay = await DetourServer.spawnNode(['-e', RELAY_SOURCE, '127.0.0.2', String(relayPort), tgtd.host, String(tgtd.port)], { host: '127.0.0.2', port: relayPort });
    urls.relay = `iscsi://127.0.0.2:${relayPort}/${MAIN_IQN}/1`;
    const socatPort = await freePort('127.0.0.2');
    try {
      started.socat = await DetourServer.spawnProgram(
        'socat',
        [`TCP-LISTEN:${socatPort},bind=127.0.0.2,reuseaddr,fork,nodelay`, `TCP:${tgtd.host}:${tgtd.port},bind=127.0.0.2,nodelay`],
        { host: '127.0.0.2', port: socatPort },
      );
      urls.socat = `iscsi://127.0.0.2:${socatPort}/${MAIN_IQN}/1`;
    } catch (err) {
      console.log(`socat relay not measured: ${(err as Error).message.split('\n')[0]}`);
      PATHS = PATHS.filter((p) => p.id !== 'socat');
    }
  }
  // All three must present the same geometry, or the loads would not be the same loads.
  for (const p of PATHS) {
    const { stdout } = await runTool('iscsi-readcapacity16', [urls[p.id]], 30_000);
    const bs = Number(/LOGICAL BLOCK LENGTH IN BYTES:(\d+)/.exec(stdout)?.[1]);
    const total = Number(/Total size:(\d+)/.exec(stdout)?.[1]);
    if (bs !== BLOCK_SIZE || total !== LUN_BYTES) throw new Error(`${p.label}: ${total} bytes in ${bs}-byte blocks, expected ${LUN_BYTES} in ${BLOCK_SIZE}`);
  }
  return { tgtd, proxy, embedded, urls };
}

// ------------------------------------------------------------------------------------------------
// Main

async function main(): Promise<number> {
  const opts = parseOptions(process.argv.slice(2));
  const loads = LOADS.filter((l) => opts.loads.includes(l.id));
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'detour-bench-'));
  const started: Started = {};
  const peakRss: string[] = [];
  if (opts.relay) PATHS = ALL_PATHS;
  const onSigint = () => {
    console.error('\ninterrupted; stopping tgtd and detour');
    interrupt.abort();
  };
  process.on('SIGINT', onSigint);
  process.on('SIGTERM', onSigint);

  const samples = new Map<string, number[]>(); // `${load}/${path}` -> figures
  const profiled = new Map<number, string>(); // pid -> which detour process
  const errors: string[] = [];
  let setupOk = false;
  try {
    console.log(`detour data-path benchmark: ${opts.reps} x ${opts.seconds} s per load and path, QD ${QUEUE_DEPTH}, ${LUN_BYTES >> 20} MiB LUN, ${os.cpus().length} CPUs, node ${process.version}`);
    const bench = await setUp(work, opts, started);
    setupOk = true;
    if (bench.proxy.proc.pid) profiled.set(bench.proxy.proc.pid, 'detour serve (inline)');
    if (bench.embedded.proc.pid) profiled.set(bench.embedded.proc.pid, 'detour target');
    for (const p of PATHS) console.log(`  ${p.label.padEnd(13)} ${bench.urls[p.id]}`);

    for (const load of loads) {
      for (const p of PATHS) {
        if (interrupt.signal.aborted) throw new Error('interrupted');
        await load.warmUp(bench.urls[p.id], p.id, opts);
      }
    }
    for (let rep = 0; rep < opts.reps; rep++) {
      for (const load of loads) {
        // Rotate which path goes first, so slow drift (page cache, writeback, thermal) does not
        // always fall on the same side.
        const order = PATHS.map((_, i) => PATHS[(i + rep) % PATHS.length]!);
        const line: string[] = [];
        const cpuAtStart = cpuTimes();
        for (const p of order) {
          if (interrupt.signal.aborted) throw new Error('interrupted');
          const key = `${load.id}/${p.id}`;
          try {
            await flushDirtyPages();
            const s = await load.measure(bench.urls[p.id], p.id, opts);
            const v = figure(load, s);
            samples.set(key, [...(samples.get(key) ?? []), v]);
            line.push(`${p.label} ${v.toFixed(load.metric === 'IOPS' ? 0 : 1)}`);
          } catch (err) {
            if (interrupt.signal.aborted) throw err;
            errors.push(`${load.id} via ${p.label}: ${(err as Error).message}`);
            line.push(`${p.label} FAILED`);
          }
        }
        console.log(`  rep ${rep + 1}/${opts.reps} ${pad(load.id, 10)} ${load.metric}: ${line.join(', ')}${stealNote(cpuAtStart)}`);
      }
    }
  } catch (err) {
    if (interrupt.signal.aborted) return 130;
    console.error(`\n${setupOk ? 'benchmark' : 'set-up'} failed: ${(err as Error).message}`);
    for (const [name, p] of [['detour serve', started.proxy], ['detour target', started.embedded]] as const) {
      if (p) console.error(`--- ${name} output (tail) ---\n${p.output.slice(-3000)}`);
    }
    return 1;
  } finally {
    process.off('SIGINT', onSigint);
    process.off('SIGTERM', onSigint);
    // Peak memory over the whole run, read before the processes go.
    for (const [name, p] of [['detour serve (inline)', started.proxy], ['detour target', started.embedded]] as const) {
      if (p?.pid === undefined) continue;
      try {
        peakRss.push(`${name} ${(vmHwmBytes(p.pid) / (1 << 20)).toFixed(0)} MiB`);
      } catch {
        // already gone: nothing to report
      }
    }
    // Each stopped by its PID; detour first, so its backend sessions log out of a live tgtd.
    await started.proxy?.stop().catch(() => {});
    await started.embedded?.stop().catch(() => {});
    await started.relay?.stop().catch(() => {});
    await started.socat?.stop().catch(() => {});
    await started.tgtd?.stop().catch(() => {});
    fs.rmSync(work, { recursive: true, force: true });
  }

  // ---- report
  console.log('');
  const header = ['load', 'metric', 'tgtd direct', 'detour inline', 'inline/direct', 'goal', 'result', 'detour target', 'target/direct', 'goal', 'result'];
  const widths = [48, 6, 12, 13, 13, 6, 7, 13, 13, 6, 7];
  if (opts.relay) {
    header.push('byte relay', 'relay/direct', 'socat relay', 'socat/direct');
    widths.push(10, 12, 11, 12);
  }
  const row = (cells: string[]) => '| ' + cells.map((c, i) => pad(c, widths[i]!, i >= 2 && i !== 6 && i !== 10)).join(' | ') + ' |';
  console.log(row(header));
  console.log('|' + widths.map((w) => '-'.repeat(w + 2)).join('|') + '|');
  const verdicts: Array<{ name: string; ok: boolean; ratio: number; goal: number }> = [];
  for (const load of loads) {
    const m = (p: PathId) => {
      const xs = samples.get(`${load.id}/${p}`) ?? [];
      return xs.length === opts.reps ? median(xs) : NaN;
    };
    const direct = m('direct');
    const inline = m('inline');
    const target = m('target');
    const relay = m('relay');
    const socat = m('socat');
    const fmt = (v: number) => (Number.isNaN(v) ? 'n/a' : v.toFixed(load.metric === 'IOPS' ? 0 : 1));
    const ri = inline / direct;
    const rt = target / direct;
    const okI = ri >= load.inlineGoal;
    const okT = rt >= 1.0;
    verdicts.push({ name: `${load.id} inline`, ok: okI, ratio: ri, goal: load.inlineGoal });
    verdicts.push({ name: `${load.id} target`, ok: okT, ratio: rt, goal: 1.0 });
    console.log(
      row([
        load.title, load.metric, fmt(direct), fmt(inline), Number.isNaN(ri) ? 'n/a' : `${(100 * ri).toFixed(1)}%`, `${Math.round(load.inlineGoal * 100)}%`, okI ? 'PASS' : 'BELOW',
        fmt(target), Number.isNaN(rt) ? 'n/a' : `${(100 * rt).toFixed(1)}%`, '100%', okT ? 'PASS' : 'BELOW',
        ...(opts.relay
          ? [fmt(relay), Number.isNaN(relay / direct) ? 'n/a' : `${((100 * relay) / direct).toFixed(1)}%`, fmt(socat), Number.isNaN(socat / direct) ? 'n/a' : `${((100 * socat) / direct).toFixed(1)}%`]
          : []),
      ]),
    );
  }
  console.log(`(medians of ${opts.reps} runs of ${opts.seconds} s; MB/s = 10^6 bytes/s)`);
  if (errors.length) console.log(`\nmeasurements that failed:\n  ${errors.join('\n  ')}`);

  if (opts.cpuProfDir) {
    const files = mainThreadProfiles(opts.cpuProfDir, profiled);
    console.log(`\nCPU profiles (${opts.cpuProfDir}), hottest functions by self time:`);
    for (const { file: f, label } of files) {
      try {
        console.log(`  ${label}`);
        for (const l of summarizeProfile(f, opts.top)) console.log(l);
      } catch (err) {
        console.log(`  ${f}: unreadable (${(err as Error).message})`);
      }
    }
  }

  if (peakRss.length) console.log(`\npeak RSS (VmHWM) during the run: ${peakRss.join(', ')}`);
  const met = verdicts.filter((v) => v.ok).length;
  const below = verdicts.filter((v) => !v.ok).map((v) => `${v.name} ${Number.isNaN(v.ratio) ? 'n/a' : (100 * v.ratio).toFixed(1) + '%'} < ${Math.round(v.goal * 100)}%`);
  console.log(`\nSUMMARY: ${met} of ${verdicts.length} goals met${below.length ? `; BELOW: ${below.join(', ')}` : ' (all PASS)'}${errors.length ? `; ${errors.length} measurement(s) FAILED` : ''}${stealWarning()}`);
  return errors.length ? 1 : 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  },
);

