/**
 * SCSI sense data (SPC-4): building and parsing both the fixed format
 * (response codes 70h/71h) and the descriptor format (72h/73h), the sense
 * key and additional sense code tables a block target needs, and the
 * SenseLength framing that iSCSI puts in front of sense data in the SCSI
 * Response data segment (RFC 7143 §11.4.7).
 */

export const SenseKey = {
  NO_SENSE: 0x0,
  RECOVERED_ERROR: 0x1,
  NOT_READY: 0x2,
  MEDIUM_ERROR: 0x3,
  HARDWARE_ERROR: 0x4,
  ILLEGAL_REQUEST: 0x5,
  UNIT_ATTENTION: 0x6,
  DATA_PROTECT: 0x7,
  BLANK_CHECK: 0x8,
  VENDOR_SPECIFIC: 0x9,
  COPY_ABORTED: 0xa,
  ABORTED_COMMAND: 0xb,
  VOLUME_OVERFLOW: 0xd,
  MISCOMPARE: 0xe,
  COMPLETED: 0xf,
} as const;

export type SenseKeyName = keyof typeof SenseKey;

const senseKeyNames = new Map<number, string>(Object.entries(SenseKey).map(([n, k]) => [k, n]));

/** 'ILLEGAL_REQUEST' etc.; 0xC (obsolete EQUAL) and anything else gives 'RESERVED_0xN'. */
export function senseKeyName(key: number): string {
  return senseKeyNames.get(key) ?? `RESERVED_0x${(key & 0xff).toString(16)}`;
}

export interface AdditionalSenseCode {
  readonly asc: number;
  readonly ascq: number;
}

function code(asc: number, ascq: number): AdditionalSenseCode {
  return Object.freeze({ asc, ascq });
}

/**
 * ASC/ASCQ pairs a block target and an iSCSI transport report. Values are
 * those of the T10 ASC/ASCQ assignment list (SPC-4 Annex); the names follow
 * the T10 descriptions with punctuation turned into underscores.
 */
