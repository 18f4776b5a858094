import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { formatPortal } from '../back/index.ts';
import type { FrontTarget } from '../front/types.ts';
import type { Portal } from '../front/portal.ts';
import { InlineDevice } from '../proxy/inline-device.ts';
import type { ItNexus, ScsiOutcome, ScsiTargetDevice, ScsiTask } from '../scsi/task.ts';
import type { MainTargetControl } from '../switch/main-control.ts';
import type { VolumeConfig } from '../control/config.ts';
import type { SessionView } from '../control/model.ts';
import type { CaptureDevice } from './capture-device.ts';
import { Gate } from './gate.ts';
import { JournalFailedError } from './journal.ts';

/** How often a command held by a failed journal looks whether the backup has let the volume go. */
const CAPTURE_END_POLL_MS = 20;

export interface CommandObserver {
  (volume: string, task: ScsiTask, outcome: ScsiOutcome | undefined, seconds: number): void;
}


/**
 * One configured volume at run time: the target detour presents for it, where its commands go
 * (forwarded to the main target, or into the capture device during a backup), whether logins are
 * redirected to the main target, and the gate that holds commands during switch-over and cutover.
 */
export class Volume implements ScsiTargetDevice {
  readonly forwarder: InlineDevice;
  readonly gate = new Gate();
  readonly target: FrontTarget;
  portal: Portal | undefined;
  /** Set for the duration of a backup: writes go to the journal. */
  capture: CaptureDevice | undefined;
  /** While set, logins are accepted even in the redirecting topologies (a backup is switching in or running). */
  accepting = false;
  private forwardedInFlight = 0;
  private forwardIdleWaiters: Array<() => void> = [];
  observer: CommandObserver | undefined;

  constructor(
    readonly config: VolumeConfig,
    readonly control: MainTargetControl,
    readonly localAddress: string,
    portalGroupTag: number,
    private readonly log: Logger,
  ) {
    this.forwarder = new InlineDevice({
      volume: config.name,
      targetName: config.target,
      main: formatPortal(config.main),
      localAddress,
      logger: log,
      onBackendLost: (nexus, err) => this.backendLost(nexus, err),
    });
    this.target = {
      name: config.target,
      portalGroupTag,
      device: this,
      logFields: { volume: config.name },
      redirect: () => {
        // Outside a backup, the redirecting topologies keep detour out of the data path.
        if (config.topology === 'inline' || this.accepting) return undefined;
        return { address: `${formatPortal(config.main)},${portalGroupTag}` };
      },
    };
  }

  get name(): string {
    return this.config.name;
  }

  get mainPortal(): string {
    return formatPortal(this.config.main);
  }

  /** Sessions logged in to detour for this volume. */
  frontSessions() {
    return (this.portal?.sessions.all() ?? []).filter((s) => s.target === this.target && !s.closed);
  }

  sessionViews(): SessionView[] {
    return this.frontSessions().map((s) => ({
      initiator: s.initiatorName,
      isid: s.isid.toString('hex'),
      tsih: s.tsih,
      mode: this.capture ? 'capture' : 'inline',
    }));
  }

  /**
   * An initiator's session to main is gone for good. Answering its commands with errors from
   * here on would leave it with a session that looks alive and can never work again, even after
   * main is back. Dropping its connection makes it recover as it would from main itself going
   * away: it logs in again, and that login opens a new backend session (or is refused, to be
   * retried, while main is still out of reach).
   */
  private backendLost(nexus: ItNexus, err: Error | undefined): void {
    for (const s of this.frontSessions()) {
      if (s.initiatorName !== nexus.initiatorName || s.tsih !== nexus.tsih) continue;
      this.log.warn({ volume: this.name, initiator: s.initiatorName, tsih: s.tsih, err: err?.message }, 'main target out of reach: dropping the initiator connection, it logs in again');
      for (const c of [...s.connections]) c.close();
    }
  }

  /** AsyncEvent 1 to every initiator of the volume: log out (and come back by login). */
  requestLogoutAll(seconds = 2): number {
    let n = 0;
    for (const s of this.frontSessions()) for (const c of s.connections) {
      c.requestLogout(seconds);
      this.log.info({ volume: this.name, initiator: s.initiatorName, tsih: s.tsih }, 'logout requested (AsyncEvent 1)');
      n++;
    }
    return n;
  }

  /** Resolves once no forwarded command is executing on the main target. */
  forwardIdle(): Promise<void> {
    if (this.forwardedInFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.forwardIdleWaiters.push(resolve));
  }

  // ---- ScsiTargetDevice -----------------------------------------------------------------------

  async nexusOpened(nexus: ItNexus): Promise<void> {
    // Every session gets its backend session, whatever the mode: identity commands and
    // reservations always go to the main target on the initiator's own I_T nexus.
    await this.forwarder.nexusOpened(nexus);
    this.log.info({ volume: this.name, initiator: nexus.initiatorName, tsih: nexus.tsih, mode: this.capture ? 'capture' : 'inline' }, 'session on detour');
  }

  async nexusClosed(nexus: ItNexus): Promise<void> {
    await this.forwarder.nexusClosed(nexus);
  }

  async reset(nexus: ItNexus, kind: 'lun' | 'target-warm' | 'target-cold' | 'clear-task-set', lun: number): Promise<number> {
    return this.forwarder.reset(nexus, kind, lun);
  }

  // Not async: every command passes here, and a promise chain of its own per command shows up
  // at tens of thousands of commands per second.
  execute(task: ScsiTask): Promise<ScsiOutcome> {
    const held = this.gate.pass();
    return held ? held.then(() => this.run(task)) : this.run(task);
  }

  private run(task: ScsiTask): Promise<ScsiOutcome> {
    const started = performance.now();
    const capture = this.capture;
    if (!capture) this.forwardedInFlight++;
    // Anonymous callbacks only: the TypeScript loader wraps a named closure in a property
    // definition each time it is created, which shows at tens of thousands of commands a second.
    return (capture ? capture.execute(task) : this.forwarder.execute(task)).then(
      (o) => {
        this.settle(task, capture === undefined, started, o);
        return o;
      },
      (err: unknown) => {
        this.settle(task, capture === undefined, started, undefined);
        if (capture && err instanceof JournalFailedError) return this.afterCapture(capture, task);
        throw err;
      },
    );
  }

  /**
   * A command the capture could not take because its journal failed (a full or failing disk).
   * It changed nothing there: the journal acknowledged none of it. Failing it would hand the
   * initiator a medium error for a disk that is not its own, so it is held instead until the
   * backup has drained the journal's acknowledged writes to main and let the volume go, then
   * sent to main like any command outside a backup (unless it was aborted meanwhile).
   */
  private async afterCapture(capture: CaptureDevice, task: ScsiTask): Promise<ScsiOutcome> {
    while (this.capture === capture) await sleep(CAPTURE_END_POLL_MS);
    return this.run(task);
  }

  private settle(task: ScsiTask, forwarded: boolean, started: number, outcome: ScsiOutcome | undefined): void {
    if (forwarded && --this.forwardedInFlight === 0) {
      const w = this.forwardIdleWaiters;
      this.forwardIdleWaiters = [];
      for (const f of w) f();
    }
    this.observer?.(this.name, task, outcome, (performance.now() - started) / 1000);
  }

  async close(): Promise<void> {
    await this.forwarder.close();
  }
}
