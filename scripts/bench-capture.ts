// Backup capture benchmark: what a backup costs the initiators and how fast it copies, each figure
// taken against tgtd directly in the same run and printed as a ratio, against these goals:
//
//   figure                                                     goal
//   write throughput during capture (qemu-img bench -w 64 KiB, QD 32)   >= 100% of direct
//   4 KiB write IOPS during capture (qemu-img bench -w 4 KiB, QD 32)    >= 80% of direct
//   read throughput during capture (iscsi-perf 64 KiB, QD 32)           >= 90% of direct
//   copy throughput, no workload (backup copy phase)                    >= 90% of iscsi-perf 64 KiB
//                                                                          QD 32 reading tgtd
//   cutover pause: longest I/O stall an initiator sees at redirect-back  < 1 s
//   detour's peak RSS, full backup of a 4 GiB LUN vs a 1 GiB LUN        about the same (<= 125%)
//
//   npx tsx scripts/bench-capture.ts [--seconds 8] [--reps 3] [--size 1G] [--rss-sizes 1G,4G]
//                                    [--sections capture,copy,cutover,rss] [--capture-rate BYTES]
//                                    [--loads read-64k,write-64k,write-4k] [--journal-spare SIZE]
//                                    [--cpu-prof DIR] [--top 25]
//
// --loads picks which of the three capture-section loads run (all by default), for profiling one.
// --journal-spare sets the capture volume's journalSpare (0: none). By default it is sized from the
// write loads, so that every journal segment they fill is a file detour wrote in advance, as it
// is on a volume configured with journalSpare (see README, "Journal spares").
//
// It is a report, not a gate: it exits 0 whether the goals are met or not, 1 only when the set-up
// failed or a measurement could not be taken, 130 when interrupted (every process is stopped).
//
// How each figure is taken (tgtd on 127.0.0.1 with its own -C control port; `detour serve` on
// 127.0.0.2, proxy-directed, tgt control, as in scripts/demo-backup.sh):
//
// - During capture: a backup whose copy is rate-limited (copyRateLimit, sized from --seconds and
//   --reps so the copy outlasts the measurements) holds the volume in phase `copying`. The loads
//   log in at detour's portal, which accepts them while it captures (outside a backup it redirects
//   them to tgtd); the direct loads go to tgtd within the same backup, interleaved, so both sides
//   share the background copy. Reads run first, while the snapshot map is empty: they come from
//   the frozen main volume, as most reads of a volume do during a backup. Every detour run is
//   checked against detour's command counter (it really went through the capture path) and the
//   backup's phase (still copying when it ended). The backup is cancelled afterwards, which drains
//   the journal back to tgtd.
// - Copy throughput: full backups without a rate limit and without a workload; bytes divided by
//   the time between detour's `backup phase` log lines for `copying` and `draining`. Against it,
//   iscsi-perf 64 KiB QD 32 reads tgtd for the length of the previous copy (whole seconds).
// - Cutover pause: two QD 1 probes (4 KiB writes and reads at random offsets) run through full
//   backups: libiscsi through qemu-nbd (the initiator of a QEMU guest), and detour's own initiator
//   (src/back). Both are configured with detour's portal, so they are redirected to tgtd, moved
//   onto detour at switch-in, and asked to log out (AsyncEvent 1) at cutover, coming back to tgtd
//   through detour's redirect. The figure is the longest time between two completions from the
//   moment detour closed its gate for the cutover (the gap in progress then counts whole) until
//   1 s after both probes were seen back on tgtd, worst probe and worst backup; detour's own
//   `cutover` pauseMs is printed beside it, and the longest stalls at switch-in and while copying
//   and draining for comparison. These backups copy at a limited rate so that each lasts at least
//   6 s: libiscsi does not reconnect within 3 s of its last reconnect (the one at switch-in), and a
//   shorter backup would measure that guard instead of detour's hand-back.
// - Peak RSS: a fresh detour process per LUN size does one full backup with no workload; the
//   figure is VmHWM from /proc/PID/status. Those LUNs are sparse files with 4 KiB of random data
//   in every MiB, so every backup store chunk holds data and both sizes take the same code path.
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { defaultSegmentBytes, Journal } from '../src/capture/journal.ts';
import { JournalSpares } from '../src/capture/journal-spares.ts';
import type { BackupObject, VolumeView } from '../src/control/model.ts';
import { parseSizeValue } from '../src/control/config.ts';
import { parseTgtConnections } from '../src/switch/main-control.ts';
import { waitForPort } from '../test/helpers/ports.ts';
import { writeDetourConfig } from '../test/helpers/detour-config.ts';
import { Tgtd, type TgtTarget } from '../test/helpers/tgtd.ts';
import {
  BLOCK_SIZE,
  busyCpuSeconds,
  cpuTimes,
  DetourServer,
  flushDirtyPages,
  interrupt,
  iscsiPerf,
  mainThreadProfiles,
  median,
  pad,
  prefill,
  processCpuSeconds,
  qemuImgBench,
  QUEUE_DEPTH,
  readCapacity,
  stealNote,
  stealWarning,
  stopProcess,
  summarizeProfile,
  vmHwmBytes,
  type Sample,
} from './lib/bench-common.ts';
import { IscsiDisk, NbdDisk, nowMs, StallProbe } from './lib/stall-probe.ts';

const MAIN_IQN = 'iqn.2026-11.bench:capture';
const RSS_IQNS = ['iqn.2026-11.bench:rss-small', 'iqn.2026-11.bench:rss-large'] as const;
const MAIN_TID = 1;
const RSS_TIDS = [2, 3] as const;
/** tgtd's LUN 0 is its controller; the disk is LUN 1. */
const LUN = 1;
const VOLUME = 'bench';
const MAIN_HOST = '127.0.0.1';
const DETOUR_HOST = '127.0.0.2';
/** QEMU's libiscsi driver logs in under this name unless told otherwise. */
const QEMU_INITIATOR = 'iqn.2008-11.org.linux-kvm';
const PROBE_INITIATOR = 'iqn.2026-11.bench:stall-probe';
const MiB = 1 << 20;
const GiB = 1 << 30;

// ------------------------------------------------------------------------------------------------
// Options

const SECTIONS = ['capture', 'copy', 'cutover', 'rss'] as const;
/** Shortest copy of a cutover-section backup (see main()). */
const CUTOVER_MIN_COPY_S = 6;
type Section = (typeof SECTIONS)[number];

interface Options {
  seconds: number;
  reps: number;
  size: number;
  rssSizes: [number, number];
  sections: Set<Section>;
  captureRate: number | undefined;
  /** Capture-section loads to run (ids of CAPTURE_LOADS). */
  loads: Set<string>;
  cpuProfDir: string | undefined;
  top: number;
  /** journalSpare of the capture section's volume, bytes; undefined: sized from the loads. */
  journalSpare: number | undefined;
}

const USAGE =
  'usage: npx tsx scripts/bench-capture.ts [--seconds 8] [--reps 3] [--size 1G] [--rss-sizes 1G,4G]\n' +
  '                                        [--sections capture,copy,cutover,rss] [--loads read-64k,write-64k,write-4k]\n' +
  '                                        [--capture-rate BYTES] [--journal-spare SIZE] [--cpu-prof DIR] [--top 25]';

function size(text: string, what: string): number {
  const n = parseSizeValue(text);
  if (n === undefined || n <= 0) throw new Error(`${what}: '${text}' is not a size (examples: 1G, 512M)`);
  return n;
}

