import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import { toBigInt } from '@mmusim/x86-hw'
import {
  ACC_USER_MASK,
  ACC_WRITE_MASK,
  checkMmioSpte,
  DEFAULT_SPTE_HOST_WRITABLE,
  DEFAULT_SPTE_MMU_WRITABLE,
  EPT_SPTE_FORMAT,
  EPT_SPTE_HOST_WRITABLE_HI,
  EPT_SPTE_MMU_WRITABLE_HI,
  FROZEN_SPTE_HI,
  FROZEN_SPTE_LO,
  getMmioSpteAccess,
  getMmioSpteGeneration,
  getMmioSpteGfn,
  isAccessedSpte,
  isAccessTrackSpte,
  isDirtySpte,
  isExecutablePte,
  isFrozenSpte,
  isHostWritableSpte,
  isLargePte,
  isLastSpte,
  isMmioSpte,
  isMmuWritableSpte,
  isShadowPresentPte,
  isWritablePte,
  leafSpteChangeNeedsTlbFlush,
  makeHugeSpte,
  makeMmioSpte,
  makeNonLeafSpte,
  makeSmallSpte,
  makeSpte,
  makeSpteFormat,
  markSpteForAccessTrack,
  MMIO_SPTE_GEN_HIGH_MASK_HI,
  MMIO_SPTE_GEN_LOW_MASK,
  MMIO_SPTE_GEN_MASK,
  mmioGenerationWrapped,
  newSpte64,
  restoreAccTrackSpte,
  SHADOW_ACC_TRACK_SAVED_BITS_SHIFT,
  SHADOW_ACC_TRACK_SAVED_MASK_HI,
  SPTE_MMU_PRESENT_MASK,
  SPTE_TDP_AD_DISABLED_HI,
  SPTE_TDP_AD_MASK_HI,
  SPTE_TDP_AD_WRPROT_ONLY_HI,
  spteAdEnabled,
  spteNeedsAtomicUpdate,
  spteToPfn,
  spteToString,
  X86_SPTE_FORMAT,
  type MakeSpteParams,
  type SpteFormat,
} from './spte.ts'

const big = (lo: number, hi: number): bigint => toBigInt(lo, hi)
const bit = (n: number): bigint => 1n << BigInt(n)

describe('constants match spte.h', () => {
  it('software bits', () => {
    expect(big(SPTE_MMU_PRESENT_MASK, 0)).toBe(bit(11))
    expect(big(0, SPTE_TDP_AD_MASK_HI)).toBe(3n << 52n)
    expect(big(0, SPTE_TDP_AD_DISABLED_HI)).toBe(1n << 52n)
    expect(big(0, SPTE_TDP_AD_WRPROT_ONLY_HI)).toBe(2n << 52n)
    expect(SHADOW_ACC_TRACK_SAVED_BITS_SHIFT).toBe(54)
    expect(big(0, SHADOW_ACC_TRACK_SAVED_MASK_HI)).toBe(bit(54) | bit(56))
    expect(big(DEFAULT_SPTE_HOST_WRITABLE, 0)).toBe(bit(9))
    expect(big(DEFAULT_SPTE_MMU_WRITABLE, 0)).toBe(bit(10))
    expect(big(0, EPT_SPTE_HOST_WRITABLE_HI)).toBe(bit(57))
    expect(big(0, EPT_SPTE_MMU_WRITABLE_HI)).toBe(bit(58))
  })
  it('MMIO generation layout and FROZEN_SPTE', () => {
    expect(big(MMIO_SPTE_GEN_LOW_MASK, 0)).toBe(0x7f8n) // GENMASK_ULL(10, 3)
    expect(big(0, MMIO_SPTE_GEN_HIGH_MASK_HI)).toBe(0x7ffn << 52n) // GENMASK_ULL(62, 52)
    expect(MMIO_SPTE_GEN_MASK).toBe(0x7ffff) // 19 bits
    expect(big(FROZEN_SPTE_LO, FROZEN_SPTE_HI)).toBe(bit(63) | 0x5a0n)
  })
  it('format masks (kvm_mmu_set_ept_masks / kvm_mmu_reset_all_pte_masks)', () => {
    const e = EPT_SPTE_FORMAT
    expect([e.presentLo, big(0, e.presentHi)]).toEqual([0, bit(63)]) // exec-only: no R, suppress-#VE
    expect([e.userLo, e.xLo, e.nxHi, e.accessedLo, e.dirtyLo, e.accTrackLo]).toEqual([1, 4, 0, 0x100, 0x200, 7])
    expect([e.mmioValueLo, e.mmioMaskLo, big(0, e.mmioMaskHi), e.mmioAccessMask]).toEqual([6, 7, bit(63), 0])
    const x = X86_SPTE_FORMAT
    expect([x.presentLo, x.userLo, x.accessedLo, x.dirtyLo, big(0, x.nxHi), x.accTrackLo]).toEqual([1, 4, 0x20, 0x40, bit(63), 0])
    expect(big(x.mmioValueLo, x.mmioValueHi)).toBe(bit(51) | 1n)
    expect(x.mmioAccessMask).toBe(ACC_WRITE_MASK | ACC_USER_MASK)
    expect(makeSpteFormat('x86', { maxPhyAddr: 52 }).mmioEnabled).toBe(false) // no reserved PA bit left
    expect(makeSpteFormat('ept', { execOnly: false }).presentLo).toBe(1)
  })
})

