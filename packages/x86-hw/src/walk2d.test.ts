/**
 * Two-dimensional walks (guest paging over EPT or NPT): exact memory-reference counts of
 * x86-hw.md §8.1 and anchors.md §A.8, final host-physical addresses, and the extra nested
 * translations that guest A/D updates cost.
 */
import { describe, expect, it } from 'vitest'
import {
  ACC_FETCH,
  ACC_READ,
  ACC_WRITE,
  type AccessKind,
  EPT_A,
  EPT_D,
  EPT_R,
  EPT_W,
  EPT_X,
  EPTQ_GLA_VALID,
  EPTQ_R,
  EPTQ_READ,
  EPTQ_WRITE,
  EXIT_EPT_VIOLATION,
  laFromBigInt,
  PTE_A,
  PTE_D,
  PTE_P,
  PTE_RW,
  PTE_US,
} from './bits.ts'
import {
  CR0_PE,
  CR0_PG,
  CR0_WP,
  CR4_LA57,
  CR4_PAE,
  type CpuFeatures,
  CpuState,
  EFER_LMA,
  EFER_LME,
  EFER_NXE,
  makeFeatures,
  PagingContext,
} from './cpu-state.ts'
import { EptTranslator } from './ept.ts'
import { NptTranslator } from './npt.ts'
import { PageTableBuilder } from './page-table-builder.ts'
import { FrameAllocator, PhysMem } from './phys-mem.ts'
import { type NestedTranslator, walk } from './walk.ts'
import { WALK_EXIT, WALK_OK, WalkResult } from './walk-result.ts'

const GIB = 2 ** 30
const MIB = 2 ** 20
/** Guest memory sits at HPA = GPA + GUEST_HPA_OFFSET, so a walker that forgets to translate reads the wrong frame. */
const GUEST_HPA_OFFSET = GIB
const EPT_MT_WB = 6 << 3
const EPT_RWX = EPT_R | EPT_W | EPT_X
const GUEST_TABLE = PTE_P | PTE_RW | PTE_US | PTE_A
const GUEST_LEAF = PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D
const NPT_TABLE = PTE_P | PTE_RW | PTE_US | PTE_A
const NPT_LEAF = PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D
const MARKER = 0xfeedf00d

type NestedKind = 'ept' | 'npt'
type Page = 1 | 2 | 3
const pageSize = (p: Page): number => (p === 1 ? 4096 : p === 2 ? 2 * MIB : GIB)

interface GuestSpec {
  levels: 4 | 5
  leaf: Page
  la: number
  /** GPA of the guest page (aligned to its size). */
  gpaBase: number
  tableLo?: number
  leafLo?: number
}

/** Guest tables built in a guest-physical image (GPA space), then copied into host memory at +offset. */
class Guest {
  readonly img = new PhysMem({ sizeBytes: GIB, name: 'guest' })
  readonly alloc = new FrameAllocator(this.img, 16, 256)
  readonly pt: PageTableBuilder
  readonly leafGpa: number
  readonly dataGpa: number

  constructor(readonly spec: GuestSpec) {
    this.pt = new PageTableBuilder(this.alloc, { levels: spec.levels, format: 'x86' })
    const size = pageSize(spec.leaf)
    const pageLa = spec.la - (((spec.la % size) + size) % size)
    this.leafGpa = this.pt.map({
      va: pageLa,
      pa: spec.gpaBase,
      level: spec.leaf,
      leafLo: spec.leafLo ?? GUEST_LEAF,
      tableLo: spec.tableLo ?? GUEST_TABLE,
    })
    this.dataGpa = spec.gpaBase + (spec.la - pageLa)
  }

  /** Copy every allocated table frame to host memory at GPA + offset. */
  copyTo(host: PhysMem): void {
    const n = this.alloc.stats().totalAllocs
    for (let f = 16; f < 16 + n; f++) {
      for (let w = 0; w < 4096; w += 4) host.write32(f * 4096 + w + GUEST_HPA_OFFSET, this.img.read32(f * 4096 + w))
    }
  }

