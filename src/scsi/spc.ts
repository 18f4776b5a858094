// SPC-4 primary commands of the embedded target: INQUIRY and its VPD pages, MODE SENSE/SELECT,
// REQUEST SENSE, REPORT LUNS, TEST UNIT READY, PREVENT ALLOW MEDIUM REMOVAL, REPORT SUPPORTED
// OPERATION CODES, RESERVE/RELEASE (SPC-2) and PERSISTENT RESERVE IN/OUT.

import { Asc, SenseKey, buildSense } from '../../protocol/src/scsi/sense.ts';
import { ScsiStatus } from '../../protocol/src/scsi/status.ts';
import type { CommandContext, CommandSpec } from './embedded-target.ts';
import {
  CheckCondition,
  ReservationConflict,
  buildConditionSense,
  invalidFieldInCdb,
  invalidFieldInParameterList,
  parameterListLengthError,
  type LogicalUnit,
} from './logical-unit.ts';
import type { ItNexus, ScsiOutcome } from './task.ts';

const EMPTY = Buffer.alloc(0);

export function good(dataIn?: Buffer): ScsiOutcome {
  return dataIn ? { status: ScsiStatus.GOOD, dataIn } : { status: ScsiStatus.GOOD };
}

/** SPC allocation length rule: return at most that many bytes, never an error for less. */
export function truncate(data: Buffer, allocationLength: number): Buffer {
  return data.length > allocationLength ? data.subarray(0, allocationLength) : data;
}

// ---------------------------------------------------------------------------------------------
// INQUIRY

const PERIPHERAL_DISK = 0x00;
/** Peripheral qualifier 011b, device type 1Fh: no logical unit at this LUN. */
const PERIPHERAL_NO_LUN = 0x7f;

const VERSION_DESCRIPTORS = [
  0x00a0, // SAM-5
  0x0960, // iSCSI
  0x0460, // SPC-4
  0x04c0, // SBC-3
];

export interface InquiryIdentity {
  vendor: string;
  product: string;
  revision: string;
}

export function standardInquiry(id: InquiryIdentity, peripheral: number): Buffer {
  const d = Buffer.alloc(96);
  d[0] = peripheral;
  d[2] = 0x06; // VERSION: SPC-4
  d[3] = 0x10 | 0x02; // HISUP, RESPONSE DATA FORMAT 2
  d[4] = d.length - 5;
  d[7] = 0x02; // CMDQUE: full task management model
  d.write(id.vendor.padEnd(8, ' '), 8, 8, 'ascii');
  d.write(id.product.padEnd(16, ' '), 16, 16, 'ascii');
  d.write(id.revision.padEnd(4, ' '), 32, 4, 'ascii');
  VERSION_DESCRIPTORS.forEach((v, i) => d.writeUInt16BE(v, 58 + 2 * i));
  return d;
}

const SUPPORTED_VPD_PAGES = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

function vpdPage(page: number, body: Buffer, peripheral = PERIPHERAL_DISK): Buffer {
  const d = Buffer.alloc(4 + body.length);
  d[0] = peripheral;
  d[1] = page;
  d.writeUInt16BE(body.length, 2);
  body.copy(d, 4);
  return d;
}

/** Designation descriptor header (SPC-4 7.8.6.1) followed by the designator. */
function designator(
  codeSet: number,
  association: number,
  type: number,
  value: Buffer,
  protocol?: number,
): Buffer {
  const d = Buffer.alloc(4 + value.length);
  d[0] = ((protocol ?? 0) << 4) | codeSet;
  d[1] = (protocol !== undefined ? 0x80 : 0) | (association << 4) | type;
  d[3] = value.length;
  value.copy(d, 4);
  return d;
}

const CODE_SET_BINARY = 1;
const CODE_SET_ASCII = 2;
const CODE_SET_UTF8 = 3;
const ASSOC_LU = 0;
const ASSOC_TARGET_PORT = 1;
const ASSOC_TARGET_DEVICE = 2;
const DESIGNATOR_T10 = 1;
const DESIGNATOR_NAA = 3;
const DESIGNATOR_RELATIVE_PORT = 4;
const DESIGNATOR_SCSI_NAME = 8;
const PROTOCOL_ISCSI = 5;

