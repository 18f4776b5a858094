import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import {
  ChapAlgorithm,
  ChapAuthenticator,
  ChapClient,
  ChapError,
  chapResponse,
  chapResponseLength,
  decodeBinary,
  encodeBinary,
  newChallenge,
  type RandomSource,
} from '../src/chap.ts';
import type { TextPair } from '../src/text.ts';

// Recorded with libiscsi 1.19 against tgt 1.0.85 (iqn.2026-11.example:chap, user alice,
// secret s3cretpassw0rd): the target's CHAP_I/CHAP_C and the initiator's CHAP_R, as tshark shows them.
const CAPTURE = {
  secret: 's3cretpassw0rd',
  user: 'alice',
  ok: {
    id: 1,
    challenge: '0x5e93d4cbe64cf410009a82e464eefdd4ac4d02f543372d1e88469a9d6be428269d539ff618a11a5932b889370aec1153613c',
    response: '0x395B8FC83A14471E304B4BF0D50C6B91',
  },
  // The second login used a wrong password; tgt answered Authentication failed (0x0201).
  bad: {
    id: 2,
    challenge: '0x110057ecfd7b3e50dcfccb72f4a608455f9d143841a6862586d9f64ed4990370056a53c52d7bf2027b33a59c14f3f3d9e84e',
    response: '0xFD3E82C62F7FB90139C8CE03420D166E',
  },
};

/** Replays fixed bytes: first the identifier, then the challenge. */
function scriptedRandom(...chunks: Buffer[]): RandomSource {
  const queue = [...chunks];
  return (size) => {
    const next = queue.shift();
    if (!next || next.length !== size) throw new Error(`unexpected random(${size})`);
    return next;
  };
}

function chapError(fn: () => unknown): ChapError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(ChapError);
    return e as ChapError;
  }
  throw new Error('expected a ChapError');
}

describe('chapResponse', () => {
  it('is MD5(identifier byte || secret || challenge), computed by hand', () => {
    const challenge = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
    const byHand = createHash('md5')
      .update(Buffer.concat([Buffer.of(0x2a), Buffer.from('correct horse battery', 'utf8'), challenge]))
      .digest();
    expect(chapResponse(ChapAlgorithm.MD5, 0x2a, 'correct horse battery', challenge)).toEqual(byHand);
    expect(chapResponse(ChapAlgorithm.MD5, 0x2a, Buffer.from('correct horse battery'), challenge)).toEqual(byHand);
  });

  it('reproduces the CHAP_R of the successful recorded login', () => {
    const r = chapResponse(ChapAlgorithm.MD5, CAPTURE.ok.id, CAPTURE.secret, decodeBinary(CAPTURE.ok.challenge));
    expect(r).toEqual(decodeBinary(CAPTURE.ok.response));
    expect(encodeBinary(r)).toBe(CAPTURE.ok.response.toLowerCase());
  });

  it('does not match the CHAP_R of the recorded login with the wrong password', () => {
    const r = chapResponse(ChapAlgorithm.MD5, CAPTURE.bad.id, CAPTURE.secret, decodeBinary(CAPTURE.bad.challenge));
    expect(r.equals(decodeBinary(CAPTURE.bad.response))).toBe(false);
    expect(r.toString('hex')).toBe('51d7ccf98a2aaadefb474411f64af41a');
  });

  it('depends on the identifier', () => {
    const c = decodeBinary(CAPTURE.ok.challenge);
    expect(chapResponse(5, 1, CAPTURE.secret, c).equals(chapResponse(5, 2, CAPTURE.secret, c))).toBe(false);
  });

  it.each([
    [ChapAlgorithm.MD5, 'md5', 16],
    [ChapAlgorithm.SHA1, 'sha1', 20],
    [ChapAlgorithm.SHA256, 'sha256', 32],
    [ChapAlgorithm.SHA3_256, 'sha3-256', 32],
  ] as const)('algorithm %i uses %s', (alg, hash, length) => {
    const challenge = Buffer.alloc(16, 7);
    const expected = createHash(hash).update(Buffer.of(9)).update('twelve-bytes!').update(challenge).digest();
    expect(chapResponse(alg, 9, 'twelve-bytes!', challenge)).toEqual(expected);
    expect(chapResponseLength(alg)).toBe(length);
  });

  it('refuses an unknown algorithm and an identifier outside 0..255', () => {
    expect(chapError(() => chapResponse(4 as 5, 1, 's', Buffer.alloc(16))).reason).toBe('unsupported-algorithm');
    expect(chapError(() => chapResponse(5, 256, 's', Buffer.alloc(16))).reason).toBe('bad-identifier');
    expect(chapError(() => chapResponse(5, -1, 's', Buffer.alloc(16))).reason).toBe('bad-identifier');
  });
});

