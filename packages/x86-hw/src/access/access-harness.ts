import { ACC_FETCH as I_ACC_FETCH, ACC_READ as I_ACC_READ, ACC_WRITE as I_ACC_WRITE, type AccessKind } from '../bits.ts'
import {
  CR0_PE,
  CR0_PG,
  CR0_WP as I_CR0_WP,
  CR4_LA57,
  CR4_PAE,
  CR4_PKE as I_CR4_PKE,
  CR4_SMEP as I_CR4_SMEP,
  CpuState,
  EFER_LMA,
  EFER_LME,
  EFER_NXE as I_EFER_NXE,
  makeFeatures,
  PagingContext,
} from '../cpu-state.ts'
import { PhysMem } from '../phys-mem.ts'
import { WALK_OK as I_WALK_OK, WALK_PF as I_WALK_PF, WalkResult } from '../walk-result.ts'
import { walk as iWalk } from '../walk.ts'
import {
  AC_ACC_FETCH as I_AC_ACC_FETCH,
  AC_ACC_TWICE as I_AC_ACC_TWICE,
  AC_ACC_USER as I_AC_ACC_USER,
  AC_ACC_WRITE as I_AC_ACC_WRITE,
  AC_CPU_NXE as I_AC_CPU_NXE,
  AC_CPU_PKE as I_AC_CPU_PKE,
  AC_CPU_SMEP as I_AC_CPU_SMEP,
  AC_CPU_WP as I_AC_CPU_WP,
  AC_PDE_A as I_AC_PDE_A,
  AC_PDE_BIT13 as I_AC_PDE_BIT13,
  AC_PDE_BIT36 as I_AC_PDE_BIT36,
  AC_PDE_BIT51 as I_AC_PDE_BIT51,
  AC_PDE_D as I_AC_PDE_D,
  AC_PDE_NX as I_AC_PDE_NX,
  AC_PDE_P as I_AC_PDE_P,
  AC_PDE_PSE as I_AC_PDE_PSE,
  AC_PDE_U as I_AC_PDE_U,
  AC_PDE_W as I_AC_PDE_W,
  AC_PDPTE_RO as I_AC_PDPTE_RO,
  AC_PKU_AD as I_AC_PKU_AD,
  AC_PKU_PKEY as I_AC_PKU_PKEY,
  AC_PKU_WD as I_AC_PKU_WD,
  AC_PTE_A as I_AC_PTE_A,
  AC_PTE_BIT36 as I_AC_PTE_BIT36,
  AC_PTE_BIT51 as I_AC_PTE_BIT51,
  AC_PTE_D as I_AC_PTE_D,
  AC_PTE_NX as I_AC_PTE_NX,
  AC_PTE_P as I_AC_PTE_P,
  AC_PTE_U as I_AC_PTE_U,
  AC_PTE_W as I_AC_PTE_W,
  acFlagNames,
  acInvalidMask,
  acNext,
  type AcSmepRule,
} from './access-flags.ts'
import { AcExpectation, acExpect } from './access-oracle.ts'

