import { clearYoung, type Cpu, exitProcess, flushTlbMmRange, fork, mmap, mprotect, munmap, PROT_EXEC, PROT_READ, PROT_WRITE, type Routine, switchMm, type Task } from '@mmusim/guest'
import fc from 'fast-check'
import { isUnavailable, loadStrategy, type LoadedStrategy, type StrategySpec } from './loader.ts'
import { type RunRecord, runOne } from './runner.ts'
import type { Execution } from './session.ts'
import { interpretShared, sharedCaseArb, type SharedFuzzCase, type SharedStep } from './shared-mm.ts'
import { defineWorkload, memFor, type Workload } from './workload.ts'

/** One command of a generated guest program (JSON, so a failure prints as a regression test). */
export type FuzzCommand =
  | { readonly op: 'mmap'; readonly pages: number; readonly prot: number }
  | { readonly op: 'munmap'; readonly region: number }
  | { readonly op: 'mprotect'; readonly region: number; readonly prot: number }
  | { readonly op: 'write'; readonly region: number; readonly page: number; readonly value: number }
  | { readonly op: 'read'; readonly region: number; readonly page: number }
  | { readonly op: 'fetch'; readonly region: number; readonly page: number }
  | { readonly op: 'fork'; readonly childWrites: number }
  | { readonly op: 'switch' }
  | { readonly op: 'invlpg'; readonly region: number; readonly page: number }
  | { readonly op: 'clearYoung'; readonly region: number; readonly page: number; readonly flush: boolean }

/** A generated per-process case: one program per vCPU (each in its own process) and an optional chaos schedule. */
export interface ProcessFuzzCase {
  /** Absent in cases printed before the shared-mm mode existed. */
  readonly mode?: 'processes'
  readonly programs: readonly (readonly FuzzCommand[])[]
  /** PCT chaos-scheduling seed of the VM's threads (null: earliest-clock-first). */
  readonly chaos: number | null
}

/**
 * A generated case: per-process programs ({@link ProcessFuzzCase}) or lockstep steps of threads
 * sharing one mm ({@link SharedFuzzCase}, multi-vCPU TLB shootdowns).
 */
export type FuzzCase = ProcessFuzzCase | SharedFuzzCase

/** Which kinds of case {@link fuzz} generates: per-process programs, shared-mm steps, or both (the default). */
export type FuzzMode = 'processes' | 'shared' | 'mixed'

/** Whether `c` is a shared-mm case. */
export function isSharedCase(c: FuzzCase): c is SharedFuzzCase {
  return c.mode === 'shared'
}

/** Size of a case (commands over all programs, or steps), the measure shrinking minimises. */
export function caseSize(c: FuzzCase): number {
  return isSharedCase(c) ? c.steps.length : c.programs.reduce((n, p) => n + p.length, 0)
}

interface Region {
  base: number
  pages: number
  mapped: boolean
}

interface Proc {
  task: Task
  regions: Region[]
}

/** Interpret one vCPU's program in the guest: two processes at most, regions addressed by index. */
export function* interpret(cpu: Cpu, program: readonly FuzzCommand[]): Routine {
  const os = cpu.os
  const procs: Proc[] = [{ task: yield* os.createProcess(cpu), regions: [] }]
  let cur = 0
  yield* switchMm(cpu, procs[0]!.task.mm)
  const region = (i: number): Region | null => {
    const rs = procs[cur]!.regions
    return rs.length === 0 ? null : rs[i % rs.length]!
  }
  const va = (r: Region, page: number): number => r.base + (page % r.pages) * 4096
  for (const c of program) {
    const p = procs[cur]!
    switch (c.op) {
      case 'mmap': {
        const base = yield* mmap(cpu, p.task.mm, { length: c.pages * 4096, prot: c.prot })
        p.regions.push({ base, pages: c.pages, mapped: true })
        break
      }
      case 'munmap': {
        const r = region(c.region)
        if (r?.mapped === true) {
          yield* munmap(cpu, p.task.mm, r.base, r.pages * 4096)
          r.mapped = false
        }
        break
      }
      case 'mprotect': {
        const r = region(c.region)
        if (r?.mapped === true) yield* mprotect(cpu, p.task.mm, r.base, r.pages * 4096, c.prot)
        break
      }
      case 'write': {
        const r = region(c.region)
        if (r !== null) yield* cpu.write32(va(r, c.page), c.value)
        break
      }
      case 'read': {
        const r = region(c.region)
        if (r !== null) yield* cpu.read32(va(r, c.page))
        break
      }
      case 'fetch': {
        const r = region(c.region)
        if (r !== null) yield* cpu.fetch32(va(r, c.page))
        break
      }
      case 'fork': {
        const child = yield* fork(cpu, p.task)
        yield* switchMm(cpu, child.mm)
        const rs = p.regions.filter((r) => r.mapped)
        for (let i = 0; i < c.childWrites && rs.length > 0; i++) {
          const r = rs[i % rs.length]!
          yield* cpu.read32(va(r, i))
          yield* cpu.write32(va(r, i), 0xc0de0000 + i)
        }
        yield* switchMm(cpu, p.task.mm)
        yield* exitProcess(cpu, child)
        break
      }
      case 'switch': {
        if (procs.length === 1) procs.push({ task: yield* os.createProcess(cpu), regions: [] })
        cur = 1 - cur
        yield* switchMm(cpu, procs[cur]!.task.mm)
        break
      }
      case 'invlpg': {
        const r = region(c.region)
        if (r !== null) yield* cpu.invlpg(va(r, c.page))
        break
      }
      case 'clearYoung': {
        const r = region(c.region)
        if (r?.mapped === true) {
          const page = va(r, c.page)
          yield* clearYoung(cpu, p.task.mm, page, c.flush)
          // As in the shared mode: after a clear without a flush, whether the next access sets A
          // again is up to what the platform cached (TLB, or a shadow SPTE), and the guest kernel
          // reads its PTEs; reclaim's deferred flush makes A comparable before anyone reads it.
          if (!c.flush) yield* flushTlbMmRange(cpu, p.task.mm, page, page + 4096)
        }
        break
      }
    }
  }
  yield* switchMm(cpu, null)
  for (const q of procs) yield* exitProcess(cpu, q.task)
}

