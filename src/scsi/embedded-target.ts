// The embedded file-backed target: a set of logical units under one TargetName, executing whole
// SCSI commands handed over by the iSCSI transport. One table describes every supported command
// (CDB layout, handler, reservation behaviour); the dispatcher validates CDBs against it and
// REPORT SUPPORTED OPERATION CODES reports from it, so what is reported is what is executed.

import { cdbParameterListLength, decodeBlockCdb } from '../../protocol/src/scsi/cdb.ts';
import { ScsiOp } from '../../protocol/src/scsi/opcodes.ts';
import { Asc, SenseKey } from '../../protocol/src/scsi/sense.ts';
import { ScsiStatus } from '../../protocol/src/scsi/status.ts';
import {
  CheckCondition,
  LogicalUnit,
  ReservationConflict,
  nexusKey,
  type LogicalUnitConfig,
} from './logical-unit.ts';
import type { PrAccess } from './persistent-reservations.ts';
import * as sbc from './sbc.ts';
import * as spc from './spc.ts';
import { TmfResult, type ItNexus, type ScsiOutcome, type ScsiTargetDevice, type ScsiTask } from './task.ts';

export interface CommandContext {
  task: ScsiTask;
  cdb: Buffer;
  lu: LogicalUnit;
  /** nexusKey() of the task's I_T nexus. */
  nexus: string;
  target: { readonly targetName: string; readonly luns: readonly number[]; readonly commands: readonly CommandSpec[] };
}

export type CommandHandler = (ctx: CommandContext) => ScsiOutcome | Promise<ScsiOutcome>;

export interface CommandSpec {
  name: string;
  opcode: number;
  /** Service action in CDB byte 1 bits 4-0, for the multiplexed operation codes. */
  serviceAction?: number;
  cdbLength: number;
  /**
   * CDB USAGE DATA as REPORT SUPPORTED OPERATION CODES returns it: byte 0 the operation code, the
   * service action in its field, elsewhere the bits the device server looks at. Any other bit set
   * in a CDB is rejected with INVALID FIELD IN CDB.
   */
  usage: readonly number[];
  handler: CommandHandler;
  /** Treatment under a persistent reservation held by another I_T nexus. */
  pr: PrAccess | ((cdb: Buffer) => PrAccess);
  /** Allowed while another I_T nexus holds an SPC-2 reservation (the handler may refine it). */
  spc2Allowed: boolean;
  /** Bytes of Data-Out the CDB asks for (for residuals), when the command has a Data-Out phase. */
  dataOut?: (cdb: Buffer, blockSize: number) => number;
  timeouts?: { nominal: number; recommended: number };
}

// --- CDB usage maps ---------------------------------------------------------------------------

const LBA4 = [0xff, 0xff, 0xff, 0xff];
const LBA8 = [...LBA4, ...LBA4];
const LEN2 = [0xff, 0xff];
const LEN4 = LBA4;
/** GROUP NUMBER: five bits in SBC-3, six in SBC-4; accept both. */
const GROUP = 0x3f;
/** Byte 1 of READ/WRITE(10/12/16), ORWRITE, COMPARE AND WRITE: DPO, FUA and the obsolete FUA_NV. */
const DPO_FUA = 0x10 | 0x08 | 0x02;
/** Byte 1 of VERIFY and WRITE AND VERIFY: DPO and BYTCHK. */
const DPO_BYTCHK = 0x10 | 0x06;
const CONTROL = 0x00;

const rw10 = (op: number, b1: number): number[] => [op, b1, ...LBA4, GROUP, ...LEN2, CONTROL];
const rw12 = (op: number, b1: number): number[] => [op, b1, ...LBA4, ...LEN4, GROUP, CONTROL];
const rw16 = (op: number, b1: number): number[] => [op, b1, ...LBA8, ...LEN4, GROUP, CONTROL];

/** Data-Out bytes of a block command, from its decoded CDB. */
function blockDataOut(cdb: Buffer, blockSize: number): number {
  const c = decodeBlockCdb(cdb);
  if (!c) return 0;
  return c.kind === 'unmap' ? (c.parameterListLength ?? 0) : c.dataOutBlocks * blockSize;
}

const parameterListDataOut = (cdb: Buffer): number => cdbParameterListLength(cdb) ?? 0;

const IO_TIMEOUTS = { nominal: 1, recommended: 30 };
const LONG_TIMEOUTS = { nominal: 1, recommended: 120 };

