// CHAP for iSCSI (RFC 7143 12.1.3, RFC 1994): response computation, binary value encoding,
// and the two sides of the exchange as small state machines that read and produce text pairs.
//
//   I->T  CHAP_A=<A1,A2,...>
//   T->I  CHAP_A=<A> CHAP_I=<I> CHAP_C=<C>
//   I->T  CHAP_N=<N> CHAP_R=<R> [CHAP_I=<I> CHAP_C=<C>   when the initiator authenticates the target]
//   T->I  [CHAP_N=<N> CHAP_R=<R>]
//
// Secrets never appear in error messages, failure reasons or return values.

import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { MAX_CHAP_BINARY_LENGTH, MAX_SIMPLE_VALUE_LENGTH, parseListValue, parseNumericValue } from './keys.ts';
import type { TextPair } from './text.ts';

/** CHAP_A values: 5 is RFC 1994's MD5 and the only one RFC 7143 requires; 6-8 are later registrations Linux LIO and open-iscsi also use. */
export const ChapAlgorithm = {
  MD5: 5,
  SHA1: 6,
  SHA256: 7,
  SHA3_256: 8,
} as const;
export type ChapAlgorithmId = (typeof ChapAlgorithm)[keyof typeof ChapAlgorithm];

const HASHES: Record<ChapAlgorithmId, { hash: string; length: number }> = {
  5: { hash: 'md5', length: 16 },
  6: { hash: 'sha1', length: 20 },
  7: { hash: 'sha256', length: 32 },
  8: { hash: 'sha3-256', length: 32 },
};

export function isChapAlgorithm(value: number): value is ChapAlgorithmId {
  return Object.hasOwn(HASHES, value);
}

/** Length in bytes of a CHAP_R computed with `algorithm`. */
export function chapResponseLength(algorithm: ChapAlgorithmId): number {
  return HASHES[algorithm].length;
}

/** RFC 7143 9.2.1: secrets shorter than 96 bits are only acceptable under IPsec. */
export const RECOMMENDED_MIN_SECRET_LENGTH = 12;
export const DEFAULT_CHALLENGE_LENGTH = 32;
/** Shortest challenge accepted from the peer: anything shorter than an MD5 digest is weak. */
export const DEFAULT_MIN_CHALLENGE_LENGTH = 16;

export type ChapErrorReason = 'bad-binary-value' | 'bad-identifier' | 'unsupported-algorithm' | 'bad-length';

export class ChapError extends Error {
  override readonly name = 'ChapError';
  readonly kind = 'chap' as const;
  constructor(
    readonly reason: ChapErrorReason,
    message: string,
  ) {
    super(message);
  }
}

export type Secret = Buffer | string;

function secretBytes(secret: Secret): Buffer {
  return typeof secret === 'string' ? Buffer.from(secret, 'utf8') : secret;
}

/** CHAP_R = H(CHAP_I as one byte || secret || CHAP_C) (RFC 1994 4.1). */
export function chapResponse(algorithm: ChapAlgorithmId, identifier: number, secret: Secret, challenge: Buffer): Buffer {
  if (!isChapAlgorithm(algorithm)) throw new ChapError('unsupported-algorithm', `CHAP algorithm ${String(algorithm)} is not supported`);
  if (!Number.isInteger(identifier) || identifier < 0 || identifier > 255) {
    throw new ChapError('bad-identifier', 'CHAP identifier must be an integer in 0..255');
  }
  return createHash(HASHES[algorithm].hash).update(Buffer.of(identifier)).update(secretBytes(secret)).update(challenge).digest();
}

/** Source of random bytes; injectable so that tests (and replays of captures) are deterministic. */
export type RandomSource = (size: number) => Buffer;

export function newChallenge(length: number = DEFAULT_CHALLENGE_LENGTH, random: RandomSource = randomBytes): Buffer {
  if (!Number.isInteger(length) || length < 1 || length > MAX_CHAP_BINARY_LENGTH) {
    throw new ChapError('bad-length', `challenge length must be in 1..${MAX_CHAP_BINARY_LENGTH}`);
  }
  const bytes = random(length);
  if (bytes.length !== length) throw new ChapError('bad-length', 'random source returned the wrong number of bytes');
  return bytes;
}

/** Encodes bytes as an RFC 7143 binary value: `0x` + hex (the default) or `0b` + base64. */
export function encodeBinary(bytes: Buffer, encoding: 'hex' | 'base64' = 'hex'): string {
  return encoding === 'hex' ? `0x${bytes.toString('hex')}` : `0b${bytes.toString('base64')}`;
}

