import { describe, expect, it } from 'vitest'
import { memstress } from '@mmusim/guest'
import { EXIT_EPT_MISCONFIG, EXIT_EPT_VIOLATION, PFERR_P, PFERR_RSVD } from '@mmusim/x86-hw'
import { isKvmError, type PageFault, parseStrategyOptions, RET_PF_EMULATE, Vm } from '@mmusim/kvm'
import { getTdpMmu, tdpStrategy, tdpVcpuState } from './index.ts'
import { diffGuestMemory, runOnBare, runOnVm } from './testing/harness.spec.ts'
import { pageBatch, rawGuest, READ, WRITE } from './testing/raw-guest.ts'

function touch(vm: Vm, cpu: number, gpa: number, pages: number, kind = WRITE): void {
  const res = { ok: true }
  vm.spawnGuest(cpu, rawGuest(vm.vcpus[cpu]!.guest.op, [pageBatch(gpa, pages, kind)], res))
  vm.run()
  expect(res.ok).toBe(true)
}

function newVm(vcpus: number, strategyOptions: object = {}): Vm {
  const vm = new Vm({ strategy: tdpStrategy, strategyOptions, vcpus, hostMemBytes: 64 << 20 })
  vm.addMemory(0, 4 << 20, { slot: 0 })
  return vm
}

describe('options', () => {
  it('defaults and validation', () => {
    const o = parseStrategyOptions(tdpStrategy, {})
    expect(o).toMatchObject({ format: 'ept', levels: 4, adEnabled: true, eagerSplit: true, nxHugePages: false, fastPageFault: true, rootLifecycle: 'current' })
    expect(o.testHazards.noFlushBeforeYield).toBe(false)
    expect(() => parseStrategyOptions(tdpStrategy, { format: 'npt', adEnabled: false })).toThrow(/EPT-only/)
    expect(() => parseStrategyOptions(tdpStrategy, { levels: 3 })).toThrow(/levels/)
    expect(() => parseStrategyOptions(tdpStrategy, { rootLifecycle: '5.10' })).toThrow(/rootLifecycle/)
    expect(() => parseStrategyOptions(tdpStrategy, { bogus: 1 })).toThrow(/bogus|Unrecognized/)
  })
})

