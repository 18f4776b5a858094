// Persistent reservations (SPC-4 5.12, PERSISTENT RESERVE IN/OUT) of one logical unit, as a pure
// state machine: registrations and the reservation are kept in memory (APTPL is refused), and
// unit attentions for other I_T nexuses are reported through a callback. I_T nexuses are
// identified by an opaque key (see nexusKey() in logical-unit.ts).

export const PrType = {
  WRITE_EXCLUSIVE: 0x1,
  EXCLUSIVE_ACCESS: 0x3,
  WRITE_EXCLUSIVE_REGISTRANTS_ONLY: 0x5,
  EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: 0x6,
  WRITE_EXCLUSIVE_ALL_REGISTRANTS: 0x7,
  EXCLUSIVE_ACCESS_ALL_REGISTRANTS: 0x8,
} as const;

export const PrOutAction = {
  REGISTER: 0x00,
  RESERVE: 0x01,
  RELEASE: 0x02,
  CLEAR: 0x03,
  PREEMPT: 0x04,
  PREEMPT_AND_ABORT: 0x05,
  REGISTER_AND_IGNORE_EXISTING_KEY: 0x06,
} as const;

/**
 * How a command is treated by a persistent reservation held by someone else (SPC-4 table
 * "SPC commands that are allowed in the presence of various reservations", SBC-3 table 13):
 * 'read' conflicts only under the exclusive access types, 'write' under every type unless the
 * I_T nexus is registered and the type is a registrants-only or all-registrants one.
 */
export type PrAccess = 'allowed' | 'read' | 'write';

export interface PrNexus {
  /** Identity of the I_T nexus. */
  key: string;
  /** SCSI initiator port name, "<InitiatorName>,i,0x<ISID>", for TransportIDs. */
  initiatorPort: string;
  /** RELATIVE TARGET PORT IDENTIFIER the command arrived through. */
  relativeTargetPort: number;
}

export type PrOutResult =
  | { status: 'good' }
  | { status: 'conflict' }
  | { status: 'check'; error: 'invalid-field-cdb' | 'invalid-field-parameter-list'; byte: number; bit?: number }
  | { status: 'check'; error: 'parameter-list-length' | 'invalid-release' };

interface Registration {
  key: bigint;
  initiatorPort: string;
  relativeTargetPort: number;
}

const RESERVATIONS_PREEMPTED = [0x2a, 0x03] as const;
const RESERVATIONS_RELEASED = [0x2a, 0x04] as const;
const REGISTRATIONS_PREEMPTED = [0x2a, 0x05] as const;

const BASIC_PARAMETER_LIST_LENGTH = 24;

export function isAllRegistrants(type: number): boolean {
  return type === PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS || type === PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS;
}

function isRegistrantsOnly(type: number): boolean {
  return type === PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY || type === PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY;
}

function isValidType(type: number): boolean {
  return (Object.values(PrType) as number[]).includes(type);
}

export class PersistentReservations {
  /** PRGENERATION: bumped by every successful REGISTER, CLEAR and PREEMPT. */
  generation = 0;
  private readonly regs = new Map<string, Registration>();
  private reservation: { holder: string; type: number } | undefined;

  constructor(private readonly notify: (nexusKey: string, asc: number, ascq: number) => void) {}

  get registrationCount(): number {
    return this.regs.size;
  }

  get reservationType(): number | undefined {
    return this.reservation?.type;
  }

  isRegistered(key: string): boolean {
    return this.regs.has(key);
  }

  /** With an all-registrants reservation every registrant is a holder. */
  isHolder(key: string): boolean {
    const r = this.reservation;
    if (!r) return false;
    return isAllRegistrants(r.type) ? this.regs.has(key) : r.holder === key;
  }

  /** Whether a command of the given access class from this nexus conflicts with the reservation. */
  conflicts(key: string, access: PrAccess): boolean {
    const r = this.reservation;
    if (!r || access === 'allowed' || this.isHolder(key)) return false;
    const registered = this.regs.has(key);
    switch (r.type) {
      case PrType.WRITE_EXCLUSIVE:
        return access === 'write';
      case PrType.EXCLUSIVE_ACCESS:
        return true;
      case PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY:
      case PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS:
        return access === 'write' && !registered;
      default:
        return !registered;
    }
  }

  /** Power cycle: nothing is persisted through power loss (APTPL is never accepted). */
  clearAll(): void {
    this.regs.clear();
    this.reservation = undefined;
  }

  // --- PERSISTENT RESERVE IN (full parameter data; the caller applies the allocation length) ---

  readKeys(): Buffer {
    const out = Buffer.alloc(8 + 8 * this.regs.size);
    out.writeUInt32BE(this.generation >>> 0, 0);
    out.writeUInt32BE(8 * this.regs.size, 4);
    let o = 8;
    for (const r of this.regs.values()) {
      out.writeBigUInt64BE(r.key, o);
      o += 8;
    }
    return out;
  }