const HEX_DIGITS = /^[0-9a-fA-F]+$/;
const BASE64_CHARS = /^[A-Za-z0-9+/]+={0,2}$/;

/**
 * Decodes an RFC 7143 6.1 binary value: `0x`/`0X` followed by hex digits (an odd count has an
 * implicit leading zero), or `0b`/`0B` followed by base64. Missing base64 padding is tolerated.
 */
export function decodeBinary(text: string): Buffer {
  const prefix = text.slice(0, 2);
  const body = text.slice(2);
  if ((prefix === '0x' || prefix === '0X') && HEX_DIGITS.test(body)) {
    return Buffer.from(body.length % 2 === 1 ? `0${body}` : body, 'hex');
  }
  if ((prefix === '0b' || prefix === '0B') && BASE64_CHARS.test(body)) {
    const unpadded = body.replace(/=+$/, '');
    const padding = body.length - unpadded.length;
    // Padding, when present, must complete the last group; one leftover character encodes nothing.
    if (unpadded.length % 4 === 1 || (padding > 0 && (unpadded.length + padding) % 4 !== 0)) {
      throw new ChapError('bad-binary-value', 'malformed base64 binary value');
    }
    return Buffer.from(unpadded, 'base64');
  }
  throw new ChapError('bad-binary-value', 'binary value must start with 0x (hex) or 0b (base64)');
}

function parseIdentifier(text: string): number | undefined {
  const n = parseNumericValue(text);
  return n !== undefined && n <= 255 ? n : undefined;
}

function parseAlgorithmList(text: string): number[] {
  const out: number[] = [];
  for (const item of parseListValue(text)) {
    const n = parseNumericValue(item);
    if (n !== undefined) out.push(n);
  }
  return out;
}

export interface ChapCredentials {
  /** CHAP_N: the user name. */
  name: string;
  secret: Secret;
}

export type ChapFailureReason =
  | 'no-common-algorithm'
  | 'malformed' // a value that does not parse, or a key missing from a step
  | 'unexpected-key' // a CHAP key that does not belong to the current step
  | 'unknown-user' // target: no secret for this CHAP_N
  | 'wrong-response' // the CHAP_R does not prove the secret
  | 'unexpected-name' // initiator: the target answered with another CHAP_N
  | 'mutual-required' // target: the initiator did not ask to authenticate the target
  | 'mutual-not-configured' // target: asked to authenticate itself, but has no credentials
  | 'reflected-challenge' // the peer sent back our own challenge (RFC 7143 9.2.1)
  | 'challenge-too-short'
  | 'already-finished';

export type ChapWarning =
  | 'short-secret' // below 12 bytes (96 bits)
  | 'same-secret-both-directions'; // RFC 7143 9.2.1: a secret must authenticate one direction only

export interface ChapStep {
  /** CHAP pairs to send (may be empty). */
  reply: TextPair[];
  /** continue: more CHAP messages are expected; complete: this side's part succeeded; failed: stop. */
  status: 'continue' | 'complete' | 'failed';
  failure?: ChapFailureReason;
  warnings: ChapWarning[];
}

function collect(pairs: readonly TextPair[]): Map<string, string> {
  const m = new Map<string, string>();
  for (const [k, v] of pairs) if (k.startsWith('CHAP_')) m.set(k, v);
  return m;
}

function onlyKeys(m: Map<string, string>, allowed: readonly string[]): boolean {
  for (const k of m.keys()) if (!allowed.includes(k)) return false;
  return true;
}

function decodeChallengeValue(text: string): Buffer | undefined {
  try {
    const b = decodeBinary(text);
    return b.length > 0 && b.length <= MAX_CHAP_BINARY_LENGTH ? b : undefined;
  } catch {
    return undefined;
  }
}

function sameBytes(a: Buffer, b: Buffer): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}

export interface ChapAuthenticatorOptions {
  /** Finds the secret for the user named by CHAP_N; undefined when there is none. */
  lookupSecret: (name: string) => Secret | undefined;
  /** Algorithms the target accepts; the initiator's order decides among them. Default: 5, 6, 7, 8. */
  algorithms?: readonly ChapAlgorithmId[];
  /** The target's own name and secret, used when the initiator authenticates the target (mutual CHAP). */
  targetCredentials?: ChapCredentials;
  /** Refuse initiators that do not authenticate the target. */
  requireMutual?: boolean;
  /** Length of the challenge sent. Default 32. */
  challengeLength?: number;
  /** Shortest challenge accepted from the initiator. Default 16. */
  minPeerChallengeLength?: number;
  /** Called once for the identifier (1 byte), then once for the challenge. */
  random?: RandomSource;
}