  /** Guest paging state: 4/5-level, WP, NXE (x86-hw.md §1). */
  context(features: CpuFeatures, nxe = true): { state: CpuState; ctx: PagingContext } {
    const state = new CpuState()
    state.cr0 = CR0_PG | CR0_PE | CR0_WP
    state.cr4 = CR4_PAE | (this.spec.levels === 5 ? CR4_LA57 : 0)
    state.efer = EFER_LME | EFER_LMA | (nxe ? EFER_NXE : 0)
    state.cr3 = this.pt.root
    const ctx = new PagingContext(features)
    ctx.update(state)
    return { state, ctx }
  }
}

interface Env {
  host: PhysMem
  guest: Guest
  state: CpuState
  ctx: PagingContext
  nested: NestedTranslator
  nb: PageTableBuilder
  res: WalkResult
  expectedHpa: number
}

/** Guest over a nested table that maps GPA [0, 16 MiB) (or [0, 1 GiB) with 1 GiB pages) to GPA + offset. */
function setup2d(
  kind: NestedKind,
  guestSpec: GuestSpec,
  nestedLevels: 4 | 5,
  nestedPage: Page,
  opts: { eptAd?: boolean; nestedLeaf?: number; nestedTable?: number; features?: Partial<CpuFeatures> } = {},
): Env {
  const features = makeFeatures(opts.features ?? {})
  const host = new PhysMem({ sizeBytes: 4 * GIB, name: 'host' })
  const guest = new Guest(guestSpec)
  guest.copyTo(host)
  const nb = new PageTableBuilder(new FrameAllocator(host, (2 * GIB) / 4096, 8192), {
    levels: nestedLevels,
    format: kind === 'ept' ? 'ept' : 'x86',
  })
  const leafLo = opts.nestedLeaf ?? (kind === 'ept' ? EPT_RWX | EPT_MT_WB : NPT_LEAF)
  const tableLo = opts.nestedTable ?? (kind === 'ept' ? EPT_RWX : NPT_TABLE)
  const size = pageSize(nestedPage)
  const span = nestedPage === 3 ? GIB : 16 * MIB
  for (let g = 0; g < span; g += size) nb.map({ va: g, pa: g + GUEST_HPA_OFFSET, level: nestedPage, leafLo, tableLo })
  const nested: NestedTranslator =
    kind === 'ept'
      ? new EptTranslator(host, features, { root: nb.root, levels: nestedLevels, adEnabled: opts.eptAd ?? false })
      : new NptTranslator(host, features, { ncr3: nb.root, levels: nestedLevels, hostNxe: true })
  const { state, ctx } = guest.context(features)
  const expectedHpa = guest.dataGpa + GUEST_HPA_OFFSET
  host.write32(expectedHpa, MARKER)
  return { host, guest, state, ctx, nested, nb, res: new WalkResult(), expectedHpa }
}

function run(env: Env, kind: AccessKind = ACC_READ): number {
  return walk(env.host, env.ctx, env.state, env.guest.spec.la, kind, false, env.nested, env.res)
}

// Guest layouts. Data pages are 4-byte aligned offsets inside GPA [0, 16 MiB), away from the table frames (GPA 0x10000+).
const G4K: GuestSpec = { levels: 4, leaf: 1, la: 0x7f8ab5c3d000 + 0x9a8, gpaBase: 0x345000 }
const G5K: GuestSpec = { levels: 5, leaf: 1, la: 0x123456789ab000 + 0x9a8, gpaBase: 0x345000 }
const G2M: GuestSpec = { levels: 4, leaf: 2, la: 0x7f8ab5c00000 + 0x12344, gpaBase: 0x600000 }
const G1G: GuestSpec = { levels: 4, leaf: 3, la: 0x7f8ac0000000 + 0x345678, gpaBase: 0 }

