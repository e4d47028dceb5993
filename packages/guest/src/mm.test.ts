import { describe, expect, it } from 'vitest'
import { sameHiddenClass } from '@mmusim/x86-hw'
import { makeVma, Mm } from './mm.ts'

describe('Mm VMAs', () => {
  it('carve splits VMAs at the range and returns the removed pieces', () => {
    const mm = new Mm(1, 0x1000, 1)
    mm.insertVma(makeVma(0x10000, 0x20000, 3, false))
    const removed = mm.carve(0x14000, 0x15000)
    expect(removed).toEqual([{ start: 0x14000, end: 0x15000, prot: 3, thp: false }])
    expect(mm.vmas).toEqual([
      { start: 0x10000, end: 0x14000, prot: 3, thp: false },
      { start: 0x15000, end: 0x20000, prot: 3, thp: false },
    ])
    expect(mm.findVma(0x14800)).toBeUndefined()
  })

  it('every piece carve makes has the hidden class of a mapped VMA (guest fault paths read them)', () => {
    const mm = new Mm(1, 0x1000, 1)
    const first = makeVma(0x100000, 0x200000, 3, true)
    mm.insertVma(first)
    // 40 carves warm carve() up to optimized code, where `{ ...v, end }` would get new classes.
    for (let i = 0; i < 40; i++) {
      for (const p of mm.carve(0x100000 + (2 * i + 1) * 0x1000, 0x100000 + (2 * i + 2) * 0x1000)) expect(sameHiddenClass(p, first)).toBe(true)
    }
    expect(mm.vmas).toHaveLength(41)
    for (const v of mm.vmas) expect(sameHiddenClass(v, first)).toBe(true)
  })
})
