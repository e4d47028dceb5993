import { statsToRecord } from '../stats.ts'
import type { Vm } from '../vm.ts'

/**
 * Everything a finished run produces that a user can observe — scheduler stats and trace hash,
 * every thread's clock and steps, vCPU and VM stats, the MMU's stats, MMU pages, mmu_lock
 * statistics — for tests that compare two runs that must be identical (e.g. the scheduler's fast
 * path on and off). `sched.fastSteps`, the fast path's own counter, is left out.
 */
export function runFingerprint(vm: Vm) {
  return {
    sched: { ...vm.sched.stats },
    now: vm.sched.now,
    hash: vm.sched.traceHash,
    clocks: vm.sched.allThreads.map((t) => [t.name, t.clock, t.steps]),
    vcpus: vm.vcpus.map((v) => statsToRecord(v.stats)),
    vm: statsToRecord(vm.stats),
    mmu: vm.mmu.stats(),
    mmuPages: [vm.mmuPagesLive, vm.mmuPagesAllocated],
    lock: { r: { ...vm.mmuLock.stats.read }, w: { ...vm.mmuLock.stats.write } },
  }
}
