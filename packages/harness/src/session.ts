import { type Cpu, GuestOs, type GuestOsOptions, type Routine, switchMm } from '@mmusim/guest'
import { type CostModel, DEFAULT_COSTS, makeCostModel, type MmuStrategy, statsToRecord, Vm } from '@mmusim/kvm'
import { C_ACCESSES, C_MEM_REFS, COUNTER_COUNT, COUNTER_NAMES, type CpuFeatures, type GuestProgram, Machine, makeFeatures, type TlbConfig } from '@mmusim/x86-hw'
import { GuestTrace } from './trace.ts'
import type { Params, PhaseMeasure, Workload, WorkloadContext } from './workload.ts'

/** Machine-level settings of a run (the same for every strategy in a comparison). */
export interface MachineConfig {
  /** Guest paging levels (CR4.LA57 when 5). @default 4 */
  readonly levels?: 4 | 5
  /** Guest-physical memory; default: what the workload asks for. */
  readonly memBytes?: number
  /** Back guest memory with THP on the host (also set by workloads that need it). @default false */
  readonly thp?: boolean
  /** CPU features (CPUID) of the vCPUs. */
  readonly features?: Partial<CpuFeatures>
  /** TLB geometry. */
  readonly tlb?: Partial<TlbConfig>
  /** Cost model overrides (simulated ns). */
  readonly costs?: Partial<CostModel>
}

/** KVM stats that are gauges (reported as the value at the end of a phase, not as a delta). */
const GAUGES = new Set(['mmu_unsync', 'mmu_shadow_pages', 'pages_4k', 'pages_2m', 'pages_1g', 'nx_lpage_splits', 'max_mmu_page_hash_collisions', 'max_mmu_rmap_size', 'mmuPagesLive'])

/** A snapshot of every counter of a platform. */
interface Snapshot {
  now: number
  kvm: Record<string, number>
  hw: Float64Array
  /** Per-vCPU (accesses, mem refs) for bare-metal timing. */
  perCpu: number[]
  lockWaitNs: number
  lockContended: number
}

/** Counters of one phase (deltas, gauges at the end). */
export interface PhaseCounters {
  /** KVM stats (VM-wide `kvm->stat` and the per-vCPU stats summed). Empty on bare metal. */
  readonly kvm: Record<string, number>
  /** Hardware counters summed over vCPUs (x86-hw COUNTER_NAMES). */
  readonly hw: Record<string, number>
  /** mmu_lock: simulated ns spent waiting, contended acquisitions. */
  readonly lock: { readonly waitNs: number; readonly contended: number }
}

/** One phase's result. */
export interface PhaseResult extends PhaseMeasure, PhaseCounters {
  /** 'guest' or 'host'. */
  readonly kind: 'guest' | 'host'
}

/** What executing a workload on one platform produced. */
export interface Execution {
  readonly phases: PhaseResult[]
  readonly metrics: Record<string, number>
  readonly lines: string[]
  readonly trace: GuestTrace | null
  readonly os: GuestOs
  readonly vm: Vm | null
  readonly machine: Machine | null
  /** The strategy's own counters at the end (empty on bare metal). */
  readonly strategyStats: Record<string, number>
}

/** Everything {@link execute} needs. */
export interface ExecuteOptions {
  readonly workload: Workload
  readonly params: Params
  readonly seed: number
  readonly vcpus: number
  /** The strategy and its validated options; null runs on the bare-metal reference. */
  readonly strategy: MmuStrategy | null
  readonly strategyOptions?: unknown
  readonly machine?: MachineConfig
  /** Record each vCPU's guest-visible trace (for the oracle). */
  readonly record?: boolean
  /** PCT chaos scheduling seed for the VM. */
  readonly chaosSeed?: number
  /** What the workload's `prepare` returned. */
  readonly prepared?: unknown
  /** Called when a phase starts (progress). */
  readonly onPhase?: (name: string) => void
}

function sumHw(counters: readonly Float64Array[]): Float64Array {
  const out = new Float64Array(COUNTER_COUNT)
  for (const c of counters) for (let i = 0; i < COUNTER_COUNT; i++) out[i]! += c[i]!
  return out
}

/** Guest memory layout of a run: slot boundaries (gpa, bytes). */
export function slotLayout(memBytes: number, slots: number): { gpa: number; bytes: number }[] {
  const pages = memBytes / 4096
  const per = Math.floor(pages / slots)
  const out: { gpa: number; bytes: number }[] = []
  for (let i = 0; i < slots; i++) {
    const first = i * per
    const n = i === slots - 1 ? pages - first : per
    out.push({ gpa: first * 4096, bytes: n * 4096 })
  }
  return out
}

/**
 * Execute a workload's script on a fresh VM with `strategy` (or on the bare-metal reference),
 * measuring every phase. Deterministic: the same options give the same counters and times.
 */
