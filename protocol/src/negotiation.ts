// Text-mode negotiation (RFC 7143 section 6.2) for both roles: a target answering an
// initiator's proposals, and an initiator proposing keys and checking a target's answers.
// One Negotiator lives for one connection's login (and its later Text exchanges).

import {
  formatBoolean,
  isAuthenticationKey,
  isPrivateExtensionKey,
  isPublicExtensionKey,
  ISCSI_NAME_MAX_LENGTH,
  keyDefinition,
  MAX_SIMPLE_VALUE_LENGTH,
  parseBooleanValue,
  parseListValue,
  parseNumericValue,
  RESERVED_VALUES,
  type KeyDefinition,
  type NegotiationStage,
} from './keys.ts';
import { LoginStatus, type LoginStatusCode } from './login-stage.ts';
import type { TextPair } from './text.ts';

export type Role = 'initiator' | 'target';
export type SessionType = 'Normal' | 'Discovery';
export type DigestName = 'None' | 'CRC32C';
export type AuthMethodName = 'CHAP' | 'None';
export type TaskReportingMode = 'RFC3720' | 'ResponseFence' | 'FastAbort';

export type NegotiationErrorReason =
  | 'duplicate-key' // a key sent twice in one negotiation: a renegotiation the RFC forbids
  | 'key-not-allowed-in-stage' // e.g. an operational key in the security stage
  | 'key-not-allowed-from-sender' // e.g. TargetAlias sent by an initiator
  | 'reserved-value-proposed' // Reject, Irrelevant or NotUnderstood used as a proposal
  | 'invalid-answer' // an answer the selection rules do not allow
  | 'unexpected-not-understood' // NotUnderstood for a key every implementation must support
  | 'invalid-value' // a declaration that cannot be used (empty or oversized name...)
  | 'unsupported-session-type'
  | 'stage-regression'; // asked to go back to an earlier stage

/**
 * A protocol error in negotiation. A target answers it with a Login Response carrying
 * `loginStatus` (then closes the connection); an initiator drops the connection.
 * Messages name keys, never values, so a secret can never end up in a log through them.
 */
export class NegotiationError extends Error {
  override readonly name = 'NegotiationError';
  readonly kind = 'negotiation' as const;
  constructor(
    readonly reason: NegotiationErrorReason,
    readonly key: string | undefined,
    message: string,
    readonly loginStatus: LoginStatusCode = LoginStatus.InitiatorError,
  ) {
    super(message);
  }
}

/** The operational parameters of a session and connection once negotiation is over. */
export interface SessionParams {
  sessionType: SessionType;
  initiatorName: string | undefined;
  targetName: string | undefined;
  initiatorAlias: string | undefined;
  targetAlias: string | undefined;
  targetPortalGroupTag: number | undefined;
  /** The negotiated AuthMethod; undefined when no security stage took place or it was rejected. */
  authMethod: AuthMethodName | undefined;
  headerDigest: DigestName;
  dataDigest: DigestName;
  maxConnections: number;
  initialR2T: boolean;
  immediateData: boolean;
  /**
   * The largest data segment this node accepts: what it declared, or the RFC default 8192 if
   * it declared nothing (the peer then assumes the default).
   */
  maxRecvDataSegmentLength: number;
  /** The largest data segment this node may send: the peer's declared MaxRecvDataSegmentLength. */
  maxSendDataSegmentLength: number;
  maxBurstLength: number;
  /** Never above maxBurstLength (RFC 7143 13.14). */
  firstBurstLength: number;
  defaultTime2Wait: number;
  defaultTime2Retain: number;
  maxOutstandingR2T: number;
  dataPDUInOrder: boolean;
  dataSequenceInOrder: boolean;
  errorRecoveryLevel: number;
  taskReporting: TaskReportingMode;
  iscsiProtocolLevel: number;
  /** The peer's X#NodeArchitecture declaration, informational only. */
  peerNodeArchitecture: string | undefined;
}

/** The RFC 7143 defaults: what applies to every key nobody negotiated. */
export function defaultSessionParams(): SessionParams {
  return {
    sessionType: 'Normal',
    initiatorName: undefined,
    targetName: undefined,
    initiatorAlias: undefined,
    targetAlias: undefined,
    targetPortalGroupTag: undefined,
    authMethod: undefined,
    headerDigest: 'None',
    dataDigest: 'None',
    maxConnections: 1,
    initialR2T: true,
    immediateData: true,
    maxRecvDataSegmentLength: 8192,
    maxSendDataSegmentLength: 8192,
    maxBurstLength: 262144,
    firstBurstLength: 65536,
    defaultTime2Wait: 2,
    defaultTime2Retain: 20,
    maxOutstandingR2T: 1,
    dataPDUInOrder: true,
    dataSequenceInOrder: true,
    errorRecoveryLevel: 0,
    taskReporting: 'RFC3720',
    iscsiProtocolLevel: 0,
    peerNodeArchitecture: undefined,
  };
}