/** SCSI name strings are NUL terminated and padded to a multiple of four bytes. */
function scsiNameString(s: string): Buffer {
  const raw = Buffer.from(s, 'utf8');
  const out = Buffer.alloc(Math.ceil((raw.length + 1) / 4) * 4);
  raw.copy(out);
  return out;
}

/**
 * RELATIVE TARGET PORT IDENTIFIER of the target port a nexus uses: its portal group tag. Zero is
 * reserved for relative ports, so a portal group 0 (unusual, but legal in iSCSI) becomes FFFFh.
 */
export function relativeTargetPort(n: ItNexus): number {
  const tpgt = n.portalGroupTag & 0xffff;
  return tpgt === 0 ? 0xffff : tpgt;
}

function deviceIdentification(lu: LogicalUnit, targetName: string, nexus: ItNexus): Buffer {
  const tpgt = nexus.portalGroupTag.toString(16).padStart(4, '0');
  const rtp = Buffer.alloc(4);
  rtp.writeUInt16BE(relativeTargetPort(nexus), 2);
  return Buffer.concat([
    designator(CODE_SET_BINARY, ASSOC_LU, DESIGNATOR_NAA, lu.naa),
    designator(CODE_SET_ASCII, ASSOC_LU, DESIGNATOR_T10, Buffer.from(lu.vendor + lu.serial, 'ascii')),
    designator(CODE_SET_BINARY, ASSOC_TARGET_PORT, DESIGNATOR_RELATIVE_PORT, rtp, PROTOCOL_ISCSI),
    designator(
      CODE_SET_UTF8,
      ASSOC_TARGET_PORT,
      DESIGNATOR_SCSI_NAME,
      scsiNameString(`${targetName},t,0x${tpgt}`),
      PROTOCOL_ISCSI,
    ),
    designator(CODE_SET_UTF8, ASSOC_TARGET_DEVICE, DESIGNATOR_SCSI_NAME, scsiNameString(targetName), PROTOCOL_ISCSI),
  ]);
}

function blockLimits(lu: LogicalUnit): Buffer {
  const l = lu.limits;
  const b = Buffer.alloc(0x3c);
  // Offsets below are page offsets minus the 4-byte header.
  b[0] = 0x00; // WSNZ 0: WRITE SAME with NUMBER OF LOGICAL BLOCKS 0 means "to the last LBA"
  b[1] = l.maxCompareAndWriteBlocks;
  b.writeUInt16BE(l.optimalTransferGranularity, 2);
  b.writeUInt32BE(l.maxTransferBlocks, 4);
  b.writeUInt32BE(l.optimalTransferBlocks, 8);
  b.writeUInt32BE(0, 12); // MAXIMUM PREFETCH LENGTH: no limit beyond the range check
  b.writeUInt32BE(l.maxUnmapBlocks, 16);
  b.writeUInt32BE(l.maxUnmapDescriptors, 20);
  b.writeUInt32BE(1, 24); // OPTIMAL UNMAP GRANULARITY
  b.writeUInt32BE(0x8000_0000, 28); // UGAVALID, alignment 0
  b.writeBigUInt64BE(BigInt(l.maxWriteSameBlocks), 32);
  // The atomic write fields stay zero: WRITE ATOMIC is not supported.
  return b;
}

function blockDeviceCharacteristics(): Buffer {
  const b = Buffer.alloc(0x3c);
  b.writeUInt16BE(0x0001, 0); // MEDIUM ROTATION RATE: non-rotating medium
  return b;
}

function logicalBlockProvisioning(): Buffer {
  const b = Buffer.alloc(4);
  // LBPU, LBPWS, LBPWS10; LBPRZ 001b: unmapped blocks read as zeros (they are written as zeros).
  b[1] = 0x80 | 0x40 | 0x20 | 0x04;
  b[2] = 0x02; // PROVISIONING TYPE: thin provisioned
  return b;
}

