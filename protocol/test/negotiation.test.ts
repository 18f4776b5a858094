import { describe, expect, it } from 'vitest';
import {
  isAuthenticationKey,
  isPlausibleIscsiName,
  KEY_DEFINITIONS,
  keyDefinition,
  parseNumericValue,
  SECURITY_STAGE_DECLARATIONS,
  type KeyDefinition,
  type NegotiationStage,
} from '../src/keys.ts';
import { LoginStatus } from '../src/login-stage.ts';
import {
  defaultLocalSettings,
  defaultSessionParams,
  NegotiationError,
  Negotiator,
  type LocalSettings,
  type NegotiatorOptions,
  type SessionParams,
} from '../src/negotiation.ts';
import { encodeTextData, splitTextData, TextAssembler, type TextPair } from '../src/text.ts';

// ---------------------------------------------------------------------------------------------
// Recorded texts (libiscsi 1.19 initiator, tgt 1.0.85 target; see the shared captures).

const LIBISCSI_SECURITY: TextPair[] = [
  ['InitiatorName', 'iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-inq'],
  ['TargetName', 'iqn.2026-11.example:chap'],
  ['SessionType', 'Normal'],
  ['AuthMethod', 'CHAP,None'],
];

const LIBISCSI_OPERATIONAL: TextPair[] = [
  ['HeaderDigest', 'None,CRC32C'],
  ['DataDigest', 'None'],
  ['InitialR2T', 'No'],
  ['ImmediateData', 'Yes'],
  ['MaxBurstLength', '262144'],
  ['FirstBurstLength', '262144'],
  ['DefaultTime2Wait', '2'],
  ['DefaultTime2Retain', '0'],
  ['MaxOutstandingR2T', '1'],
  ['ErrorRecoveryLevel', '0'],
  ['IFMarker', 'No'],
  ['OFMarker', 'No'],
  ['MaxConnections', '1'],
  ['MaxRecvDataSegmentLength', '262144'],
  ['DataPDUInOrder', 'Yes'],
  ['DataSequenceInOrder', 'Yes'],
];

/** tgt's answer to LIBISCSI_OPERATIONAL in the recorded CHAP login. */
const TGT_OPERATIONAL_ANSWER: TextPair[] = [
  ['HeaderDigest', 'None'],
  ['DataDigest', 'None'],
  ['InitialR2T', 'Yes'],
  ['ImmediateData', 'Yes'],
  ['MaxBurstLength', '262144'],
  ['FirstBurstLength', '65536'],
  ['DefaultTime2Wait', '2'],
  ['DefaultTime2Retain', '0'],
  ['MaxOutstandingR2T', '1'],
  ['ErrorRecoveryLevel', '0'],
  ['IFMarker', 'No'],
  ['OFMarker', 'No'],
  ['MaxConnections', '1'],
  ['DataPDUInOrder', 'Yes'],
  ['DataSequenceInOrder', 'Yes'],
];

/** The single Login Request of libiscsi's discovery session (iscsi-ls), CSG=1 straight away. */
const LIBISCSI_DISCOVERY: TextPair[] = [
  ['InitiatorName', 'iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-ls'],
  ['SessionType', 'Discovery'],
  ...LIBISCSI_OPERATIONAL,
];

// ---------------------------------------------------------------------------------------------

function target(opts: Partial<NegotiatorOptions> & { settings?: Partial<LocalSettings> } = {}): Negotiator {
  return new Negotiator({ role: 'target', stage: 'operational', ...opts });
}

function initiator(opts: Partial<NegotiatorOptions> = {}): Negotiator {
  return new Negotiator({
    role: 'initiator',
    stage: 'operational',
    identity: { initiatorName: 'iqn.2026-11.example:host', targetName: 'iqn.2026-11.example:disk1' },
    ...opts,
  });
}

function negotiationError(fn: () => unknown): NegotiationError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(NegotiationError);
    return e as NegotiationError;
  }
  throw new Error('expected a NegotiationError');
}

/**
 * The reply without the declarations a target appends on its own (an answer to the initiator's
 * MaxRecvDataSegmentLength can only be Reject, so that one stays).
 */
function answersOnly(reply: TextPair[]): TextPair[] {
  return reply.filter(([k, v]) => !(k === 'MaxRecvDataSegmentLength' && v !== 'Reject') && k !== 'TargetPortalGroupTag' && k !== 'TargetAlias');
}

// ---------------------------------------------------------------------------------------------

