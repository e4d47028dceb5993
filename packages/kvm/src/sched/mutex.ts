import { ExclusiveLock } from './exclusive-lock.ts'
import type { KernelOp } from './scheduler.ts'

/**
 * struct mutex (sleeping lock; FIFO hand-off in this model). Models e.g. `slots_lock`.
 * lock() calls might_sleep(): taking it under a spinlock, an rwlock or RCU throws
 * `SLEEP_IN_ATOMIC`. A waiter that is handed the lock pays a wake-up (context switch).
 */
export class Mutex extends ExclusiveLock {
  readonly kind = 'mutex'
  readonly sleepable = true

  /** mutex_lock(). */
  lock(): KernelOp {
    this.sched.mightSleep(`mutex_lock(${this.name})`)
    return this.acquire('mutex_lock')
  }

  /** mutex_trylock() (does not sleep). */
  tryLock(): boolean {
    return this.tryAcquire('mutex_trylock')
  }

  /** mutex_unlock(); throws `LOCK_NOT_HELD` if the current thread is not the owner. */
  unlock(): void {
    this.release('mutex_unlock')
  }

  protected handoffCost(): number {
    return this.sched.costs.contextSwitch
  }
}
