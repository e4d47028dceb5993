/**
 * Guest garbage in page tables (and guest-physical addresses no memslot backs) on the shadow MMU
 * (shadow paging and legacy TDP): the same guest-visible outcome as bare metal, never a throw.
 * Unbacked GPAs get MMIO SPTEs and are emulated against open bus (reads all ones, writes dropped).
 */
import { describe, expect, it } from 'vitest'
import { diffGuestMemory, GARBAGE, type MmuStrategy, ROM_GUEST_EXPECTED, runGarbageGuestOnReference, runGarbageGuestOnVm, runRomGuest, Vm } from '@mmusim/kvm'
import { legacyTdpStrategy, shadowStrategy } from './index.ts'

const variants: [string, MmuStrategy, Record<string, unknown>][] = [
  ['shadow', shadowStrategy, {}],
  ['shadow without unsync or prefetch', shadowStrategy, { unsync: false, prefetch: false }],
  ['legacy-tdp', legacyTdpStrategy, {}],
]

describe('the shadow MMU: a guest writing garbage into its page tables gets what bare metal gives it', () => {
  for (const [name, strategy, strategyOptions] of variants) {
    it.each([1, 2, 3])(`${name}: identical outcomes and memory (seed %i)`, (seed) => {
      const vm = new Vm({ strategy, strategyOptions, vcpus: 1, hostMemBytes: 64 << 20 })
      const log = runGarbageGuestOnVm(vm, { seed })
      const { ref, log: expected } = runGarbageGuestOnReference(vm, { seed })
      expect(log).toEqual(expected)
      expect(diffGuestMemory(vm, ref, 20, new Set(GARBAGE.tableFrames))).toEqual([])
      expect(vm.vcpus[0]!.stats.pf_emulate).toBeGreaterThan(0)
      expect(vm.mmu.audit()).toEqual([])
      vm.destroy()
      expect(vm.mmuPagesLive).toBe(0)
    })

    it(`${name}: a write to a read-only memslot is emulated (dropped), not an error`, () => {
      const vm = new Vm({ strategy, strategyOptions, vcpus: 1, hostMemBytes: 64 << 20 })
      expect(runRomGuest(vm)).toEqual(ROM_GUEST_EXPECTED)
      expect(vm.vcpus[0]!.stats.pf_emulate).toBeGreaterThan(0)
      expect(vm.mmu.audit()).toEqual([])
      vm.destroy()
    })
  }
})
