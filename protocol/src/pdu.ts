import { crc32cOf, DIGEST_LENGTH } from './digest.ts';
import { WireError } from './errors.ts';

/** RFC 7143 section 11: opcodes. Initiator opcodes are 0x00-0x1f, target opcodes 0x20-0x3f. */
export const Opcode = {
  NopOut: 0x00,
  ScsiCommand: 0x01,
  TaskMgmtRequest: 0x02,
  LoginRequest: 0x03,
  TextRequest: 0x04,
  DataOut: 0x05,
  LogoutRequest: 0x06,
  SnackRequest: 0x10,
  NopIn: 0x20,
  ScsiResponse: 0x21,
  TaskMgmtResponse: 0x22,
  LoginResponse: 0x23,
  TextResponse: 0x24,
  DataIn: 0x25,
  LogoutResponse: 0x26,
  R2T: 0x31,
  AsyncMessage: 0x32,
  Reject: 0x3f,
} as const;
export type OpcodeValue = (typeof Opcode)[keyof typeof Opcode];

const NAMES: Record<number, string> = {
  0x00: 'NOP-Out',
  0x01: 'SCSI Command',
  0x02: 'Task Management Request',
  0x03: 'Login Request',
  0x04: 'Text Request',
  0x05: 'SCSI Data-Out',
  0x06: 'Logout Request',
  0x10: 'SNACK Request',
  0x20: 'NOP-In',
  0x21: 'SCSI Response',
  0x22: 'Task Management Response',
  0x23: 'Login Response',
  0x24: 'Text Response',
  0x25: 'SCSI Data-In',
  0x26: 'Logout Response',
  0x31: 'Ready To Transfer',
  0x32: 'Asynchronous Message',
  0x3f: 'Reject',
};

export function opcodeName(opcode: number): string {
  return NAMES[opcode] ?? `Unknown (0x${opcode.toString(16).padStart(2, '0')})`;
}

export function isKnownOpcode(opcode: number): boolean {
  return NAMES[opcode] !== undefined;
}

/** True for opcodes an initiator sends (RFC 7143 11.1.1). */
export function isInitiatorOpcode(opcode: number): boolean {
  return opcode < 0x20;
}

export const BHS_LENGTH = 48;
/** Largest value the 3-byte DataSegmentLength field can hold. */
export const MAX_DATA_SEGMENT_LENGTH = 0xff_ffff;
/** TotalAHSLength is one byte counting 4-byte words. */
export const MAX_AHS_LENGTH = 255 * 4;
/** The "reserved" tag value: unsolicited PDUs and answers that belong to no task carry it. */
export const RESERVED_TAG = 0xffff_ffff;

export const AhsType = { ExtendedCdb: 1, BidiReadDataLength: 2 } as const;

export const LoginStage = { Security: 0, Operational: 1, FullFeature: 3 } as const;

/** SCSI Command task attributes (RFC 7143 11.3.1.3 ATTR). */
export const TaskAttr = { Untagged: 0, Simple: 1, Ordered: 2, HeadOfQueue: 3, Aca: 4 } as const;

export const TmfFunction = {
  AbortTask: 1,
  AbortTaskSet: 2,
  ClearAca: 3,
  ClearTaskSet: 4,
  LogicalUnitReset: 5,
  TargetWarmReset: 6,
  TargetColdReset: 7,
  TaskReassign: 8,
} as const;

export const TmfResponse = {
  Complete: 0,
  NoSuchTask: 1,
  NoSuchLun: 2,
  TaskStillAllegiant: 3,
  ReassignNotSupported: 4,
  NotSupported: 5,
  AuthorizationFailed: 6,
  Rejected: 255,
} as const;

export const LogoutReason = { CloseSession: 0, CloseConnection: 1, RemoveConnectionForRecovery: 2 } as const;
export const LogoutResponseCode = {
  Success: 0,
  CidNotFound: 1,
  RecoveryNotSupported: 2,
  CleanupFailed: 3,
} as const;

export const AsyncEvent = {
  ScsiAsyncEvent: 0,
  RequestLogout: 1,
  DropConnection: 2,
  DropAllConnections: 3,
  RequestNegotiation: 4,
  TaskTerminationComplete: 5,
  Vendor: 255,
} as const;

