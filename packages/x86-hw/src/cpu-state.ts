import { HI_XD, PFERR_P, PFERR_PK } from './bits.ts'
import { HwConfigError } from './errors.ts'

// ---- control-register bits ----
export const CR0_PE = 1 << 0
export const CR0_WP = 1 << 16
export const CR0_PG = 0x80000000
export const CR4_PSE = 1 << 4
export const CR4_PAE = 1 << 5
export const CR4_PGE = 1 << 7
export const CR4_LA57 = 1 << 12
export const CR4_PCIDE = 1 << 17
export const CR4_SMEP = 1 << 20
export const CR4_SMAP = 1 << 21
export const CR4_PKE = 1 << 22
export const CR4_PKS = 1 << 24
export const EFER_LME = 1 << 8
export const EFER_LMA = 1 << 10
export const EFER_NXE = 1 << 11

/** Paging modes (SDM 4.1.1). 32-bit and PAE are reserved in the API for later. */
export const PAGING_NONE = 0
export const PAGING_32 = 1
export const PAGING_PAE = 2
export const PAGING_4L = 3
export const PAGING_5L = 4
export type PagingMode = 0 | 1 | 2 | 3 | 4

/** What the modelled CPU supports (CPUID). */
export interface CpuFeatures {
  /** CPUID.80000008H:EAX[7:0], 36..52. @default 46 */
  maxPhyAddr: number
  /** 5-level paging (CR4.LA57). @default true */
  la57: boolean
  /** 1 GiB pages (CPUID.80000001H:EDX[26]); without it PS in a PDPTE is a reserved bit. @default true */
  gbPages: boolean
  /** XD / EFER.NXE. @default true */
  nx: boolean
  smep: boolean
  smap: boolean
  /** Protection keys for user pages (CR4.PKE). @default true */
  pku: boolean
  /** Protection keys for supervisor pages (CR4.PKS). @default false */
  pks: boolean
  pcid: boolean
  invpcid: boolean
  /** Vendor: AMD reserves bit 8 of non-leaf PML4E/PDPTEs (KVM's reserved masks). @default 'intel' */
  vendor: 'intel' | 'amd'
  /** EPT execute-only translations (IA32_VMX_EPT_VPID_CAP bit 0). @default true */
  eptExecOnly: boolean
  /** EPT 2 MiB / 1 GiB pages. @default true */
  ept2M: boolean
  ept1G: boolean
  /** Set A on non-leaf entries as the walk descends (hardware), or only after a successful walk (KVM's software walker). @default true */
  nonLeafAOnDescent: boolean
}

/** Defaults: a modern Intel server core. */
export const DEFAULT_FEATURES: Readonly<CpuFeatures> = Object.freeze({
  maxPhyAddr: 46,
  la57: true,
  gbPages: true,
  nx: true,
  smep: true,
  smap: true,
  pku: true,
  pks: false,
  pcid: true,
  invpcid: true,
  vendor: 'intel',
  eptExecOnly: true,
  ept2M: true,
  ept1G: true,
  nonLeafAOnDescent: true,
})

const VENDORS = ['intel', 'amd'] as const

/** Validate and complete a partial feature set; throws {@link HwConfigError} with what was expected. */
export function makeFeatures(partial: Partial<CpuFeatures> = {}): CpuFeatures {
  const f: CpuFeatures = { ...DEFAULT_FEATURES, ...partial }
  if (!Number.isInteger(f.maxPhyAddr) || f.maxPhyAddr < 36 || f.maxPhyAddr > 52) {
    throw new HwConfigError(`maxPhyAddr must be an integer from 36 to 52 (CPUID.80000008H:EAX[7:0]); got ${String(f.maxPhyAddr)}`)
  }
  if (!(VENDORS as readonly string[]).includes(f.vendor)) {
    throw new HwConfigError(`vendor must be 'intel' or 'amd'; got ${f.vendor}`)
  }
  return f
}

/**
 * Architectural state of one logical processor that paging depends on. CR3 is a number: its
 * physical-base bits M-1:12 and, with CR4.PCIDE, the PCID in bits 11:0. The MOV-to-CR3 no-flush
 * hint (bit 63 of the source operand) is never stored; it is an argument of the instruction.
 */
export class CpuState {
  cr0 = CR0_PE
  cr3 = 0
  cr4 = 0
  efer = 0
  cpl = 0
  /** RFLAGS.AC (SMAP override for explicit supervisor accesses). */
  ac = false
  pkru = 0
  /** IA32_PKRS. */
  pkrs = 0
  /** CR2: the linear address of the last #PF delivered. */
  cr2 = 0
}

