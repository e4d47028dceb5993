import { readFileSync } from 'node:fs'
import { type ArgsDef, type CommandDef, defineCommand, renderUsage, runCommand } from 'citty'
import { compare, type CompareResult } from './compare.ts'
import { type ExperimentConfig, findConfig, loadConfig } from './config.ts'
import { HarnessError } from './errors.ts'
import { fuzz, renderFuzzReport } from './fuzz.ts'
import { BARE_METAL, BUILTIN_STRATEGIES, describeOptions, loadStrategy } from './loader.ts'
import { formatSize, kebab } from './params.ts'
import { isInteractive, progressReporter } from './progress.ts'
import { compareOk, renderMarkdown, renderTable, toJson } from './report.ts'
import { DEFAULT_SUITE, getWorkload, WORKLOADS } from './workloads/index.ts'
import type { Workload } from './workload.ts'

/** Where the CLI writes (tests pass buffers). */
export interface CliIo {
  readonly out: (s: string) => void
  readonly err: (s: string) => void
  readonly errIsTTY: boolean
  readonly cwd: string
  readonly env: NodeJS.ProcessEnv
}

const VERSION = (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version

const outputArgs = {
  json: { type: 'boolean', description: 'print JSON (schema mmusim-results/1, see the README) instead of a table' },
  markdown: { type: 'boolean', description: 'print a Markdown table' },
  timing: { type: 'boolean', default: true, description: 'include wall-clock times (--no-timing for byte-identical output)', negativeDescription: 'omit wall-clock times so output is byte-identical across runs' },
} satisfies ArgsDef

const machineArgs = {
  seed: { type: 'string', description: 'guest random seed (-r in the selftests; default 1)' },
  vcpus: { type: 'string', description: 'vCPU count for workloads that take one' },
  scale: { type: 'enum', options: ['small', 'selftest'], description: "parameter defaults: 'small' (default suite ≈ 1 min) or the selftests' own (-b 1G ...)" },
  levels: { type: 'enum', options: ['4', '5'], description: 'guest paging levels (5 = LA57)' },
  thp: { type: 'boolean', description: 'back guest memory with THP on the host' },
  costs: { type: 'string', description: 'cost-model overrides as JSON, e.g. \'{"vmExitRoundTrip":1500}\'' },
  config: { type: 'string', description: 'experiment config file (default: ./mmusim.config.ts if present)' },
} satisfies ArgsDef

function int(v: unknown, name: string): number | undefined {
  if (v === undefined || v === '') return undefined
  const n = typeof v === 'string' || typeof v === 'number' ? Number(v) : NaN
  if (!Number.isInteger(n)) throw new HarnessError('CLI_ARGS', `--${name} must be an integer; got '${typeof v === 'string' ? v : typeof v}'`)
  return n
}

function json(v: unknown, name: string): unknown {
  if (typeof v !== 'string') return undefined
  try {
    return JSON.parse(v) as unknown
  } catch {
    throw new HarnessError('CLI_ARGS', `--${name} must be JSON, e.g. '{"unsync":false}'; got '${v}'`)
  }
}

/**
 * Workload parameters from the raw command line: `--bytes-per-vcpu 4M`, `--bytesPerVcpu=4M`, or the
 * selftest's flag (`-b 4M`). A boolean parameter may stand alone (`-o`, `--overlap`).
 */
export function workloadArgs(w: Workload, rawArgs: readonly string[]): Record<string, string> {
  const out: Record<string, string> = {}
  for (let i = 0; i < rawArgs.length; i++) {
    const a = rawArgs[i]!
    const m = /^(--?)([A-Za-z][\w-]*)(?:=(.*))?$/.exec(a)
    if (m === null) continue
    const key = m[2]!
    const d = w.params.find((p) => (m[1] === '-' ? p.flag === key : p.name === key || kebab(p.name) === key))
    if (d === undefined) continue
    if (m[3] !== undefined) out[d.name] = m[3]
    else {
      const next = rawArgs[i + 1]
      if (d.type === 'bool' && (next === undefined || (next.startsWith('-') && !/^-\d/.test(next)) || !/^(true|false|on|off|0|1)$/.test(next))) out[d.name] = 'true'
      else if (next !== undefined) {
        out[d.name] = next
        i++
      }
    }
  }
  return out
}

async function experiment(args: Record<string, unknown>, io: CliIo): Promise<{ config: ExperimentConfig; from: string }> {
  const file = typeof args.config === 'string' ? args.config : findConfig(io.cwd)
  const loaded = file === null ? null : await loadConfig(file)
  const base: ExperimentConfig = loaded?.config ?? {}
  const costs = json(args.costs, 'costs') as ExperimentConfig['costs']
  return {
    from: loaded?.dir ?? io.cwd,
    config: {
      ...base,
      ...(args.seed !== undefined ? { seeds: [int(args.seed, 'seed')!] } : {}),
      ...(args.vcpus !== undefined ? { vcpus: int(args.vcpus, 'vcpus') } : {}),
      ...(args.scale !== undefined ? { scale: args.scale as 'small' | 'selftest' } : {}),
      ...(args.levels !== undefined ? { levels: Number(args.levels) as 4 | 5 } : {}),
      ...(args.thp === true ? { thp: true } : {}),
      ...(costs !== undefined ? { costs } : {}),
    },
  }
}

function emit(result: CompareResult, args: Record<string, unknown>, io: CliIo): void {
  if (args.json === true) io.out(`${toJson(result, { timing: args.timing !== false })}\n`)
  else if (args.markdown === true) io.out(`${renderMarkdown(result)}\n`)
  else io.out(`${renderTable(result)}\n`)
}

/** Build the `mmusim` command tree writing to `io`; `setExit` receives the exit code. */
export function createCli(io: CliIo, setExit: (code: number) => void): CommandDef {
  const list = defineCommand({
    meta: { name: 'list', description: 'List the strategies (with their options) and the workloads (with their parameters, selftest flags and defaults)' },
    args: { json: outputArgs.json },
    async run({ args }) {
      const strategies = []
      for (const name of [BARE_METAL, ...Object.keys(BUILTIN_STRATEGIES)]) {
        try {
          const l = await loadStrategy(name, { from: io.cwd })
          strategies.push({ name, available: true, description: l.strategy?.description ?? 'the bare-metal reference (no hypervisor)', options: l.strategy === null ? [] : describeOptions(l.strategy), reason: null })
        } catch (err) {
          strategies.push({ name, available: false, description: BUILTIN_STRATEGIES[name]?.description ?? '', options: [], reason: err instanceof Error ? err.message.split('\n')[0]! : String(err) })
        }
      }
      const workloads = WORKLOADS.map((w) => ({ name: w.name, mirrors: w.mirrors, description: w.description, metrics: w.metrics, params: w.params, inDefaultSuite: DEFAULT_SUITE.includes(w.name) }))
      if (args.json === true) {
        io.out(`${JSON.stringify({ schema: 'mmusim-list/1', strategies, workloads }, null, 2)}\n`)
        return
      }
      const lines = ['Strategies (name, or a package / path to a module; options with --options JSON):']
      for (const s of strategies) {
        lines.push(`  ${s.name.padEnd(12)} ${s.available ? s.description : `(unavailable: ${s.reason ?? ''})`}`)
        for (const o of s.options) lines.push(`  ${''.padEnd(12)}   ${o.name}: ${o.type}${o.default === undefined ? '' : ` = ${JSON.stringify(o.default)}`}${o.description === undefined ? '' : ` — ${o.description}`}`)
      }
      lines.push('', 'Workloads (* = in the default suite of `mmusim compare`):')
      for (const w of WORKLOADS) {
        lines.push(`  ${DEFAULT_SUITE.includes(w.name) ? '*' : ' '} ${w.name.padEnd(28)} ${w.description}`, `      mirrors ${w.mirrors}; metrics: ${w.metrics.join(', ')}`)
        for (const d of w.params) {
          const def = d.type === 'size' ? formatSize(d.default as number) : String(d.default)
          const sd = d.selftestDefault === undefined ? '' : ` (selftest: ${d.type === 'size' ? formatSize(d.selftestDefault as number) : String(d.selftestDefault)})`
          lines.push(`      --${kebab(d.name)}${d.flag === undefined ? '' : `, -${d.flag}`}  ${d.type}${d.choices === undefined ? '' : ` ${d.choices.join('|')}`} = ${def}${sd}  ${d.description}`)
        }
      }
      io.out(`${lines.join('\n')}\n`)
    },
  })

  const run = defineCommand({
    meta: { name: 'run', description: 'Run one workload on one strategy and print its phases, metrics (selftest output lines) and counters. Workload parameters: see `mmusim list` (e.g. -b 64M -v 2 or --bytes-per-vcpu 64M)' },
    args: {
      workload: { type: 'positional', required: true, description: 'workload name (see `mmusim list`)' },
      strategy: { type: 'string', default: 'tdp', description: 'strategy: bare-metal, shadow, legacy-tdp, tdp, a package name (pkg#name) or a path to a module' },
      options: { type: 'string', description: 'strategy options as JSON, e.g. \'{"unsync":false}\'' },
      oracle: { type: 'boolean', description: 'check the run against the bare-metal reference' },
      chaos: { type: 'string', description: 'PCT chaos-scheduling seed for the VM threads' },
      ...machineArgs,
      ...outputArgs,
    },
    async run({ args, rawArgs }) {
      const w = getWorkload(args.workload)
      const { config, from } = await experiment(args, io)
      const strategy = await loadStrategy(args.options === undefined ? args.strategy : [args.strategy, json(args.options, 'options')], { from })
      const { runOne } = await import('./runner.ts')
      const r = await runOne({
        strategy,
        workload: w,
        params: workloadArgs(w, rawArgs),
        scale: config.scale,
        seed: config.seeds?.[0] ?? 1,
        vcpus: config.vcpus,
        machine: { levels: config.levels, thp: config.thp, memBytes: config.memBytes, costs: config.costs },
        oracle: args.oracle === true,
        chaosSeed: int(args.chaos, 'chaos'),
        onPhase: isInteractive({ isTTY: io.errIsTTY }, io.env) ? (p) => { io.err(`\r\x1b[2K${w.name} · ${p}`); } : undefined,
      })
      if (isInteractive({ isTTY: io.errIsTTY }, io.env)) io.err('\r\x1b[2K')
      const result: CompareResult = { strategies: [{ spec: args.strategy, name: r.strategy, available: true, reason: null, capabilities: strategy.strategy === null ? null : { ...strategy.strategy.capabilities } }], workloads: [w.name], seeds: [r.seed], runs: [r] }
      if (args.json === true || args.markdown === true) emit(result, args, io)
      else {
        const out = [`# ${w.name} on ${r.strategy} (seed ${String(r.seed)}, ${String(r.vcpus)} vCPU${r.vcpus === 1 ? '' : 's'})`, ...r.lines, '']
        out.push(renderTable(result))
        io.out(`${out.join('\n')}\n`)
      }
      if (r.error !== null || (r.oracle !== null && !r.oracle.ok)) {
        io.err(`${r.error ?? r.oracle!.problems.join('\n')}\nreplay: ${r.replay}\n`)
        setExit(1)
      }
    },
  })

  const cmp = defineCommand({
    meta: { name: 'compare', description: 'Run several strategies side by side on a suite of workloads, oracle on, and print one comparison table (the main job)' },
    args: {
      strategies: { type: 'string', description: `comma-separated strategies (default: ${['bare-metal', 'shadow', 'legacy-tdp', 'tdp'].join(',')}); unavailable built-ins are reported, not fatal` },
      workloads: { type: 'string', description: `comma-separated workloads (default suite: ${DEFAULT_SUITE.join(',')})` },
      oracle: { type: 'boolean', default: true, description: 'check every run against bare metal (--no-oracle to skip)', negativeDescription: 'skip the differential check' },
      ...machineArgs,
      ...outputArgs,
    },
    async run({ args }) {
      const { config, from } = await experiment(args, io)
      const result = await compare({
        ...config,
        ...(typeof args.strategies === 'string' ? { strategies: args.strategies.split(',').map((s) => s.trim()).filter((s) => s !== '') } : {}),
        ...(typeof args.workloads === 'string' ? { workloads: args.workloads.split(',').map((s) => s.trim()).filter((s) => s !== '') } : {}),
        oracle: args.oracle && config.oracle !== false,
        from,
        onProgress: progressReporter({ write: io.err, isTTY: isInteractive({ isTTY: io.errIsTTY }, io.env) }),
      })
      emit(result, args, io)
      if (!compareOk(result)) setExit(1)
    },
  })

  const fz = defineCommand({
    meta: { name: 'fuzz', description: 'Generate guest programs (map, unmap, mprotect, fork/CoW, CR3 switches, INVLPG, A-bit clearing, accesses; per-process programs on 1–2 vCPUs, and lockstep steps of 2–4 vCPUs sharing one mm, with TLB shootdowns) and chaos schedules with fast-check, run them on every strategy against bare metal, shrink a failure to a minimal program and print it as a regression test' },
    args: {
      strategies: { type: 'string', description: 'comma-separated strategies to fuzz (default: the available built-ins)' },
      runs: { type: 'string', default: '50', description: 'programs to generate' },
      seed: { type: 'string', default: '1', description: 'fast-check seed (the same seed generates the same programs)' },
      'max-commands': { type: 'string', default: '24', description: 'longest program, in commands (shared mode: most lockstep steps)' },
      mode: { type: 'string', default: 'mixed', description: "which cases: 'processes' (each vCPU its own process), 'shared' (threads of one mm, one vCPU acts per lockstep step, the others touch before and after: remote TLB shootdowns) or 'mixed' (both)" },
      json: outputArgs.json,
    },
    async run({ args }) {
      const specs = typeof args.strategies === 'string' ? args.strategies.split(',').map((s) => s.trim()) : Object.keys(BUILTIN_STRATEGIES)
      const mode = args.mode
      if (mode !== 'processes' && mode !== 'shared' && mode !== 'mixed') throw new HarnessError('CLI_ARGS', `--mode: expected 'processes', 'shared' or 'mixed', got '${mode}'`)
      const report = await fuzz({ strategies: specs, from: io.cwd, numRuns: int(args.runs, 'runs') ?? 50, seed: int(args.seed, 'seed') ?? 1, maxCommands: int(args['max-commands'], 'max-commands') ?? 24, mode, log: (s) => { io.err(`${s}\n`); } })
      io.out(args.json === true ? `${JSON.stringify(report, null, 2)}\n` : `${renderFuzzReport(report)}\n`)
      if (report.failures.length > 0) setExit(1)
    },
  })

  return defineCommand({
    meta: { name: 'mmusim', version: VERSION, description: 'Run guest workloads on KVM MMU strategies (shadow, legacy-tdp, tdp, plugins), compare their costs and check them against bare metal' },
    subCommands: { list, run, compare: cmp, fuzz: fz },
  })
}

/** Run the CLI with `argv` (without node and script); resolves to the exit code. */
export async function main(argv: readonly string[], io: CliIo): Promise<number> {
  let code = 0
  const cli = createCli(io, (c) => {
    code = c
  })
  const subs = (cli.subCommands ?? {}) as Record<string, CommandDef>
  const name = argv.find((a) => !a.startsWith('-'))
  const sub = name === undefined ? undefined : subs[name]
  if (argv.includes('--help') || argv.includes('-h') || argv.length === 0) {
    io.out(`${await renderUsage(sub ?? cli, sub === undefined ? undefined : cli)}\n`)
    return 0
  }
  if (argv.length === 1 && (argv[0] === '--version' || argv[0] === '-V')) {
    io.out(`${VERSION}\n`)
    return 0
  }
  if (name !== undefined && sub === undefined) {
    io.err(`${await renderUsage(cli)}\nerror: unknown command '${name}'; expected one of: ${Object.keys(subs).join(', ')}\n`)
    return 1
  }
  try {
    await runCommand(cli, { rawArgs: [...argv] })
  } catch (err) {
    const cliError = err instanceof Error && err.name === 'CLIError'
    if (cliError && sub !== undefined) io.err(`${await renderUsage(sub, cli)}\n`)
    io.err(`${err instanceof HarnessError ? `error ${err.code}: ` : 'error: '}${err instanceof Error ? err.message : String(err)}\n`)
    return 1
  }
  return code
}
