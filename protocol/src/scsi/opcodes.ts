/**
 * SCSI operation codes (SPC-4/SPC-5, SBC-3/SBC-4) that matter to a block
 * target, their service actions, and stable names for them.
 *
 * The names returned by `scsiOpName` are used as metric labels, so they must
 * never change once published and must stay low-cardinality: an unknown
 * service action of a known multiplexed opcode maps to the opcode's generic
 * name, never to a per-value string.
 */

export const ScsiOp = {
  TEST_UNIT_READY: 0x00,
  REQUEST_SENSE: 0x03,
  FORMAT_UNIT: 0x04,
  REASSIGN_BLOCKS: 0x07,
  READ_6: 0x08,
  WRITE_6: 0x0a,
  INQUIRY: 0x12,
  MODE_SELECT_6: 0x15,
  RESERVE_6: 0x16,
  RELEASE_6: 0x17,
  MODE_SENSE_6: 0x1a,
  START_STOP_UNIT: 0x1b,
  RECEIVE_DIAGNOSTIC_RESULTS: 0x1c,
  SEND_DIAGNOSTIC: 0x1d,
  PREVENT_ALLOW_MEDIUM_REMOVAL: 0x1e,
  READ_CAPACITY_10: 0x25,
  READ_10: 0x28,
  WRITE_10: 0x2a,
  WRITE_AND_VERIFY_10: 0x2e,
  VERIFY_10: 0x2f,
  PRE_FETCH_10: 0x34,
  SYNCHRONIZE_CACHE_10: 0x35,
  READ_DEFECT_DATA_10: 0x37,
  WRITE_BUFFER: 0x3b,
  READ_BUFFER_10: 0x3c,
  READ_LONG_10: 0x3e,
  WRITE_LONG_10: 0x3f,
  WRITE_SAME_10: 0x41,
  UNMAP: 0x42,
  SANITIZE: 0x48,
  LOG_SELECT: 0x4c,
  LOG_SENSE: 0x4d,
  MODE_SELECT_10: 0x55,
  RESERVE_10: 0x56,
  RELEASE_10: 0x57,
  MODE_SENSE_10: 0x5a,
  PERSISTENT_RESERVE_IN: 0x5e,
  PERSISTENT_RESERVE_OUT: 0x5f,
  /** Variable-length CDB; the real command is the 16-bit service action at bytes 8-9. */
  VARIABLE_LENGTH: 0x7f,
  /** THIRD-PARTY COPY OUT in SPC-4; its service action 00h is the SPC-3 EXTENDED COPY. */
  EXTENDED_COPY: 0x83,
  /** THIRD-PARTY COPY IN in SPC-4. */
  RECEIVE_COPY_RESULTS: 0x84,
  ATA_PASS_THROUGH_16: 0x85,
  READ_16: 0x88,
  COMPARE_AND_WRITE: 0x89,
  WRITE_16: 0x8a,
  ORWRITE_16: 0x8b,
  WRITE_AND_VERIFY_16: 0x8e,
  VERIFY_16: 0x8f,
  PRE_FETCH_16: 0x90,
  SYNCHRONIZE_CACHE_16: 0x91,
  WRITE_SAME_16: 0x93,
  ZBC_OUT: 0x94,
  ZBC_IN: 0x95,
  WRITE_STREAM_16: 0x9a,
  READ_BUFFER_16: 0x9b,
  WRITE_ATOMIC_16: 0x9c,
  SERVICE_ACTION_IN_16: 0x9e,
  SERVICE_ACTION_OUT_16: 0x9f,
  REPORT_LUNS: 0xa0,
  ATA_PASS_THROUGH_12: 0xa1,
  SECURITY_PROTOCOL_IN: 0xa2,
  MAINTENANCE_IN: 0xa3,
  MAINTENANCE_OUT: 0xa4,
  READ_12: 0xa8,
  WRITE_12: 0xaa,
  WRITE_AND_VERIFY_12: 0xae,
  VERIFY_12: 0xaf,
  SECURITY_PROTOCOL_OUT: 0xb5,
} as const;

export type ScsiOpKey = keyof typeof ScsiOp;

/** Service actions of SERVICE ACTION IN(16) (9Eh), in byte 1 bits 4-0. */
export const ServiceActionIn16 = {
  READ_CAPACITY_16: 0x10,
  READ_LONG_16: 0x11,
  GET_LBA_STATUS: 0x12,
  REPORT_REFERRALS: 0x13,
} as const;

/** Service actions of SERVICE ACTION OUT(16) (9Fh), in byte 1 bits 4-0. */
export const ServiceActionOut16 = {
  WRITE_LONG_16: 0x11,
  WRITE_SCATTERED_16: 0x12,
} as const;

/** Service actions of MAINTENANCE IN (A3h), in byte 1 bits 4-0. */
export const MaintenanceIn = {
  REPORT_IDENTIFYING_INFORMATION: 0x05,
  REPORT_TARGET_PORT_GROUPS: 0x0a,
  REPORT_ALIASES: 0x0b,
  REPORT_SUPPORTED_OPERATION_CODES: 0x0c,
  REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS: 0x0d,
  REPORT_PRIORITY: 0x0e,
  REPORT_TIMESTAMP: 0x0f,
} as const;

