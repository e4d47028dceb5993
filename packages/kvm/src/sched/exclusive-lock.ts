import { ConcurrencyError } from './errors.ts'
import { type LockStats, newLockStats, recordHold, recordWait } from './lock-stats.ts'
import { removeHeld } from './scheduler.ts'
import type { HeldResource, KernelOp, Scheduler, Thread, WaitTarget } from './scheduler.ts'
import { WaiterQueue } from './waiter-queue.ts'

/**
 * Common core of {@link Spinlock} and {@link Mutex}: one owner, FIFO hand-off to waiters,
 * wait and hold time in simulated ns. Subclasses choose the lock kind and the extra cost a
 * waiter pays when the lock is handed to it. Internal.
 */
export abstract class ExclusiveLock implements WaitTarget, HeldResource {
  abstract readonly kind: 'spinlock' | 'mutex'
  abstract readonly sleepable: boolean
  readonly name: string
  readonly stats: LockStats = newLockStats()
  protected readonly sched: Scheduler
  private ownerThread: Thread | null = null
  private since = 0
  private lastRelease = 0
  protected readonly queue = new WaiterQueue()

  constructor(sched: Scheduler, name: string) {
    this.sched = sched
    this.name = name
  }

  /** Thread holding the lock, if any. */
  get owner(): Thread | null {
    return this.ownerThread
  }

  get isLocked(): boolean {
    return this.ownerThread !== null
  }

  /** Number of queued waiters. */
  get waiters(): number {
    return this.queue.size
  }

  /** Extra cost paid by a waiter the lock was handed to (cache-line transfer, or a wake-up). */
  protected abstract handoffCost(): number

  protected *acquire(op: string): KernelOp {
    const t = this.sched.requireCurrent(`${op}(${this.name})`)
    if (this.ownerThread === t) {
      throw new ConcurrencyError(
        'DEADLOCK',
        `${op}: thread ${t.label} already holds ${this.kind} "${this.name}"; taking it again deadlocks. Release it first.`,
      )
    }
    const start = t.clock
    let contended: boolean
    if (this.ownerThread === null && this.queue.size === 0) {
      contended = this.lastRelease > t.clock
      if (contended) t.clock = this.lastRelease
      this.grant(t)
    } else {
      contended = true
      this.queue.push(t, 0)
      yield this // the unlocker hands the lock over and sets our clock to its release time
    }
    recordWait(this.stats, t.clock - start, contended)
    const c = this.sched.costs
    yield contended ? c.lockAcquire + this.handoffCost() : c.lockAcquire
  }

  protected tryAcquire(op: string): boolean {
    const t = this.sched.requireCurrent(`${op}(${this.name})`)
    this.sched.charge(this.sched.costs.lockAcquire)
    if (this.ownerThread !== null || this.queue.size > 0) return false
    const contended = this.lastRelease > t.clock
    if (contended) t.clock = this.lastRelease
    this.grant(t)
    recordWait(this.stats, 0, contended)
    return true
  }

  protected release(op: string): void {
    const t = this.sched.requireCurrent(`${op}(${this.name})`)
    if (this.ownerThread !== t) throw this.notHeld(t, op)
    this.sched.charge(this.sched.costs.lockRelease)
    removeHeld(t, this)
    this.ownerThread = null
    recordHold(this.stats, t.clock - this.since)
    if (t.clock > this.lastRelease) this.lastRelease = t.clock
    if (this.queue.size > 0) {
      const next = this.queue.shift()
      this.sched.wake(next, this.lastRelease)
      this.grant(next)
    }
  }

  /**
   * lockdep_assert_held(): the current thread must own the lock; throws `LOCK_NOT_HELD`
   * naming the lock, the thread and the actual owner.
   */
  assertHeld(): void {
    const t = this.sched.requireCurrent(`assertHeld(${this.name})`)
    if (this.ownerThread !== t) throw this.notHeld(t, 'lockdep_assert_held')
  }

  describeWait(): string {
    const state = this.ownerThread === null ? 'unlocked' : `held by ${this.ownerThread.label}`
    return `${this.kind} "${this.name}" (${state}; queue: ${this.queue.describe(() => '')})`
  }

  private grant(t: Thread): void {
    this.ownerThread = t
    this.since = t.clock
    t.held.push(this)
  }

  private notHeld(t: Thread, op: string): ConcurrencyError {
    const owner = this.ownerThread === null ? 'nobody holds it' : `it is held by ${this.ownerThread.label}`
    return new ConcurrencyError(
      'LOCK_NOT_HELD',
      `${op}: ${this.kind} "${this.name}" must be held by the current thread ${t.label}, but ${owner}. Take it with lock() first, or fix the caller's locking.`,
    )
  }
}
