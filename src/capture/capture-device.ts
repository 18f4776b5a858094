import {
  Asc,
  buildSense,
  decodeBlockCdb,
  decodeUnmapParameterList,
  ScsiCdbError,
  scsiOpModifiesMedium,
  SenseKey,
} from 'iscsi-node-wire';
import { RangeLock } from '../scsi/logical-unit.ts';
import type { ItNexus, ScsiOutcome, ScsiTargetDevice, ScsiTask } from '../scsi/task.ts';
import { JournalDataDrainedError, type Journal, type JournalLocation } from './journal.ts';

const GOOD = 0x00;
const CHECK_CONDITION = 0x02;

/** One piece of a capture-view read: journal data from the snapshot map, or the main volume. */
export type ViewPiece =
  | { lba: number; blocks: number; source: 'journal'; location: JournalLocation; offsetInRecord: number }
  | { lba: number; blocks: number; source: 'base' };

/** The snapshot map as the capture device needs it. */
export interface CaptureMap {
  lookup(lba: number, blocks: number): ViewPiece[];
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

const INVALID_OPCODE = () => check(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE);
const OUT_OF_RANGE = () => check(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE);
const INVALID_FIELD = () => check(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB);

/**
 * The device initiators talk to during a backup (DESIGN steps 3 and 4). Writes to the captured
 * LUN never reach the main volume: each is appended to the journal, made durable, reflected into
 * the snapshot map, and only then acknowledged. Reads come from the snapshot map where it has the
 * blocks, wait while an unreflected journal record overlaps them, and otherwise come from the
 * frozen main volume. Commands that do not touch the medium (INQUIRY, READ CAPACITY, MODE SENSE,
 * reservations...) go to the main target on the initiator's own backend session, so the device
 * identity and per-nexus state stay the main target's.
 */
export class CaptureDevice implements ScsiTargetDevice {
  /** Serializes COMPARE AND WRITE / ORWRITE against overlapping writes of the capture view. */
  private readonly locks = new RangeLock();
  private inFlight = 0;
  private idleWaiters: Array<() => void> = [];

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
    return this.forward.nexusOpened?.(nexus);
  }

  nexusClosed(nexus: ItNexus): Promise<void> | void {
    return this.forward.nexusClosed?.(nexus);
  }

  reset(nexus: ItNexus, kind: 'lun' | 'target-warm' | 'target-cold' | 'clear-task-set', lun: number): Promise<number> {
    return this.forward.reset ? this.forward.reset(nexus, kind, lun) : Promise.resolve(0);
  }

  async execute(task: ScsiTask): Promise<ScsiOutcome> {
    this.inFlight++;
    try {
      return await this.dispatch(task);
    } finally {
      if (--this.inFlight === 0) {
        const w = this.idleWaiters;
        this.idleWaiters = [];
        for (const f of w) f();
      }
    }
  }

