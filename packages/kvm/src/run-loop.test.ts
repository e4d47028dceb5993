import { describe, expect, it } from 'vitest'
import { collectResult, contextSwitchRing, type Cpu, cr0WpToggle, forkStorm, GuestOs, memstress, mprotectStorm, type Routine } from '@mmusim/guest'
import { Machine } from '@mmusim/x86-hw'
import { directMapStrategy } from './examples/direct-map-strategy.ts'
import { createReference, diffGuestMemory, type MmuStrategy, statsToRecord, Vm } from './index.ts'

const MEM = 32 << 20

type Program = (cpu: Cpu) => Routine

/** Boot the guest OS on a VM and run `program` on every vCPU; returns the guest's own result. */
function runOnVm(strategy: MmuStrategy, vcpus: number, program: Program, chaosSeed?: number) {
  const vm = new Vm({ strategy, vcpus, hostMemBytes: 256 << 20, chaos: chaosSeed === undefined ? undefined : { seed: chaosSeed }, recordTrace: true })
  vm.addMemory(0, MEM)
  const os = new GuestOs({ memBytes: MEM, features: vm.features, ops: vm.vcpus.map((v) => v.guest.op), idt: vm.idt })
  for (const cpu of os.cpus) vm.spawnGuest(cpu.id, os.main(cpu, program))
  vm.run()
  const t = os.totals()
  return { vm, os, totals: t, stats: structuredClone(os.stats) }
}

function runOnBare(vm: Vm, program: Program) {
  const ref: Machine = createReference(vm)
  const os = GuestOs.forMachine(ref)
  os.spawnAll(ref, program)
  ref.run()
  return { ref, result: collectResult(os, ref) }
}

/** [name, program, whether the guest's own behaviour is independent of vCPU timing]. */
const programs: [string, Program, boolean][] = [
  ['memstress', (cpu) => memstress(cpu, { iterations: 2, bytesPerVcpu: 64 * 4096 }), true],
  ['fork storm', (cpu) => forkStorm(cpu, { rounds: 3 }), true],
  // Which vCPUs are in the mm's cpumask when a flush is sent depends on timing (as in Linux).
  ['mprotect storm', (cpu) => mprotectStorm(cpu, { iterations: 4 }), false],
  ['context-switch ring', (cpu) => contextSwitchRing(cpu, {}), true],
  ['CR0.WP toggle', (cpu) => cr0WpToggle(cpu, {}), true],
]

describe('the guest OS through the KVM run loop matches bare metal (direct-map strategy)', () => {
  for (const [name, program, timingFree] of programs) {
    it.each([1, 2])(`${name} on %i vCPU(s)`, (vcpus) => {
      const { vm, totals, stats } = runOnVm(directMapStrategy, vcpus, program)
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
    })
  }
})

describe('determinism of the scheduler at VM level', () => {
  const program: Program = (cpu) => memstress(cpu, { iterations: 1, bytesPerVcpu: 32 * 4096 })
  it('same config ⇒ same interleaving and counters; chaos seeds change the interleaving', () => {
    const a = runOnVm(directMapStrategy, 2, program)
    const b = runOnVm(directMapStrategy, 2, program)
    expect(b.vm.sched.traceHash).toBe(a.vm.sched.traceHash)
    expect(b.vm.sched.now).toBe(a.vm.sched.now)
    expect(b.vm.vcpus.map((v) => statsToRecord(v.stats))).toEqual(a.vm.vcpus.map((v) => statsToRecord(v.stats)))
    const c1 = runOnVm(directMapStrategy, 2, program, 1)
    const c1again = runOnVm(directMapStrategy, 2, program, 1)
    expect(c1again.vm.sched.traceHash).toBe(c1.vm.sched.traceHash)
    const hashes = new Set([c1.vm.sched.traceHash])
    for (const seed of [2, 3, 4, 5]) hashes.add(runOnVm(directMapStrategy, 2, program, seed).vm.sched.traceHash)
    expect(hashes.size).toBeGreaterThan(1)
    // Whatever the interleaving, the guest sees the same results.
    expect(c1.totals.mismatches).toBe(0)
  })
})
