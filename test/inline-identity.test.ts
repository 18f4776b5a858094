// Acceptance: through detour's inline topology the main target's identity is unchanged. libiscsi's
// own tools (iscsi-inq, iscsi-readcapacity16, iscsi-ls) must print exactly what they print against
// tgtd directly, and the raw parameter data of the identity commands must be byte-identical. An
// initiator that compares device identities (multipath, a restore's identity check) would
// otherwise see a different disk behind the proxy.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildInquiry, buildModeSense6, buildModeSense10, buildReadCapacity10, buildReadCapacity16, buildReportLuns, buildTestUnitReady } from 'iscsi-node-wire';
import { InitiatorSession, type ScsiResult } from '../src/back/index.ts';
import { DetourProcess } from './helpers/detour-process.ts';
import { freePort } from './helpers/ports.ts';
import { Tgtd, type TgtTarget } from './helpers/tgtd.ts';

const PROXY_HOST = '127.0.0.2';
const RAW_INITIATOR = 'iqn.2026-11.test:identity-raw';
const GOOD = 0;

interface Stack {
  work: string;
  tgtd: Tgtd;
  proxy: DetourProcess;
  proxyPortal: string;
  iqn: string;
}


/** tgtd on 127.0.0.1 with one target, and `detour serve` on 127.0.0.2 in front of it, inline. */
async function startStack(name: string, target: Omit<TgtTarget, 'luns'> & { luns: Array<{ lun: number; size: number }> }): Promise<Stack> {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), `detour-identity-${name}-`));
  const tgtd = await Tgtd.start({
    targets: [{ ...target, luns: target.luns.map((l) => ({ lun: l.lun, size: l.size, file: path.join(work, `lun${l.lun}.img`) })) }],
  });
  const port = await freePort(PROXY_HOST);
  const config = path.join(work, 'detour.yaml');
  fs.writeFileSync(
    config,
    [
      `portal: ${PROXY_HOST}:${port}`,
      `api: 127.0.0.1:${await freePort()}`,
      `dataDir: ${path.join(work, 'data')}`,
      'volumes:',
      '  - name: vol1',
      `    target: ${target.iqn}`,
      `    main: ${tgtd.portal}`,
      '    topology: inline',
      '',
    ].join('\n'),
  );
  let proxy: DetourProcess;
  try {
    proxy = await DetourProcess.start(['serve', '--config', config], { host: PROXY_HOST, port });
  } catch (err) {
    await tgtd.stop();
    fs.rmSync(work, { recursive: true, force: true });
    throw err;
  }
  return { work, tgtd, proxy, proxyPortal: `${PROXY_HOST}:${port}`, iqn: target.iqn };
}

async function stopStack(s: Stack | undefined): Promise<void> {
  if (!s) return;
  await s.proxy.stop();
  await s.tgtd.stop();
  fs.rmSync(s.work, { recursive: true, force: true });
}

interface ToolRun {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a libiscsi tool; a non-zero exit is a result to compare, not an exception. */
function tool(cmd: string, args: string[], timeoutMs = 20_000): Promise<ToolRun> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => (stdout += d.toString('latin1')));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString('latin1')));
    const timer = setTimeout(() => p.kill('SIGKILL'), timeoutMs);
    p.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    p.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

// iscsi-inq parses --pagecode as a decimal integer: "-c 0x80" silently becomes page 0, so the
// pages are given in decimal.
const VPD_PAGES: Array<{ page: number; marker: RegExp }> = [
  { page: 0x00, marker: /^Page:0x83 DEVICE_IDENTIFICATION$/m },
  { page: 0x80, marker: /^Unit Serial Number:\[\s*\w+\]$/m },
  { page: 0x83, marker: /^Page Code:\(0x83\) DEVICE_IDENTIFICATION$[\s\S]*^Designator Type:\(1\) T10_VENDORT_ID$/m },
  { page: 0xb0, marker: /^maximum compare and write length:\d+$/m },
  { page: 0xb1, marker: /^Medium Rotation Rate:/m },
  { page: 0xb2, marker: /^provisioning type:\d+$/m },
];

function url(portal: string, iqn: string, lun: number): string {
  return `iscsi://${portal}/${iqn}/${lun}`;
}

/** Runs the same tool against tgtd and through detour; both runs must succeed unless told otherwise. */
async function both(s: Stack, cmd: string, args: (portal: string) => string[]): Promise<{ direct: ToolRun; proxied: ToolRun }> {
  const direct = await tool(cmd, args(s.tgtd.portal));
  const proxied = await tool(cmd, args(s.proxyPortal));
  return { direct, proxied };
}