/** Current paging mode from CR0/CR4/EFER (SDM table 4-1). */
export function pagingMode(s: CpuState): PagingMode {
  if ((s.cr0 & CR0_PG) === 0) return PAGING_NONE
  if ((s.cr4 & CR4_PAE) === 0) return PAGING_32
  if ((s.efer & EFER_LMA) === 0) return PAGING_PAE
  return (s.cr4 & CR4_LA57) !== 0 ? PAGING_5L : PAGING_4L
}

const TWO32 = 4294967296

/**
 * Everything a walk needs that depends only on features and control registers, precomputed when
 * they change (as KVM precomputes its `rsvd_bits_mask` and permission bitmaps in
 * `reset_guest_paging_metadata()`), so the walk itself is a few loads and masks.
 */
export class PagingContext {
  readonly features: CpuFeatures
  mode: PagingMode = PAGING_NONE
  levels = 0
  /** Physical base of the top-level table. */
  root = 0
  pcid = 0
  /** Mask of address bits 51:32 (in the high half) below MAXPHYADDR. */
  hiAddrMask = 0
  /** Reserved bits of present entries, by level (1..5): non-leaf and large-leaf forms, lo and hi halves. */
  readonly rsvdLo = new Uint32Array(6)
  readonly rsvdHi = new Uint32Array(6)
  readonly rsvdLargeLo = new Uint32Array(6)
  readonly rsvdHiLarge = new Uint32Array(6)
  /** Levels at which PS=1 makes a leaf (bit per level). */
  largeLevels = 0
  nxe = false
  wp = false
  smep = false
  smap = false
  pke = false
  pks = false
  pge = false
  pcide = false
  /** Canonical range: [-canonLimit, canonLimit). */
  canonLimit = 0
  /** Bumped on every recompute, so caches of derived data can tell they are stale. */
  generation = 0
  /** Protection keys apply to some access (CR4.PKE or CR4.PKS): {@link perm} is not the whole decision. */
  keys = false
  /**
   * KVM's `update_permission_bitmask()`: {@link rightsFault} without protection keys, tabulated.
   * Index {@link permIndex}(kind, user, SMAP override); bit `rw | us << 1 | xd << 2` (the TLBF_RW,
   * TLBF_US, TLBF_XD bits of a TLB entry) is 1 when that combination of effective rights faults.
   * Recomputed by {@link update}; AC and CPL are inputs of the index, so STAC/CLAC need no update.
   */
  readonly perm = new Uint8Array(12)
  /**
   * Whether the walk sets A on each non-leaf entry as it descends (hardware: `features
   * .nonLeafAOnDescent`); off for a KVM-style software walker, which sets A/D after the walk.
   */
  readonly aOnDescent: boolean

  /**
   * `options.nonLeafAOnDescent` overrides the feature for this context only (a software walker
   * over the same CPU): the features object itself is shared, not copied, so every context of a
   * CPU has one hidden class for the walk to read.
   */
  constructor(features: CpuFeatures, options?: { nonLeafAOnDescent?: boolean }) {
    this.features = features
    this.aOnDescent = options?.nonLeafAOnDescent ?? features.nonLeafAOnDescent
  }

  /** Recompute from the state (call after any CR0/CR3/CR4/EFER change). */
  update(s: CpuState): void {
    const f = this.features
    this.generation++
    const mode = pagingMode(s)
    this.mode = mode
    this.levels = mode === PAGING_5L ? 5 : mode === PAGING_4L ? 4 : mode === PAGING_PAE ? 3 : mode === PAGING_32 ? 2 : 0
    const m = f.maxPhyAddr
    this.hiAddrMask = m > 32 ? (m >= 52 ? 0xfffff : (1 << (m - 32)) - 1) : 0
    this.root = Math.floor(s.cr3 / 4096) * 4096
    // CR3 bits 63:M are reserved (MOV faults); the model keeps only what fits.
    this.root = (this.root % TWO32) + (Math.floor(this.root / TWO32) & this.hiAddrMask) * TWO32
    this.pcide = (s.cr4 & CR4_PCIDE) !== 0 && mode >= PAGING_4L
    this.pcid = this.pcide ? s.cr3 % 4096 : 0
    this.nxe = (s.efer & EFER_NXE) !== 0 && f.nx
    this.wp = (s.cr0 & CR0_WP) !== 0
    this.smep = (s.cr4 & CR4_SMEP) !== 0
    this.smap = (s.cr4 & CR4_SMAP) !== 0
    this.pke = (s.cr4 & CR4_PKE) !== 0 && mode >= PAGING_4L
    this.pks = (s.cr4 & CR4_PKS) !== 0 && mode >= PAGING_4L
    this.pge = (s.cr4 & CR4_PGE) !== 0
    this.canonLimit = mode === PAGING_5L ? 2 ** 56 : 2 ** 47
    this.keys = this.pke || this.pks
    this.updatePermissionBitmask()
    // Reserved-bit masks for 4/5-level paging (x86-hw.md §2.4; KVM __reset_rsvds_bits_mask).
    const highRsvd = (~this.hiAddrMask & HI_ADDR_BITS) >>> 0 // bits 51:M
    const xd = this.nxe ? 0 : HI_XD
    const amdBit8 = f.vendor === 'amd' ? 1 << 8 : 0
    this.rsvdLo.fill(0)
    this.rsvdHi.fill(0)
    this.rsvdLargeLo.fill(0)
    this.rsvdHiLarge.fill(0)
    this.largeLevels = 0
    if (mode >= PAGING_4L) {
      for (let level = 1; level <= 5; level++) {
        this.rsvdHi[level] = (highRsvd | xd) >>> 0
        this.rsvdHiLarge[level] = (highRsvd | xd) >>> 0
      }
      // PML5E / PML4E: PS reserved, AMD bit 8.
      this.rsvdLo[5] = (1 << 7) | amdBit8
      this.rsvdLo[4] = (1 << 7) | amdBit8
      // PDPTE -> PD: AMD bit 8; 1 GiB leaf: bits 29:13.
      this.rsvdLo[3] = amdBit8
      if (f.gbPages) {
        this.largeLevels |= 1 << 3
        this.rsvdLargeLo[3] = 0x3fffe000
      } else {
        this.rsvdLo[3] |= 1 << 7
      }
      // PDE 2 MiB leaf: bits 20:13.
      this.largeLevels |= 1 << 2
      this.rsvdLargeLo[2] = 0x001fe000
    }
  }