describe('binary values', () => {
  it('encodes hex by default and base64 on request', () => {
    expect(encodeBinary(Buffer.of(0x00, 0xab, 0xff))).toBe('0x00abff');
    expect(encodeBinary(Buffer.of(0x00, 0xab, 0xff), 'base64')).toBe('0bAKv/');
  });

  it.each([
    ['0x00abff', [0x00, 0xab, 0xff]],
    ['0X00ABFF', [0x00, 0xab, 0xff]],
    ['0xabc', [0x0a, 0xbc]], // odd digit count: implicit leading zero (RFC 7143 6.1)
    ['0bAKv/', [0x00, 0xab, 0xff]],
    ['0BAKv/', [0x00, 0xab, 0xff]],
    ['0bAA==', [0x00]],
    ['0bAA', [0x00]], // missing padding tolerated
  ] as const)('decodes %s', (text, bytes) => {
    expect(decodeBinary(text)).toEqual(Buffer.from(bytes));
  });

  it.each(['', '0x', '0b', 'abcdef', '0xgg', '0x12 34', '0bA', '0bAA=', '0b@@@@', '12345', '0o17'])('rejects %j', (text) => {
    expect(chapError(() => decodeBinary(text)).reason).toBe('bad-binary-value');
  });

  it('round-trips random bytes both ways', () => {
    const bytes = newChallenge(50);
    expect(decodeBinary(encodeBinary(bytes))).toEqual(bytes);
    expect(decodeBinary(encodeBinary(bytes, 'base64'))).toEqual(bytes);
  });
});

describe('newChallenge', () => {
  it('uses the injected random source', () => {
    expect(newChallenge(4, () => Buffer.of(1, 2, 3, 4))).toEqual(Buffer.of(1, 2, 3, 4));
  });

  it('defaults to 32 random bytes', () => {
    const a = newChallenge();
    expect(a.length).toBe(32);
    expect(a.equals(newChallenge())).toBe(false);
  });

  it('refuses lengths outside 1..1024', () => {
    expect(chapError(() => newChallenge(0)).reason).toBe('bad-length');
    expect(chapError(() => newChallenge(1025)).reason).toBe('bad-length');
  });
});

