// Reservations on the main LUN during a backup.
//
// detour copies, reads the frozen volume and drains the journal on a session of its own to the
// main target. An initiator that holds a persistent reservation (PERSISTENT RESERVE OUT) or an
// SPC-2 RESERVE on the LUN shuts that session out: main answers RESERVATION CONFLICT to detour's
// writes (and, for the Exclusive Access types and RESERVE, to its reads). The journal then holds
// acknowledged writes that detour cannot put on main.
//
// The way through is a nexus main allows. Every initiator of the volume reaches main through a
// backend session detour opened in its name (the proxy's InlineDevice), so the nexus of the
// reservation holder, or of any registrant for the Registrants Only / All Registrants types, is
// one of detour's own connections. Which one is decided by main itself: a zero-length READ(16) or
// WRITE(16) (SBC: no data, not an error) on each candidate, detour's own session first, and the
// first answered GOOD carries the commands of that kind until main refuses one again. This needs
// no PERSISTENT RESERVE IN READ FULL STATUS (which tgt does not implement), works for SPC-2
// RESERVE (invisible to PERSISTENT RESERVE IN) as well, and follows whatever notion of an I_T
// nexus the main target has (tgt ties registrations to the iSCSI session, not to InitiatorName
// and ISID, so a holder that logs in again is a stranger to its own reservation).
//
// When no candidate is allowed, ReservationBlockedError says so, with main's reservation as PR IN
// reports it; the backup then keeps the volume captured rather than hand back sessions whose
// acknowledged writes are only in the journal.

import type { Logger } from 'pino';
import { buildRead16, buildWrite16, parseSense, ScsiStatus, SenseKey } from 'iscsi-node-wire';
import type { CommandOptions, ScsiResult } from '../back/index.ts';

export type MainAccess = 'read' | 'write';

/** What detour's own commands carry (dataInBuffer: where Data-In lands, when the session can). */
export type MainCommandOptions = Pick<CommandOptions, 'dataOut' | 'dataInLength' | 'dataInBuffer'>;

/** A session to the main target that detour can send its own commands on. */
export interface MainPath {
  /** For logs: 'engine' for detour's own session, else the initiator port and TSIH. */
  readonly name: string;
  /** True for a backend session of an initiator, lent to detour's commands. */
  readonly borrowed: boolean;
  readonly closed: boolean;
  command(lun: number, cdb: Buffer, opts: MainCommandOptions): Promise<ScsiResult>;
}

/** Persistent reservation types (SPC-4 6.15.3.4). */
export const PrType = {
  WRITE_EXCLUSIVE: 1,
  EXCLUSIVE_ACCESS: 3,
  WRITE_EXCLUSIVE_REGISTRANTS_ONLY: 5,
  EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: 6,
  WRITE_EXCLUSIVE_ALL_REGISTRANTS: 7,
  EXCLUSIVE_ACCESS_ALL_REGISTRANTS: 8,
} as const;

const TYPE_NAMES: Record<number, string> = {
  1: 'Write Exclusive',
  3: 'Exclusive Access',
  5: 'Write Exclusive - Registrants Only',
  6: 'Exclusive Access - Registrants Only',
  7: 'Write Exclusive - All Registrants',
  8: 'Exclusive Access - All Registrants',
};

export function prTypeName(type: number): string {
  return TYPE_NAMES[type] ?? `type 0x${type.toString(16)}`;
}

/** What PERSISTENT RESERVE IN (READ KEYS, READ RESERVATION) reports of the main LUN. */
export interface ReservationState {
  generation: number;
  /** Registered reservation keys, one per registered nexus. */
  keys: bigint[];
  /** The persistent reservation, if one is held (key 0 for the All Registrants types). */
  reservation: { key: bigint; type: number; scope: number } | undefined;
}

const PR_IN = 0x5e;
const PR_IN_READ_KEYS = 0x00;
const PR_IN_READ_RESERVATION = 0x01;
const PR_IN_ALLOC = 8192;

export function buildPrIn(serviceAction: number, allocationLength = PR_IN_ALLOC): Buffer {
  const cdb = Buffer.alloc(10);
  cdb[0] = PR_IN;
  cdb[1] = serviceAction & 0x1f;
  cdb.writeUInt16BE(allocationLength, 7);
  return cdb;
}

/** Parses READ KEYS parameter data (as much of it as arrived). */
export function parseReadKeys(d: Buffer): { generation: number; keys: bigint[] } {
  if (d.length < 8) throw new Error(`READ KEYS returned ${d.length} bytes`);
  const end = Math.min(d.length, 8 + d.readUInt32BE(4));
  const keys: bigint[] = [];
  for (let o = 8; o + 8 <= end; o += 8) keys.push(d.readBigUInt64BE(o));
  return { generation: d.readUInt32BE(0), keys };
}

