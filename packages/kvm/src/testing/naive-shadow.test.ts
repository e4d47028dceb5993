import { describe, expect, it } from 'vitest'
import { collectResult, contextSwitchRing, type Cpu, cr0WpToggle, forkStorm, GuestOs, memstress, mprotectStorm, type Routine } from '@mmusim/guest'
import { C_GUEST_PF } from '@mmusim/x86-hw'
import { createReference, diffGuestMemory, Vm } from '../index.ts'
import { naiveShadowStrategy } from './naive-shadow-strategy.ts'

const MEM = 32 << 20
type Program = (cpu: Cpu) => Routine

function compare(program: Program, vcpus: number, trackPageTables: boolean) {
  const vm = new Vm({ strategy: naiveShadowStrategy, strategyOptions: { trackPageTables }, vcpus, hostMemBytes: 256 << 20 })
  vm.addMemory(0, MEM)
  const os = new GuestOs({ memBytes: MEM, features: vm.features, ops: vm.vcpus.map((v) => v.guest.op), idt: vm.idt })
  for (const cpu of os.cpus) vm.spawnGuest(cpu.id, os.main(cpu, program))
  vm.run()
  const ref = createReference(vm)
  const ros = GuestOs.forMachine(ref)
  ros.spawnAll(ref, program)
  ref.run()
  return { vm, os, ref, expected: collectResult(ros, ref) }
}

const programs: [string, Program][] = [
  ['memstress', (cpu) => memstress(cpu, { iterations: 2, bytesPerVcpu: 32 * 4096 })],
  ['fork storm', (cpu) => forkStorm(cpu, { rounds: 2 })],
  ['mprotect storm', (cpu) => mprotectStorm(cpu, { iterations: 3 })],
  ['context-switch ring', (cpu) => contextSwitchRing(cpu, {})],
  ['CR0.WP toggle', (cpu) => cr0WpToggle(cpu, {})],
]

describe('shadow-mode run loop (naive test strategy): intercepted #PF, injection, CR3/INVLPG exits, emulation', () => {
  for (const [name, program] of programs) {
    for (const track of [false, true]) {
      it(`${name}${track ? ' with page-table write tracking (emulated writes)' : ''}`, () => {
        const { vm, os, ref, expected } = compare(program, 1, track)
        const t = os.totals()
        expect(t.mismatches).toBe(0)
        expect(t.accesses).toBe(expected.accesses)
        expect(t.pageFaults).toBe(expected.pageFaults)
        expect(structuredClone(os.stats)).toEqual(expected.stats)
        expect(diffGuestMemory(vm, ref)).toEqual([])
        const v = vm.vcpus[0]!
        expect(v.stats.exits_pf).toBeGreaterThan(0)
        // Every #PF the guest saw on bare metal, it saw here too — each injected by the MMU.
        expect(v.stats.pf_guest).toBe(ref.vcpus[0]!.counters[C_GUEST_PF])
        expect(v.stats.exits_cr_access).toBeGreaterThan(0) // MOV CR3 is intercepted under shadow paging
        if (track) {
          expect(v.stats.pf_emulate).toBe(vm.mmu.stats().emulated)
          // Every program but the CR0.WP loop edits user page tables after they were shadowed.
          if (name !== 'CR0.WP toggle') expect(v.stats.pf_emulate).toBeGreaterThan(0)
          expect(vm.mmu.stats().track_writes).toBe(v.stats.pf_emulate)
        } else expect(v.stats.pf_emulate).toBe(0)
        vm.destroy()
      })
    }
  }
  it('2 vCPUs: memstress and fork storm stay correct', () => {
    for (const program of [programs[0]![1], programs[1]![1]]) {
      const { vm, os, expected } = compare(program, 2, true)
      expect(os.totals().mismatches).toBe(0)
      expect(os.totals().accesses).toBe(expected.accesses)
      vm.destroy()
    }
  })
})