export function inquiry(ctx: CommandContext): ScsiOutcome {
  const { cdb, lu } = ctx;
  const evpd = (cdb[1]! & 0x01) !== 0;
  const page = cdb[2]!;
  const alloc = cdb.readUInt16BE(3);
  if (!evpd) {
    if (page !== 0) throw invalidFieldInCdb(2);
    return good(truncate(standardInquiry(lu, PERIPHERAL_DISK), alloc));
  }
  let body: Buffer;
  switch (page) {
    case 0x00:
      body = Buffer.from(SUPPORTED_VPD_PAGES);
      break;
    case 0x80:
      body = Buffer.from(lu.serial, 'ascii');
      break;
    case 0x83:
      body = deviceIdentification(lu, ctx.target.targetName, ctx.task.nexus);
      break;
    case 0xb0:
      body = blockLimits(lu);
      break;
    case 0xb1:
      body = blockDeviceCharacteristics();
      break;
    case 0xb2:
      body = logicalBlockProvisioning();
      break;
    default:
      throw invalidFieldInCdb(2);
  }
  return good(truncate(vpdPage(page, body), alloc));
}

/** INQUIRY addressed to a LUN with no logical unit behind it (SPC-4 6.6.2). */
export function inquiryNoLun(cdb: Buffer, id: InquiryIdentity): ScsiOutcome {
  const evpd = (cdb[1]! & 0x01) !== 0;
  const page = cdb[2]!;
  const alloc = cdb.readUInt16BE(3);
  if (!evpd) {
    if (page !== 0) return checkConditionFixed(invalidFieldInCdb(2));
    return good(truncate(standardInquiry(id, PERIPHERAL_NO_LUN), alloc));
  }
  if (page !== 0) return checkConditionFixed(invalidFieldInCdb(2));
  return good(truncate(vpdPage(0, Buffer.from([0x00]), PERIPHERAL_NO_LUN), alloc));
}

/** A check condition outside any logical unit, hence in the default (fixed) sense format. */
export function checkConditionFixed(c: CheckCondition): ScsiOutcome {
  return { status: ScsiStatus.CHECK_CONDITION, sense: buildConditionSense(c, 'fixed') };
}

// ---------------------------------------------------------------------------------------------
// REPORT LUNS, TEST UNIT READY, REQUEST SENSE, PREVENT ALLOW MEDIUM REMOVAL

function encodeLun(lun: number): Buffer {
  const b = Buffer.alloc(8);
  if (lun < 256) {
    b[1] = lun;
  } else {
    b[0] = 0x40 | ((lun >> 8) & 0x3f); // flat space addressing
    b[1] = lun & 0xff;
  }
  return b;
}

export function reportLuns(cdb: Buffer, luns: readonly number[]): ScsiOutcome {
  const select = cdb[2]!;
  if (select > 2) throw invalidFieldInCdb(2);
  const alloc = cdb.readUInt32BE(6);
  if (alloc < 16) throw invalidFieldInCdb(6);
  // SELECT REPORT 1 asks for well known logical units only, and we have none.
  const list = select === 1 ? [] : luns;
  const header = Buffer.alloc(8);
  header.writeUInt32BE(8 * list.length, 0);
  return good(truncate(Buffer.concat([header, ...list.map(encodeLun)]), alloc));
}

export function testUnitReady(ctx: CommandContext): ScsiOutcome {
  if (!ctx.lu.isOpen) {
    throw new CheckCondition(
      SenseKey.NOT_READY,
      Asc.LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE.asc,
      Asc.LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE.ascq,
    );
  }
  return good();
}

/**
 * REQUEST SENSE returns (and clears) the oldest pending unit attention of the nexus, otherwise
 * NO SENSE. Errors of earlier commands are not kept: every CHECK CONDITION carries its own sense
 * data (autosense), as iSCSI always does.
 */
export function requestSense(ctx: CommandContext): ScsiOutcome {
  const { cdb, lu } = ctx;
  const format = cdb[1]! & 0x01 ? 'descriptor' : 'fixed';
  const ua = lu.takeUa(ctx.nexus);
  const sense = ua
    ? buildSense({ key: SenseKey.UNIT_ATTENTION, asc: ua.asc, ascq: ua.ascq, format })
    : buildSense({ key: SenseKey.NO_SENSE, asc: 0, ascq: 0, format });
  return good(truncate(sense, cdb[4]!));
}

