import type { Logger } from 'pino';
import { formatPortal, InitiatorSession, parseTargetAddress } from '../back/index.ts';
import { Portal } from '../front/portal.ts';
import type { BackupRunOptions } from '../capture/backup-run.ts';
import { DETOUR_INITIATOR } from '../capture/backup-run.ts';
import { Engine, type EngineHooks } from '../capture/engine.ts';
import { Volume } from '../capture/volume.ts';
import { ExecControl, NoControl, TgtControl, type MainTargetControl } from '../switch/main-control.ts';
import type { Command } from './cli.ts';
import { UsageError } from './cli.ts';
import { parseCommandArgs } from './args.ts';
import { ConfigError, loadConfig, type DetourConfig, type VolumeConfig } from './config.ts';
import { createLogger, LOG_HELP, LOG_OPTIONS, resolveLogSettings } from './logger.ts';
import { isLoopbackHost, startApiServer, type RunningApiServer } from './api-server.ts';
import { createMetrics, instrumentRedirects, type DetourMetrics } from './metrics.ts';

/** Our own name when we only look at the main target (discovery of its portal group tag). */
const PROBE_INITIATOR = 'iqn.2026-11.io.detour:probe';


/**
 * The main target's portal group tag for this volume, so detour presents the same
 * TargetPortalGroupTag. An unreachable main target at start-up is not fatal: it may come later.
 */
async function mainPortalGroupTag(v: VolumeConfig, localAddress: string, log: Logger): Promise<number> {
  try {
    const found = await InitiatorSession.discover(formatPortal(v.main), PROBE_INITIATOR, { localAddress, loginTimeoutMs: 5000 });
    const t = found.find((x) => x.targetName === v.target);
    const tag = t?.addresses.map((a) => parseTargetAddress(a).tpgt).find((x) => x !== undefined);
    if (tag !== undefined) return tag;
    log.warn({ volume: v.name, target: v.target }, 'main target does not list this target; presenting portal group tag 1');
  } catch (err) {
    log.warn({ volume: v.name, err: (err as Error).message }, 'main target not reachable at start-up; presenting portal group tag 1');
  }
  return 1;
}

export interface RunningProxy {
  portal: Portal;
  engine: Engine;
  volumes: Map<string, Volume>;
  close(): Promise<void>;
}

export function makeControl(v: VolumeConfig): MainTargetControl {
  const c = v.control;
  if (c.type === 'tgt') return new TgtControl(c.tid, c.controlPort);
  if (c.type === 'exec') {
    return new ExecControl(c, {
      DETOUR_VOLUME: v.name,
      DETOUR_TARGET: v.target,
      DETOUR_MAIN_HOST: v.main.host,
      DETOUR_MAIN_PORT: String(v.main.port),
    });
  }
  return new NoControl();
}

export async function startProxy(config: DetourConfig, log: Logger, opts: { hooks?: EngineHooks; run?: Partial<BackupRunOptions> } = {}): Promise<RunningProxy> {
  const localAddress = config.portal.host;
  const volumes = new Map<string, Volume>();
  for (const v of config.volumes) {
    const tpgt = await mainPortalGroupTag(v, localAddress, log);
    volumes.set(v.name, new Volume(v, makeControl(v), localAddress, tpgt, log));
  }
  const engine = new Engine(volumes, { dataDir: config.dataDir, storePath: config.backupStore.path, logger: log, hooks: opts.hooks, run: opts.run });
  await engine.refreshCatalog();
  // Before listening: an initiator of a volume whose backup was interrupted reconnects as soon as
  // the portal is up, and must find that volume held for the backup, not redirected to main.
  await engine.findInterrupted();
  const portal = new Portal({ host: config.portal.host, port: config.portal.port, logger: log, targets: [...volumes.values()].map((v) => v.target) });
  await portal.listen();
  for (const v of volumes.values()) v.portal = portal;
  engine.resumeInterrupted();
  return {
    portal,
    engine,
    volumes,
    async close() {
      // No new logins from here on; sessions already on detour finish what they are doing.
      portal.stopListening();
      await engine.suspendAll();
      await portal.close();
      await Promise.allSettled([...volumes.values()].map((v) => v.close()));
    },
  };
}

function metricsHooks(m: DetourMetrics): EngineHooks {
  return {
    // The journal and write-limit gauges follow the phase at the next scrape (updateGauges).
    phase: (v, p) => m.setPhase(v, p),
    copied: (v, bytes, total) => {
      m.setBytesTotal(v, total);
      m.addCopied(v, bytes);
    },
    drained: (v, bytes) => m.addDrained(v, bytes),
    cutover: (v, seconds) => m.observeCutover(v, seconds),
    journalCommit: (v, seconds, records) => m.observeJournalCommit(v, seconds, records),
    succeeded: (v, at) => m.backupSucceeded(v, at),
  };
}

/**
 * Session, journal, write-limit and progress gauges, sampled when /metrics is read: they change too
 * often to update per command, and nothing reads them between scrapes.
 */
