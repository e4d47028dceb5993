/**
 * EPT second-dimension translation against kvm-unit-tests `x86/vmx_tests.c` `ept_access_test_*`
 * (x86-hw.md §7.3/§7.4): rights of the final page at every level, guest paging-structure
 * accesses, EPT A/D, misconfigurations, 5-level EPT, reserved bits 51:N, execute-only, EPTP.
 */
import { describe, expect, it } from 'vitest'
import {
  ACC_FETCH,
  ACC_READ,
  ACC_WRITE,
  type AccessKind,
  EPT_A,
  EPT_D,
  EPT_PS,
  EPT_R,
  EPT_W,
  EPT_X,
  EPTQ_FETCH,
  EPTQ_GLA_FINAL,
  EPTQ_GLA_NX,
  EPTQ_GLA_USER,
  EPTQ_GLA_VALID,
  EPTQ_GLA_WRITABLE,
  EPTQ_R,
  EPTQ_READ,
  EPTQ_W,
  EPTQ_WRITE,
  EPTQ_X,
  EXIT_EPT_MISCONFIG,
  EXIT_EPT_VIOLATION,
  HI_XD,
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
  CR4_PAE,
  type CpuFeatures,
  CpuState,
  EFER_LMA,
  EFER_LME,
  EFER_NXE,
  makeFeatures,
  PagingContext,
} from './cpu-state.ts'
import { EptTranslator, eptViolationQualString } from './ept.ts'
import { HwConfigError } from './errors.ts'
import { PageTableBuilder } from './page-table-builder.ts'
import { FrameAllocator, PhysMem } from './phys-mem.ts'
import { walk } from './walk.ts'
import { WALK_EXIT, WALK_OK, WalkResult } from './walk-result.ts'

const GIB = 2 ** 30
const MT_WB = 6 << 3
const RWX = EPT_R | EPT_W | EPT_X
/** As in kvm-unit-tests: the data GPA is 1 << 39, so it has its own EPT PML4 entry. */
const DATA_GPA = 2 ** 39
/** 1 GiB-aligned host page backing the data, so 4 KiB, 2 MiB and 1 GiB EPT leaves all map it at offset 0. */
const DATA_HPA = 3 * GIB
/** Guest linear address of the data; its guest PTE sits at index 0x55 of its table. */
const LA = 0x7abcde055000
const MAGIC = 0x5a5a1234
/** Bits 9–11 (advanced EPT-violation information) are CPU-dependent; kvm-unit-tests masks them. */
const ADV_INFO = EPTQ_GLA_USER | EPTQ_GLA_WRITABLE | EPTQ_GLA_NX
const OPS = [ACC_READ, ACC_WRITE, ACC_FETCH] as const
const OP_NAME = ['read', 'write', 'fetch']

interface Env {
  host: PhysMem
  features: CpuFeatures
  ept: EptTranslator
  eb: PageTableBuilder
  gpt: PageTableBuilder
  state: CpuState
  ctx: PagingContext
  res: WalkResult
  /** GPA (= HPA: guest low memory is identity-mapped) of the guest PTE mapping LA. */
  guestPte: number
}

/**
 * A 4-level guest whose tables live in identity-mapped low memory (EPT 4 KiB pages for [0, 16 MiB)),
 * with LA → DATA_GPA → DATA_HPA. Guest entries have A=1 (and D=1 on the leaf) unless told otherwise.
 */
function setup(opts: { ad?: boolean; features?: Partial<CpuFeatures>; guestLeafLo?: number; guestLeafHi?: number } = {}): Env {
  const features = makeFeatures(opts.features ?? {})
  const host = new PhysMem({ sizeBytes: 4 * GIB, name: 'host' })
  const gpt = new PageTableBuilder(new FrameAllocator(host, 16, 256), { levels: 4, format: 'x86' })
  const guestPte = gpt.map({
    va: LA,
    pa: DATA_GPA,
    leafLo: opts.guestLeafLo ?? (PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D),
    leafHi: opts.guestLeafHi ?? 0,
    tableLo: PTE_P | PTE_RW | PTE_US | PTE_A,
  })
  const eb = new PageTableBuilder(new FrameAllocator(host, (2 * GIB) / 4096, 4096), { levels: 4, format: 'ept' })
  for (let g = 0; g < 16 * 2 ** 20; g += 4096) eb.map({ va: g, pa: g, leafLo: RWX | MT_WB })
  eb.map({ va: DATA_GPA, pa: DATA_HPA, leafLo: RWX | MT_WB })
  host.write32(DATA_HPA, MAGIC)
  const ept = new EptTranslator(host, features, { root: eb.root, levels: 4, adEnabled: opts.ad ?? false })
  const state = new CpuState()
  state.cr0 = CR0_PG | CR0_PE | CR0_WP
  state.cr4 = CR4_PAE
  state.efer = EFER_LME | EFER_LMA | EFER_NXE
  state.cr3 = gpt.root
  const ctx = new PagingContext(features)
  ctx.update(state)
  return { host, features, ept, eb, gpt, state, ctx, res: new WalkResult(), guestPte }
}

