import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { encodePduBuffer, type DigestSettings, type PduInit } from 'iscsi-node-wire';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dumpCapture } from '../src/tools/pcap-dump.ts';
import { CaptureFormatError, openCapture } from '../src/tools/pcap/pcap-file.ts';
import { Conversation, gzip, writePcap, writePcapng } from './pcap-writer.ts';
import { ourPdus, parseLines, repoRoot, runCli, tsharkPdus, TSHARK_NO_DSL, type Line } from './helpers/pcap-compare.ts';

const capturesDir = path.resolve(repoRoot, '../shared/captures');
const CAPTURE_PORT = 3290;

function dump(file: Buffer, port = 3260): { lines: Line[]; warnings: string[] } {
  let out = '';
  const warnings: string[] = [];
  dumpCapture(file, { port, write: (s) => (out += s), warn: (m) => warnings.push(m) });
  return { lines: parseLines(out), warnings };
}

describe('pcap-dump agrees with tshark on the recorded sessions', () => {
  const files = existsSync(capturesDir) ? readdirSync(capturesDir).filter((f) => /\.pcap(ng)?(\.gz)?$/.test(f)).sort() : [];

  it('has the captures and tshark to compare with', () => {
    expect(existsSync(capturesDir), `capture directory ${capturesDir} is missing`).toBe(true);
    expect(files.length, `no .pcap/.pcapng files in ${capturesDir}`).toBeGreaterThan(0);
    const tshark = spawnSync('tshark', ['--version'], { encoding: 'utf8' });
    expect(tshark.error, 'tshark is not installed (Debian package "tshark")').toBeUndefined();
    expect(tshark.status).toBe(0);
  });

  for (const name of files) {
    it(`${name}: every PDU's opcode, ITT, CmdSN/StatSN and DataSegmentLength`, () => {
      const file = path.join(capturesDir, name);
      const r = runCli([file, '--port', String(CAPTURE_PORT)]);
      expect(r.stderr).toBe('');
      expect(r.status).toBe(0);
      const ours = parseLines(r.stdout);
      const theirs = tsharkPdus(file, CAPTURE_PORT);
      expect(theirs.length).toBeGreaterThan(0);
      // Whole ordered sequences, field by field: frame numbers and connection numbers too.
      expect(ourPdus(ours)).toEqual(theirs);
      for (const l of ours.filter((x) => TSHARK_NO_DSL.has(x.opcode))) expect(l.dataSegmentLength).toBe(0);
      // And per connection and direction, which is how a reader follows a session.
      const key = (l: Line) => `${l.conn} ${l.dir}`;
      for (const k of new Set(ours.map(key))) {
        const mine = ours.filter((l) => key(l) === k);
        const dirOf = mine[0]!.dir;
        expect(mine.every((l) => (dirOf === 'i2t' ? l.opcode < 0x20 : l.opcode >= 0x20)), `${k}: direction`).toBe(true);
      }
    });
  }

  it('rw-patterns: the large writes run through R2T and Data-Out, and it dumps quickly', () => {
    const file = readFileSync(path.join(capturesDir, 'rw-patterns.pcapng'));
    const started = performance.now();
    const { lines, warnings } = dump(file, CAPTURE_PORT);
    const elapsed = performance.now() - started;
    expect(warnings).toEqual([]);
    expect(elapsed).toBeLessThan(2000);
    const r2t = lines.filter((l) => l.name === 'Ready To Transfer');
    expect(r2t.length).toBeGreaterThan(0);
    for (const l of r2t) expect(l.r2tsn).toBe(l.datasn);
    const dataOut = lines.filter((l) => l.opcode === 0x05);
    expect(dataOut.reduce((n, l) => n + l.dataSegmentLength, 0)).toBeGreaterThanOrEqual(1024 * 1024);
    expect(lines.filter((l) => l.dir === 'i2t' && l.opcode === 0x01).every((l) => typeof l.cdb0 === 'number')).toBe(true);
  });
});

// ---------------------------------------------------------------------------------------------
// Recorded sessions, damaged on purpose

