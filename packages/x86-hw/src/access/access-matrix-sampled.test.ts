/**
 * Deterministic samples of the access.c matrix for the other configurations (the complete
 * 4-level / MAXPHYADDR 46 run is in access-matrix.test.ts), plus clearly labelled extensions
 * that access.c itself does not run. A sample still enumerates the whole counter in access.c's
 * order but executes only the cases a seeded PRNG keeps; entries evolve from executed case to
 * executed case exactly as in a full run.
 */
import { describe, expect, it } from 'vitest'
import { AC_CPU_SMEP } from './access-flags.ts'
import { AcEnv, type AcEnvOptions, acRunMatrix, type AcRunOptions, acSampler } from './access-harness.ts'

const SEED = Number(process.env.MMUSIM_ACCESS_SEED ?? 0x5eed_ac)

function run(label: string, env: AcEnvOptions, every: number, extra: AcRunOptions = {}): void {
  const e = new AcEnv(env)
  const t0 = performance.now()
  const r = acRunMatrix(e, { select: acSampler(SEED, every), ...extra })
  const ms = performance.now() - t0
  console.log(
    `access ${label}: seed 0x${SEED.toString(16)}, 1/${every} of ${r.legal} legal cases -> ${r.executed} run, ` +
      `${r.failed} mismatches, ${(ms / 1000).toFixed(1)} s`,
  )
  expect(r.failures).toEqual([])
  expect(r.executed).toBeGreaterThan(r.legal / every / 2)
}

describe('access.c matrix, sampled configurations', () => {
  it('5-level paging, MAXPHYADDR 46, PKU (19,169,280 legal; sampled 1/16)', () => {
    run('5-level M=46 PKU', { levels: 5, maxPhyAddr: 46 }, 16)
  }, 120_000)

  it('4-level paging, MAXPHYADDR 36, no PKU: access-reduced-maxphyaddr (2,899,968 legal; sampled 1/4)', () => {
    run('4-level M=36 noPKU', { levels: 4, maxPhyAddr: 36, pku: false }, 4)
  }, 120_000)

  it('5-level paging, MAXPHYADDR 36, PKU (28,999,680 legal; sampled 1/64)', () => {
    run('5-level M=36 PKU', { levels: 5, maxPhyAddr: 36 }, 64)
  }, 120_000)

  it('4-level paging, MAXPHYADDR 52, PKU (9,338,880 legal; sampled 1/16)', () => {
    run('4-level M=52 PKU', { levels: 4, maxPhyAddr: 52 }, 16)
  }, 120_000)
})

describe('extensions beyond access.c', () => {
  it('[extension] SMEP combinations under the pre-2021 rule (SMEP, but no user access), 4-level M=46: 9,584,640, sampled 1/4', () => {
    const env = new AcEnv({ levels: 4, maxPhyAddr: 46 })
    const keep = acSampler(SEED, 4)
    let smepCases = 0
    const t0 = performance.now()
    const r = acRunMatrix(env, {
      smepRule: 'legacy',
      select: (flags, n) => ((flags >>> AC_CPU_SMEP) & 1) !== 0 && (smepCases++, keep(flags, n)),
    })
    const ms = performance.now() - t0
    console.log(
      `access [ext] SMEP 4-level M=46: seed 0x${SEED.toString(16)}, 1/4 of ${smepCases} SMEP cases -> ${r.executed} run, ` +
        `${r.failed} mismatches, ${(ms / 1000).toFixed(1)} s`,
    )
    expect(r.failures).toEqual([])
    // Half of the non-SMEP count: SMEP doubles the space but excludes user accesses.
    expect(smepCases).toBe(19_169_280 / 2)
    expect(r.legal).toBe(19_169_280 + 19_169_280 / 2)
    expect(r.executed).toBeGreaterThan(smepCases / 8)
  }, 300_000)

  it('[self-check] a walker that disagrees is caught: walker at MAXPHYADDR 52, flags of MAXPHYADDR 46', () => {
    const env = new AcEnv({ levels: 4, maxPhyAddr: 52, flagsMaxPhyAddr: 46 })
    const r = acRunMatrix(env, { select: acSampler(SEED, 64) })
    // With M=52, bit 51 is an address bit: cases with pte.51/pde.51 (expected RSVD) now translate.
    expect(r.failed).toBeGreaterThan(0)
    expect(r.failures).toHaveLength(20)
    for (const msg of r.failures) expect(msg).toMatch(/^test .*\b(pte|pde)\.51\b.*: FAIL: /)
  }, 120_000)

  it("[extension] KVM's A-bit policy (non-leaf A only after a successful walk), 4-level M=46, sampled 1/16", () => {
    run('[ext] A-after-success 4-level M=46', { levels: 4, maxPhyAddr: 46, nonLeafAOnDescent: false }, 16)
  }, 120_000)
})