function access(env: Env, op: AccessKind): number {
  return walk(env.host, env.ctx, env.state, LA, op, false, env.ept, env.res)
}

/** Host-physical address of the EPT entry at `level` on the path of `gpa`. */
function eptEntry(env: Env, gpa: number, level: number): number {
  let table = env.eb.root
  for (let l = env.eb.levels; l > level; l--) {
    const ea = table + PageTableBuilder.index(gpa, l) * 8
    table = (env.host.read32(ea) & 0xfffff000) >>> 0
  }
  return table + PageTableBuilder.index(gpa, level) * 8
}

/**
 * kvm-unit-tests `ept_twiddle`: replace the permission bits of the EPT entry at `level` for `gpa`
 * (or, with `huge`, turn it into a 2 MiB / 1 GiB leaf mapping DATA_HPA), set/clear extra bits;
 * returns a function that restores it.
 */
function twiddle(env: Env, gpa: number, level: number, huge: boolean, xwr: number, setLo = 0, setHi = 0): () => void {
  const ea = eptEntry(env, gpa, level)
  const lo0 = env.host.read32(ea)
  const hi0 = env.host.read32(ea + 4)
  let lo = huge ? (DATA_HPA | EPT_PS | MT_WB) >>> 0 : lo0
  let hi = huge ? 0 : hi0
  lo = ((lo & ~7) | xwr | setLo) >>> 0
  hi = (hi | setHi) >>> 0
  env.host.write64(ea, lo, hi)
  return () => {
    env.host.write64(ea, lo0, hi0)
  }
}

/** Every (level, huge) placement kvm-unit-tests uses: levels 1–4, plus 2 MiB and 1 GiB leaves. */
const PLACEMENTS: [number, boolean][] = [
  [1, false],
  [2, false],
  [3, false],
  [4, false],
  [2, true],
  [3, true],
]
const placementName = ([l, h]: [number, boolean]): string => (h ? `${l === 2 ? '2M' : '1G'} leaf` : `level ${String(l)}`)

type Outcome = 'ok' | 'misconfig' | number

