import {
  ChapAuthenticator,
  LoginStage,
  LoginStageMachine,
  LoginStatus,
  loginStatusClass,
  loginStatusDetail,
  NegotiationError,
  Negotiator,
  Opcode,
  snAdd,
  TextAssembler,
  encodeTextData,
  type LoginRequest,
  type LoginResponseFields,
  type LoginStatusCode,
  type PduInit,
  type SessionParams,
  type TextPair,
} from 'iscsi-node-wire';
import type { FrontConnection } from './connection.ts';
import { FrontSession, type SessionTable } from './session.ts';
import type { FrontLimits, FrontTarget, OperationalParams, TargetDirectory } from './types.ts';

export interface LoginOutcome {
  response: PduInit & { opcode: 0x23 };
  /** Set on the final response: the connection enters full feature phase in this session. */
  session?: FrontSession;
  /** The login failed or was redirected: close after sending. */
  close?: boolean;
  /** StatSN to use for this response (the first response sets the connection's start). */
  statSN?: number;
}

interface LoginHost {
  directory: TargetDirectory;
  sessions: SessionTable;
  limits: FrontLimits;
}

function lookup(pairs: readonly TextPair[], key: string): string | undefined {
  for (const [k, v] of pairs) if (k === key) return v;
  return undefined;
}

export function toOperationalParams(p: SessionParams): OperationalParams {
  return {
    headerDigest: p.headerDigest === 'CRC32C',
    dataDigest: p.dataDigest === 'CRC32C',
    maxSendDataSegmentLength: p.maxSendDataSegmentLength,
    maxRecvDataSegmentLength: p.maxRecvDataSegmentLength,
    maxBurstLength: p.maxBurstLength,
    firstBurstLength: p.firstBurstLength,
    initialR2T: p.initialR2T,
    immediateData: p.immediateData,
    maxOutstandingR2T: p.maxOutstandingR2T,
    dataPDUInOrder: p.dataPDUInOrder,
    dataSequenceInOrder: p.dataSequenceInOrder,
    defaultTime2Wait: p.defaultTime2Wait,
    defaultTime2Retain: p.defaultTime2Retain,
    errorRecoveryLevel: p.errorRecoveryLevel,
  };
}

/**
 * The target side of one connection's login (RFC 7143 section 6): stage rules, declarations,
 * operational negotiation, CHAP, redirection, and session creation or reinstatement.
 */
export class LoginController {
  private readonly machine: LoginStageMachine;
  private readonly assembler = new TextAssembler({ maxLength: 64 * 1024 });
  private negotiator: Negotiator | undefined;
  private chap: ChapAuthenticator | undefined;
  private target: FrontTarget | undefined;
  private discovery = false;
  private initiatorName = '';
  private first: LoginRequest | undefined;
  private statSN = 0;
  private offered = false;

  constructor(
    private readonly conn: FrontConnection,
    private readonly host: LoginHost,
  ) {
    this.machine = new LoginStageMachine();
  }

  handle(pdu: LoginRequest): LoginOutcome | Promise<LoginOutcome> {
    if (!this.first) {
      this.first = pdu;
      this.statSN = pdu.expStatSN;
    } else {
      this.statSN = snAdd(this.statSN, 1);
      if (!pdu.isid.equals(this.first.isid) || pdu.tsih !== this.first.tsih || pdu.cid !== this.first.cid) {
        return this.fail(pdu, LoginStatus.InitiatorError, 'ISID, TSIH or CID changed during login');
      }
    }
    let pairs: TextPair[] | undefined;
    try {
      pairs = this.assembler.push(pdu.data, pdu.continue);
    } catch (err) {
      return this.fail(pdu, LoginStatus.InitiatorError, (err as Error).message);
    }
    if (!pairs) {
      const d = this.machine.onRequest(pdu, { readyToTransit: false });
      if (d.action === 'reject') return this.fail(pdu, d.status, d.reason);
      return { response: this.response(pdu, d.response, []), statSN: this.statSN };
    }

    if (!this.negotiator) {
      const refused = this.begin(pdu, pairs);
      if (refused) return refused;
    }
    const negotiator = this.negotiator!;
    if (negotiator.stage === 'security' && pdu.csg === LoginStage.Operational) negotiator.enterStage('operational');

    let reply: TextPair[];
    let authKeys: TextPair[];
    try {
      const step = negotiator.step(pairs);
      reply = step.reply;
      authKeys = step.authKeys;
    } catch (err) {
      if (err instanceof NegotiationError) return this.fail(pdu, err.loginStatus, err.message);
      throw err;
    }

    const authRequired = this.chap !== undefined;
    if (pdu.csg === LoginStage.Security && this.chap && authKeys.length > 0) {
      const c = this.chap.receive(authKeys);
      if (c.status === 'failed') return this.fail(pdu, LoginStatus.AuthenticationFailure, `CHAP: ${c.failure ?? 'failed'}`);
      reply = [...reply, ...c.reply];
    } else if (pdu.csg === LoginStage.Security && authRequired && negotiator.params().authMethod === 'None') {
      return this.fail(pdu, LoginStatus.AuthenticationFailure, 'authentication required');
    }
    if (pdu.csg === LoginStage.Operational && !this.offered) {
      // A target proposes only what its limits make necessary (e.g. a MaxBurstLength below the
      // RFC default); usually nothing.
      this.offered = true;
      reply = [...reply, ...negotiator.offer()];
    }
    const authenticated = !authRequired || this.chap!.authenticated;
    const decision = this.machine.onRequest(pdu, {
      readyToTransit: negotiator.done && (pdu.csg !== LoginStage.Security || authenticated),
      authenticated,
    });
    if (decision.action === 'reject') return this.fail(pdu, decision.status, decision.reason);
    if (decision.action === 'acknowledge-continuation') return { response: this.response(pdu, decision.response, []), statSN: this.statSN };
    if (decision.response.transit) negotiator.enterStage(decision.response.nsg === LoginStage.FullFeature ? 'full-feature' : 'operational');
    if (!decision.final) return { response: this.response(pdu, decision.response, reply), statSN: this.statSN };
    return this.complete(pdu, decision.response, reply);
  }

