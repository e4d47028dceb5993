import { describe, expect, it } from 'vitest'
import { DEFAULT_COSTS } from './cost-model.ts'
import type { ConcurrencyError } from './errors.ts'
import { Mutex } from './mutex.ts'
import { Rcu } from './rcu.ts'
import { Scheduler } from './scheduler.ts'
import { Spinlock } from './spinlock.ts'

const A = DEFAULT_COSTS.lockAcquire
const R = DEFAULT_COSTS.lockRelease
const X = DEFAULT_COSTS.cacheLineTransfer
const CS = DEFAULT_COSTS.contextSwitch

describe('Spinlock', () => {
  it('hands the lock over in FIFO order and accounts wait time', () => {
    const sched = new Scheduler()
    const lock = new Spinlock(sched, 'tdp_mmu_pages_lock')
    const order: string[] = []
    const threads = ['a', 'b', 'c'].map((name, i) =>
      sched.spawn(name, function* () {
        yield* lock.lock()
        order.push(name)
        yield 50
        lock.unlock()
      }, { startTime: i }),
    )
    sched.run()
    expect(order).toEqual(['a', 'b', 'c'])
    const t1 = A + 50 + R // a releases at 65
    const t2 = t1 + A + X + 50 + R // b releases at 190
    expect(threads.map((t) => t.clock)).toEqual([t1, t2, t2 + A + X + 50 + R])
    expect(lock.stats.acquisitions).toBe(3)
    expect(lock.stats.contended).toBe(2)
    expect(lock.stats.waitNs).toBe(t1 - 1 + (t2 - 2))
  })

  it('assertHeld and unlock name the real owner', () => {
    const sched = new Scheduler()
    const lock = new Spinlock(sched, 'tdp_mmu_pages_lock')
    const errs: ConcurrencyError[] = []
    sched.spawn('owner', function* () {
      yield* lock.lock()
      lock.assertHeld()
      yield 100
      lock.unlock()
    })
    sched.spawn('intruder', function* () {
      yield 10
      try {
        lock.assertHeld()
      } catch (e) {
        errs.push(e as ConcurrencyError)
      }
      try {
        lock.unlock()
      } catch (e) {
        errs.push(e as ConcurrencyError)
      }
    })
    sched.run()
    expect(errs.map((e) => e.code)).toEqual(['LOCK_NOT_HELD', 'LOCK_NOT_HELD'])
    expect(errs[0]!.message).toBe(
      'lockdep_assert_held: spinlock "tdp_mmu_pages_lock" must be held by the current thread "intruder" (#1), but it is held by "owner" (#0). Take it with lock() first, or fix the caller\'s locking.',
    )
    expect(errs[1]!.message).toContain('spin_unlock: spinlock "tdp_mmu_pages_lock"')
  })

  it('condResched (cond_resched_lock) lets a spinning waiter in', () => {
    const sched = new Scheduler()
    const lock = new Spinlock(sched, 'l')
    const log: string[] = []
    sched.spawn('long', function* () {
      yield* lock.lock()
      for (let i = 0; i < 3; i++) {
        yield 100
        if (yield* lock.condResched()) log.push(`long dropped at ${i}`)
      }
      lock.unlock()
    })
    sched.spawn('short', function* () {
      yield* lock.lock()
      log.push('short in')
      lock.unlock()
    }, { startTime: 150 })
    sched.run()
    expect(log).toEqual(['short in', 'long dropped at 1'])
  })
})

describe('Mutex', () => {
  it('a waiter handed the mutex pays a wake-up', () => {
    const sched = new Scheduler()
    const m = new Mutex(sched, 'slots_lock')
    const [, b] = ['a', 'b'].map((name) =>
      sched.spawn(name, function* () {
        yield* m.lock()
        yield 1000
        m.unlock()
      }),
    )
    sched.run()
    expect(b!.clock).toBe(A + 1000 + R + A + CS + 1000 + R)
    expect(m.stats.contended).toBe(1)
    expect(m.isLocked).toBe(false)
  })

  it('mutex_lock inside an RCU read-side section is SLEEP_IN_ATOMIC; tryLock does not sleep', () => {
    const sched = new Scheduler()
    const m = new Mutex(sched, 'slots_lock')
    const rcu = new Rcu(sched)
    let code: string | undefined
    let tried = false
    sched.spawn('t', function* () {
      rcu.readLock()
      try {
        yield* m.lock()
      } catch (e) {
        code = (e as ConcurrencyError).code
      }
      tried = m.tryLock()
      m.unlock()
      rcu.readUnlock()
    })
    sched.run()
    expect(code).toBe('SLEEP_IN_ATOMIC')
    expect(tried).toBe(true)
  })
})
