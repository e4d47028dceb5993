/**
 * Aging test helpers: run the MMU-notifier aging callbacks on host threads and recount young
 * leaves directly from the tables (the oracle for what aging must report). Only imported by tests.
 */
import { isLastSpte, isShadowPresentPte, type Vm } from '@mmusim/kvm'
import { getTdpMmu, getTdpMmuAging } from '../strategy.ts'

/** Present leaves and young leaves of the valid roots of `asId` in [start, end). Call at a quiescent point. */
export function scanLeaves(vm: Vm, asId: number, start: number, end: number): { present: number; young: number } {
  const mmu = getTdpMmu(vm)
  const aging = getTdpMmuAging(vm)
  const it = mmu.newIter()
  let present = 0
  let young = 0
  for (let r = mmu.rootsHead; r !== null; r = r.next) {
    if (r.asId !== asId || r.invalid) continue
    for (it.start(r, 1, start); it.valid && it.gfn < end; it.next()) {
      if (!isShadowPresentPte(it.oldLo) || !isLastSpte(it.oldLo, it.level)) continue
      present++
      if (aging.isAccessedSpte(it.oldLo, it.oldHi)) young++
    }
  }
  return { present, young }
}

/** Run one aging notifier (`clear_flush_young`, `clear_young`, `test_young`) on a host thread now; returns "young". */
export function ageNow(vm: Vm, kind: 'clear_flush_young' | 'clear_young' | 'test_young', hva: number, bytes: number): boolean {
  const t = vm.hostAgeOp(kind, vm.sched.now, hva, bytes, kind)
  vm.run()
  if (t.state !== 'done') throw new Error(`aging thread ${t.label} is ${t.state}`)
  return t.result!
}
