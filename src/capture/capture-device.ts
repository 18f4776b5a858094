import {
  Asc,
  buildInquiry,
  buildSense,
  decodeBlockCdb,
  decodeUnmapParameterList,
  parseSense,
  ScsiCdbError,
  ScsiOp,
  scsiOpModifiesMedium,
  scsiOpName,
  ServiceActionIn16,
  VariableLengthSa,
  SenseKey,
  type BlockCdb,
} from 'iscsi-node-wire';
import { RangeLock } from '../scsi/logical-unit.ts';
import type { ItNexus, ScsiOutcome, ScsiTargetDevice, ScsiTask } from '../scsi/task.ts';
import { JournalDataDrainedError, type AppendRequest, type Journal, type JournalLocation } from './journal.ts';
import type { WriteThrottle } from './write-throttle.ts';

const GOOD = 0x00;
const CHECK_CONDITION = 0x02;

/** One piece of a capture-view read: journal data from the snapshot map, or the main volume. */
export type ViewPiece =
  | { lba: number; blocks: number; source: 'journal'; location: JournalLocation; offsetInRecord: number }
  | { lba: number; blocks: number; source: 'base' };

/** The snapshot map as the capture device needs it. */
export interface CaptureMap {
  lookup(lba: number, blocks: number): ViewPiece[];
  /** True when any block of the range is mapped to the journal. */
  overlaps(lba: number, blocks: number): boolean;
}

/** Everything the capture device works with; owned by the backup run. */
export interface CaptureContext {
  volume: string;
  /** The captured LUN; commands for other LUNs are forwarded untouched. */
  lun: number;
  blockSize: number;
  /** Capacity in logical blocks. */
  blocks: number;
  journal: Journal;
  map: CaptureMap;
  /** Reads blocks of the main volume (frozen while the copy runs). */
  readBase(lba: number, blocks: number): Promise<Buffer>;
  /** Holds writes back while the drain does not keep up with them; absent: never. */
  throttle?: WriteThrottle;
}

/** Forwards a command to the main target on the initiator's own backend session. */
export interface Forwarder {
  execute(task: ScsiTask): Promise<ScsiOutcome>;
  nexusOpened?(nexus: ItNexus): Promise<void> | void;
  nexusClosed?(nexus: ItNexus): Promise<void> | void;
  reset?(nexus: ItNexus, kind: 'lun' | 'target-warm' | 'target-cold' | 'clear-task-set', lun: number): Promise<number>;
}

function check(key: number, code: { asc: number; ascq: number }, information?: number): ScsiOutcome {
  return { status: CHECK_CONDITION, sense: buildSense({ key, asc: code.asc, ascq: code.ascq, ...(information !== undefined ? { information } : {}) }) };
}

/** How long a GOOD access verdict of the main target is reused (see checkAccess). */
const ACCESS_VERDICT_MS = 1000;

/**
 * Commands that only ask: forwarding them changes no reservation, mode page or unit attention
 * other than the asker's own (REQUEST SENSE and a reported UA are per nexus, and a UA report on
 * the probe path voids the verdicts anyway).
 */
const PURE_QUERIES = new Set<number>([
  ScsiOp.TEST_UNIT_READY, ScsiOp.INQUIRY, ScsiOp.READ_CAPACITY_10, ScsiOp.SERVICE_ACTION_IN_16, ScsiOp.MODE_SENSE_6,
  ScsiOp.MODE_SENSE_10, ScsiOp.REPORT_LUNS, ScsiOp.PERSISTENT_RESERVE_IN, ScsiOp.SYNCHRONIZE_CACHE_10, ScsiOp.SYNCHRONIZE_CACHE_16,
]);

/** The key of a nexus's recent verdict for one kind of command. */
function accessKey(task: ScsiTask, cdb: BlockCdb): string {
  return `${task.nexus.initiatorPort}/${task.nexus.tsih}/${cdb.kind}`;
}

/** Plain READ/WRITE (10/12/16) without protection information: one verdict serves them all. */
function cacheableAccess(cdb: BlockCdb, raw: Buffer): boolean {
  return (cdb.kind === 'read' || cdb.kind === 'write') && cdb.cdbLength >= 10 && cdb.cdbLength <= 16 && (raw[1]! & 0xe0) === 0;
}

