/**
 * tools/testing/selftests/kvm/x86/nx_huge_pages_test.c (anchors.md §B.9): three 2 MiB pages,
 * read hp1 → read hp2 → exec hp1 → exec hp3 → read hp1 → NX recovery → read hp3, with exact
 * pages_2m / nx_lpage_splits after every step, mitigation on and off, EPT and NPT.
 * The guest runs with paging off, i.e. it "maps" the region with no huge guest pages at all: the
 * TDP page size must not depend on the guest's.
 */
import { describe, expect, it } from 'vitest'
import { Vm } from '@mmusim/kvm'
import { getTdpMmu, tdpStrategy } from './index.ts'
import { FETCH, pageBatch, READ, rawGuest } from './testing/raw-guest.ts'

const HP = 0x40000000 // hp1 at 1 GiB; hp2 and hp3 follow
const HPAGE = 2 << 20

const expected = {
  on: [
    [0, 0],
    [1, 0],
    [2, 0],
    [1, 1],
    [1, 2],
    [1, 2],
    [1, 0],
    [2, 0],
  ],
  off: [
    [0, 0],
    [1, 0],
    [2, 0],
    [2, 0],
    [3, 0],
    [3, 0],
    [3, 0],
    [3, 0],
  ],
} as const

describe('nx_huge_pages_test: exact pages_2m / nx_lpage_splits after every step', () => {
  for (const format of ['ept', 'npt'] as const) {
    for (const mitigation of ['on', 'off'] as const) {
      it(`${format}, nx_huge_pages=${mitigation}`, () => {
        const vm = new Vm({ strategy: tdpStrategy, strategyOptions: { format, nxHugePages: mitigation === 'on' }, hostMemBytes: 64 << 20 })
        vm.addMemory(HP, 3 * HPAGE, { thp: true })
        const mmu = getTdpMmu(vm)
        const seen: number[][] = []
        const snap = (): void => {
          seen.push([vm.stats.pages_2m, vm.stats.nx_lpage_splits])
          expect(vm.mmu.audit()).toEqual([])
        }
        const step = (gpa: number, kind: number): void => {
          const res = { ok: true }
          vm.spawnGuest(0, rawGuest(vm.vcpus[0]!.guest.op, [pageBatch(gpa, 1, kind)], res))
          vm.run()
          expect(res.ok).toBe(true)
          snap()
        }
        snap()
        step(HP, READ) // read hp1
        step(HP + HPAGE, READ) // read hp2
        step(HP, FETCH) // exec hp1
        step(HP + 2 * HPAGE, FETCH) // exec hp3
        step(HP, READ) // read hp1
        // The recovery worker after 5 periods with ratio 1 (-r): every tracked SP is zapped.
        vm.runKernel('kvm-nx-lpage-recovery', () => mmu.kvmRecoverNxHugePages(1))
        snap()
        step(HP + 2 * HPAGE, READ) // read hp3
        expect(seen).toEqual(expected[mitigation])
        vm.destroy()
        expect(vm.mmuPagesLive).toBe(0)
      })
    }
  }
})
