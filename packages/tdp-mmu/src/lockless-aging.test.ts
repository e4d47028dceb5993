/**
 * Lockless aging (≈6.15+, CONFIG_KVM_MMU_LOCKLESS_AGING; tdp-mmu.md §7.5): the MMU notifier calls
 * kvm_tdp_mmu_age_gfn_range / kvm_tdp_mmu_test_age_gfn without mmu_lock; they walk the valid roots
 * of the range's address space under RCU only, clear Accessed with an atomic fetch-and-not (A/D)
 * or access-track with one cmpxchg whose failure is ignored (A/D disabled), and never flush.
 */
import { describe, expect, it } from 'vitest'
import { DEFAULT_COSTS, type KernelOp, KVM_MEM_LOG_DIRTY_PAGES, Vm } from '@mmusim/kvm'
import { EXIT_EPT_VIOLATION, PFERR_P, PFERR_W } from '@mmusim/x86-hw'
import { getTdpMmu, getTdpMmuAging, tdpStrategy } from './index.ts'
import { ageNow, scanLeaves } from './testing/aging.spec.ts'
import { FETCH, pageBatch, rawGuest, READ, WRITE } from './testing/raw-guest.ts'
import { type ScenarioVm, scenarioVm, spawnDirtyLogging } from './testing/scenario.ts'

function newVm(strategyOptions: object = {}): Vm {
  const vm = new Vm({ strategy: tdpStrategy, strategyOptions, vcpus: 1, hostMemBytes: 64 << 20 })
  vm.addMemory(0, 4 << 20, { slot: 0 })
  return vm
}

function touch(vm: Vm, gpa: number, pages: number, kind: number): void {
  const res = { ok: true }
  vm.spawnGuest(0, rawGuest(vm.vcpus[0]!.guest.op, [pageBatch(gpa, pages, kind)], res))
  vm.run()
  expect(res.ok).toBe(true)
}

