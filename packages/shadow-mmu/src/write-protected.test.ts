/**
 * RET_PF_WRITE_PROTECTED (≥6.12, Sean Christopherson's "KVM: x86: Clean up MMIO/unprotect/retry"
 * series): a write the fault path cannot fix because the gfn is write-protected for shadowing
 * returns RET_PF_WRITE_PROTECTED, and kvm_mmu_page_fault() lets kvm_mmu_write_protect_fault()
 * choose between unprotect-and-retry (guarded by last_retry_eip/addr) and emulation. The ≤6.11
 * behaviour (`writeProtectedFault: 'emulate'`) stays selectable; its direct-MMU "unprotect and
 * retry" on every PFERR_NESTED_GUEST_PAGE emulation could retry forever, which 6.12 fixed by
 * retrying only when a shadow page was actually zapped.
 */
import { describe, expect, it } from 'vitest'
import { gfnToHvaMemslot, KVM_MEM_READONLY, type PageFault, RET_PF_EMULATE, Vm } from '@mmusim/kvm'
import { EXIT_PF, type GuestProgram, PFERR_P, PFERR_W } from '@mmusim/x86-hw'
import { legacyTdpStrategy, shadowStrategy } from './index.ts'
import { kvmRipRead, type ShadowMmu, shadowMmuOf } from './shadow-mmu.ts'
import { A, D, type GuestPhys, L, linkUserPt, loadKernelTables, mapUser, P, poke, RW, runScript, runScriptOnReference, Script, US } from './testing/script-guest.ts'

const MiB = 1 << 20

function makeVm(options: Record<string, unknown>): { vm: Vm; mmu: ShadowMmu } {
  const vm = new Vm({ strategy: shadowStrategy, strategyOptions: { auditEveryOp: true, prefetch: false, ...options }, vcpus: 1, hostMemBytes: 128 * MiB, features: { nonLeafAOnDescent: false } })
  vm.addMemory(0, 32 * MiB)
  loadKernelTables(vm)
  return { vm, mmu: shadowMmuOf(vm) }
}

/** mmu.test.ts's scripted scenario: unsync, sync, re-unsync, three emulated PD writes (flooding). */
function statsScenario(options: Record<string, unknown>) {
  const { vm, mmu } = makeVm(options)
  linkUserPt(vm, 0, 0, 0)
  for (let j = 0; j < 4; j++) mapUser(vm, 0, j, j)
  const vs = vm.vcpus[0]!.stats
  const snap: number[][] = []
  const take = () => snap.push([vs.pf_fixed, vs.pf_emulate, vm.stats.mmu_unsync, mmu.counters.writeProtectedFaults, mmu.counters.unprotectRetries])
  const pte = (f: number) => L.frame(f) | P | RW | US | A | D
  runScript(vm, function* (g) {
    yield* g.userRead(L.va(0, 0, 0))
    yield* g.write64(L.pt(0) + 8, pte(1)) // unsync
    take()
    yield* g.movCr3()
    yield* g.read(0)
    yield* g.userRead(L.va(0, 0, 1))
    yield* g.write64(L.pt(0) + 24, pte(3)) // unsync again
    take()
    // The PD is write-tracked: three writes fault with RET_PF_WRITE_PROTECTED and are emulated.
    for (let k = 5; k < 8; k++) yield* g.write64(L.userPd(0) + k * 8, L.pt(k) | P | RW | US | A)
    take()
    yield* g.userRead(L.va(0, 0, 0))
    take()
  })
  expect(mmu.audit()).toEqual([])
  vm.destroy()
  return snap
}

