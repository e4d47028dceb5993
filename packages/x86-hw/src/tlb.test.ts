import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import { laFromBigInt } from './bits.ts'
import { HwConfigError } from './errors.ts'
import { measureTlbLookupRate } from './tlb.bench-util.ts'
import {
  DEFAULT_TLB_CONFIG,
  TLBC_DROPPED,
  TLBC_EVICT,
  TLBC_FLUSH_ALL,
  TLBC_FLUSH_ASID,
  TLBC_FLUSH_ASID_NG,
  TLBC_FLUSH_PCID,
  TLBC_HIT_1G,
  TLBC_HIT_2M,
  TLBC_HIT_4K,
  TLBC_INSERT,
  TLBC_INVLPG,
  TLBC_INVPCID_ADDR,
  TLBC_INVVPID_ADDR,
  TLBC_MISS,
  TLBF_DIRTY,
  TLBF_GLOBAL,
  TLBF_HOSTW,
  TLBF_HOSTX,
  TLBF_PKEY_SHIFT,
  TLBF_RW,
  TLBF_US,
  TLBF_XD,
  TLB_COUNTER_NAMES,
  Tlb,
  makeTlbConfig,
} from './tlb.ts'
import { WALK_OK, WALK_PF, WalkResult } from './walk-result.ts'

const K4 = 4096
const M2 = 2 ** 21
const G1 = 2 ** 30

interface ResInit {
  pa: number
  gpa?: number
  level?: number
  rw?: number
  us?: number
  xd?: number
  dirty?: number
  global?: number
  pkey?: number
  hostW?: number
  hostX?: number
}

function res(r: ResInit): WalkResult {
  const w = new WalkResult()
  w.status = WALK_OK
  w.pa = r.pa
  w.gpa = r.gpa ?? r.pa
  w.level = r.level ?? 1
  w.rw = r.rw ?? 1
  w.us = r.us ?? 1
  w.xd = r.xd ?? 0
  w.dirty = r.dirty ?? 1
  w.global = r.global ?? 0
  w.pkey = r.pkey ?? 0
  w.hostW = r.hostW ?? 1
  w.hostX = r.hostX ?? 1
  return w
}

/** Insert a translation of `la` to `pa` (same offset) of the given level. */
function put(tlb: Tlb, asid: number, pcid: number, la: number, pageBase: number, level = 1, global = 0): number {
  const size = level === 1 ? K4 : level === 2 ? M2 : G1
  const off = la - Math.floor(la / size) * size
  return tlb.insert(asid, pcid, la, res({ pa: pageBase + off, level, global }))
}

function counters(tlb: Tlb): Record<string, number> {
  const out: Record<string, number> = {}
  TLB_COUNTER_NAMES.forEach((n, i) => {
    if (tlb.counters[i] !== 0) out[n] = tlb.counters[i]!
  })
  return out
}

describe('TlbConfig', () => {
  it('defaults to a Skylake-STLB-like geometry', () => {
    const tlb = new Tlb()
    expect(tlb.config).toEqual(DEFAULT_TLB_CONFIG)
    expect(tlb.capacity).toBe(128 * 12 + 32 * 4 + 4 * 4)
    expect([tlb.offset4k, tlb.offset2m, tlb.offset1g]).toEqual([0, 1536, 1664])
  })

  it('rejects bad geometry with a typed error saying what was expected', () => {
    expect(() => makeTlbConfig({ sets4k: 96 })).toThrow(HwConfigError)
    expect(() => makeTlbConfig({ sets4k: 96 })).toThrow(/sets4k must be a power of two/)
    expect(() => makeTlbConfig({ ways2m: 0 })).toThrow(/ways2m must be an integer from 1 to 64; got 0/)
    expect(() => makeTlbConfig({ sets1g: 0 })).toThrow(/sets1g/)
    expect(() => makeTlbConfig({ asids: 0 })).toThrow(/asids must be an integer from 1 to 256/)
    expect(() => new Tlb({ ways4k: 1.5 })).toThrow(HwConfigError)
    expect(makeTlbConfig({ sets4k: 1, ways4k: 3 }).ways4k).toBe(3)
  })
})

