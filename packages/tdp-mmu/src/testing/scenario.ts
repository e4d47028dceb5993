/**
 * Race-scenario scaffolding: a chaos-scheduled VM whose vCPUs run a self-checking raw guest loop
 * (write every page, read it back, optionally toggle CR4.PSE to reset the MMU context), plus
 * kernel threads that race with them (memslot updates, host mm operations, MMU walkers).
 */
import { type KernelOp, KVM_MEM_LOG_DIRTY_PAGES, type MemslotChange, type UserMemoryRegion, Vm } from '@mmusim/kvm'
import { type AccessBatch, CR4_PSE, type GuestOp, type GuestProgram, OP_BATCH, OP_MOV_CR4, RES_OK } from '@mmusim/x86-hw'
import { recount } from '../audit.ts'
import { getTdpMmu, tdpStrategy } from '../strategy.ts'
import type { TdpMmu } from '../tdp-mmu.ts'
import { FETCH, pageBatch, READ, WRITE } from './raw-guest.ts'

/** What a scenario VM's guests observed. */
export interface GuestCheck {
  mismatches: number
  failures: number
}

/** A vCPU loop: `loops` × (write pages with fresh values, read them back and compare), CR4 toggles between. */
export function checkedLoop(op: GuestOp, gpa: number, pages: number, loops: number, check: GuestCheck, resetContext = false, fetch = false): GuestProgram {
  return (function* (): GuestProgram {
    let cr4 = 0
    for (let l = 0; l < loops; l++) {
      const w: AccessBatch = pageBatch(gpa, pages, WRITE, 1000 * (l + 1) + gpa / 4096)
      const r: AccessBatch = pageBatch(gpa, pages, READ)
      const x: AccessBatch | null = fetch && l % 2 === 0 ? pageBatch(gpa, pages, FETCH) : null
      // Odd loops walk the pages downwards, so the guest also races ahead of ascending walkers.
      if (l % 2 === 1) for (const b of [w, r]) {
        b.addrs.reverse()
        b.values.reverse()
      }
      for (const b of x === null ? [w, r] : [w, r, x]) {
        op.kind = OP_BATCH
        op.batch = b
        op.batchStart = 0
        op.batchEnd = pages
        op.implicit = false
        if ((yield op) !== RES_OK) check.failures++
      }
      for (let i = 0; i < pages; i++) if (r.values[i] !== w.values[i]) check.mismatches++
      if (resetContext) {
        cr4 ^= CR4_PSE
        op.kind = OP_MOV_CR4
        op.lo = cr4
        op.hi = 0
        if ((yield op) !== RES_OK) check.failures++
      }
    }
  })()
}

export interface ScenarioVm {
  vm: Vm
  mmu: TdpMmu
  check: GuestCheck
}

/** A chaos VM with `vcpus` vCPUs on slot 0 ([0, 4 MiB)), each looping over its own 32 pages. */
export function scenarioVm(seed: number, options: { vcpus?: number; loops?: number; strategyOptions?: object; resched?: number; thp?: boolean; resetContext?: boolean; pages?: number; chaos?: boolean; fetch?: boolean } = {}): ScenarioVm {
  const vcpus = options.vcpus ?? 2
  const vm = new Vm({
    strategy: tdpStrategy,
    strategyOptions: options.strategyOptions ?? {},
    vcpus,
    hostMemBytes: 64 << 20,
    chaos: options.chaos === false ? undefined : { seed, reschedProbability: options.resched ?? 0.3, expectedSteps: 3000, depth: 4 },
    costs: { rcuGracePeriod: 20_000 },
  })
  vm.addMemory(0, 4 << 20, { slot: 0, thp: options.thp ?? false })
  const check: GuestCheck = { mismatches: 0, failures: 0 }
  const pages = options.pages ?? 32
  for (let c = 0; c < vcpus; c++) {
    vm.spawnGuest(c, checkedLoop(vm.vcpus[c]!.guest.op, c * pages * 4096, pages, options.loops ?? 3, check, options.resetContext ?? false, options.fetch ?? false))
  }
  return { vm, mmu: getTdpMmu(vm), check }
}

/** A KVM_SET_USER_MEMORY_REGION on a kernel thread (slots_lock held around the MMU's part). */
export function spawnMemslotUpdate(vm: Vm, name: string, region: UserMemoryRegion): void {
  vm.sched.spawn(name, function* (): KernelOp {
    yield* vm.slotsLock.lock()
    try {
      const change: MemslotChange = vm.memslots.setUserMemoryRegion(region)
      if (change.kind !== 'none') yield* vm.mmu.memslotChanged(change)
    } finally {
      vm.slotsLock.unlock()
    }
  })
}

