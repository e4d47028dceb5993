import { describe, expect, it } from 'vitest'
import { isKvmError, KvmError, type KvmErrorCode } from './errors.ts'
import {
  dirtyLogMaskGfns,
  gfnToHvaMemslot,
  hvaToGfnMemslot,
  isLpageDisallowed,
  KVM_DIRTY_LOG_INITIALLY_SET,
  KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
  KVM_MEM_LOG_DIRTY_PAGES,
  KVM_MEM_READONLY,
  KVM_MEMSLOT_INVALID,
  KVM_USER_MEM_SLOTS,
  MemslotCache,
  Memslots,
  updateGfnDisallowLpageCount,
  type UserMemoryRegion,
} from './memslot.ts'

const HVA = 0x7f0000000000
const MB2 = 0x200000

function region(over: Partial<UserMemoryRegion> = {}): UserMemoryRegion {
  return { slot: 0, asId: 0, flags: 0, guestPhysAddr: 0x100000, memorySize: MB2, userspaceAddr: HVA, ...over }
}

/** Assert the request throws a KvmError with `code` and leaves the whole state unchanged. */
function expectRejected(ms: Memslots, r: UserMemoryRegion, code: KvmErrorCode): KvmError {
  const before = ms.snapshot()
  let err: unknown
  try {
    ms.setUserMemoryRegion(r)
  } catch (e) {
    err = e
  }
  expect(isKvmError(err, code), `expected ${code}, got ${String(err)}`).toBe(true)
  expect(ms.snapshot()).toEqual(before)
  return err as KvmError
}