// Module-local copies: imported bindings become getters under the test runner's module transform,
// which costs more than the rest of a case on this hot path.
const AC_ACC_FETCH = I_AC_ACC_FETCH
const AC_ACC_TWICE = I_AC_ACC_TWICE
const AC_ACC_USER = I_AC_ACC_USER
const AC_ACC_WRITE = I_AC_ACC_WRITE
const AC_CPU_NXE = I_AC_CPU_NXE
const AC_CPU_PKE = I_AC_CPU_PKE
const AC_CPU_SMEP = I_AC_CPU_SMEP
const AC_CPU_WP = I_AC_CPU_WP
const AC_PDE_A = I_AC_PDE_A
const AC_PDE_BIT13 = I_AC_PDE_BIT13
const AC_PDE_BIT36 = I_AC_PDE_BIT36
const AC_PDE_BIT51 = I_AC_PDE_BIT51
const AC_PDE_D = I_AC_PDE_D
const AC_PDE_NX = I_AC_PDE_NX
const AC_PDE_P = I_AC_PDE_P
const AC_PDE_PSE = I_AC_PDE_PSE
const AC_PDE_U = I_AC_PDE_U
const AC_PDE_W = I_AC_PDE_W
const AC_PDPTE_RO = I_AC_PDPTE_RO
const AC_PKU_AD = I_AC_PKU_AD
const AC_PKU_PKEY = I_AC_PKU_PKEY
const AC_PKU_WD = I_AC_PKU_WD
const AC_PTE_A = I_AC_PTE_A
const AC_PTE_BIT36 = I_AC_PTE_BIT36
const AC_PTE_BIT51 = I_AC_PTE_BIT51
const AC_PTE_D = I_AC_PTE_D
const AC_PTE_NX = I_AC_PTE_NX
const AC_PTE_P = I_AC_PTE_P
const AC_PTE_U = I_AC_PTE_U
const AC_PTE_W = I_AC_PTE_W
const ACC_FETCH = I_ACC_FETCH
const ACC_READ = I_ACC_READ
const ACC_WRITE = I_ACC_WRITE
const CR0_WP = I_CR0_WP
const CR4_PKE = I_CR4_PKE
const CR4_SMEP = I_CR4_SMEP
const EFER_NXE = I_EFER_NXE
const WALK_OK = I_WALK_OK
const WALK_PF = I_WALK_PF
const walk = iWalk

/** Physical address of the test's code/data page (access.c: 32 MiB). */
export const AC_CODE_DATA_PHYS = 32 * 1024 * 1024
/** Physical address of the pool of paging structures (access.c: 33 MiB). */
export const AC_PT_POOL_PHYS = 33 * 1024 * 1024
/** Physical address of the root table that the rest of the "kernel" uses (CR3). */
export const AC_ROOT_PHYS = 1024 * 1024
const MEM_BYTES = 64 * 1024 * 1024

// Entry bits (restated: the harness builds entries exactly as access.c does, independently of bits.ts).
const P = 0x1
const W = 0x2
const U = 0x4
const A = 0x20
const D = 0x40
const PS = 0x80
const BIT13 = 0x2000
const BIT21 = 0x200000
const HI_NX = 0x80000000
const HI_BIT51 = 1 << (51 - 32)
const HI_BIT36 = 1 << (36 - 32)
const HI_PKEY_SHIFT = 59 - 32

function f(flags: number, b: number): boolean {
  return ((flags >>> b) & 1) !== 0
}

/** Options of an {@link AcEnv}. */
export interface AcEnvOptions {
  /** 4- or 5-level paging. */
  levels: 4 | 5
  /** CPUID MAXPHYADDR. */
  maxPhyAddr: number
  /** CPU has PKU. @default true */
  pku?: boolean
  /** CPU has SMEP. @default true */
  smep?: boolean
  /** Walker A-bit policy for non-leaf entries (see CpuFeatures). @default true */
  nonLeafAOnDescent?: boolean
  /**
   * Enumerate the flags as if the CPU had this MAXPHYADDR while the walker uses `maxPhyAddr`
   * (a deliberate mismatch, to show the matrix detects a wrong walker). @default maxPhyAddr
   */
  flagsMaxPhyAddr?: number
}

/**
 * The environment of one access.c run (`ac_pt_env_t` plus the shadowed control registers): a
 * memory with the test's root table and pool of paging structures, a vCPU state and its paging
 * context, and one reused walk result.
 */
export class AcEnv {
  readonly mem: PhysMem
  readonly state = new CpuState()
  readonly ctx: PagingContext
  readonly res = new WalkResult()
  readonly levels: 4 | 5
  /** access.c's `invalid_mask` for this CPU (FEP always invalid). */
  readonly invalidMask: number
  private poolNext = 0
  private ctxStale = true

