import type { Logger } from 'pino';
import { InitiatorSession, parseTargetAddress } from '../back/index.ts';
import { Portal } from '../front/portal.ts';
import type { FrontTarget } from '../front/types.ts';
import { InlineDevice } from '../proxy/inline-device.ts';
import type { Command } from './cli.ts';
import { UsageError } from './cli.ts';
import { parseCommandArgs } from './args.ts';
import { ConfigError, loadConfig, type DetourConfig, type VolumeConfig } from './config.ts';
import { createLogger } from './logger.ts';

/** Our own name when we only look at the main target (discovery of its portal group tag). */
const PROBE_INITIATOR = 'iqn.2026-11.io.detour:probe';

function fmt(hp: { host: string; port: number }): string {
  return hp.host.includes(':') ? `[${hp.host}]:${hp.port}` : `${hp.host}:${hp.port}`;
}

/**
 * The main target's portal group tag for this volume, so detour presents the same
 * TargetPortalGroupTag. An unreachable main target at start-up is not fatal: it may come later.
 */
async function mainPortalGroupTag(v: VolumeConfig, localAddress: string, log: Logger): Promise<number> {
  try {
    const found = await InitiatorSession.discover(fmt(v.main), PROBE_INITIATOR, { localAddress, loginTimeoutMs: 5000 });
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
  close(): Promise<void>;
}

export async function startProxy(config: DetourConfig, log: Logger): Promise<RunningProxy> {
  const localAddress = config.portal.host;
  const inline: InlineDevice[] = [];
  const targets: FrontTarget[] = [];
  for (const v of config.volumes) {
    const tpgt = await mainPortalGroupTag(v, localAddress, log);
    const device = new InlineDevice({ volume: v.name, targetName: v.target, main: fmt(v.main), localAddress, logger: log });
    if (v.topology === 'inline') inline.push(device);
    targets.push({
      name: v.target,
      portalGroupTag: tpgt,
      device,
      // Outside a backup, the two redirect topologies keep detour out of the data path: a login
      // that reaches detour is sent on to the main target.
      redirect: v.topology === 'inline' ? undefined : () => ({ address: `${fmt(v.main)},${tpgt}` }),
    });
  }
  const portal = new Portal({ host: config.portal.host, port: config.portal.port, logger: log, targets });
  await portal.listen();
  return {
    portal,
    async close() {
      await portal.close();
      await Promise.allSettled(inline.map((d) => d.close()));
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
  const log = createLogger('detour');
  let proxy: RunningProxy;
  try {
    proxy = await startProxy(config, log);
  } catch (err) {
    process.stderr.write(`detour serve: cannot start: ${(err as Error).message}\n`);
    return 1;
  }
  log.info({ portal: proxy.portal.address, volumes: config.volumes.map((v) => ({ name: v.name, topology: v.topology })) }, 'detour serving');
  await new Promise<void>((resolve) => {
    process.once('SIGINT', () => resolve());
    process.once('SIGTERM', () => resolve());
  });
  log.info('shutting down');
  await proxy.close();
  return 0;
};