describe('KVM_SET_USER_MEMORY_REGION', () => {
  it('creates a slot with base gfn, npages, hva and bumps the generation by 2', () => {
    const ms = new Memslots()
    const c = ms.setUserMemoryRegion(region({ slot: 3 }))
    expect(c.kind).toBe('create')
    expect(c.old).toBeNull()
    expect(c.new).toMatchObject({ id: 3, asId: 0, baseGfn: 0x100, npages: 512, userspaceAddr: HVA, flags: 0, dirtyBitmap: null })
    expect(c.generation).toBe(2)
    expect(ms.spaces[0].generation).toBe(2)
    expect(ms.spaces[1].generation).toBe(1) // address space 1 starts at 1 and is untouched
    expect(ms.nrMemslotPages).toBe(512)
    expect(gfnToHvaMemslot(c.new!, 0x101)).toBe(HVA + 0x1000)
    expect(hvaToGfnMemslot(HVA + 0x1fff, c.new!)).toBe(0x101)
  })

  it('address space 1 (SMM) has its own slots and odd generations', () => {
    const ms = new Memslots()
    ms.setUserMemoryRegion(region())
    const c = ms.setUserMemoryRegion(region({ asId: 1 })) // same gfns, other address space: no overlap
    expect(c.generation).toBe(3)
    expect(ms.spaces[0].generation).toBe(2)
  })

  describe('every rejection returns the kernel errno and changes nothing', () => {
    const setup = (): Memslots => {
      const ms = new Memslots()
      ms.setUserMemoryRegion(region({ slot: 0, guestPhysAddr: 0x100000, flags: KVM_MEM_LOG_DIRTY_PAGES }))
      ms.setUserMemoryRegion(region({ slot: 1, guestPhysAddr: 0x400000, userspaceAddr: HVA + 0x1000000, flags: KVM_MEM_READONLY }))
      return ms
    }
    it('gpa not page aligned → EINVAL', () => {
      expectRejected(setup(), region({ slot: 5, guestPhysAddr: 0x800800 }), 'EINVAL')
    })
    it('size not page aligned → EINVAL', () => {
      expectRejected(setup(), region({ slot: 5, guestPhysAddr: 0x800000, memorySize: 0x1800 }), 'EINVAL')
    })
    it('hva not page aligned → EINVAL', () => {
      expectRejected(setup(), region({ slot: 5, guestPhysAddr: 0x800000, userspaceAddr: HVA + 8 }), 'EINVAL')
    })
    it('hva range beyond TASK_SIZE_MAX (access_ok) → EINVAL', () => {
      expectRejected(setup(), region({ slot: 5, guestPhysAddr: 0x800000, userspaceAddr: 0x7ffffffff000, memorySize: 0x2000 }), 'EINVAL')
    })
    it('unknown flag bit → EINVAL', () => {
      const e = expectRejected(setup(), region({ slot: 5, guestPhysAddr: 0x800000, flags: 4 }), 'EINVAL')
      expect(e.message).toContain('KVM_MEM_LOG_DIRTY_PAGES (1) and KVM_MEM_READONLY (2)')
      expect(e.errno).toBe(22)
    })
    it('slot id ≥ KVM_USER_MEM_SLOTS (32764) → EINVAL', () => {
      expect(KVM_USER_MEM_SLOTS).toBe(32764)
      expectRejected(setup(), region({ slot: 32764, guestPhysAddr: 0x800000 }), 'EINVAL')
    })
    it('as_id ≥ 2 → EINVAL', () => {
      expectRejected(setup(), region({ slot: 5, asId: 2, guestPhysAddr: 0x800000 }), 'EINVAL')
    })
    it('gpa + size wrapping 2^64 → EINVAL', () => {
      expectRejected(setup(), region({ slot: 5, guestPhysAddr: 0xfffffffffffff000n, memorySize: 0x2000 }), 'EINVAL')
    })
    it('more than KVM_MEM_MAX_NR_PAGES pages → EINVAL', () => {
      expectRejected(setup(), region({ slot: 5, guestPhysAddr: 0, memorySize: 2n ** 31n * 4096n, userspaceAddr: 0x1000 }), 'EINVAL')
    })
    it('slot ending above kvm_mmu_max_gfn() → EINVAL', () => {
      const ms = new Memslots({ maxGpaBits: 36 })
      expect(ms.maxGfn).toBe(0xffffff)
      ms.setUserMemoryRegion(region({ slot: 0, guestPhysAddr: 2 ** 36 - 0x3000, memorySize: 0x2000 })) // last gfn = max - 1: fine
      expectRejected(ms, region({ slot: 1, guestPhysAddr: 2 ** 36 - 0x1000, memorySize: 0x2000, userspaceAddr: HVA + MB2 }), 'EINVAL')
      expect(ms.setUserMemoryRegion(region({ slot: 1, guestPhysAddr: 2 ** 36 - 0x1000, memorySize: 0x1000, userspaceAddr: HVA + MB2 })).kind).toBe('create') // last gfn == max
    })
    it('negative or fractional numbers → EINVAL', () => {
      expectRejected(setup(), region({ slot: 5, guestPhysAddr: -4096 }), 'EINVAL')
      expectRejected(setup(), region({ slot: 5.5, guestPhysAddr: 0x800000 }), 'EINVAL')
    })
    it('deleting a slot that does not exist → EINVAL (kvm_main.c: `if (!old || !old->npages) return -EINVAL`)', () => {
      expectRejected(setup(), region({ slot: 7, memorySize: 0 }), 'EINVAL')
    })
    it('changing the size of an existing slot → EINVAL', () => {
      expectRejected(setup(), region({ slot: 0, memorySize: 2 * MB2 }), 'EINVAL')
    })
    it('changing the hva of an existing slot → EINVAL', () => {
      expectRejected(setup(), region({ slot: 0, userspaceAddr: HVA + MB2, flags: KVM_MEM_LOG_DIRTY_PAGES }), 'EINVAL')
    })
    it('toggling KVM_MEM_READONLY on an existing slot → EINVAL (both directions)', () => {
      expectRejected(setup(), region({ slot: 0, flags: KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY }), 'EINVAL')
      expectRejected(setup(), region({ slot: 1, guestPhysAddr: 0x400000, userspaceAddr: HVA + 0x1000000, flags: 0 }), 'EINVAL')
    })
    it('creating a slot overlapping another of the same address space → EEXIST', () => {
      const e = expectRejected(setup(), region({ slot: 5, guestPhysAddr: 0x2ff000, memorySize: 0x2000 }), 'EEXIST')
      expect(e.errno).toBe(17)
    })
    it('moving a slot onto another → EEXIST', () => {
      expectRejected(setup(), region({ slot: 1, guestPhysAddr: 0x200000, userspaceAddr: HVA + 0x1000000, flags: KVM_MEM_READONLY }), 'EEXIST')
    })
    it('overlap is reported before the max-gfn check (kernel order)', () => {
      const ms = new Memslots({ maxGpaBits: 36 })
      ms.setUserMemoryRegion(region({ slot: 0, guestPhysAddr: 2 ** 36 - MB2, memorySize: MB2 }))
      expectRejected(ms, region({ slot: 1, guestPhysAddr: 2 ** 36 - 0x1000, memorySize: 0x2000, userspaceAddr: HVA + MB2 }), 'EEXIST')
    })
  })

  it('a slot may overlap its own old range when moved by less than its size', () => {
    const ms = new Memslots()
    ms.setUserMemoryRegion(region())
    const c = ms.setUserMemoryRegion(region({ guestPhysAddr: 0x101000 }))
    expect(c.kind).toBe('move')
    expect(c.new!.baseGfn).toBe(0x101)
  })

  it('move: INVALID slot active during flushShadowMemslot, two swaps (+4), fresh arch', () => {
    const calls: string[] = []
    const ms: Memslots = new Memslots({
      listener: {
        memslotsUpdated: (as, gen) => calls.push(`updated as${as} gen${gen} inProgress=${ms.spaces[as]!.updateInProgress}`),
        flushShadowMemslot: (old) => {
          const active = ms.idToMemslot(0, old.id)!
          calls.push(`flush slot${old.id} gfn${old.baseGfn.toString(16)} activeInvalid=${(active.flags & KVM_MEMSLOT_INVALID) !== 0}`)
        },
        commitMemoryRegion: (c) => calls.push(`commit ${c.kind} gen${c.generation}`),
      },
    })
    const created = ms.setUserMemoryRegion(region()).new!
    calls.length = 0
    const c = ms.setUserMemoryRegion(region({ guestPhysAddr: 0x40000000 }))
    expect(calls).toEqual(['updated as0 gen4 inProgress=true', 'flush slot0 gfn100 activeInvalid=true', 'updated as0 gen6 inProgress=true', 'commit move gen6'])
    expect(c.kind).toBe('move')
    expect(c.old).toBe(created)
    expect(c.new!.baseGfn).toBe(0x40000)
    expect(c.new!.arch).not.toBe(created.arch)
    expect(ms.gfnToMemslot(0, 0x100)).toBeNull()
    expect(ms.gfnToMemslot(0, 0x40000)).toBe(c.new)
  })

  it('flags-only: shares arch, allocates the bitmap, +2; same flags → none', () => {
    const ms = new Memslots()
    const a = ms.setUserMemoryRegion(region()).new!
    const c = ms.setUserMemoryRegion(region({ flags: KVM_MEM_LOG_DIRTY_PAGES }))
    expect(c.kind).toBe('flags-only')
    expect(c.new!.arch).toBe(a.arch)
    expect(c.new!.dirtyBitmap).toEqual(new Uint32Array(16)) // 512 pages = 8 longs = 16 words, all clear
    expect(c.generation).toBe(4)
    expect(ms.nrMemslotsDirtyLogging).toBe(1)
    const n = ms.setUserMemoryRegion(region({ flags: KVM_MEM_LOG_DIRTY_PAGES }))
    expect(n.kind).toBe('none')
    expect(n.generation).toBe(4)
    const off = ms.setUserMemoryRegion(region({ flags: 0 }))
    expect(off.new!.dirtyBitmap).toBeNull()
    expect(ms.nrMemslotsDirtyLogging).toBe(0)
  })

  it('delete: +4, slot gone, pages accounted', () => {
    const ms = new Memslots()
    ms.setUserMemoryRegion(region())
    const d = ms.setUserMemoryRegion(region({ memorySize: 0 }))
    expect(d.kind).toBe('delete')
    expect(d.new).toBeNull()
    expect(d.generation).toBe(6)
    expect(ms.idToMemslot(0, 0)).toBeNull()
    expect(ms.nrMemslotPages).toBe(0)
  })
})