function io(
  name: string,
  opcode: number,
  usage: number[],
  handler: CommandHandler,
  pr: PrAccess,
  dataOut = false,
): CommandSpec {
  return {
    name,
    opcode,
    cdbLength: usage.length,
    usage,
    handler,
    pr,
    spc2Allowed: false,
    ...(dataOut ? { dataOut: blockDataOut } : {}),
    timeouts: IO_TIMEOUTS,
  };
}

/** Every command the embedded target executes. Anything else is INVALID COMMAND OPERATION CODE. */
export const COMMANDS: readonly CommandSpec[] = [
  // SPC
  {
    name: 'TEST UNIT READY',
    opcode: ScsiOp.TEST_UNIT_READY,
    cdbLength: 6,
    usage: [0x00, 0, 0, 0, 0, CONTROL],
    handler: spc.testUnitReady,
    pr: 'allowed',
    spc2Allowed: false,
  },
  {
    name: 'REQUEST SENSE',
    opcode: ScsiOp.REQUEST_SENSE,
    cdbLength: 6,
    usage: [0x03, 0x01, 0, 0, 0xff, CONTROL],
    handler: spc.requestSense,
    pr: 'allowed',
    spc2Allowed: true,
  },
  {
    name: 'INQUIRY',
    opcode: ScsiOp.INQUIRY,
    cdbLength: 6,
    usage: [0x12, 0x01, 0xff, 0xff, 0xff, CONTROL],
    handler: spc.inquiry,
    pr: 'allowed',
    spc2Allowed: true,
  },
  {
    name: 'MODE SELECT(6)',
    opcode: ScsiOp.MODE_SELECT_6,
    cdbLength: 6,
    usage: [0x15, 0x11, 0, 0, 0xff, CONTROL],
    handler: spc.modeSelect,
    pr: 'write',
    spc2Allowed: false,
    dataOut: parameterListDataOut,
  },
  {
    name: 'RESERVE(6)',
    opcode: ScsiOp.RESERVE_6,
    cdbLength: 6,
    usage: [0x16, 0, 0, 0, 0, CONTROL],
    handler: spc.reserve,
    pr: 'allowed',
    spc2Allowed: true,
  },
  {
    name: 'RELEASE(6)',
    opcode: ScsiOp.RELEASE_6,
    cdbLength: 6,
    usage: [0x17, 0, 0, 0, 0, CONTROL],
    handler: spc.release,
    pr: 'allowed',
    spc2Allowed: true,
  },
  {
    name: 'MODE SENSE(6)',
    opcode: ScsiOp.MODE_SENSE_6,
    cdbLength: 6,
    usage: [0x1a, 0x08, 0xff, 0xff, 0xff, CONTROL],
    handler: spc.modeSense,
    pr: 'write',
    spc2Allowed: false,
  },
  {
    name: 'PREVENT ALLOW MEDIUM REMOVAL',
    opcode: ScsiOp.PREVENT_ALLOW_MEDIUM_REMOVAL,
    cdbLength: 6,
    usage: [0x1e, 0, 0, 0, 0x03, CONTROL],
    handler: spc.preventAllowMediumRemoval,
    pr: (cdb) => ((cdb[4]! & 0x03) === 0 ? 'allowed' : 'write'),
    spc2Allowed: false,
  },
  {
    name: 'MODE SELECT(10)',
    opcode: ScsiOp.MODE_SELECT_10,
    cdbLength: 10,
    usage: [0x55, 0x11, 0, 0, 0, 0, 0, 0xff, 0xff, CONTROL],
    handler: spc.modeSelect,
    pr: 'write',
    spc2Allowed: false,
    dataOut: parameterListDataOut,
  },
  {
    name: 'RESERVE(10)',
    opcode: ScsiOp.RESERVE_10,
    cdbLength: 10,
    usage: [0x56, 0, 0, 0, 0, 0, 0, 0, 0, CONTROL],
    handler: spc.reserve,
    pr: 'allowed',
    spc2Allowed: true,
  },
  {
    name: 'RELEASE(10)',
    opcode: ScsiOp.RELEASE_10,
    cdbLength: 10,
    usage: [0x57, 0, 0, 0, 0, 0, 0, 0, 0, CONTROL],
    handler: spc.release,
    pr: 'allowed',
    spc2Allowed: true,
  },
  {
    name: 'MODE SENSE(10)',
    opcode: ScsiOp.MODE_SENSE_10,
    cdbLength: 10,
    usage: [0x5a, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, CONTROL],
    handler: spc.modeSense,
    pr: 'write',
    spc2Allowed: false,
  },
  ...[0x00, 0x01, 0x02, 0x03].map(
    (sa): CommandSpec => ({
      name: ['PERSISTENT RESERVE IN/READ KEYS', 'PERSISTENT RESERVE IN/READ RESERVATION', 'PERSISTENT RESERVE IN/REPORT CAPABILITIES', 'PERSISTENT RESERVE IN/READ FULL STATUS'][sa]!,
      opcode: ScsiOp.PERSISTENT_RESERVE_IN,
      serviceAction: sa,
      cdbLength: 10,
      usage: [0x5e, sa, 0, 0, 0, 0, 0, 0xff, 0xff, CONTROL],
      handler: spc.persistentReserveIn,
      pr: 'allowed',
      spc2Allowed: true,
    }),
  ),
  ...[0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06].map(
    (sa): CommandSpec => ({
      name: `PERSISTENT RESERVE OUT/${['REGISTER', 'RESERVE', 'RELEASE', 'CLEAR', 'PREEMPT', 'PREEMPT AND ABORT', 'REGISTER AND IGNORE EXISTING KEY'][sa]}`,
      opcode: ScsiOp.PERSISTENT_RESERVE_OUT,
      serviceAction: sa,
      cdbLength: 10,
      usage: [0x5f, sa, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, CONTROL],
      handler: spc.persistentReserveOut,
      pr: 'allowed',
      spc2Allowed: true,
      dataOut: parameterListDataOut,
    }),
  ),
  {
    name: 'REPORT LUNS',
    opcode: ScsiOp.REPORT_LUNS,
    cdbLength: 12,
    usage: [0xa0, 0, 0xff, 0, 0, 0, ...LEN4, 0, CONTROL],
    handler: (ctx) => spc.reportLuns(ctx.cdb, ctx.target.luns),
    pr: 'allowed',
    spc2Allowed: true,
  },
  {
    name: 'REPORT SUPPORTED OPERATION CODES',
    opcode: ScsiOp.MAINTENANCE_IN,
    serviceAction: 0x0c,
    cdbLength: 12,
    usage: [0xa3, 0x0c, 0x87, 0xff, 0xff, 0xff, ...LEN4, 0, CONTROL],
    handler: spc.reportSupportedOperationCodes,
    pr: 'allowed',
    spc2Allowed: true,
  },
  // SBC
  io('READ(6)', ScsiOp.READ_6, [0x08, 0x1f, 0xff, 0xff, 0xff, CONTROL], sbc.read, 'read'),
  io('WRITE(6)', ScsiOp.WRITE_6, [0x0a, 0x1f, 0xff, 0xff, 0xff, CONTROL], sbc.write, 'write', true),
  {
    name: 'START STOP UNIT',
    opcode: ScsiOp.START_STOP_UNIT,
    cdbLength: 6,
    usage: [0x1b, 0x01, 0, 0x0f, 0xf7, CONTROL],
    handler: sbc.startStopUnit,
    // Starting is harmless; stopping or changing the power condition is not.
    pr: (cdb) => ((cdb[4]! & 0xf1) === 0x01 ? 'allowed' : 'write'),
    spc2Allowed: false,
  },
  {
    name: 'READ CAPACITY(10)',
    opcode: ScsiOp.READ_CAPACITY_10,
    cdbLength: 10,
    usage: [0x25, 0, ...LBA4, 0, 0, 0x01, CONTROL],
    handler: sbc.readCapacity10,
    pr: 'allowed',
    spc2Allowed: true,
  },
  io('READ(10)', ScsiOp.READ_10, rw10(ScsiOp.READ_10, DPO_FUA), sbc.read, 'read'),
  io('WRITE(10)', ScsiOp.WRITE_10, rw10(ScsiOp.WRITE_10, DPO_FUA), sbc.write, 'write', true),
  io('WRITE AND VERIFY(10)', ScsiOp.WRITE_AND_VERIFY_10, rw10(ScsiOp.WRITE_AND_VERIFY_10, DPO_BYTCHK), sbc.writeAndVerify, 'write', true),
  io('VERIFY(10)', ScsiOp.VERIFY_10, rw10(ScsiOp.VERIFY_10, DPO_BYTCHK), sbc.verify, 'read', true),
  io('PRE-FETCH(10)', ScsiOp.PRE_FETCH_10, rw10(ScsiOp.PRE_FETCH_10, 0x02), sbc.preFetch, 'read'),
  {
    ...io('SYNCHRONIZE CACHE(10)', ScsiOp.SYNCHRONIZE_CACHE_10, rw10(ScsiOp.SYNCHRONIZE_CACHE_10, 0x06), sbc.synchronizeCache, 'write'),
    timeouts: LONG_TIMEOUTS,
  },
  {
    ...io('WRITE SAME(10)', ScsiOp.WRITE_SAME_10, rw10(ScsiOp.WRITE_SAME_10, 0x18), sbc.writeSame, 'write', true),
    timeouts: LONG_TIMEOUTS,
  },
  {
    ...io('UNMAP', ScsiOp.UNMAP, [0x42, 0x01, 0, 0, 0, 0, GROUP, ...LEN2, CONTROL], sbc.unmap, 'write', true),
    timeouts: LONG_TIMEOUTS,
  },
  io('READ(16)', ScsiOp.READ_16, rw16(ScsiOp.READ_16, DPO_FUA), sbc.read, 'read'),
  io(
    'COMPARE AND WRITE',
    ScsiOp.COMPARE_AND_WRITE,
    [0x89, DPO_FUA, ...LBA8, 0, 0, 0, 0xff, GROUP, CONTROL],
    sbc.compareAndWrite,
    'write',
    true,
  ),
  io('WRITE(16)', ScsiOp.WRITE_16, rw16(ScsiOp.WRITE_16, DPO_FUA), sbc.write, 'write', true),
  io('ORWRITE(16)', ScsiOp.ORWRITE_16, rw16(ScsiOp.ORWRITE_16, DPO_FUA), sbc.orWrite, 'write', true),
  io('WRITE AND VERIFY(16)', ScsiOp.WRITE_AND_VERIFY_16, rw16(ScsiOp.WRITE_AND_VERIFY_16, DPO_BYTCHK), sbc.writeAndVerify, 'write', true),
  io('VERIFY(16)', ScsiOp.VERIFY_16, rw16(ScsiOp.VERIFY_16, DPO_BYTCHK), sbc.verify, 'read', true),
  io('PRE-FETCH(16)', ScsiOp.PRE_FETCH_16, rw16(ScsiOp.PRE_FETCH_16, 0x02), sbc.preFetch, 'read'),
  {
    ...io('SYNCHRONIZE CACHE(16)', ScsiOp.SYNCHRONIZE_CACHE_16, rw16(ScsiOp.SYNCHRONIZE_CACHE_16, 0x06), sbc.synchronizeCache, 'write'),
    timeouts: LONG_TIMEOUTS,
  },
  {
    ...io('WRITE SAME(16)', ScsiOp.WRITE_SAME_16, rw16(ScsiOp.WRITE_SAME_16, 0x19), sbc.writeSame, 'write', true),
    timeouts: LONG_TIMEOUTS,
  },
  {
    name: 'READ CAPACITY(16)',
    opcode: ScsiOp.SERVICE_ACTION_IN_16,
    serviceAction: 0x10,
    cdbLength: 16,
    usage: [0x9e, 0x10, ...LBA8, ...LEN4, 0x01, CONTROL],
    handler: sbc.readCapacity16,
    pr: 'allowed',
    spc2Allowed: true,
  },
  {
    name: 'GET LBA STATUS',
    opcode: ScsiOp.SERVICE_ACTION_IN_16,
    serviceAction: 0x12,
    cdbLength: 16,
    usage: [0x9e, 0x12, ...LBA8, ...LEN4, 0, CONTROL],
    handler: sbc.getLbaStatus,
    pr: 'read',
    spc2Allowed: false,
  },
  io('READ(12)', ScsiOp.READ_12, rw12(ScsiOp.READ_12, DPO_FUA), sbc.read, 'read'),
  io('WRITE(12)', ScsiOp.WRITE_12, rw12(ScsiOp.WRITE_12, DPO_FUA), sbc.write, 'write', true),
  io('WRITE AND VERIFY(12)', ScsiOp.WRITE_AND_VERIFY_12, rw12(ScsiOp.WRITE_AND_VERIFY_12, DPO_BYTCHK), sbc.writeAndVerify, 'write', true),
  io('VERIFY(12)', ScsiOp.VERIFY_12, rw12(ScsiOp.VERIFY_12, DPO_BYTCHK), sbc.verify, 'read', true),
];

