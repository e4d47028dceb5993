import { describe, expect, it } from 'vitest'
import { FrameAllocator, LOC_OPEN_BUS, LOC_ZERO, OPEN_BUS, PhysMem, PoisonedFrameError } from './index.ts'

describe('PhysMem', () => {
  it('backs frames lazily: reads of untouched memory are zero and allocate nothing', () => {
    const m = new PhysMem({ sizeBytes: 1 << 30 })
    expect(m.read32(0x1234_5678 & ~3)).toBe(0)
    m.write32(0x2000, 0) // storing zero needs no storage
    expect(m.backedFrames).toBe(0)
    m.write64(0x3008, 0xdeadbeef, 0x12345678)
    expect(m.backedFrames).toBe(1)
    expect(m.read32(0x3008)).toBe(0xdeadbeef)
    expect(m.read64(0x3008)).toBe(0xdeadbeef)
    expect(m.hi64).toBe(0x12345678)
    expect(m.read8(0x300b)).toBe(0xde)
    m.write8(0x300b, 0x11)
    expect(m.read32(0x3008)).toBe(0x11adbeef)
  })

  it('reads beyond installed memory as all ones and ignores writes there (also NaN and negative)', () => {
    const m = new PhysMem({ sizeBytes: 8192 })
    for (const pa of [8192, 2 ** 40, -8, Number.NaN]) {
      expect(m.read32(pa)).toBe(OPEN_BUS)
      expect(m.read64(pa)).toBe(OPEN_BUS)
      expect(m.hi64).toBe(OPEN_BUS)
      expect(m.locate(pa)).toBe(LOC_OPEN_BUS)
      m.write32(pa, 1)
    }
    expect(m.backedFrames).toBe(0)
    expect(m.locate(0)).toBe(LOC_ZERO)
    m.write32(4, 7)
    const w = m.locate(4)
    expect(w).toBeGreaterThanOrEqual(0)
    expect(m.locBuf[w]).toBe(7)
  })

  it('cmpxchg64 stores only when both halves still match', () => {
    const m = new PhysMem({ sizeBytes: 8192 })
    m.write64(0, 1, 2)
    expect(m.cmpxchg64(0, 1, 3, 9, 9)).toBe(false)
    expect(m.read32(0)).toBe(1)
    expect(m.cmpxchg64(0, 1, 2, 5, 6)).toBe(true)
    expect([m.read32(0), m.read32(4)]).toEqual([5, 6])
  })

  it('a poisoned frame throws on any access, naming the frame and the access', () => {
    const m = new PhysMem({ sizeBytes: 1 << 20 })
    m.write32(0x5000, 42)
    m.poison(5)
    expect(m.backedFrames).toBe(0)
    const err = (() => {
      try {
        m.read32(0x5010)
      } catch (e) {
        return e
      }
      return null
    })()
    expect(err).toBeInstanceOf(PoisonedFrameError)
    expect((err as PoisonedFrameError).code).toBe('FRAME_POISONED')
    expect((err as PoisonedFrameError).frame).toBe(5)
    expect((err as PoisonedFrameError).message).toMatch(/read of physical address 0x5010 in frame 0x5/)
    expect(() => { m.write32(0x5000, 1); }).toThrow(/write of physical address 0x5000/)
    expect(() => m.read64(0x5000)).toThrow(PoisonedFrameError)
    expect(() => m.locate(0x5000)).toThrow(PoisonedFrameError)
    m.unpoison(5)
    expect(m.read32(0x5010)).toBe(0)
  })

  it('read64Hinted gives read64 results and never serves a frame that lost or changed storage', () => {
    const m = new PhysMem({ sizeBytes: 1 << 20 })
    m.write64(0x1000, 1, 2)
    expect(m.read64Hinted(0x1000, 3)).toBe(1)
    expect(m.read64Hinted(0x1000, 3)).toBe(1) // cached frame
    m.zeroFrame(1) // storage dropped: the hint must not return stale words
    expect(m.read64Hinted(0x1000, 3)).toBe(0)
    m.write64(0x2000, 7, 8) // another frame gains storage (possibly the recycled slot)
    m.write64(0x1000, 9, 10)
    expect(m.read64Hinted(0x1000, 3)).toBe(9)
    expect(m.hi64).toBe(10)
    m.poison(1)
    expect(() => m.read64Hinted(0x1000, 3)).toThrow(PoisonedFrameError)
  })

  it('copyFrame copies words and zeroFrame clears them', () => {
    const m = new PhysMem({ sizeBytes: 1 << 20 })
    m.write32(0x1ffc, 0xabc)
    m.copyFrame(1, 3)
    expect(m.read32(0x3ffc)).toBe(0xabc)
    m.zeroFrame(3)
    expect(m.read32(0x3ffc)).toBe(0)
  })

  it('rejects bad sizes with a typed error', () => {
    expect(() => new PhysMem({ sizeBytes: 1000 })).toThrow(/positive multiple of 4096/)
  })
})

describe('FrameAllocator', () => {
  it('allocates deterministically, counts, reuses most-recently-freed first, and catches misuse', () => {
    const m = new PhysMem({ sizeBytes: 64 * 4096 })
    const a = new FrameAllocator(m, 10, 4)
    expect([a.alloc(), a.alloc(), a.alloc()]).toEqual([10, 11, 12])
    a.free(11, { poison: true })
    expect(() => m.read32(11 * 4096)).toThrow(PoisonedFrameError)
    expect(a.alloc()).toBe(11) // reused, and usable again
    expect(m.read32(11 * 4096)).toBe(0)
    expect(a.alloc()).toBe(13)
    expect(a.alloc()).toBe(-1)
    expect(() => a.allocOrThrow()).toThrow(/exhausted/)
    expect(a.stats()).toEqual({ allocated: 4, free: 0, peak: 4, totalAllocs: 5, totalFrees: 1 })
    a.free(12)
    expect(() => { a.free(12); }).toThrow(/freed twice/)
    expect(() => { a.free(3); }).toThrow(/outside this allocator/)
  })
})
