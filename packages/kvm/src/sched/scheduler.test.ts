import { describe, expect, it } from 'vitest'
import { ConcurrencyError } from './errors.ts'
import { Mutex } from './mutex.ts'
import { Rcu } from './rcu.ts'
import { RwLock } from './rwlock.ts'
import { type KernelOp, PREEMPT, Scheduler, type SchedulerOptions } from './scheduler.ts'
import { Spinlock } from './spinlock.ts'
import { WaitQueue } from './wait-queue.ts'

function caught(fn: () => unknown): ConcurrencyError {
  try {
    fn()
  } catch (e) {
    if (e instanceof ConcurrencyError) return e
    throw e
  }
  throw new Error('expected a ConcurrencyError')
}

describe('Scheduler: earliest clock first', () => {
  it('runs the runnable thread with the earliest clock, ties to the lowest id, with exact clocks', () => {
    const sched = new Scheduler({ recordTrace: true })
    const a = sched.spawn('A', function* () {
      yield 30
      yield 30
      yield 30
      return 'a'
    })
    const b = sched.spawn('B', function* () {
      yield 50
      yield 50
      return 'b'
    })
    const c = sched.spawn(
      'C',
      function* () {
        yield 20
        yield 100
        return 'c'
      },
      { startTime: 10 },
    )
    const r = sched.run()
    expect(r).toEqual({ reason: 'idle', steps: 10 })
    // A0→30, B0→50, C10→30, A30→60 (tie with C, lower id), C30→130, B50→100, A60→90, A ends 90, B ends 100, C ends 130
    expect(sched.trace).toEqual([0, 1, 2, 0, 2, 1, 0, 0, 1, 2])
    expect([a.clock, b.clock, c.clock]).toEqual([90, 100, 130])
    expect([a.result, b.result, c.result]).toEqual(['a', 'b', 'c'])
    expect([a.state, b.state, c.state]).toEqual(['done', 'done', 'done'])
    expect(sched.now).toBe(130)
  })

  it('charge() advances the clock without a preemption point; outside threads it throws NOT_IN_THREAD', () => {
    const sched = new Scheduler({ recordTrace: true })
    const a = sched.spawn('A', function* () {
      sched.charge(500) // A now at 500 but keeps running this step
      expect(sched.now).toBe(500)
      yield PREEMPT
    })
    sched.spawn('B', function* () {
      yield 100
    })
    sched.run()
    expect(sched.trace).toEqual([0, 1, 1, 0])
    expect(a.clock).toBe(500)
    expect(caught(() => { sched.charge(1) }).code).toBe('NOT_IN_THREAD')
  })

  it('a thread spawned by a thread starts at the spawner clock; join returns its result at the later clock', () => {
    const sched = new Scheduler()
    let joined: number | undefined
    const parent = sched.spawn('parent', function* (): KernelOp<number> {
      yield 40
      const child = sched.spawn('child', function* () {
        yield 300
        return 7
      })
      expect(child.clock).toBe(40)
      joined = yield* sched.join(child)
      return joined
    })
    sched.run()
    expect(joined).toBe(7)
    expect(parent.clock).toBe(340)
  })

  it('run({ until }) and run({ maxSteps }) stop early and can be resumed', () => {
    const sched = new Scheduler()
    const t = sched.spawn('T', function* () {
      for (let i = 0; i < 10; i++) yield 100
    })
    expect(sched.run({ until: 350 })).toEqual({ reason: 'until', steps: 4 })
    expect(t.clock).toBe(400)
    expect(sched.run({ maxSteps: 2 })).toEqual({ reason: 'maxSteps', steps: 2 })
    expect(t.clock).toBe(600)
    expect(sched.run().reason).toBe('idle')
    expect(t.clock).toBe(1000)
  })

  it("wraps a thread's exception in THREAD_FAILED naming the thread, with the cause", () => {
    const sched = new Scheduler()
    const boom = new Error('boom')
    const t = sched.spawn('vcpu3', function* () {
      yield 25
      throw boom
    })
    const e = caught(() => sched.run())
    expect(e.code).toBe('THREAD_FAILED')
    expect(e.message).toContain('"vcpu3" (#0)')
    expect(e.message).toContain('t=25')
    expect(e.cause).toBe(boom)
    expect(t.state).toBe('failed')
    expect(t.error).toBe(boom)
  })

  it('a thread returning with a lock held fails with LOCK_HELD_AT_EXIT', () => {
    const sched = new Scheduler()
    const s = new Spinlock(sched, 'pages_lock')
    sched.spawn('leaky', function* () {
      yield* s.lock()
    })
    const e = caught(() => sched.run())
    expect((e.cause as ConcurrencyError).code).toBe('LOCK_HELD_AT_EXIT')
    expect((e.cause as ConcurrencyError).message).toContain('spinlock "pages_lock"')
  })

  it('needResched() becomes true after a time slice; condResched() then charges a context switch', () => {
    const sched = new Scheduler({ costs: { schedSlice: 1000, contextSwitch: 77 } })
    const seen: boolean[] = []
    const t = sched.spawn('T', function* () {
      yield 999
      seen.push(yield* sched.condResched()) // 999 < 1000: no
      yield 1
      seen.push(yield* sched.condResched()) // 1000: yes, +77
      seen.push(yield* sched.condResched()) // slice restarted: no
    })
    sched.run()
    expect(seen).toEqual([false, true, false])
    expect(t.clock).toBe(1077)
  })
})