interface OpcodeEntry {
  /** The command, for operation codes without service actions. */
  spec?: CommandSpec;
  /** By service action, for the multiplexed operation codes. */
  byServiceAction?: Map<number, CommandSpec>;
}

interface PreparedSpec {
  spec: CommandSpec;
  /** Bits that may be set in each CDB byte: the usage map, the whole service action field, and
   *  the vendor specific bits of the CONTROL byte. */
  allowed: Uint8Array;
}

const dispatch = new Map<number, OpcodeEntry>();
const prepared = new Map<CommandSpec, PreparedSpec>();
for (const spec of COMMANDS) {
  if (spec.usage.length !== spec.cdbLength || spec.usage[0] !== spec.opcode) {
    throw new Error(`command table: bad usage map for ${spec.name}`);
  }
  const allowed = Uint8Array.from(spec.usage);
  if (spec.serviceAction !== undefined) allowed[1]! |= 0x1f;
  allowed[spec.cdbLength - 1]! |= 0xc0;
  prepared.set(spec, { spec, allowed });
  const entry = dispatch.get(spec.opcode) ?? {};
  if (spec.serviceAction === undefined) entry.spec = spec;
  else (entry.byServiceAction ??= new Map()).set(spec.serviceAction, spec);
  dispatch.set(spec.opcode, entry);
}