export function execute(o: ExecuteOptions): Execution {
  const w = o.workload
  const mc = o.machine ?? {}
  const costs = makeCostModel(mc.costs)
  const memBytes = mc.memBytes ?? w.memBytes(o.params, o.vcpus)
  const thp = (mc.thp ?? false) || (w.thpBacking?.(o.params) ?? false)
  const trace = o.record === true ? new GuestTrace(o.vcpus) : null
  const guestOptions: GuestOsOptions = { ...w.guestOptions?.(o.params), levels: mc.levels ?? 4, ...(trace === null ? {} : { onBatch: trace.onBatch }) }
  let vm: Vm | null = null
  let machine: Machine | null = null
  let os: GuestOs
  if (o.strategy !== null) {
    vm = new Vm({
      strategy: o.strategy,
      strategyOptions: o.strategyOptions,
      vcpus: o.vcpus,
      features: mc.features,
      tlb: mc.tlb,
      costs: mc.costs,
      hostMemBytes: Math.max(256 * 2 ** 20, memBytes * 2 + 64 * 2 ** 20),
      ...(o.chaosSeed === undefined ? {} : { chaos: { seed: o.chaosSeed } }),
    })
    const slots = w.slots?.(o.params) ?? 1
    for (const [i, s] of slotLayout(memBytes, slots).entries()) vm.addMemory(s.gpa, s.bytes, { slot: i, thp })
    const v = vm
    os = new GuestOs({ memBytes, features: v.features, ops: v.vcpus.map((c) => c.guest.op), idt: v.idt }, guestOptions)
  } else {
    machine = new Machine({ memBytes, vcpus: o.vcpus, features: makeFeatures(mc.features), tlb: mc.tlb })
    os = GuestOs.forMachine(machine, guestOptions)
  }
  const snap = (): Snapshot => {
    if (vm !== null) {
      const kvm = statsToRecord(vm.stats)
      for (const v of vm.vcpus) for (const [k, x] of Object.entries(statsToRecord(v.stats))) kvm[k] = (kvm[k] ?? 0) + x
      kvm.mmuPagesAllocated = vm.mmuPagesAllocated
      kvm.mmuPagesLive = vm.mmuPagesLive
      const ls = vm.mmuLock.stats
      return { now: vm.sched.now, kvm, hw: sumHw(vm.vcpus.map((v) => v.hw.counters)), perCpu: [], lockWaitNs: ls.read.waitNs + ls.write.waitNs, lockContended: ls.read.contended + ls.write.contended }
    }
    const m = machine!
    const perCpu = m.vcpus.flatMap((v) => [v.counters[C_ACCESSES]!, v.counters[C_MEM_REFS]!])
    return { now: 0, kvm: {}, hw: sumHw(m.vcpus.map((v) => v.counters)), perCpu, lockWaitNs: 0, lockContended: 0 }
  }
  const phases: PhaseResult[] = []
  const measure = (name: string, kind: 'guest' | 'host', body: () => void): PhaseResult => {
    o.onPhase?.(name)
    const a = snap()
    body()
    const b = snap()
    let simNs = b.now - a.now
    if (vm === null) {
      // Bare metal: a vCPU's time is its accesses and walk references at the cost model's prices.
      simNs = 0
      for (let c = 0; c < b.perCpu.length; c += 2) {
        const ns = costs.guestAccess * (b.perCpu[c]! - a.perCpu[c]!) + costs.memoryRef * (b.perCpu[c + 1]! - a.perCpu[c + 1]!)
        if (ns > simNs) simNs = ns
      }
    }
    const kvmDelta: Record<string, number> = {}
    for (const [k, x] of Object.entries(b.kvm)) kvmDelta[k] = GAUGES.has(k) ? x : x - (a.kvm[k] ?? 0)
    const hw: Record<string, number> = {}
    for (let i = 0; i < COUNTER_COUNT; i++) hw[COUNTER_NAMES[i]!] = b.hw[i]! - a.hw[i]!
    const r: PhaseResult = { name, kind, simNs, kvm: kvmDelta, hw, lock: { waitNs: b.lockWaitNs - a.lockWaitNs, contended: b.lockContended - a.lockContended } }
    phases.push(r)
    return r
  }
  let booted = false
  const spawn = (cpu: Cpu, program: (cpu: Cpu) => Routine): void => {
    const body = booted ? withIdle(cpu, program) : os.main(cpu, program)
    const prog = trace === null ? body : trace.wrap(cpu.id, body)
    if (vm !== null) vm.spawnGuest(cpu.id, prog)
    else machine!.spawn(cpu.id, prog)
  }
  const runAll = (): void => {
    if (vm !== null) vm.run()
    else machine!.run()
  }
  const metrics: Record<string, number> = {}
  const lines: string[] = []
  const ctx: WorkloadContext = {
    params: o.params,
    seed: o.seed,
    vcpus: o.vcpus,
    os,
    vm,
    memBytes,
    prepared: o.prepared,
    guest(name, program, cpus) {
      return measure(name, 'guest', () => {
        const ids = cpus ?? os.cpus.map((c) => c.id)
        for (const id of ids) spawn(os.cpus[id]!, program)
        runAll()
      })
    },
    host(name, op) {
      return measure(name, 'host', () => {
        if (vm === null) return
        op(vm)
        vm.run()
      })
    },
    metric(name, value) {
      metrics[name] = value
    },
    line(text) {
      lines.push(text)
    },
  }
  // Boot every vCPU first (its own phase, not part of any metric).
  ctx.guest('boot', function* () {
    /* boot only */
  })
  booted = true
  w.run(ctx)
  return { phases, metrics, lines, trace, os, vm, machine, strategyStats: vm === null ? {} : vm.mmu.stats() }
}

/** A phase program after boot: run `program`, then leave every mm (so no shootdown waits for a finished vCPU). */
function* withIdle(cpu: Cpu, program: (cpu: Cpu) => Routine): GuestProgram {
  yield* program(cpu)
  yield* switchMm(cpu, null)
}

/** The default cost model (re-exported for reports). */
export const COSTS: Readonly<CostModel> = DEFAULT_COSTS
