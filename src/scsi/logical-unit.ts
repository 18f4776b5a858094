// One logical unit of the embedded target: its identity, geometry, backing store, mode
// parameters, unit attention conditions per I_T nexus, and the two kinds of reservations.
// The command logic lives in spc.ts and sbc.ts; this module only holds state and the few
// primitives those handlers share (sense building, range locking, range checks).

import { createHash } from 'node:crypto';
import { Asc, SenseKey, buildSense, type SenseFormat } from '../../protocol/src/scsi/sense.ts';
import { BackingFile } from './backing-file.ts';
import { PersistentReservations } from './persistent-reservations.ts';
import type { ItNexus } from './task.ts';

export interface LogicalUnitConfig {
  /** LUN as the initiator addresses it. */
  lun: number;
  /** Image file; created sparse with `size` bytes when missing. */
  file: string;
  /** Capacity in bytes; the image is extended to it when smaller. */
  size?: number;
  /** Logical block length in bytes: a power of two from 512 to 65536. Default 512. */
  blockSize?: number;
  /** Unit serial number (VPD 80h). Default: derived from the image's resolved path, so it survives restarts. */
  serial?: string;
  /** T10 vendor identification, at most 8 ASCII characters. */
  vendor?: string;
  /** Product identification, at most 16 ASCII characters. */
  product?: string;
  /** Product revision level, at most 4 ASCII characters. */
  revision?: string;
  /** Present the unit write-protected and open the image read-only. */
  readOnly?: boolean;
  /**
   * Largest READ or WRITE in bytes (Block Limits MAXIMUM TRANSFER LENGTH; longer ones get INVALID
   * FIELD IN CDB). Default 64 MiB. A smaller one stands in for a target that states a low limit.
   */
  maxTransferBytes?: number;
}

/** A CHECK CONDITION the handlers raise; the dispatcher turns it into sense data. */
export class CheckCondition extends Error {
  constructor(
    readonly key: number,
    readonly asc: number,
    readonly ascq: number,
    readonly detail: {
      /** Sense-key specific field pointer: byte (and bit) of the CDB or parameter list at fault. */
      field?: { inCdb: boolean; byte: number; bit?: number };
      information?: number | bigint;
    } = {},
  ) {
    super(`CHECK CONDITION ${key.toString(16)}/${asc.toString(16).padStart(2, '0')}/${ascq.toString(16).padStart(2, '0')}`);
    this.name = 'CheckCondition';
  }
}

/** The command conflicts with a reservation: status RESERVATION CONFLICT, no sense data. */
export class ReservationConflict extends Error {
  constructor() {
    super('RESERVATION CONFLICT');
    this.name = 'ReservationConflict';
  }
}

export const invalidFieldInCdb = (byte: number, bit?: number): CheckCondition =>
  new CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB.asc, Asc.INVALID_FIELD_IN_CDB.ascq, {
    field: bit === undefined ? { inCdb: true, byte } : { inCdb: true, byte, bit },
  });

export const invalidFieldInParameterList = (byte: number, bit?: number): CheckCondition =>
  new CheckCondition(
    SenseKey.ILLEGAL_REQUEST,
    Asc.INVALID_FIELD_IN_PARAMETER_LIST.asc,
    Asc.INVALID_FIELD_IN_PARAMETER_LIST.ascq,
    { field: bit === undefined ? { inCdb: false, byte } : { inCdb: false, byte, bit } },
  );

export const parameterListLengthError = (): CheckCondition =>
  new CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR.asc, Asc.PARAMETER_LIST_LENGTH_ERROR.ascq);

export const lbaOutOfRange = (): CheckCondition =>
  new CheckCondition(
    SenseKey.ILLEGAL_REQUEST,
    Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE.asc,
    Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE.ascq,
  );

export const writeProtected = (): CheckCondition =>
  new CheckCondition(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED.asc, Asc.WRITE_PROTECTED.ascq);

/** ILLEGAL REQUEST, INVALID FIELD IN INFORMATION UNIT: the Data-Out does not fit the CDB. */
export const invalidFieldInInformationUnit = (): CheckCondition => new CheckCondition(SenseKey.ILLEGAL_REQUEST, 0x0e, 0x03);

