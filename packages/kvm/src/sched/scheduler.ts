import { DEBUG } from '../debug.ts'
import { type CostModel, makeCostModel } from './cost-model.ts'
import { ConcurrencyError } from './errors.ts'
import { Prng } from './prng.ts'

// ---------------------------------------------------------------------------------------------
// Yield protocol
//
// A kernel operation is a generator `function*(): KernelOp<R>`. What it yields tells the
// scheduler why it stopped:
//   • a number n ≥ 0: "I spent n ns" — the thread's clock advances by n and the thread stays
//     runnable. `yield 0` (PREEMPT) is a pure preemption point. Numbers are primitives, so this
//     allocates nothing.
//   • a WaitTarget (a lock, a grace period, a wait queue, a thread being joined): "I am blocked
//     on this". The primitive has already queued the thread; whoever releases the resource calls
//     `sched.wake(thread, atNs)`. Yielding the resource object itself (not a fresh request)
//     keeps blocking allocation-free and lets the deadlock report name what each thread waits on.
// The generator is resumed with `undefined`.
// ---------------------------------------------------------------------------------------------

/** Something a thread can block on; it describes itself for deadlock reports. */
export interface WaitTarget {
  /** One line naming the resource and its current state, e.g. `rwlock "mmu_lock" (write held by A#0)`. */
  describeWait(waiter: Thread): string
}

/** What a kernel operation yields: a cost in ns (0 = preemption point) or the resource it blocks on. */
export type Yield = number | WaitTarget

/** A kernel operation: a generator that yields at preemption points and returns R. */
export type KernelOp<R = void> = Generator<Yield, R, unknown>

/** What {@link Scheduler.call} returns for the caller to yield: never a real wait target. */
const CALL: WaitTarget = {
  describeWait: () => 'a call (sched.call) that was never entered',
}

/** A pure preemption point (cond_resched() that did not reschedule): charges nothing. */
export const PREEMPT = 0

/**
 * Yield value that charges `ns` of simulated time: `yield cost(20)`. Identity on valid input;
 * in debug builds a negative or non-finite cost throws `INVALID_ARGUMENT`.
 */
export function cost(ns: number): Yield {
  if (DEBUG && !(ns >= 0 && ns < Infinity)) {
    throw new ConcurrencyError('INVALID_ARGUMENT', `cost(ns) needs a finite ns ≥ 0, got ${ns}.`)
  }
  return ns
}

/** A lock-like resource a thread can hold (lockdep's held-locks stack). */
export interface HeldResource {
  readonly name: string
  readonly kind: 'rwlock' | 'spinlock' | 'mutex' | 'rcu'
  /** False for spinning locks and RCU: sleeping while holding one is a bug (might_sleep()). */
  readonly sleepable: boolean
}

/** Remove the innermost entry for `r` from the thread's held stack (used by unlock paths). */
export function removeHeld(t: Thread, r: HeldResource): void {
  const h = t.held
  // Usually the innermost entry: pop it instead of a splice.
  if (h.length > 0 && h[h.length - 1] === r) {
    h.pop()
    return
  }
  for (let i = h.length - 2; i >= 0; i--) {
    if (h[i] === r) {
      h.splice(i, 1)
      return
    }
  }
}

/** Life cycle of a simulated thread. */
export type ThreadState = 'runnable' | 'running' | 'blocked' | 'done' | 'failed'

/** A simulated kernel thread (vCPU task, worker, notifier caller...). Created by {@link Scheduler.spawn}. */
export class Thread<R = unknown> implements WaitTarget {
  /** Dense id in spawn order, starting at 0; ties in the clock are broken by the lowest id. */
  readonly id: number
  readonly name: string
  state: ThreadState = 'runnable'
  /** This thread's simulated time in ns. */
  clock: number
  /** Return value once `state === 'done'`. */
  result: R | undefined = undefined
  /** What the thread threw once `state === 'failed'`. */
  error: unknown = undefined
  /** What the thread is blocked on (only while `state === 'blocked'`). */
  waitingOn: WaitTarget | null = null
  /** Locks and RCU sections held, innermost last (lockdep's held_locks). */
  readonly held: HeldResource[] = []
  /** Steps this thread has run. */
  steps = 0
  /** @internal */ gen: KernelOp<R> | null = null
  /** @internal PCT priority (chaos mode); higher runs first. */ priority = 0
  /** @internal clock at the last voluntary reschedule; drives needResched(). */ lastReschedAt: number
  /** @internal threads blocked in join() on this one. */ joiners: Thread[] | null = null
  /** @internal generators suspended in a {@link Scheduler.call}, innermost last. */ callers: KernelOp<unknown>[] | null = null
  /**
   * A daemon (a kernel thread such as `kvm-nx-lpage-recovery`, see {@link SpawnOptions.daemon}):
   * it does not keep an unbounded {@link Scheduler.run} going on its own.
   */
  readonly daemon: boolean