/** Parses READ RESERVATION parameter data. */
export function parseReadReservation(d: Buffer): { generation: number; reservation: ReservationState['reservation'] } {
  if (d.length < 8) throw new Error(`READ RESERVATION returned ${d.length} bytes`);
  const generation = d.readUInt32BE(0);
  if (d.readUInt32BE(4) < 16 || d.length < 24) return { generation, reservation: undefined };
  return { generation, reservation: { key: d.readBigUInt64BE(8), scope: d[21]! >> 4, type: d[21]! & 0x0f } };
}

function senseKeyOf(r: ScsiResult): number | undefined {
  if (!r.sense || r.sense.length < 3) return undefined;
  try {
    return parseSense(r.sense).key;
  } catch {
    return undefined;
  }
}

function isUnitAttention(r: ScsiResult): boolean {
  return r.status === ScsiStatus.CHECK_CONDITION && senseKeyOf(r) === SenseKey.UNIT_ATTENTION;
}

/** A command past the unit attentions main reports once per event (reset, new nexus...). */
async function pastUnitAttention(p: MainPath, lun: number, cdb: Buffer, opts: MainCommandOptions): Promise<ScsiResult> {
  for (let attempt = 0; ; attempt++) {
    const r = await p.command(lun, cdb, opts);
    if (!isUnitAttention(r) || attempt >= 5) return r;
  }
}

/**
 * The main LUN's persistent reservation state, asked on `p`. undefined when main does not answer
 * PERSISTENT RESERVE IN (no PR support, or a refusal): the caller then knows nothing either way.
 */
export async function readReservationState(p: MainPath, lun: number): Promise<ReservationState | undefined> {
  const keys = await pastUnitAttention(p, lun, buildPrIn(PR_IN_READ_KEYS), { dataInLength: PR_IN_ALLOC });
  if (keys.status !== ScsiStatus.GOOD || !keys.data) return undefined;
  const res = await pastUnitAttention(p, lun, buildPrIn(PR_IN_READ_RESERVATION), { dataInLength: PR_IN_ALLOC });
  if (res.status !== ScsiStatus.GOOD || !res.data) return undefined;
  const k = parseReadKeys(keys.data);
  const r = parseReadReservation(res.data);
  return { generation: r.generation, keys: k.keys, reservation: r.reservation };
}

/** One line for logs and the backup's error: what main holds, as far as PR IN tells. */
export function describeReservation(s: ReservationState | undefined): string {
  if (!s) return 'the main target did not answer PERSISTENT RESERVE IN (an SPC-2 RESERVE, or no persistent reservation support)';
  const regs = `${s.keys.length} registered key${s.keys.length === 1 ? '' : 's'}`;
  if (!s.reservation) return `no persistent reservation is held (${regs}; an SPC-2 RESERVE does not show here)`;
  const { key, type } = s.reservation;
  const all = type === PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS || type === PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS;
  return `a ${prTypeName(type)} persistent reservation is held${all ? '' : ` with key 0x${key.toString(16)}`} (${regs}, generation ${s.generation})`;
}

/** No session detour has to the main target may do what a backup needs there. */
export class ReservationBlockedError extends Error {
  constructor(
    message: string,
    readonly access: MainAccess,
    readonly state: ReservationState | undefined,
  ) {
    super(message);
    this.name = 'ReservationBlockedError';
  }
}

/** How often one command is re-routed before the reservation is taken to be changing too fast. */
const MAX_REROUTES = 4;

export interface MainRouterOptions {
  /** detour's own session (the engine's); undefined while it is not connected. */
  engine(): MainPath | undefined;
  /** The backend sessions of the volume's initiators. */
  borrowable(): MainPath[];
  lun(): number;
  logger: Logger;
  /** Added to every log line. */
  logFields?(): Record<string, unknown>;
}

/**
 * Sends detour's own commands for the main LUN on a session main allows them on: detour's own
 * while no reservation stands in the way, otherwise a nexus of an initiator main does allow. One
 * route per kind of access (reads are refused only by some reservation types), kept until main
 * refuses a command on it or its session goes.
 */
export class MainRouter {
  private readonly route: Record<MainAccess, MainPath | undefined> = { read: undefined, write: undefined };
  private readonly choosing: Partial<Record<MainAccess, Promise<MainPath>>> = {};
  /** The route last chosen, to log changes only (preferOwn makes every drain round choose). */
  private readonly chosen: Record<MainAccess, string | undefined> = { read: undefined, write: undefined };
  /** Commands that went through an initiator's nexus, by kind. */
  readonly borrowedCommands: Record<MainAccess, number> = { read: 0, write: 0 };

  constructor(private readonly opts: MainRouterOptions) {}

  /** Where commands of this kind go now ('engine', or an initiator port), undefined if not chosen yet. */
  routeName(access: MainAccess): string | undefined {
    return this.route[access]?.name;
  }

