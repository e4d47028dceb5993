import { diffGuestMemory, type MemoryDifference } from '@mmusim/kvm'
import { HarnessError } from './errors.ts'
import type { LoadedStrategy } from './loader.ts'
import { paramsToFlags, resolveParams, type Scale, vcpusOf } from './params.ts'
import { type Execution, execute, type MachineConfig, type PhaseResult } from './session.ts'
import { compareTraces, type TraceDivergence } from './trace.ts'
import type { Params, Workload } from './workload.ts'

/** Derived, comparable numbers of a phase or a run. */
export interface Derived {
  /** Simulated time, ns. */
  readonly simNs: number
  /** VM exits by reason (hardware counters). */
  readonly exitsByReason: Record<string, number>
  /** Total VM exits. */
  readonly exits: number
  /** Paging-structure memory references per page walk (1-D ≤ 4–5; 2-D ≤ 24–35). */
  readonly refsPerWalk: number
  readonly walks: number
  readonly tlbMisses: number
  /** Guest page-table writes that exited and were emulated (write-protected gfns: shadow paging). */
  readonly ptWriteExits: number
  /** KVM page faults handled (pf_taken). */
  readonly kvmFaults: number
  /** Remote TLB flushes (KVM). */
  readonly remoteTlbFlushes: number
  /** mmu_lock wait, ns. */
  readonly mmuLockWaitNs: number
}

/** One phase in a report: the derived numbers plus the raw counters. */
export interface PhaseReport extends Derived {
  readonly name: string
  readonly kind: 'guest' | 'host'
  readonly kvm: Record<string, number>
  readonly hw: Record<string, number>
}

/** The oracle's verdict on one run. */
export interface OracleReport {
  readonly ok: boolean
  /** 'trace': each vCPU's accesses compared one by one; 'counts': racy workload, only the guest's own checks and counts. */
  readonly mode: 'trace' | 'counts'
  /** The first differing access (vCPU, index, expected vs got). */
  readonly divergence: TraceDivergence | null
  /** Guest-physical words that differ from bare metal at the end (first few). */
  readonly memoryDifferences: readonly MemoryDifference[]
  /** Data mismatches the guest itself detected. */
  readonly guestMismatches: number
  readonly sigsegv: { readonly expected: number; readonly got: number }
  /** Strategy invariant violations (`audit()`). */
  readonly audit: readonly string[]
  /** One line per problem. */
  readonly problems: readonly string[]
}

/** Result of one (strategy, workload, parameters, seed). */
export interface RunRecord {
  readonly strategy: string
  readonly strategySpec: string | null
  readonly strategyOptions: unknown
  readonly workload: string
  readonly params: Params
  readonly seed: number
  readonly vcpus: number
  readonly phases: readonly PhaseReport[]
  /** Totals over the measured phases (boot excluded). */
  readonly totals: Derived
  /** The selftest's metrics (seconds for times). */
  readonly metrics: Record<string, number>
  /** The selftest's output lines. */
  readonly lines: readonly string[]
  readonly guest: { readonly accesses: number; readonly pageFaults: number; readonly mismatches: number; readonly sigsegv: number }
  readonly strategyStats: Record<string, number>
  readonly oracle: OracleReport | null
  /** Set when the run threw (the strategy crashed, an invariant assertion fired...). */
  readonly error: string | null
  /** A command that replays exactly this run. */
  readonly replay: string
  /** Wall-clock time of the simulator, ms (not deterministic; omitted with `--no-timing`). */
  readonly wallMs: number
}

/** A request to run one (strategy, workload, parameters, seed). */
export interface RunRequest {
  readonly strategy: LoadedStrategy
  readonly workload: Workload
  /** Raw parameter overrides (names, kebab names or selftest flags). */
  readonly params?: Readonly<Record<string, unknown>>
  readonly scale?: Scale
  /** Guest random seed (`-r`). @default 1 */
  readonly seed?: number
  /** Overrides the workload's vCPU count. */
  readonly vcpus?: number
  readonly machine?: MachineConfig
  /** Check against the bare-metal reference. @default false */
  readonly oracle?: boolean
  /** PCT chaos scheduling of the VM's threads. */
  readonly chaosSeed?: number
  /** Reference runs to reuse between strategies (same workload, params, seed, machine). */
  readonly referenceCache?: Map<string, Execution>
  readonly onPhase?: (name: string) => void
  /** Command prefix for replay lines. @default 'pnpm mmusim' */
  readonly command?: string
}