const INVALID_OPCODE = () => check(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE);
const OUT_OF_RANGE = () => check(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE);
const INVALID_FIELD = () => check(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB);
const INVALID_PARAMETER = () => check(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST);

function senseKeyOf(sense: Buffer): number | undefined {
  try {
    return parseSense(sense).key;
  } catch {
    return undefined;
  }
}

/** Commands outside decodeBlockCdb that return user data or compare against it. */
function readsMediumPastView(cdb: Buffer): boolean {
  const op = cdb[0];
  if (op === ScsiOp.READ_LONG_10) return true;
  if (op === ScsiOp.SERVICE_ACTION_IN_16) return cdb.length > 1 && (cdb[1]! & 0x1f) === ServiceActionIn16.READ_LONG_16;
  if (op === ScsiOp.VARIABLE_LENGTH && cdb.length >= 10) {
    const sa = cdb.readUInt16BE(8);
    return sa === VariableLengthSa.READ_32 || sa === VariableLengthSa.VERIFY_32;
  }
  return false;
}

const EMPTY = Buffer.alloc(0);
const SIMPLE_TASK = 1;
const NEVER_ABORTED = new AbortController().signal;

/**
 * What the main target's Block Limits (B0h) and Logical Block Provisioning (B2h) VPD pages
 * promise initiators. The capture device answers the medium commands itself, so it must hold
 * them to the same limits; 0 means no limit reported.
 */
export interface MainLimits {
  maxTransferBlocks: number;
  maxCompareAndWriteBlocks: number;
  maxWriteSameBlocks: number;
  maxUnmapBlocks: number;
  maxUnmapDescriptors: number;
  /** WRITE SAME(16) / WRITE SAME(10) may unmap (LBPWS, LBPWS10). */
  writeSameUnmap16: boolean;
  writeSameUnmap10: boolean;
  /** ANC_SUP: anchored unmapping. */
  anchor: boolean;
}

const NO_LIMITS: MainLimits = {
  maxTransferBlocks: 0,
  maxCompareAndWriteBlocks: 0,
  maxWriteSameBlocks: 0,
  maxUnmapBlocks: 0,
  maxUnmapDescriptors: 0,
  writeSameUnmap16: false,
  writeSameUnmap10: false,
  anchor: false,
};

/** Reads the limits out of the two VPD pages (either may be missing: undefined). */
export function parseMainLimits(blockLimits: Buffer | undefined, provisioning: Buffer | undefined): MainLimits {
  const out = { ...NO_LIMITS };
  if (blockLimits && blockLimits.length >= 4 && blockLimits[1] === 0xb0) {
    // Only the bytes both sent and inside the page length count.
    const end = Math.min(blockLimits.length, 4 + blockLimits.readUInt16BE(2));
    const u32 = (o: number) => (o + 4 <= end ? blockLimits.readUInt32BE(o) : 0);
    // 0 is read as "not reported", as initiators do: older targets leave it 0 and accept the command.
    if (end > 5) out.maxCompareAndWriteBlocks = blockLimits[5]!;
    out.maxTransferBlocks = u32(8);
    out.maxUnmapBlocks = u32(20);
    out.maxUnmapDescriptors = u32(24);
    // An 8-byte field; anything beyond 2^53 blocks is no limit in practice.
    if (44 <= end) out.maxWriteSameBlocks = Number(blockLimits.readBigUInt64BE(36) & 0x1f_ffff_ffff_ffffn);
  }
  if (provisioning && provisioning.length > 5 && provisioning[1] === 0xb2) {
    const b5 = provisioning[5]!;
    out.writeSameUnmap16 = (b5 & 0x40) !== 0;
    out.writeSameUnmap10 = (b5 & 0x20) !== 0;
    out.anchor = (b5 & 0x02) !== 0;
  }
  return out;
}

/** Where the transfer length sits in a block CDB, by opcode (10/12/16-byte forms). */
function lengthField(opcode: number, cdbLength: number): { offset: number; bytes: number } | undefined {
  if (opcode === ScsiOp.COMPARE_AND_WRITE) return { offset: 13, bytes: 1 };
  if (opcode === ScsiOp.WRITE_ATOMIC_16 || opcode === ScsiOp.WRITE_STREAM_16) return { offset: 12, bytes: 2 };
  if (cdbLength === 10) return { offset: 7, bytes: 2 };
  if (cdbLength === 12) return { offset: 6, bytes: 4 };
  if (cdbLength === 16) return { offset: 10, bytes: 4 };
  return undefined;
}

