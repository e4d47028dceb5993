import { describe, expect, it } from 'vitest'
import { gfnToHvaMemslot, Vm } from '@mmusim/kvm'
import { ACC_READ } from '@mmusim/x86-hw'
import { shadowStrategy } from './index.ts'
import { shadowMmuOf } from './shadow-mmu.ts'
import { POPULATE_BASE, setUpPopulate } from './testing/populate-guest.ts'

// FNAME(walk_addr)'s reads of guest tables: the walker caches the host frames of the tables it
// read, and must drop them whenever the host mapping or the memslots may have changed.

const PT0 = 0x100000 // the populate layout's first page table (maps POPULATE_BASE)

function walkedVm(): { vm: Vm; walk: (va: number) => number } {
  const vm = new Vm({ strategy: shadowStrategy, vcpus: 1, hostMemBytes: 64 << 20 })
  setUpPopulate(vm, { vcpus: 1, bytesPerVcpu: 2 << 20 })
  vm.run() // the guest enabled paging and touched every page: its tables are in host memory
  const vcpu = vm.vcpus[0]!
  const w = shadowMmuOf(vm).vmmu(vcpu).walker
  return {
    vm,
    walk: (va) => {
      expect(w.walkAddr(vcpu, va, ACC_READ, 0)).toBe(true)
      return w.gfn
    },
  }
}

describe('GuestWalker: the cache of guest-table frames', () => {
  it('a walk through tables read before translates none of them again (4 levels, 0 host lookups)', () => {
    const { vm, walk } = walkedVm()
    expect(walk(POPULATE_BASE + 5 * 4096)).toBe(POPULATE_BASE / 4096 + 5)
    const before = vm.host.stats.resolves
    expect(walk(POPULATE_BASE + 6 * 4096)).toBe(POPULATE_BASE / 4096 + 6)
    expect(vm.host.stats.resolves - before).toBe(0)
    vm.destroy()
  })

  it('a host migration of a table page (notifier invalidation) drops the cache: the walk reads the new frame', () => {
    const { vm, walk } = walkedVm()
    walk(POPULATE_BASE + 5 * 4096)
    const slot = vm.memslots.gfnToMemslot(0, PT0 / 4096)!
    const seq = vm.notifierState.seq
    vm.hostOpYielding('migrate PT', vm.sched.now, (host) => host.migratePageOp(gfnToHvaMemslot(slot, PT0 / 4096)))
    vm.run()
    expect(vm.host.stats.migrations).toBe(1)
    expect(vm.notifierState.seq).toBeGreaterThan(seq)
    // Point page 5's gPTE elsewhere, through the new mapping: only a fresh translation sees it.
    vm.guestMem.write32(PT0 + 5 * 8, (POPULATE_BASE + 9 * 4096) | 3)
    const before = vm.host.stats.resolves
    expect(walk(POPULATE_BASE + 5 * 4096)).toBe(POPULATE_BASE / 4096 + 9)
    // Every level translated afresh, plus the write that sets A in the rewritten gPTE.
    expect(vm.host.stats.resolves - before).toBe(5)
    vm.destroy()
  })

  it('a memslot change (new generation) drops the cache', () => {
    const { vm, walk } = walkedVm()
    walk(POPULATE_BASE + 5 * 4096)
    vm.addMemory(2 ** 32, 2 << 20, { slot: 7 })
    const before = vm.host.stats.resolves
    expect(walk(POPULATE_BASE + 5 * 4096)).toBe(POPULATE_BASE / 4096 + 5)
    expect(vm.host.stats.resolves - before).toBe(4)
    vm.destroy()
  })

  it('nothing is cached while an invalidation is in progress', () => {
    const { vm, walk } = walkedVm()
    const ns = vm.notifierState
    ns.inProgress++
    try {
      walk(POPULATE_BASE + 5 * 4096)
      const before = vm.host.stats.resolves
      walk(POPULATE_BASE + 6 * 4096)
      expect(vm.host.stats.resolves - before).toBe(4)
    } finally {
      ns.inProgress--
    }
    vm.destroy()
  })
})
