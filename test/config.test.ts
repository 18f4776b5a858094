import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError, loadConfig, validateConfig } from '../src/control/config.ts';

const repoRoot = path.resolve(import.meta.dirname, '..');
const FILE = '/etc/detour/detour.yaml';

function volume(over: Record<string, unknown> = {}): Record<string, unknown> {
  return { name: 'vol1', target: 'iqn.2026-11.test:main', main: '127.0.0.1:3261', topology: 'proxy-directed', ...over };
}

/** The message validateConfig throws for `raw` (and fails the test when it accepts it). */
function problem(raw: unknown, env: Record<string, string> = {}): string {
  try {
    validateConfig(raw, FILE, env);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return (err as Error).message;
  }
  throw new Error(`accepted: ${JSON.stringify(raw)} with ${JSON.stringify(env)}`);
}

describe('config errors: one per kind of mistake, naming the file, the key path and the problem', () => {
  it('unknown keys, at the top and nested', () => {
    expect(problem({ volumes: [volume()], portl: '127.0.0.2:3260' })).toBe(`${FILE}: portl: unknown key`);
    expect(problem({ volumes: [volume({ ioTimeout: '5s' })] })).toBe(`${FILE}: volumes[0].ioTimeout: unknown key`);
    expect(problem({ volumes: [volume({ control: { type: 'tgt', tid: 1, port: 3 } })] })).toBe(`${FILE}: volumes[0].control.port: unknown key`);
    expect(problem({ volumes: [volume()], backupStore: { path: './b', size: '1G' } })).toBe(`${FILE}: backupStore.size: unknown key`);
  });

  it('values of the wrong type', () => {
    expect(problem({ volumes: [volume()], dataDir: 5 })).toBe(`${FILE}: dataDir: Invalid input: expected string, received number`);
    expect(problem({ volumes: [volume({ control: { type: 'tgt', tid: 'one' } })] })).toBe(
      `${FILE}: volumes[0].control.tid: Invalid input: expected number, received string`,
    );
    expect(problem({ volumes: { name: 'vol1' } })).toBe(`${FILE}: volumes: Invalid input: expected array, received object`);
    expect(problem(['portal'])).toBe(`${FILE}: (top level): Invalid input: expected object, received array`);
  });

  it('bad durations', () => {
    expect(problem({ volumes: [volume({ ioTimeoutBudget: '5 parsecs' })] })).toBe(
      `${FILE}: volumes[0].ioTimeoutBudget: '5 parsecs' is not a duration (examples: 5s, 500ms, 2m)`,
    );
    expect(problem({ volumes: [volume({ ioTimeoutBudget: -1 })] })).toMatch(/volumes\[0\]\.ioTimeoutBudget: '-1' is not a duration/);
  });

  it('bad sizes', () => {
    expect(problem({ volumes: [volume({ copyRateLimit: 'lots' })] })).toBe(`${FILE}: volumes[0].copyRateLimit: 'lots' is not a size (examples: 50M, 1G, 1048576)`);
    expect(problem({ volumes: [volume({ copyRateLimit: 0 })] })).toMatch(/volumes\[0\]\.copyRateLimit: '0' is not a size/);
  });

  it('a bad topology, a bad control type', () => {
    expect(problem({ volumes: [volume({ topology: 'sideways' })] })).toBe(
      `${FILE}: volumes[0].topology: Invalid option: expected one of "inline"|"proxy-directed"|"main-directed"`,
    );
    expect(problem({ volumes: [volume({ control: { type: 'ssh' } })] })).toMatch(/^\/etc\/detour\/detour\.yaml: volumes\[0\]\.control\.type: .*'tgt' \| 'exec' \| 'none'/);
  });

  it('missing required keys', () => {
    expect(problem({})).toBe(`${FILE}: volumes: is required`);
    expect(problem(null)).toBe(`${FILE}: volumes: is required`);
    expect(problem({ volumes: [] })).toBe(`${FILE}: volumes: at least one volume is required`);
    const { target: _t, ...noTarget } = volume();
    expect(problem({ volumes: [noTarget] })).toBe(`${FILE}: volumes[0].target: is required`);
    expect(problem({ volumes: [volume({ control: { type: 'tgt' } })] })).toBe(`${FILE}: volumes[0].control.tid: is required`);
    expect(problem({ volumes: [volume({ control: { type: 'exec', redirectOn: 'a', redirectOff: 'b', kick: 'c' } })] })).toBe(
      `${FILE}: volumes[0].control.list: is required`,
    );
  });

  it('bad addresses and names', () => {
    expect(problem({ volumes: [volume({ main: '127.0.0.1:99999' })] })).toBe(`${FILE}: volumes[0].main: '127.0.0.1:99999' is not host:port`);
    expect(problem({ volumes: [volume()], portal: 'a b' })).toBe(`${FILE}: portal: 'a b' is not host:port`);
    expect(problem({ volumes: [volume({ target: 'main' })] })).toMatch(/volumes\[0\]\.target: is not an iSCSI name/);
    expect(problem({ volumes: [volume({ name: '../etc' })] })).toMatch(/volumes\[0\]\.name: must be 1-63 letters/);
  });

  it('a duplicate volume name', () => {
    expect(problem({ volumes: [volume(), volume({ target: 'iqn.2026-11.test:other' })] })).toBe(`${FILE}: volumes[1].name: volume name 'vol1' is used twice`);
  });

  it('journal spare space larger than the journal may be', () => {
    expect(problem({ volumes: [volume({ journalCapacity: '1G', journalSpare: '2G' })] })).toBe(`${FILE}: volumes[0].journalSpare: must not be more than journalCapacity: a journal never holds more`);
    expect(problem({ volumes: [volume({ journalSpare: 'plenty' })] })).toMatch(/volumes\[0\]\.journalSpare: 'plenty' is not a size/);
    expect(validateConfig({ volumes: [volume({ journalCapacity: '8G', journalSpare: '8G' })] }, FILE).volumes[0]!.journalSpare).toBe(8 * 1024 ** 3);
  });

  it('a token too short to be a secret', () => {
    expect(problem({ volumes: [volume()], token: 'short' })).toBe(`${FILE}: token: must be at least 16 characters`);
  });
});