const leaf = (over: Partial<MakeSpteParams> = {}): MakeSpteParams => ({
  hpa: 0x12345678000,
  level: 1,
  writable: true,
  user: true,
  exec: true,
  accessed: true,
  dirty: true,
  hostWritable: true,
  mmuWritable: true,
  ...over,
})

describe('makeSpte and predicates', () => {
  for (const fmt of [EPT_SPTE_FORMAT, X86_SPTE_FORMAT]) {
    it(`${fmt.kind}: a writable 4K leaf`, () => {
      const s = makeSpte(newSpte64(), fmt, leaf())
      expect(isShadowPresentPte(s.lo)).toBe(true)
      expect(isWritablePte(s.lo)).toBe(true)
      expect(isMmuWritableSpte(fmt, s.lo, s.hi)).toBe(true)
      expect(isHostWritableSpte(fmt, s.lo, s.hi)).toBe(true)
      expect(isAccessedSpte(fmt, s.lo)).toBe(true)
      expect(isDirtySpte(fmt, s.lo)).toBe(true)
      expect(isExecutablePte(fmt, s.lo, s.hi)).toBe(true)
      expect(isLargePte(s.lo)).toBe(false)
      expect(isLastSpte(s.lo, 1)).toBe(true)
      expect(isLastSpte(s.lo, 2)).toBe(false)
      expect(spteToPfn(s.lo, s.hi)).toBe(0x12345678)
      expect(isMmioSpte(fmt, s.lo, s.hi)).toBe(false)
      expect(isFrozenSpte(s.lo, s.hi)).toBe(false)
      expect(spteAdEnabled(s.hi)).toBe(true)
      expect(spteNeedsAtomicUpdate(fmt, s.lo, s.hi)).toBe(false)
    })
    it(`${fmt.kind}: read-only, non-exec, huge`, () => {
      const s = makeSpte(newSpte64(), fmt, leaf({ level: 2, hpa: 0x40000000, writable: false, dirty: false, exec: false, mmuWritable: false, hostWritable: false }))
      expect(isWritablePte(s.lo)).toBe(false)
      expect(isMmuWritableSpte(fmt, s.lo, s.hi)).toBe(false)
      expect(isHostWritableSpte(fmt, s.lo, s.hi)).toBe(false)
      expect(isExecutablePte(fmt, s.lo, s.hi)).toBe(false)
      expect(isLargePte(s.lo)).toBe(true)
      expect(isLastSpte(s.lo, 2)).toBe(true)
      expect(spteToPfn(s.lo, s.hi)).toBe(0x40000)
    })
  }

  it('exact values', () => {
    const x = makeSpte(newSpte64(), X86_SPTE_FORMAT, leaf({ hpa: 0x5000, exec: false }))
    // MMU-present | D | A | U | W | P | host-W | mmu-W, NX
    expect(big(x.lo, x.hi)).toBe(bit(63) | 0x5000n | bit(11) | bit(10) | bit(9) | 0x40n | 0x20n | 4n | 2n | 1n)
    const e = makeSpte(newSpte64(), EPT_SPTE_FORMAT, leaf({ hpa: 0x5000 }))
    // SVE | mmu-W | host-W | MMU-present | D | A | IPAT | WB<<3 | X | W | R
    expect(big(e.lo, e.hi)).toBe(bit(63) | bit(58) | bit(57) | 0x5000n | bit(11) | bit(9) | bit(8) | bit(6) | (6n << 3n) | 7n)
  })

  it('writable-invariant violations throw (check_spte_writable_invariants)', () => {
    expect(() => makeSpte(newSpte64(), X86_SPTE_FORMAT, leaf({ mmuWritable: false }))).toThrow(/not MMU-writable/)
    expect(() => makeSpte(newSpte64(), X86_SPTE_FORMAT, leaf({ writable: false, hostWritable: false }))).toThrow(/not Host-writable/)
  })

  it('flush rule and volatile bits', () => {
    const f = X86_SPTE_FORMAT
    const w = makeSpte(newSpte64(), f, leaf())
    const dirtyLogWp = makeSpte(newSpte64(), f, leaf({ writable: false, dirty: false }))
    const shadowWp = makeSpte(newSpte64(), f, leaf({ writable: false, dirty: false, mmuWritable: false }))
    expect(leafSpteChangeNeedsTlbFlush(f, w.lo, w.hi, dirtyLogWp.lo, dirtyLogWp.hi)).toBe(false)
    expect(leafSpteChangeNeedsTlbFlush(f, dirtyLogWp.lo, dirtyLogWp.hi, shadowWp.lo, shadowWp.hi)).toBe(true)
    expect(spteNeedsAtomicUpdate(f, dirtyLogWp.lo, dirtyLogWp.hi)).toBe(true) // fast PF may set W
    const wClean = makeSpte(newSpte64(), f, leaf({ dirty: false }))
    expect(spteNeedsAtomicUpdate(f, wClean.lo, wClean.hi)).toBe(true) // CPU may set D
  })

  it('non-leaf, small and huge', () => {
    const f = EPT_SPTE_FORMAT
    const n = makeNonLeafSpte(newSpte64(), f, 0x7000, false)
    expect(big(n.lo, n.hi)).toBe(bit(63) | 0x7000n | bit(11) | bit(8) | 7n)
    const nd = makeNonLeafSpte(newSpte64(), f, 0x7000, true)
    expect(spteAdEnabled(nd.hi)).toBe(false)
    const huge = makeSpte(newSpte64(), f, leaf({ level: 2, hpa: 0x200000 }))
    const small = makeSmallSpte(newSpte64(), huge.lo, huge.hi, 1, 5)
    expect(spteToPfn(small.lo, small.hi)).toBe(0x205)
    expect(isLargePte(small.lo)).toBe(false)
    const back = makeHugeSpte(newSpte64(), small.lo, small.hi, 2)
    expect([back.lo, back.hi]).toEqual([huge.lo, huge.hi])
    const mid = makeSmallSpte(newSpte64(), huge.lo, 0x80000001 | huge.hi, 2, 3) // 1G → 2M child keeps PS
    expect(isLargePte(mid.lo)).toBe(true)
    expect(spteToPfn(mid.lo, mid.hi)).toBe(0x100000 + 0x200 + 3 * 512)
  })
})

