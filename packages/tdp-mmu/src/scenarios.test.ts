/**
 * The interleavings of tdp-mmu.md §10 that apply to the current design, each under many chaos
 * seeds (PCT scheduling + random reschedules, so cond_resched windows open often), with the
 * invariants checked: no use-after-free (freed tables and host pages are poisoned: any access
 * throws), no refcount misuse (refcount_t rules + owner tracking), no FROZEN SPTE left in a linked
 * table, no missing flush (F1/F2 checked at every lock/RCU drop), stats == recomputed, no SPTE
 * mapping a page the host freed, nothing leaked at VM destruction. Each hazard flag puts the
 * historical bug back and the same scenario must then fail.
 */
import { describe, expect, it } from 'vitest'
import type { KernelOp, Memslot } from '@mmusim/kvm'
import {
  finish,
  migrateGfn,
  type ScenarioVm,
  scenarioVm,
  spawnCheckedHostOp,
  spawnDirtyLogging,
  spawnCpuDirtyActor,
  spawnSlotDelete,
} from './testing/scenario.ts'

const SEEDS = Array.from({ length: 12 }, (_, i) => 1 + i * 7919)

/** Run `build` for every seed; returns the violations per failing seed. */
function sweep(seeds: readonly number[], build: (seed: number) => ScenarioVm): Record<number, string[]> {
  const bad: Record<number, string[]> = {}
  for (const seed of seeds) {
    let out: string[]
    try {
      out = finish(build(seed))
    } catch (e) {
      out = [e instanceof Error ? `${e.message}${e.cause instanceof Error ? ` ← ${e.cause.message}` : ''}` : String(e)]
    }
    if (out.length > 0) bad[seed] = out
  }
  return bad
}

/** An extra slot the guests never touch: deleting it triggers kvm_mmu_zap_all_fast. */
function withSpareSlot(sv: ScenarioVm): ScenarioVm {
  sv.vm.addMemory(64 << 20, 1 << 20, { slot: 1 })
  return sv
}

/** A kernel thread running `fn` with a label (for walkers driven directly). */
function spawn(sv: ScenarioVm, name: string, fn: () => KernelOp<unknown>, startTime = 0): void {
  sv.vm.sched.spawn(name, fn, { startTime })
}

// ---------------------------------------------------------------------------------------------

/** S1/S3: notifier unmaps (page migrations) racing with vCPUs dropping and retaking roots. */
function s1(seed: number, lifecycle: 'current' | 'pre-6.4'): ScenarioVm {
  const sv = scenarioVm(seed, { resetContext: true, strategyOptions: { rootLifecycle: lifecycle } })
  for (let i = 0; i < 4; i++) spawnCheckedHostOp(sv, `migrate${String(i)}`, (vm) => { migrateGfn(vm, 3 + i * 11); })
  return sv
}

/** S21: page migrations race with faults between the pfn lookup and mmu_lock (the retry protocol). */
function s21(seed: number, hazards: object = {}): ScenarioVm {
  // Seed 0: time-ordered scheduling, migrations spread over the run (they land inside GUP windows).
  const sv = scenarioVm(seed, { loops: 4, strategyOptions: { testHazards: hazards }, resched: 0.3, chaos: seed !== 0 })
  // Each page is migrated twice in a row: the first migration zaps its SPTE, the vCPU re-faults,
  // and the second can land between that fault's pfn lookup and mmu_lock.
  for (let i = 0; i < 32; i++) {
    const gfn = (i * 37) % 64
    const t = 4_000 * (i + 1)
    spawnCheckedHostOp(sv, `migrate${String(i)}a`, (vm) => { migrateGfn(vm, gfn); }, t)
    spawnCheckedHostOp(sv, `migrate${String(i)}b`, (vm) => { migrateGfn(vm, gfn); }, t + 1_150 + 50 * (i % 8))
  }
  return sv
}

/** S2/S3/S4: a fast zap yields while zapping the invalidated root; notifiers unmap meanwhile. */
function s2(seed: number, hazards: object = {}): ScenarioVm {
  const sv = withSpareSlot(scenarioVm(seed, { loops: 3, strategyOptions: { testHazards: hazards }, resched: 0.5 }))
  spawnSlotDelete(sv.vm, 1)
  for (let i = 0; i < 6; i++) spawnCheckedHostOp(sv, `migrate${String(i)}`, (vm) => { migrateGfn(vm, i * 9); })
  return sv
}

/** Seed 004 / S4: the invalidated root is zapped with yields while another task takes (and puts) references to it. */
function s4(seed: number): ScenarioVm {
  const sv = withSpareSlot(scenarioVm(seed, { loops: 3, resched: 0.6 }))
  spawnSlotDelete(sv.vm, 1)
  // kvm_tdp_mmu_zap_all walks *all* roots (invalid ones too) with references, under the write lock.
  spawn(sv, 'zap_all', function* () {
    yield* sv.vm.mmuLock.writeLock()
    yield* sv.mmu.kvmTdpMmuZapAll()
    sv.vm.mmuLock.writeUnlock()
  })
  return sv
}

