/**
 * The per-VM NX huge page recovery thread (`kvm-nx-lpage-recovery`, tdp-mmu.md §6.6): a daemon on
 * the VM's scheduler that wakes every recovery period, zaps ceil(nr / ratio) of the possible NX
 * huge pages under mmu_lock held for read, and is stopped at VM destruction.
 */
import { describe, expect, it } from 'vitest'
import { KVM_MEM_LOG_DIRTY_PAGES, parseStrategyOptions, Vm } from '@mmusim/kvm'
import { getNxRecoveryWorker, getTdpMmu, tdpStrategy } from './index.ts'
import { FETCH, pageBatch, rawGuest, READ } from './testing/raw-guest.ts'

const HP = 0x40000000
const HPAGE = 2 << 20
const MS = 1_000_000

function nxVm(strategyOptions: object, options: { recordTrace?: boolean } = {}): Vm {
  const vm = new Vm({
    strategy: tdpStrategy,
    strategyOptions: { nxHugePages: true, ...strategyOptions },
    vcpus: 1,
    hostMemBytes: 96 << 20,
    recordTrace: options.recordTrace ?? false,
    costs: { rcuGracePeriod: 20_000 },
  })
  vm.addMemory(HP, 6 * HPAGE, { slot: 0, thp: true })
  return vm
}

/** One page of each of the 6 huge regions, with `kind` (FETCH: each becomes a possible NX huge page). */
function everyRegion(kind: number) {
  return Array.from({ length: 6 }, (_, i) => pageBatch(HP + i * HPAGE + 5 * 4096, 1, kind))
}

function runGuest(vm: Vm, batches: ReturnType<typeof pageBatch>[]): void {
  const res = { ok: true }
  vm.spawnGuest(0, rawGuest(vm.vcpus[0]!.guest.op, batches, res))
  vm.run()
  expect(res.ok).toBe(true)
}

describe('NX recovery period (calc_nx_huge_pages_recovery_period)', () => {
  it('0 ms = 3 600 000 / min(ratio, 3600) ms; off without nx_huge_pages or with ratio 0', () => {
    const period = (o: object): number => {
      const vm = new Vm({ strategy: tdpStrategy, strategyOptions: o, hostMemBytes: 16 << 20 })
      return getNxRecoveryWorker(vm).calcNxHugePagesRecoveryPeriod()
    }
    expect(parseStrategyOptions(tdpStrategy, {})).toMatchObject({ nxRecoveryRatio: 60, nxRecoveryPeriodMs: 0 })
    expect(period({ nxHugePages: true })).toBe(60_000 * MS)
    expect(period({ nxHugePages: true, nxRecoveryRatio: 7 })).toBe(514_285 * MS)
    expect(period({ nxHugePages: true, nxRecoveryRatio: 7200 })).toBe(1_000 * MS)
    expect(period({ nxHugePages: true, nxRecoveryPeriodMs: 250 })).toBe(250 * MS)
    expect(period({ nxHugePages: true, nxRecoveryRatio: 0 })).toBe(-1)
    expect(period({ nxHugePages: false })).toBe(-1)
  })

  it('the thread starts at the first KVM_RUN only when recovery is on', () => {
    for (const [o, started] of [
      [{}, false],
      [{ nxHugePages: true, nxRecoveryRatio: 0 }, false],
      [{ nxHugePages: true }, true],
    ] as const) {
      const vm = new Vm({ strategy: tdpStrategy, strategyOptions: o, hostMemBytes: 16 << 20 })
      vm.addMemory(0, 1 << 20)
      const w = getNxRecoveryWorker(vm)
      expect(w.thread).toBeNull()
      runGuest(vm, [pageBatch(0, 1, READ)])
      expect(w.thread !== null).toBe(started)
      if (started) {
        expect(w.thread!.daemon).toBe(true)
        expect(w.thread!.name).toBe('kvm-nx-lpage-recovery')
        expect(w.thread!.state).toBe('blocked') // asleep in schedule_timeout
      }
      vm.destroy()
      if (started) expect(w.thread!.state).toBe('done')
    }
  })
})