  private async dispatch(task: ScsiTask): Promise<ScsiOutcome> {
    if (task.lun !== this.ctx.lun) return this.forward.execute(task);
    let cdb;
    try {
      cdb = decodeBlockCdb(task.cdb);
    } catch (err) {
      if (err instanceof ScsiCdbError) return { status: CHECK_CONDITION, sense: buildSense({ key: err.sense.key, asc: err.sense.asc, ascq: err.sense.ascq }) };
      throw err;
    }
    if (!cdb) {
      // Not a block I/O command. Anything else that could change the medium (FORMAT UNIT,
      // EXTENDED COPY, WRITE LONG...) must not reach the frozen volume: refuse it.
      if (scsiOpModifiesMedium(task.cdb)) return INVALID_OPCODE();
      return this.forward.execute(task);
    }
    const { blockSize, blocks: capacity } = this.ctx;
    const inRange = (lba: number, n: number) => lba + n <= capacity;
    switch (cdb.kind) {
      case 'read': {
        if (!inRange(cdb.lba, cdb.blocks)) return OUT_OF_RANGE();
        const data = cdb.blocks ? await this.readView(cdb.lba, cdb.blocks) : Buffer.alloc(0);
        return { status: GOOD, dataIn: data };
      }
      case 'write':
      case 'write-and-verify': {
        if (!inRange(cdb.lba, cdb.blocks)) return OUT_OF_RANGE();
        const want = cdb.blocks * blockSize;
        // Whole blocks that arrived are written, as a disk would (short Data-Out is a residual).
        const usable = Math.min(want, task.dataOut.length - (task.dataOut.length % blockSize));
        if (usable > 0) await this.write(cdb.lba, task.dataOut.subarray(0, usable));
        return { status: GOOD, dataOutLength: want };
      }
      case 'write-same': {
        const n = cdb.toEndOfMedium ? capacity - cdb.lba : cdb.blocks;
        if (!inRange(cdb.lba, n)) return OUT_OF_RANGE();
        if (n === 0) return { status: GOOD };
        if (cdb.unmap || cdb.ndob) {
          await this.append({ lba: cdb.lba, blocks: n, kind: 'unmap' });
          return { status: GOOD, dataOutLength: cdb.ndob ? 0 : blockSize };
        }
        if (task.dataOut.length < blockSize) return INVALID_FIELD();
        await this.append({ lba: cdb.lba, blocks: n, kind: 'write-same', data: task.dataOut.subarray(0, blockSize) });
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
        for (const e of extents) if (!inRange(e.lba, e.blocks)) return OUT_OF_RANGE();
        for (const e of extents) if (e.blocks > 0) await this.append({ lba: e.lba, blocks: e.blocks, kind: 'unmap' });
        return { status: GOOD };
      }
      case 'compare-and-write': {
        const n = cdb.numberOfLogicalBlocks ?? cdb.blocks;
        if (!inRange(cdb.lba, n)) return OUT_OF_RANGE();
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
        if (!cdb.bytchk || n === 0) return { status: GOOD };
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
      case 'synchronize-cache':
        // Every acknowledged write is already durable in the journal.
        if (!cdb.toEndOfMedium && !inRange(cdb.lba, cdb.blocks)) return OUT_OF_RANGE();
        return { status: GOOD };
      case 'pre-fetch':
        if (!cdb.toEndOfMedium && !inRange(cdb.lba, cdb.blocks)) return OUT_OF_RANGE();
        return { status: GOOD };
      default:
        return INVALID_OPCODE();
    }
  }

  /** A plain write into the capture view (whole blocks). */
  private async write(lba: number, data: Buffer): Promise<void> {
    const blocks = data.length / this.ctx.blockSize;
    // Writes wait for an overlapping COMPARE AND WRITE / ORWRITE to finish, never the reverse.
    if (this.locks.size > 0) {
      const release = await this.locks.acquire(lba, blocks);
      try {
        await this.append({ lba, blocks, data });
      } finally {
        release();
      }
      return;
    }
    await this.append({ lba, blocks, data });
  }

  /**
   * Journal append: resolves only after the record is durable and reflected into the snapshot
   * map (the journal calls the map's reflect hook before resolving), so GOOD may go out.
   */
  private async append(req: { lba: number; blocks: number; kind?: 'write' | 'write-same' | 'unmap'; data?: Buffer }): Promise<void> {
    await this.ctx.journal.append(req);
  }

  /** Reads the capture view: snapshot map over the frozen main volume. */
  async readView(lba: number, blocks: number): Promise<Buffer> {
    const { journal, map, blockSize } = this.ctx;
    // A read must not overtake a write that is in the journal but not yet in the map.
    for (let seq = journal.unreflectedOverlapping(lba, blocks); seq !== undefined; seq = journal.unreflectedOverlapping(lba, blocks)) {
      await journal.waitReflected(seq);
    }
    for (;;) {
      const out = Buffer.allocUnsafe(blocks * blockSize);
      const pieces = map.lookup(lba, blocks);
      try {
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
