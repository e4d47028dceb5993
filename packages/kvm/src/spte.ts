/**
 * The SPTE format both MMUs share (arch/x86/kvm/mmu/spte.h, spte.c), over the two 32-bit halves
 * of a 64-bit entry: `lo` = bits 31:0, `hi` = bits 63:32 (bit n ≥ 32 is `hi` bit n − 32). No BigInt.
 *
 * An MMU builds SPTEs in the hardware format it drives: the **x86** (IA-32e) format for shadow
 * paging and NPT, the **EPT** format for EPT. The format-dependent masks (`shadow_*_mask` set by
 * `kvm_mmu_reset_all_pte_masks` / `kvm_mmu_set_ept_masks`) live in a {@link SpteFormat}.
 *
 * Allocation-free pattern: every function that produces an SPTE writes it into a caller-owned
 * {@link Spte64} `out` (first argument) and returns that same object. A caller keeps one scratch
 * object per thread of control and reads `out.lo` / `out.hi` right away. Values in `out` are
 * always unsigned (`>>> 0`). Predicates take (lo, hi) and allocate nothing.
 */
import { MmusimError } from '@mmusim/x86-hw'
import { DEBUG } from './debug.ts'

/** A 64-bit SPTE as two unsigned 32-bit halves; the `out` parameter of every builder. */
export interface Spte64 {
  lo: number
  hi: number
}

/** A fresh scratch {@link Spte64} (allocate once, reuse). */
export function newSpte64(): Spte64 {
  return { lo: 0, hi: 0 }
}

const TWO20 = 0x100000
const TWO32 = 4294967296

// ---- architectural bits KVM uses by name (arch/x86/kvm/mmu/mmu.h, asm/vmx.h) ----

/** `PT_PRESENT_MASK` (bit 0). */
export const PT_PRESENT_MASK = 1 << 0
/** `PT_WRITABLE_MASK` (bit 1) — also EPT W, so "writable" is bit 1 in both formats. */
export const PT_WRITABLE_MASK = 1 << 1
/** `PT_USER_MASK` (bit 2). */
export const PT_USER_MASK = 1 << 2
/** `PT_ACCESSED_MASK` (bit 5). */
export const PT_ACCESSED_MASK = 1 << 5
/** `PT_DIRTY_MASK` (bit 6). */
export const PT_DIRTY_MASK = 1 << 6
/** `PT_PAGE_SIZE_MASK` (bit 7), also EPT "ignore PAT"/large page bit 7. */
export const PT_PAGE_SIZE_MASK = 1 << 7
/** `PT64_NX_MASK` (bit 63), in `hi`. */
export const PT64_NX_MASK_HI = 0x80000000
/** `VMX_EPT_READABLE_MASK` (bit 0). */
export const VMX_EPT_READABLE_MASK = 1 << 0
/** `VMX_EPT_WRITABLE_MASK` (bit 1). */
export const VMX_EPT_WRITABLE_MASK = 1 << 1
/** `VMX_EPT_EXECUTABLE_MASK` (bit 2). */
export const VMX_EPT_EXECUTABLE_MASK = 1 << 2
/** `VMX_EPT_RWX_MASK`. */
export const VMX_EPT_RWX_MASK = 7
/** `VMX_EPT_MISCONFIG_WX_VALUE`: RWX = 110b is an EPT misconfiguration (KVM's EPT MMIO value). */
export const VMX_EPT_MISCONFIG_WX_VALUE = 6
/** `VMX_EPT_MT_EPTE_SHIFT` (memory type, bits 5:3). */
export const VMX_EPT_MT_EPTE_SHIFT = 3
/** `VMX_EPT_IPAT_BIT` (bit 6). */
export const VMX_EPT_IPAT_BIT = 1 << 6
/** `VMX_EPT_ACCESS_BIT` (bit 8). */
export const VMX_EPT_ACCESS_BIT = 1 << 8
/** `VMX_EPT_DIRTY_BIT` (bit 9). */
export const VMX_EPT_DIRTY_BIT = 1 << 9
/** `VMX_EPT_SUPPRESS_VE_BIT` (bit 63), in `hi`. */
export const VMX_EPT_SUPPRESS_VE_BIT_HI = 0x80000000
/** `MTRR_TYPE_WRBACK`. */
export const MTRR_TYPE_WRBACK = 6

// ---- spte.h software bits ----

