import type { Cpu, GuestOs, GuestOsOptions, Routine } from '@mmusim/guest'
import type { Vm } from '@mmusim/kvm'

/** How a workload parameter is written and parsed. */
export type ParamType = 'int' | 'size' | 'bool' | 'percent' | 'enum' | 'string'

/** A parameter value. */
export type ParamValue = number | boolean | string

/** Resolved parameters of a workload. */
export type Params = Readonly<Record<string, ParamValue>>

/** One workload parameter: its name, the KVM selftest's flag for it, its defaults. */
export interface ParamDef {
  /** camelCase key (`bytesPerVcpu`); the CLI flag is its kebab-case form (`--bytes-per-vcpu`). */
  readonly name: string
  /** The selftest's one-letter flag (`b` for `-b`), accepted on the command line too. */
  readonly flag?: string
  readonly type: ParamType
  /** The harness default (a small scale, so the default suite runs in about a minute). */
  readonly default: ParamValue
  /** The selftest's own default (used with `--scale selftest`). */
  readonly selftestDefault?: ParamValue
  /** Allowed values of an `enum`. */
  readonly choices?: readonly string[]
  /** Inclusive bounds of a number. */
  readonly min?: number
  readonly max?: number
  readonly description: string
}

/** Timing and counters of one phase of a run. */
export interface PhaseMeasure {
  readonly name: string
  /** Simulated nanoseconds the phase took (makespan over its vCPUs). */
  readonly simNs: number
}

/**
 * What a workload's script drives: the guest OS on a VM (or on bare metal), a way to run guest
 * phases and host-side operations, and where to put the selftest's metrics and output lines.
 */
export interface WorkloadContext {
  readonly params: Params
  /** The guest random seed (`-r`). */
  readonly seed: number
  readonly vcpus: number
  readonly os: GuestOs
  /** The VM, or null on the bare-metal reference (host-side steps are then skipped). */
  readonly vm: Vm | null
  /** Guest-physical memory size. */
  readonly memBytes: number
  /** What the workload's `prepare` returned (e.g. a trace read ahead of the run). */
  readonly prepared: unknown
  /** Run `program` on each of `cpus` (default: every vCPU) until all finish; returns its timing. */
  guest(name: string, program: (cpu: Cpu) => Routine, cpus?: readonly number[]): PhaseMeasure
  /** Run a host-side step on the VM (skipped, 0 ns, on bare metal). */
  host(name: string, op: (vm: Vm) => void): PhaseMeasure
  /** Record a named metric (same names as the selftest's output). */
  metric(name: string, value: number): void
  /** Print one output line in the selftest's format. */
  line(text: string): void
}

/** A workload: a guest program plus its host-side script and its metric names. */
export interface Workload {
  readonly name: string
  /** The KVM selftest (or benchmark) it mirrors. */
  readonly mirrors: string
  readonly description: string
  readonly params: readonly ParamDef[]
  /** Names of the metrics it emits (the selftest's output strings). */
  readonly metrics: readonly string[]
  /** Name of the parameter holding the vCPU count. @default 'vcpus' */
  readonly vcpusParam?: string
  /**
   * Whether each vCPU's own sequence of accesses is independent of timing, so the oracle can
   * compare it access by access against bare metal (otherwise only the guest's own checks and
   * counters are compared).
   */
  raceFree(params: Params, vcpus: number): boolean
  /** Guest-physical memory the run needs. */
  memBytes(params: Params, vcpus: number): number
  /** Guest OS options (paging levels come from the run's config). */
  guestOptions?(params: Params): GuestOsOptions
  /** Whether the host backs guest memory with THP. */
  thpBacking?(params: Params): boolean
  /** Memslots to split guest memory into. @default 1 */
  slots?(params: Params): number
  /** Asynchronous preparation before the (synchronous) run, e.g. reading a trace file. */
  prepare?(params: Params): Promise<unknown>
  /** The script: guest phases and host steps, in the selftest's order. */
  run(ctx: WorkloadContext): void
}

/** Identity helper for type inference. */
export function defineWorkload(w: Workload): Workload {
  return w
}

/** Format simulated nanoseconds as the selftests print a timespec: `%ld.%.9lds`. */
export function fmtTs(ns: number): string {
  const s = Math.floor(ns / 1e9)
  const rest = Math.round(ns - s * 1e9)
  return `${String(s)}.${String(rest).padStart(9, '0')}s`
}

/** Round `x` up to a multiple of `a`. */
export function roundUp(x: number, a: number): number {
  return Math.ceil(x / a) * a
}

/** Guest memory for a memstress-style run: kernel, plus per-vCPU pools holding `perVcpu` bytes each with room for tables. */
export function memFor(perVcpu: number, vcpus: number, extra = 0): number {
  return roundUp(8 * 2 ** 20 + vcpus * (perVcpu + perVcpu / 256 + 2 * 2 ** 20) + extra, 2 * 2 ** 20)
}
