// The data segment of Login and Text PDUs (RFC 7143 section 6.1): `key=value` records, each
// terminated by a NUL byte. Negotiation text may span several PDUs (the C bit), and a single
// record may be cut anywhere by a PDU boundary.

export type TextFormatErrorReason =
  | 'missing-separator' // a record without '='
  | 'empty-key'
  | 'key-too-long' // more than 63 bytes
  | 'invalid-key-character'
  | 'nul-in-value' // only when encoding: a NUL would end the record early
  | 'invalid-utf8';

export class TextFormatError extends Error {
  override readonly name = 'TextFormatError';
  readonly kind = 'text-format' as const;
  constructor(
    readonly reason: TextFormatErrorReason,
    message: string,
  ) {
    super(message);
  }
}

/** Raised by TextAssembler when the peer keeps sending continuation PDUs past the limit. */
export class TextTooLongError extends Error {
  override readonly name = 'TextTooLongError';
  readonly kind = 'text-too-long' as const;
  constructor(
    readonly limit: number,
    message: string,
  ) {
    super(message);
  }
}

export type TextPair = [key: string, value: string];

/** RFC 7143 6.1: a key name (standard-label) must not exceed 63 characters. */
export const MAX_KEY_NAME_LENGTH = 63;

/**
 * Every node must accept at least 8192 bytes of negotiation text (RFC 7143 6.1), and tgt, LIO
 * and open-iscsi accept more. 64 KiB leaves room for long SendTargets answers while still bounding
 * what a misbehaving peer can make us buffer.
 */
export const DEFAULT_MAX_TEXT_LENGTH = 64 * 1024;