export const RejectReason = {
  DataDigestError: 0x02,
  SnackReject: 0x03,
  ProtocolError: 0x04,
  CommandNotSupported: 0x05,
  ImmediateCommandReject: 0x06,
  TaskInProgress: 0x07,
  InvalidDataAck: 0x08,
  InvalidPduField: 0x09,
  LongOpReject: 0x0a,
  DeprecatedNegotiationReset: 0x0b,
  WaitingForLogout: 0x0c,
} as const;

export const SnackType = { DataR2T: 0, Status: 1, DataAck: 2, RDataSnack: 3 } as const;

// ---------------------------------------------------------------------------------------------
// PDU shapes. Decoding fills every field; encoding reads the typed fields and derives byte 1,
// the lengths and the AHS from them, so `flags`, `totalAhsLength` and `dataSegmentLength` are
// informational on a decoded PDU and ignored when encoding.

interface Common {
  immediate: boolean;
  itt: number;
  /** Byte 1 of the BHS as received. */
  flags: number;
  /** TotalAHSLength in bytes (the wire field counts words). */
  totalAhsLength: number;
  dataSegmentLength: number;
  data: Buffer;
}

export interface NopOut extends Common {
  opcode: 0x00;
  lun: number;
  ttt: number;
  cmdSN: number;
  expStatSN: number;
}

export interface ScsiCommand extends Common {
  opcode: 0x01;
  final: boolean;
  read: boolean;
  write: boolean;
  attr: number;
  lun: number;
  expectedDataTransferLength: number;
  cmdSN: number;
  expStatSN: number;
  /** The whole CDB: the 16-byte field, extended by an Extended CDB AHS when one is present. */
  cdb: Buffer;
  /** From the Bidirectional Read Data Length AHS, when present. */
  bidiReadDataLength?: number;
}

export interface TaskMgmtRequest extends Common {
  opcode: 0x02;
  function: number;
  lun: number;
  referencedTaskTag: number;
  cmdSN: number;
  expStatSN: number;
  refCmdSN: number;
  expDataSN: number;
}

export interface LoginRequest extends Common {
  opcode: 0x03;
  transit: boolean;
  continue: boolean;
  csg: number;
  nsg: number;
  versionMax: number;
  versionMin: number;
  /** 6 bytes. */
  isid: Buffer;
  tsih: number;
  cid: number;
  cmdSN: number;
  expStatSN: number;
}

export interface TextRequest extends Common {
  opcode: 0x04;
  final: boolean;
  continue: boolean;
  lun: number;
  ttt: number;
  cmdSN: number;
  expStatSN: number;
}

export interface DataOut extends Common {
  opcode: 0x05;
  final: boolean;
  lun: number;
  ttt: number;
  expStatSN: number;
  dataSN: number;
  bufferOffset: number;
}

export interface LogoutRequest extends Common {
  opcode: 0x06;
  reasonCode: number;
  cid: number;
  cmdSN: number;
  expStatSN: number;
}

export interface SnackRequest extends Common {
  opcode: 0x10;
  type: number;
  lun: number;
  /** Target Transfer Tag, or SNACK Tag for R-Data SNACKs. */
  ttt: number;
  expStatSN: number;
  begRun: number;
  runLength: number;
}

export interface NopIn extends Common {
  opcode: 0x20;
  lun: number;
  ttt: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
}

export interface ScsiResponse extends Common {
  opcode: 0x21;
  bidiOverflow: boolean;
  bidiUnderflow: boolean;
  overflow: boolean;
  underflow: boolean;
  response: number;
  status: number;
  snackTag: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
  expDataSN: number;
  bidiReadResidualCount: number;
  residualCount: number;
}

export interface TaskMgmtResponse extends Common {
  opcode: 0x22;
  response: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
}

export interface LoginResponse extends Common {
  opcode: 0x23;
  transit: boolean;
  continue: boolean;
  csg: number;
  nsg: number;
  versionMax: number;
  versionActive: number;
  isid: Buffer;
  tsih: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
  statusClass: number;
  statusDetail: number;
}

export interface TextResponse extends Common {
  opcode: 0x24;
  final: boolean;
  continue: boolean;
  lun: number;
  ttt: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
}