describe('access tracking (A/D disabled EPT)', () => {
  const fmt = makeSpteFormat('ept', { adEnabled: false })
  it('mark/restore round trip saves R and X at bits 54/56, drops W and A', () => {
    const s = makeSpte(newSpte64(), fmt, leaf({ writable: false, dirty: false }))
    expect(spteAdEnabled(s.hi)).toBe(false)
    expect(isAccessTrackSpte(fmt, s.lo, s.hi)).toBe(false)
    const t = markSpteForAccessTrack(newSpte64(), fmt, s.lo, s.hi)
    expect(isShadowPresentPte(t.lo)).toBe(true)
    expect(isAccessTrackSpte(fmt, t.lo, t.hi)).toBe(true)
    expect(t.lo & 7).toBe(0)
    expect(big(0, t.hi) & (bit(54) | bit(56))).toBe(bit(54) | bit(56))
    expect(isAccessedSpte(fmt, t.lo)).toBe(false)
    const again = markSpteForAccessTrack(newSpte64(), fmt, t.lo, t.hi)
    expect([again.lo, again.hi]).toEqual([t.lo, t.hi])
    const r = restoreAccTrackSpte(newSpte64(), fmt, t.lo, t.hi)
    expect([r.lo, r.hi]).toEqual([(s.lo & ~fmt.accessedLo) >>> 0, s.hi])
  })
  it('property: restore(mark(s)) = s without W/A for any pfn/access', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 2 ** 34 - 1 }), fc.boolean(), fc.boolean(), (pfn, user, exec) => {
        fc.pre(user || exec)
        const s = makeSpte(newSpte64(), fmt, leaf({ hpa: pfn * 4096, user, exec, writable: false, dirty: false }))
        const t = markSpteForAccessTrack(newSpte64(), fmt, s.lo, s.hi)
        const r = restoreAccTrackSpte(newSpte64(), fmt, t.lo, t.hi)
        return r.lo === (s.lo & ~fmt.accessedLo) >>> 0 && r.hi === s.hi && spteToPfn(t.lo, t.hi) === pfn
      }),
    )
  })
  it('a prefetched (not accessed) SPTE is created access-tracked; with A/D it just lacks A', () => {
    const p = makeSpte(newSpte64(), fmt, leaf({ accessed: false, writable: false, dirty: false }))
    expect(isAccessTrackSpte(fmt, p.lo, p.hi)).toBe(true)
    const q = makeSpte(newSpte64(), EPT_SPTE_FORMAT, leaf({ accessed: false }))
    expect(isAccessedSpte(EPT_SPTE_FORMAT, q.lo)).toBe(false)
    expect(isAccessTrackSpte(EPT_SPTE_FORMAT, q.lo, q.hi)).toBe(false)
    expect(isWritablePte(q.lo)).toBe(true)
  })
})