interface Row {
  name: string
  guest: GuestSpec
  nestedLevels: 4 | 5
  nestedPage: Page
  refs: number
}

// anchors.md §A.8 "Exact walk-reference counts" and x86-hw.md §8.1: refs = n(m+1) + m.
const ROWS: Row[] = [
  { name: '4 (4K) / 4 (4K) = 24', guest: G4K, nestedLevels: 4, nestedPage: 1, refs: 24 },
  { name: '5 (LA57 4K) / 5 (4K) = 35', guest: G5K, nestedLevels: 5, nestedPage: 1, refs: 35 },
  { name: '4 / 5 = 29', guest: G4K, nestedLevels: 5, nestedPage: 1, refs: 29 },
  { name: '5 / 4 = 29', guest: G5K, nestedLevels: 4, nestedPage: 1, refs: 29 },
  { name: 'guest 2M (n=3) / 4 = 19', guest: G2M, nestedLevels: 4, nestedPage: 1, refs: 19 },
  { name: '4 / host 2M (m=3) = 19 (2 MiB nested pages everywhere: 4·4+3)', guest: G4K, nestedLevels: 4, nestedPage: 2, refs: 19 },
  { name: '2M / 2M = 15', guest: G2M, nestedLevels: 4, nestedPage: 2, refs: 15 },
  { name: '1G / 1G = 8', guest: G1G, nestedLevels: 4, nestedPage: 3, refs: 8 },
  { name: '4 / host 1G (m=2) = 14 (4·3+2)', guest: G4K, nestedLevels: 4, nestedPage: 3, refs: 14 },
  { name: 'guest 1G (n=2) / 4 = 14', guest: G1G, nestedLevels: 4, nestedPage: 1, refs: 14 },
  { name: 'guest 1G / 5 = 17', guest: G1G, nestedLevels: 5, nestedPage: 1, refs: 17 },
]

describe('2-D walk reference counts (anchors.md §A.8, x86-hw.md §8.1)', () => {
  for (const kind of ['ept', 'npt'] as const) {
    describe(kind, () => {
      for (const row of ROWS) {
        it(row.name, () => {
          const env = setup2d(kind, row.guest, row.nestedLevels, row.nestedPage)
          expect(run(env)).toBe(WALK_OK)
          expect(env.res.memRefs).toBe(row.refs)
          expect(env.res.adWrites).toBe(0)
          expect(env.res.gpa).toBe(env.guest.dataGpa)
          expect(env.res.pa).toBe(env.expectedHpa)
          expect(env.host.read32(env.res.pa)).toBe(MARKER)
          expect(env.res.level).toBe(row.guest.leaf)
          expect(env.res.hostW).toBe(1)
          expect(env.res.hostX).toBe(1)
        })
      }
      it('kernel (negative canonical) address, 4/4 = 24, write and fetch too', () => {
        const la = laFromBigInt(0xffff888012345000n) + 0x10
        const env = setup2d(kind, { levels: 4, leaf: 1, la, gpaBase: 0x7ff000 }, 4, 1)
        for (const k of [ACC_READ, ACC_WRITE, ACC_FETCH] as const) {
          expect(run(env, k)).toBe(WALK_OK)
          expect(env.res.memRefs).toBe(24)
          expect(env.res.pa).toBe(0x7ff010 + GUEST_HPA_OFFSET)
        }
      })
    })
  }

  describe('native (nested = null)', () => {
    const cases: [string, GuestSpec, number][] = [
      ['4-level 4K = 4', G4K, 4],
      ['5-level 4K = 5', G5K, 5],
      ['2M = 3', G2M, 3],
      ['1G = 2', G1G, 2],
    ]
    for (const [name, spec, refs] of cases) {
      it(name, () => {
        const features = makeFeatures()
        const guest = new Guest(spec)
        const { state, ctx } = guest.context(features)
        guest.img.write32(guest.dataGpa, MARKER)
        const res = new WalkResult()
        expect(walk(guest.img, ctx, state, spec.la, ACC_READ, false, null, res)).toBe(WALK_OK)
        expect(res.memRefs).toBe(refs)
        expect(res.pa).toBe(guest.dataGpa)
        expect(guest.img.read32(res.pa)).toBe(MARKER)
      })
    }
  })
})