export interface DataIn extends Common {
  opcode: 0x25;
  final: boolean;
  acknowledge: boolean;
  overflow: boolean;
  underflow: boolean;
  /** S bit: this PDU carries the command's status. */
  statusPresent: boolean;
  status: number;
  lun: number;
  ttt: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
  dataSN: number;
  bufferOffset: number;
  residualCount: number;
}

export interface LogoutResponse extends Common {
  opcode: 0x26;
  response: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
  time2Wait: number;
  time2Retain: number;
}

export interface R2T extends Common {
  opcode: 0x31;
  lun: number;
  ttt: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
  r2tSN: number;
  bufferOffset: number;
  desiredDataTransferLength: number;
}

export interface AsyncMessage extends Common {
  opcode: 0x32;
  lun: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
  asyncEvent: number;
  asyncVCode: number;
  parameter1: number;
  parameter2: number;
  parameter3: number;
}

export interface Reject extends Common {
  opcode: 0x3f;
  reason: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
  dataSN: number;
}

export type InitiatorPdu =
  | NopOut
  | ScsiCommand
  | TaskMgmtRequest
  | LoginRequest
  | TextRequest
  | DataOut
  | LogoutRequest
  | SnackRequest;
export type TargetPdu =
  | NopIn
  | ScsiResponse
  | TaskMgmtResponse
  | LoginResponse
  | TextResponse
  | DataIn
  | LogoutResponse
  | R2T
  | AsyncMessage
  | Reject;
export type Pdu = InitiatorPdu | TargetPdu;

type Derived = 'flags' | 'totalAhsLength' | 'dataSegmentLength';
type Init<P> = P extends Pdu
  ? Omit<P, Derived | 'data' | 'immediate'> & { data?: Buffer; immediate?: boolean } & Partial<Pick<P, Derived>>
  : never;
/** What encodePdu accepts: a PDU without its derived fields; `data` defaults to empty. */
export type PduInit = Init<Pdu>;

// ---------------------------------------------------------------------------------------------
// Field access. Hand-rolled big-endian helpers: measurably faster than Buffer's checked
// readUInt32BE on the small-PDU hot path, and every offset here is fixed and in range.

function r32(b: Buffer, o: number): number {
  return ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;
}
function r16(b: Buffer, o: number): number {
  return (b[o]! << 8) | b[o + 1]!;
}
function w32(b: Buffer, o: number, v: number): void {
  b[o] = v >>> 24;
  b[o + 1] = v >>> 16;
  b[o + 2] = v >>> 8;
  b[o + 3] = v;
}
function w16(b: Buffer, o: number, v: number): void {
  b[o] = v >>> 8;
  b[o + 1] = v;
}

/**
 * SAM LUN structure, first level only: peripheral addressing (method 00b, LUN < 256) and flat
 * addressing (method 01b, LUN < 16384). These are the forms tgt, LIO and open-iscsi use.
 */
export function decodeLun(b: Buffer, o = 8): number {
  const b0 = b[o]!;
  const method = b0 >> 6;
  if (method === 0) return ((b0 & 0x3f) << 8) | b[o + 1]!; // bus number folds in harmlessly; it is 0 in practice
  if (method === 1) return ((b0 & 0x3f) << 8) | b[o + 1]!;
  return r16(b, o);
}

export function encodeLun(b: Buffer, o: number, lun: number): void {
  if (lun < 256) {
    b[o] = 0;
    b[o + 1] = lun;
  } else {
    b[o] = 0x40 | ((lun >> 8) & 0x3f);
    b[o + 1] = lun & 0xff;
  }
  // bytes 2..7 of the LUN field stay zero (single-level LUN)
}

export function readDataSegmentLength(bhs: Buffer, o = 0): number {
  return (bhs[o + 5]! << 16) | (bhs[o + 6]! << 8) | bhs[o + 7]!;
}

export function readTotalAhsLength(bhs: Buffer, o = 0): number {
  return bhs[o + 4]! * 4;
}

export function pad4(n: number): number {
  return (n + 3) & ~3;
}

