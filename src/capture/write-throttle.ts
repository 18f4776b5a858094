// Admission control for initiator writes while a backup drains.
//
// The drain converges only while the initiators write into the journal more slowly than the drain
// writes it out to main. A workload that writes faster (small random writes over a large range,
// which the drain cannot merge) would keep the volume captured for as long as it runs. When the
// drain does not converge, the backup holds each write for a moment before it goes into the journal,
// so that the initiators' write rate stays under the drain's: the initiators see slower writes,
// never errors, and the backup reaches its cutover.
//
// A token bucket in bytes: writes are admitted in arrival order at `rate` bytes per second, with up
// to a quarter second of burst. Unthrottled (the normal case) it costs one branch per write.
//
// No write waits longer than `maxHoldMs`, whatever the rate: an initiator with many large writes
// queued would otherwise see one of them outlast its command timeout, and its abort (which waits
// for the command) and reset would follow. The cap is what the volume's ioTimeoutBudget says the
// initiators tolerate; a write let through by it still counts against the rate.

/** Burst allowance, in seconds of the current rate. */
const BURST_SECONDS = 0.25;

export class WriteThrottle {
  private rate: number | null = null;
  private tokens = 0;
  private refilledAt = 0;
  private readonly waiting: Array<{ bytes: number; since: number; admit: () => void }> = [];
  private timer: NodeJS.Timeout | undefined;
  /** Bytes of every write admitted, throttled or not: the initiators' write volume. */
  admittedBytes = 0;
  /** Writes that had to wait, and their total wait, for logs and tests. */
  heldWrites = 0;
  heldMs = 0;

  constructor(private readonly maxHoldMs = Number.POSITIVE_INFINITY) {
    if (!(maxHoldMs > 0)) throw new RangeError(`bad maxHoldMs ${maxHoldMs}`);
  }

  /** Bytes per second admitted, or null when writes go through at once. */
  get bytesPerSecond(): number | null {
    return this.rate;
  }

  /** Writes waiting for admission right now. */
  get waitingWrites(): number {
    return this.waiting.length;
  }

  /** Limits admission to `bytesPerSecond` (> 0), or lifts the limit with null. */
  setRate(bytesPerSecond: number | null): void {
    if (bytesPerSecond !== null && !(bytesPerSecond > 0 && Number.isFinite(bytesPerSecond))) {
      throw new RangeError(`bad write admission rate ${bytesPerSecond}`);
    }
    this.refill();
    if (bytesPerSecond === null) {
      this.rate = null;
      this.releaseAll();
      return;
    }
    if (this.rate === null) {
      // Starting to throttle: no burst saved up from the unthrottled time.
      this.tokens = 0;
      this.refilledAt = performance.now();
    }
    this.rate = bytesPerSecond;
    this.tokens = Math.min(this.tokens, bytesPerSecond * BURST_SECONDS);
    this.pump();
  }

  /** Lifts the limit and lets every waiting write go (cutover, cancel, shutdown). */
  open(): void {
    this.setRate(null);
  }

  /**
   * Resolves when a write of `bytes` may go into the journal; undefined when it may go at once
   * (no promise allocated on the unthrottled path).
   */
  admit(bytes: number): Promise<void> | undefined {
    this.admittedBytes += bytes;
    if (this.rate === null) return undefined;
    this.refill();
    if (this.waiting.length === 0 && this.tokens >= 0) {
      // Admitted at once, possibly into debt: a write larger than the burst still goes, and the
      // ones behind it wait for the debt to be paid, so the average holds.
      this.tokens -= bytes;
      return undefined;
    }
    const since = performance.now();
    return new Promise<void>((resolve) => {
      this.waiting.push({
        bytes,
        since,
        admit: () => {
          this.heldWrites++;
          this.heldMs += performance.now() - since;
          resolve();
        },
      });
      this.pump();
    });
  }

  private refill(): void {
    const now = performance.now();
    if (this.rate !== null) this.tokens = Math.min(this.tokens + ((now - this.refilledAt) / 1000) * this.rate, this.rate * BURST_SECONDS);
    this.refilledAt = now;
  }

  private pump(): void {
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = undefined;
    }
    if (this.rate === null) return;
    this.refill();
    const now = performance.now();
    while (this.waiting.length > 0 && (this.tokens >= 0 || now - this.waiting[0]!.since >= this.maxHoldMs)) {
      const w = this.waiting.shift()!;
      this.tokens -= w.bytes;
      w.admit();
    }
    if (this.waiting.length > 0) {
      const untilTokens = (-this.tokens / this.rate) * 1000;
      const untilCap = this.waiting[0]!.since + this.maxHoldMs - now;
      this.timer = setTimeout(() => this.pump(), Math.max(1, Math.ceil(Math.min(untilTokens, untilCap))));
    }
  }

  private releaseAll(): void {
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = undefined;
    }
    for (const w of this.waiting.splice(0)) w.admit();
  }
}
