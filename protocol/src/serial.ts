// RFC 1982 serial number arithmetic with SERIAL_BITS = 32, as RFC 7143 section 4.2.2.1 requires
// for CmdSN, StatSN, DataSN and R2TSN: every comparison is modulo 2^32, so the counters may wrap.

const HALF = 0x8000_0000;

/** (a + n) mod 2^32. */
export function snAdd(a: number, n: number): number {
  return (a + n) >>> 0;
}

/** Signed distance b - a in serial space; undefined when the two are exactly 2^31 apart. */
export function snDiff(a: number, b: number): number | undefined {
  const d = (b - a) >>> 0;
  if (d === HALF) return undefined;
  return d < HALF ? d : d - 0x1_0000_0000;
}

/** a < b in serial space (RFC 1982 3.2). Values 2^31 apart are incomparable: false both ways. */
export function snLt(a: number, b: number): boolean {
  const d = (b - a) >>> 0;
  return d !== 0 && d < HALF;
}

export function snGt(a: number, b: number): boolean {
  return snLt(b, a);
}

export function snLte(a: number, b: number): boolean {
  return a >>> 0 === b >>> 0 || snLt(a, b);
}

export function snGte(a: number, b: number): boolean {
  return a >>> 0 === b >>> 0 || snLt(b, a);
}

/** lo <= x <= hi in serial space: the CmdSN window test (ExpCmdSN <= CmdSN <= MaxCmdSN). */
export function snInWindow(x: number, lo: number, hi: number): boolean {
  return snLte(lo, x) && snLte(x, hi);
}