  constructor(options: AcEnvOptions) {
    const pku = options.pku ?? true
    const smep = options.smep ?? true
    this.levels = options.levels
    this.mem = new PhysMem({ sizeBytes: MEM_BYTES, name: 'access' })
    const features = makeFeatures({
      maxPhyAddr: options.maxPhyAddr,
      la57: options.levels === 5,
      pku,
      smep,
      nonLeafAOnDescent: options.nonLeafAOnDescent ?? true,
    })
    this.ctx = new PagingContext(features)
    this.invalidMask = acInvalidMask({ maxPhyAddr: options.flagsMaxPhyAddr ?? options.maxPhyAddr, pku, smep })
    const s = this.state
    s.cr0 = (CR0_PE | CR0_PG | CR0_WP) >>> 0
    s.cr4 = CR4_PAE | (options.levels === 5 ? CR4_LA57 : 0)
    s.efer = EFER_LME | EFER_LMA | EFER_NXE
    s.cr3 = AC_ROOT_PHYS
    s.cpl = 0
    // ac_test_run with PKU: CR4.PKE set and cleared again, which leaves PKRU = 0xfffffffc.
    if (pku) {
      this.setPke(true)
      this.setPke(false)
    }
    this.sync()
  }

  /** access.c `ac_env_int`: start allocating paging structures from the beginning of the pool. */
  resetPool(): void {
    this.poolNext = 0
  }

  /** access.c `ac_test_alloc_pt`: a zeroed paging structure from the pool. */
  allocPt(): number {
    if (this.poolNext >= 4 * (this.levels - 1)) throw new RangeError('access: paging-structure pool exhausted')
    const pa = AC_PT_POOL_PHYS + this.poolNext * 4096
    this.poolNext++
    this.mem.zeroFrame(pa / 4096)
    return pa
  }

  /** Set or clear CR0.WP (takes effect at the next {@link sync}). */
  setWp(on: boolean): void {
    const v = (on ? this.state.cr0 | CR0_WP : this.state.cr0 & ~CR0_WP) >>> 0
    if (v !== this.state.cr0) {
      this.state.cr0 = v
      this.ctxStale = true
    }
  }

  /** Set or clear EFER.NXE (takes effect at the next {@link sync}). */
  setNxe(on: boolean): void {
    const v = on ? this.state.efer | EFER_NXE : this.state.efer & ~EFER_NXE
    if (v !== this.state.efer) {
      this.state.efer = v
      this.ctxStale = true
    }
  }

  /** access.c `set_cr4_pke`: clearing PKE first loads PKRU = 0xfffffffc (keys must then have no effect). */
  setPke(on: boolean): void {
    const v = on ? this.state.cr4 | CR4_PKE : this.state.cr4 & ~CR4_PKE
    if (v === this.state.cr4) return
    if (!on) this.state.pkru = 0xfffffffc
    this.state.cr4 = v
    this.ctxStale = true
  }

  /** Set or clear CR4.SMEP (takes effect at the next {@link sync}); unlike access.c, no code pages to re-protect. */
  setSmep(on: boolean): void {
    const v = on ? this.state.cr4 | CR4_SMEP : this.state.cr4 & ~CR4_SMEP
    if (v !== this.state.cr4) {
      this.state.cr4 = v
      this.ctxStale = true
    }
  }

  /** Recompute the paging context after control-register changes (what MOV to CR / WRMSR does). */
  sync(): void {
    if (this.ctxStale) {
      this.ctx.update(this.state)
      this.ctxStale = false
    }
  }
}

/** Index of a linear address (signed number form) at `level` 1..5, as access.c's PT_INDEX. */
export function acIndex(virt: number, level: number): number {
  return Number((BigInt.asUintN(64, BigInt(virt)) >> BigInt(12 + (level - 1) * 9)) & 511n)
}

/**
 * One access.c test address (`ac_test_t`): its paging structures, flags, and expectations.
 * Methods mirror access.c's `__ac_test_init`, `ac_test_setup_ptes`, `__ac_set_expected_status`
 * and `ac_test_do_access`.
 */