/** The command a CDB names, or why it names none. */
export function lookupCommand(cdb: Buffer): CommandSpec | 'invalid-opcode' | 'invalid-service-action' {
  const entry = dispatch.get(cdb[0]!);
  if (!entry) return 'invalid-opcode';
  if (entry.spec) return entry.spec;
  return entry.byServiceAction!.get(cdb[1]! & 0x1f) ?? 'invalid-service-action';
}

/** Bits set in a reserved (unused) position of the CDB: byte and bit of the first one. */
export function firstReservedBit(spec: CommandSpec, cdb: Buffer): { byte: number; bit: number } | undefined {
  const allowed = prepared.get(spec)!.allowed;
  for (let i = 1; i < allowed.length; i++) {
    const bad = cdb[i]! & ~allowed[i]!;
    if (bad) return { byte: i, bit: 31 - Math.clz32(bad) };
  }
  return undefined;
}

// --- The target --------------------------------------------------------------------------------

export interface EmbeddedLunOptions extends Omit<LogicalUnitConfig, 'lun'> {
  /** LUN number; by default the position in the list (the first image is LUN 0). */
  lun?: number;
}

export interface EmbeddedTargetOptions {
  targetName: string;
  luns: EmbeddedLunOptions[];
}

const UA_EXEMPT = new Set<number>([ScsiOp.INQUIRY, ScsiOp.REPORT_LUNS, ScsiOp.REQUEST_SENSE]);

