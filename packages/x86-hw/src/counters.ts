/**
 * Fixed-shape hardware counters of a vCPU, as a Float64Array indexed by these constants, so that
 * counting costs one store and a snapshot is a copy. Deterministic: exact given config and seed.
 */
export const C_ACCESSES = 0
export const C_TLB_HIT_4K = 1
export const C_TLB_HIT_2M = 2
export const C_TLB_HIT_1G = 3
export const C_TLB_MISS = 4
export const C_WALKS = 5
/** Paging-structure memory references (guest and nested). */
export const C_MEM_REFS = 6
/** Locked A/D updates (guest and nested). */
export const C_AD_WRITES = 7
export const C_WALK_RESTARTS = 8
export const C_PSC_HITS = 9
/** #PF delivered to the guest. */
export const C_GUEST_PF = 10
export const C_GP = 11
export const C_EXITS = 12
export const C_EXIT_PF = 13
export const C_EXIT_EPT_VIOLATION = 14
export const C_EXIT_EPT_MISCONFIG = 15
export const C_EXIT_NPF = 16
export const C_EXIT_CR = 17
export const C_EXIT_INVLPG = 18
export const C_EXIT_INVPCID = 19
export const C_EXIT_MSR = 20
export const C_INVLPG = 21
export const C_CR3_WRITES = 22
export const C_INVPCID = 23
export const C_TLB_FLUSHES = 24
/** Walks whose result was used to fill the TLB with a write-capable entry only after setting D. */
export const C_DIRTY_REWALKS = 25
export const C_READS = 26
export const C_WRITES = 27
export const C_FETCHES = 28
export const COUNTER_COUNT = 29

/** Names of the counters, by index (stable; used as keys in reports). */
export const COUNTER_NAMES: readonly string[] = [
  'accesses',
  'tlb_hit_4k',
  'tlb_hit_2m',
  'tlb_hit_1g',
  'tlb_miss',
  'walks',
  'mem_refs',
  'ad_writes',
  'walk_restarts',
  'psc_hits',
  'guest_pf',
  'gp',
  'exits',
  'exit_pf',
  'exit_ept_violation',
  'exit_ept_misconfig',
  'exit_npf',
  'exit_cr_access',
  'exit_invlpg',
  'exit_invpcid',
  'exit_msr_write',
  'invlpg',
  'cr3_writes',
  'invpcid',
  'tlb_flushes',
  'dirty_rewalks',
  'reads',
  'writes',
  'fetches',
]

/** A counter vector as a plain object (for reports). */
export function countersToObject(c: Float64Array): Record<string, number> {
  const out: Record<string, number> = {}
  for (let i = 0; i < COUNTER_COUNT; i++) out[COUNTER_NAMES[i]!] = c[i]!
  return out
}