export function requestSenseNoLun(cdb: Buffer): ScsiOutcome {
  const format = cdb[1]! & 0x01 ? 'descriptor' : 'fixed';
  const sense = buildSense({ key: SenseKey.ILLEGAL_REQUEST, ...Asc.LOGICAL_UNIT_NOT_SUPPORTED, format });
  return good(truncate(sense, cdb[4]!));
}

export function preventAllowMediumRemoval(ctx: CommandContext): ScsiOutcome {
  // The medium is not removable, so there is nothing to lock; only the field is checked.
  if ((ctx.cdb[4]! & 0x03) > 1) throw invalidFieldInCdb(4, 1);
  return good();
}

// ---------------------------------------------------------------------------------------------
// MODE SENSE / MODE SELECT

const PC_CURRENT = 0;
const PC_CHANGEABLE = 1;
const PC_DEFAULT = 2;
const PC_SAVED = 3;

const PAGE_CACHING = 0x08;
const PAGE_CONTROL = 0x0a;
const PAGE_INFORMATIONAL_EXCEPTIONS = 0x1c;
const PAGE_ALL = 0x3f;

/** Mode pages in ascending page code order, as "all pages" must return them. */
const MODE_PAGES = [PAGE_CACHING, PAGE_CONTROL, PAGE_INFORMATIONAL_EXCEPTIONS];

function modePage(lu: LogicalUnit, page: number, pc: number): Buffer {
  switch (page) {
    case PAGE_CACHING: {
      const p = Buffer.alloc(20);
      p[0] = PAGE_CACHING;
      p[1] = 0x12;
      if (pc === PC_CHANGEABLE) p[2] = 0x04; // WCE
      else if (pc === PC_DEFAULT ? true : lu.wce) p[2] = 0x04;
      return p;
    }
    case PAGE_CONTROL: {
      const p = Buffer.alloc(12);
      p[0] = PAGE_CONTROL;
      p[1] = 0x0a;
      if (pc === PC_CHANGEABLE) {
        p[2] = 0x04; // D_SENSE
        return p;
      }
      const dSense = pc === PC_CURRENT ? lu.dSense : false;
      p[2] = (dSense ? 0x04 : 0) | 0x02; // GLTSD: no log parameters are saved
      p[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1: commands may be reordered (only overlapping writes are ordered)
      p.writeUInt16BE(0xffff, 8); // BUSY TIMEOUT PERIOD: unlimited, BUSY is never returned
      return p;
    }
    case PAGE_INFORMATIONAL_EXCEPTIONS: {
      const p = Buffer.alloc(12);
      p[0] = PAGE_INFORMATIONAL_EXCEPTIONS;
      p[1] = 0x0a;
      if (pc !== PC_CHANGEABLE) p[2] = 0x08; // DEXCPT: no informational exception reporting
      return p;
    }
    default:
      throw new Error(`no mode page ${page}`);
  }
}

export function modeSense(ctx: CommandContext): ScsiOutcome {
  const { cdb, lu } = ctx;
  const ten = cdb[0] === 0x5a;
  const dbd = (cdb[1]! & 0x08) !== 0;
  const llbaa = ten && (cdb[1]! & 0x10) !== 0;
  const pc = cdb[2]! >> 6;
  const page = cdb[2]! & 0x3f;
  const subpage = cdb[3]!;
  const alloc = ten ? cdb.readUInt16BE(7) : cdb[4]!;
  if (pc === PC_SAVED) {
    throw new CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.SAVING_PARAMETERS_NOT_SUPPORTED.asc, Asc.SAVING_PARAMETERS_NOT_SUPPORTED.ascq, {
      field: { inCdb: true, byte: 2, bit: 7 },
    });
  }
  let pages: number[];
  if (page === PAGE_ALL) {
    // Subpage 00h: pages without subpages; FFh: every subpage of every page. We only have 00h.
    if (subpage !== 0x00 && subpage !== 0xff) throw invalidFieldInCdb(3);
    pages = MODE_PAGES;
  } else {
    if (!MODE_PAGES.includes(page)) throw invalidFieldInCdb(2, 5);
    if (subpage !== 0x00 && subpage !== 0xff) throw invalidFieldInCdb(3);
    pages = [page];
  }
  const body = Buffer.concat(pages.map((p) => modePage(lu, p, pc)));

  let descriptor = EMPTY;
  if (!dbd) {
    const bs = lu.blockSize;
    if (llbaa) {
      descriptor = Buffer.alloc(16);
      descriptor.writeBigUInt64BE(BigInt(lu.capacity), 0);
      descriptor.writeUInt32BE(bs, 12);
    } else {
      descriptor = Buffer.alloc(8);
      descriptor.writeUInt32BE(Math.min(lu.capacity, 0xffff_ffff), 0);
      descriptor.writeUIntBE(bs, 5, 3);
    }
  }
  // DEVICE-SPECIFIC PARAMETER: WP, and DPOFUA since DPO and FUA are honoured.
  const deviceSpecific = (lu.readOnly ? 0x80 : 0) | 0x10;
  let header: Buffer;
  if (ten) {
    header = Buffer.alloc(8);
    header.writeUInt16BE(6 + descriptor.length + body.length, 0);
    header[3] = deviceSpecific;
    if (llbaa && descriptor.length) header[4] = 0x01; // LONGLBA
    header.writeUInt16BE(descriptor.length, 6);
  } else {
    header = Buffer.alloc(4);
    header[0] = 3 + descriptor.length + body.length;
    header[2] = deviceSpecific;
    header[3] = descriptor.length;
  }
  return good(truncate(Buffer.concat([header, descriptor, body]), alloc));
}