type AuthenticatorState = 'awaiting-algorithms' | 'awaiting-response' | 'complete' | 'failed';

/**
 * The target side of CHAP: chooses the algorithm, issues CHAP_I and CHAP_C, checks the
 * initiator's CHAP_N/CHAP_R and, for mutual CHAP, answers the initiator's challenge.
 * A failed step means: reject the login with AuthenticationFailure (0x0201).
 */
export class ChapAuthenticator {
  readonly #options: ChapAuthenticatorOptions;
  readonly #algorithms: readonly ChapAlgorithmId[];
  readonly #random: RandomSource;
  #state: AuthenticatorState = 'awaiting-algorithms';
  #algorithm: ChapAlgorithmId | undefined;
  #identifier = 0;
  #challenge: Buffer = Buffer.alloc(0);
  #user: string | undefined;

  constructor(options: ChapAuthenticatorOptions) {
    this.#options = options;
    this.#algorithms = options.algorithms ?? [ChapAlgorithm.MD5, ChapAlgorithm.SHA1, ChapAlgorithm.SHA256, ChapAlgorithm.SHA3_256];
    for (const a of this.#algorithms) if (!isChapAlgorithm(a)) throw new RangeError(`CHAP algorithm ${String(a)} is not supported`);
    if (options.requireMutual && !options.targetCredentials) throw new RangeError('requireMutual needs targetCredentials');
    this.#random = options.random ?? randomBytes;
  }

  get state(): AuthenticatorState {
    return this.#state;
  }

  /** True once the initiator has proved its secret (and mutual CHAP, if asked for, is answered). */
  get authenticated(): boolean {
    return this.#state === 'complete';
  }

  /** The CHAP_N the initiator authenticated as. */
  get userName(): string | undefined {
    return this.#state === 'complete' ? this.#user : undefined;
  }

  get algorithm(): ChapAlgorithmId | undefined {
    return this.#algorithm;
  }

  /** Processes the CHAP keys of one Login Request (other keys are ignored). */
  receive(pairs: readonly TextPair[]): ChapStep {
    const keys = collect(pairs);
    switch (this.#state) {
      case 'awaiting-algorithms':
        return this.#receiveAlgorithms(keys);
      case 'awaiting-response':
        return this.#receiveResponse(keys);
      default:
        if (keys.size === 0) return { reply: [], status: this.#state === 'complete' ? 'complete' : 'failed', warnings: [] };
        return this.#fail('already-finished');
    }
  }

  #fail(reason: ChapFailureReason, reply: TextPair[] = [], warnings: ChapWarning[] = []): ChapStep {
    this.#state = 'failed';
    return { reply, status: 'failed', failure: reason, warnings };
  }

  #receiveAlgorithms(keys: Map<string, string>): ChapStep {
    if (keys.size === 0) return { reply: [], status: 'continue', warnings: [] };
    const offered = keys.get('CHAP_A');
    if (offered === undefined || !onlyKeys(keys, ['CHAP_A'])) return this.#fail('unexpected-key');
    const choice = parseAlgorithmList(offered).find((a): a is ChapAlgorithmId => isChapAlgorithm(a) && this.#algorithms.includes(a));
    // RFC 7143 6.2.1: no acceptable value is answered with Reject; the login then fails.
    if (choice === undefined) return this.#fail('no-common-algorithm', [['CHAP_A', 'Reject']]);
    this.#algorithm = choice;
    this.#identifier = this.#random(1)[0]!;
    this.#challenge = newChallenge(this.#options.challengeLength ?? DEFAULT_CHALLENGE_LENGTH, this.#random);
    this.#state = 'awaiting-response';
    return {
      reply: [
        ['CHAP_A', String(choice)],
        ['CHAP_I', String(this.#identifier)],
        ['CHAP_C', encodeBinary(this.#challenge)],
      ],
      status: 'continue',
      warnings: [],
    };
  }

  #receiveResponse(keys: Map<string, string>): ChapStep {
    if (keys.size === 0) return { reply: [], status: 'continue', warnings: [] };
    if (!onlyKeys(keys, ['CHAP_N', 'CHAP_R', 'CHAP_I', 'CHAP_C'])) return this.#fail('unexpected-key');
    const name = keys.get('CHAP_N');
    const responseText = keys.get('CHAP_R');
    const peerIdText = keys.get('CHAP_I');
    const peerChallengeText = keys.get('CHAP_C');
    if (name === undefined || responseText === undefined) return this.#fail('malformed');
    if (name.length === 0 || Buffer.byteLength(name, 'utf8') > MAX_SIMPLE_VALUE_LENGTH) return this.#fail('malformed');
    if ((peerIdText === undefined) !== (peerChallengeText === undefined)) return this.#fail('malformed');
    const algorithm = this.#algorithm!;

    // Mutual CHAP: validate the initiator's challenge before spending any effort on it.
    let peerId: number | undefined;
    let peerChallenge: Buffer | undefined;
    if (peerIdText !== undefined && peerChallengeText !== undefined) {
      peerId = parseIdentifier(peerIdText);
      peerChallenge = decodeChallengeValue(peerChallengeText);
      if (peerId === undefined || peerChallenge === undefined) return this.#fail('malformed');
      // RFC 7143 9.2.1: a challenge equal to ours is a reflection attack; close the connection.
      if (sameBytes(peerChallenge, this.#challenge)) return this.#fail('reflected-challenge');
      if (peerChallenge.length < (this.#options.minPeerChallengeLength ?? DEFAULT_MIN_CHALLENGE_LENGTH)) {
        return this.#fail('challenge-too-short');
      }
      if (!this.#options.targetCredentials) return this.#fail('mutual-not-configured');
    } else if (this.#options.requireMutual) {
      return this.#fail('mutual-required');
    }

    let response: Buffer;
    try {
      response = decodeBinary(responseText);
    } catch {
      return this.#fail('malformed');
    }
    const secret = this.#options.lookupSecret(name);
    if (secret === undefined) return this.#fail('unknown-user');
    const expected = chapResponse(algorithm, this.#identifier, secret, this.#challenge);
    if (!sameBytes(response, expected)) return this.#fail('wrong-response');

    const warnings: ChapWarning[] = [];
    if (secretBytes(secret).length < RECOMMENDED_MIN_SECRET_LENGTH) warnings.push('short-secret');
    const reply: TextPair[] = [];
    if (peerId !== undefined && peerChallenge !== undefined) {
      const own = this.#options.targetCredentials!;
      if (sameBytes(secretBytes(own.secret), secretBytes(secret))) warnings.push('same-secret-both-directions');
      if (secretBytes(own.secret).length < RECOMMENDED_MIN_SECRET_LENGTH && !warnings.includes('short-secret')) warnings.push('short-secret');
      reply.push(['CHAP_N', own.name], ['CHAP_R', encodeBinary(chapResponse(algorithm, peerId, own.secret, peerChallenge))]);
    }
    this.#user = name;
    this.#state = 'complete';
    return { reply, status: 'complete', warnings };
  }
}

export interface ChapClientOptions {
  /** The initiator's CHAP_N and secret. */
  credentials: ChapCredentials;
  /** Algorithms to offer, most preferred first. MD5 is appended if missing (RFC 7143 12.1.3). Default: [5]. */
  algorithms?: readonly ChapAlgorithmId[];
  /** Authenticate the target too (mutual CHAP) with this secret. */
  mutual?: { secret: Secret; expectedName?: string };
  /** Length of the challenge sent for mutual CHAP. Default 32. */
  challengeLength?: number;
  /** Shortest challenge accepted from the target. Default 16. */
  minPeerChallengeLength?: number;
  /** Called once for the identifier (1 byte), then for the challenge (mutual CHAP only). */
  random?: RandomSource;
}

type ClientState = 'initial' | 'awaiting-challenge' | 'awaiting-target-response' | 'complete' | 'failed';

/**
 * The initiator side of CHAP. `complete` means this side has nothing left to do: the response
 * is sent and, for mutual CHAP, the target's response was verified. Whether the target accepted
 * the initiator is told by the Login Response status.
 */
export class ChapClient {
  readonly #options: ChapClientOptions;
  readonly #algorithms: readonly ChapAlgorithmId[];
  readonly #random: RandomSource;
  #state: ClientState = 'initial';
  #algorithm: ChapAlgorithmId | undefined;
  #identifier = 0;
  #challenge: Buffer = Buffer.alloc(0);

  constructor(options: ChapClientOptions) {
    this.#options = options;
    const algorithms = [...(options.algorithms ?? [ChapAlgorithm.MD5])];
    for (const a of algorithms) if (!isChapAlgorithm(a)) throw new RangeError(`CHAP algorithm ${String(a)} is not supported`);
    if (!algorithms.includes(ChapAlgorithm.MD5)) algorithms.push(ChapAlgorithm.MD5);
    this.#algorithms = algorithms;
    this.#random = options.random ?? randomBytes;
  }

  get state(): ClientState {
    return this.#state;
  }

  /** True once the target proved its secret (mutual CHAP only). */
  get targetAuthenticated(): boolean {
    return this.#options.mutual !== undefined && this.#state === 'complete';
  }

  /** The first CHAP message: CHAP_A with the offered algorithms. */
  offer(): TextPair[] {
    if (this.#state !== 'initial') return [];
    this.#state = 'awaiting-challenge';
    return [['CHAP_A', this.#algorithms.join(',')]];
  }

  /** Processes the CHAP keys of one Login Response. */
  receive(pairs: readonly TextPair[]): ChapStep {
    const keys = collect(pairs);
    switch (this.#state) {
      case 'awaiting-challenge':
        return this.#receiveChallenge(keys);
      case 'awaiting-target-response':
        return this.#receiveTargetResponse(keys);
      case 'initial':
        return this.#fail('unexpected-key');
      default:
        if (keys.size === 0) return { reply: [], status: this.#state === 'complete' ? 'complete' : 'failed', warnings: [] };
        return this.#fail('already-finished');
    }
  }

  #fail(reason: ChapFailureReason): ChapStep {
    this.#state = 'failed';
    return { reply: [], status: 'failed', failure: reason, warnings: [] };
  }

  #receiveChallenge(keys: Map<string, string>): ChapStep {
    if (keys.size === 0) return { reply: [], status: 'continue', warnings: [] };
    if (!onlyKeys(keys, ['CHAP_A', 'CHAP_I', 'CHAP_C'])) return this.#fail('unexpected-key');
    const algText = keys.get('CHAP_A');
    const idText = keys.get('CHAP_I');
    const challengeText = keys.get('CHAP_C');
    if (algText === 'Reject') return this.#fail('no-common-algorithm');
    if (algText === undefined || idText === undefined || challengeText === undefined) return this.#fail('malformed');
    const alg = parseNumericValue(algText);
    // The target must pick one of the offered algorithms (RFC 7143 6.2.1).
    if (alg === undefined || !isChapAlgorithm(alg) || !this.#algorithms.includes(alg)) return this.#fail('no-common-algorithm');
    const id = parseIdentifier(idText);
    const challenge = decodeChallengeValue(challengeText);
    if (id === undefined || challenge === undefined) return this.#fail('malformed');
    if (challenge.length < (this.#options.minPeerChallengeLength ?? DEFAULT_MIN_CHALLENGE_LENGTH)) return this.#fail('challenge-too-short');
    this.#algorithm = alg;

    const { name, secret } = this.#options.credentials;
    const warnings: ChapWarning[] = [];
    if (secretBytes(secret).length < RECOMMENDED_MIN_SECRET_LENGTH) warnings.push('short-secret');
    const reply: TextPair[] = [
      ['CHAP_N', name],
      ['CHAP_R', encodeBinary(chapResponse(alg, id, secret, challenge))],
    ];
    const mutual = this.#options.mutual;
    if (mutual === undefined) {
      this.#state = 'complete';
      return { reply, status: 'complete', warnings };
    }
    if (sameBytes(secretBytes(mutual.secret), secretBytes(secret))) warnings.push('same-secret-both-directions');
    this.#identifier = this.#random(1)[0]!;
    // Never send the target's own challenge back to it (RFC 7143 9.2.1).
    do {
      this.#challenge = newChallenge(this.#options.challengeLength ?? DEFAULT_CHALLENGE_LENGTH, this.#random);
    } while (sameBytes(this.#challenge, challenge));
    reply.push(['CHAP_I', String(this.#identifier)], ['CHAP_C', encodeBinary(this.#challenge)]);
    this.#state = 'awaiting-target-response';
    return { reply, status: 'continue', warnings };
  }

  #receiveTargetResponse(keys: Map<string, string>): ChapStep {
    if (keys.size === 0) return { reply: [], status: 'continue', warnings: [] };
    if (!onlyKeys(keys, ['CHAP_N', 'CHAP_R'])) return this.#fail('unexpected-key');
    const name = keys.get('CHAP_N');
    const responseText = keys.get('CHAP_R');
    if (name === undefined || responseText === undefined) return this.#fail('malformed');
    const mutual = this.#options.mutual!;
    if (mutual.expectedName !== undefined && name !== mutual.expectedName) return this.#fail('unexpected-name');
    let response: Buffer;
    try {
      response = decodeBinary(responseText);
    } catch {
      return this.#fail('malformed');
    }
    const expected = chapResponse(this.#algorithm!, this.#identifier, mutual.secret, this.#challenge);
    if (!sameBytes(response, expected)) return this.#fail('wrong-response');
    this.#state = 'complete';
    return { reply: [], status: 'complete', warnings: [] };
  }
}
