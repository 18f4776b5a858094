// The read-buffer pool: a buffer must never be handed out twice, views and foreign buffers are
// never adopted, and the idle budget holds.
import { describe, expect, it } from 'vitest';
import { BufferPool } from '../src/scsi/buffer-pool.ts';

describe('BufferPool', () => {
  it('rounds up to a power-of-two class and reuses a released buffer', () => {
    const pool = new BufferPool();
    const a = pool.take(65536);
    expect(a.length).toBe(65536);
    const b = pool.take(5000);
    expect(b.length).toBe(8192);
    pool.release(a);
    expect(pool.idle).toBe(65536);
    const c = pool.take(40000);
    expect(c).toBe(a);
    expect(pool.idle).toBe(0);
  });

  it('never hands out a buffer twice, even when it is released twice', () => {
    const pool = new BufferPool();
    const a = pool.take(4096);
    pool.release(a);
    pool.release(a);
    expect(pool.idle).toBe(4096);
    const x = pool.take(4096);
    const y = pool.take(4096);
    expect(x).toBe(a);
    expect(y).not.toBe(a);
  });

  it('ignores views, foreign buffers and sizes outside the pooled range', () => {
    const pool = new BufferPool();
    const a = pool.take(65536);
    pool.release(a.subarray(0, 32768));
    pool.release(a.subarray(32768));
    pool.release(Buffer.alloc(65536 + 512));
    pool.release(Buffer.from('small'));
    expect(pool.idle).toBe(0);
    const small = pool.take(512);
    expect(small.length).toBe(512);
    pool.release(small);
    expect(pool.idle).toBe(0);
    expect(BufferPool.pooled(4095)).toBe(false);
    expect(BufferPool.pooled(4096)).toBe(true);
  });

  it('keeps at most maxIdleBytes idle', () => {
    const pool = new BufferPool({ maxIdleBytes: 3 * 65536 });
    const bufs = Array.from({ length: 5 }, () => pool.take(65536));
    for (const b of bufs) pool.release(b);
    expect(pool.idle).toBe(3 * 65536);
  });
});
