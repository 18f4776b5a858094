import { randomBytes } from 'node:crypto';
import {
  ChapAlgorithm,
  ChapClient,
  checkLoginResponseFlags,
  decodeTextData,
  encodeTextData,
  ISCSI_VERSION,
  LoginStage,
  LoginStatus,
  LoginStatusClass,
  loginStatusClass,
  loginStatusFromFields,
  loginStatusText,
  NegotiationError,
  Negotiator,
  Opcode,
  snAdd,
  splitTextData,
  TextAssembler,
  type LoginResponse,
  type SessionParams,
  type SessionType,
  type TextPair,
} from 'iscsi-node-wire';
import type { Logger } from 'pino';
import { ConnectionError, formatPortal, InitiatorConnection, parsePortal, type Portal } from './connection.ts';

/**
 * The login failed. `status` is the Login Response status as `class << 8 | detail`
 * (RFC 7143 11.13.5): 0x02xx is the target blaming the initiator (0x0201 authentication failure,
 * 0x0203 target not found...), 0x03xx the target's own trouble. `local` is true when the target
 * never said so and the failure was decided on this side (a protocol error in its answers, a
 * target that failed mutual CHAP, a timeout); `status` then holds the closest code.
 */
export class LoginError extends Error {
  override readonly name: string = 'LoginError';
  readonly statusText: string;
  constructor(
    readonly status: number,
    message?: string,
    readonly local = false,
    options?: { cause?: unknown },
  ) {
    const text = loginStatusText(status);
    super(message ?? `login failed: ${text} (0x${status.toString(16).padStart(4, '0')})`, options);
    this.statusText = text;
  }

  get statusClass(): number {
    return loginStatusClass(this.status);
  }

  get statusDetail(): number {
    return this.status & 0xff;
  }
}

/**
 * A Login Response of status class 1: the target lives at `portal` (from TargetAddress).
 * Temporary (0x0101) redirects apply to this login only; permanent (0x0102) ones replace the
 * portal for good.
 */
export class LoginRedirectError extends LoginError {
  override readonly name = 'LoginRedirectError';
  constructor(
    status: number,
    readonly portal: Portal,
    readonly targetPortalGroupTag: number | undefined,
  ) {
    super(status, `login redirected (${loginStatusText(status)}) to ${formatPortal(portal)}`);
  }

  get permanent(): boolean {
    return this.status === LoginStatus.TargetMovedPermanently;
  }
}

export interface ChapOptions {
  user: string;
  secret: string;
  /** Also authenticate the target: it must prove this secret under this name. */
  mutual?: { user: string; secret: string };
}

export interface LoginParams {
  initiatorName: string;
  /** Undefined for a discovery session. */
  targetName?: string;
  sessionType: SessionType;
  isid: Buffer;
  /** 0 for a new session (or the reinstatement of one with the same ISID). */
  tsih: number;
  cid: number;
  chap?: ChapOptions;
  headerDigest: boolean;
  dataDigest: boolean;
  maxRecvDataSegmentLength: number;
  /** CmdSN carried by the Login Requests; the first command after login uses it too. */
  initialCmdSN: number;
  timeoutMs: number;
  logger: Logger;
}

export interface LoginResult {
  tsih: number;
  params: SessionParams;
  /** The CmdSN of the first command (RFC 7143 4.2.2.1: login requests do not advance it). */
  cmdSN: number;
  expCmdSN: number;
  maxCmdSN: number;
  /** StatSN the next status PDU will carry. */
  expStatSN: number;
}

/** A random ISID of the 'random' type (RFC 7143 10.12.5: T = 10b, A reserved, B and C random). */
export function randomIsid(): Buffer {
  const isid = randomBytes(6);
  isid[0] = 0x80;
  return isid;
}

