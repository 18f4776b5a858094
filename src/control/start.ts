import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import YAML from 'yaml';
import { Portal } from '../front/portal.ts';
import { EmbeddedTarget } from '../scsi/embedded-target.ts';
import type { Command } from './cli.ts';
import { UsageError } from './cli.ts';
import { parseCommandArgs } from './args.ts';
import { validateConfig } from './config.ts';
import { createLogger } from './logger.ts';
import { startServer } from './serve.ts';
import { TargetControlServer } from './target-control.ts';

const EMBEDDED_IQN = 'iqn.2026-11.io.detour:main';
const VOLUME = 'vol1';
const GiB = 1024 ** 3;

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/**
 * `npm start`: the whole product on embedded defaults, no config and no system packages. An
 * embedded file-backed main target (1 GiB sparse under ./data) on 127.0.0.1:3261, detour on
 * 127.0.0.2:3260 in proxy-directed topology driving that target through its control socket, the
 * API on 127.0.0.1:9270 and the backup store in ./data/backups.
 */
export const startCommand: Command = async (argv) => {
  const { values, positionals } = parseCommandArgs(argv, { 'data-dir': { type: 'string', default: './data' } });
  if (positionals.length) throw new UsageError(`unexpected argument '${positionals[0]}'`);
  const dataDir = path.resolve(values['data-dir']!);
  fs.mkdirSync(dataDir, { recursive: true });
  const log = createLogger('detour');
  const image = path.join(dataDir, 'main.img');
  const socket = path.join(dataDir, 'main-target.sock');

  const device = new EmbeddedTarget({ targetName: EMBEDDED_IQN, luns: [{ lun: 0, file: image, size: GiB }] });
  await device.open();
  const target = { name: EMBEDDED_IQN, portalGroupTag: 1, device };
  const mainPortal = new Portal({ host: '127.0.0.1', port: 3261, logger: log.child({ component: 'embedded-target' }), targets: [target] });
  const control = new TargetControlServer(mainPortal, target);
  try {
    await mainPortal.listen();
    await control.listen(socket);
  } catch (err) {
    await device.close();
    process.stderr.write(`detour start: cannot start the embedded target on 127.0.0.1:3261: ${(err as Error).message}\n`);
    return 1;
  }

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
        main: '127.0.0.1:3261',
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
  fs.writeFileSync(configFile, `# Written by \`detour start\`: the embedded defaults, for reference.\n${YAML.stringify(raw)}`);
  const config = validateConfig(raw, configFile);
  let server;
  try {
    server = await startServer(config, log);
  } catch (err) {
    await control.close();
    await mainPortal.close();
    await device.close();
    process.stderr.write(`detour start: cannot start detour: ${(err as Error).message}\n`);
    return 1;
  }

  process.stderr.write(
    [
      '',
      'detour is running on embedded defaults.',
      `  main target (embedded): ${EMBEDDED_IQN} on 127.0.0.1:3261, 1 GiB sparse image ${image}`,
      `  detour portal:          127.0.0.2:3260 (proxy-directed: logins are redirected to the main target outside a backup)`,
      `  API and metrics:        http://127.0.0.1:9270  (/metrics, /v1/volumes, /v1/backups)`,
      `  backup store:           ${config.backupStore.path}`,
      '',
      'Connect an initiator to detour:',
      '  iscsi-ls -s iscsi://127.0.0.2:3260',
      '  iscsiadm -m discovery -t sendtargets -p 127.0.0.2:3260',
      `  qemu-img info iscsi://127.0.0.2:3260/${EMBEDDED_IQN}/0`,
      `  qemu-io -f raw -c 'write -P 0x5a 0 1M' iscsi://127.0.0.2:3260/${EMBEDDED_IQN}/0`,
      '',
      'Take a backup and restore it:',
      `  npx detour backup start ${VOLUME} --wait`,
      '  npx detour backup list',
      '  npx detour restore <ID> --to-file /tmp/restored.img',
      '',
      'Ctrl-C stops everything.',
      '',
    ].join('\n'),
  );
  await new Promise<void>((resolve) => {
    process.once('SIGINT', () => resolve());
    process.once('SIGTERM', () => resolve());
  });
  log.info('shutting down');
  await server.close();
  await control.close();
  await mainPortal.close();
  await device.close();
  fs.rmSync(socket, { force: true });
  return 0;
};