function parseOptions(argv: string[]): Options {
  const o: Options = { seconds: 8, reps: 3, size: GiB, rssSizes: [GiB, 4 * GiB], sections: new Set(SECTIONS), captureRate: undefined, loads: new Set(CAPTURE_LOADS.map((l) => l.id)), cpuProfDir: undefined, top: 25, journalSpare: undefined };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const value = (): string => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      return v;
    };
    if (a === '--seconds') o.seconds = Number(value());
    else if (a === '--reps') o.reps = Number(value());
    else if (a === '--size') o.size = size(value(), '--size');
    else if (a === '--rss-sizes') {
      const s = value().split(',').map((x) => size(x.trim(), '--rss-sizes'));
      if (s.length !== 2) throw new Error('--rss-sizes takes two sizes, e.g. 1G,4G');
      o.rssSizes = [s[0]!, s[1]!];
    } else if (a === '--sections') {
      const s = value().split(',').map((x) => x.trim()).filter(Boolean);
      for (const x of s) if (!(SECTIONS as readonly string[]).includes(x)) throw new Error(`unknown section ${x} (known: ${SECTIONS.join(', ')})`);
      o.sections = new Set(s as Section[]);
    } else if (a === '--loads') {
      const l = value().split(',').map((x) => x.trim()).filter(Boolean);
      const known = CAPTURE_LOADS.map((c) => c.id);
      for (const x of l) if (!known.includes(x)) throw new Error(`unknown load ${x} (known: ${known.join(', ')})`);
      o.loads = new Set(l);
    } else if (a === '--capture-rate') o.captureRate = size(value(), '--capture-rate');
    else if (a === '--journal-spare') {
      const v = value();
      o.journalSpare = v === '0' ? 0 : size(v, '--journal-spare');
    }
    else if (a === '--cpu-prof') o.cpuProfDir = path.resolve(value());
    else if (a === '--top') o.top = Number(value());
    else if (a === '--help' || a === '-h') {
      console.log(USAGE);
      process.exit(0);
    } else throw new Error(`unknown option ${a}\n${USAGE}`);
  }
  if (!(o.seconds >= 1)) throw new Error('--seconds must be at least 1');
  if (!Number.isInteger(o.reps) || o.reps < 1) throw new Error('--reps must be a positive integer');
  for (const s of [o.size, ...o.rssSizes]) if (s % (4 * MiB) !== 0) throw new Error(`LUN sizes must be multiples of 4 MiB (${s})`);
  return o;
}

function fmtSize(bytes: number): string {
  return bytes % GiB === 0 ? `${bytes / GiB} GiB` : `${Math.round(bytes / MiB)} MiB`;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function checkInterrupted(): void {
  if (interrupt.signal.aborted) throw new Error('interrupted');
}

// ------------------------------------------------------------------------------------------------
// detour serve, its API and its log

/** The volume's counters in /metrics that the figures are checked and explained with. */
interface Counters {
  commands: number;
  commitGroups: number;
  commitRecords: number;
  commitSeconds: number;
}

/** The log lines the figures are read from. */
interface LogEvent {
  msg: string;
  time: number;
  backupId?: string;
  phase?: string;
  pauseMs?: number;
  sinceClose?: number;
  bytes?: number;
  err?: string;
}

const WANTED_LOG = new Set(['backup phase', 'cutover', 'drain round', 'volume frozen', 'backup failed', 'backup cancelled']);

class Detour {
  readonly events: LogEvent[] = [];

  constructor(
    readonly label: string,
    readonly server: DetourServer,
    readonly api: string,
    readonly portal: string,
    readonly iqn: string,
  ) {
    server.onLine((line) => {
      if (!line.startsWith('{')) return;
      try {
        const o = JSON.parse(line) as LogEvent;
        if (WANTED_LOG.has(o.msg)) this.events.push(o);
      } catch {
        /* not a log object */
      }
    });
  }

  get url(): string {
    return `iscsi://${this.portal}/${this.iqn}/${LUN}`;
  }

  get pid(): number {
    return this.server.pid!;
  }

  async call<T>(method: 'GET' | 'POST', p: string, body?: unknown): Promise<T> {
    const r = await fetch(this.api + p, {
      method,
      headers: body === undefined ? {} : { 'content-type': 'application/json' },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
      signal: AbortSignal.any([interrupt.signal, AbortSignal.timeout(15_000)]),
    });
    const text = await r.text();
    if (!r.ok) throw new Error(`${this.label}: ${method} ${p}: HTTP ${r.status} ${text}`);
    return (p === '/metrics' ? text : JSON.parse(text)) as T;
  }

  startBackup(label: string): Promise<BackupObject> {
    return this.call<BackupObject>('POST', `/v1/volumes/${VOLUME}/backups`, { label });
  }

  backup(id: string): Promise<BackupObject> {
    return this.call<BackupObject>('GET', `/v1/backups/${id}`);
  }

  async waitBackup(id: string, until: (b: BackupObject) => boolean, timeoutMs: number, what: string): Promise<BackupObject> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      checkInterrupted();
      const b = await this.backup(id);
      if (until(b)) return b;
      if (Date.now() > deadline) throw new Error(`${this.label}: backup ${id} did not ${what} within ${timeoutMs / 1000} s (state ${b.state}, phase ${b.phase}, error ${b.error})`);
      await sleep(100);
    }
  }

  /**
   * The volume's counters: commands detour executed (detour_scsi_commands_total, all ops), and its
   * journal's commit groups, their records and the seconds their durable writes took.
   */
  async counters(): Promise<Counters> {
    const text = await this.call<string>('GET', '/metrics');
    const c: Counters = { commands: 0, commitGroups: 0, commitRecords: 0, commitSeconds: 0 };
    const volume = `volume="${VOLUME}"`;
    for (const line of text.split('\n')) {
      if (!line.includes(volume)) continue;
      const value = Number(line.slice(line.lastIndexOf(' ') + 1));
      if (line.startsWith('detour_scsi_commands_total{')) c.commands += value;
      else if (line.startsWith('detour_journal_commit_duration_seconds_count{')) c.commitGroups += value;
      else if (line.startsWith('detour_journal_commit_duration_seconds_sum{')) c.commitSeconds += value;
      else if (line.startsWith('detour_journal_commit_records_total{')) c.commitRecords += value;
    }
    return c;
  }

  /** Journal spares ready for the volume (detour_journal_spare_bytes). */
  async spareBytes(): Promise<number> {
    const text = await this.call<string>('GET', '/metrics');
    const line = text.split('\n').find((l) => l.startsWith(`detour_journal_spare_bytes{volume="${VOLUME}"}`));
    return line ? Number(line.slice(line.lastIndexOf(' ') + 1)) : 0;
  }

  /** A log event of a backup; log lines may trail the API's answer by a moment. */
  async event(backupId: string, msg: string, phase?: string): Promise<LogEvent> {
    for (let i = 0; i < 40; i++) {
      const e = this.events.find((x) => x.backupId === backupId && x.msg === msg && (phase === undefined || x.phase === phase));
      if (e) return e;
      await sleep(50);
    }
    throw new Error(`${this.label}: no '${msg}'${phase ? ` (${phase})` : ''} log line for backup ${backupId}`);
  }

  /** The volume's sessions on detour (to tell that a load ran in capture). */
  async sessions(): Promise<VolumeView['sessions']> {
    const vols = await this.call<VolumeView[]>('GET', '/v1/volumes');
    return vols.find((v) => v.name === VOLUME)?.sessions ?? [];
  }
}

/** Every process the benchmark started, stopped by PID in the finally block. */
interface Started {
  tgtd?: Tgtd;
  detours: Detour[];
  qemuNbd?: ChildProcess;
  probes: StallProbe[];
}