export class AcTest {
  flags = 0
  virt = 0
  /** PT_INDEX of `virt` per level (1-based). */
  readonly idx = new Int32Array(6)
  /** The table each level's entry points to (1-based; [i] is referenced by the level-i entry). */
  readonly pageTables = new Float64Array(6)
  /** Physical address of the 4 KiB PTE, or -1 when the PDE is a 2 MiB leaf. */
  ptePa = -1
  pdePa = -1
  expPteLo = 0
  expPteHi = 0
  expPdeLo = 0
  expPdeHi = 0
  readonly exp = new AcExpectation()
  /** Description of the last failure of {@link doAccess}. */
  failure = ''

  /** access.c `__ac_test_init`: fresh tables, shared with `buddy` at every level whose index matches. */
  init(env: AcEnv, virt: number, buddy?: AcTest): this {
    env.setNxe(true)
    env.setWp(true)
    this.flags = 0
    this.virt = virt
    for (let l = 1; l <= env.levels; l++) this.idx[l] = acIndex(virt, l)
    this.pageTables[0] = -1
    this.pageTables[1] = -1
    // Zap the top-level entry (it may be left over from a previous sub-test).
    env.mem.write64(AC_ROOT_PHYS + this.idx[env.levels]! * 8, 0, 0)
    for (let l = env.levels; l > 1; l--) {
      if (buddy !== undefined && buddy.idx[l] === this.idx[l]) this.pageTables[l] = buddy.pageTables[l]!
      else this.pageTables[l] = env.allocPt()
    }
    return this
  }

  /** access.c `ac_get_pt`: the link to pageTables[level], keeping the entry's current A/D bits. */
  private linkLo(level: number, curLo: number, curHi: number): number {
    const want = this.pageTables[level]!
    if ((curLo | curHi) !== 0 && (curLo & PS) === 0 && ((curLo & 0xfffff000) >>> 0) + (curHi & 0xf) * 4294967296 !== want) {
      throw new Error(`access: PT collision at level ${level} of 0x${BigInt.asUintN(64, BigInt(this.virt)).toString(16)}`)
    }
    return (want | (curLo & (A | D))) >>> 0
  }

  /** access.c `ac_test_setup_ptes`: write the entries for `this.flags`, then compute the expectations. */
  setupPtes(env: AcEnv): void {
    const flags = this.flags
    const mem = env.mem
    const pse = f(flags, AC_PDE_PSE)
    const pkeyHi = f(flags, AC_PKU_PKEY) ? 1 << HI_PKEY_SHIFT : 0
    let table = AC_ROOT_PHYS
    this.ptePa = -1
    for (let i: number = env.levels; i >= 1 && (i >= 2 || !pse); i--) {
      const ea = table + this.idx[i]! * 8
      const curLo = mem.read32(ea)
      const curHi = mem.read32(ea + 4)
      let lo: number
      let hi = 0
      if (i >= 3) {
        lo = this.linkLo(i, curLo, curHi) | P | U
        if (i > 3 || !f(flags, AC_PDPTE_RO)) lo |= W
      } else if (i === 2) {
        if (!pse) {
          lo = this.linkLo(i, curLo, curHi)
          // The protection key of a non-leaf entry is ignored (key 2 has AD=WD=1).
          if (pkeyHi !== 0) hi |= 2 << HI_PKEY_SHIFT
        } else {
          lo = (AC_CODE_DATA_PHYS & ~BIT21) | PS
          hi |= pkeyHi
        }
        if (f(flags, AC_PDE_P)) lo |= P
        if (f(flags, AC_PDE_W)) lo |= W
        if (f(flags, AC_PDE_U)) lo |= U
        if (f(flags, AC_PDE_A)) lo |= A
        if (f(flags, AC_PDE_D)) lo |= D
        if (f(flags, AC_PDE_NX)) hi |= HI_NX
        if (f(flags, AC_PDE_BIT51)) hi |= HI_BIT51
        if (f(flags, AC_PDE_BIT36)) hi |= HI_BIT36
        if (f(flags, AC_PDE_BIT13)) lo |= BIT13
        this.pdePa = ea
      } else {
        lo = AC_CODE_DATA_PHYS
        hi |= pkeyHi
        if (f(flags, AC_PTE_P)) lo |= P
        if (f(flags, AC_PTE_W)) lo |= W
        if (f(flags, AC_PTE_U)) lo |= U
        if (f(flags, AC_PTE_A)) lo |= A
        if (f(flags, AC_PTE_D)) lo |= D
        if (f(flags, AC_PTE_NX)) hi |= HI_NX
        if (f(flags, AC_PTE_BIT51)) hi |= HI_BIT51
        if (f(flags, AC_PTE_BIT36)) hi |= HI_BIT36
        this.ptePa = ea
      }
      lo >>>= 0
      hi >>>= 0
      if (lo !== curLo || hi !== curHi) mem.write64(ea, lo, hi)
      table = i >= 2 ? this.pageTables[i]! : 0
    }
    this.setExpected(env)
  }