describe('key table (RFC 7143 section 13, 12.1, RFC 7144)', () => {
  type Row = [
    name: string,
    kind: KeyDefinition['kind'],
    defaultValue: string | undefined,
    range: [number, number] | undefined,
    senders: KeyDefinition['senders'],
    scope: KeyDefinition['scope'],
    use: KeyDefinition['use'],
    irrelevantInDiscovery: boolean,
    stages: NegotiationStage[],
  ];
  const OP: NegotiationStage[] = ['operational'];
  const LOGIN: NegotiationStage[] = ['security', 'operational'];
  const ALL: NegotiationStage[] = ['security', 'operational', 'full-feature'];
  const SEC: NegotiationStage[] = ['security'];
  const M = 16_777_215;
  const rows: Row[] = [
    ['HeaderDigest', 'list', 'None', undefined, 'both', 'connection', 'IO', false, OP],
    ['DataDigest', 'list', 'None', undefined, 'both', 'connection', 'IO', false, OP],
    ['MaxConnections', 'numerical-min', '1', [1, 65535], 'both', 'session', 'LO', true, OP],
    ['SendTargets', 'special', undefined, undefined, 'initiator', 'session', 'FFPO', false, ['full-feature']],
    ['TargetName', 'declarative', undefined, undefined, 'both', 'session', 'IO', false, ALL],
    ['InitiatorName', 'declarative', undefined, undefined, 'initiator', 'session', 'IO', false, LOGIN],
    ['TargetAlias', 'declarative', undefined, undefined, 'target', 'session', 'ALL', false, ALL],
    ['InitiatorAlias', 'declarative', undefined, undefined, 'initiator', 'session', 'ALL', false, ALL],
    ['TargetAddress', 'declarative', undefined, undefined, 'target', 'session', 'ALL', false, ALL],
    ['TargetPortalGroupTag', 'declarative', undefined, [0, 65535], 'target', 'session', 'IO', false, LOGIN],
    ['InitialR2T', 'boolean-or', 'Yes', undefined, 'both', 'session', 'LO', true, OP],
    ['ImmediateData', 'boolean-and', 'Yes', undefined, 'both', 'session', 'LO', true, OP],
    ['MaxRecvDataSegmentLength', 'declarative', '8192', [512, M], 'both', 'connection', 'ALL', false, ['operational', 'full-feature']],
    ['MaxBurstLength', 'numerical-min', '262144', [512, M], 'both', 'session', 'LO', true, OP],
    ['FirstBurstLength', 'numerical-min', '65536', [512, M], 'both', 'session', 'LO', true, OP],
    ['DefaultTime2Wait', 'numerical-max', '2', [0, 3600], 'both', 'session', 'LO', false, OP],
    ['DefaultTime2Retain', 'numerical-min', '20', [0, 3600], 'both', 'session', 'LO', false, OP],
    ['MaxOutstandingR2T', 'numerical-min', '1', [1, 65535], 'both', 'session', 'LO', true, OP],
    ['DataPDUInOrder', 'boolean-or', 'Yes', undefined, 'both', 'session', 'LO', true, OP],
    ['DataSequenceInOrder', 'boolean-or', 'Yes', undefined, 'both', 'session', 'LO', true, OP],
    ['ErrorRecoveryLevel', 'numerical-min', '0', [0, 2], 'both', 'session', 'LO', false, OP],
    ['SessionType', 'declarative', 'Normal', undefined, 'initiator', 'session', 'LO', false, LOGIN],
    ['TaskReporting', 'list', 'RFC3720', undefined, 'both', 'session', 'LO', true, OP],
    ['iSCSIProtocolLevel', 'numerical-min', '0', [0, 31], 'both', 'session', 'LO', true, OP],
    ['OFMarker', 'boolean-and', 'No', undefined, 'both', 'connection', 'IO', false, OP],
    ['IFMarker', 'boolean-and', 'No', undefined, 'both', 'connection', 'IO', false, OP],
    ['OFMarkInt', 'special', '2048', [1, 65535], 'both', 'connection', 'IO', false, OP],
    ['IFMarkInt', 'special', '2048', [1, 65535], 'both', 'connection', 'IO', false, OP],
    ['X#NodeArchitecture', 'declarative', undefined, undefined, 'both', 'session', 'LO', false, OP],
    ['AuthMethod', 'list', 'None', undefined, 'both', 'connection', 'security', false, SEC],
    ['CHAP_A', 'list', undefined, undefined, 'both', 'connection', 'security', false, SEC],
    ['CHAP_I', 'special', undefined, [0, 255], 'both', 'connection', 'security', false, SEC],
    ['CHAP_C', 'special', undefined, undefined, 'both', 'connection', 'security', false, SEC],
    ['CHAP_N', 'special', undefined, undefined, 'both', 'connection', 'security', false, SEC],
    ['CHAP_R', 'special', undefined, undefined, 'both', 'connection', 'security', false, SEC],
  ];

  it.each(rows)('%s', (name, kind, defaultValue, range, senders, scope, use, irrelevantInDiscovery, stages) => {
    const def = keyDefinition(name)!;
    expect(def).toBeDefined();
    expect({
      kind: def.kind,
      defaultValue: def.defaultValue,
      range: def.range ? [def.range.min, def.range.max] : undefined,
      senders: def.senders,
      scope: def.scope,
      use: def.use,
      leadingOnly: def.leadingOnly,
      irrelevantInDiscovery: def.irrelevantInDiscovery,
      stages: [...def.stages],
    }).toEqual({ kind, defaultValue, range, senders, scope, use, leadingOnly: use === 'LO', irrelevantInDiscovery, stages });
  });

  it('has no key the table above does not describe', () => {
    expect([...KEY_DEFINITIONS.keys()].sort()).toEqual(rows.map((r) => r[0]).sort());
  });

  it('marks exactly the obsoleted keys obsolete (RFC 7143 13.25)', () => {
    const obsolete = [...KEY_DEFINITIONS.values()].filter((d) => d.obsolete).map((d) => d.name);
    expect(obsolete.sort()).toEqual(['IFMarkInt', 'IFMarker', 'OFMarkInt', 'OFMarker']);
  });

  it('lets only the section 12 declarations into the security stage besides security keys', () => {
    const inSecurity = [...KEY_DEFINITIONS.values()].filter((d) => d.stages.includes('security') && d.use !== 'security').map((d) => d.name);
    expect(inSecurity.sort()).toEqual([...SECURITY_STAGE_DECLARATIONS].sort());
  });

  it('is case-sensitive', () => {
    expect(keyDefinition('headerdigest')).toBeUndefined();
  });

  it('parses numerical values: decimal and hex below 2**64', () => {
    expect(parseNumericValue('262144')).toBe(262144);
    expect(parseNumericValue('0x40000')).toBe(262144);
    expect(parseNumericValue('0X40000')).toBe(262144);
    expect(parseNumericValue('18446744073709551615')).toBe(Number.POSITIVE_INFINITY);
    for (const bad of ['', '-1', '1.5', ' 1', '1e3', '0x', '18446744073709551616', 'abc']) expect(parseNumericValue(bad)).toBeUndefined();
  });

  it('recognises authentication keys and plausible iSCSI names', () => {
    expect(['CHAP_A', 'CHAP_R', 'SRP_U'].every(isAuthenticationKey)).toBe(true);
    expect(isAuthenticationKey('AuthMethod')).toBe(false);
    expect(isPlausibleIscsiName('iqn.2026-11.example:disk1')).toBe(true);
    expect(isPlausibleIscsiName('eui.02004567A425678D')).toBe(true);
    expect(isPlausibleIscsiName('naa.52004567BA64678D')).toBe(true);
    expect(isPlausibleIscsiName('disk1')).toBe(false);
    expect(isPlausibleIscsiName(`iqn.${'a'.repeat(220)}`)).toBe(false);
  });
});

describe('defaultSessionParams', () => {
  it('holds the RFC 7143 defaults', () => {
    expect(defaultSessionParams()).toEqual({
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
    } satisfies SessionParams);
  });

  it('agrees with the key table defaults', () => {
    const p = defaultSessionParams();
    const wire = (k: string) => keyDefinition(k)!.defaultValue;
    expect(String(p.maxBurstLength)).toBe(wire('MaxBurstLength'));
    expect(String(p.firstBurstLength)).toBe(wire('FirstBurstLength'));
    expect(String(p.defaultTime2Retain)).toBe(wire('DefaultTime2Retain'));
    expect(String(p.maxRecvDataSegmentLength)).toBe(wire('MaxRecvDataSegmentLength'));
    expect(p.initialR2T ? 'Yes' : 'No').toBe(wire('InitialR2T'));
  });

  it('is what a fresh negotiator reports', () => {
    expect(target().params()).toEqual(defaultSessionParams());
  });
});

// ---------------------------------------------------------------------------------------------

