/**
 * Differential tests: the guest OS's programs on a VM with each strategy of this package against
 * the bare-metal reference — data checks in the guest, guest-visible counts, and guest-physical
 * memory word for word (page tables included) when the program's behaviour is timing-independent.
 */
import { describe, expect, it } from 'vitest'
import { clearYoung, type Cpu, contextSwitchRing, cr0WpToggle, exitProcess, forkStorm, memstress, mmap, mprotectStorm, type Routine, swapOut, switchMm } from '@mmusim/guest'
import { diffGuestMemory, type MmuStrategy, Vm } from '@mmusim/kvm'
import { type Program, runOnBare, runOnVm } from './testing/harness.spec.ts'
import { legacyTdpStrategy, shadowStrategy } from './index.ts'
/**
 * Guest reclaim and aging (mm/vmscan.c's view): each vCPU's own process writes pages, clears
 * their young bit with a flush (ptep_clear_flush_young), re-reads them (the walk sets A again),
 * and swaps every third page out and back in.
 */
export function* reclaimAging(cpu: Cpu, params: { pages?: number; rounds?: number } = {}): Routine {
  const pages = params.pages ?? 12
  const rounds = params.rounds ?? 2
  const t = yield* cpu.os.createProcess(cpu)
  yield* switchMm(cpu, t.mm)
  const a = yield* mmap(cpu, t.mm, { length: pages * 4096 })
  for (let r = 0; r < rounds; r++) {
    for (let p = 0; p < pages; p++) yield* cpu.write32(a + p * 4096 + 8 * r, 0x1000 * cpu.id + 16 * p + r)
    for (let p = 0; p < pages; p++) yield* clearYoung(cpu, t.mm, a + p * 4096, true)
    for (let p = 0; p < pages; p++) yield* cpu.check32(a + p * 4096 + 8 * r, 0x1000 * cpu.id + 16 * p + r)
    for (let p = r % 3; p < pages; p += 3) yield* swapOut(cpu, t.mm, a + p * 4096)
    for (let p = 0; p < pages; p++) yield* cpu.check32(a + p * 4096 + 8 * r, 0x1000 * cpu.id + 16 * p + r)
  }
  yield* exitProcess(cpu, t)
}

/** [name, program, whether the guest's own statistics are independent of vCPU timing]. */
export const PROGRAMS: [string, Program, boolean][] = [
  ['memstress', (cpu) => memstress(cpu, { iterations: 2, bytesPerVcpu: 48 * 4096 }), true],
  ['fork storm (CoW)', (cpu) => forkStorm(cpu, { rounds: 2 }), true],
  // Which vCPUs are in the mm's cpumask when a flush is sent depends on timing (as in Linux).
  ['mprotect/munmap storm', (cpu) => mprotectStorm(cpu, { iterations: 3 }), false],
  ['context-switch ring', (cpu) => contextSwitchRing(cpu, { laps: 4 }), true],
  ['CR0.WP toggle', (cpu) => cr0WpToggle(cpu, { iterations: 16 }), true],
  ['reclaim/aging', (cpu) => reclaimAging(cpu), true],
]

/**
 * Differential tests: the guest OS's programs on a VM with each strategy of this package against
 * the bare-metal reference — data checks in the guest, guest-visible counts, and guest-physical
 * memory word for word (page tables included) when the program's behaviour is timing-independent.
 */

const CONFIGS: [string, MmuStrategy, Record<string, unknown>][] = [
  ['shadow', shadowStrategy, {}],
  ['shadow, unsync off', shadowStrategy, { unsync: false }],
  ['legacy-tdp', legacyTdpStrategy, {}],
]