describe('Tlb insert/lookup', () => {
  it('caches a 4 KiB translation for exactly its page', () => {
    const tlb = new Tlb()
    const i = tlb.insert(0, 0, 0x12345678, res({ pa: 0xabcde678, gpa: 0x5000678, rw: 1, us: 1, dirty: 1 }))
    expect(i).toBeGreaterThanOrEqual(0)
    expect(i).toBeLessThan(tlb.offset2m)
    expect(tlb.lookup(0, 0, 0x12345000)).toBe(i)
    expect(tlb.lookup(0, 0, 0x12345fff)).toBe(i)
    expect(tlb.base[i]).toBe(0xabcde000)
    expect(tlb.gpaBase[i]).toBe(0x5000000)
    expect(tlb.pa(i, 0x12345abc)).toBe(0xabcdeabc)
    expect(tlb.gpa(i, 0x12345abc)).toBe(0x5000abc)
    expect(tlb.level[i]).toBe(1)
    expect(tlb.pageOffsetMask(i)).toBe(0xfff)
    expect(tlb.pageSize[i]).toBe(4096)
    expect(tlb.flags[i]).toBe(TLBF_RW | TLBF_US | TLBF_DIRTY | TLBF_HOSTW | TLBF_HOSTX)
    expect(tlb.lookup(0, 0, 0x12344fff)).toBe(-1)
    expect(tlb.lookup(0, 0, 0x12346000)).toBe(-1)
    expect(counters(tlb)).toEqual({ hit_4k: 2, miss: 2, insert: 1 })
  })

  it('caches 2 MiB and 1 GiB translations in their own arrays and counts hits per size', () => {
    const tlb = new Tlb()
    const i2 = put(tlb, 0, 0, 0x40200000 + 0x1234, 0x80000000, 2)
    const i1 = put(tlb, 0, 0, 0x8000000000 + 0x12345678, 0x40000000 * 5, 3)
    expect(i2).toBeGreaterThanOrEqual(tlb.offset2m)
    expect(i2).toBeLessThan(tlb.offset1g)
    expect(i1).toBeGreaterThanOrEqual(tlb.offset1g)
    expect(tlb.lookup(0, 0, 0x40200000)).toBe(i2)
    expect(tlb.lookup(0, 0, 0x403fffff)).toBe(i2)
    expect(tlb.pa(i2, 0x403ffff0)).toBe(0x801ffff0)
    expect(tlb.pageOffsetMask(i2)).toBe(0x1fffff)
    expect([tlb.level[i2], tlb.pageSize[i2], tlb.pageSize[i1]]).toEqual([2, 2 ** 21, 2 ** 30])
    expect(tlb.lookup(0, 0, 0x40400000)).toBe(-1)
    expect(tlb.lookup(0, 0, 0x8000000000)).toBe(i1)
    expect(tlb.lookup(0, 0, 0x803fffffff)).toBe(i1)
    expect(tlb.pa(i1, 0x803fffffff)).toBe(0x40000000 * 6 - 1)
    expect(tlb.level[i1]).toBe(3)
    expect(tlb.lookup(0, 0, 0x8040000000)).toBe(-1)
    expect([tlb.counters[TLBC_HIT_4K], tlb.counters[TLBC_HIT_2M], tlb.counters[TLBC_HIT_1G], tlb.counters[TLBC_MISS]]).toEqual([0, 2, 2, 2])
  })

  it('handles negative (kernel) linear addresses of every size', () => {
    const tlb = new Tlb()
    const direct = laFromBigInt(0xffff888000001234n)
    const text = laFromBigInt(0xffffffff81000000n)
    const vmemmap = laFromBigInt(0xffffea0000000000n)
    expect(direct).toBeLessThan(0)
    const a = put(tlb, 0, 0, direct, 0x1000, 1, 1)
    const b = put(tlb, 0, 0, text, 0x1000000, 2, 1)
    const c = put(tlb, 0, 0, vmemmap + 0x3ffffff8, 0x40000000, 3, 1)
    expect(tlb.lookup(0, 0, laFromBigInt(0xffff888000001ff8n))).toBe(a)
    expect(tlb.pa(a, laFromBigInt(0xffff888000001ff8n))).toBe(0x1ff8)
    expect(tlb.lookup(0, 0, laFromBigInt(0xffff888000002000n))).toBe(-1)
    expect(tlb.lookup(0, 0, laFromBigInt(0xffff888000000fffn))).toBe(-1)
    // The same low 48 bits in the user half are a different page.
    expect(tlb.lookup(0, 0, 0x888000001234)).toBe(-1)
    expect(tlb.lookup(0, 0, laFromBigInt(0xffffffff811fffffn))).toBe(b)
    expect(tlb.pa(b, laFromBigInt(0xffffffff811fffffn))).toBe(0x11fffff)
    expect(tlb.lookup(0, 0, laFromBigInt(0xffffffff81200000n))).toBe(-1)
    expect(tlb.lookup(0, 0, vmemmap)).toBe(c)
    expect(tlb.pa(c, vmemmap + 0x123)).toBe(0x40000123)
    // The top page of the address space: la = -4096.
    const top = put(tlb, 0, 0, -1, 0x7000, 1)
    expect(tlb.lookup(0, 0, -4096)).toBe(top)
    expect(tlb.pa(top, -1)).toBe(0x7fff)
    expect(tlb.pa(top, -4096)).toBe(0x7000)
  })

  it('packs every right, D, G, nested W/X and the protection key into the flags word', () => {
    const tlb = new Tlb()
    const i = tlb.insert(0, 0, 0x1000, res({ pa: 0x2000, rw: 1, us: 0, xd: 1, dirty: 0, global: 1, hostW: 0, hostX: 1, pkey: 0xa }))
    expect(tlb.flags[i]).toBe(TLBF_RW | TLBF_XD | TLBF_GLOBAL | TLBF_HOSTX | (0xa << TLBF_PKEY_SHIFT))
    const j = tlb.insert(0, 0, 0x3000, res({ pa: 0x4000, rw: 0, us: 1, xd: 0, dirty: 1, global: 0, hostW: 1, hostX: 0, pkey: 15 }))
    expect(tlb.flags[j]).toBe(TLBF_US | TLBF_DIRTY | TLBF_HOSTW | (15 << TLBF_PKEY_SHIFT))
  })

  it('refreshes the matching entry in place (a clean entry re-inserted dirty after the D re-walk)', () => {
    const tlb = new Tlb()
    const i = tlb.insert(0, 3, 0x5000, res({ pa: 0x9000, dirty: 0 }))
    expect(tlb.flags[tlb.lookup(0, 3, 0x5000)]! & TLBF_DIRTY).toBe(0)
    const j = tlb.insert(0, 3, 0x5000, res({ pa: 0x9000, dirty: 1 }))
    expect(j).toBe(i)
    expect(tlb.flags[tlb.lookup(0, 3, 0x5000)]! & TLBF_DIRTY).toBe(TLBF_DIRTY)
    expect(tlb.liveEntries()).toBe(1)
  })

  it('keeps a global and a non-global entry for the same page apart', () => {
    const tlb = new Tlb()
    const g = put(tlb, 0, 5, 0x6000, 0x1000, 1, 1)
    const n = put(tlb, 0, 7, 0x6000, 0x2000, 1, 0)
    expect(n).not.toBe(g)
    expect(tlb.lookup(0, 0, 0x6000)).toBe(g)
    expect(tlb.lookup(0, 5, 0x6000)).toBe(g)
    // Both may be used for PCID 7 (SDM 4.10.2.3); the lower way wins deterministically.
    expect(tlb.lookup(0, 7, 0x6000)).toBe(Math.min(g, n))
    // A global re-inserted from another PCID refreshes the same entry.
    expect(put(tlb, 0, 9, 0x6000, 0x3000, 1, 1)).toBe(g)
    expect(tlb.base[tlb.lookup(0, 0, 0x6000)]).toBe(0x3000)
    tlb.flushPcid(0, 7)
    expect(tlb.lookup(0, 7, 0x6000)).toBe(g)
  })

  it('caches a combined mapping at the smaller of the guest and nested page sizes', () => {
    const tlb = new Tlb()
    // Guest 2 MiB page at la 0x40000000 → gpa 0x200000; host 4 KiB page gpa 0x203000 → hpa 0x77000.
    const i = tlb.insert(0, 0, 0x40003abc, res({ pa: 0x77abc, gpa: 0x203abc, level: 2 }), 1)
    expect(tlb.level[i]).toBe(1)
    expect(tlb.base[i]).toBe(0x77000)
    expect(tlb.gpaBase[i]).toBe(0x203000)
    expect(tlb.lookup(0, 0, 0x40004000)).toBe(-1)
    // Paging off (level 0) is cached as 4 KiB.
    const k = tlb.insert(0, 0, 0x9123, res({ pa: 0x9123, level: 0 }))
    expect(tlb.level[k]).toBe(1)
  })

  it('refuses to cache a faulting walk (DEBUG)', () => {
    const tlb = new Tlb()
    const r = res({ pa: 0x1000 })
    r.status = WALK_PF
    expect(() => tlb.insert(0, 0, 0x1000, r)).toThrow(/only successful walks may be cached/)
    expect(() => tlb.insert(8, 0, 0x1000, res({ pa: 0 }))).toThrow(/asid must be an integer from 0 to 7/)
    expect(() => tlb.insert(0, 4096, 0x1000, res({ pa: 0 }))).toThrow(/pcid/)
    expect(() => {
      tlb.flushPcid(0, 4096)
    }).toThrow(/Tlb.flushPcid: pcid must be an integer from 0 to 4095/)
    expect(() => {
      tlb.flushAsid(-1)
    }).toThrow(/Tlb.flushAsid: asid/)
    expect(tlb.liveEntries()).toBe(0)
  })
})