describe('target answering proposals, one key at a time', () => {
  // [description, target settings, proposal, expected answer (undefined: none), expected params subset]
  type Row = [string, Partial<LocalSettings>, TextPair, string | undefined, Partial<SessionParams>];
  const rows: Row[] = [
    // list: the first proposed value the target supports
    ['list: first supported value wins', {}, ['HeaderDigest', 'None,CRC32C'], 'None', { headerDigest: 'None' }],
    ['list: initiator order decides', {}, ['HeaderDigest', 'CRC32C,None'], 'CRC32C', { headerDigest: 'CRC32C' }],
    ['list: unknown values are ignored', {}, ['DataDigest', 'MD5,CRC32C'], 'CRC32C', { dataDigest: 'CRC32C' }],
    ['list: nothing acceptable is Reject', { dataDigest: ['CRC32C'] }, ['DataDigest', 'None'], 'Reject', { dataDigest: 'None' }],
    ['list: None only when proposed', { headerDigest: ['None'] }, ['HeaderDigest', 'CRC32C'], 'Reject', { headerDigest: 'None' }],
    ['list: TaskReporting', { taskReporting: ['RFC3720', 'ResponseFence'] }, ['TaskReporting', 'FastAbort,ResponseFence'], 'ResponseFence', { taskReporting: 'ResponseFence' }],
    ['list: TaskReporting default only', {}, ['TaskReporting', 'FastAbort'], 'Reject', { taskReporting: 'RFC3720' }],
    // boolean OR: Yes if either side wants Yes
    ['OR: No + Yes = Yes', { initialR2T: true }, ['InitialR2T', 'No'], 'Yes', { initialR2T: true }],
    ['OR: No + No = No', { initialR2T: false }, ['InitialR2T', 'No'], 'No', { initialR2T: false }],
    ['OR: Yes + No = Yes', { initialR2T: false }, ['InitialR2T', 'Yes'], 'Yes', { initialR2T: true }],
    ['OR: DataPDUInOrder', { dataPDUInOrder: false }, ['DataPDUInOrder', 'No'], 'No', { dataPDUInOrder: false }],
    ['OR: DataSequenceInOrder', { dataSequenceInOrder: true }, ['DataSequenceInOrder', 'No'], 'Yes', { dataSequenceInOrder: true }],
    // boolean AND: Yes only if both want Yes
    ['AND: Yes + Yes = Yes', {}, ['ImmediateData', 'Yes'], 'Yes', { immediateData: true }],
    ['AND: Yes + No = No', { immediateData: false }, ['ImmediateData', 'Yes'], 'No', { immediateData: false }],
    ['AND: No + Yes = No', {}, ['ImmediateData', 'No'], 'No', { immediateData: false }],
    // numerical minimum
    ['min: target caps MaxBurstLength', { maxBurstLength: 131072 }, ['MaxBurstLength', '262144'], '131072', { maxBurstLength: 131072 }],
    ['min: smaller proposal wins', {}, ['MaxBurstLength', '65536'], '65536', { maxBurstLength: 65536 }],
    ['min: hex proposal', {}, ['MaxBurstLength', '0x10000'], '65536', { maxBurstLength: 65536 }],
    ['min: MaxConnections limited to 1', {}, ['MaxConnections', '8'], '1', { maxConnections: 1 }],
    ['min: MaxConnections', { maxConnections: 4 }, ['MaxConnections', '2'], '2', { maxConnections: 2 }],
    ['min: ErrorRecoveryLevel required 0', {}, ['ErrorRecoveryLevel', '2'], '0', { errorRecoveryLevel: 0 }],
    ['min: ErrorRecoveryLevel', { errorRecoveryLevel: 2 }, ['ErrorRecoveryLevel', '1'], '1', { errorRecoveryLevel: 1 }],
    ['min: MaxOutstandingR2T', { maxOutstandingR2T: 4 }, ['MaxOutstandingR2T', '16'], '4', { maxOutstandingR2T: 4 }],
    ['min: DefaultTime2Retain', {}, ['DefaultTime2Retain', '0'], '0', { defaultTime2Retain: 0 }],
    ['min: FirstBurstLength', {}, ['FirstBurstLength', '262144'], '65536', { firstBurstLength: 65536 }],
    ['min: iSCSIProtocolLevel', {}, ['iSCSIProtocolLevel', '2'], '1', { iscsiProtocolLevel: 1 }],
    ['min: range edge 512', {}, ['MaxBurstLength', '512'], '512', { maxBurstLength: 512 }],
    ['min: range edge 2**24-1', { maxBurstLength: 16777215 }, ['MaxBurstLength', '16777215'], '16777215', { maxBurstLength: 16777215 }],
    // numerical maximum
    ['max: larger target value wins', { defaultTime2Wait: 5 }, ['DefaultTime2Wait', '2'], '5', { defaultTime2Wait: 5 }],
    ['max: larger proposal wins', {}, ['DefaultTime2Wait', '10'], '10', { defaultTime2Wait: 10 }],
    ['max: range edge 3600', {}, ['DefaultTime2Wait', '3600'], '3600', { defaultTime2Wait: 3600 }],
    // out of range or bad syntax: Reject, the default stays
    ['Reject: MaxBurstLength below 512', {}, ['MaxBurstLength', '511'], 'Reject', { maxBurstLength: 262144 }],
    ['Reject: MaxBurstLength above 2**24-1', {}, ['MaxBurstLength', '16777216'], 'Reject', { maxBurstLength: 262144 }],
    ['Reject: FirstBurstLength below 512', {}, ['FirstBurstLength', '100'], 'Reject', { firstBurstLength: 65536 }],
    ['Reject: MaxConnections 0', {}, ['MaxConnections', '0'], 'Reject', { maxConnections: 1 }],
    ['Reject: MaxConnections 65536', {}, ['MaxConnections', '65536'], 'Reject', { maxConnections: 1 }],
    ['Reject: MaxOutstandingR2T 0', {}, ['MaxOutstandingR2T', '0'], 'Reject', { maxOutstandingR2T: 1 }],
    ['Reject: ErrorRecoveryLevel 3', {}, ['ErrorRecoveryLevel', '3'], 'Reject', { errorRecoveryLevel: 0 }],
    ['Reject: DefaultTime2Wait 3601', {}, ['DefaultTime2Wait', '3601'], 'Reject', { defaultTime2Wait: 2 }],
    ['Reject: DefaultTime2Retain 3601', {}, ['DefaultTime2Retain', '3601'], 'Reject', { defaultTime2Retain: 20 }],
    ['Reject: iSCSIProtocolLevel 32', {}, ['iSCSIProtocolLevel', '32'], 'Reject', { iscsiProtocolLevel: 0 }],
    ['Reject: numeric syntax', {}, ['MaxBurstLength', '256k'], 'Reject', { maxBurstLength: 262144 }],
    ['Reject: negative number', {}, ['DefaultTime2Wait', '-1'], 'Reject', { defaultTime2Wait: 2 }],
    ['Reject: 2**64', {}, ['MaxBurstLength', '18446744073709551616'], 'Reject', { maxBurstLength: 262144 }],
    ['Reject: booleans are case-sensitive', {}, ['InitialR2T', 'yes'], 'Reject', { initialR2T: true }],
    ['Reject: boolean syntax', {}, ['ImmediateData', 'Maybe'], 'Reject', { immediateData: true }],
    // declarative: recorded, never answered
    ['declarative: MaxRecvDataSegmentLength', {}, ['MaxRecvDataSegmentLength', '262144'], undefined, { maxSendDataSegmentLength: 262144 }],
    ['declarative: unusable MaxRecvDataSegmentLength', {}, ['MaxRecvDataSegmentLength', '100'], 'Reject', { maxSendDataSegmentLength: 8192 }],
    ['declarative: InitiatorAlias', {}, ['InitiatorAlias', 'backup host'], undefined, { initiatorAlias: 'backup host' }],
    ['declarative: X#NodeArchitecture', {}, ['X#NodeArchitecture', 'ExampleOS/v1234,ExampleInc_SW_Initiator/1.05a'], undefined, { peerNodeArchitecture: 'ExampleOS/v1234,ExampleInc_SW_Initiator/1.05a' }],
    // keys this target does not know
    ['NotUnderstood: unknown key', {}, ['MaxPizzaSize', 'Large'], 'NotUnderstood', {}],
    ['NotUnderstood: private extension', {}, ['X-com.example.bus.size', '16'], 'NotUnderstood', {}],
    ['NotUnderstood: unknown public extension', {}, ['X#SomethingElse', 'Yes'], 'NotUnderstood', {}],
    ['NotUnderstood: iSER key from RFC 7145', {}, ['RDMAExtensions', 'Yes'], 'NotUnderstood', {}],
    // RFC 7143 13.25 obsoleted keys
    ['obsolete: IFMarker answered Reject', {}, ['IFMarker', 'No'], 'Reject', {}],
    ['obsolete: OFMarker answered Reject', {}, ['OFMarker', 'Yes'], 'Reject', {}],
    ['obsolete: IFMarker answered No when asked to', { obsoleteMarkerAnswer: 'No' }, ['IFMarker', 'Yes'], 'No', {}],
    ['obsolete: OFMarkInt always Reject', { obsoleteMarkerAnswer: 'No' }, ['OFMarkInt', '2048~8192'], 'Reject', {}],
    ['obsolete: IFMarkInt always Reject', {}, ['IFMarkInt', '2048'], 'Reject', {}],
  ];

  it.each(rows)('%s', (_, settings, proposal, answer, params) => {
    const t = target({ settings });
    const reply = answersOnly(t.respond([proposal]));
    expect(reply).toEqual(answer === undefined ? [] : [[proposal[0], answer]]);
    expect(t.params()).toMatchObject(params);
  });

  it('always answers booleans, even where the RFC makes the answer optional', () => {
    // AND with No and OR with Yes are settled by the proposal; LIO and tgt still answer, and so do we.
    expect(answersOnly(target().respond([['ImmediateData', 'No'], ['InitialR2T', 'Yes']]))).toEqual([
      ['ImmediateData', 'No'],
      ['InitialR2T', 'Yes'],
    ]);
  });
});

