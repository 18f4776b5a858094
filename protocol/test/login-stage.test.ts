import { describe, expect, it } from 'vitest';
import {
  checkLoginRequestFlags,
  checkLoginResponseFlags,
  ISCSI_VERSION,
  isValidStageCode,
  LoginStageMachine,
  LoginStatus,
  LoginStatusClass,
  loginStatusClass,
  loginStatusDetail,
  loginStatusFromFields,
  loginStatusText,
  type LoginRequestFields,
  type LoginStageDecision,
} from '../src/login-stage.ts';
import { LoginStage } from '../src/pdu.ts';

const S = LoginStage.Security;
const O = LoginStage.Operational;
const F = LoginStage.FullFeature;

function req(csg: number, transit: boolean, nsg = 0, extra: Partial<LoginRequestFields> = {}): LoginRequestFields {
  return { transit, continue: false, csg, nsg, versionMax: 0, versionMin: 0, ...extra };
}

function responded(d: LoginStageDecision) {
  if (d.action !== 'respond') throw new Error(`expected respond, got ${d.action}${d.action === 'reject' ? `: ${d.reason}` : ''}`);
  return d;
}

function rejected(d: LoginStageDecision) {
  if (d.action !== 'reject') throw new Error(`expected reject, got ${d.action}`);
  return d;
}

describe('login status codes', () => {
  it.each([
    ['Success', 0x0000],
    ['TargetMovedTemporarily', 0x0101],
    ['TargetMovedPermanently', 0x0102],
    ['InitiatorError', 0x0200],
    ['AuthenticationFailure', 0x0201],
    ['AuthorizationFailure', 0x0202],
    ['NotFound', 0x0203],
    ['TargetRemoved', 0x0204],
    ['UnsupportedVersion', 0x0205],
    ['TooManyConnections', 0x0206],
    ['MissingParameter', 0x0207],
    ['CannotIncludeInSession', 0x0208],
    ['SessionTypeNotSupported', 0x0209],
    ['SessionDoesNotExist', 0x020a],
    ['InvalidDuringLogin', 0x020b],
    ['TargetError', 0x0300],
    ['ServiceUnavailable', 0x0301],
    ['OutOfResources', 0x0302],
  ] as const)('%s = %d', (name, code) => {
    expect(LoginStatus[name]).toBe(code);
  });

  it('splits into Status-Class and Status-Detail and back', () => {
    expect(loginStatusClass(LoginStatus.AuthenticationFailure)).toBe(LoginStatusClass.InitiatorError);
    expect(loginStatusDetail(LoginStatus.AuthenticationFailure)).toBe(1);
    expect(loginStatusClass(LoginStatus.TargetMovedPermanently)).toBe(LoginStatusClass.Redirection);
    expect(loginStatusClass(LoginStatus.OutOfResources)).toBe(LoginStatusClass.TargetError);
    expect(loginStatusFromFields(2, 1)).toBe(0x0201);
  });

  it('has descriptions, matching the names tshark prints', () => {
    expect(loginStatusText(0x0201)).toBe('Authentication failure');
    expect(loginStatusText(0x0000)).toBe('Success');
    expect(loginStatusText(0x0299)).toBe('Unknown login status 0x0299');
  });
});

describe('stage codes and request flags', () => {
  it('knows 0, 1 and 3, and that 2 is reserved', () => {
    expect([0, 1, 2, 3].map(isValidStageCode)).toEqual([true, true, false, true]);
  });

  it.each<[string, LoginRequestFields, string | undefined]>([
    ['security, stay', req(S, false), undefined],
    ['security to operational', req(S, true, O), undefined],
    ['security straight to full feature', req(S, true, F), undefined],
    ['operational to full feature', req(O, true, F), undefined],
    ['NSG ignored when T=0', req(O, false, 2), undefined],
    ['T and C both set', { ...req(S, true, O), continue: true }, 'T and C bits both set'],
    ['CSG full feature', req(F, false), 'CSG 3 is not a login stage'],
    ['CSG reserved', req(2, false), 'CSG 2 is not a login stage'],
    ['NSG reserved', req(S, true, 2), 'NSG 2 is reserved'],
    ['transit backwards', req(O, true, S), 'transit from stage 1 to stage 0 does not go forward'],
    ['transit to the same stage', req(O, true, O), 'transit from stage 1 to stage 1 does not go forward'],
  ])('%s', (_, fields, problem) => {
    expect(checkLoginRequestFlags(fields)).toBe(problem);
  });
});