describe('ChapAuthenticator (target side)', () => {
  const secrets = new Map([[CAPTURE.user, CAPTURE.secret]]);
  const lookupSecret = (name: string) => secrets.get(name);

  function replayCapture(which: 'ok' | 'bad') {
    const rec = CAPTURE[which];
    const auth = new ChapAuthenticator({
      lookupSecret,
      random: scriptedRandom(Buffer.of(rec.id), decodeBinary(rec.challenge)),
      challengeLength: decodeBinary(rec.challenge).length,
    });
    const first = auth.receive([['CHAP_A', '5']]);
    return { auth, first, rec };
  }

  it('answers CHAP_A=5 with CHAP_A, CHAP_I and CHAP_C exactly as the recorded target did', () => {
    const { first } = replayCapture('ok');
    expect(first.status).toBe('continue');
    expect(first.reply).toEqual([
      ['CHAP_A', '5'],
      ['CHAP_I', '1'],
      ['CHAP_C', CAPTURE.ok.challenge],
    ]);
  });

  it('accepts the recorded successful CHAP_N/CHAP_R', () => {
    const { auth } = replayCapture('ok');
    const step = auth.receive([
      ['CHAP_N', 'alice'],
      ['CHAP_R', CAPTURE.ok.response],
    ]);
    expect(step).toEqual({ reply: [], status: 'complete', warnings: [] });
    expect(auth.authenticated).toBe(true);
    expect(auth.userName).toBe('alice');
  });

  it('refuses the recorded CHAP_R made with the wrong password', () => {
    const { auth } = replayCapture('bad');
    const step = auth.receive([
      ['CHAP_N', 'alice'],
      ['CHAP_R', CAPTURE.bad.response],
    ]);
    expect(step.status).toBe('failed');
    expect(step.failure).toBe('wrong-response');
    expect(auth.authenticated).toBe(false);
    expect(auth.userName).toBeUndefined();
    expect(JSON.stringify(step)).not.toContain(CAPTURE.secret);
  });

  it('refuses an unknown user', () => {
    const { auth } = replayCapture('ok');
    const step = auth.receive([
      ['CHAP_N', 'mallory'],
      ['CHAP_R', CAPTURE.ok.response],
    ]);
    expect(step.failure).toBe('unknown-user');
  });

  it('picks the first algorithm of the initiator list that it accepts', () => {
    const auth = new ChapAuthenticator({ lookupSecret, algorithms: [5, 7] });
    const step = auth.receive([['CHAP_A', '8,7,5']]);
    expect(step.reply[0]).toEqual(['CHAP_A', '7']);
    expect(auth.algorithm).toBe(7);
  });

  it('ignores algorithm values it does not know', () => {
    const auth = new ChapAuthenticator({ lookupSecret });
    expect(auth.receive([['CHAP_A', '99,abc,5']]).reply[0]).toEqual(['CHAP_A', '5']);
  });

  it('answers Reject and fails when no algorithm is acceptable', () => {
    const auth = new ChapAuthenticator({ lookupSecret, algorithms: [5] });
    const step = auth.receive([['CHAP_A', '7']]);
    expect(step).toEqual({ reply: [['CHAP_A', 'Reject']], status: 'failed', failure: 'no-common-algorithm', warnings: [] });
  });

  it('issues a fresh 32-byte challenge and an identifier by default', () => {
    const auth = new ChapAuthenticator({ lookupSecret });
    const step = auth.receive([['CHAP_A', '5']]);
    const id = Number(step.reply[1]![1]);
    expect(id).toBeGreaterThanOrEqual(0);
    expect(id).toBeLessThanOrEqual(255);
    expect(decodeBinary(step.reply[2]![1]).length).toBe(32);
  });

  it('completes a full exchange with SHA-256 against the client', () => {
    const auth = new ChapAuthenticator({ lookupSecret, algorithms: [7, 5] });
    const client = new ChapClient({ credentials: { name: 'alice', secret: CAPTURE.secret }, algorithms: [7] });
    const offer = client.offer();
    expect(offer).toEqual([['CHAP_A', '7,5']]);
    const challenge = auth.receive(offer);
    const answer = client.receive(challenge.reply);
    expect(answer.status).toBe('complete');
    expect(decodeBinary(answer.reply[1]![1]).length).toBe(32);
    expect(auth.receive(answer.reply).status).toBe('complete');
  });

  it('authenticates itself to the initiator in mutual CHAP', () => {
    const auth = new ChapAuthenticator({
      lookupSecret,
      targetCredentials: { name: 'iqn.2026-11.example:chap', secret: 'target-secret-123' },
    });
    const client = new ChapClient({
      credentials: { name: 'alice', secret: CAPTURE.secret },
      mutual: { secret: 'target-secret-123', expectedName: 'iqn.2026-11.example:chap' },
    });
    const challenge = auth.receive(client.offer());
    const answer = client.receive(challenge.reply);
    expect(answer.status).toBe('continue');
    expect(answer.reply.map(([k]) => k)).toEqual(['CHAP_N', 'CHAP_R', 'CHAP_I', 'CHAP_C']);
    const verdict = auth.receive(answer.reply);
    expect(verdict.status).toBe('complete');
    expect(verdict.reply.map(([k]) => k)).toEqual(['CHAP_N', 'CHAP_R']);
    expect(verdict.reply[0]).toEqual(['CHAP_N', 'iqn.2026-11.example:chap']);
    const done = client.receive(verdict.reply);
    expect(done.status).toBe('complete');
    expect(client.targetAuthenticated).toBe(true);
  });

  it('computes the mutual answer over the initiator identifier and challenge', () => {
    const myChallenge = Buffer.alloc(16, 0x11);
    const auth = new ChapAuthenticator({
      lookupSecret,
      targetCredentials: { name: 'tgt', secret: 'target-secret-123' },
      random: scriptedRandom(Buffer.of(7), myChallenge),
      challengeLength: 16,
    });
    auth.receive([['CHAP_A', '5']]);
    const theirs = Buffer.alloc(20, 0x22);
    const step = auth.receive([
      ['CHAP_N', 'alice'],
      ['CHAP_R', encodeBinary(chapResponse(5, 7, CAPTURE.secret, myChallenge))],
      ['CHAP_I', '200'],
      ['CHAP_C', encodeBinary(theirs, 'base64')],
    ]);
    expect(step.reply).toEqual([
      ['CHAP_N', 'tgt'],
      ['CHAP_R', encodeBinary(chapResponse(5, 200, 'target-secret-123', theirs))],
    ]);
  });

  it('refuses a reflected challenge (the initiator sends our own CHAP_C back)', () => {
    const auth = new ChapAuthenticator({ lookupSecret, targetCredentials: { name: 'tgt', secret: 'target-secret-123' } });
    const step1 = auth.receive([['CHAP_A', '5']]);
    const [, id] = step1.reply[1]!;
    const [, ourChallenge] = step1.reply[2]!;
    const step = auth.receive([
      ['CHAP_N', 'alice'],
      ['CHAP_R', encodeBinary(chapResponse(5, Number(id), CAPTURE.secret, decodeBinary(ourChallenge)))],
      ['CHAP_I', id],
      ['CHAP_C', ourChallenge.toUpperCase().replace('0X', '0x')],
    ]);
    expect(step.status).toBe('failed');
    expect(step.failure).toBe('reflected-challenge');
    expect(step.reply).toEqual([]);
  });

  it('refuses a mutual challenge that is too short', () => {
    const auth = new ChapAuthenticator({ lookupSecret, targetCredentials: { name: 'tgt', secret: 'target-secret-123' } });
    auth.receive([['CHAP_A', '5']]);
    const step = auth.receive([
      ['CHAP_N', 'alice'],
      ['CHAP_R', '0x00'],
      ['CHAP_I', '1'],
      ['CHAP_C', '0x0102030405'],
    ]);
    expect(step.failure).toBe('challenge-too-short');
  });

  it('refuses mutual CHAP when it has no credentials, and one-way CHAP when mutual is required', () => {
    const noCreds = new ChapAuthenticator({ lookupSecret });
    noCreds.receive([['CHAP_A', '5']]);
    expect(noCreds.receive([['CHAP_N', 'alice'], ['CHAP_R', '0x00'], ['CHAP_I', '1'], ['CHAP_C', encodeBinary(Buffer.alloc(16, 3))]]).failure).toBe(
      'mutual-not-configured',
    );
    const strict = new ChapAuthenticator({ lookupSecret, requireMutual: true, targetCredentials: { name: 't', secret: 'target-secret-123' } });
    strict.receive([['CHAP_A', '5']]);
    expect(strict.receive([['CHAP_N', 'alice'], ['CHAP_R', '0x00']]).failure).toBe('mutual-required');
  });

  it.each<[string, TextPair[]]>([
    ['CHAP_N without CHAP_R', [['CHAP_N', 'alice']]],
    ['CHAP_I without CHAP_C', [['CHAP_N', 'alice'], ['CHAP_R', '0x00'], ['CHAP_I', '1']]],
    ['an undecodable CHAP_R', [['CHAP_N', 'alice'], ['CHAP_R', 'zz']]],
    ['an empty CHAP_N', [['CHAP_N', ''], ['CHAP_R', '0x00']]],
    ['a CHAP_I above 255', [['CHAP_N', 'alice'], ['CHAP_R', '0x00'], ['CHAP_I', '256'], ['CHAP_C', encodeBinary(Buffer.alloc(16))]]],
    ['a CHAP_C above 1024 bytes', [['CHAP_N', 'alice'], ['CHAP_R', '0x00'], ['CHAP_I', '1'], ['CHAP_C', encodeBinary(Buffer.alloc(1025, 1))]]],
  ])('fails as malformed on %s', (_, pairs) => {
    const auth = new ChapAuthenticator({ lookupSecret, targetCredentials: { name: 't', secret: 'target-secret-123' } });
    auth.receive([['CHAP_A', '5']]);
    expect(auth.receive(pairs).failure).toBe('malformed');
  });

  it('fails on keys that do not belong to the step', () => {
    const a = new ChapAuthenticator({ lookupSecret });
    expect(a.receive([['CHAP_N', 'alice']]).failure).toBe('unexpected-key');
    const b = new ChapAuthenticator({ lookupSecret });
    b.receive([['CHAP_A', '5']]);
    expect(b.receive([['CHAP_A', '5']]).failure).toBe('unexpected-key');
  });

  it('refuses anything after it finished', () => {
    const { auth } = replayCapture('ok');
    auth.receive([['CHAP_N', 'alice'], ['CHAP_R', CAPTURE.ok.response]]);
    expect(auth.receive([]).status).toBe('complete');
    expect(auth.receive([['CHAP_A', '5']]).failure).toBe('already-finished');
    expect(auth.authenticated).toBe(false);
  });

  it('waits without failing when a request carries no CHAP key', () => {
    const auth = new ChapAuthenticator({ lookupSecret });
    expect(auth.receive([])).toEqual({ reply: [], status: 'continue', warnings: [] });
    expect(auth.state).toBe('awaiting-algorithms');
  });

  it('warns, in the return value, about a secret shorter than 12 bytes', () => {
    const auth = new ChapAuthenticator({ lookupSecret: () => 'short', random: scriptedRandom(Buffer.of(3), Buffer.alloc(32, 9)) });
    auth.receive([['CHAP_A', '5']]);
    const step = auth.receive([['CHAP_N', 'bob'], ['CHAP_R', encodeBinary(chapResponse(5, 3, 'short', Buffer.alloc(32, 9)))]]);
    expect(step.status).toBe('complete');
    expect(step.warnings).toEqual(['short-secret']);
  });

  it('warns when the same secret authenticates both directions', () => {
    const auth = new ChapAuthenticator({ lookupSecret, targetCredentials: { name: 't', secret: CAPTURE.secret } });
    const client = new ChapClient({ credentials: { name: 'alice', secret: CAPTURE.secret }, mutual: { secret: CAPTURE.secret } });
    const answer = client.receive(auth.receive(client.offer()).reply);
    expect(answer.warnings).toContain('same-secret-both-directions');
    const verdict = auth.receive(answer.reply);
    expect(verdict.status).toBe('complete');
    expect(verdict.warnings).toContain('same-secret-both-directions');
  });
});