describe('the recovery thread (kvm_nx_huge_page_recovery_worker)', () => {
  it('ratio 4, 1 ms: 6 possible NX pages are recovered 2, 1, 1, 1, 1, 0 at exactly start + 1 ms, then end + 1 ms', () => {
    const vm = nxVm({ nxRecoveryRatio: 4, nxRecoveryPeriodMs: 1 })
    const w = getNxRecoveryWorker(vm)
    runGuest(vm, everyRegion(FETCH))
    expect([vm.stats.pages_4k, vm.stats.pages_2m, vm.stats.nx_lpage_splits]).toEqual([6, 0, 6])
    // The guest is done and the thread is asleep: run() returned without waiting for it.
    expect(w.runs).toEqual([])
    expect(w.startedAt).toBeGreaterThanOrEqual(0)
    expect(vm.sched.now).toBeLessThan(w.startedAt + MS)
    // Let simulated time pass (no guest): six wake-ups.
    vm.run({ until: w.startedAt + 6.5 * MS })
    expect(w.runs.map((r) => [r.nrPages, r.toZap, r.zapped])).toEqual([
      [6, 2, 2],
      [4, 1, 1],
      [3, 1, 1],
      [2, 1, 1],
      [1, 1, 1],
      [0, 0, 0],
    ])
    expect(w.runs[0]!.start).toBe(w.startedAt + MS)
    for (let i = 1; i < w.runs.length; i++) expect(w.runs[i]!.start).toBe(w.runs[i - 1]!.end + MS)
    for (const r of w.runs) expect(r.end).toBeGreaterThan(r.start) // took mmu_lock, cmpxchg'd, flushed
    expect(w.last).toBe(w.runs[5]!.end)
    expect([vm.stats.pages_4k, vm.stats.nx_lpage_splits]).toEqual([0, 0])
    expect(getTdpMmu(vm).counters.nx_recovered).toBe(6)
    expect(vm.mmu.stats().nx_recovery_runs).toBe(6)
    expect(vm.mmu.audit()).toEqual([])
    // Non-exec reads can now be mapped huge again.
    runGuest(vm, everyRegion(READ))
    expect([vm.stats.pages_4k, vm.stats.pages_2m, vm.stats.nx_lpage_splits]).toEqual([0, 6, 0])
    vm.destroy()
    expect(w.thread!.state).toBe('done')
    expect(vm.timers.pending).toBe(0)
    expect(vm.sched.liveThreads).toBe(0)
    expect(vm.rcu.pendingCallbacks).toBe(0)
    expect(vm.mmuPagesLive).toBe(0)
  })

  it('wakes up while the guest faults and interleaves with it; run() still ends when the guest does', () => {
    const vm = nxVm({ nxRecoveryRatio: 2, nxRecoveryPeriodMs: 1 }, { recordTrace: true })
    vm.addMemory(0, 8 << 20, { slot: 1 }) // 4K-backed: every first touch is a fault
    const w = getNxRecoveryWorker(vm)
    // Exec faults on the 6 regions, then 1500 read faults elsewhere (several ms of faults).
    const reads = Array.from({ length: 1500 }, (_, i) => pageBatch(i * 4096, 1, READ))
    const res = { ok: true }
    vm.spawnGuest(0, rawGuest(vm.vcpus[0]!.guest.op, [...everyRegion(FETCH), ...reads], res))
    const vcpu = vm.vcpus[0]!.thread!
    vm.run()
    expect(res.ok).toBe(true)
    expect(vm.vcpus[0]!.stats.pf_fixed).toBe(1506)
    const guestEnd = vcpu.clock
    expect(guestEnd).toBeGreaterThan(3 * MS)
    // Recovery ran while the guest was faulting: 6 → 3 → 1 → 0 (ceil(nr / 2)), once per ms.
    // Recovery ran while the guest was faulting: 6 → 3 → 1 → 0 (ceil(nr / 2)), once per ms.
    expect(w.runs.map((r) => [r.nrPages, r.toZap, r.zapped])).toEqual([
      [6, 3, 3],
      [3, 2, 2],
      [1, 1, 1],
    ])
    expect(w.runs[0]!.start).toBe(w.startedAt + MS)
    for (let i = 1; i < w.runs.length; i++) expect(w.runs[i]!.start).toBe(w.runs[i - 1]!.end + MS)
    for (const r of w.runs) expect(r.end).toBeLessThan(guestEnd)
    // The next wake-up (end + 1 ms) falls after the guest finished: run() returned without it.
    expect(w.runs[2]!.end + MS).toBeGreaterThan(guestEnd)
    // The scheduler interleaved the worker's steps with the vCPU's.
    const worker = w.thread!.id
    const trace = vm.sched.trace
    const firstW = trace.indexOf(worker)
    const lastW = trace.lastIndexOf(worker)
    expect(trace.slice(firstW, lastW).includes(vcpu.id)).toBe(true)
    expect(w.thread!.state).toBe('blocked')
    expect([vm.stats.pages_4k, vm.stats.nx_lpage_splits]).toEqual([1500, 0])
    expect(vm.mmu.audit()).toEqual([])
    vm.destroy()
    expect(w.thread!.state).toBe('done')
    expect(vm.sched.liveThreads).toBe(0)
    expect(vm.timers.pending).toBe(0)
    expect(vm.rcu.pendingCallbacks).toBe(0)
  })

  it('dirty-logged slots are skipped: the pages leave the list but their tables stay', () => {
    const vm = nxVm({ nxRecoveryRatio: 3, nxRecoveryPeriodMs: 2 })
    const w = getNxRecoveryWorker(vm)
    runGuest(vm, everyRegion(FETCH))
    const s = vm.memslots.idToMemslot(0, 0)!
    vm.setUserMemoryRegion({ slot: 0, asId: 0, flags: KVM_MEM_LOG_DIRTY_PAGES, guestPhysAddr: HP, memorySize: 6 * HPAGE, userspaceAddr: s.userspaceAddr })
    vm.run({ until: w.startedAt + 2 * MS + 100_000 })
    expect(w.runs.map((r) => [r.nrPages, r.toZap, r.zapped])).toEqual([[6, 2, 0]])
    expect([vm.stats.pages_4k, vm.stats.nx_lpage_splits]).toEqual([6, 4])
    expect(vm.mmu.audit()).toEqual([])
    vm.destroy()
  })

  it('VM destruction stops the thread mid-run: the run completes, the thread exits, nothing is left pending', () => {
    const vm = nxVm({ nxRecoveryRatio: 1, nxRecoveryPeriodMs: 1 })
    const w = getNxRecoveryWorker(vm)
    runGuest(vm, everyRegion(FETCH))
    // Stop the clock 10 ns into the first run: the worker holds mmu_lock for read.
    const r = vm.run({ until: w.startedAt + MS + 10 })
    expect(r.reason).toBe('until')
    expect(w.thread!.state).toBe('runnable')
    expect(w.runs).toEqual([])
    vm.destroy()
    expect(w.runs.map((x) => [x.nrPages, x.toZap, x.zapped])).toEqual([[6, 6, 6]])
    expect(w.thread!.state).toBe('done')
    expect(vm.sched.liveThreads).toBe(0)
    expect(vm.timers.pending).toBe(0)
    expect(vm.rcu.pendingCallbacks).toBe(0)
    expect(vm.mmuPagesLive).toBe(0)
  })
})
