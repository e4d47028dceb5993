/**
 * @mmusim/tdp-mmu — KVM's TDP MMU (arch/x86/kvm/mmu/tdp_mmu.c, tdp_iter.c) as an mmusim strategy.
 */
import { tdpStrategy } from './strategy.ts'

export { tdpStrategy, getTdpMmu, getTdpMmuAging, getNxRecoveryWorker, tdpVcpuState } from './strategy.ts'
export { TdpMmuAging, type TdpMmuAgingCounters } from './aging.ts'
export { NxHugePageRecoveryWorker, type NxRecoveryRun } from './nx-recovery.ts'
export { TdpMmu, TdpMmuError, TdpVcpuState, TdpFault, drain, type TdpMmuCounters } from './tdp-mmu.ts'
export { TdpIter, roundGfnForLevel, spteIndex } from './tdp-iter.ts'
export { KvmMmuPage, makeRoleWord, PAGES_PER_LEVEL, ROLE_AD_DISABLED, ROLE_GUEST_MODE, ROLE_SMM } from './mmu-page.ts'
export { tdpOptionsSchema, testHazardsSchema, type TdpMmuOptions, type TestHazards } from './options.ts'
export { auditTdpMmu, recount, type RecomputedCounts } from './audit.ts'
export { DEBUG } from './debug.ts'

/** Every strategy this package provides (for the harness' plugin loader). */
export const strategies = [tdpStrategy]
export default tdpStrategy
