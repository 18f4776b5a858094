import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import YAML from 'yaml';
import { Portal } from '../front/portal.ts';
import { EmbeddedTarget } from '../scsi/embedded-target.ts';
import type { Command } from './cli.ts';
import { UsageError } from './cli.ts';
import { parseCommandArgs } from './args.ts';
import { formatPortal } from '../back/index.ts';
import { ConfigError, CONFIG_ENV, validateConfig, type DetourConfig } from './config.ts';
import { createLogger, LOG_HELP, LOG_OPTIONS, resolveLogSettings } from './logger.ts';
import { isLoopbackHost } from './api-server.ts';
import { startServer, type RunningServer } from './serve.ts';
import { TargetControlServer } from './target-control.ts';

const EMBEDDED_IQN = 'iqn.2026-11.io.detour:main';
const MAIN_HOST = '127.0.0.1';
const MAIN_PORT = 3261;
const VOLUME = 'vol1';
const GiB = 1024 ** 3;

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/**
 * `npm start`: the whole product on embedded defaults, no config and no system packages. An
 * embedded file-backed main target (1 GiB sparse under ./data) on 127.0.0.1:3261, detour on
 * 127.0.0.2:3260 in proxy-directed topology driving that target through its control socket, the
 * API on 127.0.0.1:9270 and the backup store in ./data/backups. The DETOUR_* variables of
 * `serve` override these defaults (except the embedded target's own address).
 */
export const startCommand: Command = async (argv) => {
  const { values, positionals } = parseCommandArgs(argv, { 'data-dir': { type: 'string' }, help: { type: 'boolean', short: 'h' }, ...LOG_OPTIONS });
  if (values.help) {
    process.stdout.write(
      `usage: detour start [--data-dir DIR] [--log-level L] [--log-format json|pretty]\n` +
        `  --data-dir DIR    where the embedded image, journals and backups go (default $DETOUR_DATA_DIR, else ./data)\n${LOG_HELP}\n`,
    );
    return 0;
  }
  if (positionals.length) throw new UsageError(`unexpected argument '${positionals[0]}'`);
  const logSettings = resolveLogSettings(values);
  // The flag wins over DETOUR_DATA_DIR; either is relative to the current directory.
  const env = { ...process.env };
  const dataDir = path.resolve(values['data-dir'] ?? (env.DETOUR_DATA_DIR || './data'));
  delete env.DETOUR_DATA_DIR;
  const image = path.join(dataDir, 'main.img');
  const socket = path.join(dataDir, 'main-target.sock');

  // detour drives the embedded target exactly as it would drive any main target with `exec`.
  const bin = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../bin/detour.js');
  const ctl = `${shellQuote(process.execPath)} ${shellQuote(bin)} target-ctl --socket ${shellQuote(socket)}`;
  const raw = {
    portal: '127.0.0.2:3260',
    api: '127.0.0.1:9270',
    dataDir,
    backupStore: { path: path.join(dataDir, 'backups') },
    volumes: [
      {
        name: VOLUME,
        target: EMBEDDED_IQN,
        main: `${MAIN_HOST}:${MAIN_PORT}`,
        topology: 'proxy-directed',
        control: {
          type: 'exec',
          redirectOn: `${ctl} redirect-on "$DETOUR_REDIRECT_HOST" "$DETOUR_REDIRECT_PORT"`,
          redirectOff: `${ctl} redirect-off`,
          kick: `${ctl} kick \${DETOUR_SID:-} \${DETOUR_CID:-}`,
          list: `${ctl} list`,
        },
        ioTimeoutBudget: '5s',
      },
    ],
  };
  const configFile = path.join(dataDir, 'detour.yaml');
  let config: DetourConfig;
  try {
    config = validateConfig(raw, configFile, env);
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    process.stderr.write(`detour start: ${err.message}\n`);
    return 1;
  }
  if (!config.token && (!isLoopbackHost(config.portal.host) || !isLoopbackHost(config.api.host))) {
    process.stderr.write('detour start: token: required when the portal or the API listens on a non-loopback address (set DETOUR_TOKEN)\n');
    return 1;
  }
  fs.mkdirSync(dataDir, { recursive: true });
  const overrides = CONFIG_ENV.filter((o) => env[o.variable]).map((o) => o.variable);
  // The embedded defaults, for reference; a token from the environment is never written to disk.
  fs.writeFileSync(
    configFile,
    `# Written by \`detour start\`: the embedded defaults, for reference.\n` +
      (overrides.length ? `# Overridden from the environment: ${overrides.join(', ')}.\n` : '') +
      YAML.stringify(raw),
  );
  const log = createLogger('detour', logSettings);

  const device = new EmbeddedTarget({ targetName: EMBEDDED_IQN, luns: [{ lun: 0, file: image, size: GiB }] });
  await device.open();
  const target = { name: EMBEDDED_IQN, portalGroupTag: 1, device };
  const mainPortal = new Portal({ host: MAIN_HOST, port: MAIN_PORT, logger: log.child({ component: 'embedded-target' }), targets: [target] });
  const control = new TargetControlServer(mainPortal, target);
  try {
    await mainPortal.listen();
    await control.listen(socket);
  } catch (err) {
    await mainPortal.close().catch(() => {});
    await device.close();
    process.stderr.write(`detour start: cannot start the embedded target on ${MAIN_HOST}:${MAIN_PORT}: ${(err as Error).message}\n`);
    return 1;
  }

  let server: RunningServer;
  try {
    server = await startServer(config, log);
  } catch (err) {
    await control.close();
    await mainPortal.close();
    await device.close();
    fs.rmSync(socket, { force: true });
    process.stderr.write(`detour start: cannot start detour: ${(err as Error).message}\n`);
    return 1;
  }
  const portal = formatPortal(config.portal);
  const api = `http://${formatPortal(config.api)}`;

  process.stderr.write(
    [
      '',
      'detour is running on embedded defaults.',
      `  main target (embedded): ${EMBEDDED_IQN} on ${MAIN_HOST}:${MAIN_PORT}, 1 GiB sparse image ${image}`,
      `  detour portal:          ${portal} (proxy-directed: logins are redirected to the main target outside a backup)`,
      `  API and metrics:        ${api}  (/metrics, /v1/volumes, /v1/backups)${config.token ? ', bearer token from DETOUR_TOKEN' : ''}`,
      `  backup store:           ${config.backupStore.path}`,
      '',
      'Connect an initiator to detour:',
      `  iscsi-ls -s iscsi://${portal}`,
      `  iscsiadm -m discovery -t sendtargets -p ${portal}`,
      `  qemu-img info iscsi://${portal}/${EMBEDDED_IQN}/0`,
      `  qemu-io -f raw -c 'write -P 0x5a 0 1M' iscsi://${portal}/${EMBEDDED_IQN}/0`,
      '',
      'Take a backup and restore it:',
      `  npx detour backup start ${VOLUME} --wait`,
      '  npx detour backup list',
      `  npx detour restore <ID> --to-file /tmp/restored.img${config.backupStore.path === path.join(path.resolve('data'), 'backups') ? '' : ` --store ${config.backupStore.path}`}`,
      '',
      logSettings.format === 'json' ? 'Logs are JSON lines on stdout; --log-format pretty (or DETOUR_LOG_FORMAT=pretty) reads better on a terminal.' : 'Logs are on stdout.',
      'Ctrl-C stops everything.',
      '',
    ].join('\n'),
  );
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
  await control.close();
  await mainPortal.close();
  await device.close();
  fs.rmSync(socket, { force: true });
  return 0;
};
