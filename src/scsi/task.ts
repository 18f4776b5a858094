// The contract between the iSCSI transport (src/front) and whatever executes SCSI commands: the
// embedded file-backed logical units (src/scsi), the inline proxy that forwards them to the main
// target (src/back), and later the capture layer. The transport owns framing, R2T and Data-In
// splitting, residual reporting and sequencing; the executor only sees whole commands.

/** The I_T nexus a command arrived on (SAM-5): initiator port + target port. */
export interface ItNexus {
  initiatorName: string;
  /** ISID as 12 hex digits. */
  isid: string;
  tsih: number;
  targetName: string;
  portalGroupTag: number;
  /**
   * The SCSI initiator port name, "<InitiatorName>,i,0x<ISID>" (RFC 7143 10.1.1): the key for
   * per-nexus state such as unit attentions and reservations.
   */
  initiatorPort: string;
}

export interface ScsiTask {
  nexus: ItNexus;
  lun: number;
  cdb: Buffer;
  /** Task attribute (RFC 7143 ATTR): 0 untagged, 1 simple, 2 ordered, 3 head of queue, 4 ACA. */
  attr: number;
  /** Initiator task tag, for logs and task management. */
  itt: number;
  /** The initiator's R and W bits, as sent (a proxy forwards them unchanged). */
  read: boolean;
  write: boolean;
  /**
   * The data the initiator sent (Data-Out), gathered completely before execution. Its length is
   * what the initiator transferred, which can differ from what the CDB asks for.
   */
  dataOut: Buffer;
  /** The initiator's Expected Data Transfer Length for the read direction (0 for none). */
  dataInLength: number;
  /** Aborted by task management or by the session going away. */
  readonly signal: AbortSignal;
  /**
   * An executor that can stop its work more cheaply than by listening on `signal` (the proxy
   * aborting its forwarded command) sets this; the transport calls it once if the task is
   * aborted. Reading `signal` costs an AbortController per command, this does not.
   */
  onAbort?: () => void;
  /** Already aborted, when the transport knows it (checked before forwarding a held command). */
  readonly aborted?: boolean;
}

export interface ScsiOutcome {
  /** SCSI status (GOOD 0x00, CHECK CONDITION 0x02, ...). */
  status: number;
  /** Sense data, raw (without iSCSI's SenseLength prefix). */
  sense?: Buffer;
  /**
   * Data for the initiator. It may be longer than dataInLength: the transport truncates it and
   * reports the overflow as a residual, as SPC's allocation length rules expect.
   */
  dataIn?: Buffer;
  /**
   * Bytes of Data-Out the command needed per its CDB, when that is known. The transport reports
   * the difference from what was sent as an underflow or overflow residual.
   */
  dataOutLength?: number;
  /**
   * The residual as the executor knows it; it replaces the transport's own computation. A proxy
   * passes the main target's residual through this way, so overflow is reported even though the
   * data it forwards never exceeds the initiator's buffer.
   */
  residual?: { overflow: boolean; underflow: boolean; count: number };
  /**
   * iSCSI Response code: 0 (completed at target) unless the target failed to deliver any SCSI
   * status at all, e.g. because its backend vanished (0x01, target failure).
   */
  response?: number;
  /**
   * Set when dataIn lives in a pooled buffer: the transport calls it exactly once, when nothing
   * will read dataIn any more (its last byte handed to the socket, or the task dropped).
   */
  release?: () => void;
}

export const TmfResult = {
  Complete: 0,
  NoSuchTask: 1,
  NoSuchLun: 2,
  NotSupported: 5,
  Rejected: 255,
} as const;

/** What a target (a set of logical units under one TargetName) offers the transport. */
export interface ScsiTargetDevice {
  execute(task: ScsiTask): Promise<ScsiOutcome>;
  /** LOGICAL UNIT RESET, TARGET WARM RESET, CLEAR TASK SET...: state beyond the task set. */
  reset?(nexus: ItNexus, kind: 'lun' | 'target-warm' | 'target-cold' | 'clear-task-set', lun: number): Promise<number>;
  /** A nexus logged in: per-nexus state such as a POWER ON unit attention begins here. */
  nexusOpened?(nexus: ItNexus): Promise<void> | void;
  /** The nexus ended (session logout or its last connection lost). */
  nexusClosed?(nexus: ItNexus): Promise<void> | void;
}