export const miscompare = (offset: number): CheckCondition =>
  new CheckCondition(
    SenseKey.MISCOMPARE,
    Asc.MISCOMPARE_DURING_VERIFY_OPERATION.asc,
    Asc.MISCOMPARE_DURING_VERIFY_OPERATION.ascq,
    { information: offset },
  );

/**
 * The SCSI identity of an I_T nexus: initiator port name plus target port (TargetName is the same
 * for every nexus a device sees, the portal group tag tells target ports apart).
 */
export function nexusKey(n: ItNexus): string {
  return `${n.initiatorPort}|${n.portalGroupTag}`;
}

/**
 * Exclusive locks on LBA ranges, granted first come first served. Writes take them so that the
 * read-modify-write commands (COMPARE AND WRITE, ORWRITE) and multi-step ones (WRITE SAME, WRITE
 * AND VERIFY, UNMAP) are atomic against overlapping writes, while commands on disjoint ranges run
 * in parallel. Reads take no lock.
 */
interface LockEntry {
  start: number;
  end: number;
  granted: boolean;
  wake?: () => void;
}

export class RangeLock {
  private readonly entries: LockEntry[] = [];

  /** Ranges held or waited for. */
  get size(): number {
    return this.entries.length;
  }

  /** Resolves, once the range is free, to the function that releases it. */
  async acquire(lba: number, blocks: number): Promise<() => void> {
    const entry: LockEntry = { start: lba, end: lba + blocks, granted: false };
    // Overlapping an earlier waiter also blocks, so that overlapping commands keep their order.
    const blocked = this.entries.some((e) => overlaps(e, entry));
    this.entries.push(entry);
    if (blocked) await new Promise<void>((resolve) => (entry.wake = resolve));
    entry.granted = true;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.release(entry);
    };
  }

  private release(entry: LockEntry): void {
    const i = this.entries.indexOf(entry);
    if (i >= 0) this.entries.splice(i, 1);
    for (let j = 0; j < this.entries.length; j++) {
      const w = this.entries[j]!;
      if (w.granted || !w.wake) continue;
      let free = true;
      for (let k = 0; k < j; k++) {
        if (overlaps(this.entries[k]!, w)) {
          free = false;
          break;
        }
      }
      if (free) {
        const wake = w.wake;
        w.wake = undefined;
        w.granted = true;
        wake();
      }
    }
  }
}

function overlaps(a: LockEntry, b: LockEntry): boolean {
  return a.start < b.end && b.start < a.end;
}

export interface UnitAttention {
  asc: number;
  ascq: number;
}

/** Block Limits (VPD B0h) values; the handlers enforce exactly what the page announces. */
export interface BlockLimits {
  maxTransferBlocks: number;
  optimalTransferBlocks: number;
  optimalTransferGranularity: number;
  maxCompareAndWriteBlocks: number;
  maxWriteSameBlocks: number;
  maxUnmapBlocks: number;
  maxUnmapDescriptors: number;
}

// Locally administered company identifier (the IEEE "X" bit is set), so the NAA designators we
// make up can never collide with those of a vendor that owns an OUI.
const NAA_COMPANY_ID = 0x02de70;
const MAX_UA_QUEUE = 16;

function asciiField(name: string, value: string, max: number): string {
  if (value.length > max || !/^[\x20-\x7e]*$/.test(value)) {
    throw new RangeError(`${name} must be at most ${max} printable ASCII characters, got ${JSON.stringify(value)}`);
  }
  return value.padEnd(max, ' ');
}

export class LogicalUnit {
  readonly lun: number;
  readonly blockSize: number;
  readonly vendor: string;
  readonly product: string;
  readonly revision: string;
  readonly readOnly: boolean;
  readonly limits: BlockLimits;
  readonly locks = new RangeLock();
  readonly pr: PersistentReservations;

  /** Write cache enable (caching mode page): off means every write is made durable before GOOD. */
  wce = true;
  /** Descriptor format sense data (control mode page D_SENSE). */
  dSense = false;
  /** The I_T nexus holding an SPC-2 RESERVE, if any. */
  spc2Holder: string | undefined;

