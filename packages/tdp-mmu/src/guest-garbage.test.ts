/**
 * Guest garbage in page tables (and guest-physical addresses no memslot backs) on the TDP MMU:
 * the same guest-visible outcome as bare metal, never a throw. Unbacked GPAs get MMIO SPTEs and
 * are emulated against open bus (reads all ones, writes dropped).
 */
import { describe, expect, it } from 'vitest'
import { GARBAGE, ROM_GUEST_EXPECTED, runGarbageGuestOnReference, runGarbageGuestOnVm, runRomGuest, Vm } from '@mmusim/kvm'
import { tdpStrategy } from './strategy.ts'
import { diffGuestMemory } from './testing/harness.spec.ts'

const variants: [string, Record<string, unknown>][] = [
  ['EPT', {}],
  ['EPT without A/D bits', { adEnabled: false }],
  ['NPT', { format: 'npt' }],
  ['EPT, NX huge pages', { nxHugePages: true }],
]

describe('the TDP MMU: a guest writing garbage into its page tables gets what bare metal gives it', () => {
  for (const [name, strategyOptions] of variants) {
    it.each([1, 2, 3])(`${name}: identical outcomes and memory (seed %i)`, (seed) => {
      const vm = new Vm({ strategy: tdpStrategy, strategyOptions, vcpus: 1, hostMemBytes: 64 << 20 })
      const log = runGarbageGuestOnVm(vm, { seed })
      const { ref, log: expected } = runGarbageGuestOnReference(vm, { seed })
      expect(log).toEqual(expected)
      expect(diffGuestMemory(vm, ref, 20, new Set(GARBAGE.tableFrames))).toEqual([])
      const v = vm.vcpus[0]!
      expect(v.stats.pf_mmio_spte_created).toBeGreaterThan(0)
      expect(v.stats.pf_emulate).toBeGreaterThan(v.stats.pf_mmio_spte_created) // MMIO SPTEs reused
      expect(vm.mmu.audit()).toEqual([])
      vm.destroy()
      expect(vm.mmuPagesLive).toBe(0)
    })
  }

  it('a write to a read-only memslot is emulated (dropped), not an error', () => {
    const vm = new Vm({ strategy: tdpStrategy, vcpus: 1, hostMemBytes: 64 << 20 })
    expect(runRomGuest(vm)).toEqual(ROM_GUEST_EXPECTED)
    expect(vm.vcpus[0]!.stats.pf_emulate).toBeGreaterThan(0)
    expect(vm.mmu.audit()).toEqual([])
    vm.destroy()
  })
})
