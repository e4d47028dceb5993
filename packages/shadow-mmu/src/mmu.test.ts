/**
 * Scripted scenarios with exact KVM statistics, host-side events (MMU notifier), dirty logging,
 * memslot deletion, roots and the page quota.
 */
import { describe, expect, it } from 'vitest'
import { GUEST_HVA_BASE, KVM_MEM_LOG_DIRTY_PAGES, type MmuStrategy, Vm } from '@mmusim/kvm'
import { legacyTdpStrategy, shadowStrategy } from './index.ts'
import { type ShadowMmu, shadowMmuOf } from './shadow-mmu.ts'
import { A, D, fillFrame, L, linkUserPt, loadKernelTables, mapUser, P, RW, runScript, US } from './testing/script-guest.ts'

function makeVm(strategy: MmuStrategy, options: Record<string, unknown> = {}, flags = 0): { vm: Vm; mmu: ShadowMmu } {
  const vm = new Vm({ strategy, strategyOptions: { auditEveryOp: true, ...options }, vcpus: 1, hostMemBytes: 128 << 20, features: { nonLeafAOnDescent: false } })
  vm.addMemory(0, 32 << 20, { flags })
  loadKernelTables(vm)
  return { vm, mmu: shadowMmuOf(vm) }
}

describe('KVM statistics in a scripted scenario (shadow, prefetch off)', () => {
  it('pf_fixed, pf_emulate, mmu_unsync, mmu_shadow_zapped, mmu_flooded, mmu_pte_write, mmu_pde_zapped, mmu_cache_miss, mmu_recycled', () => {
    const { vm, mmu } = makeVm(shadowStrategy, { prefetch: false })
    linkUserPt(vm, 0, 0, 0)
    for (let j = 0; j < 4; j++) mapUser(vm, 0, j, j)
    const vs = vm.vcpus[0]!.stats
    const s = vm.stats
    const snap: Record<string, number[]> = {}
    const take = (name: string) => {
      snap[name] = [vs.pf_fixed, vs.pf_emulate, s.mmu_unsync, s.mmu_shadow_zapped, s.mmu_flooded, s.mmu_pte_write, s.mmu_pde_zapped, s.mmu_cache_miss]
    }
    const pte = (f: number) => L.frame(f) | P | RW | US | A | D
    runScript(vm, function* (g) {
      yield* g.userRead(L.va(0, 0, 0)) // root (at load), L3, L2, L1 created
      take('user fault')
      yield* g.write64(L.pt(0) + 8, pte(1)) // kernel write to the shadowed PT: it goes unsync
      take('unsync')
      yield* g.write64(L.pt(0) + 16, pte(2)) // no exit: the PT is writable now
      take('native write')
      yield* g.movCr3() // flush → KVM_REQ_MMU_SYNC → sync, write-protect again
      yield* g.read(0)
      take('synced')
      yield* g.userRead(L.va(0, 0, 1))
      yield* g.write64(L.pt(0) + 24, pte(3)) // unsync again
      take('unsync again')
      for (let k = 5; k < 8; k++) yield* g.write64(L.userPd(0) + k * 8, L.pt(k) | P | RW | US | A) // write-tracked PD: emulated
      take('flooded')
      yield* g.userRead(L.va(0, 0, 0))
      take('rebuilt')
    })
    //                   pf_fixed emulate unsync zapped flooded pte_write pde_zapped cache_miss
    // The boot's paging-off root is the first cache miss; the script's kernel read(0) after the
    // flush is a fault of its own.
    expect(snap).toEqual({
      'user fault': [1, 0, 0, 0, 0, 0, 0, 5],
      unsync: [2, 0, 1, 0, 0, 0, 0, 7],
      'native write': [2, 0, 1, 0, 0, 0, 0, 7],
      synced: [3, 0, 0, 0, 0, 0, 0, 7],
      'unsync again': [5, 0, 1, 0, 0, 0, 0, 7],
      // Three emulated writes to the PD without a walk through it: the third zaps it (and its unsync child).
      flooded: [5, 3, 0, 2, 1, 3, 2, 7],
      rebuilt: [6, 3, 0, 2, 1, 3, 2, 9],
    })
    // Recycling: everything but the root goes, counted once each.
    const used = mmu.nUsedMmuPages
    vm.runKernel('shrink', () => mmu.changeMmuPages(1))
    expect(s.mmu_recycled).toBe(used - 1)
    expect(mmu.nMaxMmuPages).toBe(1)
    expect(mmu.audit()).toEqual([])
    vm.destroy()
  })

  it('with unsync off, every write to a shadowed PT is emulated (mmu_set_spte refuses it: RET_PF_WRITE_PROTECTED) and zaps the one SPTE', () => {
    const { vm, mmu } = makeVm(shadowStrategy, { prefetch: false, unsync: false })
    linkUserPt(vm, 0, 0, 0)
    for (let j = 0; j < 4; j++) mapUser(vm, 0, j, j)
    fillFrame(vm, 3, 33)
    let v = 0
    runScript(vm, function* (g) {
      yield* g.userRead(L.va(0, 0, 0))
      for (let j = 1; j < 4; j++) yield* g.write64(L.pt(0) + j * 8, L.frame(3) | P | RW | US | A | D)
      v = yield* g.userRead(L.va(0, 0, 2))
    })
    expect(v).toBe(33)
    expect(vm.vcpus[0]!.stats.pf_emulate).toBe(3)
    expect(vm.stats.mmu_unsync).toBe(0)
    expect(vm.stats.mmu_pte_write).toBe(3)
    expect(vm.stats.mmu_flooded).toBe(0) // level-1 pages never count as flooded
    expect(mmu.counters.writeProtectedFaults).toBe(3)
    expect(mmu.audit()).toEqual([])
    vm.destroy()
  })
})