/** `SPTE_MMU_PRESENT_MASK` = BIT_ULL(11): set on every shadow-present SPTE (spte.h). */
export const SPTE_MMU_PRESENT_MASK = 1 << 11
/** `SPTE_TDP_AD_SHIFT` = 52: A/D type, bits 53:52. */
export const SPTE_TDP_AD_SHIFT = 52
/** `SPTE_TDP_AD_MASK` (3 << 52), in `hi`. */
export const SPTE_TDP_AD_MASK_HI = 3 << (SPTE_TDP_AD_SHIFT - 32)
/** `SPTE_TDP_AD_ENABLED` (0 << 52): must be 0 (bits 62:52 are reserved in PAE/NPT-PAE). */
export const SPTE_TDP_AD_ENABLED_HI = 0
/** `SPTE_TDP_AD_DISABLED` (1 << 52), in `hi`: access tracking by clearing RWX. */
export const SPTE_TDP_AD_DISABLED_HI = 1 << (SPTE_TDP_AD_SHIFT - 32)
/** `SPTE_TDP_AD_WRPROT_ONLY` (2 << 52), in `hi`: dirty tracking by write protection (PML for L2). */
export const SPTE_TDP_AD_WRPROT_ONLY_HI = 2 << (SPTE_TDP_AD_SHIFT - 32)
/** `SHADOW_ACC_TRACK_SAVED_BITS_MASK` = R | X (EPT bits 0 and 2). */
export const SHADOW_ACC_TRACK_SAVED_BITS_MASK = VMX_EPT_READABLE_MASK | VMX_EPT_EXECUTABLE_MASK
/** `SHADOW_ACC_TRACK_SAVED_BITS_SHIFT` = 54: saved R → bit 54, saved X → bit 56. */
export const SHADOW_ACC_TRACK_SAVED_BITS_SHIFT = 54
const ACC_SAVED_HI_SHIFT = SHADOW_ACC_TRACK_SAVED_BITS_SHIFT - 32
/** The saved-bits field in `hi` (bits 54 and 56). */
export const SHADOW_ACC_TRACK_SAVED_MASK_HI = SHADOW_ACC_TRACK_SAVED_BITS_MASK << ACC_SAVED_HI_SHIFT
/** `DEFAULT_SPTE_HOST_WRITABLE` = BIT_ULL(9) (non-EPT formats; bits 9/10 are ignored by hardware). */
export const DEFAULT_SPTE_HOST_WRITABLE = 1 << 9
/** `DEFAULT_SPTE_MMU_WRITABLE` = BIT_ULL(10). */
export const DEFAULT_SPTE_MMU_WRITABLE = 1 << 10
/** `EPT_SPTE_HOST_WRITABLE` = BIT_ULL(57), in `hi`. */
export const EPT_SPTE_HOST_WRITABLE_HI = 1 << (57 - 32)
/** `EPT_SPTE_MMU_WRITABLE` = BIT_ULL(58), in `hi`. */
export const EPT_SPTE_MMU_WRITABLE_HI = 1 << (58 - 32)
/** `SPTE_BASE_ADDR_MASK` bits 51:12, low half. */
export const SPTE_BASE_ADDR_MASK_LO = 0xfffff000
/** `SPTE_BASE_ADDR_MASK` bits 51:12, high half. */
export const SPTE_BASE_ADDR_MASK_HI = 0x000fffff

/** `MMIO_SPTE_GEN_LOW_START` / `_END`: generation bits 0-7 → SPTE bits 3-10. */
export const MMIO_SPTE_GEN_LOW_START = 3
export const MMIO_SPTE_GEN_LOW_END = 10
/** `MMIO_SPTE_GEN_HIGH_START` / `_END`: generation bits 8-18 → SPTE bits 52-62. */
export const MMIO_SPTE_GEN_HIGH_START = 52
export const MMIO_SPTE_GEN_HIGH_END = 62
/** `MMIO_SPTE_GEN_LOW_BITS` (8) and `MMIO_SPTE_GEN_HIGH_BITS` (11). */
export const MMIO_SPTE_GEN_LOW_BITS = MMIO_SPTE_GEN_LOW_END - MMIO_SPTE_GEN_LOW_START + 1
export const MMIO_SPTE_GEN_HIGH_BITS = MMIO_SPTE_GEN_HIGH_END - MMIO_SPTE_GEN_HIGH_START + 1
/** `MMIO_SPTE_GEN_LOW_MASK` (bits 10:3), low half. */
export const MMIO_SPTE_GEN_LOW_MASK = 0xff << MMIO_SPTE_GEN_LOW_START
/** `MMIO_SPTE_GEN_HIGH_MASK` (bits 62:52), high half. */
export const MMIO_SPTE_GEN_HIGH_MASK_HI = (0x7ff << (MMIO_SPTE_GEN_HIGH_START - 32)) >>> 0
/** `MMIO_SPTE_GEN_MASK`: the 19 generation bits an MMIO SPTE keeps. */
export const MMIO_SPTE_GEN_MASK = (1 << (MMIO_SPTE_GEN_LOW_BITS + MMIO_SPTE_GEN_HIGH_BITS)) - 1
/** `SHADOW_NONPRESENT_VALUE` = BIT_ULL(63) on 64-bit hosts (EPT suppress-#VE), in `hi`; low half 0. */
export const SHADOW_NONPRESENT_VALUE_HI = 0x80000000
/** `FROZEN_SPTE` = SHADOW_NONPRESENT_VALUE | 0x5a0 (bits 5, 7, 8, 10): low half. */
export const FROZEN_SPTE_LO = 0x5a0
/** `FROZEN_SPTE`: high half. */
export const FROZEN_SPTE_HI = SHADOW_NONPRESENT_VALUE_HI

