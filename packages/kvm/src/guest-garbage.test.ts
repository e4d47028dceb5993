import { describe, expect, it } from 'vitest'
import { PFERR_P, PFERR_RSVD, PFERR_U, PFERR_W, RES_OK, RES_PF } from '@mmusim/x86-hw'
import { diffGuestMemory, directMapStrategy, GARBAGE, type MmuStrategy, ROM_GUEST_EXPECTED, runGarbageGuestOnReference, runGarbageGuestOnVm, runRomGuest, Vm } from './index.ts'
import { naiveShadowStrategy } from './testing/naive-shadow-strategy.ts'

function onVm(strategy: MmuStrategy, strategyOptions: Record<string, unknown>, seed: number): { vm: Vm; log: number[] } {
  const vm = new Vm({ strategy, strategyOptions, vcpus: 1, hostMemBytes: 64 << 20 })
  return { vm, log: runGarbageGuestOnVm(vm, { seed }) }
}

const onReference = (vm: Vm, seed: number) => runGarbageGuestOnReference(vm, { seed })

/** The probes of `tag`: [status, error code, CR2, value lo, value hi] each. */
function probes(log: number[], tag: number): number[][] {
  const out: number[][] = []
  for (let i = 0; i < log.length; i += 6) if (log[i] === tag) out.push(log.slice(i + 1, i + 6))
  return out
}

const strategies: [string, MmuStrategy, Record<string, unknown>][] = [
  ['direct-map', directMapStrategy, {}],
  ['naive-shadow', naiveShadowStrategy, {}],
  ['naive-shadow with page-table write tracking', naiveShadowStrategy, { trackPageTables: true }],
]


describe('a guest that writes garbage into its page tables gets what bare metal gives it', () => {
  it('bare metal: beyond-memory leaves read all ones and drop writes; beyond-memory tables fault with RSVD', () => {
    const { vm } = onVm(directMapStrategy, {}, 1)
    const { log } = onReference(vm, 1)
    vm.destroy()
    const ones = 0xffffffff
    // (a) leaf beyond memory, CPL 3 then CPL 0: read, write, read, write64, read64, fetch.
    const cpl3 = [
      [RES_OK, 0, 0, ones, 0],
      [RES_OK, 0, 0, 0, 0],
      [RES_OK, 0, 0, ones, 0],
      [RES_OK, 0, 0, 0, 0],
      [RES_OK, 0, 0, ones, ones],
      [RES_OK, 0, 0, 0, 0],
    ]
    expect(probes(log, 1)).toEqual([...cpl3, ...cpl3])
    expect(probes(log, 2)).toEqual([...cpl3, ...cpl3])
    // Remapped to RAM: the writes stick.
    expect(probes(log, 3)[2]).toEqual([RES_OK, 0, 0, 0x1236, 0])
    // (b) a PDE, PDPTE, PML4E pointing beyond memory: the next level reads all ones → #PF(P|RSVD).
    for (const [tag, va] of [
      [4, 0x605010],
      [5, 0x40203010],
      [6, 2 ** 39 + 0x40203010],
    ] as const) {
      const p = probes(log, tag)
      expect(p[0]).toEqual([RES_PF, PFERR_P | PFERR_RSVD | PFERR_U, va, 0, 0])
      expect(p[1]).toEqual([RES_PF, PFERR_P | PFERR_RSVD | PFERR_U | PFERR_W, va, 0, 0])
      expect(p[6]).toEqual([RES_PF, PFERR_P | PFERR_RSVD, va, 0, 0])
    }
    // (c) the random rounds cover successes, all-ones reads, RSVD faults and other faults.
    let ok = 0
    let onesRead = 0
    let rsvd = 0
    let other = 0
    for (let i = 0; i < log.length; i += 6) {
      const tag = log[i]!
      if (tag < 100 || tag === 999) continue
      if (log[i + 1] === RES_OK) {
        ok++
        if (log[i + 4] === ones) onesRead++
      } else if ((log[i + 2]! & PFERR_RSVD) !== 0) rsvd++
      else other++
    }
    expect(ok).toBeGreaterThan(20)
    expect(onesRead).toBeGreaterThan(5)
    expect(rsvd).toBeGreaterThan(20)
    expect(other).toBeGreaterThan(20)
  })

  for (const [name, strategy, options] of strategies) {
    it.each([1, 2, 3])(`${name}: identical outcomes and memory, no throw (seed %i)`, (seed) => {
      const { vm, log } = onVm(strategy, options, seed)
      const { ref, log: expected } = onReference(vm, seed)
      expect(log).toEqual(expected)
      expect(diffGuestMemory(vm, ref, 20, new Set(GARBAGE.tableFrames))).toEqual([])
      expect(vm.mmu.audit()).toEqual([])
      vm.destroy()
    })
  }

  it('direct-map: a fault on a GPA without a memslot is emulated against open bus', () => {
    const { vm } = onVm(directMapStrategy, {}, 1)
    expect(vm.vcpus[0]!.stats.pf_emulate).toBeGreaterThan(0)
    vm.destroy()
  })

  for (const [name, strategy, options] of strategies) {
    it(`${name}: a write to a read-only memslot is dropped (MMIO exit → open bus), reads see the ROM`, () => {
      const vm = new Vm({ strategy, strategyOptions: options, vcpus: 1, hostMemBytes: 64 << 20 })
      expect(runRomGuest(vm)).toEqual(ROM_GUEST_EXPECTED)
      expect(vm.vcpus[0]!.stats.pf_emulate).toBeGreaterThan(0)
      expect(vm.mmu.audit()).toEqual([])
      vm.destroy()
    })
  }
})
