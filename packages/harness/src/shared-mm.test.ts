import path from 'node:path'
import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import { caseArb, caseLiteral, fuzz, isSharedCase, runFuzzCase } from './fuzz.ts'
import { isUnavailable, loadStrategy } from './loader.ts'
import type { SharedFuzzCase } from './shared-mm.ts'

const fixtures = path.join(import.meta.dirname, '__fixtures__')
const BROKEN = './lost-remote-flush-strategy.ts'
/** The bounded budget of these tests: programs per strategy, longest case, fast-check seed. */
const BUDGET = { numRuns: 40, maxCommands: 24, seed: 1 } as const

describe('mmusim fuzz: threads of one mm (multi-vCPU TLB shootdowns)', () => {
  it('is part of the default generator mix', () => {
    const cases = fc.sample(caseArb(12), { numRuns: 40, seed: 2 })
    expect(cases.some(isSharedCase)).toBe(true)
    expect(cases.some((c) => !isSharedCase(c))).toBe(true)
    for (const c of cases.filter(isSharedCase)) {
      expect(c.vcpus).toBeGreaterThanOrEqual(2)
      expect(c.steps.length).toBeGreaterThanOrEqual(1)
    }
  })

  it('runs a hand-written case identically on bare metal and a correct strategy, with real shootdowns', async () => {
    const c: SharedFuzzCase = {
      mode: 'shared',
      vcpus: 3,
      chaos: 7,
      steps: [
        { cpu: 0, op: 'mmap', pages: 4, prot: 3 },
        { cpu: 1, op: 'write', region: 0, page: 1, value: 0x1234 },
        { cpu: 2, op: 'mprotect', region: 0, prot: 1 }, // reduce permissions: the others' writes must now fault
        { cpu: 0, op: 'switch' },
        { cpu: 1, op: 'munmap', region: 0 }, // vCPU 0 is away: not shot down, flushes when it returns
        { cpu: 0, op: 'read', region: 0, page: 1 },
      ],
    }
    const r = await runFuzzCase(await loadStrategy('./good-strategy.ts', { from: fixtures }), c)
    expect(r.error).toBeNull()
    expect(r.oracle).toMatchObject({ ok: true, mode: 'trace', problems: [] })
    // The others' touch-after writes to the read-only and then unmapped region, and vCPU 0's read, all SIGSEGV.
    expect(r.oracle?.sigsegv.expected).toBeGreaterThan(0)
    expect(r.oracle?.sigsegv.got).toBe(r.oracle?.sigsegv.expected)
    expect(r.totals.exits).toBeGreaterThan(0)
  })

  it('finds a strategy that loses remote TLB flushes within a bounded budget, deterministically, and prints a regression test that reproduces it', async () => {
    const run = () => fuzz({ strategies: [BROKEN], from: fixtures, mode: 'shared', ...BUDGET })
    const report = await run()
    expect(report.failures).toHaveLength(1)
    const f = report.failures[0]!
    expect(f.strategy).toBe('broken-lost-remote-flush')
    expect(isSharedCase(f.case)).toBe(true)
    const c = f.case as SharedFuzzCase
    expect(c.steps.length).toBeLessThanOrEqual(4)
    expect(f.problems.length).toBeGreaterThan(0)
    // The printer: a ready-to-paste test with the case as a commented literal, one step per line.
    expect(f.regressionTest).toContain("import { loadStrategy, runFuzzCase } from '@mmusim/harness'")
    expect(f.regressionTest).toContain(`const strategy = await loadStrategy(${JSON.stringify(BROKEN)}, { from: import.meta.dirname })`)
    expect(f.regressionTest).toContain(`runFuzzCase(strategy, ${caseLiteral(c)})`)
    expect(f.regressionTest).toContain("mode: 'shared',")
    for (const s of c.steps) expect(f.regressionTest).toContain(`      ${JSON.stringify(s)}, // vCPU ${String(s.cpu % c.vcpus)} `)
    const stepLines = caseLiteral(c).split('\n').filter((l) => l.includes(' // vCPU '))
    expect(stepLines.map((l) => JSON.parse(l.trim().replace(/, \/\/ .*$/, '')) as unknown)).toEqual(c.steps)
    expect(caseLiteral(c)).toContain(`vcpus: ${String(c.vcpus)},\n    chaos: ${String(c.chaos)},`)
    // The printed case reproduces the failure; the same seed finds the same minimal case.
    const again = await runFuzzCase(await loadStrategy(BROKEN, { from: fixtures }), c)
    expect(again.oracle?.ok).toBe(false)
    expect((await run()).failures.map((x) => x.case)).toEqual([c])
  }, 60_000)

  it('the old per-process mode does not find that bug with the same budget, and the fixed strategy passes the shared mode', async () => {
    // Each vCPU in its own process never has a translation changed by another vCPU: remote flushes never matter.
    const perProcess = await fuzz({ strategies: [BROKEN], from: fixtures, mode: 'processes', ...BUDGET })
    expect(perProcess.failures).toEqual([])
    const fixed = await fuzz({ strategies: [[BROKEN, { loseRemoteFlushes: false }]], from: fixtures, mode: 'shared', ...BUDGET })
    expect(fixed.failures).toEqual([])
  }, 60_000)

  for (const builtin of ['shadow', 'legacy-tdp', 'tdp']) {
    it(`the built-in ${builtin} strategy passes a bounded number of shared-mm cases`, async (ctx) => {
      try {
        await loadStrategy(builtin)
      } catch (err) {
        if (!isUnavailable(err)) throw err
        ctx.skip(`${builtin} is unavailable: ${err.message.split('\n')[0]!}`)
      }
      const report = await fuzz({ strategies: [builtin], mode: 'shared', numRuns: 15, maxCommands: 16, seed: 11 })
      expect(report.failures.map((f) => f.regressionTest)).toEqual([])
    }, 60_000)
  }
})