describe('target: rules that tie keys together', () => {
  it('keeps FirstBurstLength within the negotiated MaxBurstLength, whatever the order of the keys', () => {
    const t = target({ settings: { maxBurstLength: 1_048_576, firstBurstLength: 1_048_576 } });
    const reply = answersOnly(t.respond([['FirstBurstLength', '524288'], ['MaxBurstLength', '131072']]));
    expect(reply).toEqual([
      ['FirstBurstLength', '131072'],
      ['MaxBurstLength', '131072'],
    ]);
    expect(t.params()).toMatchObject({ maxBurstLength: 131072, firstBurstLength: 131072 });
  });

  it('never reports a FirstBurstLength above MaxBurstLength', () => {
    const t = target({ settings: { maxBurstLength: 1_048_576, firstBurstLength: 1_048_576 } });
    t.respond([['FirstBurstLength', '524288']]);
    t.respond([['MaxBurstLength', '65536']]);
    expect(t.params()).toMatchObject({ maxBurstLength: 65536, firstBurstLength: 65536 });
  });

  it('lowers its own FirstBurstLength setting to its MaxBurstLength', () => {
    expect(target({ settings: { maxBurstLength: 8192, firstBurstLength: 65536 } }).settings.firstBurstLength).toBe(8192);
  });

  it('answers FirstBurstLength Irrelevant when InitialR2T=Yes and ImmediateData=No', () => {
    const t = target({ settings: { immediateData: false } });
    expect(answersOnly(t.respond([['FirstBurstLength', '65536'], ['ImmediateData', 'Yes'], ['InitialR2T', 'Yes']]))).toEqual([
      ['FirstBurstLength', 'Irrelevant'],
      ['ImmediateData', 'No'],
      ['InitialR2T', 'Yes'],
    ]);
  });

  it('negotiates FirstBurstLength when immediate data stays on', () => {
    const t = target();
    expect(answersOnly(t.respond([['InitialR2T', 'Yes'], ['ImmediateData', 'Yes'], ['FirstBurstLength', '4096']]))).toContainEqual(['FirstBurstLength', '4096']);
  });

  it('answers Irrelevant in a discovery session for the keys RFC 7143 marks so', () => {
    const t = target();
    const reply = t.respond(LIBISCSI_DISCOVERY);
    const irrelevant = reply.filter(([, v]) => v === 'Irrelevant').map(([k]) => k);
    expect(irrelevant).toEqual(['InitialR2T', 'ImmediateData', 'MaxBurstLength', 'FirstBurstLength', 'MaxOutstandingR2T', 'MaxConnections', 'DataPDUInOrder', 'DataSequenceInOrder']);
    expect(answersOnly(reply).filter(([, v]) => v !== 'Irrelevant')).toEqual([
      ['HeaderDigest', 'None'],
      ['DataDigest', 'None'],
      ['DefaultTime2Wait', '2'],
      ['DefaultTime2Retain', '0'],
      ['ErrorRecoveryLevel', '0'],
      ['IFMarker', 'Reject'],
      ['OFMarker', 'Reject'],
    ]);
    expect(t.sessionType).toBe('Discovery');
    expect(t.params()).toMatchObject({ sessionType: 'Discovery', immediateData: true, maxBurstLength: 262144, maxSendDataSegmentLength: 262144 });
  });

  it('answers leading-only keys Irrelevant on a connection added to a session', () => {
    const t = target({ leadingConnection: false });
    expect(answersOnly(t.respond([['MaxBurstLength', '65536'], ['HeaderDigest', 'CRC32C'], ['SessionType', 'Normal']]))).toEqual([
      ['MaxBurstLength', 'Irrelevant'],
      ['HeaderDigest', 'CRC32C'],
    ]);
  });

  it('keeps the reply in the order the keys arrived', () => {
    const reply = answersOnly(target().respond([['DataDigest', 'None'], ['SessionType', 'Normal'], ['MaxBurstLength', '4096'], ['HeaderDigest', 'None']]));
    expect(reply.map(([k]) => k)).toEqual(['DataDigest', 'MaxBurstLength', 'HeaderDigest']);
  });
});