export function modeSelect(ctx: CommandContext): ScsiOutcome {
  const { cdb, lu } = ctx;
  const ten = cdb[0] === 0x55;
  if ((cdb[1]! & 0x10) === 0) throw invalidFieldInCdb(1, 4); // PF 0: vendor specific pages
  if (cdb[1]! & 0x01) throw invalidFieldInCdb(1, 0); // SP: nothing can be saved
  const length = ten ? cdb.readUInt16BE(7) : cdb[4]!;
  const outcome: ScsiOutcome = { status: ScsiStatus.GOOD, dataOutLength: length };
  if (length === 0) return outcome;
  const headerLength = ten ? 8 : 4;
  if (length < headerLength || ctx.task.dataOut.length < length) throw parameterListLengthError();
  const data = ctx.task.dataOut.subarray(0, length);

  const mediumType = ten ? data[2]! : data[1]!;
  if (mediumType !== 0) throw invalidFieldInParameterList(ten ? 2 : 1);
  const longLba = ten && (data[4]! & 0x01) !== 0;
  const bdLength = ten ? data.readUInt16BE(6) : data[3]!;
  if (bdLength !== 0 && bdLength !== (longLba ? 16 : 8)) throw invalidFieldInParameterList(ten ? 6 : 3);
  let off = headerLength;
  if (bdLength) {
    if (off + bdLength > data.length) throw parameterListLengthError();
    const bd = data.subarray(off, off + bdLength);
    if (longLba) {
      const blocks = bd.readBigUInt64BE(0);
      if (blocks !== 0n && blocks !== BigInt(lu.capacity)) throw invalidFieldInParameterList(off);
      if (bd.readUInt32BE(8) !== 0) throw invalidFieldInParameterList(off + 8);
      if (bd.readUInt32BE(12) !== lu.blockSize) throw invalidFieldInParameterList(off + 12);
    } else {
      const blocks = bd.readUInt32BE(0);
      if (blocks !== 0 && blocks !== Math.min(lu.capacity, 0xffff_ffff)) throw invalidFieldInParameterList(off);
      if (bd[4] !== 0) throw invalidFieldInParameterList(off + 4);
      if (bd.readUIntBE(5, 3) !== lu.blockSize) throw invalidFieldInParameterList(off + 5);
    }
    off += bdLength;
  }

  // Validate every page before changing anything, so a bad list changes nothing.
  let wce = lu.wce;
  let dSense = lu.dSense;
  while (off < data.length) {
    if (data.length - off < 2) throw parameterListLengthError();
    const b0 = data[off]!;
    if (b0 & 0x80) throw invalidFieldInParameterList(off, 7); // PS is reserved in MODE SELECT
    if (b0 & 0x40) throw invalidFieldInParameterList(off, 6); // no subpages here
    const page = b0 & 0x3f;
    if (!MODE_PAGES.includes(page)) throw invalidFieldInParameterList(off, 5);
    const current = modePage(lu, page, PC_CURRENT);
    const changeable = modePage(lu, page, PC_CHANGEABLE);
    if (data[off + 1] !== current[1]) throw invalidFieldInParameterList(off + 1);
    const end = off + 2 + current[1]!;
    if (end > data.length) throw parameterListLengthError();
    for (let i = 2; i < current.length; i++) {
      const bad = (data[off + i]! ^ current[i]!) & ~changeable[i]!;
      if (bad) throw invalidFieldInParameterList(off + i, 31 - Math.clz32(bad));
    }
    if (page === PAGE_CACHING) wce = (data[off + 2]! & 0x04) !== 0;
    if (page === PAGE_CONTROL) dSense = (data[off + 2]! & 0x04) !== 0;
    off = end;
  }
  if (wce !== lu.wce || dSense !== lu.dSense) {
    lu.wce = wce;
    lu.dSense = dSense;
    lu.addUaAll(Asc.MODE_PARAMETERS_CHANGED, ctx.nexus);
  }
  return outcome;
}

