// The initiator session against an in-process fake target that scripts the target's side of
// the protocol, to reach the states a real target rarely produces on demand: closed CmdSN
// windows, split Data-In, R2T sequences, Rejects, Asynchronous Messages, redirects, drops.

import net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import {
  AsyncEvent,
  buildCompareAndWrite,
  buildRead10,
  buildSense,
  buildWrite10,
  decodePdu,
  decodeTextData,
  encodePdu,
  encodeTextData,
  LoginStage,
  Negotiator,
  Opcode,
  PduFramer,
  RESERVED_TAG,
  ScsiStatus,
  SenseKey,
  snAdd,
  TmfFunction,
  wrapIscsiSense,
  type DataOut,
  type LocalSettings,
  type LoginRequest,
  type Pdu,
  type PduInit,
  type ScsiCommand,
  type SessionParams,
} from 'iscsi-node-wire';
import {
  CommandAbortedError,
  CommandNotRetriedError,
  CommandRejectedError,
  CommandTimeoutError,
  InitiatorSession,
  LoginError,
  SessionClosedError,
  type AsyncEventMessage,
  type InitiatorOptions,
} from '../src/back/index.ts';

const BLOCK = 512;

interface FakeOptions {
  /** MaxCmdSN - ExpCmdSN + 1 granted after each command. */
  window?: number;
  settings?: Partial<LocalSettings>;
  redirect?: { portal: string; permanent: boolean };
  loginStatus?: number;
  /** Return true when the command was handled (answered or deliberately left unanswered). */
  onCommand?: (c: FakeConn, cmd: ScsiCommand) => boolean;
  onPdu?: (c: FakeConn, pdu: Pdu) => boolean;
  onLogin?: (c: FakeConn) => void;
}

interface WriteState {
  cmd: ScsiCommand;
  buf: Buffer;
  got: number;
  unsolicitedDone: boolean;
  ttt: number;
  r2tSN: number;
}

class FakeTarget {
  readonly conns: FakeConn[] = [];
  readonly loginRequests: LoginRequest[] = [];
  logins = 0;
  readonly disk = Buffer.alloc(1024 * BLOCK);
  private readonly sockets = new Set<net.Socket>();

  private constructor(
    readonly server: net.Server,
    readonly port: number,
    readonly opts: FakeOptions,
  ) {
    for (let i = 0; i < this.disk.length; i++) this.disk[i] = (i * 31 + 7) & 0xff;
  }

