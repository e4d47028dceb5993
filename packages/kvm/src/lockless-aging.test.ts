/**
 * The aging notifiers as kernel operations (`kvm_age_hva_range()` → `__kvm_handle_hva_range()`):
 * with `range->lockless` (CONFIG_KVM_MMU_LOCKLESS_AGING, ≥6.15) no mmu_lock is taken around the
 * handlers; without it, mmu_lock is held for write from the first overlapping memslot to after the
 * flush.
 */
import { describe, expect, it } from 'vitest'
import { type Memslot, Memslots } from './memslot.ts'
import { KvmMmuNotifier, type MmuNotifierListener } from './mmu-notifier.ts'
import { type KernelOp, RwLock, Scheduler } from './sched/index.ts'

const HVA = 0x7f0000000000

function setup(lockless: boolean, elide = true) {
  const sched = new Scheduler()
  const lock = new RwLock(sched, 'mmu_lock')
  const ms = new Memslots()
  ms.setUserMemoryRegion({ slot: 0, flags: 0, guestPhysAddr: 0x100000, memorySize: 0x200000, userspaceAddr: HVA })
  // SMM alias of the same memory in address space 1.
  ms.setUserMemoryRegion({ slot: 0, asId: 1, flags: 0, guestPhysAddr: 0x100000, memorySize: 0x200000, userspaceAddr: HVA })
  const log: string[] = []
  const handler = function* (what: string, as: number, slot: Memslot, s: number, e: number): KernelOp<boolean> {
    log.push(`${what} as${String(as)} slot${String(slot.id)} gfn=[${s.toString(16)},${e.toString(16)}) t=${String(sched.now)} lock=${lock.heldByCurrent()}`)
    yield 10
    return true
  }
  const l: MmuNotifierListener = {
    unmapGfnRange: () => false,
    ageGfnRange: () => {
      throw new Error('the op form must be used')
    },
    testAgeGfn: () => {
      throw new Error('the op form must be used')
    },
    agingLockless: lockless,
    ageGfnRangeOp: (as, slot, s, e) => handler('age', as, slot, s, e),
    testAgeGfnOp: (as, slot, s, e) => handler('test-age', as, slot, s, e),
    mmuWriteLock: () => lock.writeLock(),
    mmuWriteUnlock: () => {
      lock.writeUnlock()
    },
    flushRemoteTlbs: () => log.push(`flush t=${String(sched.now)} lock=${lock.heldByCurrent()}`),
  }
  const n = new KvmMmuNotifier(ms, l, undefined, { elideTlbFlushIfYoung: elide })
  // A writer holding mmu_lock from t=0 to t=1000.
  sched.spawn('writer', function* (): KernelOp {
    yield* lock.writeLock()
    yield 1000
    lock.writeUnlock()
  })
  return { sched, n, log }
}

describe('aging notifiers as kernel operations (kvm_age_hva_range)', () => {
  it('lockless: the handlers run at once, without mmu_lock, while a writer holds it; every address space', () => {
    const { sched, n, log } = setup(true)
    const t = sched.spawn('reclaim', () => n.clearFlushYoungOp(HVA, HVA + 0x3000), { startTime: 5 })
    const tt = sched.spawn('idle-tracking', () => n.testYoungOp(HVA + 0x1000), { startTime: 50 })
    sched.run()
    expect(t.result).toBe(true)
    expect(tt.result).toBe(true)
    expect(log).toEqual([
      'age as0 slot0 gfn=[100,103) t=5 lock=none',
      'age as1 slot0 gfn=[100,103) t=15 lock=none',
      'test-age as0 slot0 gfn=[101,102) t=50 lock=none',
      'test-age as1 slot0 gfn=[101,102) t=60 lock=none',
    ])
    expect(n.stats.ageCalls).toBe(2)
    expect(n.stats.testAgeCalls).toBe(2)
    expect(n.stats.remoteFlushes).toBe(0) // flush elided (6.13+)
  })

  it('not lockless: mmu_lock is taken for write (waiting for the writer) and the flush happens before unlock', () => {
    const { sched, n, log } = setup(false, false)
    const t = sched.spawn('reclaim', () => n.clearFlushYoungOp(HVA, HVA + 0x1000), { startTime: 5 })
    sched.run()
    expect(t.result).toBe(true)
    expect(log.map((x) => x.replace(/t=\d+/, 't=*'))).toEqual(['age as0 slot0 gfn=[100,101) t=* lock=write', 'age as1 slot0 gfn=[100,101) t=* lock=write', 'flush t=* lock=write'])
    // It ran only after the writer released mmu_lock at t=1000.
    expect(Number(/t=(\d+)/.exec(log[0]!)![1])).toBeGreaterThanOrEqual(1000)
    expect(n.stats.remoteFlushes).toBe(1)
  })
})