/** Bytes the PDU whose BHS starts at `bhs[0]` occupies on the wire, digests included. */
export function pduWireLength(bhs: Buffer, headerDigest: boolean, dataDigest: boolean): number {
  const dsl = readDataSegmentLength(bhs);
  return (
    BHS_LENGTH +
    readTotalAhsLength(bhs) +
    (headerDigest ? DIGEST_LENGTH : 0) +
    pad4(dsl) +
    (dataDigest && dsl > 0 ? DIGEST_LENGTH : 0)
  );
}

// ---------------------------------------------------------------------------------------------
// Decoding

const EMPTY = Buffer.alloc(0);

interface ParsedAhs {
  extCdb?: Buffer;
  bidiReadDataLength?: number;
}

function parseAhs(header: Buffer, end: number): ParsedAhs {
  const out: ParsedAhs = {};
  let o = BHS_LENGTH;
  while (o < end) {
    if (end - o < 4) throw new WireError('malformed', 'truncated AHS', header.subarray(0, BHS_LENGTH));
    const len = r16(header, o);
    const type = header[o + 2]!;
    const total = pad4(3 + len);
    if (len === 0 || o + total > end) throw new WireError('malformed', `AHS length ${len} overruns TotalAHSLength`, header.subarray(0, BHS_LENGTH));
    if (type === AhsType.ExtendedCdb) {
      // AHS-specific = 1 reserved byte + CDB bytes beyond the first 16
      out.extCdb = header.subarray(o + 4, o + 3 + len);
    } else if (type === AhsType.BidiReadDataLength) {
      if (len !== 5) throw new WireError('malformed', `bidirectional read AHS length ${len}, expected 5`, header.subarray(0, BHS_LENGTH));
      out.bidiReadDataLength = r32(header, o + 4);
    } else {
      throw new WireError('malformed', `unknown AHS type ${type}`, header.subarray(0, BHS_LENGTH));
    }
    o += total;
  }
  return out;
}

/**
 * Decodes one PDU. `header` is the BHS followed by its AHS (no digest); `data` is the data segment
 * without padding or digest. The payload is referenced, not copied.
 */
