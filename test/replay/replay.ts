// Capture replay: plays the initiator side of recorded iSCSI sessions against a live target and
// compares every answer with the recorded one. It exists to check that whatever stands where the
// recorded target stood (tgtd here, detour later) answers like it: same status, same sense, same
// data, same negotiated keys.
//
// Fields that legitimately differ between two runs are mapped or ignored:
//   - StatSN: each connection's base differs; requests get ExpStatSN rebased, answers are compared
//     by their offset from the first StatSN of the connection;
//   - TSIH and ISID-derived values: assigned by the target;
//   - TTT: the target's own tags; R2T/NOP-In TTTs are learned and mapped into the Data-Out and
//     NOP-Out PDUs that echo them;
//   - CHAP_I/CHAP_C: fresh per login, so CHAP_R is recomputed from the known secret;
//   - TargetAddress: names the live portal instead of the recorded one.
import { createHash } from 'node:crypto';
import net from 'node:net';
import {
  decodePdu,
  encodePdu,
  opcodeName,
  PduFramer,
  RESERVED_TAG,
  type Pdu,
  type PduInit,
} from 'iscsi-node-wire';

export interface RecordedPdu {
  conn: number;
  dir: 'i2t' | 't2i';
  header: Buffer;
  data: Buffer;
}

export interface ReplayOptions {
  host: string;
  port: number;
  /** The portal the recording was made against, as it appears in TargetAddress values. */
  recordedPortal: string;
  /** CHAP user name → secret, for recomputing CHAP_R. */
  chapSecrets?: Record<string, string>;
  /** How long to wait for each answer the recording says should come. */
  answerTimeoutMs?: number;
}

export interface Mismatch {
  /** Position of the recorded PDU in the capture's PDU sequence. */
  index: number;
  conn: number;
  pdu: string;
  field: string;
  recorded: unknown;
  live: unknown;
}

export interface ReplayReport {
  sent: number;
  compared: number;
  mismatches: Mismatch[];
}

function parseKeys(data: Buffer): Map<string, string> {
  const m = new Map<string, string>();
  for (const kv of data.toString('latin1').split('\0')) {
    if (!kv) continue;
    const eq = kv.indexOf('=');
    m.set(eq < 0 ? kv : kv.slice(0, eq), eq < 0 ? '' : kv.slice(eq + 1));
  }
  return m;
}

function encodeKeys(m: Map<string, string>): Buffer {
  return Buffer.from([...m].map(([k, v]) => `${k}=${v}\0`).join(''), 'latin1');
}

function binary(v: string): Buffer {
  if (/^0[xX]/.test(v)) return Buffer.from(v.slice(2), 'hex');
  if (/^0[bB]/.test(v)) return Buffer.from(v.slice(2), 'base64');
  throw new Error(`not a CHAP binary value: ${v}`);
}

function chapMd5(id: number, secret: string, challenge: Buffer): string {
  const h = createHash('md5').update(Buffer.from([id])).update(secret, 'latin1').update(challenge).digest();
  return '0x' + h.toString('hex');
}

class LiveConnection {
  readonly framer = new PduFramer({ maxRecvDataSegmentLength: 1 << 24 });
  private readonly queue: Pdu[] = [];
  private waiter: (() => void) | undefined;
  closed = false;
  error: Error | undefined;
  statSNDelta: number | undefined;
  readonly ttt = new Map<number, number>();
  readonly tsih = new Map<number, number>();
  digests = { headerDigest: false, dataDigest: false };
  pendingDigests: { headerDigest: boolean; dataDigest: boolean } | undefined;
  /** Last CHAP_I/CHAP_C seen, recorded and live, to redo CHAP_R. */
  recordedChallenge: { id: number; c: Buffer } | undefined;
  liveChallenge: { id: number; c: Buffer } | undefined;

