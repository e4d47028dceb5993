import { ConcurrencyError } from './errors.ts'
import { removeHeld } from './scheduler.ts'
import type { HeldResource, KernelOp, Scheduler, Thread, TimedEventSource, WaitTarget } from './scheduler.ts'

export interface RcuOptions {
  /** Name in diagnostics. Default "rcu". */
  readonly name?: string
  /** Minimum grace-period latency in ns; default `sched.costs.rcuGracePeriod`. */
  readonly gracePeriodNs?: number
}

/** RCU counters. */
export interface RcuStats {
  /** Grace periods completed. */
  gracePeriods: number
  callbacksQueued: number
  callbacksInvoked: number
  /** Longest time from a grace period's start to its completion, ns. */
  maxGracePeriodNs: number
}

/**
 * One grace period. It waits for every thread that was inside a read-side section when it
 * started; it ends at max(start + latency, the time the last such reader left).
 */
class GracePeriod implements WaitTarget {
  /** Global sequence number: readers that entered before this GP was created have enteredAt ≤ seq. */
  readonly seq: number
  readonly startedAt: number
  /** Outermost read-lock count when created; if unchanged, later requests may share this GP. */
  readonly entriesAtStart: number
  readonly minEnd: number
  /** Pre-existing readers still inside their section. */
  waitCount: number
  lastLeave = 0
  readonly fns: ((arg: unknown) => void)[] = []
  readonly args: unknown[] = []
  readonly waiters: Thread[] = []
  private readonly rcu: Rcu

  constructor(rcu: Rcu, seq: number, startedAt: number, entries: number, minEnd: number, waitCount: number) {
    this.rcu = rcu
    this.seq = seq
    this.startedAt = startedAt
    this.entriesAtStart = entries
    this.minEnd = minEnd
    this.waitCount = waitCount
  }

  /** Completion time, or Infinity while pre-existing readers remain. */
  readyAt(): number {
    return this.waitCount > 0 ? Infinity : Math.max(this.minEnd, this.lastLeave)
  }

  describeWait(): string {
    const readers = this.rcu.readersBlocking(this.seq)
    return `${this.rcu.name} grace period #${this.seq} (started t=${this.startedAt}; waiting for readers: ${readers.length === 0 ? 'none' : readers.join(', ')})`
  }
}

/**
 * Classic RCU: per-thread read-side sections (nesting allowed), call_rcu() callbacks run after
 * a grace period, synchronize_rcu(), rcu_barrier(). Grace periods are driven by the scheduler:
 * a period may end only after each thread that was in a read-side section when it began has
 * left that section, and no earlier than its start + the grace-period latency. Callbacks run
 * in callback context (no current thread), in queueing order.
 *
 * RCU does not know what callbacks free: a page-table page is freed with
 * `rcu.callRcu(pool.free, frame)` (or a closure), and the pool poisons it, so any access after
 * the grace period throws `USE_AFTER_FREE` while accesses from readers that started before
 * the free still succeed.
 */
export class Rcu implements HeldResource, TimedEventSource {
  readonly kind = 'rcu'
  readonly sleepable = false
  readonly name: string
  readonly stats: RcuStats = { gracePeriods: 0, callbacksQueued: 0, callbacksInvoked: 0, maxGracePeriodNs: 0 }
  private readonly sched: Scheduler
  private readonly latency: number
  /** thread id → read-side nesting depth */
  private readonly nesting: number[] = []
  /** thread id → GP sequence at its outermost rcu_read_lock(): it blocks GPs with seq ≥ this. */
  private readonly enteredAt: number[] = []
  private activeReaders = 0
  private entries = 0
  /** GPs created so far; the next GP gets this as seq. */
  private nextSeq = 0
  private pending: GracePeriod[] = []

  constructor(sched: Scheduler, options: RcuOptions = {}) {
    this.sched = sched
    this.name = options.name ?? 'rcu'
    this.latency = options.gracePeriodNs ?? sched.costs.rcuGracePeriod
    if (!(this.latency >= 0 && this.latency < Infinity)) {
      throw new ConcurrencyError('INVALID_ARGUMENT', `Rcu gracePeriodNs must be finite and ≥ 0, got ${this.latency}.`)
    }
    sched.addEventSource(this)
  }

  /** rcu_read_lock(): enter (or nest) a read-side section of the current thread. */
  readLock(): void {
    const t = this.sched.current ?? this.sched.requireCurrent(`rcu_read_lock(${this.name})`)
    const n = this.nesting[t.id] ?? 0
    if (n === 0) {
      this.enteredAt[t.id] = this.nextSeq
      this.activeReaders++
      this.entries++
      t.held.push(this)
    }
    this.nesting[t.id] = n + 1
  }

  /** rcu_read_unlock(). Throws `RCU_UNBALANCED` if the current thread is not in a section. */
  readUnlock(): void {
    const t = this.sched.current ?? this.sched.requireCurrent(`rcu_read_unlock(${this.name})`)
    const n = this.nesting[t.id] ?? 0
    if (n === 0) {
      throw new ConcurrencyError(
        'RCU_UNBALANCED',
        `rcu_read_unlock(${this.name}) by thread ${t.label} without a matching rcu_read_lock(); balance every readUnlock() with a readLock().`,
      )
    }
    this.nesting[t.id] = n - 1
    if (n > 1) return
    removeHeld(t, this)
    this.activeReaders--
    // Every GP created while this section was open was waiting for it.
    const since = this.enteredAt[t.id]!
    for (let i = this.pending.length - 1; i >= 0; i--) {
      const gp = this.pending[i]!
      if (gp.seq < since) break
      gp.waitCount--
      if (t.clock > gp.lastLeave) gp.lastLeave = t.clock
    }
  }