describe('target: the recorded logins', () => {
  it('answers libiscsi exactly as tgt did (with markers answered No), plus its own MaxRecvDataSegmentLength', () => {
    const t = new Negotiator({
      role: 'target',
      settings: { obsoleteMarkerAnswer: 'No', maxRecvDataSegmentLength: 262144 },
      identity: { targetPortalGroupTag: 1 },
    });
    const first = t.step(LIBISCSI_SECURITY);
    expect(first.reply).toEqual([
      ['AuthMethod', 'None'], // a target without CHAP takes the initiator's second choice
      ['TargetPortalGroupTag', '1'],
    ]);

    const chapTarget = new Negotiator({ role: 'target', settings: { authMethods: ['CHAP'], obsoleteMarkerAnswer: 'No', maxRecvDataSegmentLength: 262144 }, identity: { targetPortalGroupTag: 1 } });
    // tgt answered TargetPortalGroupTag=1, AuthMethod=CHAP (our declarations come after the answers).
    expect(chapTarget.respond(LIBISCSI_SECURITY)).toEqual([
      ['AuthMethod', 'CHAP'],
      ['TargetPortalGroupTag', '1'],
    ]);
    const chap = chapTarget.step([['CHAP_A', '5']]);
    expect(chap.reply).toEqual([]);
    expect(chap.authKeys).toEqual([['CHAP_A', '5']]);
    expect(chapTarget.step([['CHAP_N', 'alice'], ['CHAP_R', '0x395B8FC83A14471E304B4BF0D50C6B91']]).authKeys.map(([k]) => k)).toEqual(['CHAP_N', 'CHAP_R']);
    chapTarget.enterStage('operational');
    expect(chapTarget.respond(LIBISCSI_OPERATIONAL)).toEqual([...TGT_OPERATIONAL_ANSWER, ['MaxRecvDataSegmentLength', '262144']]);
    expect(chapTarget.missingDeclarations()).toEqual([]);
    expect(chapTarget.params()).toEqual({
      ...defaultSessionParams(),
      initiatorName: 'iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-inq',
      targetName: 'iqn.2026-11.example:chap',
      targetPortalGroupTag: 1,
      authMethod: 'CHAP',
      defaultTime2Retain: 0,
      maxRecvDataSegmentLength: 262144,
      maxSendDataSegmentLength: 262144,
    } satisfies SessionParams);
  });

  it('declares TargetPortalGroupTag and TargetAlias once, in the first response', () => {
    const t = new Negotiator({ role: 'target', identity: { targetPortalGroupTag: 7, targetAlias: 'detour disk' } });
    expect(t.respond([['InitiatorName', 'iqn.x'], ['AuthMethod', 'None']])).toEqual([
      ['AuthMethod', 'None'],
      ['TargetPortalGroupTag', '7'],
      ['TargetAlias', 'detour disk'],
    ]);
    t.enterStage('operational');
    expect(t.respond([['HeaderDigest', 'None']])).toEqual([
      ['HeaderDigest', 'None'],
      ['MaxRecvDataSegmentLength', '8192'],
    ]);
    expect(t.respond([['DataDigest', 'None']])).toEqual([['DataDigest', 'None']]);
  });

  it('reports the declarations a login is missing', () => {
    const t = new Negotiator({ role: 'target' });
    expect(t.missingDeclarations()).toEqual(['InitiatorName', 'TargetName']);
    t.respond([['SessionType', 'Discovery'], ['InitiatorName', 'iqn.x']]);
    expect(t.missingDeclarations()).toEqual([]);
  });
});

describe('target: protocol errors', () => {
  type Row = [string, Partial<NegotiatorOptions>, TextPair[][], NegotiationError['reason'], number];
  const IE = LoginStatus.InitiatorError;
  const rows: Row[] = [
    ['a key twice in one text', {}, [[['MaxBurstLength', '4096'], ['MaxBurstLength', '4096']]], 'duplicate-key', IE],
    ['a key again in a later PDU', {}, [[['MaxBurstLength', '4096']], [['MaxBurstLength', '8192']]], 'duplicate-key', IE],
    ['a declaration again', {}, [[['MaxRecvDataSegmentLength', '4096']], [['MaxRecvDataSegmentLength', '4096']]], 'duplicate-key', IE],
    ['a key declared in security, again in operational', { stage: 'security' }, [[['InitiatorName', 'iqn.x']], [['InitiatorName', 'iqn.x']]], 'duplicate-key', IE],
    ['an operational key in the security stage', { stage: 'security' }, [[['MaxBurstLength', '4096']]], 'key-not-allowed-in-stage', IE],
    ['MaxRecvDataSegmentLength in the security stage', { stage: 'security' }, [[['MaxRecvDataSegmentLength', '4096']]], 'key-not-allowed-in-stage', IE],
    ['AuthMethod in the operational stage', {}, [[['AuthMethod', 'None']]], 'key-not-allowed-in-stage', IE],
    ['a CHAP key in the operational stage', {}, [[['CHAP_A', '5']]], 'key-not-allowed-in-stage', IE],
    ['SendTargets during login', {}, [[['SendTargets', 'All']]], 'key-not-allowed-in-stage', IE],
    ['MaxBurstLength in full feature phase', { stage: 'full-feature' }, [[['MaxBurstLength', '4096']]], 'key-not-allowed-in-stage', IE],
    ['TargetAlias sent by the initiator', {}, [[['TargetAlias', 'x']]], 'key-not-allowed-from-sender', IE],
    ['TargetPortalGroupTag sent by the initiator', {}, [[['TargetPortalGroupTag', '1']]], 'key-not-allowed-from-sender', IE],
    ['Reject proposed as a value', {}, [[['MaxBurstLength', 'Reject']]], 'reserved-value-proposed', IE],
    ['NotUnderstood proposed as a value', {}, [[['X-com.example.foo', 'NotUnderstood']]], 'reserved-value-proposed', IE],
    ['Irrelevant proposed as a value', {}, [[['HeaderDigest', 'Irrelevant']]], 'reserved-value-proposed', IE],
    ['an unknown SessionType', { stage: 'security' }, [[['SessionType', 'Sideways']]], 'unsupported-session-type', LoginStatus.SessionTypeNotSupported],
    ['an empty InitiatorName', { stage: 'security' }, [[['InitiatorName', '']]], 'invalid-value', IE],
    ['an oversized TargetName', { stage: 'security' }, [[['TargetName', `iqn.${'x'.repeat(220)}`]]], 'invalid-value', IE],
  ];

  it.each(rows)('%s', (_, opts, batches, reason, status) => {
    const t = target(opts);
    const err = negotiationError(() => {
      for (const batch of batches) t.respond(batch);
    });
    expect(err.reason).toBe(reason);
    expect(err.loginStatus).toBe(status);
    expect(err.kind).toBe('negotiation');
  });

  it('names the key but never the value in its message', () => {
    const err = negotiationError(() => target().respond([['CHAP_R', '0xsecretish']]));
    expect(err.key).toBe('CHAP_R');
    expect(err.message).not.toContain('0xsecretish');
  });

  it('lets TargetAddress repeat (the one key RFC 7143 allows to)', () => {
    const i = initiator();
    const step = i.step([['TargetAddress', '10.0.0.1:3260,1'], ['TargetAddress', '[fe80::1]:3260,1']]);
    expect(step.targetAddresses).toEqual(['10.0.0.1:3260,1', '[fe80::1]:3260,1']);
  });
});

