import type { KernelOp, Scheduler, Thread, WaitTarget } from './scheduler.ts'

/**
 * wait_queue_head_t: threads sleep on it until woken. `waitEvent(cond)` models wait_event():
 * re-check the condition after every wake-up. Sleeping is illegal in atomic context.
 */
export class WaitQueue implements WaitTarget {
  readonly name: string
  private readonly sched: Scheduler
  private sleepers: Thread[] = []

  constructor(sched: Scheduler, name: string) {
    this.sched = sched
    this.name = name
  }

  /** Number of sleeping threads. */
  get size(): number {
    return this.sleepers.length
  }

  /** Sleep once until woken (a bare schedule() on the queue). */
  *wait(): KernelOp {
    const t = this.sched.mightSleep(`wait(${this.name})`)
    this.sleepers.push(t)
    yield this
  }

  /** wait_event(): sleep until `cond()` holds, re-checking after each wake-up. */
  *waitEvent(cond: () => boolean): KernelOp {
    while (!cond()) yield* this.wait()
  }

  /** wake_up_all(): wake every sleeper at the current time; returns how many. */
  wakeAll(): number {
    const list = this.sleepers
    if (list.length === 0) return 0
    this.sleepers = []
    const at = this.sched.now
    for (const t of list) this.sched.wake(t, at + this.sched.costs.contextSwitch)
    return list.length
  }

  /** wake_up(): wake the oldest sleeper; returns whether one was woken. */
  wakeOne(): boolean {
    const t = this.sleepers.shift()
    if (t === undefined) return false
    this.sched.wake(t, this.sched.now + this.sched.costs.contextSwitch)
    return true
  }

  describeWait(): string {
    return `wait queue "${this.name}" (${this.sleepers.length} sleeping; nobody called wakeOne()/wakeAll())`
  }
}
