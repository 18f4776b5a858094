// A deliberately thin iSCSI client for tests that need to put exact bytes on the wire: malformed,
// truncated or out-of-order PDUs that a real initiator library would refuse to produce. It frames
// and decodes what the target sends back, does a minimal normal-session login, and otherwise
// leaves every protocol decision to the test.
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import {
  decodePdu,
  decodeTextData,
  encodePdu,
  encodeTextData,
  LoginStage,
  Opcode,
  PduFramer,
  RESERVED_TAG,
  snAdd,
  unwrapIscsiSense,
  type DataIn,
  type DigestSettings,
  type LoginResponse,
  type NopIn,
  type Pdu,
  type PduInit,
  type ScsiResponse,
  type TextPair,
} from 'iscsi-node-wire';

const DEFAULT_TIMEOUT_MS = 5000;
const TARGET_DECLARATIONS = new Set(['TargetAlias', 'TargetPortalGroupTag', 'TargetAddress', 'MaxRecvDataSegmentLength']);

export class RawTimeoutError extends Error {
  override readonly name = 'RawTimeoutError';
}

export class RawClosedError extends Error {
  override readonly name = 'RawClosedError';
}

export interface RawLoginOptions {
  initiatorName: string;
  /** Omit for a discovery session. */
  targetName?: string;
  isid?: Buffer;
  tsih?: number;
  cid?: number;
  /** Keys added to (or replacing) the defaults, e.g. [['HeaderDigest', 'CRC32C']]. */
  keys?: TextPair[];
  /** Version-max / Version-min of every Login Request; default 0 / 0. */
  versionMax?: number;
  versionMin?: number;
  timeoutMs?: number;
}

export interface RawLoginResult {
  /** The last Login Response received. */
  response: LoginResponse;
  /** Status-Class << 8 | Status-Detail of that response. */
  status: number;
  /** True when the connection is now in full feature phase. */
  loggedIn: boolean;
  tsih: number;
  /** Every key the target sent during the login. */
  targetKeys: Map<string, string>;
}

export interface CommandResult {
  response: ScsiResponse | undefined;
  status: number;
  /** Data-In gathered, in buffer-offset order. */
  data: Buffer;
  sense: Buffer | undefined;
  /** Every PDU that belonged to the command, in arrival order. */
  pdus: Pdu[];
}

/** Deterministic bytes from a seed (mulberry32), so "random" inputs are the same on every run. */
export function seededBytes(seed: number, length: number): Buffer {
  const out = Buffer.allocUnsafe(length);
  let a = seed >>> 0;
  for (let i = 0; i < length; i++) {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    out[i] = ((t ^ (t >>> 14)) >>> 0) & 0xff;
  }
  return out;
}

/** An ISID of the "random" qualifier type (T = 10b), so concurrent test sessions never collide. */
export function randomIsid(): Buffer {
  const isid = randomBytes(6);
  isid[0] = 0x80 | (isid[0]! & 0x3f);
  return isid;
}

export class RawIscsiClient {
  readonly pdus: Pdu[] = [];
  /** Why the framer gave up on the target's byte stream, if it did. */
  framingError: Error | undefined;
  closed = false;
  closedAt = 0;
  /**
   * Taken before the TCP connect starts, so no later than the target's accept: a lifetime measured
   * from here is never shorter than the target's own timers, however late the connect callback runs.
   */
  readonly openedAt: number;
  /** Digests of what we send, and of what we expect to receive. */
  digests: DigestSettings = { headerDigest: false, dataDigest: false };
  isid: Buffer = randomIsid();
  tsih = 0;
  cid = 0;
  cmdSN = 1;
  expStatSN = 0;
  expCmdSN = 1;
  maxCmdSN = 1;
  /** Answer the target's NOP-In pings, so an idle session is not dropped mid-test. */
  answerPings = true;
  private nextItt = 0x100;
  private readonly framer = new PduFramer({ maxRecvDataSegmentLength: 8192 });
  private waiters: Array<() => void> = [];
  private pendingDigests: DigestSettings = { headerDigest: false, dataDigest: false };
  private recvLimit = 262_144;
  private writeError: Error | undefined;