describe('target: security stage and full feature phase', () => {
  it('chooses AuthMethod from the initiator list and hands CHAP keys to the caller', () => {
    const t = new Negotiator({ role: 'target', settings: { authMethods: ['CHAP', 'None'] } });
    expect(answersOnly(t.respond([['AuthMethod', 'None,CHAP']]))).toEqual([['AuthMethod', 'None']]);
    expect(t.params().authMethod).toBe('None');
    const c = new Negotiator({ role: 'target', settings: { authMethods: ['CHAP'] } });
    expect(c.respond([['AuthMethod', 'KRB5,SRP,CHAP']])).toEqual([['AuthMethod', 'CHAP']]);
    expect(c.step([['CHAP_A', '7,5'], ['SRP_U', 'x']]).authKeys).toEqual([
      ['CHAP_A', '7,5'],
      ['SRP_U', 'x'],
    ]);
  });

  it('leaves authMethod undefined when it rejects every method', () => {
    const t = new Negotiator({ role: 'target', settings: { authMethods: ['CHAP'] } });
    expect(t.respond([['AuthMethod', 'None']])).toEqual([['AuthMethod', 'Reject']]);
    expect(t.params().authMethod).toBeUndefined();
  });

  it('hands a SendTargets request to the caller in full feature phase and accepts a new MaxRecvDataSegmentLength', () => {
    const t = target({ identity: { targetPortalGroupTag: 1, targetAlias: 'detour' } });
    expect(t.respond([['MaxRecvDataSegmentLength', '8192']]).map(([k]) => k)).toEqual(['TargetPortalGroupTag', 'TargetAlias', 'MaxRecvDataSegmentLength']);
    t.enterStage('full-feature');
    const step = t.step([['SendTargets', 'All']]);
    expect(step.sendTargets).toBe('All');
    expect(step.reply).toEqual([]);
    t.startTextNegotiation();
    expect(t.respond([['MaxRecvDataSegmentLength', '65536']])).toEqual([]);
    expect(t.params().maxSendDataSegmentLength).toBe(65536);
  });

  it('refuses to go back to an earlier stage', () => {
    const t = target();
    expect(negotiationError(() => t.enterStage('security')).reason).toBe('stage-regression');
  });
});

// ---------------------------------------------------------------------------------------------

describe('initiator proposing', () => {
  it('declares its names and proposes AuthMethod in the security stage', () => {
    const i = new Negotiator({
      role: 'initiator',
      identity: { initiatorName: 'iqn.2026-11.example:host', initiatorAlias: 'host', targetName: 'iqn.2026-11.example:disk1' },
      settings: { authMethods: ['CHAP', 'None'] },
    });
    expect(i.offer()).toEqual([
      ['InitiatorName', 'iqn.2026-11.example:host'],
      ['InitiatorAlias', 'host'],
      ['TargetName', 'iqn.2026-11.example:disk1'],
      ['SessionType', 'Normal'],
      ['AuthMethod', 'CHAP,None'],
    ]);
    expect(i.pendingKeys).toEqual(['AuthMethod']);
    expect(i.offer()).toEqual([]);
  });

  it('proposes every operational key in the operational stage, declaring names first if it skipped security', () => {
    const i = initiator({ settings: { maxRecvDataSegmentLength: 262144, headerDigest: ['None', 'CRC32C'], initialR2T: false } });
    expect(i.offer()).toEqual([
      ['InitiatorName', 'iqn.2026-11.example:host'],
      ['TargetName', 'iqn.2026-11.example:disk1'],
      ['SessionType', 'Normal'],
      ['MaxRecvDataSegmentLength', '262144'],
      ['HeaderDigest', 'None,CRC32C'],
      ['DataDigest', 'None'],
      ['InitialR2T', 'No'],
      ['ImmediateData', 'Yes'],
      ['MaxBurstLength', '262144'],
      ['FirstBurstLength', '65536'],
      ['DefaultTime2Wait', '2'],
      ['DefaultTime2Retain', '20'],
      ['MaxOutstandingR2T', '1'],
      ['ErrorRecoveryLevel', '0'],
      ['MaxConnections', '1'],
      ['DataPDUInOrder', 'Yes'],
      ['DataSequenceInOrder', 'Yes'],
    ]);
    // AND proposed Yes, OR proposed No: answers required. OR proposed Yes: settled, optional.
    expect(i.pendingKeys.sort()).toEqual(
      ['HeaderDigest', 'DataDigest', 'InitialR2T', 'ImmediateData', 'MaxBurstLength', 'FirstBurstLength', 'DefaultTime2Wait', 'DefaultTime2Retain', 'MaxOutstandingR2T', 'ErrorRecoveryLevel', 'MaxConnections'].sort(),
    );
  });

  it('proposes only the keys that matter in a discovery session', () => {
    const i = initiator({ sessionType: 'Discovery' });
    expect(i.offer().map(([k]) => k)).toEqual([
      'InitiatorName',
      'SessionType',
      'MaxRecvDataSegmentLength',
      'HeaderDigest',
      'DataDigest',
      'DefaultTime2Wait',
      'DefaultTime2Retain',
      'ErrorRecoveryLevel',
    ]);
  });

  it('proposes no leading-only key on a connection added to a session', () => {
    const i = initiator({ leadingConnection: false });
    expect(i.offer().map(([k]) => k)).toEqual(['InitiatorName', 'TargetName', 'SessionType', 'MaxRecvDataSegmentLength', 'HeaderDigest', 'DataDigest']);
  });

  it('adds the newer keys and the RFC 3720 marker keys on request', () => {
    const i = initiator({ settings: { proposeNewerKeys: true, proposeLegacyMarkers: true, taskReporting: ['ResponseFence', 'RFC3720'], iscsiProtocolLevel: 2 } });
    const offer = i.offer();
    expect(offer).toContainEqual(['TaskReporting', 'ResponseFence,RFC3720']);
    expect(offer).toContainEqual(['iSCSIProtocolLevel', '2']);
    expect(offer).toContainEqual(['IFMarker', 'No']);
    expect(offer).toContainEqual(['OFMarker', 'No']);
  });
});