describe('EPT rights of the final page (x86-hw.md §7.4 first table; ept_access_test_*)', () => {
  // [name, XWR, read, write, fetch] — numbers are violation qualifications without LADDR_VLD/bit 8/bits 9–11.
  const TABLE: [string, number, Outcome, Outcome, Outcome][] = [
    ['none', 0, EPTQ_READ, EPTQ_WRITE, EPTQ_FETCH],
    ['R', EPT_R, 'ok', EPTQ_WRITE | EPTQ_R, EPTQ_FETCH | EPTQ_R],
    ['W', EPT_W, 'misconfig', 'misconfig', 'misconfig'],
    ['WX', EPT_W | EPT_X, 'misconfig', 'misconfig', 'misconfig'],
    ['RW', EPT_R | EPT_W, 'ok', 'ok', EPTQ_FETCH | EPTQ_R | EPTQ_W],
    ['X', EPT_X, EPTQ_READ | EPTQ_X, EPTQ_WRITE | EPTQ_X, 'ok'],
    ['RX', EPT_R | EPT_X, 'ok', EPTQ_WRITE | EPTQ_R | EPTQ_X, 'ok'],
    ['RWX', RWX, 'ok', 'ok', 'ok'],
  ]
  for (const [name, xwr, ...outcomes] of TABLE) {
    for (let i = 0; i < 3; i++) {
      const op = OPS[i]!
      const want = outcomes[i]!
      it(`${name} × ${OP_NAME[op]!} → ${typeof want === 'number' ? `V(0x${want.toString(16)})` : want}, at every level`, () => {
        const env = setup()
        for (const p of PLACEMENTS) {
          const restore = twiddle(env, DATA_GPA, p[0], p[1], xwr)
          const st = access(env, op)
          const where = placementName(p)
          if (want === 'ok') {
            expect(st, where).toBe(WALK_OK)
            expect(env.res.pa, where).toBe(DATA_HPA)
            expect(env.host.read32(env.res.pa)).toBe(MAGIC)
            expect(env.res.hostW, where).toBe((xwr >>> 1) & 1)
            expect(env.res.hostX, where).toBe((xwr >>> 2) & 1)
          } else if (want === 'misconfig') {
            expect(st, where).toBe(WALK_EXIT)
            expect(env.res.exitReason, where).toBe(EXIT_EPT_MISCONFIG)
            expect(env.res.exitGpa, where).toBe(DATA_GPA)
            expect(env.res.exitQual, where).toBe(0)
          } else {
            expect(st, where).toBe(WALK_EXIT)
            expect(env.res.exitReason, where).toBe(EXIT_EPT_VIOLATION)
            expect(env.res.exitQual & ~ADV_INFO, where).toBe(want | EPTQ_GLA_VALID | EPTQ_GLA_FINAL)
            expect(env.res.exitGpa, where).toBe(DATA_GPA)
            expect(env.res.exitGla, where).toBe(LA)
          }
          restore()
        }
      })
    }
  }

  it('execute-only without the capability is a misconfiguration for every access', () => {
    const env = setup({ features: { eptExecOnly: false } })
    for (const p of PLACEMENTS) {
      for (const op of OPS) {
        const restore = twiddle(env, DATA_GPA, p[0], p[1], EPT_X)
        expect(access(env, op)).toBe(WALK_EXIT)
        expect(env.res.exitReason, placementName(p)).toBe(EXIT_EPT_MISCONFIG)
        restore()
      }
    }
    // RX stays legal.
    const restore = twiddle(env, DATA_GPA, 1, false, EPT_R | EPT_X)
    expect(access(env, ACC_FETCH)).toBe(WALK_OK)
    restore()
  })

  it('bits 9–11 report the effective guest U/S, R/W, XD of the linear address', () => {
    // Default guest mapping: user, writable, executable.
    const env = setup()
    twiddle(env, DATA_GPA, 1, false, 0)
    expect(access(env, ACC_READ)).toBe(WALK_EXIT)
    expect(env.res.exitQual).toBe(0x781)
    expect(env.res.exitQual).toBe(EPTQ_READ | EPTQ_GLA_VALID | EPTQ_GLA_FINAL | EPTQ_GLA_USER | EPTQ_GLA_WRITABLE)
    // Supervisor, read-only, execute-disable guest page.
    const env2 = setup({ guestLeafLo: PTE_P | PTE_A | PTE_D, guestLeafHi: HI_XD })
    twiddle(env2, DATA_GPA, 1, false, 0)
    expect(access(env2, ACC_READ)).toBe(WALK_EXIT)
    expect(env2.res.exitQual).toBe(EPTQ_READ | EPTQ_GLA_VALID | EPTQ_GLA_FINAL | EPTQ_GLA_NX)
    expect(env2.res.exitQual).toBe(0x981)
    expect(eptViolationQualString(0x981)).toBe('0x981 [RD ept=--- gla-valid final supervisor read-only nx]')
  })

  it('misconfiguration beats a violation higher up (the walk finishes before rights are checked)', () => {
    const env = setup()
    twiddle(env, DATA_GPA, 4, false, EPT_R)
    twiddle(env, DATA_GPA, 1, false, EPT_W)
    expect(access(env, ACC_WRITE)).toBe(WALK_EXIT)
    expect(env.res.exitReason).toBe(EXIT_EPT_MISCONFIG)
  })

  it('the AND of the rights covers every level: R at level 4, X at level 1 → V(RD|…) with no rights', () => {
    const env = setup()
    twiddle(env, DATA_GPA, 4, false, EPT_R | EPT_W)
    twiddle(env, DATA_GPA, 1, false, EPT_X)
    expect(access(env, ACC_READ)).toBe(WALK_EXIT)
    expect(env.res.exitQual & ~ADV_INFO).toBe(EPTQ_READ | EPTQ_GLA_VALID | EPTQ_GLA_FINAL)
  })
})