  static async start(opts: FakeOptions = {}): Promise<FakeTarget> {
    let target: FakeTarget | undefined;
    const server = net.createServer((sock) => {
      target!.sockets.add(sock);
      sock.on('close', () => target!.sockets.delete(sock));
      target!.conns.push(new FakeConn(target!, sock));
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    target = new FakeTarget(server, (server.address() as net.AddressInfo).port, opts);
    return target;
  }

  get portal(): string {
    return `127.0.0.1:${this.port}`;
  }

  get last(): FakeConn {
    return this.conns[this.conns.length - 1]!;
  }

  /** Stops accepting and drops every connection. */
  async stop(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

class FakeConn {
  statSN = 5000;
  expCmdSN = 0;
  /** When set, the MaxCmdSN to report instead of the window rule. */
  maxCmdSNOverride: number | undefined;
  params: SessionParams | undefined;
  readonly received: Pdu[] = [];
  readonly dataOuts: DataOut[] = [];
  private readonly framer = new PduFramer({ maxRecvDataSegmentLength: 8192 });
  private negotiator: Negotiator | undefined;
  private readonly writes = new Map<number, WriteState>();
  private nextTtt = 0x100;
  closed = false;

  constructor(
    readonly target: FakeTarget,
    readonly socket: net.Socket,
  ) {
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('close', () => (this.closed = true));
    socket.on('error', () => {});
  }

  get window(): { expCmdSN: number; maxCmdSN: number } {
    const w = this.target.opts.window ?? 64;
    return { expCmdSN: this.expCmdSN, maxCmdSN: this.maxCmdSNOverride ?? snAdd(this.expCmdSN, w - 1) };
  }

  commands(): ScsiCommand[] {
    return this.received.filter((p): p is ScsiCommand => p.opcode === Opcode.ScsiCommand);
  }

  send(p: PduInit): void {
    if (this.closed) return;
    for (const b of encodePdu(p)) this.socket.write(b);
  }

  takeStatSN(): number {
    const s = this.statSN;
    this.statSN = snAdd(this.statSN, 1);
    return s;
  }

  respond(itt: number, status: number, o: { sense?: Buffer; underflow?: number; overflow?: number; expDataSN?: number } = {}): void {
    this.send({
      opcode: Opcode.ScsiResponse,
      bidiOverflow: false,
      bidiUnderflow: false,
      overflow: o.overflow !== undefined,
      underflow: o.underflow !== undefined,
      response: 0,
      status,
      itt,
      snackTag: 0,
      statSN: this.takeStatSN(),
      ...this.window,
      expDataSN: o.expDataSN ?? 0,
      bidiReadResidualCount: 0,
      residualCount: o.underflow ?? o.overflow ?? 0,
      data: o.sense ? wrapIscsiSense(o.sense) : Buffer.alloc(0),
    });
  }

  dataIn(itt: number, lun: number, data: Buffer, offset: number, dataSN: number, final: boolean, status?: number): void {
    const withStatus = status !== undefined;
    this.send({
      opcode: Opcode.DataIn,
      final,
      acknowledge: false,
      overflow: false,
      underflow: false,
      statusPresent: withStatus,
      status: status ?? 0,
      lun,
      itt,
      ttt: RESERVED_TAG,
      statSN: withStatus ? this.takeStatSN() : this.statSN,
      ...this.window,
      dataSN,
      bufferOffset: offset,
      residualCount: 0,
      data,
    });
  }

  nopIn(ttt: number): void {
    this.send({ opcode: Opcode.NopIn, lun: 0, itt: RESERVED_TAG, ttt, statSN: this.statSN, ...this.window });
  }

  asyncMessage(event: number, p: { parameter1?: number; parameter2?: number; parameter3?: number; sense?: Buffer; lun?: number } = {}): void {
    this.send({
      opcode: Opcode.AsyncMessage,
      lun: p.lun ?? 0,
      itt: RESERVED_TAG,
      statSN: this.takeStatSN(),
      ...this.window,
      asyncEvent: event,
      asyncVCode: 0,
      parameter1: p.parameter1 ?? 0,
      parameter2: p.parameter2 ?? 0,
      parameter3: p.parameter3 ?? 0,
      data: p.sense ? wrapIscsiSense(p.sense) : Buffer.alloc(0),
    });
  }

  /** Serves a read from the fake disk, in Data-In PDUs of `pduSize` bytes, status in the last. */
  serveRead(cmd: ScsiCommand, pduSize?: number): void {
    const lba = cmd.cdb.readUInt32BE(2);
    const blocks = cmd.cdb.readUInt16BE(7);
    const bytes = this.target.disk.subarray(lba * BLOCK, (lba + blocks) * BLOCK);
    const seg = pduSize ?? this.params!.maxSendDataSegmentLength;
    let sn = 0;
    for (let o = 0; o < bytes.length; o += seg) {
      const end = Math.min(o + seg, bytes.length);
      this.dataIn(cmd.itt, cmd.lun, bytes.subarray(o, end), o, sn++, end === bytes.length, end === bytes.length ? ScsiStatus.GOOD : undefined);
    }
    if (bytes.length === 0) this.respond(cmd.itt, ScsiStatus.GOOD);
  }

  private onData(chunk: Buffer): void {
    this.framer.push(chunk);
    for (let out = this.framer.next(); out; out = this.framer.next()) {
      if (out.error) throw out.error;
      const pdu = decodePdu(out.frame.header, out.frame.data);
      this.received.push(pdu);
      if (pdu.opcode === Opcode.LoginRequest) this.onLogin(pdu);
      else this.onFullFeature(pdu);
    }
  }

  private onLogin(req: LoginRequest): void {
    const t = this.target;
    t.loginRequests.push(req);
    this.expCmdSN = req.cmdSN;
    const base = {
      opcode: Opcode.LoginResponse,
      versionMax: 0,
      versionActive: 0,
      isid: req.isid,
      itt: req.itt,
      statSN: this.statSN,
    } as const;
    if (t.opts.redirect || t.opts.loginStatus) {
      const status = t.opts.redirect ? (t.opts.redirect.permanent ? 0x0102 : 0x0101) : t.opts.loginStatus!;
      this.send({
        ...base,
        ...this.window,
        transit: false,
        continue: false,
        csg: req.csg,
        nsg: 0,
        tsih: 0,
        statusClass: status >> 8,
        statusDetail: status & 0xff,
        data: t.opts.redirect ? encodeTextData([['TargetAddress', `${t.opts.redirect.portal},1`]]) : Buffer.alloc(0),
      });
      this.socket.end();
      return;
    }
    if (!this.negotiator) {
      this.negotiator = new Negotiator({ role: 'target', settings: t.opts.settings ?? {}, identity: { targetPortalGroupTag: 1 } });
      if (req.csg === LoginStage.Operational) this.negotiator.enterStage('operational');
    }
    const step = this.negotiator.step(decodeTextData(req.data));
    const final = req.transit && req.nsg === LoginStage.FullFeature;
    // The hook runs before the final response goes out, so it can shape the window it carries.
    if (final) t.opts.onLogin?.(this);
    this.send({
      ...base,
      ...this.window,
      transit: req.transit,
      continue: false,
      csg: req.csg,
      nsg: req.transit ? req.nsg : 0,
      tsih: final ? 0x42 : 0,
      statusClass: 0,
      statusDetail: 0,
      data: encodeTextData(step.reply),
    });
    this.statSN = snAdd(this.statSN, 1);
    if (req.transit) {
      if (req.nsg === LoginStage.Operational) this.negotiator.enterStage('operational');
      if (final) {
        this.negotiator.enterStage('full-feature');
        this.params = this.negotiator.params();
        this.framer.maxRecvDataSegmentLength = this.params.maxRecvDataSegmentLength;
        t.logins++;
      }
    }
  }

  private onFullFeature(pdu: Pdu): void {
    if ((pdu.opcode === Opcode.ScsiCommand || pdu.opcode === Opcode.TaskMgmtRequest || pdu.opcode === Opcode.TextRequest || pdu.opcode === Opcode.LogoutRequest) && !pdu.immediate) {
      this.expCmdSN = snAdd(pdu.cmdSN, 1);
    }
    if (this.target.opts.onPdu?.(this, pdu)) return;
    switch (pdu.opcode) {
      case Opcode.NopOut:
        if (pdu.itt !== RESERVED_TAG) {
          this.send({ opcode: Opcode.NopIn, lun: 0, itt: pdu.itt, ttt: RESERVED_TAG, statSN: this.takeStatSN(), ...this.window, data: pdu.data });
        }
        return;
      case Opcode.ScsiCommand:
        if (this.target.opts.onCommand?.(this, pdu)) return;
        this.defaultCommand(pdu);
        return;
      case Opcode.DataOut:
        this.dataOuts.push(pdu);
        this.onDataOut(pdu);
        return;
      case Opcode.TaskMgmtRequest:
        this.send({ opcode: Opcode.TaskMgmtResponse, response: 0, itt: pdu.itt, statSN: this.takeStatSN(), ...this.window });
        return;
      case Opcode.LogoutRequest:
        this.send({ opcode: Opcode.LogoutResponse, response: 0, itt: pdu.itt, statSN: this.takeStatSN(), ...this.window, time2Wait: 0, time2Retain: 0 });
        this.socket.end();
        return;
      case Opcode.TextRequest:
        this.send({ opcode: Opcode.TextResponse, final: true, continue: false, lun: 0, itt: pdu.itt, ttt: RESERVED_TAG, statSN: this.takeStatSN(), ...this.window, data: encodeTextData([['MaxRecvDataSegmentLength', '4096']]) });
        return;
      default:
        return;
    }
  }

  private defaultCommand(cmd: ScsiCommand): void {
    const op = cmd.cdb[0]!;
    if (op === 0x28) return this.serveRead(cmd);
    if (op === 0x2a || op === 0x89) {
      const st: WriteState = { cmd, buf: Buffer.alloc(cmd.expectedDataTransferLength), got: 0, unsolicitedDone: cmd.final, ttt: RESERVED_TAG, r2tSN: 0 };
      cmd.data.copy(st.buf, 0);
      st.got = cmd.data.length;
      this.writes.set(cmd.itt, st);
      this.advanceWrite(st);
      return;
    }
    if (op === 0x00) return this.respond(cmd.itt, ScsiStatus.GOOD);
    this.respond(cmd.itt, ScsiStatus.CHECK_CONDITION, { sense: buildSense({ key: SenseKey.ILLEGAL_REQUEST, asc: 0x20, ascq: 0 }) });
  }

  private onDataOut(d: DataOut): void {
    const st = this.writes.get(d.itt);
    if (!st) return;
    d.data.copy(st.buf, d.bufferOffset);
    st.got = Math.max(st.got, d.bufferOffset + d.data.length);
    if (d.final) {
      if (d.ttt === RESERVED_TAG) st.unsolicitedDone = true;
      st.ttt = RESERVED_TAG;
      this.advanceWrite(st);
    }
  }

  /** Solicits the rest of a write one burst at a time (MaxOutstandingR2T 1), then completes it. */
  private advanceWrite(st: WriteState): void {
    if (!st.unsolicitedDone || st.ttt !== RESERVED_TAG) return;
    const total = st.buf.length;
    if (st.got < total) {
      const len = Math.min(this.params!.maxBurstLength, total - st.got);
      st.ttt = this.nextTtt++;
      this.send({
        opcode: Opcode.R2T,
        lun: st.cmd.lun,
        itt: st.cmd.itt,
        ttt: st.ttt,
        statSN: this.statSN,
        ...this.window,
        r2tSN: st.r2tSN++,
        bufferOffset: st.got,
        desiredDataTransferLength: len,
      });
      return;
    }
    this.writes.delete(st.cmd.itt);
    const lba = st.cmd.cdb.readUInt32BE(2);
    st.buf.copy(this.target.disk, lba * BLOCK);
    this.respond(st.cmd.itt, ScsiStatus.GOOD);
  }
}

const targets: FakeTarget[] = [];
const sessions: InitiatorSession[] = [];

async function fake(opts: FakeOptions = {}): Promise<FakeTarget> {
  const t = await FakeTarget.start(opts);
  targets.push(t);
  return t;
}

async function connect(t: FakeTarget, o: Partial<InitiatorOptions> = {}): Promise<InitiatorSession> {
  const s = await InitiatorSession.connect({
    portal: t.portal,
    targetName: 'iqn.2024-01.test:fake',
    initiatorName: 'iqn.2024-01.test:unit',
    reconnect: { initialDelayMs: 10, maxDelayMs: 50, maxAttempts: 20 },
    ...o,
  });
  sessions.push(s);
  return s;
}

async function waitFor(cond: () => boolean, ms = 3000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('condition not reached in time');
    await new Promise((r) => setTimeout(r, 5));
  }
}

function pattern(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 13 + seed * 101) & 0xff;
  return b;
}

afterEach(async () => {
  for (const s of sessions.splice(0)) s.close();
  for (const t of targets.splice(0)) await t.stop();
});

describe('login', () => {
  it('negotiates the parameters and logs in with a random-type ISID', async () => {
    const t = await fake({ settings: { maxRecvDataSegmentLength: 4096, maxBurstLength: 65536, firstBurstLength: 16384 } });
    const s = await connect(t, { maxRecvDataSegmentLength: 131072 });
    expect(s.tsih).toBe(0x42);
    expect(s.targetPortalGroupTag).toBe(1);
    expect(s.params.maxSendDataSegmentLength).toBe(4096);
    expect(s.params.maxRecvDataSegmentLength).toBe(131072);
    expect(s.params.maxBurstLength).toBe(65536);
    expect(s.params.firstBurstLength).toBe(16384);
    const first = t.loginRequests[0]!;
    expect(first.isid[0]! >> 6).toBe(0b10);
    expect(first.tsih).toBe(0);
    expect(first.csg).toBe(LoginStage.Security);
    const text = Object.fromEntries(decodeTextData(first.data));
    expect(text.InitiatorName).toBe('iqn.2024-01.test:unit');
    expect(text.TargetName).toBe('iqn.2024-01.test:fake');
    expect(text.AuthMethod).toBe('None');
  });

  it('reports target and initiator errors as LoginError with the status code', async () => {
    const t1 = await fake({ loginStatus: 0x0203 });
    const e1 = await connect(t1).catch((e: unknown) => e);
    expect(e1).toBeInstanceOf(LoginError);
    expect((e1 as LoginError).status).toBe(0x0203);
    expect((e1 as LoginError).statusText).toBe('Not found');
    const t2 = await fake({ loginStatus: 0x0301 });
    const e2 = (await connect(t2).catch((e: unknown) => e)) as LoginError;
    expect(e2.status).toBe(0x0301);
    expect(e2.statusClass).toBe(3);
  });

  it('follows a permanent redirect and reconnects to the new portal', async () => {
    const b = await fake();
    const a = await fake({ redirect: { portal: b.portal, permanent: true } });
    const s = await connect(a);
    expect(s.connectedPortal).toBe(b.portal);
    expect(s.persistentPortal).toBe(b.portal);
    b.last.socket.destroy();
    await new Promise<void>((r) => s.once('reconnect', () => r()));
    expect(a.loginRequests).toHaveLength(1);
    expect(b.logins).toBe(2);
  });

  it('after a temporary redirect, reconnects through the original portal', async () => {
    const b = await fake();
    const a = await fake({ redirect: { portal: b.portal, permanent: false } });
    const s = await connect(a);
    expect(s.connectedPortal).toBe(b.portal);
    expect(s.persistentPortal).toBe(a.portal);
    b.last.socket.destroy();
    await new Promise<void>((r) => s.once('reconnect', () => r()));
    expect(a.loginRequests).toHaveLength(2);
    expect(b.logins).toBe(2);
    const data = await s.read(0, 3, 2, BLOCK);
    expect(data.equals(b.disk.subarray(3 * BLOCK, 5 * BLOCK))).toBe(true);
  });
});

describe('data transfer', () => {
  it('reassembles a read from several Data-In PDUs with status in a SCSI Response and reports residuals', async () => {
    const t = await fake({
      onCommand: (c, cmd) => {
        const bytes = c.target.disk.subarray(0, 3000);
        c.dataIn(cmd.itt, cmd.lun, bytes.subarray(0, 1000), 0, 0, false);
        c.dataIn(cmd.itt, cmd.lun, bytes.subarray(1000, 2200), 1000, 1, false);
        c.dataIn(cmd.itt, cmd.lun, bytes.subarray(2200, 3000), 2200, 2, true);
        c.respond(cmd.itt, ScsiStatus.GOOD, { underflow: 4096 - 3000, expDataSN: 3 });
        return true;
      },
    });
    const s = await connect(t);
    const r = await s.command(0, buildRead10(0, 8), { dataInLength: 4096 });
    expect(r.status).toBe(ScsiStatus.GOOD);
    expect(r.data!.equals(t.disk.subarray(0, 3000))).toBe(true);
    expect(r.residual).toEqual({ overflow: false, underflow: true, count: 1096 });
  });

  it('drops the connection on a DataSN gap and re-issues the read on the new connection', async () => {
    let first = true;
    const t = await fake({
      onCommand: (c, cmd) => {
        if (!first) return false;
        first = false;
        const bytes = c.target.disk.subarray(0, 2048);
        c.dataIn(cmd.itt, cmd.lun, bytes.subarray(0, 1024), 0, 0, false);
        c.dataIn(cmd.itt, cmd.lun, bytes.subarray(1024), 1024, 2, true, ScsiStatus.GOOD); // DataSN 1 missing
        return true;
      },
    });
    const s = await connect(t);
    const data = await s.read(0, 0, 4, BLOCK);
    expect(data.equals(t.disk.subarray(0, 2048))).toBe(true);
    expect(t.logins).toBe(2);
    expect(s.stats.reissued).toBe(1);
  });

  it('sends immediate data, unsolicited Data-Out up to FirstBurstLength, then answers R2Ts within MaxBurstLength', async () => {
    const t = await fake({ settings: { maxRecvDataSegmentLength: 1024, firstBurstLength: 4096, maxBurstLength: 8192, initialR2T: false, immediateData: true } });
    const s = await connect(t);
    expect(s.params.initialR2T).toBe(false);
    const buf = pattern(40 * BLOCK, 3);
    await s.write(0, 10, buf, BLOCK);
    expect(t.disk.subarray(10 * BLOCK, 50 * BLOCK).equals(buf)).toBe(true);
    const cmd = t.last.commands()[0]!;
    expect(cmd.data.length).toBe(1024);
    expect(cmd.final).toBe(false);
    const outs = t.last.dataOuts;
    const unsolicited = outs.filter((d) => d.ttt === RESERVED_TAG);
    expect(unsolicited.map((d) => [d.bufferOffset, d.data.length, d.dataSN, d.final])).toEqual([
      [1024, 1024, 0, false],
      [2048, 1024, 1, false],
      [3072, 1024, 2, true],
    ]);
    const solicited = outs.filter((d) => d.ttt !== RESERVED_TAG);
    // Two R2Ts: 8192 bytes from 4096, then the remaining 8192 from 12288; DataSN restarts per R2T.
    expect(solicited.map((d) => d.ttt)).toEqual([...Array(8).fill(0x100), ...Array(8).fill(0x101)]);
    expect(solicited.map((d) => d.dataSN)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7]);
    expect(solicited.filter((d) => d.final).map((d) => d.bufferOffset)).toEqual([11264, 19456]);
    expect(solicited.every((d) => d.data.length <= 1024)).toBe(true);
  });

  it('with InitialR2T=Yes and ImmediateData=No waits for an R2T before sending any data', async () => {
    const t = await fake({ settings: { initialR2T: true, immediateData: false, maxRecvDataSegmentLength: 8192 } });
    const s = await connect(t);
    const buf = pattern(6 * BLOCK, 9);
    await s.write(0, 100, buf, BLOCK);
    const cmd = t.last.commands()[0]!;
    expect(cmd.data.length).toBe(0);
    expect(cmd.final).toBe(true);
    expect(t.last.dataOuts.every((d) => d.ttt !== RESERVED_TAG)).toBe(true);
    expect(t.disk.subarray(100 * BLOCK, 106 * BLOCK).equals(buf)).toBe(true);
  });
});

describe('CmdSN window', () => {
  it('keeps one command in flight when the target grants a window of one', async () => {
    let outstanding = 0;
    let maxOutstanding = 0;
    const t = await fake({
      window: 1,
      onCommand: (c, cmd) => {
        outstanding++;
        maxOutstanding = Math.max(maxOutstanding, outstanding);
        setTimeout(() => {
          outstanding--;
          c.serveRead(cmd);
        }, 15);
        return true;
      },
    });
    const s = await connect(t);
    const reads = await Promise.all([0, 1, 2, 3, 4].map((i) => s.read(0, i * 2, 2, BLOCK)));
    reads.forEach((d, i) => expect(d.equals(t.disk.subarray(i * 2 * BLOCK, (i * 2 + 2) * BLOCK))).toBe(true));
    expect(maxOutstanding).toBe(1);
    const sns = t.last.commands().map((c) => c.cmdSN);
    expect(sns).toEqual([0, 1, 2, 3, 4].map((i) => snAdd(sns[0]!, i)));
  });

  it('holds commands while the window is closed and sends them when a NOP-In opens it', async () => {
    let conn: FakeConn | undefined;
    const t = await fake({
      onLogin: (c) => {
        conn = c;
        c.maxCmdSNOverride = snAdd(c.expCmdSN, 0xffff_ffff); // MaxCmdSN = ExpCmdSN - 1: closed
      },
    });
    const s = await connect(t);
    const p = s.read(0, 7, 1, BLOCK);
    await new Promise((r) => setTimeout(r, 100));
    expect(conn!.commands()).toHaveLength(0);
    conn!.maxCmdSNOverride = undefined;
    conn!.nopIn(RESERVED_TAG);
    const data = await p;
    expect(data.equals(t.disk.subarray(7 * BLOCK, 8 * BLOCK))).toBe(true);
    expect(conn!.commands()).toHaveLength(1);
  });
});

describe('target-initiated traffic', () => {
  it("answers the target's NOP-In ping with its TTT and the reserved ITT", async () => {
    const t = await fake();
    await connect(t);
    t.last.nopIn(0x1234);
    await waitFor(() => t.last.received.some((p) => p.opcode === Opcode.NopOut));
    const nop = t.last.received.find((p) => p.opcode === Opcode.NopOut)!;
    expect(nop.opcode === Opcode.NopOut && [nop.ttt, nop.itt, nop.immediate]).toEqual([0x1234, RESERVED_TAG, true]);
  });

  it('pings an idle target and reconnects when the ping goes unanswered', async () => {
    let answer = true;
    const t = await fake({ onPdu: (_c, pdu) => pdu.opcode === Opcode.NopOut && !answer });
    // A timeout well above a busy host's event-loop stalls: an answered ping must never look lost.
    const s = await connect(t, { nopIntervalMs: 40, nopTimeoutMs: 1000 });
    await waitFor(() => t.last.received.some((p) => p.opcode === Opcode.NopOut && p.itt !== RESERVED_TAG));
    const ping = t.last.received.find((p) => p.opcode === Opcode.NopOut)!;
    expect(ping.opcode === Opcode.NopOut && ping.ttt).toBe(RESERVED_TAG);
    expect(t.logins).toBe(1);
    answer = false;
    await new Promise<void>((r) => s.once('reconnect', () => r()));
    expect(t.logins).toBe(2);
  });

  it('logs out and logs in again when the target requests a logout, holding new commands meanwhile', async () => {
    const events: AsyncEventMessage[] = [];
    let asked = false;
    const t = await fake({
      onCommand: (c, cmd) => {
        if (asked) return false;
        asked = true;
        c.asyncMessage(AsyncEvent.RequestLogout, { parameter3: 5 });
        setTimeout(() => c.serveRead(cmd), 50);
        return true;
      },
    });
    const s = await connect(t);
    s.on('async', (m: AsyncEventMessage) => events.push(m));
    const first = s.read(0, 0, 1, BLOCK);
    await waitFor(() => events.length === 1);
    const second = s.read(0, 1, 1, BLOCK);
    const reconnected = new Promise<void>((r) => s.once('reconnect', () => r()));
    expect((await first).equals(t.disk.subarray(0, BLOCK))).toBe(true);
    expect((await second).equals(t.disk.subarray(BLOCK, 2 * BLOCK))).toBe(true);
    await reconnected;
    expect(events[0]!.event).toBe(AsyncEvent.RequestLogout);
    const [c1, c2] = t.conns;
    expect(c1!.commands()).toHaveLength(1);
    expect(c1!.received.some((p) => p.opcode === Opcode.LogoutRequest && p.reasonCode === 0)).toBe(true);
    expect(c2!.commands()).toHaveLength(1);
    expect(c2!.commands()[0]!.cdb.readUInt32BE(2)).toBe(1);
    // Same ISID, TSIH 0: the new login reinstates the session.
    expect(t.loginRequests.at(-1)!.isid.equals(t.loginRequests[0]!.isid)).toBe(true);
    expect(t.loginRequests.at(-1)!.tsih).toBe(0);
  });

  it('surfaces a SCSI asynchronous event with its sense data', async () => {
    const t = await fake();
    const s = await connect(t);
    const got = new Promise<AsyncEventMessage>((r) => s.once('async', r));
    t.last.asyncMessage(AsyncEvent.ScsiAsyncEvent, { lun: 3, sense: buildSense({ key: SenseKey.UNIT_ATTENTION, asc: 0x2a, ascq: 0x09 }) });
    const m = await got;
    expect([m.event, m.lun, m.sense?.key, m.sense?.asc, m.sense?.ascq]).toEqual([0, 3, SenseKey.UNIT_ATTENTION, 0x2a, 0x09]);
  });

  it('renegotiates MaxRecvDataSegmentLength when the target asks for it', async () => {
    const t = await fake();
    const s = await connect(t);
    expect(s.params.maxSendDataSegmentLength).toBe(8192);
    t.last.asyncMessage(AsyncEvent.RequestNegotiation);
    await waitFor(() => s.params.maxSendDataSegmentLength === 4096);
    const text = t.last.received.find((p) => p.opcode === Opcode.TextRequest)!;
    expect(decodeTextData(text.data)).toEqual([['MaxRecvDataSegmentLength', '262144']]);
  });

  it('fails the command a Reject refers to', async () => {
    const t = await fake({
      onCommand: (c, cmd) => {
        const header = encodePdu(cmd)[0]!.subarray(0, 48);
        c.send({ opcode: Opcode.Reject, reason: 0x09, itt: RESERVED_TAG, statSN: c.takeStatSN(), ...c.window, dataSN: 0, data: header });
        return true;
      },
    });
    const s = await connect(t);
    const err = await s.command(0, buildRead10(0, 1), { dataInLength: BLOCK }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CommandRejectedError);
    expect((err as CommandRejectedError).reason).toBe(0x09);
  });
});

describe('recovery', () => {
  it('re-issues reads and writes after a drop but fails COMPARE AND WRITE with a typed error', async () => {
    let dropped = false;
    const t = await fake({
      onCommand: (c, cmd) => {
        if (dropped) return false;
        if (c.commands().length === 3) {
          dropped = true;
          c.socket.destroy();
        }
        return true; // the first connection never answers
      },
    });
    const s = await connect(t);
    const cawData = pattern(2 * BLOCK, 5);
    const w = pattern(BLOCK, 6);
    const caw = s.command(0, buildCompareAndWrite(20, 1), { dataOut: cawData });
    const read = s.read(0, 30, 1, BLOCK);
    const write = s.write(0, 40, w, BLOCK);
    const cawErr = await caw.catch((e: unknown) => e);
    expect(cawErr).toBeInstanceOf(CommandNotRetriedError);
    expect((cawErr as CommandNotRetriedError).opcode).toBe(0x89);
    expect((await read).equals(t.disk.subarray(30 * BLOCK, 31 * BLOCK))).toBe(true);
    await write;
    expect(t.disk.subarray(40 * BLOCK, 41 * BLOCK).equals(w)).toBe(true);
    const second = t.conns[1]!.commands().map((c) => c.cdb[0]);
    expect(second.sort()).toEqual([0x28, 0x2a]);
    expect(s.stats.reissued).toBe(2);
  });

  it('gives up after maxAttempts and fails what is pending with SessionClosedError', async () => {
    const t = await fake({ onCommand: () => true });
    const s = await connect(t, { reconnect: { initialDelayMs: 5, maxDelayMs: 10, maxAttempts: 2 } });
    const closed = new Promise<Error | undefined>((r) => s.once('close', r));
    const p = s.read(0, 0, 1, BLOCK);
    await waitFor(() => t.last.commands().length === 1);
    await t.stop();
    targets.splice(targets.indexOf(t), 1);
    const err = await p.catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SessionClosedError);
    expect(await closed).toBeInstanceOf(Error);
    expect(s.isClosed).toBe(true);
  });
});

