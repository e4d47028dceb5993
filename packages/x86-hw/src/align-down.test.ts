import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import { alignDown } from './bits.ts'

describe('alignDown', () => {
  it('floors negatives too', () => {
    expect(alignDown(-1, 4096)).toBe(-4096)
    expect(alignDown(-4096, 4096)).toBe(-4096)
  })

  it('equals x - x % a for integers 0 ≤ x < 2^53 and powers of two a (gfns, pfns, HVAs, addresses)', () => {
    fc.assert(
      fc.property(fc.maxSafeNat(), fc.integer({ min: 0, max: 40 }), (x, k) => {
        const a = 2 ** k
        expect(alignDown(x, a)).toBe(x - (x % a))
      }),
    )
    expect(alignDown(2 ** 47 + 0x1234567, 2 ** 21)).toBe(2 ** 47 + 0x1200000)
  })
})
