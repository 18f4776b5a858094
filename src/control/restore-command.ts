import path from 'node:path';
import type { Command } from './cli.ts';
import { UsageError } from './cli.ts';
import { parseCommandArgs } from './args.ts';
import { ConfigError, loadConfig } from './config.ts';
import { BackupStore, BackupStoreError, isValidBackupId } from '../store/backup-store.ts';

export const RESTORE_USAGE = 'restore ID --to-file PATH [--store DIR | --config FILE] [--json]';

/** Where the store is when neither --store nor --config says: the serve defaults, env included. */
function defaultStore(): string {
  const env = process.env;
  if (env.DETOUR_BACKUP_STORE_PATH) return env.DETOUR_BACKUP_STORE_PATH;
  if (env.DETOUR_DATA_DIR) return path.join(env.DETOUR_DATA_DIR, 'backups');
  return './data/backups';
}

const HELP = `usage: detour ${RESTORE_USAGE}

Writes backup ID's full raw image to PATH: a new or existing regular file (replaced only once the
whole image has verified), or a block device (written in place). Every chunk is checked against
its SHA-256, and the image against the backup's SHA-256.

  --to-file PATH    where to write the image
  --store DIR       the backup store (default $DETOUR_BACKUP_STORE_PATH, else
                    $DETOUR_DATA_DIR/backups, else ./data/backups)
  --config FILE     take the store from the config file's backupStore.path
  --json            print the result as one JSON object
  --api, --token    accepted for symmetry with the other client commands; restore reads the
                    store directly for now

Exit status: 0 restored, 1 failed, 2 bad arguments.
`;

export const restoreCommand: Command = async (argv) => {
  const { values, positionals } = parseCommandArgs(argv, {
    'to-file': { type: 'string' },
    store: { type: 'string' },
    config: { type: 'string' },
    json: { type: 'boolean' },
    api: { type: 'string' },
    token: { type: 'string' },
    help: { type: 'boolean', short: 'h' },
  });
  if (values.help) {
    process.stdout.write(HELP);
    return 0;
  }
  if (positionals.length === 0) throw new UsageError(`a backup ID is required\nusage: detour ${RESTORE_USAGE}`);
  if (positionals.length > 1) throw new UsageError(`unexpected argument '${positionals[1]}'`);
  const id = positionals[0]!;
  if (!isValidBackupId(id)) throw new UsageError(`'${id}' is not a backup ID (letters, digits, '.', '_', '-'; no '/' or '..')`);
  if (!values['to-file']) throw new UsageError(`--to-file PATH is required\nusage: detour ${RESTORE_USAGE}`);
  if (values.store !== undefined && values.config !== undefined) throw new UsageError('give --store or --config, not both');

  let storePath = path.resolve(values.store ?? defaultStore());
  if (values.config !== undefined) {
    try {
      storePath = loadConfig(values.config).backupStore.path;
    } catch (err) {
      if (!(err instanceof ConfigError)) throw err;
      process.stderr.write(`detour restore: ${err.message}\n`);
      return 1;
    }
  }

  const store = new BackupStore(storePath);
  const showProgress = !values.json && process.stderr.isTTY;
  let lastPercent = -1;
  try {
    const result = await store.restoreToFile(id, values['to-file'], {
      onProgress: showProgress
        ? (done, total) => {
            const percent = Math.floor((done / total) * 100);
            if (percent !== lastPercent) process.stderr.write(`\rrestoring ${id}: ${percent}%`);
            lastPercent = percent;
          }
        : undefined,
    });
    if (showProgress) process.stderr.write('\n');
    if (values.json) {
      process.stdout.write(JSON.stringify({ id: result.id, path: result.path, bytes: result.bytes, sha256: result.sha256 }) + '\n');
    } else {
      process.stdout.write(`restored ${result.id} to ${result.path}: ${result.bytes} bytes, sha256 ${result.sha256}\n`);
    }
    return 0;
  } catch (err) {
    if (showProgress) process.stderr.write('\n');
    const message = err instanceof BackupStoreError ? err.message : `backup ${id}: ${(err as Error).message}`;
    process.stderr.write(`detour restore: ${message}\n`);
    return 1;
  }
};