describe('task management', () => {
  it('abortTask sends ABORT TASK for the command and fails it', async () => {
    const t = await fake({ onCommand: () => true });
    const s = await connect(t);
    let itt = -1;
    const p = s.command(0, buildRead10(0, 1), { dataInLength: BLOCK, onItt: (x) => (itt = x) });
    await waitFor(() => t.last.commands().length === 1);
    const rsp = await s.abortTask(0, itt);
    expect(rsp).toBe(0);
    const err = await p.catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CommandAbortedError);
    const tmf = t.last.received.find((x) => x.opcode === Opcode.TaskMgmtRequest)!;
    expect(tmf.opcode === Opcode.TaskMgmtRequest && [tmf.function, tmf.referencedTaskTag, tmf.refCmdSN, tmf.immediate]).toEqual([
      TmfFunction.AbortTask,
      itt,
      t.last.commands()[0]!.cmdSN,
      true,
    ]);
  });

  it('times a command out through ABORT TASK', async () => {
    const t = await fake({ onCommand: () => true });
    const s = await connect(t, { commandTimeoutMs: 80 });
    const err = await s.command(0, buildWrite10(0, 1), { dataOut: pattern(BLOCK, 1) }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CommandTimeoutError);
    expect(t.last.received.filter((x) => x.opcode === Opcode.TaskMgmtRequest)).toHaveLength(1);
  });

  it('lunReset fails the commands in flight to that LUN only', async () => {
    const t = await fake({ onCommand: (c, cmd) => cmd.lun === 2 });
    const s = await connect(t);
    const onLun2 = s.command(2, buildRead10(0, 1), { dataInLength: BLOCK });
    await waitFor(() => t.last.commands().length === 1);
    expect(await s.lunReset(2)).toBe(0);
    expect(await onLun2.catch((e: unknown) => e)).toBeInstanceOf(CommandAbortedError);
    const ok = await s.command(1, buildRead10(4, 1), { dataInLength: BLOCK });
    expect(ok.data!.equals(t.disk.subarray(4 * BLOCK, 5 * BLOCK))).toBe(true);
    const tmf = t.last.received.find((x) => x.opcode === Opcode.TaskMgmtRequest)!;
    expect(tmf.opcode === Opcode.TaskMgmtRequest && [tmf.function, tmf.lun]).toEqual([TmfFunction.LogicalUnitReset, 2]);
  });

  it('an AbortSignal removes a queued command without involving the target', async () => {
    const t = await fake({ onLogin: (c) => (c.maxCmdSNOverride = snAdd(c.expCmdSN, 0xffff_ffff)) });
    const s = await connect(t);
    const ac = new AbortController();
    const p = s.command(0, buildRead10(0, 1), { dataInLength: BLOCK, signal: ac.signal });
    ac.abort();
    expect(await p.catch((e: unknown) => e)).toBeInstanceOf(CommandAbortedError);
    expect(t.last.commands()).toHaveLength(0);
    expect(t.last.received.filter((x) => x.opcode === Opcode.TaskMgmtRequest)).toHaveLength(0);
  });
});

describe('logout', () => {
  it('waits for outstanding commands, sends Logout and emits close', async () => {
    const t = await fake({
      onCommand: (c, cmd) => {
        setTimeout(() => c.serveRead(cmd), 30);
        return true;
      },
    });
    const s = await connect(t);
    const closed = new Promise<unknown>((r) => s.once('close', r));
    const p = s.read(0, 2, 1, BLOCK);
    await s.logout();
    expect((await p).equals(t.disk.subarray(2 * BLOCK, 3 * BLOCK))).toBe(true);
    expect(await closed).toBeUndefined();
    const logout = t.last.received.find((x) => x.opcode === Opcode.LogoutRequest)!;
    expect(logout.opcode === Opcode.LogoutRequest && logout.reasonCode).toBe(0);
    await expect(s.read(0, 0, 1, BLOCK)).rejects.toBeInstanceOf(SessionClosedError);
  });
});
