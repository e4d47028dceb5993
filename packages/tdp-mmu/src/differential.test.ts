import { describe, expect, it } from 'vitest'
import { cr0WpToggle, forkStorm, memstress, mprotectStorm } from '@mmusim/guest'
import { diffGuestMemory, type Program, runOnBare, runOnVm } from './testing/harness.spec.ts'

/** [name, program, whether the guest's own behaviour is independent of vCPU timing]. */
const programs: [string, Program, boolean][] = [
  ['memstress', (cpu) => memstress(cpu, { iterations: 2, bytesPerVcpu: 64 * 4096 }), true],
  ['fork storm', (cpu) => forkStorm(cpu, { rounds: 2 }), true],
  ['mprotect storm', (cpu) => mprotectStorm(cpu, { iterations: 3 }), false],
  ['CR0.WP toggle', (cpu) => cr0WpToggle(cpu, { iterations: 32 }), true],
]

describe('guest programs on the TDP MMU match bare metal', () => {
  for (const [name, program, timingFree] of programs) {
    it.each([1, 2, 4])(`${name} on %i vCPU(s)`, (vcpus) => {
      const { vm, totals, stats } = runOnVm(vcpus, program)
      const { ref, result } = runOnBare(vm, program)
      expect(totals.mismatches).toBe(0)
      expect(result.mismatches).toBe(0)
      expect(totals.sigsegv).toBe(result.sigsegv)
      expect(totals.accesses).toBe(result.accesses)
      if (vcpus === 1 || timingFree) {
        expect(totals.pageFaults).toBe(result.pageFaults)
        expect(stats).toEqual(result.stats)
        expect(diffGuestMemory(vm, ref)).toEqual([])
      }
      expect(vm.mmu.audit()).toEqual([])
      vm.destroy()
      expect(vm.mmuPagesLive).toBe(0)
    })
  }
})

describe('guest programs under chaos scheduling (parallel faults, random reschedules)', () => {
  const cases: [string, Program][] = [
    ['memstress', (cpu) => memstress(cpu, { iterations: 2, bytesPerVcpu: 32 * 4096 })],
    ['fork storm', (cpu) => forkStorm(cpu, { rounds: 1 })],
  ]
  for (const [name, program] of cases) {
    it.each([11, 22, 33])(`${name} on 4 vCPUs, chaos seed %i`, (seed) => {
      const { vm, totals } = runOnVm(4, program, { chaosSeed: seed, reschedProbability: 0.2 })
      const { result } = runOnBare(vm, program)
      expect(totals.mismatches).toBe(0)
      expect(totals.accesses).toBe(result.accesses)
      expect(totals.pageFaults).toBe(result.pageFaults)
      expect(vm.mmu.audit()).toEqual([])
      vm.destroy()
      expect(vm.mmuPagesLive).toBe(0)
    })
  }
})