describe('lockless aging: exact young-ness, no lock, no flush', () => {
  it('the contract flag follows agingLocking', () => {
    expect(newVm().mmu.agingLockless).toBe(true)
    expect(newVm({ agingLocking: 'write-lock' }).mmu.agingLockless).toBe(false)
  })

  for (const agingLocking of ['lockless', 'write-lock'] as const) {
    it(`A/D enabled, ${agingLocking}: exact young-ness after each step; aging never flushes`, () => {
      const vm = newVm({ agingLocking })
      const aging = getTdpMmuAging(vm)
      const hva = vm.memslots.idToMemslot(0, 0)!.userspaceAddr
      touch(vm, 0, 8, WRITE)
      expect(scanLeaves(vm, 0, 0, 1024)).toEqual({ present: 8, young: 8 })
      const flushes = vm.stats.remote_tlb_flush
      const notifierFlushes = vm.notifier.stats.remoteFlushes
      expect(ageNow(vm, 'test_young', hva, 4096)).toBe(true)
      expect(ageNow(vm, 'clear_flush_young', hva, 8 * 4096)).toBe(true)
      expect(aging.counters.age_sptes).toBe(8)
      expect(scanLeaves(vm, 0, 0, 1024)).toEqual({ present: 8, young: 0 })
      expect(ageNow(vm, 'test_young', hva, 4096)).toBe(false)
      expect(ageNow(vm, 'clear_young', hva, 8 * 4096)).toBe(false)
      expect(aging.counters.age_sptes).toBe(8)
      // The guest reads 3 pages again (paging off: every access is a 2-D walk, which sets A on
      // the EPT leaf); test_young looks at one page.
      touch(vm, 0, 3, READ)
      expect(scanLeaves(vm, 0, 0, 1024)).toEqual({ present: 8, young: 3 })
      expect(ageNow(vm, 'test_young', hva + 2 * 4096, 4096)).toBe(true)
      expect(ageNow(vm, 'test_young', hva + 3 * 4096, 4096)).toBe(false)
      expect(ageNow(vm, 'clear_flush_young', hva, 8 * 4096)).toBe(true)
      expect(aging.counters.age_sptes).toBe(11)
      // 3 aging walks + 4 test walks, one per notifier call (one memslot each); none flushed.
      expect(aging.counters.age_walks).toBe(7)
      expect(vm.stats.remote_tlb_flush).toBe(flushes)
      expect(vm.notifier.stats.remoteFlushes).toBe(notifierFlushes)
      expect(vm.stats.pages_4k).toBe(8)
      expect(vm.mmu.audit()).toEqual([])
      vm.destroy()
    })
  }

  it('A/D disabled: aging access-tracks, the fast page fault restores, exactly once per page', () => {
    const vm = newVm({ adEnabled: false })
    const hva = vm.memslots.idToMemslot(0, 0)!.userspaceAddr
    touch(vm, 0, 8, WRITE)
    expect(ageNow(vm, 'clear_flush_young', hva, 8 * 4096)).toBe(true)
    expect(scanLeaves(vm, 0, 0, 1024)).toEqual({ present: 8, young: 0 })
    const fast0 = vm.vcpus[0]!.stats.pf_fast
    touch(vm, 0, 5, READ)
    expect(vm.vcpus[0]!.stats.pf_fast - fast0).toBe(5)
    expect(scanLeaves(vm, 0, 0, 1024)).toEqual({ present: 8, young: 5 })
    expect(getTdpMmuAging(vm).counters.age_cmpxchg_failed).toBe(0)
    expect(vm.mmu.audit()).toEqual([])
    vm.destroy()
  })

  it('lockless aging does not wait for mmu_lock; the pre-6.15 (write-lock) notifier does', () => {
    const done: Record<string, number> = {}
    for (const agingLocking of ['lockless', 'write-lock'] as const) {
      const vm = newVm({ agingLocking })
      const hva = vm.memslots.idToMemslot(0, 0)!.userspaceAddr
      touch(vm, 0, 8, WRITE)
      const t0 = vm.sched.now
      // Someone holds mmu_lock for write for 50 µs (e.g. a long notifier unmap elsewhere).
      vm.sched.spawn('writer', function* (): KernelOp {
        yield* vm.mmuLock.writeLock()
        yield 50_000
        vm.mmuLock.writeUnlock()
      }, { startTime: t0 })
      const a = vm.hostAgeOp('age', t0 + 100, hva, 8 * 4096)
      vm.run()
      expect(a.result).toBe(true)
      done[agingLocking] = a.clock - t0
      expect(scanLeaves(vm, 0, 0, 1024)).toEqual({ present: 8, young: 0 })
      vm.destroy()
    }
    // Lockless: from its start at +100 ns, 8 leaves read (a memory reference each) and updated
    // atomically (20 ns each), without waiting for the writer.
    expect(done.lockless).toBe(100 + 8 * (DEFAULT_COSTS.memoryRef + 20))
    expect(DEFAULT_COSTS.spteCmpxchg).toBe(20)
    expect(done['write-lock']).toBeGreaterThan(50_000)
  })

  it('A/D disabled: a fast page fault changes the SPTE between aging’s read and its cmpxchg — the cmpxchg fails and is ignored', () => {
    const vm = newVm({ adEnabled: false })
    const mmu = getTdpMmu(vm)
    const aging = getTdpMmuAging(vm)
    const slot0 = vm.memslots.idToMemslot(0, 0)!
    touch(vm, 0, 8, WRITE)
    // Dirty logging write-protects the leaves (W clear, MMU-writable kept): a write is then a
    // fast page fault that cmpxchg's W back in, without mmu_lock.
    vm.setUserMemoryRegion({ slot: 0, asId: 0, flags: KVM_MEM_LOG_DIRTY_PAGES, guestPhysAddr: 0, memorySize: 4 << 20, userspaceAddr: slot0.userspaceAddr })
    expect(scanLeaves(vm, 0, 0, 1024)).toEqual({ present: 8, young: 8 })
    const v = vm.vcpus[0]!
    const cmpxchgNs = vm.sched.costs.spteCmpxchg
    const tB = vm.sched.now + 1000
    // B: the fault reads the SPTE at tB and cmpxchg's it at tB + 20 ns; A: aging reads the same
    // SPTE at tB + 10 ns (inside B's window) and cmpxchg's at tB + 30 ns, after B.
    const b = vm.sched.spawn('vcpu0:fast-pf', () => vm.mmu.pageFault(v, { addr: 0, errorCode: PFERR_P | PFERR_W, kind: WRITE, gla: 0, exitReason: EXIT_EPT_VIOLATION }), { startTime: tB })
    const a = vm.hostAgeOp('age', tB + cmpxchgNs / 2, vm.memslots.idToMemslot(0, 0)!.userspaceAddr, 8 * 4096)
    expect(vm.memslots.idToMemslot(0, 0)!.dirtyBitmap![0]).toBe(0)
    // A probe inside aging's window: aging holds no mmu_lock and no root reference, only RCU.
    const root = mmu.rootsHead!
    let seen = ''
    vm.sched.spawn('probe', function* (): KernelOp {
      seen = `lock=${vm.mmuLock.heldBy(a)} rcu=${String(vm.rcu.depth(a))} refs=${JSON.stringify(Object.fromEntries(root.rootCount!.holders()))}`
      yield 0
    }, { startTime: tB + cmpxchgNs / 2 + 1 })
    vm.run()
    expect(seen).toBe('lock=none rcu=1 refs={"tdp_mmu":1,"vcpu0":1}')
    expect(b.result).toBe(5) // RET_PF_FIXED
    expect(v.stats.pf_fast).toBe(1)
    expect(a.result).toBe(true)
    expect(aging.counters.age_sptes).toBe(8)
    expect(aging.counters.age_cmpxchg_failed).toBe(1)
    // gfn 0 keeps the fault's writable, young SPTE; the other 7 are access-tracked.
    const it = mmu.newIter()
    it.start(mmu.rootsHead!, 1, 0)
    while (it.level > 1) it.next()
    expect(it.gfn).toBe(0)
    expect(it.oldLo & 2).toBe(2)
    expect(aging.isAccessedSpte(it.oldLo, it.oldHi)).toBe(true)
    expect(scanLeaves(vm, 0, 0, 1024)).toEqual({ present: 8, young: 1 })
    // The fast page fault recorded the write in the dirty log: gfn 0 only.
    expect(vm.memslots.idToMemslot(0, 0)!.dirtyBitmap![0]).toBe(1)
    // No bookkeeping and no flush from aging: the page counts are unchanged.
    expect(vm.stats.pages_4k).toBe(8)
    expect(vm.mmu.audit()).toEqual([])
    vm.destroy()
  })
})

