// Login phase stage rules (RFC 7143 sections 6.3, 11.12 and 11.13): the CSG/NSG stage codes,
// the T (transit) and C (continue) bits, version checks and the login status codes. No PDU
// encoding here: the machine reads and produces plain field values, shaped like the decoded
// Login Request and the Login Response fields of the PDU codec.

import { LoginStage } from './pdu.ts';

export type LoginStageCode = (typeof LoginStage)[keyof typeof LoginStage];

/** The only iSCSI version there is: 0x00, both as Version-max and Version-active. */
export const ISCSI_VERSION = 0x00;

/**
 * Login Response Status-Class and Status-Detail, as one 16-bit value `class << 8 | detail`
 * (RFC 7143 11.13.5).
 */
export const LoginStatus = {
  Success: 0x0000,
  /** The requested target has moved temporarily to the address in TargetAddress. */
  TargetMovedTemporarily: 0x0101,
  /** The requested target has moved permanently to the address in TargetAddress. */
  TargetMovedPermanently: 0x0102,
  /** Miscellaneous initiator error, including any protocol error during login. */
  InitiatorError: 0x0200,
  AuthenticationFailure: 0x0201,
  AuthorizationFailure: 0x0202,
  /** The requested TargetName does not exist here. */
  NotFound: 0x0203,
  TargetRemoved: 0x0204,
  UnsupportedVersion: 0x0205,
  TooManyConnections: 0x0206,
  MissingParameter: 0x0207,
  CannotIncludeInSession: 0x0208,
  SessionTypeNotSupported: 0x0209,
  SessionDoesNotExist: 0x020a,
  InvalidDuringLogin: 0x020b,
  TargetError: 0x0300,
  ServiceUnavailable: 0x0301,
  OutOfResources: 0x0302,
} as const;
export type LoginStatusCode = (typeof LoginStatus)[keyof typeof LoginStatus];

export const LoginStatusClass = {
  Success: 0,
  Redirection: 1,
  InitiatorError: 2,
  TargetError: 3,
} as const;

export function loginStatusClass(status: number): number {
  return (status >> 8) & 0xff;
}

export function loginStatusDetail(status: number): number {
  return status & 0xff;
}

export function loginStatusFromFields(statusClass: number, statusDetail: number): number {
  return ((statusClass & 0xff) << 8) | (statusDetail & 0xff);
}

const STATUS_TEXT: Record<number, string> = {
  0x0000: 'Success',
  0x0101: 'Target moved temporarily',
  0x0102: 'Target moved permanently',
  0x0200: 'Initiator error',
  0x0201: 'Authentication failure',
  0x0202: 'Authorization failure',
  0x0203: 'Not found',
  0x0204: 'Target removed',
  0x0205: 'Unsupported version',
  0x0206: 'Too many connections',
  0x0207: 'Missing parameter',
  0x0208: "Can't include in session",
  0x0209: 'Session type not supported',
  0x020a: 'Session does not exist',
  0x020b: 'Invalid during login',
  0x0300: 'Target error',
  0x0301: 'Service unavailable',
  0x0302: 'Out of resources',
};

export function loginStatusText(status: number): string {
  return STATUS_TEXT[status] ?? `Unknown login status 0x${status.toString(16).padStart(4, '0')}`;
}

/** Stage codes that may appear in CSG or NSG; 2 is reserved. */
export function isValidStageCode(code: number): code is LoginStageCode {
  return code === LoginStage.Security || code === LoginStage.Operational || code === LoginStage.FullFeature;
}

/** The fields of a Login Request that the stage rules look at (a decoded LoginRequest fits). */
export interface LoginRequestFields {
  transit: boolean;
  continue: boolean;
  csg: number;
  nsg: number;
  versionMax: number;
  versionMin: number;
}

/** The stage fields of the Login Response to send (matching the PDU codec's field names). */
export interface LoginResponseFields {
  transit: boolean;
  continue: boolean;
  csg: number;
  /** Meaningful only when transit is true; 0 otherwise, as the field is then reserved. */
  nsg: number;
  versionMax: number;
  versionActive: number;
  statusClass: number;
  statusDetail: number;
}

/**
 * Checks the stage fields of a Login Request on their own, without any session state.
 * Returns a reason string on error, undefined when the fields are coherent.
 */
export function checkLoginRequestFlags(req: LoginRequestFields): string | undefined {
  // RFC 7143 6.2: a PDU with C=1 must not have T=1.
  if (req.transit && req.continue) return 'T and C bits both set';
  if (req.csg !== LoginStage.Security && req.csg !== LoginStage.Operational) return `CSG ${req.csg} is not a login stage`;
  if (req.transit) {
    if (!isValidStageCode(req.nsg)) return `NSG ${req.nsg} is reserved`;
    // Stages only go forward (RFC 7143 6.3).
    if (req.nsg <= req.csg) return `transit from stage ${req.csg} to stage ${req.nsg} does not go forward`;
  }
  return undefined;
}

