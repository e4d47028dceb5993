import { describe, expect, it } from 'vitest'
import { ACC_READ, ACC_WRITE, HI_XD, PTE_A, PTE_P, PTE_RW, PTE_US, laFromBigInt } from './bits.ts'
import { CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CpuState, EFER_LMA, EFER_LME, EFER_NXE, PagingContext, makeFeatures, type CpuFeatures } from './cpu-state.ts'
import { HwConfigError } from './errors.ts'
import { PageTableBuilder } from './page-table-builder.ts'
import { FrameAllocator, PhysMem } from './phys-mem.ts'
import {
  DEFAULT_PSC_CONFIG,
  PSCC_EVICT,
  PSCC_FILL,
  PSCC_HIT_PDE,
  PSCC_HIT_PDPTE,
  PSCC_HIT_PML4E,
  PSCC_HIT_PML5E,
  PSCC_INVALIDATE,
  PSCC_MISS,
  PSC_COUNTER_NAMES,
  PagingStructureCache,
  makePscConfig,
} from './psc.ts'
import { walk } from './walk.ts'
import { WALK_OK, WALK_PF, WalkResult } from './walk-result.ts'

const M2 = 2 ** 21
const G1 = 2 ** 30
const LEAF = PTE_P | PTE_RW | PTE_US

function machine(levels: 4 | 5 = 4, features: Partial<CpuFeatures> = {}) {
  const mem = new PhysMem({ sizeBytes: 64 * 2 ** 20 })
  const b = new PageTableBuilder(new FrameAllocator(mem), { levels })
  const state = new CpuState()
  state.cr0 = CR0_PE | CR0_PG | CR0_WP
  state.cr4 = CR4_PAE | (levels === 5 ? CR4_LA57 : 0)
  state.efer = EFER_LME | EFER_LMA | EFER_NXE
  state.cr3 = b.root
  const ctx = new PagingContext(makeFeatures(features))
  ctx.update(state)
  const res = new WalkResult()
  /** Full walk from CR3. */
  const walkFull = (la: number, kind: 0 | 1 | 2 = ACC_READ) => walk(mem, ctx, state, la, kind, false, null, res)
  /** Walk from the PSC's last lookup result. */
  const walkFrom = (psc: PagingStructureCache, la: number, kind: 0 | 1 | 2 = ACC_READ) =>
    walk(mem, ctx, state, la, kind, false, null, res, psc.startLevel, psc.startTable, psc.startRw, psc.startUs, psc.startXd)
  return { mem, b, state, ctx, res, walkFull, walkFrom }
}

/** Physical address of the table that holds `la`'s entry at `level`. */
function tableOf(b: PageTableBuilder, la: number, level: number): number {
  return b.entryAddress(la, level) - PageTableBuilder.index(la, level) * 8
}

function counts(psc: PagingStructureCache): Record<string, number> {
  const out: Record<string, number> = {}
  PSC_COUNTER_NAMES.forEach((n, i) => {
    if (psc.counters[i] !== 0) out[n] = psc.counters[i]!
  })
  return out
}

describe('PscConfig', () => {
  it('validates geometry with a typed error', () => {
    expect(makePscConfig()).toEqual(DEFAULT_PSC_CONFIG)
    expect(new PagingStructureCache().capacity).toBe(32 + 4 + 2 + 2)
    expect(() => makePscConfig({ setsPde: 3 })).toThrow(HwConfigError)
    expect(() => makePscConfig({ setsPde: 3 })).toThrow(/setsPde must be a power of two/)
    expect(() => makePscConfig({ waysPml4e: 0 })).toThrow(/waysPml4e must be an integer from 1 to 64; got 0/)
  })
})

