import { describe, expect, it } from 'vitest'
import { PhysMem } from '@mmusim/x86-hw'
import { BuddyFrameAllocator, HOST_EFAULT, HostMemory, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K } from './host-memory.ts'
import { Memslots } from './memslot.ts'
import { KvmMmuNotifier, type MmuNotifierListener } from './mmu-notifier.ts'

const HVA = 0x7f0000000000 // 1 GiB aligned
const M2 = 0x200000

describe('BuddyFrameAllocator', () => {
  it('hands out aligned 512-frame runs and coalesces piecewise frees', () => {
    const b = new BuddyFrameAllocator(new PhysMem({ sizeBytes: 16 << 20 }))
    expect(b.alloc()).toBe(0)
    expect(b.allocOrder(9)).toBe(512) // block 0 is split, next aligned run
    b.free(0)
    expect(b.allocOrder(9)).toBe(0) // frame 0 merged back with its free buddies into a 2M run
    for (let i = 1; i < 512; i++) b.free(i) // free a 2M run frame by frame
    b.free(0)
    expect(b.allocOrder(9)).toBe(0)
    expect(b.stats).toMatchObject({ allocated: 1024, allocs4k: 1, allocs2m: 3, failures: 0 })
    expect(() => {
      b.free(4000)
    }).toThrow(/freed twice/)
  })
  it('fails (-1) when no aligned run is free, and respects a non-zero first frame', () => {
    const b = new BuddyFrameAllocator(new PhysMem({ sizeBytes: 4 << 20 }), 0, 1024)
    b.alloc()
    expect(b.allocOrder(9)).toBe(512)
    expect(b.allocOrder(9)).toBe(-1)
    expect(b.stats.failures).toBe(1)
    const c = new BuddyFrameAllocator(new PhysMem({ sizeBytes: 8 << 20 }), 100, 1500)
    expect(c.allocOrder(9)).toBe(512)
    expect(c.allocOrder(9)).toBe(1024)
    expect(c.allocOrder(9)).toBe(-1) // 1536..1599 is too short
  })
})