describe('Scheduler: determinism and chaos', () => {
  function program(opts: SchedulerOptions) {
    const sched = new Scheduler({ ...opts, recordTrace: true })
    const mmu = new RwLock(sched, 'mmu_lock')
    const pages = new Spinlock(sched, 'pages_lock')
    const rcu = new Rcu(sched, { gracePeriodNs: 500 })
    let freed = 0
    for (let v = 0; v < 3; v++) {
      sched.spawn(`vcpu${v}`, function* () {
        for (let i = 0; i < 4; i++) {
          yield* mmu.readLock()
          rcu.readLock()
          yield 30 + v * 7
          rcu.readUnlock()
          mmu.readUnlock()
          yield 11
        }
      })
    }
    sched.spawn('zapper', function* () {
      for (let i = 0; i < 3; i++) {
        yield* mmu.writeLock()
        yield* pages.lock()
        yield 40
        pages.unlock()
        rcu.callRcu(() => {
          freed++
        })
        mmu.writeUnlock()
        yield 25
      }
      yield* rcu.barrier()
    })
    sched.run()
    return { sched, mmu, freed }
  }

  it('the same program twice gives an identical trace, clocks and counters', () => {
    const x = program({})
    const y = program({})
    expect(x.sched.trace).toEqual(y.sched.trace)
    expect(x.sched.traceHash).toBe(y.sched.traceHash)
    expect(x.sched.stats).toEqual(y.sched.stats)
    expect(x.mmu.stats).toEqual(y.mmu.stats)
    expect(x.sched.allThreads.map((t) => t.clock)).toEqual(y.sched.allThreads.map((t) => t.clock))
    expect(x.freed).toBe(3)
    expect(x.mmu.stats.write.contended).toBeGreaterThan(0)
  })

  it('chaos: the same seed gives the same interleaving; different seeds give different ones', () => {
    const a = program({ chaos: { seed: 12345, depth: 3, expectedSteps: 60 } })
    const b = program({ chaos: { seed: 12345, depth: 3, expectedSteps: 60 } })
    expect(a.sched.trace).toEqual(b.sched.trace)
    expect(a.sched.stats).toEqual(b.sched.stats)
    const hashes = new Set<number>()
    for (let seed = 1; seed <= 8; seed++) hashes.add(program({ chaos: { seed, depth: 3, expectedSteps: 60 } }).sched.traceHash)
    expect(hashes.size).toBeGreaterThanOrEqual(2)
    // Every interleaving still completes the program.
    expect(a.freed).toBe(3)
  })

  it('chaos picks by priority, not by clock (a later thread can run first)', () => {
    let sawOutOfClockOrder = false
    for (let seed = 1; seed <= 10 && !sawOutOfClockOrder; seed++) {
      const sched = new Scheduler({ chaos: { seed }, recordTrace: true })
      sched.spawn('early', function* () {
        yield 1
      })
      sched.spawn('late', function* () {
        yield 1
      }, { startTime: 1000 })
      sched.run()
      if (sched.trace[0] === 1) sawOutOfClockOrder = true
    }
    expect(sawOutOfClockOrder).toBe(true)
  })
})