describe('DETOUR_* environment overrides', () => {
  it('override the file, with paths from the environment relative to the current directory', () => {
    const c = validateConfig({ volumes: [volume()], portal: '127.0.0.2:3260', dataDir: './state' }, FILE, {
      DETOUR_PORTAL: '127.0.0.3:3262',
      DETOUR_API: '127.0.0.1:9271',
      DETOUR_DATA_DIR: 'var/detour',
      DETOUR_TOKEN: 'a-token-of-sixteen-or-more',
    });
    expect(c.portal).toEqual({ host: '127.0.0.3', port: 3262 });
    expect(c.api).toEqual({ host: '127.0.0.1', port: 9271 });
    expect(c.dataDir).toBe(path.resolve(process.cwd(), 'var/detour'));
    expect(c.backupStore.path).toBe(path.join(path.resolve(process.cwd(), 'var/detour'), 'backups'));
    expect(c.token).toBe('a-token-of-sixteen-or-more');

    const file = validateConfig({ volumes: [volume()], dataDir: './state', backupStore: { path: '/srv/backups' } }, FILE, {});
    expect(file.dataDir).toBe('/etc/detour/state');
    expect(file.backupStore.path).toBe('/srv/backups');
    const store = validateConfig({ volumes: [volume()], backupStore: { path: '/srv/backups' } }, FILE, { DETOUR_BACKUP_STORE_PATH: 'b' });
    expect(store.backupStore.path).toBe(path.resolve(process.cwd(), 'b'));
  });

  it('DETOUR_API takes the client form http://host:port as well as host:port', () => {
    const url = (v: string) => validateConfig({ volumes: [volume()] }, FILE, { DETOUR_API: v }).api;
    expect(url('http://127.0.0.1:9275')).toEqual({ host: '127.0.0.1', port: 9275 });
    expect(url('http://127.0.0.1:9275/')).toEqual({ host: '127.0.0.1', port: 9275 });
    expect(url('http://[::1]:9276')).toEqual({ host: '::1', port: 9276 });
    expect(url('http://localhost')).toEqual({ host: 'localhost', port: 80 });
    expect(url('[::1]:9277')).toEqual({ host: '::1', port: 9277 });
  });

  it('an empty variable counts as unset, and the defaults stay without any', () => {
    const c = validateConfig({ volumes: [volume()] }, FILE, { DETOUR_PORTAL: '', DETOUR_TOKEN: '' });
    expect(c.portal).toEqual({ host: '127.0.0.2', port: 3260 });
    expect(c.api).toEqual({ host: '127.0.0.1', port: 9270 });
    expect(c.token).toBeUndefined();
  });

  it('bad values name the variable and the key they override', () => {
    expect(problem({ volumes: [volume()] }, { DETOUR_PORTAL: 'nowhere:99999' })).toBe(`DETOUR_PORTAL (environment): portal: 'nowhere:99999' is not host:port`);
    expect(problem({ volumes: [volume()] }, { DETOUR_API: 'https://127.0.0.1:9270' })).toBe(
      `DETOUR_API (environment): api: 'https://127.0.0.1:9270': detour serves its API over plain http (use host:port or http://host:port)`,
    );
    expect(problem({ volumes: [volume()] }, { DETOUR_API: 'http://127.0.0.1:9270/v1' })).toBe(`DETOUR_API (environment): api: 'http://127.0.0.1:9270/v1' must be just http://host:port`);
    expect(problem({ volumes: [volume()] }, { DETOUR_API: 'http://[::1' })).toBe(`DETOUR_API (environment): api: 'http://[::1' is not host:port or http://host:port`);
    // The token's own value never appears in the message.
    const token = problem({ volumes: [volume()] }, { DETOUR_TOKEN: 'tiny-secret' });
    expect(token).toBe('DETOUR_TOKEN (environment): token: must be at least 16 characters');
    expect(token).not.toContain('tiny-secret');
  });

  it('errors in the file still name the file when the environment overrides other keys', () => {
    expect(problem({ volumes: [volume({ topology: 'x' })] }, { DETOUR_PORTAL: '127.0.0.2:3260' })).toMatch(/^\/etc\/detour\/detour\.yaml: volumes\[0\]\.topology:/);
  });
});