  /** @internal use Scheduler.spawn */
  constructor(id: number, name: string, clock: number, daemon = false) {
    this.id = id
    this.name = name
    this.clock = clock
    this.lastReschedAt = clock
    this.daemon = daemon
  }

  /** `"name" (#id)`, the form used in every diagnostic. */
  get label(): string {
    return `"${this.name}" (#${this.id})`
  }

  describeWait(): string {
    return `join of thread ${this.label} (${this.state}, t=${this.clock})`
  }
}

/** PCT chaos mode (Burckhardt et al., "A Randomized Scheduler with Probabilistic Guarantees of Finding Bugs", ASPLOS'10). */
export interface ChaosOptions {
  /** PRNG seed; the same seed gives the same interleaving. */
  readonly seed: number
  /** Bug depth d: d−1 priority change points are placed over the run. Default 3. */
  readonly depth?: number
  /** k, the expected number of steps; change points are drawn uniformly from [1, k]. Default 1000. */
  readonly expectedSteps?: number
  /**
   * Probability that needResched() reports a due preemption at any call (beyond the time slice),
   * to open cond_resched windows more often. Default 0.
   */
  readonly reschedProbability?: number
}

export interface SchedulerOptions {
  /** Cost overrides on top of DEFAULT_COSTS. */
  readonly costs?: Partial<CostModel>
  /** Turn on PCT-style chaos scheduling. */
  readonly chaos?: ChaosOptions
  /** Keep the id of the thread run at every step in `trace` (the hash is always kept). Default false. */
  readonly recordTrace?: boolean
  /**
   * Let {@link Scheduler.tryAdvance} continue a thread without suspending it when the scheduler
   * would resume that same thread next anyway. Results (clocks, stats, trace and its hash) are
   * identical either way; off, every cost is a real suspension. Default true.
   */
  readonly fastPath?: boolean
}

export interface SpawnOptions {
  /** Start clock in ns; default: the spawning thread's clock, or `sched.now` outside threads. */
  readonly startTime?: number
  /**
   * A daemon thread: a per-VM kernel thread that lives as long as its owner and sleeps between
   * rounds of work (KVM's `kvm-nx-lpage-recovery` vhost task, a kthread in a
   * `schedule_timeout()` loop). A `run()` without an `until` horizon returns `idle` once every
   * non-daemon thread has finished and no daemon is runnable, and it does not fire timers that
   * only daemons sleep on unless some non-daemon work (a thread or an event such as an RCU
   * callback) remains; with `until`, daemons keep running up to the horizon. Someone must stop
   * a daemon (e.g. at VM destruction) if it should finish. Default false.
   */
  readonly daemon?: boolean
}

export interface RunOptions {
  /** Do not run steps of threads whose clock is ≥ until, nor fire events at ≥ until. */
  readonly until?: number
  /** Stop after this many steps (a guard against livelock). */
  readonly maxSteps?: number
}

/** Why `run()` returned. `idle`: every thread finished. */
export interface RunResult {
  readonly reason: 'idle' | 'until' | 'maxSteps'
  /** Steps run by this call. */
  readonly steps: number
}

/**
 * A source of timed events (RCU grace-period completion, timer expiry). The scheduler asks it
 * before each step and fires what is due, so events happen in simulated-time order with thread
 * steps.
 */
