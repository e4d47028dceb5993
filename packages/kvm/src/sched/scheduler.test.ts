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

describe('call protocol (sched.call)', () => {
  it('behaves like yield*: same yields and clocks, return values, nested calls, blocking inside a callee', () => {
    function run(useCall: boolean): { log: string[]; clock: number; hash: number } {
      const s = new Scheduler()
      const l: string[] = []
      const wq = new WaitQueue(s, 'wq')
      let ready = false
      function* leaf(x: number): KernelOp<number> {
        yield 10
        l.push(`leaf${x}@${s.now}`)
        yield 5
        return x * 2
      }
      function* mid(x: number): KernelOp<number> {
        const a = useCall ? ((yield s.call(leaf(x))) as number) : yield* leaf(x)
        yield* wq.waitEvent(() => ready)
        const b = useCall ? ((yield s.call(leaf(a))) as number) : yield* leaf(a)
        return a + b
      }
      const t = s.spawn('a', function* () {
        const r = useCall ? ((yield s.call(mid(1))) as number) : yield* mid(1)
        l.push(`r=${r}@${s.now}`)
        return r
      })
      s.spawn('waker', function* () {
        yield 100
        ready = true
        wq.wakeAll()
      })
      s.run()
      expect(t.result).toBe(6)
      return { log: l, clock: t.clock, hash: s.traceHash }
    }
    const a = run(false)
    const b = run(true)
    // leaf 2 runs after the waker (t=100) and the wake-up latency of the cost model.
    expect(b.log).toEqual(['leaf1@10', `leaf2@${String(b.clock - 5)}`, `r=6@${String(b.clock)}`])
    expect(b.clock).toBeGreaterThan(115)
    expect(b).toEqual(a)
  })

  it('throws a callee exception into its caller, whose try/finally runs', () => {
    const s = new Scheduler()
    const seen: string[] = []
    function* bad(): KernelOp<number> {
      yield 1
      throw new Error('boom')
    }
    const t = s.spawn('a', function* () {
      try {
        yield s.call(bad())
        seen.push('not reached')
      } catch (e) {
        seen.push(`caught ${(e as Error).message}`)
      } finally {
        seen.push('finally')
      }
      yield 2
      return 7
    })
    s.run()
    expect(seen).toEqual(['caught boom', 'finally'])
    expect(t.result).toBe(7)
    expect(t.clock).toBe(3)
  })

  it('an uncaught callee exception fails the thread with THREAD_FAILED', () => {
    const s = new Scheduler()
    function* bad(): KernelOp {
      yield 1
      throw new Error('deep')
    }
    s.spawn('a', function* () {
      yield s.call(bad())
    })
    expect(() => s.run()).toThrow(/thread "a" \(#0\) failed at t=1 ns: deep/)
  })
})

describe('fast path (tryAdvance)', () => {
  /**
   * A program of costs on several threads (with a lock, a timer-like RCU grace period and ties),
   * written once with `yield ns` and once with `if (!sched.tryAdvance(ns)) yield ns`.
   */
  function scenario(opts: SchedulerOptions, fast: boolean) {
    const sched = new Scheduler({ recordTrace: true, ...opts })
    const lock = new Mutex(sched, 'm')
    const rcu = new Rcu(sched)
    const log: string[] = []
    let advanced = 0
    function* spend(ns: number): KernelOp {
      if (fast && sched.tryAdvance(ns)) {
        advanced++
        return
      }
      yield ns
    }
    const worker = (name: string, costs: number[]) =>
      function* (): KernelOp<string> {
        for (const c of costs) {
          yield* spend(c)
          log.push(`${name}@${sched.now}`)
          if (c === 7) {
            yield* lock.lock()
            yield* spend(3)
            lock.unlock()
          }
          if (c === 11) yield* rcu.synchronize()
        }
        return name
      }
    sched.spawn('A', worker('A', [5, 5, 7, 1, 1, 1, 11, 2]))
    sched.spawn('B', worker('B', [1, 1, 1, 1, 30, 7, 5]), { startTime: 12 })
    sched.spawn('C', worker('C', [4, 4, 4, 11, 4]), { startTime: 12 })
    const r = sched.run()
    return { r, log, stats: { ...sched.stats }, now: sched.now, hash: sched.traceHash, trace: [...sched.trace], clocks: sched.allThreads.map((t) => [t.clock, t.steps]), advanced, fastSteps: sched.fastSteps }
  }

  it('gives exactly the clocks, steps, trace and hash of real yields, and takes the fast path where it may', () => {
    const slow = scenario({}, false)
    const fast = scenario({}, true)
    expect(fast.advanced).toBeGreaterThan(0)
    expect(fast.fastSteps).toBe(fast.advanced)
    expect(slow.advanced).toBe(0)
    const { advanced: _a, fastSteps: _c, ...f } = fast
    const { advanced: _b, fastSteps: _d, ...s } = slow
    expect(f).toEqual(s)
  })

  it('is refused with the fastPath option off or in chaos mode (and both still agree with real yields)', () => {
    for (const opts of [{ fastPath: false }, { chaos: { seed: 5 } }] as SchedulerOptions[]) {
      const fast = scenario(opts, true)
      expect(fast.advanced).toBe(0)
      const { advanced: _a, fastSteps: _c, ...f } = fast
      const { advanced: _b, fastSteps: _d, ...s } = scenario(opts, false)
      expect(f).toEqual(s)
    }
    expect(new Scheduler({ fastPath: false }).fastPathEnabled).toBe(false)
    expect(new Scheduler({ chaos: { seed: 1 } }).fastPathEnabled).toBe(false)
    expect(new Scheduler().fastPathEnabled).toBe(true)
  })

  it('refuses when another runnable thread would run first: an earlier clock, or the same clock and a lower id', () => {
    const sched = new Scheduler()
    const got: boolean[] = []
    sched.spawn('low', function* () {
      yield 10
    }, { startTime: 5 })
    sched.spawn('t', function* () {
      got.push(sched.tryAdvance(4)) // 4 < 5: still first
      got.push(sched.tryAdvance(1)) // 5 = 5 but id 1 > 0: 'low' first
      got.push(sched.tryAdvance(0)) // refused above, so still at 4 < 5
      yield 0
    })
    sched.run()
    expect(got).toEqual([true, false, true])
  })

  it('refuses when a timed event is due by then, past the run horizon, or at the step limit; outside threads it is false', () => {
    const sched = new Scheduler()
    const rcu = new Rcu(sched)
    const got: boolean[] = []
    const fired: number[] = []
    expect(sched.tryAdvance(1)).toBe(false)
    sched.spawn('t', function* () {
      rcu.callRcu(() => fired.push(sched.now))
      const gp = sched.costs.rcuGracePeriod
      got.push(sched.tryAdvance(gp)) // the grace period ends at gp: the callback fires first
      got.push(sched.tryAdvance(gp - 1))
      yield 100
      got.push(sched.tryAdvance(10)) // until = 1_000_150 allows 1_000_109...
      got.push(sched.tryAdvance(50)) // ...but not 1_000_159
      yield 0
    })
    const r = sched.run({ until: sched.costs.rcuGracePeriod + 150 })
    expect(r.reason).toBe('idle')
    expect(got).toEqual([false, true, true, false])
    expect(fired).toEqual([sched.costs.rcuGracePeriod])
    const s2 = new Scheduler()
    const got2: boolean[] = []
    s2.spawn('t', function* () {
      got2.push(s2.tryAdvance(1), s2.tryAdvance(1), s2.tryAdvance(1))
      yield 0
    })
    // maxSteps 3: the fast path may start steps 2 and 3 but not a 4th.
    expect(s2.run({ maxSteps: 3 })).toEqual({ reason: 'maxSteps', steps: 3 })
    expect(got2).toEqual([true, true, false])
    expect(s2.stats.steps).toBe(3)
  })
})