describe('LoginStageMachine', () => {
  it('follows the recorded CHAP login: security (T=0 until authenticated), operational, full feature', () => {
    const m = new LoginStageMachine({ requireAuthentication: true });
    // 1: InitiatorName..AuthMethod=CHAP,None with T=1 NSG=1; the target picks CHAP and stays.
    let d = responded(m.onRequest(req(S, true, O), { readyToTransit: false }));
    expect(d.response).toEqual({ transit: false, continue: false, csg: S, nsg: 0, versionMax: 0, versionActive: 0, statusClass: 0, statusDetail: 0 });
    // 2: CHAP_A=5 with T=0.
    d = responded(m.onRequest(req(S, false), { readyToTransit: false }));
    expect(d.response.transit).toBe(false);
    // 3: CHAP_N/CHAP_R with T=1 NSG=1: verified, the target transits.
    d = responded(m.onRequest(req(S, true, O), { readyToTransit: true, authenticated: true }));
    expect(d.response).toMatchObject({ transit: true, csg: S, nsg: O });
    expect(d.final).toBe(false);
    expect(m.state).toBe('operational');
    // 4: operational keys with T=1 NSG=3: final response.
    d = responded(m.onRequest(req(O, true, F), { readyToTransit: true }));
    expect(d.response).toMatchObject({ transit: true, csg: O, nsg: F, statusClass: 0 });
    expect(d.final).toBe(true);
    expect(m.complete).toBe(true);
  });

  it('lets a login start in the operational stage when no authentication is required', () => {
    const m = new LoginStageMachine();
    const d = responded(m.onRequest(req(O, true, F), { readyToTransit: true }));
    expect(d.final).toBe(true);
  });

  it('refuses a login that skips the security stage when authentication is required', () => {
    const m = new LoginStageMachine({ requireAuthentication: true });
    const d = rejected(m.onRequest(req(O, true, F), { readyToTransit: true }));
    expect(d.status).toBe(LoginStatus.AuthenticationFailure);
    expect(d.response).toMatchObject({ statusClass: 2, statusDetail: 1, transit: false, csg: O });
    expect(m.state).toBe('failed');
  });

  it('never leaves the security stage unauthenticated when authentication is required', () => {
    const m = new LoginStageMachine({ requireAuthentication: true });
    const d = responded(m.onRequest(req(S, true, O), { readyToTransit: true, authenticated: false }));
    expect(d.response.transit).toBe(false);
    expect(m.state).toBe('security');
  });

  it('does not transit when the initiator did not ask to, even if ready and NSG holds a stage', () => {
    const m = new LoginStageMachine();
    // NSG is meaningless with T=0 (RFC 7143 11.12.3): a stray value must not move the stage.
    const d = responded(m.onRequest(req(S, false, O), { readyToTransit: true }));
    expect(d.response.transit).toBe(false);
    expect(d.response.nsg).toBe(0);
    expect(m.state).toBe('security');
    const later = responded(m.onRequest(req(S, false, F), { readyToTransit: true, authenticated: true }));
    expect(later.response.transit).toBe(false);
  });

  it('does not transit while it is not ready, then does on the next request', () => {
    const m = new LoginStageMachine();
    expect(responded(m.onRequest(req(O, true, F), { readyToTransit: false })).response.transit).toBe(false);
    expect(responded(m.onRequest(req(O, true, F), { readyToTransit: true })).final).toBe(true);
  });

  it('may select a lower next stage than requested, never a higher one', () => {
    const m = new LoginStageMachine();
    const d = responded(m.onRequest(req(S, true, F), { readyToTransit: true, maxNextStage: O }));
    expect(d.response).toMatchObject({ transit: true, nsg: O });
    expect(m.state).toBe('operational');
    const again = new LoginStageMachine();
    expect(responded(again.onRequest(req(S, true, O), { readyToTransit: true })).response.nsg).toBe(O);
  });

  it('skips the operational stage when the initiator asks to and the target agrees', () => {
    const m = new LoginStageMachine();
    const d = responded(m.onRequest(req(S, true, F), { readyToTransit: true }));
    expect(d.response).toMatchObject({ transit: true, csg: S, nsg: F });
    expect(d.final).toBe(true);
  });

  it('stays when its own limit leaves no forward stage', () => {
    const m = new LoginStageMachine();
    responded(m.onRequest(req(S, true, O), { readyToTransit: true }));
    const d = responded(m.onRequest(req(O, true, F), { readyToTransit: true, maxNextStage: O }));
    expect(d.response.transit).toBe(false);
  });

  it('acknowledges a continued request (C=1) with an empty response that does not transit', () => {
    const m = new LoginStageMachine();
    const d = m.onRequest({ ...req(O, false), continue: true }, { readyToTransit: true });
    expect(d).toEqual({
      action: 'acknowledge-continuation',
      response: { transit: false, continue: false, csg: O, nsg: 0, versionMax: 0, versionActive: 0, statusClass: 0, statusDetail: 0 },
    });
    expect(responded(m.onRequest(req(O, true, F), { readyToTransit: true })).final).toBe(true);
  });

  it.each<[string, LoginRequestFields[], number]>([
    ['T and C both set', [{ ...req(S, true, O), continue: true }], LoginStatus.InitiatorError],
    ['a reserved NSG', [req(S, true, 2)], LoginStatus.InitiatorError],
    ['a backwards transition', [req(O, true, S)], LoginStatus.InitiatorError],
    ['CSG full feature', [req(F, false)], LoginStatus.InitiatorError],
    ['a version range without 0', [req(S, false, 0, { versionMin: 1, versionMax: 2 })], LoginStatus.UnsupportedVersion],
    ['an inverted version range', [req(S, false, 0, { versionMin: 3, versionMax: 0 })], LoginStatus.UnsupportedVersion],
    ['a CSG that does not follow the transition', [req(S, true, O), req(S, false)], LoginStatus.InitiatorError],
    ['a CSG that jumps ahead', [req(S, false), req(O, false)], LoginStatus.InitiatorError],
    ['Version-max changing during login', [req(S, false), req(S, false, 0, { versionMax: 1 })], LoginStatus.InitiatorError],
    ['a request after the final response', [req(O, true, F), req(O, false)], LoginStatus.InvalidDuringLogin],
  ])('rejects %s', (_, requests, status) => {
    const m = new LoginStageMachine();
    let last: LoginStageDecision | undefined;
    for (const r of requests) last = m.onRequest(r, { readyToTransit: true });
    expect(rejected(last!).status).toBe(status);
  });

  it('accepts a version range that includes 0 and answers with version 0', () => {
    const m = new LoginStageMachine();
    const d = responded(m.onRequest(req(S, false, 0, { versionMin: 0, versionMax: 5 }), { readyToTransit: false }));
    expect(d.response.versionMax).toBe(ISCSI_VERSION);
    expect(d.response.versionActive).toBe(ISCSI_VERSION);
  });

  it('keeps refusing after a reject', () => {
    const m = new LoginStageMachine();
    rejected(m.onRequest(req(F, false), { readyToTransit: true }));
    expect(rejected(m.onRequest(req(S, false), { readyToTransit: true })).status).toBe(LoginStatus.InitiatorError);
  });

  it('produces the fields of a caller-chosen failure', () => {
    const m = new LoginStageMachine();
    responded(m.onRequest(req(S, false), { readyToTransit: false }));
    expect(m.fail(LoginStatus.AuthenticationFailure)).toEqual({
      transit: false,
      continue: false,
      csg: S,
      nsg: 0,
      versionMax: 0,
      versionActive: 0,
      statusClass: 2,
      statusDetail: 1,
    });
    expect(m.state).toBe('failed');
  });

  it('validates the acknowledgement of a continued response', () => {
    const m = new LoginStageMachine();
    responded(m.onRequest(req(S, true, O), { readyToTransit: false }));
    expect(m.onContinuationAcknowledgement(req(S, false), 0)).toBeUndefined();
    expect(m.onContinuationAcknowledgement(req(S, false), 10)?.action).toBe('reject');
  });
});

