import { EventEmitter } from 'node:events';
import {
  AsyncEvent,
  buildInquiry,
  buildRead10,
  buildRead16,
  buildReadCapacity10,
  buildReadCapacity16,
  buildReportLuns,
  buildWrite10,
  buildWrite16,
  cdbServiceAction,
  decodeLun,
  describeSense,
  encodeTextData,
  LogoutReason,
  Opcode,
  parseSense,
  RejectReason,
  RESERVED_TAG,
  ScsiOp,
  ScsiStatus,
  scsiStatusName,
  SenseKey,
  ServiceActionIn16,
  snAdd,
  snDiff,
  snGt,
  snGte,
  snLt,
  snLte,
  TaskAttr,
  TextAssembler,
  TmfFunction,
  TmfResponse,
  unwrapIscsiSense,
  type AsyncMessage,
  type DataIn,
  type PduInit,
  type R2T,
  type Reject,
  type ScsiResponse,
  type SenseData,
  type SessionParams,
  type SessionType,
  type TargetPdu,
  type TextPair,
  type TextResponse,
} from 'iscsi-node-wire';
import { pino, type Logger } from 'pino';
import { ConnectionError, formatPortal, parsePortal, type InitiatorConnection, type Portal } from './connection.ts';
import { establish, randomIsid, type ChapOptions, type Established } from './login.ts';

// ---------------------------------------------------------------------------------------------
// Public types

export interface InitiatorOptions {
  /** "host:port" of the target. */
  portal: string;
  /** IQN to log in to. */
  targetName: string;
  /** Our InitiatorName (the proxy uses the real initiator's name). */
  initiatorName: string;
  /** 6 bytes; default random with the 'random' qualifier type (RFC 7143 10.12.5, T = 10b). */
  isid?: Buffer;
  /** Bind the TCP socket to this local address (e.g. 127.0.0.2). */
  localAddress?: string;
  chap?: ChapOptions;
  headerDigest?: boolean;
  dataDigest?: boolean;
  /** Default 262144. */
  maxRecvDataSegmentLength?: number;
  /** Reconnect (re-login, re-issue what is safe) when the connection is lost. Default on. */
  reconnect?: { initialDelayMs?: number; maxDelayMs?: number; maxAttempts?: number } | false;
  logger?: Logger;
  /** Default 15000. Also bounds task management, logout and text exchanges. */
  loginTimeoutMs?: number;
  /** Per-command timeout: the task is aborted (ABORT TASK) and the command fails with CommandTimeoutError. */
  commandTimeoutMs?: number;
  /** Idle time after which a NOP-Out ping checks the target is alive; 0 disables. Default 10000. */
  nopIntervalMs?: number;
  /** How long a ping may go unanswered before the connection is declared dead. Default 10000. */
  nopTimeoutMs?: number;
  /**
   * Act on Asynchronous Messages (logout and reconnect on request, reconnect after a drop
   * notice, renegotiate on request). Default true; when false they are only emitted as 'async'.
   */
  handleAsyncEvents?: boolean;
}

export interface ScsiResult {
  status: number;
  /** Sense data as the target sent it (without the iSCSI SenseLength prefix). */
  sense?: Buffer;
  /** Data-In received; its length is what the target transferred. */
  data?: Buffer;
  residual?: { overflow: boolean; underflow: boolean; count: number };
  /** The iSCSI Response field: 0 = command completed at target. */
  response: number;
}

export interface CommandOptions {
  dataOut?: Buffer;
  /** Bytes of Data-In expected (the buffer is sized to it). */
  dataInLength?: number;
  /** Task attribute (TaskAttr); default SIMPLE. */
  attr?: number;
  /** Send as an immediate command (no CmdSN slot). */
  immediate?: boolean;
  signal?: AbortSignal;
  /** Overrides the built-in decision whether this command may be re-issued after a reconnect. */
  retry?: boolean;
  /** Overrides InitiatorOptions.commandTimeoutMs for this command. */
  timeoutMs?: number;
  /** Called synchronously with the Initiator Task Tag, e.g. to abort the task later (abortCommand). */
  onItt?: (itt: number) => void;
  /**
   * Where Data-In goes, at least dataInLength bytes, owned by the caller (a pooled buffer): the
   * result's data is then a view of it. The session writes into it until the command settles;
   * after a rejection (abort, timeout, lost session) a Data-In PDU may still have been landing in
   * it, so only a buffer whose command resolved may be reused.
   */
  dataInBuffer?: Buffer;
  /**
   * The R and W bits to send, when they must not be derived from the buffers: a proxy forwards
   * the initiator's own bits, because a target answers R=1 with EDTL=0 (an overflow residual)
   * differently from a command that moves no data at all.
   */
  direction?: { read: boolean; write: boolean };
}

export interface AsyncEventMessage {
  /** AsyncEvent: 0 SCSI event, 1 logout request, 2 drop connection, 3 drop all, 4 renegotiate. */
  event: number;
  lun: number;
  vcode: number;
  parameter1: number;
  parameter2: number;
  parameter3: number;
  /** Raw sense data of a SCSI asynchronous event (AsyncEvent 0). */
  senseData?: Buffer;
  sense?: SenseData;
  /** iSCSI event data following the sense data, if any. */
  data: Buffer;
}

export interface DiscoveredTarget {
  targetName: string;
  addresses: string[];
}

export interface SessionStats {
  commandsSent: number;
  /** SCSI commands sent and still waiting for status. */
  inFlight: number;
  maxInFlight: number;
  reissued: number;
  reconnects: number;
}

// ---------------------------------------------------------------------------------------------
// Errors

/** A SCSI command finished with a status other than GOOD (read/write helpers only). */
export class ScsiError extends Error {
  override readonly name = 'ScsiError';
  readonly status: number;
  readonly response: number;
  /** Parsed sense data (key, asc, ascq...), when the target sent any that parses. */
  readonly sense: SenseData | undefined;
  readonly senseData: Buffer | undefined;
  constructor(what: string, result: ScsiResult) {
    let sense: SenseData | undefined;
    if (result.sense) {
      try {
        sense = parseSense(result.sense);
      } catch {
        sense = undefined;
      }
    }
    const detail =
      result.response !== 0 ? `iSCSI response 0x${result.response.toString(16)}` : `${scsiStatusName(result.status)}${sense ? ` ${describeSense(sense)}` : ''}`;
    super(`${what}: ${detail}`);
    this.status = result.status;
    this.response = result.response;
    this.sense = sense;
    this.senseData = result.sense;
  }
}

export type SessionErrorCode =
  | 'session-closed'
  | 'connection-lost'
  | 'outcome-unknown'
  | 'timeout'
  | 'aborted'
  | 'rejected'
  | 'short-transfer';

