import type { Logger } from 'pino';
import { buildSense, parseSense, Asc, ScsiOp, SenseKey } from 'iscsi-node-wire';
import { InitiatorSession, LoginError, type CommandOptions, type InitiatorOptions, type ScsiResult } from '../back/index.ts';
import { BufferPool, dataBuffers } from '../scsi/buffer-pool.ts';
import { TmfResult, type ItNexus, type ScsiOutcome, type ScsiTargetDevice, type ScsiTask } from '../scsi/task.ts';

const CHECK_CONDITION = 0x02;
const TASK_ABORTED = 0x40;
/** Unit attentions kept per nexus for its initiator (see backendPaths); more are dropped. */
const MAX_DEFERRED_UA = 8;

/** A backend session lent to detour's own commands (see InlineDevice.backendPaths). */
export interface BackendPath {
  /** The initiator port and TSIH, for logs. */
  readonly name: string;
  readonly borrowed: true;
  readonly closed: boolean;
  command(lun: number, cdb: Buffer, opts: Pick<CommandOptions, 'dataOut' | 'dataInLength' | 'dataInBuffer'>): Promise<ScsiResult>;
}

function unitAttentionSense(r: ScsiResult): Buffer | undefined {
  if (r.status !== CHECK_CONDITION || !r.sense || r.sense.length < 3) return undefined;
  try {
    return parseSense(r.sense).key === SenseKey.UNIT_ATTENTION ? r.sense : undefined;
  } catch {
    return undefined;
  }
}

export interface InlineDeviceOptions {
  /** Volume name, for logs and metrics. */
  volume: string;
  /** The main target's IQN: detour presents it unchanged. */
  targetName: string;
  /** Main target portal, "host:port". */
  main: string;
  /** Local address for backend connections: the host part of detour's portal. */
  localAddress?: string;
  logger: Logger;
  /** Extra initiator options for tests (timeouts, reconnect policy). */
  backend?: Partial<InitiatorOptions>;
  /**
   * The backend session of a nexus ended without nexusClosed(): the main target stayed out of
   * reach for longer than its reconnect policy waits. The nexus can no longer reach main, so the
   * owner should end the initiator's session, which then logs in again and gets a new backend.
   */
  onBackendLost?: (nexus: ItNexus, err: Error | undefined) => void;
}

/** A login refusal the front passes on to the initiator with the main target's own status. */
class BackendRefused extends Error {
  constructor(
    readonly loginStatus: number,
    message: string,
  ) {
    super(message);
  }
}

/**
 * Lets an abort of the front task reach the backend command once it has an ITT. A module function
 * bound per command rather than a closure: the TypeScript loader wraps each named closure it
 * creates in a property definition, which shows on the data path.
 */
function bindAbort(task: ScsiTask, s: InitiatorSession, itt: number): void {
  task.onAbort = () => s.abortCommand(itt);
}

/**
 * The inline topology: every initiator session is mirrored by a backend session to the main
 * target under the same InitiatorName and ISID, so the main target sees the same I_T nexus (its
 * ACLs, reservations and unit attentions stay right), and every command is forwarded on it. The
 * device's identity is the main target's own, because INQUIRY, VPD and READ CAPACITY are
 * answered by the main target itself.
 */
export class InlineDevice implements ScsiTargetDevice {
  private readonly backends = new Map<string, InitiatorSession>();
  /**
   * backends by the front session's nexus object, which stays the same for the session's life:
   * looking the string key up hashed a new string of about 60 characters for every command.
   * Replaced whenever backends changes, so it never holds a session backends no longer has.
   */
  private byNexus = new WeakMap<ItNexus, InitiatorSession>();
  /** Unit attentions main reported to detour's own commands on an initiator's nexus, per nexus. */
  private readonly deferredUa = new Map<string, Array<{ lun: number; sense: Buffer }>>();

  constructor(private readonly opts: InlineDeviceOptions) {}

  private key(n: ItNexus): string {
    return `${n.initiatorPort}/${n.tsih}`;
  }

  private forget(nexus: ItNexus): void {
    this.backends.delete(this.key(nexus));
    this.byNexus = new WeakMap();
  }

  private backendOf(nexus: ItNexus): InitiatorSession | undefined {
    let s = this.byNexus.get(nexus);
    if (s === undefined) {
      s = this.backends.get(this.key(nexus));
      if (s !== undefined) this.byNexus.set(nexus, s);
    }
    return s;
  }

  get sessionCount(): number {
    return this.backends.size;
  }

  async nexusOpened(nexus: ItNexus): Promise<void> {
    const log = this.opts.logger.child({ volume: this.opts.volume, initiator: nexus.initiatorName, tsih: nexus.tsih });
    try {
      const s = await InitiatorSession.connect({
        portal: this.opts.main,
        targetName: this.opts.targetName,
        initiatorName: nexus.initiatorName,
        isid: Buffer.from(nexus.isid, 'hex'),
        localAddress: this.opts.localAddress,
        logger: log,
        // The initiator decides about retries; a backend that cannot come back fails its commands.
        reconnect: { initialDelayMs: 100, maxDelayMs: 2000, maxAttempts: 5 },
        ...this.opts.backend,
      });
      s.on('close', (err?: Error) => {
        // Not when nexusClosed() or a newer login has let it go already.
        if (this.backends.get(this.key(nexus)) !== s) return;
        this.forget(nexus);
        this.opts.onBackendLost?.(nexus, err);
      });
      this.backends.set(this.key(nexus), s);
      this.byNexus = new WeakMap();
      log.info({ main: this.opts.main }, 'backend session open');
    } catch (err) {
      if (err instanceof LoginError) throw new BackendRefused(err.status, `main target refused the login: ${err.message}`);
      throw err;
    }
  }