/** `ACC_EXEC_MASK`, `ACC_WRITE_MASK`, `ACC_USER_MASK`, `ACC_ALL` (spte.h). */
export const ACC_EXEC_MASK = 1
export const ACC_WRITE_MASK = PT_WRITABLE_MASK
export const ACC_USER_MASK = PT_USER_MASK
export const ACC_ALL = ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK

// ---- formats ----

/** Which hardware format an MMU builds. */
export type SpteFormatKind = 'ept' | 'x86'

/**
 * The `shadow_*` masks of one hardware format (spte.c globals), split into halves. Build with
 * {@link makeSpteFormat}; {@link EPT_SPTE_FORMAT} and {@link X86_SPTE_FORMAT} are the defaults.
 */
export interface SpteFormat {
  readonly kind: SpteFormatKind
  /** `kvm_ad_enabled`: hardware A/D bits are used (always true for x86; EPT may lack them). */
  readonly adEnabled: boolean
  /** Host MAXPHYADDR (`kvm_host.maxphyaddr`); bounds MMIO gfns and picks the x86 MMIO marker. */
  readonly maxPhyAddr: number
  /** `shadow_present_mask`. */
  readonly presentLo: number
  readonly presentHi: number
  /** `shadow_user_mask` (EPT: the R bit — for EPT, "user" means readable). */
  readonly userLo: number
  /** `shadow_x_mask` (EPT X bit; 0 for x86). */
  readonly xLo: number
  /** `shadow_nx_mask` in `hi` (x86 bit 63; 0 for EPT). */
  readonly nxHi: number
  /** `shadow_accessed_mask`. */
  readonly accessedLo: number
  /** `shadow_dirty_mask`. */
  readonly dirtyLo: number
  /** `shadow_host_writable_mask`. */
  readonly hostWritableLo: number
  readonly hostWritableHi: number
  /** `shadow_mmu_writable_mask`. */
  readonly mmuWritableLo: number
  readonly mmuWritableHi: number
  /** `shadow_acc_track_mask` (EPT RWX; 0 for x86, which always has A/D). */
  readonly accTrackLo: number
  /** `enable_mmio_caching` for this format. */
  readonly mmioEnabled: boolean
  /** `shadow_mmio_value`. */
  readonly mmioValueLo: number
  readonly mmioValueHi: number
  /** `shadow_mmio_mask`. */
  readonly mmioMaskLo: number
  readonly mmioMaskHi: number
  /** `shadow_mmio_access_mask` (ACC_WRITE|ACC_USER for x86, 0 for EPT). */
  readonly mmioAccessMask: number
  /** `shadow_nonpresent_or_rsvd_lower_gfn_mask` (bits maxPhyAddr-1:12), the MMIO SPTE's gpa field. */
  readonly mmioGpaMaskLo: number
  readonly mmioGpaMaskHi: number
  /** Memory-type bits `get_mt_mask` adds to RAM SPTEs (EPT: WB | IPAT; x86: 0). */
  readonly memtypeLo: number
}

/** Options of {@link makeSpteFormat}. */
export interface SpteFormatOptions {
  /** EPT only: hardware A/D bits (`enable_ept_ad_bits`). @default true */
  adEnabled?: boolean
  /** EPT only: exec-only EPT entries supported (`cpu_has_vmx_ept_execute_only`) → R is not in present mask. @default true */
  execOnly?: boolean
  /** Host MAXPHYADDR. x86 MMIO caching needs < 52 (it uses reserved bit 51). @default 46 */
  maxPhyAddr?: number
  /** The `mmio_caching` module parameter. @default true */
  mmioCaching?: boolean
}

/**
 * Build the masks of a format: `kvm_mmu_set_ept_masks(has_ad_bits, has_exec_only)` for EPT,
 * `kvm_mmu_reset_all_pte_masks()` for x86 (no L1TF mitigation: the gfn of an MMIO SPTE is not
 * relocated; `shadow_me_*` = 0).
 */