  /** First complete request: who is this, and for which target? */
  private begin(pdu: LoginRequest, pairs: TextPair[]): LoginOutcome | undefined {
    const sessionType = lookup(pairs, 'SessionType') ?? 'Normal';
    const initiatorName = lookup(pairs, 'InitiatorName');
    const targetName = lookup(pairs, 'TargetName');
    if (!initiatorName) return this.fail(pdu, LoginStatus.MissingParameter, 'InitiatorName missing');
    this.initiatorName = initiatorName;
    if (sessionType === 'Discovery') {
      this.discovery = true;
    } else if (sessionType === 'Normal') {
      if (!targetName) return this.fail(pdu, LoginStatus.MissingParameter, 'TargetName missing');
      const target = this.host.directory.get(targetName);
      if (!target) return this.fail(pdu, LoginStatus.NotFound, `no target ${targetName}`);
      if (target.allows && !target.allows(initiatorName)) return this.fail(pdu, LoginStatus.AuthorizationFailure, 'initiator not allowed');
      const moved = target.redirect?.(initiatorName);
      if (moved) {
        this.conn.log.info({ ...target.logFields, initiator: initiatorName, target: target.name, to: moved.address }, 'login redirected');
        return this.fail(pdu, moved.permanent ? LoginStatus.TargetMovedPermanently : LoginStatus.TargetMovedTemporarily, 'redirect', [['TargetAddress', moved.address]]);
      }
      this.target = target;
    } else {
      return this.fail(pdu, LoginStatus.SessionTypeNotSupported, `session type ${sessionType}`);
    }
    if (pdu.tsih !== 0) {
      const s = this.host.sessions.get(pdu.tsih);
      if (!s || s.initiatorName !== initiatorName || !s.isid.equals(pdu.isid)) return this.fail(pdu, LoginStatus.SessionDoesNotExist, 'no such session');
      const live = [...s.connections].filter((c) => c.cid !== pdu.cid);
      if (live.length > 0) return this.fail(pdu, LoginStatus.TooManyConnections, 'MaxConnections=1');
    }
    const limits = this.host.limits;
    const chapUser = this.target?.chap;
    if (chapUser) {
      this.chap = new ChapAuthenticator({
        lookupSecret: (name) => (name === chapUser.user ? chapUser.secret : undefined),
        targetCredentials: this.target?.mutualChap ? { name: this.target.mutualChap.user, secret: this.target.mutualChap.secret } : undefined,
      });
    }
    this.negotiator = new Negotiator({
      role: 'target',
      leadingConnection: pdu.tsih === 0,
      stage: pdu.csg === LoginStage.Operational ? 'operational' : 'security',
      settings: {
        authMethods: chapUser ? ['CHAP'] : ['None'],
        maxConnections: 1,
        errorRecoveryLevel: 0,
        initialR2T: false,
        immediateData: true,
        maxRecvDataSegmentLength: limits.maxRecvDataSegmentLength,
        maxBurstLength: limits.maxBurstLength,
        firstBurstLength: limits.firstBurstLength,
        maxOutstandingR2T: limits.maxOutstandingR2T,
        obsoleteMarkerAnswer: 'No',
      },
      identity: this.target ? { targetAlias: this.target.alias, targetPortalGroupTag: this.target.portalGroupTag } : {},
    });
    if (chapUser && pdu.csg === LoginStage.Operational) return this.fail(pdu, LoginStatus.AuthenticationFailure, 'authentication required');
    return undefined;
  }