describe('RET_PF_WRITE_PROTECTED: pf_fixed / pf_emulate / mmu_unsync as shadow-mmu.md §12 says', () => {
  //                      pf_fixed emulate unsync write_protected unprotect_retries
  it('≥6.12: three write-protected faults, each emulated (MOV writes page tables, so no retry)', () => {
    expect(statsScenario({})).toEqual([
      [2, 0, 1, 0, 0],
      [5, 0, 1, 0, 0],
      [5, 3, 0, 3, 0],
      [6, 3, 0, 3, 0],
    ])
  })

  it('≤6.11 (writeProtectedFault: emulate): the same guest-visible counts; the fault path says RET_PF_EMULATE itself', () => {
    expect(statsScenario({ writeProtectedFault: 'emulate' })).toEqual([
      [2, 0, 1, 0, 0],
      [5, 0, 1, 0, 0],
      [5, 3, 0, 0, 0],
      [6, 3, 0, 0, 0],
    ])
  })

  it('unprotect zaps the shadow pages of the written gfn and arms the loop guard; the same RIP+address then emulates', () => {
    const { vm, mmu } = makeVm({})
    linkUserPt(vm, 0, 0, 0)
    mapUser(vm, 0, 0, 0)
    runScript(vm, function* (g) {
      yield* g.userRead(L.va(0, 0, 0)) // shadows the PML4, PDPT, user PD and PT
    })
    const vcpu = vm.vcpus[0]!
    const v = mmu.vmmu(vcpu)
    const pdGfn = L.userPd(0) / 4096
    const shadowsOf = (gfn: number) => [...mmu.allPages()].filter((sp) => sp.gfn === gfn && !sp.invalid && sp.hasGptes).length
    expect(shadowsOf(pdGfn)).toBe(1)
    const fault: PageFault = { addr: L.userPd(0) + 8, errorCode: PFERR_P | PFERR_W, kind: 1, gla: L.userPd(0) + 8, exitReason: EXIT_PF }
    const zapped = vm.stats.mmu_shadow_zapped
    // The kernel's identity address of the PD: the write walk gives its gfn.
    expect(vm.runKernel('unprotect', () => mmu.kvmMmuUnprotectGfnAndRetry(v, fault.addr, false))).toBe(true)
    expect(shadowsOf(pdGfn)).toBe(0)
    expect(vm.stats.mmu_shadow_zapped - zapped).toBe(1)
    expect([v.lastRetryEip, v.lastRetryAddr]).toEqual([kvmRipRead(vcpu), fault.addr])
    // Same instruction, same address: emulate at once, the guard stays armed.
    expect(vm.runKernel('wp', () => mmu.kvmMmuWriteProtectFault(v, fault))).toBe(RET_PF_EMULATE)
    expect(v.lastRetryAddr).toBe(fault.addr)
    // Another address: the guard is cleared; an indirect MMU without an event to reinject emulates.
    expect(vm.runKernel('wp', () => mmu.kvmMmuWriteProtectFault(v, { ...fault, addr: fault.addr + 8 }))).toBe(RET_PF_EMULATE)
    expect([v.lastRetryEip, v.lastRetryAddr]).toEqual([0, 0])
    // Nothing left to zap: false, the guard untouched — unless always_retry.
    expect(vm.runKernel('unprotect', () => mmu.kvmMmuUnprotectGfnAndRetry(v, fault.addr, false))).toBe(false)
    expect([v.lastRetryEip, v.lastRetryAddr]).toEqual([0, 0])
    expect(vm.runKernel('unprotect', () => mmu.kvmMmuUnprotectGfnAndRetry(v, fault.addr, true))).toBe(false)
    expect(v.lastRetryAddr).toBe(fault.addr)
    expect(mmu.audit()).toEqual([])
    vm.destroy()
  })

  it('a direct MMU retries only if something was unprotected: no indirect shadow pages → emulate', () => {
    const vm = new Vm({ strategy: legacyTdpStrategy, strategyOptions: {}, vcpus: 1, hostMemBytes: 64 * MiB })
    vm.addMemory(0, 8 * MiB)
    const mmu = shadowMmuOf(vm)
    const v = mmu.vmmu(vm.vcpus[0]!)
    // PFERR_GUEST_PAGE | W | P: the CPU wrote a guest page table while walking it.
    const fault: PageFault = { addr: 0x5000, errorCode: 2 ** 33 + PFERR_P + PFERR_W, kind: 1, gla: 0, exitReason: EXIT_PF }
    expect(vm.runKernel('wp', () => mmu.kvmMmuWriteProtectFault(v, fault))).toBe(RET_PF_EMULATE)
    expect(mmu.counters.unprotectRetries).toBe(0)
    vm.destroy()
  })
})