describe('ChapClient (initiator side)', () => {
  const credentials = { name: 'alice', secret: CAPTURE.secret };

  it('offers MD5 by default and always includes it', () => {
    expect(new ChapClient({ credentials }).offer()).toEqual([['CHAP_A', '5']]);
    expect(new ChapClient({ credentials, algorithms: [8, 7] }).offer()).toEqual([['CHAP_A', '8,7,5']]);
  });

  it('produces the recorded CHAP_N/CHAP_R from the recorded challenge', () => {
    const client = new ChapClient({ credentials });
    client.offer();
    const step = client.receive([
      ['CHAP_A', '5'],
      ['CHAP_I', '1'],
      ['CHAP_C', CAPTURE.ok.challenge],
    ]);
    expect(step).toEqual({
      reply: [
        ['CHAP_N', 'alice'],
        ['CHAP_R', CAPTURE.ok.response.toLowerCase()],
      ],
      status: 'complete',
      warnings: [],
    });
  });

  it('fails when the target picks an algorithm that was not offered, or rejects them all', () => {
    const a = new ChapClient({ credentials });
    a.offer();
    expect(a.receive([['CHAP_A', '7'], ['CHAP_I', '1'], ['CHAP_C', CAPTURE.ok.challenge]]).failure).toBe('no-common-algorithm');
    const b = new ChapClient({ credentials });
    b.offer();
    expect(b.receive([['CHAP_A', 'Reject']]).failure).toBe('no-common-algorithm');
  });

  it('refuses a challenge shorter than the minimum', () => {
    const client = new ChapClient({ credentials });
    client.offer();
    expect(client.receive([['CHAP_A', '5'], ['CHAP_I', '1'], ['CHAP_C', '0x01020304']]).failure).toBe('challenge-too-short');
  });

  it('sends its own identifier and a challenge different from the target one in mutual CHAP', () => {
    const targetChallenge = Buffer.alloc(16, 0x33);
    // The first challenge drawn equals the target's: the client must draw again.
    const client = new ChapClient({
      credentials,
      mutual: { secret: 'target-secret-123' },
      challengeLength: 16,
      random: scriptedRandom(Buffer.of(9), targetChallenge, Buffer.alloc(16, 0x44)),
    });
    client.offer();
    const step = client.receive([['CHAP_A', '5'], ['CHAP_I', '4'], ['CHAP_C', encodeBinary(targetChallenge)]]);
    expect(step.reply.slice(2)).toEqual([
      ['CHAP_I', '9'],
      ['CHAP_C', encodeBinary(Buffer.alloc(16, 0x44))],
    ]);
  });

  it('detects a target that answers the mutual challenge wrongly or under another name', () => {
    const mk = () => {
      const c = new ChapClient({
        credentials,
        mutual: { secret: 'target-secret-123', expectedName: 'tgt' },
        challengeLength: 16,
        random: scriptedRandom(Buffer.of(9), Buffer.alloc(16, 0x44)),
      });
      c.offer();
      c.receive([['CHAP_A', '5'], ['CHAP_I', '4'], ['CHAP_C', encodeBinary(Buffer.alloc(16, 0x33))]]);
      return c;
    };
    const right = encodeBinary(chapResponse(5, 9, 'target-secret-123', Buffer.alloc(16, 0x44)));
    expect(mk().receive([['CHAP_N', 'tgt'], ['CHAP_R', right]]).status).toBe('complete');
    expect(mk().receive([['CHAP_N', 'other'], ['CHAP_R', right]]).failure).toBe('unexpected-name');
    const wrong = encodeBinary(chapResponse(5, 9, 'not-the-secret!', Buffer.alloc(16, 0x44)));
    const failed = mk();
    expect(failed.receive([['CHAP_N', 'tgt'], ['CHAP_R', wrong]]).failure).toBe('wrong-response');
    expect(failed.targetAuthenticated).toBe(false);
  });

  it('warns about a short secret', () => {
    const client = new ChapClient({ credentials: { name: 'a', secret: 'short' } });
    client.offer();
    expect(client.receive([['CHAP_A', '5'], ['CHAP_I', '1'], ['CHAP_C', CAPTURE.ok.challenge]]).warnings).toEqual(['short-secret']);
  });

  it('fails on a challenge that arrives before the offer', () => {
    expect(new ChapClient({ credentials }).receive([['CHAP_A', '5']]).failure).toBe('unexpected-key');
  });
});