/** Host-physical address of the nested entry at `level` for `gpa` (EPT or x86 format share the pointer layout). */
function nestedEntry(env: Env, gpa: number, level: number): number {
  let table = env.nb.root
  for (let l = env.nb.levels; l > level; l--) {
    const ea = table + PageTableBuilder.index(gpa, l) * 8
    table = (env.host.read32(ea) & 0xfffff000) >>> 0
  }
  return table + PageTableBuilder.index(gpa, level) * 8
}

describe('guest A/D updates under nested paging', () => {
  const G_AD0: GuestSpec = { ...G4K, tableLo: PTE_P | PTE_RW | PTE_US, leafLo: PTE_P | PTE_RW | PTE_US }

  for (const aOnDescent of [true, false]) {
    it(`EPT A/D off: each guest A/D write needs a nested write translation (+4 refs each), nonLeafAOnDescent=${String(aOnDescent)}`, () => {
      const env = setup2d('ept', G_AD0, 4, 1, { features: { nonLeafAOnDescent: aOnDescent } })
      // First read: 24 reads + 4 guest A writes, each preceded by a 4-reference EPT translation = 40.
      expect(run(env, ACC_READ)).toBe(WALK_OK)
      expect(env.res.memRefs).toBe(24 + 4 * 4)
      expect(env.res.adWrites).toBe(4)
      expect(env.res.pa).toBe(env.expectedHpa)
      expect(env.host.read32(env.guest.leafGpa + GUEST_HPA_OFFSET) & (PTE_A | PTE_D)).toBe(PTE_A)
      // Second read: all A set, nothing to write.
      expect(run(env, ACC_READ)).toBe(WALK_OK)
      expect(env.res.memRefs).toBe(24)
      expect(env.res.adWrites).toBe(0)
      // First write: only the leaf D remains: 24 + 4.
      expect(run(env, ACC_WRITE)).toBe(WALK_OK)
      expect(env.res.memRefs).toBe(28)
      expect(env.res.adWrites).toBe(1)
      expect(env.host.read32(env.guest.leafGpa + GUEST_HPA_OFFSET) & (PTE_A | PTE_D)).toBe(PTE_A | PTE_D)
    })
  }

  it('EPT A/D off: a write with all guest A=0 sets A on 3 tables and A|D on the leaf in 4 writes (40 refs)', () => {
    const env = setup2d('ept', G_AD0, 4, 1)
    expect(run(env, ACC_WRITE)).toBe(WALK_OK)
    expect(env.res.memRefs).toBe(40)
    expect(env.res.adWrites).toBe(4)
  })

  it('EPT A/D on: no extra nested translations (24 refs); 4 guest + 9 EPT A/D writes', () => {
    // EPT entries start with A=D=0. Guest tables are GPA frames 16..19 (one EPT PT), data GPA 0x345000 (another PT).
    const env = setup2d('ept', G_AD0, 4, 1, { eptAd: true })
    expect(run(env, ACC_READ)).toBe(WALK_OK)
    expect(env.res.memRefs).toBe(24)
    // EPT: PML4E, PDPTE, PDE0 and PTE(frame 16) A (+D) = 4; PTEs of frames 17, 18, 19 = 3;
    // data: PDE1 and its PTE = 2. Guest: 4 A bits. Total 13.
    expect(env.res.adWrites).toBe(4 + 4 + 3 + 2)
    const dataPte = env.host.read32(nestedEntry(env, env.guest.dataGpa, 1))
    expect(dataPte & (EPT_A | EPT_D)).toBe(EPT_A)
    for (let f = 16; f < 20; f++) expect(env.host.read32(nestedEntry(env, f * 4096, 1)) & (EPT_A | EPT_D)).toBe(EPT_A | EPT_D)
    for (let l = 2; l <= 4; l++) expect(env.host.read32(nestedEntry(env, 0x10000, l)) & (EPT_A | EPT_D)).toBe(EPT_A)
    // Again: nothing left to set.
    expect(run(env, ACC_READ)).toBe(WALK_OK)
    expect(env.res.adWrites).toBe(0)
    // A guest write dirties the guest leaf and the EPT leaf of the data page.
    expect(run(env, ACC_WRITE)).toBe(WALK_OK)
    expect(env.res.memRefs).toBe(24)
    expect(env.res.adWrites).toBe(2)
    expect(env.host.read32(nestedEntry(env, env.guest.dataGpa, 1)) & (EPT_A | EPT_D)).toBe(EPT_A | EPT_D)
  })

  it('NPT: guest A/D writes need no extra nested translation (24 refs, 4 guest A writes)', () => {
    const env = setup2d('npt', G_AD0, 4, 1)
    expect(run(env, ACC_READ)).toBe(WALK_OK)
    expect(env.res.memRefs).toBe(24)
    expect(env.res.adWrites).toBe(4)
  })

  it('NPT with nested A=D=0: 4 guest + 9 nested A/D writes; guest-table pages get nested D (accesses are writes)', () => {
    const env = setup2d('npt', G_AD0, 4, 1, { nestedLeaf: PTE_P | PTE_RW | PTE_US, nestedTable: PTE_P | PTE_RW | PTE_US })
    expect(run(env, ACC_READ)).toBe(WALK_OK)
    expect(env.res.memRefs).toBe(24)
    expect(env.res.adWrites).toBe(13)
    expect(env.host.read32(nestedEntry(env, env.guest.dataGpa, 1)) & (PTE_A | PTE_D)).toBe(PTE_A)
    for (let f = 16; f < 20; f++) expect(env.host.read32(nestedEntry(env, f * 4096, 1)) & (PTE_A | PTE_D)).toBe(PTE_A | PTE_D)
    for (let l = 2; l <= 4; l++) expect(env.host.read32(nestedEntry(env, 0x10000, l)) & (PTE_A | PTE_D)).toBe(PTE_A)
  })

  for (const k of [ACC_READ, ACC_WRITE, ACC_FETCH] as const) {
    it(`EPT A/D off, guest PTE A=0 on an EPT read-only page: V(RD|WR|R), bit 8 = 0, GPA = the PTE (access ${String(k)})`, () => {
      const env = setup2d('ept', { ...G4K, leafLo: PTE_P | PTE_RW | PTE_US }, 4, 1)
      const pteGpa = env.guest.leafGpa
      const epte = nestedEntry(env, pteGpa, 1)
      env.host.write32(epte, ((env.host.read32(epte) & ~7) | EPT_R) >>> 0)
      expect(run(env, k)).toBe(WALK_EXIT)
      expect(env.res.status).toBe(WALK_EXIT)
      expect(env.res.exitReason).toBe(EXIT_EPT_VIOLATION)
      expect(env.res.exitQual).toBe(EPTQ_READ | EPTQ_WRITE | EPTQ_R | EPTQ_GLA_VALID)
      expect(env.res.exitGpa).toBe(pteGpa)
      expect(env.res.exitGla).toBe(G4K.la)
      // 24 reads, then the failed 4-reference translation for the A update.
      expect(env.res.memRefs).toBe(28)
      // The guest PTE keeps A=0.
      expect(env.host.read32(pteGpa + GUEST_HPA_OFFSET) & PTE_A).toBe(0)
    })
  }
})
