import { describe, expect, it } from 'vitest'
import { contextSwitchRing, cr0WpToggle, forkStorm, memstress, mprotectStorm } from '@mmusim/guest'
import { runFingerprint as fingerprint, Vm } from '@mmusim/kvm'
import { legacyTdpStrategy, shadowStrategy } from './index.ts'
import { type Program, runOnVm } from './testing/harness.spec.ts'
import { setUpPopulate } from './testing/populate-guest.ts'

// The scheduler's fast path (Scheduler.tryAdvance) and the shadow MMU's inline page fault
// (pageFaultInline / pageFaultContinue) must change nothing but the simulator's speed: every
// clock, step, interleaving (trace hash) and counter equals the run with every cost a real yield.

const programs: [string, Program][] = [
  ['memstress', (cpu) => memstress(cpu, { iterations: 2, bytesPerVcpu: 32 * 4096 })],
  ['fork storm', (cpu) => forkStorm(cpu, { rounds: 1 })],
  ['mprotect storm', (cpu) => mprotectStorm(cpu, { iterations: 2 })],
  ['context-switch ring', (cpu) => contextSwitchRing(cpu, { laps: 2 })],
  ['CR0.WP toggle', (cpu) => cr0WpToggle(cpu, { iterations: 8 })],
]

describe('fast path on and off give identical runs (shadow MMU, legacy TDP)', () => {
  for (const strategy of [shadowStrategy, legacyTdpStrategy]) {
    for (const [name, program] of programs) {
      it.each([1, 2, 4])(`${strategy.name}: ${name} on %i vCPU(s)`, (vcpus) => {
        const on = runOnVm(strategy, vcpus, program, { vm: { schedFastPath: true } })
        const off = runOnVm(strategy, vcpus, program, { vm: { schedFastPath: false } })
        expect(fingerprint(on.vm)).toEqual(fingerprint(off.vm))
        expect(on.totals).toEqual(off.totals)
        expect(off.vm.sched.fastSteps).toBe(0)
        if (vcpus === 1) expect(on.vm.sched.fastSteps).toBeGreaterThan(0)
        expect(on.mmu.audit()).toEqual([])
        on.vm.destroy()
        off.vm.destroy()
      })
    }
  }

  it.each([1, 2, 4])('populate (one fault per page) on %i vCPU(s), both strategies', (vcpus) => {
    // pf_fixed: shadow paging takes exactly one fault per page; legacy TDP also faults in the
    // guest's page-table pages (4, 5 and 7 of them over 1, 2 and 4 vCPUs).
    const expected = { shadow: 512 * vcpus, 'legacy-tdp': 512 * vcpus + { 1: 4, 2: 5, 4: 7 }[vcpus]! }
    for (const strategy of [shadowStrategy, legacyTdpStrategy]) {
      const run = (schedFastPath: boolean) => {
        const vm = new Vm({ strategy, vcpus, hostMemBytes: 96 << 20, schedFastPath })
        setUpPopulate(vm, { vcpus, bytesPerVcpu: 2 << 20 })
        vm.run()
        return vm
      }
      const on = run(true)
      const off = run(false)
      expect(fingerprint(on)).toEqual(fingerprint(off))
      const faults = on.vcpus.reduce((n, v) => n + v.stats.pf_fixed, 0)
      expect(faults).toBe(expected[strategy.name as keyof typeof expected])
      // One vCPU: nothing else runs, so each fault's three yields (exit, GUP, mmu_lock + work)
      // are taken in place; the other 5 fast steps are the boot's.
      if (vcpus === 1) expect(on.sched.fastSteps).toBe(3 * faults + 5)
      on.destroy()
      off.destroy()
    }
  })
})