async function startDetour(
  work: string,
  tag: string,
  tgtd: Tgtd,
  vol: { iqn: string; tid: number; copyRateLimit?: number; journalSpare?: number },
  nodeArgs: string[],
  started: Started,
): Promise<Detour> {
  const { file: config, portalPort, apiPort } = await writeDetourConfig(
    work,
    {
      name: VOLUME, target: vol.iqn, main: tgtd.portal, topology: 'proxy-directed',
      tgt: { tid: vol.tid, controlPort: tgtd.controlPort },
      keys: { ioTimeoutBudget: '5s', ...(vol.copyRateLimit ? { copyRateLimit: vol.copyRateLimit } : {}), ...(vol.journalSpare ? { journalSpare: vol.journalSpare } : {}) },
    },
    { fileName: `detour-${tag}.yaml`, dataDir: path.join(work, `data-${tag}`), portalHost: DETOUR_HOST, apiHost: MAIN_HOST },
  );
  // The figures are read from its JSON log lines at level info, whatever the caller's environment says.
  const server = await DetourServer.start(nodeArgs, ['serve', '--config', config], { host: DETOUR_HOST, port: portalPort }, { DETOUR_LOG_FORMAT: 'json', DETOUR_LOG_LEVEL: 'info' });
  const d = new Detour(`detour ${tag}`, server, `http://${MAIN_HOST}:${apiPort}`, `${DETOUR_HOST}:${portalPort}`, vol.iqn);
  started.detours.push(d);
  await waitForPort(MAIN_HOST, apiPort, 20_000);
  return d;
}

/** One backup from start to its end; the copy phase timed from detour's own log lines. */
async function fullBackup(d: Detour, label: string, bytes: number): Promise<{ backup: BackupObject; copySeconds: number; copyBytesPerSec: number; started: number; copyingAt: number }> {
  const t0 = nowMs();
  const b0 = await d.startBackup(label);
  // Generous: 5 MB/s would be a broken copy, not a slow one.
  const b = await d.waitBackup(b0.id, (x) => x.state !== 'running', 120_000 + (bytes / 5e6) * 1000, 'finish');
  if (b.state !== 'completed') throw new Error(`${d.label}: backup ${b.id} ended ${b.state}: ${b.error}`);
  if (b.bytesCopied !== b.bytesTotal || b.bytesTotal !== bytes) throw new Error(`${d.label}: backup ${b.id} copied ${b.bytesCopied} of ${b.bytesTotal} bytes, LUN has ${bytes}`);
  const copying = await d.event(b.id, 'backup phase', 'copying');
  const draining = await d.event(b.id, 'backup phase', 'draining');
  const copySeconds = Math.max(1e-3, (draining.time - copying.time) / 1000);
  return { backup: b, copySeconds, copyBytesPerSec: b.bytesTotal / copySeconds, started: t0, copyingAt: copying.time };
}

// ------------------------------------------------------------------------------------------------
// LUN images

/**
 * A sparse file with 4 KiB of random data at the start of every MiB: every backup store chunk
 * holds data (all-zero chunks are stored as nothing and would skip the store's write path), while
 * a 4 GiB LUN costs 16 MiB of disk.
 */
function stripedSparse(file: string, bytes: number): void {
  const stripe = Buffer.allocUnsafe(4096);
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, bytes);
    for (let off = 0; off < bytes; off += MiB) {
      randomFillSync(stripe);
      fs.writeSync(fd, stripe, 0, stripe.length, off);
    }
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * What the work directory's disk sustains when each write must be durable before the next is
 * acknowledged: detour's journal and backup store work that way (fdatasync before GOOD, before a
 * chunk counts as copied), while tgtd acknowledges writes from the page cache. Context for the
 * write and copy figures, not a goal.
 */
function diskSyncCeiling(dir: string): { bytesPerSec: number; smallSyncsPerSec: number } {
  const file = path.join(dir, 'disk-ceiling.tmp');
  const big = Buffer.allocUnsafe(2 * MiB);
  randomFillSync(big);
  const small = big.subarray(0, 4096);
  const fd = fs.openSync(file, 'w');
  try {
    let off = 0;
    const t0 = nowMs();
    while (nowMs() - t0 < 2000 && off < GiB) {
      fs.writeSync(fd, big, 0, big.length, off);
      fs.fdatasyncSync(fd);
      off += big.length;
    }
    const bytesPerSec = off / ((nowMs() - t0) / 1000);
    let n = 0;
    const t1 = nowMs();
    while (nowMs() - t1 < 1000) {
      fs.writeSync(fd, small, 0, small.length, (n % 256) * 4096);
      fs.fdatasyncSync(fd);
      n++;
    }
    return { bytesPerSec, smallSyncsPerSec: n / ((nowMs() - t1) / 1000) };
  } finally {
    fs.closeSync(fd);
    fs.rmSync(file, { force: true });
  }
}


interface JournalCeiling {
  /** 64 KiB appends. */
  bytesPerSec: number;
  /** 4 KiB appends. */
  smallPerSec: number;
  /** Records per commit group, for each size. */
  perGroup: [number, number];
}

/**
 * detour's journal on its own, in this process, on the work directory's disk: QUEUE_DEPTH appenders,
 * each appending again as soon as its record is durable, with no network, no initiator and no
 * SCSI in the way. The most a capture write could reach here with a front end that cost nothing,
 * and the batch size a commit group gets when every appender is always ready. Context for the
 * write figures, not a goal.
 */
async function journalCeiling(dir: string, seconds: number, withSpares: boolean): Promise<JournalCeiling> {
  const one = async (bytes: number): Promise<{ perSec: number; perGroup: number }> => {
    const jdir = fs.mkdtempSync(path.join(dir, 'journal-ceiling-'));
    // Like the capture section's journal: made of spares when that one is (room for 1.2 GB/s of
    // 64 KiB records, 0.3 GB/s of 4 KiB ones).
    let spares: JournalSpares | undefined;
    if (withSpares) {
      spares = new JournalSpares({ dir: path.join(jdir, 'spare'), targetBytes: Math.ceil((seconds * (bytes >= 65536 ? 1.2e9 : 0.3e9)) / GiB) * GiB, fileBytes: defaultSegmentBytes(), logger: pino({ level: 'silent' }) });
      await spares.refill();
    }
    const journal = await Journal.open({ dir: path.join(jdir, 'journal'), blockSize: BLOCK_SIZE, ...(spares ? { spares } : {}) });
    try {
      const data = Buffer.allocUnsafe(bytes);
      randomFillSync(data);
      const end = nowMs() + seconds * 1000;
      let appended = 0;
      const appender = async (slot: number): Promise<void> => {
        let lba = slot * (GiB / BLOCK_SIZE);
        while (nowMs() < end) {
          await journal.append({ lba, blocks: bytes / BLOCK_SIZE, data, borrow: true });
          lba += bytes / BLOCK_SIZE;
          appended++;
        }
      };
      const t0 = nowMs();
      await Promise.all(Array.from({ length: QUEUE_DEPTH }, (_, i) => appender(i)));
      const elapsed = (nowMs() - t0) / 1000;
      return { perSec: appended / elapsed, perGroup: journal.stats.appends / Math.max(1, journal.stats.batches) };
    } finally {
      await journal.close();
      fs.rmSync(jdir, { recursive: true, force: true });
    }
  };
  const large = await one(64 * 1024);
  const small = await one(4096);
  return { bytesPerSec: large.perSec * 64 * 1024, smallPerSec: small.perSec, perGroup: [large.perGroup, small.perGroup] };
}

// ------------------------------------------------------------------------------------------------
// Results

type PathId = 'direct' | 'detour';