  private constructor(
    readonly socket: net.Socket,
    openedAt: number,
  ) {
    this.openedAt = openedAt;
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => {
      this.writeError = err;
    });
    socket.on('close', () => {
      this.closed = true;
      this.closedAt = Date.now();
      this.wake();
    });
  }

  /** Opens a TCP connection. `allowHalfOpen` keeps our side writable after the target's FIN. */
  static connect(host: string, port: number, opts: { allowHalfOpen?: boolean; localAddress?: string } = {}): Promise<RawIscsiClient> {
    return new Promise((resolve, reject) => {
      const openedAt = Date.now();
      const socket = net.connect({ host, port, allowHalfOpen: opts.allowHalfOpen ?? false, localAddress: opts.localAddress });
      socket.once('error', reject);
      socket.once('connect', () => {
        socket.off('error', reject);
        resolve(new RawIscsiClient(socket, openedAt));
      });
    });
  }

  /** The socket error seen so far (ECONNRESET, EPIPE...), if any. */
  get socketError(): Error | undefined {
    return this.writeError;
  }

  allocItt(): number {
    const itt = this.nextItt;
    this.nextItt = this.nextItt >= 0x7fff_ffff ? 0x100 : this.nextItt + 1;
    return itt;
  }

  // ------------------------------------------------------------------------------------------
  // sending

  /** Writes bytes exactly as given. */
  send(bytes: Buffer): void {
    if (!this.socket.destroyed && this.socket.writable) this.socket.write(bytes);
  }

  /**
   * Encodes a PDU with the session's digests; `corrupt` flips one bit of the header or data
   * digest (which must then be in use) so the target sees a digest mismatch.
   */
  encode(p: PduInit, corrupt: { headerDigest?: boolean; dataDigest?: boolean } = {}): Buffer {
    const bytes = Buffer.concat(encodePdu(p, this.digests));
    if (corrupt.headerDigest) {
      if (!this.digests.headerDigest) throw new Error('no header digest in use to corrupt');
      const ahs = bytes[4]! * 4;
      bytes[48 + ahs] = bytes[48 + ahs]! ^ 0x01;
    }
    if (corrupt.dataDigest) {
      if (!this.digests.dataDigest || !p.data || p.data.length === 0) throw new Error('no data digest in this PDU to corrupt');
      bytes[bytes.length - 1] = bytes[bytes.length - 1]! ^ 0x80;
    }
    return bytes;
  }

  /** Encodes and sends a PDU; returns the bytes sent (their first 48 are what a Reject echoes). */
  sendPdu(p: PduInit, corrupt: { headerDigest?: boolean; dataDigest?: boolean } = {}): Buffer {
    const bytes = this.encode(p, corrupt);
    this.send(bytes);
    return bytes;
  }

  /** Half-closes our side (FIN). */
  end(): void {
    this.socket.end();
  }

  /** Drops the connection at once. */
  destroy(): void {
    this.socket.destroy();
  }

  // ------------------------------------------------------------------------------------------
  // receiving

  private onData(chunk: Buffer): void {
    this.framer.push(chunk);
    for (let out = this.framer.next(); out; out = this.framer.next()) {
      if (out.error) {
        this.framingError = out.error;
        if (out.fatal) {
          this.socket.destroy();
          break;
        }
        continue;
      }
      let pdu: Pdu;
      try {
        pdu = decodePdu(out.frame.header, out.frame.data);
      } catch (err) {
        this.framingError = err as Error;
        this.socket.destroy();
        break;
      }
      this.track(pdu);
      if (this.answerPings && pdu.opcode === Opcode.NopIn && pdu.itt === RESERVED_TAG && pdu.ttt !== RESERVED_TAG) {
        this.sendPdu({ opcode: Opcode.NopOut, immediate: true, itt: RESERVED_TAG, ttt: pdu.ttt, lun: pdu.lun, cmdSN: this.cmdSN, expStatSN: this.expStatSN });
        continue;
      }
      this.pdus.push(pdu);
    }
    this.wake();
  }

  /** Sequence numbers, and the digests that start with the PDU after the final Login Response. */
  private track(pdu: Pdu): void {
    switch (pdu.opcode) {
      case Opcode.LoginResponse: {
        for (const [k, v] of safeText(pdu.data)) {
          if (k === 'HeaderDigest') this.pendingDigests.headerDigest = v === 'CRC32C';
          if (k === 'DataDigest') this.pendingDigests.dataDigest = v === 'CRC32C';
        }
        if (pdu.statusClass === 0) {
          this.expStatSN = snAdd(pdu.statSN, 1);
          this.expCmdSN = pdu.expCmdSN;
          this.maxCmdSN = pdu.maxCmdSN;
          if (pdu.transit && pdu.nsg === LoginStage.FullFeature) {
            this.tsih = pdu.tsih;
            this.digests = { ...this.pendingDigests };
            this.framer.headerDigest = this.digests.headerDigest;
            this.framer.dataDigest = this.digests.dataDigest;
            this.framer.maxRecvDataSegmentLength = this.recvLimit;
          }
        }
        return;
      }
      case Opcode.ScsiResponse:
      case Opcode.TaskMgmtResponse:
      case Opcode.TextResponse:
      case Opcode.LogoutResponse:
      case Opcode.Reject:
      case Opcode.AsyncMessage:
        this.expStatSN = snAdd(pdu.statSN, 1);
        this.window(pdu.expCmdSN, pdu.maxCmdSN);
        return;
      case Opcode.NopIn:
        if (pdu.itt !== RESERVED_TAG) this.expStatSN = snAdd(pdu.statSN, 1);
        this.window(pdu.expCmdSN, pdu.maxCmdSN);
        return;
      case Opcode.DataIn:
        if (pdu.statusPresent) this.expStatSN = snAdd(pdu.statSN, 1);
        this.window(pdu.expCmdSN, pdu.maxCmdSN);
        return;
      case Opcode.R2T:
        this.window(pdu.expCmdSN, pdu.maxCmdSN);
        return;
      default:
        return;
    }
  }

  private window(expCmdSN: number, maxCmdSN: number): void {
    this.expCmdSN = expCmdSN;
    this.maxCmdSN = maxCmdSN;
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  private changed(deadline: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(finish, Math.max(0, deadline - Date.now()));
      function finish(): void {
        clearTimeout(timer);
        resolve();
      }
      this.waiters.push(finish);
    });
  }

  /**
   * Removes and returns the first received PDU that matches (any PDU by default). Rejects with
   * RawClosedError when the connection closes first, RawTimeoutError after `timeoutMs`.
   */
  async next<P extends Pdu = Pdu>(match: (p: Pdu) => boolean = () => true, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<P> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.pdus.findIndex(match);
      if (i >= 0) return this.pdus.splice(i, 1)[0] as P;
      if (this.closed) throw new RawClosedError(`connection closed; ${this.pdus.length} other PDUs unclaimed`);
      if (Date.now() >= deadline) throw new RawTimeoutError(`no matching PDU in ${timeoutMs} ms`);
      await this.changed(deadline);
    }
  }

  /** Everything received within `ms` from now (including what is already queued); removes it. */
  async drain(ms: number): Promise<Pdu[]> {
    const deadline = Date.now() + ms;
    while (!this.closed && Date.now() < deadline) await this.changed(deadline);
    return this.pdus.splice(0);
  }

  /**
   * Waits for the target to close the connection; returns the PDUs it sent before and how long
   * the connection lived. Rejects with RawTimeoutError if it is still open after `timeoutMs`.
   */
  async waitClosed(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<{ pdus: Pdu[]; lifetimeMs: number }> {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed) {
      if (Date.now() >= deadline) throw new RawTimeoutError(`connection still open after ${timeoutMs} ms`);
      await this.changed(deadline);
    }
    return { pdus: this.pdus.splice(0), lifetimeMs: this.closedAt - this.openedAt };
  }

  // ------------------------------------------------------------------------------------------
  // login and a few full-feature conveniences

  /**
   * A normal-session login straight from the operational stage to full feature phase (no
   * security stage, no CHAP). Keys the target proposes on its own are accepted as offered.
   * Resolves with the last Login Response; `loggedIn` tells whether the login succeeded.
   */
  async login(o: RawLoginOptions): Promise<RawLoginResult> {
    this.isid = o.isid ?? this.isid;
    this.tsih = o.tsih ?? 0;
    this.cid = o.cid ?? 0;
    const timeoutMs = o.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const keys = new Map<string, string>([
      ['InitiatorName', o.initiatorName],
      ...(o.targetName !== undefined ? ([['TargetName', o.targetName]] as TextPair[]) : []),
      ['SessionType', o.targetName !== undefined ? 'Normal' : 'Discovery'],
      ['HeaderDigest', 'None'],
      ['DataDigest', 'None'],
      ['MaxRecvDataSegmentLength', String(this.recvLimit)],
      ['ErrorRecoveryLevel', '0'],
      ['MaxConnections', '1'],
    ]);
    for (const [k, v] of o.keys ?? []) keys.set(k, v);
    const mrdsl = Number(keys.get('MaxRecvDataSegmentLength'));
    if (Number.isInteger(mrdsl) && mrdsl > 0) this.recvLimit = mrdsl;
    const sent = new Set(keys.keys());
    const targetKeys = new Map<string, string>();
    const itt = this.allocItt();
    let text: TextPair[] = [...keys];
    for (let step = 0; step < 8; step++) {
      this.sendPdu({
        opcode: Opcode.LoginRequest, transit: true, continue: false, csg: LoginStage.Operational, nsg: LoginStage.FullFeature,
        versionMax: o.versionMax ?? 0, versionMin: o.versionMin ?? 0, isid: this.isid, tsih: this.tsih, cid: this.cid, itt,
        cmdSN: this.cmdSN, expStatSN: this.expStatSN, data: text.length ? encodeTextData(text) : undefined,
      });
      const rsp = await this.next<LoginResponse>((p) => p.opcode === Opcode.LoginResponse, timeoutMs);
      const status = (rsp.statusClass << 8) | rsp.statusDetail;
      if (rsp.statusClass !== 0) return { response: rsp, status, loggedIn: false, tsih: rsp.tsih, targetKeys };
      const answer: TextPair[] = [];
      for (const [k, v] of safeText(rsp.data)) {
        targetKeys.set(k, v);
        // A key we never sent is the target's own proposal: accept its value. Its declarations
        // about itself need no answer.
        if (!sent.has(k) && !TARGET_DECLARATIONS.has(k)) {
          sent.add(k);
          answer.push([k, v]);
        }
      }
      if (rsp.transit && rsp.nsg === LoginStage.FullFeature) {
        this.cmdSN = rsp.expCmdSN;
        return { response: rsp, status, loggedIn: true, tsih: rsp.tsih, targetKeys };
      }
      text = answer;
    }
    throw new Error('login did not reach full feature phase in 8 exchanges');
  }

  /** NOP-Out ping (immediate, with an ITT) and its NOP-In echo: proof the connection is in sync. */
  async ping(data: Buffer = Buffer.alloc(0), timeoutMs = DEFAULT_TIMEOUT_MS): Promise<NopIn> {
    const itt = this.allocItt();
    this.sendPdu({ opcode: Opcode.NopOut, immediate: true, itt, ttt: RESERVED_TAG, lun: 0, cmdSN: this.cmdSN, expStatSN: this.expStatSN, data });
    return this.next<NopIn>((p) => p.opcode === Opcode.NopIn && p.itt === itt, timeoutMs);
  }

  /** Sends a SCSI command with the session's next CmdSN (or `cmdSN`); returns its ITT. */
  sendCommand(o: { lun: number; cdb: Buffer; read?: boolean; write?: boolean; edtl?: number; immediateData?: Buffer; final?: boolean; cmdSN?: number; itt?: number }): number {
    const itt = o.itt ?? this.allocItt();
    const cdb = Buffer.alloc(16);
    o.cdb.copy(cdb);
    const cmdSN = o.cmdSN ?? this.cmdSN;
    if (o.cmdSN === undefined) this.cmdSN = snAdd(this.cmdSN, 1);
    this.sendPdu({
      opcode: Opcode.ScsiCommand, itt, final: o.final ?? true, read: o.read ?? false, write: o.write ?? false, attr: 1, lun: o.lun,
      expectedDataTransferLength: o.edtl ?? 0, cmdSN, expStatSN: this.expStatSN, cdb, data: o.immediateData,
    });
    return itt;
  }

  /** Collects a command's Data-In and status. */
  async result(itt: number, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<CommandResult> {
    const pdus: Pdu[] = [];
    const chunks: DataIn[] = [];
    for (;;) {
      const p = await this.next((x) => (x.opcode === Opcode.DataIn || x.opcode === Opcode.ScsiResponse) && x.itt === itt, timeoutMs);
      pdus.push(p);
      if (p.opcode === Opcode.DataIn) {
        chunks.push(p);
        if (!p.statusPresent) continue;
        return { response: undefined, status: p.status, data: gather(chunks), sense: undefined, pdus };
      }
      if (p.opcode === Opcode.ScsiResponse) {
        return { response: p, status: p.status, data: gather(chunks), sense: unwrapIscsiSense(p.data), pdus };
      }
    }
  }
}

function gather(chunks: DataIn[]): Buffer {
  const sorted = [...chunks].sort((a, b) => a.bufferOffset - b.bufferOffset);
  return Buffer.concat(sorted.map((c) => c.data));
}

/** Login text that does not parse counts as no keys: the test looks at the status instead. */
function safeText(data: Buffer): TextPair[] {
  try {
    return data.length ? decodeTextData(data) : [];
  } catch {
    return [];
  }
}