describe('MMIO SPTEs', () => {
  const fmts: SpteFormat[] = [EPT_SPTE_FORMAT, X86_SPTE_FORMAT]
  it('property: gfn, generation (all 19 bits) and access round trip; never present, never frozen', () => {
    fc.assert(
      fc.property(
        fc.constantFrom(...fmts),
        fc.integer({ min: 0, max: 2 ** 34 - 1 }),
        fc.integer({ min: 0, max: 2 ** 40 }),
        fc.integer({ min: 0, max: 7 }),
        (fmt, gfn, generation, access) => {
          const s = makeMmioSpte(newSpte64(), fmt, gfn, access, generation)
          return (
            isMmioSpte(fmt, s.lo, s.hi) &&
            !isShadowPresentPte(s.lo) &&
            !isFrozenSpte(s.lo, s.hi) &&
            getMmioSpteGfn(fmt, s.lo, s.hi) === gfn &&
            getMmioSpteGeneration(s.lo, s.hi) === generation % 2 ** 19 &&
            getMmioSpteAccess(fmt, s.lo) === (access & fmt.mmioAccessMask) &&
            checkMmioSpte(s.lo, s.hi, generation, false)
          )
        },
      ),
    )
  })
  it('each generation bit lands where spte.h puts it', () => {
    for (let b = 0; b < 19; b++) {
      const s = makeMmioSpte(newSpte64(), EPT_SPTE_FORMAT, 0, 0, 1 << b)
      const want = b < 8 ? bit(3 + b) : bit(52 + b - 8)
      expect(big(s.lo, s.hi) & ~7n).toBe(want)
    }
  })
  it('exact EPT and x86 values', () => {
    const e = makeMmioSpte(newSpte64(), EPT_SPTE_FORMAT, 0xfee00, ACC_WRITE_MASK, 0x1ff)
    expect(big(e.lo, e.hi)).toBe(6n | (0xffn << 3n) | (1n << 52n) | (0xfee00n << 12n))
    const x = makeMmioSpte(newSpte64(), X86_SPTE_FORMAT, 0xfee00, ACC_WRITE_MASK | 1, 2)
    expect(big(x.lo, x.hi)).toBe(1n | 2n | (2n << 3n) | bit(51) | (0xfee00n << 12n))
  })
  it('stale after a memslot generation change or while an update is in progress', () => {
    const s = makeMmioSpte(newSpte64(), X86_SPTE_FORMAT, 0x100, 0, 10)
    expect(checkMmioSpte(s.lo, s.hi, 10, false)).toBe(true)
    expect(checkMmioSpte(s.lo, s.hi, 10, true)).toBe(false)
    expect(checkMmioSpte(s.lo, s.hi, 12, false)).toBe(false)
    expect(checkMmioSpte(s.lo, s.hi, 10 + 2 ** 19, false)).toBe(true) // aliasing after a wrap → why KVM zaps all on wrap
  })
  it('generation wrap detection strips the address-space bit', () => {
    expect(mmioGenerationWrapped(2 ** 19)).toBe(true)
    expect(mmioGenerationWrapped(2 ** 19 + 1)).toBe(true) // address space 1
    expect(mmioGenerationWrapped(2 ** 19 + 2)).toBe(false)
    expect(mmioGenerationWrapped(4)).toBe(false)
  })
})