describe('≤6.11 livelock that 6.12 fixed: a guest page table in a read-only memslot under EPT', () => {
  /**
   * The user PT lives in a ROM slot. The kernel reads it once (a read-only EPT mapping), then
   * a user read walks through it: with EPT A/D bits the CPU's page-table access is a write, so it
   * faults with PFERR_GUEST_PAGE|W|P on a read-only memslot (KVM_PFN_ERR_RO_FAULT → emulate).
   * ≤6.11's kvm_mmu_page_fault() "unprotected" the gfn (nothing to zap) and resumed the guest —
   * the same fault forever. ≥6.12 emulates: the access completes as on bare metal.
   */
  const ROM = 8 * MiB
  function romVm(writeProtectedFault: 'write-protected' | 'emulate') {
    const vm = new Vm({ strategy: legacyTdpStrategy, strategyOptions: { writeProtectedFault }, vcpus: 1, hostMemBytes: 128 * MiB, features: { nonLeafAOnDescent: false } })
    vm.addMemory(0, 8 * MiB)
    vm.addMemory(ROM, 2 * MiB, { flags: KVM_MEM_READONLY })
    const load = (mem: Vm | GuestPhys) => {
      loadKernelTables(mem)
      poke(mem, L.pdpt + 8, L.userPd(0) | P | RW | US | A)
      poke(mem, L.userPd(0), ROM | P | RW | US | A)
      poke(mem, 0x300000, 0x55)
    }
    load(vm)
    // The PT's entry 0 → 0x300000, written into the ROM through the VMM's mapping.
    const slot = vm.memslots.gfnToMemslot(0, ROM / 4096)!
    const pfn = vm.host.resolvePfn(gfnToHvaMemslot(slot, ROM / 4096), true)
    vm.host.mem.write32(pfn * 4096, 0x300000 | P | RW | US | A | D)
    // The reference has no ROM: its memory gets the same bytes directly.
    const romLoad = (mem: GuestPhys) => {
      load(mem)
      poke(mem, ROM, 0x300000 | P | RW | US | A | D)
    }
    const log: number[] = []
    const body = (out: number[]) =>
      function* (g: Script) {
        out.push(yield* g.read(ROM)) // the kernel reads the ROM page: a read-only EPT mapping
        out.push(yield* g.userRead(L.va(0, 0, 0)))
        out.push(yield* g.userRead(L.va(0, 0, 0)))
      }
    return { vm, log, body, romLoad }
  }

  it('≥6.12: emulated, twice; the guest reads what bare metal reads', () => {
    const { vm, log, body, romLoad } = romVm('write-protected')
    runScript(vm, body(log))
    expect(log).toEqual([0x300000 | P | RW | US | A | D, 0x55, 0x55])
    expect(vm.vcpus[0]!.stats.pf_emulate).toBe(2)
    const refLog: number[] = []
    runScriptOnReference(vm, romLoad, [body(refLog)])
    expect(refLog).toEqual(log)
    expect(vm.mmu.audit()).toEqual([])
    vm.destroy()
  })

  it('≤6.11: the user read never completes — every exit is "unprotected" and retried', () => {
    const { vm, log, body } = romVm('emulate')
    const op = vm.vcpus[0]!.guest.op
    vm.spawnGuest(
      0,
      (function* (): GuestProgram {
        const s = new Script(op)
        yield* s.boot()
        yield* body(log)(s)
      })(),
    )
    const r = vm.run({ maxSteps: 20_000 })
    expect(r.reason).toBe('maxSteps')
    expect(log).toEqual([0x300000 | P | RW | US | A | D]) // the user read is still retrying
    const mmu = shadowMmuOf(vm)
    expect(mmu.counters.unprotectRetries).toBeGreaterThan(1000)
    expect(vm.vcpus[0]!.stats.pf_retry).toBe(mmu.counters.unprotectRetries)
    expect(vm.vcpus[0]!.stats.pf_emulate).toBe(0)
    // (The vCPU thread is still spinning: the VM is not torn down.)
  })
})
