import path from 'node:path'
import { describe, expect, it } from 'vitest'
import { loadStrategy } from '../loader.ts'
import { runOne } from '../runner.ts'
import { WORKLOADS } from './index.ts'

const fixtures = path.join(import.meta.dirname, '..', '__fixtures__')

/** Small parameters so every workload runs in well under a second. */
const SMALL: Record<string, Record<string, unknown>> = {
  'memslot-perf': { areaBytes: '2M', iterations: 1 },
  'max-guest-memory': { maxMem: '4M' },
  'mmu-stress': { maxMem: '4M' },
  gups: { updates: 2048, b: '2M' },
  'trace-replay': { maxRecords: 5000 },
}

describe('every workload runs on a strategy plugin and matches bare metal', () => {
  for (const w of WORKLOADS) {
    it(`${w.name}: emits its metrics and output lines, oracle ok`, async () => {
      const s = await loadStrategy('./good-strategy.ts', { from: fixtures })
      const r = await runOne({ strategy: s, workload: w, oracle: true, params: SMALL[w.name] ?? {} })
      expect(r.error).toBeNull()
      expect(r.oracle?.problems).toEqual([])
      expect(Object.keys(r.metrics).length).toBeGreaterThan(0)
      expect(r.phases.length).toBeGreaterThan(0)
      expect(r.totals.simNs).toBeGreaterThan(0)
      expect(r.guest.mismatches).toBe(0)
    })
  }

  it('dirty-log-perf prints the selftest lines in order', async () => {
    const s = await loadStrategy('./good-strategy.ts', { from: fixtures })
    const r = await runOne({ strategy: s, workload: WORKLOADS[0]!, params: { b: '256K' } })
    expect(r.lines.map((l) => l.replace(/\d+\.\d{9}s/g, 'T'))).toEqual([
      'Populate memory time: T',
      'Enabling dirty logging time: T',
      'Iteration 1 dirty memory time: T',
      'Iteration 1 get dirty log time: T',
      'Iteration 1 clear dirty log time: T',
      'Iteration 2 dirty memory time: T',
      'Iteration 2 get dirty log time: T',
      'Iteration 2 clear dirty log time: T',
      'Disabling dirty logging time: T',
      'Get dirty log over 2 iterations took T. (Avg T/iteration)',
      'Clear dirty log over 2 iterations took T. (Avg T/iteration)',
    ])
  })
})