describe('kvm_lpage_info (kvm_alloc_memslot_metadata)', () => {
  it('disallows huge pages at unaligned ends', () => {
    const ms = new Memslots()
    // gfn 0x200 (2M aligned) + 0x300 pages: tail is half a 2M page; 1G: unaligned head.
    const s = ms.setUserMemoryRegion(region({ guestPhysAddr: 0x200000, memorySize: 0x300000 })).new!
    expect(Array.from(s.arch.lpageInfo[0])).toEqual([0, 1])
    expect(Array.from(s.arch.lpageInfo[1])).toEqual([1])
    expect(isLpageDisallowed(s, 0x200, 2)).toBe(false)
    expect(isLpageDisallowed(s, 0x4ff, 2)).toBe(true)
  })
  it('disallows all huge pages when gfn and hva are not congruent', () => {
    const ms = new Memslots()
    const s = ms.setUserMemoryRegion(region({ guestPhysAddr: 0x200000, memorySize: 0x400000, userspaceAddr: HVA + 0x1000 })).new!
    expect(Array.from(s.arch.lpageInfo[0])).toEqual([1, 1])
  })
  it('disallow/allow counts are balanced', () => {
    const ms = new Memslots()
    const s = ms.setUserMemoryRegion(region({ guestPhysAddr: 0x200000, memorySize: 0x400000 })).new!
    updateGfnDisallowLpageCount(s, 0x400, 1)
    expect(Array.from(s.arch.lpageInfo[0])).toEqual([0, 1])
    updateGfnDisallowLpageCount(s, 0x400, -1)
    expect(Array.from(s.arch.lpageInfo[0])).toEqual([0, 0])
    expect(() => { updateGfnDisallowLpageCount(s, 0x400, -1); }).toThrow(/went negative/)
  })
})