describe('Tlb tags', () => {
  it('isolates asids and PCIDs', () => {
    const tlb = new Tlb()
    const i = put(tlb, 0, 1, 0x7000, 0x1000)
    expect(tlb.lookup(0, 1, 0x7000)).toBe(i)
    expect(tlb.lookup(0, 2, 0x7000)).toBe(-1)
    expect(tlb.lookup(0, 0, 0x7000)).toBe(-1)
    expect(tlb.lookup(1, 1, 0x7000)).toBe(-1)
    const j = put(tlb, 1, 1, 0x7000, 0x2000)
    const k = put(tlb, 0, 2, 0x7000, 0x3000)
    expect(new Set([i, j, k]).size).toBe(3)
    expect(tlb.base[tlb.lookup(1, 1, 0x7000)]).toBe(0x2000)
    expect(tlb.base[tlb.lookup(0, 2, 0x7000)]).toBe(0x3000)
    expect(tlb.base[tlb.lookup(0, 1, 0x7000)]).toBe(0x1000)
  })

  it('makes global entries visible from every PCID of the same asid only', () => {
    const tlb = new Tlb()
    const g = put(tlb, 2, 17, 0x8000, 0x1000, 1, 1)
    for (const pcid of [0, 1, 17, 4095]) expect(tlb.lookup(2, pcid, 0x8abc)).toBe(g)
    expect(tlb.lookup(1, 17, 0x8000)).toBe(-1)
    expect(tlb.lookup(3, 0, 0x8000)).toBe(-1)
  })
})

