/**
 * A guest CR3 outside guest memory (no visible memslot backs the root table): KVM ≥6.6 loads the
 * dummy root — the zero page — instead of failing (mmu_alloc_shadow_roots(); Sean
 * Christopherson, "KVM: x86/mmu: Use dummy root, backed by zero page, for !visible guest roots",
 * which replaced mmu_check_root()'s triple fault). Every access then exits; FNAME(page_fault)'s
 * walk fails and the guest gets its #PF. When a memslot later makes the root visible, the next
 * fault reaches FNAME(fetch), which requests KVM_REQ_MMU_FREE_OBSOLETE_ROOTS (is_obsolete_root()
 * counts the dummy root, having no shadow page, as obsolete) and retries: the vCPU reloads a real
 * root. Differential against the bare-metal reference, where the root table reads as open bus.
 */
import { describe, expect, it } from 'vitest'
import { diffGuestMemory, type MmuStrategy, Vm } from '@mmusim/kvm'
import { type GuestOp, OP_FETCH, OP_READ, OP_WRITE, PFERR_I, PFERR_P, PFERR_RSVD, PFERR_U, PFERR_W, RES_OK, RES_PF } from '@mmusim/x86-hw'
import { legacyTdpStrategy, shadowStrategy } from './index.ts'
import { shadowMmuOf } from './shadow-mmu.ts'
import { A, type GuestPhys, L, loadKernelTables, P, poke, RW, runScript, runScriptOnReference, type Script, US } from './testing/script-guest.ts'

const MiB = 1 << 20
/** The bad root: 1 GiB, far above the guest's 8 MiB of memory. */
const BAD = 0x40000000
/** A kernel (identity, 2M page) address in guest memory. */
const VA = 0x200010

type Body = (s: Script) => Generator<GuestOp, void, number>

function makeVm(strategy: MmuStrategy, options: Record<string, unknown> = {}): Vm {
  const vm = new Vm({ strategy, strategyOptions: { auditEveryOp: true, ...options }, vcpus: 1, hostMemBytes: 128 * MiB, features: { nonLeafAOnDescent: false } })
  vm.addMemory(0, 8 * MiB)
  loadKernelTables(vm)
  return vm
}

/** Read, write and fetch at CPL 0 and 3 through the current CR3, logged. */
function* probes(g: Script, log: number[]): Generator<GuestOp, void, number> {
  for (const cpl of [0, 3]) {
    yield* g.probe(log, OP_READ, VA, cpl)
    yield* g.probe(log, OP_WRITE, VA, cpl, 0x9999)
    yield* g.probe(log, OP_FETCH, VA, cpl)
  }
}

/** Phase 1: write a value, switch to the bad CR3, probe, switch back, read, and leave CR3 bad. */
function phase1(log: number[]): Body {
  return function* (g) {
    yield* g.write32(VA, 0x1234)
    yield* g.movCr3(BAD)
    yield* probes(g, log)
    yield* g.movCr3(L.pml4)
    log.push(yield* g.read(VA))
    yield* g.movCr3(BAD)
  }
}

/** Phase 2 (after a memslot made BAD a page table): the same address through the new root. */
function phase2(log: number[]): Body {
  return function* (g) {
    log.push(yield* g.read(VA))
    yield* probes(g, log)
  }
}

/** What every probe of phase 1 sees with error code `ec(write, fetch, user)`. */
function faults(ec: (write: boolean, fetch: boolean, user: boolean) => number): number[] {
  const out: number[] = []
  for (const user of [false, true]) {
    out.push(RES_PF, ec(false, false, user), VA, 0)
    out.push(RES_PF, ec(true, false, user), VA, 0)
    out.push(RES_PF, ec(false, true, user), VA, 0)
  }
  return out
}

/** Bare metal: the PML4E read from beyond memory is all ones → present with reserved bits. */
const BARE_METAL_FAULTS = faults((w, f, u) => PFERR_P | PFERR_RSVD | (w ? PFERR_W : 0) | (f ? PFERR_I : 0) | (u ? PFERR_U : 0))