/** The workload that runs a {@link FuzzCase}. */
export function fuzzWorkload(c: FuzzCase): Workload {
  if (isSharedCase(c)) {
    return defineWorkload({
      name: 'fuzz-case',
      mirrors: 'generated by mmusim fuzz (shared mm)',
      description: 'generated lockstep steps of threads sharing one mm (multi-vCPU TLB shootdowns)',
      params: [{ name: 'vcpus', type: 'int', default: c.vcpus, min: 1, max: 8, description: 'vCPUs (threads of the shared process)' }],
      metrics: [],
      // Lockstep: one vCPU executes recorded ops at a time, so every access can be compared.
      raceFree: () => true,
      memBytes: (_p, v) => memFor(4 * 2 ** 20, v),
      run(ctx) {
        ctx.guest('steps', (cpu) => interpretShared(cpu, c))
      },
    })
  }
  return defineWorkload({
    name: 'fuzz-case',
    mirrors: 'generated by mmusim fuzz',
    description: 'a generated guest program per vCPU',
    params: [{ name: 'vcpus', type: 'int', default: c.programs.length, min: 1, max: 8, description: 'vCPUs (one program each)' }],
    metrics: [],
    raceFree: () => true,
    memBytes: (_p, v) => memFor(2 * 2 ** 20, v),
    run(ctx) {
      ctx.guest('program', (cpu) => interpret(cpu, c.programs[cpu.id] ?? []))
    },
  })
}

/** Run one fuzz case on `strategy` with the oracle on (the regression tests call this). */
export async function runFuzzCase(strategy: LoadedStrategy, c: FuzzCase, cache = new Map<string, Execution>()): Promise<RunRecord> {
  return runOne({ strategy, workload: fuzzWorkload(c), oracle: true, referenceCache: cache, ...(c.chaos === null ? {} : { chaosSeed: c.chaos }) })
}

const PROTS = [PROT_READ, PROT_READ | PROT_WRITE, PROT_READ | PROT_WRITE | PROT_EXEC, 0]

/** fast-check arbitrary of one command. */
export function commandArb(): fc.Arbitrary<FuzzCommand> {
  const region = fc.nat({ max: 3 })
  const page = fc.nat({ max: 15 })
  return fc.oneof(
    { weight: 3, arbitrary: fc.record({ op: fc.constant('mmap' as const), pages: fc.integer({ min: 1, max: 16 }), prot: fc.constantFrom(...PROTS.slice(0, 3)) }) },
    { weight: 1, arbitrary: fc.record({ op: fc.constant('munmap' as const), region }) },
    { weight: 1, arbitrary: fc.record({ op: fc.constant('mprotect' as const), region, prot: fc.constantFrom(...PROTS) }) },
    { weight: 6, arbitrary: fc.record({ op: fc.constant('write' as const), region, page, value: fc.integer({ min: 1, max: 0x7fffffff }) }) },
    { weight: 4, arbitrary: fc.record({ op: fc.constant('read' as const), region, page }) },
    { weight: 1, arbitrary: fc.record({ op: fc.constant('fetch' as const), region, page }) },
    { weight: 1, arbitrary: fc.record({ op: fc.constant('fork' as const), childWrites: fc.nat({ max: 4 }) }) },
    { weight: 1, arbitrary: fc.record({ op: fc.constant('switch' as const) }) },
    { weight: 1, arbitrary: fc.record({ op: fc.constant('invlpg' as const), region, page }) },
    { weight: 1, arbitrary: fc.record({ op: fc.constant('clearYoung' as const), region, page, flush: fc.boolean() }) },
  )
}

