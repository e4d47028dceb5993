/**
 * Dirty logging turned off: kvm_mmu_recover_huge_pages() → kvm_rmap_zap_collapsible_sptes()
 * (arch/x86/kvm/mmu/mmu.c; kvm_mmu_zap_collapsible_sptes() before 6.13) zaps the 4K leaves of
 * direct shadow pages whose range could be mapped huge again, so the next fault maps the huge page.
 * Scripted on legacy TDP (direct EPT pages over THP-backed guest memory) and on shadow paging
 * (direct pages below a guest 2M page), each against the bare-metal reference.
 */
import { describe, expect, it } from 'vitest'
import { diffGuestMemory, KVM_MEM_LOG_DIRTY_PAGES, type MmuStrategy, Vm } from '@mmusim/kvm'
import type { GuestOp } from '@mmusim/x86-hw'
import { legacyTdpStrategy, shadowStrategy } from './index.ts'
import { shadowMmuOf } from './shadow-mmu.ts'
import { fillFrame, type GuestPhys, L, linkUserPt, loadKernelTables, mapUser, runScript, runScriptOnReference, type Script } from './testing/script-guest.ts'

const MiB = 1 << 20
/** The dirty-logged, THP-backed slot 1: guest-physical [8 MiB, 16 MiB), kernel-identity mapped by the script's 2M pages. */
const DATA = 8 * MiB
const page = (j: number) => DATA + j * 4096

type Body = (s: Script) => Generator<GuestOp, void, number>

/**
 * The loader: the kernel's identity map (2M pages) and one user 4K page — user VA L.va(0, 0, 0)
 * through the page table at L.pt(0) to frame 20 = guest-physical 8 MiB + 80 KiB, inside the
 * THP region: under shadow paging its SPTE is a leaf of an indirect page, which stays.
 */
function load(mem: Vm | GuestPhys): void {
  loadKernelTables(mem)
  linkUserPt(mem, 0, 0, 0)
  mapUser(mem, 0, 0, 20)
  fillFrame(mem, 20, 0x77)
}

function makeVm(strategy: MmuStrategy) {
  const vm = new Vm({ strategy, strategyOptions: { auditEveryOp: true }, vcpus: 1, hostMemBytes: 128 * MiB, features: { nonLeafAOnDescent: false } })
  vm.addMemory(0, 8 * MiB) // slot 0: the guest's page tables, 4K host pages
  vm.addMemory(DATA, 8 * MiB, { thp: true }) // slot 1: data, THP
  load(vm)
  return vm
}

function setDirtyLogging(vm: Vm, on: boolean): void {
  const slot = vm.memslots.space(0).byId.get(1)!
  vm.setUserMemoryRegion({ slot: 1, asId: 0, flags: on ? KVM_MEM_LOG_DIRTY_PAGES : 0, guestPhysAddr: DATA, memorySize: 8 * MiB, userspaceAddr: slot.userspaceAddr })
}

/** The three phases of the guest: before, during and after dirty logging. Reads are logged. */
function phases(log: number[]): [Body, Body, Body] {
  return [
    function* (g) {
      log.push(yield* g.userRead(L.va(0, 0, 0)))
      for (const j of [0, 5, 511]) yield* g.write32(page(j), 0x100 + j)
    },
    function* (g) {
      for (const j of [0, 5, 511]) yield* g.write32(page(j) + 8, 0x200 + j) // three 4K writes
      for (const j of [7, 300]) log.push(yield* g.read(page(j))) // two 4K reads
    },
    function* (g) {
      for (const j of [7, 0, 5, 511]) log.push(yield* g.read(page(j)), yield* g.read(page(j) + 8))
      log.push(yield* g.userRead(L.va(0, 0, 0)))
    },
  ]
}

