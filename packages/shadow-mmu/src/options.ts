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
}

/** Options of the `shadow` strategy. */
export const shadowOptionsSchema = z.object({ ...common }).strict()
export type ShadowOptions = z.infer<typeof shadowOptionsSchema>

/** Options of the `legacy-tdp` strategy. */
export const legacyTdpOptionsSchema = z
  .object({
    ...common,
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
  eptLevels: 4 | 5
  eptAdBits: boolean
  fastPageFault: boolean
}