  constructor(readonly socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.framer.push(chunk);
      for (let o = this.framer.next(); o; o = this.framer.next()) {
        if (o.error) {
          this.error = o.error;
          continue;
        }
        const pdu = decodePdu(o.frame.header, o.frame.data);
        this.queue.push(pdu);
        if (pdu.opcode === 0x23) this.noteLoginResponse(pdu);
      }
      this.waiter?.();
    });
    socket.on('close', () => {
      this.closed = true;
      this.waiter?.();
    });
    socket.on('error', (e) => {
      this.error = e;
    });
  }

  /** Digests start with the first PDU after the final Login Response, in both directions. */
  private noteLoginResponse(p: Extract<Pdu, { opcode: 0x23 }>): void {
    const keys = parseKeys(p.data);
    const hd = keys.get('HeaderDigest');
    const dd = keys.get('DataDigest');
    const prev = this.pendingDigests ?? { headerDigest: false, dataDigest: false };
    this.pendingDigests = {
      headerDigest: hd === undefined ? prev.headerDigest : hd === 'CRC32C',
      dataDigest: dd === undefined ? prev.dataDigest : dd === 'CRC32C',
    };
    if (p.transit && p.nsg === 3 && p.statusClass === 0) {
      this.digests = this.pendingDigests;
      this.framer.headerDigest = this.digests.headerDigest;
      this.framer.dataDigest = this.digests.dataDigest;
    }
  }

  async next(timeoutMs: number): Promise<Pdu | undefined> {
    const deadline = Date.now() + timeoutMs;
    while (this.queue.length === 0) {
      if (this.closed) return undefined;
      const left = deadline - Date.now();
      if (left <= 0) return undefined;
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.waiter = undefined;
    }
    return this.queue.shift();
  }

  get extra(): Pdu[] {
    return this.queue;
  }

  send(p: PduInit): void {
    this.socket.cork();
    for (const b of encodePdu(p, this.digests)) this.socket.write(b);
    this.socket.uncork();
  }
}

/** The fields of an answer that must agree, with the legitimately differing ones left out. */
function comparable(p: Pdu, recordedPortal: string, livePortal: string, live: boolean): Record<string, unknown> {
  const o: Record<string, unknown> = { ...p };
  delete o.ttt;
  delete o.tsih;
  delete o.isid;
  delete o.statSN;
  delete o.flags; // every bit of byte 1 is compared through its named field
  if (p.opcode === 0x23 || p.opcode === 0x24) {
    const keys = parseKeys(p.data);
    for (const k of ['CHAP_I', 'CHAP_C', 'CHAP_N', 'CHAP_R']) if (keys.has(k)) keys.set(k, '(varies)');
    for (const [k, v] of keys) if (k === 'TargetAddress' && !live) keys.set(k, v.replace(recordedPortal, livePortal));
    o.data = Object.fromEntries(keys);
    delete o.dataSegmentLength; // follows from the keys, whose length may differ (addresses)
  } else if (p.opcode === 0x3f) {
    // The rejected header carries our rebased ExpStatSN and the target's TTT.
    const h = Buffer.from(p.data);
    if (h.length >= 32) h.fill(0, 20, 24).fill(0, 28, 32);
    o.data = h.toString('hex');
  } else {
    o.data = p.data.toString('hex');
  }
  return o;
}

export async function replay(recorded: RecordedPdu[], opts: ReplayOptions): Promise<ReplayReport> {
  const timeout = opts.answerTimeoutMs ?? 10_000;
  const livePortal = `${opts.host}:${opts.port}`;
  const conns = new Map<number, LiveConnection>();
  const lastIndex = new Map<number, number>();
  recorded.forEach((r, i) => lastIndex.set(r.conn, i));
  const report: ReplayReport = { sent: 0, compared: 0, mismatches: [] };
  const mismatch = (m: Mismatch) => report.mismatches.push(m);

  const open = async (id: number): Promise<LiveConnection> => {
    const socket = net.connect({ host: opts.host, port: opts.port });
    socket.setNoDelay(true);
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    const c = new LiveConnection(socket);
    conns.set(id, c);
    return c;
  };

  try {
    for (let i = 0; i < recorded.length; i++) {
      const r = recorded[i]!;
      const rec = decodePdu(r.header, r.data);
      let c = conns.get(r.conn);
      if (r.dir === 'i2t') {
        if (!c) c = await open(r.conn);
        if (c.closed) {
          mismatch({ index: i, conn: r.conn, pdu: opcodeName(rec.opcode), field: 'connection', recorded: 'open', live: 'closed by target' });
          continue;
        }
        c.send(rewriteRequest(rec, c, opts));
        report.sent++;
      } else {
        if (!c) throw new Error(`capture has a target PDU on connection ${r.conn} before any initiator PDU`);
        const live = await c.next(timeout);
        const name = opcodeName(rec.opcode);
        if (!live) {
          mismatch({ index: i, conn: r.conn, pdu: name, field: 'presence', recorded: name, live: c.closed ? 'connection closed' : `nothing within ${timeout} ms` });
          continue;
        }
        report.compared++;
        learn(rec, live, c);
        if ('statSN' in rec && 'statSN' in live && !(rec.opcode === 0x25 && !rec.statusPresent)) {
          const delta = (live.statSN - rec.statSN) >>> 0;
          if (c.statSNDelta === undefined) c.statSNDelta = delta;
          else if (delta !== c.statSNDelta)
            mismatch({ index: i, conn: r.conn, pdu: name, field: 'statSN (relative)', recorded: rec.statSN, live: (live.statSN - c.statSNDelta) >>> 0 });
        }
        const a = comparable(rec, opts.recordedPortal, livePortal, false);
        const b = comparable(live, opts.recordedPortal, livePortal, true);
        for (const k of new Set([...Object.keys(a), ...Object.keys(b)])) {
          if (JSON.stringify(a[k]) !== JSON.stringify(b[k])) mismatch({ index: i, conn: r.conn, pdu: name, field: k, ...summarize(a[k], b[k]) });
        }
      }
      if (lastIndex.get(r.conn) === i && c && !c.closed) {
        // The recording has nothing more on this connection: nothing more may arrive either.
        await new Promise((res) => setTimeout(res, 20));
        for (const extra of c.extra)
          mismatch({ index: i, conn: r.conn, pdu: opcodeName(extra.opcode), field: 'presence', recorded: 'nothing', live: opcodeName(extra.opcode) });
        c.socket.destroy();
      }
    }
  } finally {
    for (const c of conns.values()) c.socket.destroy();
  }
  return report;
}

