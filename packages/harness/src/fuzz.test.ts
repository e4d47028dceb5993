import path from 'node:path'
import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import { caseArb, caseLiteral, caseSize, fuzz, runFuzzCase } from './fuzz.ts'
import { loadStrategy } from './loader.ts'

const fixtures = path.join(import.meta.dirname, '__fixtures__')

describe('mmusim fuzz', () => {
  it('generated programs run identically on a correct strategy and on bare metal', async () => {
    const s = await loadStrategy('./good-strategy.ts', { from: fixtures })
    const cases = fc.sample(caseArb(12), { numRuns: 4, seed: 7 })
    for (const c of cases) {
      const r = await runFuzzCase(s, c)
      expect(r.error).toBeNull()
      expect(r.oracle?.problems).toEqual([])
    }
  })

  it('finds the broken strategy within a bounded budget and shrinks it to a small program printed as a regression test', async () => {
    const report = await fuzz({ strategies: [['./broken-strategy.ts', { wrongPageAfter: 20 }], 'no-such-builtin-or-package'], from: fixtures, numRuns: 40, seed: 3, maxCommands: 24 })
    expect(report.unavailable).toEqual(['no-such-builtin-or-package'])
    expect(report.failures).toHaveLength(1)
    const f = report.failures[0]!
    expect(f.strategy).toBe('broken-wrong-page')
    expect(caseSize(f.case)).toBeLessThanOrEqual(6)
    expect(f.regressionTest).toContain("import { loadStrategy, runFuzzCase } from '@mmusim/harness'")
    expect(f.regressionTest).toContain('const strategy = await loadStrategy(["./broken-strategy.ts", {"wrongPageAfter":20}], { from: import.meta.dirname })')
    expect(f.regressionTest).toContain(`runFuzzCase(strategy, ${caseLiteral(f.case)})`)
    // The printed case reproduces the failure.
    const again = await runFuzzCase(await loadStrategy(['./broken-strategy.ts', { wrongPageAfter: 20 }], { from: fixtures }), f.case)
    expect(again.oracle?.ok).toBe(false)
  }, 120_000)
})
