// Comparison of `detour pcap-dump` with tshark, field by field, shared by the tests on recorded
// and on freshly captured sessions.
import { execFileSync, spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'vitest';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

export interface Line {
  frame: number;
  conn: number;
  dir: 'i2t' | 't2i';
  opcode: number;
  name: string;
  itt: number;
  flags: number;
  dataSegmentLength: number;
  cmdsn?: number;
  statsn?: number;
  keys?: Record<string, string | string[]>;
  [field: string]: unknown;
}

export function runCli(args: string[], input?: Buffer): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [path.join(repoRoot, 'bin/detour.js'), 'pcap-dump', ...args], {
    cwd: repoRoot,
    encoding: 'utf8',
    maxBuffer: 256 * 1024 * 1024,
    ...(input ? { input } : {}),
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

export function parseLines(stdout: string): Line[] {
  return stdout
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => JSON.parse(l) as Line);
}


// ---------------------------------------------------------------------------------------------
// Agreement with tshark on the recorded sessions

/** The fields both tools must agree on, one entry per PDU, in capture order. */
export interface Comparable {
  frame: number;
  conn: number;
  opcode: number;
  itt: number;
  cmdsn: number | null;
  statsn: number | null;
  /** null where tshark does not show the field. */
  dataSegmentLength: number | null;
}

// tshark shows CmdSN for these initiator PDUs and StatSN for every target PDU (Data-In even
// without the S bit); SNACK and Data-Out carry neither.
const CMDSN_OPCODES = new Set([0x00, 0x01, 0x02, 0x03, 0x04, 0x06]);
const hasStatSN = (opcode: number) => opcode >= 0x20;
// tshark leaves DataSegmentLength out for Task Management Responses (always 0 there).
export const TSHARK_NO_DSL = new Set([0x22]);

export function tsharkPdus(file: string, port: number): Comparable[] {
  const out = execFileSync(
    'tshark',
    [
      '-r', file,
      // A loopback capture on a busy multi-CPU host can record a segment after the one that follows
      // it. pcap-dump orders a connection's bytes by sequence number; tshark by default leaves an
      // out-of-order segment undissected, and would miss the PDUs in it.
      '-o', 'tcp.reassemble_out_of_order:TRUE',
      '-d', `tcp.port==${port},iscsi`,
      '-T', 'fields',
      '-E', 'separator=/t',
      '-E', 'aggregator=,',
      '-e', 'frame.number',
      '-e', 'tcp.stream',
      '-e', 'iscsi.opcode',
      '-e', 'iscsi.initiatortasktag',
      '-e', 'iscsi.cmdsn',
      '-e', 'iscsi.statsn',
      '-e', 'iscsi.datasegmentlength',
    ],
    { encoding: 'utf8', maxBuffer: 256 * 1024 * 1024, stdio: ['ignore', 'pipe', 'ignore'] },
  );
  const pdus: Comparable[] = [];
  for (const row of out.split('\n')) {
    if (row.trim() === '') continue;
    const [frameText, streamText, opText, ittText, cmdText, statText, dslText] = row.split('\t');
    if (!opText) continue;
    const list = (s: string | undefined) => (s ? s.split(',').map((x) => Number(x)) : []);
    const opcodes = list(opText);
    const itts = list(ittText);
    const dsls = list(dslText);
    const cmdsns = list(cmdText);
    const statsns = list(statText);
    const where = `${path.basename(file)} frame ${frameText}`;
    // Several PDUs in one frame come out comma-separated, and a field a PDU does not have is
    // simply absent; hand the CmdSN/StatSN values to the PDUs that have them, in order.
    expect(itts.length, `${where}: ITT count`).toBe(opcodes.length);
    expect(dsls.length, `${where}: DataSegmentLength count`).toBe(opcodes.filter((o) => !TSHARK_NO_DSL.has(o)).length);
    expect(cmdsns.length, `${where}: CmdSN count`).toBe(opcodes.filter((o) => CMDSN_OPCODES.has(o)).length);
    expect(statsns.length, `${where}: StatSN count`).toBe(opcodes.filter(hasStatSN).length);
    let c = 0;
    let s = 0;
    let d = 0;
    opcodes.forEach((opcode, i) => {
      pdus.push({
        frame: Number(frameText),
        conn: Number(streamText),
        opcode,
        itt: itts[i]!,
        cmdsn: CMDSN_OPCODES.has(opcode) ? cmdsns[c++]! : null,
        statsn: hasStatSN(opcode) ? statsns[s++]! : null,
        dataSegmentLength: TSHARK_NO_DSL.has(opcode) ? null : dsls[d++]!,
      });
    });
  }
  return pdus;
}

export function ourPdus(lines: Line[]): Comparable[] {
  return lines.map((l) => ({
    frame: l.frame,
    conn: l.conn,
    opcode: l.opcode,
    itt: l.itt,
    cmdsn: l.cmdsn ?? null,
    statsn: l.statsn ?? null,
    dataSegmentLength: TSHARK_NO_DSL.has(l.opcode) ? null : l.dataSegmentLength,
  }));
}