/** The new table at BAD: PML4[0] → the guest's PDPT, so VA maps as before. */
function loadBadRoot(mem: Vm | GuestPhys): void {
  poke(mem, BAD, L.pdpt | P | RW | US | A)
}

describe('a guest CR3 outside guest memory: the dummy root, never a crash', () => {
  for (const [name, strategy] of [
    ['shadow', shadowStrategy],
    ['legacy-tdp', legacyTdpStrategy],
  ] as const) {
    it(`${name}: the guest gets bare metal's #PF(P|RSVD); a memslot added under CR3 makes the vCPU load a real root`, () => {
      const vm = makeVm(strategy)
      const mmu = shadowMmuOf(vm)
      const vs = vm.vcpus[0]!.stats
      const log1: number[] = []
      runScript(vm, phase1(log1))
      expect(log1).toEqual([...BARE_METAL_FAULTS, 0x1234])
      const refLog1: number[] = []
      const ref1 = runScriptOnReference(vm, loadKernelTables, [phase1(refLog1)])
      expect(log1).toEqual(refLog1)
      expect(diffGuestMemory(vm, ref1)).toEqual([])
      const root = mmu.rootsOf(vm.vcpus[0]!)
      if (strategy === shadowStrategy) {
        // Twice loaded (the first MOV CR3 to BAD and the last); the real root was kept in
        // prev_roots and found again by the MOV CR3 back (the dummy root is never cached).
        expect(mmu.counters.dummyRootLoads).toBe(2)
        expect(mmu.kvmMmuIsDummyRoot(root.root.hpa)).toBe(true)
        expect(root.prev[0]!.pgd).toBe(L.pml4)
        expect(vs.pf_guest).toBe(6)
        expect(vs.pf_emulate).toBe(0)
      } else {
        // EPT: the hardware's walk reads the root table at an unbacked GPA — an MMIO SPTE, and
        // every access is emulated against open bus.
        expect(mmu.counters.dummyRootLoads).toBe(0)
        expect(vs.pf_mmio_spte_created).toBe(1)
        expect(vs.pf_emulate).toBe(6)
      }

      // Userspace adds memory at BAD and writes a page table there.
      vm.addMemory(BAD, 2 * MiB)
      loadBadRoot(vm)
      const freeObsolete = vs.req_free_obsolete_roots
      const emulate = vs.pf_emulate
      const retry = vs.pf_retry
      const guestPf = vs.pf_guest
      const log2: number[] = []
      runScript(vm, phase2(log2), false)
      const ok = [RES_OK, 0, 0, 0x1234, RES_OK, 0, 0, 0, RES_OK, 0, 0, 0]
      // CPL 0 reads 0x1234 and writes 0x9999; CPL 3 faults: the kernel's 2M page is supervisor-only.
      const user = [RES_PF, PFERR_P | PFERR_U, VA, 0, RES_PF, PFERR_P | PFERR_U | PFERR_W, VA, 0, RES_PF, PFERR_P | PFERR_U | PFERR_I, VA, 0]
      expect(log2).toEqual([0x1234, ...ok.slice(0, 4), RES_OK, 0, 0, 0, RES_OK, 0, 0, 0, ...user])
      if (strategy === shadowStrategy) {
        // The first access reached FNAME(fetch) on the dummy root: one retry, one
        // FREE_OBSOLETE_ROOTS, and a real root at the table's gfn.
        expect(vs.req_free_obsolete_roots - freeObsolete).toBe(1)
        // RET_PF_RETRY: that one, plus the three user probes' walk failures (#PF injected).
        expect(vs.pf_guest - guestPf).toBe(3)
        expect(vs.pf_retry - retry).toBe(1 + 3)
        const r = mmu.rootsOf(vm.vcpus[0]!)
        expect(mmu.spOfHpa(r.root.hpa).gfn).toBe(BAD / 4096)
        expect(r.root.pgd).toBe(BAD)
        expect(mmu.counters.dummyRootLoads).toBe(2)
      } else {
        // The MMIO SPTE's generation predates the new memslot: handle_mmio_page_fault() sends the
        // fault to the slow path, which maps the memory — nothing more is emulated.
        expect(vs.pf_emulate - emulate).toBe(0)
      }
      const refLog2: number[] = []
      const ref2 = runScriptOnReference(
        vm,
        (mem) => {
          loadKernelTables(mem)
          loadBadRoot(mem)
        },
        [
          function* (g) {
            yield* g.write32(VA, 0x1234)
            yield* g.movCr3(BAD)
          },
          phase2(refLog2),
        ],
      )
      expect(log2).toEqual(refLog2)
      expect(diffGuestMemory(vm, ref2)).toEqual([])
      expect(mmu.audit()).toEqual([])
      vm.destroy()
      expect(vm.mmuPagesLive).toBe(0)
    })
  }

  it("shadow, unbackedGuestTables: 'kvm': KVM's own #PF — not present, only W/U/I (differs from bare metal)", () => {
    // paging_tmpl.h FNAME(walk_addr_generic): `slot = kvm_vcpu_gfn_to_memslot(...); if
    // (!kvm_is_visible_memslot(slot)) goto error;` with errcode still 0, and `error:` adds only
    // write_fault | user_fault (and PFERR_FETCH when has_pferr_fetch). On hardware the PML4E read
    // returns open bus (all ones) — present with reserved bits — so bare metal reports P|RSVD.
    const vm = makeVm(shadowStrategy, { unbackedGuestTables: 'kvm' })
    const log: number[] = []
    runScript(vm, phase1(log))
    expect(log).toEqual([...faults((w, f, u) => (w ? PFERR_W : 0) | (f ? PFERR_I : 0) | (u ? PFERR_U : 0)), 0x1234])
    expect(shadowMmuOf(vm).counters.dummyRootLoads).toBe(2)
    expect(vm.mmu.audit()).toEqual([])
    vm.destroy()
  })

  it('shadow: paging enabled with CR3 already bad, INVLPG and MOV CR3 on the dummy root, then a good CR3', () => {
    const vm = makeVm(shadowStrategy)
    const mmu = shadowMmuOf(vm)
    const log: number[] = []
    runScript(
      vm,
      function* (g) {
        yield* g.boot(BAD) // CR0.PG → kvm_mmu_reset_context() → kvm_mmu_load(): the dummy root
        yield* g.probe(log, OP_READ, VA, 0)
        yield* g.invlpg(VA) // __kvm_mmu_invalidate_addr() has nothing to sync on the dummy root
        yield* g.movCr3(BAD + 0x1000) // fast_pgd_switch() frees the dummy root first: dummy again
        yield* g.probe(log, OP_READ, VA, 0)
        yield* g.movCr3(L.pml4) // nothing cached: a new root
        yield* g.probe(log, OP_WRITE, VA, 0, 7)
        yield* g.probe(log, OP_READ, VA, 0)
      },
      false,
    )
    expect(log).toEqual([RES_PF, PFERR_P | PFERR_RSVD, VA, 0, RES_PF, PFERR_P | PFERR_RSVD, VA, 0, RES_OK, 0, 0, 0, RES_OK, 0, 0, 7])
    expect(mmu.counters.dummyRootLoads).toBe(2)
    const r = mmu.rootsOf(vm.vcpus[0]!)
    expect(mmu.spOfHpa(r.root.hpa).gfn).toBe(L.pml4 / 4096)
    expect(r.prev.every((p) => p.hpa === -1)).toBe(true) // the dummy root was never cached
    expect(mmu.audit()).toEqual([])
    vm.destroy()
    expect(vm.mmuPagesLive).toBe(0)
  })
})
