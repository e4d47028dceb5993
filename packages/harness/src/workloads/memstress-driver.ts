import { type Cpu, exitProcess, memstressAccessPass, mmap, mprotect, populate, preallocTables, Prng, type Routine, switchMm, type Task } from '@mmusim/guest'
import { KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES, type Vm } from '@mmusim/kvm'
import type { AccessBatch } from '@mmusim/x86-hw'
import type { WorkloadContext } from '../workload.ts'

/** Layout and state of a memstress region shared by the phases of one run (KVM's memstress_args). */
export interface MemstressRegion {
  readonly bytesPerVcpu: number
  /** Access stride (guest_page_size). */
  readonly stride: number
  readonly overlap: boolean
  readonly thp: boolean
  readonly base: number
  task: Task | null
  /** Per vCPU: the value last written to each page (0 = never), to check reads. */
  readonly last: Uint32Array[]
  /** Per vCPU PRNG (seeded from `-r`), advanced across passes as the selftest's guest does. */
  readonly prng: Prng[]
  readonly batches: AccessBatch[]
}

/** Options of {@link memstressRegion}. */
export interface MemstressRegionOptions {
  readonly bytesPerVcpu: number
  readonly stride?: number
  readonly overlap?: boolean
  readonly thp?: boolean
  readonly seed: number
  readonly vcpus: number
}

/** A fresh region description (nothing mapped yet). */
export function memstressRegion(o: MemstressRegionOptions): MemstressRegion {
  const stride = o.stride ?? 4096
  const pages = o.bytesPerVcpu / stride
  return {
    bytesPerVcpu: o.bytesPerVcpu,
    stride,
    overlap: o.overlap ?? false,
    thp: o.thp ?? false,
    base: 2 ** 32,
    task: null,
    last: Array.from({ length: o.vcpus }, () => new Uint32Array(pages)),
    prng: Array.from({ length: o.vcpus }, (_, i) => new Prng(o.seed).fork(i)),
    batches: Array.from({ length: o.vcpus }, () => ({ addrs: new Float64Array(pages), kinds: new Uint8Array(pages), values: new Uint32Array(pages) })),
  }
}

/**
 * Setup on vCPU 0, as the selftest's host does before starting vCPUs: one process, the region
 * mmapped, and its page tables preallocated (`populate`: every page faulted in at guest level).
 */
export function* memstressSetup(cpu: Cpu, r: MemstressRegion, opts: { populate?: boolean } = {}): Routine {
  const os = cpu.os
  const task = yield* os.createProcess(cpu)
  yield* switchMm(cpu, task.mm)
  const len = r.overlap ? r.bytesPerVcpu : r.bytesPerVcpu * os.cpus.length
  yield* mmap(cpu, task.mm, { addr: r.base, length: len, thp: r.thp })
  if (opts.populate === true) yield* populate(cpu, task.mm, r.base, r.base + len)
  else yield* preallocTables(cpu, task.mm, r.base, r.base + len)
  r.task = task
}

/** Options of one pass. */
export interface PassOptions {
  /** Percentage of writes (`-w`). @default 100 */
  readonly writePercent?: number
  /** Random page order (`-a`). @default false */
  readonly randomAccess?: boolean
  /** Iteration number (the value written depends on it). */
  readonly iteration: number
  /** Touch only every `every`-th page (e.g. one access per 2 MiB). @default 1 */
  readonly every?: number
}

/** One memstress pass of this vCPU over its region (memstress_guest_code's loop body), one batch op. */
export function* memstressPass(cpu: Cpu, r: MemstressRegion, o: PassOptions): Routine {
  const task = r.task
  if (task === null) throw new Error('memstressPass before memstressSetup')
  yield* switchMm(cpu, task.mm)
  const region = r.base + (r.overlap ? 0 : cpu.id * r.bytesPerVcpu)
  const every = o.every ?? 1
  const pages = Math.floor(r.bytesPerVcpu / r.stride / every)
  const total = r.bytesPerVcpu / r.stride
  const spec = {
    region,
    stride: r.stride,
    pages,
    total,
    every,
    randomAccess: o.randomAccess === true,
    writePercent: o.writePercent ?? 100,
    overlap: r.overlap,
    iteration: o.iteration,
  }
  yield* memstressAccessPass(cpu, spec, r.prng[cpu.id]!, r.batches[cpu.id]!, r.last[cpu.id]!)
}