export interface TimedEventSource {
  /** Earliest time at which an event can fire, or Infinity if none is ready. */
  nextEventTime(): number
  /** Fire every event due at or before `upTo`. */
  fireDue(upTo: number): void
  /**
   * Earliest event that matters to non-daemon work, i.e. excluding events whose only effect is
   * waking a daemon thread (see {@link SpawnOptions.daemon}). Default: {@link nextEventTime}.
   */
  nextNonDaemonEventTime?(): number
}

/** Counters that make runs comparable; identical for identical programs and seeds. */
export interface SchedulerStats {
  steps: number
  blocks: number
  wakes: number
  /** Simulated ns charged inside callback context (RCU callbacks), outside any thread. */
  callbackNs: number
}

/**
 * The deterministic scheduler. Threads run in simulated time: each has its own clock and the
 * runnable thread with the earliest clock runs next (ties: lowest id). With `chaos` the next
 * thread is picked by PCT priority instead, clocks still advancing, which explores other
 * interleavings reproducibly from a seed.
 */
export class Scheduler {
  readonly costs: Readonly<CostModel>
  readonly stats: SchedulerStats = { steps: 0, blocks: 0, wakes: 0, callbackNs: 0 }
  /** Thread id per step, when `recordTrace` is on. */
  readonly trace: number[] = []
  private readonly recordTrace: boolean
  private hash = 0x811c9dc5
  private readonly threads: Thread[] = []
  /** Threads not yet finished; order irrelevant (picking compares ids). */
  private live: Thread[] = []
  /** How many of {@link live} are daemons. */
  private liveDaemons = 0
  private readonly sources: TimedEventSource[] = []
  private cur: Thread | null = null
  private inCallback = false
  private running = false
  private nowNs = 0
  private readonly prng: Prng | null
  private readonly changeSteps: number[] = []
  private readonly reschedProbability: number
  /** The current run()'s horizon, step limit and steps so far (read by tryAdvance). */
  private runUntil = Infinity
  private runMaxSteps = Infinity
  private runSteps = 0
  private fastStepCount = 0
  /** tryAdvance may continue threads: fastPath option on and no chaos (PCT picks by priority). */
  private readonly fastPath: boolean

  constructor(options: SchedulerOptions = {}) {
    this.costs = makeCostModel(options.costs)
    this.recordTrace = options.recordTrace ?? false
    const chaos = options.chaos
    this.fastPath = (options.fastPath ?? true) && chaos === undefined
    if (chaos === undefined) {
      this.prng = null
      this.reschedProbability = 0
    } else {
      const depth = chaos.depth ?? 3
      const k = chaos.expectedSteps ?? 1000
      const p = chaos.reschedProbability ?? 0
      if (!Number.isInteger(depth) || depth < 1 || !Number.isInteger(k) || k < 1 || !(p >= 0 && p <= 1)) {
        throw new ConcurrencyError(
          'INVALID_ARGUMENT',
          `chaos options need integer depth ≥ 1, integer expectedSteps ≥ 1 and 0 ≤ reschedProbability ≤ 1; got depth=${depth}, expectedSteps=${k}, reschedProbability=${p}.`,
        )
      }
      this.prng = new Prng(chaos.seed)
      this.reschedProbability = p
      // PCT: change point i (1-based) lowers the running thread to priority i, below every
      // initial priority (which are ≥ depth).
      for (let i = 1; i < depth; i++) this.changeSteps.push(1 + this.prng.nextInt(k))
    }
  }

  /** The running thread's clock inside a thread; otherwise the latest time the simulation reached. */
  get now(): number {
    return this.cur === null ? this.nowNs : this.cur.clock
  }

  /** Steps begun by {@link tryAdvance} without a suspension (included in `stats.steps`). */
  get fastSteps(): number {
    return this.fastStepCount
  }

  /** Whether {@link tryAdvance} may continue threads (the `fastPath` option, and no chaos). */
  get fastPathEnabled(): boolean {
    return this.fastPath
  }

  /** The running thread, or null outside threads (test code, RCU callbacks). */
  get current(): Thread | null {
    return this.cur
  }

  /** True while RCU callbacks run (softirq-like context, no current thread). */
  get inCallbackContext(): boolean {
    return this.inCallback
  }

  /** All threads ever spawned, by id. */
  get allThreads(): readonly Thread[] {
    return this.threads
  }