  async nexusClosed(nexus: ItNexus): Promise<void> {
    this.deferredUa.delete(this.key(nexus));
    const s = this.backends.get(this.key(nexus));
    if (!s) return;
    this.forget(nexus);
    try {
      await s.logout();
    } catch {
      s.close();
    }
  }

  // Not an async function: on the data path every command costs one promise less this way.
  execute(task: ScsiTask): Promise<ScsiOutcome> {
    const s = this.backendOf(task.nexus);
    if (!s) {
      return Promise.resolve({ status: CHECK_CONDITION, sense: buildSense({ key: SenseKey.NOT_READY, ...Asc.LOGICAL_UNIT_COMMUNICATION_FAILURE }) });
    }
    // Aborted while held (at the gate during a switch): it must not reach the main target.
    if (task.aborted) return Promise.resolve({ status: TASK_ABORTED });
    if (this.deferredUa.size !== 0) {
      const ua = this.takeDeferredUa(task);
      if (ua) return Promise.resolve(ua);
    }
    // Large reads land in a pooled buffer, which the transport gives back once it has sent the
    // data. A command that rejects keeps its buffer out of the pool: Data-In may have been
    // arriving into it when it was aborted.
    const pooled = BufferPool.pooled(task.dataInLength) ? dataBuffers.take(task.dataInLength) : undefined;
    return s
      .command(task.lun, task.cdb, {
        dataOut: task.dataOut.length > 0 ? task.dataOut : undefined,
        dataInLength: task.dataInLength,
        dataInBuffer: pooled,
        attr: task.attr,
        onItt: bindAbort.bind(undefined, task, s),
        direction: { read: task.read, write: task.write },
      })
      .then((r) => {
        const o = toOutcome(r);
        if (pooled) {
          if (r.data && r.data.buffer === pooled.buffer) o.release = dataBuffers.release.bind(dataBuffers, pooled);
          else dataBuffers.release(pooled);
        }
        return o;
      });
  }

  /**
   * The backend sessions, for detour's own commands when the main target holds a reservation that
   * shuts detour's own session out: the holder's nexus may do what detour's may not. A unit
   * attention main reports to such a command was meant for the initiator, so it is kept and
   * reported on the initiator's next command for that LUN, as main would have done.
   */
  backendPaths(): BackendPath[] {
    return [...this.backends].map(([key, s]) => ({
      name: key,
      borrowed: true as const,
      get closed() {
        return s.isClosed;
      },
      command: async (lun: number, cdb: Buffer, opts: Pick<CommandOptions, 'dataOut' | 'dataInLength' | 'dataInBuffer'>) => {
        const r = await s.command(lun, cdb, opts);
        const ua = unitAttentionSense(r);
        if (ua && this.backends.get(key) === s) {
          const q = this.deferredUa.get(key) ?? [];
          if (q.length < MAX_DEFERRED_UA) q.push({ lun, sense: Buffer.from(ua) });
          this.deferredUa.set(key, q);
        }
        return r;
      },
    }));
  }

  /**
   * A unit attention kept for this nexus, as the answer to the task, or undefined. INQUIRY and
   * REPORT LUNS never report one (SPC); REQUEST SENSE returns it as its parameter data.
   */
  private takeDeferredUa(task: ScsiTask): ScsiOutcome | undefined {
    const key = this.key(task.nexus);
    const q = this.deferredUa.get(key);
    const op = task.cdb[0];
    if (!q || op === ScsiOp.INQUIRY || op === ScsiOp.REPORT_LUNS) return undefined;
    const i = q.findIndex((u) => u.lun === task.lun);
    if (i < 0) return undefined;
    const { sense } = q.splice(i, 1)[0]!;
    if (q.length === 0) this.deferredUa.delete(key);
    if (op === ScsiOp.REQUEST_SENSE) return { status: 0, dataIn: sense.subarray(0, Math.min(sense.length, task.cdb[4] ?? 0)) };
    return { status: CHECK_CONDITION, sense };
  }

  async reset(nexus: ItNexus, kind: 'lun' | 'target-warm' | 'target-cold' | 'clear-task-set', lun: number): Promise<number> {
    const s = this.backends.get(this.key(nexus));
    if (!s) return TmfResult.Rejected;
    if (kind === 'lun') return s.lunReset(lun);
    if (kind === 'target-warm' || kind === 'target-cold') return s.targetWarmReset();
    return TmfResult.Complete;
  }

  async close(): Promise<void> {
    await Promise.allSettled([...this.backends.values()].map((s) => s.logout()));
    this.backends.clear();
    this.byNexus = new WeakMap();
  }
}

function toOutcome(r: ScsiResult): ScsiOutcome {
  return {
    status: r.status,
    sense: r.sense,
    dataIn: r.data,
    response: r.response,
    // The main target's residual is the truth, including overflow beyond the initiator's buffer.
    residual: r.residual ?? { overflow: false, underflow: false, count: 0 },
  };
}
