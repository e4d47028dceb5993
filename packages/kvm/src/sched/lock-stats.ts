/** Contention statistics of one lock (or one mode of an rwlock), in simulated ns. */
export interface LockStats {
  /** Successful acquisitions (outermost ones, for recursive readers). */
  acquisitions: number
  /** Acquisitions that had to wait: queued behind a holder, or the lock was released later in simulated time. */
  contended: number
  /** Total simulated time spent waiting to acquire. */
  waitNs: number
  maxWaitNs: number
  /** Total simulated time the lock was held (outermost acquire to release). */
  holdNs: number
  maxHoldNs: number
}

/** Fresh zeroed stats. */
export function newLockStats(): LockStats {
  return { acquisitions: 0, contended: 0, waitNs: 0, maxWaitNs: 0, holdNs: 0, maxHoldNs: 0 }
}

/** @internal */
export function recordWait(s: LockStats, waitNs: number, contended: boolean): void {
  s.acquisitions++
  if (contended) s.contended++
  s.waitNs += waitNs
  if (waitNs > s.maxWaitNs) s.maxWaitNs = waitNs
}

/** @internal */
export function recordHold(s: LockStats, holdNs: number): void {
  s.holdNs += holdNs
  if (holdNs > s.maxHoldNs) s.maxHoldNs = holdNs
}
