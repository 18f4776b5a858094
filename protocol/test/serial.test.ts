import { describe, expect, it } from 'vitest';
import { snAdd, snDiff, snGt, snGte, snInWindow, snLt, snLte } from '../src/serial.ts';

describe('RFC 1982 serial arithmetic (32 bits)', () => {
  it('orders across the wrap', () => {
    expect(snLt(0xffff_fffe, 1)).toBe(true);
    expect(snGt(1, 0xffff_fffe)).toBe(true);
    expect(snLt(1, 0xffff_fffe)).toBe(false);
    expect(snLte(5, 5)).toBe(true);
    expect(snGte(5, 5)).toBe(true);
    expect(snLt(5, 5)).toBe(false);
  });

  it('treats values exactly 2^31 apart as incomparable', () => {
    expect(snLt(0, 0x8000_0000)).toBe(false);
    expect(snGt(0, 0x8000_0000)).toBe(false);
    expect(snDiff(0, 0x8000_0000)).toBeUndefined();
  });

  it('adds modulo 2^32 and measures signed distance', () => {
    expect(snAdd(0xffff_ffff, 1)).toBe(0);
    expect(snAdd(0xffff_fff0, 0x20)).toBe(0x10);
    expect(snDiff(0xffff_fff0, 0x10)).toBe(0x20);
    expect(snDiff(0x10, 0xffff_fff0)).toBe(-0x20);
  });

  it('checks the CmdSN window including a window that wraps', () => {
    expect(snInWindow(0xffff_ffff, 0xffff_fff0, 0x10)).toBe(true);
    expect(snInWindow(0x5, 0xffff_fff0, 0x10)).toBe(true);
    expect(snInWindow(0x11, 0xffff_fff0, 0x10)).toBe(false);
    expect(snInWindow(0xffff_ffef, 0xffff_fff0, 0x10)).toBe(false);
    // MaxCmdSN = ExpCmdSN - 1 means a closed window: nothing fits
    expect(snInWindow(7, 7, 6)).toBe(false);
  });
});
