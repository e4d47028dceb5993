import { describe, expect, it } from 'vitest'
import { forkStorm, memstress, mprotectStorm } from '@mmusim/guest'
import { runFingerprint as fingerprint, Vm } from '@mmusim/kvm'
import { tdpStrategy } from './strategy.ts'
import { type Program, runOnVm } from './testing/harness.spec.ts'
import { pageBatch, rawGuest, WRITE } from './testing/raw-guest.ts'

// The scheduler's fast path (Scheduler.tryAdvance) and the TDP MMU's inline page fault
// (pageFaultInline / pageFaultContinue) must change nothing but the simulator's speed: every
// clock, step, interleaving (trace hash) and counter equals the run with every cost a real yield.

const programs: [string, Program][] = [
  ['memstress', (cpu) => memstress(cpu, { iterations: 2, bytesPerVcpu: 48 * 4096 })],
  ['fork storm', (cpu) => forkStorm(cpu, { rounds: 1 })],
  ['mprotect storm', (cpu) => mprotectStorm(cpu, { iterations: 2 })],
]

describe('fast path on and off give identical runs (TDP MMU)', () => {
  for (const [name, program] of programs) {
    it.each([1, 2, 4])(`${name} on %i vCPU(s), THP and NX huge pages`, (vcpus) => {
      const opts = { thp: true, strategyOptions: { nxHugePages: true } }
      const on = runOnVm(vcpus, program, { ...opts, schedFastPath: true })
      const off = runOnVm(vcpus, program, { ...opts, schedFastPath: false })
      expect(fingerprint(on.vm)).toEqual(fingerprint(off.vm))
      expect(on.totals).toEqual(off.totals)
      expect(off.vm.sched.fastSteps).toBe(0)
      // With one vCPU nothing else runs between most yields; with more, the vCPUs interleave and
      // faults stop at their yields (pageFaultContinue) as often as they run through.
      expect(on.vm.sched.fastSteps).toBeGreaterThan(vcpus === 1 ? on.vm.sched.stats.steps / 2 : 0)
      expect(on.vm.mmu.audit()).toEqual([])
      on.vm.destroy()
      off.vm.destroy()
    })
  }

  it.each([1, 2, 4])('populate (one EPT violation per page) on %i vCPU(s), with the NPT format too', (vcpus) => {
    for (const format of ['ept', 'npt'] as const) {
      const run = (schedFastPath: boolean) => {
        const vm = new Vm({ strategy: tdpStrategy, strategyOptions: { format }, vcpus, hostMemBytes: 64 << 20, schedFastPath })
        vm.addMemory(1 << 30, vcpus * (1 << 20))
        for (let c = 0; c < vcpus; c++) vm.spawnGuest(c, rawGuest(vm.vcpus[c]!.guest.op, [pageBatch((1 << 30) + c * (1 << 20), 256, WRITE, c << 20)]))
        vm.run()
        return vm
      }
      const on = run(true)
      const off = run(false)
      expect(fingerprint(on)).toEqual(fingerprint(off))
      expect(on.vcpus.reduce((n, v) => n + v.stats.pf_fixed, 0)).toBe(256 * vcpus)
      if (vcpus === 1) {
        // Four steps per fault (exit, GUP, mmu_lock + work, cmpxchg), all begun in place; the 5
        // real suspensions are the first step and the root load's yields at start.
        expect(on.sched.stats.steps).toBe(4 * 256 + 9)
        expect(on.sched.fastSteps).toBe(4 * 256 + 4)
      }
      on.destroy()
      off.destroy()
    }
  })
})