/** Change the guest protection of the whole region (vCPU 0). */
export function* memstressProtect(cpu: Cpu, r: MemstressRegion, prot: number): Routine {
  const task = r.task!
  yield* switchMm(cpu, task.mm)
  const len = r.overlap ? r.bytesPerVcpu : r.bytesPerVcpu * cpu.os.cpus.length
  yield* mprotect(cpu, task.mm, r.base, len, prot)
}

/** Teardown on vCPU 0: the process exits. */
export function* memstressTeardown(cpu: Cpu, r: MemstressRegion): Routine {
  if (r.task !== null) yield* exitProcess(cpu, r.task)
  r.task = null
}

/** Run a pass on every vCPU as one measured phase. */
export function passPhase(ctx: WorkloadContext, name: string, r: MemstressRegion, o: PassOptions): number {
  return ctx.guest(name, (cpu) => memstressPass(cpu, r, o)).simNs
}

/** Setup and teardown phases (vCPU 0 only). */
export function setupPhase(ctx: WorkloadContext, r: MemstressRegion, populateFirst = false): void {
  ctx.guest('setup', (cpu) => memstressSetup(cpu, r, { populate: populateFirst }), [0])
}

/** Teardown phase (vCPU 0). */
export function teardownPhase(ctx: WorkloadContext, r: MemstressRegion): void {
  ctx.guest('teardown', (cpu) => memstressTeardown(cpu, r), [0])
}

// ---------------------------------------------------------------- host-side helpers

/** Ids of the memslots of address space 0. */
export function slotIds(vm: Vm): number[] {
  return vm.memslots.space(0).sorted.map((s) => s.id)
}

/** KVM_SET_USER_MEMORY_REGION toggling KVM_MEM_LOG_DIRTY_PAGES on every slot (memstress_toggle_dirty_logging). */
export function toggleDirtyLogging(vm: Vm, enable: boolean): void {
  for (const s of [...vm.memslots.space(0).sorted]) {
    vm.setUserMemoryRegion({
      slot: s.id,
      asId: 0,
      flags: enable ? s.flags | KVM_MEM_LOG_DIRTY_PAGES : s.flags & ~KVM_MEM_LOG_DIRTY_PAGES,
      guestPhysAddr: s.baseGfn * 4096,
      memorySize: s.npages * 4096,
      userspaceAddr: s.userspaceAddr,
    })
  }
}

/** KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) as the selftest does (unless `-g`). */
export function enableManualProtect(vm: Vm): void {
  vm.memslots.enableManualDirtyLogProtect(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET)
}

/** KVM_GET_DIRTY_LOG on every slot; returns the dirty pages found. */
export function getDirtyLogAll(vm: Vm, bitmaps: Map<number, Uint32Array>): number {
  let n = 0
  for (const id of slotIds(vm)) {
    const bm = vm.getDirtyLog(0, id)
    bitmaps.set(id, bm)
    for (const w of bm) n += popcount(w)
  }
  return n
}

/** KVM_CLEAR_DIRTY_LOG of every harvested bit on every slot. */
export function clearDirtyLogAll(vm: Vm, bitmaps: Map<number, Uint32Array>): void {
  for (const id of slotIds(vm)) {
    const s = vm.memslots.idToMemslot(0, id)
    const bm = bitmaps.get(id)
    if (s === null || bm === undefined) continue
    vm.clearDirtyLog(0, id, 0, s.npages, bm)
  }
}

function popcount(x: number): number {
  let v = x >>> 0
  let n = 0
  while (v !== 0) {
    v &= v - 1
    n++
  }
  return n
}

/**
 * Age every slot as access_tracking_perf_test's page_idle writes do: `mmu_notifier_clear_young`
 * (no TLB flush) on all guest memory, through KVM's notifier path (`vm.hostAgeOp`): without
 * mmu_lock for a strategy that ages locklessly (the TDP MMU since 6.15), under it otherwise.
 */
export function markIdle(vm: Vm): void {
  for (const s of vm.memslots.space(0).sorted) {
    vm.hostAgeOp('mark_idle', vm.sched.now, s.userspaceAddr, s.npages * 4096, 'clear_young')
  }
}