/** S5: two fast zaps in a row while vCPUs still hold the first invalidated root. */
function s5(seed: number, hazards: object = {}): ScenarioVm {
  const sv = scenarioVm(seed, { loops: 3, strategyOptions: { testHazards: hazards } })
  sv.vm.addMemory(64 << 20, 1 << 20, { slot: 1 })
  sv.vm.addMemory(72 << 20, 1 << 20, { slot: 2 })
  spawnSlotDelete(sv.vm, 1)
  spawnSlotDelete(sv.vm, 2)
  return sv
}

/** S6: kvm_zap_gfn_range yields under the write lock with a flush pending. */
function s6(seed: number, hazards: object = {}): ScenarioVm {
  const sv = scenarioVm(seed, { loops: 3, strategyOptions: { testHazards: hazards }, resched: 0.6 })
  for (let i = 0; i < 3; i++) spawn(sv, `zap_gfn_range${String(i)}`, () => sv.mmu.kvmZapGfnRange(0, 1024))
  return sv
}

/** S7: huge-page recovery (read lock) removes tables and yields; flush must precede rcu_read_unlock. */
function s7(seed: number, hazards: object = {}): ScenarioVm {
  const sv = scenarioVm(seed, { loops: 4, thp: true, pages: 512, vcpus: 1, strategyOptions: { testHazards: hazards }, resched: 0.6 })
  spawnDirtyLogging(sv.vm, 0, true)
  spawnDirtyLogging(sv.vm, 0, false)
  return sv
}

/**
 * S11: write-lock zaps replace volatile SPTEs — writable but clean after a D-bit clear (the CPU sets
 * D), or write-protected but MMU-writable under dirty logging (the fast page fault sets W).
 */
function s11(seed: number, hazards: object = {}, dirtyLog = false): ScenarioVm {
  // Seed 0: the time-ordered scheduler (vCPUs run guest code while the zapper works in simulated time).
  const sv = scenarioVm(seed, { loops: 6, strategyOptions: { testHazards: hazards }, resched: 0.3, chaos: seed !== 0 })
  const slot = (): Memslot => sv.vm.memslots.idToMemslot(0, 0)!
  let zappers = 4
  if (dirtyLog) spawnDirtyLogging(sv.vm, 0, true)
  else spawnCpuDirtyActor(sv, () => zappers > 0)
  for (let i = 0; i < 4; i++) {
    spawn(sv, `clear${String(i)}`, function* () {
      yield* sv.vm.mmuLock.readLock()
      if (dirtyLog) yield* sv.mmu.kvmTdpMmuWrprotSlot(slot(), 1)
      else yield* sv.mmu.kvmTdpMmuClearDirtySlot(slot())
      sv.vm.mmuLock.readUnlock()
      sv.vm.flushRemoteTlbs()
    }, 30_000 * (i + 1))
    spawn(sv, `zap_gfn_range${String(i)}`, function* () {
      yield* sv.mmu.kvmZapGfnRange(0, 1024)
      zappers--
    }, 30_000 * (i + 1) + 5_000)
  }
  return sv
}

/** S12: a root zap yields during its root-level pass (two top-level entries populated). */
function s12(seed: number, hazards: object = {}): ScenarioVm {
  const sv = scenarioVm(seed, { loops: 2, strategyOptions: { testHazards: hazards }, resched: 0.9 })
  const { vm } = sv
  vm.addMemory(64 << 20, 1 << 20, { slot: 1 })
  // A slot in the second PML4 entry (512 GiB), populated by faults from a kernel thread.
  vm.addMemory(512 * 2 ** 30, 1 << 20, { slot: 2 })
  vm.sched.spawn('prefault', function* () {
    const v = vm.vcpus[0]!
    // Runs before vCPU 0 uses its root (chaos may order it either way; load is idempotent).
    if (!vm.mmu.hasValidRoot(v)) yield* vm.mmu.load(v)
    for (let i = 0; i < 4; i++) yield* vm.mmu.pageFault(v, { addr: 512 * 2 ** 30 + i * 4096, errorCode: 2, kind: 1, gla: 0, exitReason: 48 })
    for (let i = 0; i < 4; i++) yield* vm.mmu.pageFault(v, { addr: (256 + i) * 4096, errorCode: 2, kind: 1, gla: 0, exitReason: 48 })
  })
  spawnSlotDelete(vm, 1)
  return sv
}

/**
 * S15/S16: NX huge pages — exec faults split huge pages and track the SPs; the recovery worker
 * (mmu_lock held for read) unaccounts and zaps them by identity while faults run and dirty
 * logging is toggled (huge-page recovery and eager split under the read lock as well).
 */