describe('Scheduler: deadlock detection', () => {
  it('reports an AB-BA deadlock with who waits on what', () => {
    const sched = new Scheduler()
    const a = new Spinlock(sched, 'A')
    const b = new Spinlock(sched, 'B')
    sched.spawn('t1', function* () {
      yield* a.lock()
      yield 10
      yield* b.lock()
    })
    sched.spawn('t2', function* () {
      yield* b.lock()
      yield 10
      yield* a.lock()
    })
    const e = caught(() => sched.run())
    expect(e.code).toBe('DEADLOCK')
    expect(e.message).toContain('"t1" (#0) at t=20 waits on spinlock "B" (held by "t2" (#1)')
    expect(e.message).toContain('"t2" (#1) at t=20 waits on spinlock "A" (held by "t1" (#0)')
  })

  it('reports a wait that nobody will ever satisfy, and a self-join', () => {
    const sched = new Scheduler()
    const wq = new WaitQueue(sched, 'never')
    sched.spawn('sleeper', function* () {
      yield* wq.wait()
    })
    const e = caught(() => sched.run())
    expect(e.code).toBe('DEADLOCK')
    expect(e.message).toContain('wait queue "never"')

    const s2 = new Scheduler()
    const self = s2.spawn('self', function* (): KernelOp {
      yield* s2.join(self)
    })
    expect((caught(() => s2.run()).cause as ConcurrencyError).code).toBe('DEADLOCK')
  })

  it('wait queues: waitEvent re-checks its condition; the waker pays nothing, the sleeper a wake-up', () => {
    const sched = new Scheduler({ costs: { contextSwitch: 100 } })
    const wq = new WaitQueue(sched, 'done')
    let flag = false
    const sleeper = sched.spawn('sleeper', function* () {
      yield* wq.waitEvent(() => flag)
    })
    sched.spawn('waker', function* () {
      yield 50
      wq.wakeAll() // spurious: flag still false; the sleeper wakes at 150 and sleeps again
      yield 200
      flag = true
      expect(wq.wakeOne()).toBe(true)
    })
    sched.run()
    expect(sleeper.clock).toBe(350) // woken by wakeOne() at 250, plus the 100 ns wake-up
    expect(sched.stats.wakes).toBe(2)
  })

  it('sleeping in atomic context throws SLEEP_IN_ATOMIC', () => {
    const sched = new Scheduler()
    const s = new Spinlock(sched, 'pages_lock')
    const m = new Mutex(sched, 'slots_lock')
    let err: ConcurrencyError | undefined
    sched.spawn('bad', function* () {
      yield* s.lock()
      try {
        yield* m.lock()
      } catch (e) {
        err = e as ConcurrencyError
      }
      s.unlock()
    })
    sched.run()
    expect(err?.code).toBe('SLEEP_IN_ATOMIC')
    expect(err?.message).toContain('mutex_lock(slots_lock)')
    expect(err?.message).toContain('spinlock "pages_lock"')
  })

  it('rejects re-entrant run() and bad costs', () => {
    const sched = new Scheduler()
    sched.spawn('r', function* () {
      sched.run()
      yield 0
    })
    expect((caught(() => sched.run()).cause as ConcurrencyError).code).toBe('SCHEDULER_BUSY')
    expect(caught(() => new Scheduler({ costs: { lockAcquire: -1 } })).code).toBe('INVALID_ARGUMENT')
  })
})