/**
 * The zero-length form of a medium command, for the main target to judge without moving a block:
 * the same CDB with its transfer length zeroed, which SBC defines as "no data, not an error". The
 * main target still applies everything it applies to the real command first: reservations,
 * software write protect, protection-information fields, the starting LBA, a pending unit
 * attention. Where zero means something else it is replaced: READ(6)/WRITE(6) (0 = 256 blocks)
 * by READ(10)/WRITE(10), WRITE SAME (0 = to the last LBA) by a zero-length WRITE of the same CDB
 * size and WRPROTECT.
 */
export function accessProbeCdb(cdb: BlockCdb, raw: Buffer): Buffer | undefined {
  const lba = cdb.lba;
  if (cdb.cdbLength === 6) {
    const out = Buffer.alloc(10);
    out[0] = cdb.kind === 'read' ? ScsiOp.READ_10 : ScsiOp.WRITE_10;
    out.writeUInt32BE(lba, 2);
    return out;
  }
  if (cdb.kind === 'write-same') {
    const out = Buffer.alloc(cdb.cdbLength);
    out[0] = cdb.cdbLength === 10 ? ScsiOp.WRITE_10 : ScsiOp.WRITE_16;
    out[1] = raw[1]! & 0xe0;
    if (cdb.cdbLength === 10) out.writeUInt32BE(lba, 2);
    else out.writeBigUInt64BE(BigInt(lba), 2);
    return out;
  }
  const out = Buffer.from(raw.subarray(0, cdb.cdbLength));
  if (cdb.kind === 'unmap') {
    out.writeUInt16BE(0, 7);
    return out;
  }
  const f = lengthField(cdb.opcode, cdb.cdbLength);
  if (!f) return undefined;
  out.fill(0, f.offset, f.offset + f.bytes);
  // FUA changes no verdict, but on a zero-length write some targets sync the whole file.
  if (cdb.fua) out[1] = out[1]! & ~0x08;
  return out;
}

/**
 * The device initiators talk to during a backup (DESIGN steps 3 and 4). Writes to the captured
 * LUN never reach the main volume: each is appended to the journal, made durable, reflected into
 * the snapshot map, and only then acknowledged. Reads come from the snapshot map where it has the
 * blocks, wait while an unreflected journal record overlaps them, and otherwise come from the
 * frozen main volume. Commands that do not touch the medium (INQUIRY, READ CAPACITY, MODE SENSE,
 * reservations...) go to the main target on the initiator's own backend session, so the device
 * identity and per-nexus state stay the main target's.
 *
 * The main target also stays the judge of whether a medium command may run at all: before the
 * capture device moves a block, the command's zero-length form goes to the main target on the
 * initiator's nexus, and any answer but GOOD (RESERVATION CONFLICT, DATA PROTECT, a unit
 * attention, an invalid protection field...) is the command's answer. The limits the main target
 * advertises in its VPD pages are enforced here, since no block of the real command reaches it.
 */
export class CaptureDevice implements ScsiTargetDevice {
  /** Serializes COMPARE AND WRITE / ORWRITE against overlapping writes of the capture view. */
  private readonly locks = new RangeLock();
  private inFlight = 0;
  private idleWaiters: Array<() => void> = [];
  private limits: Promise<MainLimits> | undefined;
  /** What `limits` resolved to, for the paths that must not wait for a promise. */
  private knownLimits: MainLimits | undefined;
  /**
   * Bumped by anything that can change the main target's verdict on a nexus's reads and writes:
   * a command forwarded to it that is not a pure query (PERSISTENT RESERVE OUT, RESERVE, MODE
   * SELECT...), a reset, a nexus coming or going, a refusal.
   */
  private accessEpoch = 0;
  /** Recent GOOD verdicts per nexus and direction, valid while the epoch is unchanged. */
  private readonly allowed = new Map<string, { epoch: number; until: number }>();

