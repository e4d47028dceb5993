import { describe, expect, it } from 'vitest'
import { workloadArgs } from './cli.ts'
import { formatSize, paramsToFlags, parseSize, resolveParams } from './params.ts'
import { dirtyLogPerf, getWorkload, WORKLOADS } from './workloads/index.ts'

describe('workload parameters', () => {
  it('parses sizes like the selftests take them', () => {
    expect(parseSize('64M')).toBe(64 * 2 ** 20)
    expect(parseSize('1G')).toBe(2 ** 30)
    expect(parseSize('2MiB')).toBe(2 * 2 ** 20)
    expect(parseSize('4096')).toBe(4096)
    expect(parseSize('lots')).toBeNull()
    expect(formatSize(2 ** 30)).toBe('1G')
  })

  it('small defaults, selftest defaults by scale, overrides by name, kebab name or flag', () => {
    expect(resolveParams(dirtyLogPerf)).toMatchObject({ vcpus: 1, bytesPerVcpu: 2 * 2 ** 20, iterations: 2, writePercent: 100 })
    expect(resolveParams(dirtyLogPerf, {}, 'selftest').bytesPerVcpu).toBe(2 ** 30)
    expect(resolveParams(dirtyLogPerf, { b: '4M', 'write-percent': '50', v: 2, a: 'on' })).toMatchObject({ bytesPerVcpu: 4 * 2 ** 20, writePercent: 50, vcpus: 2, randomAccess: true })
  })

  it('rejects unknown parameters and bad values, naming the parameter and what was expected', () => {
    expect(() => resolveParams(dirtyLogPerf, { q: 1 })).toThrow(/workload 'dirty-log-perf' has no parameter 'q'; it takes: vcpus \(-v\), bytes-per-vcpu \(-b\)/)
    expect(() => resolveParams(dirtyLogPerf, { w: 150 })).toThrow(/expected number to be <=100[\s\S]*at writePercent/)
    expect(() => resolveParams(dirtyLogPerf, { b: '5000' })).toThrow(/multiple of 4 KiB/)
    expect(() => resolveParams(dirtyLogPerf, { backing: 'pmem' })).toThrow(/backing/)
  })

  it('reads workload flags from the raw command line, and prints them back for replay', () => {
    const raw = ['dirty-log-perf', '--strategy', 'tdp', '-b', '4M', '--iterations=3', '-o', '--write-percent', '50']
    const args = workloadArgs(dirtyLogPerf, raw)
    expect(args).toEqual({ bytesPerVcpu: '4M', iterations: '3', overlap: 'true', writePercent: '50' })
    const p = resolveParams(dirtyLogPerf, args)
    expect(paramsToFlags(dirtyLogPerf, p)).toEqual(['--bytes-per-vcpu', '4M', '--iterations', '3', '--write-percent', '50', '--overlap', 'true'])
  })

  it('every workload has documented parameters and metrics; the selftest family keeps the selftest flags', () => {
    expect(WORKLOADS.map((w) => w.name)).toEqual([
      'dirty-log-perf', 'demand-paging', 'access-tracking', 'memslot-perf', 'memslot-modification-stress', 'max-guest-memory', 'mmu-stress', 'page-table', 'nx-huge-pages', 'page-splitting',
      'fork-storm', 'context-switch', 'mprotect-storm', 'gups', 'cr0wp-toggle', 'trace-replay',
    ])
    for (const w of WORKLOADS) {
      expect(w.metrics.length).toBeGreaterThan(0)
      for (const d of w.params) expect(d.description.length).toBeGreaterThan(0)
      expect(() => resolveParams(w)).not.toThrow()
    }
    expect(getWorkload('demand-paging').params.map((d) => d.flag)).toEqual(['v', 'b', 'u', 'd', 'o', 's'])
    expect(() => getWorkload('nope')).toThrow(/unknown workload 'nope'; expected one of: dirty-log-perf/)
  })
})