describe('config files and `detour serve` start-up refusals', () => {
  let dir: string;
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'detour-config-'));
  });
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  const write = (name: string, text: string) => {
    const f = path.join(dir, name);
    fs.writeFileSync(f, text);
    return f;
  };
  const yamlVolume = `volumes:\n  - name: vol1\n    target: iqn.2026-11.test:main\n    main: 127.0.0.1:1\n    topology: proxy-directed\n`;

  it('reads YAML, resolving relative paths against the file', () => {
    const f = write('ok.yaml', `dataDir: ./state\n${yamlVolume}`);
    const c = loadConfig(f, {});
    expect(c.dataDir).toBe(path.join(dir, 'state'));
    expect(c.backupStore.path).toBe(path.join(dir, 'state', 'backups'));
    expect(c.volumes[0]!.ioTimeoutBudget).toBe(5000);
    expect(c.volumes[0]!.control).toEqual({ type: 'none' });
  });

  it('reports YAML syntax errors and unreadable files', () => {
    const bad = write('bad.yaml', 'volumes: [\n  - name: x\n');
    expect(() => loadConfig(bad, {})).toThrow(new RegExp(`^${bad.replace(/[.]/g, '\\.')}: \\(top level\\): not valid YAML: `));
    const missing = path.join(dir, 'nope.yaml');
    expect(() => loadConfig(missing, {})).toThrow(/nope\.yaml: \(top level\): cannot read: ENOENT/);
  });

  function serve(args: string[], env: Record<string, string>): Promise<{ code: number; stdout: string; stderr: string }> {
    const base = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('DETOUR_')));
    return new Promise((resolve) => {
      execFile(process.execPath, [path.join(repoRoot, 'bin/detour.js'), 'serve', ...args], { cwd: dir, env: { ...base, ...env }, timeout: 30_000 }, (err, stdout, stderr) => {
        resolve({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout, stderr });
      });
    });
  }

  it('refuses a non-loopback portal or API without a token, from the file or the environment; bad env values stop it too', async () => {
    const wide = write('wide.yaml', `portal: 0.0.0.0:3260\n${yamlVolume}`);
    const local = write('local.yaml', `portal: 127.0.0.2:1\napi: 127.0.0.1:1\n${yamlVolume}`);
    const [fromFile, fromEnv, badEnv, badLevel, badFormat, badFlag, badYaml] = await Promise.all([
      serve(['--config', wide], {}),
      serve(['--config', local], { DETOUR_API: 'http://0.0.0.0:9270' }),
      serve(['--config', local], { DETOUR_DATA_DIR: '', DETOUR_PORTAL: '127.0.0.2:http' }),
      serve(['--config', local], { DETOUR_LOG_LEVEL: 'loud' }),
      serve(['--config', local], { DETOUR_LOG_FORMAT: 'fancy' }),
      serve(['--config', local, '--log-format', 'xml'], {}),
      serve(['--config', write('typo.yaml', `${yamlVolume}    ioTimeoutBudget: soon\n`)], {}),
    ]);
    expect(fromFile.code).toBe(1);
    expect(fromFile.stderr).toBe(`detour serve: ${wide}: token: required when the portal or the API listens on a non-loopback address (set token, or DETOUR_TOKEN)\n`);
    expect(fromEnv.code).toBe(1);
    expect(fromEnv.stderr).toMatch(/^detour serve: .*token: required when the portal or the API listens on a non-loopback address/);
    expect(badEnv.code).toBe(1);
    expect(badEnv.stderr).toBe(`detour serve: DETOUR_PORTAL (environment): portal: '127.0.0.2:http' is not host:port\n`);
    expect(badLevel.code).toBe(2);
    expect(badLevel.stderr).toBe(`detour serve: DETOUR_LOG_LEVEL (environment): 'loud' is not a log level (fatal, error, warn, info, debug, trace, silent)\n`);
    expect(badFormat.code).toBe(2);
    expect(badFormat.stderr).toBe(`detour serve: DETOUR_LOG_FORMAT (environment): 'fancy' is not a log format (json, pretty)\n`);
    expect(badFlag.code).toBe(2);
    expect(badFlag.stderr).toBe(`detour serve: --log-format: 'xml' is not a log format (json, pretty)\n`);
    expect(badYaml.code).toBe(1);
    expect(badYaml.stderr).toMatch(/^detour serve: .*typo\.yaml: volumes\[0\]\.ioTimeoutBudget: 'soon' is not a duration/);
    for (const r of [fromFile, fromEnv, badEnv, badLevel, badFormat, badFlag, badYaml]) {
      expect(r.stdout).toBe('');
      expect(r.stderr).not.toMatch(/\n\s+at /);
    }
  });
});