describe('gfn → memslot lookup', () => {
  it('binary search, vCPU cache hits counted, reset on generation change', () => {
    const ms = new Memslots()
    for (let i = 0; i < 8; i++) {
      ms.setUserMemoryRegion(region({ slot: i, guestPhysAddr: 0x10000000 * i, userspaceAddr: HVA + 0x10000000 * i }))
    }
    const cache = new MemslotCache()
    expect(ms.gfnToMemslot(0, 0x30000 + 5, cache)!.id).toBe(3)
    expect(ms.gfnToMemslot(0, 0x30000 + 6, cache)!.id).toBe(3)
    expect(ms.gfnToMemslot(0, 0x30000 + 7, cache)!.id).toBe(3)
    expect(ms.gfnToMemslot(0, 0x50000, cache)!.id).toBe(5)
    expect(ms.gfnToMemslot(0, 0x50000 + 0x200, cache)).toBeNull() // hole after slot 5
    expect(cache.lookups).toBe(5)
    expect(cache.hits).toBe(2)
    ms.setUserMemoryRegion(region({ slot: 9, guestPhysAddr: 0x90000000, userspaceAddr: HVA + 0x90000000 }))
    expect(ms.gfnToMemslot(0, 0x50001, cache)!.id).toBe(5) // generation changed: cache reset, miss
    expect(cache.hits).toBe(2)
    expect(ms.gfnToMemslot(0, 0x50002, cache)!.id).toBe(5)
    expect(cache.hits).toBe(3)
  })
  it('VM-wide last_used_slot', () => {
    const ms = new Memslots()
    ms.setUserMemoryRegion(region())
    expect(ms.gfnToMemslot(0, 0x100)!.id).toBe(0)
    expect(ms.gfnToMemslot(0, 0x1ff)!.id).toBe(0)
    expect(ms.gfnToMemslot(1, 0x100)).toBeNull()
    expect(ms.spaces[0].lookups).toBe(2)
    expect(ms.spaces[0].lastUsedHits).toBe(1)
  })
})