describe('dirty logging off zaps the collapsible SPTEs; the next fault maps 2M again', () => {
  // legacy-tdp: the hardware walks the guest's tables (slot 0) through EPT, so they are mapped 4K
  // too; shadow paging: KVM reads them in software, the guest's 2M page of slot 1 is the only leaf.
  for (const [name, strategy] of [
    ['legacy-tdp (EPT over THP)', legacyTdpStrategy],
    ['shadow (a guest 2M page over THP)', shadowStrategy],
  ] as const) {
    it(`${name}: 2M → five 4K SPTEs while logging → five zapped (one flush) → one 2M SPTE; data as on bare metal`, () => {
      const vm = makeVm(strategy)
      const mmu = shadowMmuOf(vm)
      const s = vm.stats
      const log: number[] = []
      const [before, during, after] = phases(log)

      runScript(vm, before)
      const tables4k = s.pages_4k
      expect(s.pages_2m).toBe(1) // the THP-backed 2M region [8, 10) MiB
      if (strategy === legacyTdpStrategy) expect(tables4k).toBeGreaterThan(0)
      else expect(tables4k).toBe(1) // the user's 4K page: a leaf of an indirect page, in slot 1's rmap

      setDirtyLogging(vm, true)
      runScript(vm, during, false)
      // Every write and read in the region now faults at 4K (no prefetch under dirty logging): the
      // 2M SPTE was replaced by a direct level-1 page holding exactly the five touched pages.
      expect(s.pages_2m).toBe(0)
      expect(s.pages_4k).toBe(tables4k + 5)
      expect(mmu.counters.collapsibleSptesZapped).toBe(0)

      const flushes = s.remote_tlb_flush
      const used = mmu.nUsedMmuPages
      setDirtyLogging(vm, false)
      expect(mmu.counters.collapsibleSptesZapped).toBe(5)
      expect(s.pages_4k).toBe(tables4k)
      expect(s.remote_tlb_flush - flushes).toBe(1) // kvm_flush_remote_tlbs_memslot, once
      expect(mmu.nUsedMmuPages).toBe(used) // only leaves are zapped; the level-1 page stays linked

      const fixed = vm.vcpus[0]!.stats.pf_fixed
      runScript(vm, after, false)
      // The first read faults and maps the whole 2M region again (orphaning the empty level-1
      // page); the other seven reads hit it, and the user's 4K mapping is still there.
      expect(vm.vcpus[0]!.stats.pf_fixed - fixed).toBe(1)
      expect(s.pages_2m).toBe(1)
      expect(s.pages_4k).toBe(tables4k)
      expect(log).toEqual([0x77, 0, 0, 0, 0, 0x100, 0x200, 0x105, 0x205, 0x2ff, 0x3ff, 0x77])
      expect(mmu.audit()).toEqual([])

      const refLog: number[] = []
      const ref = runScriptOnReference(vm, load, phases(refLog))
      expect(refLog).toEqual(log)
      expect(diffGuestMemory(vm, ref)).toEqual([])
      vm.destroy()
      expect(vm.mmuPagesLive).toBe(0)
    })
  }

  it('legacy-tdp: nothing is zapped where the host maps 4K (no THP) — the leaves could not be bigger', () => {
    const vm = new Vm({ strategy: legacyTdpStrategy, strategyOptions: { auditEveryOp: true }, vcpus: 1, hostMemBytes: 128 * MiB, features: { nonLeafAOnDescent: false } })
    vm.addMemory(0, 8 * MiB)
    vm.addMemory(DATA, 8 * MiB) // 4K host pages
    load(vm)
    const mmu = shadowMmuOf(vm)
    const log: number[] = []
    const [before, during, after] = phases(log)
    runScript(vm, before)
    setDirtyLogging(vm, true)
    runScript(vm, during, false)
    const pages4k = vm.stats.pages_4k
    setDirtyLogging(vm, false)
    expect(mmu.counters.collapsibleSptesZapped).toBe(0)
    expect(vm.stats.pages_4k).toBe(pages4k)
    runScript(vm, after, false)
    expect(vm.stats.pages_2m).toBe(0)
    expect(log).toEqual([0x77, 0, 0, 0, 0, 0x100, 0x200, 0x105, 0x205, 0x2ff, 0x3ff, 0x77])
    expect(mmu.audit()).toEqual([])
    vm.destroy()
  })
})
