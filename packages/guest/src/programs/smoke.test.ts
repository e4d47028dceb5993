import { describe, expect, it } from 'vitest'
import { runGuest } from '../run.js'
import { memstress } from './memstress.js'

describe('smoke', () => {
  it('memstress 1 vCPU', () => {
    const t0 = performance.now()
    const r = runGuest((cpu) => memstress(cpu, { bytesPerVcpu: 64 * 4096, iterations: 2 }), { vcpus: 1 })
    console.log(performance.now() - t0, r.accesses, r.pageFaults, r.mismatches, r.stats, r.perCpu)
    expect(r.mismatches).toBe(0)
  })
  it('memstress 4 vCPU', () => {
    const t0 = performance.now()
    const r = runGuest((cpu) => memstress(cpu, { bytesPerVcpu: 64 * 4096, iterations: 2, writePercent: 50, randomAccess: true }), { vcpus: 4 })
    console.log(performance.now() - t0, r.accesses, r.pageFaults, r.mismatches, r.stats, r.perCpu)
    expect(r.mismatches).toBe(0)
  })
})
