import { describe, expect, it } from 'vitest'
import { C_TLB_FLUSHES, C_TLB_MISS, GuestOp, type GuestProgram, OP_PAUSE, OP_READ, RES_OK } from '@mmusim/x86-hw'
import { directMapStrategy } from './examples/direct-map-strategy.ts'
import {
  createReference,
  defineMmuStrategy,
  diffGuestMemory,
  KVM_REQ_MMU_FREE_OBSOLETE_ROOTS,
  KVM_REQ_MMU_RELOAD,
  KVM_REQ_MMU_SYNC,
  KVM_REQ_TLB_FLUSH,
  KVM_REQ_TLB_FLUSH_CURRENT,
  KVM_REQ_TLB_FLUSH_GUEST,
  type KernelOp,
  type MmuInstance,
  type MmuStrategy,
  type PageFault,
  RET_PF_RETRY,
  type RetPf,
  statsToRecord,
  Vm,
} from './index.ts'
import { TINY, tinyGuest, type TinyResult } from './testing/tiny-guest.ts'

const MEM = 8 << 20

/** Wrap the direct-map strategy so a test can observe (and log) what the core calls. */
function recording(log: string[], onFault?: (vm: Vm, f: PageFault) => void): MmuStrategy {
  return defineMmuStrategy({
    ...directMapStrategy,
    name: 'recording',
    create(vm: Vm, options: never): MmuInstance {
      const inner = directMapStrategy.create(vm, { preSetAccessed: true, ...(options as object) })
      const wrap = <A extends unknown[], R>(name: string, fn: (...a: A) => KernelOp<R>) =>
        function* (...a: A): KernelOp<R> {
          log.push(name)
          return yield* fn(...a)
        }
      return {
        ...inner,
        freeObsoleteRoots: wrap('freeObsoleteRoots', inner.freeObsoleteRoots.bind(inner)),
        unload: wrap('unload', inner.unload.bind(inner)),
        syncRoots: wrap('syncRoots', inner.syncRoots.bind(inner)),
        flushTlbGuest: wrap('flushTlbGuest', inner.flushTlbGuest.bind(inner)),
        load: wrap('load', inner.load.bind(inner)),
        *pageFault(vcpu, f): KernelOp<RetPf> {
          onFault?.(vm, f)
          return yield* inner.pageFault(vcpu, f)
        },
      }
    },
  })
}

function tinyVm(strategy: MmuStrategy, vcpus = 1): Vm {
  const vm = new Vm({ strategy, vcpus, hostMemBytes: 64 << 20 })
  vm.addMemory(0, MEM)
  return vm
}

