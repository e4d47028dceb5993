import { describe, expect, it } from 'vitest'
import { memstress } from '@mmusim/guest'
import { type KernelOp, Vm } from '@mmusim/kvm'
import { getTdpMmu, tdpStrategy } from './index.ts'
import { diffGuestMemory, type Program, runOnBare, runOnVm } from './testing/harness.spec.ts'
import { pageBatch, rawGuest, WRITE } from './testing/raw-guest.ts'

const PAGES = 256

function populated(vcpus: number): Vm {
  const vm = new Vm({ strategy: tdpStrategy, vcpus, hostMemBytes: 64 << 20, recordTrace: true })
  vm.addMemory(0, 4 << 20, { slot: 0 })
  const res = { ok: true }
  vm.spawnGuest(0, rawGuest(vm.vcpus[0]!.guest.op, [pageBatch(0, PAGES, WRITE)], res))
  vm.run()
  expect(res.ok).toBe(true)
  expect(vm.stats.pages_4k).toBe(PAGES)
  return vm
}

describe('notifier unmap is split-phase and may yield (kvm_tdp_mmu_unmap_gfn_range, may_block)', () => {
  it('a large unmap drops mmu_lock between zap batches: a reader runs in between, seeing in_progress set', () => {
    const vm = populated(2)
    const mmu = getTdpMmu(vm)
    const slot = vm.memslots.idToMemslot(0, 0)!
    const yields0 = mmu.counters.yields
    const flushes0 = vm.stats.remote_tlb_flush
    const seq0 = vm.notifierState.seq
    const seen: { inProgress: number; pages: number }[] = []
    const start = vm.sched.now
    vm.hostOpYielding('munmap', start, (h) => h.munmapOp(slot.userspaceAddr, PAGES * 4096))
    const reader = vm.sched.spawn('reader', function* (): KernelOp {
      for (let i = 0; i < 64 && seen.at(-1)?.inProgress !== 0; i++) {
        yield 50
        yield* vm.mmuLock.readLock()
        seen.push({ inProgress: vm.notifierState.inProgress, pages: vm.stats.pages_4k })
        vm.mmuLock.readUnlock()
      }
    }, { startTime: start })
    const readerId = reader.id
    const hostId = vm.sched.allThreads.find((t) => t.name === 'host:munmap')!.id
    const traceFrom = vm.sched.trace.length
    vm.run()
    // The zap yielded (lock contended), flushing what it had zapped before each yield (§4.3).
    expect(mmu.counters.yields).toBeGreaterThan(yields0)
    expect(vm.stats.remote_tlb_flush).toBeGreaterThan(flushes0)
    // The reader took mmu_lock while the invalidation was in progress, between two zap batches.
    const between = seen.filter((s) => s.inProgress === 1 && s.pages > 0 && s.pages < PAGES)
    expect(between.length).toBeGreaterThan(0)
    // ... and the scheduler trace interleaves the host thread and the reader.
    const trace = vm.sched.trace.slice(traceFrom)
    const firstHost = trace.indexOf(hostId)
    const lastHost = trace.lastIndexOf(hostId)
    expect(trace.slice(firstHost, lastHost).includes(readerId)).toBe(true)
    // invalidate_range_end ran: one seq bump, nothing in progress, everything unmapped.
    expect(vm.notifierState.seq).toBe(seq0 + 1)
    expect(vm.notifierState.inProgress).toBe(0)
    expect(vm.stats.pages_4k).toBe(0)
    expect(vm.mmu.audit()).toEqual([])
    vm.destroy()
  })

  it('the zap also walks invalid roots, and without may_block it never yields', () => {
    const vm = populated(1)
    const mmu = getTdpMmu(vm)
    const slot = vm.memslots.idToMemslot(0, 0)!
    const yields0 = mmu.counters.yields
    let zapped = -1
    vm.runKernel('unmap-no-block', function* (): KernelOp {
      yield* vm.mmuLock.writeLock()
      try {
        const root = mmu.rootsWriteLocked(0, true)[0]!
        mmu.kvmTdpMmuInvalidateRoots()
        expect(root.invalid).toBe(true)
        const before = vm.stats.pages_4k
        const flush = yield* mmu.kvmTdpMmuUnmapGfnRangeOp(0, slot.baseGfn, slot.baseGfn + PAGES, false, false)
        zapped = before - vm.stats.pages_4k
        // Leaves of an invalid root need no flush (no vCPU can use it).
        expect(flush).toBe(false)
      } finally {
        vm.mmuLock.writeUnlock()
      }
    })
    expect(zapped).toBe(PAGES)
    expect(mmu.counters.yields).toBe(yields0)
    vm.destroy()
  })

  it('a fault on a gfn of the range while in_progress is set retries (mmu_invalidate_retry_gfn), then succeeds', () => {
    const run = () => {
      const vm = populated(2)
      const slot = vm.memslots.idToMemslot(0, 0)!
      const start = vm.sched.now
      const res = { ok: true }
      const retries0 = vm.vcpus[1]!.stats.pf_retry
      const faultsDuring: number[] = []
      // mprotect to the same protection: a pure invalidation of the range, pages stay.
      vm.hostOpYielding('mprotect', start, (h) => h.mprotectOp(slot.userspaceAddr, PAGES * 4096, false))
      vm.sched.spawn('probe', function* (): KernelOp {
        while (vm.notifierState.inProgress === 0 && faultsDuring.length === 0) yield 10
        faultsDuring.push(vm.notifierState.rangeStart, vm.notifierState.rangeEnd)
      }, { startTime: start })
      vm.vcpus[1]!.start(rawGuest(vm.vcpus[1]!.guest.op, Array.from({ length: 64 }, () => pageBatch(0, 1, WRITE)), res))
      vm.run()
      expect(res.ok).toBe(true)
      const retries = vm.vcpus[1]!.stats.pf_retry - retries0
      const trace = vm.sched.traceHash
      expect(faultsDuring).toEqual([slot.baseGfn, slot.baseGfn + PAGES])
      expect(vm.notifierState.inProgress).toBe(0)
      expect(vm.mmu.audit()).toEqual([])
      vm.destroy()
      return { retries, trace }
    }
    const a = run()
    expect(a.retries).toBeGreaterThan(0)
    // Deterministic: the same interleaving and the same number of retries every time.
    expect(run()).toEqual(a)
  })

  it('host migrations and munmaps run split-phase while the guest runs still match bare metal', () => {
    const program: Program = (cpu) => memstress(cpu, { iterations: 3, bytesPerVcpu: 32 * 4096 })
    const hostOps = (vm: Vm) => {
      const slot = vm.memslots.space(0).sorted[0]!
      for (let t = 1; t <= 8; t++) {
        // Every 37th page of the slot the host has mapped by then, shifted by t.
        vm.hostOpYielding(`migrate${String(t)}`, t * 40_000, function* (h): KernelOp {
          for (let p = t; p < slot.npages; p += 37) yield* h.migratePageOp(slot.userspaceAddr + p * 4096)
        })
      }
      // Memory the guest never uses (top of the slot): munmap it while the guest runs.
      vm.hostOpYielding('munmap', 100_000, (h) => h.munmapOp(slot.userspaceAddr + slot.npages * 4096 - 64 * 4096, 64 * 4096))
    }
    for (const vcpus of [1, 2]) {
      const r = runOnVm(vcpus, program, { beforeRun: hostOps })
      const { ref, result } = runOnBare(r.vm, program)
      expect(r.vm.host.stats.migrations).toBeGreaterThan(0)
      expect(r.totals.mismatches).toBe(0)
      expect(result.mismatches).toBe(0)
      expect(r.totals.accesses).toBe(result.accesses)
      expect(diffGuestMemory(r.vm, ref)).toEqual([])
      expect(r.vm.mmu.audit()).toEqual([])
      r.vm.destroy()
      expect(r.vm.mmuPagesLive).toBe(0)
    }
  })
})