export const Asc = {
  NO_ADDITIONAL_SENSE_INFORMATION: code(0x00, 0x00),
  OPERATION_IN_PROGRESS: code(0x00, 0x16),
  LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE: code(0x04, 0x00),
  LOGICAL_UNIT_IS_IN_PROCESS_OF_BECOMING_READY: code(0x04, 0x01),
  LOGICAL_UNIT_NOT_READY_INITIALIZING_COMMAND_REQUIRED: code(0x04, 0x02),
  LOGICAL_UNIT_NOT_READY_MANUAL_INTERVENTION_REQUIRED: code(0x04, 0x03),
  LOGICAL_UNIT_NOT_READY_OPERATION_IN_PROGRESS: code(0x04, 0x07),
  LOGICAL_UNIT_NOT_ACCESSIBLE_ASYMMETRIC_ACCESS_STATE_TRANSITION: code(0x04, 0x0a),
  LOGICAL_UNIT_NOT_ACCESSIBLE_TARGET_PORT_IN_STANDBY_STATE: code(0x04, 0x0b),
  LOGICAL_UNIT_NOT_ACCESSIBLE_TARGET_PORT_IN_UNAVAILABLE_STATE: code(0x04, 0x0c),
  LOGICAL_UNIT_COMMUNICATION_FAILURE: code(0x08, 0x00),
  LOGICAL_UNIT_COMMUNICATION_TIME_OUT: code(0x08, 0x01),
  WRITE_ERROR: code(0x0c, 0x00),
  WRITE_ERROR_UNEXPECTED_UNSOLICITED_DATA: code(0x0c, 0x0c),
  WRITE_ERROR_NOT_ENOUGH_UNSOLICITED_DATA: code(0x0c, 0x0d),
  LOGICAL_BLOCK_GUARD_CHECK_FAILED: code(0x10, 0x01),
  LOGICAL_BLOCK_APPLICATION_TAG_CHECK_FAILED: code(0x10, 0x02),
  LOGICAL_BLOCK_REFERENCE_TAG_CHECK_FAILED: code(0x10, 0x03),
  UNRECOVERED_READ_ERROR: code(0x11, 0x00),
  READ_ERROR_FAILED_RETRANSMISSION_REQUEST: code(0x11, 0x13),
  PARAMETER_LIST_LENGTH_ERROR: code(0x1a, 0x00),
  MISCOMPARE_DURING_VERIFY_OPERATION: code(0x1d, 0x00),
  INVALID_COMMAND_OPERATION_CODE: code(0x20, 0x00),
  ACCESS_DENIED_NO_ACCESS_RIGHTS: code(0x20, 0x02),
  LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE: code(0x21, 0x00),
  INVALID_FIELD_IN_CDB: code(0x24, 0x00),
  LOGICAL_UNIT_NOT_SUPPORTED: code(0x25, 0x00),
  INVALID_FIELD_IN_PARAMETER_LIST: code(0x26, 0x00),
  PARAMETER_NOT_SUPPORTED: code(0x26, 0x01),
  PARAMETER_VALUE_INVALID: code(0x26, 0x02),
  INVALID_RELEASE_OF_PERSISTENT_RESERVATION: code(0x26, 0x04),
  WRITE_PROTECTED: code(0x27, 0x00),
  HARDWARE_WRITE_PROTECTED: code(0x27, 0x01),
  LOGICAL_UNIT_SOFTWARE_WRITE_PROTECTED: code(0x27, 0x02),
  SPACE_ALLOCATION_FAILED_WRITE_PROTECT: code(0x27, 0x07),
  NOT_READY_TO_READY_CHANGE_MEDIUM_MAY_HAVE_CHANGED: code(0x28, 0x00),
  POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED: code(0x29, 0x00),
  POWER_ON_OCCURRED: code(0x29, 0x01),
  SCSI_BUS_RESET_OCCURRED: code(0x29, 0x02),
  BUS_DEVICE_RESET_FUNCTION_OCCURRED: code(0x29, 0x03),
  DEVICE_INTERNAL_RESET: code(0x29, 0x04),
  I_T_NEXUS_LOSS_OCCURRED: code(0x29, 0x07),
  PARAMETERS_CHANGED: code(0x2a, 0x00),
  MODE_PARAMETERS_CHANGED: code(0x2a, 0x01),
  RESERVATIONS_PREEMPTED: code(0x2a, 0x03),
  RESERVATIONS_RELEASED: code(0x2a, 0x04),
  REGISTRATIONS_PREEMPTED: code(0x2a, 0x05),
  ASYMMETRIC_ACCESS_STATE_CHANGED: code(0x2a, 0x06),
  CAPACITY_DATA_HAS_CHANGED: code(0x2a, 0x09),
  COMMAND_SEQUENCE_ERROR: code(0x2c, 0x00),
  COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: code(0x2f, 0x00),
  COMMANDS_CLEARED_BY_DEVICE_SERVER: code(0x2f, 0x02),
  THIN_PROVISIONING_SOFT_THRESHOLD_REACHED: code(0x38, 0x07),
  SAVING_PARAMETERS_NOT_SUPPORTED: code(0x39, 0x00),
  MEDIUM_NOT_PRESENT: code(0x3a, 0x00),
  LOGICAL_UNIT_FAILURE: code(0x3e, 0x01),
  TIMEOUT_ON_LOGICAL_UNIT: code(0x3e, 0x02),
  TARGET_OPERATING_CONDITIONS_HAVE_CHANGED: code(0x3f, 0x00),
  MICROCODE_HAS_BEEN_CHANGED: code(0x3f, 0x01),
  INQUIRY_DATA_HAS_CHANGED: code(0x3f, 0x03),
  REPORTED_LUNS_DATA_HAS_CHANGED: code(0x3f, 0x0e),
  MESSAGE_ERROR: code(0x43, 0x00),
  INTERNAL_TARGET_FAILURE: code(0x44, 0x00),
  SCSI_PARITY_ERROR: code(0x47, 0x00),
  PROTOCOL_SERVICE_CRC_ERROR: code(0x47, 0x05),
  SOME_COMMANDS_CLEARED_BY_ISCSI_PROTOCOL_EVENT: code(0x47, 0x7f),
  INITIATOR_DETECTED_ERROR_MESSAGE_RECEIVED: code(0x48, 0x00),
  INVALID_MESSAGE_ERROR: code(0x49, 0x00),
  COMMAND_PHASE_ERROR: code(0x4a, 0x00),
  DATA_PHASE_ERROR: code(0x4b, 0x00),
  INVALID_TARGET_PORT_TRANSFER_TAG_RECEIVED: code(0x4b, 0x01),
  TOO_MUCH_WRITE_DATA: code(0x4b, 0x02),
  DATA_OFFSET_ERROR: code(0x4b, 0x05),
  CONNECTION_LOST: code(0x4b, 0x07),
  OVERLAPPED_COMMANDS_ATTEMPTED: code(0x4e, 0x00),
  INSUFFICIENT_RESERVATION_RESOURCES: code(0x55, 0x02),
  INSUFFICIENT_RESOURCES: code(0x55, 0x03),
  INSUFFICIENT_REGISTRATION_RESOURCES: code(0x55, 0x04),
  FAILURE_PREDICTION_THRESHOLD_EXCEEDED: code(0x5d, 0x00),
} as const;

