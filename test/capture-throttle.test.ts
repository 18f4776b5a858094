import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { WriteThrottle } from '../src/capture/write-throttle.ts';

const KiB = 1024;

describe('WriteThrottle', () => {
  beforeEach(() => {
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'performance'] });
  });
  afterEach(() => {
    vi.useRealTimers();
  });

  it('admits at once, without a promise, while no limit is set, and counts the bytes', () => {
    const t = new WriteThrottle();
    expect(t.bytesPerSecond).toBeNull();
    for (let i = 0; i < 1000; i++) expect(t.admit(4 * KiB)).toBeUndefined();
    expect(t.admittedBytes).toBe(4000 * KiB);
    expect(t.heldWrites).toBe(0);
  });

  it('with a limit, admits in arrival order at the limit on average', async () => {
    const t = new WriteThrottle();
    t.setRate(100 * KiB);
    const admitted: number[] = [];
    for (let i = 0; i < 100; i++) {
      const w = t.admit(4 * KiB);
      if (w) void w.then(() => admitted.push(i));
      else admitted.push(i);
    }
    // No burst saved from the unthrottled time: the first write goes, into debt, the rest wait.
    expect(admitted).toEqual([0]);
    expect(t.waitingWrites).toBe(99);
    await vi.advanceTimersByTimeAsync(1000);
    // 100 KiB in the second: the first write's 4 KiB debt, then 24 more of 4 KiB (give or take one
    // for the timer's rounding).
    expect(admitted.length).toBeGreaterThanOrEqual(25);
    expect(admitted.length).toBeLessThanOrEqual(27);
    expect(admitted).toEqual(Array.from({ length: admitted.length }, (_, i) => i));
    await vi.advanceTimersByTimeAsync(3000);
    expect(admitted.length).toBe(100);
    expect(admitted).toEqual(Array.from({ length: 100 }, (_, i) => i));
    expect(t.heldWrites).toBe(99);
    expect(t.admittedBytes).toBe(400 * KiB);
  });

  it('open() lets every waiting write go at once and lifts the limit', async () => {
    const t = new WriteThrottle();
    t.setRate(1 * KiB);
    let done = 0;
    const waits = Array.from({ length: 50 }, () => t.admit(64 * KiB)).filter((w): w is Promise<void> => w !== undefined);
    for (const w of waits) void w.then(() => done++);
    expect(waits.length).toBe(49);
    t.open();
    await vi.advanceTimersByTimeAsync(0);
    expect(done).toBe(49);
    expect(t.bytesPerSecond).toBeNull();
    expect(t.admit(64 * KiB)).toBeUndefined();
  });

  it('a lower limit set while writes wait applies to them; burst is at most a quarter second', async () => {
    const t = new WriteThrottle();
    t.setRate(1024 * KiB);
    await vi.advanceTimersByTimeAsync(10_000);
    // Ten idle seconds saved up a quarter second of burst, no more: 256 KiB go at once.
    let now = 0;
    while (t.admit(4 * KiB) === undefined) now++;
    expect(now).toBeGreaterThanOrEqual(64);
    expect(now).toBeLessThanOrEqual(65);
    t.setRate(4 * KiB);
    let done = 0;
    for (let i = 0; i < 10; i++) void t.admit(4 * KiB)?.then(() => done++);
    await vi.advanceTimersByTimeAsync(5000);
    // The one already waiting, and about 4 more at 4 KiB/s (after the debt of the one in flight).
    expect(done).toBeGreaterThanOrEqual(4);
    expect(done).toBeLessThanOrEqual(6);
  });

  it('refuses a rate that is not a positive finite number', () => {
    const t = new WriteThrottle();
    for (const bad of [0, -1, Number.NaN, Number.POSITIVE_INFINITY]) expect(() => t.setRate(bad)).toThrow(/bad write admission rate/);
  });

  it('no write waits longer than maxHoldMs, whatever the rate; those let through still count against it', async () => {
    const t = new WriteThrottle(2000);
    t.setRate(64 * KiB);
    const admittedAt: number[] = [];
    const start = performance.now();
    // 16 writes of 1 MiB: at 64 KiB/s the last would wait four minutes.
    for (let i = 0; i < 16; i++) {
      const w = t.admit(1024 * KiB);
      if (w) void w.then(() => admittedAt.push(performance.now() - start));
      else admittedAt.push(0);
    }
    await vi.advanceTimersByTimeAsync(1999);
    expect(admittedAt.length).toBe(1);
    await vi.advanceTimersByTimeAsync(2);
    expect(admittedAt.length).toBe(16);
    expect(Math.max(...admittedAt)).toBeLessThanOrEqual(2001);
    // The debt they ran up holds the next write back, up to the cap again.
    let next = false;
    void t.admit(4 * KiB)?.then(() => (next = true));
    await vi.advanceTimersByTimeAsync(1900);
    expect(next).toBe(false);
    await vi.advanceTimersByTimeAsync(200);
    expect(next).toBe(true);
  });

  it('refuses a hold cap that is not positive', () => {
    expect(() => new WriteThrottle(0)).toThrow(/bad maxHoldMs/);
  });
});
