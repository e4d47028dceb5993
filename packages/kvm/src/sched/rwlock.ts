import { ConcurrencyError } from './errors.ts'
import { type LockStats, newLockStats, recordHold, recordWait } from './lock-stats.ts'
import type { HeldResource, KernelOp, Scheduler, Thread, WaitTarget } from './scheduler.ts'
import { PREEMPT, removeHeld } from './scheduler.ts'
import { WaiterQueue } from './waiter-queue.ts'

/** Mode an rwlock is taken in. */
export type LockMode = 'read' | 'write'
/** What a lockdep assertion asks for: a mode, or held in either mode. */
export type AssertMode = LockMode | 'any'

const READ = 0
const WRITE = 1

export interface RwLockOptions {
  /**
   * CONFIG_PREEMPTION: rwlock_needbreak() reports contention only on preemptible kernels (on
   * others it is constant 0). Default true, as on distribution kernels (PREEMPT_DYNAMIC).
   */
  readonly preemptible?: boolean
}

/** Per-mode contention statistics of an {@link RwLock}. */
export interface RwLockStats {
  readonly read: LockStats
  readonly write: LockStats
}

/**
 * Reader/writer spinning lock modelling rwlock_t as KVM's `mmu_lock` uses it (qrwlock).
 * Readers share, a writer excludes. Fairness follows qrwlock: when anyone is queued, new
 * readers queue too (a waiting writer blocks new readers), and waiters are granted in FIFO
 * order, with consecutive readers at the head of the queue admitted together.
 * Waiting shows up as simulated time: a granted waiter's clock jumps to the release time, and
 * it pays a cache-line transfer on top of the acquire cost.
 */
export class RwLock implements WaitTarget, HeldResource {
  readonly kind = 'rwlock'
  readonly sleepable = false
  readonly name: string
  readonly stats: RwLockStats = { read: newLockStats(), write: newLockStats() }
  private readonly sched: Scheduler
  private readonly preemptible: boolean
  private writer: Thread | null = null
  private writeSince = 0
  /** thread id → read nesting depth (0: not a reader). Arrays, not Maps: ids are dense and this is per fault. */
  private readonly readDepth: number[] = []
  /** thread id → time of its outermost read acquisition */
  private readonly readSince: number[] = []
  /** Threads with readDepth > 0. */
  private readerThreads = 0
  private readonly queue = new WaiterQueue()
  /** Simulated time of the last write unlock: readers cannot hold the lock before it. */
  private lastWriteRelease = 0
  /** Simulated time of the last unlock in any mode: writers cannot hold the lock before it. */
  private lastRelease = 0

  constructor(sched: Scheduler, name: string, options: RwLockOptions = {}) {
    this.sched = sched
    this.name = name
    this.preemptible = options.preemptible ?? true
  }

  /** The mode in which `t` holds this lock. */
  heldBy(t: Thread): LockMode | 'none' {
    if (this.writer === t) return 'write'
    return (this.readDepth[t.id] ?? 0) > 0 ? 'read' : 'none'
  }

  /** The mode in which the running thread holds this lock ('none' outside threads); for "RCU or write lock" style checks. */
  heldByCurrent(): LockMode | 'none' {
    const t = this.sched.current
    return t === null ? 'none' : this.heldBy(t)
  }

  /** Thread holding the lock for write, if any. */
  get writeHolder(): Thread | null {
    return this.writer
  }

  /** Number of distinct threads holding the lock for read. */
  get readerCount(): number {
    return this.readerThreads
  }

  /** Number of queued waiters. */
  get waiters(): number {
    return this.queue.size
  }

  /**
   * rwlock_needbreak(): true when someone is queued on the lock (rwlock_is_contended()) and the
   * kernel is preemptible. Long walks use it to decide to drop the lock.
   */
  needBreak(): boolean {
    return this.preemptible && this.queue.size > 0
  }

  /** read_lock(): shared acquisition; queues behind any waiter (qrwlock fairness). */
  *readLock(): KernelOp {
    const fast = this.readLockFast()
    if (fast >= 0) {
      yield fast
      return
    }
    // `current ??`: the message string is only built when there is no thread.
    const t = this.sched.current ?? this.sched.requireCurrent(`read_lock(${this.name})`)
    if (this.writer === t) throw this.selfDeadlock(t, 'read_lock', 'write')
    const start = t.clock
    this.queue.push(t, READ)
    yield this // the unlocker grants us the lock and sets our clock to its release time
    if (this.readDepth[t.id] === 1) recordWait(this.stats.read, t.clock - start, true)
    const c = this.sched.costs
    yield c.lockAcquire + c.cacheLineTransfer
  }

