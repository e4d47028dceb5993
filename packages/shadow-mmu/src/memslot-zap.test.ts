/**
 * Deleting a memslot: kvm_arch_flush_shadow_memslot() zaps everything with
 * KVM_X86_QUIRK_SLOT_ZAP_ALL (the default: kvm_mmu_zap_all_fast, a new generation, every root
 * reloaded), or — the quirk disabled, ≥6.12 — only the slot's leaf SPTEs and the shadow pages of
 * its gfns (kvm_mmu_zap_memslot). The guest sees the same either way: what bare metal with that
 * memory gone sees.
 */
import { describe, expect, it } from 'vitest'
import { diffGuestMemory, Vm } from '@mmusim/kvm'
import { type GuestOp, OP_READ, PFERR_P, PFERR_RSVD, PFERR_U, RES_OK, RES_PF } from '@mmusim/x86-hw'
import { shadowStrategy } from './index.ts'
import { shadowMmuOf } from './shadow-mmu.ts'
import { A, D, type GuestPhys, L, linkUserPt, loadKernelTables, P, poke, RW, runScript, runScriptOnReference, type Script, US } from './testing/script-guest.ts'

const MiB = 1 << 20
/** Slot 1: guest-physical [8 MiB, 16 MiB). */
const HI = 8 * MiB
/** A user page table in slot 1, and the data frames both page tables map. */
const PT_HI = HI
const DATA_LO = 0x300000
const DATA_HI = HI + 0x1000

/**
 * User PD 0 entry 0 → PT L.pt(0) (slot 0), whose entry 0 maps DATA_HI (slot 1); entry 1 → PT_HI
 * (slot 1), whose entry 0 maps DATA_LO (slot 0).
 */
function load(mem: Vm | GuestPhys, withSlot1 = true): void {
  loadKernelTables(mem)
  linkUserPt(mem, 0, 0, 0)
  poke(mem, L.pt(0), DATA_HI | P | RW | US | A | D)
  poke(mem, L.userPd(0) + 8, PT_HI | P | RW | US | A)
  poke(mem, DATA_LO, 0x10)
  if (withSlot1) {
    poke(mem, PT_HI, DATA_LO | P | RW | US | A | D)
    poke(mem, DATA_HI, 0x20)
  }
}
const VA_THROUGH_LO_PT = L.va(0, 0, 0) // → DATA_HI
const VA_THROUGH_HI_PT = L.va(0, 1, 0) // → DATA_LO

function* probes(g: Script, log: number[]): Generator<GuestOp, void, number> {
  yield* g.probe(log, OP_READ, VA_THROUGH_LO_PT, 3)
  yield* g.probe(log, OP_READ, VA_THROUGH_HI_PT, 3)
}

function run(slotZapAll: boolean) {
  const vm = new Vm({ strategy: shadowStrategy, strategyOptions: { auditEveryOp: true, prefetch: false, slotZapAll }, vcpus: 1, hostMemBytes: 128 * MiB, features: { nonLeafAOnDescent: false } })
  vm.addMemory(0, 8 * MiB)
  vm.addMemory(HI, 8 * MiB, { slot: 1 })
  load(vm)
  const mmu = shadowMmuOf(vm)
  const before: number[] = []
  runScript(vm, (g) => probes(g, before))
  const s = vm.stats
  const was = { used: mmu.nUsedMmuPages, pages4k: s.pages_4k, gen: mmu.mmuValidGen, root: mmu.rootsOf(vm.vcpus[0]!).root.hpa, zapped: s.mmu_shadow_zapped }
  const hva = vm.memslots.space(0).byId.get(1)!.userspaceAddr
  vm.setUserMemoryRegion({ slot: 1, asId: 0, flags: 0, guestPhysAddr: HI, memorySize: 0, userspaceAddr: hva })
  const after = { used: mmu.nUsedMmuPages, pages4k: s.pages_4k, gen: mmu.mmuValidGen, zapped: s.mmu_shadow_zapped - was.zapped }
  const freeObsolete = vm.vcpus[0]!.stats.req_free_obsolete_roots
  const log: number[] = []
  runScript(vm, (g) => probes(g, log), false)
  const rootKept = mmu.rootsOf(vm.vcpus[0]!).root.hpa === was.root
  const reloads = vm.vcpus[0]!.stats.req_free_obsolete_roots - freeObsolete
  expect(mmu.audit()).toEqual([])
  return { vm, before, log, was, after, rootKept, reloads }
}

// Both probes read their data before the deletion. After it: the first walk reaches a leaf whose
// frame is gone (open bus: all ones); the second walk's page table is gone (its PDE points
// beyond memory: the walk reads all ones, #PF with RSVD).
const BEFORE = [RES_OK, 0, 0, 0x20, RES_OK, 0, 0, 0x10]
const AFTER = [RES_OK, 0, 0, 0xffffffff, RES_PF, PFERR_P | PFERR_RSVD | PFERR_U, VA_THROUGH_HI_PT, 0]

describe('memslot deletion: zap all (KVM_X86_QUIRK_SLOT_ZAP_ALL) or only the slot (quirk disabled)', () => {
  it('quirk on (default): a new generation, every page and the root go', () => {
    const r = run(true)
    expect(r.before).toEqual(BEFORE)
    expect(r.log).toEqual(AFTER)
    expect(r.after.gen).toBe(r.was.gen ^ 1)
    expect(r.after.used).toBe(1) // only the vCPU's (invalid) root is still referenced
    expect(r.after.pages4k).toBe(0)
    expect(r.reloads).toBe(1)
    expect(r.rootKept).toBe(false)
    r.vm.destroy()
    expect(r.vm.mmuPagesLive).toBe(0)
  })

  it('quirk off: one shadow page (the PT at 8 MiB) and two leaves go; the generation and the root stay', () => {
    const r = run(false)
    expect(r.before).toEqual(BEFORE)
    expect(r.log).toEqual(AFTER)
    expect(r.after.gen).toBe(r.was.gen)
    // The leaf mapping DATA_HI (in slot 1's rmap) and the shadow page of PT_HI with its one leaf.
    expect(r.after.zapped).toBe(1)
    expect(r.was.used - r.after.used).toBe(1)
    expect(r.was.pages4k - r.after.pages4k).toBe(2)
    expect(r.reloads).toBe(0)
    expect(r.rootKept).toBe(true)
    r.vm.destroy()
    expect(r.vm.mmuPagesLive).toBe(0)
  })

  it('the guest sees what bare metal with only slot 0 sees', () => {
    const r = run(false)
    const refLog: number[] = []
    const ref = runScriptOnReference(
      r.vm,
      (mem) => {
        load(mem, false)
      },
      [(g) => probes(g, refLog)],
    )
    expect(refLog).toEqual(r.log)
    expect(diffGuestMemory(r.vm, ref, 20, new Set([1, 2, 3, 4, L.pt(0) / 4096]))).toEqual([])
    r.vm.destroy()
  })
})
