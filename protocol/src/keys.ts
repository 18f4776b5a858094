// Every text key of RFC 7143 section 13 (plus iSCSIProtocolLevel from RFC 7144, AuthMethod from
// section 12 and the CHAP keys of section 12.1.3), described as data so that the negotiator,
// the target and the tests all read the same facts.

/**
 * How the value of a key is settled (RFC 7143 6.2):
 * - list: the acceptor picks the first value of the proposer's list that it supports;
 * - boolean-and / boolean-or: result is the AND / OR of both sides' wishes;
 * - numerical-min / numerical-max: result is the smaller / larger of both sides' values;
 * - declarative: one-way, never answered (except with NotUnderstood);
 * - special: exchanges with their own rules (SendTargets, the CHAP challenge and response).
 */
export type KeyKind = 'list' | 'boolean-and' | 'boolean-or' | 'numerical-min' | 'numerical-max' | 'declarative' | 'special';

/** Which side may send the key. */
export type KeySender = 'initiator' | 'target' | 'both';

/** 'session' is the RFC's SW (session-wide), 'connection' its CO (connection-only). */
export type KeyScope = 'session' | 'connection';

/**
 * RFC 7143's "Use" field: IO (initialize only: any login), LO (leading connection login only),
 * FFPO (full feature phase only), ALL (login and full feature phase). Security keys (section 12)
 * have no Use field in the RFC; they are marked 'security'.
 */
export type KeyUse = 'IO' | 'LO' | 'FFPO' | 'ALL' | 'security';

/** The stage a key arrives in: the two login stages, or a Text exchange in full feature phase. */
export type NegotiationStage = 'security' | 'operational' | 'full-feature';

export type ValueType =
  | 'boolean'
  | 'numeric' // numerical-value: decimal or 0x-hex, below 2**64
  | 'numeric-range' // the obsolete marker intervals, "a~b"
  | 'list' // comma-separated text values
  | 'iscsi-name'
  | 'local-name' // UTF-8, for aliases
  | 'text'
  | 'address' // TargetAddress: domainname[:port][,portal-group-tag]
  | 'binary'; // hex (0x) or base64 (0b) encoded bytes

export interface KeyDefinition {
  readonly name: string;
  readonly kind: KeyKind;
  readonly valueType: ValueType;
  /** RFC default, in wire form; undefined when the key has none. */
  readonly defaultValue: string | undefined;
  /** Inclusive bounds for numeric keys. */
  readonly range?: { readonly min: number; readonly max: number };
  /** Values the RFC defines for list-valued and enumerated keys. */
  readonly values?: readonly string[];
  readonly senders: KeySender;
  readonly scope: KeyScope;
  readonly use: KeyUse;
  /** Stages in which the key may be sent. */
  readonly stages: readonly NegotiationStage[];
  /** Only on the leading connection of a session (RFC "LO"). */
  readonly leadingOnly: boolean;
  /** The RFC's "Irrelevant when: SessionType=Discovery". */
  readonly irrelevantInDiscovery: boolean;
  /** Keys RFC 7143 section 13.25 obsoleted: still answered, never proposed. */
  readonly obsolete: boolean;
  /**
   * True for keys a compliant peer may legitimately not know (newer than RFC 3720, or obsolete),
   * so that a NotUnderstood answer to them is not a protocol error.
   */
  readonly mayBeNotUnderstood: boolean;
  /** The RFC section that defines the key. */
  readonly reference: string;
}

export const ISCSI_NAME_MAX_LENGTH = 223;
/** RFC 7143 6.1: a simple value is at most 255 bytes unless a key says otherwise. */
export const MAX_SIMPLE_VALUE_LENGTH = 255;
/** RFC 7143 12.1.3: CHAP_C and CHAP_R are at most 1024 bytes once decoded. */
export const MAX_CHAP_BINARY_LENGTH = 1024;

/** 2**24 - 1: the upper bound of the data segment and burst length keys. */
export const MAX_SEGMENT_OR_BURST_LENGTH = 16_777_215;