/**
 * What this node wants or accepts. For list keys an initiator proposes the list in this order
 * and a target accepts any value in it (the initiator's order decides). For boolean and
 * numerical keys this is "the value the node would choose if given the choice" that RFC 7143
 * 6.2.2 combines with the peer's value: a target caps MaxBurstLength or requires
 * ErrorRecoveryLevel 0 and MaxConnections 1 simply by setting those values here.
 */
export interface LocalSettings {
  headerDigest: readonly DigestName[];
  dataDigest: readonly DigestName[];
  authMethods: readonly AuthMethodName[];
  maxConnections: number;
  initialR2T: boolean;
  immediateData: boolean;
  maxRecvDataSegmentLength: number;
  maxBurstLength: number;
  /** Lowered to maxBurstLength if above it. */
  firstBurstLength: number;
  defaultTime2Wait: number;
  defaultTime2Retain: number;
  maxOutstandingR2T: number;
  dataPDUInOrder: boolean;
  dataSequenceInOrder: boolean;
  errorRecoveryLevel: number;
  taskReporting: readonly TaskReportingMode[];
  /** 1 is the level of RFC 7143 itself, 2 that of RFC 7144. */
  iscsiProtocolLevel: number;
  /** Initiator only: also propose TaskReporting and iSCSIProtocolLevel (older targets may answer NotUnderstood). */
  proposeNewerKeys: boolean;
  /** Initiator only: send IFMarker=No and OFMarker=No, as RFC 3720 initiators do. */
  proposeLegacyMarkers: boolean;
  /**
   * The answer to IFMarker/OFMarker. RFC 7143 13.25 says SHOULD answer Reject and MAY answer No;
   * LIO answers Reject, tgt answers No. IFMarkInt/OFMarkInt are always answered Reject.
   */
  obsoleteMarkerAnswer: 'Reject' | 'No';
  /** Optional X#NodeArchitecture declaration (RFC 7143 13.26). */
  nodeArchitecture: string | undefined;
}

export function defaultLocalSettings(role: Role): LocalSettings {
  return {
    // A target accepts either digest and lets the initiator's order decide; an initiator asks for none.
    headerDigest: role === 'target' ? ['None', 'CRC32C'] : ['None'],
    dataDigest: role === 'target' ? ['None', 'CRC32C'] : ['None'],
    authMethods: ['None'],
    maxConnections: 1,
    initialR2T: true,
    immediateData: true,
    maxRecvDataSegmentLength: 8192,
    maxBurstLength: 262144,
    firstBurstLength: 65536,
    defaultTime2Wait: 2,
    defaultTime2Retain: 20,
    maxOutstandingR2T: 1,
    dataPDUInOrder: true,
    dataSequenceInOrder: true,
    errorRecoveryLevel: 0,
    taskReporting: ['RFC3720'],
    iscsiProtocolLevel: 1,
    proposeNewerKeys: false,
    proposeLegacyMarkers: false,
    obsoleteMarkerAnswer: 'Reject',
    nodeArchitecture: undefined,
  };
}

/** Names this node declares about itself. */
export interface LocalIdentity {
  /** Initiator: declared in the first Login Request. */
  initiatorName?: string;
  initiatorAlias?: string;
  /** Initiator: the target to log in to (not sent in a discovery session). */
  targetName?: string;
  /** Target: declared in the first Login Response. */
  targetAlias?: string;
  /** Target: declared in the first Login Response (RFC 7143 13.9). */
  targetPortalGroupTag?: number;
}

export interface NegotiatorOptions {
  role: Role;
  /** Initiator: the session type it declares. A target learns it from SessionType. */
  sessionType?: SessionType;
  /** False for a connection added to an existing session (non-zero TSIH). Default true. */
  leadingConnection?: boolean;
  /** The stage negotiation starts in. Default 'security'. */
  stage?: NegotiationStage;
  settings?: Partial<LocalSettings>;
  identity?: LocalIdentity;
}

export type AnswerOutcome = 'accepted' | 'rejected' | 'irrelevant' | 'not-understood';

export interface PeerAnswer {
  key: string;
  outcome: AnswerOutcome;
  /** The value answered (the negotiated value when accepted). */
  value: string;
}