export type AscName = keyof typeof Asc;

const ascNames = new Map<number, string>(Object.entries(Asc).map(([n, c]) => [(c.asc << 8) | c.ascq, n]));

/** Constant name of a known ASC/ASCQ pair (e.g. 'INVALID_FIELD_IN_CDB'), else undefined. */
export function ascName(asc: number, ascq: number): string | undefined {
  return ascNames.get(((asc & 0xff) << 8) | (ascq & 0xff));
}

export interface SenseCondition extends AdditionalSenseCode {
  readonly key: number;
}

/**
 * The check conditions RFC 7143 §11.4.7.2 makes an iSCSI target report.
 * "Incorrect amount of data" is reported with NOT ENOUGH UNSOLICITED DATA.
 */
export const IscsiSense = {
  UNEXPECTED_UNSOLICITED_DATA: Object.freeze({ key: SenseKey.ABORTED_COMMAND, ...Asc.WRITE_ERROR_UNEXPECTED_UNSOLICITED_DATA }),
  INCORRECT_AMOUNT_OF_DATA: Object.freeze({ key: SenseKey.ABORTED_COMMAND, ...Asc.WRITE_ERROR_NOT_ENOUGH_UNSOLICITED_DATA }),
  PROTOCOL_SERVICE_CRC_ERROR: Object.freeze({ key: SenseKey.ABORTED_COMMAND, ...Asc.PROTOCOL_SERVICE_CRC_ERROR }),
  SNACK_REJECTED: Object.freeze({ key: SenseKey.ABORTED_COMMAND, ...Asc.READ_ERROR_FAILED_RETRANSMISSION_REQUEST }),
} as const satisfies Record<string, SenseCondition>;

/** Sense response codes (byte 0 bits 6-0). */
export const SenseResponseCode = {
  FIXED_CURRENT: 0x70,
  FIXED_DEFERRED: 0x71,
  DESCRIPTOR_CURRENT: 0x72,
  DESCRIPTOR_DEFERRED: 0x73,
} as const;

/** Sense data descriptor types (SPC-4). */
export const SenseDescriptorType = {
  INFORMATION: 0x00,
  COMMAND_SPECIFIC_INFORMATION: 0x01,
  SENSE_KEY_SPECIFIC: 0x02,
  FIELD_REPLACEABLE_UNIT: 0x03,
  STREAM_COMMANDS: 0x04,
  BLOCK_COMMANDS: 0x05,
  ATA_STATUS_RETURN: 0x09,
  ANOTHER_PROGRESS_INDICATION: 0x0a,
} as const;

/**
 * The three SENSE KEY SPECIFIC bytes, whose meaning depends on the sense key
 * (SPC-4). Only present when SKSV is set.
 */