function nx(seed: number): ScenarioVm {
  const sv = scenarioVm(seed, { loops: 3, thp: true, pages: 512, vcpus: 2, strategyOptions: { nxHugePages: true }, resched: 0.4, fetch: true })
  for (let i = 0; i < 3; i++) spawn(sv, `nx_recovery${String(i)}`, () => sv.mmu.kvmRecoverNxHugePages(1), 20_000 * (i + 1))
  spawnDirtyLogging(sv.vm, 0, true)
  spawnDirtyLogging(sv.vm, 0, false)
  return sv
}

describe('race scenarios (tdp-mmu.md §10) under chaos seeds', () => {
  it('S15/S16: NX recovery under the read lock vs exec/write faults, splits and huge-page recovery', () => {
    expect(sweep(SEEDS.slice(0, 8), (s) => nx(s))).toEqual({})
  })
  it('S1/S3: notifier unmaps vs vCPUs unloading and reloading roots (current lifecycle)', () => {
    expect(sweep(SEEDS, (s) => s1(s, 'current'))).toEqual({})
  })
  it('S1/S3: the same with the pre-6.4 lifecycle (last put tears the root down)', () => {
    expect(sweep(SEEDS, (s) => s1(s, 'pre-6.4'))).toEqual({})
  })
  it('S21: a fault that raced with an invalidation retries instead of installing a freed pfn', () => {
    let retries = 0
    const bad = sweep([0, ...SEEDS], (s) => {
      const sv = s21(s)
      sv.vm.run()
      retries += sv.vm.vcpus.reduce((n, v) => n + v.stats.pf_retry, 0)
      return sv
    })
    expect(bad).toEqual({})
    expect(retries).toBeGreaterThan(0)
  })
  it('S2: notifier unmap during a yielding fast zap also zaps the invalid root', () => {
    expect(sweep(SEEDS, (s) => s2(s))).toEqual({})
  })
  it('S4 (seed 004): references taken on a root being zapped with yields — no early free, one zap, no forced count', () => {
    expect(sweep(SEEDS, (s) => s4(s))).toEqual({})
  })
  it('S5: a second fast zap neither re-zaps nor re-puts a lingering invalid root', () => {
    expect(sweep(SEEDS, (s) => s5(s))).toEqual({})
  })
  it('S6: flush before yielding the write lock', () => {
    expect(sweep(SEEDS, (s) => s6(s))).toEqual({})
  })
  it('S7: flush before leaving RCU after disconnecting tables (huge-page recovery)', () => {
    expect(sweep(SEEDS.slice(0, 6), (s) => s7(s))).toEqual({})
  })
  it('S11: volatile SPTEs (CPU-set D) are exchanged atomically under the write lock', () => {
    expect(sweep([0, ...SEEDS], (s) => s11(s))).toEqual({})
  })
  it('S11: the same with write-protected SPTEs and fast page faults (dirty logging)', () => {
    expect(sweep([0, ...SEEDS.slice(0, 6)], (s) => s11(s, {}, true))).toEqual({})
  })
  it('S12: a root zap resumes at the position where it yielded', () => {
    expect(sweep(SEEDS, (s) => s12(s))).toEqual({})
  })
})

describe('the same scenarios fail with the historical bug put back', () => {
  const anyFails = (bad: Record<number, string[]>, pattern: RegExp): void => {
    const all = Object.values(bad).flat()
    expect(all.length).toBeGreaterThan(0)
    expect(all.some((m) => pattern.test(m))).toBe(true)
  }
  it('S2 with unmapSkipsInvalidRoots: an invalid root still maps a page the host freed', () => {
    anyFails(sweep(SEEDS, (s) => s2(s, { unmapSkipsInvalidRoots: true })), /host freed|FRAME_POISONED|use-after-free/)
  })
  it('S5 with rezapInvalidRoots: the vCPU reference is consumed (refcount misuse)', () => {
    anyFails(sweep(SEEDS, (s) => s5(s, { rezapInvalidRoots: true })), /REFCOUNT|refcount|which holds no reference/)
  })
  it('S21 with skipInvalidationRetry: a freed page gets mapped', () => {
    anyFails(sweep([0, ...SEEDS], (s) => s21(s, { skipInvalidationRetry: true })), /host freed|FRAME_POISONED|use-after-free/)
  })
  it('S6 with noFlushBeforeYield: F1 is violated', () => {
    anyFails(sweep(SEEDS, (s) => s6(s, { noFlushBeforeYield: true })), /F1 violated/)
  })
  it('S7 with flushAfterRcuUnlock: F2 is violated', () => {
    anyFails(sweep(SEEDS.slice(0, 6), (s) => s7(s, { flushAfterRcuUnlock: true })), /F2 violated/)
  })
  it('S11 with plainWriteForVolatile: a D bit set by the CPU is lost', () => {
    anyFails(sweep([0, ...SEEDS], (s) => s11(s, { plainWriteForVolatile: true })), /lost update/)
  })
  it('S12 with advanceAfterRestart: a top-level entry is skipped and its tables leak', () => {
    anyFails(sweep(SEEDS, (s) => s12(s, { advanceAfterRestart: true })), /present SPTE|leak|tdp_mmu_pages|still/)
  })
})