describe('PagingStructureCache fill and lookup (4-level)', () => {
  const LA = 0x7f1234567000

  it('fills PML4E/PDPTE/PDE entries from a walk; a PDE-cache hit leaves one reference', () => {
    const m = machine()
    m.b.map({ va: LA, pa: 0x123000, leafLo: LEAF })
    m.b.map({ va: LA + 0x5000, pa: 0x456000, leafLo: LEAF })
    const psc = new PagingStructureCache()
    expect(psc.lookup(0, 0, LA)).toBe(false)
    expect([psc.startLevel, psc.startTable, psc.startRw, psc.startUs, psc.startXd]).toEqual([0, 0, 1, 1, 0])
    expect(m.walkFull(LA + 0x123)).toBe(WALK_OK)
    expect(m.res.memRefs).toBe(4)
    expect(m.res.pa).toBe(0x123123)
    expect(psc.fill(0, 0, LA + 0x123, m.res, m.ctx)).toBe(3)
    expect(psc.liveEntries()).toBe(3)

    // Any address of the same 2 MiB region: PDE-cache hit, walk starts at the page table.
    expect(psc.lookup(0, 0, LA + 0x5008)).toBe(true)
    expect(psc.startLevel).toBe(1)
    expect(psc.startTable).toBe(tableOf(m.b, LA, 1))
    expect([psc.startRw, psc.startUs, psc.startXd]).toEqual([1, 1, 0])
    expect(m.walkFrom(psc, LA + 0x5008)).toBe(WALK_OK)
    expect(m.res.memRefs).toBe(1)
    expect(m.res.pa).toBe(0x456008)
    // Same translation as a full walk, with fewer references.
    const viaPsc = [m.res.pa, m.res.level, m.res.rw, m.res.us, m.res.xd]
    expect(m.walkFull(LA + 0x5008)).toBe(WALK_OK)
    expect(m.res.memRefs).toBe(4)
    expect([m.res.pa, m.res.level, m.res.rw, m.res.us, m.res.xd]).toEqual(viaPsc)
    expect(counts(psc)).toEqual({ hit_pde: 1, miss: 1, fill: 3 })
  })

  it('uses the longest match: PDPTE hit for another 2 MiB region, PML4E hit for another 1 GiB', () => {
    const m = machine()
    m.b.map({ va: LA, pa: 0x123000, leafLo: LEAF })
    m.b.map({ va: LA + M2, pa: 0x200000, leafLo: LEAF })
    m.b.map({ va: LA + 3 * G1, pa: 0x300000, leafLo: LEAF })
    const psc = new PagingStructureCache()
    m.walkFull(LA)
    psc.fill(0, 0, LA, m.res, m.ctx)

    expect(psc.lookup(0, 0, LA + M2)).toBe(true)
    expect(psc.startLevel).toBe(2)
    expect(psc.startTable).toBe(tableOf(m.b, LA, 2))
    expect(m.walkFrom(psc, LA + M2)).toBe(WALK_OK)
    expect([m.res.memRefs, m.res.pa]).toEqual([2, 0x200000])
    // Fill after a walk that began at the PDPTE-cache hit creates only the PDE entry.
    expect(psc.fill(0, 0, LA + M2, m.res, m.ctx)).toBe(1)
    expect(psc.lookup(0, 0, LA + M2 + 0x10)).toBe(true)
    expect(psc.startLevel).toBe(1)

    expect(psc.lookup(0, 0, LA + 3 * G1)).toBe(true)
    expect(psc.startLevel).toBe(3)
    expect(psc.startTable).toBe(tableOf(m.b, LA, 3))
    expect(m.walkFrom(psc, LA + 3 * G1)).toBe(WALK_OK)
    expect([m.res.memRefs, m.res.pa]).toEqual([3, 0x300000])
    expect(psc.fill(0, 0, LA + 3 * G1, m.res, m.ctx)).toBe(2)

    // Another 512 GiB region: miss.
    expect(psc.lookup(0, 0, 0x1000)).toBe(false)
    expect(psc.startLevel).toBe(0)
    expect([psc.counters[PSCC_HIT_PDE], psc.counters[PSCC_HIT_PDPTE], psc.counters[PSCC_HIT_PML4E], psc.counters[PSCC_MISS]]).toEqual([1, 1, 1, 1])
    expect(psc.counters[PSCC_FILL]).toBe(6)
  })

  it('accumulates rights top-down (R/W and U/S ANDed, XD ORed) and the walk from the hit agrees', () => {
    const m = machine()
    const la = laFromBigInt(0xffff888000042000n)
    // Fresh PML4 slot: all tables created read-only, supervisor, XD.
    m.b.map({ va: la, pa: 0x42000, leafLo: LEAF, tableLo: PTE_P, tableHi: HI_XD })
    const psc = new PagingStructureCache()
    expect(m.walkFull(la)).toBe(WALK_OK)
    const full = [m.res.pa, m.res.rw, m.res.us, m.res.xd]
    expect(full).toEqual([0x42000, 0, 0, 1])
    expect(psc.fill(0, 0, la, m.res, m.ctx)).toBe(3)
    expect(psc.lookup(0, 0, la + 0xff8)).toBe(true)
    expect([psc.startLevel, psc.startRw, psc.startUs, psc.startXd]).toEqual([1, 0, 0, 1])
    expect(m.walkFrom(psc, la)).toBe(WALK_OK)
    expect([m.res.pa, m.res.rw, m.res.us, m.res.xd]).toEqual(full)
    expect(m.res.memRefs).toBe(1)
    // The cached rights still decide: a supervisor write with WP=1 faults from the PSC start too.
    expect(m.walkFrom(psc, la, ACC_WRITE)).toBe(WALK_PF)
  })

  it('caches only the non-leaf levels above 2 MiB and 1 GiB leaves', () => {
    const m = machine()
    m.b.map({ va: 0x40000000, pa: 0x200000, level: 2, leafLo: LEAF })
    m.b.map({ va: 0x8000000000, pa: 0x40000000, level: 3, leafLo: LEAF })
    const psc = new PagingStructureCache()
    expect(m.walkFull(0x40012345)).toBe(WALK_OK)
    expect(m.res.level).toBe(2)
    expect(psc.fill(0, 0, 0x40012345, m.res, m.ctx)).toBe(2)
    expect(psc.lookup(0, 0, 0x401fffff)).toBe(true)
    expect(psc.startLevel).toBe(2)
    expect(m.walkFrom(psc, 0x401fffff)).toBe(WALK_OK)
    expect([m.res.memRefs, m.res.level, m.res.pa]).toEqual([1, 2, 0x3fffff])

    expect(m.walkFull(0x8000000000 + 0x123)).toBe(WALK_OK)
    expect(psc.fill(0, 0, 0x8000000123, m.res, m.ctx)).toBe(1)
    expect(psc.lookup(0, 0, 0x803fffffff)).toBe(true)
    expect(psc.startLevel).toBe(3)
    expect(m.walkFrom(psc, 0x803fffffff)).toBe(WALK_OK)
    expect([m.res.memRefs, m.res.level, m.res.pa]).toEqual([1, 3, 0x7fffffff])
  })

  it('fills after a KVM-style walk that sets non-leaf A only on success', () => {
    const m = machine(4, { nonLeafAOnDescent: false })
    m.b.map({ va: LA, pa: 0x123000, leafLo: LEAF })
    const psc = new PagingStructureCache()
    expect(m.walkFull(LA)).toBe(WALK_OK)
    expect(psc.fill(0, 0, LA, m.res, m.ctx)).toBe(3)
  })

  it('fillFrom takes the start level and rights explicitly', () => {
    const m = machine()
    m.b.map({ va: LA, pa: 0x123000, leafLo: LEAF })
    const psc = new PagingStructureCache()
    m.walkFull(LA)
    // As if the walk had begun at level 2 below a read-only, supervisor-only, XD PDPTE.
    expect(psc.fillFrom(0, 0, LA, m.res, m.ctx.hiAddrMask, 2, 0, 0, 1)).toBe(1)
    expect(psc.lookup(0, 0, LA)).toBe(true)
    expect([psc.startLevel, psc.startTable, psc.startRw, psc.startUs, psc.startXd]).toEqual([1, tableOf(m.b, LA, 1), 0, 0, 1])
    // fill without a matching lookup: the walk is taken to have begun at CR3.
    const psc2 = new PagingStructureCache()
    psc2.lookup(0, 0, LA + 0x1000)
    expect(psc2.fill(0, 0, LA, m.res, m.ctx)).toBe(3)
  })
})