export function makeSpteFormat(kind: SpteFormatKind, options: SpteFormatOptions = {}): SpteFormat {
  const maxPhyAddr = options.maxPhyAddr ?? 46
  if (!Number.isInteger(maxPhyAddr) || maxPhyAddr < 32 || maxPhyAddr > 52) {
    throw new MmusimError('SPTE_FORMAT_INVALID', `maxPhyAddr must be an integer in 32..52, got ${maxPhyAddr}`)
  }
  const mmioGpaMaskLo = SPTE_BASE_ADDR_MASK_LO
  const mmioGpaMaskHi = (2 ** (maxPhyAddr - 32) - 1) >>> 0
  const caching = options.mmioCaching ?? true
  if (kind === 'ept') {
    const adEnabled = options.adEnabled ?? true
    const execOnly = options.execOnly ?? true
    return {
      kind,
      adEnabled,
      maxPhyAddr,
      presentLo: execOnly ? 0 : VMX_EPT_READABLE_MASK,
      presentHi: VMX_EPT_SUPPRESS_VE_BIT_HI,
      userLo: VMX_EPT_READABLE_MASK,
      xLo: VMX_EPT_EXECUTABLE_MASK,
      nxHi: 0,
      // Newest spte.c sets the A/D masks even without hardware A/D; the SPTE's A/D type says whether they mean anything.
      accessedLo: VMX_EPT_ACCESS_BIT,
      dirtyLo: VMX_EPT_DIRTY_BIT,
      hostWritableLo: 0,
      hostWritableHi: EPT_SPTE_HOST_WRITABLE_HI,
      mmuWritableLo: 0,
      mmuWritableHi: EPT_SPTE_MMU_WRITABLE_HI,
      accTrackLo: VMX_EPT_RWX_MASK,
      mmioEnabled: caching,
      mmioValueLo: caching ? VMX_EPT_MISCONFIG_WX_VALUE : 0,
      mmioValueHi: 0,
      mmioMaskLo: VMX_EPT_RWX_MASK,
      mmioMaskHi: VMX_EPT_SUPPRESS_VE_BIT_HI,
      mmioAccessMask: 0,
      mmioGpaMaskLo,
      mmioGpaMaskHi,
      memtypeLo: (MTRR_TYPE_WRBACK << VMX_EPT_MT_EPTE_SHIFT) | VMX_EPT_IPAT_BIT,
    }
  }
  if (options.adEnabled === false) {
    throw new MmusimError('SPTE_FORMAT_INVALID', 'the x86 (shadow/NPT) format always has A/D bits; adEnabled: false is EPT-only')
  }
  // "Set a reserved PA bit in MMIO SPTEs": bit 51 | P, possible only if MAXPHYADDR < 52.
  const mmio = caching && maxPhyAddr < 52
  return {
    kind,
    adEnabled: true,
    maxPhyAddr,
    presentLo: PT_PRESENT_MASK,
    presentHi: 0,
    userLo: PT_USER_MASK,
    xLo: 0,
    nxHi: PT64_NX_MASK_HI,
    accessedLo: PT_ACCESSED_MASK,
    dirtyLo: PT_DIRTY_MASK,
    hostWritableLo: DEFAULT_SPTE_HOST_WRITABLE,
    hostWritableHi: 0,
    mmuWritableLo: DEFAULT_SPTE_MMU_WRITABLE,
    mmuWritableHi: 0,
    accTrackLo: 0,
    mmioEnabled: mmio,
    mmioValueLo: mmio ? PT_PRESENT_MASK : 0,
    mmioValueHi: mmio ? 1 << (51 - 32) : 0,
    mmioMaskLo: mmio ? PT_PRESENT_MASK : 0,
    mmioMaskHi: mmio ? 1 << (51 - 32) : 0,
    mmioAccessMask: ACC_WRITE_MASK | ACC_USER_MASK,
    mmioGpaMaskLo,
    mmioGpaMaskHi,
    memtypeLo: 0,
  }
}

/** EPT with A/D bits, exec-only support, MAXPHYADDR 46. */
export const EPT_SPTE_FORMAT: SpteFormat = makeSpteFormat('ept')
/** x86 (shadow paging / NPT) with MAXPHYADDR 46. */
export const X86_SPTE_FORMAT: SpteFormat = makeSpteFormat('x86')

// ---- predicates (spte.h) ----