export type SenseKeySpecific =
  /** ILLEGAL REQUEST: which byte (and bit) of the CDB or parameter list is wrong. */
  | { readonly type: 'field-pointer'; readonly inCdb: boolean; readonly fieldPointer: number; readonly bitPointer?: number }
  /** RECOVERED ERROR, MEDIUM ERROR, HARDWARE ERROR. */
  | { readonly type: 'actual-retry-count'; readonly count: number }
  /** NO SENSE, NOT READY: numerator of a fraction of 65536. */
  | { readonly type: 'progress'; readonly progress: number }
  /** COPY ABORTED. */
  | {
      readonly type: 'segment-pointer';
      readonly segmentDescriptor: boolean;
      readonly fieldPointer: number;
      readonly bitPointer?: number;
    }
  /** UNIT ATTENTION. */
  | { readonly type: 'unit-attention-queue-overflow'; readonly overflow: boolean }
  /** Any other sense key: the three bytes with the SKSV bit cleared. */
  | { readonly type: 'raw'; readonly bytes: Buffer };

export type SenseFormat = 'fixed' | 'descriptor';

export interface SenseDescriptor {
  readonly type: number;
  /** Descriptor bytes after the DESCRIPTOR TYPE and ADDITIONAL LENGTH bytes. */
  readonly data: Buffer;
}

export interface BuildSenseOptions {
  readonly key: number;
  readonly asc: number;
  readonly ascq: number;
  /** Defaults to 'fixed', which every initiator understands. */
  readonly format?: SenseFormat;
  readonly deferred?: boolean;
  /**
   * INFORMATION (e.g. the failing LBA). In fixed format a value above
   * 0xFFFFFFFF cannot be represented; as real drives do, the VALID bit is then
   * left clear and the field zero, and the initiator must enable descriptor
   * sense (D_SENSE) to learn it.
   */
  readonly information?: number | bigint;
  readonly commandSpecificInformation?: number | bigint;
  readonly fru?: number;
  readonly senseKeySpecific?: SenseKeySpecific;
  readonly filemark?: boolean;
  readonly eom?: boolean;
  readonly ili?: boolean;
  /** Extra descriptors appended as given; descriptor format only. */
  readonly descriptors?: readonly SenseDescriptor[];
}

export interface SenseData {
  readonly format: SenseFormat;
  readonly responseCode: number;
  readonly deferred: boolean;
  /** Absent only when the input was cut before the field. */
  readonly key?: number;
  readonly asc?: number;
  readonly ascq?: number;
  readonly information?: bigint;
  /** Only reported when non-zero (fixed) or when its descriptor is present. */
  readonly commandSpecificInformation?: bigint;
  /** Only reported when non-zero (zero means no FRU is identified). */
  readonly fru?: number;
  readonly senseKeySpecific?: SenseKeySpecific;
  readonly filemark: boolean;
  readonly eom: boolean;
  readonly ili: boolean;
  /** The device had more sense data than fits (SDAT_OVFL). */
  readonly sdatOvfl: boolean;
  /** Every descriptor found, known or not, in order (descriptor format only). */
  readonly descriptors?: readonly SenseDescriptor[];
  /** The buffer ended before the length announced by ADDITIONAL SENSE LENGTH. */
  readonly truncated: boolean;
}

export type SenseDataErrorCode = 'EMPTY' | 'NOT_SENSE_DATA' | 'VENDOR_SPECIFIC_FORMAT';

export class SenseDataError extends Error {
  readonly code: SenseDataErrorCode;
  constructor(code: SenseDataErrorCode, message: string) {
    super(message);
    this.name = 'SenseDataError';
    this.code = code;
  }
}

const FIXED_SENSE_LENGTH = 18;
// ADDITIONAL SENSE LENGTH is one byte, but SPC-4 caps sense data at 252 bytes.
const MAX_ADDITIONAL_SENSE_LENGTH = 244;

function checkByte(name: string, v: number): void {
  if (!Number.isInteger(v) || v < 0 || v > 0xff) throw new RangeError(`${name} must be 0..255, got ${v}`);
}

function toBig(name: string, v: number | bigint, maxBits: number): bigint {
  if (typeof v === 'number' && !Number.isSafeInteger(v)) {
    throw new RangeError(`${name} must be a safe integer or a bigint, got ${v}`);
  }
  const b = BigInt(v);
  if (b < 0n || b >= 1n << BigInt(maxBits)) throw new RangeError(`${name} does not fit in ${maxBits} unsigned bits`);
  return b;
}

