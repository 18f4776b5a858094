// Throughput of the iscsi-node-wire codec: framing + decoding and encoding, for 256 KiB Data-In
// PDUs and for small PDUs (NOP-Out, SCSI Command without data). Prints the figures and checks
// them against the goals of the foundation work: 2 GB/s for large PDUs, 1 M PDU/s for small ones.
//
//   npx tsx scripts/bench-wire.ts [--seconds 1] [--digests]
import { decodePdu, encodePdu, PduFramer, type PduInit } from 'iscsi-node-wire';

const args = process.argv.slice(2);
const seconds = Number(args[args.indexOf('--seconds') + 1] ?? 1) || 1;
const digests = { headerDigest: args.includes('--digests'), dataDigest: args.includes('--digests') };

const dataIn: PduInit = {
  opcode: 0x25, itt: 1, final: true, acknowledge: false, overflow: false, underflow: false, statusPresent: true, status: 0,
  lun: 0, ttt: 0xffffffff, statSN: 1, expCmdSN: 2, maxCmdSN: 33, dataSN: 0, bufferOffset: 0, residualCount: 0,
  data: Buffer.alloc(256 * 1024, 0xa5),
};
const nopOut: PduInit = { opcode: 0x00, immediate: true, itt: 7, lun: 0, ttt: 0xffffffff, cmdSN: 9, expStatSN: 10 };
const scsiCmd: PduInit = {
  opcode: 0x01, final: true, read: true, write: false, attr: 1, itt: 8, lun: 0, expectedDataTransferLength: 4096,
  cmdSN: 11, expStatSN: 12, cdb: Buffer.from([0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0]),
};

function time(fn: () => number): { ops: number; secs: number } {
  fn(); // warm up: let the JIT settle before measuring
  let ops = 0;
  const start = process.hrtime.bigint();
  const end = start + BigInt(Math.round(seconds * 1e9));
  let now = start;
  while (now < end) {
    ops += fn();
    now = process.hrtime.bigint();
  }
  return { ops, secs: Number(now - start) / 1e9 };
}

/** A receive buffer as TCP would hand it over: many PDUs back to back, cut in 64 KiB chunks. */
function chunked(pdus: PduInit[], repeat: number, chunk: number): Buffer[] {
  const wire = Buffer.concat(Array.from({ length: repeat }, () => pdus.flatMap((p) => encodePdu(p, digests))).flat());
  const out: Buffer[] = [];
  for (let o = 0; o < wire.length; o += chunk) out.push(wire.subarray(o, o + chunk));
  return out;
}

function decodeRun(chunks: Buffer[], maxRecv: number): number {
  const f = new PduFramer({ ...digests, maxRecvDataSegmentLength: maxRecv });
  let n = 0;
  for (const c of chunks) {
    f.push(c);
    for (let o = f.next(); o; o = f.next()) {
      if (!o.frame) throw o.error;
      decodePdu(o.frame.header, o.frame.data);
      n++;
    }
  }
  return n;
}

const results: Array<{ name: string; value: number; unit: string; goal: number }> = [];

{
  // Large reads arrive in TCP chunks of 64 KiB, so a 256 KiB PDU is gathered from several.
  const chunks = chunked([dataIn], 64, 65536);
  const r = time(() => decodeRun(chunks, 262144));
  results.push({ name: 'decode 256 KiB Data-In (64 KiB TCP chunks)', value: (r.ops * 262144) / r.secs / 1e9, unit: 'GB/s', goal: 2 });
}
{
  // The same PDUs handed over in 1 MiB reads, which is what a busy socket delivers.
  const chunks = chunked([dataIn], 64, 1 << 20);
  const r = time(() => decodeRun(chunks, 262144));
  results.push({ name: 'decode 256 KiB Data-In (1 MiB TCP chunks)', value: (r.ops * 262144) / r.secs / 1e9, unit: 'GB/s', goal: 2 });
}
{
  const chunks = chunked([nopOut, scsiCmd], 5000, 65536);
  const r = time(() => decodeRun(chunks, 8192));
  results.push({ name: 'decode small PDUs (NOP-Out, SCSI Command)', value: r.ops / r.secs / 1e6, unit: 'M PDU/s', goal: 1 });
}
{
  const r = time(() => {
    let bytes = 0;
    for (let i = 0; i < 64; i++) for (const b of encodePdu(dataIn, digests)) bytes += b.length;
    return bytes > 0 ? 64 : 0;
  });
  results.push({ name: 'encode 256 KiB Data-In (payload by reference)', value: (r.ops * 262144) / r.secs / 1e9, unit: 'GB/s', goal: 2 });
}
{
  const r = time(() => {
    for (let i = 0; i < 5000; i++) {
      encodePdu(nopOut, digests);
      encodePdu(scsiCmd, digests);
    }
    return 10000;
  });
  results.push({ name: 'encode small PDUs (NOP-Out, SCSI Command)', value: r.ops / r.secs / 1e6, unit: 'M PDU/s', goal: 1 });
}

let failed = 0;
console.log(`iscsi-node-wire benchmark (digests ${digests.headerDigest ? 'on' : 'off'}, ${seconds}s per case, node ${process.version})`);
for (const r of results) {
  const ok = r.value >= r.goal;
  if (!ok) failed++;
  console.log(`${ok ? 'ok  ' : 'SLOW'} ${r.name.padEnd(46)} ${r.value.toFixed(2).padStart(8)} ${r.unit.padEnd(8)} goal >= ${r.goal} (${(r.value / r.goal).toFixed(2)}x)`);
}
process.exitCode = failed ? 1 : 0;