describe('HostMemory: demand faults, THP, hugetlb, read-only', () => {
  it('allocates on first resolve only', () => {
    const h = new HostMemory({ sizeBytes: 64 << 20 })
    h.mmap(HVA, 4 * M2)
    const a = h.resolve(HVA + 0x1234, false)
    const b = h.resolve(HVA + 0x1000, true)
    expect(a).toEqual({ ok: true, pfn: 0, hpa: 0, writable: true, level: PG_LEVEL_4K })
    expect(b).toEqual(a)
    h.resolve(HVA + 0x2000, true)
    expect(h.stats).toMatchObject({ resolves: 3, demandFaults: 2, pages4k: 2, thpPages: 0 })
    expect(h.frames.stats.allocated).toBe(2)
    expect(h.hostMappingLevel(HVA + 0x1000)).toBe(PG_LEVEL_4K)
    expect(h.hostMappingLevel(HVA + 0x9000)).toBe(PG_LEVEL_4K) // unmapped reports 4K like host_pfn_mapping_level
  })

  it('backs a 2M-aligned THP region with one aligned 512-frame run', () => {
    const h = new HostMemory({ sizeBytes: 64 << 20 })
    h.mmap(HVA, 4 * M2, { thp: true })
    const r = h.resolve(HVA + M2 + 0x3000, true)
    expect(r).toMatchObject({ ok: true, level: PG_LEVEL_2M })
    if (!r.ok) throw new Error('unreachable')
    expect(r.pfn % 512).toBe(3)
    expect(h.hostMappingLevel(HVA + M2)).toBe(PG_LEVEL_2M)
    expect(h.resolve(HVA + M2 + 0x1ff000, false)).toMatchObject({ pfn: r.pfn - 3 + 511, level: PG_LEVEL_2M })
    expect(h.stats).toMatchObject({ demandFaults: 1, thpPages: 1, pages4k: 0 })
    expect(h.frames.stats.allocated).toBe(512)
  })

  it('falls back to 4K when the 2M region is not wholly in the VMA or no aligned run is free', () => {
    const h = new HostMemory({ sizeBytes: 4 << 20 })
    h.mmap(HVA + 0x1000, M2, { thp: true }) // no 2M region inside
    expect(h.resolve(HVA + 0x1000, true)).toMatchObject({ level: PG_LEVEL_4K })
    expect(h.stats.thpFallbacks).toBe(0)
    expect(h.frames.allocOrder(9)).toBe(512) // take the only other 2M run
    h.mmap(HVA + 4 * M2, M2, { thp: true })
    expect(h.resolve(HVA + 4 * M2, true)).toMatchObject({ level: PG_LEVEL_4K })
    expect(h.stats.thpFallbacks).toBe(1)
  })

  it('read-only VMA: read is mapped non-writable, write is a fault value (-EFAULT); no VMA; OOM', () => {
    const h = new HostMemory({ sizeBytes: 4 << 20 })
    h.mmap(HVA, M2, { readonly: true })
    expect(h.resolve(HVA, true)).toEqual({ ok: false, errno: HOST_EFAULT, reason: 'readonly' })
    expect(h.resolve(HVA, false)).toMatchObject({ ok: true, writable: false })
    expect(h.resolve(HVA + M2, false)).toEqual({ ok: false, errno: -14, reason: 'no-vma' })
    h.mmap(HVA + 8 * M2, 8 * M2)
    for (let i = 0; i < 1023; i++) h.resolve(HVA + 8 * M2 + i * 4096, true)
    expect(h.resolve(HVA + 8 * M2 + 1023 * 4096, true)).toEqual({ ok: false, errno: -14, reason: 'oom' })
    expect(h.stats.faults).toBe(3)
  })

  it('hugetlb 1G: aligned VMAs only, 1G mappings', () => {
    const h = new HostMemory({ sizeBytes: 2 ** 31 })
    expect(() => {
      h.mmap(HVA + M2, 2 ** 30, { hugetlb1G: true })
    }).toThrow(expect.objectContaining({ code: 'EINVAL' }))
    h.mmap(HVA, 2 ** 30, { hugetlb1G: true })
    const r = h.resolve(HVA + 0x12345000, true)
    expect(r).toMatchObject({ ok: true, level: PG_LEVEL_1G })
    if (!r.ok) throw new Error('unreachable')
    expect(r.pfn % 2 ** 18).toBe(0x12345)
    expect(() => {
      h.munmap(HVA, M2)
    }).toThrow(expect.objectContaining({ code: 'EINVAL' }))
    h.munmap(HVA, 2 ** 30)
    expect(h.frames.stats.allocated).toBe(0)
  })

  it('mmap/mprotect argument errors', () => {
    const h = new HostMemory({ sizeBytes: 4 << 20 })
    h.mmap(HVA, M2)
    expect(() => {
      h.mmap(HVA + 0x1000, 0x1000)
    }).toThrow(expect.objectContaining({ code: 'EEXIST' }))
    expect(() => {
      h.mmap(HVA + M2 + 1, 0x1000)
    }).toThrow(expect.objectContaining({ code: 'EINVAL' }))
    expect(() => {
      h.mprotect(HVA, 2 * M2, true)
    }).toThrow(expect.objectContaining({ code: 'ENOMEM' }))
    expect(h.listVmas()).toEqual([{ start: HVA, end: HVA + M2, thp: false, hugetlb1G: false, readonly: false }])
  })
})

