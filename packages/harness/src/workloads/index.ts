import { HarnessError } from '../errors.ts'
import type { Workload } from '../workload.ts'
import { programWorkloads } from './programs.ts'
import { selftestWorkloads } from './selftests.ts'

export * from './selftests.ts'
export * from './programs.ts'

/** Every built-in workload, by name. */
export const WORKLOADS: readonly Workload[] = [...selftestWorkloads, ...programWorkloads]

/**
 * The representative default suite of `mmusim compare` (the main job): a workload per mechanism
 * where the strategies differ — fault-in and dirty logging, A-bit aging, guest page-table churn
 * (fork/CoW), CR3 switches, CR0.WP role changes, TLB-miss-heavy walks, shootdowns.
 */
export const DEFAULT_SUITE: readonly string[] = ['dirty-log-perf', 'access-tracking', 'fork-storm', 'context-switch', 'cr0wp-toggle', 'gups', 'mprotect-storm']

/** Look a workload up by name; the error lists the known ones. */
export function getWorkload(name: string): Workload {
  const w = WORKLOADS.find((x) => x.name === name)
  if (w === undefined) {
    throw new HarnessError('WORKLOAD_UNKNOWN', `unknown workload '${name}'; expected one of: ${WORKLOADS.map((x) => x.name).join(', ')}.`)
  }
  return w
}
