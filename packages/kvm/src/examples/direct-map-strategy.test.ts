import { describe, expect, it } from 'vitest'
import { createReference, diffGuestMemory, Vm } from '../index.ts'
import { tinyGuest, type TinyResult } from '../testing/tiny-guest.ts'
import { directMapStrategy } from './direct-map-strategy.ts'

const MEM = 8 << 20

function runOnVm(vcpus: number, pages: number, rounds: number): { vm: Vm; results: TinyResult[] } {
  const vm = new Vm({ strategy: directMapStrategy, vcpus, hostMemBytes: 64 << 20 })
  vm.addMemory(0, MEM)
  const ready = { booted: false }
  const results: TinyResult[] = []
  for (let c = 0; c < vcpus; c++) {
    const r: TinyResult = { faults: [], values: [], mismatches: 0 }
    results.push(r)
    vm.spawnGuest(c, tinyGuest(vm.vcpus[c]!.guest.op, r, { pages, rounds, cpu: c, boot: c === 0, ready }))
  }
  vm.run()
  return { vm, results }
}

function runOnReference(vm: Vm, pages: number, rounds: number): { results: TinyResult[]; ref: ReturnType<typeof createReference> } {
  const ref = createReference(vm)
  const ready = { booted: false }
  const results: TinyResult[] = []
  for (let c = 0; c < vm.vcpus.length; c++) {
    const r: TinyResult = { faults: [], values: [], mismatches: 0 }
    results.push(r)
    ref.spawn(c, tinyGuest(ref.threads[c]!.op, r, { pages, rounds, cpu: c, boot: c === 0, ready }))
  }
  ref.run()
  return { results, ref }
}

describe('the minimal direct-map strategy, end to end through the run loop', () => {
  it.each([1, 2, 4])('%i vCPU(s): same guest-visible results and memory as bare metal', (vcpus) => {
    const pages = 16
    const rounds = 3
    const { vm, results } = runOnVm(vcpus, pages, rounds)
    const { results: expected, ref } = runOnReference(vm, pages, rounds)
    expect(results).toEqual(expected)
    for (const r of results) {
      expect(r.mismatches).toBe(0)
      expect(r.faults.length).toBe(2 * pages) // one guest #PF per page (cr2, error code)
      expect(r.faults[1]).toBe(0x6) // user write to a not-present page
    }
    expect(diffGuestMemory(vm, ref)).toEqual([])
    // Every guest page touched was mapped once by an EPT violation on each vCPU that touched it.
    const total = vm.vcpus.reduce((n, v) => n + v.stats.pf_fixed, 0)
    expect(total).toBe(vm.vcpus.reduce((n, v) => n + v.stats.exits_ept_violation, 0) - vm.vcpus.reduce((n, v) => n + v.stats.pf_spurious + v.stats.pf_retry, 0))
    expect(vm.mmu.audit()).toEqual([])
    vm.destroy()
    expect(vm.mmuPagesLive).toBe(0)
  })

  it('counts exits exactly for one vCPU', () => {
    const { vm } = runOnVm(1, 4, 1)
    const v = vm.vcpus[0]!
    // Distinct gfns touched: the 4 table frames (written with paging off, then walked) and the
    // 4 data pages; each takes exactly one EPT violation, fixed at once.
    expect(v.stats.exits_ept_violation).toBe(8)
    expect(v.stats.pf_fixed).toBe(8)
    expect(v.stats.pf_spurious + v.stats.pf_retry).toBe(0)
    expect(v.stats.pf_guest).toBe(4)
    expect(v.stats.exits_cr_access).toBe(2) // MOV CR0 and MOV CR4 are intercepted under TDP; CR3 is not
    expect(v.stats.exits_msr_write).toBe(1)
    expect(vm.stats.pages_4k).toBe(8)
    expect(vm.mmuPagesLive).toBe(1 + 3 + 1) // root, one table per level below it, and a second PT for the data gfns
    vm.destroy()
    expect(vm.stats.pages_4k).toBe(0)
  })
})
