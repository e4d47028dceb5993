import path from 'node:path'
import { describe, expect, it } from 'vitest'
import { main } from './cli.ts'

const root = path.join(import.meta.dirname, '..')

async function cli(argv: string[], env: NodeJS.ProcessEnv = { CI: 'true' }) {
  const out: string[] = []
  const err: string[] = []
  const code = await main(argv, { out: (s) => out.push(s), err: (s) => err.push(s), errIsTTY: false, cwd: root, env })
  // eslint-disable-next-line no-control-regex
  const strip = (s: string): string => s.replace(/\x1b\[[0-9;]*m/g, '')
  return { code, out: strip(out.join('')), err: strip(err.join('')) }
}

describe('the mmusim CLI', () => {
  it('--help on the root and on every subcommand describes every argument', async () => {
    const top = await cli(['--help'])
    expect(top.code).toBe(0)
    for (const c of ['list', 'run', 'compare', 'fuzz']) expect(top.out).toContain(c)
    const expectations: Record<string, string[]> = {
      list: ['--json'],
      run: ['WORKLOAD', '--strategy', '--options', '--oracle', '--chaos', '--seed', '--vcpus', '--scale', '--levels', '--thp', '--costs', '--config', '--json', '--markdown', '--no-timing'],
      compare: ['--strategies', '--workloads', '--no-oracle', '--seed', '--json', '--markdown'],
      fuzz: ['--strategies', '--runs', '--seed', '--max-commands', '--json'],
    }
    for (const [c, flags] of Object.entries(expectations)) {
      const h = await cli([c, '--help'])
      expect(h.code).toBe(0)
      expect(h.out).toContain(`mmusim ${c}`)
      for (const f of flags) expect(h.out).toContain(f)
    }
  })

  it('list shows strategies with options and workloads with their selftest flags and defaults', async () => {
    const r = await cli(['list'])
    expect(r.code).toBe(0)
    expect(r.out).toContain('bare-metal')
    expect(r.out).toContain('* dirty-log-perf')
    expect(r.out).toContain('--bytes-per-vcpu, -b  size = 2M (selftest: 1G)')
    const j = JSON.parse((await cli(['list', '--json'])).out) as { schema: string; workloads: { name: string }[] }
    expect(j.schema).toBe('mmusim-list/1')
    expect(j.workloads).toHaveLength(16)
  })

  it('run prints the selftest output lines and a table; unknown commands and bad args are errors', async () => {
    const r = await cli(['run', 'dirty-log-perf', '--strategy', './src/__fixtures__/good-strategy.ts', '-b', '256K', '--oracle'])
    expect(r.code).toBe(0)
    expect(r.out).toMatch(/^# dirty-log-perf on fixture-good \(seed 1, 1 vCPU\)/)
    expect(r.out).toMatch(/Populate memory time: \d+\.\d{9}s/)
    expect(r.out).toMatch(/Iteration 2 get dirty log time: \d+\.\d{9}s/)
    expect(r.out).toContain('oracle')
    expect((await cli(['frobnicate'])).err).toContain("unknown command 'frobnicate'")
    const bad = await cli(['run', 'dirty-log-perf', '--strategy', 'bare-metal', '-w', '300'])
    expect(bad.code).toBe(1)
    expect(bad.err).toContain('error WORKLOAD_PARAMS')
    const plugin = await cli(['run', 'gups', '--strategy', './src/__fixtures__/wrong-api.ts'])
    expect(plugin.err).toContain('error MMU_PLUGIN_API_VERSION')
  })

  it('--json is deterministic for a fixed seed (byte-identical with --no-timing) and --markdown prints a table', async () => {
    const argv = ['compare', '--strategies', 'bare-metal,./src/__fixtures__/good-strategy.ts', '--workloads', 'context-switch,cr0wp-toggle', '--seed', '5', '--json', '--no-timing']
    const a = await cli(argv)
    const b = await cli(argv)
    expect(a.code).toBe(0)
    expect(a.out).toBe(b.out)
    const doc = JSON.parse(a.out) as { schema: string; seeds: number[]; runs: { seed: number; wallMs?: number; strategy: string; totals: { simNs: number } }[] }
    expect(doc.schema).toBe('mmusim-results/1')
    expect(doc.seeds).toEqual([5])
    expect(doc.runs.map((r) => r.strategy)).toEqual(['bare-metal', 'fixture-good', 'bare-metal', 'fixture-good'])
    expect(doc.runs.every((r) => r.wallMs === undefined && r.seed === 5)).toBe(true)
    // Progress goes to stderr as plain lines when not on a TTY (CI=true).
    expect(a.err).toContain('[2/4] fixture-good · context-switch: oracle ok')
    const md = await cli(['compare', '--strategies', 'bare-metal', '--workloads', 'cr0wp-toggle', '--markdown'])
    expect(md.out.split('\n')[0]).toBe('| workload | metric | bare-metal |')
  })
})
