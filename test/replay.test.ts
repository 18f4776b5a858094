// Replays every recorded session in the shared captures against a real tgtd configured like the
// one that was recorded, and checks each answer against the recording (status, sense, data,
// keys). This is the harness later work points at detour itself.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Tgtd } from './helpers/tgtd.ts';
import { readCapture } from './replay/capture.ts';
import { replay } from './replay/replay.ts';

const capturesDir = path.resolve(import.meta.dirname, '../../shared/captures');
const RECORDED_PORT = 3290;
/**
 * The order the captures were recorded in, one after the other against the same LUN (captures
 * README). A capture starts from the LUN content its predecessors left, so they are replayed
 * first: iscsi-level reads back the pattern rw-patterns wrote.
 */
const RECORDING_ORDER = ['discovery.pcapng', 'inquiry.pcapng', 'rw-patterns.pcapng', 'chap.pcapng', 'iscsi-level.pcapng'];

function captureFiles(): string[] {
  if (!fs.existsSync(capturesDir)) throw new Error(`the recorded captures are missing: expected them in ${capturesDir}`);
  const files = fs.readdirSync(capturesDir).filter((f) => /\.pcap(ng)?(\.gz)?$/.test(f));
  if (files.length === 0) throw new Error(`no capture files in ${capturesDir}`);
  return files.sort();
}

let tgtd: Tgtd | undefined;
let lunDir: string | undefined;
afterEach(async () => {
  await tgtd?.stop();
  tgtd = undefined;
  if (lunDir) fs.rmSync(lunDir, { recursive: true, force: true });
  lunDir = undefined;
});

/** The recorded setup (captures README): disk1 is a 16 MiB LUN; chap is the same LUN behind CHAP. */
async function recordedTarget(): Promise<Tgtd> {
  const dir = (lunDir = fs.mkdtempSync(path.join(os.tmpdir(), 'detour-replay-')));
  const file = path.join(dir, 'disk1.img');
  return Tgtd.start({
    targets: [
      { tid: 1, iqn: 'iqn.2026-11.example:disk1', luns: [{ lun: 1, file, size: 16 << 20 }] },
      { tid: 2, iqn: 'iqn.2026-11.example:chap', luns: [{ lun: 1, file }], chap: { user: 'alice', password: 's3cretpassw0rd' } },
    ],
  });
}

describe('capture replay against tgtd', () => {
  it('finds the captures', () => {
    expect(captureFiles()).toEqual(expect.arrayContaining(['chap.pcapng', 'discovery.pcapng', 'inquiry.pcapng', 'iscsi-level.pcapng', 'rw-patterns.pcapng']));
  });

  for (const file of captureFiles()) {
    it(`replays ${file} with the recorded answers`, async () => {
      const recorded = readCapture(path.join(capturesDir, file), RECORDED_PORT);
      expect(recorded.length).toBeGreaterThan(0);
      tgtd = await recordedTarget();
      const options = {
        host: tgtd.host,
        port: tgtd.port,
        recordedPortal: `127.0.0.1:${RECORDED_PORT}`,
        chapSecrets: { alice: 's3cretpassw0rd' },
        answerTimeoutMs: 5000,
      };
      const position = RECORDING_ORDER.indexOf(file);
      for (const before of position > 0 ? RECORDING_ORDER.slice(0, position) : []) {
        const seed = await replay(readCapture(path.join(capturesDir, before), RECORDED_PORT), options);
        expect(seed.mismatches, `replaying ${before} to reach ${file}'s starting state`).toEqual([]);
      }
      const report = await replay(recorded, options);
      expect(report.mismatches.slice(0, 20)).toEqual([]);
      expect(report.sent).toBe(recorded.filter((r) => r.dir === 'i2t').length);
      expect(report.compared).toBe(recorded.filter((r) => r.dir === 't2i').length);
    });
  }
});
