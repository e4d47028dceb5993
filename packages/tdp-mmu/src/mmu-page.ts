/**
 * `struct kvm_mmu_page` as the TDP MMU uses it (arch/x86/kvm/mmu/mmu_internal.h, tdp-mmu.md §2.1):
 * the header of one 4 KiB page-table page, its role, the root refcount and root-list links.
 */
import type { Refcount } from '@mmusim/kvm'
import type { NestedTranslator } from '@mmusim/x86-hw'

/** `role.level` occupies the low 4 bits of the role word. */
export const ROLE_LEVEL_MASK = 0xf
/** `role.smm` (→ as_id). */
export const ROLE_SMM = 1 << 8
/** `role.ad_disabled`. */
export const ROLE_AD_DISABLED = 1 << 9
/** `role.guest_mode` (a root for L2; only reached through the prev-roots test API here). */
export const ROLE_GUEST_MODE = 1 << 10

/** `KVM_PAGES_PER_HPAGE(level)` for levels 0..6 (index 0 unused). */
export const PAGES_PER_LEVEL: readonly number[] = [0, 1, 512, 512 ** 2, 512 ** 3, 512 ** 4, 512 ** 5]

/** The role word of a direct TDP root / table. */
export function makeRoleWord(level: number, smm: boolean, adDisabled: boolean, guestMode: boolean): number {
  return level | (smm ? ROLE_SMM : 0) | (adDisabled ? ROLE_AD_DISABLED : 0) | (guestMode ? ROLE_GUEST_MODE : 0)
}

/** One TDP MMU page-table page (`struct kvm_mmu_page` with `tdp_mmu_page` set). */
export class KvmMmuPage {
  /** Host-physical address of the 512-entry table (`sp->spt`). */
  readonly hpa: number
  readonly frame: number
  /** `role.level`. */
  readonly level: number
  /** `sp->gfn`: base gfn covered by the table. */
  readonly gfn: number
  /** `role.word` without `invalid` (invalid is {@link invalid}). */
  readonly role: number
  /** `kvm_mmu_page_as_id(sp)` (from role.smm). */
  readonly asId: number
  /** `sp->ptep`: host-physical address of the parent SPTE, -1 for a root. */
  readonly ptep: number
  /** `role.invalid`: flips 0→1 under mmu_lock held for write, never back (I-R3). */
  invalid = false
  /** `tdp_mmu_scheduled_root_to_zap`: the gifted reference is still owed (I-R6). */
  scheduledToZap = false
  /** `nx_huge_page_disallowed`. */
  nxHugePageDisallowed = false
  /** On `possible_nx_huge_pages` (`possible_nx_huge_page_link` is linked). */
  onPossibleNxList = false
  /** `tdp_mmu_root_count` (roots only). */
  rootCount: Refcount | null = null
  /** The hardware walker of this root (EPTP / nCR3), roots only. */
  translator: NestedTranslator | null = null
  /** Root list (`link`): RCU list — a deleted node keeps `next`. */
  next: KvmMmuPage | null = null
  prev: KvmMmuPage | null = null
  onList = false
  /** Freed (after its RCU grace period). */
  freed = false
  /** Times kvm_tdp_mmu_zap_invalidated_roots zapped this root (seed 004: exactly once). */
  invalidatedZaps = 0

  constructor(hpa: number, level: number, gfn: number, role: number, asId: number, ptep: number) {
    this.hpa = hpa
    this.frame = hpa / 4096
    this.level = level
    this.gfn = gfn
    this.role = role
    this.asId = asId
    this.ptep = ptep
  }

  get isRoot(): boolean {
    return this.ptep < 0
  }

  /** `"root 0x…"` / `"sp 0x… L2 gfn 0x…"` for messages. */
  get label(): string {
    return `${this.isRoot ? 'root' : 'sp'} 0x${this.hpa.toString(16)} L${this.level} gfn 0x${this.gfn.toString(16)}`
  }
}