function compare(strategy: MmuStrategy, options: Record<string, unknown>, vcpus: number, program: Program, timingFree: boolean, chaosSeed?: number): void {
  const r = runOnVm(strategy, vcpus, program, { strategyOptions: options, chaosSeed })
  const { ref, result } = runOnBare(r.vm, program)
  expect(r.mmu.audit()).toEqual([])
  expect(result.mismatches).toBe(0)
  expect(r.totals.mismatches).toBe(0)
  expect(r.totals.sigsegv).toBe(result.sigsegv)
  expect(r.totals.accesses).toBe(result.accesses)
  if (vcpus === 1 || timingFree) {
    expect(r.totals.pageFaults).toBe(result.pageFaults)
    expect(r.stats).toEqual(result.stats)
    expect(diffGuestMemory(r.vm, ref)).toEqual([])
  }
  r.vm.destroy()
  expect(r.vm.mmuPagesLive).toBe(0)
}

describe.each(CONFIGS)('%s matches bare metal', (_name, strategy, options) => {
  for (const [name, program, timingFree] of PROGRAMS) {
    it.each([1, 2, 4])(`${name} on %i vCPU(s)`, (vcpus) => {
      compare(strategy, options, vcpus, program, timingFree)
    })
  }
})

describe('host events', () => {
  for (const [name, strategy] of [['shadow', shadowStrategy], ['legacy-tdp', legacyTdpStrategy]] as const) {
    it(`${name}: page migration and aging by the host while the guest runs do not change its memory`, () => {
      const program: Program = (cpu) => memstress(cpu, { iterations: 3, bytesPerVcpu: 32 * 4096 })
      const hostOps = (vm: Vm) => {
        for (let t = 1; t <= 8; t++) {
          vm.hostOp(`migrate${t}`, t * 40_000, (h) => {
            const slot = vm.memslots.space(0).sorted[0]!
            for (let p = 0; p < 64; p += 7) h.migratePage(slot.userspaceAddr + (0x1000 + p) * 4096 + t * 4096)
          })
          vm.hostOp(`age${t}`, t * 40_000 + 20_000, (h) => {
            const slot = vm.memslots.space(0).sorted[0]!
            h.age(slot.userspaceAddr, slot.npages * 4096)
          })
        }
      }
      const r = runOnVm(strategy, 2, program, { beforeRun: hostOps })
      const { ref } = runOnBare(r.vm, program)
      expect(r.totals.mismatches).toBe(0)
      expect(diffGuestMemory(r.vm, ref)).toEqual([])
      expect(r.mmu.audit()).toEqual([])
      r.vm.destroy()
    })

  }
})

describe('chaos interleavings and audit after every operation', () => {
  for (const [name, program, timingFree] of PROGRAMS.slice(0, 2)) {
    it.each([11, 12])(`${name}, shadow, 2 vCPUs, chaos seed %i`, (seed) => {
      compare(shadowStrategy, { auditEveryOp: true }, 2, program, timingFree, seed)
    })
  }
  it('the seed-003 unsync walk and no prefetch behave the same for the guest', () => {
    compare(shadowStrategy, { unsyncWalk: 'seed-003', prefetch: false }, 2, PROGRAMS[1]![1], true)
  })
  it('a small page quota recycles shadow pages without changing what the guest sees', () => {
    const program: Program = (cpu) => memstress(cpu, { iterations: 2, bytesPerVcpu: 64 * 4096 })
    const r = runOnVm(shadowStrategy, 2, program, { strategyOptions: { pageQuota: 16 } })
    const { ref } = runOnBare(r.vm, program)
    expect(r.totals.mismatches).toBe(0)
    expect(r.vm.stats.mmu_recycled).toBeGreaterThan(0)
    expect(diffGuestMemory(r.vm, ref)).toEqual([])
    expect(r.mmu.audit()).toEqual([])
    r.vm.destroy()
  })
})

describe('legacy-tdp', () => {
  it('faults take mmu_lock for write: populate on more vCPUs takes longer in simulated time per page', () => {
    const times: number[] = []
    for (const n of [1, 4]) {
      const program: Program = (cpu) => memstress(cpu, { iterations: 1, bytesPerVcpu: 64 * 4096 })
      const r = runOnVm(legacyTdpStrategy, n, program)
      expect(r.totals.mismatches).toBe(0)
      times.push(r.vm.mmuLock.stats.write.contended)
      r.vm.destroy()
    }
    expect(times[1]).toBeGreaterThan(times[0]!)
  })
})