export interface LoginStageMachineOptions {
  /**
   * When true, the initiator must go through the security stage: a login that starts in the
   * operational stage is refused with AuthenticationFailure, and the security stage cannot be
   * left until the caller reports the initiator authenticated.
   */
  requireAuthentication?: boolean;
}

/** What the caller knows when the machine decides about a request. */
export interface LoginStageContext {
  /**
   * The target agrees to leave the current stage: all its own proposals are answered, and in
   * the security stage authentication is complete. Ignored when the initiator did not ask to
   * transit.
   */
  readyToTransit: boolean;
  /**
   * The highest next stage the target accepts. A target that wants an operational stage (for
   * instance to propose keys) answers a security-stage request for NSG=3 with NSG=1.
   * Default: FullFeature.
   */
  maxNextStage?: LoginStageCode;
  /** The initiator has been authenticated (required to leave the security stage when requireAuthentication). */
  authenticated?: boolean;
}

export type LoginStageDecision =
  | {
      action: 'respond';
      response: LoginResponseFields;
      /** The response moves the connection to full feature phase: this is the final Login Response. */
      final: boolean;
    }
  | {
      /**
       * The request had C=1: its text continues in the next request. Answer with an empty data
       * segment (RFC 7143 6.2) using these fields.
       */
      action: 'acknowledge-continuation';
      response: LoginResponseFields;
    }
  | {
      action: 'reject';
      status: LoginStatusCode;
      reason: string;
      /** A Login Response carrying the failure status; the target then closes the connection. */
      response: LoginResponseFields;
    };

export type LoginMachineState = 'security' | 'operational' | 'full-feature' | 'failed';

function stageName(code: number): LoginMachineState {
  if (code === LoginStage.Security) return 'security';
  if (code === LoginStage.Operational) return 'operational';
  return 'full-feature';
}

/**
 * The target's view of the login stages of one connection. Feed it every Login Request (after
 * PDU decoding); it validates the stage fields against the current stage and decides the stage
 * fields of the response. Pure: no I/O, no timers.
 */
export class LoginStageMachine {
  readonly requireAuthentication: boolean;
  #stage: LoginMachineState = 'security';
  #started = false;
  #versionMax = 0;
  #versionMin = 0;
  /** CSG the next request must carry, once the first request is seen. */
  #expectedCsg: number = LoginStage.Security;

  constructor(options: LoginStageMachineOptions = {}) {
    this.requireAuthentication = options.requireAuthentication ?? false;
  }

  /** The stage the connection is in, 'full-feature' after the final response, 'failed' after a reject. */
  get state(): LoginMachineState {
    return this.#stage;
  }

  get complete(): boolean {
    return this.#stage === 'full-feature';
  }

