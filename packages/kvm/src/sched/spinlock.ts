import { ExclusiveLock } from './exclusive-lock.ts'
import type { KernelOp } from './scheduler.ts'
import { PREEMPT } from './scheduler.ts'

/**
 * spinlock_t (qspinlock: FIFO hand-off, waiters spin). Models e.g. `tdp_mmu_pages_lock`.
 * Holding it makes the thread atomic: sleeping operations throw `SLEEP_IN_ATOMIC`.
 */
export class Spinlock extends ExclusiveLock {
  readonly kind = 'spinlock'
  readonly sleepable = false

  /** spin_lock(). */
  lock(): KernelOp {
    return this.acquire('spin_lock')
  }

  /** spin_trylock(). */
  tryLock(): boolean {
    return this.tryAcquire('spin_trylock')
  }

  /** spin_unlock(); throws `LOCK_NOT_HELD` if the current thread does not own it. */
  unlock(): void {
    this.release('spin_unlock')
  }

  /** spin_needbreak(): someone is spinning on the lock. */
  needBreak(): boolean {
    return this.queue.size > 0
  }

  /**
   * cond_resched_lock(): if someone waits or a reschedule is due, drop the lock, yield and
   * re-take it; returns true if the lock was dropped.
   */
  *condResched(): KernelOp<boolean> {
    this.assertHeld()
    const t = this.sched.current!
    const resched = this.sched.needResched()
    if (!resched && !this.needBreak()) return false
    this.unlock()
    if (resched) {
      yield this.sched.costs.contextSwitch
      this.sched.noteResched(t)
    } else {
      yield PREEMPT
    }
    yield* this.lock()
    return true
  }

  protected handoffCost(): number {
    return this.sched.costs.cacheLineTransfer
  }
}
