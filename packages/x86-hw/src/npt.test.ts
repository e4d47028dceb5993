/**
 * AMD NPT second-dimension translation against kvm-unit-tests `x86/svm_npt.c` (x86-hw.md §7.6):
 * exact EXITINFO1 halves and EXITINFO2 for every scenario of the table, nested A/D, rights.
 */
import { describe, expect, it } from 'vitest'
import {
  ACC_FETCH,
  ACC_READ,
  ACC_WRITE,
  type AccessKind,
  EXIT_NPF,
  HI_XD,
  NPF_HI_FINAL,
  NPF_HI_GUEST_PT,
  PTE_A,
  PTE_D,
  PTE_P,
  PTE_PS,
  PTE_RW,
  PTE_US,
} from './bits.ts'
import {
  CR0_PE,
  CR0_PG,
  CR0_WP,
  CR4_PAE,
  CR4_SMEP,
  type CpuFeatures,
  CpuState,
  EFER_LMA,
  EFER_LME,
  EFER_NXE,
  makeFeatures,
  PagingContext,
} from './cpu-state.ts'
import { HwConfigError } from './errors.ts'
import { NptTranslator } from './npt.ts'
import { PageTableBuilder } from './page-table-builder.ts'
import { FrameAllocator, PhysMem } from './phys-mem.ts'
import { walk } from './walk.ts'
import { WALK_EXIT, WALK_OK, WalkResult } from './walk-result.ts'

const GIB = 2 ** 30
const OFFSET = GIB
const NPT_TABLE = PTE_P | PTE_RW | PTE_US | PTE_A
const NPT_LEAF = PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D
/** Below 2^39, so the guest PML4 index is 0 and the first guest page-table access is at guest CR3 (as in svm_npt.c). */
const LA = 0x1234567000 + 0x120
/** Data GPA in its own 2 MiB region (guest tables are at GPA 0x10000+ under NPT PDE 0). */
const DATA_GPA = 0x600000 + 0x120
const MAGIC = 0x0badcafe

interface Env {
  host: PhysMem
  features: CpuFeatures
  npt: NptTranslator
  nb: PageTableBuilder
  state: CpuState
  ctx: PagingContext
  res: WalkResult
  cr3: number
}

interface Opts {
  hostNxe?: boolean
  hostSmep?: boolean
  guestNxe?: boolean
  guestSmep?: boolean
  guestLeafLo?: number
  features?: Partial<CpuFeatures>
  levels?: 4 | 5
}

/** Guest tables are built in a guest-physical image and copied to host memory at GPA + 1 GiB; NPT maps [0, 8 MiB) with 4 KiB pages. */
function setup(o: Opts = {}): Env {
  const features = makeFeatures({ vendor: 'amd', ...o.features })
  const host = new PhysMem({ sizeBytes: 4 * GIB, name: 'host' })
  const img = new PhysMem({ sizeBytes: 64 * 2 ** 20, name: 'guest' })
  const galloc = new FrameAllocator(img, 16, 64)
  const gpt = new PageTableBuilder(galloc, { levels: 4, format: 'x86' })
  gpt.map({
    va: LA - 0x120,
    pa: DATA_GPA - 0x120,
    leafLo: o.guestLeafLo ?? (PTE_P | PTE_RW | PTE_A | PTE_D),
    tableLo: PTE_P | PTE_RW | PTE_US | PTE_A,
  })
  for (let f = 16; f < 16 + galloc.stats().totalAllocs; f++) {
    for (let w = 0; w < 4096; w += 4) host.write32(f * 4096 + w + OFFSET, img.read32(f * 4096 + w))
  }
  host.write32(DATA_GPA + OFFSET, MAGIC)
  const nb = new PageTableBuilder(new FrameAllocator(host, (2 * GIB) / 4096, 4096), { levels: o.levels ?? 4, format: 'x86' })
  for (let g = 0; g < 8 * 2 ** 20; g += 4096) nb.map({ va: g, pa: g + OFFSET, leafLo: NPT_LEAF, tableLo: NPT_TABLE })
  const npt = new NptTranslator(host, features, {
    ncr3: nb.root,
    levels: o.levels ?? 4,
    hostNxe: o.hostNxe ?? true,
    hostSmep: o.hostSmep ?? false,
  })
  const state = new CpuState()
  state.cr0 = CR0_PG | CR0_PE | CR0_WP
  state.cr4 = CR4_PAE | ((o.guestSmep ?? false) ? CR4_SMEP : 0)
  state.efer = EFER_LME | EFER_LMA | ((o.guestNxe ?? true) ? EFER_NXE : 0)
  state.cr3 = gpt.root
  const ctx = new PagingContext(features)
  ctx.update(state)
  return { host, features, npt, nb, state, ctx, res: new WalkResult(), cr3: gpt.root }
}