/** Everything one batch of received pairs produced. */
export interface NegotiationStep {
  /** Pairs to send back, in the order the keys were received (declarations of this node last). */
  reply: TextPair[];
  /**
   * Authentication keys (CHAP_*, SRP_*, KRB_*) in the order received: the caller hands them to
   * the CHAP helpers and adds their answer to the reply.
   */
  authKeys: TextPair[];
  /** The peer's answers to this node's proposals. */
  peerAnswers: PeerAnswer[];
  /** Value of a SendTargets request (full feature phase, target role). */
  sendTargets: string | undefined;
  /** TargetAddress values received (a redirection, initiator role). */
  targetAddresses: string[];
}

const STAGE_ORDER: Record<NegotiationStage, number> = { security: 0, operational: 1, 'full-feature': 2 };

/**
 * Keys whose outcome decides how others are answered (FirstBurstLength depends on the three
 * before it; everything on SessionType) are processed first within one batch; replies keep the
 * received order.
 */
const PROCESSING_PRIORITY: Record<string, number> = {
  SessionType: 0,
  InitialR2T: 1,
  ImmediateData: 1,
  MaxBurstLength: 1,
};

/** Operational keys in the order an initiator proposes them (libiscsi and open-iscsi use a similar order). */
const OPERATIONAL_KEYS = [
  'HeaderDigest',
  'DataDigest',
  'InitialR2T',
  'ImmediateData',
  'MaxBurstLength',
  'FirstBurstLength',
  'DefaultTime2Wait',
  'DefaultTime2Retain',
  'MaxOutstandingR2T',
  'ErrorRecoveryLevel',
  'MaxConnections',
  'DataPDUInOrder',
  'DataSequenceInOrder',
  'TaskReporting',
  'iSCSIProtocolLevel',
] as const;

type SettingsKey = keyof LocalSettings;
const SETTING_FOR_KEY: Record<string, SettingsKey> = {
  HeaderDigest: 'headerDigest',
  DataDigest: 'dataDigest',
  AuthMethod: 'authMethods',
  MaxConnections: 'maxConnections',
  InitialR2T: 'initialR2T',
  ImmediateData: 'immediateData',
  MaxRecvDataSegmentLength: 'maxRecvDataSegmentLength',
  MaxBurstLength: 'maxBurstLength',
  FirstBurstLength: 'firstBurstLength',
  DefaultTime2Wait: 'defaultTime2Wait',
  DefaultTime2Retain: 'defaultTime2Retain',
  MaxOutstandingR2T: 'maxOutstandingR2T',
  DataPDUInOrder: 'dataPDUInOrder',
  DataSequenceInOrder: 'dataSequenceInOrder',
  ErrorRecoveryLevel: 'errorRecoveryLevel',
  TaskReporting: 'taskReporting',
  iSCSIProtocolLevel: 'iscsiProtocolLevel',
};

function checkSettings(s: LocalSettings): LocalSettings {
  for (const [wire, field] of Object.entries(SETTING_FOR_KEY)) {
    const def = keyDefinition(wire)!;
    const value = s[field];
    if (def.range && typeof value === 'number') {
      if (!Number.isInteger(value) || value < def.range.min || value > def.range.max) {
        throw new RangeError(`${field} must be an integer in ${def.range.min}..${def.range.max}`);
      }
    }
    if (Array.isArray(value)) {
      if (value.length === 0) throw new RangeError(`${field} must list at least one value`);
      for (const v of value) if (!def.values?.includes(v)) throw new RangeError(`${field}: ${v} is not a value of ${wire}`);
    }
  }
  return { ...s, firstBurstLength: Math.min(s.firstBurstLength, s.maxBurstLength) };
}

/**
 * Negotiation state of one connection, for either role.
 *
 * Target, per complete Login Request text (after TextAssembler):
 *   - on the first request, enterStage() to the request's CSG if it is not the security stage;
 *   - step(pairs): reply pairs (answers, then the target's own declarations), authKeys for the
 *     CHAP helpers; a NegotiationError means: reject the login with error.loginStatus;
 *   - when the initiator asks to transit out of the operational stage, offer() adds proposals
 *     for defaults the target cannot accept; transit only once `done`;
 *   - after a response with T=1, enterStage(next stage); params() once in full feature phase.
 * Initiator: offer() for each request, step() on each response, enterStage() on T=1.
 *
 * SendTargets answers are not negotiation (TargetName and TargetAddress repeat there): parse
 * them with decodeTextData, not with step().
 */
export class Negotiator {
  readonly role: Role;
  readonly leadingConnection: boolean;
  readonly settings: Readonly<LocalSettings>;
  readonly identity: Readonly<LocalIdentity>;