/** Service actions of MAINTENANCE OUT (A4h), in byte 1 bits 4-0. */
export const MaintenanceOut = {
  SET_IDENTIFYING_INFORMATION: 0x06,
  SET_TARGET_PORT_GROUPS: 0x0a,
  CHANGE_ALIASES: 0x0b,
  SET_PRIORITY: 0x0e,
  SET_TIMESTAMP: 0x0f,
} as const;

/** Service actions of THIRD-PARTY COPY OUT (83h), in byte 1 bits 4-0. */
export const ThirdPartyCopyOut = {
  EXTENDED_COPY_LID1: 0x00,
  EXTENDED_COPY_LID4: 0x01,
  POPULATE_TOKEN: 0x10,
  WRITE_USING_TOKEN: 0x11,
} as const;

/** Service actions of THIRD-PARTY COPY IN (84h), in byte 1 bits 4-0. */
export const ThirdPartyCopyIn = {
  RECEIVE_COPY_STATUS_LID1: 0x00,
  RECEIVE_COPY_OPERATING_PARAMETERS: 0x03,
  RECEIVE_ROD_TOKEN_INFORMATION: 0x07,
} as const;

/** Service actions of PERSISTENT RESERVE IN (5Eh), byte 1 bits 4-0. */
export const PersistentReserveIn = {
  READ_KEYS: 0x00,
  READ_RESERVATION: 0x01,
  REPORT_CAPABILITIES: 0x02,
  READ_FULL_STATUS: 0x03,
} as const;

/** Service actions of PERSISTENT RESERVE OUT (5Fh), byte 1 bits 4-0. */
export const PersistentReserveOut = {
  REGISTER: 0x00,
  RESERVE: 0x01,
  RELEASE: 0x02,
  CLEAR: 0x03,
  PREEMPT: 0x04,
  PREEMPT_AND_ABORT: 0x05,
  REGISTER_AND_IGNORE_EXISTING_KEY: 0x06,
  REGISTER_AND_MOVE: 0x07,
  REPLACE_LOST_RESERVATION: 0x08,
} as const;

/** 16-bit service actions of the 32-byte variable-length CDB (7Fh), bytes 8-9. */
export const VariableLengthSa = {
  READ_32: 0x0009,
  VERIFY_32: 0x000a,
  WRITE_32: 0x000b,
  WRITE_AND_VERIFY_32: 0x000c,
  WRITE_SAME_32: 0x000d,
  ORWRITE_32: 0x000e,
  WRITE_ATOMIC_32: 0x000f,
  WRITE_STREAM_32: 0x0010,
} as const;

const opNameByCode = new Map<number, string>();
for (const [name, code] of Object.entries(ScsiOp)) opNameByCode.set(code, name);

function invert(table: Record<string, number>): Map<number, string> {
  const m = new Map<number, string>();
  for (const [name, code] of Object.entries(table)) m.set(code, name);
  return m;
}

const saIn16Names = invert(ServiceActionIn16);
const saOut16Names = invert(ServiceActionOut16);
const maintInNames = invert(MaintenanceIn);
const maintOutNames = invert(MaintenanceOut);
const varLenNames = invert(VariableLengthSa);
// Labels chosen so that the SPC-3 spelling (plain EXTENDED COPY / RECEIVE COPY
// RESULTS) is what most initiators' traffic is counted under.
const tpcOutNames = new Map<number, string>([
  [ThirdPartyCopyOut.EXTENDED_COPY_LID1, 'EXTENDED_COPY'],
  [ThirdPartyCopyOut.EXTENDED_COPY_LID4, 'EXTENDED_COPY_LID4'],
  [ThirdPartyCopyOut.POPULATE_TOKEN, 'POPULATE_TOKEN'],
  [ThirdPartyCopyOut.WRITE_USING_TOKEN, 'WRITE_USING_TOKEN'],
]);
const tpcInNames = new Map<number, string>([
  [ThirdPartyCopyIn.RECEIVE_COPY_STATUS_LID1, 'RECEIVE_COPY_RESULTS'],
  [ThirdPartyCopyIn.RECEIVE_COPY_OPERATING_PARAMETERS, 'RECEIVE_COPY_OPERATING_PARAMETERS'],
  [ThirdPartyCopyIn.RECEIVE_ROD_TOKEN_INFORMATION, 'RECEIVE_ROD_TOKEN_INFORMATION'],
]);

function hex2(n: number): string {
  return '0x' + n.toString(16).padStart(2, '0');
}

/** The 5-bit service action of byte 1 used by 83h, 84h, 9Eh, 9Fh, A3h, A4h, 5Eh, 5Fh. */
export function cdbServiceAction(cdb: Buffer): number | undefined {
  if (cdb.length < 2) return undefined;
  return cdb[1]! & 0x1f;
}