function encodeSenseKeySpecific(s: SenseKeySpecific): Buffer {
  const out = Buffer.alloc(3);
  const u16 = (name: string, v: number): number => {
    if (!Number.isInteger(v) || v < 0 || v > 0xffff) throw new RangeError(`${name} must be 0..65535, got ${v}`);
    return v;
  };
  const bits = (bitPointer: number | undefined): number => {
    if (bitPointer === undefined) return 0;
    if (!Number.isInteger(bitPointer) || bitPointer < 0 || bitPointer > 7) {
      throw new RangeError(`bitPointer must be 0..7, got ${bitPointer}`);
    }
    return 0x08 | bitPointer;
  };
  switch (s.type) {
    case 'field-pointer':
      out[0] = 0x80 | (s.inCdb ? 0x40 : 0) | bits(s.bitPointer);
      out.writeUInt16BE(u16('fieldPointer', s.fieldPointer), 1);
      break;
    case 'segment-pointer':
      out[0] = 0x80 | (s.segmentDescriptor ? 0x20 : 0) | bits(s.bitPointer);
      out.writeUInt16BE(u16('fieldPointer', s.fieldPointer), 1);
      break;
    case 'actual-retry-count':
      out[0] = 0x80;
      out.writeUInt16BE(u16('count', s.count), 1);
      break;
    case 'progress':
      out[0] = 0x80;
      out.writeUInt16BE(u16('progress', s.progress), 1);
      break;
    case 'unit-attention-queue-overflow':
      out[0] = 0x80 | (s.overflow ? 0x01 : 0);
      break;
    case 'raw':
      if (s.bytes.length !== 3) throw new RangeError('raw sense key specific data must be 3 bytes');
      s.bytes.copy(out);
      out[0] = out[0]! | 0x80;
      break;
  }
  return out;
}

/** Interprets three SENSE KEY SPECIFIC bytes for the given sense key; undefined when SKSV is clear. */
export function decodeSenseKeySpecific(key: number, b: Buffer): SenseKeySpecific | undefined {
  if (b.length < 3 || (b[0]! & 0x80) === 0) return undefined;
  const b0 = b[0]!;
  const value = b.readUInt16BE(1);
  const bitPointer = b0 & 0x08 ? b0 & 0x07 : undefined;
  switch (key) {
    case SenseKey.ILLEGAL_REQUEST:
      return bitPointer === undefined
        ? { type: 'field-pointer', inCdb: (b0 & 0x40) !== 0, fieldPointer: value }
        : { type: 'field-pointer', inCdb: (b0 & 0x40) !== 0, fieldPointer: value, bitPointer };
    case SenseKey.COPY_ABORTED:
      return bitPointer === undefined
        ? { type: 'segment-pointer', segmentDescriptor: (b0 & 0x20) !== 0, fieldPointer: value }
        : { type: 'segment-pointer', segmentDescriptor: (b0 & 0x20) !== 0, fieldPointer: value, bitPointer };
    case SenseKey.RECOVERED_ERROR:
    case SenseKey.MEDIUM_ERROR:
    case SenseKey.HARDWARE_ERROR:
      return { type: 'actual-retry-count', count: value };
    case SenseKey.NO_SENSE:
    case SenseKey.NOT_READY:
      return { type: 'progress', progress: value };
    case SenseKey.UNIT_ATTENTION:
      return { type: 'unit-attention-queue-overflow', overflow: (b0 & 0x01) !== 0 };
    default: {
      const bytes = Buffer.from(b.subarray(0, 3));
      bytes[0] = b0 & 0x7f;
      return { type: 'raw', bytes };
    }
  }
}

function descriptor(type: number, data: Buffer): Buffer {
  const out = Buffer.alloc(2 + data.length);
  out[0] = type;
  out[1] = data.length;
  data.copy(out, 2);
  return out;
}