describe('Tlb invalidation (x86-hw.md §6.2)', () => {
  const LA = 0x40212345
  /** 4K at LA in pcid 1; 2M covering LA in pcid 1; global 1G covering LA from pcid 2; 4K at LA in pcid 2; another page in pcid 1; asid 1 copy. */
  function setup(): { tlb: Tlb; e4k: number; e2m: number; g1g: number; p2: number; other: number; a1: number } {
    const tlb = new Tlb()
    const e4k = put(tlb, 0, 1, LA, 0x100000)
    const e2m = put(tlb, 0, 1, LA, 0x200000, 2)
    const g1g = put(tlb, 0, 2, LA, 0x40000000, 3, 1)
    const p2 = put(tlb, 0, 2, LA, 0x300000)
    const other = put(tlb, 0, 1, LA + K4, 0x400000)
    const a1 = put(tlb, 1, 1, LA, 0x500000, 1, 1)
    return { tlb, e4k, e2m, g1g, p2, other, a1 }
  }

  it('INVLPG removes every size for the page in the PCID and global entries of any PCID', () => {
    const { tlb, p2, other, a1 } = setup()
    expect(tlb.liveEntries()).toBe(6)
    tlb.invlpg(0, 1, LA + 0x10)
    expect(tlb.liveEntries()).toBe(3)
    expect(tlb.counters[TLBC_DROPPED]).toBe(3)
    expect(tlb.counters[TLBC_INVLPG]).toBe(1)
    expect(tlb.lookup(0, 1, LA)).toBe(-1) // 4K, 2M and the global 1G are gone
    expect(tlb.lookup(0, 1, LA + M2)).toBe(-1) // the 1G global no longer covers anything
    expect(tlb.lookup(0, 2, LA)).toBe(p2) // non-global of another PCID stays
    expect(tlb.lookup(0, 1, LA + K4)).toBe(other) // another page stays
    expect(tlb.lookup(1, 1, LA)).toBe(a1) // another asid stays
  })

  it('INVPCID individual-address keeps global entries', () => {
    const { tlb, g1g, p2, other } = setup()
    tlb.invpcidAddress(0, 1, LA)
    expect(tlb.counters[TLBC_INVPCID_ADDR]).toBe(1)
    expect(tlb.counters[TLBC_DROPPED]).toBe(2)
    expect(tlb.lookup(0, 1, LA)).toBe(g1g) // 4K and 2M gone; the global 1G now translates
    expect(tlb.lookup(0, 2, LA)).toBe(p2)
    expect(tlb.lookup(0, 1, LA + K4)).toBe(other)
    // A global entry inserted from this PCID also survives.
    const g = put(tlb, 0, 1, 0x9000, 0x9000, 1, 1)
    tlb.invpcidAddress(0, 1, 0x9000)
    expect(tlb.lookup(0, 1, 0x9000)).toBe(g)
  })

  it('INVVPID/INVLPGA individual-address removes the page in every PCID, globals included', () => {
    const { tlb, other, a1 } = setup()
    tlb.invvpidAddress(0, LA)
    expect(tlb.counters[TLBC_INVVPID_ADDR]).toBe(1)
    expect(tlb.liveEntries()).toBe(2)
    expect(tlb.lookup(0, 1, LA)).toBe(-1)
    expect(tlb.lookup(0, 2, LA)).toBe(-1)
    expect(tlb.lookup(0, 1, LA + K4)).toBe(other)
    expect(tlb.lookup(1, 1, LA)).toBe(a1)
  })

  it('flushPcid removes all non-global entries of that PCID, keeping globals and other PCIDs', () => {
    const { tlb, g1g, p2, a1 } = setup()
    tlb.flushPcid(0, 1)
    expect(tlb.counters[TLBC_FLUSH_PCID]).toBe(1)
    expect(tlb.liveEntries()).toBe(3)
    expect(tlb.lookup(0, 1, LA)).toBe(g1g)
    expect(tlb.lookup(0, 1, LA + K4)).toBe(g1g)
    expect(tlb.lookup(0, 2, LA)).toBe(p2)
    expect(tlb.lookup(1, 1, LA)).toBe(a1)
    // Entries inserted after the flush are live; a later flush of another PCID leaves them.
    const n = put(tlb, 0, 1, LA, 0x600000)
    tlb.flushPcid(0, 3)
    expect(tlb.lookup(0, 1, LA)).toBe(n)
    tlb.flushPcid(0, 1)
    expect(tlb.lookup(0, 1, LA)).toBe(g1g)
  })

  it('flushAsidNonGlobal removes non-global entries of every PCID of the asid', () => {
    const { tlb, g1g, a1 } = setup()
    tlb.flushAsidNonGlobal(0)
    expect(tlb.counters[TLBC_FLUSH_ASID_NG]).toBe(1)
    expect(tlb.liveEntries()).toBe(2)
    expect(tlb.lookup(0, 1, LA)).toBe(g1g)
    expect(tlb.lookup(0, 2, LA)).toBe(g1g)
    expect(tlb.lookup(1, 1, LA)).toBe(a1)
  })

  it('flushAsid removes everything of the asid including globals, and nothing else', () => {
    const { tlb, a1 } = setup()
    tlb.flushAsid(0)
    expect(tlb.counters[TLBC_FLUSH_ASID]).toBe(1)
    expect(tlb.liveEntries()).toBe(1)
    expect(tlb.lookup(0, 1, LA)).toBe(-1)
    expect(tlb.lookup(0, 2, LA)).toBe(-1)
    expect(tlb.lookup(0, 7, LA)).toBe(-1)
    expect(tlb.lookup(1, 1, LA)).toBe(a1)
    const g = put(tlb, 0, 5, LA, 0x700000, 1, 1)
    expect(tlb.lookup(0, 1, LA)).toBe(g)
  })

  it('flushAll removes everything; later inserts are live', () => {
    const { tlb } = setup()
    tlb.flushAll()
    expect(tlb.counters[TLBC_FLUSH_ALL]).toBe(1)
    expect(tlb.liveEntries()).toBe(0)
    expect(tlb.lookup(1, 1, LA)).toBe(-1)
    const i = put(tlb, 1, 1, LA, 0x800000)
    expect(tlb.lookup(1, 1, LA)).toBe(i)
  })

  it('compact keeps exactly the live entries', () => {
    const { tlb, g1g, p2, a1 } = setup()
    tlb.flushPcid(0, 1)
    tlb.compact()
    expect(tlb.liveEntries()).toBe(3)
    expect(tlb.lookup(0, 1, LA)).toBe(g1g)
    expect(tlb.lookup(0, 2, LA)).toBe(p2)
    expect(tlb.lookup(1, 1, LA)).toBe(a1)
    tlb.flushAsidNonGlobal(0)
    expect(tlb.lookup(0, 2, LA)).toBe(g1g)
  })

  it('invalidateEntry drops one entry', () => {
    const { tlb, e4k, e2m } = setup()
    tlb.invalidateEntry(e4k)
    expect(tlb.lookup(0, 1, LA)).toBe(e2m)
    expect(tlb.counters[TLBC_DROPPED]).toBe(1)
  })
})