  constructor(
    private readonly ctx: CaptureContext,
    private readonly forward: Forwarder,
  ) {}

  get commandsInFlight(): number {
    return this.inFlight;
  }

  /** Resolves when no command of this device is executing. */
  idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  nexusOpened(nexus: ItNexus): Promise<void> | void {
    this.accessEpoch++;
    return this.forward.nexusOpened?.(nexus);
  }

  nexusClosed(nexus: ItNexus): Promise<void> | void {
    this.accessEpoch++;
    this.allowed.clear();
    return this.forward.nexusClosed?.(nexus);
  }

  reset(nexus: ItNexus, kind: 'lun' | 'target-warm' | 'target-cold' | 'clear-task-set', lun: number): Promise<number> {
    this.accessEpoch++;
    return this.forward.reset ? this.forward.reset(nexus, kind, lun) : Promise.resolve(0);
  }

  /** A command for the main target itself; one that may change access state voids the verdicts. */
  private forwardCommand(task: ScsiTask): Promise<ScsiOutcome> {
    if (!PURE_QUERIES.has(task.cdb[0]!)) this.accessEpoch++;
    return this.forward.execute(task);
  }

  // Not an async function, and neither are the paths of plain READ and WRITE below: at tens of
  // thousands of commands per second every promise a command costs shows up.
  execute(task: ScsiTask): Promise<ScsiOutcome> {
    this.inFlight++;
    let running: Promise<ScsiOutcome>;
    try {
      running = this.dispatch(task);
    } catch (err) {
      running = Promise.reject(err);
    }
    return running.then(
      (o) => {
        this.settled();
        return o;
      },
      (err: unknown) => {
        this.settled();
        throw err;
      },
    );
  }

  private settled(): void {
    if (--this.inFlight === 0) {
      const w = this.idleWaiters;
      this.idleWaiters = [];
      for (const f of w) f();
    }
  }

  /**
   * The zero-length form of the initiator's command, on the initiator's nexus and tied to its
   * task: it is not sent if the task is already aborted, and an abort of the task aborts it on the
   * main target.
   */
  private probeTask(task: ScsiTask, cdb: Buffer): ScsiTask {
    return {
      nexus: task.nexus,
      lun: task.lun,
      cdb,
      attr: task.attr,
      itt: task.itt,
      read: false,
      write: false,
      dataOut: EMPTY,
      dataInLength: 0,
      get signal() {
        return task.signal;
      },
      get aborted() {
        return task.aborted;
      },
      get onAbort() {
        return task.onAbort;
      },
      set onAbort(f) {
        task.onAbort = f;
      },
    };
  }

  /** A question about the device on the initiator's nexus; it runs whatever becomes of the task. */
  private inquiryTask(task: ScsiTask, page: number): ScsiTask {
    const len = 255;
    return { nexus: task.nexus, lun: task.lun, cdb: buildInquiry(true, page, len), attr: SIMPLE_TASK, itt: task.itt, read: true, write: false, dataOut: EMPTY, dataInLength: len, signal: NEVER_ABORTED };
  }

  /**
   * The main target's verdict on the command (see accessProbeCdb): undefined when it may run.
   *
   * A plain READ or WRITE (no protection information) that the main target allowed on this nexus
   * a moment ago, with nothing in between that could change its mind, is not asked again: the
   * probe is a round trip per command, and during a capture every initiator of the volume is on
   * detour, so every reservation or mode change passes through here and voids the verdict. The
   * verdict also expires after ACCESS_VERDICT_MS, which bounds how late a change made behind
   * detour's back (an administrator on the main target) is noticed.
   */
  private async checkAccess(task: ScsiTask, cdb: BlockCdb): Promise<ScsiOutcome | undefined> {
    const probe = accessProbeCdb(cdb, task.cdb);
    if (!probe) return undefined;
    const key = cacheableAccess(cdb, task.cdb) ? accessKey(task, cdb) : undefined;
    if (key !== undefined && this.recentlyAllowed(key)) return undefined;
    const epoch = this.accessEpoch;
    let o: ScsiOutcome;
    try {
      o = await this.forward.execute(this.probeTask(task, probe));
    } finally {
      // The probe is over: an abort of the task must not chase it any more.
      task.onAbort = undefined;
    }
    o.release?.();
    if ((o.response ?? 0) === 0 && o.status === GOOD) {
      if (key !== undefined && epoch === this.accessEpoch) this.allowed.set(key, { epoch, until: Date.now() + ACCESS_VERDICT_MS });
      return undefined;
    }
    // A refusal (a reservation, a unit attention...) may be news for other nexus too.
    this.accessEpoch++;
    return { status: o.status, ...(o.sense ? { sense: o.sense } : {}), ...(o.response ? { response: o.response } : {}) };
  }