const LOGIN: readonly NegotiationStage[] = ['security', 'operational'];
const OPERATIONAL: readonly NegotiationStage[] = ['operational'];
const SECURITY: readonly NegotiationStage[] = ['security'];
const EVERYWHERE: readonly NegotiationStage[] = ['security', 'operational', 'full-feature'];

type Def = Omit<KeyDefinition, 'obsolete' | 'mayBeNotUnderstood' | 'leadingOnly' | 'irrelevantInDiscovery'> &
  Partial<Pick<KeyDefinition, 'obsolete' | 'mayBeNotUnderstood' | 'irrelevantInDiscovery'>>;

function key(d: Def): KeyDefinition {
  return Object.freeze({
    ...d,
    leadingOnly: d.use === 'LO',
    irrelevantInDiscovery: d.irrelevantInDiscovery ?? false,
    obsolete: d.obsolete ?? false,
    mayBeNotUnderstood: d.mayBeNotUnderstood ?? false,
  });
}

const DIGEST_VALUES = ['CRC32C', 'None'] as const;

const DEFINITIONS: readonly KeyDefinition[] = [
  key({
    name: 'HeaderDigest', kind: 'list', valueType: 'list', defaultValue: 'None', values: DIGEST_VALUES,
    senders: 'both', scope: 'connection', use: 'IO', stages: OPERATIONAL, reference: 'RFC 7143 13.1',
  }),
  key({
    name: 'DataDigest', kind: 'list', valueType: 'list', defaultValue: 'None', values: DIGEST_VALUES,
    senders: 'both', scope: 'connection', use: 'IO', stages: OPERATIONAL, reference: 'RFC 7143 13.1',
  }),
  key({
    name: 'MaxConnections', kind: 'numerical-min', valueType: 'numeric', defaultValue: '1', range: { min: 1, max: 65535 },
    senders: 'both', scope: 'session', use: 'LO', stages: OPERATIONAL, irrelevantInDiscovery: true, reference: 'RFC 7143 13.2',
  }),
  key({
    name: 'SendTargets', kind: 'special', valueType: 'text', defaultValue: undefined,
    senders: 'initiator', scope: 'session', use: 'FFPO', stages: ['full-feature'], reference: 'RFC 7143 13.3',
  }),
  key({
    // Sent by the initiator when logging in; sent by the target only inside a SendTargets answer.
    name: 'TargetName', kind: 'declarative', valueType: 'iscsi-name', defaultValue: undefined,
    senders: 'both', scope: 'session', use: 'IO', stages: EVERYWHERE, reference: 'RFC 7143 13.4',
  }),
  key({
    name: 'InitiatorName', kind: 'declarative', valueType: 'iscsi-name', defaultValue: undefined,
    senders: 'initiator', scope: 'session', use: 'IO', stages: LOGIN, reference: 'RFC 7143 13.5',
  }),
  key({
    name: 'TargetAlias', kind: 'declarative', valueType: 'local-name', defaultValue: undefined,
    senders: 'target', scope: 'session', use: 'ALL', stages: EVERYWHERE, reference: 'RFC 7143 13.6',
  }),
  key({
    name: 'InitiatorAlias', kind: 'declarative', valueType: 'local-name', defaultValue: undefined,
    senders: 'initiator', scope: 'session', use: 'ALL', stages: EVERYWHERE, reference: 'RFC 7143 13.7',
  }),
  key({
    name: 'TargetAddress', kind: 'declarative', valueType: 'address', defaultValue: undefined,
    senders: 'target', scope: 'session', use: 'ALL', stages: EVERYWHERE, reference: 'RFC 7143 13.8',
  }),
  key({
    name: 'TargetPortalGroupTag', kind: 'declarative', valueType: 'numeric', defaultValue: undefined, range: { min: 0, max: 65535 },
    senders: 'target', scope: 'session', use: 'IO', stages: LOGIN, reference: 'RFC 7143 13.9',
  }),
  key({
    name: 'InitialR2T', kind: 'boolean-or', valueType: 'boolean', defaultValue: 'Yes',
    senders: 'both', scope: 'session', use: 'LO', stages: OPERATIONAL, irrelevantInDiscovery: true, reference: 'RFC 7143 13.10',
  }),
  key({
    name: 'ImmediateData', kind: 'boolean-and', valueType: 'boolean', defaultValue: 'Yes',
    senders: 'both', scope: 'session', use: 'LO', stages: OPERATIONAL, irrelevantInDiscovery: true, reference: 'RFC 7143 13.11',
  }),
  key({
    name: 'MaxRecvDataSegmentLength', kind: 'declarative', valueType: 'numeric', defaultValue: '8192',
    range: { min: 512, max: MAX_SEGMENT_OR_BURST_LENGTH },
    senders: 'both', scope: 'connection', use: 'ALL', stages: ['operational', 'full-feature'], reference: 'RFC 7143 13.12',
  }),
  key({
    name: 'MaxBurstLength', kind: 'numerical-min', valueType: 'numeric', defaultValue: '262144',
    range: { min: 512, max: MAX_SEGMENT_OR_BURST_LENGTH },
    senders: 'both', scope: 'session', use: 'LO', stages: OPERATIONAL, irrelevantInDiscovery: true, reference: 'RFC 7143 13.13',
  }),
  key({
    name: 'FirstBurstLength', kind: 'numerical-min', valueType: 'numeric', defaultValue: '65536',
    range: { min: 512, max: MAX_SEGMENT_OR_BURST_LENGTH },
    senders: 'both', scope: 'session', use: 'LO', stages: OPERATIONAL, irrelevantInDiscovery: true, reference: 'RFC 7143 13.14',
  }),
  key({
    name: 'DefaultTime2Wait', kind: 'numerical-max', valueType: 'numeric', defaultValue: '2', range: { min: 0, max: 3600 },
    senders: 'both', scope: 'session', use: 'LO', stages: OPERATIONAL, reference: 'RFC 7143 13.15',
  }),
  key({
    name: 'DefaultTime2Retain', kind: 'numerical-min', valueType: 'numeric', defaultValue: '20', range: { min: 0, max: 3600 },
    senders: 'both', scope: 'session', use: 'LO', stages: OPERATIONAL, reference: 'RFC 7143 13.16',
  }),
  key({
    name: 'MaxOutstandingR2T', kind: 'numerical-min', valueType: 'numeric', defaultValue: '1', range: { min: 1, max: 65535 },
    senders: 'both', scope: 'session', use: 'LO', stages: OPERATIONAL, irrelevantInDiscovery: true, reference: 'RFC 7143 13.17',
  }),
  key({
    name: 'DataPDUInOrder', kind: 'boolean-or', valueType: 'boolean', defaultValue: 'Yes',
    senders: 'both', scope: 'session', use: 'LO', stages: OPERATIONAL, irrelevantInDiscovery: true, reference: 'RFC 7143 13.18',
  }),
  key({
    name: 'DataSequenceInOrder', kind: 'boolean-or', valueType: 'boolean', defaultValue: 'Yes',
    senders: 'both', scope: 'session', use: 'LO', stages: OPERATIONAL, irrelevantInDiscovery: true, reference: 'RFC 7143 13.19',
  }),
  key({
    name: 'ErrorRecoveryLevel', kind: 'numerical-min', valueType: 'numeric', defaultValue: '0', range: { min: 0, max: 2 },
    senders: 'both', scope: 'session', use: 'LO', stages: OPERATIONAL, reference: 'RFC 7143 13.20',
  }),
  key({
    name: 'SessionType', kind: 'declarative', valueType: 'text', defaultValue: 'Normal', values: ['Discovery', 'Normal'],
    senders: 'initiator', scope: 'session', use: 'LO', stages: LOGIN, reference: 'RFC 7143 13.21',
  }),
  key({
    name: 'TaskReporting', kind: 'list', valueType: 'list', defaultValue: 'RFC3720', values: ['RFC3720', 'ResponseFence', 'FastAbort'],
    senders: 'both', scope: 'session', use: 'LO', stages: OPERATIONAL, irrelevantInDiscovery: true, mayBeNotUnderstood: true,
    reference: 'RFC 7143 13.23',
  }),
  key({
    name: 'iSCSIProtocolLevel', kind: 'numerical-min', valueType: 'numeric', defaultValue: '0', range: { min: 0, max: 31 },
    senders: 'both', scope: 'session', use: 'LO', stages: OPERATIONAL, irrelevantInDiscovery: true, mayBeNotUnderstood: true,
    reference: 'RFC 7143 13.24, RFC 7144 7.1',
  }),
  // Section 13.25: obsolete since RFC 7143, but RFC 3720 initiators (libiscsi among them) still
  // send IFMarker=No and OFMarker=No. The negotiator answers them as that section says.
  key({
    name: 'OFMarker', kind: 'boolean-and', valueType: 'boolean', defaultValue: 'No',
    senders: 'both', scope: 'connection', use: 'IO', stages: OPERATIONAL, obsolete: true, mayBeNotUnderstood: true, reference: 'RFC 7143 13.25',
  }),
  key({
    name: 'IFMarker', kind: 'boolean-and', valueType: 'boolean', defaultValue: 'No',
    senders: 'both', scope: 'connection', use: 'IO', stages: OPERATIONAL, obsolete: true, mayBeNotUnderstood: true, reference: 'RFC 7143 13.25',
  }),
  key({
    name: 'OFMarkInt', kind: 'special', valueType: 'numeric-range', defaultValue: '2048', range: { min: 1, max: 65535 },
    senders: 'both', scope: 'connection', use: 'IO', stages: OPERATIONAL, obsolete: true, mayBeNotUnderstood: true, reference: 'RFC 7143 13.25',
  }),
  key({
    name: 'IFMarkInt', kind: 'special', valueType: 'numeric-range', defaultValue: '2048', range: { min: 1, max: 65535 },
    senders: 'both', scope: 'connection', use: 'IO', stages: OPERATIONAL, obsolete: true, mayBeNotUnderstood: true, reference: 'RFC 7143 13.25',
  }),
  key({
    // RFC 4850, folded into RFC 7143 as section 13.26. Informational only.
    name: 'X#NodeArchitecture', kind: 'declarative', valueType: 'list', defaultValue: undefined,
    senders: 'both', scope: 'session', use: 'LO', stages: OPERATIONAL, mayBeNotUnderstood: true, reference: 'RFC 7143 13.26',
  }),
  // Section 12: the security keys. All have connection-only scope.
  key({
    name: 'AuthMethod', kind: 'list', valueType: 'list', defaultValue: 'None', values: ['KRB5', 'SRP', 'CHAP', 'None'],
    senders: 'both', scope: 'connection', use: 'security', stages: SECURITY, reference: 'RFC 7143 12.1',
  }),
  key({
    name: 'CHAP_A', kind: 'list', valueType: 'list', defaultValue: undefined,
    senders: 'both', scope: 'connection', use: 'security', stages: SECURITY, reference: 'RFC 7143 12.1.3',
  }),
  key({
    name: 'CHAP_I', kind: 'special', valueType: 'numeric', defaultValue: undefined, range: { min: 0, max: 255 },
    senders: 'both', scope: 'connection', use: 'security', stages: SECURITY, reference: 'RFC 7143 12.1.3',
  }),
  key({
    name: 'CHAP_C', kind: 'special', valueType: 'binary', defaultValue: undefined,
    senders: 'both', scope: 'connection', use: 'security', stages: SECURITY, reference: 'RFC 7143 12.1.3',
  }),
  key({
    name: 'CHAP_N', kind: 'special', valueType: 'text', defaultValue: undefined,
    senders: 'both', scope: 'connection', use: 'security', stages: SECURITY, reference: 'RFC 7143 12.1.3',
  }),
  key({
    name: 'CHAP_R', kind: 'special', valueType: 'binary', defaultValue: undefined,
    senders: 'both', scope: 'connection', use: 'security', stages: SECURITY, reference: 'RFC 7143 12.1.3',
  }),
];