describe('Tlb replacement', () => {
  it('fills free ways first, then evicts round-robin per set, deterministically', () => {
    const tlb = new Tlb({ sets4k: 2, ways4k: 2 })
    // Pages 0, 2, 4, ... all map to set 0 (entries 0 and 1).
    expect(put(tlb, 0, 0, 0 * K4, 0x10000)).toBe(0)
    expect(put(tlb, 0, 0, 2 * K4, 0x20000)).toBe(1)
    expect(put(tlb, 0, 0, 1 * K4, 0x30000)).toBe(2) // set 1
    expect(tlb.counters[TLBC_EVICT]).toBe(0)
    expect(put(tlb, 0, 0, 4 * K4, 0x40000)).toBe(0) // evicts page 0
    expect(tlb.lookup(0, 0, 0)).toBe(-1)
    expect(put(tlb, 0, 0, 6 * K4, 0x60000)).toBe(1) // evicts page 2
    expect(put(tlb, 0, 0, 8 * K4, 0x80000)).toBe(0) // evicts page 4
    expect(tlb.counters[TLBC_EVICT]).toBe(3)
    expect(tlb.lookup(0, 0, 6 * K4)).toBe(1)
    expect(tlb.lookup(0, 0, 8 * K4)).toBe(0)
    expect(tlb.lookup(0, 0, 1 * K4)).toBe(2)
    // Flushed ways are free: no eviction, lowest way first.
    tlb.flushPcid(0, 0)
    expect(put(tlb, 0, 0, 10 * K4, 0xa0000)).toBe(0)
    expect(put(tlb, 0, 0, 12 * K4, 0xc0000)).toBe(1)
    expect(tlb.counters[TLBC_EVICT]).toBe(3)
    // Round-robin pointer continues where it was (way 1).
    expect(put(tlb, 0, 0, 14 * K4, 0xe0000)).toBe(1)
    expect(tlb.counters[TLBC_EVICT]).toBe(4)
    expect(tlb.counters[TLBC_INSERT]).toBe(9)
  })

  it('indexes negative page numbers by their low bits', () => {
    const tlb = new Tlb({ sets4k: 4, ways4k: 1 })
    // vpn(-4096) = -1 → set 3; vpn(-8192) = -2 → set 2.
    expect(put(tlb, 0, 0, -4096, 0x1000)).toBe(3)
    expect(put(tlb, 0, 0, -8192, 0x2000)).toBe(2)
    expect(put(tlb, 0, 0, 3 * K4, 0x3000)).toBe(3)
    expect(tlb.lookup(0, 0, -4096)).toBe(-1)
    expect(tlb.lookup(0, 0, -8192)).toBe(2)
  })
})