/** `is_shadow_present_pte`: the MMU-present software bit 11. MMIO and frozen SPTEs are not present. */
export function isShadowPresentPte(lo: number): boolean {
  return (lo & SPTE_MMU_PRESENT_MASK) !== 0
}
/** `is_large_pte`: PS bit 7. */
export function isLargePte(lo: number): boolean {
  return (lo & PT_PAGE_SIZE_MASK) !== 0
}
/** `is_last_spte(pte, level)`: a 4K entry, or PS set. */
export function isLastSpte(lo: number, level: number): boolean {
  return level === 1 || (lo & PT_PAGE_SIZE_MASK) !== 0
}
/** `is_writable_pte`: hardware W (bit 1 in both formats). */
export function isWritablePte(lo: number): boolean {
  return (lo & PT_WRITABLE_MASK) !== 0
}
/** `is_mmu_writable_spte`. */
export function isMmuWritableSpte(fmt: SpteFormat, lo: number, hi: number): boolean {
  return ((lo & fmt.mmuWritableLo) | (hi & fmt.mmuWritableHi)) !== 0
}
/** Host-writable software bit (`spte & shadow_host_writable_mask`). */
export function isHostWritableSpte(fmt: SpteFormat, lo: number, hi: number): boolean {
  return ((lo & fmt.hostWritableLo) | (hi & fmt.hostWritableHi)) !== 0
}
/** `is_accessed_spte`. */
export function isAccessedSpte(fmt: SpteFormat, lo: number): boolean {
  return (lo & fmt.accessedLo) !== 0
}
/** `spte & shadow_dirty_mask`. */
export function isDirtySpte(fmt: SpteFormat, lo: number): boolean {
  return (lo & fmt.dirtyLo) !== 0
}
/** `is_executable_pte`: `(spte & (shadow_x_mask | shadow_nx_mask)) == shadow_x_mask`. */
export function isExecutablePte(fmt: SpteFormat, lo: number, hi: number): boolean {
  return (lo & fmt.xLo) === fmt.xLo && (hi & fmt.nxHi) === 0
}
/** `spte_ad_enabled`: A/D type is not SPTE_TDP_AD_DISABLED. */
export function spteAdEnabled(hi: number): boolean {
  return (hi & SPTE_TDP_AD_MASK_HI) !== SPTE_TDP_AD_DISABLED_HI
}
/** `spte_ad_need_write_protect`: A/D type is not SPTE_TDP_AD_ENABLED. */
export function spteAdNeedWriteProtect(hi: number): boolean {
  return (hi & SPTE_TDP_AD_MASK_HI) !== SPTE_TDP_AD_ENABLED_HI
}
/** `is_access_track_spte`: A/D disabled and all of `shadow_acc_track_mask` (RWX) clear. */
export function isAccessTrackSpte(fmt: SpteFormat, lo: number, hi: number): boolean {
  return !spteAdEnabled(hi) && (lo & fmt.accTrackLo) === 0
}
/** `spte_to_pfn`: bits 51:12. */
export function spteToPfn(lo: number, hi: number): number {
  return (lo >>> 12) + (hi & SPTE_BASE_ADDR_MASK_HI) * TWO20
}
/** `is_frozen_spte`: exactly FROZEN_SPTE (an equality test). */
export function isFrozenSpte(lo: number, hi: number): boolean {
  return lo >>> 0 === FROZEN_SPTE_LO && hi >>> 0 === FROZEN_SPTE_HI
}
/** `is_mmio_spte(kvm, spte)`: `(spte & shadow_mmio_mask) == shadow_mmio_value` and MMIO caching is on. */
export function isMmioSpte(fmt: SpteFormat, lo: number, hi: number): boolean {
  return fmt.mmioEnabled && (lo & fmt.mmioMaskLo) >>> 0 === fmt.mmioValueLo && (hi & fmt.mmioMaskHi) >>> 0 === fmt.mmioValueHi
}
/**
 * `leaf_spte_change_needs_tlb_flush(old, new)` (newest spte.h): flush iff MMU-writable is cleared.
 * Clearing A or D alone needs no flush.
 */
export function leafSpteChangeNeedsTlbFlush(fmt: SpteFormat, oldLo: number, oldHi: number, newLo: number, newHi: number): boolean {
  return isMmuWritableSpte(fmt, oldLo, oldHi) && !isMmuWritableSpte(fmt, newLo, newHi)
}
/**
 * `spte_needs_atomic_update` (spte.c): bits may change outside mmu_lock — MMU-writable but not
 * W (fast page fault may set W), A/D disabled (aging / fast PF), or W without D (the CPU sets D).
 */
export function spteNeedsAtomicUpdate(fmt: SpteFormat, lo: number, hi: number): boolean {
  if (!isWritablePte(lo) && isMmuWritableSpte(fmt, lo, hi)) return true
  if (!spteAdEnabled(hi)) return true
  return isWritablePte(lo) && (lo & fmt.dirtyLo) === 0
}

/**
 * `check_spte_writable_invariants`: W ⇒ MMU-writable ⇒ Host-writable. Returns a message for a
 * violation, or null.
 */
export function spteWritableInvariantViolation(fmt: SpteFormat, lo: number, hi: number): string | null {
  if (isMmuWritableSpte(fmt, lo, hi)) {
    if (!isHostWritableSpte(fmt, lo, hi)) return `MMU-writable SPTE is not Host-writable: ${hex64(lo, hi)}`
  } else if (isWritablePte(lo)) return `Writable SPTE is not MMU-writable: ${hex64(lo, hi)}`
  return null
}

// ---- builders (spte.c) ----

