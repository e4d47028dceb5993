import { describe, expect, it } from 'vitest'
import { Memslots, type Memslot } from './memslot.ts'
import { INVALID_GFN, KvmMmuNotifier, MmuNotifierState, type MmuNotifierListener } from './mmu-notifier.ts'

const HVA = 0x7f0000000000

/** A listener that records every call with the state it saw. */
function recordingListener(state: () => MmuNotifierState, young = false): MmuNotifierListener & { log: string[] } {
  const log: string[] = []
  const st = (): string => {
    const s = state()
    return `seq=${s.seq} inProgress=${s.inProgress} range=[${s.rangeStart.toString(16)},${s.rangeEnd.toString(16)})`
  }
  return {
    log,
    onInvalidateRangeStart: (_s, a, b) => log.push(`start hva=[${a.toString(16)},${b.toString(16)}) ${st()}`),
    onInvalidateRangeEnd: (_s, a, b) => log.push(`end hva=[${a.toString(16)},${b.toString(16)}) ${st()}`),
    unmapGfnRange: (as: number, slot: Memslot, s: number, e: number, o: { mayBlock: boolean }) => {
      log.push(`unmap as${as} slot${slot.id} gfn=[${s.toString(16)},${e.toString(16)}) mayBlock=${o.mayBlock} ${st()}`)
      return true
    },
    ageGfnRange: (as, slot, s, e) => {
      log.push(`age as${as} slot${slot.id} gfn=[${s.toString(16)},${e.toString(16)})`)
      return young
    },
    testAgeGfn: (as, slot, s, e) => {
      log.push(`test-age as${as} slot${slot.id} gfn=[${s.toString(16)},${e.toString(16)})`)
      return young
    },
    flushRemoteTlbs: () => log.push('flush'),
  }
}

describe('MmuNotifierState (kvm_mmu_invalidate_begin/range_add/end, mmu_invalidate_retry_gfn)', () => {
  it('begin resets the range, range_add merges into the hull, end bumps seq', () => {
    const s = new MmuNotifierState()
    s.invalidateBegin()
    expect([s.inProgress, s.rangeStart, s.rangeEnd]).toEqual([1, INVALID_GFN, INVALID_GFN])
    expect(s.retryGfn(0, 5)).toBe(true) // in progress without a range: KVM bug path, retry
    s.invalidateRangeAdd(0x100, 0x200)
    s.invalidateBegin() // a concurrent invalidation: range kept
    s.invalidateRangeAdd(0x400, 0x401)
    expect([s.inProgress, s.rangeStart, s.rangeEnd]).toEqual([2, 0x100, 0x401])
    expect(s.retryGfn(0, 0x300)).toBe(true) // false positive of the hull, as in the kernel
    expect(s.retryGfn(0, 0x401)).toBe(false)
    s.invalidateEnd()
    expect([s.seq, s.inProgress]).toEqual([1, 1])
    s.invalidateEnd()
    expect([s.seq, s.inProgress]).toEqual([2, 0])
    expect(s.retryGfn(2, 0x150)).toBe(false)
    expect(s.retryGfn(1, 0x150)).toBe(true)
    expect(() => {
      s.invalidateEnd()
    }).toThrow(/negative/)
    expect(() => {
      s.invalidateRangeAdd(1, 2)
    }).toThrow(/without/)
  })
})

function vm(): { ms: Memslots; n: KvmMmuNotifier; l: ReturnType<typeof recordingListener> } {
  const ms = new Memslots()
  // slot 0: gfn 0x100.. ← hva HVA (2 MiB); slot 1: gfn 0x1000.. ← hva HVA + 2M (2 MiB)
  ms.setUserMemoryRegion({ slot: 0, flags: 0, guestPhysAddr: 0x100000, memorySize: 0x200000, userspaceAddr: HVA })
  ms.setUserMemoryRegion({ slot: 1, flags: 0, guestPhysAddr: 0x1000000, memorySize: 0x200000, userspaceAddr: HVA + 0x200000 })
  // SMM alias of the first 64 KiB of slot 0 at gfn 0xa0
  ms.setUserMemoryRegion({ slot: 0, asId: 1, flags: 0, guestPhysAddr: 0xa0000, memorySize: 0x10000, userspaceAddr: HVA })
  let n: KvmMmuNotifier | undefined = undefined
  const l = recordingListener(() => n!.state)
  n = new KvmMmuNotifier(ms, l)
  return { ms, n, l }
}