describe('EPT rights of the page holding the guest PTE (x86-hw.md §7.4 second table; ept_access_test_paddr_*)', () => {
  const AD_STATES: [string, number][] = [
    ['A=0', 0],
    ['A=1 D=0', PTE_A],
    ['A=1 D=1', PTE_A | PTE_D],
  ]
  // Expected outcome: null = allowed, else the qualification (bit 8 = 0).
  function expected(xwr: number, ad: number, eptAd: boolean, op: AccessKind): number | null {
    const rights = xwr << 3
    if (xwr === 0) return EPTQ_GLA_VALID | (eptAd ? EPTQ_READ | EPTQ_WRITE : EPTQ_READ)
    if ((xwr & EPT_W) !== 0) return null
    const v = EPTQ_GLA_VALID | EPTQ_READ | EPTQ_WRITE | rights
    if (eptAd) return v
    if ((ad & PTE_A) === 0) return v
    if ((ad & PTE_D) === 0 && op === ACC_WRITE) return v
    return null
  }
  const RIGHTS: [string, number][] = [
    ['not present', 0],
    ['R', EPT_R],
    ['RX', EPT_R | EPT_X],
    ['RW', EPT_R | EPT_W],
    ['RWX', RWX],
  ]
  for (const eptAd of [false, true]) {
    for (const [rname, xwr] of RIGHTS) {
      for (const [adName, ad] of AD_STATES) {
        it(`EPT A/D ${eptAd ? 'on' : 'off'}, PTE page ${rname}, guest PTE ${adName}`, () => {
          for (const op of OPS) {
            const env = setup({ ad: eptAd, guestLeafLo: PTE_P | PTE_RW | PTE_US | ad })
            const ptePage = env.guestPte - (env.guestPte % 4096)
            twiddle(env, ptePage, 1, false, xwr)
            const st = access(env, op)
            const want = expected(xwr, ad, eptAd, op)
            const label = OP_NAME[op]!
            if (want === null) {
              expect(st, label).toBe(WALK_OK)
              expect(env.res.pa, label).toBe(DATA_HPA)
              const pte = env.host.read32(env.guestPte)
              expect(pte & PTE_A, label).toBe(PTE_A)
              if (op === ACC_WRITE || (ad & PTE_D) !== 0) expect(pte & PTE_D, label).toBe(PTE_D)
              else expect(pte & PTE_D, label).toBe(0)
              if (eptAd) {
                // A=1 at every level, D=1 only in the leaf of the page holding the guest PTE.
                for (let l = 4; l >= 1; l--) {
                  const e = env.host.read32(eptEntry(env, ptePage, l))
                  expect(e & (EPT_A | EPT_D), `${label} level ${String(l)}`).toBe(l === 1 ? EPT_A | EPT_D : EPT_A)
                }
              } else {
                for (let l = 4; l >= 1; l--) expect(env.host.read32(eptEntry(env, ptePage, l)) & (EPT_A | EPT_D)).toBe(0)
              }
            } else {
              expect(st, label).toBe(WALK_EXIT)
              expect(env.res.exitReason, label).toBe(EXIT_EPT_VIOLATION)
              expect(env.res.exitQual, label).toBe(want)
              expect(env.res.exitQual & EPTQ_GLA_FINAL, label).toBe(0)
              expect(env.res.exitGpa, label).toBe(env.guestPte)
              expect(env.res.exitGla, label).toBe(LA)
            }
          }
        })
      }
    }
  }

  it('rmwSetsReadBit=false reports a guest A update as WR only', () => {
    const env = setup({ guestLeafLo: PTE_P | PTE_RW | PTE_US })
    const ept = new EptTranslator(env.host, env.features, { root: env.eb.root, levels: 4, adEnabled: false, rmwSetsReadBit: false })
    twiddle(env, env.guestPte, 1, false, EPT_R)
    expect(walk(env.host, env.ctx, env.state, LA, ACC_READ, false, ept, env.res)).toBe(WALK_EXIT)
    expect(env.res.exitQual).toBe(EPTQ_WRITE | EPTQ_R | EPTQ_GLA_VALID)
  })
})

