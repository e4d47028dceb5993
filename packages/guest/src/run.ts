import { type AccessObserver, Machine, type MachineOptions } from '@mmusim/x86-hw'
import type { Cpu, CpuCounters, Routine } from './cpu.ts'
import type { FrameStats } from './frames.ts'
import { GuestOs, type GuestOsOptions, type OsStats } from './guest-os.ts'

/** Options of {@link runGuest}: the machine's and the guest OS's. */
export interface RunGuestOptions extends GuestOsOptions {
  /** vCPUs. @default 1 */
  vcpus?: number
  /** Guest-physical memory. @default 64 MiB */
  memBytes?: number
  /** Other bare-machine options (TLB geometry, CPU features, op cost ...). */
  machine?: Partial<MachineOptions>
  /** Observer of every non-batch memory op (see `Machine.run`). */
  observer?: AccessObserver | null
}

/** The outcome of a guest run. */
export interface RunResult {
  /** User data accesses completed by the programs. */
  accesses: number
  /** Page faults handled by the guest kernel. */
  pageFaults: number
  /** Data read back different from what the program expected (0 on a correct MMU). */
  mismatches: number
  /** SIGSEGVs delivered. */
  sigsegv: number
  /** Per-vCPU counters (ops yielded, accesses, faults, mismatches, SIGSEGVs, IPIs handled). */
  perCpu: CpuCounters[]
  /** Kernel event counters. */
  stats: OsStats
  /** Frame allocator counters. */
  frames: FrameStats
  /** The first mismatches, described. */
  mismatchLog: string[]
  /** The guest OS and machine, for further inspection. */
  os: GuestOs
  machine: Machine
}

/** Summarise a finished run of `os` on `machine`. */
export function collectResult(os: GuestOs, machine: Machine): RunResult {
  const t = os.totals()
  return {
    accesses: t.accesses,
    pageFaults: t.pageFaults,
    mismatches: t.mismatches,
    sigsegv: t.sigsegv,
    perCpu: os.cpus.map((c) => ({ ...c.counters })),
    stats: { ...os.stats },
    frames: os.frameStats(),
    mismatchLog: os.cpus.flatMap((c) => c.mismatchLog),
    os,
    machine,
  }
}

/**
 * Build a bare-metal {@link Machine}, boot the guest OS on it, run `program` on every vCPU to
 * completion and return the counts. The one-call way to run a workload on the reference machine:
 *
 * ```ts
 * const r = runGuest((cpu) => memstress(cpu, { iterations: 2 }), { vcpus: 2 })
 * ```
 */
export function runGuest(program: (cpu: Cpu) => Routine, options: RunGuestOptions = {}): RunResult {
  const machine = new Machine({ memBytes: options.memBytes ?? 64 * 2 ** 20, vcpus: options.vcpus ?? 1, ...options.machine })
  const os = GuestOs.forMachine(machine, options)
  os.spawnAll(machine, program)
  machine.run(options.observer ?? null)
  return collectResult(os, machine)
}