describe('roots', () => {
  it('vCPUs share one root; refcount = TDP MMU + one per vCPU; unload keeps it (≥ 6.4)', () => {
    const vm = newVm(2)
    touch(vm, 0, 0, 4)
    touch(vm, 1, 0x100000, 4)
    const mmu = getTdpMmu(vm)
    const root = mmu.rootsHead!
    expect(root.next).toBeNull()
    expect(root.rootCount!.read()).toBe(3)
    expect(Object.fromEntries(root.rootCount!.holders())).toEqual({ tdp_mmu: 1, vcpu0: 1, vcpu1: 1 })
    for (const v of vm.vcpus) vm.runKernel('unload', () => vm.mmu.unload(v))
    expect(root.rootCount!.read()).toBe(1)
    expect(vm.stats.pages_4k).toBe(8)
    touch(vm, 0, 0, 4)
    expect(tdpVcpuState(vm.vcpus[0]!).root).toBe(root) // reused, nothing re-faulted
    expect(mmu.counters.roots_allocated).toBe(1)
    expect(vm.vcpus[0]!.stats.pf_fixed).toBe(4)
    expect(vm.mmu.audit()).toEqual([])
    vm.destroy()
    expect(vm.mmuPagesLive).toBe(0)
    expect(vm.rcu.pendingCallbacks).toBe(0)
    expect(mmu.rootsHead).toBeNull()
  })

  it('pre-6.4: the last vCPU put tears the root down; the reload rebuilds everything', () => {
    const vm = newVm(1, { rootLifecycle: 'pre-6.4' })
    touch(vm, 0, 0, 4)
    const mmu = getTdpMmu(vm)
    expect(mmu.rootsHead!.rootCount!.read()).toBe(1)
    vm.runKernel('unload', () => vm.mmu.unload(vm.vcpus[0]!))
    expect(mmu.rootsHead).toBeNull()
    expect(vm.stats.pages_4k).toBe(0)
    touch(vm, 0, 0, 4)
    expect(mmu.counters.roots_allocated).toBe(2)
    expect(vm.vcpus[0]!.stats.pf_fixed).toBe(8)
    expect(vm.mmu.audit()).toEqual([])
    vm.destroy()
    expect(vm.mmuPagesLive).toBe(0)
  })

  it('fast zap (memslot delete): invalidate, zap once, put the gift; vCPUs reload a new root', () => {
    const vm = newVm(2)
    vm.addMemory(8 << 20, 1 << 20, { slot: 1 })
    touch(vm, 0, 0, 4)
    touch(vm, 1, 8 << 20, 2)
    const mmu = getTdpMmu(vm)
    const old = mmu.rootsHead!
    const s1 = vm.memslots.idToMemslot(0, 1)!
    vm.setUserMemoryRegion({ slot: 1, asId: 0, flags: 0, guestPhysAddr: s1.baseGfn * 4096, memorySize: 0, userspaceAddr: s1.userspaceAddr })
    expect(old.invalid).toBe(true)
    expect(old.invalidatedZaps).toBe(1)
    expect(old.scheduledToZap).toBe(false)
    expect(vm.stats.pages_4k).toBe(0)
    expect(old.rootCount!.read()).toBe(2) // the vCPUs still hold it until they free obsolete roots
    expect(vm.mmu.audit()).toEqual([])
    touch(vm, 0, 0, 4)
    touch(vm, 1, 0x100000, 1)
    expect(old.freed || !old.onList).toBe(true)
    expect(mmu.rootsHead).not.toBe(old)
    expect(vm.stats.pages_4k).toBe(5)
    expect(vm.mmu.audit()).toEqual([])
    vm.destroy()
    expect(vm.mmuPagesLive).toBe(0)
  })

  it('prev-roots cache: a role switch keeps the old root cached and switches back without a new root', () => {
    const vm = newVm(1)
    touch(vm, 0, 0, 2)
    const mmu = getTdpMmu(vm)
    const v = vm.vcpus[0]!
    const st = tdpVcpuState(v)
    const r0 = st.root!
    vm.runKernel('to-l2', () => mmu.switchRootRole(v, st, true))
    expect(st.root).toBeNull()
    expect(st.prevRoots[0]).toBe(r0)
    touch(vm, 0, 0, 2) // loads a guest_mode root
    const r1 = st.root!
    expect(r1).not.toBe(r0)
    expect(mmu.counters.roots_allocated).toBe(2)
    vm.runKernel('to-l1', () => mmu.switchRootRole(v, st, false))
    expect(st.root).toBe(r0)
    expect(st.prevRoots[0]).toBe(r1)
    expect(Object.fromEntries(r0.rootCount!.holders())).toEqual({ tdp_mmu: 1, vcpu0: 1 })
    expect(vm.mmu.audit()).toEqual([])
    // A fast zap invalidates the cached root too; freeing obsolete roots drops it from the cache.
    const s = vm.memslots.idToMemslot(0, 0)!
    vm.addMemory(16 << 20, 1 << 20, { slot: 2 })
    vm.setUserMemoryRegion({ slot: 2, asId: 0, flags: 0, guestPhysAddr: 16 << 20, memorySize: 0, userspaceAddr: vm.memslots.idToMemslot(0, 2)!.userspaceAddr })
    vm.runKernel('free_obsolete', () => vm.mmu.freeObsoleteRoots(v))
    expect(st.root).toBeNull()
    expect(st.prevRoots.every((r) => r === null)).toBe(true)
    expect(s.npages).toBe(1024)
    vm.destroy()
    expect(vm.mmuPagesLive).toBe(0)
  })
})

