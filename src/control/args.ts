import { parseArgs, type ParseArgsConfig } from 'node:util';
import { UsageError } from './cli.ts';
import { parseSizeValue } from './config.ts';

/** node:util parseArgs, with its errors turned into usage errors (exit 2, no stack trace). */
export function parseCommandArgs<T extends ParseArgsConfig['options']>(argv: string[], options: T, allowPositionals = true) {
  try {
    return parseArgs({ args: argv, options, allowPositionals, strict: true });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
}

/** "1G", "512M", "4096": binary units, as storage administrators write them. */
export function parseSize(text: string, what = 'size'): number {
  const n = parseSizeValue(text);
  if (n === undefined) throw new UsageError(`${what}: '${text}' is not a size (examples: 1G, 512M, 1048576)`);
  if (n <= 0) throw new UsageError(`${what}: '${text}' is out of range`);
  return n;
}

/** "host:port" or "[v6]:port". */
export function parseHostPort(text: string, what = 'address', defaultPort?: number): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]+))(?::(\d+))?$/.exec(text.trim());
  const port = m?.[3] !== undefined ? Number(m[3]) : defaultPort;
  if (!m || port === undefined || !Number.isInteger(port) || port < 0 || port > 65535) {
    throw new UsageError(`${what}: '${text}' is not host:port`);
  }
  return { host: (m[1] ?? m[2])!, port };
}