export function decodePdu(header: Buffer, data: Buffer = EMPTY): Pdu {
  if (header.length < BHS_LENGTH) throw new WireError('malformed', `header is ${header.length} bytes, a BHS is ${BHS_LENGTH}`);
  const b0 = header[0]!;
  const flags = header[1]!;
  const opcode = b0 & 0x3f;
  const immediate = (b0 & 0x40) !== 0;
  const totalAhsLength = header[4]! * 4;
  const dataSegmentLength = readDataSegmentLength(header);
  const bhs = header.length === BHS_LENGTH ? header : header.subarray(0, BHS_LENGTH);
  if (b0 & 0x80) throw new WireError('malformed', 'reserved bit 7 of byte 0 is set', bhs);
  if (header.length !== BHS_LENGTH + totalAhsLength)
    throw new WireError('malformed', `TotalAHSLength says ${totalAhsLength} bytes, ${header.length - BHS_LENGTH} present`, bhs);
  if (data.length !== dataSegmentLength)
    throw new WireError('malformed', `DataSegmentLength says ${dataSegmentLength} bytes, ${data.length} present`, bhs);
  const itt = r32(header, 16);
  const h = header;
  const f = flags;

  switch (opcode) {
    case 0x00:
      return { opcode, immediate, flags, itt, totalAhsLength, dataSegmentLength, data, lun: decodeLun(h), ttt: r32(h, 20), cmdSN: r32(h, 24), expStatSN: r32(h, 28) };
    case 0x01: {
      let cdb = h.subarray(32, 48);
      let bidiReadDataLength: number | undefined;
      if (totalAhsLength > 0) {
        const ahs = parseAhs(h, BHS_LENGTH + totalAhsLength);
        if (ahs.extCdb) cdb = Buffer.concat([cdb, ahs.extCdb]);
        bidiReadDataLength = ahs.bidiReadDataLength;
      }
      const pdu: ScsiCommand = {
        opcode, immediate, flags, itt, totalAhsLength, dataSegmentLength, data,
        final: (f & 0x80) !== 0, read: (f & 0x40) !== 0, write: (f & 0x20) !== 0, attr: f & 0x07,
        lun: decodeLun(h), expectedDataTransferLength: r32(h, 20), cmdSN: r32(h, 24), expStatSN: r32(h, 28), cdb,
      };
      if (bidiReadDataLength !== undefined) pdu.bidiReadDataLength = bidiReadDataLength;
      return pdu;
    }
    case 0x02:
      return { opcode, immediate, flags, itt, totalAhsLength, dataSegmentLength, data, function: f & 0x7f, lun: decodeLun(h), referencedTaskTag: r32(h, 20), cmdSN: r32(h, 24), expStatSN: r32(h, 28), refCmdSN: r32(h, 32), expDataSN: r32(h, 36) };
    case 0x03:
      return {
        opcode, immediate, flags, itt, totalAhsLength, dataSegmentLength, data,
        transit: (f & 0x80) !== 0, continue: (f & 0x40) !== 0, csg: (f >> 2) & 3, nsg: f & 3,
        versionMax: h[2]!, versionMin: h[3]!, isid: h.subarray(8, 14), tsih: r16(h, 14), cid: r16(h, 20), cmdSN: r32(h, 24), expStatSN: r32(h, 28),
      };
    case 0x04:
      return { opcode, immediate, flags, itt, totalAhsLength, dataSegmentLength, data, final: (f & 0x80) !== 0, continue: (f & 0x40) !== 0, lun: decodeLun(h), ttt: r32(h, 20), cmdSN: r32(h, 24), expStatSN: r32(h, 28) };
    case 0x05:
      return { opcode, immediate, flags, itt, totalAhsLength, dataSegmentLength, data, final: (f & 0x80) !== 0, lun: decodeLun(h), ttt: r32(h, 20), expStatSN: r32(h, 28), dataSN: r32(h, 36), bufferOffset: r32(h, 40) };
    case 0x06:
      return { opcode, immediate, flags, itt, totalAhsLength, dataSegmentLength, data, reasonCode: f & 0x7f, cid: r16(h, 20), cmdSN: r32(h, 24), expStatSN: r32(h, 28) };
    case 0x10:
      return { opcode, immediate, flags, itt, totalAhsLength, dataSegmentLength, data, type: f & 0x0f, lun: decodeLun(h), ttt: r32(h, 20), expStatSN: r32(h, 28), begRun: r32(h, 40), runLength: r32(h, 44) };
    case 0x20:
      return { opcode, immediate, flags, itt, totalAhsLength, dataSegmentLength, data, lun: decodeLun(h), ttt: r32(h, 20), statSN: r32(h, 24), expCmdSN: r32(h, 28), maxCmdSN: r32(h, 32) };
    case 0x21:
      return {
        opcode, immediate, flags, itt, totalAhsLength, dataSegmentLength, data,
        bidiOverflow: (f & 0x10) !== 0, bidiUnderflow: (f & 0x08) !== 0, overflow: (f & 0x04) !== 0, underflow: (f & 0x02) !== 0,
        response: h[2]!, status: h[3]!, snackTag: r32(h, 20), statSN: r32(h, 24), expCmdSN: r32(h, 28), maxCmdSN: r32(h, 32),
        expDataSN: r32(h, 36), bidiReadResidualCount: r32(h, 40), residualCount: r32(h, 44),
      };
    case 0x22:
      return { opcode, immediate, flags, itt, totalAhsLength, dataSegmentLength, data, response: h[2]!, statSN: r32(h, 24), expCmdSN: r32(h, 28), maxCmdSN: r32(h, 32) };
    case 0x23:
      return {
        opcode, immediate, flags, itt, totalAhsLength, dataSegmentLength, data,
        transit: (f & 0x80) !== 0, continue: (f & 0x40) !== 0, csg: (f >> 2) & 3, nsg: f & 3,
        versionMax: h[2]!, versionActive: h[3]!, isid: h.subarray(8, 14), tsih: r16(h, 14),
        statSN: r32(h, 24), expCmdSN: r32(h, 28), maxCmdSN: r32(h, 32), statusClass: h[36]!, statusDetail: h[37]!,
      };
    case 0x24:
      return { opcode, immediate, flags, itt, totalAhsLength, dataSegmentLength, data, final: (f & 0x80) !== 0, continue: (f & 0x40) !== 0, lun: decodeLun(h), ttt: r32(h, 20), statSN: r32(h, 24), expCmdSN: r32(h, 28), maxCmdSN: r32(h, 32) };
    case 0x25:
      return {
        opcode, immediate, flags, itt, totalAhsLength, dataSegmentLength, data,
        final: (f & 0x80) !== 0, acknowledge: (f & 0x40) !== 0, overflow: (f & 0x04) !== 0, underflow: (f & 0x02) !== 0, statusPresent: (f & 0x01) !== 0,
        status: h[3]!, lun: decodeLun(h), ttt: r32(h, 20), statSN: r32(h, 24), expCmdSN: r32(h, 28), maxCmdSN: r32(h, 32),
        dataSN: r32(h, 36), bufferOffset: r32(h, 40), residualCount: r32(h, 44),
      };
    case 0x26:
      return { opcode, immediate, flags, itt, totalAhsLength, dataSegmentLength, data, response: h[2]!, statSN: r32(h, 24), expCmdSN: r32(h, 28), maxCmdSN: r32(h, 32), time2Wait: r16(h, 40), time2Retain: r16(h, 42) };
    case 0x31:
      return { opcode, immediate, flags, itt, totalAhsLength, dataSegmentLength, data, lun: decodeLun(h), ttt: r32(h, 20), statSN: r32(h, 24), expCmdSN: r32(h, 28), maxCmdSN: r32(h, 32), r2tSN: r32(h, 36), bufferOffset: r32(h, 40), desiredDataTransferLength: r32(h, 44) };
    case 0x32:
      return {
        opcode, immediate, flags, itt, totalAhsLength, dataSegmentLength, data,
        lun: decodeLun(h), statSN: r32(h, 24), expCmdSN: r32(h, 28), maxCmdSN: r32(h, 32),
        asyncEvent: h[36]!, asyncVCode: h[37]!, parameter1: r16(h, 38), parameter2: r16(h, 40), parameter3: r16(h, 42),
      };
    case 0x3f:
      return { opcode, immediate, flags, itt, totalAhsLength, dataSegmentLength, data, reason: h[2]!, statSN: r32(h, 24), expCmdSN: r32(h, 28), maxCmdSN: r32(h, 32), dataSN: r32(h, 36) };
    default:
      throw new WireError('unknown-opcode', `unknown opcode 0x${opcode.toString(16).padStart(2, '0')}`, bhs);
  }
}