  /**
   * {@link readLock}'s uncontended path as a plain call, so a hot caller needs no generator for
   * it: if no writer holds or waits for the lock, take it for read and return the ns the caller
   * must then `yield` (exactly what readLock() would yield); otherwise change nothing and return
   * -1, and the caller does `yield* readLock()`.
   */
  readLockFast(): number {
    const t = this.sched.current
    if (t === null || this.writer !== null || this.queue.size > 0) return -1
    const start = t.clock
    const contended = this.lastWriteRelease > start
    if (contended) t.clock = this.lastWriteRelease
    this.grantRead(t)
    if (this.readDepth[t.id] === 1) recordWait(this.stats.read, t.clock - start, contended)
    const c = this.sched.costs
    return contended ? c.lockAcquire + c.cacheLineTransfer : c.lockAcquire
  }

  /** read_trylock(): take the lock for read if no writer holds it or waits for it. */
  tryReadLock(): boolean {
    const t = this.sched.current ?? this.sched.requireCurrent(`read_trylock(${this.name})`)
    this.sched.charge(this.sched.costs.lockAcquire)
    if (this.writer !== null || this.queue.size > 0) return false
    const contended = this.lastWriteRelease > t.clock
    if (contended) t.clock = this.lastWriteRelease
    this.grantRead(t)
    if (this.readDepth[t.id] === 1) recordWait(this.stats.read, 0, contended)
    return true
  }

  /** read_unlock(). Throws `LOCK_NOT_HELD` if the current thread does not hold it for read. */
  readUnlock(): void {
    const t = this.sched.current ?? this.sched.requireCurrent(`read_unlock(${this.name})`)
    const n = this.readDepth[t.id] ?? 0
    if (n === 0) throw this.notHeld(t, 'read_unlock', 'read')
    this.sched.charge(this.sched.costs.lockRelease)
    removeHeld(t, this)
    this.readDepth[t.id] = n - 1
    if (n > 1) return
    this.readerThreads--
    recordHold(this.stats.read, t.clock - this.readSince[t.id]!)
    if (t.clock > this.lastRelease) this.lastRelease = t.clock
    if (this.readerThreads === 0) this.grantWaiters()
  }

  /** write_lock(): exclusive acquisition, FIFO behind earlier waiters. */
  /**
   * {@link writeLock} without a generator for an uncontended lock (a hot path's fast path, like
   * {@link readLockFast}): takes it and returns the acquisition cost to yield, or -1 when the
   * caller must block in writeLock() instead (held, queued, or held by the caller).
   */
  writeLockFast(): number {
    const t = this.sched.current
    if (t === null || this.writer !== null || this.readerThreads !== 0 || this.queue.size > 0) return -1
    const start = t.clock
    const contended = this.lastRelease > start
    if (contended) t.clock = this.lastRelease
    this.grantWrite(t)
    recordWait(this.stats.write, t.clock - start, contended)
    const c = this.sched.costs
    return contended ? c.lockAcquire + c.cacheLineTransfer : c.lockAcquire
  }

  *writeLock(): KernelOp {
    const t = this.sched.current ?? this.sched.requireCurrent(`write_lock(${this.name})`)
    const mine = this.heldBy(t)
    if (mine !== 'none') throw this.selfDeadlock(t, 'write_lock', mine)
    const start = t.clock
    let contended: boolean
    if (this.writer === null && this.readerThreads === 0 && this.queue.size === 0) {
      contended = this.lastRelease > t.clock
      if (contended) t.clock = this.lastRelease
      this.grantWrite(t)
    } else {
      contended = true
      this.queue.push(t, WRITE)
      yield this
    }
    recordWait(this.stats.write, t.clock - start, contended)
    const c = this.sched.costs
    yield contended ? c.lockAcquire + c.cacheLineTransfer : c.lockAcquire
  }

  /** write_trylock(). */
  tryWriteLock(): boolean {
    const t = this.sched.current ?? this.sched.requireCurrent(`write_trylock(${this.name})`)
    this.sched.charge(this.sched.costs.lockAcquire)
    if (this.writer !== null || this.readerThreads > 0 || this.queue.size > 0) return false
    const contended = this.lastRelease > t.clock
    if (contended) t.clock = this.lastRelease
    this.grantWrite(t)
    recordWait(this.stats.write, 0, contended)
    return true
  }

  /** write_unlock(). Throws `LOCK_NOT_HELD` if the current thread is not the writer. */
  writeUnlock(): void {
    const t = this.sched.current ?? this.sched.requireCurrent(`write_unlock(${this.name})`)
    if (this.writer !== t) throw this.notHeld(t, 'write_unlock', 'write')
    this.sched.charge(this.sched.costs.lockRelease)
    removeHeld(t, this)
    this.writer = null
    recordHold(this.stats.write, t.clock - this.writeSince)
    if (t.clock > this.lastRelease) this.lastRelease = t.clock
    if (t.clock > this.lastWriteRelease) this.lastWriteRelease = t.clock
    this.grantWaiters()
  }

