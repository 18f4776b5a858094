import type net from 'node:net';
import type { Logger } from 'pino';
import {
  AsyncEvent,
  decodePdu,
  encodePdu,
  LogoutReason,
  LogoutResponseCode,
  Opcode,
  PduReceiver,
  readDataSegmentLength,
  RejectReason,
  RESERVED_TAG,
  snAdd,
  snInWindow,
  TmfFunction,
  TmfResponse,
  WireError,
  type DataOut,
  type DigestSettings,
  type Frame,
  type LoginRequest,
  type LogoutRequest,
  type NopOut,
  type Pdu,
  type PduInit,
  type ScsiCommand,
  type TaskMgmtRequest,
  type TextRequest,
} from 'iscsi-node-wire';
import { Asc, buildSense, SenseKey, wrapIscsiSense } from '../../protocol/src/scsi/sense.ts';
import { BufferPool, dataBuffers } from '../scsi/buffer-pool.ts';
import type { ScsiOutcome } from '../scsi/task.ts';
import { FrontTask } from './task.ts';
import type { LoginController, LoginOutcome } from './login.ts';
import type { FrontSession, SessionTable } from './session.ts';
import type { FrontLimits, OperationalParams, TargetDirectory } from './types.ts';
import { TextResponder } from './text.ts';

export interface ConnectionHost {
  directory: TargetDirectory;
  sessions: SessionTable;
  limits: FrontLimits;
  logger: Logger;
  newLogin(conn: FrontConnection): LoginController;
  /** Called once a connection enters full feature phase, and when it closes. */
  onSessionEvent?(event: 'login' | 'logout', conn: FrontConnection): void;
}

type State = 'login' | 'full-feature' | 'logged-out' | 'closed';

const CHECK_CONDITION = 0x02;
/** How long a connection we ended (refused login, logout) waits for the peer's FIN. */
const LINGER_MS = 2000;

/**
 * One initiator connection to the portal: login, then full feature phase. Everything that
 * belongs to RFC 7143's transport lives here: StatSN, the CmdSN window (through the session),
 * R2T and Data-Out handling, Data-In splitting and residuals, task management, NOP keepalives,
 * text requests, logout, Reject for bad PDUs. SCSI semantics are the device's.
 */
export class FrontConnection {
  state: State = 'login';
  session: FrontSession | undefined;
  cid = 0;
  private statSN = 0;
  private readonly rx: PduReceiver;
  private digests: DigestSettings = { headerDigest: false, dataDigest: false };
  private readonly tasks = new Map<number, FrontTask>();
  private readonly byTtt = new Map<number, FrontTask>();
  private nextTtt = 1;
  private login: LoginController | undefined;
  private loginTimer: NodeJS.Timeout | undefined;
  private nopTimer: NodeJS.Timeout | undefined;
  /** PDUs received; the keepalive timer compares it with its value at the previous check. */
  private pdusHeard = 0;
  private pdusHeardAtCheck = 0;
  private quietChecks = 0;
  private nopDeadline: NodeJS.Timeout | undefined;
  private outstandingPingTtt: number | undefined;
  private readonly text: TextResponder;
  /** CmdSNs a task management request aborted before the command itself arrived. */
  private readonly abortedCmdSNs = new Set<number>();
  readonly log: Logger;
  readonly remote: string;