const LOGICAL_UNIT_NOT_SUPPORTED = new CheckCondition(
  SenseKey.ILLEGAL_REQUEST,
  Asc.LOGICAL_UNIT_NOT_SUPPORTED.asc,
  Asc.LOGICAL_UNIT_NOT_SUPPORTED.ascq,
);
const NOT_READY = new CheckCondition(
  SenseKey.NOT_READY,
  Asc.LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE.asc,
  Asc.LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE.ascq,
);
const INVALID_OPCODE = new CheckCondition(
  SenseKey.ILLEGAL_REQUEST,
  Asc.INVALID_COMMAND_OPERATION_CODE.asc,
  Asc.INVALID_COMMAND_OPERATION_CODE.ascq,
);

export class EmbeddedTarget implements ScsiTargetDevice {
  readonly targetName: string;
  readonly commands = COMMANDS;
  private readonly lus = new Map<number, LogicalUnit>();
  /** Sessions seen, by nexus key + TSIH, and how many sessions each nexus has. */
  private readonly sessions = new Set<string>();
  private readonly sessionsPerNexus = new Map<string, number>();
  private opened = false;

  constructor(opts: EmbeddedTargetOptions) {
    if (!opts.targetName) throw new Error('targetName is required');
    this.targetName = opts.targetName;
    opts.luns.forEach((l, i) => {
      const lun = l.lun ?? i;
      if (this.lus.has(lun)) throw new Error(`LUN ${lun} is configured twice`);
      this.lus.set(lun, new LogicalUnit({ ...l, lun }));
    });
    if (this.lus.size === 0) throw new Error('at least one LUN is required');
  }