  /**
   * Let the next command try detour's own session again: a borrowed nexus is used only while
   * main insists, since its unit attentions and its bandwidth belong to the initiator.
   */
  preferOwn(): void {
    for (const a of ['read', 'write'] as const) if (this.route[a]?.borrowed) this.route[a] = undefined;
  }

  /** Main's reservation state, asked on detour's own session. */
  async state(): Promise<ReservationState | undefined> {
    const e = this.opts.engine();
    if (!e || e.closed) return undefined;
    try {
      return await readReservationState(e, this.opts.lun());
    } catch {
      return undefined;
    }
  }

  /**
   * Sends the command where main allows it and returns main's answer (past unit attentions). A
   * RESERVATION CONFLICT, or a borrowed session that went away or had the command aborted under
   * it (its initiator reset the LUN, logged out), sends it again on a route chosen anew.
   * @throws ReservationBlockedError when no session detour has may do it.
   */
  async command(access: MainAccess, cdb: Buffer, opts: MainCommandOptions): Promise<ScsiResult> {
    const lun = this.opts.lun();
    for (let reroutes = 0; ; ) {
      const p = await this.pathFor(access);
      let r: ScsiResult;
      try {
        r = await pastUnitAttention(p, lun, cdb, opts);
      } catch (err) {
        // detour's own session fails as it always did; a lent one may simply be gone.
        if (!p.borrowed || ++reroutes > MAX_REROUTES) throw err;
        this.forget(access, p);
        continue;
      }
      if (p.borrowed) this.borrowedCommands[access]++;
      const lost = r.status === ScsiStatus.RESERVATION_CONFLICT || (p.borrowed && r.status === ScsiStatus.TASK_ABORTED);
      if (!lost) return r;
      this.forget(access, p);
      if (++reroutes > MAX_REROUTES) {
        const st = await this.state();
        throw new ReservationBlockedError(`main keeps refusing detour's ${access}s with RESERVATION CONFLICT on every route it tries: ${describeReservation(st)}`, access, st);
      }
    }
  }

  private forget(access: MainAccess, p: MainPath): void {
    if (this.route[access] === p) this.route[access] = undefined;
  }

  private pathFor(access: MainAccess): Promise<MainPath> {
    const p = this.route[access];
    if (p && !p.closed) return Promise.resolve(p);
    // Every worker that found the route gone waits for one choice.
    let c = this.choosing[access];
    if (!c) {
      c = this.choose(access).finally(() => {
        if (this.choosing[access] === c) delete this.choosing[access];
      });
      this.choosing[access] = c;
    }
    return c;
  }

  private async choose(access: MainAccess): Promise<MainPath> {
    const lun = this.opts.lun();
    const probe = access === 'write' ? buildWrite16(0, 0) : buildRead16(0, 0);
    const engine = this.opts.engine();
    const candidates = [...(engine ? [engine] : []), ...this.opts.borrowable()].filter((p) => !p.closed);
    const refused: string[] = [];
    for (const p of candidates) {
      let r: ScsiResult | undefined;
      try {
        r = await pastUnitAttention(p, lun, probe, {});
      } catch (err) {
        refused.push(`${p.name}: ${(err as Error).message}`);
      }
      // Only a reservation is a reason to leave detour's own session: any other trouble there
      // (main unreachable, not ready...) shows in the command itself, as it always did.
      const ownOtherwiseRefused = !p.borrowed && r?.status !== ScsiStatus.GOOD && r?.status !== ScsiStatus.RESERVATION_CONFLICT;
      if (r?.status === ScsiStatus.GOOD || ownOtherwiseRefused) {
        this.route[access] = p;
        const before = this.chosen[access];
        this.chosen[access] = p.name;
        const log = this.opts.logger;
        const fields = { ...this.opts.logFields?.(), access, route: p.name };
        if (before === p.name || (before === undefined && !p.borrowed)) log.debug(fields, 'main route chosen');
        else if (p.borrowed) log.warn(fields, `main holds a reservation that refuses detour's own ${access}s: they go through an initiator's nexus that main allows`);
        else log.info(fields, `detour's own ${access}s go through its own session again`);
        return p;
      }
      if (r) refused.push(`${p.name}: ${r.status === ScsiStatus.RESERVATION_CONFLICT ? 'RESERVATION CONFLICT' : `status 0x${r.status.toString(16)}`}`);
    }
    const st = await this.state();
    const reason =
      `no session detour has to the main target may ${access === 'write' ? 'write to' : 'read from'} it: ${describeReservation(st)}, ` +
      `and the holder is not connected through detour (tried ${refused.length ? refused.join('; ') : 'nothing: no session'})`;
    throw new ReservationBlockedError(reason, access, st);
  }
}
