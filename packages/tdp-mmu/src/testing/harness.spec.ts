/**
 * Test helpers: boot the @mmusim/guest OS on a VM with the tdp strategy, run it on the bare-metal
 * reference, and compare. Only imported by tests. (Named *.spec.ts so the layering rule treats it
 * as test code, while vitest — which collects *.test.ts — does not run it.)
 */
import { collectResult, type Cpu, GuestOs, type Routine } from '@mmusim/guest'
import { createReference, diffGuestMemory, Vm } from '@mmusim/kvm'
import type { Machine } from '@mmusim/x86-hw'
import { tdpStrategy } from '../strategy.ts'

export type Program = (cpu: Cpu) => Routine

export const GUEST_MEM = 32 << 20

/** Boot the guest OS on a tdp VM and run `program` on every vCPU. */
export function runOnVm(
  vcpus: number,
  program: Program,
  options: { chaosSeed?: number; strategyOptions?: unknown; reschedProbability?: number; thp?: boolean; beforeRun?: (vm: Vm) => void; schedFastPath?: boolean } = {},
) {
  const vm = new Vm({
    strategy: tdpStrategy,
    strategyOptions: options.strategyOptions,
    vcpus,
    hostMemBytes: 256 << 20,
    chaos: options.chaosSeed === undefined ? undefined : { seed: options.chaosSeed, reschedProbability: options.reschedProbability ?? 0 },
    schedFastPath: options.schedFastPath,
  })
  vm.addMemory(0, GUEST_MEM, { thp: options.thp ?? false })
  const os = new GuestOs({ memBytes: GUEST_MEM, features: vm.features, ops: vm.vcpus.map((v) => v.guest.op), idt: vm.idt })
  for (const cpu of os.cpus) vm.spawnGuest(cpu.id, os.main(cpu, program))
  options.beforeRun?.(vm)
  vm.run()
  return { vm, os, totals: os.totals(), stats: { ...os.stats } }
}

/** Run `program` on the bare-metal reference of `vm`. */
export function runOnBare(vm: Vm, program: Program): { ref: Machine; result: ReturnType<typeof collectResult> } {
  const ref = createReference(vm)
  const os = GuestOs.forMachine(ref)
  os.spawnAll(ref, program)
  ref.run()
  return { ref, result: collectResult(os, ref) }
}

export { diffGuestMemory }