  private store: BackingFile | undefined;
  private serialNumber: string | undefined;
  private naaId: Buffer | undefined;
  private blocks = 0;
  private readonly uas = new Map<string, UnitAttention[]>();

  constructor(private readonly config: LogicalUnitConfig) {
    if (!Number.isInteger(config.lun) || config.lun < 0 || config.lun > 16383) {
      throw new RangeError(`LUN must be 0..16383, got ${config.lun}`);
    }
    const bs = config.blockSize ?? 512;
    if (!Number.isInteger(bs) || bs < 512 || bs > 65536 || (bs & (bs - 1)) !== 0) {
      throw new RangeError(`block size must be a power of two from 512 to 65536, got ${bs}`);
    }
    this.lun = config.lun;
    this.blockSize = bs;
    this.vendor = asciiField('vendor', config.vendor ?? 'DETOUR', 8);
    this.product = asciiField('product', config.product ?? 'EMBEDDED-DISK', 16);
    this.revision = asciiField('revision', config.revision ?? '0001', 4);
    if (config.serial !== undefined) {
      if (config.serial.length === 0 || config.serial.length > 64 || !/^[\x21-\x7e]+$/.test(config.serial)) {
        throw new RangeError(`serial must be 1..64 printable ASCII characters without spaces, got ${JSON.stringify(config.serial)}`);
      }
    }
    this.readOnly = config.readOnly ?? false;
    // One command moves at most 64 MiB: bounded memory per command, and bounded latency for the
    // commands that zero or compare ranges without moving data.
    const maxBlocks = Math.floor((64 << 20) / bs);
    const maxTransfer = config.maxTransferBytes ?? 64 << 20;
    if (!Number.isSafeInteger(maxTransfer) || maxTransfer < bs || maxTransfer > 64 << 20) {
      throw new RangeError(`maxTransferBytes must be from one block (${bs}) to 64 MiB, got ${maxTransfer}`);
    }
    this.limits = {
      maxTransferBlocks: Math.floor(maxTransfer / bs),
      // SBC: never above the maximum.
      optimalTransferBlocks: Math.max(1, Math.floor(Math.min(1 << 20, maxTransfer) / bs)),
      optimalTransferGranularity: Math.max(1, 4096 / bs),
      maxCompareAndWriteBlocks: 255,
      maxWriteSameBlocks: maxBlocks,
      maxUnmapBlocks: maxBlocks,
      maxUnmapDescriptors: 256,
    };
    this.pr = new PersistentReservations((key, asc, ascq) => this.addUa(key, { asc, ascq }));
  }

  async open(): Promise<void> {
    if (this.store) return;
    const opts: { size?: number; readOnly?: boolean } = { readOnly: this.readOnly };
    if (this.config.size !== undefined) opts.size = this.config.size;
    const store = await BackingFile.open(this.config.file, opts);
    const blocks = Math.floor(store.size / this.blockSize);
    if (blocks < 1) {
      await store.close();
      throw new RangeError(`${this.config.file}: smaller than one ${this.blockSize}-byte block`);
    }
    this.store = store;
    this.blocks = blocks;
    this.serialNumber =
      this.config.serial ??
      createHash('sha256').update(`detour-lu:${store.path}`).digest('hex').slice(0, 20).toUpperCase();
    this.naaId = makeNaa6(this.serialNumber);
  }

  async close(): Promise<void> {
    const store = this.store;
    this.store = undefined;
    if (store) await store.close();
  }

  get isOpen(): boolean {
    return this.store !== undefined;
  }

  get backing(): BackingFile {
    if (!this.store) throw new Error(`LUN ${this.lun} is not open`);
    return this.store;
  }

  /** Number of logical blocks. */
  get capacity(): number {
    return this.blocks;
  }

  get serial(): string {
    if (this.serialNumber === undefined) throw new Error(`LUN ${this.lun} is not open`);
    return this.serialNumber;
  }

  /** The 16-byte NAA IEEE Registered Extended designator (VPD 83h), stable for a given serial. */
  get naa(): Buffer {
    if (!this.naaId) throw new Error(`LUN ${this.lun} is not open`);
    return this.naaId;
  }

  get senseFormat(): SenseFormat {
    return this.dSense ? 'descriptor' : 'fixed';
  }

