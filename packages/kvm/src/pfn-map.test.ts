import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import { PfnMap } from './pfn-map.ts'

describe('PfnMap', () => {
  it('behaves as a Map<number, T> under random set/delete/get, across regions', () => {
    const op = fc.oneof(
      fc.record({ k: fc.constant('set' as const), pfn: fc.integer({ min: 0, max: 5000 }), v: fc.integer() }),
      fc.record({ k: fc.constant('del' as const), pfn: fc.integer({ min: 0, max: 5000 }) }),
      fc.record({ k: fc.constant('get' as const), pfn: fc.integer({ min: -3, max: 5000 }) }),
    )
    fc.assert(
      fc.property(fc.array(op, { maxLength: 200 }), (ops) => {
        const m = new PfnMap<{ v: number }>()
        const ref = new Map<number, { v: number }>()
        for (const o of ops) {
          if (o.k === 'set') {
            const x = { v: o.v }
            m.set(o.pfn, x)
            ref.set(o.pfn, x)
          } else if (o.k === 'del') expect(m.delete(o.pfn)).toBe(ref.delete(o.pfn))
          else {
            expect(m.get(o.pfn)).toBe(ref.get(o.pfn))
            expect(m.has(o.pfn)).toBe(ref.has(o.pfn))
          }
          expect(m.size).toBe(ref.size)
        }
        expect(new Set(m.values())).toEqual(new Set(ref.values()))
      }),
    )
  })

  it('finds nothing for fractional, negative or huge pfns, and refuses to store them', () => {
    const m = new PfnMap<string>()
    m.set(7, 'a')
    expect(m.get(7.5)).toBeUndefined()
    expect(m.get(-1)).toBeUndefined()
    expect(m.get(2 ** 40)).toBeUndefined()
    expect(m.get(Number.NaN)).toBeUndefined()
    expect(() => { m.set(1.5, 'x'); }).toThrow(RangeError)
    expect(() => { m.set(-2, 'x'); }).toThrow(/non-negative integer/)
    expect(m.size).toBe(1)
  })
})