// ---------------------------------------------------------------------------------------------
// RESERVE / RELEASE (SPC-2), with the SPC-3 rules for coexistence with persistent reservations

export function reserve(ctx: CommandContext): ScsiOutcome {
  const { lu } = ctx;
  // While any persistent reservation registration exists, RESERVE and RELEASE always conflict.
  if (lu.pr.registrationCount > 0) throw new ReservationConflict();
  if (lu.spc2Holder !== undefined && lu.spc2Holder !== ctx.nexus) throw new ReservationConflict();
  lu.spc2Holder = ctx.nexus;
  return good();
}

export function release(ctx: CommandContext): ScsiOutcome {
  const { lu } = ctx;
  if (lu.pr.registrationCount > 0) throw new ReservationConflict();
  // A RELEASE from a nexus that holds nothing is a no-op, not an error.
  if (lu.spc2Holder === ctx.nexus) lu.spc2Holder = undefined;
  return good();
}

// ---------------------------------------------------------------------------------------------
// PERSISTENT RESERVE IN / OUT

export function persistentReserveIn(ctx: CommandContext): ScsiOutcome {
  const { cdb, lu } = ctx;
  // An SPC-2 reservation makes every persistent reservation command conflict (SPC-3 5.6.1).
  if (lu.spc2Holder !== undefined) throw new ReservationConflict();
  const alloc = cdb.readUInt16BE(7);
  let data: Buffer;
  switch (cdb[1]! & 0x1f) {
    case 0x00:
      data = lu.pr.readKeys();
      break;
    case 0x01:
      data = lu.pr.readReservation();
      break;
    case 0x02:
      data = lu.pr.reportCapabilities();
      break;
    case 0x03:
      data = lu.pr.readFullStatus();
      break;
    default:
      throw invalidFieldInCdb(1, 4);
  }
  return good(truncate(data, alloc));
}