  #stage: NegotiationStage;
  #sessionType: SessionType;
  /** Negotiated values and the peer's declarations, in wire form. */
  #values = new Map<string, string>();
  /** Keys the peer sent in the current negotiation (for duplicate detection). */
  #peerSent = new Set<string>();
  /** Keys this node sent in the current negotiation, with the value sent. */
  #sent = new Map<string, string>();
  /** This node's proposals, and those still owed a required answer. */
  #proposals = new Map<string, string>();
  #answered = new Set<string>();
  #pending = new Set<string>();
  /** Proposals the peer never answered before the stage they were made in ended. */
  #unanswered: string[] = [];
  /** Whether MaxRecvDataSegmentLength was declared by this node during login (kept across stages). */
  #declaredMrdsl = false;
  #peerMrdsl: number | undefined;

  constructor(options: NegotiatorOptions) {
    this.role = options.role;
    this.leadingConnection = options.leadingConnection ?? true;
    this.#stage = options.stage ?? 'security';
    this.#sessionType = options.sessionType ?? 'Normal';
    this.settings = Object.freeze(checkSettings({ ...defaultLocalSettings(options.role), ...options.settings }));
    this.identity = Object.freeze({ ...options.identity });
    if (this.identity.targetPortalGroupTag !== undefined) {
      const tag = this.identity.targetPortalGroupTag;
      if (!Number.isInteger(tag) || tag < 0 || tag > 65535) throw new RangeError('targetPortalGroupTag must be in 0..65535');
    }
  }

  get stage(): NegotiationStage {
    return this.#stage;
  }

  get sessionType(): SessionType {
    return this.#sessionType;
  }