function access(env: Env, op: AccessKind): number {
  return walk(env.host, env.ctx, env.state, LA, op, false, env.npt, env.res)
}

/** Host-physical address of the NPT entry at `level` for `gpa`. */
function nptEntry(env: Env, gpa: number, level: number): number {
  let table = env.nb.root
  for (let l = env.nb.levels; l > level; l--) {
    const ea = table + PageTableBuilder.index(gpa, l) * 8
    table = (env.host.read32(ea) & 0xfffff000) >>> 0
  }
  return table + PageTableBuilder.index(gpa, level) * 8
}

function setBits(env: Env, ea: number, orLo: number, andLo = 0xffffffff, orHi = 0): void {
  env.host.write64(ea, ((env.host.read32(ea) & andLo) | orLo) >>> 0, (env.host.read32(ea + 4) | orHi) >>> 0)
}

function expectNpf(env: Env, st: number, hi: number, lo: number, gpa: number, label = ''): void {
  expect(st, label).toBe(WALK_EXIT)
  expect(env.res.status, label).toBe(WALK_EXIT)
  expect(env.res.exitReason, label).toBe(EXIT_NPF)
  expect(env.res.exitInfo1Hi, label).toBe(hi)
  expect(env.res.exitInfo1Lo, label).toBe(lo)
  expect(env.res.exitGpa, label).toBe(gpa)
}