export class SessionError extends Error {
  override readonly name: string = 'SessionError';
  constructor(
    readonly code: SessionErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** The session is closed (logout, close(), or reconnecting gave up). */
export class SessionClosedError extends SessionError {
  override readonly name = 'SessionClosedError';
  constructor(message: string, options?: { cause?: unknown }) {
    super('session-closed', message, options);
  }
}

/** A task management, ping or text exchange was cut off by the loss of its connection. */
export class ConnectionLostError extends SessionError {
  override readonly name = 'ConnectionLostError';
  constructor(message: string, options?: { cause?: unknown }) {
    super('connection-lost', message, options);
  }
}

/**
 * The connection was lost after the command was sent and before its status arrived, and the
 * command is not one that may be run twice (COMPARE AND WRITE, PERSISTENT RESERVE OUT...). The
 * target may or may not have executed it; the caller has to find out.
 */
export class CommandNotRetriedError extends SessionError {
  override readonly name = 'CommandNotRetriedError';
  constructor(
    readonly opcode: number,
    message: string,
    options?: { cause?: unknown },
  ) {
    super('outcome-unknown', message, options);
  }
}

export class CommandTimeoutError extends SessionError {
  override readonly name = 'CommandTimeoutError';
  constructor(message: string) {
    super('timeout', message);
  }
}

/** Aborted by ABORT TASK, LOGICAL UNIT RESET, TARGET WARM RESET or the caller's AbortSignal. */
export class CommandAbortedError extends SessionError {
  override readonly name = 'CommandAbortedError';
  constructor(message: string, options?: { cause?: unknown }) {
    super('aborted', message, options);
  }
}

/** The target answered the PDU with a Reject (RFC 7143 11.17); `reason` is its reason code. */
export class CommandRejectedError extends SessionError {
  override readonly name = 'CommandRejectedError';
  constructor(
    readonly reason: number,
    message: string,
  ) {
    super('rejected', message);
  }
}

// ---------------------------------------------------------------------------------------------
// Re-issue policy

/**
 * Commands that may be sent again after a reconnect when the first attempt got no status.
 * At ErrorRecoveryLevel 0 a lost connection leaves every outstanding command in doubt: the
 * target may have executed it, or not. Re-issuing is only right when executing twice leaves
 * the same state as executing once:
 *  - reads and other commands that change nothing (INQUIRY, READ CAPACITY, TEST UNIT READY...);
 *  - plain writes (WRITE, WRITE AND VERIFY, WRITE SAME, UNMAP): they store the same bytes at the
 *    same LBAs however often they run. The one thing that could tell the difference is another
 *    write to the same blocks landing between the two executions. It cannot come from this
 *    session's caller in a way it relies on: overlapping commands outstanding together have no
 *    defined order under the SIMPLE task attribute, so no initiator may depend on which of
 *    them lands last, and a later write that depends on this one cannot have been issued,
 *    because this one has not completed. (Initiators sharing blocks coordinate with
 *    reservations or COMPARE AND WRITE, and those are not re-issued.)
 *  - SYNCHRONIZE CACHE and PRE-FETCH: flushing or prefetching twice is harmless.
 * Everything else fails with CommandNotRetriedError. In particular COMPARE AND WRITE: if the
 * first execution succeeded, the re-issue compares against the data it wrote and reports a
 * MISCOMPARE, telling a cluster lock (VMware ATS and the like) that it lost a lock it holds;
 * if it failed, a re-issue could succeed against data someone changed meanwhile. PERSISTENT
 * RESERVE OUT, RESERVE/RELEASE, MODE SELECT, REQUEST SENSE (clears the sense it reports) and
 * unknown commands are left to the caller for the same reason.
 */
const REISSUE_SAFE = new Set<number>([
  ScsiOp.TEST_UNIT_READY,
  ScsiOp.INQUIRY,
  ScsiOp.MODE_SENSE_6,
  ScsiOp.MODE_SENSE_10,
  ScsiOp.READ_CAPACITY_10,
  ScsiOp.REPORT_LUNS,
  ScsiOp.READ_6,
  ScsiOp.READ_10,
  ScsiOp.READ_12,
  ScsiOp.READ_16,
  ScsiOp.VERIFY_10,
  ScsiOp.VERIFY_12,
  ScsiOp.VERIFY_16,
  ScsiOp.PRE_FETCH_10,
  ScsiOp.PRE_FETCH_16,
  ScsiOp.SYNCHRONIZE_CACHE_10,
  ScsiOp.SYNCHRONIZE_CACHE_16,
  ScsiOp.WRITE_6,
  ScsiOp.WRITE_10,
  ScsiOp.WRITE_12,
  ScsiOp.WRITE_16,
  ScsiOp.WRITE_AND_VERIFY_10,
  ScsiOp.WRITE_AND_VERIFY_12,
  ScsiOp.WRITE_AND_VERIFY_16,
  ScsiOp.WRITE_SAME_10,
  ScsiOp.WRITE_SAME_16,
  ScsiOp.UNMAP,
]);

/** Whether a command whose outcome is unknown may be sent again (see REISSUE_SAFE). */
export function isSafeToReissue(cdb: Buffer): boolean {
  if (cdb.length === 0) return false;
  const op = cdb[0]!;
  if (REISSUE_SAFE.has(op)) return true;
  if (op === ScsiOp.SERVICE_ACTION_IN_16) {
    const sa = cdbServiceAction(cdb);
    return sa === ServiceActionIn16.READ_CAPACITY_16 || sa === ServiceActionIn16.GET_LBA_STATUS;
  }
  return false;
}

/** A command that keeps losing its connection (or its data) is not re-issued forever. */
const MAX_REISSUES = 5;

// ---------------------------------------------------------------------------------------------
// Tasks

interface TaskCommon {
  itt: number;
  immediate: boolean;
  /** CmdSN it was (last) sent with. */
  cmdSN: number;
  /** Sent on the current connection and not finished. */
  sent: boolean;
  done: boolean;
}

class ScsiTask implements TaskCommon {
  readonly kind = 'scsi' as const;
  cmdSN = 0;
  sent = false;
  done = false;
  reissues = 0;
  /** Data-In received so far; either a view of the single PDU that carried it all, or a buffer we own. */
  dataIn: Buffer | undefined;
  dataInFilled = 0;
  expDataSN = 0;
  timer: NodeJS.Timeout | undefined;
  /** Why an ABORT TASK is under way for it, if one is. */
  aborting: SessionError | undefined;
  onSignal: (() => void) | undefined;
  /** Caller-owned destination for Data-In (CommandOptions.dataInBuffer). */
  dataInBuffer: Buffer | undefined;

  constructor(
    readonly itt: number,
    readonly lun: number,
    readonly cdb: Buffer,
    readonly dataOut: Buffer | undefined,
    readonly dataInLength: number,
    readonly attr: number,
    readonly immediate: boolean,
    readonly retry: boolean,
    readonly resolve: (r: ScsiResult) => void,
    readonly reject: (e: Error) => void,
    readonly signal: AbortSignal | undefined,
    readonly direction: { read: boolean; write: boolean } | undefined,
  ) {}

  resetTransfer(): void {
    this.dataIn = undefined;
    this.dataInFilled = 0;
    this.expDataSN = 0;
  }
}

type ControlKind = 'tmf' | 'nop' | 'text' | 'logout';

class ControlTask implements TaskCommon {
  cmdSN = 0;
  sent = false;
  done = false;
  timer: NodeJS.Timeout | undefined;
  constructor(
    readonly kind: ControlKind,
    readonly itt: number,
    readonly immediate: boolean,
    readonly build: (cmdSN: number) => PduInit,
    readonly resolve: (pdu: TargetPdu) => void,
    readonly reject: (e: Error) => void,
  ) {}
}

type Task = ScsiTask | ControlTask;

type State = 'connecting' | 'ready' | 'recovering' | 'logging-out' | 'closed';

const EMPTY = Buffer.alloc(0);

let silent: Logger | undefined;
function silentLogger(): Logger {
  silent ??= pino({ level: 'silent' });
  return silent;
}


// ---------------------------------------------------------------------------------------------

/**
 * An iSCSI initiator session with one connection (ErrorRecoveryLevel 0, MaxConnections 1).
 *
 * Events: 'async' (AsyncEventMessage), 'disconnect' (Error), 'reconnect' ({ attempt, portal }),
 * 'close' (Error | undefined: undefined after a clean logout).
 */
export class InitiatorSession extends EventEmitter {
  private readonly opts: InitiatorOptions;
  private readonly log: Logger;
  private readonly isid: Buffer;
  private readonly sessionType: SessionType;
  /** Where (re)connections go: the configured portal, or where a permanent redirect sent us. */
  private portal: Portal;
  private state: State = 'connecting';
  private conn: InitiatorConnection | undefined;
  private _params: SessionParams | undefined;
  private _tsih = 0;
  private loggedInPortal: Portal | undefined;

  private cmdSN = 1;
  private expCmdSN = 1;
  private maxCmdSN = 1;
  private expStatSN = 0;

  private readonly tasks = new Map<number, Task>();
  private queue: Task[] = [];
  private qHead = 0;
  private nextItt = 0;
  private inFlight = 0;
  private scsiPending = 0;
  private idleWaiters: Array<() => boolean> = [];
  /** New SCSI commands wait (async logout in progress). */
  private holding = false;
  private asyncLogoutBusy = false;
  /** A connection we closed on purpose and want replaced at once. */
  private reconnectAfter: { conn: InitiatorConnection; delayMs: number } | undefined;

  private nopTimer: NodeJS.Timeout | undefined;
  private lastRx = -1;
  private pingOutstanding = false;
  private reconnectTimer: { timer: NodeJS.Timeout; wake: () => void } | undefined;
  private readonly _stats: SessionStats = { commandsSent: 0, inFlight: 0, maxInFlight: 0, reissued: 0, reconnects: 0 };

  private constructor(opts: InitiatorOptions, sessionType: SessionType) {
    super();
    this.opts = opts;
    this.sessionType = sessionType;
    this.log = (opts.logger ?? silentLogger()).child({ component: 'initiator', target: opts.targetName || undefined });
    if (opts.isid !== undefined && opts.isid.length !== 6) throw new RangeError('isid must be 6 bytes');
    this.isid = opts.isid ? Buffer.from(opts.isid) : randomIsid();
    this.portal = parsePortal(opts.portal);
    this.nextItt = Math.floor(Math.random() * 0x1000_0000);
  }

  /** Connects and logs in (following redirections). Rejects with LoginError on a refused login. */
  static async connect(opts: InitiatorOptions): Promise<InitiatorSession> {
    const s = new InitiatorSession(opts, 'Normal');
    await s.start();
    return s;
  }

  /** SendTargets=All in a discovery session. */
  static async discover(
    portal: string,
    initiatorName: string,
    opts: { localAddress?: string; chap?: ChapOptions; logger?: Logger; loginTimeoutMs?: number } = {},
  ): Promise<DiscoveredTarget[]> {
    const s = new InitiatorSession({ ...opts, portal, initiatorName, targetName: '', reconnect: false, nopIntervalMs: 0 }, 'Discovery');
    await s.start();
    try {
      const pairs = await s.text([['SendTargets', 'All']]);
      const out: DiscoveredTarget[] = [];
      for (const [k, v] of pairs) {
        if (k === 'TargetName') out.push({ targetName: v, addresses: [] });
        else if (k === 'TargetAddress' && out.length > 0) out[out.length - 1]!.addresses.push(v);
      }
      await s.logout();
      return out;
    } finally {
      s.close();
    }
  }

  get tsih(): number {
    return this._tsih;
  }

  /** Negotiated parameters of the current connection. */
  get params(): SessionParams {
    if (!this._params) throw new Error('not logged in');
    return this._params;
  }

  get targetPortalGroupTag(): number | undefined {
    return this._params?.targetPortalGroupTag;
  }

  get targetAlias(): string | undefined {
    return this._params?.targetAlias;
  }

  /** The portal the current connection logged in at (after any redirection). */
  get connectedPortal(): string | undefined {
    return this.loggedInPortal ? formatPortal(this.loggedInPortal) : undefined;
  }

  /** Where a reconnect goes: the configured portal, or the one a permanent redirect named. */
  get persistentPortal(): string {
    return formatPortal(this.portal);
  }

  get isClosed(): boolean {
    return this.state === 'closed';
  }

  get stats(): SessionStats {
    return { ...this._stats, inFlight: this.inFlight };
  }

  // -------------------------------------------------------------------------------------------
  // Commands

  command(lun: number, cdb: Buffer, opts: CommandOptions = {}): Promise<ScsiResult> {
    return new Promise<ScsiResult>((resolve, reject) => {
      if (this.state === 'closed' || this.state === 'logging-out') {
        reject(new SessionClosedError('session is closed'));
        return;
      }
      if (this.sessionType === 'Discovery') {
        reject(new Error('a discovery session carries no SCSI commands'));
        return;
      }
      const dataInLength = opts.dataInLength ?? 0;
      if (!Number.isInteger(dataInLength) || dataInLength < 0 || dataInLength > 0xffff_ffff) {
        reject(new RangeError('dataInLength must be a 32-bit unsigned integer'));
        return;
      }
      if (opts.signal?.aborted) {
        reject(new CommandAbortedError('aborted before it was sent', { cause: opts.signal.reason }));
        return;
      }
      const dataOut = opts.dataOut && opts.dataOut.length > 0 ? opts.dataOut : undefined;
      const itt = this.allocItt();
      const t = new ScsiTask(
        itt,
        lun,
        cdb,
        dataOut,
        dataInLength,
        opts.attr ?? TaskAttr.Simple,
        opts.immediate ?? false,
        opts.retry ?? isSafeToReissue(cdb),
        resolve,
        reject,
        opts.signal,
        opts.direction,
      );
      if (opts.dataInBuffer && opts.dataInBuffer.length >= dataInLength && dataInLength > 0) t.dataInBuffer = opts.dataInBuffer;
      this.tasks.set(itt, t);
      this.scsiPending++;
      const timeout = opts.timeoutMs ?? this.opts.commandTimeoutMs;
      if (timeout !== undefined && timeout > 0) t.timer = setTimeout(() => this.cancelTask(t, new CommandTimeoutError(`command timed out after ${timeout} ms`)), timeout);
      if (opts.signal) {
        const signal = opts.signal;
        t.onSignal = () => this.cancelTask(t, new CommandAbortedError('aborted by the caller', { cause: signal.reason }));
        signal.addEventListener('abort', t.onSignal, { once: true });
      }
      opts.onItt?.(itt);
      this.submit(t);
    });
  }

  /**
   * command() for the helpers: a UNIT ATTENTION (after login, a reset, a capacity change) only
   * reports an event and the command was not executed, so it is sent again. command() itself
   * passes every status through untouched, as a proxy needs.
   */
  private async commandPastUnitAttention(lun: number, cdb: Buffer, opts: CommandOptions): Promise<ScsiResult> {
    for (let i = 0; ; i++) {
      const r = await this.command(lun, cdb, opts);
      if (i >= 8 || senseKeyOf(r) !== SenseKey.UNIT_ATTENTION) return r;
      this.log.debug({ lun }, 'unit attention; sending the command again');
    }
  }

  /** READ(10), or READ(16) when the LBA or the length needs it. Throws ScsiError unless GOOD. */
  async read(lun: number, lba: number, blocks: number, blockSize: number): Promise<Buffer> {
    const length = blocks * blockSize;
    const cdb = lba > 0xffff_ffff || blocks > 0xffff ? buildRead16(lba, blocks) : buildRead10(lba, blocks);
    const r = await this.commandPastUnitAttention(lun, cdb, { dataInLength: length });
    checkGood(r, `READ lba ${lba} blocks ${blocks}`);
    const data = r.data ?? EMPTY;
    if (data.length !== length) throw new SessionError('short-transfer', `READ lba ${lba}: ${data.length} of ${length} bytes transferred`);
    return data;
  }

  /** WRITE(10), or WRITE(16) when needed. Throws ScsiError unless GOOD. */
  async write(lun: number, lba: number, buf: Buffer, blockSize: number, opts: { fua?: boolean } = {}): Promise<void> {
    if (buf.length % blockSize !== 0) throw new RangeError(`write of ${buf.length} bytes is not a multiple of the ${blockSize}-byte block`);
    const blocks = buf.length / blockSize;
    const rw = opts.fua ? { fua: true } : {};
    const cdb = lba > 0xffff_ffff || blocks > 0xffff ? buildWrite16(lba, blocks, rw) : buildWrite10(lba, blocks, rw);
    const r = await this.commandPastUnitAttention(lun, cdb, { dataOut: buf });
    checkGood(r, `WRITE lba ${lba} blocks ${blocks}`);
    if (r.residual?.underflow) throw new SessionError('short-transfer', `WRITE lba ${lba}: target took ${buf.length - r.residual.count} of ${buf.length} bytes`);
  }

  async readCapacity(lun: number): Promise<{ blocks: number; blockSize: number }> {
    const r16 = await this.commandPastUnitAttention(lun, buildReadCapacity16(32), { dataInLength: 32 });
    if (r16.status === ScsiStatus.GOOD && r16.response === 0 && r16.data && r16.data.length >= 12) {
      return { blocks: Number(r16.data.readBigUInt64BE(0) + 1n), blockSize: r16.data.readUInt32BE(8) };
    }
    // Some devices only know READ CAPACITY(10).
    if (!isIllegalRequest(r16)) checkGood(r16, 'READ CAPACITY(16)');
    const r10 = await this.commandPastUnitAttention(lun, buildReadCapacity10(), { dataInLength: 8 });
    checkGood(r10, 'READ CAPACITY(10)');
    if (!r10.data || r10.data.length < 8) throw new SessionError('short-transfer', 'READ CAPACITY(10) returned less than 8 bytes');
    return { blocks: r10.data.readUInt32BE(0) + 1, blockSize: r10.data.readUInt32BE(4) };
  }

  async reportLuns(): Promise<number[]> {
    let alloc = 4096;
    for (;;) {
      const r = await this.commandPastUnitAttention(0, buildReportLuns(alloc), { dataInLength: alloc });
      checkGood(r, 'REPORT LUNS');
      const data = r.data ?? EMPTY;
      if (data.length < 8) throw new SessionError('short-transfer', 'REPORT LUNS returned less than 8 bytes');
      const listLength = data.readUInt32BE(0);
      if (listLength + 8 > alloc && alloc < 0x100_0000) {
        alloc = listLength + 8;
        continue;
      }
      const luns: number[] = [];
      for (let o = 8; o + 8 <= Math.min(data.length, listLength + 8); o += 8) luns.push(decodeLun(data, o));
      return luns;
    }
  }

  /** Standard INQUIRY data. */
  async inquiry(lun: number, allocLen = 96): Promise<Buffer> {
    const r = await this.commandPastUnitAttention(lun, buildInquiry(false, 0, allocLen), { dataInLength: allocLen });
    checkGood(r, 'INQUIRY');
    return r.data ?? EMPTY;
  }

  // -------------------------------------------------------------------------------------------
  // Task management

  /** ABORT TASK. Resolves with the TMF response code (TmfResponse). */
  async abortTask(lun: number, itt: number): Promise<number> {
    const t = this.tasks.get(itt);
    if (t instanceof ScsiTask && !t.sent && !t.done) {
      // Never left this host: nothing for the target to abort.
      this.finishScsiError(t, new CommandAbortedError('aborted by ABORT TASK before it was sent'));
      return TmfResponse.Complete;
    }
    const refCmdSN = t instanceof ScsiTask ? t.cmdSN : this.cmdSN;
    const rsp = await this.taskManagement(TmfFunction.AbortTask, lun, itt, refCmdSN);
    if (t instanceof ScsiTask && !t.done && (rsp === TmfResponse.Complete || rsp === TmfResponse.NoSuchTask)) {
      this.finishScsiError(t, t.aborting ?? new CommandAbortedError('aborted by ABORT TASK'));
    }
    return rsp;
  }

  /** LOGICAL UNIT RESET. Commands in flight to that LUN fail with CommandAbortedError. */
  async lunReset(lun: number): Promise<number> {
    const rsp = await this.taskManagement(TmfFunction.LogicalUnitReset, lun, RESERVED_TAG, this.cmdSN);
    if (rsp === TmfResponse.Complete) this.abortSentTasks((t) => t.lun === lun, 'LOGICAL UNIT RESET');
    return rsp;
  }

  /** TARGET WARM RESET. Every command in flight fails with CommandAbortedError. */
  async targetWarmReset(): Promise<number> {
    const rsp = await this.taskManagement(TmfFunction.TargetWarmReset, 0, RESERVED_TAG, this.cmdSN);
    if (rsp === TmfResponse.Complete) this.abortSentTasks(() => true, 'TARGET WARM RESET');
    return rsp;
  }

  private async taskManagement(fn: number, lun: number, referencedTaskTag: number, refCmdSN: number): Promise<number> {
    const rsp = await this.control('tmf', true, (cmdSN) => ({
      opcode: Opcode.TaskMgmtRequest,
      function: fn,
      lun,
      itt: 0, // replaced by control()
      referencedTaskTag,
      cmdSN,
      expStatSN: this.expStatSN,
      refCmdSN,
      expDataSN: 0,
    }));
    if (rsp.opcode !== Opcode.TaskMgmtResponse) throw new Error('unexpected answer to a task management request');
    return rsp.response;
  }

  private abortSentTasks(match: (t: ScsiTask) => boolean, why: string): void {
    for (const t of [...this.tasks.values()]) {
      if (t instanceof ScsiTask && t.sent && !t.done && match(t)) this.finishScsiError(t, new CommandAbortedError(`aborted by ${why}`));
    }
  }

  // -------------------------------------------------------------------------------------------
  // Logout and close

  /** Waits for outstanding commands, logs out (close session) and closes the connection. */
  async logout(): Promise<void> {
    if (this.state === 'closed' || this.state === 'logging-out') return;
    if (this.state !== 'ready' || !this.conn) {
      this.shutdown(undefined);
      return;
    }
    const timeout = this.opts.loginTimeoutMs ?? 15_000;
    await this.whenIdle(() => this.scsiPending === 0, timeout);
    if (this.state !== 'ready' || !this.conn) {
      this.shutdown(undefined);
      return;
    }
    this.state = 'logging-out';
    try {
      await this.sendLogout(LogoutReason.CloseSession);
    } catch (err) {
      this.log.debug({ err: (err as Error).message }, 'logout failed; closing anyway');
    }
    this.shutdown(undefined);
  }

  /** Drops the connection without logging out. */
  close(): void {
    if (this.state === 'closed') return;
    this.shutdown(undefined);
  }

  private async sendLogout(reason: number): Promise<void> {
    const rsp = await this.control(
      'logout',
      true,
      (cmdSN) => ({ opcode: Opcode.LogoutRequest, reasonCode: reason, cid: 0, itt: 0, cmdSN, expStatSN: this.expStatSN }),
      true,
    );
    if (rsp.opcode === Opcode.LogoutResponse && rsp.response !== 0) this.log.warn({ response: rsp.response }, 'logout response not successful');
  }

  private shutdown(err: Error | undefined): void {
    if (this.state === 'closed') return;
    this.state = 'closed';
    this.stopTimers();
    const reason = err ? new SessionClosedError(`session closed: ${err.message}`, { cause: err }) : new SessionClosedError('session closed');
    for (const t of [...this.tasks.values()]) this.failTask(t, reason);
    this.queue = [];
    this.qHead = 0;
    const conn = this.conn;
    this.conn = undefined;
    conn?.close();
    for (const w of this.idleWaiters.splice(0)) w();
    this.emit('close', err);
  }

  // -------------------------------------------------------------------------------------------
  // Connection set-up and recovery

  private loginParams() {
    return {
      initiatorName: this.opts.initiatorName,
      ...(this.sessionType === 'Normal' ? { targetName: this.opts.targetName } : {}),
      sessionType: this.sessionType,
      isid: this.isid,
      // Always 0: at ErrorRecoveryLevel 0 a new login with the same ISID reinstates the session
      // (RFC 7143 6.3.5), which makes the target clean up whatever the old one left behind.
      tsih: 0,
      cid: 0,
      ...(this.opts.chap ? { chap: this.opts.chap } : {}),
      headerDigest: this.opts.headerDigest ?? false,
      dataDigest: this.opts.dataDigest ?? false,
      maxRecvDataSegmentLength: this.opts.maxRecvDataSegmentLength ?? 262144,
      initialCmdSN: this.cmdSN,
      timeoutMs: this.opts.loginTimeoutMs ?? 15_000,
      logger: this.log,
      portal: this.portal,
      ...(this.opts.localAddress !== undefined ? { localAddress: this.opts.localAddress } : {}),
    };
  }

  private async start(): Promise<void> {
    let est: Established;
    try {
      est = await establish(this.loginParams());
    } catch (err) {
      this.state = 'closed';
      throw err;
    }
    this.adopt(est);
  }

  private adopt(est: Established): void {
    const { conn, result } = est;
    if (est.movedPermanently) this.portal = est.movedPermanently;
    this.loggedInPortal = est.portal;
    this._params = result.params;
    this._tsih = result.tsih;
    this.cmdSN = result.cmdSN;
    this.expCmdSN = result.expCmdSN;
    this.maxCmdSN = result.maxCmdSN;
    this.expStatSN = result.expStatSN;
    this.conn = conn;
    this.state = 'ready';
    this.holding = false;
    this.asyncLogoutBusy = false;
    conn.onClose((err) => this.onConnectionClosed(conn, err));
    conn.enterFullFeature(
      { headerDigest: result.params.headerDigest === 'CRC32C', dataDigest: result.params.dataDigest === 'CRC32C' },
      result.params.maxRecvDataSegmentLength,
      (pdu) => this.onPdu(conn, pdu),
      (header, length) => this.dataInDestination(header, length),
    );
    this.log.info(
      { portal: formatPortal(est.portal), tsih: result.tsih, headerDigest: result.params.headerDigest, dataDigest: result.params.dataDigest },
      'logged in',
    );
    this.startNopTimer();
    this.pump();
  }

  private onConnectionClosed(conn: InitiatorConnection, err: Error): void {
    if (conn !== this.conn) return;
    this.conn = undefined;
    this.stopTimers();
    if (this.state === 'closed') return;
    if (this.state === 'logging-out') {
      this.shutdown(undefined);
      return;
    }
    const planned = this.reconnectAfter?.conn === conn ? this.reconnectAfter : undefined;
    this.reconnectAfter = undefined;
    if (!planned) this.log.warn({ err: err.message }, 'connection lost');
    this.emit('disconnect', err);

    // Commands that were sent and got no status: re-issue what is safe, fail the rest.
    const reissue: ScsiTask[] = [];
    for (const t of [...this.tasks.values()]) {
      if (!t.sent || t.done) continue;
      this.markUnsent(t);
      if (t instanceof ControlTask) {
        this.failTask(t, new ConnectionLostError(`connection lost before the ${t.kind} response`, { cause: err }));
      } else if (t.aborting) {
        this.finishScsiError(t, t.aborting);
      } else if (!t.retry) {
        this.finishScsiError(
          t,
          new CommandNotRetriedError(t.cdb[0]!, `connection lost before status of opcode 0x${t.cdb[0]!.toString(16)}; it may or may not have executed and is not safe to re-issue`, { cause: err }),
        );
      } else if (t.reissues >= MAX_REISSUES) {
        this.finishScsiError(t, new CommandNotRetriedError(t.cdb[0]!, `gave up after ${MAX_REISSUES} re-issues`, { cause: err }));
      } else {
        t.reissues++;
        t.resetTransfer();
        reissue.push(t);
      }
    }
    // Keep the original CmdSN order: the target executes SIMPLE tasks in any order anyway, but
    // ORDERED and HEAD OF QUEUE ones keep their meaning only in order.
    const base = reissue.length > 0 ? reissue[0]!.cmdSN : 0;
    reissue.sort((a, b) => (snDiff(base, a.cmdSN) ?? 0) - (snDiff(base, b.cmdSN) ?? 0));
    this._stats.reissued += reissue.length;
    this.queue = [...reissue, ...this.queue.slice(this.qHead).filter((t) => !t.done)];
    this.qHead = 0;

    if (this.opts.reconnect === false || this.sessionType === 'Discovery') {
      this.shutdown(err);
      return;
    }
    this.state = 'recovering';
    void this.reconnectLoop(err, planned?.delayMs);
  }

  private async reconnectLoop(cause: Error, firstDelayMs: number | undefined): Promise<void> {
    const cfg = this.opts.reconnect || {};
    const initial = cfg.initialDelayMs ?? 250;
    const maxDelay = cfg.maxDelayMs ?? 30_000;
    const maxAttempts = cfg.maxAttempts ?? Infinity;
    let delay = firstDelayMs ?? initial;
    let lastErr: unknown = cause;
    for (let attempt = 1; attempt <= maxAttempts; attempt++) {
      if (delay > 0) await this.sleep(delay);
      if (this.state !== 'recovering') return;
      try {
        const est = await establish(this.loginParams());
        if (this.state !== 'recovering') {
          est.conn.close();
          return;
        }
        this._stats.reconnects++;
        this.adopt(est);
        this.emit('reconnect', { attempt, portal: formatPortal(est.portal) });
        return;
      } catch (err) {
        lastErr = err;
        this.log.warn({ attempt, err: (err as Error).message }, 'reconnect failed');
      }
      delay = Math.min(Math.max(delay * 2, initial), maxDelay);
    }
    this.shutdown(new SessionClosedError(`reconnect failed after ${maxAttempts} attempts`, { cause: lastErr }));
  }

  /** A backoff delay that close() cuts short. */
  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const wake = () => {
        if (this.reconnectTimer?.wake === wake) this.reconnectTimer = undefined;
        resolve();
      };
      this.reconnectTimer = { timer: setTimeout(wake, ms), wake };
    });
  }

  // -------------------------------------------------------------------------------------------
  // Send path

  private allocItt(): number {
    do {
      this.nextItt = (this.nextItt + 1) >>> 0;
    } while (this.nextItt === RESERVED_TAG || this.nextItt === 0 || this.tasks.has(this.nextItt));
    return this.nextItt;
  }

  private submit(t: Task): void {
    const conn = this.conn;
    if (t.immediate && conn && !conn.closed && this.state === 'ready' && !(t instanceof ScsiTask && this.holding)) {
      this.transmit(conn, t);
      return;
    }
    this.queue.push(t);
    this.pump();
  }

  /** Sends queued tasks while the CmdSN window is open (RFC 7143 4.2.2.1). */
  private pump(): void {
    const conn = this.conn;
    if (!conn || this.state !== 'ready') return;
    const q = this.queue;
    while (this.qHead < q.length) {
      if (conn.closed) return;
      const t = q[this.qHead]!;
      if (t.done) {
        this.qHead++;
        continue;
      }
      if (t instanceof ScsiTask && this.holding) break;
      if (!t.immediate && !snLte(this.cmdSN, this.maxCmdSN)) break;
      this.qHead++;
      this.transmit(conn, t);
    }
    if (this.qHead === q.length) {
      q.length = 0;
      this.qHead = 0;
    } else if (this.qHead > 1024 && this.qHead * 2 > q.length) {
      this.queue = q.slice(this.qHead);
      this.qHead = 0;
    }
  }

  private transmit(conn: InitiatorConnection, t: Task): void {
    t.cmdSN = this.cmdSN;
    if (!t.immediate) this.cmdSN = snAdd(this.cmdSN, 1);
    t.sent = true;
    if (t instanceof ScsiTask) {
      this.inFlight++;
      this._stats.commandsSent++;
      if (this.inFlight > this._stats.maxInFlight) this._stats.maxInFlight = this.inFlight;
      this.sendScsiCommand(conn, t);
    } else {
      conn.send({ ...t.build(t.cmdSN), itt: t.itt, immediate: t.immediate } as PduInit);
    }
  }

  private sendScsiCommand(conn: InitiatorConnection, t: ScsiTask): void {
    const p = this._params!;
    const out = t.dataOut;
    const outLen = out ? out.length : 0;
    let immediateLen = 0;
    let unsolicitedEnd = 0;
    if (out) {
      // Unsolicited data (RFC 7143 4.2.5.2): up to FirstBurstLength in total, as immediate
      // data in the command PDU and, if InitialR2T=No, as Data-Out PDUs with TTT 0xffffffff.
      const firstBurst = Math.min(p.firstBurstLength, outLen);
      if (p.immediateData) immediateLen = Math.min(firstBurst, p.maxSendDataSegmentLength);
      unsolicitedEnd = p.initialR2T ? immediateLen : firstBurst;
    }
    const moreUnsolicited = unsolicitedEnd > immediateLen;
    const bidi = out !== undefined && t.dataInLength > 0;
    conn.send({
      opcode: Opcode.ScsiCommand,
      immediate: t.immediate,
      // F: no unsolicited Data-Out follows (solicited data always comes through R2Ts).
      final: !moreUnsolicited,
      read: t.direction?.read ?? t.dataInLength > 0,
      write: t.direction?.write ?? out !== undefined,
      attr: t.attr,
      lun: t.lun,
      itt: t.itt,
      expectedDataTransferLength: out ? outLen : t.dataInLength,
      cmdSN: t.cmdSN,
      expStatSN: this.expStatSN,
      cdb: t.cdb,
      // Plain properties, not conditional spreads: this literal is built for every command.
      data: immediateLen > 0 ? out!.subarray(0, immediateLen) : undefined,
      bidiReadDataLength: bidi ? t.dataInLength : undefined,
    });
    if (moreUnsolicited) this.sendDataOut(conn, t, RESERVED_TAG, immediateLen, unsolicitedEnd - immediateLen);
  }

  /** One Data-Out sequence: `length` bytes from `offset`, cut at the target's MaxRecvDataSegmentLength. */
  private sendDataOut(conn: InitiatorConnection, t: ScsiTask, ttt: number, offset: number, length: number): void {
    const out = t.dataOut!;
    const seg = this._params!.maxSendDataSegmentLength;
    const end = offset + length;
    let dataSN = 0;
    for (let o = offset; o < end; o += seg) {
      const n = Math.min(seg, end - o);
      conn.send({
        opcode: Opcode.DataOut,
        final: o + n === end,
        lun: t.lun,
        itt: t.itt,
        ttt,
        expStatSN: this.expStatSN,
        dataSN: dataSN++,
        bufferOffset: o,
        data: out.subarray(o, o + n),
      });
    }
  }

  private control(kind: ControlKind, immediate: boolean, build: (cmdSN: number) => PduInit, allowWhileLoggingOut = false, itt?: number): Promise<TargetPdu> {
    return new Promise<TargetPdu>((resolve, reject) => {
      const conn = this.conn;
      const usable = this.state === 'ready' || (allowWhileLoggingOut && this.state === 'logging-out');
      if (!conn || conn.closed || !usable) {
        reject(this.state === 'closed' ? new SessionClosedError('session is closed') : new ConnectionLostError('not connected'));
        return;
      }
      const tag = itt ?? this.allocItt();
      const t = new ControlTask(kind, tag, immediate, build, resolve, reject);
      const timeout = kind === 'nop' ? (this.opts.nopTimeoutMs ?? 10_000) : (this.opts.loginTimeoutMs ?? 15_000);
      t.timer = setTimeout(() => {
        if (t.done) return;
        this.failTask(t, new ConnectionLostError(`no ${kind} response within ${timeout} ms`));
        // A target that does not answer is not trusted with the rest: start over.
        if (this.conn === conn) conn.close(new ConnectionError(`${kind} response timed out`, 'timeout'));
      }, timeout);
      this.tasks.set(tag, t);
      if (immediate) {
        this.transmit(conn, t);
      } else {
        this.queue.push(t);
        this.pump();
      }
    });
  }

  /** A Text Request exchange, following C bits and F=0 answers; returns the complete text. */
  private async text(pairs: TextPair[]): Promise<TextPair[]> {
    const assembler = new TextAssembler();
    const itt = this.allocItt();
    let ttt = RESERVED_TAG;
    let data = encodeTextData(pairs);
    for (let i = 0; i < 1024; i++) {
      const sendData = data;
      const sendTtt = ttt;
      const rsp = await this.control(
        'text',
        false,
        (cmdSN) => ({ opcode: Opcode.TextRequest, final: true, continue: false, lun: 0, itt, ttt: sendTtt, cmdSN, expStatSN: this.expStatSN, data: sendData }),
        false,
        itt,
      );
      const tr = rsp as TextResponse;
      const done = assembler.push(tr.data, tr.continue);
      if (tr.final && !tr.continue) return done ?? [];
      // More to come: an empty request with the target's transfer tag asks for it (RFC 7143 11.10.4).
      ttt = tr.ttt;
      data = EMPTY;
    }
    throw new Error('text response never ended');
  }

  /** Re-declares MaxRecvDataSegmentLength (the one key a full-feature Text exchange may change). */
  async renegotiate(): Promise<void> {
    const mine = this.opts.maxRecvDataSegmentLength ?? 262144;
    const answer = await this.text([['MaxRecvDataSegmentLength', String(mine)]]);
    for (const [k, v] of answer) {
      const n = Number(v);
      if (k === 'MaxRecvDataSegmentLength' && Number.isInteger(n) && n >= 512 && n <= 0xff_ffff && this._params) {
        this._params = { ...this._params, maxSendDataSegmentLength: n };
      }
    }
  }

  // -------------------------------------------------------------------------------------------
  // Receive path

  private onPdu(conn: InitiatorConnection, pdu: TargetPdu): void {
    if (conn !== this.conn) return;
    try {
      switch (pdu.opcode) {
        case Opcode.DataIn:
          this.window(pdu.expCmdSN, pdu.maxCmdSN);
          if (pdu.statusPresent) this.statusSeen(pdu.statSN);
          this.onDataIn(conn, pdu);
          break;
        case Opcode.ScsiResponse:
          this.window(pdu.expCmdSN, pdu.maxCmdSN);
          this.statusSeen(pdu.statSN);
          this.onScsiResponse(pdu);
          break;
        case Opcode.R2T:
          this.window(pdu.expCmdSN, pdu.maxCmdSN);
          this.onR2T(conn, pdu);
          break;
        case Opcode.NopIn:
          this.window(pdu.expCmdSN, pdu.maxCmdSN);
          if (pdu.itt !== RESERVED_TAG) {
            this.statusSeen(pdu.statSN);
            this.completeControl(pdu.itt, pdu);
          } else if (pdu.ttt !== RESERVED_TAG) {
            // The target's ping: answer with its TTT and the reserved ITT (RFC 7143 11.18.3).
            conn.send({ opcode: Opcode.NopOut, immediate: true, lun: pdu.lun, itt: RESERVED_TAG, ttt: pdu.ttt, cmdSN: this.cmdSN, expStatSN: this.expStatSN });
          }
          break;
        case Opcode.TaskMgmtResponse:
        case Opcode.LogoutResponse:
        case Opcode.TextResponse:
          this.window(pdu.expCmdSN, pdu.maxCmdSN);
          this.statusSeen(pdu.statSN);
          this.completeControl(pdu.itt, pdu);
          break;
        case Opcode.AsyncMessage:
          this.window(pdu.expCmdSN, pdu.maxCmdSN);
          this.statusSeen(pdu.statSN);
          this.onAsyncMessage(conn, pdu);
          break;
        case Opcode.Reject:
          this.window(pdu.expCmdSN, pdu.maxCmdSN);
          this.statusSeen(pdu.statSN);
          this.onReject(pdu);
          break;
        case Opcode.LoginResponse:
          this.protocolError(conn, 'Login Response in full feature phase');
          break;
      }
    } catch (err) {
      this.log.error({ err }, 'error handling a target PDU');
      this.protocolError(conn, `internal error: ${(err as Error).message}`);
    }
  }

  private protocolError(conn: InitiatorConnection, msg: string): void {
    this.log.warn({ reason: msg }, 'protocol error; dropping the connection');
    conn.close(new ConnectionError(`protocol error: ${msg}`, 'protocol'));
  }

  /** ExpCmdSN/MaxCmdSN from any target PDU: they only move forward (RFC 7143 4.2.2.1). */
  private window(exp: number, max: number): void {
    // MaxCmdSN < ExpCmdSN - 1 is invalid and must be ignored.
    if (snLt(max, snAdd(exp, 0xffff_ffff))) return;
    if (snGt(exp, this.expCmdSN)) this.expCmdSN = exp;
    if (snGt(max, this.maxCmdSN)) {
      this.maxCmdSN = max;
      if (this.qHead < this.queue.length) this.pump();
    }
  }

  /** A PDU that consumed a StatSN: acknowledge it in the next ExpStatSN. */
  private statusSeen(statSN: number): void {
    if (snGte(statSN, this.expStatSN)) this.expStatSN = snAdd(statSN, 1);
  }

  private scsiTaskFor(itt: number): ScsiTask | undefined {
    const t = this.tasks.get(itt);
    return t instanceof ScsiTask && t.sent && !t.done ? t : undefined;
  }

  /**
   * The receive path asks, from a Data-In header, where its payload goes: straight into the
   * read's buffer, so it is never copied again. Only for the PDU onDataIn will accept as the next
   * one; anything unexpected gets a buffer of its own and onDataIn reports it.
   */
  private dataInDestination(header: Buffer, length: number): Buffer | undefined {
    if ((header[0]! & 0x3f) !== Opcode.DataIn) return undefined;
    const t = this.scsiTaskFor(header.readUInt32BE(16));
    if (!t) return undefined;
    const offset = header.readUInt32BE(40);
    if (offset !== t.dataInFilled || offset + length > t.dataInLength) return undefined;
    if (t.dataIn === undefined && t.dataInBuffer) t.dataIn = t.dataInBuffer.subarray(0, t.dataInLength);
    if (t.dataIn === undefined) {
      const statusPresent = (header[1]! & 0x01) !== 0;
      // The whole read in one PDU (or its last one): exactly the bytes that come, even when the
      // initiator's buffer is larger. Otherwise the full buffer, filled PDU by PDU.
      if (offset === 0 && (length === t.dataInLength || statusPresent)) {
        t.dataIn = Buffer.allocUnsafe(length);
        return t.dataIn;
      }
      t.dataIn = Buffer.allocUnsafe(t.dataInLength);
    }
    if (offset + length > t.dataIn.length) return undefined;
    return t.dataIn.subarray(offset, offset + length);
  }

  private onDataIn(conn: InitiatorConnection, pdu: DataIn): void {
    const t = this.scsiTaskFor(pdu.itt);
    if (!t) {
      this.log.debug({ itt: pdu.itt }, 'Data-In for no task (aborted or finished)');
      return;
    }
    if (pdu.dataSN !== t.expDataSN) return this.protocolError(conn, `Data-In DataSN ${pdu.dataSN}, expected ${t.expDataSN}`);
    t.expDataSN = snAdd(t.expDataSN, 1);
    const data = pdu.data;
    const len = data.length;
    if (len > 0) {
      // DataPDUInOrder/DataSequenceInOrder are Yes (we propose Yes and they are OR-negotiated),
      // so every PDU must continue exactly where the previous one ended.
      if (pdu.bufferOffset !== t.dataInFilled) return this.protocolError(conn, `Data-In at offset ${pdu.bufferOffset}, expected ${t.dataInFilled}`);
      const end = pdu.bufferOffset + len;
      if (end > t.dataInLength) return this.protocolError(conn, `Data-In beyond the ${t.dataInLength} bytes expected`);
      if (t.dataIn === undefined && t.dataInBuffer) t.dataIn = t.dataInBuffer.subarray(0, t.dataInLength);
      if (t.dataIn === undefined) {
        if (pdu.bufferOffset === 0 && (len === t.dataInLength || pdu.statusPresent)) {
          // The whole read in one PDU: hand out the received bytes themselves.
          t.dataIn = data;
        } else {
          t.dataIn = Buffer.allocUnsafe(t.dataInLength);
          data.copy(t.dataIn, pdu.bufferOffset);
        }
      } else if (data.buffer !== t.dataIn.buffer || data.byteOffset !== t.dataIn.byteOffset + pdu.bufferOffset) {
        // Not received in place (see dataInDestination).
        data.copy(t.dataIn, pdu.bufferOffset);
      }
      t.dataInFilled = end;
    }
    if (pdu.statusPresent) {
      const result: ScsiResult = { status: pdu.status, response: 0 };
      if (t.dataIn !== undefined) result.data = this.dataOf(t);
      else if (t.dataInLength > 0) result.data = EMPTY;
      if (pdu.overflow || pdu.underflow) result.residual = { overflow: pdu.overflow, underflow: pdu.underflow, count: pdu.residualCount };
      this.finishScsi(t, result);
    }
  }

  private dataOf(t: ScsiTask): Buffer {
    const d = t.dataIn!;
    return d.length === t.dataInFilled ? d : d.subarray(0, t.dataInFilled);
  }

  private onScsiResponse(pdu: ScsiResponse): void {
    const t = this.scsiTaskFor(pdu.itt);
    if (!t) {
      this.log.debug({ itt: pdu.itt }, 'SCSI Response for no task (aborted or finished)');
      return;
    }
    const result: ScsiResult = { status: pdu.status, response: pdu.response };
    if (pdu.data.length > 0) {
      const sense = unwrapIscsiSense(pdu.data);
      // A copy: the data segment is a view of a receive buffer that holds other PDUs too.
      if (sense) result.sense = Buffer.from(sense);
    }
    if (t.dataIn !== undefined) result.data = this.dataOf(t);
    else if (t.dataInLength > 0) result.data = EMPTY;
    const bidi = t.dataOut !== undefined && t.dataInLength > 0;
    if (pdu.overflow || pdu.underflow) result.residual = { overflow: pdu.overflow, underflow: pdu.underflow, count: pdu.residualCount };
    else if (bidi && (pdu.bidiOverflow || pdu.bidiUnderflow)) {
      result.residual = { overflow: pdu.bidiOverflow, underflow: pdu.bidiUnderflow, count: pdu.bidiReadResidualCount };
    }
    if (t.dataInLength > 0 && pdu.status === ScsiStatus.GOOD && pdu.expDataSN !== t.expDataSN) {
      this.log.warn({ itt: t.itt, expDataSN: pdu.expDataSN, received: t.expDataSN }, 'SCSI Response counts other Data-In PDUs than received');
    }
    this.finishScsi(t, result);
  }

  private onR2T(conn: InitiatorConnection, pdu: R2T): void {
    const t = this.scsiTaskFor(pdu.itt);
    if (!t) {
      this.log.debug({ itt: pdu.itt }, 'R2T for no task (aborted or finished)');
      return;
    }
    const out = t.dataOut;
    if (!out) return this.protocolError(conn, 'R2T for a command without Data-Out');
    const p = this._params!;
    const { bufferOffset: offset, desiredDataTransferLength: length } = pdu;
    if (length === 0 || offset + length > out.length) return this.protocolError(conn, `R2T for bytes ${offset}+${length} of a ${out.length}-byte write`);
    if (length > p.maxBurstLength) return this.protocolError(conn, `R2T asks ${length} bytes, MaxBurstLength is ${p.maxBurstLength}`);
    this.sendDataOut(conn, t, pdu.ttt, offset, length);
  }

  private onReject(pdu: Reject): void {
    const header = pdu.data;
    if (header.length < 48) {
      this.log.warn({ reason: pdu.reason }, 'Reject without the rejected header');
      return;
    }
    const opcode = header[0]! & 0x3f;
    const itt = header.readUInt32BE(16);
    const t = this.tasks.get(itt);
    this.log.warn({ reason: pdu.reason, opcode, itt }, 'target rejected a PDU');
    if (!t || t.done) return;
    if (t instanceof ScsiTask && pdu.reason === RejectReason.WaitingForLogout && opcode === Opcode.ScsiCommand) {
      // Not executed: the target is waiting for the logout it asked for. Hold the command and
      // send it on the new session.
      this.markUnsent(t);
      t.resetTransfer();
      this.holding = true;
      this.queue.splice(this.qHead, 0, t);
      return;
    }
    const err = new CommandRejectedError(pdu.reason, `target rejected the ${opcode === Opcode.DataOut ? 'Data-Out' : 'PDU'} (reason 0x${pdu.reason.toString(16)})`);
    if (t instanceof ScsiTask) this.finishScsiError(t, err);
    else this.failTask(t, err);
  }

  private onAsyncMessage(conn: InitiatorConnection, pdu: AsyncMessage): void {
    const msg: AsyncEventMessage = {
      event: pdu.asyncEvent,
      lun: pdu.lun,
      vcode: pdu.asyncVCode,
      parameter1: pdu.parameter1,
      parameter2: pdu.parameter2,
      parameter3: pdu.parameter3,
      data: EMPTY,
    };
    // The data segment: SenseLength, sense data, then iSCSI event data (RFC 7143 11.9.4).
    if (pdu.data.length >= 2) {
      const senseLen = pdu.data.readUInt16BE(0);
      const sense = unwrapIscsiSense(pdu.data);
      if (sense) {
        msg.senseData = Buffer.from(sense);
        try {
          msg.sense = parseSense(msg.senseData);
        } catch {
          /* not parseable: the raw bytes are still there */
        }
      }
      if (pdu.data.length > 2 + senseLen) msg.data = Buffer.from(pdu.data.subarray(2 + senseLen));
    }
    this.log.info({ event: msg.event, p1: msg.parameter1, p2: msg.parameter2, p3: msg.parameter3 }, 'asynchronous message');
    this.emit('async', msg);
    if (this.opts.handleAsyncEvents === false) return;
    switch (pdu.asyncEvent) {
      case AsyncEvent.RequestLogout:
        void this.logoutAndReconnect(conn, pdu.parameter3);
        break;
      case AsyncEvent.DropConnection:
      case AsyncEvent.DropAllConnections:
        // The target will drop us; Parameter2 is the Time2Wait before logging in again.
        this.reconnectAfter = { conn, delayMs: pdu.parameter2 * 1000 };
        conn.close(new ConnectionError(`target announced it drops the connection (AsyncEvent ${pdu.asyncEvent})`, 'closed'));
        break;
      case AsyncEvent.RequestNegotiation:
        this.renegotiate().catch((err) => this.log.warn({ err: (err as Error).message }, 'renegotiation failed'));
        break;
      default:
        break;
    }
  }

  /**
   * AsyncEvent 1: the target wants this session logged out within Parameter3 seconds. New
   * commands are held, those in flight get the time to finish, then Logout, and the session
   * logs in again at its persistent portal, where the held commands go out.
   */
  private async logoutAndReconnect(conn: InitiatorConnection, seconds: number): Promise<void> {
    if (this.asyncLogoutBusy) return;
    this.asyncLogoutBusy = true;
    this.holding = true;
    const budgetMs = Math.max(1, seconds || 5) * 1000;
    const started = Date.now();
    await this.whenIdle(() => this.inFlight === 0, budgetMs * 0.8);
    if (conn !== this.conn || this.state !== 'ready') return;
    // Set before the Logout goes out: the target may close the connection as soon as it answers.
    this.reconnectAfter = { conn, delayMs: 0 };
    try {
      await Promise.race([
        this.sendLogout(LogoutReason.CloseSession),
        new Promise((_, reject) => setTimeout(() => reject(new Error('logout timed out')), Math.max(100, budgetMs - (Date.now() - started))).unref()),
      ]);
    } catch (err) {
      this.log.warn({ err: (err as Error).message }, 'logout requested by the target failed');
    }
    if (conn !== this.conn || this.state !== 'ready') return;
    conn.close(new ConnectionError('logged out at the target\'s request', 'closed'));
  }

  /** Resolves when `cond` holds (checked after every completion), or after timeoutMs. */
  private whenIdle(cond: () => boolean, timeoutMs: number): Promise<void> {
    if (cond() || this.state === 'closed') return Promise.resolve();
    return new Promise((resolve) => {
      const check = (): boolean => {
        if (!cond() && this.state !== 'closed') return false;
        clearTimeout(timer);
        resolve();
        return true;
      };
      const timer = setTimeout(() => {
        this.idleWaiters = this.idleWaiters.filter((w) => w !== check);
        resolve();
      }, timeoutMs);
      this.idleWaiters.push(check);
    });
  }

  private checkIdle(): void {
    if (this.idleWaiters.length === 0) return;
    this.idleWaiters = this.idleWaiters.filter((check) => !check());
  }

  // -------------------------------------------------------------------------------------------
  // Completion

  private markUnsent(t: Task): void {
    if (!t.sent) return;
    t.sent = false;
    if (t instanceof ScsiTask) this.inFlight--;
  }

  private release(t: ScsiTask): void {
    t.done = true;
    this.markUnsent(t);
    this.tasks.delete(t.itt);
    this.scsiPending--;
    if (t.timer) clearTimeout(t.timer);
    if (t.onSignal) t.signal?.removeEventListener('abort', t.onSignal);
  }

  private finishScsi(t: ScsiTask, result: ScsiResult): void {
    if (t.done) return;
    this.release(t);
    t.resolve(result);
    this.checkIdle();
  }

  private finishScsiError(t: ScsiTask, err: Error): void {
    if (t.done) return;
    this.release(t);
    t.reject(err);
    this.checkIdle();
  }

  private completeControl(itt: number, pdu: TargetPdu): void {
    const t = this.tasks.get(itt);
    if (!(t instanceof ControlTask) || t.done) {
      this.log.debug({ itt, opcode: pdu.opcode }, 'response for no pending request');
      return;
    }
    t.done = true;
    this.markUnsent(t);
    this.tasks.delete(itt);
    if (t.timer) clearTimeout(t.timer);
    t.resolve(pdu);
  }

  private failTask(t: Task, err: Error): void {
    if (t.done) return;
    if (t instanceof ScsiTask) {
      this.finishScsiError(t, err);
      return;
    }
    t.done = true;
    this.markUnsent(t);
    this.tasks.delete(t.itt);
    if (t.timer) clearTimeout(t.timer);
    t.reject(err);
  }

  /**
   * Timeout or AbortSignal. A command still queued simply leaves; one the target has is aborted
   * with ABORT TASK first, so its tag is not reused while the target may still answer it. If
   * its status arrives before the abort completes, the status wins.
   */
  /**
   * Aborts one command by its Initiator Task Tag (from CommandOptions.onItt): ABORT TASK on the
   * target if it was sent, then its promise rejects with CommandAbortedError. A cheaper
   * alternative to an AbortSignal when commands are forwarded at high rates.
   */
  abortCommand(itt: number, reason?: unknown): void {
    const t = this.tasks.get(itt);
    if (!(t instanceof ScsiTask) || t.done) return;
    this.cancelTask(t, new CommandAbortedError('aborted by the caller', reason === undefined ? undefined : { cause: reason }));
  }

  private cancelTask(t: ScsiTask, err: SessionError): void {
    if (t.done || t.aborting) return;
    if (!t.sent) {
      this.finishScsiError(t, err);
      return;
    }
    t.aborting = err;
    this.abortTask(t.lun, t.itt).then(
      () => this.finishScsiError(t, err),
      () => {
        this.finishScsiError(t, err);
      },
    );
  }

  // -------------------------------------------------------------------------------------------
  // Idle pings

  private startNopTimer(): void {
    const interval = this.opts.nopIntervalMs ?? 10_000;
    if (interval <= 0) return;
    this.lastRx = -1;
    this.pingOutstanding = false;
    this.nopTimer = setInterval(() => this.nopTick(), interval);
    this.nopTimer.unref();
  }

  private nopTick(): void {
    const conn = this.conn;
    if (!conn || this.state !== 'ready' || this.pingOutstanding) return;
    if (conn.rxCount !== this.lastRx) {
      this.lastRx = conn.rxCount;
      return;
    }
    this.pingOutstanding = true;
    this.control('nop', true, (cmdSN) => ({ opcode: Opcode.NopOut, lun: 0, itt: 0, ttt: RESERVED_TAG, cmdSN, expStatSN: this.expStatSN })).then(
      () => {
        this.pingOutstanding = false;
      },
      () => {
        this.pingOutstanding = false;
      },
    );
  }

  /** Sends one NOP-Out ping and waits for its NOP-In. */
  async ping(): Promise<void> {
    await this.control('nop', true, (cmdSN) => ({ opcode: Opcode.NopOut, lun: 0, itt: 0, ttt: RESERVED_TAG, cmdSN, expStatSN: this.expStatSN }));
  }

  private stopTimers(): void {
    if (this.nopTimer) clearInterval(this.nopTimer);
    this.nopTimer = undefined;
    const r = this.reconnectTimer;
    this.reconnectTimer = undefined;
    if (r) {
      clearTimeout(r.timer);
      r.wake();
    }
  }
}

// ---------------------------------------------------------------------------------------------

function checkGood(r: ScsiResult, what: string): void {
  if (r.status !== ScsiStatus.GOOD || r.response !== 0) throw new ScsiError(what, r);
}

function senseKeyOf(r: ScsiResult): number | undefined {
  if (r.status !== ScsiStatus.CHECK_CONDITION || !r.sense) return undefined;
  try {
    return parseSense(r.sense).key;
  } catch {
    return undefined;
  }
}

function isIllegalRequest(r: ScsiResult): boolean {
  return senseKeyOf(r) === SenseKey.ILLEGAL_REQUEST;
}