  /** This node's proposals still waiting for a required answer. */
  get pendingKeys(): string[] {
    return [...this.#pending];
  }

  /** True when no proposal of this node awaits an answer. */
  get done(): boolean {
    return this.#pending.size === 0;
  }

  /** Proposals left unanswered when their stage ended; their keys kept their previous value. */
  get unansweredKeys(): string[] {
    return [...this.#unanswered];
  }

  /**
   * Moves to a later stage (after a Login Response with T=1, or to full feature phase).
   * Proposals still unanswered are recorded in unansweredKeys. Entering full feature phase
   * starts a fresh negotiation for later Text exchanges.
   */
  enterStage(stage: NegotiationStage): void {
    if (STAGE_ORDER[stage] < STAGE_ORDER[this.#stage]) {
      throw new NegotiationError('stage-regression', undefined, `cannot go back from ${this.#stage} to ${stage}`);
    }
    if (stage === this.#stage) return;
    this.#unanswered.push(...this.#pending);
    this.#pending.clear();
    this.#stage = stage;
    if (stage === 'full-feature') this.startTextNegotiation();
  }

  /**
   * Starts a new Text negotiation in full feature phase: keys may be sent again (a
   * MaxRecvDataSegmentLength re-declaration, for instance) without being a duplicate.
   */
  startTextNegotiation(): void {
    this.#peerSent.clear();
    this.#sent.clear();
    this.#proposals.clear();
    this.#answered.clear();
    this.#pending.clear();
  }

  /**
   * Initiator: the pairs to send in the next request: its declarations (once) and, in the
   * operational stage, a proposal for every key not negotiated yet.
   * Target: its declarations (TargetPortalGroupTag, TargetAlias, MaxRecvDataSegmentLength) if
   * not sent yet, and proposals for the keys whose RFC default it cannot accept and that the
   * initiator left unnegotiated. Call it when the initiator asks to leave the operational stage;
   * if it returns a proposal, answer with T=0 so the initiator can reply.
   */
  offer(): TextPair[] {
    const out: TextPair[] = [];
    if (this.#stage === 'full-feature') return out;
    this.#addDeclarations(out);
    if (this.role === 'initiator') {
      if (this.#stage === 'security') {
        this.#propose(out, 'AuthMethod', this.settings.authMethods.join(','));
      } else {
        for (const name of OPERATIONAL_KEYS) {
          if ((name === 'TaskReporting' || name === 'iSCSIProtocolLevel') && !this.settings.proposeNewerKeys) continue;
          if (this.#mayPropose(name)) this.#propose(out, name, this.#localWireValue(name));
        }
        if (this.settings.proposeLegacyMarkers) {
          for (const name of ['IFMarker', 'OFMarker']) if (this.#mayPropose(name)) this.#propose(out, name, 'No');
        }
      }
    } else if (this.#stage === 'operational') {
      for (const name of OPERATIONAL_KEYS) {
        if (this.#mayPropose(name) && !this.#defaultAcceptable(name)) this.#propose(out, name, this.#localWireValue(name));
      }
    }
    return out;
  }

  /** Processes received pairs and returns the pairs to send back. See step() for the rest of the outcome. */
  respond(received: readonly TextPair[]): TextPair[] {
    return this.step(received).reply;
  }

  /**
   * Processes one complete negotiation text from the peer (all PDUs of a C=1 sequence, as
   * TextAssembler returns them): answers its proposals, records its declarations, checks its
   * answers to this node's proposals. Throws NegotiationError on a protocol error.
   */
  step(received: readonly TextPair[]): NegotiationStep {
    const step: NegotiationStep = { reply: [], authKeys: [], peerAnswers: [], sendTargets: undefined, targetAddresses: [] };
    // Duplicates are checked in received order, so the error names the second occurrence.
    for (const [key] of received) {
      if (key === 'TargetAddress') continue; // the one key the RFC lets repeat
      if (this.#peerSent.has(key)) {
        throw new NegotiationError('duplicate-key', key, `${key} sent twice in one negotiation`);
      }
      this.#peerSent.add(key);
    }
    const order = received.map((_, i) => i);
    order.sort((a, b) => (PROCESSING_PRIORITY[received[a]![0]] ?? 2) - (PROCESSING_PRIORITY[received[b]![0]] ?? 2) || a - b);
    const replies: (TextPair | undefined)[] = new Array(received.length);
    for (const i of order) {
      const [key, value] = received[i]!;
      const answer = this.#receive(key, value, step);
      if (answer !== undefined) {
        replies[i] = [key, answer];
        this.#sent.set(key, answer);
      }
    }
    for (const r of replies) if (r) step.reply.push(r);
    if (this.role === 'target') this.#addDeclarations(step.reply);
    return step;
  }

  /** Declarations the target still needs from the initiator before the login can complete. */
  missingDeclarations(): string[] {
    const missing: string[] = [];
    if (!this.#values.has('InitiatorName')) missing.push('InitiatorName');
    if (this.#sessionType === 'Normal' && !this.#values.has('TargetName')) missing.push('TargetName');
    return missing;
  }

  /** The negotiated parameters: RFC defaults for everything not negotiated. */
  params(): SessionParams {
    const p = defaultSessionParams();
    const v = this.#values;
    p.sessionType = this.#sessionType;
    const mine = this.role === 'initiator';
    p.initiatorName = mine ? this.identity.initiatorName : v.get('InitiatorName');
    p.initiatorAlias = mine ? this.identity.initiatorAlias : v.get('InitiatorAlias');
    p.targetName = mine ? this.identity.targetName : v.get('TargetName');
    p.targetAlias = mine ? v.get('TargetAlias') : this.identity.targetAlias;
    const tpgt = v.get('TargetPortalGroupTag');
    p.targetPortalGroupTag = mine ? (tpgt === undefined ? undefined : parseNumericValue(tpgt)) : this.identity.targetPortalGroupTag;
    const auth = v.get('AuthMethod');
    p.authMethod = auth === 'CHAP' || auth === 'None' ? auth : undefined;
    p.headerDigest = (v.get('HeaderDigest') as DigestName | undefined) ?? p.headerDigest;
    p.dataDigest = (v.get('DataDigest') as DigestName | undefined) ?? p.dataDigest;
    const num = (name: string, fallback: number) => {
      const text = v.get(name);
      return text === undefined ? fallback : (parseNumericValue(text) ?? fallback);
    };
    const bool = (name: string, fallback: boolean) => {
      const text = v.get(name);
      return text === undefined ? fallback : (parseBooleanValue(text) ?? fallback);
    };
    p.maxConnections = num('MaxConnections', p.maxConnections);
    p.initialR2T = bool('InitialR2T', p.initialR2T);
    p.immediateData = bool('ImmediateData', p.immediateData);
    p.maxBurstLength = num('MaxBurstLength', p.maxBurstLength);
    p.firstBurstLength = Math.min(num('FirstBurstLength', p.firstBurstLength), p.maxBurstLength);
    p.defaultTime2Wait = num('DefaultTime2Wait', p.defaultTime2Wait);
    p.defaultTime2Retain = num('DefaultTime2Retain', p.defaultTime2Retain);
    p.maxOutstandingR2T = num('MaxOutstandingR2T', p.maxOutstandingR2T);
    p.dataPDUInOrder = bool('DataPDUInOrder', p.dataPDUInOrder);
    p.dataSequenceInOrder = bool('DataSequenceInOrder', p.dataSequenceInOrder);
    p.errorRecoveryLevel = num('ErrorRecoveryLevel', p.errorRecoveryLevel);
    p.taskReporting = (v.get('TaskReporting') as TaskReportingMode | undefined) ?? p.taskReporting;
    p.iscsiProtocolLevel = num('iSCSIProtocolLevel', p.iscsiProtocolLevel);
    if (this.#declaredMrdsl) p.maxRecvDataSegmentLength = this.settings.maxRecvDataSegmentLength;
    if (this.#peerMrdsl !== undefined) p.maxSendDataSegmentLength = this.#peerMrdsl;
    p.peerNodeArchitecture = v.get('X#NodeArchitecture');
    return p;
  }

  // --- receiving ---

  /** Handles one received pair; returns the answer to send, or undefined for none. */
  #receive(key: string, value: string, step: NegotiationStep): string | undefined {
    const reserved = RESERVED_VALUES.includes(value);
    // An answer: to one of our proposals, or (NotUnderstood/Reject/Irrelevant only) to one of
    // our declarations. Any other value under a key we declared is the peer's own declaration.
    const answersProposal = this.#proposals.has(key);
    if ((answersProposal || (reserved && this.#sent.has(key))) && !this.#answered.has(key)) {
      this.#answered.add(key);
      this.#pending.delete(key);
      step.peerAnswers.push(answersProposal ? this.#takeAnswer(key, value) : this.#takeDeclarationAnswer(key, value));
      return undefined;
    }
    if (reserved) {
      throw new NegotiationError('reserved-value-proposed', key, `${key} proposed with a reserved constant`);
    }
    if (isAuthenticationKey(key)) {
      if (this.#stage !== 'security') throw this.#stageError(key);
      step.authKeys.push([key, value]);
      return undefined;
    }
    const def = keyDefinition(key);
    // Unknown keys, private (X-) and public (X#) extensions we do not implement alike: RFC 7143 6.2.
    if (def === undefined) return 'NotUnderstood';
    this.#checkSender(def);
    if (!def.stages.includes(this.#stage)) throw this.#stageError(key);

    if (def.obsolete) {
      // RFC 7143 13.25: never NotUnderstood; Reject (or No for the two booleans).
      return def.name === 'IFMarker' || def.name === 'OFMarker' ? this.settings.obsoleteMarkerAnswer : 'Reject';
    }
    if (def.kind === 'declarative') return this.#receiveDeclaration(def, value, step);
    if (def.kind === 'special') {
      if (def.name === 'SendTargets' && this.role === 'target') {
        step.sendTargets = value;
        return undefined;
      }
      throw new NegotiationError('key-not-allowed-from-sender', key, `${key} is not expected here`);
    }

    // A negotiated key proposed by the peer.
    if (this.#sessionType === 'Discovery' && def.irrelevantInDiscovery) return 'Irrelevant';
    if (def.leadingOnly && !this.leadingConnection) return 'Irrelevant';
    if (def.name === 'FirstBurstLength' && this.#currentBoolean('InitialR2T') && !this.#currentBoolean('ImmediateData')) {
      // RFC 7143 13.14: with InitialR2T=Yes and ImmediateData=No no unsolicited data flows.
      return 'Irrelevant';
    }
    const result = this.#select(def, value);
    if (result !== 'Reject') this.#values.set(def.name, result);
    return result;
  }

  #checkSender(def: KeyDefinition): void {
    const peer: Role = this.role === 'target' ? 'initiator' : 'target';
    let allowed = def.senders === 'both' || def.senders === peer;
    // A target sends TargetName only inside a SendTargets answer, never during login.
    if (def.name === 'TargetName' && peer === 'target' && this.#stage !== 'full-feature') allowed = false;
    if (!allowed) {
      throw new NegotiationError('key-not-allowed-from-sender', def.name, `${def.name} may not be sent by the ${peer}`);
    }
  }

  #stageError(key: string): NegotiationError {
    return new NegotiationError('key-not-allowed-in-stage', key, `${key} is not allowed in the ${this.#stage} stage`);
  }

  #receiveDeclaration(def: KeyDefinition, value: string, step: NegotiationStep): string | undefined {
    switch (def.name) {
      case 'SessionType':
        if (value !== 'Normal' && value !== 'Discovery') {
          throw new NegotiationError('unsupported-session-type', def.name, 'SessionType is neither Normal nor Discovery', LoginStatus.SessionTypeNotSupported);
        }
        this.#sessionType = value;
        this.#values.set(def.name, value);
        return undefined;
      case 'InitiatorName':
      case 'TargetName':
        if (value.length === 0 || Buffer.byteLength(value, 'utf8') > ISCSI_NAME_MAX_LENGTH) {
          throw new NegotiationError('invalid-value', def.name, `${def.name} is empty or longer than ${ISCSI_NAME_MAX_LENGTH} bytes`);
        }
        this.#values.set(def.name, value);
        return undefined;
      case 'TargetPortalGroupTag': {
        const tag = parseNumericValue(value);
        if (tag === undefined || tag > 65535) throw new NegotiationError('invalid-value', def.name, 'TargetPortalGroupTag is not a 16-bit value');
        this.#values.set(def.name, String(tag));
        return undefined;
      }
      case 'MaxRecvDataSegmentLength': {
        const n = parseNumericValue(value);
        if (n === undefined || n < def.range!.min || n > def.range!.max) {
          // The declaration is unusable; the default (8192) stays in force, which is always safe.
          return 'Reject';
        }
        this.#peerMrdsl = n;
        return undefined;
      }
      case 'TargetAddress':
        step.targetAddresses.push(value);
        return undefined;
      default:
        // Aliases and X#NodeArchitecture: informational; an oversized one is ignored.
        if (Buffer.byteLength(value, 'utf8') <= MAX_SIMPLE_VALUE_LENGTH) this.#values.set(def.name, value);
        return undefined;
    }
  }

  /** The acceptor's choice for a negotiated key (RFC 7143 6.2.1, 6.2.2), or Reject. */
  #select(def: KeyDefinition, value: string): string {
    switch (def.kind) {
      case 'list': {
        const acceptable = this.#localList(def.name);
        return parseListValue(value).find((v) => acceptable.includes(v)) ?? 'Reject';
      }
      case 'boolean-and':
      case 'boolean-or': {
        const theirs = parseBooleanValue(value);
        if (theirs === undefined) return 'Reject';
        const ours = this.#localBoolean(def.name);
        return formatBoolean(def.kind === 'boolean-and' ? theirs && ours : theirs || ours);
      }
      case 'numerical-min':
      case 'numerical-max': {
        const theirs = parseNumericValue(value);
        // A value outside the key's range is not admissible: answered Reject (RFC 7143 6.2.2).
        if (theirs === undefined || theirs < def.range!.min || theirs > def.range!.max) return 'Reject';
        const ours = this.#localNumber(def.name);
        let result = def.kind === 'numerical-min' ? Math.min(theirs, ours) : Math.max(theirs, ours);
        if (def.name === 'FirstBurstLength') result = Math.min(result, this.#currentNumber('MaxBurstLength'));
        return String(result);
      }
      default:
        return 'Reject';
    }
  }

  /** The peer could not use one of our declarations (RFC 7143 6.2: NotUnderstood is valid for them too). */
  #takeDeclarationAnswer(key: string, value: string): PeerAnswer {
    const def = keyDefinition(key);
    if (value === 'NotUnderstood') {
      if (def !== undefined && !def.mayBeNotUnderstood) {
        throw new NegotiationError('unexpected-not-understood', key, `${key} answered NotUnderstood`);
      }
      return { key, outcome: 'not-understood', value };
    }
    // The peer keeps assuming the default for a declaration it refused.
    if (key === 'MaxRecvDataSegmentLength') this.#declaredMrdsl = false;
    return { key, outcome: value === 'Reject' ? 'rejected' : 'irrelevant', value };
  }

  /** Checks the peer's answer to one of this node's proposals (RFC 7143 6.2). */
  #takeAnswer(key: string, value: string): PeerAnswer {
    const def = keyDefinition(key);
    const proposed = this.#proposals.get(key)!;
    if (value === 'NotUnderstood') {
      if (def !== undefined && !def.mayBeNotUnderstood && !isPrivateExtensionKey(key) && !isPublicExtensionKey(key)) {
        // Every key of RFC 7143 must be understood (6.2); only newer and extension keys may not be.
        throw new NegotiationError('unexpected-not-understood', key, `${key} answered NotUnderstood`);
      }
      return { key, outcome: 'not-understood', value };
    }
    // Reject leaves the key at its current value; Irrelevant does not fail the negotiation.
    if (value === 'Reject') return { key, outcome: 'rejected', value };
    if (value === 'Irrelevant') return { key, outcome: 'irrelevant', value };
    if (def === undefined) return { key, outcome: 'accepted', value };
    const invalid = () => new NegotiationError('invalid-answer', key, `${key} answered with a value the selection rules do not allow`);
    switch (def.kind) {
      case 'list':
        // One value, and one that was proposed (RFC 7143 6.2.1).
        if (value.includes(',') || !parseListValue(proposed).includes(value)) throw invalid();
        break;
      case 'boolean-and':
      case 'boolean-or': {
        const answer = parseBooleanValue(value);
        const ours = parseBooleanValue(proposed)!;
        if (answer === undefined) throw invalid();
        // AND with our No can only give No; OR with our Yes can only give Yes.
        if (def.kind === 'boolean-and' && !ours && answer) throw invalid();
        if (def.kind === 'boolean-or' && ours && !answer) throw invalid();
        break;
      }
      case 'numerical-min':
      case 'numerical-max': {
        const answer = parseNumericValue(value);
        const ours = parseNumericValue(proposed)!;
        if (answer === undefined || answer < def.range!.min || answer > def.range!.max) throw invalid();
        if (def.kind === 'numerical-min' ? answer > ours : answer < ours) throw invalid();
        break;
      }
      default:
        throw invalid();
    }
    if (!def.obsolete) this.#values.set(key, value);
    return { key, outcome: 'accepted', value };
  }

  // --- proposing ---

  #addDeclarations(out: TextPair[]): void {
    // Declarations belong to the login; Text exchanges in full feature phase only carry what the caller asks for.
    if (this.#stage === 'full-feature') return;
    const declare = (key: string, value: string | undefined) => {
      if (value === undefined || this.#sent.has(key)) return;
      out.push([key, value]);
      this.#sent.set(key, value);
    };
    if (this.role === 'initiator') {
      declare('InitiatorName', this.identity.initiatorName);
      declare('InitiatorAlias', this.identity.initiatorAlias);
      if (this.#sessionType === 'Normal') declare('TargetName', this.identity.targetName);
      declare('SessionType', this.#sessionType);
    } else {
      const tag = this.identity.targetPortalGroupTag;
      declare('TargetPortalGroupTag', tag === undefined ? undefined : String(tag));
      declare('TargetAlias', this.identity.targetAlias);
    }
    if (this.#stage === 'operational') {
      if (!this.#sent.has('MaxRecvDataSegmentLength')) this.#declaredMrdsl = true;
      declare('MaxRecvDataSegmentLength', String(this.settings.maxRecvDataSegmentLength));
      if (this.leadingConnection) declare('X#NodeArchitecture', this.settings.nodeArchitecture);
    }
  }

  /** Whether this node may still propose `name` in this negotiation. */
  #mayPropose(name: string): boolean {
    const def = keyDefinition(name)!;
    if (this.#sent.has(name) || this.#peerSent.has(name) || this.#values.has(name)) return false;
    if (!def.stages.includes(this.#stage)) return false;
    if (def.leadingOnly && !this.leadingConnection) return false;
    if (def.irrelevantInDiscovery && this.#sessionType === 'Discovery') return false;
    if (name === 'FirstBurstLength' && this.#currentBoolean('InitialR2T') && !this.#currentBoolean('ImmediateData')) return false;
    return true;
  }

  #propose(out: TextPair[], key: string, value: string): void {
    if (this.#sent.has(key)) return;
    out.push([key, value]);
    this.#sent.set(key, value);
    this.#proposals.set(key, value);
    const def = keyDefinition(key);
    // RFC 7143 6.2.2: an AND key proposed as No, or an OR key proposed as Yes, is settled by
    // the proposal itself and the answer is optional.
    const settled = (def?.kind === 'boolean-and' && value === 'No') || (def?.kind === 'boolean-or' && value === 'Yes');
    if (settled) {
      if (!def!.obsolete) this.#values.set(key, value);
    } else {
      this.#pending.add(key);
    }
  }

  /** Whether the RFC default of `name` is something this node can live with. */
  #defaultAcceptable(name: string): boolean {
    const def = keyDefinition(name)!;
    const dflt = def.defaultValue!;
    switch (def.kind) {
      case 'list':
        return this.#localList(name).includes(dflt);
      case 'boolean-and':
        // A node that does not want the feature must say so if the default turns it on.
        return dflt === 'No' || this.#localBoolean(name);
      case 'boolean-or':
        // The peer can always turn an OR key on; a default of Yes is never refused.
        return dflt === 'Yes' || !this.#localBoolean(name);
      case 'numerical-min':
        return Number(dflt) <= this.#localNumber(name);
      case 'numerical-max':
        return Number(dflt) >= this.#localNumber(name);
      default:
        return true;
    }
  }

  // --- local and current values ---

  #localWireValue(name: string): string {
    const value = this.settings[SETTING_FOR_KEY[name]!];
    if (Array.isArray(value)) return value.join(',');
    if (typeof value === 'boolean') return formatBoolean(value);
    return String(value);
  }

  #localList(name: string): readonly string[] {
    const value = this.settings[SETTING_FOR_KEY[name]!];
    return Array.isArray(value) ? value : [];
  }

  #localBoolean(name: string): boolean {
    return this.settings[SETTING_FOR_KEY[name]!] === true;
  }

  #localNumber(name: string): number {
    return this.settings[SETTING_FOR_KEY[name]!] as number;
  }

  /** The value in force now: negotiated, or the RFC default. */
  #currentBoolean(name: string): boolean {
    return parseBooleanValue(this.#values.get(name) ?? keyDefinition(name)!.defaultValue!) ?? false;
  }

  #currentNumber(name: string): number {
    return parseNumericValue(this.#values.get(name) ?? keyDefinition(name)!.defaultValue!) ?? 0;
  }
}