describe('pcap-dump on damaged recordings', () => {
  const load = (name: string) => readFileSync(path.join(capturesDir, name));
  const pduKey = (l: Line) => `${l.frame}/${l.conn}/${l.opcode}/${l.itt}/${l.dataSegmentLength}`;

  it('finds the first whole PDU wherever the capture starts', () => {
    // Drop the first k packets, for every k: each printed PDU must be one of the full dump, and
    // per connection and direction at most the PDU in progress at the cut may be lost.
    for (const name of ['rw-patterns.pcapng', 'iscsi-level.pcapng']) {
      const file = load(name);
      const packets = [...openCapture(file).packets()];
      const full = dump(file, CAPTURE_PORT).lines;
      const fullKeys = new Set(full.map(pduKey));
      for (let k = 1; k < packets.length; k++) {
        const cut = writePcap(packets.slice(k).map((p) => ({ time: p.time, data: p.data })));
        // Connection numbers shift when whole connections fall before the cut: map them back.
        const firstConn = full.find((l) => l.frame > k)?.conn ?? 0;
        const ours = dump(cut, CAPTURE_PORT).lines.map((l) => ({ ...l, frame: l.frame + k }));
        const connShift = ours.length > 0 ? ours[0]!.conn - firstConn : 0;
        for (const l of ours) l.conn -= connShift;
        const extra = ours.filter((l) => !fullKeys.has(pduKey(l)));
        expect(extra.map(pduKey), `${name} cut before packet ${k + 1}: PDUs that are not in the full dump`).toEqual([]);
        const oursKeys = new Set(ours.map(pduKey));
        const lost = full.filter((l) => l.frame > k && !oursKeys.has(pduKey(l)));
        const lostPerDirection = new Map<string, number>();
        for (const l of lost) lostPerDirection.set(`${l.conn} ${l.dir}`, (lostPerDirection.get(`${l.conn} ${l.dir}`) ?? 0) + 1);
        expect([...lostPerDirection.values()].every((n) => n <= 1), `${name} cut before packet ${k + 1}: lost ${lost.map(pduKey)}`).toBe(true);
      }
    }
  });

  it('never crashes on corrupted payloads, lost or repeated packets, or a damaged file', () => {
    let seed = 2026;
    const random = () => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed / 0x80000000;
    };
    const surprises: string[] = [];
    let decoded = 0;
    for (const name of ['iscsi-level.pcapng', 'chap.pcapng', 'inquiry.pcapng']) {
      const file = load(name);
      const packets = [...openCapture(file).packets()];
      for (let round = 0; round < 60; round++) {
        const frames = packets.map((p) => ({ time: p.time, data: Buffer.from(p.data) }));
        for (let i = 0; i < 10; i++) {
          const f = frames[Math.floor(random() * frames.length)]!;
          // Ethernet + IPv4 + TCP with timestamps is 66 bytes: corrupt only what follows.
          if (f.data.length > 66) f.data[66 + Math.floor(random() * (f.data.length - 66))] = Math.floor(random() * 256);
        }
        const shuffled = frames.filter(() => random() > 0.03).flatMap((f) => (random() < 0.03 ? [f, f] : [f]));
        const damagedFile = Buffer.from(file.subarray(0, Math.floor(random() * file.length)));
        for (let i = 0; i < 3; i++) damagedFile[Math.floor(random() * damagedFile.length)] = Math.floor(random() * 256);
        for (const variant of [writePcap(shuffled), damagedFile]) {
          try {
            dumpCapture(variant, { port: CAPTURE_PORT, write: () => {}, warn: () => {} });
            decoded++;
          } catch (err) {
            if (!(err instanceof CaptureFormatError)) surprises.push(String((err as Error).stack));
          }
        }
      }
    }
    expect(surprises).toEqual([]);
    expect(decoded).toBeGreaterThan(60);
  });
});

// ---------------------------------------------------------------------------------------------
// Synthetic captures

const ISID = Buffer.from([0x80, 0, 0, 0, 0, 1]);

function text(pairs: Record<string, string>): Buffer {
  return Buffer.from(Object.entries(pairs).map(([k, v]) => `${k}=${v}\0`).join(''), 'utf8');
}

function loginRequest(itt: number, keys: Record<string, string>): Extract<PduInit, { opcode: 0x03 }> {
  return {
    opcode: 0x03, transit: true, continue: false, csg: 1, nsg: 3, versionMax: 0, versionMin: 0,
    isid: ISID, tsih: 0, itt, cid: 0, cmdSN: 1, expStatSN: 0, data: text(keys),
  };
}