describe('EPT accessed and dirty flags', () => {
  it('after a write: A=1 at every level, D=1 in the data leaf only; after a read: no D', () => {
    const env = setup({ ad: true })
    expect(access(env, ACC_READ)).toBe(WALK_OK)
    for (let l = 4; l >= 1; l--) expect(env.host.read32(eptEntry(env, DATA_GPA, l)) & (EPT_A | EPT_D)).toBe(EPT_A)
    expect(access(env, ACC_WRITE)).toBe(WALK_OK)
    expect(env.res.adWrites).toBe(1)
    for (let l = 4; l >= 1; l--) {
      expect(env.host.read32(eptEntry(env, DATA_GPA, l)) & (EPT_A | EPT_D)).toBe(l === 1 ? EPT_A | EPT_D : EPT_A)
    }
  })

  it('A/D disabled: EPT entries are never written, even for writes', () => {
    const env = setup({ ad: false })
    expect(access(env, ACC_WRITE)).toBe(WALK_OK)
    expect(env.res.adWrites).toBe(0)
    for (let l = 4; l >= 1; l--) expect(env.host.read32(eptEntry(env, DATA_GPA, l)) & (EPT_A | EPT_D)).toBe(0)
  })

  it('2 MiB and 1 GiB leaves get A and D; bits 8/9 are ignored (not reserved) with A/D off', () => {
    for (const level of [2, 3]) {
      const env = setup({ ad: true })
      twiddle(env, DATA_GPA, level, true, RWX)
      expect(access(env, ACC_WRITE)).toBe(WALK_OK)
      expect(env.res.pa).toBe(DATA_HPA)
      expect(env.host.read32(eptEntry(env, DATA_GPA, level)) & (EPT_A | EPT_D)).toBe(EPT_A | EPT_D)
      const off = setup({ ad: false })
      twiddle(off, DATA_GPA, level, true, RWX, EPT_A | EPT_D)
      expect(access(off, ACC_READ)).toBe(WALK_OK)
    }
  })

  it('a violation sets no leaf A/D', () => {
    const env = setup({ ad: true })
    twiddle(env, DATA_GPA, 1, false, EPT_R)
    expect(access(env, ACC_WRITE)).toBe(WALK_EXIT)
    expect(env.host.read32(eptEntry(env, DATA_GPA, 1)) & (EPT_A | EPT_D)).toBe(0)
  })
})

describe('EPT misconfigurations (x86-hw.md §7.3; ept_access_test_reserved_bits / ignored_bits)', () => {
  function expectMisconfig(env: Env, where: string): void {
    for (const op of OPS) {
      expect(access(env, op), where).toBe(WALK_EXIT)
      expect(env.res.exitReason, where).toBe(EXIT_EPT_MISCONFIG)
      expect(env.res.exitGpa, where).toBe(DATA_GPA)
    }
  }

  it('level-specific reserved bits: PML4E 7:3, non-leaf PDPTE/PDE 6:3, 2 MiB leaf 20:12, 1 GiB leaf 29:12', () => {
    const env = setup()
    const cases: [number, boolean, number[]][] = [
      [4, false, [3, 4, 5, 6, 7]],
      [3, false, [3, 4, 5, 6]],
      [2, false, [3, 4, 5, 6]],
      [2, true, [12, 13, 14, 15, 16, 17, 18, 19, 20]],
      [3, true, Array.from({ length: 18 }, (_, i) => 12 + i)],
    ]
    for (const [level, huge, bits] of cases) {
      for (const bit of bits) {
        const where = `${placementName([level, huge])} bit ${String(bit)}`
        let restore = twiddle(env, DATA_GPA, level, huge, RWX, 1 << bit)
        expectMisconfig(env, where)
        restore()
        // Making the entry non-present turns reserved bits into ignored ones: V(RD).
        restore = twiddle(env, DATA_GPA, level, huge, 0, 1 << bit)
        expect(access(env, ACC_READ), where).toBe(WALK_EXIT)
        expect(env.res.exitReason, where).toBe(EXIT_EPT_VIOLATION)
        expect(env.res.exitQual & ~ADV_INFO, where).toBe(EPTQ_READ | EPTQ_GLA_VALID | EPTQ_GLA_FINAL)
        restore()
      }
    }
  })

  it('bit 7 of a 4 KiB EPT PTE is ignored', () => {
    const env = setup()
    twiddle(env, DATA_GPA, 1, false, RWX, EPT_PS)
    expect(access(env, ACC_READ)).toBe(WALK_OK)
  })

  it('XWR = 010 and 110 at every level', () => {
    const env = setup()
    for (const xwr of [EPT_W, EPT_W | EPT_X]) {
      for (const p of PLACEMENTS) {
        const restore = twiddle(env, DATA_GPA, p[0], p[1], xwr)
        expectMisconfig(env, placementName(p))
        restore()
      }
    }
  })

  it('leaf memory types 2, 3, 7 are misconfigurations; 0, 1, 4, 5, 6 are fine (4 KiB, 2 MiB, 1 GiB leaves)', () => {
    const env = setup()
    for (const p of [PLACEMENTS[0]!, PLACEMENTS[4]!, PLACEMENTS[5]!]) {
      for (let mt = 0; mt < 8; mt++) {
        const where = `${placementName(p)} MT ${String(mt)}`
        const ea = eptEntry(env, DATA_GPA, p[0])
        const restore = twiddle(env, DATA_GPA, p[0], p[1], RWX)
        env.host.write32(ea, ((env.host.read32(ea) & ~0x38) | (mt << 3)) >>> 0)
        if (mt === 2 || mt === 3 || mt === 7) expectMisconfig(env, where)
        else expect(access(env, ACC_READ), where).toBe(WALK_OK)
        restore()
      }
    }
  })

  it('PS where the page size is unsupported (features.ept2M / ept1G) is a reserved bit', () => {
    const no2m = setup({ features: { ept2M: false } })
    let restore = twiddle(no2m, DATA_GPA, 2, true, RWX)
    expectMisconfig(no2m, '2M without ept2M')
    restore()
    restore = twiddle(no2m, DATA_GPA, 3, true, RWX)
    expect(access(no2m, ACC_READ)).toBe(WALK_OK)
    restore()
    const no1g = setup({ features: { ept1G: false } })
    twiddle(no1g, DATA_GPA, 3, true, RWX)
    expectMisconfig(no1g, '1G without ept1G')
  })

  it('ignored bits 8–11 and 52–63 at every level (A/D disabled)', () => {
    const env = setup()
    for (const p of PLACEMENTS) {
      for (const bit of [8, 9, 10, 11, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63]) {
        const restore =
          bit < 32 ? twiddle(env, DATA_GPA, p[0], p[1], RWX, 1 << bit) : twiddle(env, DATA_GPA, p[0], p[1], RWX, 0, (1 << (bit - 32)) >>> 0)
        for (const op of OPS) expect(access(env, op), `${placementName(p)} bit ${String(bit)}`).toBe(WALK_OK)
        restore()
      }
    }
  })
})