// ------------------------------------------------------------------------------------ races

/** Seed 0: the time-ordered scheduler (agers interleave with the vCPUs by simulated time); others: PCT chaos. */
const SEEDS = [0, ...Array.from({ length: 10 }, (_, i) => 3 + i * 7919)]

/**
 * `n` reclaim-like host threads that age slot 0 `iterations` times each, `pause` ns apart —
 * clear_flush_young and clear_young over the whole slot, test_young of single pages — while the
 * vCPUs run. Returns the number of notifier calls made.
 */
function spawnAgers(sv: ScenarioVm, n: number, iterations: number, pause: number): { calls: number } {
  const { vm } = sv
  const slot = vm.memslots.idToMemslot(0, 0)!
  const res = { calls: 0 }
  for (let i = 0; i < n; i++) {
    vm.sched.spawn(`host:ager${String(i)}`, function* (): KernelOp {
      const nf = vm.notifier
      const hva = slot.userspaceAddr
      for (let k = 0; k < iterations; k++) {
        yield pause
        if ((k + i) % 3 === 2) yield* nf.testYoungOp(hva + ((k * 7) % 64) * 4096)
        else if ((k + i) % 3 === 1) yield* nf.clearYoungOp(hva, hva + slot.npages * 4096)
        else yield* nf.clearFlushYoungOp(hva, hva + slot.npages * 4096)
        res.calls++
      }
    }, { startTime: 100 * i })
  }
  return res
}

/**
 * Run to completion, then at the quiescent point: audit, guest checks, and exact young-ness —
 * test_young over the slot equals the recount, clear_young returns the same, and afterwards no
 * leaf is young and test_young says so.
 */
