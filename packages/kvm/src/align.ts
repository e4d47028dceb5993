/**
 * `x - x % a` — `x` rounded down to a multiple of `a` — for an integer x ≥ 0 and a power of two
 * a, without `%`: V8 compiles `%` on numbers it does not know to be int32 (gfns, pfns, HVAs and
 * host-physical addresses, held as doubles) to a C call (fmod), and these sit on fault paths.
 * Exact: dividing by a power of two is exact for integers below 2^53.
 */
export function alignDown(x: number, a: number): number {
  return Math.floor(x / a) * a
}