describe('frozen and printing', () => {
  it('FROZEN_SPTE is not present and not MMIO in either format', () => {
    for (const f of [EPT_SPTE_FORMAT, X86_SPTE_FORMAT]) {
      expect(isShadowPresentPte(FROZEN_SPTE_LO)).toBe(false)
      expect(isMmioSpte(f, FROZEN_SPTE_LO, FROZEN_SPTE_HI)).toBe(false)
    }
    expect(isFrozenSpte(FROZEN_SPTE_LO, FROZEN_SPTE_HI)).toBe(true)
    expect(isFrozenSpte(FROZEN_SPTE_LO, 0)).toBe(false)
  })
  it('spteToString', () => {
    expect(spteToString(FROZEN_SPTE_LO, FROZEN_SPTE_HI)).toBe('0x80000000000005a0 FROZEN')
    const s = makeSpte(newSpte64(), X86_SPTE_FORMAT, leaf({ hpa: 0x5000, exec: false }))
    expect(spteToString(s.lo, s.hi)).toBe('0x8000000000005e67 pfn=0x5 x86 W mmu-W host-W U A D')
    const m = makeMmioSpte(newSpte64(), EPT_SPTE_FORMAT, 0x42, 0, 3)
    expect(spteToString(m.lo, m.hi, EPT_SPTE_FORMAT)).toBe('0x000000000004201e MMIO gfn=0x42 gen=3 access=0')
    expect(spteToString(0, 0x80000000)).toBe('0x8000000000000000 non-present')
  })
})