describe('NPT EXITINFO1/EXITINFO2 (x86-hw.md §7.6, svm_npt.c)', () => {
  it('sanity: the unmodified mapping works (24 refs) and reads the marker', () => {
    const env = setup()
    expect(access(env, ACC_READ)).toBe(WALK_OK)
    expect(env.res.memRefs).toBe(24)
    expect(env.res.pa).toBe(DATA_GPA + OFFSET)
    expect(env.host.read32(env.res.pa)).toBe(MAGIC)
  })

  it('npt_np: guest read, final NPT PTE not present → 0x1_0000_0004', () => {
    const env = setup()
    setBits(env, nptEntry(env, DATA_GPA, 1), 0, ~PTE_P)
    expectNpf(env, access(env, ACC_READ), NPF_HI_FINAL, 0x4, DATA_GPA)
    expect(env.res.exitInfo1Hi * 2 ** 32 + env.res.exitInfo1Lo).toBe(0x100000004)
    expect(env.res.memRefs).toBe(24)
  })

  it('npt_us: guest read, final NPT PTE U/S=0 → 0x1_0000_0005 (every nested access is a user access)', () => {
    const env = setup()
    setBits(env, nptEntry(env, DATA_GPA, 1), 0, ~PTE_US)
    expectNpf(env, access(env, ACC_READ), NPF_HI_FINAL, 0x5, DATA_GPA)
    // U/S=0 in a non-leaf NPT entry counts too.
    const env2 = setup()
    setBits(env2, nptEntry(env2, DATA_GPA, 2), 0, ~PTE_US)
    expectNpf(env2, access(env2, ACC_READ), NPF_HI_FINAL, 0x5, DATA_GPA)
  })

  it('npt_rw / npt_rw_l1mmio: guest write, final NPT PTE R/W=0 → 0x1_0000_0007; the read before it succeeds', () => {
    const env = setup()
    setBits(env, nptEntry(env, DATA_GPA, 1), 0, ~PTE_RW)
    expect(access(env, ACC_READ)).toBe(WALK_OK)
    expect(env.res.hostW).toBe(0)
    expect(env.res.hostX).toBe(1)
    expectNpf(env, access(env, ACC_WRITE), NPF_HI_FINAL, 0x7, DATA_GPA)
  })

  it('npt_nx: guest fetch, final NPT PTE NX=1 with host NXE=1 and guest EFER.NX=0 → 0x1_0000_0015', () => {
    const env = setup({ hostNxe: true, guestNxe: false })
    setBits(env, nptEntry(env, DATA_GPA, 1), 0, 0xffffffff, HI_XD)
    expectNpf(env, access(env, ACC_FETCH), NPF_HI_FINAL, 0x15, DATA_GPA)
    // Reads of the same page are fine, but the combined translation is not executable.
    expect(access(env, ACC_READ)).toBe(WALK_OK)
    expect(env.res.hostX).toBe(0)
  })

  it('npt_rw_pfwalk: NPT PTE of the guest CR3 page R/W=0 → 0x2_0000_0007, EXITINFO2 = guest CR3, for read, write and fetch', () => {
    for (const op of [ACC_READ, ACC_WRITE, ACC_FETCH] as const) {
      const env = setup()
      setBits(env, nptEntry(env, env.cr3, 1), 0, ~PTE_RW)
      expectNpf(env, access(env, op), NPF_HI_GUEST_PT, 0x7, env.cr3, `op ${String(op)}`)
      expect(env.res.exitInfo1Hi * 2 ** 32 + env.res.exitInfo1Lo).toBe(0x200000007)
      expect(env.res.memRefs).toBe(4)
    }
  })

  // svm_npt_rsvd_bits_test: every combination of host NX, host SMEP, guest NX, guest SMEP.
  const COMBOS = Array.from({ length: 16 }, (_, i) => ({
    hostNxe: (i & 1) !== 0,
    hostSmep: (i & 2) !== 0,
    guestNxe: (i & 4) !== 0,
    guestSmep: (i & 8) !== 0,
  }))
  const comboName = (c: (typeof COMBOS)[number]): string =>
    `host.NX=${String(+c.hostNxe)} host.SMEP=${String(+c.hostSmep)} guest.NX=${String(+c.guestNxe)} guest.SMEP=${String(+c.guestSmep)}`

  it('reserved bit in the final NPT PTE (guest fetch) → 0x1_0000_000D, +0x10 if host NXE or host SMEP', () => {
    for (const c of COMBOS) {
      const env = setup(c)
      // Host NX=0: the NX bit itself is the reserved bit; otherwise a bit in 51:MAXPHYADDR (bit 47 for M = 46).
      setBits(env, nptEntry(env, DATA_GPA, 1), 0, 0xffffffff, c.hostNxe ? 1 << (47 - 32) : HI_XD)
      const lo = 0xd | (c.hostNxe || c.hostSmep ? 0x10 : 0)
      expectNpf(env, access(env, ACC_FETCH), NPF_HI_FINAL, lo, DATA_GPA, comboName(c))
    }
  })

  it('reserved bits in the final NPT PDE (PS + bits 20:13) → 0x1_0000_000D(+0x10)', () => {
    for (const c of COMBOS) {
      const env = setup(c)
      const ea = nptEntry(env, DATA_GPA, 2)
      if (c.hostNxe) setBits(env, ea, PTE_PS | (0x5a << 13))
      else setBits(env, ea, 0, 0xffffffff, HI_XD)
      const lo = 0xd | (c.hostNxe || c.hostSmep ? 0x10 : 0)
      expectNpf(env, access(env, ACC_FETCH), NPF_HI_FINAL, lo, DATA_GPA, comboName(c))
    }
  })

  it('reserved bits in an NPT PDPE (PS + bits 29:13) or PML4E (bit 8, AMD) used by the guest walk → 0x2_0000_000F', () => {
    for (const level of [3, 4]) {
      for (const c of COMBOS) {
        const env = setup(c)
        const ea = nptEntry(env, DATA_GPA, level)
        if (!c.hostNxe) setBits(env, ea, 0, 0xffffffff, HI_XD)
        else if (level === 3) setBits(env, ea, PTE_PS | (0x1234 << 13))
        else setBits(env, ea, 1 << 8)
        expectNpf(env, access(env, ACC_FETCH), NPF_HI_GUEST_PT, 0xf, env.cr3, `level ${String(level)} ${comboName(c)}`)
      }
    }
  })

  it('PML4E bit 8 is not reserved on Intel-vendor feature sets; PDPE PS without 1 GiB pages is reserved', () => {
    const intel = setup({ features: { vendor: 'intel' } })
    setBits(intel, nptEntry(intel, DATA_GPA, 4), 1 << 8)
    expect(access(intel, ACC_READ)).toBe(WALK_OK)
    const no1g = setup({ features: { gbPages: false } })
    setBits(no1g, nptEntry(no1g, DATA_GPA, 3), PTE_PS)
    expectNpf(no1g, access(no1g, ACC_READ), NPF_HI_GUEST_PT, 0xf, no1g.cr3)
  })

  it('guest page-table accesses need NPT write permission; U/S=0 on a guest-table page faults as a user write', () => {
    const env = setup()
    const pdGpa = env.host.read32(env.cr3 + OFFSET) & 0xfffff000 // guest PML4E → PDPT page
    setBits(env, nptEntry(env, pdGpa, 1), 0, ~PTE_US)
    expectNpf(env, access(env, ACC_READ), NPF_HI_GUEST_PT, 0x7, pdGpa + PageTableBuilder.index(LA, 3) * 8)
    expect(env.res.exitGla).toBe(LA)
  })
})

