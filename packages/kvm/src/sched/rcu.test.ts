import { describe, expect, it } from 'vitest'
import { ConcurrencyError } from './errors.ts'
import { Rcu } from './rcu.ts'
import { Scheduler } from './scheduler.ts'
import { Spinlock } from './spinlock.ts'

/**
 * A stand-in for the host frame pool: freeing with `poison` makes any later access throw
 * USE_AFTER_FREE. RCU knows nothing about it; callers queue `pool.free` with callRcu.
 */
class FakeFramePool {
  private next = 1
  private readonly data = new Map<number, number[]>()
  private readonly poisoned = new Set<number>()

  alloc(fill: number): number {
    const id = this.next++
    this.data.set(id, [fill, fill, fill, fill])
    return id
  }

  readonly free = (id: number): void => {
    this.poisoned.add(id)
  }

  isPoisoned(id: number): boolean {
    return this.poisoned.has(id)
  }

  read(id: number, index: number): number {
    if (this.poisoned.has(id)) {
      throw new ConcurrencyError('USE_AFTER_FREE', `read of frame ${id}[${index}] after it was freed; hold RCU while walking tables.`)
    }
    return this.data.get(id)![index]!
  }
}

describe('RCU', () => {
  it('a reader inside an RCU section keeps a freed table readable; after the grace period it is poisoned', () => {
    const sched = new Scheduler()
    const rcu = new Rcu(sched, { gracePeriodNs: 1000 })
    const pool = new FakeFramePool()
    const root: { child: number | null } = { child: pool.alloc(0xab) }
    const table = root.child!
    const reads: [number, number][] = []
    let freedAt = -1
    let uaf: ConcurrencyError | undefined

    const reader = sched.spawn('walker', function* () {
      rcu.readLock()
      const t = root.child! // snapshot the pointer, as a lockless walk does
      for (let i = 0; i < 5; i++) {
        reads.push([sched.now, pool.read(t, i % 4)]) // still readable after the zap at 100
        yield 400
      }
      rcu.readUnlock() // at 2000
      yield 10
      try {
        pool.read(t, 0) // bug: using the pointer after leaving RCU
      } catch (e) {
        uaf = e as ConcurrencyError
      }
    })
    sched.spawn('zapper', function* () {
      root.child = null // disconnect the table...
      rcu.callRcu((id: number) => {
        freedAt = sched.now
        pool.free(id)
      }, table) // ...and free it after a grace period
      expect(pool.isPoisoned(table)).toBe(false)
      yield 1
    }, { startTime: 100 })
    // A reader that starts after the zap does not delay the grace period.
    sched.spawn('late reader', function* () {
      rcu.readLock()
      expect(root.child).toBeNull()
      yield 10_000
      rcu.readUnlock()
    }, { startTime: 150 })

    sched.run({ until: 1999 })
    expect(pool.isPoisoned(table)).toBe(false)
    expect(reads.map(([t]) => t)).toEqual([0, 400, 800, 1200, 1600])
    expect(reads.every(([, v]) => v === 0xab)).toBe(true)

    sched.run()
    // The GP started at 100 (minimum end 1100) but had to wait for the walker, who left at 2000.
    expect(freedAt).toBe(2000)
    expect(pool.isPoisoned(table)).toBe(true)
    expect(uaf?.code).toBe('USE_AFTER_FREE')
    expect(reader.clock).toBe(2010)
    expect(rcu.stats).toEqual({ gracePeriods: 1, callbacksQueued: 1, callbacksInvoked: 1, maxGracePeriodNs: 1900 })
  })

  it('callbacks do not run before the grace-period latency has elapsed', () => {
    const sched = new Scheduler()
    const rcu = new Rcu(sched, { gracePeriodNs: 1000 })
    const ran: number[] = []
    sched.spawn('t', function* () {
      yield 100
      rcu.callRcu(() => ran.push(sched.now))
      rcu.callRcu(() => ran.push(sched.now)) // same instant: shares the grace period
      yield 50
    })
    sched.run({ until: 1100 })
    expect(ran).toEqual([])
    expect(rcu.pendingCallbacks).toBe(2)
    sched.run()
    expect(ran).toEqual([1100, 1100])
    expect(rcu.stats.gracePeriods).toBe(1)
    expect(rcu.pendingCallbacks).toBe(0)
  })

  it('synchronize waits for pre-existing readers only', () => {
    const sched = new Scheduler()
    const rcu = new Rcu(sched, { gracePeriodNs: 1000 })
    sched.spawn('old reader', function* () {
      rcu.readLock()
      yield 3000
      rcu.readUnlock()
    })
    const s = sched.spawn('sync', function* () {
      yield* rcu.synchronize()
    }, { startTime: 10 })
    sched.spawn('new reader', function* () {
      rcu.readLock()
      yield 50_000
      rcu.readUnlock()
    }, { startTime: 500 })
    sched.run()
    expect(s.clock).toBe(3000)
  })

  it('nesting: only the outermost unlock ends the section', () => {
    const sched = new Scheduler()
    const rcu = new Rcu(sched, { gracePeriodNs: 0 })
    const s = sched.spawn('sync', function* () {
      yield 1
      yield* rcu.synchronize()
    })
    sched.spawn('reader', function* () {
      rcu.readLock()
      rcu.readLock()
      yield 100
      rcu.readUnlock()
      expect(rcu.isReadLockHeld()).toBe(true)
      yield 100
      rcu.readUnlock()
      expect(rcu.isReadLockHeld()).toBe(false)
    })
    sched.run()
    expect(s.clock).toBe(200)
  })

  it('barrier waits until every queued callback has run', () => {
    const sched = new Scheduler()
    const rcu = new Rcu(sched, { gracePeriodNs: 1000 })
    const ran: number[] = []
    sched.spawn('freer', function* () {
      rcu.callRcu(() => ran.push(sched.now))
      yield 500
      rcu.callRcu(() => ran.push(sched.now))
      yield 1500
      rcu.callRcu(() => ran.push(sched.now))
    })
    const b = sched.spawn('destroy', function* () {
      yield* rcu.barrier()
      return ran.length
    }, { startTime: 2500 })
    sched.run()
    expect(ran).toEqual([1000, 1500, 3000])
    expect(b.result).toBe(3)
    expect(b.clock).toBe(3000)
  })

  it('barrier with nothing queued returns at once', () => {
    const sched = new Scheduler()
    const rcu = new Rcu(sched)
    const t = sched.spawn('t', function* () {
      yield 5
      yield* rcu.barrier()
    })
    sched.run()
    expect(t.clock).toBe(5)
  })

  it('rule violations: unbalanced unlock, assertion outside a section, synchronize inside one, exit inside one', () => {
    const sched = new Scheduler()
    const rcu = new Rcu(sched)
    const codes: string[] = []
    sched.spawn('t', function* () {
      try {
        rcu.readUnlock()
      } catch (e) {
        codes.push((e as ConcurrencyError).code)
      }
      try {
        rcu.assertReadLockHeld()
      } catch (e) {
        codes.push((e as ConcurrencyError).code)
      }
      rcu.readLock()
      rcu.assertReadLockHeld()
      try {
        yield* rcu.synchronize()
      } catch (e) {
        codes.push((e as ConcurrencyError).code)
      }
      rcu.readUnlock()
    })
    sched.run()
    expect(codes).toEqual(['RCU_UNBALANCED', 'RCU_NOT_HELD', 'SLEEP_IN_ATOMIC'])

    const s2 = new Scheduler()
    const rcu2 = new Rcu(s2)
    s2.spawn('leaker', function* () {
      rcu2.readLock()
      yield 1
    })
    let err: unknown
    try {
      s2.run()
    } catch (e) {
      err = e
    }
    expect(((err as ConcurrencyError).cause as ConcurrencyError).code).toBe('LOCK_HELD_AT_EXIT')
  })

  it('a callback that throws fails the run with RCU_CALLBACK_FAILED', () => {
    const sched = new Scheduler()
    const rcu = new Rcu(sched, { gracePeriodNs: 10 })
    sched.spawn('t', function* () {
      rcu.callRcu(() => {
        throw new Error('double free')
      })
      yield 1
    })
    let err: unknown
    try {
      sched.run()
    } catch (e) {
      err = e
    }
    expect((err as ConcurrencyError).code).toBe('RCU_CALLBACK_FAILED')
    expect((err as ConcurrencyError).message).toContain('double free')
  })

  it('a grace period blocked by a deadlocked reader shows up in the deadlock report', () => {
    const sched = new Scheduler()
    const rcu = new Rcu(sched, { gracePeriodNs: 10 })
    const a = new Spinlock(sched, 'A')
    const b = new Spinlock(sched, 'B')
    sched.spawn('reader', function* () {
      rcu.readLock()
      yield* a.lock()
      yield 10
      yield* b.lock()
    })
    sched.spawn('other', function* () {
      yield* b.lock()
      yield 10
      yield* a.lock()
    })
    sched.spawn('sync', function* () {
      yield 5
      yield* rcu.synchronize()
    })
    let err: unknown
    try {
      sched.run()
    } catch (e) {
      err = e
    }
    expect((err as ConcurrencyError).code).toBe('DEADLOCK')
    expect((err as ConcurrencyError).message).toContain('"sync" (#2) at t=5 waits on rcu grace period #0 (started t=5; waiting for readers: "reader" (#0))')
  })
})