/** Parses a TargetAddress value: `host[:port][,portal-group-tag]`. */
export function parseTargetAddress(value: string): { portal: Portal; tpgt: number | undefined } {
  let text = value.trim();
  let tpgt: number | undefined;
  const comma = text.lastIndexOf(',');
  if (comma >= 0 && comma > text.lastIndexOf(']')) {
    const n = Number(text.slice(comma + 1));
    if (Number.isInteger(n) && n >= 0 && n <= 65535) tpgt = n;
    text = text.slice(0, comma);
  }
  return { portal: parsePortal(text), tpgt };
}

const MAX_LOGIN_EXCHANGES = 32;
/** RFC 7143 13.12: Login PDUs carry at most 8192 bytes of text each. */
const LOGIN_SEGMENT_LIMIT = 8192;

interface Exchange {
  csg: number;
  transit: boolean;
  nsg: number;
}

/**
 * The initiator side of one login (RFC 7143 section 6): the security stage (AuthMethod, then
 * CHAP if configured), the operational stage, and the switch to full feature phase. Leaves the
 * connection in login mode: the caller calls enterFullFeature with the negotiated digests.
 */
export async function login(conn: InitiatorConnection, p: LoginParams): Promise<LoginResult> {
  const deadline = Date.now() + p.timeoutMs;
  const log = p.logger;
  const negotiator = new Negotiator({
    role: 'initiator',
    sessionType: p.sessionType,
    settings: {
      authMethods: p.chap ? ['CHAP'] : ['None'],
      headerDigest: p.headerDigest ? ['CRC32C', 'None'] : ['None'],
      dataDigest: p.dataDigest ? ['CRC32C', 'None'] : ['None'],
      maxRecvDataSegmentLength: p.maxRecvDataSegmentLength,
      // Unsolicited data saves a round trip per write; the target's answer decides.
      initialR2T: false,
      immediateData: true,
      // Numerical-min keys: propose the most we can take and let the target lower them.
      maxBurstLength: 16 * 1024 * 1024 - 1,
      firstBurstLength: 256 * 1024,
      maxOutstandingR2T: 8,
      errorRecoveryLevel: 0,
      maxConnections: 1,
      defaultTime2Wait: 2,
      defaultTime2Retain: 20,
    },
    identity: { initiatorName: p.initiatorName, ...(p.targetName !== undefined ? { targetName: p.targetName } : {}) },
  });
  // One CHAP secret per direction (RFC 7143 9.2.1); the target's name is checked when given.
  const chap = p.chap
    ? new ChapClient({
        credentials: { name: p.chap.user, secret: p.chap.secret },
        algorithms: [ChapAlgorithm.MD5],
        ...(p.chap.mutual ? { mutual: { secret: p.chap.mutual.secret, expectedName: p.chap.mutual.user } } : {}),
      })
    : undefined;

  const itt = 0; // one task tag for the whole login
  let expStatSN = 0;
  let csg: number = LoginStage.Security;
  let authMethod: string | undefined;
  let pendingAnswers: TextPair[] = [];
  let chapOut: TextPair[] = [];
  let last: LoginResponse | undefined;

  const protocolError = (msg: string, cause?: unknown) =>
    new LoginError(LoginStatus.InitiatorError, `login protocol error: ${msg}`, true, cause === undefined ? undefined : { cause });

  const remaining = () => {
    const ms = deadline - Date.now();
    if (ms <= 0) throw new LoginError(LoginStatus.InitiatorError, `login did not complete within ${p.timeoutMs} ms`, true);
    return ms;
  };

  const sendRequest = (x: Exchange, cont: boolean, data: Buffer) => {
    conn.send({
      opcode: Opcode.LoginRequest,
      transit: x.transit && !cont,
      continue: cont,
      csg: x.csg,
      nsg: x.transit && !cont ? x.nsg : 0,
      versionMax: ISCSI_VERSION,
      versionMin: ISCSI_VERSION,
      isid: p.isid,
      tsih: p.tsih,
      cid: p.cid,
      itt,
      cmdSN: p.initialCmdSN,
      expStatSN,
      data,
    });
  };

  const receive = async (): Promise<LoginResponse> => {
    let pdu;
    try {
      pdu = await conn.receiveLoginPdu(remaining());
    } catch (err) {
      if (err instanceof LoginError) throw err;
      if (err instanceof ConnectionError && err.code === 'timeout') {
        throw new LoginError(LoginStatus.InitiatorError, `login did not complete within ${p.timeoutMs} ms`, true, { cause: err });
      }
      throw err;
    }
    if (pdu.opcode !== Opcode.LoginResponse) throw protocolError(`expected a Login Response, got opcode 0x${pdu.opcode.toString(16)}`);
    // Status first: some targets (tgt among them) do not fill in ISID and ITT on a failure.
    const status = loginStatusFromFields(pdu.statusClass, pdu.statusDetail);
    if (pdu.statusClass === LoginStatusClass.Redirection) {
      let address: string | undefined;
      try {
        for (const [k, v] of decodeTextData(pdu.data)) if (k === 'TargetAddress' && address === undefined) address = v;
      } catch (err) {
        throw protocolError('unreadable redirection text', err);
      }
      if (address === undefined) throw new LoginError(status, `login redirected (${loginStatusText(status)}) without a TargetAddress`, true);
      let parsed;
      try {
        parsed = parseTargetAddress(address);
      } catch (err) {
        throw protocolError(`bad TargetAddress ${JSON.stringify(address)}`, err);
      }
      throw new LoginRedirectError(status, parsed.portal, parsed.tpgt);
    }
    if (pdu.statusClass !== LoginStatusClass.Success) throw new LoginError(status);
    if (!pdu.isid.equals(p.isid)) throw protocolError('Login Response carries another ISID');
    if (pdu.itt !== itt) throw protocolError('Login Response carries another Initiator Task Tag');
    if (pdu.versionActive !== ISCSI_VERSION) throw protocolError(`unsupported Version-active ${pdu.versionActive}`);
    expStatSN = snAdd(pdu.statSN, 1);
    return pdu;
  };

  /** Sends one request text (in several PDUs if it must) and collects the whole answer text. */
  const exchange = async (x: Exchange, pairs: TextPair[]): Promise<{ rsp: LoginResponse; text: TextPair[] }> => {
    const chunks = splitTextData(encodeTextData(pairs), LOGIN_SEGMENT_LIMIT);
    for (const chunk of chunks) {
      sendRequest(x, chunk.continue, chunk.data);
      if (chunk.continue) {
        // RFC 7143 6.2: the target acknowledges each continued request with an empty response.
        const ack = await receive();
        if (ack.continue || ack.transit || ack.dataSegmentLength !== 0) throw protocolError('unexpected answer to a continued Login Request');
      }
    }
    const assembler = new TextAssembler();
    for (;;) {
      const rsp = await receive();
      const problem = checkLoginResponseFlags({ transit: x.transit, continue: false, csg: x.csg, nsg: x.nsg, versionMax: 0, versionMin: 0 }, rsp);
      if (problem) throw protocolError(problem);
      let text: TextPair[] | undefined;
      try {
        text = assembler.push(rsp.data, rsp.continue);
      } catch (err) {
        throw protocolError((err as Error).message, err);
      }
      if (text) return { rsp, text };
      // The answer continues: ask for the rest with an empty request.
      sendRequest({ csg: x.csg, transit: false, nsg: 0 }, false, Buffer.alloc(0));
    }
  };

  for (let round = 0; ; round++) {
    if (round >= MAX_LOGIN_EXCHANGES) throw protocolError(`no agreement after ${MAX_LOGIN_EXCHANGES} exchanges`);
    let x: Exchange;
    if (csg === LoginStage.Security) {
      // With CHAP, leaving the security stage is asked for only once our CHAP_R is on its way.
      const chapDone = chap === undefined || chap.state === 'awaiting-target-response' || chap.state === 'complete';
      x = { csg, transit: chapDone, nsg: LoginStage.Operational };
    } else {
      x = { csg, transit: true, nsg: LoginStage.FullFeature };
    }
    const pairs: TextPair[] = [...pendingAnswers, ...negotiator.offer(), ...chapOut];
    chapOut = [];
    const { rsp, text } = await exchange(x, pairs);
    last = rsp;

    let step;
    try {
      step = negotiator.step(text);
    } catch (err) {
      if (err instanceof NegotiationError) throw protocolError(err.message, err);
      throw err;
    }
    pendingAnswers = step.reply;
    for (const a of step.peerAnswers) {
      if (a.key !== 'AuthMethod') continue;
      if (a.outcome !== 'accepted') {
        throw new LoginError(LoginStatus.AuthenticationFailure, `target answered AuthMethod=${a.value} to ${p.chap ? 'CHAP' : 'None'}`, true);
      }
      authMethod = a.value;
    }

    if (csg === LoginStage.Security && chap && authMethod === 'CHAP') {
      if (chap.state === 'initial') {
        chapOut = chap.offer();
      } else if (step.authKeys.length > 0) {
        const checkingTarget = chap.state === 'awaiting-target-response';
        const r = chap.receive(step.authKeys);
        if (r.status === 'failed') {
          const why = checkingTarget ? `the target failed mutual CHAP (${r.failure})` : `CHAP ${r.failure}`;
          throw new LoginError(LoginStatus.AuthenticationFailure, `login: ${why}`, true);
        }
        chapOut = r.reply;
      }
    } else if (step.authKeys.length > 0) {
      throw protocolError('authentication keys without an agreed AuthMethod');
    }

    if (rsp.transit) {
      if (csg === LoginStage.Security && chap && chap.state !== 'complete') {
        // The target let us through without finishing CHAP: for mutual CHAP it has not proved
        // who it is, so it is not trusted with the session.
        throw new LoginError(LoginStatus.AuthenticationFailure, 'target left the security stage before CHAP completed', true);
      }
      csg = rsp.nsg;
      if (csg === LoginStage.FullFeature) break;
      negotiator.enterStage('operational');
      log.debug({ portal: formatPortal(conn.portal) }, 'login: operational stage');
    }
  }

  negotiator.enterStage('full-feature');
  const params = negotiator.params();
  if (p.sessionType === 'Normal' && last.tsih === 0) throw protocolError('final Login Response has TSIH 0');
  return {
    tsih: last.tsih,
    params,
    cmdSN: last.expCmdSN,
    expCmdSN: last.expCmdSN,
    maxCmdSN: last.maxCmdSN,
    expStatSN,
  };
}