describe('dirty log', () => {
  const logging = (ms: Memslots, npages = 200): void => {
    ms.setUserMemoryRegion(region({ flags: KVM_MEM_LOG_DIRTY_PAGES, memorySize: npages * 4096 }))
  }

  it('normal mode: get returns a copy, clears, and reports 64-page chunks to re-protect', () => {
    const ms = new Memslots()
    logging(ms)
    const s = ms.idToMemslot(0, 0)!
    ms.markPageDirty(s, 0x100)
    ms.markPageDirty(s, 0x100 + 33)
    ms.markPageDirty(s, 0x100 + 130)
    const r = ms.getDirtyLog(0, 0)
    expect(r.bitmap.length).toBe(8) // ⌈200/64⌉ = 4 longs
    expect(Array.from(r.bitmap)).toEqual([1, 2, 0, 0, 4, 0, 0, 0])
    expect(r.isDirty).toBe(true)
    expect(r.flush).toBe(true)
    expect(r.masks.map((m) => [m.gfnOffset, m.lo, m.hi])).toEqual([
      [0, 1, 2],
      [128, 4, 0],
    ])
    expect(r.masks.flatMap(dirtyLogMaskGfns)).toEqual([0x100, 0x100 + 33, 0x100 + 130])
    expect(Array.from(s.dirtyBitmap!)).toEqual([0, 0, 0, 0, 0, 0, 0, 0])
    const again = ms.getDirtyLog(0, 0)
    expect(again.isDirty).toBe(false)
    expect(again.flush).toBe(false)
  })

  it('manual protect + initially set: new bitmaps are all ones up to npages; get does not clear', () => {
    const ms = new Memslots()
    ms.enableManualDirtyLogProtect(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET)
    logging(ms, 100)
    const r = ms.getDirtyLog(0, 0)
    expect(Array.from(r.bitmap)).toEqual([0xffffffff, 0xffffffff, 0xffffffff, 0xf]) // 100 pages
    expect(r.masks).toEqual([])
    expect(Array.from(ms.idToMemslot(0, 0)!.dirtyBitmap!)).toEqual(Array.from(r.bitmap))
  })

  it('manual protect: clear applies the mask, returns only bits that were set', () => {
    const ms = new Memslots()
    ms.enableManualDirtyLogProtect(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    logging(ms, 200)
    const s = ms.idToMemslot(0, 0)!
    ms.markPageDirty(s, 0x100 + 64 + 1)
    ms.markPageDirty(s, 0x100 + 64 + 40)
    // clear pages 64..199 (reaches the end: 136 pages, not a multiple of 64, allowed)
    const user = new Uint32Array(6)
    user[0] = (1 << 1) | (1 << 2) // page 65 set, page 66 was clean
    user[1] = 1 << 8 // page 104
    const r = ms.clearDirtyLog(0, 0, 64, 136, user)
    expect(r.masks.map((m) => [m.gfnOffset, m.lo, m.hi])).toEqual([[64, 2, 0x100]])
    expect(r.flush).toBe(true)
    expect(Array.from(s.dirtyBitmap!)).toEqual([0, 0, 0, 0, 0, 0, 0, 0])
    expect(ms.getDirtyLog(0, 0).masks).toEqual([]) // manual mode: get never re-protects
  })

  it('clear alignment and range rules (kvm_clear_dirty_log_protect)', () => {
    const ms = new Memslots()
    ms.enableManualDirtyLogProtect(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    logging(ms, 200)
    const bm = new Uint32Array(8)
    const code = (f: () => unknown): string | undefined => {
      try {
        f()
      } catch (e) {
        return (e as KvmError).code
      }
      return undefined
    }
    expect(code(() => ms.clearDirtyLog(0, 0, 32, 64, bm))).toBe('EINVAL') // first_page not a multiple of 64
    expect(code(() => ms.clearDirtyLog(0, 0, 0, 100, bm))).toBe('EINVAL') // not multiple of 64, does not reach the end
    expect(code(() => ms.clearDirtyLog(0, 0, 128, 73, bm))).toBe('EINVAL') // beyond the slot
    expect(code(() => ms.clearDirtyLog(0, 0, 256, 0, bm))).toBe('EINVAL') // first_page > npages
    expect(code(() => ms.clearDirtyLog(0, 0, 0, 128, bm))).toBeUndefined()
    expect(code(() => ms.clearDirtyLog(0, 0, 128, 72, bm))).toBeUndefined() // reaches the end exactly
    expect(code(() => ms.clearDirtyLog(0, 0, 0, 200, new Uint32Array(2)))).toBe('EFAULT')
    expect(code(() => ms.clearDirtyLog(0, 3, 0, 64, bm))).toBe('ENOENT')
    expect(code(() => ms.clearDirtyLog(2, 0, 0, 64, bm))).toBe('EINVAL')
    // first_page alignment is checked before the slot lookup, as in the kernel
    expect(code(() => ms.clearDirtyLog(0, 3, 1, 64, bm))).toBe('EINVAL')
  })

  it('get: ENOENT for a slot without a bitmap, EINVAL out of range', () => {
    const ms = new Memslots()
    ms.setUserMemoryRegion(region())
    expect(() => ms.getDirtyLog(0, 0)).toThrow(expect.objectContaining({ code: 'ENOENT' }))
    expect(() => ms.getDirtyLog(0, 1)).toThrow(expect.objectContaining({ code: 'ENOENT' }))
    expect(() => ms.getDirtyLog(0, KVM_USER_MEM_SLOTS)).toThrow(expect.objectContaining({ code: 'EINVAL' }))
    ms.markPageDirty(ms.idToMemslot(0, 0), 0x100) // not logging: no-op
  })

  it('KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 validation', () => {
    const ms = new Memslots()
    expect(() => { ms.enableManualDirtyLogProtect(KVM_DIRTY_LOG_INITIALLY_SET); }).toThrow(expect.objectContaining({ code: 'EINVAL' }))
    expect(() => { ms.enableManualDirtyLogProtect(4 | 1); }).toThrow(expect.objectContaining({ code: 'EINVAL' }))
    expect(ms.manualDirtyLogProtect).toBe(0)
    ms.enableManualDirtyLogProtect(3)
    expect(ms.manualProtectAndInitSet).toBe(true)
  })

  it('a flags-only enable keeps an existing bitmap; move keeps it too', () => {
    const ms = new Memslots()
    logging(ms, 64)
    const s = ms.idToMemslot(0, 0)!
    ms.markPageDirty(s, 0x100)
    const m = ms.setUserMemoryRegion(region({ flags: KVM_MEM_LOG_DIRTY_PAGES, memorySize: 64 * 4096, guestPhysAddr: 0x800000 }))
    expect(m.kind).toBe('move')
    expect(m.new!.dirtyBitmap).toBe(s.dirtyBitmap)
  })
})