function loginResponse(itt: number, keys: Record<string, string>): PduInit {
  return {
    opcode: 0x23, transit: true, continue: false, csg: 1, nsg: 3, versionMax: 0, versionActive: 0,
    isid: ISID, tsih: 1, itt, statSN: 0, expCmdSN: 1, maxCmdSN: 16, statusClass: 0, statusDetail: 0, data: text(keys),
  };
}

function read10(itt: number, cmdSN: number, blocks = 1): PduInit {
  const cdb = Buffer.alloc(16);
  cdb[0] = 0x28;
  cdb.writeUInt16BE(blocks, 7);
  return {
    opcode: 0x01, final: true, read: true, write: false, attr: 1, lun: 0, itt,
    expectedDataTransferLength: blocks * 512, cmdSN, expStatSN: 1, cdb,
  };
}

function dataIn(itt: number, statSN: number, data: Buffer): PduInit {
  return {
    opcode: 0x25, final: true, acknowledge: false, overflow: false, underflow: false, statusPresent: true, status: 0,
    lun: 0, itt, ttt: 0xffffffff, statSN, expCmdSN: statSN + 1, maxCmdSN: statSN + 16, dataSN: 0, bufferOffset: 0,
    residualCount: 0, data,
  };
}

function nopOut(itt: number, cmdSN: number, data = Buffer.alloc(0)): PduInit {
  return { opcode: 0x00, immediate: true, lun: 0, itt, ttt: 0xffffffff, cmdSN, expStatSN: 1, data };
}

function enc(p: PduInit, digests?: DigestSettings): Buffer {
  return encodePduBuffer(p, digests);
}

/** A login without digests and `n` READ(10)s answered by one Data-In each. */
function session(conv: Conversation, n: number, digests?: DigestSettings): void {
  const wanted: Record<string, string> = digests ? { HeaderDigest: digests.headerDigest ? 'CRC32C' : 'None', DataDigest: digests.dataDigest ? 'CRC32C' : 'None' } : {};
  conv.send('c', enc(loginRequest(1, { InitiatorName: 'iqn.2026-01.test:i', HeaderDigest: 'CRC32C,None', DataDigest: 'CRC32C,None' })));
  conv.send('s', enc(loginResponse(1, { TargetPortalGroupTag: '1', ...wanted })));
  for (let i = 0; i < n; i++) {
    conv.send('c', enc(read10(0x100 + i, 1 + i), digests));
    conv.send('s', enc(dataIn(0x100 + i, 1 + i, Buffer.alloc(512, i)), digests), 300);
  }
}