describe('EPT reserved bits 51:N (N = MAXPHYADDR)', () => {
  for (const n of [36, 46, 52]) {
    it(`N = ${String(n)}`, () => {
      const features = makeFeatures({ maxPhyAddr: n })
      const host = new PhysMem({ sizeBytes: 4 * GIB })
      const eb = new PageTableBuilder(new FrameAllocator(host, 16, 64), { levels: 4, format: 'ept' })
      const gpa = 2 ** 35 + 0x5000
      const leaf = eb.map({ va: gpa, pa: DATA_HPA, leafLo: RWX | MT_WB })
      const ept = new EptTranslator(host, features, { root: eb.root, levels: 4, adEnabled: false })
      const res = new WalkResult()
      const entries: number[] = [leaf]
      let table = eb.root
      for (let l = 4; l > 1; l--) {
        const ea = table + PageTableBuilder.index(gpa, l) * 8
        entries[l - 1] = ea
        table = (host.read32(ea) & 0xfffff000) >>> 0
      }
      const tr = (): number => {
        res.memRefs = 0
        res.la = 0x1000
        return ept.translate(gpa + 0x44, ACC_READ, true, res)
      }
      expect(tr()).toBe(DATA_HPA + 0x44)
      expect(res.memRefs).toBe(4)
      let reserved = 0
      for (let bit = 36; bit <= 51; bit++) {
        for (let l = 1; l <= 4; l++) {
          const ea = entries[l - 1]!
          const hi0 = host.read32(ea + 4)
          host.write32(ea + 4, (hi0 | (1 << (bit - 32))) >>> 0)
          const hpa = tr()
          if (bit >= n) {
            expect(hpa, `bit ${String(bit)} level ${String(l)}`).toBe(-1)
            expect(res.exitReason).toBe(EXIT_EPT_MISCONFIG)
            expect(res.exitGpa).toBe(gpa + 0x44)
            reserved++
          } else if (l === 1) {
            // An address bit of the leaf: the translation just moves.
            expect(hpa, `bit ${String(bit)}`).toBe(DATA_HPA + 2 ** bit + 0x44)
          }
          host.write32(ea + 4, hi0)
        }
      }
      expect(reserved).toBe((52 - n) * 4)
    })
  }
})