// ---------------------------------------------------------------------------------------------
// Encoding

export interface DigestSettings {
  headerDigest: boolean;
  dataDigest: boolean;
}
export const NO_DIGESTS: DigestSettings = Object.freeze({ headerDigest: false, dataDigest: false });

const PADS = [EMPTY, Buffer.alloc(1), Buffer.alloc(2), Buffer.alloc(3)] as const;

function b(v: boolean, bit: number): number {
  return v ? bit : 0;
}

/** Writes the opcode-specific part of the BHS; returns byte 1. */
function fill(p: PduInit, h: Buffer): void {
  switch (p.opcode) {
    case 0x00:
      h[1] = 0x80;
      encodeLun(h, 8, p.lun);
      w32(h, 20, p.ttt); w32(h, 24, p.cmdSN); w32(h, 28, p.expStatSN);
      return;
    case 0x01:
      h[1] = b(p.final, 0x80) | b(p.read, 0x40) | b(p.write, 0x20) | (p.attr & 7);
      encodeLun(h, 8, p.lun);
      w32(h, 20, p.expectedDataTransferLength); w32(h, 24, p.cmdSN); w32(h, 28, p.expStatSN);
      p.cdb.copy(h, 32, 0, Math.min(16, p.cdb.length));
      return;
    case 0x02:
      h[1] = 0x80 | (p.function & 0x7f);
      encodeLun(h, 8, p.lun);
      w32(h, 20, p.referencedTaskTag); w32(h, 24, p.cmdSN); w32(h, 28, p.expStatSN); w32(h, 32, p.refCmdSN); w32(h, 36, p.expDataSN);
      return;
    case 0x03:
      h[1] = b(p.transit, 0x80) | b(p.continue, 0x40) | ((p.csg & 3) << 2) | (p.nsg & 3);
      h[2] = p.versionMax; h[3] = p.versionMin;
      p.isid.copy(h, 8, 0, 6); w16(h, 14, p.tsih); w16(h, 20, p.cid); w32(h, 24, p.cmdSN); w32(h, 28, p.expStatSN);
      return;
    case 0x04:
      h[1] = b(p.final, 0x80) | b(p.continue, 0x40);
      encodeLun(h, 8, p.lun);
      w32(h, 20, p.ttt); w32(h, 24, p.cmdSN); w32(h, 28, p.expStatSN);
      return;
    case 0x05:
      h[1] = b(p.final, 0x80);
      encodeLun(h, 8, p.lun);
      w32(h, 20, p.ttt); w32(h, 28, p.expStatSN); w32(h, 36, p.dataSN); w32(h, 40, p.bufferOffset);
      return;
    case 0x06:
      h[1] = 0x80 | (p.reasonCode & 0x7f);
      w16(h, 20, p.cid); w32(h, 24, p.cmdSN); w32(h, 28, p.expStatSN);
      return;
    case 0x10:
      h[1] = 0x80 | (p.type & 0x0f);
      encodeLun(h, 8, p.lun);
      w32(h, 20, p.ttt); w32(h, 28, p.expStatSN); w32(h, 40, p.begRun); w32(h, 44, p.runLength);
      return;
    case 0x20:
      h[1] = 0x80;
      encodeLun(h, 8, p.lun);
      w32(h, 20, p.ttt); w32(h, 24, p.statSN); w32(h, 28, p.expCmdSN); w32(h, 32, p.maxCmdSN);
      return;
    case 0x21:
      h[1] = 0x80 | b(p.bidiOverflow, 0x10) | b(p.bidiUnderflow, 0x08) | b(p.overflow, 0x04) | b(p.underflow, 0x02);
      h[2] = p.response; h[3] = p.status;
      w32(h, 20, p.snackTag); w32(h, 24, p.statSN); w32(h, 28, p.expCmdSN); w32(h, 32, p.maxCmdSN);
      w32(h, 36, p.expDataSN); w32(h, 40, p.bidiReadResidualCount); w32(h, 44, p.residualCount);
      return;
    case 0x22:
      h[1] = 0x80; h[2] = p.response;
      w32(h, 24, p.statSN); w32(h, 28, p.expCmdSN); w32(h, 32, p.maxCmdSN);
      return;
    case 0x23:
      h[1] = b(p.transit, 0x80) | b(p.continue, 0x40) | ((p.csg & 3) << 2) | (p.nsg & 3);
      h[2] = p.versionMax; h[3] = p.versionActive;
      p.isid.copy(h, 8, 0, 6); w16(h, 14, p.tsih);
      w32(h, 24, p.statSN); w32(h, 28, p.expCmdSN); w32(h, 32, p.maxCmdSN); h[36] = p.statusClass; h[37] = p.statusDetail;
      return;
    case 0x24:
      h[1] = b(p.final, 0x80) | b(p.continue, 0x40);
      encodeLun(h, 8, p.lun);
      w32(h, 20, p.ttt); w32(h, 24, p.statSN); w32(h, 28, p.expCmdSN); w32(h, 32, p.maxCmdSN);
      return;
    case 0x25:
      h[1] = b(p.final, 0x80) | b(p.acknowledge, 0x40) | b(p.overflow, 0x04) | b(p.underflow, 0x02) | b(p.statusPresent, 0x01);
      h[3] = p.statusPresent ? p.status : 0;
      encodeLun(h, 8, p.lun);
      w32(h, 20, p.ttt); w32(h, 24, p.statSN); w32(h, 28, p.expCmdSN); w32(h, 32, p.maxCmdSN);
      w32(h, 36, p.dataSN); w32(h, 40, p.bufferOffset); w32(h, 44, p.residualCount);
      return;
    case 0x26:
      h[1] = 0x80; h[2] = p.response;
      w32(h, 24, p.statSN); w32(h, 28, p.expCmdSN); w32(h, 32, p.maxCmdSN); w16(h, 40, p.time2Wait); w16(h, 42, p.time2Retain);
      return;
    case 0x31:
      h[1] = 0x80;
      encodeLun(h, 8, p.lun);
      w32(h, 20, p.ttt); w32(h, 24, p.statSN); w32(h, 28, p.expCmdSN); w32(h, 32, p.maxCmdSN);
      w32(h, 36, p.r2tSN); w32(h, 40, p.bufferOffset); w32(h, 44, p.desiredDataTransferLength);
      return;
    case 0x32:
      h[1] = 0x80;
      encodeLun(h, 8, p.lun);
      w32(h, 24, p.statSN); w32(h, 28, p.expCmdSN); w32(h, 32, p.maxCmdSN);
      h[36] = p.asyncEvent; h[37] = p.asyncVCode; w16(h, 38, p.parameter1); w16(h, 40, p.parameter2); w16(h, 42, p.parameter3);
      return;
    case 0x3f:
      h[1] = 0x80; h[2] = p.reason;
      w32(h, 24, p.statSN); w32(h, 28, p.expCmdSN); w32(h, 32, p.maxCmdSN); w32(h, 36, p.dataSN);
      return;
  }
}

