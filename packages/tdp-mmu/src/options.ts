/**
 * Options of the TDP MMU strategy, validated by its zod schema (the strategy's `optionsSchema`).
 * Module parameters of kvm.ko / kvm-intel.ko / kvm-amd.ko become strategy options; historical
 * variants of the code are named options too, so an experiment can compare them.
 */
import { z } from 'zod'

/**
 * Test-only switches that put a fixed historical bug back (tdp-mmu.md §12.3). Never set them
 * outside tests: each one exists to show that a scenario of tdp-mmu.md §10 fails without its fix.
 */
export const testHazardsSchema = z
  .object({
    /** S6: do not flush pending TLB flushes before yielding mmu_lock in tdp_mmu_iter_cond_resched. */
    noFlushBeforeYield: z.boolean().default(false),
    /** S7: flush after leaving the RCU read-side section instead of before. */
    flushAfterRcuUnlock: z.boolean().default(false),
    /** S12: tdp_iter_next() advances from the restarted position after a yield (pre-5.16-rc6). */
    advanceAfterRestart: z.boolean().default(false),
    /** S13: no forward-progress rule: yield even if next_last_level_gfn did not move. */
    noForwardProgressRule: z.boolean().default(false),
    /** S2: the notifier unmap visits only valid roots (≤ 5.15). */
    unmapSkipsInvalidRoots: z.boolean().default(false),
    /** S11: plain store for volatile SPTEs under the write lock (pre "atomicity fix"). */
    plainWriteForVolatile: z.boolean().default(false),
    /** S9: a shared-mode remover only reads the entries of a disconnected table (no FROZEN). */
    readRemovalWithoutFreeze: z.boolean().default(false),
    /** S5: zap and put every invalid root, not only those scheduled to zap. */
    rezapInvalidRoots: z.boolean().default(false),
    /** S21: ignore the mmu_invalidate_seq / in-progress check (is_page_fault_stale's notifier part). */
    skipInvalidationRetry: z.boolean().default(false),
    /** S22: take next-root references with refcount_inc instead of refcount_inc_not_zero. */
    plainIncInNextRoot: z.boolean().default(false),
  })
  .strict()

/** The options schema of the `tdp` strategy. */
export const tdpOptionsSchema = z
  .object({
    /** Hardware format: Intel EPT or AMD NPT (`kvm_mmu_set_ept_masks` vs the x86 masks). */
    format: z.enum(['ept', 'npt']).default('ept'),
    /** TDP levels (`max_tdp_level`): 4 or 5. */
    levels: z.union([z.literal(4), z.literal(5)]).default(4),
    /** `enable_ept_ad_bits` (EPT only; NPT always has A/D). Without them aging uses access tracking. */
    adEnabled: z.boolean().default(true),
    /** `eager_page_split`: split huge pages when dirty logging is enabled (or at the first clear with manual protect). */
    eagerSplit: z.boolean().default(true),
    /** `nx_huge_pages` (iTLB multihit mitigation): executable mappings only at 4K. Default off, as on unaffected CPUs. */
    nxHugePages: z.boolean().default(false),
    /** The lockless fast page fault for write-protected and access-tracked SPTEs. */
    fastPageFault: z.boolean().default(true),
    /**
     * Root lifecycle: `current` (≥ 6.4: the TDP MMU owns a reference until the root is
     * invalidated) or `pre-6.4` (the last vCPU put tears the root down).
     */
    rootLifecycle: z.enum(['current', 'pre-6.4']).default('current'),
    /**
     * `nx_huge_pages_recovery_ratio`: each run of the recovery worker zaps ceil(nr / ratio) of the
     * nr possible NX huge pages (0 = recovery off: no worker). KVM's default is 60 (0 on PREEMPT_RT).
     */
    nxRecoveryRatio: z.number().int().min(0).default(60),
    /**
     * `nx_huge_pages_recovery_period_ms`: time between runs of the per-VM recovery worker
     * (`kvm-nx-lpage-recovery`); 0 = derived from the ratio as KVM's
     * `calc_nx_huge_pages_recovery_period()` does: 3 600 000 / min(ratio, 3600) ms (a halving
     * time of one hour, never below 1 s), i.e. 60 s at the default ratio.
     */
    nxRecoveryPeriodMs: z.number().int().min(0).default(0),
    /**
     * Aging (`kvm_tdp_mmu_age_gfn_range` / `kvm_tdp_mmu_test_age_gfn`): `lockless` (≈6.15+,
     * `CONFIG_KVM_MMU_LOCKLESS_AGING`: RCU only, no mmu_lock, no root references) or `write-lock`
     * (6.13–6.14: mmu_lock held for write by the notifier, the non-yielding root walk).
     */
    agingLocking: z.enum(['lockless', 'write-lock']).default('lockless'),
    /** Test-only: put back historical bugs. */
    testHazards: testHazardsSchema.prefault({}),
  })
  .strict()
  .refine((o) => o.format === 'ept' || o.adEnabled, {
    message: 'adEnabled: false is EPT-only (NPT always has hardware A/D bits)',
    path: ['adEnabled'],
  })

export type TdpMmuOptions = z.infer<typeof tdpOptionsSchema>
export type TestHazards = z.infer<typeof testHazardsSchema>