/** fast-check arbitrary of a per-process case: 1–2 vCPUs, programs up to `maxCommands`, a chaos schedule half the time. */
export function processCaseArb(maxCommands: number): fc.Arbitrary<ProcessFuzzCase> {
  const program = fc.array(commandArb(), { maxLength: maxCommands })
  return fc.record({ programs: fc.array(program, { minLength: 1, maxLength: 2 }), chaos: fc.option(fc.integer({ min: 1, max: 1_000_000 }), { nil: null }) })
}

/**
 * fast-check arbitrary of a case in `mode`: per-process programs (up to `maxCommands` each), a
 * shared-mm case (up to `maxCommands` lockstep steps), or — `'mixed'`, the default — either, half
 * and half.
 */
export function caseArb(maxCommands: number, mode: FuzzMode = 'mixed'): fc.Arbitrary<FuzzCase> {
  if (mode === 'processes') return processCaseArb(maxCommands)
  if (mode === 'shared') return sharedCaseArb(maxCommands)
  return fc.oneof(processCaseArb(maxCommands), sharedCaseArb(maxCommands))
}

/** A shrunk failure. */
export interface FuzzFailure {
  readonly strategy: string
  readonly spec: string | null
  readonly options: unknown
  readonly case: FuzzCase
  readonly problems: readonly string[]
  /** fast-check's seed and path, to replay the property exactly. */
  readonly seed: number
  readonly path: string | null
  /** A ready-to-paste vitest regression test. */
  readonly regressionTest: string
}

/** What a fuzzing session found. */
export interface FuzzReport {
  readonly strategies: readonly string[]
  readonly unavailable: readonly string[]
  readonly numRuns: number
  readonly seed: number
  readonly mode: FuzzMode
  readonly failures: readonly FuzzFailure[]
}

/** Options of {@link fuzz}. */
export interface FuzzOptions {
  readonly strategies: readonly StrategySpec[]
  readonly from?: string
  /** Programs to generate per strategy. @default 50 */
  readonly numRuns?: number
  /** fast-check seed. @default 1 */
  readonly seed?: number
  /** Longest program per vCPU (per-process cases) or most lockstep steps (shared-mm cases). @default 24 */
  readonly maxCommands?: number
  /** Which cases to generate. @default 'mixed' */
  readonly mode?: FuzzMode
  readonly log?: (line: string) => void
}

function protName(prot: number): string {
  return `${(prot & PROT_READ) !== 0 ? 'r' : '-'}${(prot & PROT_WRITE) !== 0 ? 'w' : '-'}${(prot & PROT_EXEC) !== 0 ? 'x' : '-'}`
}

/** One lockstep step in words (the comment beside it in a printed regression test). */
export function describeStep(s: SharedStep, vcpus: number): string {
  const who = `vCPU ${String(s.cpu % Math.max(1, vcpus))}`
  switch (s.op) {
    case 'mmap':
      return `${who} maps ${String(s.pages)} page(s) ${protName(s.prot)}; the others touch them after`
    case 'munmap':
      return `${who} unmaps region ${String(s.region)}; the others touch it before and after`
    case 'mprotect':
      return `${who} mprotects region ${String(s.region)} to ${protName(s.prot)}; the others touch it before and after`
    case 'write':
      return `${who} writes 0x${s.value.toString(16)} to region ${String(s.region)} page ${String(s.page)}`
    case 'read':
    case 'fetch':
    case 'invlpg':
      return `${who} ${s.op === 'invlpg' ? 'INVLPGs' : `${s.op}s`} region ${String(s.region)} page ${String(s.page)}`
    case 'clearYoung':
      return `${who} clears the A bit of region ${String(s.region)} page ${String(s.page)} ${s.flush ? 'and flushes' : 'without a flush'}`
    case 'fork':
      return `${who} forks; the child writes ${String(s.childWrites)} page(s) and exits`
    case 'switch':
      return `${who} switches to its private process, or back to the shared one`
  }
}

/** The case as a TypeScript literal: JSON on one line, or a shared-mm case one commented step per line. */
export function caseLiteral(c: FuzzCase): string {
  if (!isSharedCase(c)) return JSON.stringify(c)
  return [
    '{',
    `    mode: 'shared',`,
    `    vcpus: ${String(c.vcpus)},`,
    `    chaos: ${String(c.chaos)},`,
    '    steps: [',
    ...c.steps.map((s) => `      ${JSON.stringify(s)}, // ${describeStep(s, c.vcpus)}`),
    '    ],',
    '  }',
  ].join('\n')
}