  /** rcu_read_lock_held() for the current thread (false outside threads). */
  isReadLockHeld(): boolean {
    const t = this.sched.current
    return t !== null && (this.nesting[t.id] ?? 0) > 0
  }

  /** Read-side nesting depth of `t`. */
  depth(t: Thread): number {
    return this.nesting[t.id] ?? 0
  }

  /**
   * RCU_LOCKDEP_WARN(!rcu_read_lock_held()): throws `RCU_NOT_HELD` unless the current thread is
   * inside a read-side section.
   */
  assertReadLockHeld(): void {
    const t = this.sched.current ?? this.sched.requireCurrent(`assertReadLockHeld(${this.name})`)
    if ((this.nesting[t.id] ?? 0) === 0) {
      throw new ConcurrencyError(
        'RCU_NOT_HELD',
        `thread ${t.label} must be inside an ${this.name} read-side section here, but is not; wrap the access in readLock()/readUnlock().`,
      )
    }
  }

  /**
   * call_rcu(): run `fn(arg)` after a grace period, in callback context. Passing the argument
   * separately (like call_rcu's rcu_head) avoids allocating a closure per free. Callable from
   * threads and from other callbacks.
   */
  callRcu(fn: () => void): void
  callRcu<T>(fn: (arg: T) => void, arg: T): void
  callRcu(fn: (arg: unknown) => void, arg?: unknown): void {
    const gp = this.requestGracePeriod()
    gp.fns.push(fn)
    gp.args.push(arg)
    this.stats.callbacksQueued++
  }

  /** synchronize_rcu(): block until a full grace period has elapsed. Sleeps: illegal inside a read-side section or under a spinning lock. */
  *synchronize(): KernelOp {
    const t = this.sched.mightSleep(`synchronize_rcu(${this.name})`)
    const gp = this.requestGracePeriod()
    gp.waiters.push(t)
    yield gp
  }

  /** rcu_barrier(): block until every callback queued so far has been invoked. */
  *barrier(): KernelOp {
    const t = this.sched.mightSleep(`rcu_barrier(${this.name})`)
    // Grace periods complete in order, so waiting for the newest one that has callbacks suffices.
    for (let i = this.pending.length - 1; i >= 0; i--) {
      const gp = this.pending[i]!
      if (gp.fns.length > 0) {
        gp.waiters.push(t)
        yield gp
        return
      }
    }
  }

  /** Callbacks queued and not yet invoked. */
  get pendingCallbacks(): number {
    let n = 0
    for (const gp of this.pending) n += gp.fns.length
    return n
  }

  /** Labels of the threads still blocking grace period `seq`. @internal */
  readersBlocking(seq: number): string[] {
    const out: string[] = []
    for (const t of this.sched.allThreads) {
      if ((this.nesting[t.id] ?? 0) > 0 && this.enteredAt[t.id]! <= seq) out.push(t.label)
    }
    return out
  }

  /** @internal TimedEventSource */
  nextEventTime(): number {
    const gp = this.pending[0]
    return gp === undefined ? Infinity : gp.readyAt()
  }

  /** @internal TimedEventSource: complete due grace periods in order. */
  fireDue(upTo: number): void {
    while (this.pending.length > 0) {
      const gp = this.pending[0]!
      const at = gp.readyAt()
      if (at > upTo) return
      this.pending.shift()
      this.stats.gracePeriods++
      if (at - gp.startedAt > this.stats.maxGracePeriodNs) this.stats.maxGracePeriodNs = at - gp.startedAt
      for (let i = 0; i < gp.fns.length; i++) {
        try {
          gp.fns[i]!(gp.args[i])
        } catch (e) {
          throw new ConcurrencyError(
            'RCU_CALLBACK_FAILED',
            `${this.name} callback #${i} of grace period #${gp.seq} threw at t=${at}: ${e instanceof Error ? e.message : String(e)}`,
            { cause: e },
          )
        }
        this.stats.callbacksInvoked++
      }
      for (const w of gp.waiters) this.sched.wake(w, at)
    }
  }

  /**
   * The GP a new request (callback, synchronize) must wait for: it snapshots the readers present
   * now (design doc: call_rcu "snapshots the threads currently in a read section") and ends no
   * earlier than now + latency. Requests made at the same instant with no reader entering in
   * between share one GP (e.g. the many frees of one teardown step), so a batch costs one object.
   */
  private requestGracePeriod(): GracePeriod {
    const now = this.sched.now
    const tail = this.pending[this.pending.length - 1]
    if (tail?.entriesAtStart === this.entries && tail.startedAt === now) return tail
    const gp = new GracePeriod(this, this.nextSeq++, now, this.entries, now + this.latency, this.activeReaders)
    this.pending.push(gp)
    return gp
  }
}