export const KEY_DEFINITIONS: ReadonlyMap<string, KeyDefinition> = new Map(DEFINITIONS.map((d) => [d.name, d]));

/** Keys are case-sensitive (RFC 7143 6.1), so lookup is exact. */
export function keyDefinition(name: string): KeyDefinition | undefined {
  return KEY_DEFINITIONS.get(name);
}

/**
 * RFC 7143 section 12: the only keys allowed in the security negotiation stage, besides
 * AuthMethod and the keys of the chosen authentication method.
 */
export const SECURITY_STAGE_DECLARATIONS: readonly string[] = [
  'SessionType', 'InitiatorName', 'TargetName', 'TargetAddress', 'InitiatorAlias', 'TargetAlias', 'TargetPortalGroupTag',
];

/** CHAP keys, handled by the CHAP helpers rather than by the negotiator. */
export const CHAP_KEYS: readonly string[] = ['CHAP_A', 'CHAP_I', 'CHAP_C', 'CHAP_N', 'CHAP_R'];

/**
 * Keys of the authentication methods the RFC names (SRP from RFC 2945, Kerberos) that this
 * package does not implement. They are still security-stage keys: the negotiator hands them to
 * the caller along with the CHAP keys instead of answering NotUnderstood.
 */
export const OTHER_AUTH_KEYS: readonly string[] = ['SRP_U', 'SRP_TargetAuth', 'SRP_N', 'SRP_g', 'SRP_s', 'SRP_A', 'SRP_B', 'SRP_M', 'SRP_HM', 'KRB_AP_REQ', 'KRB_AP_REP'];