describe('pcap-dump on synthetic captures', () => {
  it('decodes a clean session in order, with login keys and fields', () => {
    const conv = new Conversation().handshake();
    session(conv, 3);
    conv.close();
    const { lines, warnings } = dump(writePcap(conv.frames()));
    expect(warnings).toEqual([]);
    expect(lines.map((l) => [l.dir, l.name, l.itt])).toEqual([
      ['i2t', 'Login Request', 1],
      ['t2i', 'Login Response', 1],
      ['i2t', 'SCSI Command', 0x100],
      ['t2i', 'SCSI Data-In', 0x100],
      ['i2t', 'SCSI Command', 0x101],
      ['t2i', 'SCSI Data-In', 0x101],
      ['i2t', 'SCSI Command', 0x102],
      ['t2i', 'SCSI Data-In', 0x102],
    ]);
    expect(lines[0]).toMatchObject({
      conn: 0, src: '10.0.0.1:40000', dst: '10.0.0.2:3260', opcode: 3, cmdsn: 1, expstatsn: 0, ahsLength: 0,
      keys: { InitiatorName: 'iqn.2026-01.test:i', HeaderDigest: 'CRC32C,None' },
    });
    expect(lines[2]).toMatchObject({ cdb0: 0x28, lun: 0, cmdsn: 1, flags: 0xc1, dataSegmentLength: 0 });
    expect(lines[3]).toMatchObject({ statsn: 1, datasn: 0, status: 0, dataSegmentLength: 512 });
    expect(lines.every((l) => typeof l.time === 'number' && l.time > 1_700_000_000)).toBe(true);
  });

  it('repeated keys become arrays', () => {
    const conv = new Conversation().handshake();
    const textResp: PduInit = {
      opcode: 0x24, final: true, continue: false, lun: 0, itt: 7, ttt: 0xffffffff, statSN: 3, expCmdSN: 2, maxCmdSN: 9,
      data: Buffer.from('TargetName=iqn.a\0TargetAddress=1.2.3.4:3260,1\0TargetName=iqn.b\0', 'utf8'),
    };
    conv.send('s', enc(textResp));
    const { lines } = dump(writePcap(conv.frames()));
    expect(lines[0]!.keys).toEqual({ TargetName: ['iqn.a', 'iqn.b'], TargetAddress: '1.2.3.4:3260,1' });
  });

  it('reports undecodable key text in the line instead of failing', () => {
    const conv = new Conversation().handshake();
    conv.send('c', enc({ ...loginRequest(1, {}), data: Buffer.from('InitiatorName=iqn.x\0no separator here\0') }));
    const { lines, warnings } = dump(writePcap(conv.frames()));
    expect(warnings).toEqual([]);
    expect(lines).toHaveLength(1);
    expect(lines[0]!.keys).toBeUndefined();
    expect(lines[0]!.keysError).toMatch(/without "="/);
  });

  it('delivers retransmitted and overlapping segments once', () => {
    const conv = new Conversation().handshake();
    session(conv, 2);
    const clean = dump(writePcap(conv.frames())).lines;
    // Repeat every data segment, and add one that overlaps two neighbours.
    const packets = conv.packets.slice();
    for (const p of packets.filter((x) => x.spec.payload)) conv.packets.push({ ...p, time: p.time + 0.0001 });
    conv.packets.sort((a, b) => a.time - b.time);
    const dataIn = packets.filter((p) => p.spec.srcPort === 3260 && (p.spec.payload?.length ?? 0) === 300);
    const a = dataIn[0]!;
    const overlap = { time: a.time + 0.00005, spec: { ...a.spec, seq: a.spec.seq + 100, payload: Buffer.concat([a.spec.payload!.subarray(100), dataIn[1]!.spec.payload!.subarray(0, 50)]) } };
    conv.packets.splice(conv.packets.indexOf(a) + 1, 0, overlap);
    const { lines, warnings } = dump(writePcap(conv.frames()));
    expect(warnings).toEqual([]);
    expect(lines.map((l) => [l.opcode, l.itt, l.dataSegmentLength])).toEqual(clean.map((l) => [l.opcode, l.itt, l.dataSegmentLength]));
  });

  it('reorders out-of-order segments and reports each PDU at the packet completing it', () => {
    const conv = new Conversation().handshake();
    session(conv, 1);
    const segs = conv.packets.filter((p) => p.spec.srcPort === 3260 && (p.spec.payload?.length ?? 0) > 0);
    // The Data-In (48 + 512 bytes) was cut into two segments: swap them.
    const last = segs.length - 1;
    const i = conv.packets.indexOf(segs[last - 1]!);
    const j = conv.packets.indexOf(segs[last]!);
    [conv.packets[i], conv.packets[j]] = [conv.packets[j]!, conv.packets[i]!];
    const { lines, warnings } = dump(writePcap(conv.frames()));
    expect(warnings).toEqual([]);
    const din = lines.find((l) => l.opcode === 0x25)!;
    expect(din).toMatchObject({ itt: 0x100, dataSegmentLength: 512 });
    expect(din.frame).toBe(j + 1);
  });

  it('resyncs when the capture starts in the middle of a PDU, and says so on stderr', () => {
    const conv = new Conversation().handshake();
    session(conv, 4);
    // Drop the handshake, the login and the first command, and the first 200 bytes of Data-In.
    const firstDataIn = conv.packets.findIndex((p) => p.spec.srcPort === 3260 && p.spec.payload?.length === 300 && p.spec.payload[0] === 0x25);
    conv.packets.splice(0, firstDataIn);
    const p0 = conv.packets[0]!;
    conv.packets[0] = { ...p0, spec: { ...p0.spec, seq: p0.spec.seq + 200, payload: p0.spec.payload!.subarray(200) } };
    const { lines, warnings } = dump(writePcap(conv.frames()));
    // 100 bytes left of the first segment plus the 260-byte second segment of that Data-In.
    expect(warnings).toEqual([expect.stringMatching(/^conn 0 t2i: resync at packet \d+: skipped 360 bytes to the next plausible PDU boundary/)]);
    expect(lines.map((l) => [l.dir, l.opcode, l.itt])).toEqual([
      ['i2t', 0x01, 0x101],
      ['t2i', 0x25, 0x101],
      ['i2t', 0x01, 0x102],
      ['t2i', 0x25, 0x102],
      ['i2t', 0x01, 0x103],
      ['t2i', 0x25, 0x103],
    ]);
  });

  it('reports a gap and continues after it', () => {
    const conv = new Conversation().handshake();
    session(conv, 3);
    // Lose the second segment of the second Data-In; the initiator acknowledges past it.
    const dataSegs = conv.packets.filter((p) => p.spec.srcPort === 3260 && (p.spec.payload?.length ?? 0) > 0);
    const lost = dataSegs[4]!; // login response, Data-In #1 (2 segments), Data-In #2 (2 segments)...
    const resumes = dataSegs[5]!;
    conv.packets.splice(conv.packets.indexOf(lost), 1);
    const { lines, warnings } = dump(writePcap(conv.frames()));
    // The initiator acknowledged past the hole before more data came: that settles it at once.
    expect(warnings).toEqual([`conn 0 t2i: 260 bytes missing from the capture before packet ${conv.packets.indexOf(resumes) + 1}`]);
    const t2i = lines.filter((l) => l.dir === 't2i').map((l) => [l.opcode, l.itt]);
    // The damaged PDU's header survived: it is printed, marked as incomplete, and framing stays
    // in step without a resync.
    expect(t2i).toEqual([
      [0x23, 1],
      [0x25, 0x100],
      [0x25, 0x101],
      [0x25, 0x102],
    ]);
    expect(lines.find((l) => l.itt === 0x101 && l.opcode === 0x25)!.missingBytes).toBe(260);
  });

  it('follows negotiated digests from the first PDU after the final Login Response', () => {
    for (const digests of [
      { headerDigest: true, dataDigest: true },
      { headerDigest: true, dataDigest: false },
      { headerDigest: false, dataDigest: true },
    ]) {
      const conv = new Conversation().handshake();
      session(conv, 3, digests);
      conv.send('c', enc(nopOut(0x200, 4, Buffer.from('ping')), digests));
      conv.close();
      const { lines, warnings } = dump(writePcapng(conv.frames()));
      expect(warnings).toEqual([]);
      expect(lines.map((l) => l.opcode)).toEqual([0x03, 0x23, 0x01, 0x25, 0x01, 0x25, 0x01, 0x25, 0x00]);
      expect(lines[1]!.keys).toMatchObject({ HeaderDigest: digests.headerDigest ? 'CRC32C' : 'None' });
      expect(lines.at(-1)).toMatchObject({ itt: 0x200, dataSegmentLength: 4, cmdsn: 4 });
    }
  });

  it('resyncs past a PDU whose header digest does not match', () => {
    const digests = { headerDigest: true, dataDigest: false };
    const conv = new Conversation().handshake();
    session(conv, 3, digests);
    const secondCmd = conv.packets.filter((p) => p.spec.payload?.[0] === 0x01)[1]!;
    secondCmd.spec.payload = Buffer.from(secondCmd.spec.payload!);
    secondCmd.spec.payload[48] ^= 0xff; // first byte of the CRC32C after the BHS
    const { lines, warnings } = dump(writePcap(conv.frames()));
    expect(warnings).toEqual([expect.stringMatching(/^conn 0 i2t: resync at packet \d+: skipped 52 bytes to the next plausible PDU boundary \(header digest mismatch\)$/)]);
    expect(lines.filter((l) => l.dir === 'i2t').map((l) => [l.opcode, l.itt])).toEqual([
      [0x03, 1],
      [0x01, 0x100],
      [0x01, 0x102],
    ]);
  });

  it('gathers login keys split over PDUs with the C bit onto the last one', () => {
    const conv = new Conversation().handshake();
    const whole = text({ InitiatorName: 'iqn.2026-01.test:split', SessionType: 'Normal' });
    const first: PduInit = { ...loginRequest(1, {}), transit: false, continue: true, nsg: 0, data: whole.subarray(0, 20) };
    const second: PduInit = { ...loginRequest(1, {}), data: whole.subarray(20) };
    conv.send('c', Buffer.concat([enc(first), enc(second)]));
    const { lines, warnings } = dump(writePcap(conv.frames()));
    expect(warnings).toEqual([]);
    expect(lines.map((l) => [l.keysContinued, l.keys])).toEqual([
      [true, undefined],
      [undefined, { InitiatorName: 'iqn.2026-01.test:split', SessionType: 'Normal' }],
    ]);
  });

  it('finds digests by itself when the capture starts after the login', () => {
    const digests = { headerDigest: true, dataDigest: true };
    const conv = new Conversation().handshake();
    session(conv, 4, digests);
    const firstCmd = conv.packets.findIndex((p) => p.spec.payload?.[0] === 0x01);
    conv.packets.splice(0, firstCmd + 1); // the capture begins just after the first command
    const { lines, warnings } = dump(writePcap(conv.frames()));
    expect(lines.map((l) => [l.opcode, l.itt])).toEqual([
      [0x25, 0x100],
      [0x01, 0x101],
      [0x25, 0x101],
      [0x01, 0x102],
      [0x25, 0x102],
      [0x01, 0x103],
      [0x25, 0x103],
    ]);
    expect(warnings).toEqual([]);
  });

  it('reads pcap in both byte orders and resolutions, pcapng, and gzip', () => {
    const conv = new Conversation().handshake();
    session(conv, 2);
    conv.close();
    const frames = conv.frames();
    const reference = dump(writePcap(frames)).lines;
    expect(reference.length).toBe(6);
    const variants = {
      'pcap big-endian': writePcap(frames, { bigEndian: true }),
      'pcap nanoseconds': writePcap(frames, { nanoseconds: true }),
      'pcapng little-endian': writePcapng(frames),
      'pcapng big-endian, microseconds, unknown blocks': writePcapng(frames, { bigEndian: true, tsresol: 6, unknownBlocks: true }),
      'gzipped pcapng': gzip(writePcapng(frames)),
      'gzipped pcap': gzip(writePcap(frames)),
    };
    for (const [what, file] of Object.entries(variants)) {
      const { lines, warnings } = dump(file);
      expect(warnings, what).toEqual([]);
      // Timestamps are compared to the microsecond; float rounding differs between resolutions.
      const coarse = (l: Line) => ({ ...l, time: Math.round((l.time as number) * 1e5) });
      expect(lines.map(coarse), what).toEqual(reference.map(coarse));
    }
  });

  it('works over IPv6 and honours --port', () => {
    const conv = new Conversation({ addr: 'fd00::1', port: 51000 }, { addr: 'fd00::2', port: 3290 });
    conv.handshake();
    session(conv, 1);
    const file = writePcap(conv.frames(true));
    expect(dump(file, 3260).lines).toEqual([]);
    const { lines } = dump(file, 3290);
    expect(lines.map((l) => [l.src, l.dst, l.dir])).toEqual([
      ['[fd00::1]:51000', '[fd00::2]:3290', 'i2t'],
      ['[fd00::2]:3290', '[fd00::1]:51000', 't2i'],
      ['[fd00::1]:51000', '[fd00::2]:3290', 'i2t'],
      ['[fd00::2]:3290', '[fd00::1]:51000', 't2i'],
    ]);
  });

  it('numbers connections in order of first appearance and interleaves them as captured', () => {
    const a = new Conversation({ addr: '10.0.0.1', port: 40001 }, { addr: '10.0.0.2', port: 3260 }, { c: 1, s: 2 }, 1_700_000_000);
    const b = new Conversation({ addr: '10.0.0.1', port: 40002 }, { addr: '10.0.0.2', port: 3260 }, { c: 0xfffffff0, s: 0xffffff00 }, 1_700_000_000.0005);
    a.handshake();
    b.handshake(); // sequence numbers of b wrap around during the session
    session(a, 2);
    session(b, 2);
    const frames = [...a.frames(), ...b.frames()].sort((x, y) => x.time - y.time);
    const { lines, warnings } = dump(writePcap(frames));
    expect(warnings).toEqual([]);
    expect(lines.filter((l) => l.conn === 0).map((l) => l.opcode)).toEqual([0x03, 0x23, 0x01, 0x25, 0x01, 0x25]);
    expect(lines.filter((l) => l.conn === 1).map((l) => l.opcode)).toEqual([0x03, 0x23, 0x01, 0x25, 0x01, 0x25]);
    const framesInOrder = lines.map((l) => l.frame);
    expect(framesInOrder).toEqual([...framesInOrder].sort((x, y) => x - y));
    expect(new Set(lines.slice(0, 4).map((l) => l.conn))).toEqual(new Set([0, 1]));
  });
});

