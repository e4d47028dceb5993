/**
 * Error codes of the concurrency kernel. Each names the kernel diagnostic it stands for, so a
 * failing test reads like the splat a kernel developer would expect.
 */
export type ConcurrencyErrorCode =
  /** lockdep_assert_held*() failed, or an unlock by a thread that does not hold the lock. */
  | 'LOCK_NOT_HELD'
  /** A thread finished while still holding a lock or an RCU read-side section. */
  | 'LOCK_HELD_AT_EXIT'
  /** refcount_t: "addition on 0; use-after-free". */
  | 'REFCOUNT_INC_FROM_ZERO'
  /** refcount_t: "underflow; use-after-free". */
  | 'REFCOUNT_UNDERFLOW'
  /** refcount_t: "saturated; leaking memory". */
  | 'REFCOUNT_SATURATED'
  /** refcount_t: "decrement hit 0; leaking memory" (refcount_dec() must not release). */
  | 'REFCOUNT_DEC_TO_ZERO'
  /** refcount_set() after the object was published (seed 004: "never force a refcount to 0"). */
  | 'REFCOUNT_SET_AFTER_PUBLISH'
  /** A task put a reference it does not hold (seed 004: "can't drop a reference taken by the other task"). */
  | 'REFCOUNT_FOREIGN_PUT'
  /** Owner tracking is on but a get/put did not say who owns the reference. */
  | 'REFCOUNT_OWNER_REQUIRED'
  /** Access to a freed (poisoned) object. */
  | 'USE_AFTER_FREE'
  /** No thread can make progress, or a self-deadlock (recursive exclusive locking). */
  | 'DEADLOCK'
  /** rcu_read_unlock() without a matching rcu_read_lock(). */
  | 'RCU_UNBALANCED'
  /** RCU_LOCKDEP_WARN(!rcu_read_lock_held()). */
  | 'RCU_NOT_HELD'
  /** An RCU callback threw. */
  | 'RCU_CALLBACK_FAILED'
  /** A per-thread operation was called outside any simulated thread. */
  | 'NOT_IN_THREAD'
  /** A simulated thread threw; the original error is the `cause`. */
  | 'THREAD_FAILED'
  /** "BUG: sleeping function called from invalid context" (might_sleep() under a spinlock/rwlock/RCU). */
  | 'SLEEP_IN_ATOMIC'
  /** A bad argument from the caller (negative cost, bad option). */
  | 'INVALID_ARGUMENT'
  /** Scheduler.run() called re-entrantly from inside a simulated thread. */
  | 'SCHEDULER_BUSY'

/**
 * A concurrency-rule violation found by the model (lockdep, refcount_t, RCU, scheduler).
 * The message says what was expected and how to fix it; `cause` carries a wrapped error.
 */
export class ConcurrencyError extends Error {
  override readonly name = 'ConcurrencyError'
  readonly code: ConcurrencyErrorCode

  constructor(code: ConcurrencyErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.code = code
  }
}
