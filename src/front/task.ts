import { RESERVED_TAG, type DataOut, type ScsiCommand } from 'iscsi-node-wire';
import { BufferPool, dataBuffers } from '../scsi/buffer-pool.ts';
import type { ItNexus, ScsiTask } from '../scsi/task.ts';
import type { FrontConnection } from './connection.ts';

interface R2TSequence {
  ttt: number;
  r2tSN: number;
  offset: number;
  end: number;
  next: number;
  expDataSN: number;
}

/**
 * A SCSI command on the target side, from arrival to status: it gathers the Data-Out (immediate,
 * unsolicited, then solicited by R2T within MaxBurstLength/MaxOutstandingR2T) and records what
 * the response needs (DataSN, R2TSN, residual inputs).
 */
const NO_DATA = Buffer.alloc(0);
const NO_R2TS: ReadonlyMap<number, R2TSequence> & Map<number, R2TSequence> = new Map();

export class FrontTask implements ScsiTask {
  readonly itt: number;
  readonly lun: number;
  readonly cdb: Buffer;
  readonly attr: number;
  readonly read: boolean;
  readonly write: boolean;
  readonly cmdSN: number;
  readonly expectedDataTransferLength: number;
  readonly dataInLength: number;
  /** Gathered Data-Out. */
  private buffer: Buffer | undefined;
  /** The pool buffer `buffer` lies in, if any: given back once the executor is done with it. */
  private pooled: Buffer | undefined;
  private received = 0;
  private unsolicitedOpen = false;
  private unsolicitedEnd = 0;
  private unsolicitedExpDataSN = 0;
  private solicitNext = 0;
  /** R2T sequences in flight; shared empty map until a write solicits data (reads never do). */
  private r2ts: Map<number, R2TSequence> = NO_R2TS;
  /** Created only if an executor asks for `signal`: most never do, and it is not free. */
  private controller: AbortController | undefined;
  nexus!: ItNexus;
  dataOut: Buffer = NO_DATA;
  onAbort?: () => void;
  delivered = false;
  /**
   * A Data-Out of this command was discarded for a data digest error: it will fail instead of
   * running, once the initiator has sent everything it was asked for.
   */
  corrupt = false;
  executing = false;
  finished = false;
  aborted = false;
  dataSN = 0;
  r2tSN = 0;
  done: Promise<void> = Promise.resolve();

  constructor(
    private readonly conn: FrontConnection,
    pdu: ScsiCommand,
  ) {
    this.itt = pdu.itt;
    this.lun = pdu.lun;
    this.cdb = pdu.cdb;
    this.attr = pdu.attr;
    this.read = pdu.read;
    this.write = pdu.write;
    this.cmdSN = pdu.cmdSN;
    this.expectedDataTransferLength = pdu.expectedDataTransferLength;
    // For a bidirectional command the read length comes from the AHS; EDTL is the write length.
    this.dataInLength = pdu.read ? (pdu.write ? (pdu.bidiReadDataLength ?? 0) : pdu.expectedDataTransferLength) : 0;
    if (pdu.write && pdu.expectedDataTransferLength > 0) {
      this.immediate = pdu.data;
      this.unsolicitedFinal = pdu.final;
    }
  }

  private immediate: Buffer | undefined;
  private unsolicitedFinal = true;

  get dataComplete(): boolean {
    // A corrupt command waits only for the sequences already open: the unsolicited burst and
    // the R2Ts in flight, each ended by its F bit.
    if (this.corrupt) return !this.unsolicitedOpen && this.r2ts.size === 0;
    return !this.write || this.received >= this.expectedDataTransferLength;
  }

  /** Begins data collection: takes immediate data, opens unsolicited data or sends R2Ts. */
  start(): void {
    if (!this.write || this.expectedDataTransferLength === 0) return;
    const edtl = this.expectedDataTransferLength;
    const imm = this.immediate ?? Buffer.alloc(0);
    this.immediate = undefined;
    // Immediate data the receiver placed at the start of a pool buffer sized for the whole
    // transfer (see FrontConnection.dataOutDestination): the rest is gathered behind it, uncopied.
    const behind = this.conn.adoptPooledPayload(imm);
    if (imm.length >= edtl) {
      // Everything came as immediate data: no copy at all.
      this.buffer = imm.subarray(0, edtl);
      this.pooled = behind;
      this.received = edtl;
      return;
    }
    if (behind && behind.length >= edtl) {
      this.pooled = behind;
      this.buffer = behind.subarray(0, edtl);
    } else {
      this.pooled = BufferPool.pooled(edtl) ? dataBuffers.take(edtl) : undefined;
      this.buffer = this.pooled ? this.pooled.subarray(0, edtl) : Buffer.allocUnsafe(edtl);
      imm.copy(this.buffer, 0);
    }
    this.received = imm.length;
    const p = this.conn.params!;
    this.unsolicitedEnd = imm.length;
    if (!p.initialR2T && !this.unsolicitedFinal) {
      this.unsolicitedOpen = true;
      return;
    }
    this.solicitNext = this.received;
    this.solicit();
  }

  /**
   * Where a Data-Out payload can be received in place: only for the PDU acceptData will take as
   * the next one of its sequence (same checks), so a stray or repeated PDU never touches data
   * already gathered.
   */
  placeFor(ttt: number, dataSN: number, offset: number, length: number): Buffer | undefined {
    if (this.finished || this.corrupt || !this.buffer || length === 0) return undefined;
    if (ttt === RESERVED_TAG) {
      if (!this.unsolicitedOpen || dataSN !== this.unsolicitedExpDataSN || offset !== this.unsolicitedEnd) return undefined;
      if (offset + length > Math.min(this.conn.params!.firstBurstLength, this.expectedDataTransferLength)) return undefined;
    } else {
      const seq = this.r2ts.get(ttt);
      if (!seq || dataSN !== seq.expDataSN || offset !== seq.next || offset + length > seq.end) return undefined;
    }
    return this.buffer.subarray(offset, offset + length);
  }

