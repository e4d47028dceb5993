import { describe, expect, it } from 'vitest'
import { DEFAULT_COSTS } from './cost-model.ts'
import type { ConcurrencyError } from './errors.ts'
import { RwLock } from './rwlock.ts'
import { Scheduler } from './scheduler.ts'

const A = DEFAULT_COSTS.lockAcquire
const R = DEFAULT_COSTS.lockRelease
const X = DEFAULT_COSTS.cacheLineTransfer

describe('RwLock (mmu_lock)', () => {
  it('readers overlap in simulated time', () => {
    const sched = new Scheduler()
    const lock = new RwLock(sched, 'mmu_lock')
    const readers = [0, 1].map((i) =>
      sched.spawn(`r${i}`, function* () {
        yield* lock.readLock()
        yield 100
        lock.readUnlock()
      }),
    )
    sched.run()
    // Both finish at acquire + 100 + release, not one after the other.
    expect(readers.map((t) => t.clock)).toEqual([A + 100 + R, A + 100 + R])
    expect(lock.stats.read).toEqual({
      acquisitions: 2,
      contended: 0,
      waitNs: 0,
      maxWaitNs: 0,
      holdNs: 2 * (A + 100 + R),
      maxHoldNs: A + 100 + R,
    })
  })

  it('a writer excludes another writer, with exact timings and stats', () => {
    const sched = new Scheduler()
    const lock = new RwLock(sched, 'mmu_lock')
    const [w1, w2] = [0, 1].map((i) =>
      sched.spawn(`w${i}`, function* () {
        yield* lock.writeLock()
        yield 100
        lock.writeUnlock()
      }),
    )
    sched.run()
    const release1 = A + 100 + R // 115
    expect(w1!.clock).toBe(release1)
    // w2 waits until 115, pays acquire + cache-line transfer, holds 100, releases.
    expect(w2!.clock).toBe(release1 + A + X + 100 + R)
    expect(lock.stats.write.acquisitions).toBe(2)
    expect(lock.stats.write.contended).toBe(1)
    expect(lock.stats.write.waitNs).toBe(release1)
    expect(lock.stats.write.holdNs).toBe(release1 + (A + X + 100 + R))
  })

  it('a waiting writer blocks a new reader (qrwlock fairness); needBreak reports the waiter', () => {
    const sched = new Scheduler()
    const lock = new RwLock(sched, 'mmu_lock')
    const log: [string, number][] = []
    const needBreak: boolean[] = []
    sched.spawn('r1', function* () {
      yield* lock.readLock()
      needBreak.push(lock.needBreak()) // at 10: nobody waits yet
      yield 100
      needBreak.push(lock.needBreak()) // at 110: w waits since 15
      log.push(['r1 unlock', sched.now + R])
      lock.readUnlock()
    })
    sched.spawn('w', function* () {
      yield* lock.writeLock()
      log.push(['w in', sched.now])
      yield 50
      lock.writeUnlock()
    }, { startTime: 15 })
    sched.spawn('r2', function* () {
      yield* lock.readLock() // a reader holds the lock, but a writer is queued: r2 queues too
      log.push(['r2 in', sched.now])
      lock.readUnlock()
    }, { startTime: 20 })
    sched.run()
    const wIn = A + 100 + R + A + X // 185
    expect(log).toEqual([
      ['r1 unlock', A + 100 + R],
      ['w in', wIn],
      ['r2 in', wIn + 50 + R + A + X],
    ])
    expect(needBreak).toEqual([false, true])
  })

  it('condResched drops the read lock for a waiting writer (exact interleaving)', () => {
    const sched = new Scheduler({ recordTrace: true })
    const lock = new RwLock(sched, 'mmu_lock')
    const log: [string, number][] = []
    const walker = sched.spawn('walker', function* () {
      yield* lock.readLock()
      for (let i = 0; i < 3; i++) {
        yield 100
        if (yield* lock.condResched('read')) log.push(['walker resumed', sched.now])
      }
      lock.readUnlock()
    })
    const writer = sched.spawn('writer', function* () {
      yield* lock.writeLock()
      log.push(['writer in', sched.now])
      yield 30
      lock.writeUnlock()
    }, { startTime: 50 })
    sched.run()
    // walker: lock→10, work→110, condResched: unlock at 115 hands the lock to writer, re-queues.
    // writer: in at 115+10+60=185, holds 30, unlocks at 220; walker re-acquires at 220+70=290.
    expect(log).toEqual([
      ['writer in', 185],
      ['walker resumed', 290],
    ])
    expect(sched.trace).toEqual([0, 0, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0])
    expect(writer.clock).toBe(220)
    expect(walker.clock).toBe(290 + 100 + 100 + R)
    expect(lock.stats.read.acquisitions).toBe(2)
    expect(lock.stats.read.contended).toBe(1)
    expect(lock.stats.write.waitNs).toBe(115 - 50)
  })

  it('condResched does nothing without waiters; with preemptible: false needBreak is always false', () => {
    const sched = new Scheduler()
    const lock = new RwLock(sched, 'mmu_lock', { preemptible: false })
    const results: boolean[] = []
    sched.spawn('walker', function* () {
      yield* lock.writeLock()
      yield 100
      results.push(yield* lock.condResched('write'))
      yield 100
      results.push(lock.needBreak(), yield* lock.condResched('write')) // reader waits, but !CONFIG_PREEMPTION
      lock.writeUnlock()
    })
    sched.spawn('reader', function* () {
      yield* lock.readLock()
      lock.readUnlock()
    }, { startTime: 150 })
    sched.run()
    expect(results).toEqual([false, false, false])
    expect(lock.waiters).toBe(0)
  })

  it('assertHeld checks the current thread and names lock, thread and held mode', () => {
    const sched = new Scheduler()
    const lock = new RwLock(sched, 'mmu_lock')
    const errors: ConcurrencyError[] = []
    const attempt = (fn: () => void): void => {
      try {
        fn()
      } catch (e) {
        errors.push(e as ConcurrencyError)
      }
    }
    sched.spawn('vcpu0', function* () {
      attempt(() => { lock.assertHeld('any') })
      yield* lock.readLock()
      expect(lock.heldByCurrent()).toBe('read')
      attempt(() => { lock.assertHeld('read') }) // ok
      attempt(() => { lock.assertHeld('any') }) // ok
      attempt(() => { lock.assertHeld('write') })
      yield 10
      lock.readUnlock()
    })
    sched.spawn('other', function* () {
      yield 5 // vcpu0 holds the lock for read now, but this thread does not
      attempt(() => { lock.assertHeld('read') })
    })
    sched.run()
    expect(errors.map((e) => e.code)).toEqual(['LOCK_NOT_HELD', 'LOCK_NOT_HELD', 'LOCK_NOT_HELD'])
    expect(errors[0]!.message).toBe(
      'lockdep_assert_held: rwlock "mmu_lock" must be held for any by the current thread "vcpu0" (#0), but the thread does not hold it (held: none). Take it with readLock() or writeLock() first, or fix the caller\'s locking.',
    )
    // "other" runs its check at t=5, before vcpu0 resumes at t=10.
    expect(errors[1]!.message).toContain('held for read by the current thread "other" (#1), but the thread does not hold it (held: none)')
    expect(errors[2]!.message).toContain('lockdep_assert_held_write: rwlock "mmu_lock" must be held for write by the current thread "vcpu0" (#0), but the thread holds it for read.')
  })

  it('unlocking a lock not held, and recursive write locking, are errors', () => {
    const sched = new Scheduler()
    const lock = new RwLock(sched, 'mmu_lock')
    const codes: string[] = []
    sched.spawn('t', function* () {
      try {
        lock.readUnlock()
      } catch (e) {
        codes.push((e as ConcurrencyError).code)
      }
      yield* lock.readLock()
      try {
        lock.writeUnlock()
      } catch (e) {
        codes.push((e as ConcurrencyError).code)
      }
      try {
        yield* lock.writeLock()
      } catch (e) {
        codes.push((e as ConcurrencyError).code)
      }
      lock.readUnlock()
    })
    sched.run()
    expect(codes).toEqual(['LOCK_NOT_HELD', 'LOCK_NOT_HELD', 'DEADLOCK'])
  })

  it('trylock respects holders and waiters', () => {
    const sched = new Scheduler()
    const lock = new RwLock(sched, 'mmu_lock')
    const got: boolean[] = []
    sched.spawn('holder', function* () {
      yield* lock.readLock()
      yield 100
      lock.readUnlock()
    })
    sched.spawn('probe', function* () {
      yield 10
      got.push(lock.tryReadLock()) // shared with the reader: yes
      lock.readUnlock()
      got.push(lock.tryWriteLock()) // reader still holds: no
      yield 200
      got.push(lock.tryWriteLock()) // free: yes
      lock.writeUnlock()
    })
    sched.run()
    expect(got).toEqual([true, false, true])
  })

  it('under chaos scheduling a writer never overlaps anyone (many seeds)', () => {
    for (let seed = 1; seed <= 25; seed++) {
      const sched = new Scheduler({ chaos: { seed, depth: 4, expectedSteps: 80, reschedProbability: 0.3 } })
      const lock = new RwLock(sched, 'mmu_lock')
      let readers = 0
      let writers = 0
      let violations = 0
      for (let i = 0; i < 3; i++) {
        sched.spawn(`r${i}`, function* () {
          for (let k = 0; k < 4; k++) {
            yield* lock.readLock()
            readers++
            if (writers > 0) violations++
            yield 20
            // condResched may drop the lock: not in the critical section while inside it.
            readers--
            yield* lock.condResched('read')
            readers++
            if (writers > 0) violations++
            yield 20
            readers--
            lock.readUnlock()
            yield 5
          }
        })
      }
      for (let i = 0; i < 2; i++) {
        sched.spawn(`w${i}`, function* () {
          for (let k = 0; k < 3; k++) {
            yield* lock.writeLock()
            writers++
            if (writers > 1 || readers > 0) violations++
            yield 15
            writers--
            lock.writeUnlock()
            yield 7
          }
        })
      }
      sched.run()
      expect(violations, `seed ${seed}`).toBe(0)
      expect(lock.stats.write.acquisitions).toBe(6)
    }
  })
})

describe('writeLockFast', () => {
  it('takes a free lock like writeLock (same clock, cost and stats) and refuses a held one', () => {
    function run(fast: boolean): { clock: number; acq: number; got: number[] } {
      const s = new Scheduler()
      const l = new RwLock(s, 'mmu_lock')
      const got: number[] = []
      const a = s.spawn('a', function* () {
        if (fast) {
          const ns = l.writeLockFast()
          got.push(ns)
          yield ns
        } else yield* l.writeLock()
        yield 100
        l.writeUnlock()
      })
      s.spawn('b', function* () {
        yield 10
        // Held by a: the fast path refuses and the caller blocks in writeLock().
        got.push(l.writeLockFast())
        yield* l.writeLock()
        l.writeUnlock()
      })
      s.run()
      return { clock: a.clock, acq: l.stats.write.acquisitions, got }
    }
    const slow = run(false)
    const fast = run(true)
    expect(fast.got).toEqual([DEFAULT_COSTS.lockAcquire, -1])
    expect({ clock: fast.clock, acq: fast.acq }).toEqual({ clock: slow.clock, acq: slow.acq })
    expect(fast.acq).toBe(2)
  })
})