export function updateGauges(proxy: RunningProxy, m: DetourMetrics): void {
  const running = new Map(proxy.engine.activeRuns().map((r) => [r.volume.name, r]));
  for (const v of proxy.volumes.values()) {
    const here = v.frontSessions().length;
    m.setSessions(v.name, v.capture ? { capture: here } : { inline: here });
    const run = running.get(v.name);
    // A run that reached 'done' has disposed of its journal even if it is still listed.
    const live = run && run.phase !== 'done' ? run : undefined;
    const j = live?.journal;
    // A journal lives as long as its backup: none running, nothing journaled. Records are those
    // of this backup; unreflected ones are not yet on the main target (Journal.unreflected counts
    // records not yet in the snapshot map, which is another thing).
    m.setJournal(v.name, j ? { records: j.lastSeq, bytes: j.bytes, unreflected: j.lastSeq - j.drainedSeq } : { records: 0, bytes: 0, unreflected: 0 });
    m.setWriteLimit(v.name, live ? live.throttle.bytesPerSecond : null);
    if (run?.phase === 'copying') m.setProgress(v.name, run.bytesCopied, run.bytesTotal);
  }
  for (const [volume, bytes] of proxy.engine.spareBytes()) m.setJournalSpare(volume, bytes);
}

/**
 * Shutdown with backups in progress: their initiators are on detour and their writes since the
 * freeze are only in the journals. Each backup is parked (commands executing finish, new ones are
 * held unanswered, journal and store closed durably, its record kept in the data directory) and
 * NOT handed back: the next `detour serve` with the same configuration takes it up where it was,
 * and the initiators reconnect to it. Handing back would instead mean draining every journal to
 * main first, which can take far longer than a service manager waits for a stop.
 */
export async function suspendRunningBackups(proxy: RunningProxy): Promise<void> {
  await proxy.engine.suspendAll();
}

export interface RunningServer {
  proxy: RunningProxy;
  api: RunningApiServer;
  metrics: DetourMetrics;
  close(): Promise<void>;
}

/** The proxy, its API and its metrics: what `serve` and `start` run. */
export async function startServer(config: DetourConfig, log: Logger): Promise<RunningServer> {
  const metrics = createMetrics();
  for (const v of config.volumes) metrics.addVolume(v.name);
  const proxy = await startProxy(config, log, { hooks: metricsHooks(metrics) });
  let api: RunningApiServer;
  try {
    api = await startApiServer({ host: config.api.host, port: config.api.port, engine: proxy.engine, registry: metrics.registry, token: config.token, logger: log });
  } catch (err) {
    await proxy.close();
    throw err;
  }
  for (const v of proxy.volumes.values()) v.observer = (volume, task, outcome, seconds) => metrics.observeCommand(volume, task.cdb, outcome ? outcome.status : 'ERROR', seconds);
  for (const v of proxy.volumes.values()) instrumentRedirects(metrics, v, [DETOUR_INITIATOR, PROBE_INITIATOR], log);
  metrics.onScrape(() => updateGauges(proxy, metrics));
  log.info({ portal: proxy.portal.address, api: api.url, volumes: config.volumes.map((v) => ({ name: v.name, topology: v.topology })) }, 'detour serving');
  return {
    proxy,
    api,
    metrics,
    async close() {
      proxy.portal.stopListening();
      await suspendRunningBackups(proxy);
      await api.close();
      await proxy.close();
    },
  };
}

export const serveCommand: Command = async (argv) => {
  const { values, positionals } = parseCommandArgs(argv, { config: { type: 'string', short: 'c' }, help: { type: 'boolean', short: 'h' }, ...LOG_OPTIONS });
  if (values.help) {
    process.stdout.write(`usage: detour serve --config FILE [--log-level L] [--log-format json|pretty]\n${LOG_HELP}\n`);
    return 0;
  }
  const logSettings = resolveLogSettings(values);
  if (positionals.length) throw new UsageError(`unexpected argument '${positionals[0]}'`);
  if (!values.config) throw new UsageError('--config FILE is required');
  let config: DetourConfig;
  try {
    config = loadConfig(values.config);
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`detour serve: ${err.message}\n`);
      return 1;
    }
    throw err;
  }
  if (!config.token && (!isLoopbackHost(config.portal.host) || !isLoopbackHost(config.api.host))) {
    process.stderr.write(`detour serve: ${config.file}: token: required when the portal or the API listens on a non-loopback address (set token, or DETOUR_TOKEN)\n`);
    return 1;
  }
  const log = createLogger('detour', logSettings);
  let server: RunningServer;
  try {
    server = await startServer(config, log);
  } catch (err) {
    process.stderr.write(`detour serve: cannot start: ${(err as Error).message}\n`);
    return 1;
  }
  await new Promise<void>((resolve) => {
    process.once('SIGINT', () => resolve());
    process.once('SIGTERM', () => resolve());
  });
  log.info('shutting down');
  // A second signal stops at once; the journals of unfinished backups stay in the data directory.
  const force = () => {
    log.warn('second signal: stopping now; journals of unfinished backups stay in the data directory');
    process.exit(1);
  };
  process.once('SIGINT', force);
  process.once('SIGTERM', force);
  await server.close();
  return 0;
};