// ---------------------------------------------------------------- model-based property

interface ModelEntry {
  asid: number
  pcid: number
  level: number
  vpn: number
  global: boolean
  base: number
  gpaBase: number
  flags: number
}

const SIZE = [0, K4, M2, G1]

function covers(m: ModelEntry, la: number): boolean {
  return m.vpn === Math.floor(la / SIZE[m.level]!)
}

type Op =
  | { t: 'insert'; asid: number; pcid: number; la: number; level: number; global: boolean; frame: number; bits: number }
  | { t: 'lookup'; asid: number; pcid: number; la: number }
  | { t: 'invlpg' | 'invpcidAddress'; asid: number; pcid: number; la: number }
  | { t: 'invvpidAddress'; asid: number; la: number }
  | { t: 'flushPcid'; asid: number; pcid: number }
  | { t: 'flushAsidNonGlobal' | 'flushAsid'; asid: number }
  | { t: 'flushAll' | 'compact' }

// Addresses in a few 1 GiB regions (both halves), a few 2 MiB regions in each, a few 4 KiB pages in each.
const laArb = fc
  .tuple(fc.integer({ min: -3, max: 2 }), fc.integer({ min: 0, max: 2 }), fc.integer({ min: 0, max: 3 }), fc.integer({ min: 0, max: 4095 }))
  .map(([g, m, p, off]) => g * G1 + m * M2 + p * K4 + off)