  /** Threads spawned and not yet finished (daemons included). */
  get liveThreads(): number {
    return this.live.length
  }

  /** FNV-1a hash of the thread ids run so far: equal hashes ⇔ (practically) equal interleavings. */
  get traceHash(): number {
    return this.hash
  }

  /** Create a thread that will run `fn()`; it becomes runnable at `startTime`. */
  spawn<R>(name: string, fn: () => KernelOp<R>, options: SpawnOptions = {}): Thread<R> {
    const start = options.startTime ?? this.now
    if (!(start >= 0 && start < Infinity)) {
      throw new ConcurrencyError('INVALID_ARGUMENT', `spawn("${name}"): startTime must be finite and ≥ 0, got ${start}.`)
    }
    const t = new Thread<R>(this.threads.length, name, start, options.daemon ?? false)
    t.gen = fn()
    if (this.prng !== null) t.priority = this.changeSteps.length + 1 + this.prng.nextU32()
    this.threads.push(t)
    this.live.push(t)
    if (t.daemon) this.liveDaemons++
    return t
  }

  /** Register a timed event source (done by Rcu's constructor). */
  addEventSource(source: TimedEventSource): void {
    this.sources.push(source)
  }

  /** The running thread; throws `NOT_IN_THREAD` naming `what` outside threads. */
  requireCurrent(what: string): Thread {
    const t = this.cur
    if (t === null) {
      throw new ConcurrencyError(
        'NOT_IN_THREAD',
        `${what} must be called from inside a simulated thread (sched.spawn(...)), but no thread is running${this.inCallback ? ' (RCU callback context)' : ''}.`,
      )
    }
    return t
  }

  /**
   * Charge `ns` to the running thread without a preemption point, for plain (non-generator)
   * code called from a thread. In RCU callback context the time is counted in
   * `stats.callbackNs` (callbacks run on another CPU's softirq, not on a thread's clock).
   */
  charge(ns: number): void {
    if (DEBUG && !(ns >= 0 && ns < Infinity)) {
      throw new ConcurrencyError('INVALID_ARGUMENT', `charge(ns) needs a finite ns ≥ 0, got ${ns}.`)
    }
    const t = this.cur
    if (t !== null) t.clock += ns
    else if (this.inCallback) this.stats.callbackNs += ns
    else this.requireCurrent('charge()')
  }

  /**
   * Make a blocked thread runnable at time `atNs` (its clock becomes max(clock, atNs)).
   * Called by the primitive that releases what the thread waits on.
   */
  wake(t: Thread, atNs: number): void {
    if (t.state !== 'blocked') {
      throw new ConcurrencyError('INVALID_ARGUMENT', `wake(${t.label}): thread is ${t.state}, not blocked; a primitive woke it twice.`)
    }
    t.state = 'runnable'
    t.waitingOn = null
    if (atNs > t.clock) t.clock = atNs
    // Blocking is a voluntary schedule: the time slice restarts.
    t.lastReschedAt = t.clock
    this.stats.wakes++
  }

  /**
   * need_resched() for the running thread: true once it has run `costs.schedSlice` ns since its
   * last reschedule (or, in chaos mode, at random with `reschedProbability`). The model gives
   * every thread its own CPU, so the slice stands in for "another task wants this CPU".
   */
  needResched(): boolean {
    const t = this.requireCurrent('needResched()')
    if (this.prng !== null && this.reschedProbability > 0 && this.prng.nextFloat() < this.reschedProbability) return true
    return t.clock - t.lastReschedAt >= this.costs.schedSlice
  }

  /** Record that the running thread just rescheduled voluntarily (restarts its slice). */
  noteResched(t: Thread): void {
    t.lastReschedAt = t.clock
  }

  /**
   * might_sleep(): throws `SLEEP_IN_ATOMIC` if the running thread holds a spinning lock or is in
   * an RCU read-side section. `what` names the sleeping operation.
   */
  mightSleep(what: string): Thread {
    const t = this.requireCurrent(what)
    for (let i = 0; i < t.held.length; i++) {
      const h = t.held[i]!
      if (!h.sleepable) {
        throw new ConcurrencyError(
          'SLEEP_IN_ATOMIC',
          `${what} may sleep, but thread ${t.label} holds ${h.kind} "${h.name}" (held: ${t.held.map((x) => x.name).join(', ')}); release it before sleeping.`,
        )
      }
    }
    return t
  }

