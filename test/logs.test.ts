import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InitiatorSession } from '../src/back/index.ts';
import { Portal } from '../src/front/portal.ts';
import { EmbeddedTarget } from '../src/scsi/embedded-target.ts';
import { createLogger, formatPretty, LogSettingsError, resolveLogSettings } from '../src/control/logger.ts';
import { DetourProcess } from './helpers/detour-process.ts';
import { freePort } from './helpers/ports.ts';

/** A logger whose lines are kept, in the given format, at trace level. */
function capture(format: 'json' | 'pretty', color = false) {
  const lines: string[] = [];
  const logger = createLogger('test', { level: 'trace', format, color, destination: { write: (s) => void lines.push(s) } });
  return { logger, lines, text: () => lines.join('') };
}

describe('log settings', () => {
  it('default to info and JSON; the environment sets them; flags win over the environment', () => {
    expect(resolveLogSettings({}, {})).toEqual({ level: 'info', format: 'json' });
    expect(resolveLogSettings({}, { DETOUR_LOG_LEVEL: 'DEBUG', DETOUR_LOG_FORMAT: 'pretty' })).toEqual({ level: 'debug', format: 'pretty' });
    expect(resolveLogSettings({ 'log-level': 'warn', 'log-format': 'json' }, { DETOUR_LOG_LEVEL: 'debug', DETOUR_LOG_FORMAT: 'pretty' })).toEqual({
      level: 'warn',
      format: 'json',
    });
    expect(resolveLogSettings({}, { DETOUR_LOG_LEVEL: '', DETOUR_LOG_FORMAT: '' })).toEqual({ level: 'info', format: 'json' });
  });

  it('reject bad values, naming the variable or the flag', () => {
    expect(() => resolveLogSettings({}, { DETOUR_LOG_LEVEL: 'loud' })).toThrow(
      new LogSettingsError("DETOUR_LOG_LEVEL (environment): 'loud' is not a log level (fatal, error, warn, info, debug, trace, silent)"),
    );
    expect(() => resolveLogSettings({}, { DETOUR_LOG_FORMAT: 'fancy' })).toThrow("DETOUR_LOG_FORMAT (environment): 'fancy' is not a log format (json, pretty)");
    expect(() => resolveLogSettings({ 'log-format': 'xml' }, {})).toThrow("--log-format: 'xml' is not a log format (json, pretty)");
    expect(() => resolveLogSettings({ 'log-level': 'chatty' }, {})).toThrow(/^--log-level: 'chatty' is not a log level/);
  });
});