export function persistentReserveOut(ctx: CommandContext): ScsiOutcome {
  const { cdb, lu } = ctx;
  if (lu.spc2Holder !== undefined) throw new ReservationConflict();
  const length = cdb.readUInt32BE(5);
  const data = ctx.task.dataOut.subarray(0, Math.min(length, ctx.task.dataOut.length));
  const r = lu.pr.out(
    { key: ctx.nexus, initiatorPort: ctx.task.nexus.initiatorPort, relativeTargetPort: relativeTargetPort(ctx.task.nexus) },
    cdb[1]! & 0x1f,
    cdb[2]!,
    length,
    data,
  );
  switch (r.status) {
    case 'good':
      return { status: ScsiStatus.GOOD, dataOutLength: length };
    case 'conflict':
      throw new ReservationConflict();
    case 'check':
      switch (r.error) {
        case 'parameter-list-length':
          throw parameterListLengthError();
        case 'invalid-release':
          throw new CheckCondition(
            SenseKey.ILLEGAL_REQUEST,
            Asc.INVALID_RELEASE_OF_PERSISTENT_RESERVATION.asc,
            Asc.INVALID_RELEASE_OF_PERSISTENT_RESERVATION.ascq,
          );
        case 'invalid-field-cdb':
          throw invalidFieldInCdb(r.byte, r.bit);
        case 'invalid-field-parameter-list':
          throw invalidFieldInParameterList(r.byte, r.bit);
      }
  }
}

// ---------------------------------------------------------------------------------------------
// REPORT SUPPORTED OPERATION CODES (MAINTENANCE IN, service action 0Ch)

function timeoutDescriptor(spec: CommandSpec): Buffer {
  const d = Buffer.alloc(12);
  d.writeUInt16BE(0x0a, 0);
  d.writeUInt32BE(spec.timeouts?.nominal ?? 0, 4);
  d.writeUInt32BE(spec.timeouts?.recommended ?? 30, 8);
  return d;
}

function oneCommand(spec: CommandSpec | undefined, rctd: boolean): Buffer {
  if (!spec) {
    // SUPPORT 001b: the device server does not support the command; no CDB usage data follows.
    return Buffer.from([0, 0x01, 0, 0]);
  }
  const head = Buffer.alloc(4);
  head[1] = (rctd ? 0x80 : 0) | 0x03; // CTDP, SUPPORT 011b: supported as the standard says
  head.writeUInt16BE(spec.cdbLength, 2);
  const parts: Buffer[] = [head, Buffer.from(spec.usage)];
  if (rctd) parts.push(timeoutDescriptor(spec));
  return Buffer.concat(parts);
}

export function reportSupportedOperationCodes(ctx: CommandContext): ScsiOutcome {
  const { cdb } = ctx;
  const commands = ctx.target.commands;
  const rctd = (cdb[2]! & 0x80) !== 0;
  const options = cdb[2]! & 0x07;
  const opcode = cdb[3]!;
  const sa = cdb.readUInt16BE(4);
  const alloc = cdb.readUInt32BE(6);
  const withOpcode = commands.filter((c) => c.opcode === opcode);
  const multiplexed = withOpcode.some((c) => c.serviceAction !== undefined);
  let data: Buffer;
  switch (options) {
    case 0: {
      const parts: Buffer[] = [Buffer.alloc(4)];
      for (const c of commands) {
        const d = Buffer.alloc(8);
        d[0] = c.opcode;
        d.writeUInt16BE(c.serviceAction ?? 0, 2);
        d[5] = (rctd ? 0x02 : 0) | (c.serviceAction !== undefined ? 0x01 : 0); // CTDP, SERVACTV
        d.writeUInt16BE(c.cdbLength, 6);
        parts.push(d);
        if (rctd) parts.push(timeoutDescriptor(c));
      }
      data = Buffer.concat(parts);
      data.writeUInt32BE(data.length - 4, 0);
      break;
    }
    case 1:
      // The command is named by its operation code alone, which is ambiguous for multiplexed ones.
      if (multiplexed) throw invalidFieldInCdb(2, 2);
      data = oneCommand(withOpcode[0], rctd);
      break;
    case 2:
      if (withOpcode.length > 0 && !multiplexed) throw invalidFieldInCdb(2, 2);
      data = oneCommand(
        withOpcode.find((c) => c.serviceAction === sa),
        rctd,
      );
      break;
    case 3:
      // Operation code and service action, whether or not the command has service actions.
      data = oneCommand(
        multiplexed ? withOpcode.find((c) => c.serviceAction === sa) : sa === 0 ? withOpcode[0] : undefined,
        rctd,
      );
      break;
    default:
      throw invalidFieldInCdb(2, 2);
  }
  return good(truncate(data, alloc));
}