  private recentlyAllowed(key: string): boolean {
    const v = this.allowed.get(key);
    return v !== undefined && v.epoch === this.accessEpoch && v.until > Date.now();
  }

  /** The main target's limits, asked once per capture on the first nexus that needs them. */
  private mainLimits(task: ScsiTask): Promise<MainLimits> {
    if (!this.limits) {
      const p = this.fetchLimits(task);
      this.limits = p;
      p.then(
        (l) => (this.knownLimits = l),
        () => {},
      );
      // A backend that failed to answer is asked again by the next command.
      p.catch(() => {
        if (this.limits === p) this.limits = undefined;
      });
    }
    return this.limits;
  }

  private async fetchLimits(task: ScsiTask): Promise<MainLimits> {
    const page = async (code: number): Promise<Buffer | undefined> => {
      // INQUIRY is neither held by reservations nor answered with a unit attention.
      const o = await this.forward.execute(this.inquiryTask(task, code));
      const data = o.status === GOOD && o.dataIn ? Buffer.from(o.dataIn) : undefined;
      o.release?.();
      if ((o.response ?? 0) === 0 && o.status === GOOD) return data;
      // ILLEGAL REQUEST: the page is not there, which is an answer. Anything else (no backend
      // session, a busy target) is not, and must not be remembered as "no limits".
      if (o.status === CHECK_CONDITION && o.sense && senseKeyOf(o.sense) === SenseKey.ILLEGAL_REQUEST) return undefined;
      throw new Error(`main target did not answer INQUIRY for VPD page 0x${code.toString(16)} (status 0x${o.status.toString(16)})`);
    };
    return parseMainLimits(await page(0xb0), await page(0xb2));
  }

  private dispatch(task: ScsiTask): Promise<ScsiOutcome> {
    if (task.lun !== this.ctx.lun) return this.forwardCommand(task);
    let cdb;
    try {
      cdb = decodeBlockCdb(task.cdb);
    } catch (err) {
      if (err instanceof ScsiCdbError) return Promise.resolve({ status: CHECK_CONDITION, sense: buildSense({ key: err.sense.key, asc: err.sense.asc, ascq: err.sense.ascq }) });
      throw err;
    }
    if (!cdb) {
      // Not a block I/O command. Anything else that could change the medium (FORMAT UNIT,
      // EXTENDED COPY, WRITE LONG...) must not reach the frozen volume, and nothing may read user
      // data from it past the capture view (READ LONG, READ(32)): refuse those. So are opcodes
      // nobody here knows, since they could be either (the obsolete XDWRITE family writes).
      if (scsiOpModifiesMedium(task.cdb) || readsMediumPastView(task.cdb) || scsiOpName(task.cdb).startsWith('UNKNOWN_')) return Promise.resolve(INVALID_OPCODE());
      return this.forwardCommand(task);
    }
    // SYNCHRONIZE CACHE and PRE-FETCH change no block: the main target answers them itself (every
    // acknowledged write is already durable in the journal; the frozen volume stays as it is).
    if (cdb.kind === 'synchronize-cache' || cdb.kind === 'pre-fetch') return this.forwardCommand(task);
    // A command of zero blocks moves no data either: the main target's answer is the whole answer.
    if (cdb.cdbLength !== 6 && cdb.kind !== 'write-same' && (cdb.kind === 'unmap' ? cdb.parameterListLength === 0 : cdb.blocks === 0)) {
      return this.forwardCommand(task);
    }
    if (cdb.kind === 'read') return this.read(task, cdb);
    if (cdb.kind === 'write') {
      // The common write: allowed on this nexus a moment ago, limits known. No promise but the
      // journal's own until GOOD.
      const limits = this.knownLimits;
      if (limits && cacheableAccess(cdb, task.cdb) && this.recentlyAllowed(accessKey(task, cdb))) return this.writeCommand(task, cdb, limits);
    }
    return this.medium(task, cdb);
  }

