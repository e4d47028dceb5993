/**
 * Test helpers (named *.spec.ts so that the layering rule treats them as test code while vitest,
 * which collects *.test.ts, does not run them): boot the guest OS of @mmusim/guest on a VM with a
 * strategy of this package and on the bare-metal reference, and compare.
 */
import { collectResult, type Cpu, GuestOs, type Routine } from '@mmusim/guest'
import { createReference, type MmuStrategy, Vm, type VmOptions } from '@mmusim/kvm'
import { shadowMmuOf, type ShadowMmu } from '../shadow-mmu.ts'

export type Program = (cpu: Cpu) => Routine

/**
 * CPU features of differential runs: the reference's page walker sets non-leaf A bits only after
 * a successful walk, as KVM's software walker does, so guest page tables compare word for word.
 */
export const DIFF_FEATURES = { nonLeafAOnDescent: false } as const

export const GUEST_MEM = 32 << 20

export interface VmRun {
  vm: Vm
  mmu: ShadowMmu
  os: GuestOs
  totals: ReturnType<GuestOs['totals']>
  stats: GuestOs['stats']
}

/** Boot the guest OS on a VM and run `program` on every vCPU. */
export function runOnVm(strategy: MmuStrategy, vcpus: number, program: Program, opts: { strategyOptions?: unknown; chaosSeed?: number; vm?: Partial<VmOptions>; memBytes?: number; beforeRun?: (vm: Vm) => void } = {}): VmRun {
  const memBytes = opts.memBytes ?? GUEST_MEM
  const vm = new Vm({
    strategy,
    strategyOptions: opts.strategyOptions,
    vcpus,
    hostMemBytes: 512 << 20,
    features: DIFF_FEATURES,
    chaos: opts.chaosSeed === undefined ? undefined : { seed: opts.chaosSeed },
    ...opts.vm,
  })
  vm.addMemory(0, memBytes)
  const os = new GuestOs({ memBytes, features: vm.features, ops: vm.vcpus.map((v) => v.guest.op), idt: vm.idt })
  for (const cpu of os.cpus) vm.spawnGuest(cpu.id, os.main(cpu, program))
  opts.beforeRun?.(vm)
  vm.run()
  return { vm, mmu: shadowMmuOf(vm), os, totals: os.totals(), stats: { ...os.stats } }
}

/** The same program on the bare-metal reference of `vm`. */
export function runOnBare(vm: Vm, program: Program) {
  const ref = createReference(vm)
  const os = GuestOs.forMachine(ref)
  os.spawnAll(ref, program)
  ref.run()
  return { ref, result: collectResult(os, ref) }
}