  /** Opens (and creates when needed) every image. */
  async open(): Promise<void> {
    if (this.opened) return;
    const done: LogicalUnit[] = [];
    try {
      for (const lu of this.lus.values()) {
        await lu.open();
        done.push(lu);
      }
    } catch (err) {
      await Promise.allSettled(done.map((lu) => lu.close()));
      throw err;
    }
    this.opened = true;
  }

  async close(): Promise<void> {
    this.opened = false;
    await Promise.all([...this.lus.values()].map((lu) => lu.close()));
  }

  /** Configured LUNs, ascending. */
  get luns(): number[] {
    return [...this.lus.keys()].sort((a, b) => a - b);
  }

  logicalUnit(lun: number): LogicalUnit | undefined {
    return this.lus.get(lun);
  }

  nexusOpened(nexus: ItNexus): void {
    this.noteSession(nexus);
  }

  nexusClosed(nexus: ItNexus): void {
    const key = nexusKey(nexus);
    if (!this.sessions.delete(`${key}|${nexus.tsih}`)) return;
    const left = (this.sessionsPerNexus.get(key) ?? 1) - 1;
    if (left > 0) {
      this.sessionsPerNexus.set(key, left);
      return;
    }
    this.sessionsPerNexus.delete(key);
    for (const lu of this.lus.values()) lu.nexusClosed(key);
  }

  async reset(_nexus: ItNexus, kind: 'lun' | 'target-warm' | 'target-cold' | 'clear-task-set', lun: number): Promise<number> {
    switch (kind) {
      case 'lun': {
        const lu = this.lus.get(lun);
        if (!lu) return TmfResult.NoSuchLun;
        lu.reset(false);
        return TmfResult.Complete;
      }
      case 'target-warm':
      case 'target-cold':
        for (const lu of this.lus.values()) lu.reset(kind === 'target-cold');
        return TmfResult.Complete;
      case 'clear-task-set':
        // Commands are never queued inside the device server: there is no task set to clear.
        return this.lus.has(lun) ? TmfResult.Complete : TmfResult.NoSuchLun;
    }
  }

  /**
   * A session is a new I_T nexus the first time it is seen (at login, or at its first command if
   * the transport does not announce it): it starts with POWER ON, RESET, OR BUS DEVICE RESET
   * OCCURRED pending on every logical unit, as after a real power-on.
   */
  private noteSession(nexus: ItNexus): string {
    const key = nexusKey(nexus);
    const session = `${key}|${nexus.tsih}`;
    if (this.sessions.has(session)) return key;
    this.sessions.add(session);
    this.sessionsPerNexus.set(key, (this.sessionsPerNexus.get(key) ?? 0) + 1);
    for (const lu of this.lus.values()) lu.nexusOpened(key);
    return key;
  }

