import { describe, expect, it } from 'vitest'
import { ConcurrencyError } from './errors.ts'
import { Rcu } from './rcu.ts'
import { RwLock } from './rwlock.ts'
import { type KernelOp, Scheduler } from './scheduler.ts'
import { TimerQueue } from './timer.ts'
import { WaitQueue } from './wait-queue.ts'

function caught(fn: () => unknown): ConcurrencyError {
  try {
    fn()
  } catch (e) {
    if (e instanceof Error && e.cause instanceof ConcurrencyError) return e.cause
    if (e instanceof ConcurrencyError) return e
    throw e
  }
  throw new Error('expected a ConcurrencyError')
}

/** A periodic daemon: every `period` ns from its start, log its clock, until `stop()`. */
function periodic(sched: Scheduler, timers: TimerQueue, period: number, log: number[]) {
  const flags = { stopping: false }
  const stopped = (): boolean => flags.stopping
  const t = sched.spawn('kdaemon', function* (): KernelOp {
    let next = sched.now + period
    while (!stopped()) {
      yield* timers.sleepUntil(next)
      if (stopped()) break
      log.push(sched.now)
      yield 7 // the work of one round
      next += period
    }
  }, { daemon: true })
  return {
    t,
    stop: () => {
      flags.stopping = true
      timers.wakeUp(t)
    },
  }
}

describe('daemon threads and timed sleeps (schedule_timeout)', () => {
  it('a sleeper wakes exactly at its deadline; a periodic daemon does not keep run() going', () => {
    const sched = new Scheduler()
    const timers = new TimerQueue(sched)
    const log: number[] = []
    const d = periodic(sched, timers, 100, log)
    expect(d.t.daemon).toBe(true)
    const worker = sched.spawn('worker', function* () {
      yield 250
    })
    const r = sched.run()
    expect(r.reason).toBe('idle')
    // The daemon ran at 100 and 200 while the worker (done at 250) was alive; nothing after.
    expect(log).toEqual([100, 200])
    expect(worker.state).toBe('done')
    expect(d.t.state).toBe('blocked')
    expect(timers.pending).toBe(1)
    expect(sched.liveThreads).toBe(1)
    // With a horizon the daemon keeps running up to it.
    expect(sched.run({ until: 520 }).reason).toBe('idle')
    expect(log).toEqual([100, 200, 300, 400, 500])
    expect(timers.stats).toEqual({ sleeps: 6, expired: 5, wokenEarly: 0 })
  })

  it('wakeUp() ends the sleep early (false from sleepUntil); a joined daemon exits and nothing stays pending', () => {
    const sched = new Scheduler()
    const timers = new TimerQueue(sched)
    const log: number[] = []
    const d = periodic(sched, timers, 1000, log)
    let ended: boolean | undefined
    const early = sched.spawn('early', function* (): KernelOp {
      ended = yield* timers.sleepUntil(5000)
    })
    sched.spawn('stopper', function* (): KernelOp {
      yield 40
      expect(timers.wakeUp(early)).toBe(true)
      d.stop()
      yield* sched.join(d.t)
    })
    expect(sched.run().reason).toBe('idle')
    expect(ended).toBe(false)
    expect(early.clock).toBe(40)
    expect(log).toEqual([])
    expect(d.t.state).toBe('done')
    expect(timers.pending).toBe(0)
    expect(sched.liveThreads).toBe(0)
    expect(timers.stats.wokenEarly).toBe(2)
  })

  it('a non-daemon sleeper keeps the run going; RCU callbacks still fire when only daemons are left', () => {
    const sched = new Scheduler({ costs: { rcuGracePeriod: 10_000 } })
    const timers = new TimerQueue(sched)
    const rcu = new Rcu(sched)
    const log: number[] = []
    periodic(sched, timers, 3000, log)
    let freed = -1
    sched.spawn('sleeper', function* (): KernelOp {
      yield* timers.sleep(6500)
      rcu.callRcu(() => {
        freed = sched.now
      })
    })
    expect(sched.run().reason).toBe('idle')
    expect(freed).toBe(16_500)
    // The daemon ran while the sleeper or the pending callback was outstanding.
    expect(log).toEqual([3000, 6000, 9000, 12_000, 15_000])
  })

  it('non-daemon threads blocked with nothing but daemon timers pending: DEADLOCK, not an endless run', () => {
    const sched = new Scheduler()
    const timers = new TimerQueue(sched)
    periodic(sched, timers, 100, [])
    const wq = new WaitQueue(sched, 'never')
    sched.spawn('stuck', function* (): KernelOp {
      yield* wq.wait()
    })
    expect(caught(() => sched.run()).code).toBe('DEADLOCK')
  })

  it('sleeping holding a rwlock or inside RCU is a bug (might_sleep)', () => {
    const sched = new Scheduler()
    const timers = new TimerQueue(sched)
    const lock = new RwLock(sched, 'mmu_lock')
    sched.spawn('bad', function* (): KernelOp {
      yield* lock.readLock()
      yield* timers.sleep(10)
    })
    expect(caught(() => sched.run()).code).toBe('SLEEP_IN_ATOMIC')
  })

  it('same seed, same interleaving with a daemon under chaos', () => {
    const once = (): number => {
      const sched = new Scheduler({ chaos: { seed: 5, expectedSteps: 50 } })
      const timers = new TimerQueue(sched)
      periodic(sched, timers, 30, [])
      for (let i = 0; i < 3; i++) {
        sched.spawn(`w${String(i)}`, function* () {
          for (let k = 0; k < 10; k++) yield 11
        })
      }
      expect(sched.run().reason).toBe('idle')
      return sched.traceHash
    }
    expect(once()).toBe(once())
  })
})