describe('5-level EPT', () => {
  function make5(): { host: PhysMem; ept: EptTranslator; eb: PageTableBuilder; gpa: number; res: WalkResult } {
    const features = makeFeatures({ maxPhyAddr: 52 })
    const host = new PhysMem({ sizeBytes: 4 * GIB })
    const eb = new PageTableBuilder(new FrameAllocator(host, 16, 64), { levels: 5, format: 'ept' })
    const gpa = 2 ** 50 + 2 ** 40 + 0x123000
    eb.map({ va: gpa, pa: DATA_HPA, leafLo: RWX | MT_WB })
    const ept = EptTranslator.fromEptp(host, features, eb.root + (4 << 3) + 6)
    return { host, ept, eb, gpa, res: new WalkResult() }
  }
  it('translates GPAs above 2^48 with 5 references', () => {
    const { ept, gpa, res, host } = make5()
    host.write32(DATA_HPA + 0x10, MAGIC)
    expect(ept.levels).toBe(5)
    const hpa = ept.translate(gpa + 0x10, ACC_READ, true, res)
    expect(hpa).toBe(DATA_HPA + 0x10)
    expect(host.read32(hpa)).toBe(MAGIC)
    expect(res.memRefs).toBe(5)
  })
  it('PML5E not present → V(RD) after 1 reference; PML5E bits 7:3 reserved', () => {
    const { ept, gpa, res, host, eb } = make5()
    const ea = eb.root + PageTableBuilder.index(gpa, 5) * 8
    const lo0 = host.read32(ea)
    host.write32(ea, (lo0 & ~7) >>> 0)
    res.la = 0x77000
    expect(ept.translate(gpa, ACC_READ, true, res)).toBe(-1)
    expect(res.memRefs).toBe(1)
    expect(res.exitReason).toBe(EXIT_EPT_VIOLATION)
    expect(res.exitQual & ~ADV_INFO).toBe(EPTQ_READ | EPTQ_GLA_VALID | EPTQ_GLA_FINAL)
    expect(res.exitGla).toBe(0x77000)
    for (let bit = 3; bit <= 7; bit++) {
      host.write32(ea, (lo0 | (1 << bit)) >>> 0)
      expect(ept.translate(gpa, ACC_READ, true, res), `bit ${String(bit)}`).toBe(-1)
      expect(res.exitReason).toBe(EXIT_EPT_MISCONFIG)
    }
  })
})

describe('EPTP decoding (EptTranslator.fromEptp)', () => {
  const features = makeFeatures()
  const host = new PhysMem({ sizeBytes: 2 ** 24 })
  it('decodes memory type, walk length, A/D and the root', () => {
    const e = EptTranslator.fromEptp(host, features, 0x5000 + (3 << 3) + 6 + (1 << 6))
    expect(e.root).toBe(0x5000)
    expect(e.levels).toBe(4)
    expect(e.adEnabled).toBe(true)
    expect(e.ptAccessIsWrite).toBe(true)
    expect(e.eptp()).toBe(0x505e)
    const u = EptTranslator.fromEptp(host, features, 0x7000 + (4 << 3))
    expect(u.levels).toBe(5)
    expect(u.adEnabled).toBe(false)
    expect(u.ptAccessIsWrite).toBe(false)
  })
  it('rejects invalid EPTPs with HwConfigError (VM entry would fail)', () => {
    const bad = [
      0x5000 + (3 << 3) + 1, // memory type 1
      0x5000 + (3 << 3) + 7, // memory type 7
      0x5000 + (2 << 3) + 6, // walk length 3 levels
      0x5000 + (5 << 3) + 6, // walk length 6 levels
      0x5000 + (3 << 3) + 6 + (1 << 7), // bit 7 (supervisor shadow stack): not modelled
      0x5000 + (3 << 3) + 6 + (1 << 9), // reserved 11:8
      2 ** 46 + 0x5000 + (3 << 3) + 6, // above MAXPHYADDR
      -1,
      0.5,
    ]
    for (const v of bad) expect(() => EptTranslator.fromEptp(host, features, v), String(v)).toThrow(HwConfigError)
    expect(() => new EptTranslator(host, features, { root: 0x5008, levels: 4, adEnabled: false })).toThrow(HwConfigError)
  })
})