/** Host + one VM: slot 0 (gfn 0x100, 4 MiB) over the VMA, plus an SMM alias of its first 64 KiB at gfn 0xa0. */
function setup(thp: boolean, young = false): { h: HostMemory; n: KvmMmuNotifier; log: string[] } {
  const h = new HostMemory({ sizeBytes: 64 << 20 })
  h.mmap(HVA, 2 * M2, { thp })
  const ms = new Memslots()
  ms.setUserMemoryRegion({ slot: 0, flags: 0, guestPhysAddr: 0x100000, memorySize: 2 * M2, userspaceAddr: HVA })
  ms.setUserMemoryRegion({ slot: 0, asId: 1, flags: 0, guestPhysAddr: 0xa0000, memorySize: 0x10000, userspaceAddr: HVA })
  const log: string[] = []
  let n: KvmMmuNotifier | undefined = undefined
  const st = (): string => `seq=${n!.state.seq} inProgress=${n!.state.inProgress}`
  const hx = (v: number): string => (v - HVA).toString(16)
  const l: MmuNotifierListener = {
    onInvalidateRangeStart: (_s, a, b) => log.push(`start +[${hx(a)},${hx(b)}) ${st()}`),
    onInvalidateRangeEnd: (_s, a, b) => log.push(`end +[${hx(a)},${hx(b)}) ${st()}`),
    unmapGfnRange: (as, _slot, s, e) => {
      log.push(`unmap as${as} [${s.toString(16)},${e.toString(16)}) range=[${n!.state.rangeStart.toString(16)},${n!.state.rangeEnd.toString(16)})`)
      return true
    },
    ageGfnRange: (as, _slot, s, e) => {
      log.push(`age as${as} [${s.toString(16)},${e.toString(16)})`)
      return young
    },
    testAgeGfn: (as, _slot, s, e) => {
      log.push(`test-age as${as} [${s.toString(16)},${e.toString(16)})`)
      return young
    },
    flushRemoteTlbs: () => log.push('flush'),
  }
  n = new KvmMmuNotifier(ms, l)
  h.registerNotifier(n)
  return { h, n, log }
}