describe('checkLoginResponseFlags (initiator side)', () => {
  type ResponseStage = Parameters<typeof checkLoginResponseFlags>[1];
  const ok: ResponseStage = { transit: false, continue: false, csg: S, nsg: 0, statusClass: 0, statusDetail: 0 };
  it.each<[string, LoginRequestFields, ResponseStage, string | undefined]>([
    ['a plain answer', req(S, true, O), ok, undefined],
    ['the requested transition', req(S, true, O), { ...ok, transit: true, nsg: O }, undefined],
    ['a lower next stage', req(S, true, F), { ...ok, transit: true, nsg: O }, undefined],
    ['a transition nobody asked for', req(S, false), { ...ok, transit: true, nsg: O }, 'target transits although the initiator did not ask to'],
    ['a higher next stage', req(S, true, O), { ...ok, transit: true, nsg: F }, 'target chose NSG 3, beyond the requested 1'],
    ['another CSG', req(S, true, O), { ...ok, csg: O }, 'response CSG 1 differs from request CSG 0'],
    ['T and C together', req(S, true, O), { ...ok, transit: true, continue: true, nsg: O }, 'T and C bits both set'],
    ['a failure status (not checked further)', req(S, true, O), { ...ok, csg: O, statusClass: 2, statusDetail: 1 }, undefined],
  ])('%s', (_, request, response, problem) => {
    expect(checkLoginResponseFlags(request, response)).toBe(problem);
  });
});
