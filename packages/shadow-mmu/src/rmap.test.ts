import { describe, expect, it } from 'vitest'
import { type RmapEntry, rmapArrayAt, rmapSptes } from './rmap.ts'

describe('rmap heads (a lone SPTE in place, several in an array)', () => {
  it('reads a single SPTE stored as address / 8, an array, or nothing, without changing the level', () => {
    const level: RmapEntry[] = [0x12340 / 8, [0x1000, 0x2008], undefined, []]
    expect(rmapSptes(level[0])).toEqual([0x12340])
    expect(rmapSptes(level[1])).toEqual([0x1000, 0x2008])
    expect(rmapSptes(level[2])).toEqual([])
    expect(rmapSptes(level[3])).toEqual([])
    expect(level[0]).toBe(0x12340 / 8)
  })

  it('rmapArrayAt turns a single into a one-element array stored back (edits then reach the level)', () => {
    const level: RmapEntry[] = [0x12340 / 8, [0x1000], undefined]
    const a = rmapArrayAt(level, 0)!
    expect(a).toEqual([0x12340])
    expect(level[0]).toBe(a)
    a.push(0x5008)
    expect(rmapSptes(level[0])).toEqual([0x12340, 0x5008])
    expect(rmapArrayAt(level, 1)).toBe(level[1])
    expect(rmapArrayAt(level, 2)).toBeUndefined()
    // A host above 8 GiB: the address / 8 is no small integer, still exact.
    const big: RmapEntry[] = [2 ** 40 / 8 + 3]
    expect(rmapSptes(big[0])).toEqual([2 ** 40 + 24])
  })
})