describe('PagingStructureCache (5-level)', () => {
  it('fills PML5E..PDE and hits the PML5E cache for another PML4 slot', () => {
    const m = machine(5)
    const la = 0x0012_3456_789a_b000 // above 2^48, below 2^53 (safe integer)
    const la2 = la + 2 ** 39 * 3
    m.b.map({ va: la, pa: 0x5000, leafLo: LEAF })
    m.b.map({ va: la2, pa: 0x6000, leafLo: LEAF })
    const psc = new PagingStructureCache()
    expect(m.walkFull(la)).toBe(WALK_OK)
    expect(m.res.memRefs).toBe(5)
    expect(psc.fill(0, 0, la, m.res, m.ctx)).toBe(4)
    expect(psc.lookup(0, 0, la2)).toBe(true)
    expect(psc.startLevel).toBe(4)
    expect(psc.startTable).toBe(tableOf(m.b, la, 4))
    expect(m.walkFrom(psc, la2)).toBe(WALK_OK)
    expect([m.res.memRefs, m.res.pa]).toEqual([4, 0x6000])
    expect(psc.counters[PSCC_HIT_PML5E]).toBe(1)
    expect(psc.lookup(0, 0, la + 8)).toBe(true)
    expect(psc.startLevel).toBe(1)
  })
})