/** Builds sense data; fixed format (18 bytes) unless `format: 'descriptor'`. */
export function buildSense(opts: BuildSenseOptions): Buffer {
  const { key, asc, ascq } = opts;
  if (!Number.isInteger(key) || key < 0 || key > 0xf) throw new RangeError(`sense key must be 0..15, got ${key}`);
  checkByte('asc', asc);
  checkByte('ascq', ascq);
  if (opts.fru !== undefined) checkByte('fru', opts.fru);
  const sks = opts.senseKeySpecific ? encodeSenseKeySpecific(opts.senseKeySpecific) : undefined;
  const format = opts.format ?? 'fixed';

  if (format === 'fixed') {
    if (opts.descriptors && opts.descriptors.length > 0) {
      throw new TypeError('sense descriptors can only be sent in descriptor format');
    }
    const out = Buffer.alloc(FIXED_SENSE_LENGTH);
    let valid = false;
    if (opts.information !== undefined) {
      const info = toBig('information', opts.information, 64);
      if (info <= 0xffffffffn) {
        out.writeUInt32BE(Number(info), 3);
        valid = true;
      }
    }
    out[0] = (valid ? 0x80 : 0) | (opts.deferred ? SenseResponseCode.FIXED_DEFERRED : SenseResponseCode.FIXED_CURRENT);
    out[2] = (opts.filemark ? 0x80 : 0) | (opts.eom ? 0x40 : 0) | (opts.ili ? 0x20 : 0) | key;
    out[7] = FIXED_SENSE_LENGTH - 8;
    if (opts.commandSpecificInformation !== undefined) {
      out.writeUInt32BE(Number(toBig('commandSpecificInformation', opts.commandSpecificInformation, 32)), 8);
    }
    out[12] = asc;
    out[13] = ascq;
    out[14] = opts.fru ?? 0;
    if (sks) sks.copy(out, 15);
    return out;
  }

  const parts: Buffer[] = [];
  if (opts.information !== undefined) {
    const d = Buffer.alloc(10);
    d[0] = 0x80; // VALID shall be one in the information descriptor
    d.writeBigUInt64BE(toBig('information', opts.information, 64), 2);
    parts.push(descriptor(SenseDescriptorType.INFORMATION, d));
  }
  if (opts.commandSpecificInformation !== undefined) {
    const d = Buffer.alloc(10);
    d.writeBigUInt64BE(toBig('commandSpecificInformation', opts.commandSpecificInformation, 64), 2);
    parts.push(descriptor(SenseDescriptorType.COMMAND_SPECIFIC_INFORMATION, d));
  }
  if (sks) {
    const d = Buffer.alloc(6);
    sks.copy(d, 2);
    parts.push(descriptor(SenseDescriptorType.SENSE_KEY_SPECIFIC, d));
  }
  if (opts.fru !== undefined && opts.fru !== 0) {
    parts.push(descriptor(SenseDescriptorType.FIELD_REPLACEABLE_UNIT, Buffer.from([0, opts.fru])));
  }
  // FILEMARK and EOM only exist in the stream commands descriptor; a block
  // device reports ILI alone in the block commands descriptor.
  if (opts.filemark || opts.eom) {
    const flags = (opts.filemark ? 0x80 : 0) | (opts.eom ? 0x40 : 0) | (opts.ili ? 0x20 : 0);
    parts.push(descriptor(SenseDescriptorType.STREAM_COMMANDS, Buffer.from([0, flags])));
  } else if (opts.ili) {
    parts.push(descriptor(SenseDescriptorType.BLOCK_COMMANDS, Buffer.from([0, 0x20])));
  }
  for (const extra of opts.descriptors ?? []) {
    checkByte('descriptor type', extra.type);
    if (extra.data.length > 0xff) throw new RangeError('sense descriptor data longer than 255 bytes');
    parts.push(descriptor(extra.type, extra.data));
  }
  const body = Buffer.concat(parts);
  if (body.length > MAX_ADDITIONAL_SENSE_LENGTH) {
    throw new RangeError(`descriptor sense data too long (${body.length} > ${MAX_ADDITIONAL_SENSE_LENGTH})`);
  }
  const header = Buffer.alloc(8);
  header[0] = opts.deferred ? SenseResponseCode.DESCRIPTOR_DEFERRED : SenseResponseCode.DESCRIPTOR_CURRENT;
  header[1] = key;
  header[2] = asc;
  header[3] = ascq;
  header[7] = body.length;
  return Buffer.concat([header, body]);
}