  /** Sense data for a check condition, in the format the control mode page selects. */
  senseFor(c: CheckCondition, format: SenseFormat = this.senseFormat): Buffer {
    return buildConditionSense(c, format);
  }

  /**
   * Range check shared by the medium access commands. With zero blocks the LBA itself must still
   * exist, as SBC requires of READ/WRITE/VERIFY/PRE-FETCH with a zero transfer length.
   */
  checkRange(lba: number, blocks: number): void {
    if (blocks === 0 ? lba >= this.blocks : lba + blocks > this.blocks) throw lbaOutOfRange();
  }

  // --- Unit attention conditions (per I_T nexus, this LU) ---

  /** A new I_T nexus (or a reset seen by it): any earlier condition is superseded by the reset. */
  resetUa(key: string, ua: UnitAttention = { asc: 0x29, ascq: 0x00 }): void {
    this.uas.set(key, [ua]);
  }

  addUa(key: string, ua: UnitAttention): void {
    const q = this.uas.get(key);
    if (!q) {
      // No session on this nexus: its next login starts with POWER ON/RESET, which supersedes this.
      return;
    }
    if (q.some((u) => u.asc === ua.asc && u.ascq === ua.ascq)) return;
    if (q.length >= MAX_UA_QUEUE) q.shift();
    q.push(ua);
  }

  /** Establish a unit attention for every nexus with a session, except `except`. */
  addUaAll(ua: UnitAttention, except?: string): void {
    for (const key of this.uas.keys()) if (key !== except) this.addUa(key, ua);
  }

  resetUaAll(ua: UnitAttention): void {
    for (const key of this.uas.keys()) this.resetUa(key, ua);
  }

  /** Reports and clears the oldest pending unit attention of the nexus. */
  takeUa(key: string): UnitAttention | undefined {
    return this.uas.get(key)?.shift();
  }

  nexusOpened(key: string): void {
    this.resetUa(key);
  }

  /** The last session of the nexus ended: I_T nexus loss releases an SPC-2 reservation. */
  nexusClosed(key: string): void {
    this.uas.delete(key);
    if (this.spc2Holder === key) this.spc2Holder = undefined;
  }

  /** LOGICAL UNIT RESET / target reset: SPC-2 reservation released, everyone told. */
  reset(cold: boolean): void {
    this.spc2Holder = undefined;
    if (cold) {
      // A cold reset is a power cycle: mode parameters return to their defaults and persistent
      // reservations without APTPL (we never keep APTPL) are lost.
      this.wce = true;
      this.dSense = false;
      this.pr.clearAll();
    }
    this.resetUaAll({ asc: 0x29, ascq: 0x00 });
  }
}

export function buildConditionSense(c: CheckCondition, format: SenseFormat): Buffer {
  const f = c.detail.field;
  return buildSense({
    key: c.key,
    asc: c.asc,
    ascq: c.ascq,
    format,
    ...(c.detail.information !== undefined ? { information: c.detail.information } : {}),
    ...(f
      ? {
          senseKeySpecific:
            f.bit === undefined
              ? { type: 'field-pointer' as const, inCdb: f.inCdb, fieldPointer: f.byte }
              : { type: 'field-pointer' as const, inCdb: f.inCdb, fieldPointer: f.byte, bitPointer: f.bit },
        }
      : {}),
  });
}

/**
 * NAA 6 (IEEE Registered Extended): NAA(4) | company id(24) | vendor specific id(36) | extension(64).
 * The 100 vendor bits come from a hash of the serial so the designator is stable and unique per LU.
 */
function makeNaa6(serial: string): Buffer {
  const h = createHash('sha256').update(`detour-naa:${serial}`).digest();
  let v = 0x6n;
  v = (v << 24n) | BigInt(NAA_COMPANY_ID);
  v = (v << 100n) | (BigInt('0x' + h.subarray(0, 13).toString('hex')) & ((1n << 100n) - 1n));
  const out = Buffer.alloc(16);
  out.writeBigUInt64BE(v >> 64n, 0);
  out.writeBigUInt64BE(v & 0xffff_ffff_ffff_ffffn, 8);
  return out;
}