function identityChecks(label: string, getStack: () => Stack, luns: Array<{ lun: number; size: number }>): void {
  for (const { lun, size } of luns) {
    describe(`${label}: LUN ${lun}`, () => {
      it('standard INQUIRY (iscsi-inq) prints exactly the same', async () => {
        const s = getStack();
        const { direct, proxied } = await both(s, 'iscsi-inq', (p) => [url(p, s.iqn, lun)]);
        expect(direct.code).toBe(0);
        expect(direct.stdout).toMatch(/^Peripheral Device Type:DIRECT_ACCESS$/m);
        expect(direct.stdout).toMatch(/^Vendor:IET\s*$/m);
        expect(proxied.code).toBe(0);
        expect(proxied.stdout).toBe(direct.stdout);
      });

      for (const { page, marker } of VPD_PAGES) {
        it(`VPD page 0x${page.toString(16).padStart(2, '0')} (iscsi-inq -e 1 -c ${page}) prints exactly the same page data`, async () => {
          const s = getStack();
          const { direct, proxied } = await both(s, 'iscsi-inq', (p) => ['-e', '1', '-c', String(page), url(p, s.iqn, lun)]);
          expect(direct.code).toBe(0);
          // The page itself, not the supported-pages list an unparsed page code falls back to.
          expect(direct.stdout).toMatch(marker);
          expect(proxied.code).toBe(0);
          expect(proxied.stdout).toBe(direct.stdout);
        });
      }

      it('iscsi-readcapacity16 prints exactly the same', async () => {
        const s = getStack();
        const { direct, proxied } = await both(s, 'iscsi-readcapacity16', (p) => [url(p, s.iqn, lun)]);
        expect(direct.code).toBe(0);
        expect(direct.stdout).toContain(`Total size:${size}\n`);
        expect(direct.stdout).toContain(`RETURNED LOGICAL BLOCK ADDRESS:${size / 512 - 1}\n`);
        expect(proxied.code).toBe(0);
        expect(proxied.stdout).toBe(direct.stdout);
      });
    });
  }

  describe(`${label}: LUN 0 (tgtd's controller LUN)`, () => {
    it('standard INQUIRY and every VPD page print exactly the same', async () => {
      const s = getStack();
      const { direct, proxied } = await both(s, 'iscsi-inq', (p) => [url(p, s.iqn, 0)]);
      expect(direct.code).toBe(0);
      expect(direct.stdout).toMatch(/^Peripheral Device Type:STORAGE_ARRAY_CONTROLLER$/m);
      expect(proxied).toEqual(direct);
      for (const { page, marker } of VPD_PAGES) {
        const r = await both(s, 'iscsi-inq', (p) => ['-e', '1', '-c', String(page), url(p, s.iqn, 0)]);
        expect(r.direct.code).toBe(0);
        expect(r.direct.stdout).toMatch(marker);
        expect(r.proxied, `VPD page 0x${page.toString(16)}`).toEqual(r.direct);
      }
    });

    it('READ CAPACITY(16), which the controller refuses, fails in exactly the same way', async () => {
      const s = getStack();
      const { direct, proxied } = await both(s, 'iscsi-readcapacity16', (p) => [url(p, s.iqn, 0)]);
      expect(direct.code).not.toBe(0);
      expect(proxied.code).toBe(direct.code);
      expect(proxied.stdout).toBe(direct.stdout);
    });
  });

  describe(`${label}: iscsi-ls -s`, () => {
    it('lists the main target with the same name, LUNs, types and sizes; only the portal differs', async () => {
      const s = getStack();
      const { direct, proxied } = await both(s, 'iscsi-ls', (p) => ['-s', `iscsi://${p}`]);
      expect(direct.code).toBe(0);
      expect(direct.stdout).toContain(`Target:${s.iqn} Portal:${s.tgtd.portal},1\n`);
      for (const { lun, size } of luns) {
        expect(direct.stdout).toMatch(new RegExp(`^Lun:${lun}\\s+Type:DIRECT_ACCESS \\(Size:${Math.floor(size / 2 ** 20) - 1}M\\)$`, 'm'));
      }
      expect(proxied.code).toBe(0);
      expect(proxied.stdout).toContain(`Portal:${s.proxyPortal},`);
      expect(proxied.stdout.replaceAll(s.proxyPortal, s.tgtd.portal)).toBe(direct.stdout);
    });
  });

  describe(`${label}: raw parameter data`, () => {
    // iscsi-inq prints binary designators (NAA) as C strings, cut at the first zero byte; the
    // raw bytes show what it cannot.
    let direct: InitiatorSession | undefined;
    let proxied: InitiatorSession | undefined;

    beforeAll(async () => {
      const s = getStack();
      direct = await InitiatorSession.connect({ portal: s.tgtd.portal, targetName: s.iqn, initiatorName: RAW_INITIATOR, reconnect: false });
      proxied = await InitiatorSession.connect({ portal: s.proxyPortal, targetName: s.iqn, initiatorName: RAW_INITIATOR, reconnect: false });
      // Each new nexus starts with a power-on unit attention per LUN; clear it on both sides so
      // the comparisons below see the same state.
      for (const session of [direct, proxied]) {
        for (const lun of [0, ...luns.map((l) => l.lun)]) {
          for (let i = 0; i < 5; i++) if ((await session.command(lun, buildTestUnitReady())).status === GOOD) break;
        }
      }
    });

    afterAll(async () => {
      for (const s of [direct, proxied]) {
        try {
          await s?.logout();
        } catch {
          s?.close();
        }
      }
    });

    function same(a: ScsiResult, b: ScsiResult): void {
      expect(b.status).toBe(a.status);
      expect(b.sense?.toString('hex')).toBe(a.sense?.toString('hex'));
      expect(b.data?.toString('hex')).toBe(a.data?.toString('hex'));
      expect(b.residual).toEqual(a.residual);
    }

    it('REPORT LUNS lists the same LUNs', async () => {
      const cdb = buildReportLuns(512);
      const a = await direct!.command(0, cdb, { dataInLength: 512 });
      const b = await proxied!.command(0, cdb, { dataInLength: 512 });
      expect(a.status).toBe(GOOD);
      const listed = a.data!.readUInt32BE(0) / 8;
      expect(listed).toBe(luns.length + 1);
      same(a, b);
    });

    for (const lun of [0, ...luns.map((l) => l.lun)]) {
      it(`LUN ${lun}: INQUIRY (standard and VPD), READ CAPACITY and MODE SENSE data are byte-identical`, async () => {
        const cdbs: Array<{ what: string; cdb: Buffer; len: number; mustSucceed: boolean }> = [
          { what: 'standard INQUIRY', cdb: buildInquiry(false, 0, 255), len: 255, mustSucceed: true },
          ...VPD_PAGES.map(({ page }) => ({ what: `VPD 0x${page.toString(16)}`, cdb: buildInquiry(true, page, 1024), len: 1024, mustSucceed: true })),
          { what: 'READ CAPACITY(10)', cdb: buildReadCapacity10(), len: 8, mustSucceed: lun !== 0 },
          { what: 'READ CAPACITY(16)', cdb: buildReadCapacity16(32), len: 32, mustSucceed: lun !== 0 },
          { what: 'MODE SENSE(6) all pages', cdb: buildModeSense6({ page: 0x3f, allocLen: 255 }), len: 255, mustSucceed: lun !== 0 },
          { what: 'MODE SENSE(10) all pages', cdb: buildModeSense10({ page: 0x3f, allocLen: 4096 }), len: 4096, mustSucceed: lun !== 0 },
        ];
        for (const c of cdbs) {
          const a = await direct!.command(lun, c.cdb, { dataInLength: c.len });
          const b = await proxied!.command(lun, c.cdb, { dataInLength: c.len });
          if (c.mustSucceed) {
            expect(a.status, c.what).toBe(GOOD);
            expect(a.data?.length ?? 0, c.what).toBeGreaterThan(0);
          }
          expect({ what: c.what, status: b.status, sense: b.sense?.toString('hex'), data: b.data?.toString('hex'), residual: b.residual }).toEqual({
            what: c.what,
            status: a.status,
            sense: a.sense?.toString('hex'),
            data: a.data?.toString('hex'),
            residual: a.residual,
          });
        }
      });
    }

    it('the device identification page carries the LUN-specific NAA designators', async () => {
      // Two different LUNs must not collapse onto one identity through the proxy.
      const ids = new Set<string>();
      for (const { lun } of luns) {
        const r = await proxied!.command(lun, buildInquiry(true, 0x83, 1024), { dataInLength: 1024 });
        expect(r.status).toBe(GOOD);
        ids.add(r.data!.toString('hex'));
      }
      expect(ids.size).toBe(luns.length);
      same(
        await direct!.command(luns[0]!.lun, buildInquiry(true, 0x83, 1024), { dataInLength: 1024 }),
        await proxied!.command(luns[0]!.lun, buildInquiry(true, 0x83, 1024), { dataInLength: 1024 }),
      );
    });
  });
}

describe('inline identity, one LUN', () => {
  const luns = [{ lun: 1, size: 64 << 20 }];
  let stack: Stack | undefined;
  beforeAll(async () => {
    stack = await startStack('one', { tid: 1, iqn: 'iqn.2026-11.test:identity-one', luns });
  }, 60_000);
  afterAll(async () => stopStack(stack));
  identityChecks('one LUN', () => stack!, luns);
});

describe('inline identity, two LUNs of different sizes', () => {
  // tgtd's own LUN numbering (0 is its controller) and sizes that tell the two disks apart.
  const luns = [
    { lun: 1, size: 40 << 20 },
    { lun: 2, size: 24 << 20 },
  ];
  let stack: Stack | undefined;
  beforeAll(async () => {
    stack = await startStack('two', { tid: 1, iqn: 'iqn.2026-11.test:identity-two', luns });
  }, 60_000);
  afterAll(async () => stopStack(stack));
  identityChecks('two LUNs', () => stack!, luns);
});