describe('initiator checking answers', () => {
  function proposed(settings: Partial<LocalSettings> = {}): Negotiator {
    const i = initiator({ settings: { headerDigest: ['CRC32C', 'None'], proposeNewerKeys: true, proposeLegacyMarkers: true, ...settings } });
    i.offer();
    return i;
  }

  type Row = [string, Partial<LocalSettings>, TextPair, Partial<SessionParams>];
  const accepted: Row[] = [
    ['list: one of the proposed values', {}, ['HeaderDigest', 'None'], { headerDigest: 'None' }],
    ['OR proposed No: answered Yes', { initialR2T: false }, ['InitialR2T', 'Yes'], { initialR2T: true }],
    ['OR proposed No: answered No', { initialR2T: false }, ['InitialR2T', 'No'], { initialR2T: false }],
    ['AND proposed Yes: answered No', {}, ['ImmediateData', 'No'], { immediateData: false }],
    ['min: a smaller value', {}, ['MaxBurstLength', '65536'], { maxBurstLength: 65536 }],
    ['min: the same value', {}, ['MaxBurstLength', '262144'], { maxBurstLength: 262144 }],
    ['max: a larger value', {}, ['DefaultTime2Wait', '20'], { defaultTime2Wait: 20 }],
    ['min: iSCSIProtocolLevel', {}, ['iSCSIProtocolLevel', '0'], { iscsiProtocolLevel: 0 }],
  ];
  it.each(accepted)('accepts %s', (_, settings, answer, params) => {
    const i = proposed(settings);
    const step = i.step([answer]);
    expect(step.peerAnswers).toEqual([{ key: answer[0], outcome: 'accepted', value: answer[1] }]);
    expect(step.reply).toEqual([]);
    expect(i.pendingKeys).not.toContain(answer[0]);
    expect(i.params()).toMatchObject(params);
  });

  const invalid: Array<[string, Partial<LocalSettings>, TextPair]> = [
    ['list: a value that was not proposed', { headerDigest: ['None'] }, ['HeaderDigest', 'CRC32C']],
    ['list: more than one value', {}, ['HeaderDigest', 'CRC32C,None']],
    ['OR proposed Yes: answered No', { dataPDUInOrder: true }, ['DataPDUInOrder', 'No']],
    ['AND proposed No: answered Yes', { immediateData: false }, ['ImmediateData', 'Yes']],
    ['min: a larger value than proposed', {}, ['MaxBurstLength', '524288']],
    ['min: out of range', {}, ['MaxBurstLength', '100']],
    ['max: a smaller value than proposed', { defaultTime2Wait: 10 }, ['DefaultTime2Wait', '2']],
    ['max: out of range', {}, ['DefaultTime2Wait', '4000']],
    ['boolean syntax', {}, ['ImmediateData', 'Si']],
    ['numeric syntax', {}, ['MaxConnections', 'one']],
  ];
  it.each(invalid)('refuses %s', (_, settings, answer) => {
    const i = proposed(settings);
    const err = negotiationError(() => i.step([answer]));
    expect(err.reason).toBe('invalid-answer');
    expect(err.key).toBe(answer[0]);
  });

  it.each([
    ['Reject', 'rejected'],
    ['Irrelevant', 'irrelevant'],
  ] as const)('records %s and keeps the default', (value, outcome) => {
    const i = proposed({ maxBurstLength: 65536 });
    const step = i.step([['MaxBurstLength', value]]);
    expect(step.peerAnswers).toEqual([{ key: 'MaxBurstLength', outcome, value }]);
    expect(i.params().maxBurstLength).toBe(262144);
  });

  it('treats NotUnderstood for a key every implementation must know as a protocol error', () => {
    expect(negotiationError(() => proposed().step([['MaxBurstLength', 'NotUnderstood']])).reason).toBe('unexpected-not-understood');
    expect(negotiationError(() => proposed().step([['MaxRecvDataSegmentLength', 'NotUnderstood']])).reason).toBe('unexpected-not-understood');
  });

  it('accepts NotUnderstood for newer and obsolete keys from an older target', () => {
    const i = proposed();
    const step = i.step([
      ['TaskReporting', 'NotUnderstood'],
      ['iSCSIProtocolLevel', 'NotUnderstood'],
      ['IFMarker', 'NotUnderstood'],
      ['OFMarker', 'Reject'],
    ]);
    expect(step.peerAnswers.map((a) => a.outcome)).toEqual(['not-understood', 'not-understood', 'not-understood', 'rejected']);
    expect(i.params()).toMatchObject({ taskReporting: 'RFC3720', iscsiProtocolLevel: 0 });
  });

  it('accepts the recorded tgt answer and ends with nothing pending', () => {
    const i = initiator({
      settings: { headerDigest: ['None', 'CRC32C'], initialR2T: false, maxRecvDataSegmentLength: 262144, firstBurstLength: 262144, defaultTime2Retain: 0, proposeLegacyMarkers: true },
    });
    i.offer();
    const step = i.step(TGT_OPERATIONAL_ANSWER);
    expect(step.reply).toEqual([]);
    expect(step.peerAnswers.every((a) => a.outcome === 'accepted')).toBe(true);
    expect(i.done).toBe(true);
    expect(i.params()).toMatchObject({
      headerDigest: 'None',
      initialR2T: true,
      immediateData: true,
      maxBurstLength: 262144,
      firstBurstLength: 65536,
      defaultTime2Retain: 0,
      maxRecvDataSegmentLength: 262144,
      // tgt declared nothing: what we may send stays at the RFC default.
      maxSendDataSegmentLength: 8192,
    });
  });

  it('answers what the target proposes on its own, and records its declarations', () => {
    const i = initiator({ stage: 'security' });
    i.offer();
    const step = i.step([['AuthMethod', 'None'], ['TargetPortalGroupTag', '3'], ['TargetAlias', 'Pure FlashArray']]);
    expect(step.reply).toEqual([]);
    i.enterStage('operational');
    i.offer();
    const proposals = i.step([['X-com.example.turbo', 'Yes'], ['MaxRecvDataSegmentLength', '65536'], ['DefaultTime2Wait', 'Reject']]);
    expect(proposals.reply).toEqual([['X-com.example.turbo', 'NotUnderstood']]);
    expect(i.params()).toMatchObject({ targetPortalGroupTag: 3, targetAlias: 'Pure FlashArray', authMethod: 'None', maxSendDataSegmentLength: 65536 });
  });

  it('moves unanswered proposals aside when the stage ends', () => {
    const i = initiator();
    i.offer();
    expect(i.done).toBe(false);
    i.enterStage('full-feature');
    expect(i.done).toBe(true);
    expect(i.unansweredKeys).toContain('MaxBurstLength');
  });

  it('refuses a target that sends an initiator-only key, or TargetName during login', () => {
    expect(negotiationError(() => initiator().step([['InitiatorName', 'iqn.x']])).reason).toBe('key-not-allowed-from-sender');
    expect(negotiationError(() => initiator().step([['TargetName', 'iqn.x']])).reason).toBe('key-not-allowed-from-sender');
  });
});

// ---------------------------------------------------------------------------------------------