  /** Fill {@link perm} from {@link rightsFault} itself (with PKRU = PKRS = 0 no key ever faults). */
  private updatePermissionBitmask(): void {
    const st = PERM_STATE
    for (let kind = 0; kind <= 2; kind++) {
      for (let user = 0; user <= 1; user++) {
        for (let override = 0; override <= 1; override++) {
          st.ac = override === 1
          let bits = 0
          for (let r = 0; r < 8; r++) {
            if (rightsFault(this, st, kind, user === 1, false, r & 1, (r >>> 1) & 1, (r >>> 2) & 1, 0) !== 0) bits |= 1 << r
          }
          this.perm[permIndex(kind, user === 1, override === 1)] = bits
        }
      }
    }
  }
}

/** Scratch state for {@link PagingContext.updatePermissionBitmask}: only AC is varied. */
const PERM_STATE = new CpuState()

/**
 * Index of {@link PagingContext.perm} for an access of `kind` (ACC_*), by a user-mode access
 * (`user`: CPL 3 and not implicit), with the SMAP override (`override`: RFLAGS.AC set and not an
 * implicit supervisor access).
 */
export function permIndex(kind: number, user: boolean, override: boolean): number {
  return (kind << 2) | (user ? 2 : 0) | (override ? 1 : 0)
}

const HI_ADDR_BITS = 0x000fffff

/**
 * The access-rights decision of SDM 4.6 for a completed translation (x86-hw.md §3.3), applied at
 * use time so WP/SMEP/SMAP/AC/PKRU changes need no flush. Returns 0 if allowed, else PFERR_P plus
 * PFERR_PK when a protection key forbids it. The caller adds the W/U/I bits that describe the access.
 *
 * Models KVM's permission_fault() / update_permission_bitmask() / update_pkru_bitmask().
 */
export function rightsFault(
  ctx: PagingContext,
  state: CpuState,
  kind: number,
  user: boolean,
  implicit: boolean,
  rw: number,
  us: number,
  xd: number,
  pkey: number,
): number {
  let f: boolean
  if (kind === 2) {
    if (user) f = us === 0
    else f = ctx.smep && us !== 0
    if (xd !== 0 && ctx.nxe) f = true
    return f ? PFERR_P : 0
  }
  const smapBlocks = ctx.smap && us !== 0 && !user && (implicit || !state.ac)
  if (kind === 0) {
    f = user ? us === 0 : smapBlocks
  } else {
    if (user) f = us === 0 || rw === 0
    else f = smapBlocks || (ctx.wp && rw === 0)
  }
  // Protection keys: user-mode addresses with PKE; supervisor-mode addresses with PKS.
  let pkFault = false
  if (us !== 0 ? ctx.pke : ctx.pks && !user) {
    const reg = us !== 0 ? state.pkru : state.pkrs
    const ad = (reg >>> (pkey * 2)) & 1
    const wd = (reg >>> (pkey * 2 + 1)) & 1
    if (ad !== 0 || (kind === 1 && wd !== 0 && (user || ctx.wp))) pkFault = true
  }
  if (pkFault) return PFERR_P | PFERR_PK
  return f ? PFERR_P : 0
}
