import { ConcurrencyError } from './errors.ts'
import type { KernelOp, Scheduler, Thread, TimedEventSource, WaitTarget } from './scheduler.ts'

/** One sleeping thread and its deadline. */
interface Sleeper {
  readonly thread: Thread
  readonly at: number
  /** Set by {@link TimerQueue.wakeUp}. */
  early: boolean
}

/** Counters of a {@link TimerQueue}. */
export interface TimerQueueStats {
  /** Sleeps started. */
  sleeps: number
  /** Sleeps that ended at their deadline. */
  expired: number
  /** Sleeps ended early by {@link TimerQueue.wakeUp}. */
  wokenEarly: number
}

/**
 * Timed sleeps in simulated time: `schedule_timeout()` / `msleep()` for kernel threads. A thread
 * calling {@link sleepUntil} blocks until its deadline, when the scheduler (which asks this queue
 * for its next event like any {@link TimedEventSource}) wakes it with its clock set exactly to
 * the deadline; {@link wakeUp} ends a sleep early (`wake_up_process()`, `vhost_task_wake()`).
 * Sleeping is illegal while holding a spinning lock, a rwlock or an RCU read-side section.
 *
 * Sleeps of daemon threads (see `SpawnOptions.daemon`) are reported separately
 * ({@link nextNonDaemonEventTime}), so a periodic daemon does not keep an unbounded run alive.
 */
export class TimerQueue implements TimedEventSource, WaitTarget {
  readonly name: string
  readonly stats: TimerQueueStats = { sleeps: 0, expired: 0, wokenEarly: 0 }
  private readonly sched: Scheduler
  /** Sleepers ordered by (deadline, thread id). */
  private sleepers: Sleeper[] = []

  constructor(sched: Scheduler, name = 'timers') {
    this.sched = sched
    this.name = name
    sched.addEventSource(this)
  }

  /** Threads currently sleeping here. */
  get pending(): number {
    return this.sleepers.length
  }

  /** Whether `t` is sleeping on this queue. */
  isSleeping(t: Thread): boolean {
    return this.sleepers.some((s) => s.thread === t)
  }

  /**
   * `schedule_timeout()` until the absolute simulated time `at` (ns). Returns true if the sleep
   * ended at its deadline, false if {@link wakeUp} ended it early. A deadline that is not in the
   * future is a pure preemption point.
   */
  *sleepUntil(at: number): KernelOp<boolean> {
    const t = this.sched.mightSleep(`schedule_timeout(${this.name})`)
    if (!(at < Infinity)) {
      throw new ConcurrencyError('INVALID_ARGUMENT', `sleepUntil(${String(at)}) on ${this.name}: the deadline must be a finite time in ns.`)
    }
    if (at <= t.clock) {
      yield 0
      return true
    }
    const s: Sleeper = { thread: t, at, early: false }
    let i = this.sleepers.length
    while (i > 0 && (this.sleepers[i - 1]!.at > at || (this.sleepers[i - 1]!.at === at && this.sleepers[i - 1]!.thread.id > t.id))) i--
    this.sleepers.splice(i, 0, s)
    this.stats.sleeps++
    yield this
    // fireDue() removed us at the deadline; wakeUp() removed us earlier.
    return !s.early
  }

  /** `schedule_timeout(ns)` relative to the current thread's clock. */
  *sleep(ns: number): KernelOp<boolean> {
    const t = this.sched.requireCurrent(`schedule_timeout(${this.name})`)
    if (!(ns >= 0)) throw new ConcurrencyError('INVALID_ARGUMENT', `sleep(${String(ns)}) on ${this.name}: the timeout must be ≥ 0 ns.`)
    return yield* this.sleepUntil(t.clock + ns)
  }

  /**
   * `wake_up_process()`: end `t`'s sleep now (at the waker's time). Returns whether `t` was
   * sleeping here.
   */
  wakeUp(t: Thread): boolean {
    const i = this.sleepers.findIndex((s) => s.thread === t)
    if (i < 0) return false
    this.sleepers[i]!.early = true
    this.sleepers.splice(i, 1)
    this.stats.wokenEarly++
    this.sched.wake(t, this.sched.now)
    return true
  }

  /** @internal TimedEventSource */
  nextEventTime(): number {
    const s = this.sleepers[0]
    return s === undefined ? Infinity : s.at
  }

  /** @internal TimedEventSource: the earliest deadline of a non-daemon sleeper. */
  nextNonDaemonEventTime(): number {
    for (const s of this.sleepers) if (!s.thread.daemon) return s.at
    return Infinity
  }

  /** @internal TimedEventSource: wake every sleeper whose deadline is ≤ upTo, at its deadline. */
  fireDue(upTo: number): void {
    while (this.sleepers.length > 0 && this.sleepers[0]!.at <= upTo) {
      const s = this.sleepers.shift()!
      this.stats.expired++
      this.sched.wake(s.thread, s.at)
    }
  }

  describeWait(waiter: Thread): string {
    const s = this.sleepers.find((x) => x.thread === waiter)
    return `timer "${this.name}" (sleeping until t=${s === undefined ? '?' : String(s.at)}${waiter.daemon ? ', daemon' : ''})`
  }
}
