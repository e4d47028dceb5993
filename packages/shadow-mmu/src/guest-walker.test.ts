import { describe, expect, it } from 'vitest'
import { gfnToHvaMemslot, Vm } from '@mmusim/kvm'
import { ACC_READ } from '@mmusim/x86-hw'
import { shadowStrategy } from './index.ts'
import { shadowMmuOf } from './shadow-mmu.ts'
import { POPULATE_BASE, setUpPopulate } from './testing/populate-guest.ts'

// FNAME(walk_addr)'s reads of guest tables: the walker caches the host frames of the tables it
// read, and must drop them whenever the host mapping or the memslots may have changed.

const PT0 = 0x100000 // the populate layout's first page table (maps POPULATE_BASE)

/**
 * A VM after the populate pass (paging on, every table in host memory) and `walk(page)`: the
 * walker's FNAME(walk_addr) of page `page` of the populate region — the page it maps to and the
 * host lookups (`hva_to_pfn`) the walk made.
 */
function walkedVm(): { vm: Vm; walk: (page: number) => { page: number; lookups: number } } {
  const vm = new Vm({ strategy: shadowStrategy, vcpus: 1, hostMemBytes: 64 << 20 })
  setUpPopulate(vm, { vcpus: 1, bytesPerVcpu: 2 << 20 })
  vm.run()
  const vcpu = vm.vcpus[0]!
  const w = shadowMmuOf(vm).vmmu(vcpu).walker
  return {
    vm,
    walk: (page) => {
      const before = vm.host.stats.resolves
      expect(w.walkAddr(vcpu, POPULATE_BASE + page * 4096, ACC_READ, 0)).toBe(true)
      return { page: w.gfn - POPULATE_BASE / 4096, lookups: vm.host.stats.resolves - before }
    },
  }
}

describe('GuestWalker: the cache of guest-table frames', () => {
  it('a walk through tables read before translates none of them again (4 levels, 0 host lookups)', () => {
    const { vm, walk } = walkedVm()
    expect(walk(5).page).toBe(5)
    expect(walk(6)).toEqual({ page: 6, lookups: 0 })
    vm.destroy()
  })

  it('a host migration of a table page (notifier invalidation) drops the cache: the walk reads the new frame', () => {
    const { vm, walk } = walkedVm()
    walk(5)
    const slot = vm.memslots.gfnToMemslot(0, PT0 / 4096)!
    const seq = vm.notifierState.seq
    vm.hostOpYielding('migrate PT', vm.sched.now, (host) => host.migratePageOp(gfnToHvaMemslot(slot, PT0 / 4096)))
    vm.run()
    expect(vm.host.stats.migrations).toBe(1)
    expect(vm.notifierState.seq).toBeGreaterThan(seq)
    // Point page 5's gPTE at page 9, through the new mapping: only a fresh translation sees it.
    // Every level is translated afresh, plus the write that sets A in the rewritten gPTE.
    vm.guestMem.write32(PT0 + 5 * 8, (POPULATE_BASE + 9 * 4096) | 3)
    expect(walk(5)).toEqual({ page: 9, lookups: 5 })
    vm.destroy()
  })

  it('a memslot change (new generation) drops the cache', () => {
    const { vm, walk } = walkedVm()
    walk(5)
    vm.addMemory(2 ** 32, 2 << 20, { slot: 7 })
    expect(walk(5)).toEqual({ page: 5, lookups: 4 })
    vm.destroy()
  })

  it('nothing is cached while an invalidation is in progress', () => {
    const { vm, walk } = walkedVm()
    vm.notifierState.inProgress++
    walk(5)
    expect(walk(6)).toEqual({ page: 6, lookups: 4 })
    vm.notifierState.inProgress--
    expect(walk(7)).toEqual({ page: 7, lookups: 4 }) // refilled now that no invalidation runs
    expect(walk(8)).toEqual({ page: 8, lookups: 0 })
    vm.destroy()
  })
})