describe('PagingStructureCache invalidation and creation rules', () => {
  const LA = 0x7f0000200000

  it('invalidatePcid / invalidateAsid / invalidateAll remove exactly their entries', () => {
    const m = machine()
    m.b.map({ va: LA, pa: 0x1000, leafLo: LEAF })
    m.walkFull(LA)
    const psc = new PagingStructureCache({ waysPml4e: 4 }) // room for three contexts
    for (const [asid, pcid] of [[0, 1], [0, 2], [1, 1]] as const) expect(psc.fillFrom(asid, pcid, LA, m.res, m.ctx.hiAddrMask, 4)).toBe(3)
    expect(psc.liveEntries()).toBe(9)
    // INVLPG of any address, INVPCID 0/1, MOV CR3: every PSC entry of that PCID.
    psc.invalidatePcid(0, 1)
    expect(psc.liveEntries()).toBe(6)
    expect(psc.lookup(0, 1, LA)).toBe(false)
    expect(psc.lookup(0, 2, LA)).toBe(true)
    expect(psc.lookup(1, 1, LA)).toBe(true)
    psc.invalidateAsid(0)
    expect(psc.liveEntries()).toBe(3)
    expect(psc.lookup(0, 2, LA)).toBe(false)
    expect(psc.lookup(1, 1, LA)).toBe(true)
    psc.invalidateAll()
    expect(psc.liveEntries()).toBe(0)
    expect(psc.lookup(1, 1, LA)).toBe(false)
    expect(psc.counters[PSCC_INVALIDATE]).toBe(3)
  })

  it('creates no entry from a walk that faulted (not present at the PTE or the PDE, or a rights fault)', () => {
    const m = machine()
    m.b.map({ va: LA, pa: 0x1000, leafLo: PTE_P | PTE_RW })
    const psc = new PagingStructureCache()
    expect(m.walkFull(LA + 0x1000)).toBe(WALK_PF) // PTE not present
    expect(psc.fill(0, 0, LA + 0x1000, m.res, m.ctx)).toBe(0)
    expect(m.walkFull(LA + M2)).toBe(WALK_PF) // PDE not present
    expect(psc.fill(0, 0, LA + M2, m.res, m.ctx)).toBe(0)
    m.state.cpl = 3
    expect(m.walkFull(LA)).toBe(WALK_PF) // user read of a supervisor page
    expect(psc.fill(0, 0, LA, m.res, m.ctx)).toBe(0)
    expect(psc.liveEntries()).toBe(0)
    expect(psc.lookup(0, 0, LA)).toBe(false)
  })

  it('skips entries with A=0 (a walk result must have set A before caching)', () => {
    const res = new WalkResult()
    res.status = WALK_OK
    res.level = 1
    res.pathLo[4] = (0x5000 | PTE_P | PTE_RW | PTE_A) >>> 0
    res.pathLo[3] = (0x6000 | PTE_P | PTE_RW) >>> 0 // A=0: stop here
    res.pathLo[2] = (0x7000 | PTE_P | PTE_RW | PTE_A) >>> 0
    const psc = new PagingStructureCache()
    expect(psc.fillFrom(0, 0, 0x1000, res, 0x3fff, 4)).toBe(1)
    expect(psc.lookup(0, 0, 0x1000)).toBe(true)
    expect([psc.startLevel, psc.startTable]).toEqual([3, 0x5000])
  })

  it('keeps using a stale next-table address until invalidated (allowed, x86-hw.md §6.3)', () => {
    const m = machine()
    m.b.map({ va: LA, pa: 0x1000, leafLo: LEAF })
    const psc = new PagingStructureCache()
    m.walkFull(LA)
    psc.fill(0, 0, LA, m.res, m.ctx)
    // Repoint the PDE at a new page table mapping LA to 0x9000, without invalidation.
    const pde = m.b.entryAddress(LA, 2)
    const newPt = m.b.alloc.allocOrThrow() * 4096
    m.mem.write64(newPt + PageTableBuilder.index(LA, 1) * 8, 0x9000 | LEAF, 0)
    m.mem.write64(pde, (newPt | LEAF) >>> 0, 0)
    expect(psc.lookup(0, 0, LA)).toBe(true)
    expect(m.walkFrom(psc, LA)).toBe(WALK_OK)
    expect(m.res.pa).toBe(0x1000) // old table
    psc.invalidatePcid(0, 0) // e.g. INVLPG of any address
    expect(psc.lookup(0, 0, LA)).toBe(false)
    expect(m.walkFull(LA)).toBe(WALK_OK)
    expect(m.res.pa).toBe(0x9000)
  })

  it('replaces round-robin within a set', () => {
    const m = machine()
    const psc = new PagingStructureCache({ setsPde: 1, waysPde: 2 })
    for (let r = 0; r < 3; r++) m.b.map({ va: LA + r * M2, pa: 0x1000 * (r + 1), leafLo: LEAF })
    for (let r = 0; r < 3; r++) {
      m.walkFull(LA + r * M2)
      psc.fill(0, 0, LA + r * M2, m.res, m.ctx)
    }
    expect(psc.counters[PSCC_EVICT]).toBe(1)
    expect(psc.lookup(0, 0, LA)).toBe(true)
    expect(psc.startLevel).toBe(2) // its PDE entry was evicted; the PDPTE entry remains
    expect(psc.lookup(0, 0, LA + M2)).toBe(true)
    expect(psc.startLevel).toBe(1)
    expect(psc.lookup(0, 0, LA + 2 * M2)).toBe(true)
    expect(psc.startLevel).toBe(1)
  })
})