/**
 * ILLEGAL REQUEST with INVALID FIELD IN CDB (or IN PARAMETER LIST) and a
 * field pointer to the offending byte, which lets the initiator's logs say
 * exactly what was rejected.
 */
export function buildInvalidFieldSense(
  where: 'cdb' | 'parameter-list',
  fieldPointer: number,
  bitPointer?: number,
  format: SenseFormat = 'fixed',
): Buffer {
  const c = where === 'cdb' ? Asc.INVALID_FIELD_IN_CDB : Asc.INVALID_FIELD_IN_PARAMETER_LIST;
  const sks: SenseKeySpecific =
    bitPointer === undefined
      ? { type: 'field-pointer', inCdb: where === 'cdb', fieldPointer }
      : { type: 'field-pointer', inCdb: where === 'cdb', fieldPointer, bitPointer };
  return buildSense({ key: SenseKey.ILLEGAL_REQUEST, ...c, format, senseKeySpecific: sks });
}

/**
 * Parses sense data of either format. Truncated input is accepted: fields
 * beyond the end of the buffer (or beyond ADDITIONAL SENSE LENGTH) are left
 * out and `truncated` tells whether the buffer was shorter than announced.
 * Throws SenseDataError when the bytes are not sense data at all.
 */
export function parseSense(buf: Buffer): SenseData {
  if (buf.length === 0) throw new SenseDataError('EMPTY', 'empty sense data');
  const responseCode = buf[0]! & 0x7f;
  if (responseCode === 0x7f) {
    throw new SenseDataError('VENDOR_SPECIFIC_FORMAT', 'vendor specific sense data format (response code 7Fh)');
  }
  if (responseCode < 0x70 || responseCode > 0x73) {
    throw new SenseDataError(
      'NOT_SENSE_DATA',
      `not sense data: response code 0x${responseCode.toString(16).padStart(2, '0')}`,
    );
  }
  const announced = buf.length >= 8 ? 8 + buf[7]! : undefined;
  const end = announced === undefined ? buf.length : Math.min(buf.length, announced);
  const truncated = announced === undefined || buf.length < announced;
  const has = (lastIndex: number): boolean => lastIndex < end;
  const deferred = responseCode === 0x71 || responseCode === 0x73;

  if (responseCode === 0x70 || responseCode === 0x71) {
    const flags = has(2) ? buf[2]! : 0;
    let information: bigint | undefined;
    if ((buf[0]! & 0x80) !== 0 && has(6)) information = BigInt(buf.readUInt32BE(3));
    let commandSpecificInformation: bigint | undefined;
    if (has(11)) {
      const csi = buf.readUInt32BE(8);
      if (csi !== 0) commandSpecificInformation = BigInt(csi);
    }
    const key = has(2) ? flags & 0x0f : undefined;
    const fru = has(14) && buf[14] !== 0 ? buf[14] : undefined;
    const senseKeySpecific = key !== undefined && has(17) ? decodeSenseKeySpecific(key, buf.subarray(15, 18)) : undefined;
    return {
      format: 'fixed',
      responseCode,
      deferred,
      ...(key !== undefined ? { key } : {}),
      ...(has(12) ? { asc: buf[12]! } : {}),
      ...(has(13) ? { ascq: buf[13]! } : {}),
      ...(information !== undefined ? { information } : {}),
      ...(commandSpecificInformation !== undefined ? { commandSpecificInformation } : {}),
      ...(fru !== undefined ? { fru } : {}),
      ...(senseKeySpecific ? { senseKeySpecific } : {}),
      filemark: (flags & 0x80) !== 0,
      eom: (flags & 0x40) !== 0,
      ili: (flags & 0x20) !== 0,
      sdatOvfl: (flags & 0x10) !== 0,
      truncated,
    };
  }

  const key = has(1) ? buf[1]! & 0x0f : undefined;
  const descriptors: SenseDescriptor[] = [];
  let information: bigint | undefined;
  let commandSpecificInformation: bigint | undefined;
  let senseKeySpecific: SenseKeySpecific | undefined;
  let fru: number | undefined;
  let filemark = false;
  let eom = false;
  let ili = false;
  let pos = 8;
  while (pos + 2 <= end) {
    const type = buf[pos]!;
    const len = buf[pos + 1]!;
    if (pos + 2 + len > end) break;
    const data = Buffer.from(buf.subarray(pos + 2, pos + 2 + len));
    descriptors.push({ type, data });
    switch (type) {
      case SenseDescriptorType.INFORMATION:
        if (len >= 10 && (data[0]! & 0x80) !== 0) information = data.readBigUInt64BE(2);
        break;
      case SenseDescriptorType.COMMAND_SPECIFIC_INFORMATION:
        if (len >= 10) commandSpecificInformation = data.readBigUInt64BE(2);
        break;
      case SenseDescriptorType.SENSE_KEY_SPECIFIC:
        if (len >= 5 && key !== undefined) senseKeySpecific = decodeSenseKeySpecific(key, data.subarray(2, 5));
        break;
      case SenseDescriptorType.FIELD_REPLACEABLE_UNIT:
        if (len >= 2 && data[1] !== 0) fru = data[1];
        break;
      case SenseDescriptorType.STREAM_COMMANDS:
        if (len >= 2) {
          filemark = (data[1]! & 0x80) !== 0;
          eom = (data[1]! & 0x40) !== 0;
          ili = ili || (data[1]! & 0x20) !== 0;
        }
        break;
      case SenseDescriptorType.BLOCK_COMMANDS:
        if (len >= 2) ili = ili || (data[1]! & 0x20) !== 0;
        break;
      default:
        break;
    }
    pos += 2 + len;
  }
  // Bytes left over mean the last descriptor was cut short.
  const cutDescriptor = pos < end;
  return {
    format: 'descriptor',
    responseCode,
    deferred,
    ...(key !== undefined ? { key } : {}),
    ...(has(2) ? { asc: buf[2]! } : {}),
    ...(has(3) ? { ascq: buf[3]! } : {}),
    ...(information !== undefined ? { information } : {}),
    ...(commandSpecificInformation !== undefined ? { commandSpecificInformation } : {}),
    ...(fru !== undefined ? { fru } : {}),
    ...(senseKeySpecific ? { senseKeySpecific } : {}),
    filemark,
    eom,
    ili,
    sdatOvfl: has(4) ? (buf[4]! & 0x80) !== 0 : false,
    descriptors,
    truncated: truncated || cutDescriptor,
  };
}

