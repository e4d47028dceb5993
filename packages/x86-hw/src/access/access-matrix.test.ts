/**
 * The kvm-unit-tests `x86/access.c` permission matrix, complete, for one configuration:
 * 4-level paging, MAXPHYADDR 46, PKU and SMEP present, no forced emulation — the
 * 19,169,280 cases access.c runs on such a CPU. Every case is set up on top of what the previous
 * one left, in access.c's counter order, walked by `walk()`, and checked against the independent
 * oracle (access-oracle.ts) exactly as access.c checks hardware: fault or not, the exact error
 * code, the whole 4 KiB PTE, and the PDE (A ignored after a fault when pde.a was clear).
 *
 * One `it` loops over all cases (a per-case `it` would cost more than the cases) and reports the
 * first 20 mismatches with access.c's flag names.
 */
import { describe, expect, it } from 'vitest'
import {
  AC_CPU_NXE,
  AC_CPU_SMEP,
  AC_FEP,
  AC_PDE_BIT13,
  AC_PDE_BIT36,
  AC_PDE_BIT51,
  AC_PDE_NX,
  AC_PDE_PSE,
  AC_PTE_BIT36,
  AC_PTE_BIT51,
  AC_PTE_NX,
  acCountCases,
  acInvalidMask,
  acLegal,
  acMask,
  acNext,
} from './access-flags.ts'
import { AcEnv, acRunMatrix } from './access-harness.ts'

/**
 * An independent count of access.c's legal cases: the 15 unconstrained flags (PTE W/U/A/D/P,
 * PDE W/U/A/D/P, PDPTE ro, pkey, user, twice, WP) times 3 access kinds (read/write/fetch; never
 * write+fetch) times the PKE/AD/WD combinations (PKE=0 forbids AD/WD: 1 + 4 = 5, or 1 without PKU)
 * times the legal combinations of NXE, PSE and the reserved-bit flags (counted by brute force).
 */
function closedFormCount(maxPhyAddr: number, pku: boolean): number {
  const rsvdBits = [AC_PDE_BIT13]
  if (maxPhyAddr < 52) rsvdBits.push(AC_PDE_BIT51, AC_PTE_BIT51)
  if (maxPhyAddr < 37) rsvdBits.push(AC_PDE_BIT36, AC_PTE_BIT36)
  let rsvdCombos = 0
  for (let nxe = 0; nxe < 2; nxe++) {
    for (let pse = 0; pse < 2; pse++) {
      for (let nx = 0; nx < 4; nx++) {
        for (let r = 0; r < 1 << rsvdBits.length; r++) {
          const bits: number[] = rsvdBits.filter((_, i) => ((r >> i) & 1) !== 0)
          if (pse === 0 && bits.includes(AC_PDE_BIT13)) continue
          const nReserved = bits.length + (nxe === 0 ? (nx & 1) + (nx >> 1) : 0)
          if (nReserved > 1) continue
          rsvdCombos++
        }
      }
    }
  }
  const freeFlags = pku ? 15 : 14 // without PKU the pkey flag is invalid too
  return 2 ** freeFlags * 3 * (pku ? 5 : 1) * rsvdCombos
}

describe('access.c flag space', () => {
  it('legality rules mirror ac_test_legal', () => {
    expect(acLegal(0)).toBe(true)
    // Current access.c: every SMEP combination is skipped.
    expect(acLegal(acMask(AC_CPU_SMEP))).toBe(false)
    expect(acLegal(acMask(AC_CPU_SMEP), 'legacy')).toBe(true)
    expect(acLegal(acMask(AC_CPU_SMEP) | acMask(22), 'legacy')).toBe(false) // user + SMEP
    expect(acLegal(acMask(23) | acMask(24))).toBe(false) // write + fetch
    expect(acLegal(acMask(19))).toBe(false) // PKRU.AD without CR4.PKE
    expect(acLegal(acMask(19) | acMask(29))).toBe(true)
    expect(acLegal(acMask(AC_PDE_BIT13))).toBe(false) // bit 13 without PSE
    expect(acLegal(acMask(AC_PDE_BIT13) | acMask(AC_PDE_PSE))).toBe(true)
    expect(acLegal(acMask(AC_PDE_BIT51) | acMask(AC_PTE_BIT51))).toBe(false) // two reserved bits
    expect(acLegal(acMask(AC_PTE_NX))).toBe(true) // NX alone is one reserved bit with NXE=0
    expect(acLegal(acMask(AC_PTE_NX) | acMask(AC_PDE_NX))).toBe(false)
    expect(acLegal(acMask(AC_PTE_NX) | acMask(AC_PDE_NX) | acMask(AC_CPU_NXE))).toBe(true)
    expect(acLegal(acMask(AC_PTE_NX) | acMask(AC_PDE_BIT51))).toBe(false)
    expect(acLegal(acMask(AC_PTE_NX) | acMask(AC_PDE_BIT51) | acMask(AC_CPU_NXE))).toBe(true)
    expect(() => acNext(0, 0)).toThrow(/FEP/)
    expect(acInvalidMask({ maxPhyAddr: 46, pku: true, smep: true }) & acMask(AC_FEP)).not.toBe(0)
  })

  it("counts equal access.c's published per-mode counts (without FEP)", () => {
    const count = (maxPhyAddr: number, pku: boolean): number => acCountCases(acInvalidMask({ maxPhyAddr, pku, smep: true }))
    // Typical PKU host, 37 <= M <= 51.
    expect(count(46, true)).toBe(19_169_280)
    expect(closedFormCount(46, true)).toBe(19_169_280)
    // M >= 52: bit 51 is an address bit.
    expect(count(52, true)).toBe(9_338_880)
    expect(closedFormCount(52, true)).toBe(9_338_880)
    // access-reduced-maxphyaddr: IvyBridge (no PKU), phys-bits=36: bit 36 is reserved too.
    expect(count(36, false)).toBe(2_899_968)
    expect(closedFormCount(36, false)).toBe(2_899_968)
    // M = 36 with PKU (not a published configuration).
    expect(closedFormCount(36, true)).toBe(28_999_680)
  }, 60_000)
})

describe('access.c matrix, complete: 4-level paging, MAXPHYADDR 46, PKU', () => {
  it('all 19,169,280 legal cases match the oracle', () => {
    const env = new AcEnv({ levels: 4, maxPhyAddr: 46, pku: true, smep: true })
    const t0 = performance.now()
    const r = acRunMatrix(env)
    const ms = performance.now() - t0
    console.log(`access matrix 4-level M=46 PKU: ${r.executed} cases, ${r.failed} mismatches, ${(ms / 1000).toFixed(1)} s`)
    expect(r.failures).toEqual([])
    expect(r.failed).toBe(0)
    expect(r.legal).toBe(19_169_280)
    expect(r.executed).toBe(19_169_280)
  }, 300_000)
})
