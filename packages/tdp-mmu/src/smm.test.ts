/**
 * The SMM address space (as_id 1; tdp-mmu.md §2, §3, §8): a vCPU in SMM has `root_role.smm` set,
 * so it gets its own root, faults resolve through the memslots of address space 1, VM-wide walkers
 * visit the roots of every address space (seed 002), memslot-scoped ones only their own, and MMU
 * notifier unmap/aging reach each address space through its own memslots.
 *
 * Memory layout (as QEMU builds it): address space 0 = 4 MiB of RAM at gpa 0; address space 1 =
 * 1 MiB of SMRAM of its own at gpa 0 plus an alias of RAM above 1 MiB (same host memory).
 */
import { describe, expect, it } from 'vitest'
import { KVM_MEM_LOG_DIRTY_PAGES, type Memslot, Vm } from '@mmusim/kvm'
import { getTdpMmu, ROLE_SMM, tdpStrategy, tdpVcpuState } from './index.ts'
import { ageNow, scanLeaves } from './testing/aging.spec.ts'
import { FETCH, pageBatch, rawGuest, READ, WRITE } from './testing/raw-guest.ts'

const MiB = 1 << 20
const P2M = 0x200 // gfn 512 = 2 MiB: RAM, aliased in SMM

function smmVm(strategyOptions: object = {}, thp = false): Vm {
  const vm = new Vm({ strategy: tdpStrategy, strategyOptions, vcpus: 1, hostMemBytes: 64 << 20 })
  vm.addMemory(0, 4 * MiB, { slot: 0, thp })
  vm.addMemory(0, MiB, { slot: 0, asId: 1 }) // SMRAM
  const ram = vm.memslots.idToMemslot(0, 0)!
  vm.setUserMemoryRegion({ slot: 1, asId: 1, flags: 0, guestPhysAddr: MiB, memorySize: 3 * MiB, userspaceAddr: ram.userspaceAddr + MiB })
  return vm
}

/** Run one batch on vCPU 0; returns the values a READ batch saw. */
function access(vm: Vm, gfn: number, pages: number, kind: number, value = 0): number[] {
  const b = pageBatch(gfn * 4096, pages, kind, value)
  const res = { ok: true }
  vm.spawnGuest(0, rawGuest(vm.vcpus[0]!.guest.op, [b], res))
  vm.run()
  expect(res.ok).toBe(true)
  return [...b.values]
}

describe('SMM: roots per role, memslots of address space 1', () => {
  it('entering SMM unloads the root; the vCPU loads a distinct SMM root backed by address space 1; leaving reuses the old root', () => {
    const vm = smmVm()
    const mmu = getTdpMmu(vm)
    const v = vm.vcpus[0]!
    const st = tdpVcpuState(v)
    access(vm, 0, 1, WRITE, 0xaaaa)
    access(vm, P2M, 1, WRITE, 0xbbbb)
    const normal = st.root!
    expect(normal.asId).toBe(0)
    expect(normal.role & ROLE_SMM).toBe(0)

    vm.setVcpuSmm(0, true) // KVM_SET_VCPU_EVENTS → kvm_smm_changed → kvm_mmu_reset_context
    expect(v.asId).toBe(1)
    expect(st.root).toBeNull()
    expect(Object.fromEntries(normal.rootCount!.holders())).toEqual({ tdp_mmu: 1 }) // kept by the TDP MMU (≥ 6.4)
    access(vm, 0, 1, WRITE, 0xcccc) // SMRAM page 0
    expect(access(vm, P2M, 1, READ)).toEqual([0xbbbb]) // RAM through the alias
    const smm = st.root!
    expect(smm).not.toBe(normal)
    expect(smm.asId).toBe(1)
    expect(smm.role).toBe(normal.role | ROLE_SMM)
    expect(mmu.counters.roots_allocated).toBe(2)
    // The SMM write went to SMRAM, not RAM.
    const ram = vm.memslots.idToMemslot(0, 0)!
    const smram = vm.memslots.idToMemslot(1, 0)!
    expect(vm.host.read32(ram.userspaceAddr)).toBe(0xaaaa)
    expect(vm.host.read32(smram.userspaceAddr)).toBe(0xcccc)
    expect(scanLeaves(vm, 0, 0, 1024).present).toBe(2)
    expect(scanLeaves(vm, 1, 0, 1024).present).toBe(2)

    vm.setVcpuSmm(0, false)
    const fixed = v.stats.pf_fixed
    expect(access(vm, 0, 1, READ)).toEqual([0xaaaa])
    expect(st.root).toBe(normal) // reused: no new root, no new fault
    expect(v.stats.pf_fixed).toBe(fixed)
    expect(mmu.counters.roots_allocated).toBe(2)
    expect(mmu.counters.roots_reused).toBe(1)
    expect(Object.fromEntries(smm.rootCount!.holders())).toEqual({ tdp_mmu: 1 })
    expect(vm.mmu.audit()).toEqual([])
    vm.destroy()
    expect(vm.mmuPagesLive).toBe(0)
  })
})

