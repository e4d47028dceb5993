import { describe, expect, it } from 'vitest'
import { Prng } from './prng.ts'

describe('Prng (xoshiro128**)', () => {
  it('is deterministic per seed and differs across seeds', () => {
    const a = new Prng(7)
    const b = new Prng(7)
    const c = new Prng(8)
    const xs = Array.from({ length: 8 }, () => a.nextU32())
    expect(Array.from({ length: 8 }, () => b.nextU32())).toEqual(xs)
    expect(Array.from({ length: 8 }, () => c.nextU32())).not.toEqual(xs)
    for (const x of xs) expect(Number.isInteger(x) && x >= 0 && x < 2 ** 32).toBe(true)
  })

  it('nextInt stays in range and covers it roughly uniformly; nextFloat is in [0, 1)', () => {
    const p = new Prng(123)
    const counts = [0, 0, 0, 0, 0, 0]
    for (let i = 0; i < 60_000; i++) counts[p.nextInt(6)]!++
    for (const n of counts) expect(Math.abs(n - 10_000)).toBeLessThan(500)
    let lo = 1
    let hi = 0
    for (let i = 0; i < 10_000; i++) {
      const f = p.nextFloat()
      lo = Math.min(lo, f)
      hi = Math.max(hi, f)
    }
    expect(lo).toBeGreaterThanOrEqual(0)
    expect(lo).toBeLessThan(0.01)
    expect(hi).toBeLessThan(1)
    expect(hi).toBeGreaterThan(0.99)
    expect(() => p.nextInt(0)).toThrow(/nextInt/)
  })
})