describe('NPT accessed and dirty flags', () => {
  it('guest-table pages get nested D (their accesses are writes); the data leaf gets D only on a guest write', () => {
    const env = setup()
    // Clear A/D everywhere on the paths.
    const paths = [env.cr3, DATA_GPA - 0x120]
    for (const g of paths) for (let l = 1; l <= 4; l++) setBits(env, nptEntry(env, g, l), 0, ~(PTE_A | PTE_D))
    expect(access(env, ACC_READ)).toBe(WALK_OK)
    for (let l = 4; l >= 1; l--) {
      expect(env.host.read32(nptEntry(env, env.cr3, l)) & (PTE_A | PTE_D)).toBe(l === 1 ? PTE_A | PTE_D : PTE_A)
      expect(env.host.read32(nptEntry(env, DATA_GPA, l)) & (PTE_A | PTE_D)).toBe(PTE_A)
    }
    expect(access(env, ACC_WRITE)).toBe(WALK_OK)
    expect(env.host.read32(nptEntry(env, DATA_GPA, 1)) & (PTE_A | PTE_D)).toBe(PTE_A | PTE_D)
  })

  it('no leaf A/D on a fault', () => {
    const env = setup()
    const ea = nptEntry(env, DATA_GPA, 1)
    setBits(env, ea, 0, ~(PTE_A | PTE_D | PTE_RW))
    expect(access(env, ACC_WRITE)).toBe(WALK_EXIT)
    expect(env.host.read32(ea) & (PTE_A | PTE_D)).toBe(0)
  })

  it('5-level NPT: 4-level guest = 29 references', () => {
    const env = setup({ levels: 5 })
    expect(access(env, ACC_READ)).toBe(WALK_OK)
    expect(env.res.memRefs).toBe(29)
    expect(env.host.read32(env.res.pa)).toBe(MAGIC)
  })
})

describe('NptTranslator configuration errors', () => {
  const host = new PhysMem({ sizeBytes: 2 ** 24 })
  it('rejects bad levels, an nCR3 above MAXPHYADDR, and host NXE without NX', () => {
    const f = makeFeatures()
    expect(() => new NptTranslator(host, f, { ncr3: 0x1000, levels: 3 as 4, hostNxe: true })).toThrow(HwConfigError)
    expect(() => new NptTranslator(host, f, { ncr3: 2 ** 46, levels: 4, hostNxe: true })).toThrow(HwConfigError)
    expect(() => new NptTranslator(host, makeFeatures({ nx: false }), { ncr3: 0x1000, levels: 4, hostNxe: true })).toThrow(HwConfigError)
    const n = new NptTranslator(host, f, { ncr3: 0x1fff, levels: 4, hostNxe: false })
    expect(n.root).toBe(0x1000)
    expect(n.ptAccessIsWrite).toBe(true)
  })
})
