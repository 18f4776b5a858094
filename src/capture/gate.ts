/**
 * Holds commands without failing them: while closed, pass() waits; open() lets every waiter
 * through in arrival order. Used while the initiators switch over (nothing may run until all of
 * them are on detour) and during the cutover pause.
 */
export class Gate {
  private waiters: Array<() => void> = [];
  private closedSince: number | undefined;

  get isClosed(): boolean {
    return this.closedSince !== undefined;
  }

  get held(): number {
    return this.waiters.length;
  }

  close(): void {
    if (this.closedSince === undefined) this.closedSince = Date.now();
  }

  /** Opens the gate; returns how long it was closed, in ms. */
  open(): number {
    const since = this.closedSince;
    this.closedSince = undefined;
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
    return since === undefined ? 0 : Date.now() - since;
  }

  pass(): Promise<void> | undefined {
    if (this.closedSince === undefined) return undefined;
    return new Promise((resolve) => this.waiters.push(resolve));
  }
}