function finishAging(sv: ScenarioVm): string[] {
  const { vm, check } = sv
  vm.run()
  const out = vm.mmu.audit()
  if (check.mismatches > 0) out.push(`guest read back ${String(check.mismatches)} wrong values`)
  if (check.failures > 0) out.push(`${String(check.failures)} guest accesses failed`)
  const slot = vm.memslots.idToMemslot(0, 0)!
  const before = scanLeaves(vm, 0, slot.baseGfn, slot.endGfn)
  const testAll = vm.hostAgeOp('final-test', vm.sched.now, slot.userspaceAddr, 0, 'test_young')
  vm.run()
  // test_young looks at one page; its answer must match that page.
  const page0 = scanLeaves(vm, 0, slot.baseGfn, slot.baseGfn + 1)
  if (testAll.result !== page0.young > 0) out.push(`test_young(page 0) = ${String(testAll.result)} but page 0 young = ${String(page0.young)}`)
  const aged = vm.hostAgeOp('final-age', vm.sched.now, slot.userspaceAddr, slot.npages * 4096, 'clear_young')
  vm.run()
  if (aged.result !== before.young > 0) out.push(`clear_young = ${String(aged.result)} but ${String(before.young)} leaves were young`)
  const after = scanLeaves(vm, 0, slot.baseGfn, slot.endGfn)
  if (after.young !== 0 || after.present !== before.present) out.push(`after aging: ${JSON.stringify(after)}, before ${JSON.stringify(before)}`)
  out.push(...vm.mmu.audit())
  try {
    vm.destroy()
  } catch (e) {
    out.push(`destroy: ${e instanceof Error ? e.message : String(e)}`)
  }
  return out
}

function sweep(build: (seed: number) => ScenarioVm): { bad: Record<number, string[]>; stats: Record<string, number> } {
  const bad: Record<number, string[]> = {}
  const stats: Record<string, number> = { pf_fast: 0, age_sptes: 0, age_cmpxchg_failed: 0, age_frozen_clobbered: 0, atomic_retries: 0 }
  for (const seed of SEEDS) {
    let out: string[]
    let sv: ScenarioVm | null = null
    try {
      sv = build(seed)
      out = finishAging(sv)
    } catch (e) {
      out = [e instanceof Error ? `${e.message}${e.cause instanceof Error ? ` ← ${e.cause.message}` : ''}` : String(e)]
    }
    if (sv !== null) {
      const s = sv.vm.mmu.stats()
      for (const k of Object.keys(stats)) if (k !== 'pf_fast') stats[k]! += s[k] ?? 0
      stats.pf_fast! += sv.vm.vcpus.reduce((n, v) => n + v.stats.pf_fast, 0)
    }
    if (out.length > 0) bad[seed] = out
  }
  return { bad, stats }
}

describe('lockless aging races (chaos seeds): faults under the read lock, the fast page fault, dirty logging', () => {
  it('A/D disabled: aging access-tracks while vCPUs fault (read lock) and fast-fault the pages back', () => {
    const { bad, stats } = sweep((seed) => {
      const sv = scenarioVm(seed, { loops: 4, vcpus: 2, strategyOptions: { adEnabled: false }, resched: 0.3, chaos: seed !== 0 })
      spawnAgers(sv, 3, 16, 2_000)
      return sv
    })
    expect(bad).toEqual({})
    expect(stats.age_sptes).toBeGreaterThan(0)
    expect(stats.pf_fast).toBeGreaterThan(0)
    // The races really happened: some access-tracking cmpxchgs lost to a fault and were ignored.
    expect(stats.age_cmpxchg_failed).toBeGreaterThan(0)
  })

  it('A/D disabled with dirty logging: aging vs write-protection (read lock) and the fast page fault making SPTEs writable again', () => {
    const { bad, stats } = sweep((seed) => {
      const sv = scenarioVm(seed, { loops: 4, vcpus: 2, strategyOptions: { adEnabled: false }, resched: 0.3, chaos: seed !== 0 })
      const { vm, mmu } = sv
      spawnAgers(sv, 3, 16, 2_000)
      spawnDirtyLogging(vm, 0, true)
      // KVM_GET_DIRTY_LOG-like passes: write-protect the slot under the read lock, then flush.
      for (let i = 0; i < 4; i++) {
        vm.sched.spawn(`wrprot${String(i)}`, function* (): KernelOp {
          yield* vm.mmuLock.readLock()
          const changed = yield* mmu.kvmTdpMmuWrprotSlot(vm.memslots.idToMemslot(0, 0)!, 1)
          vm.mmuLock.readUnlock()
          if (changed) vm.flushRemoteTlbs()
        }, { startTime: 15_000 * (i + 1) })
      }
      return sv
    })
    expect(bad).toEqual({})
    expect(stats.pf_fast).toBeGreaterThan(0)
    expect(stats.age_cmpxchg_failed).toBeGreaterThan(0)
  })

  it('A/D enabled, THP + NX huge pages: aging vs faults that split and replace tables under the read lock', () => {
    const { bad, stats } = sweep((seed) => {
      const sv = scenarioVm(seed, { loops: 3, thp: true, pages: 512, vcpus: 2, strategyOptions: { nxHugePages: true }, resched: 0.4, fetch: true, chaos: seed !== 0 })
      spawnAgers(sv, 3, 10, 2_000)
      // NX recovery zaps tables under the read lock, as do huge-page recovery and eager split.
      for (let i = 0; i < 3; i++) sv.vm.sched.spawn(`nx_recovery${String(i)}`, () => sv.mmu.kvmRecoverNxHugePages(1), { startTime: 10_000 * (i + 1) })
      spawnDirtyLogging(sv.vm, 0, true)
      spawnDirtyLogging(sv.vm, 0, false)
      return sv
    })
    expect(bad).toEqual({})
    expect(stats.age_sptes).toBeGreaterThan(0)
  })
})