  /**
   * A READ. Blocks nobody has written since the freeze are only on the frozen main volume, so a
   * READ of nothing else is forwarded as it is on the initiator's own backend session: the main
   * target's answer (data, status, its own checks of the CDB, reservations, protection
   * information) is the whole answer, its data comes in a pooled buffer, and the reads of
   * different initiators do not queue behind each other or the backup's copy on one session.
   * Main is frozen (and the drain only writes blocks the map still holds), so what it returns is
   * the capture view. A READ of written blocks is put together from the journal and main.
   */
  private read(task: ScsiTask, cdb: BlockCdb): Promise<ScsiOutcome> {
    const { journal, map } = this.ctx;
    if (journal.unreflectedOverlapping(cdb.lba, cdb.blocks) === undefined && !map.overlaps(cdb.lba, cdb.blocks)) return this.forwardRead(task);
    return this.readWritten(task, cdb);
  }

  private forwardRead(task: ScsiTask): Promise<ScsiOutcome> {
    return this.forward.execute(task).then((o) => {
      // A refusal (a reservation, a unit attention...) may be news for other nexus too.
      if (o.status !== GOOD || (o.response ?? 0) !== 0) this.accessEpoch++;
      return o;
    });
  }

  private async readWritten(task: ScsiTask, cdb: BlockCdb): Promise<ScsiOutcome> {
    // Not before an overlapping write still on its way into the map: then look again.
    await this.waitForUnreflected(cdb.lba, cdb.blocks);
    if (!this.ctx.map.overlaps(cdb.lba, cdb.blocks)) return this.forwardRead(task);
    return this.medium(task, cdb);
  }

  /** Everything else that touches the medium: the main target's verdict first, then the capture view. */
  private async medium(task: ScsiTask, cdb: BlockCdb): Promise<ScsiOutcome> {
    if (cdb.kind === 'read' || cdb.kind === 'verify') {
      // Reads change nothing: ask the main target and read the capture view at the same time.
      const local = this.local(task, cdb);
      const refused = await this.checkAccess(task, cdb).catch((err: unknown) => {
        local.catch(() => {});
        throw err;
      });
      if (refused) {
        const o = await local.catch(() => undefined);
        o?.release?.();
        return refused;
      }
      return local;
    }
    const refused = await this.checkAccess(task, cdb);
    if (refused) return refused;
    return this.local(task, cdb);
  }

