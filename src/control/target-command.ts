import fs from 'node:fs';
import path from 'node:path';
import type { Command } from './cli.ts';
import { UsageError } from './cli.ts';
import { parseCommandArgs, parseHostPort, parseSize } from './args.ts';
import { createLogger, LOG_HELP, LOG_OPTIONS, resolveLogSettings } from './logger.ts';
import { EmbeddedTarget } from '../scsi/embedded-target.ts';
import { Portal } from '../front/portal.ts';
import { TargetControlServer } from './target-control.ts';

export const TARGET_USAGE = 'target --file IMG [--size 1G] [--listen 127.0.0.1:3261] [--iqn IQN] [--lun 0] [--block-size 512] [--control-socket PATH] [--log-level L] [--log-format json|pretty]';

/** An IQN derived from the image name, so the same image keeps the same target name. */
export function defaultIqn(file: string): string {
  const base = path.basename(file).replace(/\.[^.]*$/, '').toLowerCase().replace(/[^a-z0-9.-]+/g, '-').replace(/^-+|-+$/g, '');
  return `iqn.2026-11.io.detour:${base || 'disk'}`;
}

function checkIqn(iqn: string): void {
  if (!/^(iqn\.\d{4}-\d{2}\.[^\s:]+(:[^\s]+)?|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$/.test(iqn) || iqn.length > 223) {
    throw new UsageError(`--iqn: '${iqn}' is not an iSCSI name (iqn.YYYY-MM.reversed.domain[:name], eui., naa.)`);
  }
}

export const targetCommand: Command = async (argv) => {
  const { values, positionals } = parseCommandArgs(argv, {
    file: { type: 'string' },
    size: { type: 'string' },
    listen: { type: 'string', default: '127.0.0.1:3261' },
    iqn: { type: 'string' },
    lun: { type: 'string', default: '0' },
    'block-size': { type: 'string', default: '512' },
    'control-socket': { type: 'string' },
    help: { type: 'boolean', short: 'h' },
    ...LOG_OPTIONS,
  });
  if (values.help) {
    process.stdout.write(`usage: detour ${TARGET_USAGE}\n${LOG_HELP}\n`);
    return 0;
  }
  const logSettings = resolveLogSettings(values);
  if (positionals.length) throw new UsageError(`unexpected argument '${positionals[0]}'`);
  if (!values.file) throw new UsageError('--file IMG is required');
  const file = path.resolve(values.file);
  const listen = parseHostPort(values.listen!, '--listen', 3260);
  const iqn = values.iqn ?? defaultIqn(file);
  checkIqn(iqn);
  const lun = Number(values.lun);
  if (!Number.isInteger(lun) || lun < 0 || lun > 16383) throw new UsageError(`--lun: '${values.lun}' is not a LUN (0..16383)`);
  const blockSize = Number(values['block-size']);
  if (![512, 1024, 2048, 4096].includes(blockSize)) throw new UsageError(`--block-size: '${values['block-size']}' must be 512, 1024, 2048 or 4096`);
  let size = values.size !== undefined ? parseSize(values.size, '--size') : undefined;
  const exists = fs.existsSync(file);
  if (!exists && size === undefined) size = 1024 ** 3;
  if (exists && fs.statSync(file).isDirectory()) throw new UsageError(`--file: ${file} is a directory`);
  if (size !== undefined && size % blockSize !== 0) throw new UsageError(`--size: ${size} bytes is not a multiple of the ${blockSize}-byte block`);

  const log = createLogger('detour-target', logSettings);
  const device = new EmbeddedTarget({ targetName: iqn, luns: [{ lun, file, size, blockSize }] });
  await device.open();
  const target = { name: iqn, portalGroupTag: 1, device };
  const portal = new Portal({ host: listen.host, port: listen.port, logger: log, targets: [target] });
  const control = values['control-socket'] ? new TargetControlServer(portal, target) : undefined;
  try {
    await portal.listen();
  } catch (err) {
    await device.close();
    process.stderr.write(`detour target: cannot listen on ${values.listen}: ${(err as Error).message}\n`);
    return 1;
  }
  if (control) await control.listen(path.resolve(values['control-socket']!));
  log.info({ target: iqn, file, lun, portal: portal.address }, 'embedded target ready');
  await new Promise<void>((resolve) => {
    const stop = (signal: string) => {
      log.info({ signal }, 'shutting down');
      resolve();
    };
    process.once('SIGINT', () => stop('SIGINT'));
    process.once('SIGTERM', () => stop('SIGTERM'));
  });
  await control?.close();
  await portal.close();
  await device.close();
  return 0;
};
