import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { promisify } from 'node:util';

const run = promisify(execFile);

/**
 * A tmpfs of `bytes` mounted at `dir` (created): a file system of its own that really fills up
 * (ENOSPC). Needs root. Resolves to the function that unmounts it.
 */
export async function mountTmpfs(dir: string, bytes: number): Promise<() => Promise<void>> {
  fs.mkdirSync(dir, { recursive: true });
  try {
    await run('mount', ['-t', 'tmpfs', '-o', `size=${bytes}`, 'tmpfs', dir]);
  } catch (err) {
    throw new Error(`this test mounts a small tmpfs at ${dir}, which needs root (CAP_SYS_ADMIN): ${(err as Error).message}`);
  }
  return async () => {
    await run('umount', ['-l', dir]);
  };
}