  /** Release in `mode` (read_unlock or write_unlock). */
  unlock(mode: LockMode): void {
    if (mode === 'read') this.readUnlock()
    else this.writeUnlock()
  }

  /** Acquire in `mode` (read_lock or write_lock). */
  lock(mode: LockMode): KernelOp {
    return mode === 'read' ? this.readLock() : this.writeLock()
  }

  /**
   * cond_resched_rwlock_read() / cond_resched_rwlock_write(): asserts the lock is held in
   * `mode`; if someone waits for it (needBreak) or a reschedule is due, drops it, yields
   * (a context switch if rescheduling, else a cpu_relax()), and re-takes it. Returns true if
   * the lock was dropped — everything read under it must then be re-validated.
   */
  *condResched(mode: LockMode): KernelOp<boolean> {
    this.assertHeld(mode)
    const t = this.sched.current!
    const resched = this.sched.needResched()
    if (!resched && !this.needBreak()) return false
    this.unlock(mode)
    if (resched) {
      yield this.sched.costs.contextSwitch
      this.sched.noteResched(t)
    } else {
      yield PREEMPT
    }
    yield* this.lock(mode)
    return true
  }

  /**
   * lockdep_assert_held() ('any'), lockdep_assert_held_read() ('read'),
   * lockdep_assert_held_write() ('write'): the *current thread* must hold the lock so.
   * Throws `LOCK_NOT_HELD` naming the lock, the thread and what it holds.
   */
  assertHeld(mode: AssertMode): void {
    const t = this.sched.current ?? this.sched.requireCurrent(`assertHeld(${this.name})`)
    const held = this.heldBy(t)
    if (mode === 'any' ? held === 'none' : held !== mode) throw this.notHeld(t, assertName(mode), mode)
  }

  describeWait(): string {
    let state: string
    if (this.writer !== null) state = `write held by ${this.writer.label}`
    else if (this.readerThreads > 0) {
      const names: string[] = []
      for (const t of this.sched.allThreads) if ((this.readDepth[t.id] ?? 0) > 0) names.push(t.label)
      state = `read held by ${names.join(', ')}`
    } else state = 'unlocked'
    return `rwlock "${this.name}" (${state}; queue: ${this.queue.describe(tagName)})`
  }

  private grantRead(t: Thread): void {
    const n = this.readDepth[t.id] ?? 0
    if (n === 0) {
      this.readSince[t.id] = t.clock
      this.readerThreads++
    }
    this.readDepth[t.id] = n + 1
    t.held.push(this)
  }

  private grantWrite(t: Thread): void {
    this.writer = t
    this.writeSince = t.clock
    t.held.push(this)
  }

  /** Admit waiters in FIFO order: one writer, or a run of readers. */
  private grantWaiters(): void {
    while (this.queue.size > 0) {
      if (this.queue.peekTag() === WRITE) {
        if (this.writer === null && this.readerThreads === 0) {
          const w = this.queue.shift()
          this.sched.wake(w, this.lastRelease)
          this.grantWrite(w)
        }
        return
      }
      if (this.writer !== null) return
      const r = this.queue.shift()
      this.sched.wake(r, this.lastWriteRelease)
      this.grantRead(r)
    }
  }

  private notHeld(t: Thread, op: string, wanted: AssertMode): ConcurrencyError {
    const held = this.heldBy(t)
    const holds = held === 'none' ? 'does not hold it (held: none)' : `holds it for ${held}`
    const fix =
      wanted === 'any' ? 'readLock() or writeLock()' : wanted === 'read' ? 'readLock()' : 'writeLock()'
    return new ConcurrencyError(
      'LOCK_NOT_HELD',
      `${op}: rwlock "${this.name}" must be held for ${wanted} by the current thread ${t.label}, but the thread ${holds}. Take it with ${fix} first, or fix the caller's locking.`,
    )
  }

  private selfDeadlock(t: Thread, op: string, held: LockMode): ConcurrencyError {
    return new ConcurrencyError(
      'DEADLOCK',
      `${op}: thread ${t.label} already holds rwlock "${this.name}" for ${held}; taking it again would spin forever. Release it first.`,
    )
  }
}

function tagName(tag: number): string {
  return tag === WRITE ? '[write]' : '[read]'
}

function assertName(mode: AssertMode): string {
  return mode === 'any' ? 'lockdep_assert_held' : `lockdep_assert_held_${mode}`
}