describe('initiator and target negotiating with each other', () => {
  /** Sends a text as PDUs of at most `segment` bytes and reassembles it, as the wire would. */
  function overTheWire(pairs: TextPair[], segment: number): TextPair[] {
    const asm = new TextAssembler();
    let out: TextPair[] | undefined;
    const chunks = splitTextData(encodeTextData(pairs), segment);
    for (const c of chunks) out = asm.push(c.data, c.continue);
    return out!;
  }

  it('agrees on the same parameters over multi-PDU texts', () => {
    const i = new Negotiator({
      role: 'initiator',
      identity: { initiatorName: 'iqn.2026-11.example:host', targetName: 'iqn.2026-11.example:disk1' },
      settings: {
        headerDigest: ['CRC32C', 'None'],
        dataDigest: ['CRC32C', 'None'],
        initialR2T: false,
        maxRecvDataSegmentLength: 262144,
        maxBurstLength: 1_048_576,
        firstBurstLength: 262144,
        maxConnections: 4,
        errorRecoveryLevel: 2,
        defaultTime2Wait: 0,
        defaultTime2Retain: 0,
        proposeNewerKeys: true,
      },
    });
    const t = new Negotiator({
      role: 'target',
      identity: { targetPortalGroupTag: 1 },
      settings: { maxRecvDataSegmentLength: 65536, maxBurstLength: 524288, firstBurstLength: 131072, dataDigest: ['None'], defaultTime2Wait: 2 },
    });

    // Security stage, AuthMethod=None.
    const sec = t.respond(overTheWire(i.offer(), 48));
    expect(i.respond(overTheWire(sec, 48))).toEqual([]);
    i.enterStage('operational');
    t.enterStage('operational');

    // Operational stage in 16-byte PDUs: every pair is cut somewhere.
    const answers = t.respond(overTheWire(i.offer(), 16));
    expect(i.respond(overTheWire(answers, 16))).toEqual([]);
    expect(i.done).toBe(true);
    expect(t.offer()).toEqual([]);
    expect(t.done).toBe(true);
    i.enterStage('full-feature');
    t.enterStage('full-feature');

    const ip = i.params();
    const tp = t.params();
    const shared = {
      headerDigest: 'CRC32C',
      dataDigest: 'None',
      initialR2T: true,
      immediateData: true,
      maxBurstLength: 524288,
      firstBurstLength: 131072,
      maxConnections: 1,
      errorRecoveryLevel: 0,
      defaultTime2Wait: 2,
      defaultTime2Retain: 0,
      maxOutstandingR2T: 1,
      iscsiProtocolLevel: 1,
      taskReporting: 'RFC3720',
      targetPortalGroupTag: 1,
      authMethod: 'None',
      initiatorName: 'iqn.2026-11.example:host',
      targetName: 'iqn.2026-11.example:disk1',
    } as const;
    expect(ip).toMatchObject(shared);
    expect(tp).toMatchObject(shared);
    // Each side sends at most what the other declared it can receive.
    expect(ip.maxSendDataSegmentLength).toBe(tp.maxRecvDataSegmentLength);
    expect(tp.maxSendDataSegmentLength).toBe(ip.maxRecvDataSegmentLength);
    expect([ip.maxRecvDataSegmentLength, ip.maxSendDataSegmentLength]).toEqual([262144, 65536]);
  });

  it('lets a target that cannot live with a default propose it, and the initiator answer', () => {
    // The initiator proposes nothing about ImmediateData; the RFC default (Yes) is wrong for this target.
    const t = target({ settings: { immediateData: false, maxBurstLength: 65536, firstBurstLength: 16384, headerDigest: ['CRC32C'] } });
    expect(t.respond([['InitialR2T', 'Yes']])).toEqual([
      ['InitialR2T', 'Yes'],
      ['MaxRecvDataSegmentLength', '8192'],
    ]);
    const proposals = t.offer();
    // FirstBurstLength is not proposed: with InitialR2T=Yes and ImmediateData=No it is irrelevant.
    expect(proposals).toEqual([
      ['HeaderDigest', 'CRC32C'],
      ['ImmediateData', 'No'],
      ['MaxBurstLength', '65536'],
    ]);
    // ImmediateData=No settles itself (AND); the others need the initiator's answer before transit.
    expect(t.pendingKeys.sort()).toEqual(['HeaderDigest', 'MaxBurstLength']);
    const i = new Negotiator({ role: 'initiator', stage: 'operational', settings: { headerDigest: ['None', 'CRC32C'] } });
    const reply = i.respond(proposals);
    expect(reply).toEqual([
      ['HeaderDigest', 'CRC32C'],
      ['ImmediateData', 'No'],
      ['MaxBurstLength', '65536'],
    ]);
    const step = t.step(reply);
    expect(step.peerAnswers.map((a) => a.outcome)).toEqual(['accepted', 'accepted', 'accepted']);
    expect(t.done).toBe(true);
    expect(t.params()).toMatchObject({ headerDigest: 'CRC32C', immediateData: false, maxBurstLength: 65536 });
    expect(i.params()).toMatchObject({ headerDigest: 'CRC32C', immediateData: false, maxBurstLength: 65536 });
  });

  it('proposes a FirstBurstLength it cannot exceed when unsolicited data is allowed', () => {
    const t = target({ settings: { firstBurstLength: 16384 } });
    t.respond([['InitialR2T', 'No']]);
    expect(t.offer()).toEqual([['FirstBurstLength', '16384']]);
  });

  it('answers FirstBurstLength Irrelevant on the initiator side too, when the target turned immediate data off', () => {
    const i = new Negotiator({ role: 'initiator', stage: 'operational' });
    expect(i.respond([['ImmediateData', 'No'], ['FirstBurstLength', '4096']])).toEqual([
      ['ImmediateData', 'No'],
      ['FirstBurstLength', 'Irrelevant'],
    ]);
  });

  it('does not propose keys the initiator already negotiated', () => {
    const t = target({ settings: { maxBurstLength: 65536 } });
    t.respond([['MaxBurstLength', '262144']]);
    expect(t.offer()).toEqual([]);
  });

  it('refuses settings outside the RFC ranges', () => {
    expect(() => new Negotiator({ role: 'target', settings: { maxBurstLength: 100 } })).toThrow(RangeError);
    expect(() => new Negotiator({ role: 'target', settings: { errorRecoveryLevel: 3 } })).toThrow(RangeError);
    expect(() => new Negotiator({ role: 'target', settings: { headerDigest: [] } })).toThrow(RangeError);
    expect(() => new Negotiator({ role: 'target', identity: { targetPortalGroupTag: 70000 } })).toThrow(RangeError);
  });

  it('has role-dependent default settings', () => {
    expect(defaultLocalSettings('target').headerDigest).toEqual(['None', 'CRC32C']);
    expect(defaultLocalSettings('initiator').headerDigest).toEqual(['None']);
  });
});