interface Results {
  /** `${figure}/${path}` -> one value per repetition. */
  samples: Map<string, number[]>;
  /** Per backup: the longest stall per probe, and detour's own pause. */
  cutovers: Array<{ stallMs: Record<string, number>; pauseMs: number; switchInStallMs: Record<string, number>; captureStallMs: Record<string, number> }>;
  rss: Array<{ lunBytes: number; idle: number; peak: number; copyBytesPerSec: number }>;
  probeErrors: string[];
  errors: string[];
  disk?: { bytesPerSec: number; smallSyncsPerSec: number };
  journal?: JournalCeiling;
  /** SHA-256 bytes per second on one thread of this CPU. */
  sha256PerSec?: number;
}

function addSample(r: Results, key: string, v: number): void {
  r.samples.set(key, [...(r.samples.get(key) ?? []), v]);
}

// ------------------------------------------------------------------------------------------------
// Section 1: the initiators' loads during capture

interface CaptureLoad {
  id: string;
  title: string;
  metric: 'MB/s' | 'IOPS';
  /** Minimum detour / direct ratio. */
  goal: number;
  /** Runs the load once; `ops` is how many commands the tool completed. */
  run(url: string, key: string, opts: Options, warmUp: boolean): Promise<{ sample: Sample; ops: number }>;
}

/** qemu-img bench counts requests, not seconds: counts per load and path, sized by the warm-up. */
const writeCounts = new Map<string, number>();

function qemuWriteLoad(id: string, title: string, metric: 'MB/s' | 'IOPS', goal: number, bytes: number, warmUpCount: number): CaptureLoad {
  return {
    id,
    title,
    metric,
    goal,
    async run(url, key, opts, warmUp) {
      const count = warmUp ? warmUpCount : (writeCounts.get(key) ?? warmUpCount);
      const sample = await qemuImgBench(url, { write: true, bytes, count });
      if (warmUp) writeCounts.set(key, Math.max(warmUpCount, Math.round(sample.iops * opts.seconds)));
      return { sample, ops: count };
    },
  };
}

const CAPTURE_LOADS: CaptureLoad[] = [
  // Reads first, while nothing has been written during the capture (see the header).
  {
    id: 'read-64k',
    title: 'Read throughput during capture (iscsi-perf 64 KiB seq, QD 32)',
    metric: 'MB/s',
    goal: 0.9,
    async run(url, _key, opts, warmUp) {
      const seconds = warmUp ? 2 : opts.seconds;
      const sample = await iscsiPerf(url, { blocks: 65536 / BLOCK_SIZE, random: false, seconds });
      return { sample, ops: sample.iops * seconds };
    },
  },
  qemuWriteLoad('write-64k', 'Write throughput during capture (qemu-img bench -w 64 KiB seq, QD 32)', 'MB/s', 1.0, 65536, 4000),
  qemuWriteLoad('write-4k', '4 KiB write IOPS during capture (qemu-img bench -w 4 KiB seq, QD 32)', 'IOPS', 0.8, 4096, 8000),
];

function figureOf(metric: 'MB/s' | 'IOPS', s: Sample): number {
  return metric === 'IOPS' ? s.iops : s.bytesPerSec / 1e6;
}

/** A copy rate that keeps the backup copying through every measurement of the section, three times over. */
function captureCopyRate(opts: Options): number {
  const estimate = 20 + opts.loads.size * (2 * 6 + opts.reps * 2 * (opts.seconds + 4));
  return opts.captureRate ?? Math.max(64 * 1024, Math.floor(opts.size / (3 * estimate)));
}

/**
 * The capture volume's journalSpare: room for every journal write of the section's write loads
 * at about the rates this host reaches with spares (64 KiB ~700 MB/s, 4 KiB ~120 MB/s of records),
 * warm-ups included, plus 1 GiB. Spares only come into play for writes, so none without them.
 */
function captureJournalSpare(opts: Options): number {
  if (opts.journalSpare !== undefined) return opts.journalSpare;
  let bytes = 0;
  if (opts.loads.has('write-64k')) bytes += (opts.reps * opts.seconds + 2) * 700e6;
  if (opts.loads.has('write-4k')) bytes += (opts.reps * opts.seconds + 2) * 120e6;
  return bytes === 0 ? 0 : Math.ceil((bytes + GiB) / GiB) * GiB;
}

