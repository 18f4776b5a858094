import type { Logger } from 'pino';
import { formatPortal, InitiatorSession, parseTargetAddress } from '../back/index.ts';
import { Portal } from '../front/portal.ts';
import type { BackupRun, BackupRunOptions } from '../capture/backup-run.ts';
import { Engine, type EngineHooks } from '../capture/engine.ts';
import { Volume } from '../capture/volume.ts';
import { ExecControl, NoControl, TgtControl, type MainTargetControl } from '../switch/main-control.ts';
import type { Command } from './cli.ts';
import { UsageError } from './cli.ts';
import { parseCommandArgs } from './args.ts';
import { ConfigError, loadConfig, type DetourConfig, type VolumeConfig } from './config.ts';
import { createLogger } from './logger.ts';
import { isLoopbackHost, startApiServer, type RunningApiServer } from './api-server.ts';
import { createMetrics, type DetourMetrics } from './metrics.ts';

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
  const portal = new Portal({ host: config.portal.host, port: config.portal.port, logger: log, targets: [...volumes.values()].map((v) => v.target) });
  await portal.listen();
  for (const v of volumes.values()) v.portal = portal;
  const engine = new Engine(volumes, { dataDir: config.dataDir, storePath: config.backupStore.path, logger: log, hooks: opts.hooks, run: opts.run });
  await engine.refreshCatalog();
  return {
    portal,
    engine,
    volumes,
    async close() {
      await portal.close();
      await Promise.allSettled([...volumes.values()].map((v) => v.close()));
    },
  };
}

function metricsHooks(m: DetourMetrics): EngineHooks {
  return {
    phase: (v, p) => m.setPhase(v, p),
    copied: (v, bytes, total) => {
      m.setBytesTotal(v, total);
      m.addCopied(v, bytes);
    },
    drained: (v, bytes) => m.addDrained(v, bytes),
    cutover: (v, seconds) => m.observeCutover(v, seconds),
    succeeded: (v, at) => m.backupSucceeded(v, at),
  };
}

/** Session and journal gauges, sampled: they change too often to update per command. */
export function updateGauges(proxy: RunningProxy, m: DetourMetrics): void {
  const running = new Map(proxy.engine.activeRuns().map((r) => [r.volume.name, r]));
  for (const v of proxy.volumes.values()) {
    const here = v.frontSessions().length;
    m.setSessions(v.name, v.capture ? { capture: here } : { inline: here });
    const j = running.get(v.name)?.journal;
    if (j) m.setJournal(v.name, { records: j.records, bytes: j.bytes, unreflected: j.unreflected });
  }
}

/**
 * A backup in progress holds acknowledged writes that are only in its journal, and its initiators
 * are on detour (for main-directed, the main target still redirects them here). Closing without a
 * word would strand them: cancel the backups, which drains every journal to the main target and
 * hands the sessions back, and wait for that.
 */
export async function cancelRunningBackups(proxy: RunningProxy, log: Logger): Promise<void> {
  const told = new Set<BackupRun>();
  for (let runs = proxy.engine.activeRuns(); runs.length > 0; runs = proxy.engine.activeRuns()) {
    const fresh = runs.filter((r) => !told.has(r));
    if (fresh.length) log.info({ backups: fresh.map((r) => r.id) }, 'cancelling backups in progress: draining their journals and handing the sessions back');
    for (const r of fresh) {
      told.add(r);
      r.cancel();
    }
    // A run still preparing has no `done` of its own yet: look again shortly.
    await Promise.race([Promise.allSettled(runs.map((r) => r.done)), new Promise((resolve) => setTimeout(resolve, 200))]);
  }
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
  const gauges = setInterval(() => updateGauges(proxy, metrics), 1000);
  gauges.unref();
  log.info({ portal: proxy.portal.address, api: api.url, volumes: config.volumes.map((v) => ({ name: v.name, topology: v.topology })) }, 'detour serving');
  return {
    proxy,
    api,
    metrics,
    async close() {
      clearInterval(gauges);
      await cancelRunningBackups(proxy, log);
      await api.close();
      await proxy.close();
    },
  };
}

export const serveCommand: Command = async (argv) => {
  const { values, positionals } = parseCommandArgs(argv, { config: { type: 'string', short: 'c' }, help: { type: 'boolean', short: 'h' } });
  if (values.help) {
    process.stdout.write('usage: detour serve --config FILE\n');
    return 0;
  }
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
    process.stderr.write(`detour serve: ${config.file}: token: required when the portal or the API listens on a non-loopback address\n`);
    return 1;
  }
  const log = createLogger('detour');
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