function hex2(n: number): string {
  return n.toString(16).padStart(2, '0').toUpperCase();
}

/** One-line human summary, e.g. 'ILLEGAL_REQUEST INVALID_FIELD_IN_CDB (24h/00h)'. */
export function describeSense(s: SenseData): string {
  const key = s.key === undefined ? 'UNKNOWN_KEY' : senseKeyName(s.key);
  if (s.asc === undefined) return key;
  const ascq = s.ascq ?? 0;
  const name = s.ascq === undefined ? undefined : ascName(s.asc, ascq);
  const codes = s.ascq === undefined ? `${hex2(s.asc)}h/??` : `${hex2(s.asc)}h/${hex2(ascq)}h`;
  return name ? `${key} ${name} (${codes})` : `${key} ASC ${codes}`;
}

/**
 * Prefixes sense data with the 2-byte big-endian SenseLength that iSCSI
 * carries in the SCSI Response data segment (RFC 7143 §11.4.7.1).
 */
export function wrapIscsiSense(sense: Buffer): Buffer {
  if (sense.length > 0xffff) throw new RangeError('sense data longer than 65535 bytes');
  const out = Buffer.alloc(2 + sense.length);
  out.writeUInt16BE(sense.length, 0);
  sense.copy(out, 2);
  return out;
}

/**
 * Extracts the sense bytes from a SCSI Response data segment. Returns
 * undefined when there is no sense (segment shorter than 2 bytes or
 * SenseLength 0). A SenseLength larger than the segment yields the bytes
 * that are there, so parseSense can still report what it can. The result
 * shares memory with `data`.
 */
export function unwrapIscsiSense(data: Buffer): Buffer | undefined {
  if (data.length < 2) return undefined;
  const len = data.readUInt16BE(0);
  if (len === 0) return undefined;
  return data.subarray(2, 2 + len);
}