/** Parameters of {@link makeSpte}; the caller has already decided every bit (`make_spte`'s policy is the MMU's). */
export interface MakeSpteParams {
  /** Host physical address of the page (4K-aligned; a huge page's aligned base). */
  hpa: number
  /** Level of the SPTE: 1 = 4K, 2 = 2M, 3 = 1G. */
  level: number
  /** Hardware W (`PT_WRITABLE_MASK`). */
  writable: boolean
  /** User (x86 U/S; EPT: readable). */
  user: boolean
  /** Executable (EPT X; x86: NX clear). */
  exec: boolean
  /** Accessed: false = prefetched, i.e. created old (`mark_spte_for_access_track`). */
  accessed: boolean
  /** Dirty (`make_spte` sets it together with W). */
  dirty: boolean
  /** `host_writable` → `shadow_host_writable_mask`. */
  hostWritable: boolean
  /** `shadow_mmu_writable_mask` (not write-protected for shadowing / write tracking). */
  mmuWritable: boolean
  /** The shadow page has A/D bits (`!sp->role.ad_disabled`); false only for EPT. @default format.adEnabled */
  adEnabled?: boolean
  /** `SPTE_TDP_AD_WRPROT_ONLY` (`kvm_mmu_page_ad_need_write_protect`, PML for L2). @default false */
  adWrprotOnly?: boolean
  /** EPT memory type bits (`get_mt_mask`). @default format.memtypeLo (WB | IPAT) */
  memtypeLo?: number
}

function setAddr(out: Spte64, hpa: number): void {
  out.lo = (out.lo | (hpa & SPTE_BASE_ADDR_MASK_LO)) >>> 0
  out.hi = (out.hi | (Math.floor(hpa / TWO32) & SPTE_BASE_ADDR_MASK_HI)) >>> 0
}

/**
 * The bit assembly of `make_spte` (spte.c): MMU-present, A/D type, `shadow_present_mask`,
 * Accessed, X/NX, user, PS (level > 1), memory type, Host-writable, pfn, then W | MMU-writable |
 * Dirty as requested, and `mark_spte_for_access_track` when not accessed (prefetch). The policy
 * decisions (unsync check, NX huge pages, dirty-log marking) stay with the MMU. Checks the
 * writable invariant in debug builds.
 */
export function makeSpte(out: Spte64, fmt: SpteFormat, p: MakeSpteParams): Spte64 {
  const ad = p.adEnabled ?? fmt.adEnabled
  let lo = SPTE_MMU_PRESENT_MASK | fmt.presentLo
  let hi = fmt.presentHi
  if (!ad) {
    if (DEBUG && fmt.kind !== 'ept') {
      throw new MmusimError('SPTE_INVALID', 'A/D-disabled SPTEs exist only in the EPT format (legacy shadow paging always has A/D)')
    }
    hi |= SPTE_TDP_AD_DISABLED_HI
  } else if (p.adWrprotOnly === true) hi |= SPTE_TDP_AD_WRPROT_ONLY_HI
  if (p.accessed) lo |= fmt.accessedLo
  if (p.exec) lo |= fmt.xLo
  else hi |= fmt.nxHi
  if (p.user) lo |= fmt.userLo
  if (p.level > 1) lo |= PT_PAGE_SIZE_MASK
  lo |= p.memtypeLo ?? fmt.memtypeLo
  if (p.hostWritable) {
    lo |= fmt.hostWritableLo
    hi |= fmt.hostWritableHi
  }
  if (p.writable) lo |= PT_WRITABLE_MASK
  if (p.mmuWritable) {
    lo |= fmt.mmuWritableLo
    hi |= fmt.mmuWritableHi
  }
  if (p.dirty) lo |= fmt.dirtyLo
  out.lo = lo >>> 0
  out.hi = hi >>> 0
  setAddr(out, p.hpa)
  if (DEBUG) {
    const bad = spteWritableInvariantViolation(fmt, out.lo, out.hi)
    if (bad !== null) throw new MmusimError('SPTE_INVALID', `make_spte: ${bad} (W ⇒ MMU-writable ⇒ Host-writable)`)
  }
  if (!p.accessed) markSpteForAccessTrack(out, fmt, out.lo, out.hi)
  return out
}

/**
 * `make_nonleaf_spte(child_pt, ad_disabled)`: MMU-present | present | W | user | X | child
 * address, plus A (A/D enabled) or SPTE_TDP_AD_DISABLED. Non-leaf SPTEs never restrict access.
 */
export function makeNonLeafSpte(out: Spte64, fmt: SpteFormat, childHpa: number, adDisabled: boolean): Spte64 {
  let lo = SPTE_MMU_PRESENT_MASK | fmt.presentLo | PT_WRITABLE_MASK | fmt.userLo | fmt.xLo
  let hi = fmt.presentHi
  if (adDisabled) hi |= SPTE_TDP_AD_DISABLED_HI
  else lo |= fmt.accessedLo
  out.lo = lo >>> 0
  out.hi = hi >>> 0
  setAddr(out, childHpa)
  return out
}

/**
 * `make_small_spte(kvm, huge_spte, role, index)` (bit part): the `index`-th child of a huge SPTE
 * at `childLevel` — same bits, address + index · pages-per-child, PS cleared at 4K. (The NX
 * huge page "make executable again" step is the MMU's policy.)
 */