  /** The command against the capture view, once the main target has allowed it. */
  private async local(task: ScsiTask, cdb: BlockCdb): Promise<ScsiOutcome> {
    const { blockSize, blocks: capacity } = this.ctx;
    const inRange = (lba: number, n: number) => lba + n <= capacity;
    const limits = await this.mainLimits(task);
    const tooLong = (n: number) => limits.maxTransferBlocks > 0 && n > limits.maxTransferBlocks;
    switch (cdb.kind) {
      case 'read': {
        if (!inRange(cdb.lba, cdb.blocks)) return OUT_OF_RANGE();
        if (tooLong(cdb.blocks)) return INVALID_FIELD();
        const data = await this.readView(cdb.lba, cdb.blocks);
        return { status: GOOD, dataIn: data };
      }
      case 'write':
      case 'write-and-verify':
        return this.writeCommand(task, cdb, limits);
      case 'write-same': {
        // The journal stores one block repeated, or unmapped blocks: it has no room for anchored
        // state beyond what the main target itself supports, nor for LBDATA/PBDATA (obsolete).
        if (cdb.anchor && !limits.anchor) return INVALID_FIELD();
        if ((cdb.unmap || cdb.anchor) && !(cdb.cdbLength === 10 ? limits.writeSameUnmap10 : limits.writeSameUnmap16)) return INVALID_FIELD();
        if ((task.cdb[1]! & 0x06) !== 0) return INVALID_FIELD();
        if (cdb.lba >= capacity) return OUT_OF_RANGE();
        const n = cdb.toEndOfMedium ? capacity - cdb.lba : cdb.blocks;
        if (!inRange(cdb.lba, n)) return OUT_OF_RANGE();
        if (limits.maxWriteSameBlocks > 0 && n > limits.maxWriteSameBlocks) return INVALID_FIELD();
        if (cdb.unmap || cdb.anchor || cdb.ndob) {
          await this.write({ lba: cdb.lba, blocks: n, kind: 'unmap' });
          return { status: GOOD, dataOutLength: cdb.ndob ? 0 : blockSize };
        }
        if (task.dataOut.length < blockSize) return INVALID_FIELD();
        await this.write({ lba: cdb.lba, blocks: n, kind: 'write-same', data: task.dataOut.subarray(0, blockSize) });
        return { status: GOOD, dataOutLength: blockSize };
      }
      case 'unmap': {
        let extents;
        try {
          extents = decodeUnmapParameterList(task.dataOut);
        } catch (err) {
          if (err instanceof ScsiCdbError) return { status: CHECK_CONDITION, sense: buildSense({ key: err.sense.key, asc: err.sense.asc, ascq: err.sense.ascq }) };
          throw err;
        }
        if (limits.maxUnmapDescriptors > 0 && extents.length > limits.maxUnmapDescriptors) return INVALID_PARAMETER();
        for (const e of extents) if (limits.maxUnmapBlocks > 0 && e.blocks > limits.maxUnmapBlocks) return INVALID_PARAMETER();
        for (const e of extents) if (!inRange(e.lba, e.blocks)) return OUT_OF_RANGE();
        for (const e of extents) if (e.blocks > 0) await this.write({ lba: e.lba, blocks: e.blocks, kind: 'unmap' });
        return { status: GOOD };
      }
      case 'compare-and-write': {
        const n = cdb.numberOfLogicalBlocks ?? cdb.blocks;
        if (!inRange(cdb.lba, n)) return OUT_OF_RANGE();
        if (limits.maxCompareAndWriteBlocks > 0 && n > limits.maxCompareAndWriteBlocks) return INVALID_FIELD();
        if (task.dataOut.length !== 2 * n * blockSize) return INVALID_FIELD();
        const release = await this.locks.acquire(cdb.lba, n);
        try {
          const current = await this.readView(cdb.lba, n);
          const expected = task.dataOut.subarray(0, n * blockSize);
          if (!current.equals(expected)) {
            let i = 0;
            while (current[i] === expected[i]) i++;
            return check(SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY_OPERATION, i);
          }
          await this.append({ lba: cdb.lba, blocks: n, data: task.dataOut.subarray(n * blockSize) });
          return { status: GOOD };
        } finally {
          release();
        }
      }
      case 'orwrite': {
        if (!inRange(cdb.lba, cdb.blocks)) return OUT_OF_RANGE();
        if (tooLong(cdb.blocks)) return INVALID_FIELD();
        const len = cdb.blocks * blockSize;
        if (task.dataOut.length < len) return INVALID_FIELD();
        const release = await this.locks.acquire(cdb.lba, cdb.blocks);
        try {
          const current = await this.readView(cdb.lba, cdb.blocks);
          for (let i = 0; i < len; i++) current[i]! |= task.dataOut[i]!;
          await this.append({ lba: cdb.lba, blocks: cdb.blocks, data: current });
          return { status: GOOD };
        } finally {
          release();
        }
      }
      case 'verify': {
        const n = cdb.blocks;
        if (!inRange(cdb.lba, n)) return OUT_OF_RANGE();
        if (tooLong(n)) return INVALID_FIELD();
        if (!cdb.bytchk) return { status: GOOD };
        const current = await this.readView(cdb.lba, n);
        const expected = cdb.bytchk === 3 ? Buffer.concat(Array.from({ length: n }, () => task.dataOut.subarray(0, blockSize))) : task.dataOut;
        if (expected.length < current.length) return INVALID_FIELD();
        if (!current.equals(expected.subarray(0, current.length))) {
          let i = 0;
          while (current[i] === expected[i]) i++;
          return check(SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY_OPERATION, i);
        }
        return { status: GOOD };
      }
      default:
        return INVALID_OPCODE();
    }
  }