/** True for the authentication-method keys (CHAP_*, SRP_*, KRB_*). */
export function isAuthenticationKey(name: string): boolean {
  return CHAP_KEYS.includes(name) || OTHER_AUTH_KEYS.includes(name);
}

/** "X-" private extension keys (RFC 7143 13.22). */
export function isPrivateExtensionKey(name: string): boolean {
  return name.startsWith('X-');
}

/** "X#" public extension keys registered with IANA (RFC 7143 13.22). */
export function isPublicExtensionKey(name: string): boolean {
  return name.startsWith('X#');
}

/** Constants RFC 7143 6.2 reserves: never valid as a proposed value. */
export const RESERVED_VALUES: readonly string[] = ['Reject', 'Irrelevant', 'NotUnderstood'];

// --- value syntax (RFC 7143 6.1) ---

const DECIMAL = /^[0-9]+$/;
const HEX = /^0[xX][0-9a-fA-F]+$/;
const UINT64_LIMIT = 1n << 64n;

/**
 * Parses a numerical-value: a decimal constant or a 0x/0X hex constant below 2**64. Returns
 * undefined on bad syntax. Values beyond Number.MAX_SAFE_INTEGER come back as Infinity, which
 * is outside every range in the table.
 */
export function parseNumericValue(text: string): number | undefined {
  if (text.length === 0 || text.length > MAX_SIMPLE_VALUE_LENGTH) return undefined;
  let big: bigint;
  if (DECIMAL.test(text)) big = BigInt(text);
  else if (HEX.test(text)) big = BigInt(text.toLowerCase());
  else return undefined;
  if (big >= UINT64_LIMIT) return undefined;
  return big > BigInt(Number.MAX_SAFE_INTEGER) ? Number.POSITIVE_INFINITY : Number(big);
}

export function parseBooleanValue(text: string): boolean | undefined {
  if (text === 'Yes') return true;
  if (text === 'No') return false;
  return undefined;
}

export function formatBoolean(value: boolean): 'Yes' | 'No' {
  return value ? 'Yes' : 'No';
}

/** Splits a list-of-values. Empty items (",," or a trailing comma) are dropped. */
export function parseListValue(text: string): string[] {
  return text.split(',').filter((v) => v.length > 0);
}

/**
 * A loose check of an iSCSI name (RFC 7143 4.2.7): one of the three type prefixes and at most
 * 223 bytes. Full stringprep validation is left to the caller that owns the name policy.
 */
export function isPlausibleIscsiName(name: string): boolean {
  if (name.length === 0 || Buffer.byteLength(name, 'utf8') > ISCSI_NAME_MAX_LENGTH) return false;
  const prefix = name.slice(0, 4).toLowerCase();
  return prefix === 'iqn.' || prefix === 'eui.' || prefix === 'naa.';
}