/** The regression test for a failure, ready to paste beside the strategy's code. */
export function regressionTest(spec: string | null, options: unknown, strategyName: string, c: FuzzCase, problem: string): string {
  const specLit = JSON.stringify(spec ?? '<path or name of the strategy>')
  const arg = options === undefined || options === null ? specLit : `[${specLit}, ${JSON.stringify(options)}]`
  const shared = isSharedCase(c)
  return [
    "import { expect, it } from 'vitest'",
    "import { loadStrategy, runFuzzCase } from '@mmusim/harness'",
    '',
    ...(shared ? [`// Found by mmusim fuzz (shared mm: ${String(c.vcpus)} vCPUs run threads of one process, one acts per lockstep step):`] : []),
    `// ${shared ? '' : 'Found by mmusim fuzz: '}${problem.replace(/\n/g, ' ')}`,
    `it('${strategyName}: generated ${shared ? 'shared-mm steps match' : 'program matches'} bare metal', async () => {`,
    `  const strategy = await loadStrategy(${arg}, { from: import.meta.dirname })`,
    `  const r = await runFuzzCase(strategy, ${caseLiteral(c)})`,
    '  expect(r.error).toBeNull()',
    '  expect(r.oracle?.problems).toEqual([])',
    '})',
  ].join('\n')
}

/**
 * Generate guest programs and chaos schedules with fast-check, run each on every strategy with
 * the oracle against bare metal, and shrink any failure to a minimal program.
 */
export async function fuzz(o: FuzzOptions): Promise<FuzzReport> {
  const numRuns = o.numRuns ?? 50
  const seed = o.seed ?? 1
  const mode = o.mode ?? 'mixed'
  const loaded: LoadedStrategy[] = []
  const unavailable: string[] = []
  for (const s of o.strategies) {
    try {
      const l = await loadStrategy(s, { from: o.from })
      if (l.strategy !== null) loaded.push(l)
    } catch (err) {
      if (!isUnavailable(err)) throw err
      unavailable.push(typeof s === 'string' ? s : Array.isArray(s) ? String((s as readonly unknown[])[0]) : 'inline')
      o.log?.(`skipping ${err.message.split('\n')[0]!}`)
    }
  }
  const failures: FuzzFailure[] = []
  for (const s of loaded) {
    o.log?.(`fuzzing ${s.name}: ${String(numRuns)} programs (seed ${String(seed)}, ${mode})`)
    const prop = fc.asyncProperty(caseArb(o.maxCommands ?? 24, mode), async (c) => {
      const r = await runFuzzCase(s, c)
      return r.error === null && (r.oracle?.ok ?? false)
    })
    const details = await fc.check(prop, { numRuns, seed, endOnFailure: false })
    if (details.failed && details.counterexample !== null) {
      const c = details.counterexample[0]
      const r: RunRecord = await runFuzzCase(s, c)
      const problems = r.error !== null ? [r.error] : (r.oracle?.problems ?? [])
      failures.push({
        strategy: s.name,
        spec: s.spec,
        options: s.rawOptions,
        case: c,
        problems,
        seed: details.seed,
        path: details.counterexamplePath,
        regressionTest: regressionTest(s.spec, s.rawOptions, s.name, c, problems[0] ?? 'diverged'),
      })
      o.log?.(`${s.name}: FAILED after ${String(details.numRuns)} programs, shrunk ${String(details.numShrinks)} times`)
    } else {
      o.log?.(`${s.name}: ${String(details.numRuns)} programs, no divergence`)
    }
  }
  return { strategies: loaded.map((l) => l.name), unavailable, numRuns, seed, mode, failures }
}

const MODE_NAMES: Record<FuzzMode, string> = { processes: 'per-process programs', shared: 'shared-mm lockstep steps', mixed: 'per-process programs and shared-mm lockstep steps' }

/** The fuzz report for a terminal. */
export function renderFuzzReport(r: FuzzReport): string {
  const out = [`fuzzed ${r.strategies.join(', ') || '(no strategy available)'} with ${String(r.numRuns)} programs each (seed ${String(r.seed)}, ${MODE_NAMES[r.mode]})`]
  if (r.unavailable.length > 0) out.push(`unavailable: ${r.unavailable.join(', ')}`)
  if (r.failures.length === 0) out.push('no divergence from bare metal')
  for (const f of r.failures) {
    out.push('', `${f.strategy} DIVERGES from bare metal on this minimal program:`, ...f.problems.map((p) => `  ${p}`), `fast-check: seed ${String(f.seed)}, path ${f.path ?? '-'}`, '', 'Regression test (paste beside the strategy):', '', f.regressionTest)
  }
  return out.join('\n')
}