/** Long hex payloads are reported by their first difference, not in full. */
function summarize(recorded: unknown, live: unknown): { recorded: unknown; live: unknown } {
  if (typeof recorded !== 'string' || typeof live !== 'string' || recorded.length + live.length < 200) return { recorded, live };
  let i = 0;
  while (i < recorded.length && recorded[i] === live[i]) i++;
  const at = i - (i % 2);
  return {
    recorded: `${recorded.length / 2} bytes, from byte ${at / 2}: ${recorded.slice(at, at + 32)}`,
    live: `${live.length / 2} bytes, from byte ${at / 2}: ${live.slice(at, at + 32)}`,
  };
}

/** Records what the target assigned so later requests can echo the live values. */
function learn(rec: Pdu, live: Pdu, c: LiveConnection): void {
  if ('ttt' in rec && 'ttt' in live && rec.ttt !== RESERVED_TAG) c.ttt.set(rec.ttt, live.ttt);
  if (rec.opcode === 0x23 && live.opcode === 0x23) {
    if (rec.tsih !== 0) c.tsih.set(rec.tsih, live.tsih);
    const rk = parseKeys(rec.data);
    const lk = parseKeys(live.data);
    const ri = rk.get('CHAP_I');
    const li = lk.get('CHAP_I');
    if (ri !== undefined && li !== undefined) {
      c.recordedChallenge = { id: Number(ri), c: binary(rk.get('CHAP_C')!) };
      c.liveChallenge = { id: Number(li), c: binary(lk.get('CHAP_C')!) };
    }
  }
}

function rewriteRequest(rec: Pdu, c: LiveConnection, opts: ReplayOptions): PduInit {
  const p = { ...rec };
  const n = p as unknown as Record<string, number>;
  if ('expStatSN' in p && c.statSNDelta !== undefined) n.expStatSN = (p.expStatSN + c.statSNDelta) >>> 0;
  if ('ttt' in p && p.ttt !== RESERVED_TAG) n.ttt = c.ttt.get(p.ttt) ?? p.ttt;
  if (p.opcode === 0x03) {
    if (p.tsih !== 0) p.tsih = c.tsih.get(p.tsih) ?? p.tsih;
    const keys = parseKeys(p.data);
    const r = keys.get('CHAP_R');
    const user = keys.get('CHAP_N');
    if (r !== undefined && user !== undefined && c.recordedChallenge && c.liveChallenge) {
      const secret = opts.chapSecrets?.[user];
      if (secret === undefined) throw new Error(`no CHAP secret for user ${user}`);
      const recordedWasRight = chapMd5(c.recordedChallenge.id, secret, c.recordedChallenge.c).toLowerCase() === r.toLowerCase();
      // A recorded wrong answer stays wrong: answer with a secret that cannot be the right one.
      keys.set('CHAP_R', chapMd5(c.liveChallenge.id, recordedWasRight ? secret : `${secret}!wrong`, c.liveChallenge.c));
      p.data = encodeKeys(keys);
    }
  }
  return p;
}