// ---------------------------------------------------------------------------------------------
// The real command line

describe('detour pcap-dump command line', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(path.join(tmpdir(), 'pcap-dump-'));
  });
  afterAll(() => {
    rmSync(dir, { recursive: true, force: true });
  });

  it('prints JSON lines on stdout and resync notes on stderr, exit 0', () => {
    const conv = new Conversation().handshake();
    session(conv, 2);
    const firstDataIn = conv.packets.findIndex((p) => p.spec.payload?.[0] === 0x25);
    conv.packets.splice(0, firstDataIn + 1);
    const file = path.join(dir, 'midstream.pcap.gz');
    writeFileSync(file, gzip(writePcap(conv.frames())));
    const r = runCli([file]);
    expect(r.status).toBe(0);
    expect(parseLines(r.stdout).map((l) => [l.dir, l.name])).toEqual([
      ['i2t', 'SCSI Command'],
      ['t2i', 'SCSI Data-In'],
    ]);
    // Packet 1 is the tail of a Data-In, packet 2 the next command, packet 3 the next Data-In.
    expect(r.stderr).toMatch(/^conn 0 t2i: resync at packet 3: skipped 260 bytes to the next plausible PDU boundary/);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
  });

  it('garbage, a truncated capture, and a missing file: a message and exit 1, no stack trace', () => {
    const garbage = path.join(dir, 'garbage.pcap');
    writeFileSync(garbage, Buffer.from('this is not a capture file at all\n'));
    let r = runCli([garbage]);
    expect(r.status).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/garbage\.pcap: not a pcap or pcapng file/);
    expect(r.stderr).not.toMatch(/\n\s+at /);

    const conv = new Conversation().handshake();
    session(conv, 2);
    const whole = writePcapng(conv.frames());
    const truncated = path.join(dir, 'truncated.pcapng');
    writeFileSync(truncated, whole.subarray(0, whole.length - 100));
    r = runCli([truncated]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/truncated\.pcapng: truncated pcapng file/);
    expect(r.stderr).not.toMatch(/\n\s+at /);
    // What came before the damage is still printed.
    expect(parseLines(r.stdout).length).toBeGreaterThan(0);

    const badGzip = path.join(dir, 'bad.pcap.gz');
    writeFileSync(badGzip, gzip(whole).subarray(0, 50));
    r = runCli([badGzip]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/corrupt gzip data/);

    r = runCli([path.join(dir, 'does-not-exist.pcap')]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/cannot read .*does-not-exist\.pcap/);
  });

  it('bad arguments are usage errors (exit 2)', () => {
    let r = runCli([]);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/missing FILE/);
    r = runCli(['x.pcap', '--port', 'http']);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/--port/);
    r = runCli(['x.pcap', '--bogus']);
    expect(r.status).toBe(2);
    r = runCli(['--help']);
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/^usage: detour pcap-dump FILE \[--port N\]/);
  });

  it('reads the capture from standard input when FILE is "-"', () => {
    const conv = new Conversation({ addr: '10.0.0.1', port: 40000 }, { addr: '10.0.0.2', port: 3290 }).handshake();
    session(conv, 1);
    const r = runCli(['-', '--port=3290'], gzip(writePcapng(conv.frames())));
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(parseLines(r.stdout).map((l) => l.opcode)).toEqual([0x03, 0x23, 0x01, 0x25]);
  });
});