function derive(phases: readonly PhaseResult[]): Derived {
  const hw: Record<string, number> = {}
  const kvm: Record<string, number> = {}
  let simNs = 0
  let lockWait = 0
  for (const p of phases) {
    simNs += p.simNs
    lockWait += p.lock.waitNs
    for (const [k, v] of Object.entries(p.hw)) hw[k] = (hw[k] ?? 0) + v
    for (const [k, v] of Object.entries(p.kvm)) kvm[k] = (kvm[k] ?? 0) + v
  }
  const g = (r: Record<string, number>, k: string): number => r[k] ?? 0
  const exitsByReason: Record<string, number> = {}
  for (const k of Object.keys(hw)) if (k.startsWith('exit_')) exitsByReason[k.slice(5)] = hw[k]!
  const walks = g(hw, 'walks')
  return {
    simNs,
    exitsByReason,
    exits: g(hw, 'exits'),
    refsPerWalk: walks === 0 ? 0 : Math.round((g(hw, 'mem_refs') / walks) * 1000) / 1000,
    walks,
    tlbMisses: g(hw, 'tlb_miss'),
    ptWriteExits: g(kvm, 'pf_emulate'),
    kvmFaults: g(kvm, 'pf_taken'),
    remoteTlbFlushes: g(kvm, 'remote_tlb_flush'),
    mmuLockWaitNs: lockWait,
  }
}

function phaseReport(p: PhaseResult): PhaseReport {
  return { name: p.name, kind: p.kind, ...derive([p]), kvm: p.kvm, hw: p.hw }
}

/** The replay command of a run. */
export function replayCommand(r: { strategy: LoadedStrategy; workload: Workload; params: Params; seed: number; machine?: MachineConfig; chaosSeed?: number; oracle: boolean; command?: string }): string {
  const parts = [r.command ?? 'pnpm mmusim', 'run', r.workload.name, '--strategy', shellQuote(r.strategy.spec ?? '<inline strategy object>')]
  if (r.strategy.rawOptions !== undefined) parts.push('--options', shellQuote(JSON.stringify(r.strategy.rawOptions)))
  parts.push('--seed', String(r.seed))
  parts.push(...paramsToFlags(r.workload, r.params).map(shellQuote))
  const m = r.machine ?? {}
  if (m.levels === 5) parts.push('--levels', '5')
  if (m.thp === true) parts.push('--thp')
  if (m.costs !== undefined) parts.push('--costs', shellQuote(JSON.stringify(m.costs)))
  if (r.chaosSeed !== undefined) parts.push('--chaos', String(r.chaosSeed))
  if (r.oracle) parts.push('--oracle')
  return parts.join(' ')
}

