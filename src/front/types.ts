import type { ScsiTargetDevice } from '../scsi/task.ts';

export interface ChapCredentials {
  user: string;
  secret: string;
}

/** A target as the portal presents it to initiators. */
export interface FrontTarget {
  name: string;
  alias?: string;
  portalGroupTag: number;
  device: ScsiTargetDevice;
  /** When set, initiators must authenticate with CHAP as this user. */
  chap?: ChapCredentials;
  /** Mutual CHAP: the target authenticates to the initiator with these. */
  mutualChap?: ChapCredentials;
  /** ACL: false refuses the login with 0x0202 (authorization failure). */
  allows?(initiatorName: string): boolean;
  /**
   * Login redirection: when this returns an address, a normal-session login is answered with
   * status class 1 ("target moved") and TargetAddress instead of being accepted.
   */
  redirect?(initiatorName: string): { address: string; permanent?: boolean } | undefined;
  /** Fields every session log line of this target carries (e.g. detour's volume name). */
  logFields?: Readonly<Record<string, string>>;
}

/** What the portal knows about the targets it serves. */
export interface TargetDirectory {
  get(name: string): FrontTarget | undefined;
  list(): FrontTarget[];
  /** TargetAddress values for SendTargets, "host:port,tpgt". */
  addresses(target: FrontTarget): string[];
}

/** Operational parameters of a full-feature session, as negotiated. */
export interface OperationalParams {
  headerDigest: boolean;
  dataDigest: boolean;
  /** What we may send in one PDU: the initiator's declared MaxRecvDataSegmentLength. */
  maxSendDataSegmentLength: number;
  /** What we declared we accept. */
  maxRecvDataSegmentLength: number;
  maxBurstLength: number;
  firstBurstLength: number;
  initialR2T: boolean;
  immediateData: boolean;
  maxOutstandingR2T: number;
  dataPDUInOrder: boolean;
  dataSequenceInOrder: boolean;
  defaultTime2Wait: number;
  defaultTime2Retain: number;
  errorRecoveryLevel: number;
}

export interface FrontLimits {
  /** Commands the target queues per session: MaxCmdSN - ExpCmdSN + 1. */
  commandWindow: number;
  /** Refuse WRITE commands whose Expected Data Transfer Length is above this (memory bound). */
  maxCommandDataLength: number;
  /** Close a connection whose login has not completed in this time. */
  loginTimeoutMs: number;
  /** Send a NOP-In ping when a connection was idle this long (0: never). */
  nopInIntervalMs: number;
  /** Drop the connection when a NOP-In ping is not answered in this time. */
  nopInTimeoutMs: number;
  /** What the target declares and caps in negotiation. */
  maxRecvDataSegmentLength: number;
  maxBurstLength: number;
  firstBurstLength: number;
  maxOutstandingR2T: number;
}

export const DEFAULT_LIMITS: FrontLimits = {
  commandWindow: 128,
  maxCommandDataLength: 64 << 20,
  loginTimeoutMs: 15_000,
  nopInIntervalMs: 10_000,
  nopInTimeoutMs: 30_000,
  maxRecvDataSegmentLength: 262_144,
  maxBurstLength: 1 << 20,
  firstBurstLength: 65_536,
  maxOutstandingR2T: 1,
};