const asidArb = fc.integer({ min: 0, max: 1 })
const pcidArb = fc.constantFrom(0, 1, 4095)

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ t: fc.constant('insert' as const), asid: asidArb, pcid: pcidArb, la: laArb, level: fc.integer({ min: 1, max: 3 }), global: fc.boolean(), frame: fc.integer({ min: 0, max: 7 }), bits: fc.integer({ min: 0, max: 0x7f }) }) },
  { weight: 6, arbitrary: fc.record({ t: fc.constant('lookup' as const), asid: asidArb, pcid: pcidArb, la: laArb }) },
  { weight: 2, arbitrary: fc.record({ t: fc.constantFrom('invlpg' as const, 'invpcidAddress' as const), asid: asidArb, pcid: pcidArb, la: laArb }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('invvpidAddress' as const), asid: asidArb, la: laArb }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('flushPcid' as const), asid: asidArb, pcid: pcidArb }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constantFrom('flushAsidNonGlobal' as const, 'flushAsid' as const), asid: asidArb }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constantFrom('flushAll' as const, 'compact' as const) }) },
)

/**
 * Run ops on a TLB and on a model of "what may be cached": every TLB hit must be allowed by the
 * model (never more permissive, never surviving a covering invalidation); while nothing has been
 * evicted, every translation the model holds must also hit.
 */
