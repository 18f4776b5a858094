/**
 * SCSI status codes (SAM-5) and the iSCSI SCSI Response "Response" field
 * (RFC 7143 §11.4.3).
 */

export const ScsiStatus = {
  GOOD: 0x00,
  CHECK_CONDITION: 0x02,
  CONDITION_MET: 0x04,
  BUSY: 0x08,
  RESERVATION_CONFLICT: 0x18,
  TASK_SET_FULL: 0x28,
  ACA_ACTIVE: 0x30,
  TASK_ABORTED: 0x40,
} as const;

export type ScsiStatusName = keyof typeof ScsiStatus;
export type ScsiStatusCode = (typeof ScsiStatus)[ScsiStatusName];

// Obsolete values still seen from old targets; named so logs stay readable,
// but not offered as constants to discourage sending them.
const obsoleteStatusNames = new Map<number, string>([
  [0x10, 'INTERMEDIATE'],
  [0x14, 'INTERMEDIATE_CONDITION_MET'],
  [0x22, 'COMMAND_TERMINATED'],
]);

const statusNames = new Map<number, string>(Object.entries(ScsiStatus).map(([n, c]) => [c, n]));

function hex2(n: number): string {
  return '0x' + n.toString(16).padStart(2, '0');
}

/** 'GOOD', 'CHECK_CONDITION', ... or 'UNKNOWN_0xNN'. Stable: usable as a metric label. */
export function scsiStatusName(status: number): string {
  return statusNames.get(status) ?? obsoleteStatusNames.get(status) ?? `UNKNOWN_${hex2(status & 0xff)}`;
}

export function isScsiStatus(status: number): status is ScsiStatusCode {
  return statusNames.has(status);
}

/** Response field of the iSCSI SCSI Response PDU. 0x80-0xff are vendor specific. */
export const IscsiResponse = {
  COMMAND_COMPLETED_AT_TARGET: 0x00,
  TARGET_FAILURE: 0x01,
} as const;

export type IscsiResponseName = keyof typeof IscsiResponse;

/** 'COMMAND_COMPLETED_AT_TARGET', 'TARGET_FAILURE', 'VENDOR_0xNN' or 'RESERVED_0xNN'. */
export function iscsiResponseName(code: number): string {
  if (code === IscsiResponse.COMMAND_COMPLETED_AT_TARGET) return 'COMMAND_COMPLETED_AT_TARGET';
  if (code === IscsiResponse.TARGET_FAILURE) return 'TARGET_FAILURE';
  const c = code & 0xff;
  return c >= 0x80 ? `VENDOR_${hex2(c)}` : `RESERVED_${hex2(c)}`;
}
