import { snAdd, snInWindow } from '../../protocol/src/serial.ts';
import type { ItNexus } from '../scsi/task.ts';
import type { FrontConnection } from './connection.ts';
import type { FrontTarget, OperationalParams } from './types.ts';

/**
 * A normal or discovery session. With MaxConnections=1 it has at most one connection at a time;
 * the CmdSN window lives here because RFC 7143 makes it session-wide.
 */
export class FrontSession {
  expCmdSN: number;
  readonly connections = new Set<FrontConnection>();
  /** Non-immediate commands that arrived ahead of ExpCmdSN, waiting for the gap to fill. */
  private readonly pending = new Map<number, () => void>();
  closed = false;

  constructor(
    readonly tsih: number,
    readonly isid: Buffer,
    readonly initiatorName: string,
    readonly target: FrontTarget | undefined,
    readonly discovery: boolean,
    readonly params: OperationalParams,
    firstCmdSN: number,
    private readonly window: number,
  ) {
    this.expCmdSN = firstCmdSN;
  }

  get maxCmdSN(): number {
    return snAdd(this.expCmdSN, this.window - 1);
  }

  /** Built once: every field comes from the login and never changes; frozen, since it is shared. */
  private nexusCache: ItNexus | undefined;

  get nexus(): ItNexus {
    if (this.nexusCache) return this.nexusCache;
    const isid = this.isid.toString('hex');
    this.nexusCache = Object.freeze({
      initiatorName: this.initiatorName,
      isid,
      tsih: this.tsih,
      targetName: this.target?.name ?? '',
      portalGroupTag: this.target?.portalGroupTag ?? 1,
      initiatorPort: `${this.initiatorName},i,0x${isid}`,
    });
    return this.nexusCache;
  }

  /**
   * Admits a non-immediate command numbered `cmdSN`: runs `deliver` now if it is the next one,
   * later if it is ahead inside the window, and never if it is outside the window (RFC 7143
   * 4.2.2.1: such commands are silently ignored). Returns false when ignored.
   */
  admit(cmdSN: number, deliver: () => void): boolean {
    if (!snInWindow(cmdSN, this.expCmdSN, this.maxCmdSN)) return false;
    if (cmdSN !== this.expCmdSN) {
      if (this.pending.has(cmdSN)) return false; // a duplicate of a command still queued
      this.pending.set(cmdSN, deliver);
      return true;
    }
    this.expCmdSN = snAdd(this.expCmdSN, 1);
    deliver();
    for (let next = this.pending.get(this.expCmdSN); next; next = this.pending.get(this.expCmdSN)) {
      this.pending.delete(this.expCmdSN);
      this.expCmdSN = snAdd(this.expCmdSN, 1);
      next();
    }
    return true;
  }

  dropPending(): void {
    this.pending.clear();
  }
}

/** TSIH allocation and session lookup for a portal group. */
export class SessionTable {
  private readonly byTsih = new Map<number, FrontSession>();
  private nextTsih = 1;

  allocateTsih(): number {
    for (let i = 0; i < 0xffff; i++) {
      const t = this.nextTsih;
      this.nextTsih = this.nextTsih === 0xffff ? 1 : this.nextTsih + 1;
      if (!this.byTsih.has(t)) return t;
    }
    throw new Error('no free TSIH');
  }

  add(s: FrontSession): void {
    this.byTsih.set(s.tsih, s);
  }

  get(tsih: number): FrontSession | undefined {
    return this.byTsih.get(tsih);
  }

  remove(s: FrontSession): void {
    if (this.byTsih.get(s.tsih) === s) this.byTsih.delete(s.tsih);
  }

  /** The session of the same initiator port (InitiatorName + ISID) on the same target, if any. */
  findByInitiatorPort(initiatorName: string, isid: Buffer, targetName: string | undefined): FrontSession | undefined {
    for (const s of this.byTsih.values()) {
      if (s.initiatorName === initiatorName && s.isid.equals(isid) && s.target?.name === targetName && !s.discovery) return s;
    }
    return undefined;
  }

  all(): FrontSession[] {
    return [...this.byTsih.values()];
  }
}