  /**
   * cond_resched(): if a reschedule is due, charge a context switch and return true; otherwise
   * a pure preemption point. Models cond_resched().
   */
  *condResched(): KernelOp<boolean> {
    const t = this.requireCurrent('condResched()')
    if (this.needResched()) {
      yield this.costs.contextSwitch
      this.noteResched(t)
      return true
    }
    yield PREEMPT
    return false
  }

  /** Block until `t` has finished and return its result (models kthread_stop()/wait_for_completion() on exit). */
  *join<R>(t: Thread<R>): KernelOp<R> {
    const me = this.mightSleep(`join(${t.label})`)
    if (t === me) throw new ConcurrencyError('DEADLOCK', `thread ${me.label} joins itself; join another thread.`)
    if (t.state !== 'done') {
      ;(t.joiners ??= []).push(me)
      yield t
    }
    return t.result as R
  }

  /**
   * Run threads until all finished (`idle`), the `until` horizon, or `maxSteps`. Throws
   * `THREAD_FAILED` (cause: the thread's error) if a thread throws, and `DEADLOCK` if threads
   * remain but none can run and no event is pending. Can be called again to continue.
   * Daemon threads ({@link SpawnOptions.daemon}) do not count as remaining work: without
   * `until`, the run is `idle` once only daemons are left and none of them is runnable, and
   * timers that only wake daemons are not fired for their own sake (if non-daemon threads remain
   * blocked with nothing but such timers pending, that is a `DEADLOCK`).
   */
  run(options: RunOptions = {}): RunResult {
    if (this.running) throw new ConcurrencyError('SCHEDULER_BUSY', 'run() called from inside a simulated thread; yield instead.')
    const until = options.until ?? Infinity
    const maxSteps = options.maxSteps ?? Infinity
    this.running = true
    this.runUntil = until
    this.runMaxSteps = maxSteps
    this.runSteps = 0
    try {
      for (;;) {
        const steps = this.runSteps
        if (steps >= maxSteps) return { reason: 'maxSteps', steps }
        const t = this.pick(until)
        const te = this.nextEventTime()
        if (t === null) {
          // Without a horizon, events that only wake daemons do not keep the run going.
          const tf = until === Infinity && this.liveDaemons > 0 && this.nextNonDaemonEventTime() === Infinity ? Infinity : te
          if (tf < until) {
            this.fireEvents(tf)
            continue
          }
          if (until < Infinity && this.hasRunnable()) return { reason: 'until', steps }
          if (this.live.length === this.liveDaemons) return { reason: 'idle', steps }
          if (tf < Infinity) return { reason: 'until', steps }
          throw this.deadlockError()
        }
        if (te <= t.clock) {
          // Fire before the step: a woken thread may now have the earliest clock.
          this.fireEvents(t.clock)
          continue
        }
        this.step(t)
        this.runSteps++
      }
    } finally {
      this.running = false
    }
  }

  /**
   * `if (!sched.tryAdvance(ns)) yield ns` behaves exactly as `yield cost(ns)`, only faster. When
   * the scheduler would resume the running thread next anyway — after charging `ns` it still has
   * the earliest clock (ties: lowest id) among runnable threads, no timed event is due by then,
   * and the run's horizon and step limit allow another step — this charges `ns`, accounts the
   * step boundary as {@link run} would (stats, trace, hash) and returns true: the thread goes on
   * without a suspension and a trip through the run loop. Otherwise it changes nothing and
   * returns false, and the caller yields. Never in chaos mode (PCT picks by priority) or with
   * the `fastPath` option off.
   */
  tryAdvance(ns: number): boolean {
    const t = this.cur
    if (t === null || !this.fastPath) return false
    if (DEBUG && !(ns >= 0 && ns < Infinity)) {
      throw new ConcurrencyError('INVALID_ARGUMENT', `tryAdvance(ns) needs a finite ns ≥ 0, got ${ns}.`)
    }
    const c = t.clock + ns
    const until = this.runUntil
    if (c >= until || this.runSteps + 1 >= this.runMaxSteps) return false
    const live = this.live
    for (let i = 0; i < live.length; i++) {
      const o = live[i]!
      if (o === t || o.state !== 'runnable' || o.clock >= until) continue
      if (o.clock < c || (o.clock === c && o.id < t.id)) return false
    }
    const sources = this.sources
    for (let i = 0; i < sources.length; i++) if (sources[i]!.nextEventTime() <= c) return false
    // The end of this step (run() counts it) and the start of the next, as step() does.
    t.clock = c
    this.runSteps++
    this.fastStepCount++
    this.countStep(t)
    return true
  }