/** Delete slot `id` of address space 0 on a kernel thread (→ kvm_mmu_zap_all_fast). */
export function spawnSlotDelete(vm: Vm, id: number): void {
  const s = vm.memslots.idToMemslot(0, id)!
  spawnMemslotUpdate(vm, `delete-slot${String(id)}`, { slot: id, asId: 0, flags: 0, guestPhysAddr: s.baseGfn * 4096, memorySize: 0, userspaceAddr: s.userspaceAddr })
}

/** Toggle dirty logging of slot `id` on a kernel thread. */
export function spawnDirtyLogging(vm: Vm, id: number, on: boolean): void {
  const s = vm.memslots.idToMemslot(0, id)!
  spawnMemslotUpdate(vm, `dirty-log-${on ? 'on' : 'off'}`, { slot: id, asId: 0, flags: on ? KVM_MEM_LOG_DIRTY_PAGES : 0, guestPhysAddr: s.baseGfn * 4096, memorySize: s.npages * 4096, userspaceAddr: s.userspaceAddr })
}

/**
 * A host mm operation under mmu_lock (as Vm.hostOp), followed — while still holding the lock, i.e.
 * right after invalidate_range_end — by the §12.1(10) check: no present SPTE of any root, valid
 * or invalid, maps a page the host freed.
 */
export function spawnCheckedHostOp(sv: ScenarioVm, name: string, op: (vm: Vm) => void, startTime = 0): void {
  const { vm, mmu } = sv
  vm.sched.spawn(`host:${name}`, function* (): KernelOp {
    yield* vm.mmuLock.writeLock()
    try {
      op(vm)
      const out: string[] = []
      recount(mmu, out)
      for (const m of out) if (m.includes('host freed')) mmu.violations.push(`after ${name}: ${m}`)
    } finally {
      vm.mmuLock.writeUnlock()
    }
  }, { startTime })
}

/** Migrate the host page behind guest page `gfn` of slot 0 (copy, switch, free the old frame). */
export function migrateGfn(vm: Vm, gfn: number): void {
  const s = vm.memslots.idToMemslot(0, 0)!
  vm.host.migratePage(s.userspaceAddr + (gfn - s.baseGfn) * 4096)
}

/** Run to completion and return the invariant violations (audit) plus guest-visible failures. */
export function finish(sv: ScenarioVm): string[] {
  const { vm, check } = sv
  vm.run()
  const out = vm.mmu.audit()
  if (check.mismatches > 0) out.push(`guest read back ${String(check.mismatches)} wrong values`)
  if (check.failures > 0) out.push(`${String(check.failures)} guest accesses failed`)
  try {
    vm.destroy()
  } catch (e) {
    out.push(`destroy: ${e instanceof Error ? e.message : String(e)}`)
  }
  return out
}

/**
 * The hardware-writer actor of tdp-mmu.md §12.1(2): like a guest write through a CPU's A/D
 * assist, it sets D on the first present, writable, clean leaf of slot 0 with a locked cmpxchg —
 * no mmu_lock, no exit. It acts while someone holds mmu_lock for write (the moments S11 is about)
 * and otherwise just lets time pass, until `alive()` turns false.
 */
export function spawnCpuDirtyActor(sv: ScenarioVm, alive: () => boolean): void {
  const { vm, mmu } = sv
  vm.sched.spawn('cpu-dirty-actor', function* (): KernelOp {
    const m = mmu.mem
    const d = mmu.fmt.dirtyLo
    const it = mmu.newIter()
    while (alive()) {
      vm.sched.yieldHint() // a spinner must not starve the others under PCT
      if (vm.mmuLock.writeHolder === null) {
        yield 20
        continue
      }
      yield 5 // slower than a walker's per-entry pace, so it hits the entry being updated, not ones ahead
      vm.rcu.readLock()
      const root = mmu.rootsHead
      if (root !== null && !root.invalid) {
        for (it.start(root, 1, 0); it.valid && it.gfn < 1024; it.next()) {
          const lo = it.oldLo
          if (it.level !== 1 || (lo & 0x800) === 0 || (lo & 2) === 0 || (lo & d) !== 0) continue
          m.cmpxchg64(it.sptep, lo, it.oldHi, (lo | d) >>> 0, it.oldHi)
          break
        }
      }
      vm.rcu.readUnlock()
    }
  })
}
