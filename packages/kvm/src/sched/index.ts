/**
 * The concurrency kernel of mmusim: simulated threads as generators, a deterministic
 * simulated-time scheduler with a seeded PCT chaos mode, KVM's locking primitives with lockdep-style
 * assertions and contention statistics, RCU with grace periods, and refcount_t.
 */

/** Error class and codes of the concurrency kernel. */
export { ConcurrencyError, type ConcurrencyErrorCode } from './errors.ts'

/** Seeded xoshiro128** PRNG used by chaos mode; reusable by workloads. */
export { Prng } from './prng.ts'

/** Simulated costs (ns), their documented defaults, and `makeCostModel(overrides)`. */
export { type CostModel, DEFAULT_COSTS, makeCostModel } from './cost-model.ts'

/**
 * Scheduler, threads and the yield protocol: a kernel operation yields a number (ns spent; 0 =
 * preemption point, `PREEMPT`) or the `WaitTarget` it is blocked on.
 */
export {
  type ChaosOptions,
  cost,
  type HeldResource,
  type KernelOp,
  PREEMPT,
  removeHeld,
  type RunOptions,
  type RunResult,
  Scheduler,
  type SchedulerOptions,
  type SchedulerStats,
  type SpawnOptions,
  Thread,
  type ThreadState,
  type TimedEventSource,
  type WaitTarget,
  type Yield,
} from './scheduler.ts'

/** Lock contention statistics (acquisitions, contended, wait and hold time in simulated ns). */
export { type LockStats, newLockStats } from './lock-stats.ts'

/** rwlock_t (qrwlock) as KVM's mmu_lock: readLock/writeLock, needBreak, condResched, assertHeld. */
export { type AssertMode, type LockMode, RwLock, type RwLockOptions, type RwLockStats } from './rwlock.ts'

/** Common base of Spinlock and Mutex (owner, FIFO hand-off, assertHeld, stats). */
export { ExclusiveLock } from './exclusive-lock.ts'

/** spinlock_t (e.g. tdp_mmu_pages_lock). */
export { Spinlock } from './spinlock.ts'

/** struct mutex (e.g. slots_lock); lock() might sleep. */
export { Mutex } from './mutex.ts'

/** wait_queue_head_t with wait_event(), wake_up(), wake_up_all(). */
export { WaitQueue } from './wait-queue.ts'

/** schedule_timeout() in simulated time: timed sleeps of kernel threads (periodic daemons). */
export { TimerQueue, type TimerQueueStats } from './timer.ts'

/** RCU: read-side sections, call_rcu(), synchronize_rcu(), rcu_barrier(). */
export { Rcu, type RcuOptions, type RcuStats } from './rcu.ts'

/** refcount_t with its rules as errors, optional owner tracking. */
export { REFCOUNT_MAX, Refcount, type RefcountOptions } from './refcount.ts'