export interface EstablishOptions extends LoginParams {
  portal: Portal;
  localAddress?: string;
  /** Redirections followed before giving up. Default 8. */
  maxRedirects?: number;
}

export interface Established {
  conn: InitiatorConnection;
  result: LoginResult;
  /** Where the session finally logged in. */
  portal: Portal;
  /** Set when a permanent redirect was followed: the caller's portal should become this. */
  movedPermanently: Portal | undefined;
}

/** TCP connect plus login, following Login Response redirections (status class 1). */
export async function establish(o: EstablishOptions): Promise<Established> {
  let portal = o.portal;
  let movedPermanently: Portal | undefined;
  const max = o.maxRedirects ?? 8;
  for (let hop = 0; hop <= max; hop++) {
    const conn = await InitiatorConnection.open({
      portal,
      timeoutMs: o.timeoutMs,
      ...(o.localAddress !== undefined ? { localAddress: o.localAddress } : {}),
    });
    try {
      const result = await login(conn, o);
      return { conn, result, portal, movedPermanently };
    } catch (err) {
      conn.close();
      if (err instanceof LoginRedirectError) {
        o.logger.info({ from: formatPortal(portal), to: formatPortal(err.portal), permanent: err.permanent }, 'login redirected');
        portal = err.portal;
        if (err.permanent) movedPermanently = err.portal;
        continue;
      }
      throw err;
    }
  }
  throw new LoginError(LoginStatus.TargetMovedTemporarily, `more than ${max} login redirections`, true);
}