  /** access.c `__ac_set_expected_status`: snapshot the entries and compute the expectation of {@link flags}. */
  setExpected(env: AcEnv): void {
    const mem = env.mem
    acExpect(this.flags, this.exp)
    if (this.ptePa >= 0) {
      this.expPteLo = (mem.read32(this.ptePa) | this.exp.pteSet) >>> 0
      this.expPteHi = mem.read32(this.ptePa + 4)
    }
    this.expPdeLo = (mem.read32(this.pdePa) | this.exp.pdeSet) >>> 0
    this.expPdeHi = mem.read32(this.pdePa + 4)
  }

  /**
   * access.c `ac_test_do_access`: load the control state of the flags, do the access (after a
   * supervisor read with TWICE), and check it as access.c does — fault or not, the exact error
   * code, the whole PTE, the PDE except ignored bits. Also checks (beyond access.c) that a fault
   * reports CR2 = the address and that a completed access reaches the test page.
   * Returns true on success; otherwise {@link failure} describes the first mismatch.
   */
  doAccess(env: AcEnv): boolean {
    const flags = this.flags
    const state = env.state
    env.setWp(f(flags, AC_CPU_WP))
    env.setNxe(f(flags, AC_CPU_NXE))
    env.setPke(f(flags, AC_CPU_PKE))
    if (f(flags, AC_CPU_PKE)) state.pkru = 0x30 | (f(flags, AC_PKU_WD) ? 8 : 0) | (f(flags, AC_PKU_AD) ? 4 : 0)
    env.setSmep(f(flags, AC_CPU_SMEP))
    env.sync()
    const res = env.res
    if (f(flags, AC_ACC_TWICE)) {
      state.cpl = 0
      walk(env.mem, env.ctx, state, this.virt, ACC_READ, false, null, res)
    }
    state.cpl = f(flags, AC_ACC_USER) ? 3 : 0
    const kind: AccessKind = f(flags, AC_ACC_FETCH) ? ACC_FETCH : f(flags, AC_ACC_WRITE) ? ACC_WRITE : ACC_READ
    const st = walk(env.mem, env.ctx, state, this.virt, kind, false, null, res)
    const fault = st === WALK_PF
    const exp = this.exp
    if (st !== WALK_OK && st !== WALK_PF) return this.fail(`unexpected walk status ${st}`)
    if (fault && !exp.fault) return this.fail(`unexpected fault (error code 0x${res.errorCode.toString(16)})`)
    if (!fault && exp.fault) return this.fail(`unexpected access (expected error code 0x${exp.error.toString(16)})`)
    if (fault && res.errorCode !== exp.error) {
      return this.fail(`error code 0x${res.errorCode.toString(16)} expected 0x${exp.error.toString(16)}`)
    }
    const mem = env.mem
    if (this.ptePa >= 0) {
      const lo = mem.read32(this.ptePa)
      const hi = mem.read32(this.ptePa + 4)
      if (lo !== this.expPteLo || hi !== this.expPteHi) {
        return this.fail(`pte ${hex(lo, hi)} expected ${hex(this.expPteLo, this.expPteHi)}`)
      }
    }
    const pLo = mem.read32(this.pdePa)
    const pHi = mem.read32(this.pdePa + 4)
    const ign = ~exp.pdeIgnore
    if ((pLo & ign) !== (this.expPdeLo & ign) || pHi !== this.expPdeHi) {
      return this.fail(`pde ${hex(pLo, pHi)} expected ${hex(this.expPdeLo, this.expPdeHi)} (ignoring 0x${exp.pdeIgnore.toString(16)})`)
    }
    // Beyond access.c: CR2 and the final physical address.
    if (fault) {
      if (res.cr2 !== this.virt) return this.fail(`[extra] cr2 ${res.cr2} expected ${this.virt}`)
    } else {
      const size = this.ptePa >= 0 ? 4096 : 2 * 1024 * 1024
      const want = AC_CODE_DATA_PHYS + (((this.virt % size) + size) % size)
      if (res.pa !== want) return this.fail(`[extra] pa 0x${res.pa.toString(16)} expected 0x${want.toString(16)}`)
    }
    return true
  }

