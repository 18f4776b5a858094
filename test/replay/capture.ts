import fs from 'node:fs';
import { dumpCapture, type RawPdu } from '../../src/tools/pcap-dump.ts';
import type { RecordedPdu } from './replay.ts';

/** Every iSCSI PDU of a capture, in wire order, with whole payloads. */
export function readCapture(file: string, port: number): RecordedPdu[] {
  const pdus: RecordedPdu[] = [];
  const warnings: string[] = [];
  dumpCapture(fs.readFileSync(file), {
    port,
    write: () => {},
    warn: (m) => warnings.push(m),
    pdu: (raw: RawPdu) => {
      if (raw.missingBytes > 0) throw new Error(`${file}: PDU with ${raw.missingBytes} bytes missing from the capture cannot be replayed`);
      pdus.push({ conn: raw.conn, dir: raw.dir, header: raw.header, data: raw.data });
    },
  });
  if (warnings.length) throw new Error(`${file}: capture is not clean: ${warnings.join('; ')}`);
  return pdus;
}