  /** A step of `t` begins: the counters, the trace and its hash, `now`. Returns the step's number. */
  private countStep(t: Thread): number {
    const stepNo = ++this.stats.steps
    t.steps++
    if (this.recordTrace) this.trace.push(t.id)
    this.hash = Math.imul(this.hash ^ t.id, 0x01000193) >>> 0
    if (t.clock > this.nowNs) this.nowNs = t.clock
    return stepNo
  }

  private hasRunnable(): boolean {
    for (const t of this.live) if (t.state === 'runnable') return true
    return false
  }

  private nextEventTime(): number {
    let te = Infinity
    for (let i = 0; i < this.sources.length; i++) {
      const x = this.sources[i]!.nextEventTime()
      if (x < te) te = x
    }
    return te
  }

  /** The earliest event that is not only a daemon's wake-up (see {@link TimedEventSource.nextNonDaemonEventTime}). */
  private nextNonDaemonEventTime(): number {
    let te = Infinity
    for (let i = 0; i < this.sources.length; i++) {
      const s = this.sources[i]!
      const x = s.nextNonDaemonEventTime === undefined ? s.nextEventTime() : s.nextNonDaemonEventTime()
      if (x < te) te = x
    }
    return te
  }

  /** Fire due events one time point at a time, so `now` inside a callback is its own time. */
  private fireEvents(upTo: number): void {
    this.inCallback = true
    try {
      for (let te = this.nextEventTime(); te <= upTo; te = this.nextEventTime()) {
        if (te > this.nowNs) this.nowNs = te
        for (let i = 0; i < this.sources.length; i++) this.sources[i]!.fireDue(te)
      }
    } finally {
      this.inCallback = false
    }
  }

  /**
   * A spin-wait hint from the current thread (PAUSE in a guest spin loop, sched_yield). In chaos
   * mode PCT would otherwise let a spinning high-priority thread starve the thread it waits for
   * (PCT assumes threads block); the hint drops it just below every other live thread. No effect
   * in earliest-clock mode, where the spinner's clock advances anyway.
   */
  yieldHint(): void {
    const t = this.cur
    if (this.prng === null || t === null) return
    let min = Infinity
    for (let i = 0; i < this.live.length; i++) {
      const o = this.live[i]!
      if (o !== t && o.priority < min) min = o.priority
    }
    if (min !== Infinity && t.priority >= min) t.priority = min - 1
  }

  private pick(until: number): Thread | null {
    let best: Thread | null = null
    const chaos = this.prng !== null
    for (let i = 0; i < this.live.length; i++) {
      const t = this.live[i]!
      if (t.state !== 'runnable' || t.clock >= until) continue
      if (best === null) best = t
      else if (chaos) {
        if (t.priority > best.priority || (t.priority === best.priority && t.id < best.id)) best = t
      } else if (t.clock < best.clock || (t.clock === best.clock && t.id < best.id)) best = t
    }
    return best
  }

