import path from 'node:path'
import { describe, expect, it } from 'vitest'
import { main } from './cli.ts'
import { loadStrategy } from './loader.ts'
import { runOne } from './runner.ts'
import { getWorkload } from './workloads/index.ts'

const fixtures = path.join(import.meta.dirname, '__fixtures__')

function io() {
  const out: string[] = []
  const err: string[] = []
  return { out, err, io: { out: (s: string) => out.push(s), err: (s: string) => err.push(s), errIsTTY: false, cwd: fixtures, env: { CI: 'true' } } }
}

describe('the differential oracle', () => {
  it('passes a correct strategy (the kvm direct-map example as a plugin) access by access', async () => {
    const s = await loadStrategy('./good-strategy.ts', { from: fixtures })
    const r = await runOne({ strategy: s, workload: getWorkload('fork-storm'), oracle: true })
    expect(r.error).toBeNull()
    expect(r.oracle).toMatchObject({ ok: true, mode: 'trace', divergence: null, problems: [] })
  })

  it('catches a strategy that maps a wrong page, reports the first differing access and a replay command that reproduces it', async () => {
    const s = await loadStrategy('./broken-strategy.ts', { from: fixtures })
    const r = await runOne({ strategy: s, workload: getWorkload('fork-storm'), oracle: true, params: { pages: 24 } })
    expect(r.oracle?.ok).toBe(false)
    const d = r.oracle!.divergence!
    expect(d.vcpu).toBe(0)
    expect(d.index).toBeGreaterThanOrEqual(0)
    expect(d.expected).not.toBe(d.got)
    expect(r.oracle!.problems[0]).toBe(`first differing access: vCPU 0, access #${String(d.index)}: expected ${d.expected}, got ${d.got}`)
    expect(r.replay).toBe('pnpm mmusim run fork-storm --strategy ./broken-strategy.ts --seed 1 --pages 24 --oracle')

    // The replay command, run through the CLI, reproduces exactly that divergence.
    const argv = r.replay.split(' ').slice(2)
    const t = io()
    expect(await main(argv, t.io)).toBe(1)
    expect(t.err.join('')).toContain(r.oracle!.problems[0])
    expect(t.err.join('')).toContain(`replay: ${r.replay}`)
  })

  it('checks racy multi-vCPU workloads by the guest’s own checks and counts only', async () => {
    const s = await loadStrategy('./good-strategy.ts', { from: fixtures })
    const r = await runOne({ strategy: s, workload: getWorkload('mprotect-storm'), oracle: true })
    expect(r.oracle).toMatchObject({ ok: true, mode: 'counts' })
  })
})