function buildAhs(p: PduInit): Buffer | undefined {
  if (p.opcode !== Opcode.ScsiCommand) return undefined;
  const ext = p.cdb.length > 16 ? p.cdb.subarray(16) : undefined;
  if (!ext && p.bidiReadDataLength === undefined) return undefined;
  const parts: Buffer[] = [];
  if (ext) {
    const len = ext.length + 1;
    const a = Buffer.alloc(pad4(3 + len));
    w16(a, 0, len);
    a[2] = AhsType.ExtendedCdb;
    ext.copy(a, 4);
    parts.push(a);
  }
  if (p.bidiReadDataLength !== undefined) {
    const a = Buffer.alloc(8);
    w16(a, 0, 5);
    a[2] = AhsType.BidiReadDataLength;
    w32(a, 4, p.bidiReadDataLength);
    parts.push(a);
  }
  return Buffer.concat(parts);
}

/**
 * Encodes a PDU as the buffers to write, in order: header (BHS, AHS, header digest), then the
 * data segment itself (not copied), then padding and data digest when there are any. Handing the
 * pieces to a socket with cork/uncork or writev avoids copying large payloads.
 */
export function encodePdu(p: PduInit, digests: DigestSettings = NO_DIGESTS): Buffer[] {
  const data = p.data ?? EMPTY;
  if (data.length > MAX_DATA_SEGMENT_LENGTH) throw new WireError('data-segment-too-large', `data segment of ${data.length} bytes exceeds 2^24-1`);
  const ahs = buildAhs(p);
  const ahsLen = ahs ? ahs.length : 0;
  if (ahsLen > MAX_AHS_LENGTH) throw new WireError('ahs-too-large', `AHS of ${ahsLen} bytes exceeds ${MAX_AHS_LENGTH}`);
  const hdLen = digests.headerDigest ? DIGEST_LENGTH : 0;
  const headLen = BHS_LENGTH + ahsLen + hdLen;
  const h = Buffer.allocUnsafe(headLen);
  h.fill(0, 0, BHS_LENGTH);
  let immediate = p.immediate ?? false;
  if (p.opcode === Opcode.LoginRequest) immediate = true; // RFC 7143 11.12: the I bit is always 1
  h[0] = p.opcode | (immediate && p.opcode < 0x20 ? 0x40 : 0);
  h[4] = ahsLen / 4;
  h[5] = data.length >>> 16;
  h[6] = data.length >>> 8;
  h[7] = data.length;
  w32(h, 16, p.itt);
  fill(p, h);
  if (ahs) ahs.copy(h, BHS_LENGTH);
  if (hdLen) h.writeUInt32LE(crc32cOf([h.subarray(0, BHS_LENGTH + ahsLen)]), BHS_LENGTH + ahsLen);
  if (data.length === 0) return [h];
  const padLen = pad4(data.length) - data.length;
  if (!digests.dataDigest) return padLen ? [h, data, PADS[padLen as 1 | 2 | 3]] : [h, data];
  const tail = Buffer.alloc(padLen + DIGEST_LENGTH);
  tail.writeUInt32LE(crc32cOf([data, tail.subarray(0, padLen)]), padLen);
  return [h, data, tail];
}

/** encodePdu as one contiguous buffer: convenient for tests and small PDUs. */
export function encodePduBuffer(p: PduInit, digests: DigestSettings = NO_DIGESTS): Buffer {
  const parts = encodePdu(p, digests);
  return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
}