  private step(t: Thread): void {
    const stepNo = this.countStep(t)
    t.state = 'running'
    this.cur = t
    let r: IteratorResult<Yield, unknown>
    try {
      r = this.resume(t)
      if (r.done === true) {
        if (t.held.length > 0) {
          throw new ConcurrencyError(
            'LOCK_HELD_AT_EXIT',
            `thread ${t.label} returned while holding ${t.held.map((h) => `${h.kind} "${h.name}"`).join(', ')}; release every lock and leave every RCU section before returning.`,
          )
        }
      } else if (DEBUG && typeof r.value === 'number' && !(r.value >= 0 && r.value < Infinity)) {
        throw new ConcurrencyError('INVALID_ARGUMENT', `yielded an invalid cost ${r.value}; yield a finite ns ≥ 0 or a WaitTarget.`)
      }
    } catch (e) {
      this.cur = null
      this.finish(t, 'failed')
      t.error = e
      const msg = e instanceof Error ? e.message : String(e)
      throw new ConcurrencyError('THREAD_FAILED', `thread ${t.label} failed at t=${t.clock} ns: ${msg}`, { cause: e })
    }
    this.cur = null
    if (r.done === true) {
      t.result = r.value
      this.finish(t, 'done')
    } else {
      const y = r.value
      if (typeof y === 'number') {
        t.clock += y
        t.state = 'runnable'
      } else {
        t.state = 'blocked'
        t.waitingOn = y
        this.stats.blocks++
      }
    }
    // PCT change point: lower the priority of the thread that executed this step.
    for (let i = 0; i < this.changeSteps.length; i++) if (this.changeSteps[i] === stepNo) t.priority = i + 1
  }

  /**
   * Make `op` a call of the running thread's current generator: `const r = (yield
   * sched.call(op)) as R` behaves as `const r = yield* op`, but while `op` runs the scheduler
   * resumes it directly rather than through every generator delegating to it (V8 resumes each
   * level of a `yield*` chain on every step). For hot call sites such as the vCPU loop's page
   * fault; the caller must be a thread's own generator chain, driven by this scheduler.
   */
  call(op: KernelOp<unknown>): Yield {
    if (DEBUG && this.pendingCall !== null) throw new ConcurrencyError('INVALID_ARGUMENT', 'call(): a call is already pending; yield the value call() returned at once.')
    this.pendingCall = op
    return CALL
  }

  private pendingCall: KernelOp<unknown> | null = null

  /**
   * Resume the thread's innermost generator until it yields a cost or a wait target or the
   * thread's outermost generator returns, following the call protocol of {@link call}: enter a
   * pending call, hand a callee's result to its caller, or throw a callee's exception into it
   * (as `yield*` would).
   */
  private resume(t: Thread): IteratorResult<Yield, unknown> {
    let g = t.gen!
    let val: unknown = undefined
    let throwing = false
    for (;;) {
      let r: IteratorResult<Yield, unknown>
      try {
        r = throwing ? g.throw(val) : g.next(val)
      } catch (e) {
        const c = t.callers
        if (c === null || c.length === 0) throw e
        g = c.pop()!
        t.gen = g
        val = e
        throwing = true
        continue
      }
      throwing = false
      if (r.done !== true) {
        if (r.value !== CALL) return r
        const callee = this.pendingCall
        if (callee === null) throw new ConcurrencyError('INVALID_ARGUMENT', `thread ${t.label} yielded the call token without sched.call(op).`)
        this.pendingCall = null
        ;(t.callers ??= []).push(g)
        g = callee
        t.gen = g
        val = undefined
        continue
      }
      const c = t.callers
      if (c === null || c.length === 0) return r
      g = c.pop()!
      t.gen = g
      val = r.value
    }
  }

  private finish(t: Thread, state: 'done' | 'failed'): void {
    t.state = state
    t.gen = null
    t.callers = null
    const idx = this.live.indexOf(t)
    if (idx >= 0) {
      this.live[idx] = this.live[this.live.length - 1]!
      this.live.pop()
      if (t.daemon) this.liveDaemons--
    }
    if (t.clock > this.nowNs) this.nowNs = t.clock
    const joiners = t.joiners
    if (joiners !== null) {
      t.joiners = null
      for (const j of joiners) this.wake(j, t.clock)
    }
  }

  private deadlockError(): ConcurrencyError {
    const lines: string[] = []
    const byId = [...this.live].sort((a, b) => a.id - b.id)
    for (const t of byId) {
      if (t.state === 'blocked' && t.waitingOn !== null) lines.push(`  ${t.label} at t=${t.clock} waits on ${t.waitingOn.describeWait(t)}`)
    }
    return new ConcurrencyError(
      'DEADLOCK',
      `deadlock at t=${this.nowNs} ns: no thread can run and no event is pending.\n${lines.join('\n')}\nCheck lock ordering, a missing unlock, or a wake-up that never happens.`,
    )
  }
}
