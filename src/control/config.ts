import fs from 'node:fs';
import path from 'node:path';
import YAML from 'yaml';
import { z } from 'zod';

/** A config problem, reported as "<file>: <key path>: <problem>". */
export class ConfigError extends Error {
  constructor(
    readonly file: string,
    readonly keyPath: string,
    readonly problem: string,
  ) {
    super(`${file}: ${keyPath || '(top level)'}: ${problem}`);
  }
}

const DURATION_UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** "5s", "500ms", "2m", or a number of milliseconds. */
export function parseDuration(v: string | number): number | undefined {
  if (typeof v === 'number') return Number.isFinite(v) && v >= 0 ? v : undefined;
  const m = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h)$/.exec(v.trim());
  return m ? Math.round(Number(m[1]) * DURATION_UNITS[m[2]!]!) : undefined;
}

const SIZE_UNITS: Record<string, number> = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 };

/** "1G", "512M", or a number of bytes. */
export function parseSizeValue(v: string | number): number | undefined {
  if (typeof v === 'number') return Number.isSafeInteger(v) && v >= 0 ? v : undefined;
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$/i.exec(v.trim());
  return m ? Math.round(Number(m[1]) * SIZE_UNITS[m[2]!.toLowerCase()]!) : undefined;
}

const duration = z.union([z.string(), z.number()]).transform((v, ctx) => {
  const ms = parseDuration(v);
  if (ms === undefined) {
    ctx.addIssue({ code: 'custom', message: `'${v}' is not a duration (examples: 5s, 500ms, 2m)` });
    return z.NEVER;
  }
  return ms;
});

export interface HostPort {
  host: string;
  port: number;
}

function hostPort(defaultPort: number) {
  return z.string().transform((v, ctx): HostPort => {
    const m = /^(?:\[([^\]]+)\]|([^:\s]+))(?::(\d+))?$/.exec(v.trim());
    const port = m?.[3] !== undefined ? Number(m[3]) : defaultPort;
    if (!m || !Number.isInteger(port) || port < 1 || port > 65535) {
      ctx.addIssue({ code: 'custom', message: `'${v}' is not host:port` });
      return z.NEVER;
    }
    return { host: (m[1] ?? m[2])!, port };
  });
}

const iscsiName = z
  .string()
  .max(223)
  .regex(/^(iqn\.\d{4}-\d{2}\.[^\s:]+(:\S+)?|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$/, 'is not an iSCSI name (iqn.YYYY-MM.domain[:name], eui., naa.)');

const control = z.discriminatedUnion('type', [
  z
    .object({
      type: z.literal('tgt'),
      tid: z.number().int().min(1),
      controlPort: z.number().int().min(0).max(65535).default(0),
    })
    .strict(),
  z
    .object({
      type: z.literal('exec'),
      redirectOn: z.string().min(1),
      redirectOff: z.string().min(1),
      kick: z.string().min(1),
      list: z.string().min(1),
    })
    .strict(),
  z.object({ type: z.literal('none') }).strict(),
]);

/** A byte count with an optional K/M/G/T suffix (powers of 1024): "50M", "1G", or a plain number. */
const byteSize = z.union([z.string(), z.number()]).transform((v, ctx) => {
  const n = parseSizeValue(v);
  if (n === undefined || n === 0) {
    ctx.addIssue({ code: 'custom', message: `'${v}' is not a size (examples: 50M, 1G, 1048576)` });
    return z.NEVER;
  }
  return n;
});

const volume = z
  .object({
    name: z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/, 'must be 1-63 letters, digits, dot, dash or underscore'),
    target: iscsiName,
    main: hostPort(3260),
    topology: z.enum(['inline', 'proxy-directed', 'main-directed']),
    control: control.default({ type: 'none' }),
    ioTimeoutBudget: duration.default(5000),
    // Bytes per second the backup copy may read from the main target ("50M" = 50 MiB/s), so a
    // backup does not starve the main target's other users. Unlimited when absent.
    copyRateLimit: byteSize.optional(),
  })
  .strict();

const schema = z
  .object({
    portal: hostPort(3260).default({ host: '127.0.0.2', port: 3260 }),
    api: hostPort(9270).default({ host: '127.0.0.1', port: 9270 }),
    dataDir: z.string().min(1).default('./data'),
    backupStore: z.object({ path: z.string().min(1) }).strict().optional(),
    token: z.string().min(16, 'must be at least 16 characters').optional(),
    volumes: z.array(volume).min(1, 'at least one volume is required'),
  })
  .strict()
  .superRefine((c, ctx) => {
    const seen = new Set<string>();
    c.volumes.forEach((v, i) => {
      if (seen.has(v.name)) ctx.addIssue({ code: 'custom', path: ['volumes', i, 'name'], message: `volume name '${v.name}' is used twice` });
      seen.add(v.name);
    });
  });

export type DetourConfig = z.output<typeof schema> & { backupStore: { path: string }; file: string };
export type VolumeConfig = DetourConfig['volumes'][number];

function keyPath(p: readonly PropertyKey[]): string {
  return p.map((k, i) => (typeof k === 'number' ? `[${k}]` : i === 0 ? String(k) : `.${String(k)}`)).join('');
}

/**
 * Validates a parsed config object. Relative paths are resolved against the config file's
 * directory, so a config works the same whatever directory detour is started from.
 */
export function validateConfig(raw: unknown, file: string): DetourConfig {
  const r = schema.safeParse(raw ?? {});
  if (!r.success) {
    const issue = r.error.issues[0]!;
    let p = keyPath(issue.path);
    let message = issue.message;
    if (issue.code === 'unrecognized_keys') {
      const keys = (issue as { keys: string[] }).keys;
      p = p ? `${p}.${keys[0]}` : keys[0]!;
      message = 'unknown key';
    } else if (issue.code === 'invalid_type' && /received undefined/i.test(message)) {
      message = 'is required';
    }
    throw new ConfigError(file, p, message);
  }
  const base = path.dirname(path.resolve(file));
  const dataDir = path.resolve(base, r.data.dataDir);
  return {
    ...r.data,
    dataDir,
    backupStore: { path: r.data.backupStore ? path.resolve(base, r.data.backupStore.path) : path.join(dataDir, 'backups') },
    file,
  };
}

export function loadConfig(file: string): DetourConfig {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError(file, '', `cannot read: ${(err as Error).message}`);
  }
  let raw: unknown;
  try {
    raw = YAML.parse(text, { prettyErrors: true });
  } catch (err) {
    throw new ConfigError(file, '', `not valid YAML: ${(err as Error).message.split('\n')[0]}`);
  }
  return validateConfig(raw, file);
}