describe('KvmMmuNotifier (__kvm_handle_hva_range)', () => {
  it('converts an HVA range to gfn ranges per slot in every address space', () => {
    const { n, l } = vm()
    n.invalidateRangeStart(HVA + 0x1800, HVA + 0x201000, false)
    n.invalidateRangeEnd(HVA + 0x1800, HVA + 0x201000)
    expect(l.log).toEqual([
      'start hva=[7f0000001800,7f0000201000) seq=0 inProgress=1 range=[-1,-1)',
      'unmap as0 slot0 gfn=[101,300) mayBlock=false seq=0 inProgress=1 range=[101,300)',
      'unmap as0 slot1 gfn=[1000,1001) mayBlock=false seq=0 inProgress=1 range=[101,1001)',
      'unmap as1 slot0 gfn=[a1,b0) mayBlock=false seq=0 inProgress=1 range=[a1,1001)',
      'flush',
      'end hva=[7f0000001800,7f0000201000) seq=1 inProgress=0 range=[a1,1001)',
    ])
    expect(n.stats).toMatchObject({ invalidateStarts: 1, invalidateEnds: 1, invalidatesWithSlots: 1, unmapCalls: 3, remoteFlushes: 1 })
  })

  it('an invalidation that touches no memslot leaves seq and in_progress alone', () => {
    const { n, l } = vm()
    n.invalidateRangeStart(HVA + 0x10000000, HVA + 0x10001000)
    expect(n.state.activeInvalidateCount).toBe(1)
    n.invalidateRangeEnd(HVA + 0x10000000, HVA + 0x10001000)
    expect(l.log).toEqual([])
    expect([n.state.seq, n.state.inProgress, n.state.activeInvalidateCount]).toEqual([0, 0, 0])
  })

  it('a fault racing with an invalidation of its gfn must retry', () => {
    const { n } = vm()
    const st = n.state
    const gfn = 0x105
    // vCPU: fault->mmu_seq = seq, then (yield) …
    const mmuSeq = st.seq
    // … host: invalidate_range_start covering the gfn's HVA (zaps SPTEs, page about to be freed)
    n.invalidateRangeStart(HVA + 0x5000, HVA + 0x6000)
    // vCPU resolves the (old) pfn, then checks before installing:
    expect(st.retryGfnUnsafe(mmuSeq, gfn)).toBe(true)
    expect(st.retryGfn(mmuSeq, gfn)).toBe(true)
    // an unrelated gfn is not blocked while the sequence is unchanged
    expect(st.retryGfn(mmuSeq, 0x106)).toBe(false)
    n.invalidateRangeEnd(HVA + 0x5000, HVA + 0x6000)
    // after the end, seq changed: both faults that snapshotted before must retry
    expect(st.retryGfn(mmuSeq, gfn)).toBe(true)
    expect(st.retryGfn(mmuSeq, 0x106)).toBe(true)
    // the retried fault snapshots again and succeeds
    const again = st.seq
    expect(st.retryGfn(again, gfn)).toBe(false)
  })

  it('a fault whose snapshot was taken during an in-flight invalidation retries until it ends', () => {
    const { n } = vm()
    n.invalidateRangeStart(HVA, HVA + 0x1000)
    const mmuSeq = n.state.seq
    expect(n.state.retryGfn(mmuSeq, 0x100)).toBe(true)
    n.invalidateRangeEnd(HVA, HVA + 0x1000)
    expect(n.state.retryGfn(mmuSeq, 0x100)).toBe(true)
  })

  it('memslot updates are refused (EBUSY) while an invalidation is active, and change nothing', () => {
    const { ms, n } = vm()
    n.invalidateRangeStart(HVA, HVA + 0x1000)
    const before = ms.snapshot()
    expect(() => ms.setUserMemoryRegion({ slot: 0, flags: 0, guestPhysAddr: 0x100000, memorySize: 0, userspaceAddr: HVA })).toThrow(
      expect.objectContaining({ code: 'EBUSY' }),
    )
    expect(ms.snapshot()).toEqual(before)
    n.invalidateRangeEnd(HVA, HVA + 0x1000)
    expect(ms.setUserMemoryRegion({ slot: 0, flags: 0, guestPhysAddr: 0x100000, memorySize: 0, userspaceAddr: HVA }).kind).toBe('delete')
  })

  it('aging: clear_flush_young elides the flush by default (6.13+), test_young looks at one page', () => {
    const ms = new Memslots()
    ms.setUserMemoryRegion({ slot: 0, flags: 0, guestPhysAddr: 0x100000, memorySize: 0x200000, userspaceAddr: HVA })
    let n: KvmMmuNotifier | undefined = undefined
    const l = recordingListener(() => n!.state, true)
    n = new KvmMmuNotifier(ms, l)
    expect(n.clearFlushYoung(HVA, HVA + 0x3000)).toBe(true)
    expect(n.testYoung(HVA + 0x2fff)).toBe(true)
    expect(l.log).toEqual(['age as0 slot0 gfn=[100,103)', 'test-age as0 slot0 gfn=[102,103)'])
    const old = new KvmMmuNotifier(ms, l, new MmuNotifierState(), { elideTlbFlushIfYoung: false })
    l.log.length = 0
    old.clearFlushYoung(HVA, HVA + 0x1000)
    expect(l.log).toEqual(['age as0 slot0 gfn=[100,101)', 'flush'])
    expect(n.state.seq).toBe(0) // aging is not an invalidation
  })
})
