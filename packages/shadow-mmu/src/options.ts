import { z } from 'zod'

/** Options common to both strategies (module parameters / VM ioctls of KVM). */
const common = {
  /** Allow level-1 shadow pages to go unsync (KVM always does; off = keep every shadowed gfn write-protected). */
  unsync: z.boolean().default(true),
  /** Prefetch neighbour PTEs on a fault (FNAME(pte_prefetch) / direct_pte_prefetch). */
  prefetch: z.boolean().default(true),
  /** KVM_SET_NR_MMU_PAGES at creation: 0 = automatic (max(64, memslot pages · 20/1000)). */
  pageQuota: z.number().int().min(0).default(0),
  /**
   * The unsync-walk variant: `mainline` clears parent bits with mmu_pages_clear_parents() while
   * syncing; `seed-003` removes it and leaves false-positive bits for the next walk.
   */
  unsyncWalk: z.enum(['mainline', 'seed-003']).default('mainline'),
  /** Run audit() at the end of every MMU operation and throw on a violation (tests). */
  auditEveryOp: z.boolean().default(false),
  /**
   * How a write fault on a write-protected shadowed gfn is reported. `write-protected` (≥6.12):
   * the fault path returns RET_PF_WRITE_PROTECTED and kvm_mmu_page_fault() decides between
   * unprotect-and-retry and emulation in kvm_mmu_write_protect_fault(). `emulate` (≤6.11): the
   * fault path returns RET_PF_EMULATE, and kvm_mmu_page_fault() unprotects the gfn and retries
   * every direct-MMU fault whose error code says "write to a guest page table"
   * (PFERR_NESTED_GUEST_PAGE), whether or not a shadow page was zapped.
   */
  writeProtectedFault: z.enum(['write-protected', 'emulate']).default('write-protected'),
  /**
   * A guest page table at a GPA no visible memslot backs (including a CR3 outside guest memory,
   * which gets the dummy root). `open-bus` (default): FNAME(walk_addr_generic) reads it as the
   * bus does on bare metal — all ones — so the walk fails with #PF(P|RSVD) exactly as on the
   * reference machine. `kvm`: KVM's own behaviour — `!kvm_is_visible_memslot(slot)` fails the
   * walk as not present, #PF with only the W/U/I bits.
   */
  unbackedGuestTables: z.enum(['open-bus', 'kvm']).default('open-bus'),
  /**
   * KVM_X86_QUIRK_SLOT_ZAP_ALL (on by default in KVM): deleting or moving a memslot zaps every
   * shadow page (kvm_mmu_zap_all_fast). Off (≥6.12, a VMM that disabled the quirk): only the
   * slot's leaf SPTEs and the shadow pages of its gfns go (kvm_mmu_zap_memslot), roots elsewhere
   * stay valid.
   */
  slotZapAll: z.boolean().default(true),
}

/** Options of the `shadow` strategy. */
export const shadowOptionsSchema = z.object(common).strict()
export type ShadowOptions = z.infer<typeof shadowOptionsSchema>

/** Options of the `legacy-tdp` strategy. */
export const legacyTdpOptionsSchema = z
  .object(common)
  .extend({
    /** EPT levels (kvm_mmu_get_tdp_level: 4, or 5 with LA57-capable EPT). */
    eptLevels: z.union([z.literal(4), z.literal(5)]).default(4),
    /** EPT A/D bits (`enable_ept_ad_bits`); without them SPTEs use access tracking. */
    eptAdBits: z.boolean().default(true),
    /** The lockless fast page fault path (fast_page_fault) for write-protected SPTEs. */
    fastPageFault: z.boolean().default(true),
  })
  .strict()
export type LegacyTdpOptions = z.infer<typeof legacyTdpOptionsSchema>

/** What the MMU core is built with (both strategies). */
export interface MmuConfig {
  name: string
  tdp: boolean
  unsync: boolean
  prefetch: boolean
  pageQuota: number
  unsyncWalk: 'mainline' | 'seed-003'
  auditEveryOp: boolean
  writeProtectedFault: 'write-protected' | 'emulate'
  unbackedGuestTables: 'open-bus' | 'kvm'
  slotZapAll: boolean
  eptLevels: 4 | 5
  eptAdBits: boolean
  fastPageFault: boolean
}

/**
 * The {@link MmuConfig} of a strategy instance, built field by field: one object literal, so
 * every VM's config has one hidden class. (An object spread of the parsed options gets a new
 * hidden class per VM once V8 stops caching the clone, and then every `config.x` the fault path
 * reads deoptimizes the compiled fault path, VM after VM.)
 */
export function makeMmuConfig(name: string, tdp: boolean, o: ShadowOptions & Partial<LegacyTdpOptions>): MmuConfig {
  return {
    name,
    tdp,
    unsync: o.unsync,
    prefetch: o.prefetch,
    pageQuota: o.pageQuota,
    unsyncWalk: o.unsyncWalk,
    auditEveryOp: o.auditEveryOp,
    writeProtectedFault: o.writeProtectedFault,
    unbackedGuestTables: o.unbackedGuestTables,
    slotZapAll: o.slotZapAll,
    eptLevels: o.eptLevels ?? 4,
    eptAdBits: o.eptAdBits ?? true,
    fastPageFault: o.fastPageFault ?? false,
  }
}