  readReservation(): Buffer {
    const r = this.reservation;
    const out = Buffer.alloc(r ? 24 : 8);
    out.writeUInt32BE(this.generation >>> 0, 0);
    if (r) {
      out.writeUInt32BE(16, 4);
      // An all-registrants reservation has no single holder; SPC says report key zero.
      const key = isAllRegistrants(r.type) ? 0n : (this.regs.get(r.holder)?.key ?? 0n);
      out.writeBigUInt64BE(key, 8);
      out[21] = r.type; // SCOPE 0h (logical unit) in the high nibble
    }
    return out;
  }

  reportCapabilities(): Buffer {
    const out = Buffer.alloc(8);
    out.writeUInt16BE(8, 0);
    // CRH: RESERVE/RELEASE(6/10) follow the SPC-3 compatible reservation handling rules.
    // SIP_C, ATP_C and PTPL_C stay zero: SPEC_I_PT, ALL_TG_PT and APTPL are refused.
    out[2] = 0x10;
    out[3] = 0x80; // TMV: the type mask below is valid; ALLOW COMMANDS 000b
    out[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02; // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX
    out[5] = 0x01; // EX_AC_AR
    return out;
  }

  readFullStatus(): Buffer {
    const parts: Buffer[] = [];
    for (const [k, reg] of this.regs) {
      const tid = iscsiTransportId(reg.initiatorPort);
      const d = Buffer.alloc(24 + tid.length);
      d.writeBigUInt64BE(reg.key, 0);
      if (this.isHolder(k)) {
        d[12] = 0x01; // R_HOLDER
        d[13] = this.reservation!.type;
      }
      d.writeUInt16BE(reg.relativeTargetPort & 0xffff, 18);
      d.writeUInt32BE(tid.length, 20);
      tid.copy(d, 24);
      parts.push(d);
    }
    const body = Buffer.concat(parts);
    const header = Buffer.alloc(8);
    header.writeUInt32BE(this.generation >>> 0, 0);
    header.writeUInt32BE(body.length, 4);
    return Buffer.concat([header, body]);
  }

  // --- PERSISTENT RESERVE OUT ---

  /**
   * Runs one service action. `scopeType` is CDB byte 2, `parameterListLength` CDB bytes 5-8 and
   * `data` the Data-Out buffer.
   */
  out(nexus: PrNexus, action: number, scopeType: number, parameterListLength: number, data: Buffer): PrOutResult {
    if (parameterListLength !== BASIC_PARAMETER_LIST_LENGTH || data.length < BASIC_PARAMETER_LIST_LENGTH) {
      return { status: 'check', error: 'parameter-list-length' };
    }
    const resKey = data.readBigUInt64BE(0);
    const saKey = data.readBigUInt64BE(8);
    const flags = data[20]!;
    if (flags & 0x08) return { status: 'check', error: 'invalid-field-parameter-list', byte: 20, bit: 3 };
    if (flags & 0x04) return { status: 'check', error: 'invalid-field-parameter-list', byte: 20, bit: 2 };
    const registering = action === PrOutAction.REGISTER || action === PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY;
    if (registering && flags & 0x01) return { status: 'check', error: 'invalid-field-parameter-list', byte: 20, bit: 0 };

    const scope = scopeType >> 4;
    const type = scopeType & 0x0f;
    const needsType =
      action === PrOutAction.RESERVE ||
      action === PrOutAction.RELEASE ||
      action === PrOutAction.PREEMPT ||
      action === PrOutAction.PREEMPT_AND_ABORT;
    if (needsType) {
      if (scope !== 0) return { status: 'check', error: 'invalid-field-cdb', byte: 2, bit: 7 };
      if (!isValidType(type)) return { status: 'check', error: 'invalid-field-cdb', byte: 2, bit: 3 };
    }

    const reg = this.regs.get(nexus.key);
    if (registering) return this.register(nexus, reg, action === PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, resKey, saKey);
    // Every other service action needs a registration under the key given.
    if (!reg || reg.key !== resKey) return { status: 'conflict' };
    switch (action) {
      case PrOutAction.RESERVE:
        return this.reserve(nexus.key, type);
      case PrOutAction.RELEASE:
        return this.release(nexus.key, type);
      case PrOutAction.CLEAR:
        return this.clear(nexus.key);
      case PrOutAction.PREEMPT:
      case PrOutAction.PREEMPT_AND_ABORT:
        // Tasks are never queued inside this device server, so there is nothing further to abort.
        return this.preempt(nexus.key, type, saKey);
      default:
        return { status: 'check', error: 'invalid-field-cdb', byte: 1, bit: 4 };
    }
  }

  private register(
    nexus: PrNexus,
    reg: Registration | undefined,
    ignoreExisting: boolean,
    resKey: bigint,
    saKey: bigint,
  ): PrOutResult {
    if (!reg) {
      if (!ignoreExisting && resKey !== 0n) return { status: 'conflict' };
      // Unregistering a nexus that is not registered changes nothing.
      if (saKey === 0n) return { status: 'good' };
      this.regs.set(nexus.key, {
        key: saKey,
        initiatorPort: nexus.initiatorPort,
        relativeTargetPort: nexus.relativeTargetPort,
      });
      this.generation++;
      return { status: 'good' };
    }
    if (!ignoreExisting && resKey !== reg.key) return { status: 'conflict' };
    if (saKey === 0n) this.unregister(nexus.key);
    else reg.key = saKey;
    this.generation++;
    return { status: 'good' };
  }

  private unregister(key: string): void {
    this.regs.delete(key);
    const r = this.reservation;
    if (!r) return;
    if (isAllRegistrants(r.type)) {
      // The reservation lives on while any registrant (hence holder) is left.
      if (this.regs.size === 0) this.reservation = undefined;
      return;
    }
    if (r.holder !== key) return;
    this.reservation = undefined;
    if (isRegistrantsOnly(r.type)) this.notifyRegistrants(RESERVATIONS_RELEASED, key);
  }

  private reserve(key: string, type: number): PrOutResult {
    const r = this.reservation;
    if (!r) {
      this.reservation = { holder: key, type };
      return { status: 'good' };
    }
    // Reserving again what one already holds is allowed; anything else conflicts.
    if (this.isHolder(key) && r.type === type) return { status: 'good' };
    return { status: 'conflict' };
  }

  private release(key: string, type: number): PrOutResult {
    const r = this.reservation;
    if (!r || !this.isHolder(key)) return { status: 'good' };
    if (r.type !== type) return { status: 'check', error: 'invalid-release' };
    this.reservation = undefined;
    if (isRegistrantsOnly(r.type) || isAllRegistrants(r.type)) this.notifyRegistrants(RESERVATIONS_RELEASED, key);
    return { status: 'good' };
  }

  private clear(key: string): PrOutResult {
    this.notifyRegistrants(RESERVATIONS_PREEMPTED, key);
    this.regs.clear();
    this.reservation = undefined;
    this.generation++;
    return { status: 'good' };
  }

  private preempt(key: string, type: number, saKey: bigint): PrOutResult {
    const r = this.reservation;
    if (r && isAllRegistrants(r.type) && saKey === 0n) {
      // Preempting an all-registrants reservation: everyone else goes, and the preempting nexus
      // holds a new reservation of the requested type.
      for (const k of [...this.regs.keys()]) if (k !== key) this.removePreempted(k);
      this.reservation = { holder: key, type };
      this.generation++;
      return { status: 'good' };
    }
    if (r && !isAllRegistrants(r.type) && this.regs.get(r.holder)?.key === saKey) {
      // Preempting the holder: its key's registrations go and the reservation moves here.
      for (const [k, reg] of [...this.regs]) if (k !== key && reg.key === saKey) this.removePreempted(k);
      this.reservation = { holder: key, type };
      if (r.type !== type) this.notifyRegistrants(RESERVATIONS_RELEASED, key);
      this.generation++;
      return { status: 'good' };
    }
    // Otherwise only registrations are removed, and the reservation (if any) stays as it is.
    if (saKey === 0n) return { status: 'check', error: 'invalid-field-parameter-list', byte: 8 };
    const victims = [...this.regs].filter(([, reg]) => reg.key === saKey).map(([k]) => k);
    if (victims.length === 0) return { status: 'conflict' };
    for (const k of victims) if (k !== key) this.removePreempted(k);
    this.generation++;
    return { status: 'good' };
  }

  private removePreempted(key: string): void {
    this.regs.delete(key);
    this.notify(key, REGISTRATIONS_PREEMPTED[0], REGISTRATIONS_PREEMPTED[1]);
  }

  private notifyRegistrants(code: readonly [number, number], except: string): void {
    for (const k of this.regs.keys()) if (k !== except) this.notify(k, code[0], code[1]);
  }
}

/**
 * iSCSI TransportID, initiator port format (SPC-4 7.6.4.6, FORMAT CODE 01b): the initiator port
 * name "<name>,i,0x<ISID>", NUL terminated and padded to a multiple of four bytes.
 */
export function iscsiTransportId(initiatorPort: string): Buffer {
  const name = Buffer.from(initiatorPort, 'utf8');
  const len = Math.ceil((name.length + 1) / 4) * 4;
  const out = Buffer.alloc(4 + len);
  out[0] = 0x40 | 0x05; // FORMAT CODE 01b, PROTOCOL IDENTIFIER iSCSI
  out.writeUInt16BE(len, 2);
  name.copy(out, 4);
  return out;
}