describe('vCPU requests', () => {
  it("are serviced before guest entry in vcpu_enter_guest()'s order", () => {
    // Baseline: the same guest without injected requests (its own CR4 write requests one current flush).
    const base = tinyVm(recording([]))
    base.spawnGuest(0, tinyGuest(base.vcpus[0]!.guest.op, { faults: [], values: [], mismatches: 0 }, { pages: 1, rounds: 1 }))
    base.run()
    const baseStats = statsToRecord(base.vcpus[0]!.stats)
    base.destroy()
    const log: string[] = []
    const vm = tinyVm(recording(log))
    const v = vm.vcpus[0]!
    const r: TinyResult = { faults: [], values: [], mismatches: 0 }
    vm.spawnGuest(0, tinyGuest(v.guest.op, r, { pages: 1, rounds: 1 }))
    v.makeRequest(KVM_REQ_TLB_FLUSH_GUEST | KVM_REQ_TLB_FLUSH_CURRENT | KVM_REQ_TLB_FLUSH | KVM_REQ_MMU_SYNC | KVM_REQ_MMU_RELOAD | KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
    vm.run()
    expect(log.slice(0, 5)).toEqual(['freeObsoleteRoots', 'unload', 'syncRoots', 'flushTlbGuest', 'load'])
    // KVM_REQ_TLB_FLUSH (all) satisfies FLUSH_CURRENT: one full flush, no separate current flush.
    expect(v.stats.req_tlb_flush).toBe(baseStats.req_tlb_flush! + 1)
    expect(v.stats.req_tlb_flush_current).toBe(baseStats.req_tlb_flush_current)
    expect(v.stats.req_tlb_flush_guest).toBe(baseStats.req_tlb_flush_guest! + 1)
    expect(v.stats.req_mmu_sync).toBe(baseStats.req_mmu_sync! + 1)
    expect(v.requests).toBe(0)
    expect(r.mismatches).toBe(0)
    vm.destroy()
  })

  it('a remote TLB flush reaches every vCPU TLB before its next guest instruction, and is counted', () => {
    const vm = tinyVm(recording([]), 3)
    const flag = { flushed: false }
    const pages = 8
    // Each vCPU reads the identity-mapped kernel pages twice, waiting in between for the flush.
    const prog = (op: GuestOp, cpu: number): GuestProgram =>
      (function* (): GuestProgram {
        const r: TinyResult = { faults: [], values: [], mismatches: 0 }
        yield* tinyGuest(op, r, { pages: 1, rounds: 1, cpu, boot: cpu === 0, ready })
        for (let pass = 0; pass < 2; pass++) {
          for (let i = 0; i < pages; i++) {
            op.kind = OP_READ
            op.addr = 0x100000 + i * 4096 + cpu * 64
            if ((yield op) !== RES_OK) throw new Error('read failed')
          }
          if (pass === 0) {
            done[cpu] = vm.vcpus[cpu]!.hw.counters[C_TLB_MISS]!
            op.kind = OP_PAUSE
            while (!flag.flushed) yield op
          }
        }
      })()
    const ready = { booted: false }
    const done: number[] = []
    for (let c = 0; c < 3; c++) vm.spawnGuest(c, prog(vm.vcpus[c]!.guest.op, c))
    const flushesBefore: number[] = []
    vm.sched.spawn(
      'flusher',
      function* (): KernelOp {
        // Wait until every vCPU finished its first pass, then flush remotely.
        while (done.filter((d) => typeof d === 'number').length < 3) yield 1000
        for (const v of vm.vcpus) flushesBefore.push(v.hw.counters[C_TLB_FLUSHES]!)
        vm.flushRemoteTlbs()
        flag.flushed = true
      },
      { startTime: 0 },
    )
    vm.run()
    expect(vm.stats.remote_tlb_flush).toBe(1)
    for (let c = 0; c < 3; c++) {
      const v = vm.vcpus[c]!
      expect(v.stats.req_tlb_flush).toBe(1)
      expect(v.hw.counters[C_TLB_FLUSHES]! - flushesBefore[c]!).toBe(1)
      // The second pass found nothing cached: each 4 KiB page missed once (a 2 MiB guest page
      // over 4 KiB EPT pages is cached as 4 KiB combined entries).
      expect(v.hw.counters[C_TLB_MISS]! - done[c]!).toBe(pages)
    }
    vm.destroy()
  })
})

describe('MMU-notifier invalidation racing with a fault', () => {
  const dataGfn = (TINY.dataBase >> 12) + 2
  it('a fault that resolved its pfn before an invalidation retries, deterministically', () => {
    // Pilot run: when does the fault on the third data page start?
    let faultAt = -1
    const pilot = tinyVm(
      recording([], (vm, f) => {
        if (Math.floor(f.addr / 4096) === dataGfn && faultAt < 0) faultAt = vm.sched.now
      }),
    )
    const r0: TinyResult = { faults: [], values: [], mismatches: 0 }
    pilot.spawnGuest(0, tinyGuest(pilot.vcpus[0]!.guest.op, r0, { pages: 4, rounds: 2 }))
    pilot.run()
    expect(faultAt).toBeGreaterThan(0)
    expect(pilot.mmu.stats().invalidation_retries).toBe(0)
    pilot.destroy()

    // Real run: the host migrates that page 10 ns after the fault snapshotted mmu_invalidate_seq,
    // while it is still resolving the pfn (a 150 ns GUP): it must retry and map the new page.
    const vm = tinyVm(recording([]))
    const slot = vm.memslots.space(0).sorted[0]!
    const hva = slot.userspaceAddr + dataGfn * 4096
    let moved: { oldPfn: number; newPfn: number } | null = null
    vm.hostOp('migrate', faultAt + 10, (host) => {
      moved = host.migratePage(hva)
    })
    const r: TinyResult = { faults: [], values: [], mismatches: 0 }
    vm.spawnGuest(0, tinyGuest(vm.vcpus[0]!.guest.op, r, { pages: 4, rounds: 2 }))
    vm.run()
    expect(moved).not.toBeNull()
    expect(vm.mmu.stats().invalidation_retries).toBe(1)
    expect(vm.vcpus[0]!.stats.pf_retry).toBe(1)
    expect(vm.notifierState.seq).toBe(1)
    expect(r).toEqual(r0)
    expect(vm.host.lookup(hva)!.pfn).toBe(moved!.newPfn)
    // The same run twice gives the same outcome (the race is reproduced, not sampled).
    const ref = createReference(vm)
    const rr: TinyResult = { faults: [], values: [], mismatches: 0 }
    ref.spawn(0, tinyGuest(ref.threads[0]!.op, rr, { pages: 4, rounds: 2 }))
    ref.run()
    expect(diffGuestMemory(vm, ref)).toEqual([])
    vm.destroy()
  })
})

describe('bad input', () => {
  it('refuses a strategy of the wrong shape or API version, and bad options, before creating anything', () => {
    expect(() => new Vm({ strategy: { name: 'x' } as unknown as MmuStrategy })).toThrow(/does not have the shape of an MMU strategy[\s\S]*create must be a function/)
    expect(() => new Vm({ strategy: { ...directMapStrategy, apiVersion: 2 } })).toThrow(/declares apiVersion 2, but this @mmusim\/kvm implements apiVersion 1\. Upgrade @mmusim\/kvm\./)
    expect(() => new Vm({ strategy: directMapStrategy, strategyOptions: { preSetAccessed: 'yes' } })).toThrow(/invalid options for MMU strategy 'direct-map':\n {2}- preSetAccessed: /)
    expect(() => new Vm({ strategy: directMapStrategy, strategyOptions: { bogus: 1 } })).toThrow(/invalid options for MMU strategy 'direct-map'/)
    expect(() => new Vm({ strategy: directMapStrategy, vcpus: 0 })).toThrow(/vcpus must be an integer from 1 to 64/)
  })

  it('refuses an instance with pageFaultInline but no pageFaultContinue (or the reverse), or no instance at all', () => {
    const withExtra = (extra: Record<string, unknown>): MmuStrategy =>
      defineMmuStrategy({ ...directMapStrategy, name: 'half-inline', create: (vm: Vm, o: never): MmuInstance => ({ ...directMapStrategy.create(vm, o), ...extra }) })
    expect(() => new Vm({ strategy: withExtra({ pageFaultInline: () => RET_PF_RETRY }) })).toThrow(
      expect.objectContaining({
        code: 'EINVAL',
        message: "strategy 'half-inline': the MmuInstance has pageFaultInline, but pageFaultContinue is missing; implement both as functions (a pending fault needs pageFaultContinue to finish), or neither (the core then runs pageFault).",
      }),
    )
    expect(() => new Vm({ strategy: withExtra({ pageFaultContinue: () => directMapStrategy }) })).toThrow(/has pageFaultContinue, but pageFaultInline is missing/)
    expect(() => new Vm({ strategy: withExtra({ pageFaultInline: () => RET_PF_RETRY, pageFaultContinue: 3 }) })).toThrow(/has pageFaultInline and pageFaultContinue, but pageFaultContinue is a number/)
    expect(() => new Vm({ strategy: withExtra({ pageFaultInline: 'x', pageFaultContinue: () => directMapStrategy }) })).toThrow(/but pageFaultInline is a string/)
    expect(() => new Vm({ strategy: defineMmuStrategy({ ...directMapStrategy, create: () => null as unknown as MmuInstance }) })).toThrow(/create\(\) must return an MmuInstance/)
  })

  it('addMemory with a rejected memslot leaves no host mapping behind', () => {
    const vm = new Vm({ strategy: directMapStrategy, hostMemBytes: 64 << 20 })
    vm.addMemory(0, 1 << 20)
    const vmas = vm.host.listVmas().length
    expect(() => vm.addMemory(0x80000, 1 << 20)).toThrow(expect.objectContaining({ code: 'EEXIST' }))
    expect(() => vm.addMemory(0x200000, 1000)).toThrow(expect.objectContaining({ code: 'EINVAL' }))
    expect(vm.host.listVmas().length).toBe(vmas)
    expect(vm.memslots.space(0).sorted.length).toBe(1)
    vm.addMemory(0x200000, 1 << 20) // still usable
    expect(vm.memslots.space(0).sorted.length).toBe(2)
    vm.destroy()
  })
})