  /** WRITE and WRITE AND VERIFY (the data is durable in the journal, which verifies nothing less). */
  private writeCommand(task: ScsiTask, cdb: BlockCdb, limits: MainLimits): Promise<ScsiOutcome> {
    const { blockSize, blocks: capacity } = this.ctx;
    if (cdb.lba + cdb.blocks > capacity) return Promise.resolve(OUT_OF_RANGE());
    if (limits.maxTransferBlocks > 0 && cdb.blocks > limits.maxTransferBlocks) return Promise.resolve(INVALID_FIELD());
    const want = cdb.blocks * blockSize;
    const done: ScsiOutcome = { status: GOOD, dataOutLength: want };
    // Whole blocks that arrived are written, as a disk would (short Data-Out is a residual).
    const usable = Math.min(want, task.dataOut.length - (task.dataOut.length % blockSize));
    if (usable === 0) return Promise.resolve(done);
    return this.write({ lba: cdb.lba, blocks: usable / blockSize, data: task.dataOut.subarray(0, usable) }).then(() => done);
  }

  /**
   * A write into the capture view that reads nothing first (WRITE, WRITE SAME, UNMAP). It waits
   * for an overlapping COMPARE AND WRITE / ORWRITE to finish, never the reverse: one of those must
   * not see another write land between its read and its own write.
   */
  private write(req: AppendRequest): Promise<unknown> {
    if (this.locks.size > 0) return this.writeLocked(req);
    return this.append(req);
  }

  private async writeLocked(req: AppendRequest): Promise<void> {
    const release = await this.locks.acquire(req.lba, req.blocks);
    try {
      await this.append(req);
    } finally {
      release();
    }
  }

  /**
   * Journal append: resolves only after the record is durable and reflected into the snapshot
   * map (the journal calls the map's reflect hook before resolving), so GOOD may go out.
   *
   * The journal writes the data from the command's own buffer: a command's Data-Out, and the
   * buffers COMPARE AND WRITE and ORWRITE put together, are fresh per command and nothing
   * changes them before the command ends, which is after the append settles.
   */
  private append(req: AppendRequest): Promise<unknown> {
    // Every caller passes a request object of its own.
    req.borrow = true;
    const { journal, throttle } = this.ctx;
    // What the drain will have to write to main for it: the data, or one block for a range.
    const wait = throttle?.admit(req.kind === 'unmap' || req.kind === 'write-same' ? this.ctx.blockSize : req.blocks * this.ctx.blockSize);
    return wait ? wait.then(() => journal.append(req)) : journal.append(req);
  }

  /** Waits until no write still on its way into the snapshot map overlaps the range. */
  private async waitForUnreflected(lba: number, blocks: number): Promise<void> {
    const { journal } = this.ctx;
    for (let seq = journal.unreflectedOverlapping(lba, blocks); seq !== undefined; seq = journal.unreflectedOverlapping(lba, blocks)) {
      await journal.waitReflected(seq);
    }
  }

  /** Reads the capture view: snapshot map over the frozen main volume. */
  async readView(lba: number, blocks: number): Promise<Buffer> {
    const { journal, map, blockSize } = this.ctx;
    // A read must not overtake a write that is in the journal but not yet in the map.
    await this.waitForUnreflected(lba, blocks);
    for (;;) {
      const pieces = map.lookup(lba, blocks);
      try {
        if (pieces.length === 1) {
          // The common case, one source for the whole read: its buffer is the answer, uncopied.
          const p = pieces[0]!;
          const data = p.source === 'journal' ? await journal.readData(p.location, p.offsetInRecord, p.blocks) : await this.ctx.readBase(p.lba, p.blocks);
          return data.length === blocks * blockSize ? data : data.subarray(0, blocks * blockSize);
        }
        const out = Buffer.allocUnsafe(blocks * blockSize);
        await Promise.all(
          pieces.map(async (p) => {
            const data = p.source === 'journal' ? await journal.readData(p.location, p.offsetInRecord, p.blocks) : await this.ctx.readBase(p.lba, p.blocks);
            data.copy(out, (p.lba - lba) * blockSize, 0, p.blocks * blockSize);
          }),
        );
        return out;
      } catch (err) {
        // The drainer wrote these blocks to main and released them between our lookup and the
        // read: look again, they now come from main.
        if (err instanceof JournalDataDrainedError) continue;
        throw err;
      }
    }
  }
}