/**
 * Short stable uppercase name of the command in a CDB, e.g. 'READ_10',
 * 'READ_CAPACITY_16', 'UNKNOWN_0xc1'. Opcodes multiplexed by a service action
 * are resolved when the service action is known and otherwise fall back to
 * the opcode's generic name. An empty buffer is 'EMPTY_CDB'.
 */
export function scsiOpName(cdb: Buffer): string {
  if (cdb.length === 0) return 'EMPTY_CDB';
  const opcode = cdb[0]!;
  const generic = opNameByCode.get(opcode);
  const sa = cdbServiceAction(cdb);
  let specific: string | undefined;
  if (sa !== undefined) {
    switch (opcode) {
      case ScsiOp.SERVICE_ACTION_IN_16:
        specific = saIn16Names.get(sa);
        break;
      case ScsiOp.SERVICE_ACTION_OUT_16:
        specific = saOut16Names.get(sa);
        break;
      case ScsiOp.MAINTENANCE_IN:
        specific = maintInNames.get(sa);
        break;
      case ScsiOp.MAINTENANCE_OUT:
        specific = maintOutNames.get(sa);
        break;
      case ScsiOp.EXTENDED_COPY:
        specific = tpcOutNames.get(sa);
        break;
      case ScsiOp.RECEIVE_COPY_RESULTS:
        specific = tpcInNames.get(sa);
        break;
      case ScsiOp.VARIABLE_LENGTH:
        if (cdb.length >= 10) specific = varLenNames.get(cdb.readUInt16BE(8));
        break;
      default:
        break;
    }
  }
  if (specific !== undefined) return specific;
  if (opcode === ScsiOp.EXTENDED_COPY) return 'THIRD_PARTY_COPY_OUT';
  if (opcode === ScsiOp.RECEIVE_COPY_RESULTS) return 'THIRD_PARTY_COPY_IN';
  return generic ?? `UNKNOWN_${hex2(opcode)}`;
}

const mediumModifyingOpcodes = new Set<number>([
  ScsiOp.FORMAT_UNIT,
  ScsiOp.REASSIGN_BLOCKS,
  ScsiOp.WRITE_6,
  ScsiOp.WRITE_10,
  ScsiOp.WRITE_12,
  ScsiOp.WRITE_16,
  ScsiOp.WRITE_AND_VERIFY_10,
  ScsiOp.WRITE_AND_VERIFY_12,
  ScsiOp.WRITE_AND_VERIFY_16,
  ScsiOp.WRITE_LONG_10,
  ScsiOp.WRITE_SAME_10,
  ScsiOp.WRITE_SAME_16,
  ScsiOp.UNMAP,
  ScsiOp.SANITIZE,
  ScsiOp.COMPARE_AND_WRITE,
  ScsiOp.ORWRITE_16,
  ScsiOp.WRITE_STREAM_16,
  ScsiOp.WRITE_ATOMIC_16,
  ScsiOp.ZBC_OUT,
  // ATA PASS-THROUGH can carry any ATA command, including writes.
  ScsiOp.ATA_PASS_THROUGH_12,
  ScsiOp.ATA_PASS_THROUGH_16,
]);

/**
 * Whether the command may change the contents of the logical unit's medium
 * (user data). This is deliberately wider than the block I/O commands that
 * `decodeBlockCdb` understands: a proxy that tracks changed blocks must not
 * let a FORMAT UNIT, SANITIZE, WRITE USING TOKEN, EXTENDED COPY, WRITE
 * LONG(16), WRITE SCATTERED or 32-byte write slip past it unnoticed.
 * Unknown opcodes return false; callers that must be conservative should
 * also treat names starting with 'UNKNOWN_' as suspect.
 */
export function scsiOpModifiesMedium(cdb: Buffer): boolean {
  if (cdb.length === 0) return false;
  const opcode = cdb[0]!;
  if (mediumModifyingOpcodes.has(opcode)) return true;
  const sa = cdbServiceAction(cdb);
  switch (opcode) {
    case ScsiOp.EXTENDED_COPY:
      // Every THIRD-PARTY COPY OUT action that moves data can write this LU.
      return (
        sa === ThirdPartyCopyOut.EXTENDED_COPY_LID1 ||
        sa === ThirdPartyCopyOut.EXTENDED_COPY_LID4 ||
        sa === ThirdPartyCopyOut.WRITE_USING_TOKEN
      );
    case ScsiOp.SERVICE_ACTION_OUT_16:
      return sa === ServiceActionOut16.WRITE_LONG_16 || sa === ServiceActionOut16.WRITE_SCATTERED_16;
    case ScsiOp.VARIABLE_LENGTH: {
      if (cdb.length < 10) return false;
      const vsa = cdb.readUInt16BE(8);
      return (
        vsa === VariableLengthSa.WRITE_32 ||
        vsa === VariableLengthSa.WRITE_AND_VERIFY_32 ||
        vsa === VariableLengthSa.WRITE_SAME_32 ||
        vsa === VariableLengthSa.ORWRITE_32 ||
        vsa === VariableLengthSa.WRITE_ATOMIC_32 ||
        vsa === VariableLengthSa.WRITE_STREAM_32
      );
    }
    default:
      return false;
  }
}