describe('S24 (tdp-mmu.md §10, candidate): lockless aging vs a read-lock remover', () => {
  it('the fetch-and-not lands on the FROZEN tombstone of a disconnected table; nothing in the model consumes it', () => {
    const HP = 0x40000000
    // A wide cmpxchg window (5 µs) so the interleaving below is the time-ordered one.
    const vm = new Vm({ strategy: tdpStrategy, strategyOptions: { nxHugePages: true }, vcpus: 1, hostMemBytes: 64 << 20, costs: { spteCmpxchg: 5_000 } })
    vm.addMemory(HP, 4 << 20, { slot: 0, thp: true })
    const mmu = getTdpMmu(vm)
    const aging = getTdpMmuAging(vm)
    // An exec fault keeps the 2 MiB region at 4K (an NX-disallowed table, on the possible-NX
    // list); reads then map 7 more young 4K leaves in the same table.
    const res = { ok: true }
    vm.spawnGuest(0, rawGuest(vm.vcpus[0]!.guest.op, [pageBatch(HP, 1, FETCH), pageBatch(HP + 4096, 7, READ)], res))
    vm.run()
    expect(res.ok).toBe(true)
    expect([vm.stats.pages_4k, vm.stats.pages_2m, vm.stats.nx_lpage_splits]).toEqual([8, 0, 1])
    const t0 = vm.sched.now
    // R: NX recovery (mmu_lock read) zaps the table: its cmpxchg completes at ≈ t0 + 5 µs, then
    // handle_removed_pt() freezes all 512 entries. A: lockless aging reads the first young leaf at
    // t0 + 100 ns and does its fetch-and-not at t0 + 5.1 µs — on the tombstone.
    const r = vm.sched.spawn('kvm-nx-lpage-recovery', () => mmu.kvmRecoverNxHugePages(1), { startTime: t0 })
    const a = vm.hostAgeOp('age', t0 + 100, vm.memslots.idToMemslot(0, 0)!.userspaceAddr, 512 * 4096)
    vm.run()
    expect(r.result).toBe(1)
    expect(a.result).toBe(true) // it saw a young leaf
    expect(aging.counters.age_sptes).toBe(1) // the other leaves were FROZEN (not present) when it got there
    expect(aging.counters.age_frozen_clobbered).toBe(1)
    // The tombstone lost bit 8 in a table nobody can reach any more; it is freed after the grace
    // period. A writer could only be hurt if it read that entry through a stale parent pointer
    // after a preemption point — the model's fault walk reads parent and child in one step, so
    // S24 stays a candidate, not a reproduced bug.
    expect([vm.stats.pages_4k, vm.stats.nx_lpage_splits]).toEqual([0, 0])
    expect(vm.rcu.pendingCallbacks).toBe(0)
    expect(vm.mmu.audit()).toEqual([])
    vm.destroy()
    expect(vm.mmuPagesLive).toBe(0)
  })
})