export function makeSmallSpte(out: Spte64, hugeLo: number, hugeHi: number, childLevel: number, index: number): Spte64 {
  const pages = 2 ** ((childLevel - 1) * 9)
  const addPfn = index * pages
  let lo = hugeLo >>> 0
  let hi = hugeHi >>> 0
  const pfn = spteToPfn(lo, hi) + addPfn
  lo = (lo & ~SPTE_BASE_ADDR_MASK_LO) | ((pfn & 0xfffff) << 12)
  hi = (hi & ~SPTE_BASE_ADDR_MASK_HI) | (Math.floor(pfn / TWO20) & SPTE_BASE_ADDR_MASK_HI)
  if (childLevel === 1) lo &= ~PT_PAGE_SIZE_MASK
  out.lo = lo >>> 0
  out.hi = hi >>> 0
  return out
}

/** `make_huge_spte(kvm, small_spte, level)` (bit part): set PS and clear the address bits below the huge page. */
export function makeHugeSpte(out: Spte64, smallLo: number, smallHi: number, level: number): Spte64 {
  const pages = 2 ** ((level - 1) * 9)
  const pfn = spteToPfn(smallLo, smallHi)
  const base = pfn - (pfn % pages)
  const lo = ((smallLo | PT_PAGE_SIZE_MASK) & ~SPTE_BASE_ADDR_MASK_LO) | ((base & 0xfffff) << 12)
  const hi = (smallHi & ~SPTE_BASE_ADDR_MASK_HI) | (Math.floor(base / TWO20) & SPTE_BASE_ADDR_MASK_HI)
  out.lo = lo >>> 0
  out.hi = hi >>> 0
  return out
}

/**
 * `mark_spte_for_access_track(spte)`: A/D enabled → clear Accessed. Else (already tracked → as
 * is) save R and X at bits 54/56 and clear RWX and Accessed, making the SPTE non-present to
 * hardware while still MMU-present.
 */
export function markSpteForAccessTrack(out: Spte64, fmt: SpteFormat, lo: number, hi: number): Spte64 {
  lo >>>= 0
  hi >>>= 0
  if (spteAdEnabled(hi)) {
    out.lo = (lo & ~fmt.accessedLo) >>> 0
    out.hi = hi
    return out
  }
  if (isAccessTrackSpte(fmt, lo, hi)) {
    out.lo = lo
    out.hi = hi
    return out
  }
  if (DEBUG && (hi & SHADOW_ACC_TRACK_SAVED_MASK_HI) !== 0) {
    throw new MmusimError('SPTE_INVALID', `Access Tracking saved bit locations are not zero: ${hex64(lo, hi)}`)
  }
  out.hi = (hi | ((lo & SHADOW_ACC_TRACK_SAVED_BITS_MASK) << ACC_SAVED_HI_SHIFT)) >>> 0
  out.lo = (lo & ~(fmt.accTrackLo | fmt.accessedLo)) >>> 0
  return out
}

/** `restore_acc_track_spte(spte)`: move the saved R/X back, clear the saved field. */
export function restoreAccTrackSpte(out: Spte64, fmt: SpteFormat, lo: number, hi: number): Spte64 {
  const saved = (hi >>> ACC_SAVED_HI_SHIFT) & SHADOW_ACC_TRACK_SAVED_BITS_MASK
  out.lo = ((lo & ~fmt.accTrackLo) | saved) >>> 0
  out.hi = (hi & ~SHADOW_ACC_TRACK_SAVED_MASK_HI) >>> 0
  return out
}

// ---- MMIO SPTEs ----

/** `generation_mmio_spte_mask(gen)` into `out` (gen must fit MMIO_SPTE_GEN_MASK). */
function setMmioGen(out: Spte64, gen: number): void {
  out.lo = (out.lo | ((gen << MMIO_SPTE_GEN_LOW_START) & MMIO_SPTE_GEN_LOW_MASK)) >>> 0
  out.hi = (out.hi | (((gen >>> MMIO_SPTE_GEN_LOW_BITS) << (MMIO_SPTE_GEN_HIGH_START - 32)) & MMIO_SPTE_GEN_HIGH_MASK_HI)) >>> 0
}

/**
 * `make_mmio_spte(vcpu, gfn, access)`: generation (memslot generation & MMIO_SPTE_GEN_MASK, the
 * update-in-progress flag excluded) | `shadow_mmio_value` | (access & `shadow_mmio_access_mask`)
 * | gpa. The gfn must lie below 2^(MAXPHYADDR-12) (the MMU only caches MMIO for such gfns).
 */