function shellQuote(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`
}

function errorMessage(err: unknown): string {
  if (err instanceof Error) return `${err.name}${typeof (err as unknown as { code?: unknown }).code === 'string' ? ` ${(err as unknown as { code: string }).code}` : ''}: ${err.message}`
  return String(err)
}

/**
 * Run one (strategy, workload, parameters, seed): execute the workload's script on a fresh VM
 * (or bare metal) and return per-phase results — simulated time, KVM stats, hardware counters
 * (exits by reason, references per walk, TLB misses), wall-clock time — and, with `oracle`, the
 * verdict of the differential check against the bare-metal reference.
 */
export async function runOne(req: RunRequest): Promise<RunRecord> {
  const w = req.workload
  const raw: Record<string, unknown> = { ...req.params }
  if (req.vcpus !== undefined) raw[w.vcpusParam ?? 'vcpus'] = req.vcpus
  const params = resolveParams(w, raw, req.scale)
  if (req.vcpus !== undefined && !w.params.some((d) => d.name === (w.vcpusParam ?? 'vcpus'))) {
    throw new HarnessError('WORKLOAD_PARAMS', `workload '${w.name}' has a fixed vCPU count`)
  }
  const vcpus = vcpusOf(w, params)
  const seed = req.seed ?? 1
  const prepared = w.prepare === undefined ? undefined : await w.prepare(params)
  const oracleOn = (req.oracle ?? false) && req.strategy.strategy !== null
  const replay = replayCommand({ strategy: req.strategy, workload: w, params, seed, machine: req.machine, chaosSeed: req.chaosSeed, oracle: req.oracle ?? false, command: req.command })
  const start = performance.now()
  let exec: Execution | null = null
  let error: string | null = null
  try {
    exec = execute({
      workload: w,
      params,
      seed,
      vcpus,
      strategy: req.strategy.strategy,
      strategyOptions: req.strategy.options,
      machine: req.machine,
      record: oracleOn,
      chaosSeed: req.chaosSeed,
      prepared,
      onPhase: req.onPhase,
    })
  } catch (err) {
    error = errorMessage(err)
  }
  const wallMs = Math.round((performance.now() - start) * 10) / 10
  let oracle: OracleReport | null = null
  if (oracleOn) {
    const key = JSON.stringify({ w: w.name, params, seed, vcpus, m: req.machine ?? {} })
    let ref = req.referenceCache?.get(key)
    if (ref === undefined) {
      ref = execute({ workload: w, params, seed, vcpus, strategy: null, machine: req.machine, record: true, prepared })
      req.referenceCache?.set(key, ref)
    }
    oracle = exec === null ? crashed(error!) : check(w, params, vcpus, ref, exec)
  }
  const measured = exec?.phases.filter((p) => p.name !== 'boot') ?? []
  const t = exec?.os.totals()
  if (exec?.vm !== null && exec?.vm !== undefined && error === null) {
    try {
      exec.vm.destroy()
    } catch (err) {
      error = errorMessage(err)
    }
  }
  return {
    strategy: req.strategy.name,
    strategySpec: req.strategy.spec,
    strategyOptions: req.strategy.rawOptions ?? null,
    workload: w.name,
    params,
    seed,
    vcpus,
    phases: measured.map(phaseReport),
    totals: derive(measured),
    metrics: exec?.metrics ?? {},
    lines: exec?.lines ?? [],
    guest: { accesses: t?.accesses ?? 0, pageFaults: t?.pageFaults ?? 0, mismatches: t?.mismatches ?? 0, sigsegv: t?.sigsegv ?? 0 },
    strategyStats: exec?.strategyStats ?? {},
    oracle,
    error,
    replay,
    wallMs,
  }
}

function crashed(error: string): OracleReport {
  return { ok: false, mode: 'trace', divergence: null, memoryDifferences: [], guestMismatches: 0, sigsegv: { expected: 0, got: 0 }, audit: [], problems: [`the run failed: ${error}`] }
}

/** The differential check of `got` against the reference `ref`. */
function check(w: Workload, params: Params, vcpus: number, ref: Execution, got: Execution): OracleReport {
  const traceMode = w.raceFree(params, vcpus)
  const problems: string[] = []
  const divergence = traceMode && ref.trace !== null && got.trace !== null ? compareTraces(ref.trace, got.trace) : null
  if (divergence !== null) {
    problems.push(`first differing access: vCPU ${String(divergence.vcpu)}, access #${String(divergence.index)}: expected ${divergence.expected}, got ${divergence.got}`)
  }
  const gt = got.os.totals()
  const rt = ref.os.totals()
  if (gt.mismatches !== 0) problems.push(`the guest read ${String(gt.mismatches)} wrong value(s): ${got.os.cpus.flatMap((c) => c.mismatchLog).slice(0, 2).join('; ')}`)
  if (gt.sigsegv !== rt.sigsegv) problems.push(`SIGSEGVs: expected ${String(rt.sigsegv)}, got ${String(gt.sigsegv)}`)
  // Page-table frames of either run: their A/D bits are compared modulo the architecture's freedom.
  const ptFrames = new Set([...ref.os.pageTableFrames, ...got.os.pageTableFrames])
  const memoryDifferences = traceMode && got.vm !== null && ref.machine !== null ? diffGuestMemory(got.vm, ref.machine, 5, ptFrames) : []
  if (memoryDifferences.length > 0) {
    const d = memoryDifferences[0]!
    problems.push(`guest memory differs at gpa 0x${d.gpa.toString(16)}: expected 0x${d.expected.toString(16)}, got 0x${d.got.toString(16)}${memoryDifferences.length > 1 ? ` (and more)` : ''}`)
  }
  const audit = got.vm?.mmu.audit() ?? []
  for (const a of audit) problems.push(`audit: ${a}`)
  return { ok: problems.length === 0, mode: traceMode ? 'trace' : 'counts', divergence, memoryDifferences, guestMismatches: gt.mismatches, sigsegv: { expected: rt.sigsegv, got: gt.sigsegv }, audit, problems }
}