  /**
   * `rx` is given when the socket already reads into it (Node's `onread`, see Portal); without
   * it the connection makes its own and feeds it from 'data' events.
   */
  constructor(
    readonly socket: net.Socket,
    readonly host: ConnectionHost,
    rx?: PduReceiver,
  ) {
    this.remote = `${socket.remoteAddress}:${socket.remotePort}`;
    this.log = host.logger.child({ remote: this.remote });
    this.rx = rx ?? FrontConnection.newReceiver(host);
    this.rx.onFrame = (frame) => this.onFrame(frame);
    this.rx.onError = (err, fatal) => this.onWireError(err, fatal);
    this.rx.sink = (header, length) => this.dataOutDestination(header, length);
    this.text = new TextResponder(this);
    socket.setNoDelay(true);
    if (!rx) socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => this.log.debug({ err: err.message }, 'socket error'));
    socket.on('close', () => this.onClose());
    this.login = host.newLogin(this);
    this.loginTimer = setTimeout(() => {
      this.log.warn('login did not complete in time; closing');
      this.close();
    }, host.limits.loginTimeoutMs);
  }

  get params(): OperationalParams | undefined {
    return this.session?.params;
  }

  /** Local address the initiator reached us on: what SendTargets should name. */
  get localAddress(): { host: string; port: number } {
    return { host: this.socket.localAddress ?? '127.0.0.1', port: this.socket.localPort ?? 3260 };
  }

  // ------------------------------------------------------------------------------------------
  // receive path

  /** A receiver for a connection of this host: login limits now, the negotiated ones later. */
  static newReceiver(host: ConnectionHost): PduReceiver {
    return new PduReceiver({ maxRecvDataSegmentLength: 8192, hardCap: host.limits.maxRecvDataSegmentLength });
  }

  /** Set while an asynchronous step (a login that opens a backend session) holds the input. */
  private blocked = false;

  /** Bytes the socket read into the receiver's buffer (onread). */
  onRead(n: number): void {
    // After a refused login or a logout only our FIN is left to go: whatever the peer still
    // sends is not parsed, so it cannot pile up.
    if (this.state === 'closed' || this.state === 'logged-out') return;
    this.rx.onRead(n);
    if (this.state === 'login') this.pumpLogin();
  }

  private onData(chunk: Buffer): void {
    if (this.state === 'closed' || this.state === 'logged-out') return;
    this.rx.push(chunk);
    if (this.state === 'login') this.pumpLogin();
  }

  /**
   * Login PDUs are taken one at a time, each answered before the next is parsed: the last one
   * switches digests and limits for whatever follows it, even in the same segment. Streaming
   * starts out here, never inside a frame callback, so the receiver is not re-entered.
   */
  private pumpLogin(): void {
    while (this.state === 'login' && !this.blocked && this.rx.pull()) {
      // each pull delivers (and answers) one PDU
    }
    if (this.state === 'full-feature' && this.rx.isHeld) this.rx.startStreaming();
  }

  private onWireError(err: WireError, fatal: boolean): void {
    if (this.state === 'closed' || this.state === 'logged-out') return;
    if (fatal) {
      this.log.warn({ kind: err.kind, err: err.message }, 'framing error; closing connection');
      this.close();
      return;
    }
    if (this.state === 'login') {
      this.close();
      return;
    }
    this.onDataDigestError(err);
  }

  private onFrame(frame: Frame): void {
    if (this.state === 'closed' || this.state === 'logged-out') return;
    let pdu: Pdu;
    try {
      pdu = decodePdu(frame.header, frame.data);
    } catch (err) {
      const e = err as WireError;
      this.log.warn({ kind: e.kind, err: e.message }, 'malformed PDU');
      if (this.state === 'login') {
        this.close();
        return;
      }
      this.reject(e.kind === 'unknown-opcode' ? RejectReason.CommandNotSupported : RejectReason.InvalidPduField, frame.header);
      return;
    }
    try {
      this.dispatch(pdu, frame.header);
    } catch (err) {
      // A bug handling one PDU must not take the process down; it does end this connection.
      this.log.error({ err }, 'error handling PDU; closing connection');
      this.close();
    }
  }

  /**
   * A Data-Out payload goes straight into its command's buffer when its header says it is the
   * next one expected there; anything else gets a buffer of its own and acceptData judges it.
   */
  private dataOutDestination(header: Buffer, length: number): Buffer | undefined {
    if (this.state !== 'full-feature') return undefined;
    if ((header[0]! & 0x3f) === Opcode.ScsiCommand) {
      // Immediate data of a write: at the start of a pool buffer big enough for the whole
      // transfer (EDTL), so the task neither allocates nor copies it (FrontTask.start).
      if ((header[1]! & 0x20) === 0) return undefined;
      const size = Math.max(length, header.readUInt32BE(20));
      // Past the pool's largest class (16 MiB) the receiver allocates as before.
      if (!BufferPool.pooled(size)) return undefined;
      const whole = dataBuffers.take(size);
      this.pooledPayloads.set(whole.buffer, whole);
      return whole.subarray(0, length);
    }
    if ((header[0]! & 0x3f) !== Opcode.DataOut) return undefined;
    const task = this.taskForDataOut(header.readUInt32BE(16), header.readUInt32BE(20));
    return task?.placeFor(header.readUInt32BE(20), header.readUInt32BE(36), header.readUInt32BE(40), length);
  }

  /** Pool buffers handed to the receiver for immediate data, by their memory, until a task adopts one. */
  private readonly pooledPayloads = new WeakMap<ArrayBufferLike, Buffer>();

  /** The pool buffer a command's immediate data was received into (at its start), for its task. */
  adoptPooledPayload(data: Buffer): Buffer | undefined {
    if (data.length === 0) return undefined;
    const whole = this.pooledPayloads.get(data.buffer);
    if (!whole || data.byteOffset !== whole.byteOffset) return undefined;
    this.pooledPayloads.delete(data.buffer);
    return whole;
  }

  private dispatch(pdu: Pdu, header: Buffer): void {
    this.pdusHeard++;
    if (this.state === 'login') {
      if (pdu.opcode !== Opcode.LoginRequest) {
        this.log.warn({ opcode: pdu.opcode }, 'non-login PDU during login; closing');
        this.close();
        return;
      }
      this.onLoginRequest(pdu);
      return;
    }
    if (this.session?.discovery && (pdu.opcode === Opcode.ScsiCommand || pdu.opcode === Opcode.TaskMgmtRequest || pdu.opcode === Opcode.DataOut)) {
      // A discovery session carries text and logout only (RFC 7143 4.3).
      this.reject(RejectReason.ProtocolError, header);
      return;
    }
    switch (pdu.opcode) {
      case Opcode.NopOut:
        return this.onNopOut(pdu);
      case Opcode.ScsiCommand:
        return this.onScsiCommand(pdu, header);
      case Opcode.TaskMgmtRequest:
        return this.onTaskMgmt(pdu);
      case Opcode.TextRequest:
        return this.onText(pdu);
      case Opcode.DataOut:
        return this.onDataOut(pdu, header);
      case Opcode.LogoutRequest:
        return this.onLogout(pdu);
      case Opcode.SnackRequest:
        // ErrorRecoveryLevel 0: there is nothing to retransmit from.
        return this.reject(RejectReason.ProtocolError, header);
      default:
        // Login in full feature phase, or a target opcode sent by an initiator.
        return this.reject(RejectReason.ProtocolError, header);
    }
  }

  // ------------------------------------------------------------------------------------------
  // login

  private onLoginRequest(pdu: LoginRequest): void {
    const login = this.login!;
    let result: LoginOutcome | Promise<LoginOutcome>;
    try {
      result = login.handle(pdu);
    } catch (err) {
      this.log.error({ err }, 'login handler failed');
      this.close();
      return;
    }
    if (result instanceof Promise) {
      // The final step may wait for the device (e.g. a backend session to the main target):
      // hold further input until it is answered.
      this.blocked = true;
      this.socket.pause();
      result.then(
        (outcome) => {
          this.blocked = false;
          if (this.state === 'closed') return;
          this.finishLogin(pdu, outcome);
          this.socket.resume();
          this.pumpLogin();
        },
        (err: unknown) => {
          this.log.error({ err }, 'login handler failed');
          this.close();
        },
      );
      return;
    }
    this.finishLogin(pdu, result);
  }

  private finishLogin(pdu: LoginRequest, outcome: LoginOutcome): void {
    if (outcome.statSN !== undefined) this.statSN = outcome.statSN;
    this.sendRaw(outcome.response);
    if (outcome.response.opcode === Opcode.LoginResponse && outcome.response.statusClass === 0) this.statSN = snAdd(this.statSN, 1);
    if (outcome.close) {
      this.state = 'closed';
      this.endGracefully();
      return;
    }
    if (outcome.session) {
      clearTimeout(this.loginTimer);
      this.login = undefined;
      this.session = outcome.session;
      this.cid = pdu.cid;
      this.state = 'full-feature';
      const p = outcome.session.params;
      // Digests and the negotiated receive limit start with the next PDU in each direction.
      this.digests = { headerDigest: p.headerDigest, dataDigest: p.dataDigest };
      this.rx.headerDigest = p.headerDigest;
      this.rx.dataDigest = p.dataDigest;
      this.rx.maxRecvDataSegmentLength = p.maxRecvDataSegmentLength;
      this.armNopTimer();
      this.host.onSessionEvent?.('login', this);
    }
  }

  // ------------------------------------------------------------------------------------------
  // sequencing helpers

  private get expCmdSN(): number {
    return this.session?.expCmdSN ?? 0;
  }

  private get maxCmdSN(): number {
    return this.session?.maxCmdSN ?? 0;
  }

  private takeStatSN(): number {
    const s = this.statSN;
    this.statSN = snAdd(this.statSN, 1);
    return s;
  }

  /** Runs `fn` in CmdSN order for non-immediate PDUs; immediate ones run at once. */
  private ordered(pdu: { immediate: boolean; cmdSN: number }, fn: () => void): boolean {
    if (pdu.immediate) {
      fn();
      return true;
    }
    const admitted = this.session!.admit(pdu.cmdSN, () => {
      if (this.abortedCmdSNs.delete(pdu.cmdSN)) return; // aborted before it arrived
      fn();
    });
    if (!admitted) {
      this.log.debug({ cmdSN: pdu.cmdSN, expCmdSN: this.expCmdSN, maxCmdSN: this.maxCmdSN }, 'CmdSN outside the window; ignored');
    }
    return admitted;
  }

  // ------------------------------------------------------------------------------------------
  // NOP

  private onNopOut(pdu: NopOut): void {
    if (pdu.itt === RESERVED_TAG) {
      // The answer to our ping (or a one-way ping): nothing to send back.
      if (pdu.ttt !== RESERVED_TAG && pdu.ttt === this.outstandingPingTtt) {
        this.outstandingPingTtt = undefined;
        clearTimeout(this.nopDeadline);
      }
      return;
    }
    this.ordered(pdu, () => {
      const max = this.params?.maxSendDataSegmentLength ?? 8192;
      this.send({
        opcode: Opcode.NopIn, itt: pdu.itt, ttt: RESERVED_TAG, lun: pdu.lun,
        statSN: this.takeStatSN(), expCmdSN: this.expCmdSN, maxCmdSN: this.maxCmdSN,
        data: pdu.data.subarray(0, max),
      });
    });
  }

  /**
   * Keepalive: a NOP-In after one to one and a half nopInIntervalMs without a PDU from the
   * initiator. A timer checking a PDU count at half the interval, rather than one re-armed for
   * every PDU: re-arming was a measurable cost at tens of thousands of commands a second.
   */
  private armNopTimer(): void {
    const interval = this.host.limits.nopInIntervalMs;
    if (this.state !== 'full-feature' || interval <= 0 || this.nopTimer) return;
    this.pdusHeardAtCheck = this.pdusHeard;
    this.nopTimer = setInterval(() => this.checkIdle(), Math.max(1, interval / 2));
    this.nopTimer.unref();
  }

  private checkIdle(): void {
    if (this.pdusHeard !== this.pdusHeardAtCheck) {
      this.pdusHeardAtCheck = this.pdusHeard;
      this.quietChecks = 0;
      return;
    }
    if (++this.quietChecks < 2) return;
    this.quietChecks = 0;
    this.ping();
  }

  private ping(): void {
    if (this.state !== 'full-feature') return;
    if (this.outstandingPingTtt === undefined) {
      const ttt = this.allocTtt();
      this.outstandingPingTtt = ttt;
      this.send({ opcode: Opcode.NopIn, itt: RESERVED_TAG, ttt, lun: 0, statSN: this.statSN, expCmdSN: this.expCmdSN, maxCmdSN: this.maxCmdSN });
      this.nopDeadline = setTimeout(() => {
        this.log.warn('initiator did not answer NOP-In; closing connection');
        this.close();
      }, this.host.limits.nopInTimeoutMs);
      this.nopDeadline.unref();
    }
  }

  // ------------------------------------------------------------------------------------------
  // SCSI commands and data

  private allocTtt(): number {
    for (;;) {
      const t = this.nextTtt;
      this.nextTtt = this.nextTtt >= 0xfffffffe ? 1 : this.nextTtt + 1;
      if (!this.byTtt.has(t)) return t;
    }
  }

  private onScsiCommand(pdu: ScsiCommand, header: Buffer): void {
    if (this.tasks.has(pdu.itt)) {
      this.log.warn({ itt: pdu.itt }, 'ITT already in use by a task in progress');
      this.reject(RejectReason.InvalidPduField, header);
      return;
    }
    const params = this.params!;
    if (pdu.data.length > 0 && (!pdu.write || !params.immediateData || pdu.data.length > params.firstBurstLength)) {
      this.reject(RejectReason.ProtocolError, header);
      return;
    }
    // The task exists from arrival, so unsolicited Data-Out for a command that waits for a CmdSN
    // gap to fill has somewhere to go; it runs once it is both in order and complete.
    const task = new FrontTask(this, pdu);
    this.tasks.set(pdu.itt, task);
    const admitted = this.ordered(pdu, () => {
      task.delivered = true;
      this.maybeExecute(task);
    });
    if (!admitted) {
      this.tasks.delete(pdu.itt);
      return;
    }
    if (pdu.write && pdu.expectedDataTransferLength > this.host.limits.maxCommandDataLength) {
      task.failEarly(CHECK_CONDITION, buildSense({ key: SenseKey.ILLEGAL_REQUEST, ...Asc.INVALID_FIELD_IN_CDB }));
      return;
    }
    task.start();
    this.maybeExecute(task);
  }

  registerR2T(task: FrontTask): number {
    const ttt = this.allocTtt();
    this.byTtt.set(ttt, task);
    return ttt;
  }

  releaseR2T(ttt: number): void {
    this.byTtt.delete(ttt);
  }

  /** The task a Data-Out belongs to: by TTT when it answers an R2T, by ITT when unsolicited. */
  private taskForDataOut(itt: number, ttt: number): FrontTask | undefined {
    const task = ttt === RESERVED_TAG ? this.tasks.get(itt) : this.byTtt.get(ttt);
    return task && task.itt === itt ? task : undefined;
  }

  private onDataOut(pdu: DataOut, header: Buffer): void {
    const task = this.taskForDataOut(pdu.itt, pdu.ttt);
    if (!task) {
      // Data for a command we ignored, aborted or already failed: drop it quietly.
      this.log.debug({ itt: pdu.itt, ttt: pdu.ttt }, 'Data-Out for no active task');
      return;
    }
    const problem = task.acceptData(pdu);
    if (problem) {
      this.log.warn({ itt: pdu.itt, problem }, 'bad Data-Out');
      this.reject(RejectReason.ProtocolError, header);
      task.failEarly(CHECK_CONDITION, buildSense({ key: SenseKey.ABORTED_COMMAND, ...Asc.DATA_PHASE_ERROR }));
      return;
    }
    this.maybeExecute(task);
  }

  private onDataDigestError(err: WireError): void {
    const h = err.header;
    this.log.warn({ itt: h?.readUInt32BE(16) }, 'data digest error');
    if (!h) return;
    // RFC 7143 7.8: the PDU is discarded and answered with a Reject. For a non-data PDU that is
    // all; the initiator may send it again.
    this.reject(RejectReason.DataDigestError, h);
    if ((h[0]! & 0x3f) !== Opcode.DataOut) return;
    const task = this.taskForDataOut(h.readUInt32BE(16), h.readUInt32BE(20));
    if (!task || task.executing || task.finished) return;
    // ERL 0 cannot ask for the data again (no recovery R2T), so the command fails with "protocol
    // service CRC error", but only once all of its data has arrived (7.8 option b): the initiator
    // is still sending the rest. The header passed its own digest, so its offset, length and F
    // bit still count; the payload is replaced by zeros, as the command will never run.
    task.corrupt = true;
    let standIn: Pdu | undefined;
    try {
      standIn = decodePdu(h, Buffer.alloc(readDataSegmentLength(h)));
    } catch {
      standIn = undefined;
    }
    if (standIn?.opcode !== Opcode.DataOut || task.acceptData(standIn) !== undefined) {
      // Not even the header fits the sequence: no point waiting for more.
      task.failEarly(CHECK_CONDITION, buildSense({ key: SenseKey.ABORTED_COMMAND, ...Asc.PROTOCOL_SERVICE_CRC_ERROR }));
      return;
    }
    this.maybeExecute(task);
  }

  private maybeExecute(task: FrontTask): void {
    if (!task.delivered || !task.dataComplete || task.executing || task.finished) return;
    if (task.corrupt) {
      task.failEarly(CHECK_CONDITION, buildSense({ key: SenseKey.ABORTED_COMMAND, ...Asc.PROTOCOL_SERVICE_CRC_ERROR }));
      return;
    }
    task.executing = true;
    const device = this.session!.target!.device;
    // One reaction for both outcomes: every promise in this chain is paid for on every command.
    task.done = device.execute(task.toScsiTask(this.session!.nexus)).then(
      (outcome) => {
        task.releaseDataOut();
        this.complete(task, outcome);
      },
      (err: unknown) => {
        this.log.error({ err, itt: task.itt }, 'SCSI executor failed');
        this.complete(task, { status: CHECK_CONDITION, sense: buildSense({ key: SenseKey.HARDWARE_ERROR, ...Asc.INTERNAL_TARGET_FAILURE }) });
      },
    );
  }

  /** Sends a task's data and status, with the residuals RFC 7143 11.4.5 describes. */
  complete(task: FrontTask, outcome: ScsiOutcome): void {
    if (task.finished) {
      outcome.release?.();
      return;
    }
    task.finish();
    this.tasks.delete(task.itt);
    if (task.aborted || this.state !== 'full-feature') {
      outcome.release?.();
      return;
    }
    const edtl = task.expectedDataTransferLength;
    let overflow = false;
    let underflow = false;
    let residual = 0;
    let dataIn = outcome.dataIn;
    const dataInLength = task.dataInLength;
    if (task.read && dataIn) {
      if (dataIn.length > dataInLength) {
        overflow = true;
        residual = dataIn.length - dataInLength;
        dataIn = dataIn.subarray(0, dataInLength);
      } else if (dataIn.length < dataInLength) {
        underflow = true;
        residual = dataInLength - dataIn.length;
      }
    } else if (task.read && outcome.status === 0 && !task.write) {
      if (dataInLength > 0) {
        underflow = true;
        residual = dataInLength;
      }
    }
    if (task.write && outcome.dataOutLength !== undefined && !task.read) {
      if (outcome.dataOutLength < edtl) {
        underflow = true;
        residual = edtl - outcome.dataOutLength;
      } else if (outcome.dataOutLength > edtl) {
        overflow = true;
        residual = outcome.dataOutLength - edtl;
      }
    }
    if (outcome.residual) {
      ({ overflow, underflow, count: residual } = outcome.residual);
    }
    const sense = outcome.sense;
    const statusInData = !!dataIn && dataIn.length > 0 && outcome.status === 0 && !sense && (outcome.response ?? 0) === 0;
    if (dataIn && dataIn.length > 0) this.sendDataIn(task, dataIn, statusInData ? { overflow, underflow, residual } : undefined, outcome.release);
    else outcome.release?.();
    if (!statusInData) {
      this.send({
        opcode: Opcode.ScsiResponse, itt: task.itt,
        bidiOverflow: false, bidiUnderflow: false, overflow, underflow,
        response: outcome.response ?? 0, status: outcome.status,
        snackTag: 0, statSN: this.takeStatSN(), expCmdSN: this.expCmdSN, maxCmdSN: this.maxCmdSN,
        expDataSN: task.dataSN + task.r2tSN, bidiReadResidualCount: 0, residualCount: residual,
        data: sense && sense.length > 0 ? wrapIscsiSense(sense) : undefined,
      });
    }
  }

  /** `sent` runs once the kernel has every byte of `data` (or the connection is gone). */
  private sendDataIn(task: FrontTask, data: Buffer, status: { overflow: boolean; underflow: boolean; residual: number } | undefined, sent?: () => void): void {
    const p = this.params!;
    const seg = p.maxSendDataSegmentLength;
    const burst = p.maxBurstLength;
    let off = 0;
    while (off < data.length) {
      const burstEnd = Math.min(data.length, (Math.floor(off / burst) + 1) * burst);
      const len = Math.min(seg, burstEnd - off);
      const end = off + len;
      const last = end === data.length;
      const withStatus = last && status !== undefined;
      this.send({
        opcode: Opcode.DataIn, itt: task.itt, final: end === burstEnd, acknowledge: false,
        overflow: withStatus && status.overflow, underflow: withStatus && status.underflow,
        statusPresent: withStatus, status: 0, lun: task.lun, ttt: RESERVED_TAG,
        statSN: withStatus ? this.takeStatSN() : 0, expCmdSN: this.expCmdSN, maxCmdSN: this.maxCmdSN,
        dataSN: task.dataSN++, bufferOffset: off, residualCount: withStatus ? status.residual : 0,
        data: data.subarray(off, end),
      }, last ? sent : undefined);
      off = end;
    }
  }

  sendR2T(task: FrontTask, ttt: number, offset: number, length: number, r2tSN: number): void {
    this.send({
      opcode: Opcode.R2T, itt: task.itt, ttt, lun: task.lun, statSN: this.statSN, expCmdSN: this.expCmdSN,
      maxCmdSN: this.maxCmdSN, r2tSN, bufferOffset: offset, desiredDataTransferLength: length,
    });
  }

  // ------------------------------------------------------------------------------------------
  // task management

  private onTaskMgmt(pdu: TaskMgmtRequest): void {
    this.ordered(pdu, () => {
      void this.taskMgmt(pdu).then((response) => {
        if (this.state !== 'full-feature') return;
        this.send({ opcode: Opcode.TaskMgmtResponse, itt: pdu.itt, response, statSN: this.takeStatSN(), expCmdSN: this.expCmdSN, maxCmdSN: this.maxCmdSN });
      });
    });
  }

  private async taskMgmt(pdu: TaskMgmtRequest): Promise<number> {
    const session = this.session!;
    const device = session.target!.device;
    const abortWhere = async (pred: (t: FrontTask) => boolean): Promise<void> => {
      const victims = [...this.tasks.values()].filter(pred);
      for (const t of victims) {
        t.abort();
        this.tasks.delete(t.itt);
      }
      // RFC 7143 4.2.3.? : the response follows the termination of every affected task.
      await Promise.allSettled(victims.map((t) => t.done));
    };
    switch (pdu.function) {
      case TmfFunction.AbortTask: {
        const t = this.tasks.get(pdu.referencedTaskTag);
        if (t && t.lun === pdu.lun) {
          await abortWhere((x) => x === t);
          return TmfResponse.Complete;
        }
        // The command may not have arrived yet (it is still inside the window): treat it as
        // aborted so it never runs, and answer Function Complete (RFC 7143 11.5.1).
        if (snInWindow(pdu.refCmdSN, this.expCmdSN, this.maxCmdSN)) {
          this.abortedCmdSNs.add(pdu.refCmdSN);
          return TmfResponse.Complete;
        }
        return TmfResponse.NoSuchTask;
      }
      case TmfFunction.AbortTaskSet:
      case TmfFunction.ClearTaskSet:
        await abortWhere((x) => x.lun === pdu.lun);
        if (pdu.function === TmfFunction.ClearTaskSet && device.reset) return device.reset(session.nexus, 'clear-task-set', pdu.lun);
        return TmfResponse.Complete;
      case TmfFunction.LogicalUnitReset:
        await abortWhere((x) => x.lun === pdu.lun);
        return device.reset ? device.reset(session.nexus, 'lun', pdu.lun) : TmfResponse.Complete;
      case TmfFunction.TargetWarmReset:
      case TmfFunction.TargetColdReset:
        await abortWhere(() => true);
        return device.reset ? device.reset(session.nexus, pdu.function === TmfFunction.TargetWarmReset ? 'target-warm' : 'target-cold', pdu.lun) : TmfResponse.Complete;
      case TmfFunction.TaskReassign:
        return TmfResponse.ReassignNotSupported;
      default:
        return TmfResponse.NotSupported;
    }
  }

  // ------------------------------------------------------------------------------------------
  // text and logout

  private onText(pdu: TextRequest): void {
    this.ordered(pdu, () => this.text.handle(pdu));
  }

  sendText(p: PduInit): void {
    this.send(p);
  }

  nextStatSN(): number {
    return this.takeStatSN();
  }

  windowFields(): { expCmdSN: number; maxCmdSN: number } {
    return { expCmdSN: this.expCmdSN, maxCmdSN: this.maxCmdSN };
  }

  private onLogout(pdu: LogoutRequest): void {
    this.ordered(pdu, () => {
      let response: number = LogoutResponseCode.Success;
      if (pdu.reasonCode === LogoutReason.RemoveConnectionForRecovery) response = LogoutResponseCode.RecoveryNotSupported;
      else if (pdu.reasonCode === LogoutReason.CloseConnection && pdu.cid !== this.cid) response = LogoutResponseCode.CidNotFound;
      const finish = () => {
        this.send({
          opcode: Opcode.LogoutResponse, itt: pdu.itt, response, statSN: this.takeStatSN(), expCmdSN: this.expCmdSN,
          maxCmdSN: this.maxCmdSN, time2Wait: 0, time2Retain: 0,
        });
        if (response === LogoutResponseCode.Success) {
          this.state = 'logged-out';
          const s = this.session;
          this.log.info({ ...s?.target?.logFields, initiator: s?.initiatorName, tsih: s?.tsih, reason: pdu.reasonCode }, 'logout');
          this.endGracefully();
        }
      };
      if (response !== LogoutResponseCode.Success) return finish();
      // Commands still running finish (and answer) before the logout does.
      const running = [...this.tasks.values()].map((t) => t.done);
      void Promise.allSettled(running).then(finish);
    });
  }

  /** AsyncEvent 1: ask the initiator to log out within `seconds` (RFC 7143 11.9.1). */
  requestLogout(seconds: number): void {
    if (this.state !== 'full-feature') return;
    this.send({
      opcode: Opcode.AsyncMessage, itt: RESERVED_TAG, lun: 0, statSN: this.takeStatSN(), expCmdSN: this.expCmdSN, maxCmdSN: this.maxCmdSN,
      asyncEvent: AsyncEvent.RequestLogout, asyncVCode: 0, parameter1: 0, parameter2: 0, parameter3: Math.max(0, Math.min(0xffff, seconds)),
    });
  }

  // ------------------------------------------------------------------------------------------
  // send path and teardown

  /** `header` is the rejected PDU's complete header, AHS included, which RFC 7143 11.17 echoes. */
  reject(reason: number, header: Buffer): void {
    this.send({
      opcode: Opcode.Reject, itt: RESERVED_TAG, reason, statSN: this.takeStatSN(), expCmdSN: this.expCmdSN, maxCmdSN: this.maxCmdSN,
      dataSN: 0, data: Buffer.from(header.subarray(0, this.params?.maxSendDataSegmentLength ?? 8192)),
    });
  }

  /** `written` runs once the PDU is with the kernel, or with an error once it never will be. */
  send(p: PduInit, written?: () => void): void {
    if (this.state === 'closed' || this.socket.destroyed) {
      written?.();
      return;
    }
    this.sendRaw(p, written);
  }

  private corked = false;

  /**
   * Everything sent in one tick leaves in one writev: the responses to a batch of commands that
   * arrived together, each Data-In header with its payload (passed by reference, not copied).
   * One system call per response was the target's largest fixed cost at small block sizes.
   */
  private sendRaw(p: PduInit, written?: () => void): void {
    const parts = encodePdu(p, this.digests);
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(() => this.flush());
    }
    const last = parts.length - 1;
    for (let i = 0; i < last; i++) this.socket.write(parts[i]!);
    // Called on success and on error alike: either way the socket is done with the payload.
    if (written) this.socket.write(parts[last]!, () => written());
    else this.socket.write(parts[last]!);
  }

  private flush(): void {
    if (!this.corked) return;
    this.corked = false;
    this.socket.uncork();
  }

  close(): void {
    // What was sent before closing goes out first, as it did before writes were batched.
    this.flush();
    this.state = 'closed';
    // Also after a graceful end: then the peer has had its chance to close its side.
    if (!this.socket.destroyed) this.socket.destroy();
  }

  /**
   * Flushes what is queued and sends FIN. A peer that ignores it and keeps its side open would
   * hold the socket forever, so it is dropped after a grace period long enough for any initiator
   * to read the last response.
   */
  private endGracefully(): void {
    this.flush();
    this.socket.end();
    const linger = setTimeout(() => this.close(), LINGER_MS);
    linger.unref();
    this.socket.once('close', () => clearTimeout(linger));
  }

  private onClose(): void {
    const wasFull = this.session !== undefined;
    this.state = 'closed';
    this.rx.close();
    clearTimeout(this.loginTimer);
    clearInterval(this.nopTimer);
    clearTimeout(this.nopDeadline);
    for (const t of this.tasks.values()) t.abort();
    this.tasks.clear();
    this.byTtt.clear();
    if (wasFull) this.host.onSessionEvent?.('logout', this);
  }

  /** The task with this ITT, for tests and diagnostics. */
  taskCount(): number {
    return this.tasks.size;
  }
}
