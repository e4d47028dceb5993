import { describe, expect, it } from 'vitest'
import { GuestError } from './errors.ts'
import { Prng } from './prng.ts'

function draws(p: Prng, n: number): number[] {
  return Array.from({ length: n }, () => p.nextU32())
}

/** Pearson chi-square statistic of `n` draws of nextInt(k). */
function chiSquare(p: Prng, k: number, n: number): number {
  const counts = new Array<number>(k).fill(0)
  for (let i = 0; i < n; i++) counts[p.nextInt(k)]! += 1
  const e = n / k
  return counts.reduce((acc, c) => acc + (c - e) ** 2 / e, 0)
}

describe('Prng', () => {
  it('pins the first outputs for fixed seeds (golden values, computed once)', () => {
    expect(draws(new Prng(42), 8)).toEqual([
      3305438999, 1636957746, 545754796, 315823, 2317030748, 1781105805, 3650628596, 2247049780,
    ])
    expect(draws(new Prng(0x1f_ffff_ffff_ffff), 4)).toEqual([4067030910, 1472245945, 2868590001, 541911520])
    expect([0, 1, 2, -1].map((s) => new Prng(s).nextU32())).toEqual([1473654809, 2201899968, 3508541523, 1579029667])
    const r = new Prng(42)
    expect(Array.from({ length: 6 }, () => r.nextInt(100))).toEqual([99, 46, 96, 23, 48, 5])
    expect(r.nextFloat()).toBe(0.8499782049892994)
    expect(r.nextInt(2 ** 53)).toBe(5644609222038704)
    expect(r.nextInt(2 ** 40 + 3)).toBe(630899310199)
  })

  it('uses both halves of a 53-bit seed', () => {
    const lo = 0x1234_5678
    const a = draws(new Prng(lo), 4)
    const b = draws(new Prng(lo + 2 ** 32), 4)
    const c = draws(new Prng(lo + 2 ** 52), 4)
    expect(a).not.toEqual(b)
    expect(a).not.toEqual(c)
    expect(b).not.toEqual(c)
  })

  it('same seed reproduces the same sequence', () => {
    expect(draws(new Prng(987654321), 1000)).toEqual(draws(new Prng(987654321), 1000))
  })

  it('nextU32 returns unsigned 32-bit integers with balanced bits', () => {
    const p = new Prng(1)
    let ones = 0
    const n = 20000
    let bad = 0
    for (let i = 0; i < n; i++) {
      const x = p.nextU32()
      if (!(Number.isInteger(x) && x >= 0 && x < 2 ** 32)) bad++
      for (let v = x; v !== 0; v >>>= 1) ones += v & 1
    }
    expect(bad).toBe(0)
    expect(Math.abs(ones / (n * 32) - 0.5)).toBeLessThan(0.005)
  })

  it('nextInt stays in bounds, including 1, 2^32 and bounds above 2^32', () => {
    const p = new Prng(7)
    for (const n of [1, 2, 3, 10, 1000, 2 ** 31 + 1, 2 ** 32, 2 ** 32 + 1, 3 * 2 ** 40 + 5, 2 ** 53]) {
      let bad = 0
      for (let i = 0; i < 2000; i++) {
        const x = p.nextInt(n)
        if (!(Number.isSafeInteger(x) && x >= 0 && x < n)) bad++
      }
      expect(bad, `bound ${n}`).toBe(0)
    }
    expect(new Prng(7).nextInt(1)).toBe(0)
  })

  it('nextInt is roughly uniform (chi-square, fixed seeds, deterministic)', () => {
    // Critical values at p = 0.001: df=9 -> 27.88, df=6 -> 22.46, df=99 -> 148.2.
    expect(chiSquare(new Prng(12345), 10, 100_000)).toBeCloseTo(13.9216, 4)
    expect(chiSquare(new Prng(2024), 7, 70_000)).toBeLessThan(22.46)
    expect(chiSquare(new Prng(99), 100, 200_000)).toBeLessThan(148.2)
  })

  it('nextInt rejects out-of-range or non-integer bounds with a typed error', () => {
    const p = new Prng(1)
    for (const n of [0, -1, 1.5, Number.NaN, Infinity, 2 ** 53 + 2]) {
      expect(() => p.nextInt(n)).toThrow(GuestError)
      try {
        p.nextInt(n)
      } catch (e) {
        expect((e as GuestError).code).toBe('INVALID_ARGUMENT')
      }
    }
  })

  it('rejects non-safe-integer seeds and stream ids', () => {
    expect(() => new Prng(1.5)).toThrow(/safe integer/)
    expect(() => new Prng(2 ** 53)).toThrow(GuestError)
    expect(() => new Prng(1).fork(Number.NaN)).toThrow(/stream/)
  })

  it('nextFloat is in [0, 1) with mean near 1/2', () => {
    const p = new Prng(5)
    let sum = 0
    const n = 50_000
    let bad = 0
    for (let i = 0; i < n; i++) {
      const f = p.nextFloat()
      if (!(f >= 0 && f < 1)) bad++
      sum += f
    }
    expect(bad).toBe(0)
    expect(Math.abs(sum / n - 0.5)).toBeLessThan(0.01)
  })

  it('fork: same stream reproduces, different streams differ, parent is untouched', () => {
    const parent = new Prng(42)
    expect(draws(parent.fork(3), 100)).toEqual(draws(parent.fork(3), 100))
    expect(draws(parent.fork(0), 4)).toEqual([2481438359, 798625896, 1964681683, 2525957925])
    expect(draws(parent.fork(1), 4)).toEqual([2635019486, 1517243612, 2778251126, 2874937744])

    // Forking neither reads nor advances the parent's position.
    const a = new Prng(42)
    const b = new Prng(42)
    draws(b, 17)
    expect(draws(a.fork(5), 10)).toEqual(draws(b.fork(5), 10))
    expect(draws(a, 10)).toEqual(draws(new Prng(42), 10))

    // 64 streams, pairwise distinct and distinct from the parent; first outputs all different.
    const firsts = new Set<string>()
    firsts.add(draws(new Prng(42), 4).join(','))
    for (let s = 0; s < 64; s++) firsts.add(draws(parent.fork(s), 4).join(','))
    expect(firsts.size).toBe(65)

    // Different parents give different children for the same stream; nested forks work.
    expect(draws(new Prng(43).fork(0), 4)).not.toEqual(draws(parent.fork(0), 4))
    expect(draws(parent.fork(1).fork(2), 8)).toEqual(draws(new Prng(42).fork(1).fork(2), 8))
    expect(draws(parent.fork(1).fork(2), 8)).not.toEqual(draws(parent.fork(2).fork(1), 8))
  })

  it('fork streams are uncorrelated (no shared outputs in the first 10k draws)', () => {
    const p = new Prng(2025)
    const seen = new Set(draws(p.fork(0), 10_000))
    const other = draws(p.fork(1), 10_000).filter((x) => seen.has(x)).length
    // Expected coincidences for 10k x 10k random 32-bit values: ~0.02.
    expect(other).toBeLessThanOrEqual(1)
  })

  it('shuffle permutes in place, deterministically, for arrays and typed arrays', () => {
    const arr = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    const out = new Prng(7).shuffle(arr)
    expect(out).toBe(arr)
    expect(arr).toEqual([2, 1, 5, 7, 9, 3, 0, 6, 4, 8])
    const ta = new Prng(7).shuffle(Uint32Array.from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]))
    expect(Array.from(ta)).toEqual([2, 1, 5, 7, 9, 3, 0, 6, 4, 8])
    expect(new Prng(1).shuffle([])).toEqual([])
    expect(new Prng(1).shuffle(['x'])).toEqual(['x'])
  })

  it('shuffle is roughly uniform over the 6 permutations of 3 elements', () => {
    const p = new Prng(31337)
    const counts = new Map<string, number>()
    const n = 60_000
    for (let i = 0; i < n; i++) {
      const key = p.shuffle([0, 1, 2]).join('')
      counts.set(key, (counts.get(key) ?? 0) + 1)
    }
    expect(counts.size).toBe(6)
    const e = n / 6
    let chi = 0
    for (const c of counts.values()) chi += (c - e) ** 2 / e
    expect(chi).toBeLessThan(20.52) // df=5, p = 0.001
  })
})
