/**
 * tools/testing/selftests/kvm/x86/dirty_log_page_splitting_test.c invariants (anchors.md §B.10):
 * 2 vCPUs, 2 slots, 2 iterations, huge-page backing (2 MiB THP), with and without manual
 * protect; plus eager split off (split on fault) and D-bit clearing.
 */
import { describe, expect, it } from 'vitest'
import { KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES, type Memslot, Vm } from '@mmusim/kvm'
import { getTdpMmu, tdpStrategy } from './index.ts'
import { pageBatch, rawGuest, WRITE } from './testing/raw-guest.ts'

const SLOT_BYTES = 8 << 20
const BASES = [0x40000000, 0x40000000 + SLOT_BYTES] as const
const PAGES = SLOT_BYTES / 4096
const HOST_NUM_PAGES = 2 * PAGES

function setup(manual: boolean, strategyOptions: object = {}) {
  const vm = new Vm({ strategy: tdpStrategy, strategyOptions, vcpus: 2, hostMemBytes: 64 << 20 })
  if (manual) vm.memslots.enableManualDirtyLogProtect(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET)
  BASES.forEach((gpa, i) => vm.addMemory(gpa, SLOT_BYTES, { slot: i, thp: true }))
  return vm
}

function runIteration(vm: Vm, value: number): void {
  for (let c = 0; c < 2; c++) {
    const res = { ok: true }
    vm.spawnGuest(c, rawGuest(vm.vcpus[c]!.guest.op, [pageBatch(BASES[c]!, PAGES, WRITE, value)], res))
  }
  vm.run()
}

function setLogging(vm: Vm, on: boolean): void {
  for (let i = 0; i < 2; i++) {
    const s = vm.memslots.idToMemslot(0, i)!
    vm.setUserMemoryRegion({ slot: i, asId: 0, flags: on ? KVM_MEM_LOG_DIRTY_PAGES : 0, guestPhysAddr: s.baseGfn * 4096, memorySize: s.npages * 4096, userspaceAddr: s.userspaceAddr })
  }
}

const hugepages = (vm: Vm): number => vm.stats.pages_2m + vm.stats.pages_1g

describe('dirty_log_page_splitting_test', () => {
  for (const manual of [false, true]) {
    it(`invariants ${manual ? 'with' : 'without'} manual protect`, () => {
      const vm = setup(manual)
      runIteration(vm, 1)
      // After populate, everything is mapped huge.
      expect(vm.stats.pages_2m * 512 + vm.stats.pages_1g * 512 * 512).toBe(HOST_NUM_PAGES)
      expect(vm.stats.pages_4k).toBe(0)
      const populated2m = vm.stats.pages_2m
      setLogging(vm, true)
      if (!manual) {
        expect(hugepages(vm)).toBe(0)
        expect(vm.stats.pages_4k).toBeGreaterThanOrEqual(HOST_NUM_PAGES)
      } else {
        expect(vm.stats.pages_2m).toBe(populated2m) // huge pages survive the enable
      }
      expect(vm.mmu.audit()).toEqual([])
      for (let it = 0; it < 2; it++) {
        if (manual) {
          // The clear pass (KVM_CLEAR_DIRTY_LOG over the whole slot): split + write-protect.
          for (let i = 0; i < 2; i++) vm.clearDirtyLog(0, i, 0, PAGES, new Uint32Array(PAGES / 32).fill(0xffffffff))
          expect(hugepages(vm)).toBe(0)
          expect(vm.stats.pages_4k).toBeGreaterThanOrEqual(HOST_NUM_PAGES)
        }
        runIteration(vm, 100 * (it + 2))
        for (let i = 0; i < 2; i++) {
          const bm = manual ? vm.memslots.idToMemslot(0, i)!.dirtyBitmap!.slice() : vm.getDirtyLog(0, i)
          for (let w = 0; w < PAGES / 32; w++) expect(bm[w]).toBe(0xffffffff) // every written page was logged
        }
        expect(vm.mmu.audit()).toEqual([])
      }
      setLogging(vm, false)
      runIteration(vm, 7)
      // Huge pages are back (recovered on disable, or rebuilt by the re-touch).
      expect(vm.stats.pages_2m).toBe(populated2m)
      expect(vm.stats.pages_4k).toBe(0)
      expect(vm.mmu.audit()).toEqual([])
      vm.destroy()
      expect(vm.mmuPagesLive).toBe(0)
    })
  }

  it('without eager split, huge pages survive the enable and are split by the write faults', () => {
    const vm = setup(false, { eagerSplit: false })
    runIteration(vm, 1)
    const populated2m = vm.stats.pages_2m
    setLogging(vm, true)
    expect(vm.stats.pages_2m).toBe(populated2m)
    runIteration(vm, 2)
    expect(hugepages(vm)).toBe(0)
    expect(vm.stats.pages_4k).toBe(HOST_NUM_PAGES)
    for (let i = 0; i < 2; i++) expect([...vm.getDirtyLog(0, i)].every((w) => w === 0xffffffff)).toBe(true)
    expect(vm.mmu.audit()).toEqual([])
    vm.destroy()
  })

  it('D-bit clearing (clear_dirty_slot / masked clear) leaves W and lets the CPU set D again', () => {
    const vm = setup(false, { eagerSplit: true })
    runIteration(vm, 1)
    setLogging(vm, true)
    runIteration(vm, 2)
    const mmu = getTdpMmu(vm)
    const slot = vm.memslots.idToMemslot(0, 0)!
    const countD = (s: Memslot): number => {
      let n = 0
      const root = mmu.rootsHead!
      const it = mmu.newIter()
      for (it.start(root, 1, s.baseGfn); it.valid && it.gfn < s.endGfn; it.next()) {
        if (it.level === 1 && (it.oldLo & mmu.fmt.dirtyLo) !== 0 && (it.oldLo & 2) !== 0) n++
      }
      return n
    }
    expect(countD(slot)).toBe(PAGES)
    vm.runKernel('clear_dirty', function* () {
      yield* vm.mmuLock.readLock()
      yield* mmu.kvmTdpMmuClearDirtySlot(slot)
      vm.mmuLock.readUnlock()
    })
    expect(countD(slot)).toBe(0)
    vm.flushRemoteTlbs()
    runIteration(vm, 3)
    expect(countD(slot)).toBe(PAGES)
    expect(vm.mmu.audit()).toEqual([])
    vm.destroy()
  })
})
