import { describe, expect, it } from 'vitest'
import { ConcurrencyError } from './errors.ts'
import { REFCOUNT_MAX, Refcount } from './refcount.ts'
import { Scheduler } from './scheduler.ts'

function codeOf(fn: () => unknown): string {
  try {
    fn()
  } catch (e) {
    if (e instanceof ConcurrencyError) return e.code
    throw e
  }
  return 'no error'
}

describe('Refcount (refcount_t rules)', () => {
  it('inc from zero is an error; incNotZero fails at zero and succeeds otherwise', () => {
    const dead = new Refcount(0, { name: 'root' })
    expect(codeOf(() => { dead.inc() })).toBe('REFCOUNT_INC_FROM_ZERO')
    expect(dead.incNotZero()).toBe(false)
    expect(dead.read()).toBe(0)
    const live = new Refcount(1)
    expect(live.incNotZero()).toBe(true)
    live.inc()
    expect(live.read()).toBe(3)
  })

  it('dec may not release the last reference; decAndTest reports it; below zero underflows', () => {
    const r = new Refcount(2)
    r.dec()
    expect(r.read()).toBe(1)
    expect(codeOf(() => { r.dec() })).toBe('REFCOUNT_DEC_TO_ZERO')
    expect(r.read()).toBe(1)
    expect(r.decAndTest()).toBe(true)
    expect(r.read()).toBe(0)
    expect(codeOf(() => r.decAndTest())).toBe('REFCOUNT_UNDERFLOW')
    expect(codeOf(() => { r.dec() })).toBe('REFCOUNT_UNDERFLOW')
    expect(codeOf(() => r.decNotOne())).toBe('REFCOUNT_UNDERFLOW')
  })

  it('decAndTest is false while other references remain', () => {
    const r = new Refcount(2)
    expect(r.decAndTest()).toBe(false)
    expect(r.read()).toBe(1)
  })

  it('decNotOne and decIfOne follow refcount_dec_not_one / refcount_dec_if_one', () => {
    const r = new Refcount(2)
    expect(r.decNotOne()).toBe(true)
    expect(r.decNotOne()).toBe(false)
    expect(r.read()).toBe(1)
    const s = new Refcount(2)
    expect(s.decIfOne()).toBe(false)
    s.dec()
    expect(s.decIfOne()).toBe(true)
    expect(s.read()).toBe(0)
  })

  it('overflow saturates as an error', () => {
    const r = new Refcount(REFCOUNT_MAX)
    expect(codeOf(() => { r.inc() })).toBe('REFCOUNT_SATURATED')
    expect(codeOf(() => r.incNotZero())).toBe('REFCOUNT_SATURATED')
    expect(r.read()).toBe(REFCOUNT_MAX)
  })

  it('set is allowed before publication only', () => {
    const r = new Refcount(1)
    r.set(2) // still private to its creator (kvm_tdp_mmu_alloc_root before list_add_rcu)
    expect(r.read()).toBe(2)
    r.publish()
    expect(codeOf(() => { r.set(1) })).toBe('REFCOUNT_SET_AFTER_PUBLISH')
    const q = new Refcount(1)
    q.incNotZero() // the first get publishes implicitly
    expect(q.isPublished).toBe(true)
    expect(codeOf(() => { q.set(5) })).toBe('REFCOUNT_SET_AFTER_PUBLISH')
    expect(codeOf(() => new Refcount(-1))).toBe('INVALID_ARGUMENT')
  })

  it('owner tracking: every get/put names an owner and owners must match the count', () => {
    expect(codeOf(() => new Refcount(2, { trackOwners: true, owners: ['tdp_mmu'] }))).toBe('INVALID_ARGUMENT')
    const r = new Refcount(2, { trackOwners: true, owners: ['vcpu0', 'tdp_mmu'] })
    expect(codeOf(() => r.incNotZero())).toBe('REFCOUNT_OWNER_REQUIRED')
    expect(r.incNotZero('walker')).toBe(true)
    expect([...r.holders()].sort()).toEqual([['tdp_mmu', 1], ['vcpu0', 1], ['walker', 1]])
    expect(r.decAndTest('walker')).toBe(false)
    expect(codeOf(() => r.decAndTest('walker'))).toBe('REFCOUNT_FOREIGN_PUT')
    expect(r.read()).toBe(2)
  })
})

describe('Refcount: the misuses seed 004 calls wrong', () => {
  /**
   * Seed 004 / tdp-mmu.md S4(b): task A puts its reference on a root, zaps it (yielding); in the
   * yield window task B takes a reference; A then "puts" again with refcount_dec_not_one(),
   * which would drop B's reference: "_this_ task can't drop a reference taken by the other task".
   */
  it("catches A dropping the reference B took during A's yield (REFCOUNT_FOREIGN_PUT)", () => {
    const sched = new Scheduler()
    const count = new Refcount(2, { name: 'root tdp_mmu_root_count', trackOwners: true, owners: ['A', 'tdp_mmu'] })
    count.publish()
    let err: ConcurrencyError | undefined
    let bGot = false
    sched.spawn('A', function* () {
      expect(count.decNotOne('A')).toBe(true) // A's put: 2 → 1
      yield 500 // tdp_mmu_zap_root() yields
      try {
        count.decNotOne('A') // second put by A: 2 → 1 would drop B's reference
      } catch (e) {
        err = e as ConcurrencyError
      }
    })
    sched.spawn('B', function* () {
      yield 100
      bGot = count.incNotZero('B') // tdp_mmu_next_root() grabs the root
      yield 1000
      count.decAndTest('B')
    })
    sched.run()
    expect(bGot).toBe(true)
    expect(err?.code).toBe('REFCOUNT_FOREIGN_PUT')
    expect(err?.message).toContain('by "A", which holds no reference (count 2; holders: tdp_mmu×1, B×1)')
    expect(count.read()).toBe(1) // B's put went through; only the MMU's reference is left
  })

  /** Seed 004: "KVM should never force a refcount to '0'" — B still holds a reference. */
  it('catches forcing the count to 0 while another task holds a reference (REFCOUNT_SET_AFTER_PUBLISH)', () => {
    const count = new Refcount(1, { name: 'root tdp_mmu_root_count', trackOwners: true, owners: ['A'] })
    count.publish()
    expect(count.incNotZero('B')).toBe(true)
    expect(count.decNotOne('A')).toBe(true)
    let err: ConcurrencyError | undefined
    try {
      count.set(0) // refcount_set(&root->tdp_mmu_root_count, 0)
    } catch (e) {
      err = e as ConcurrencyError
    }
    expect(err?.code).toBe('REFCOUNT_SET_AFTER_PUBLISH')
    expect(err?.message).toContain('holders: B×1')
    expect(count.read()).toBe(1)
  })
})