function runModel(config: ConstructorParameters<typeof Tlb>[0], ops: Op[]): void {
  const tlb = new Tlb(config)
  let model: ModelEntry[] = []
  const check = (asid: number, pcid: number, la: number, i: number): void => {
    if (i < 0) {
      // Until something is evicted the TLB holds everything the model allows: a miss must be exact.
      if (tlb.counters[TLBC_EVICT] === 0 && model.some((m) => m.asid === asid && (m.pcid === pcid || m.global) && covers(m, la))) {
        throw new Error(`TLB missed asid ${String(asid)} pcid ${String(pcid)} la 0x${la.toString(16)} although nothing evicted or invalidated it`)
      }
      return
    }
    const level = tlb.level[i]
    const ok = model.some(
      (m) =>
        m.asid === asid &&
        (m.pcid === pcid || m.global) &&
        m.level === level &&
        covers(m, la) &&
        m.base === tlb.base[i] &&
        m.gpaBase === tlb.gpaBase[i] &&
        m.flags === tlb.flags[i],
    )
    if (!ok) throw new Error(`TLB hit ${String(i)} for asid ${String(asid)} pcid ${String(pcid)} la 0x${la.toString(16)} is not allowed by the model`)
  }
  for (const op of ops) {
    switch (op.t) {
      case 'insert': {
        const size = SIZE[op.level]!
        const vpn = Math.floor(op.la / size)
        const off = op.la - vpn * size
        const base = (op.frame + 1) * G1
        const b = op.bits
        const r = res({ pa: base + off, gpa: base + 2 ** 40 + off, level: op.level, global: op.global ? 1 : 0, rw: b & 1, us: (b >> 1) & 1, xd: (b >> 2) & 1, dirty: (b >> 3) & 1, hostW: (b >> 4) & 1, hostX: (b >> 5) & 1, pkey: b & 0xf })
        tlb.insert(op.asid, op.pcid, op.la, r)
        // Bits of `b` → flags: rw, us, xd, dirty at 0..3; global at 4; hostW at 5; hostX at 6; pkey at 8.
        const flags =
          (b & 0xf) | (op.global ? TLBF_GLOBAL : 0) | (((b >> 4) & 1) << 5) | (((b >> 5) & 1) << 6) | ((b & 0xf) << TLBF_PKEY_SHIFT)
        model.push({ asid: op.asid, pcid: op.pcid, level: op.level, vpn, global: op.global, base, gpaBase: base + 2 ** 40, flags })
        // Just inserted: it must hit (possibly another allowed entry of a smaller size).
        const i = tlb.lookup(op.asid, op.pcid, op.la)
        if (i < 0) throw new Error('a translation just inserted must hit')
        check(op.asid, op.pcid, op.la, i)
        break
      }
      case 'lookup':
        check(op.asid, op.pcid, op.la, tlb.lookup(op.asid, op.pcid, op.la))
        break
      case 'invlpg':
        tlb.invlpg(op.asid, op.pcid, op.la)
        model = model.filter((m) => !(m.asid === op.asid && covers(m, op.la) && (m.pcid === op.pcid || m.global)))
        break
      case 'invpcidAddress':
        tlb.invpcidAddress(op.asid, op.pcid, op.la)
        model = model.filter((m) => !(m.asid === op.asid && covers(m, op.la) && m.pcid === op.pcid && !m.global))
        break
      case 'invvpidAddress':
        tlb.invvpidAddress(op.asid, op.la)
        model = model.filter((m) => !(m.asid === op.asid && covers(m, op.la)))
        break
      case 'flushPcid':
        tlb.flushPcid(op.asid, op.pcid)
        model = model.filter((m) => !(m.asid === op.asid && m.pcid === op.pcid && !m.global))
        break
      case 'flushAsidNonGlobal':
        tlb.flushAsidNonGlobal(op.asid)
        model = model.filter((m) => !(m.asid === op.asid && !m.global))
        break
      case 'flushAsid':
        tlb.flushAsid(op.asid)
        model = model.filter((m) => m.asid !== op.asid)
        break
      case 'flushAll':
        tlb.flushAll()
        model = []
        break
      case 'compact':
        tlb.compact()
        break
    }
    // After every op: probe a fixed grid of addresses in every context.
    if (op.t !== 'lookup' && op.t !== 'insert') {
      for (const asid of [0, 1]) for (const pcid of [0, 1, 4095]) for (const la of PROBES) check(asid, pcid, la, tlb.lookup(asid, pcid, la))
    }
  }
  if (tlb.liveEntries() > tlb.capacity) throw new Error('more live entries than capacity')
}

const PROBES: number[] = []
for (let g = -3; g <= 2; g++) for (let m = 0; m <= 2; m++) for (let p = 0; p <= 3; p++) PROBES.push(g * G1 + m * M2 + p * K4 + 8)

describe('Tlb against a model of what may be cached', () => {
  it('never returns a translation the model does not allow (tiny TLB: heavy eviction)', () => {
    fc.assert(
      fc.property(fc.array(opArb, { minLength: 1, maxLength: 80 }), (ops) => {
        runModel({ sets4k: 2, ways4k: 2, sets2m: 2, ways2m: 1, sets1g: 1, ways1g: 2, asids: 2 }, ops)
      }),
      { numRuns: 300, seed: 0x7b1 },
    )
  })

  it('never returns a translation the model does not allow (default geometry)', () => {
    fc.assert(
      fc.property(fc.array(opArb, { minLength: 1, maxLength: 120 }), (ops) => {
        runModel({}, ops)
      }),
      { numRuns: 200, seed: 0x7b2 },
    )
  })
})

describe('Tlb lookup speed (reported, not asserted)', () => {
  it('measures lookup hits over 4096 addresses', () => {
    const r4k = measureTlbLookupRate({ pages: 1024, level: 1 })
    const r2m = measureTlbLookupRate({ pages: 64, level: 2, rounds: 1000 })
    expect(r4k.hits).toBe(r4k.lookups)
    expect(r2m.hits).toBe(r2m.lookups)
    console.log(
      `Tlb.lookup: 4K hits ${(r4k.opsPerSec / 1e6).toFixed(1)} M/s (1024 pages, 128x12); ` +
        `2M hits (after a 4K miss) ${(r2m.opsPerSec / 1e6).toFixed(1)} M/s`,
    )
  })
})
