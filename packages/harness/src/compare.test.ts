import { describe, expect, it } from 'vitest'
import { compare } from './compare.ts'
import { loadStrategy } from './loader.ts'
import { renderMarkdown, renderTable, toJson } from './report.ts'
import { runOne } from './runner.ts'
import { getWorkload } from './workloads/index.ts'

async function available(name: string): Promise<boolean> {
  try {
    await loadStrategy(name)
    return true
  } catch {
    return false
  }
}

const haveShadow = await available('shadow')
const haveTdp = await available('tdp')
const haveLegacy = await available('legacy-tdp')
const missing = (names: [string, boolean][]): string => names.filter(([, ok]) => !ok).map(([n]) => n).join(', ')

describe('compare over the built-in strategies (directions of the differences)', () => {
  it.skipIf(!haveShadow || !haveTdp)(`shadow has guest PT-write exits and TDP has none; 2-D walks cost more references than shadow walks${haveShadow && haveTdp ? '' : ` — skipped: ${missing([['shadow', haveShadow], ['tdp', haveTdp]])} not available yet`}`, async () => {
    const r = await compare({ strategies: ['bare-metal', 'shadow', 'tdp'], workloads: ['fork-storm', 'context-switch'], oracle: true })
    expect(r.strategies.every((s) => s.available)).toBe(true)
    for (const w of ['fork-storm', 'context-switch']) {
      const get = (s: string) => r.runs.find((x) => x.workload === w && x.strategy === s)!
      const shadow = get('shadow')
      const tdp = get('tdp')
      const bare = get('bare-metal')
      expect(shadow.oracle?.ok).toBe(true)
      expect(tdp.oracle?.ok).toBe(true)
      expect(shadow.totals.ptWriteExits).toBeGreaterThan(0)
      expect(tdp.totals.ptWriteExits).toBe(0)
      expect(tdp.totals.refsPerWalk).toBeGreaterThan(shadow.totals.refsPerWalk)
      expect(shadow.totals.refsPerWalk).toBeLessThanOrEqual(5)
      expect(tdp.totals.refsPerWalk).toBeGreaterThan(8)
      expect(bare.totals.exits).toBe(0)
      expect(shadow.totals.exits).toBeGreaterThan(tdp.totals.exits)
    }
    const table = renderTable(r)
    expect(table.split('\n')[0]).toMatch(/^workload\s+metric\s+bare-metal\s+shadow\s+tdp$/)
    expect(table).toContain('guest PT-write exits')
    expect(renderMarkdown(r).split('\n')[1]).toBe('| --- | --- | ---: | ---: | ---: |')
  })

  it.skipIf(!haveTdp || !haveLegacy)(`the TDP MMU's populate time stays flat with vCPUs while legacy-tdp's grows${haveTdp && haveLegacy ? '' : ` — skipped: ${missing([['tdp', haveTdp], ['legacy-tdp', haveLegacy]])} not available yet`}`, async () => {
    const populate = async (s: string, vcpus: number): Promise<number> => {
      const r = await runOne({ strategy: await loadStrategy(s), workload: getWorkload('dirty-log-perf'), vcpus, params: { b: '512K' } })
      expect(r.error).toBeNull()
      return r.metrics['Populate memory time']!
    }
    const tdpGrowth = (await populate('tdp', 8)) - (await populate('tdp', 1))
    const legacyGrowth = (await populate('legacy-tdp', 8)) - (await populate('legacy-tdp', 1))
    expect(legacyGrowth).toBeGreaterThan(0)
    expect(tdpGrowth).toBeLessThan(legacyGrowth)
  })
})

describe('compare with unavailable and plugin strategies', () => {
  it('reports a missing strategy as unavailable instead of crashing, and runs the rest with the oracle', async () => {
    const r = await compare({ strategies: ['bare-metal', '@mmusim/not-an-mmu', './src/__fixtures__/good-strategy.ts'], workloads: ['cr0wp-toggle'], from: `${import.meta.dirname}/..` })
    expect(r.strategies.map((s) => [s.spec, s.available])).toEqual([
      ['bare-metal', true],
      ['@mmusim/not-an-mmu', false],
      ['./src/__fixtures__/good-strategy.ts', true],
    ])
    expect(r.runs.map((x) => [x.strategy, x.oracle?.ok ?? 'reference'])).toEqual([
      ['bare-metal', 'reference'],
      ['fixture-good', true],
    ])
    expect(renderTable(r)).toContain('unavailable: @mmusim/not-an-mmu — Cannot find MMU strategy module')
    const doc = JSON.parse(toJson(r)) as { schema: string; summary: { unavailable: string[]; oracleFailures: number } }
    expect(doc.schema).toBe('mmusim-results/1')
    expect(doc.summary).toMatchObject({ unavailable: ['@mmusim/not-an-mmu'], oracleFailures: 0 })
  })

  it('a strategy with a wrong shape is an error, not "unavailable"', async () => {
    await expect(compare({ strategies: ['./src/__fixtures__/wrong-shape.ts'], workloads: ['cr0wp-toggle'], from: `${import.meta.dirname}/..` })).rejects.toMatchObject({ code: 'MMU_PLUGIN_SHAPE' })
  })
})