describe('MMIO SPTEs', () => {
  it('a fault on a gpa with no memslot installs an MMIO SPTE; the misconfig exit is emulated while current', () => {
    for (const format of ['ept', 'npt'] as const) {
      const vm = newVm(1, { format })
      touch(vm, 0, 0, 1)
      const v = vm.vcpus[0]!
      const gpa = 0x3000_0000
      const pf = (errorCode: number, exitReason: number): PageFault => ({ addr: gpa, errorCode, kind: 0, gla: 0, exitReason })
      const r1 = vm.runKernel('mmio', () => vm.mmu.pageFault(v, pf(0, EXIT_EPT_VIOLATION)))
      expect(r1).toBe(RET_PF_EMULATE)
      expect(v.stats.pf_mmio_spte_created).toBe(1)
      const r2 = vm.runKernel('mmio2', () => vm.mmu.pageFault(v, pf(PFERR_P | PFERR_RSVD, EXIT_EPT_MISCONFIG)))
      expect(r2).toBe(RET_PF_EMULATE)
      expect(v.stats.pf_mmio_spte_created).toBe(1) // served from the MMIO SPTE
      vm.addMemory(0x2000_0000, 1 << 20, { slot: 3 }) // generation moves on: the SPTE is stale
      const r3 = vm.runKernel('mmio3', () => vm.mmu.pageFault(v, pf(PFERR_P | PFERR_RSVD, EXIT_EPT_MISCONFIG)))
      expect(r3).toBe(RET_PF_EMULATE)
      expect(v.stats.pf_mmio_spte_created).toBe(2) // rebuilt with the new generation
      expect(vm.mmu.audit()).toEqual([])
      vm.destroy()
    }
  })
})

describe('formats and variants match bare metal', () => {
  const program = (cpu: Parameters<typeof memstress>[0]) => memstress(cpu, { iterations: 2, bytesPerVcpu: 32 * 4096 })
  for (const [name, opts] of [
    ['NPT', { format: 'npt' }],
    ['5-level EPT', { levels: 5 }],
    ['5-level NPT', { format: 'npt', levels: 5 }],
    ['EPT without A/D', { adEnabled: false }],
    ['no fast page fault', { fastPageFault: false }],
    ['pre-6.4 roots', { rootLifecycle: 'pre-6.4' }],
    ['NX huge pages + THP', { nxHugePages: true }],
  ] as const) {
    it(`${name}, 2 vCPUs`, () => {
      const { vm, totals, stats } = runOnVm(2, program, { strategyOptions: opts, thp: name.includes('THP') })
      const { ref, result } = runOnBare(vm, program)
      expect(totals.mismatches).toBe(0)
      expect(totals.pageFaults).toBe(result.pageFaults)
      expect(stats).toEqual(result.stats)
      expect(diffGuestMemory(vm, ref)).toEqual([])
      expect(vm.mmu.audit()).toEqual([])
      vm.destroy()
      expect(vm.mmuPagesLive).toBe(0)
    })
  }
})

describe('aging and access tracking', () => {
  for (const adEnabled of [true, false]) {
    it(`host aging ${adEnabled ? 'clears A' : 'access-tracks (A/D disabled)'}; the fast page fault restores`, () => {
      const vm = newVm(1, { adEnabled })
      touch(vm, 0, 0, 8, WRITE)
      const slot = vm.memslots.idToMemslot(0, 0)!
      const underWrite = <R>(fn: () => R): R =>
        vm.runKernel('host', function* () {
          yield* vm.mmuLock.writeLock()
          const y = fn()
          vm.mmuLock.writeUnlock()
          return y
        })
      expect(underWrite(() => vm.host.testYoung(slot.userspaceAddr))).toBe(true)
      expect(underWrite(() => vm.host.age(slot.userspaceAddr, 8 * 4096))).toBe(true)
      vm.flushRemoteTlbs()
      expect(underWrite(() => vm.host.testYoung(slot.userspaceAddr))).toBe(false)
      const fast0 = vm.vcpus[0]!.stats.pf_fast
      touch(vm, 0, 0, 8, READ)
      // EPT A/D: the CPU sets A again without an exit; access tracking: fast page faults.
      expect(vm.vcpus[0]!.stats.pf_fast - fast0).toBe(adEnabled ? 0 : 8)
      expect(underWrite(() => vm.host.testYoung(slot.userspaceAddr))).toBe(true)
      expect(vm.mmu.audit()).toEqual([])
      vm.destroy()
    })
  }

  it('host munmap zaps the SPTEs (notifier unmap) and the host may free the pages', () => {
    const vm = newVm(1)
    touch(vm, 0, 0, 16)
    const slot = vm.memslots.idToMemslot(0, 0)!
    vm.hostOp('munmap', vm.sched.now, (h) => { h.munmap(slot.userspaceAddr, 8 * 4096); })
    vm.run()
    expect(vm.stats.pages_4k).toBe(8)
    expect(vm.mmu.audit()).toEqual([])
    try {
      touch(vm, 0, 0, 1)
      expect.unreachable()
    } catch (e) {
      expect(isKvmError(e) || String(e).includes('EFAULT')).toBe(true)
    }
  })
})