  async execute(task: ScsiTask): Promise<ScsiOutcome> {
    if (task.aborted ?? task.signal.aborted) return { status: ScsiStatus.TASK_ABORTED };
    const key = this.noteSession(task.nexus);
    const cdb = task.cdb;
    if (cdb.length === 0) return spc.checkConditionFixed(INVALID_OPCODE);
    const opcode = cdb[0]!;
    const lu = this.lus.get(task.lun);
    if (!lu) return this.noLogicalUnit(opcode, cdb);
    if (!lu.isOpen) {
      if (opcode === ScsiOp.REPORT_LUNS) return this.noLogicalUnit(opcode, cdb);
      return spc.checkConditionFixed(NOT_READY);
    }

    const spec = lookupCommand(cdb);
    const dataOutLength = typeof spec === 'object' && spec.dataOut ? safeDataOut(spec, cdb, lu.blockSize) : undefined;

    // A pending unit attention is reported before anything else is looked at.
    if (!UA_EXEMPT.has(opcode)) {
      const ua = lu.takeUa(key);
      if (ua) return withDataOutLength(dataOutLength, this.check(lu, new CheckCondition(SenseKey.UNIT_ATTENTION, ua.asc, ua.ascq)));
    }
    if (spec === 'invalid-opcode') return this.check(lu, INVALID_OPCODE);
    if (spec === 'invalid-service-action') {
      return this.check(lu, new CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB.asc, Asc.INVALID_FIELD_IN_CDB.ascq, {
        field: { inCdb: true, byte: 1, bit: 4 },
      }));
    }
    if (cdb.length < spec.cdbLength) {
      return withDataOutLength(dataOutLength, this.check(lu, new CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB.asc, Asc.INVALID_FIELD_IN_CDB.ascq)));
    }
    const reserved = firstReservedBit(spec, cdb);
    if (reserved) {
      return withDataOutLength(
        dataOutLength,
        this.check(lu, new CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB.asc, Asc.INVALID_FIELD_IN_CDB.ascq, {
          field: { inCdb: true, byte: reserved.byte, bit: reserved.bit },
        })),
      );
    }

    if (lu.spc2Holder !== undefined && lu.spc2Holder !== key && !spec.spc2Allowed) {
      return withDataOutLength(dataOutLength, { status: ScsiStatus.RESERVATION_CONFLICT });
    }
    const access = typeof spec.pr === 'function' ? spec.pr(cdb) : spec.pr;
    if (lu.pr.conflicts(key, access)) return withDataOutLength(dataOutLength, { status: ScsiStatus.RESERVATION_CONFLICT });

    const ctx: CommandContext = { task, cdb, lu, nexus: key, target: this };
    try {
      return withDataOutLength(dataOutLength, await spec.handler(ctx));
    } catch (err) {
      return withDataOutLength(dataOutLength, this.failure(lu, cdb, err));
    }
  }

  private check(lu: LogicalUnit, c: CheckCondition): ScsiOutcome {
    return { status: ScsiStatus.CHECK_CONDITION, sense: lu.senseFor(c) };
  }

  private failure(lu: LogicalUnit, cdb: Buffer, err: unknown): ScsiOutcome {
    if (err instanceof CheckCondition) return this.check(lu, err);
    if (err instanceof ReservationConflict) return { status: ScsiStatus.RESERVATION_CONFLICT };
    // An I/O error of the backing store. Out of space on a sparse image is what SBC calls a
    // thin provisioning allocation failure; anything else is a medium error of the direction.
    const code = (err as NodeJS.ErrnoException | undefined)?.code;
    if (code === 'ENOSPC' || code === 'EDQUOT') {
      return this.check(lu, new CheckCondition(SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT.asc, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT.ascq));
    }
    if (code === 'EIO') {
      const writing = decodeBlockCdbSafe(cdb)?.isWrite ?? false;
      const c = writing ? Asc.WRITE_ERROR : Asc.UNRECOVERED_READ_ERROR;
      return this.check(lu, new CheckCondition(SenseKey.MEDIUM_ERROR, c.asc, c.ascq));
    }
    return this.check(lu, new CheckCondition(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE.asc, Asc.INTERNAL_TARGET_FAILURE.ascq));
  }

  /** Commands addressed to a LUN without a logical unit (SPC-4 4.x, "logical unit not supported"). */
  private noLogicalUnit(opcode: number, cdb: Buffer): ScsiOutcome {
    switch (opcode) {
      case ScsiOp.REPORT_LUNS:
        try {
          return spc.reportLuns(cdb, this.luns);
        } catch (err) {
          if (err instanceof CheckCondition) return spc.checkConditionFixed(err);
          throw err;
        }
      case ScsiOp.INQUIRY: {
        const first = this.lus.values().next().value as LogicalUnit;
        return spc.inquiryNoLun(cdb, first);
      }
      case ScsiOp.REQUEST_SENSE:
        return spc.requestSenseNoLun(cdb);
      default:
        return spc.checkConditionFixed(LOGICAL_UNIT_NOT_SUPPORTED);
    }
  }
}

/** An answer that did not take the command's Data-Out still states how much was expected. */
function withDataOutLength(dataOutLength: number | undefined, o: ScsiOutcome): ScsiOutcome {
  return dataOutLength !== undefined && o.dataOutLength === undefined ? { ...o, dataOutLength } : o;
}

function safeDataOut(spec: CommandSpec, cdb: Buffer, blockSize: number): number | undefined {
  try {
    return spec.dataOut!(cdb, blockSize);
  } catch {
    return undefined;
  }
}

function decodeBlockCdbSafe(cdb: Buffer): ReturnType<typeof decodeBlockCdb> {
  try {
    return decodeBlockCdb(cdb);
  } catch {
    return undefined;
  }
}