describe('log formats', () => {
  it('json: one JSON object per line, with the session and backup fields as given', () => {
    const c = capture('json');
    c.logger.info({ volume: 'vol1', initiator: 'iqn.2026-11.test:host', tsih: 3 }, 'session on detour');
    c.logger.warn({ volume: 'vol1', backupId: 'b1', phase: 'draining', bytes: 4096 }, 'drain round');
    const lines = c.text().split('\n').filter(Boolean);
    expect(lines).toHaveLength(2);
    const [a, b] = lines.map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(a).toMatchObject({ level: 30, name: 'test', msg: 'session on detour', volume: 'vol1', initiator: 'iqn.2026-11.test:host', tsih: 3 });
    expect(b).toMatchObject({ level: 40, msg: 'drain round', backupId: 'b1', phase: 'draining', bytes: 4096 });
    expect(typeof a!.time).toBe('number');
  });

  it('pretty: time, level, message, then volume, initiator, tsih, backupId and phase first; one line per event', () => {
    const c = capture('pretty');
    c.logger.info({ bytes: 4096, phase: 'draining', backupId: 'b1', volume: 'vol1', note: 'two words' }, 'drain round');
    c.logger.error({ err: new Error('main target went away\nat drain'), volume: 'vol1' }, 'backup failed');
    c.logger.debug({ text: 'a\nb' }, 'multi\nline message');
    expect(c.lines).toHaveLength(3);
    for (const l of c.lines) {
      expect(l.endsWith('\n')).toBe(true);
      expect(l.slice(0, -1)).not.toContain('\n');
    }
    expect(c.lines[0]).toMatch(/^\d\d:\d\d:\d\d\.\d{3} INFO  drain round  volume=vol1 backupId=b1 phase=draining bytes=4096 note="two words"\n$/);
    expect(c.lines[1]).toMatch(/^\d\d:\d\d:\d\d\.\d{3} ERROR backup failed  volume=vol1 err="main target went away\\nat drain"\n$/);
    expect(c.lines[2]).toMatch(/^\d\d:\d\d:\d\d\.\d{3} DEBUG multi\\nline message  text="a\\nb"\n$/);
    // No colour unless asked for (a terminal); with colour, the level is wrapped in ANSI codes.
    expect(c.text()).not.toContain('\x1b[');
    const coloured = capture('pretty', true);
    coloured.logger.warn('careful');
    expect(coloured.lines[0]).toMatch(/^\d\d:\d\d:\d\d\.\d{3} \x1b\[33mWARN \x1b\[0m careful\n$/);
  });

  it('pretty formatting keeps a line that is not JSON as it is', () => {
    expect(formatPretty('not json\n')).toBe('not json');
    expect(formatPretty(JSON.stringify({ level: 50, time: Date.UTC(2026, 10, 3), msg: 'x', pid: 1, hostname: 'h', name: 'n' }))).toMatch(/^\d\d:\d\d:\d\d\.000 ERROR x$/);
  });
});

describe('no secrets in logs', () => {
  const CHAP_SECRET = 'chap-initiator-secret-7f3a';
  const MUTUAL_SECRET = 'chap-target-secret-91bc';
  const WRONG_SECRET = 'wrong-initiator-secret-55d0';
  const TOKEN = 'api-bearer-token-e4c2d9a7b1';

  it('redacts credential-named fields in both formats', () => {
    for (const format of ['json', 'pretty'] as const) {
      const c = capture(format);
      c.logger.info(
        { secret: 's1', password: 's2', token: 's3', chap: { user: 'u', secret: 's4' }, req: { headers: { authorization: 'Bearer s5' } }, target: { mutualChap: { secret: 's6' } } },
        'credentials passed by mistake',
      );
      const text = c.text();
      for (const s of ['s1', 's2', 's3', 's4', 'Bearer s5', 's6']) expect(text, `${format} ${s}`).not.toMatch(new RegExp(`[":=]${s}\\b`));
      expect(text).toContain('[redacted]');
      expect(text).toContain('u');
    }
  });

  describe('CHAP logins, good and bad, logged at trace level on both sides', () => {
    let dir: string;
    let device: EmbeddedTarget;
    let portal: Portal;
    const json = capture('json');
    const pretty = capture('pretty');

    beforeAll(async () => {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'detour-logs-'));
      device = new EmbeddedTarget({ targetName: 'iqn.2026-11.test:chap', luns: [{ lun: 0, file: path.join(dir, 'lun.img'), size: 1 << 20 }] });
      await device.open();
      const target = {
        name: 'iqn.2026-11.test:chap',
        portalGroupTag: 1,
        device,
        chap: { user: 'host-user', secret: CHAP_SECRET },
        mutualChap: { user: 'target-user', secret: MUTUAL_SECRET },
      };
      portal = new Portal({ host: '127.0.0.1', port: 0, logger: json.logger, targets: [target] });
      await portal.listen();
    });
    afterAll(async () => {
      await portal?.close();
      await device?.close();
      fs.rmSync(dir, { recursive: true, force: true });
    });

    it('never writes a CHAP secret', async () => {
      const address = `127.0.0.1:${portal.port}`;
      for (const logger of [json.logger, pretty.logger]) {
        const good = await InitiatorSession.connect({
          portal: address,
          targetName: 'iqn.2026-11.test:chap',
          initiatorName: 'iqn.2026-11.test:host',
          chap: { user: 'host-user', secret: CHAP_SECRET, mutual: { user: 'target-user', secret: MUTUAL_SECRET } },
          reconnect: false,
          logger,
        });
        // A command in full feature phase: the session is really up.
        const inquiry = await good.inquiry(0);
        expect(inquiry[0]! & 0x1f).toBe(0);
        await good.logout();
        await expect(
          InitiatorSession.connect({
            portal: address,
            targetName: 'iqn.2026-11.test:chap',
            initiatorName: 'iqn.2026-11.test:host',
            chap: { user: 'host-user', secret: WRONG_SECRET },
            reconnect: false,
            logger,
          }),
        ).rejects.toThrow();
      }
      // Both sides logged the logins, the refusal included.
      const all = json.text() + pretty.text();
      expect(json.text()).toContain('"msg":"login"');
      expect(json.text()).toContain('"msg":"login refused"');
      expect(pretty.lines.length).toBeGreaterThan(0);
      for (const secret of [CHAP_SECRET, MUTUAL_SECRET, WRONG_SECRET]) expect(all).not.toContain(secret);
    });
  });

  describe('detour serve with a token, pretty logs at trace level', () => {
    let proc: DetourProcess;
    let api: string;
    let dir: string;

    beforeAll(async () => {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'detour-logs-serve-'));
      const portalPort = await freePort('127.0.0.2');
      const apiPort = await freePort('127.0.0.1');
      const config = path.join(dir, 'detour.yaml');
      // The main target is not there: detour starts anyway and serves its API.
      fs.writeFileSync(
        config,
        `portal: 127.0.0.2:${portalPort}\ndataDir: ./data\nvolumes:\n  - name: vol1\n    target: iqn.2026-11.test:main\n    main: 127.0.0.1:1\n    topology: proxy-directed\n`,
      );
      api = `http://127.0.0.1:${apiPort}`;
      proc = await DetourProcess.start(['serve', '--config', config, '--log-level', 'trace'], { host: '127.0.0.1', port: apiPort }, {
        DETOUR_TOKEN: TOKEN,
        DETOUR_API: api,
        DETOUR_LOG_FORMAT: 'pretty',
      });
    });
    afterAll(async () => {
      await proc?.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    });

    it('never writes the API token, whatever the requests carry', async () => {
      const auth = (t: string) => ({ headers: { Authorization: `Bearer ${t}` } });
      expect((await fetch(`${api}/v1/volumes`)).status).toBe(401);
      expect((await fetch(`${api}/v1/volumes`, auth(`${TOKEN}x`))).status).toBe(401);
      expect((await fetch(`${api}/v1/volumes`, auth(TOKEN))).status).toBe(200);
      expect((await fetch(`${api}/v1/volumes?token=${TOKEN}`, auth(TOKEN))).status).toBe(200);
      const b = await fetch(`${api}/v1/volumes/vol1/backups`, { method: 'POST', body: JSON.stringify({ label: 'x' }), ...auth(TOKEN) });
      // The main target is unreachable: the backup cannot start, and that is logged.
      expect(b.status).toBe(500);
      const code = await proc.stop();
      expect(code).toBe(0);
      const out = proc.output;
      expect(out).toMatch(/^\d\d:\d\d:\d\d\.\d{3} INFO  API listening  api=127\.0\.0\.1:\d+ auth=bearer$/m);
      expect(out).toMatch(/^\d\d:\d\d:\d\d\.\d{3} DEBUG API request  method=GET path=\/v1\/volumes status=401/m);
      expect(out).toMatch(/ERROR API request failed/);
      expect(out).not.toMatch(/^\{/m);
      expect(out).not.toContain(TOKEN);
    });
  });
});
