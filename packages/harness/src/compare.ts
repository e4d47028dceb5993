import type { ExperimentConfig, WorkloadSpec } from './config.ts'
import { isUnavailable, loadStrategy, type LoadedStrategy, type StrategySpec } from './loader.ts'
import { type RunRecord, runOne } from './runner.ts'
import type { Execution, MachineConfig } from './session.ts'
import { DEFAULT_SUITE, getWorkload } from './workloads/index.ts'
import { DEFAULT_STRATEGIES } from './loader.ts'

/** Whether a requested strategy could be loaded. */
export interface StrategyStatus {
  readonly spec: string
  readonly name: string
  readonly available: boolean
  /** Why it is unavailable (module not found, no such strategy yet). */
  readonly reason: string | null
  readonly capabilities: Record<string, unknown> | null
}

/** The result of a comparison. */
export interface CompareResult {
  readonly strategies: readonly StrategyStatus[]
  readonly workloads: readonly string[]
  readonly seeds: readonly number[]
  readonly runs: readonly RunRecord[]
}

/** Options of {@link compare}: an experiment config plus where it came from and a progress hook. */
export interface CompareOptions extends ExperimentConfig {
  /** Folder that strategy paths resolve from. @default process.cwd() */
  readonly from?: string
  readonly onProgress?: (e: ProgressEvent) => void
  /** Replay command prefix. */
  readonly command?: string
}

/** Progress of a comparison. */
export interface ProgressEvent {
  readonly index: number
  readonly total: number
  readonly strategy: string
  readonly workload: string
  readonly phase: string | null
  readonly done: RunRecord | null
}

function specLabel(s: StrategySpec): string {
  const t = Array.isArray(s) ? (s as readonly [unknown, unknown])[0] : s
  return typeof t === 'string' ? t : ((t as { name?: string }).name ?? 'inline')
}

/**
 * Run every (strategy, workload, seed) of an experiment, the oracle on by default. A strategy
 * whose module or export does not exist is reported as unavailable instead of failing the
 * comparison; any other loading error (wrong shape, bad options) is thrown.
 */
export async function compare(o: CompareOptions = {}): Promise<CompareResult> {
  const specs = o.strategies ?? DEFAULT_STRATEGIES
  const loaded: LoadedStrategy[] = []
  const statuses: StrategyStatus[] = []
  for (const s of specs) {
    try {
      const l = await loadStrategy(s, { from: o.from })
      loaded.push(l)
      statuses.push({ spec: specLabel(s), name: l.name, available: true, reason: null, capabilities: l.strategy === null ? null : { ...l.strategy.capabilities } })
    } catch (err) {
      if (!isUnavailable(err)) throw err
      statuses.push({ spec: specLabel(s), name: specLabel(s), available: false, reason: err.message.split('\n')[0]!, capabilities: null })
    }
  }
  const workloads: WorkloadSpec[] = [...(o.workloads ?? DEFAULT_SUITE)]
  const seeds = o.seeds ?? [1]
  const machine: MachineConfig = { levels: o.levels, thp: o.thp, memBytes: o.memBytes, costs: o.costs }
  const cache = new Map<string, Execution>()
  const runs: RunRecord[] = []
  const total = workloads.length * seeds.length * loaded.length
  let index = 0
  for (const ws of workloads) {
    const w = getWorkload(typeof ws === 'string' ? ws : ws.name)
    const params = typeof ws === 'string' ? {} : (ws.params ?? {})
    for (const seed of seeds) {
      cache.clear()
      for (const s of loaded) {
        index++
        const i = index
        o.onProgress?.({ index: i, total, strategy: s.name, workload: w.name, phase: null, done: null })
        const r = await runOne({
          strategy: s,
          workload: w,
          params,
          scale: o.scale,
          seed,
          vcpus: o.vcpus,
          machine,
          oracle: o.oracle ?? true,
          referenceCache: cache,
          command: o.command,
          onPhase: (phase) => o.onProgress?.({ index: i, total, strategy: s.name, workload: w.name, phase, done: null }),
        })
        runs.push(r)
        o.onProgress?.({ index: i, total, strategy: s.name, workload: w.name, phase: null, done: r })
      }
    }
  }
  return { strategies: statuses, workloads: workloads.map((w) => (typeof w === 'string' ? w : w.name)), seeds, runs }
}