async function captureSection(ctx: Context): Promise<void> {
  const { opts, results } = ctx;
  const rate = captureCopyRate(opts);
  const spare = captureJournalSpare(opts);
  const d = await startDetour(ctx.work, 'capture', ctx.tgtd, { iqn: MAIN_IQN, tid: MAIN_TID, copyRateLimit: rate, journalSpare: spare }, ctx.nodeArgs, ctx.started);
  if (spare > 0) {
    // detour writes them when it starts (as it would have after the volume's previous backup);
    // the loads must not share the disk with that.
    const t0 = nowMs();
    let ready = 0;
    while ((ready = await d.spareBytes()) < spare) {
      checkInterrupted();
      if (nowMs() - t0 > 60_000 + spare / 50e3) throw new Error(`detour wrote only ${fmtSize(ready)} of its ${fmtSize(spare)} journalSpare (is the work directory's disk full? it keeps 1 GiB free)`);
      await sleep(500);
    }
    console.log(`\n  journalSpare ${fmtSize(spare)}: written by detour in ${((nowMs() - t0) / 1000).toFixed(0)} s before the backup (--journal-spare 0 measures without)`);
  } else console.log('\n  no journalSpare: the journal appends to new files');
  ctx.profiled.set(d.pid, 'detour serve (capture section)');
  const urls: Record<PathId, string> = { direct: ctx.directUrl, detour: d.url };
  // Outside a backup detour redirects the login to tgtd: same LUN, same geometry.
  for (const p of ['direct', 'detour'] as const) {
    const cap = await readCapacity(urls[p]);
    if (cap.blockSize !== BLOCK_SIZE || cap.bytes !== opts.size) throw new Error(`${urls[p]}: ${cap.bytes} bytes in ${cap.blockSize}-byte blocks, expected ${opts.size} in ${BLOCK_SIZE}`);
  }
  console.log(`\n[capture] loads during a backup held in 'copying' by copyRateLimit ${(rate / MiB).toFixed(2)} MiB/s; ${urls.detour} vs ${urls.direct}`);

  const b0 = await d.startBackup('bench-capture');
  let backupId = b0.id;
  try {
    const b = await d.waitBackup(backupId, (x) => x.phase !== 'switching' || x.state !== 'running', 60_000, 'reach copying');
    if (b.state !== 'running' || b.phase !== 'copying') throw new Error(`backup ${backupId} is ${b.state}/${b.phase}, not running/copying`);
    console.log(`  backup ${backupId} copying`);

    const runChecked = async (load: CaptureLoad, p: PathId, warmUp: boolean): Promise<{ sample: Sample; journal: string }> => {
      const key = `${load.id}/${p}`;
      await flushDirtyPages();
      const before = p === 'detour' ? await d.counters() : undefined;
      let captureSessions = 0;
      // While the load runs, its session must be listed on detour in capture mode.
      const watcher = p === 'detour' ? setInterval(() => void d.sessions().then((s) => (captureSessions = Math.max(captureSessions, s.filter((x) => x.mode === 'capture').length)), () => {}), 300) : undefined;
      let res;
      try {
        res = await load.run(urls[p], key, opts, warmUp);
      } finally {
        clearInterval(watcher);
      }
      const now = await d.backup(backupId);
      if (now.state !== 'running' || now.phase !== 'copying') {
        throw new Error(`the backup left 'copying' (now ${now.state}/${now.phase}) before this run ended; pass a lower --capture-rate than ${rate}`);
      }
      let journal = '';
      if (before) {
        const after = await d.counters();
        const through = after.commands - before.commands;
        if (through < 0.5 * res.ops) throw new Error(`only ${through} commands reached detour for the ${Math.round(res.ops)} the tool completed: the load did not run through detour`);
        if (captureSessions === 0 && !warmUp && res.ops > 0 && opts.seconds >= 2) throw new Error('no capture-mode session was listed on detour while the load ran');
        const groups = after.commitGroups - before.commitGroups;
        // Where a capture write's time goes: the disk's part is the commit group's durable write.
        if (groups > 0) {
          journal = ` [journal: ${((after.commitRecords - before.commitRecords) / groups).toFixed(1)} records per commit group, ${(((after.commitSeconds - before.commitSeconds) / groups) * 1e6).toFixed(0)} µs per group write]`;
        }
      }
      return { sample: res.sample, journal };
    };

    for (const load of CAPTURE_LOADS.filter((l) => opts.loads.has(l.id))) {
      for (const p of ['direct', 'detour'] as const) {
        checkInterrupted();
        await runChecked(load, p, true);
      }
      for (let rep = 0; rep < opts.reps; rep++) {
        // Alternate which path goes first, so slow drift does not always fall on the same side.
        const order: PathId[] = rep % 2 === 0 ? ['direct', 'detour'] : ['detour', 'direct'];
        const line: string[] = [];
        const cpuAtStart = cpuTimes();
        for (const p of order) {
          checkInterrupted();
          try {
            const { sample, journal } = await runChecked(load, p, false);
            const v = figureOf(load.metric, sample);
            addSample(results, `${load.id}/${p}`, v);
            line.push(`${p === 'direct' ? 'tgtd direct' : 'detour capture'} ${v.toFixed(load.metric === 'IOPS' ? 0 : 1)}${journal}`);
          } catch (err) {
            if (interrupt.signal.aborted) throw err;
            results.errors.push(`${load.id} via ${p}: ${(err as Error).message}`);
            line.push(`${p} FAILED`);
          }
        }
        console.log(`  rep ${rep + 1}/${opts.reps} ${pad(load.id, 9)} ${load.metric}: ${line.join(', ')}${stealNote(cpuAtStart)}`);
      }
    }
    const end = await d.backup(backupId);
    console.log(`  journal at the end: ${end.journal.records} records, ${(end.journal.bytes / MiB).toFixed(0)} MiB; copied ${(end.bytesCopied / MiB).toFixed(0)} of ${(end.bytesTotal / MiB).toFixed(0)} MiB`);
    if (spare > 0) {
      const left = await d.spareBytes();
      console.log(`  journal spares left: ${fmtSize(left)} of ${fmtSize(spare)}${left === 0 ? ' (they ran out: the last writes appended to new files; pass a larger --journal-spare)' : ''}`);
    }
  } finally {
    // Cancelling drains the journal back to tgtd and hands the sessions back.
    if (backupId) {
      const id = backupId;
      backupId = '';
      const t = nowMs();
      await d.call('POST', `/v1/backups/${id}/cancel`).catch(() => {});
      const done = await d.waitBackup(id, (x) => x.state !== 'running', 600_000, 'end after cancel').catch((err: Error) => err);
      if (done instanceof Error) results.errors.push(`capture: ${done.message}`);
      else console.log(`  backup cancelled (${done.state}) after ${((nowMs() - t) / 1000).toFixed(1)} s of draining`);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Section 2: copy throughput

/**
 * SHA-256 bytes per second on one thread, in this process. The copy hashes every byte twice (the
 * chunk's SHA-256 and the whole image's), which on a small host is most of the CPU a copy at the
 * goal rate may use: the report sets the two side by side.
 */
function sha256Rate(): number {
  const buf = Buffer.alloc(4 * MiB, 0x5a);
  createHash('sha256').update(buf).digest();
  const n = 64;
  const t0 = performance.now();
  for (let i = 0; i < n; i++) createHash('sha256').update(buf).digest();
  return (n * buf.length) / ((performance.now() - t0) / 1000);
}

async function copySection(ctx: Context, d: Detour): Promise<void> {
  const { opts, results } = ctx;
  results.sha256PerSec = sha256Rate();
  console.log(`\n[copy] full backups of the ${fmtSize(opts.size)} LUN, no rate limit, no workload, vs iscsi-perf 64 KiB QD ${QUEUE_DEPTH} from tgtd`);
  const warm = await fullBackup(d, 'bench-copy-warm-up', opts.size);
  console.log(`  warm-up backup: ${(warm.copyBytesPerSec / 1e6).toFixed(1)} MB/s over ${warm.copySeconds.toFixed(1)} s`);
  await iscsiPerf(ctx.directUrl, { blocks: 65536 / BLOCK_SIZE, random: false, seconds: 2 });
  let lastCopySeconds = warm.copySeconds;
  for (let rep = 0; rep < opts.reps; rep++) {
    const order: PathId[] = rep % 2 === 0 ? ['detour', 'direct'] : ['direct', 'detour'];
    const line: string[] = [];
    const cpuAtStart = cpuTimes();
    for (const p of order) {
      checkInterrupted();
      try {
        await flushDirtyPages();
        const cpuBefore = cpuTimes();
        if (p === 'detour') {
          const tgtdBefore = processCpuSeconds(ctx.tgtd?.proc.pid);
          const detourBefore = processCpuSeconds(d.pid);
          const r = await fullBackup(d, `bench-copy-${rep + 1}`, opts.size);
          const gb = opts.size / 1e9;
          const perGB = busyCpuSeconds(cpuBefore) / gb;
          const detourPerGB = (processCpuSeconds(d.pid) - detourBefore) / gb;
          const tgtdPerGB = (processCpuSeconds(ctx.tgtd?.proc.pid) - tgtdBefore) / gb;
          lastCopySeconds = r.copySeconds;
          addSample(results, `copy/detour`, r.copyBytesPerSec / 1e6);
          addSample(results, `copy-cpu/detour`, perGB);
          line.push(
            `detour copy ${(r.copyBytesPerSec / 1e6).toFixed(1)} (${r.copySeconds.toFixed(1)} s, ${perGB.toFixed(2)} CPU-s/GB: detour ${detourPerGB.toFixed(2)}, tgtd ${tgtdPerGB.toFixed(2)})`,
          );
        } else {
          const seconds = Math.max(1, Math.round(lastCopySeconds));
          const s = await iscsiPerf(ctx.directUrl, { blocks: 65536 / BLOCK_SIZE, random: false, seconds });
          const perGB = busyCpuSeconds(cpuBefore) / ((s.bytesPerSec * seconds) / 1e9);
          addSample(results, `copy/direct`, s.bytesPerSec / 1e6);
          addSample(results, `copy-cpu/direct`, perGB);
          line.push(`iscsi-perf tgtd ${(s.bytesPerSec / 1e6).toFixed(1)} (${seconds} s, ${perGB.toFixed(2)} CPU-s/GB)`);
        }
      } catch (err) {
        if (interrupt.signal.aborted) throw err;
        results.errors.push(`copy via ${p}: ${(err as Error).message}`);
        line.push(`${p} FAILED`);
      }
    }
    console.log(`  rep ${rep + 1}/${opts.reps} copy      MB/s: ${line.join(', ')}${stealNote(cpuAtStart)}`);
  }
}

// ------------------------------------------------------------------------------------------------
// Section 3: cutover pause

/** Which of the initiators are logged in to tgtd themselves (from 127.0.0.1, not via detour). */
async function onTgtd(tgtd: Tgtd, tid: number, initiators: string[]): Promise<boolean> {
  const conns = parseTgtConnections(await tgtd.adm(['--op', 'show', '--mode', 'conn', '--tid', String(tid)]));
  return initiators.every((i) => conns.some((c) => c.initiator === i && c.address === MAIN_HOST));
}

async function waitOnTgtd(tgtd: Tgtd, initiators: string[], timeoutMs: number): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    checkInterrupted();
    if (await onTgtd(tgtd, MAIN_TID, initiators)) return nowMs();
    if (Date.now() > deadline) {
      const conns = parseTgtConnections(await tgtd.adm(['--op', 'show', '--mode', 'conn', '--tid', String(MAIN_TID)]));
      throw new Error(`${initiators.join(' and ')} not (all) logged in to tgtd after ${timeoutMs / 1000} s; tgtd has ${conns.map((c) => `${c.initiator}@${c.address}`).join(', ') || 'nobody'}`);
    }
    await sleep(50);
  }
}

async function startQemuNbd(ctx: Context, d: Detour): Promise<NbdDisk> {
  const sock = path.join(ctx.work, 'probe.sock');
  const logs: string[] = [];
  const proc = spawn('qemu-nbd', ['-t', '-e', '2', '-k', sock, '-f', 'raw', d.url], { stdio: ['ignore', 'pipe', 'pipe'] });
  ctx.started.qemuNbd = proc;
  proc.stdout!.on('data', (x: Buffer) => logs.push(x.toString()));
  proc.stderr!.on('data', (x: Buffer) => logs.push(x.toString()));
  const deadline = Date.now() + 20_000;
  for (;;) {
    checkInterrupted();
    if (proc.exitCode !== null) throw new Error(`qemu-nbd exited with ${proc.exitCode}: ${logs.join('')}`);
    if (fs.existsSync(sock)) {
      try {
        return await NbdDisk.connect(sock);
      } catch {
        /* not serving yet */
      }
    }
    if (Date.now() > deadline) throw new Error(`qemu-nbd did not serve ${sock}: ${logs.join('')}`);
    await sleep(100);
  }
}


async function cutoverSection(ctx: Context, d: Detour): Promise<void> {
  const { opts, results } = ctx;
  console.log(`\n[cutover] QD 1 4 KiB write/read probes through ${opts.reps} full backup(s); both log in at ${d.portal}`);
  const region = Math.min(opts.size, 64 * MiB);
  const nbd = await startQemuNbd(ctx, d);
  const libiscsi = new StallProbe('libiscsi (qemu-nbd)', nbd, region);
  ctx.started.probes.push(libiscsi);
  const own = new StallProbe('detour initiator', await IscsiDisk.connect({ portal: d.portal, targetName: MAIN_IQN, initiatorName: PROBE_INITIATOR, lun: LUN }), region);
  ctx.started.probes.push(own);
  const probes = [libiscsi, own];
  const initiators = [QEMU_INITIATOR, PROBE_INITIATOR];
  for (const p of probes) p.start();
  // Redirected by detour, both are on tgtd before any backup.
  await waitOnTgtd(ctx.tgtd, initiators, 15_000);
  await sleep(1000);
  const idleFrom = nowMs() - 900;
  console.log(`  probes on tgtd: ${probes.map((p) => `${p.name} ${p.rate(idleFrom, nowMs()).toFixed(0)} IOPS, longest gap ${p.longestGap(idleFrom, nowMs()).ms.toFixed(1)} ms`).join('; ')}`);

  for (let rep = 0; rep < opts.reps; rep++) {
    checkInterrupted();
    try {
      const r = await fullBackup(d, `bench-cutover-${rep + 1}`, opts.size);
      const cut = await d.event(r.backup.id, 'cutover');
      const back = await waitOnTgtd(ctx.tgtd, initiators, 30_000);
      await sleep(1500);
      // The gate closes when the cutover starts: the stall in progress at that moment counts whole.
      const closedAt = cut.time - (cut.sinceClose ?? 0);
      const stallMs: Record<string, number> = {};
      const switchInStallMs: Record<string, number> = {};
      const captureStallMs: Record<string, number> = {};
      const parts: string[] = [];
      for (const p of probes) {
        const g = p.longestGap(closedAt, back + 1000);
        stallMs[p.name] = g.ms;
        switchInStallMs[p.name] = p.longestGap(r.started, r.copyingAt + 1000).ms;
        captureStallMs[p.name] = p.longestGap(r.copyingAt + 1000, closedAt).ms;
        parts.push(`${p.name} ${g.ms.toFixed(0)} ms (from ${(g.from - closedAt).toFixed(0)} ms)`);
      }
      results.cutovers.push({ stallMs, pauseMs: cut.pauseMs ?? NaN, switchInStallMs, captureStallMs });
      console.log(
        `  rep ${rep + 1}/${opts.reps} backup ${r.backup.id}: detour pauseMs ${cut.pauseMs}, probes back on tgtd ${(back - closedAt).toFixed(0)} ms after the gate closed\n` +
          `    longest stall at cutover (time from the gate closing): ${parts.join(', ')}\n` +
          `    for comparison, at switch-in: ${probes.map((p) => `${switchInStallMs[p.name]!.toFixed(0)} ms`).join(', ')}; while copying and draining: ${probes.map((p) => `${captureStallMs[p.name]!.toFixed(0)} ms`).join(', ')}`,
      );
    } catch (err) {
      if (interrupt.signal.aborted) throw err;
      results.errors.push(`cutover rep ${rep + 1}: ${(err as Error).message}`);
      console.log(`  rep ${rep + 1}/${opts.reps} FAILED: ${(err as Error).message.split('\n')[0]}`);
    }
  }
  for (const p of probes) {
    await p.close();
    for (const e of p.errors) results.probeErrors.push(`${p.name}: ${e}`);
  }
  await stopProcess(ctx.started.qemuNbd, 5000);
}

// ------------------------------------------------------------------------------------------------
// Section 4: peak RSS

async function rssSection(ctx: Context): Promise<void> {
  const { opts, results } = ctx;
  console.log(`\n[rss] a fresh detour per LUN, one full backup each, no workload: ${opts.rssSizes.map(fmtSize).join(' and ')}`);
  for (let i = 0; i < 2; i++) {
    checkInterrupted();
    const lunBytes = opts.rssSizes[i]!;
    const d = await startDetour(ctx.work, `rss-${i}`, ctx.tgtd, { iqn: RSS_IQNS[i]!, tid: RSS_TIDS[i]! }, [], ctx.started);
    try {
      const idle = vmHwmBytes(d.pid);
      const r = await fullBackup(d, `bench-rss-${fmtSize(lunBytes).replace(' ', '')}`, lunBytes);
      const peak = vmHwmBytes(d.pid);
      results.rss.push({ lunBytes, idle, peak, copyBytesPerSec: r.copyBytesPerSec });
      console.log(`  ${fmtSize(lunBytes)} LUN: VmHWM ${(idle / MiB).toFixed(0)} MiB before the backup, ${(peak / MiB).toFixed(0)} MiB after it (copy ${(r.copyBytesPerSec / 1e6).toFixed(0)} MB/s)`);
    } finally {
      await d.server.stop();
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Main

interface Context {
  opts: Options;
  work: string;
  tgtd: Tgtd;
  directUrl: string;
  nodeArgs: string[];
  started: Started;
  profiled: Map<number, string>;
  results: Results;
}

async function main(): Promise<number> {
  const opts = parseOptions(process.argv.slice(2));
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'detour-bench-capture-'));
  const started: Started = { detours: [], probes: [] };
  const onSignal = () => {
    console.error('\ninterrupted; stopping every process');
    interrupt.abort();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const results: Results = { samples: new Map(), cutovers: [], rss: [], probeErrors: [], errors: [] };
  const profiled = new Map<number, string>();
  const needMain = opts.sections.has('capture') || opts.sections.has('copy') || opts.sections.has('cutover');

  try {
    console.log(
      `detour capture benchmark: ${opts.reps} x ${opts.seconds} s per load and path, QD ${QUEUE_DEPTH}, ${fmtSize(opts.size)} LUN, ` +
        `RSS with ${opts.rssSizes.map(fmtSize).join(' and ')}, sections ${[...opts.sections].join(',')}, ${os.cpus().length} CPUs, node ${process.version}`,
    );
    const disk = diskSyncCeiling(work);
    results.disk = disk;
    console.log(`  work directory's disk, write + fdatasync at QD 1: 2 MiB writes ${(disk.bytesPerSec / 1e6).toFixed(0)} MB/s, 4 KiB writes ${disk.smallSyncsPerSec.toFixed(0)}/s`);
    if (opts.sections.has('capture')) {
      await flushDirtyPages();
      const withSpares = captureJournalSpare(opts) > 0;
      const j = await journalCeiling(work, 3, withSpares);
      results.journal = j;
      console.log(
        `  detour's journal alone on that disk${withSpares ? ' (made of spares)' : ''}, QD ${QUEUE_DEPTH}, no network: 64 KiB appends ${(j.bytesPerSec / 1e6).toFixed(0)} MB/s, ` +
          `4 KiB appends ${j.smallPerSec.toFixed(0)}/s (${j.perGroup[0].toFixed(1)} and ${j.perGroup[1].toFixed(1)} records per commit group)`,
      );
    }
    const targets: TgtTarget[] = [];
    if (needMain) {
      const img = path.join(work, 'main.img');
      prefill(img, opts.size);
      targets.push({ tid: MAIN_TID, iqn: MAIN_IQN, luns: [{ lun: LUN, file: img, size: opts.size }] });
    }
    if (opts.sections.has('rss')) {
      for (let i = 0; i < 2; i++) {
        const img = path.join(work, `rss-${i}.img`);
        stripedSparse(img, opts.rssSizes[i]!);
        targets.push({ tid: RSS_TIDS[i]!, iqn: RSS_IQNS[i]!, luns: [{ lun: LUN, file: img, size: opts.rssSizes[i]! }] });
      }
    }
    const tgtd = await Tgtd.start({ host: MAIN_HOST, targets });
    started.tgtd = tgtd;
    console.log(`  tgtd pid ${tgtd.proc.pid} on ${tgtd.portal}, control port ${tgtd.controlPort}`);
    const nodeArgs: string[] = [];
    if (opts.cpuProfDir) {
      fs.mkdirSync(opts.cpuProfDir, { recursive: true });
      nodeArgs.push('--cpu-prof', `--cpu-prof-dir=${opts.cpuProfDir}`);
    }
    const ctx: Context = { opts, work, tgtd, directUrl: `iscsi://${tgtd.portal}/${MAIN_IQN}/${LUN}`, nodeArgs, started, profiled, results };

    // Each section on its own: one that fails is reported, and the others still run.
    const section = async (name: string, f: () => Promise<void>) => {
      try {
        await f();
      } catch (err) {
        if (interrupt.signal.aborted) throw err;
        results.errors.push(`${name}: ${(err as Error).message}`);
        console.log(`  [${name}] FAILED: ${(err as Error).message.split('\n')[0]}`);
        for (const d of started.detours) if (d.server.proc.exitCode !== null) console.error(`--- ${d.label} output (tail) ---\n${d.server.output.slice(-3000)}`);
      }
    };
    if (opts.sections.has('capture')) {
      await section('capture', () => captureSection(ctx));
      for (const d of started.detours) await d.server.stop();
      // Its journal spares: gigabytes the later sections' disk does not need to carry.
      fs.rmSync(path.join(work, 'data-capture'), { recursive: true, force: true });
    }
    if (opts.sections.has('copy')) {
      let d: Detour | undefined;
      await section('copy set-up', async () => {
        d = await startDetour(work, 'copy', tgtd, { iqn: MAIN_IQN, tid: MAIN_TID }, nodeArgs, started);
        profiled.set(d.pid, 'detour serve (copy section)');
      });
      if (d) {
        const dd = d;
        await section('copy', () => copySection(ctx, dd));
        await dd.server.stop();
      }
    }
    if (opts.sections.has('cutover')) {
      // The copy is held to at least CUTOVER_MIN_COPY_S: libiscsi refuses to reconnect within 3 s
      // of its previous reconnect (the one at switch-in), so a backup shorter than that measures
      // libiscsi's guard, not detour's hand-back. Real backups last far longer.
      let d: Detour | undefined;
      await section('cutover set-up', async () => {
        const rate = Math.max(64 * 1024, Math.floor(opts.size / CUTOVER_MIN_COPY_S));
        d = await startDetour(work, 'cutover', tgtd, { iqn: MAIN_IQN, tid: MAIN_TID, copyRateLimit: rate }, nodeArgs, started);
        profiled.set(d.pid, 'detour serve (cutover section)');
      });
      if (d) {
        const dd = d;
        await section('cutover', () => cutoverSection(ctx, dd));
        await dd.server.stop();
      }
    }
    if (opts.sections.has('rss')) await section('rss', () => rssSection(ctx));
  } catch (err) {
    if (interrupt.signal.aborted) return 130;
    console.error(`\nset-up failed: ${(err as Error).message}`);
    for (const d of started.detours) console.error(`--- ${d.label} output (tail) ---\n${d.server.output.slice(-3000)}`);
    return 1;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    // Each stopped by its PID: the probes' initiators first, then detour (its backend sessions
    // log out of a live tgtd), then tgtd.
    for (const p of started.probes) await p.close().catch(() => {});
    await stopProcess(started.qemuNbd, 5000).catch(() => {});
    for (const d of started.detours) await d.server.stop().catch(() => {});
    await started.tgtd?.stop().catch(() => {});
    fs.rmSync(work, { recursive: true, force: true });
  }

  report(opts, results, profiled);
  return results.errors.length ? 1 : 0;
}

function report(opts: Options, results: Results, profiled: Map<number, string>): void {
  console.log('');
  const header = ['figure', 'unit', 'reference', 'detour', 'ratio', 'goal', 'result'];
  const widths = [72, 4, 10, 10, 7, 9, 6];
  const row = (cells: string[]) => '| ' + cells.map((c, i) => pad(c, widths[i]!, i >= 2 && i <= 4)).join(' | ') + ' |';
  console.log(row(header));
  console.log('|' + widths.map((w) => '-'.repeat(w + 2)).join('|') + '|');
  const verdicts: Array<{ name: string; ok: boolean; text: string }> = [];
  const med = (key: string) => {
    const xs = results.samples.get(key) ?? [];
    return xs.length === opts.reps ? median(xs) : NaN;
  };
  const num = (v: number, digits: number) => (Number.isNaN(v) ? 'n/a' : v.toFixed(digits));
  const pct = (v: number) => (Number.isNaN(v) ? 'n/a' : `${(100 * v).toFixed(1)}%`);

  const byId = new Map(CAPTURE_LOADS.map((l) => [l.id, l]));
  const ratioRows: Array<{ key: string; title: string; metric: 'MB/s' | 'IOPS'; goal: number; section: Section }> = [
    { key: 'write-64k', title: byId.get('write-64k')!.title, metric: 'MB/s', goal: 1.0, section: 'capture' },
    { key: 'write-4k', title: byId.get('write-4k')!.title, metric: 'IOPS', goal: 0.8, section: 'capture' },
    { key: 'read-64k', title: byId.get('read-64k')!.title, metric: 'MB/s', goal: 0.9, section: 'capture' },
    { key: 'copy', title: `Copy throughput, no workload (vs iscsi-perf 64 KiB QD ${QUEUE_DEPTH} from tgtd)`, metric: 'MB/s', goal: 0.9, section: 'copy' },
  ];
  for (const r of ratioRows) {
    if (!opts.sections.has(r.section) || (r.section === 'capture' && !opts.loads.has(r.key))) continue;
    const direct = med(`${r.key}/direct`);
    const detour = med(`${r.key}/detour`);
    const ratio = detour / direct;
    const ok = ratio >= r.goal;
    verdicts.push({ name: r.key, ok, text: `${pct(ratio)} < ${Math.round(r.goal * 100)}%` });
    console.log(row([r.title, r.metric, num(direct, r.metric === 'IOPS' ? 0 : 1), num(detour, r.metric === 'IOPS' ? 0 : 1), pct(ratio), `>= ${Math.round(r.goal * 100)}%`, ok ? 'PASS' : 'FAIL']));
  }
  if (opts.sections.has('cutover')) {
    const worst = results.cutovers.length === opts.reps ? Math.max(...results.cutovers.flatMap((c) => Object.values(c.stallMs))) : NaN;
    const ok = worst < 1000;
    verdicts.push({ name: 'cutover', ok, text: `${num(worst, 0)} ms >= 1000 ms` });
    console.log(row(['Cutover pause: longest I/O stall at redirect-back (QD 1 4 KiB probes)', 'ms', '-', num(worst, 0), '-', '< 1000 ms', ok ? 'PASS' : 'FAIL']));
  }
  if (opts.sections.has('rss')) {
    const [small, large] = [results.rss.find((x) => x.lunBytes === opts.rssSizes[0]), results.rss.find((x) => x.lunBytes === opts.rssSizes[1])];
    const s = small ? small.peak / MiB : NaN;
    const l = large ? large.peak / MiB : NaN;
    const ratio = l / s;
    const ok = ratio <= 1.25;
    verdicts.push({ name: 'rss', ok, text: `${pct(ratio)} > 125%` });
    console.log(row([`detour peak RSS (VmHWM), full backup: ${fmtSize(opts.rssSizes[1])} LUN vs ${fmtSize(opts.rssSizes[0])} LUN`, 'MiB', num(s, 0), num(l, 0), pct(ratio), '<= 125%', ok ? 'PASS' : 'FAIL']));
  }
  console.log(
    `(reference: tgtd directly, same run, interleaved${opts.sections.has('rss') ? `; for peak RSS, detour with the ${fmtSize(opts.rssSizes[0])} LUN` : ''}. ` +
      `Medians of ${opts.reps} runs of ${opts.seconds} s for the capture loads, of ${opts.reps} full backups for the copy; MB/s = 10^6 bytes/s)`,
  );
  if (results.disk && (opts.sections.has('capture') || opts.sections.has('copy'))) {
    console.log(
      `disk of the work directory (journal and backup store), write + fdatasync at QD 1: ${(results.disk.bytesPerSec / 1e6).toFixed(0)} MB/s in 2 MiB writes, ` +
        `${results.disk.smallSyncsPerSec.toFixed(0)} syncs/s in 4 KiB writes. detour acknowledges a write and counts a chunk as copied only once it is durable; ` +
        `tgtd acknowledges from the page cache and iscsi-perf discards what it reads.`,
    );
  }
  const copyRef = med('copy/direct');
  if (results.sha256PerSec && Number.isFinite(copyRef)) {
    const cores = os.cpus().length;
    const hashCoreSeconds = (2 * opts.size) / results.sha256PerSec;
    const goalSeconds = opts.size / (0.9 * copyRef * 1e6);
    console.log(
      `SHA-256 on one thread of this CPU: ${(results.sha256PerSec / 1e6).toFixed(0)} MB/s. The copy hashes every byte twice (each chunk's SHA-256 and the image's), ` +
        `${hashCoreSeconds.toFixed(2)} core-seconds for the ${fmtSize(opts.size)} LUN; a copy at 90% of the reference takes ${goalSeconds.toFixed(2)} s, ` +
        `${(cores * goalSeconds).toFixed(2)} core-seconds on ${cores} CPUs, which must also carry tgtd's sending and detour's receiving and writing.`,
    );
  }
  const copyCpu = med('copy-cpu/detour');
  const refCpu = med('copy-cpu/direct');
  if (Number.isFinite(copyCpu) && Number.isFinite(refCpu)) {
    const cores = os.cpus().length;
    console.log(
      `CPU time of the whole host per GB (all processes and the kernel, steal left out): detour's backup ${copyCpu.toFixed(2)} s (the copy, and the switch-in and drain around it), ` +
        `iscsi-perf reading tgtd ${refCpu.toFixed(2)} s. At that cost ${cores} CPUs carry at most ${((cores / copyCpu) * 1e3).toFixed(0)} MB/s of backup copy, ` +
        `${pct(cores / copyCpu / (copyRef / 1e3))} of the reference.`,
    );
  }
  if (results.journal && opts.sections.has('capture')) {
    const j = results.journal;
    const ref = (key: string) => med(`${key}/direct`);
    console.log(
      `detour's journal alone on that disk (QD ${QUEUE_DEPTH}, no network, every appender always ready): 64 KiB ${(j.bytesPerSec / 1e6).toFixed(0)} MB/s = ` +
        `${pct(j.bytesPerSec / 1e6 / ref('write-64k'))} of the direct write reference, 4 KiB ${j.smallPerSec.toFixed(0)}/s = ${pct(j.smallPerSec / ref('write-4k'))}; ` +
        `${j.perGroup[0].toFixed(1)} and ${j.perGroup[1].toFixed(1)} records per commit group. About the most a capture write reaches here (the disk varies from one run to the next by 10-20%).`,
    );
  }
  if (results.cutovers.length) {
    const names = Object.keys(results.cutovers[0]!.stallMs);
    console.log(`cutover, per backup: detour's own pauseMs ${results.cutovers.map((c) => num(c.pauseMs, 0)).join(', ')}`);
    for (const n of names) {
      console.log(
        `  ${n}: longest stall at cutover ${results.cutovers.map((c) => num(c.stallMs[n] ?? NaN, 0)).join(', ')} ms; ` +
          `at switch-in ${results.cutovers.map((c) => num(c.switchInStallMs[n] ?? NaN, 0)).join(', ')} ms; while copying and draining ${results.cutovers.map((c) => num(c.captureStallMs[n] ?? NaN, 0)).join(', ')} ms`,
      );
    }
  }
  if (results.probeErrors.length) console.log(`\nI/O errors the probe initiators saw:\n  ${results.probeErrors.join('\n  ')}`);
  if (results.errors.length) console.log(`\nmeasurements that failed:\n  ${results.errors.join('\n  ')}`);

  if (opts.cpuProfDir) {
    console.log(`\nCPU profiles (${opts.cpuProfDir}), hottest functions by self time:`);
    for (const { file, label } of mainThreadProfiles(opts.cpuProfDir, profiled)) {
      try {
        console.log(`  ${label}`);
        for (const l of summarizeProfile(file, opts.top)) console.log(l);
      } catch (err) {
        console.log(`  ${file}: unreadable (${(err as Error).message})`);
      }
    }
  }

  const met = verdicts.filter((v) => v.ok).length;
  const failed = verdicts.filter((v) => !v.ok).map((v) => `${v.name} ${v.text}`);
  console.log(
    `\nSUMMARY: ${met} of ${verdicts.length} goals met${failed.length ? `; FAIL: ${failed.join(', ')}` : ' (all PASS)'}` +
      `${results.probeErrors.length ? `; ${results.probeErrors.length} probe I/O error(s)` : ''}${results.errors.length ? `; ${results.errors.length} measurement(s) FAILED` : ''}${stealWarning()}`,
  );
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