  /** Copies a payload into the gathered data unless the receiver already put it there. */
  private place(data: Buffer, offset: number): void {
    const b = this.buffer!;
    if (data.buffer === b.buffer && data.byteOffset === b.byteOffset + offset) return;
    data.copy(b, offset);
  }

  /** Accepts one Data-Out PDU; returns a description of the problem if it breaks the rules. */
  acceptData(pdu: DataOut): string | undefined {
    if (this.finished || !this.buffer) return undefined;
    const len = pdu.data.length;
    if (pdu.ttt === RESERVED_TAG) {
      if (!this.unsolicitedOpen) return 'unsolicited Data-Out not expected';
      const p = this.conn.params!;
      if (pdu.dataSN !== this.unsolicitedExpDataSN) return `DataSN ${pdu.dataSN}, expected ${this.unsolicitedExpDataSN}`;
      if (pdu.bufferOffset !== this.unsolicitedEnd) return `buffer offset ${pdu.bufferOffset}, expected ${this.unsolicitedEnd}`;
      const limit = Math.min(p.firstBurstLength, this.expectedDataTransferLength);
      if (pdu.bufferOffset + len > limit) return 'unsolicited data beyond FirstBurstLength';
      this.place(pdu.data, pdu.bufferOffset);
      this.unsolicitedExpDataSN++;
      this.unsolicitedEnd += len;
      this.received += len;
      if (pdu.final || this.unsolicitedEnd === limit) {
        this.unsolicitedOpen = false;
        this.solicitNext = this.unsolicitedEnd;
        this.solicit();
      }
      return undefined;
    }
    const seq = this.r2ts.get(pdu.ttt);
    if (!seq) return 'Data-Out for an unknown R2T';
    if (pdu.dataSN !== seq.expDataSN) return `DataSN ${pdu.dataSN}, expected ${seq.expDataSN}`;
    if (pdu.bufferOffset !== seq.next) return `buffer offset ${pdu.bufferOffset}, expected ${seq.next}`;
    if (seq.next + len > seq.end) return 'Data-Out beyond the R2T';
    this.place(pdu.data, pdu.bufferOffset);
    seq.next += len;
    seq.expDataSN++;
    this.received += len;
    if (seq.next === seq.end || pdu.final) {
      if (seq.next !== seq.end) return 'Data-Out sequence ended short of the R2T';
      this.r2ts.delete(seq.ttt);
      this.conn.releaseR2T(seq.ttt);
      this.solicit();
    }
    return undefined;
  }

  /** Keeps up to MaxOutstandingR2T R2Ts of at most MaxBurstLength in flight. */
  private solicit(): void {
    if (this.corrupt) return; // no point asking for data of a command that will fail
    const p = this.conn.params!;
    const edtl = this.expectedDataTransferLength;
    while (this.solicitNext < edtl && this.r2ts.size < p.maxOutstandingR2T) {
      const len = Math.min(p.maxBurstLength, edtl - this.solicitNext);
      const ttt = this.conn.registerR2T(this);
      const seq: R2TSequence = { ttt, r2tSN: this.r2tSN++, offset: this.solicitNext, end: this.solicitNext + len, next: this.solicitNext, expDataSN: 0 };
      if (this.r2ts === NO_R2TS) this.r2ts = new Map();
      this.r2ts.set(ttt, seq);
      this.solicitNext += len;
      this.conn.sendR2T(this, ttt, seq.offset, len, seq.r2tSN);
    }
  }

  get signal(): AbortSignal {
    if (!this.controller) {
      this.controller = new AbortController();
      if (this.aborted) this.controller.abort();
    }
    return this.controller.signal;
  }

  /** The task as its executor sees it: this object, with its gathered Data-Out in place. */
  toScsiTask(nexus: ItNexus): ScsiTask {
    this.nexus = nexus;
    this.dataOut = this.buffer ? this.buffer.subarray(0, this.received) : NO_DATA;
    return this;
  }

  /**
   * The executor has settled normally: nothing reads the Data-Out any more (a journal append, a
   * backend WRITE and a file write all resolve only after their last use of it), and with all of
   * it received no Data-Out PDU is placed here again. Its pool buffer can serve the next command.
   * Not after a failed executor (it may have left work in flight) nor for a task failed early
   * (a payload may still be on its way into the buffer): those are left to the garbage collector.
   */
  releaseDataOut(): void {
    const p = this.pooled;
    if (!p) return;
    this.pooled = undefined;
    this.buffer = undefined;
    this.dataOut = NO_DATA;
    dataBuffers.release(p);
  }

  /** Ends the task with a status before (or instead of) running it. */
  failEarly(status: number, sense: Buffer): void {
    if (this.finished) return;
    this.releaseAll();
    this.conn.complete(this, { status, sense });
  }

  finish(): void {
    this.finished = true;
    this.releaseAll();
  }

  abort(): void {
    if (this.aborted) return;
    this.aborted = true;
    this.controller?.abort();
    const hook = this.onAbort;
    this.onAbort = undefined;
    hook?.();
    this.finish();
  }

  private releaseAll(): void {
    if (this.r2ts.size === 0) return;
    for (const ttt of this.r2ts.keys()) this.conn.releaseR2T(ttt);
    this.r2ts.clear();
  }
}