describe('roots', () => {
  it('MOV CR3 switches between cached roots (prev_roots rotation) and frees the LRU one', () => {
    const { vm, mmu } = makeVm(shadowStrategy)
    // Five address spaces: PML4 copies at 0x6000 + 0x1000·i sharing the lower tables.
    const pml4s = [0, 1, 2, 3, 4].map((i) => 0x10000 + i * 0x1000)
    for (const p of pml4s) vm.guestMem.write32(p, L.pdpt | P | RW | US | A)
    const hpas: number[][] = []
    runScript(vm, function* (g) {
      for (const p of pml4s) {
        yield* g.movCr3(p)
        yield* g.read(0)
        const r = mmu.rootsOf(vm.vcpus[0]!)
        hpas.push([r.root.hpa, ...r.prev.map((x) => x.hpa)])
      }
      // Back to the third: a hit in prev_roots, no new root.
      const miss = vm.stats.mmu_cache_miss
      yield* g.movCr3(pml4s[2])
      yield* g.read(0)
      expect(vm.stats.mmu_cache_miss).toBe(miss)
    })
    const last = hpas[4]!
    expect(new Set(last).size).toBe(4) // current + 3 previous, all distinct
    expect(last.slice(1)).toEqual([hpas[3]![0], hpas[2]![0], hpas[1]![0]]) // MRU order
    expect(mmu.audit()).toEqual([])
    vm.destroy()
  })

  it('a fast zap (memslot deletion) obsoletes every page; roots are freed through KVM_REQ_MMU_FREE_OBSOLETE_ROOTS', () => {
    const { vm, mmu } = makeVm(shadowStrategy)
    linkUserPt(vm, 0, 0, 0)
    mapUser(vm, 0, 0, 0)
    vm.addMemory(64 << 20, 4 << 20, { slot: 5 })
    runScript(vm, function* (g) {
      yield* g.userRead(L.va(0, 0, 0))
    })
    expect(mmu.nUsedMmuPages).toBeGreaterThan(3)
    const gen = mmu.mmuValidGen
    vm.setUserMemoryRegion({ slot: 5, asId: 0, flags: 0, guestPhysAddr: 64 << 20, memorySize: 0, userspaceAddr: GUEST_HVA_BASE })
    expect(mmu.mmuValidGen).toBe(gen ^ 1)
    // The root is still referenced by the vCPU: invalid, off the active list, not freed yet.
    expect(mmu.nUsedMmuPages).toBe(1)
    expect(mmu.audit()).toEqual([])
    vm.destroy()
    expect(vm.mmuPagesLive).toBe(0)
  })
})

describe('dirty logging', () => {
  for (const [name, strategy] of [['shadow', shadowStrategy], ['legacy-tdp', legacyTdpStrategy]] as const) {
    it(`${name}: dirty logging write-protects, logs every written page, and re-protects on KVM_GET_DIRTY_LOG`, () => {
      const { vm, mmu } = makeVm(strategy, {}, KVM_MEM_LOG_DIRTY_PAGES)
      linkUserPt(vm, 0, 0, 0)
      for (let j = 0; j < 8; j++) mapUser(vm, 0, j, j)
      vm.getDirtyLog(0, 0) // drop the loader's writes
      const bits = (log: Uint32Array) => {
        const out: number[] = []
        for (let i = 0; i < log.length * 32; i++) if ((log[i >>> 5]! >>> (i & 31)) & 1) out.push(i)
        return out
      }
      const frames = (js: number[]) => js.map((j) => L.frame(j) / 4096)
      runScript(vm, function* (g) {
        for (let j = 0; j < 8; j++) yield* g.userRead(L.va(0, 0, j))
        for (let j = 0; j < 8; j += 2) yield* g.userWrite(L.va(0, 0, j), 100 + j)
      })
      const first = bits(vm.getDirtyLog(0, 0)).filter((gfn) => gfn >= L.frame(0) / 4096)
      // make_spte() logs a page when it creates a writable SPTE: the read faults of pages whose gPTE
      // is dirty and writable already did.
      expect(first).toEqual(frames([0, 1, 2, 3, 4, 5, 6, 7]))
      // Harvesting write-protected them again: the next writes fault and are logged anew.
      const before = vm.vcpus[0]!.stats.pf_taken
      runScript(
        vm,
        function* (g) {
          yield* g.userWrite(L.va(0, 0, 2), 1)
          yield* g.userWrite(L.va(0, 0, 3), 1)
        },
        false,
      )
      // Shadow: the two user writes. TDP: also the hardware's A/D writes to the four guest paging
      // structures, which were logged and re-protected too — fixed by the lockless fast path.
      expect(vm.vcpus[0]!.stats.pf_taken - before).toBe(name === 'shadow' ? 2 : 6)
      if (name === 'legacy-tdp') expect(vm.vcpus[0]!.stats.pf_fast).toBe(6)
      const second = bits(vm.getDirtyLog(0, 0)).filter((gfn) => gfn >= L.frame(0) / 4096)
      expect(second).toEqual(frames([2, 3]))
      expect(mmu.audit()).toEqual([])
      vm.destroy()
    })
  }
})