// RFC 7143 6.1 allows letters, digits, '.', '-', '+', '@' and '_' in a key name. '#' is needed
// for the IANA-registered public extension keys, which start with "X#" (section 13.22).
// The rule that a standard-label begins with a capital letter is deliberately not enforced here:
// a lower-case key is better answered with NotUnderstood by the negotiator than by failing the
// whole login over it.
const KEY_PATTERN = /^(?:X#)?[A-Za-z0-9.\-+@_]+$/;

function keyProblem(key: string): TextFormatError | undefined {
  if (key.length === 0) return new TextFormatError('empty-key', 'text record with an empty key');
  if (Buffer.byteLength(key, 'utf8') > MAX_KEY_NAME_LENGTH) {
    return new TextFormatError('key-too-long', `key name longer than ${MAX_KEY_NAME_LENGTH} bytes`);
  }
  if (!KEY_PATTERN.test(key)) {
    return new TextFormatError('invalid-key-character', `key name ${JSON.stringify(key.slice(0, 63))} has a character RFC 7143 does not allow`);
  }
  return undefined;
}

/** True if `key` is syntactically a valid key name. */
export function isValidKeyName(key: string): boolean {
  return keyProblem(key) === undefined;
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

function decodeRecord(record: Buffer): TextPair {
  const eq = record.indexOf(0x3d); // '='
  if (eq < 0) throw new TextFormatError('missing-separator', 'text record without "="');
  // A key is ASCII by construction (checked below), so latin1 keeps any stray byte visible to
  // the character check instead of turning it into U+FFFD.
  const key = record.toString('latin1', 0, eq);
  const problem = keyProblem(key);
  if (problem) throw problem;
  let value: string;
  try {
    value = utf8.decode(record.subarray(eq + 1));
  } catch {
    throw new TextFormatError('invalid-utf8', `value of ${key} is not valid UTF-8`);
  }
  return [key, value];
}

/**
 * Decodes a complete text data segment. The final NUL is optional (some initiators omit it), and
 * empty records — which appear when a sender counts its padding into DataSegmentLength — are
 * skipped. Order and duplicates are preserved: detecting a key sent twice is the negotiator's job.
 */
export function decodeTextData(data: Buffer): TextPair[] {
  const pairs: TextPair[] = [];
  let start = 0;
  while (start < data.length) {
    let end = data.indexOf(0, start);
    if (end < 0) end = data.length;
    if (end > start) pairs.push(decodeRecord(data.subarray(start, end)));
    start = end + 1;
  }
  return pairs;
}

/** Encodes pairs as `key=value\0` records. */
export function encodeTextData(pairs: Iterable<readonly [string, string]>): Buffer {
  const parts: Buffer[] = [];
  for (const [key, value] of pairs) {
    const problem = keyProblem(key);
    if (problem) throw problem;
    if (value.includes('\0')) throw new TextFormatError('nul-in-value', `value of ${key} contains a NUL byte`);
    parts.push(Buffer.from(`${key}=${value}\0`, 'utf8'));
  }
  return Buffer.concat(parts);
}

export interface TextAssemblerOptions {
  /** Upper bound on the bytes buffered for one negotiation text. Default 64 KiB. */
  maxLength?: number;
}

/**
 * Collects the data segments of a sequence of Login or Text PDUs that have the C (continue) bit
 * set, and decodes the whole text once the PDU with C=0 arrives. Records may be cut anywhere by
 * PDU boundaries, so nothing is decoded before the text is complete.
 */
export class TextAssembler {
  readonly maxLength: number;
  #parts: Buffer[] = [];
  #length = 0;

  constructor(options: TextAssemblerOptions = {}) {
    this.maxLength = options.maxLength ?? DEFAULT_MAX_TEXT_LENGTH;
    if (!Number.isInteger(this.maxLength) || this.maxLength < 1) throw new RangeError('maxLength must be a positive integer');
  }

  /** Bytes held for the text still being continued. */
  get bufferedLength(): number {
    return this.#length;
  }

  /** True while a text has started (C=1 seen) and not yet completed. */
  get inProgress(): boolean {
    return this.#parts.length > 0;
  }

  /**
   * Adds one PDU's data segment. Returns the decoded pairs when `continued` is false (the PDU
   * ends the text), or undefined while more PDUs are expected. Throws TextTooLongError past the
   * limit and TextFormatError on a malformed text; either way the assembler is reset.
   */
  push(data: Buffer, continued: boolean): TextPair[] | undefined {
    if (this.#length + data.length > this.maxLength) {
      const limit = this.maxLength;
      this.reset();
      throw new TextTooLongError(limit, `negotiation text exceeds ${limit} bytes`);
    }
    if (data.length > 0) {
      this.#parts.push(data);
      this.#length += data.length;
    } else if (continued && this.#parts.length === 0) {
      // Remember that a text is in progress even if its first fragment is empty.
      this.#parts.push(Buffer.alloc(0));
    }
    if (continued) return undefined;
    const whole = this.#parts.length === 1 ? this.#parts[0]! : Buffer.concat(this.#parts, this.#length);
    this.reset();
    return decodeTextData(whole);
  }

  reset(): void {
    this.#parts = [];
    this.#length = 0;
  }
}

export interface TextChunk {
  data: Buffer;
  /** Value for the C bit of the PDU that carries this chunk. */
  continue: boolean;
}

/**
 * Cuts an encoded text into data segments no longer than the receiver's
 * MaxRecvDataSegmentLength. Every chunk but the last has C=1; an empty text still yields one
 * (empty) chunk, because a response PDU is sent either way.
 */
export function splitTextData(text: Buffer, maxSegmentLength: number): TextChunk[] {
  if (!Number.isInteger(maxSegmentLength) || maxSegmentLength < 1) {
    throw new RangeError('maxSegmentLength must be a positive integer');
  }
  if (text.length === 0) return [{ data: text, continue: false }];
  const chunks: TextChunk[] = [];
  for (let offset = 0; offset < text.length; offset += maxSegmentLength) {
    const end = Math.min(offset + maxSegmentLength, text.length);
    chunks.push({ data: text.subarray(offset, end), continue: end < text.length });
  }
  return chunks;
}