describe('SMM: walkers across address spaces (seed 002)', () => {
  /** Both roots populated: as0 gfn 0..3 and P2M..+3; as1 gfn 0..1 and P2M..+1. */
  function populated(): Vm {
    const vm = smmVm()
    access(vm, 0, 4, WRITE)
    access(vm, P2M, 4, WRITE)
    vm.setVcpuSmm(0, true)
    access(vm, 0, 2, WRITE)
    access(vm, P2M, 2, READ)
    vm.setVcpuSmm(0, false)
    access(vm, 0, 1, READ) // back on the normal root (reused, nothing faulted)
    expect([scanLeaves(vm, 0, 0, 1024).present, scanLeaves(vm, 1, 0, 1024).present]).toEqual([8, 4])
    return vm
  }

  it('kvm_zap_gfn_range zaps the valid roots of every address space', () => {
    const vm = populated()
    const mmu = getTdpMmu(vm)
    vm.runKernel('zap_gfn_range', () => mmu.kvmZapGfnRange(0, 2))
    expect([scanLeaves(vm, 0, 0, 1024).present, scanLeaves(vm, 1, 0, 1024).present]).toEqual([6, 2])
    expect(vm.stats.pages_4k).toBe(8)
    expect(vm.mmu.audit()).toEqual([])
    vm.destroy()
  })

  it('a memslot-scoped walker (write-protecting an as-1 slot) touches only the SMM root', () => {
    const vm = populated()
    const mmu = getTdpMmu(vm)
    const writable = (asId: number): number => {
      const it = mmu.newIter()
      let n = 0
      for (let r = mmu.rootsHead; r !== null; r = r.next) {
        if (r.asId !== asId) continue
        for (it.start(r, 1, 0); it.valid && it.gfn < 1024; it.next()) if (it.level === 1 && (it.oldLo & 0x800) !== 0 && (it.oldLo & 2) !== 0) n++
      }
      return n
    }
    // Read faults map writable too when the host page is writable.
    expect([writable(0), writable(1)]).toEqual([8, 4])
    const smram = vm.memslots.idToMemslot(1, 0)!
    const changed = vm.runKernel('wrprot', function* () {
      yield* vm.mmuLock.readLock()
      const c = yield* mmu.kvmTdpMmuWrprotSlot(smram, 1)
      vm.mmuLock.readUnlock()
      return c
    })
    expect(changed).toBe(true)
    // Only the SMRAM slot's 2 pages: not the RAM alias in the same address space, not address space 0.
    expect([writable(0), writable(1)]).toEqual([8, 2])
    vm.destroy()
  })

  it('fast zap invalidates the roots of both address spaces; each is zapped once and freed when its last holder puts it', () => {
    const vm = populated()
    const mmu = getTdpMmu(vm)
    const st = tdpVcpuState(vm.vcpus[0]!)
    const normal = st.root!
    const smm = mmu.rootsHead!.asId === 1 ? mmu.rootsHead! : mmu.rootsHead!.next!
    expect(smm.asId).toBe(1)
    vm.addMemory(64 * MiB, MiB, { slot: 7 })
    const spare = vm.memslots.idToMemslot(0, 7)!
    vm.setUserMemoryRegion({ slot: 7, asId: 0, flags: 0, guestPhysAddr: 64 * MiB, memorySize: 0, userspaceAddr: spare.userspaceAddr })
    expect([normal.invalid, smm.invalid]).toEqual([true, true])
    expect([normal.invalidatedZaps, smm.invalidatedZaps]).toEqual([1, 1])
    expect(vm.stats.pages_4k).toBe(0)
    // The SMM root had only the TDP MMU's reference: the zapper's put freed it.
    expect(smm.onList).toBe(false)
    // The normal root lingers until vCPU 0 frees its obsolete roots.
    expect(Object.fromEntries(normal.rootCount!.holders())).toEqual({ vcpu0: 1 })
    expect(vm.mmu.audit()).toEqual([])
    access(vm, 0, 1, READ)
    expect(normal.onList).toBe(false)
    expect(mmu.counters.roots_invalidated).toBe(2)
    vm.destroy()
    expect(vm.mmuPagesLive).toBe(0)
  })
})

/**
 * A VM whose vCPU wrote gfns 0-1 and P2M..P2M+1 outside SMM, then wrote gfns 0-1 (SMRAM) and read
 * P2M..P2M+1 (RAM, aliased) in SMM: both roots map 4 pages. Returns the VM and its two memslots.
 */