  /** Decides the response to one Login Request. */
  onRequest(req: LoginRequestFields, ctx: LoginStageContext): LoginStageDecision {
    if (this.#stage === 'failed') return this.#reject(req, LoginStatus.InitiatorError, 'login already failed');
    if (this.#stage === 'full-feature') return this.#reject(req, LoginStatus.InvalidDuringLogin, 'login request after the login phase ended');

    const flagProblem = checkLoginRequestFlags(req);
    if (flagProblem) return this.#reject(req, LoginStatus.InitiatorError, flagProblem);

    if (!this.#started) {
      // Version 0 is the only one; the initiator's range must include it (RFC 7143 11.12.4).
      if (req.versionMin > ISCSI_VERSION || req.versionMax < ISCSI_VERSION || req.versionMin > req.versionMax) {
        return this.#reject(req, LoginStatus.UnsupportedVersion, `no common version in ${req.versionMin}..${req.versionMax}`);
      }
      if (req.csg === LoginStage.Operational && this.requireAuthentication) {
        return this.#reject(req, LoginStatus.AuthenticationFailure, 'login skips the security stage but authentication is required');
      }
      this.#started = true;
      this.#versionMax = req.versionMax;
      this.#versionMin = req.versionMin;
      this.#expectedCsg = req.csg;
      this.#stage = stageName(req.csg);
    } else {
      // Every Login Request of a login carries the same versions (RFC 7143 11.12.4, 11.12.5).
      if (req.versionMax !== this.#versionMax || req.versionMin !== this.#versionMin) {
        return this.#reject(req, LoginStatus.InitiatorError, 'Version-max or Version-min changed during login');
      }
      if (req.csg !== this.#expectedCsg) {
        return this.#reject(req, LoginStatus.InitiatorError, `CSG ${req.csg} but the connection is in stage ${this.#expectedCsg}`);
      }
    }

    if (req.continue) {
      return { action: 'acknowledge-continuation', response: this.#response(false, req.csg, 0, LoginStatus.Success) };
    }

    // A target may only transit when the initiator asked to (RFC 7143 6.3, 11.13.1).
    if (!req.transit || !ctx.readyToTransit) {
      return { action: 'respond', response: this.#response(false, req.csg, 0, LoginStatus.Success), final: false };
    }
    if (req.csg === LoginStage.Security && this.requireAuthentication && ctx.authenticated !== true) {
      // The caller should have said not ready; refusing here keeps a mistake from skipping authentication.
      return { action: 'respond', response: this.#response(false, req.csg, 0, LoginStatus.Success), final: false };
    }

    // The target picks the next stage, never beyond what the initiator asked for (RFC 7143 6.3).
    const nsg: number = Math.min(req.nsg, ctx.maxNextStage ?? LoginStage.FullFeature);
    if (nsg <= req.csg) {
      // The target may not stay put with T=1; when its limit leaves no forward stage it simply
      // does not transit yet.
      return { action: 'respond', response: this.#response(false, req.csg, 0, LoginStatus.Success), final: false };
    }
    this.#expectedCsg = nsg;
    this.#stage = stageName(nsg);
    return { action: 'respond', response: this.#response(true, req.csg, nsg, LoginStatus.Success), final: nsg === LoginStage.FullFeature };
  }

  /**
   * Validates the empty Login Request an initiator sends to acknowledge a Login Response that
   * had C=1 (RFC 7143 6.2). Returns undefined when acceptable, a reject decision otherwise.
   */
  onContinuationAcknowledgement(req: LoginRequestFields, dataSegmentLength: number): LoginStageDecision | undefined {
    if (this.#stage === 'failed' || this.#stage === 'full-feature') {
      return this.#reject(req, LoginStatus.InitiatorError, 'no response text is being continued');
    }
    if (dataSegmentLength !== 0) return this.#reject(req, LoginStatus.InitiatorError, 'continuation acknowledgement carries data');
    if (req.continue) return this.#reject(req, LoginStatus.InitiatorError, 'continuation acknowledgement has C=1');
    if (req.csg !== this.#expectedCsg) return this.#reject(req, LoginStatus.InitiatorError, 'continuation acknowledgement changed CSG');
    return undefined;
  }

  /**
   * Fields for the response that ends a login with a status chosen by the caller
   * (authentication failure, target not found, a redirection...). Any of these ends the login
   * on this connection, so the machine moves to 'failed'.
   */
  fail(status: LoginStatusCode, csg?: number): LoginResponseFields {
    this.#stage = 'failed';
    return this.#response(false, csg ?? (this.#expectedCsg === LoginStage.FullFeature ? LoginStage.Operational : this.#expectedCsg), 0, status);
  }

  #reject(req: LoginRequestFields, status: LoginStatusCode, reason: string): LoginStageDecision {
    this.#stage = 'failed';
    const csg = req.csg === LoginStage.Security || req.csg === LoginStage.Operational ? req.csg : this.#expectedCsg;
    return { action: 'reject', status, reason, response: this.#response(false, csg === LoginStage.FullFeature ? LoginStage.Operational : csg, 0, status) };
  }

  #response(transit: boolean, csg: number, nsg: number, status: number): LoginResponseFields {
    return {
      transit,
      continue: false,
      csg,
      nsg: transit ? nsg : 0,
      versionMax: ISCSI_VERSION,
      versionActive: ISCSI_VERSION,
      statusClass: loginStatusClass(status),
      statusDetail: loginStatusDetail(status),
    };
  }
}

/**
 * Initiator-side check of a Login Response's stage fields against the request it answers
 * (RFC 7143 6.3, 11.13). Returns a reason string on a protocol error, undefined otherwise.
 */
export function checkLoginResponseFlags(req: LoginRequestFields, rsp: Omit<LoginResponseFields, 'versionMax' | 'versionActive'>): string | undefined {
  if (rsp.statusClass !== LoginStatusClass.Success) return undefined;
  if (rsp.transit && rsp.continue) return 'T and C bits both set';
  if (rsp.csg !== req.csg) return `response CSG ${rsp.csg} differs from request CSG ${req.csg}`;
  if (rsp.transit) {
    if (!req.transit) return 'target transits although the initiator did not ask to';
    if (!isValidStageCode(rsp.nsg)) return `NSG ${rsp.nsg} is reserved`;
    if (rsp.nsg <= rsp.csg) return 'transit does not go forward';
    if (rsp.nsg > req.nsg) return `target chose NSG ${rsp.nsg}, beyond the requested ${req.nsg}`;
  }
  return undefined;
}