export function makeMmioSpte(out: Spte64, fmt: SpteFormat, gfn: number, access: number, generation: number): Spte64 {
  if (DEBUG && (!Number.isSafeInteger(gfn) || gfn < 0 || gfn >= 2 ** (fmt.maxPhyAddr - 12))) {
    throw new MmusimError('SPTE_INVALID', `make_mmio_spte: gfn 0x${gfn.toString(16)} is beyond MAXPHYADDR ${fmt.maxPhyAddr}`)
  }
  out.lo = (fmt.mmioValueLo | (access & fmt.mmioAccessMask) | ((gfn & 0xfffff) << 12)) >>> 0
  out.hi = (fmt.mmioValueHi | Math.floor(gfn / TWO20)) >>> 0
  setMmioGen(out, generation & MMIO_SPTE_GEN_MASK)
  return out
}

/** `get_mmio_spte_generation(spte)`: the 19-bit generation from bits 10:3 and 62:52. */
export function getMmioSpteGeneration(lo: number, hi: number): number {
  return ((lo & MMIO_SPTE_GEN_LOW_MASK) >>> MMIO_SPTE_GEN_LOW_START) | (((hi & MMIO_SPTE_GEN_HIGH_MASK_HI) >>> (MMIO_SPTE_GEN_HIGH_START - 32)) << MMIO_SPTE_GEN_LOW_BITS)
}

/** `get_mmio_spte_gfn(spte)`: the gpa field (bits MAXPHYADDR-1:12) >> 12. */
export function getMmioSpteGfn(fmt: SpteFormat, lo: number, hi: number): number {
  return ((lo & fmt.mmioGpaMaskLo) >>> 12) + (hi & fmt.mmioGpaMaskHi) * TWO20
}

/** `get_mmio_spte_access(spte)`. */
export function getMmioSpteAccess(fmt: SpteFormat, lo: number): number {
  return lo & fmt.mmioAccessMask
}

/**
 * `check_mmio_spte(vcpu, spte)`: the MMIO SPTE is current iff no memslot update is in progress
 * and its generation equals the address space's generation & MMIO_SPTE_GEN_MASK.
 */
export function checkMmioSpte(lo: number, hi: number, memslotGeneration: number, updateInProgress: boolean): boolean {
  if (updateInProgress) return false
  return getMmioSpteGeneration(lo, hi) === memslotGeneration % (MMIO_SPTE_GEN_MASK + 1)
}

/**
 * The wrap test of `kvm_mmu_invalidate_mmio_sptes(kvm, gen)`: the MMIO generation (with the
 * address-space modifier stripped, `gen &= ~(nr_as_ids - 1)`) is 0 again → zap all SPTEs fast.
 */
export function mmioGenerationWrapped(generation: number, nrAsIds = 2): boolean {
  return ((generation % (MMIO_SPTE_GEN_MASK + 1)) & ~(nrAsIds - 1)) === 0
}

// ---- printing ----

function hex64(lo: number, hi: number): string {
  return '0x' + (hi >>> 0).toString(16).padStart(8, '0') + (lo >>> 0).toString(16).padStart(8, '0')
}

/**
 * A readable rendering for messages and debugging: the hex value and its decoded meaning in
 * `fmt` (frozen / MMIO / non-present / the present SPTE's pfn and flags).
 */
export function spteToString(lo: number, hi: number, fmt: SpteFormat = X86_SPTE_FORMAT): string {
  lo >>>= 0
  hi >>>= 0
  const h = hex64(lo, hi)
  if (isFrozenSpte(lo, hi)) return `${h} FROZEN`
  if (isMmioSpte(fmt, lo, hi)) {
    return `${h} MMIO gfn=0x${getMmioSpteGfn(fmt, lo, hi).toString(16)} gen=${getMmioSpteGeneration(lo, hi)} access=${getMmioSpteAccess(fmt, lo)}`
  }
  if (!isShadowPresentPte(lo)) return `${h} non-present`
  const f: string[] = [fmt.kind]
  if (isWritablePte(lo)) f.push('W')
  if (isMmuWritableSpte(fmt, lo, hi)) f.push('mmu-W')
  if (isHostWritableSpte(fmt, lo, hi)) f.push('host-W')
  if ((lo & fmt.userLo) !== 0) f.push(fmt.kind === 'ept' ? 'R' : 'U')
  if (isExecutablePte(fmt, lo, hi)) f.push('X')
  if (isLargePte(lo)) f.push('PS')
  const adType = (hi & SPTE_TDP_AD_MASK_HI) >>> (SPTE_TDP_AD_SHIFT - 32)
  if (adType === 1) f.push(isAccessTrackSpte(fmt, lo, hi) ? 'acc-tracked' : 'ad-disabled')
  else if (adType === 2) f.push('ad-wrprot-only')
  if (isAccessedSpte(fmt, lo)) f.push('A')
  if (isDirtySpte(fmt, lo)) f.push('D')
  return `${h} pfn=0x${spteToPfn(lo, hi).toString(16)} ${f.join(' ')}`
}