function smmVmWithBothRoots(): { vm: Vm; ram: Memslot; smram: Memslot } {
  const vm = smmVm()
  access(vm, 0, 2, WRITE)
  access(vm, P2M, 2, WRITE)
  vm.setVcpuSmm(0, true)
  access(vm, 0, 2, WRITE)
  access(vm, P2M, 2, READ)
  vm.setVcpuSmm(0, false)
  return { vm, ram: vm.memslots.idToMemslot(0, 0)!, smram: vm.memslots.idToMemslot(1, 0)! }
}

describe('SMM: MMU notifiers reach each address space through its own memslots', () => {
  it('unmap of SMRAM zaps only the SMM root; unmap of aliased RAM zaps both', () => {
    const { vm, ram, smram } = smmVmWithBothRoots()
    vm.hostOpYielding('munmap-smram-page', vm.sched.now, (h) => h.munmapOp(smram.userspaceAddr, 4096))
    vm.run()
    // as1 gfn 0 is gone; as0 gfn 0 (same gfn, other memslot) is untouched.
    expect([scanLeaves(vm, 0, 0, 1).present, scanLeaves(vm, 1, 0, 1).present]).toEqual([1, 0])
    expect([scanLeaves(vm, 0, 0, 1024).present, scanLeaves(vm, 1, 0, 1024).present]).toEqual([4, 3])
    vm.hostOpYielding('munmap-ram-page', vm.sched.now, (h) => h.munmapOp(ram.userspaceAddr + P2M * 4096, 4096))
    vm.run()
    expect([scanLeaves(vm, 0, P2M, P2M + 1).present, scanLeaves(vm, 1, P2M, P2M + 1).present]).toEqual([0, 0])
    expect([scanLeaves(vm, 0, 0, 1024).present, scanLeaves(vm, 1, 0, 1024).present]).toEqual([3, 2])
    expect(vm.mmu.audit()).toEqual([])
    vm.destroy()
  })

  it('aging of SMRAM ages only the SMM root; aging aliased RAM ages both', () => {
    const { vm, ram, smram } = smmVmWithBothRoots()
    expect([scanLeaves(vm, 0, 0, 1024).young, scanLeaves(vm, 1, 0, 1024).young]).toEqual([4, 4])
    expect(ageNow(vm, 'clear_young', smram.userspaceAddr, 2 * 4096)).toBe(true)
    expect([scanLeaves(vm, 0, 0, 1024).young, scanLeaves(vm, 1, 0, 1024).young]).toEqual([4, 2])
    expect(ageNow(vm, 'test_young', smram.userspaceAddr, 4096)).toBe(false)
    expect(ageNow(vm, 'test_young', ram.userspaceAddr, 4096)).toBe(true) // as0 gfn 0 is still young
    expect(ageNow(vm, 'clear_young', ram.userspaceAddr + P2M * 4096, 2 * 4096)).toBe(true)
    expect([scanLeaves(vm, 0, 0, 1024).young, scanLeaves(vm, 1, 0, 1024).young]).toEqual([2, 0])
    expect(vm.notifier.stats.ageCalls).toBe(3) // SMRAM: 1 memslot; aliased RAM: 2 (one per address space)
    vm.destroy()
  })
})

describe('SMM: NX recovery looks up the memslot in the SP’s own address space (S17)', () => {
  it('the SMM SP is zapped (its as-1 slot is not dirty-logged) while the as-0 SP of a dirty-logged slot is skipped', () => {
    // RAM at [0, 4 MiB) backed by THP; the SMM alias covers [1 MiB, 4 MiB).
    const vm = smmVm({ nxHugePages: true, nxRecoveryRatio: 1 }, true)
    const mmu = getTdpMmu(vm)
    access(vm, P2M, 1, FETCH) // as0: an NX-disallowed table for the 2 MiB region at 2 MiB
    vm.setVcpuSmm(0, true)
    access(vm, P2M, 1, FETCH) // as1: the same for the SMM root
    vm.setVcpuSmm(0, false)
    expect(vm.stats.nx_lpage_splits).toBe(2)
    expect(mmu.possibleNx.map((sp) => sp.asId)).toEqual([0, 1])
    const ram = vm.memslots.idToMemslot(0, 0)!
    vm.setUserMemoryRegion({ slot: 0, asId: 0, flags: KVM_MEM_LOG_DIRTY_PAGES, guestPhysAddr: 0, memorySize: 4 * MiB, userspaceAddr: ram.userspaceAddr })
    const zapped = vm.runKernel('kvm-nx-lpage-recovery', () => mmu.kvmRecoverNxHugePages())
    expect(zapped).toBe(1)
    expect(vm.stats.nx_lpage_splits).toBe(0)
    expect([scanLeaves(vm, 0, P2M, P2M + 512).present, scanLeaves(vm, 1, P2M, P2M + 512).present]).toEqual([1, 0])
    expect(vm.mmu.audit()).toEqual([])
    vm.destroy()
  })
})