  private fail(what: string): false {
    this.failure = `test ${acFlagNames(this.flags)}: FAIL: ${what}`
    return false
  }
}

function hex(lo: number, hi: number): string {
  return '0x' + (hi >>> 0).toString(16) + (lo >>> 0).toString(16).padStart(8, '0')
}

/** The address access.c's main loop tests. */
export const AC_MAIN_VIRT = Number(BigInt.asIntN(64, 0xffff923400000000n))

/** Options of {@link acRunMatrix}. */
export interface AcRunOptions {
  /** SMEP legality rule (see {@link AcSmepRule}). @default 'current' */
  smepRule?: AcSmepRule
  /** Decide per legal case (in enumeration order, `n` counting from 0) whether to run it; default all. */
  select?: (flags: number, n: number) => boolean
  /** Stop collecting failure messages after this many. @default 20 */
  maxFailures?: number
}

/** Result of {@link acRunMatrix}. */
export interface AcRunResult {
  /** Legal cases enumerated (what access.c would run). */
  legal: number
  /** Cases actually executed (after `select`). */
  executed: number
  failed: number
  /** The first failures, decoded. */
  failures: string[]
}

/**
 * access.c's main loop (`ac_test_run`): the test address at 0xffff923400000000, then every legal
 * flag combination in counter order, each set up on top of the entries the previous one left (so
 * A/D bits of the upper levels and of a non-leaf PDE carry over exactly as on hardware).
 */
export function acRunMatrix(env: AcEnv, options: AcRunOptions = {}): AcRunResult {
  const smepRule = options.smepRule ?? 'current'
  const select = options.select
  const maxFailures = options.maxFailures ?? 20
  env.resetPool()
  const at = new AcTest().init(env, AC_MAIN_VIRT)
  const out: AcRunResult = { legal: 0, executed: 0, failed: 0, failures: [] }
  for (let flags = 0; flags >= 0; flags = acNext(flags, env.invalidMask, smepRule)) {
    const n = out.legal++
    if (select !== undefined && !select(flags, n)) continue
    out.executed++
    at.flags = flags
    at.setupPtes(env)
    if (!at.doAccess(env)) {
      out.failed++
      if (out.failures.length < maxFailures) out.failures.push(at.failure)
    }
  }
  return out
}

/**
 * A deterministic case selector for samples: keeps each legal case with probability `1/every`,
 * drawn from a 32-bit PRNG (mulberry32) seeded with `seed`. Same seed, same cases.
 */
export function acSampler(seed: number, every: number): (flags: number, n: number) => boolean {
  let s = seed >>> 0
  const limit = Math.floor(4294967296 / every)
  return () => {
    s = (s + 0x6d2b79f5) >>> 0
    let t = s
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) < limit
  }
}
