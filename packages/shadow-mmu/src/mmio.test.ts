/**
 * MMIO SPTEs under shadow paging: handle_mmio_page_fault() emulates a reserved-bit fault only on
 * an MMIO SPTE of the current memslot generation (a stale one goes to the slow path, which maps
 * the memory a new memslot provides); FNAME(sync_spte) → sync_mmio_spte() re-marks an MMIO SPTE
 * whose gPTE still names the same gfn and clears it when the gfn moved.
 */
import { describe, expect, it } from 'vitest'
import { Vm } from '@mmusim/kvm'
import { shadowStrategy } from './index.ts'
import { shadowMmuOf } from './shadow-mmu.ts'
import { A, D, L, linkUserPt, loadKernelTables, mapUser, P, poke, RW, runScript, US } from './testing/script-guest.ts'

const MiB = 1 << 20
/** Guest-physical 64 MiB: no memslot until the end of the scenario. */
const HOLE = 64 * MiB

describe('shadow MMIO SPTEs: generation check and sync_mmio_spte()', () => {
  it('emulate while current; re-mark on an access change; clear on a gfn change; map once a memslot appears', () => {
    const vm = new Vm({ strategy: shadowStrategy, strategyOptions: { auditEveryOp: true, prefetch: false }, vcpus: 1, hostMemBytes: 128 * MiB, features: { nonLeafAOnDescent: false } })
    vm.addMemory(0, 32 * MiB)
    loadKernelTables(vm)
    linkUserPt(vm, 0, 0, 0)
    poke(vm, L.pt(0), HOLE | P | RW | US | A | D)
    mapUser(vm, 0, 1, 1)
    const vs = vm.vcpus[0]!.stats
    const snaps: number[][] = []
    const snap = (v: number) => snaps.push([v, vs.pf_mmio_spte_created, vs.pf_emulate])
    runScript(vm, function* (g) {
      snap(yield* g.userRead(L.va(0, 0, 0))) // a new MMIO SPTE; emulated: open bus
      snap(yield* g.userRead(L.va(0, 0, 0))) // RSVD fault on the current MMIO SPTE: emulated
      // Same gfn, read-only now: the PT goes unsync; the flush syncs it and re-marks the SPTE.
      yield* g.write64(L.pt(0), HOLE | P | US | A | D)
      yield* g.movCr3()
      snap(yield* g.userRead(L.va(0, 0, 0)))
      // Another gfn: the sync clears the MMIO SPTE; the read builds a new one.
      yield* g.write64(L.pt(0), HOLE + 0x1000 | P | RW | US | A | D)
      yield* g.movCr3()
      snap(yield* g.userRead(L.va(0, 0, 0)))
    })
    expect(snaps).toEqual([
      [-1 >>> 0, 1, 1],
      [-1 >>> 0, 1, 2],
      [-1 >>> 0, 1, 3],
      [-1 >>> 0, 2, 4],
    ])
    // Memory appears at the hole: the MMIO SPTE's generation is stale, the slow path maps it.
    vm.addMemory(HOLE, 2 * MiB)
    poke(vm, HOLE + 0x1000, 0x42)
    let v = 0
    runScript(
      vm,
      function* (g) {
        v = yield* g.userRead(L.va(0, 0, 0))
      },
      false,
    )
    expect(v).toBe(0x42)
    expect([vs.pf_mmio_spte_created, vs.pf_emulate]).toEqual([2, 4])
    expect(shadowMmuOf(vm).audit()).toEqual([])
    vm.destroy()
  })
})
