/**
 * The iterator (tdp_iter.c) and the yield protocol: pre-order, re-read on every move, restart
 * after a yield without skipping the current position (S12), the forward-progress rule (S13).
 */
import { describe, expect, it } from 'vitest'
import { type KernelOp, Refcount, Vm } from '@mmusim/kvm'
import { getTdpMmu, tdpStrategy } from './index.ts'
import { pageBatch, rawGuest, WRITE } from './testing/raw-guest.ts'

/** A VM whose root maps `pages` 4K pages at gpa 0 (and 2 at 1 GiB: a second PDPTE). */
function populated(pages: number, hazards: object = {}, chaos?: { seed: number; reschedProbability: number }) {
  const vm = new Vm({ strategy: tdpStrategy, strategyOptions: { testHazards: hazards }, hostMemBytes: 64 << 20, chaos })
  vm.addMemory(0, 4 << 20, { slot: 0 })
  vm.addMemory(1 << 30, 1 << 20, { slot: 1 })
  vm.spawnGuest(0, rawGuest(vm.vcpus[0]!.guest.op, [pageBatch(0, pages, WRITE), pageBatch(1 << 30, 2, WRITE)]))
  vm.run()
  return { vm, mmu: getTdpMmu(vm) }
}

describe('TdpIter', () => {
  it('walks pre-order: each entry before its children, the covering entry first, never below min_level', () => {
    const { vm, mmu } = populated(3)
    const root = mmu.rootsHead!
    const seen: string[] = []
    vm.runKernel('walk', function* (): KernelOp {
      vm.rcu.readLock()
      const it = mmu.newIter()
      for (it.start(root, 1, 1); it.valid && it.gfn < 3; it.next()) seen.push(`L${String(it.level)}:${String(it.gfn)}`)
      vm.rcu.readUnlock()
    })
    // The first entries presented are the ones covering gfn 1 (their gfn is 0 < start).
    expect(seen).toEqual(['L4:0', 'L3:0', 'L2:0', 'L1:1', 'L1:2'])
    const seen2: string[] = []
    vm.runKernel('walk2', function* (): KernelOp {
      vm.rcu.readLock()
      const it = mmu.newIter()
      for (it.start(root, 3, 0); it.valid && it.gfn < 2 ** 20; it.next()) seen2.push(`L${String(it.level)}:${String(it.gfn)}`)
      vm.rcu.readUnlock()
    })
    expect(seen2[0]).toBe('L4:0')
    expect(seen2).toContain('L3:0')
    expect(seen2).toContain(`L3:${String(2 ** 18)}`) // the 1 GiB PDPTE
    expect(seen2.every((s) => !s.startsWith('L2') && !s.startsWith('L1'))).toBe(true)
    vm.destroy()
  })

  it('a yield restarts at the root toward next_last_level_gfn and presents the current position again', () => {
    const { vm, mmu } = populated(8)
    const root = mmu.rootsHead!
    const seen: string[] = []
    vm.runKernel('walk', function* (): KernelOp {
      yield* vm.mmuLock.readLock()
      vm.rcu.readLock()
      const it = mmu.newIter()
      let yielded = false
      for (it.start(root, 1, 0); it.valid && it.gfn < 8; it.next()) {
        seen.push(`L${String(it.level)}:${String(it.gfn)}`)
        if (!yielded && it.level === 1 && it.gfn === 4) {
          yielded = true
          it.yielded = true // as tdp_mmu_iter_cond_resched does after dropping the locks
        }
      }
      vm.rcu.readUnlock()
      vm.mmuLock.readUnlock()
    })
    expect(seen).toEqual(['L4:0', 'L3:0', 'L2:0', 'L1:0', 'L1:1', 'L1:2', 'L1:3', 'L1:4', 'L4:0', 'L3:0', 'L2:0', 'L1:4', 'L1:5', 'L1:6', 'L1:7'])
    vm.destroy()
  })

  it('S12: with min_level == root level, the restart re-presents the entry where the walk yielded; the hazard skips it', () => {
    for (const hazard of [false, true]) {
      const { vm, mmu } = populated(2, { advanceAfterRestart: hazard })
      const root = mmu.rootsHead!
      const seen: number[] = []
      vm.runKernel('walk', function* (): KernelOp {
        vm.rcu.readLock()
        const it = mmu.newIter()
        let yielded = false
        for (it.start(root, 4, 0); it.valid && it.gfn < 3 * 2 ** 27; it.next()) {
          seen.push(it.gfn / 2 ** 27)
          if (!yielded) {
            yielded = true
            it.yielded = true
          }
        }
        vm.rcu.readUnlock()
      })
      expect(seen).toEqual(hazard ? [0, 1, 2] : [0, 0, 1, 2])
      vm.destroy()
    }
  })

  it('S13: under permanent contention the walk still completes (forward-progress rule); without it, livelock', () => {
    for (const noRule of [false, true]) {
      const { vm, mmu } = populated(64, { noForwardProgressRule: noRule }, { seed: 3, reschedProbability: 1 })
      let done = false
      vm.sched.spawn('zap_gfn_range', function* (): KernelOp {
        yield* mmu.kvmZapGfnRange(0, 1024)
        done = true
      })
      vm.sched.run({ maxSteps: 20_000 })
      expect(done).toBe(!noRule)
      if (!noRule) {
        expect(vm.stats.pages_4k).toBe(2) // only the 1 GiB slot's pages remain
        expect(mmu.counters.yields).toBeGreaterThan(60)
        expect(vm.mmu.audit()).toEqual([])
      }
    }
  })
})

describe('seed 004: the refcount API refuses the proposals the review rejected', () => {
  it('dropping a reference another task took, or forcing the count, throws', () => {
    const rc = new Refcount(2, { name: 'root', trackOwners: true, owners: ['tdp_mmu', 'vcpu0'] })
    rc.publish()
    expect(rc.incNotZero('zapper')).toBe(true)
    // "decrement-if-not-one" by a task that holds no reference
    expect(() => rc.decNotOne('t9')).toThrow(/holds no reference/)
    // "force the refcount to 0"
    expect(() => {
      rc.set(0)
    }).toThrow(/after the object was published/)
    expect(rc.decAndTest('zapper')).toBe(false)
    expect(rc.decAndTest('vcpu0')).toBe(false)
    expect(rc.decAndTest('tdp_mmu')).toBe(true)
    expect(rc.incNotZero('late')).toBe(false) // I-R1: 0 is terminal
    expect(() => {
      rc.inc('late')
    }).toThrow(/REFCOUNT|addition on 0|on 0/)
  })
})