  private complete(pdu: LoginRequest, fields: LoginResponseFields, reply: TextPair[]): LoginOutcome | Promise<LoginOutcome> {
    const negotiator = this.negotiator!;
    const params = toOperationalParams(negotiator.params());
    const sessions = this.host.sessions;
    let session: FrontSession;
    if (pdu.tsih !== 0) {
      session = sessions.get(pdu.tsih)!;
      if (!session || session.closed) return this.fail(pdu, LoginStatus.SessionDoesNotExist, 'session ended during login');
      // Connection reinstatement (same CID): the old connection goes, its tasks with it.
      for (const c of [...session.connections]) if (c.cid === pdu.cid) c.close();
    } else {
      if (!this.discovery) {
        // Session reinstatement: a new leading login from the same initiator port replaces the
        // old session (RFC 7143 6.3.5).
        const old = sessions.findByInitiatorPort(this.initiatorName, pdu.isid, this.target?.name);
        if (old) {
          this.conn.log.info({ ...this.target?.logFields, initiator: this.initiatorName, tsih: old.tsih, target: this.target?.name }, 'session reinstatement');
          for (const c of [...old.connections]) c.close();
        }
      }
      session = new FrontSession(sessions.allocateTsih(), Buffer.from(pdu.isid), this.initiatorName, this.target, this.discovery, params, pdu.cmdSN, this.host.limits.commandWindow);
      sessions.add(session);
      const opened = this.discovery ? undefined : this.target?.device.nexusOpened?.(session.nexus);
      if (opened instanceof Promise) {
        const s = session;
        return opened.then(
          () => this.admit(pdu, fields, reply, s),
          (err: unknown) => {
            sessions.remove(s);
            const status = (err as { loginStatus?: number }).loginStatus;
            this.conn.log.warn({ ...this.target?.logFields, initiator: this.initiatorName, tsih: s.tsih, err: (err as Error).message }, 'device refused the nexus');
            return this.fail(pdu, (status ?? LoginStatus.TargetError) as LoginStatusCode, 'device refused the nexus');
          },
        );
      }
    }
    return this.admit(pdu, fields, reply, session);
  }

  private admit(pdu: LoginRequest, fields: LoginResponseFields, reply: TextPair[], session: FrontSession): LoginOutcome {
    session.connections.add(this.conn);
    this.conn.log.info({ ...this.target?.logFields, initiator: this.initiatorName, tsih: session.tsih, target: this.target?.name, discovery: this.discovery }, 'login');
    const response = this.response(pdu, fields, reply, session.tsih, session.expCmdSN, session.maxCmdSN);
    return { response, session, statSN: this.statSN };
  }

  private response(pdu: LoginRequest, f: LoginResponseFields, pairs: TextPair[], tsih = pdu.tsih, expCmdSN = pdu.cmdSN, maxCmdSN = snAdd(pdu.cmdSN, this.host.limits.commandWindow - 1)): PduInit & { opcode: 0x23 } {
    return {
      opcode: Opcode.LoginResponse, itt: pdu.itt, transit: f.transit, continue: f.continue, csg: f.csg, nsg: f.nsg,
      versionMax: f.versionMax, versionActive: f.versionActive, isid: pdu.isid, tsih,
      statSN: this.statSN, expCmdSN, maxCmdSN, statusClass: f.statusClass, statusDetail: f.statusDetail,
      data: pairs.length ? encodeTextData(pairs) : undefined,
    };
  }

  private fail(pdu: LoginRequest, status: LoginStatusCode, reason: string, pairs: TextPair[] = []): LoginOutcome {
    if (loginStatusClass(status) !== 1) this.conn.log.warn({ ...this.target?.logFields, initiator: this.initiatorName || undefined, target: this.target?.name, status: `0x${status.toString(16).padStart(4, '0')}`, reason }, 'login refused');
    const f = this.machine.fail(status, pdu.csg === LoginStage.Operational ? LoginStage.Operational : LoginStage.Security);
    const response = this.response(pdu, { ...f, statusClass: loginStatusClass(status), statusDetail: loginStatusDetail(status) }, pairs);
    return { response, close: true, statSN: this.statSN };
  }
}