describe('HostMemory: MMU-notifier event sequences', () => {
  it('munmap of one 4K page inside a THP: outer range, nested split range, free, VMA split', () => {
    const { h, n, log } = setup(true)
    const r = h.resolve(HVA, true)
    if (!r.ok) throw new Error('unreachable')
    h.munmap(HVA + 0x1000, 0x1000)
    expect(log).toEqual([
      'start +[1000,2000) seq=0 inProgress=1',
      'unmap as0 [101,102) range=[101,102)',
      'unmap as1 [a1,a2) range=[a1,102)',
      'flush',
      // __split_huge_pmd's own notifier range, nested inside the munmap's
      'start +[0,200000) seq=0 inProgress=2',
      'unmap as0 [100,300) range=[a1,300)',
      'unmap as1 [a0,b0) range=[a0,300)',
      'flush',
      'end +[0,200000) seq=1 inProgress=1',
      'end +[1000,2000) seq=2 inProgress=0',
    ])
    expect(n.state.activeInvalidateCount).toBe(0)
    expect(h.lookup(HVA + 0x1000)).toBeNull()
    expect(h.lookup(HVA)).toEqual({ pfn: r.pfn, level: PG_LEVEL_4K })
    expect(h.frames.stats.allocated).toBe(511)
    expect(h.mem.isPoisoned(r.pfn + 1)).toBe(true)
    expect(h.stats.thpSplits).toBe(1)
    expect(h.listVmas().map((v) => [v.start - HVA, v.end - HVA])).toEqual([
      [0, 0x1000],
      [0x2000, 0x400000],
    ])
    expect(h.resolve(HVA + 0x1000, false)).toMatchObject({ ok: false, reason: 'no-vma' })
  })

  it('mprotect read-only: one invalidation, then writes fault and reads map read-only', () => {
    const { h, log } = setup(true)
    h.resolve(HVA, true)
    h.mprotect(HVA, M2, true)
    expect(log).toEqual([
      'start +[0,200000) seq=0 inProgress=1',
      'unmap as0 [100,300) range=[100,300)',
      'unmap as1 [a0,b0) range=[a0,300)',
      'flush',
      'end +[0,200000) seq=1 inProgress=0',
    ])
    expect(h.resolve(HVA, true)).toMatchObject({ ok: false, reason: 'readonly' })
    expect(h.resolve(HVA, false)).toMatchObject({ ok: true, writable: false, level: PG_LEVEL_2M })
    expect(h.resolve(HVA + M2, true)).toMatchObject({ ok: true, writable: true })
  })

  it('migratePage: data copied, HPA changes, old frame poisoned, invalidation over the page', () => {
    const { h, log } = setup(false)
    h.write32(HVA + 0x10008, 0xdeadbeef)
    const before = h.lookup(HVA + 0x10008)!.pfn
    const m = h.migratePage(HVA + 0x10008)!
    expect(m.oldPfn).toBe(before)
    expect(m.newPfn).not.toBe(before)
    expect(log).toEqual(['start +[10000,11000) seq=0 inProgress=1', 'unmap as0 [110,111) range=[110,111)', 'flush', 'end +[10000,11000) seq=1 inProgress=0'])
    expect(h.lookup(HVA + 0x10008)!.pfn).toBe(m.newPfn)
    expect(h.read32(HVA + 0x10008)).toBe(0xdeadbeef)
    expect(h.mem.isPoisoned(m.oldPfn)).toBe(true)
    expect(h.migratePage(HVA + 0x20000)).toBeNull() // not mapped: nothing happens
    expect(log.length).toBe(4)
  })

  it('migrating a THP moves the whole 2M folio', () => {
    const { h, log } = setup(true)
    h.write32(HVA + 0x5000, 7)
    const m = h.migratePage(HVA + 0x5000)!
    expect(m.newPfn % 512).toBe(5)
    expect(h.read32(HVA + 0x5000)).toBe(7)
    expect(log[0]).toBe('start +[0,200000) seq=0 inProgress=1')
  })

  it('splitThp: one 2M invalidation, same frames as 4K mappings', () => {
    const { h, log } = setup(true)
    const r = h.resolve(HVA + 0x3000, true)
    if (!r.ok) throw new Error('unreachable')
    expect(h.splitThp(HVA + 0x3000)).toBe(true)
    expect(h.splitThp(HVA + 0x3000)).toBe(false)
    expect(log).toEqual([
      'start +[0,200000) seq=0 inProgress=1',
      'unmap as0 [100,300) range=[100,300)',
      'unmap as1 [a0,b0) range=[a0,300)',
      'flush',
      'end +[0,200000) seq=1 inProgress=0',
    ])
    expect(h.lookup(HVA + 0x3000)).toEqual({ pfn: r.pfn, level: PG_LEVEL_4K })
  })

  it('age / testYoung call the notifier handlers without touching seq', () => {
    const { h, n, log } = setup(false, true)
    expect(h.age(HVA, 0x20000)).toBe(true)
    expect(h.testYoung(HVA + 0x3000)).toBe(true)
    expect(log).toEqual(['age as0 [100,120)', 'age as1 [a0,b0)', 'test-age as0 [103,104)', 'test-age as1 [a3,a4)'])
    expect([n.state.seq, n.state.inProgress]).toEqual([0, 0])
  })

  it('munmap of a range no VMA covers fires nothing', () => {
    const { h, log } = setup(false)
    h.munmap(HVA + 0x10000000, 0x1000)
    expect(log).toEqual([])
  })
})

describe('VMAs keep one hidden class', () => {
  it('pieces left by mprotect splits are shaped like the VMA mmap made (the fault path reads them)', async () => {
    const { sameHiddenClass } = await import('@mmusim/x86-hw')
    const host = new HostMemory()
    host.mmap(HVA, 256 * 4096)
    const first = host.findVma(HVA)!
    // Each mprotect of one page in the middle splits twice; 60 splits warm the splitting code
    // up to optimized code, where an object spread `{ ...v, end }` would get new hidden classes.
    for (let i = 0; i < 30; i++) host.mprotect(HVA + (2 * i + 1) * 4096, 4096, i % 2 === 0)
    for (let i = 0; i < 61; i++) {
      const v = host.findVma(HVA + i * 4096)!
      expect(v.start).toBe(HVA + i * 4096)
      expect(sameHiddenClass(v, first)).toBe(true)
    }
  })
})
