/**
 * Aging in the TDP MMU (arch/x86/kvm/mmu/tdp_mmu.c: `kvm_tdp_mmu_age_gfn_range`,
 * `kvm_tdp_mmu_test_age_gfn`, `__kvm_tdp_mmu_age_gfn_range`, `kvm_tdp_mmu_age_spte`;
 * tdp-mmu.md §7.5), in both upstream shapes:
 *
 * - `lockless` (≈6.15+, `CONFIG_KVM_MMU_LOCKLESS_AGING`): the MMU notifier calls in with no
 *   mmu_lock (`range->lockless`); the walk runs in an RCU read-side section only, over the valid
 *   roots of the range's address space with the plain RCU list iterator
 *   (`for_each_tdp_mmu_root_rcu`: no root references). For each present, accessed leaf: test-only
 *   → return true; else, A/D enabled → an unconditional atomic fetch-and-not of the Accessed bit
 *   (`tdp_mmu_clear_spte_bits_atomic`), A/D disabled → one cmpxchg from the value read to its
 *   access-tracked form (`__tdp_mmu_set_spte_atomic`), whose failure is ignored ("the spte is most
 *   likely young anyway"). No `handle_changed_spte`, no TLB flush (≥6.13).
 * - `write-lock` (6.13–6.14): mmu_lock held for write by the notifier; the non-yielding root walk;
 *   A/D enabled → `tdp_mmu_clear_spte_bits` (atomic only if the SPTE is volatile), A/D disabled →
 *   `kvm_tdp_mmu_write_spte` of the access-tracked value (an exchange: A/D-disabled leaves are
 *   always volatile).
 *
 * The walk is a kernel operation that yields between reading an accessed leaf and the atomic
 * update that depends on it: with no lock, faults (read lock), the lockless fast page fault, the
 * CPU's A/D assists and zaps run in that window — exactly the races lockless aging accepts.
 */
import {
  isAccessTrackSpte,
  isFrozenSpte,
  isLastSpte,
  isShadowPresentPte,
  type KernelOp,
  markSpteForAccessTrack,
  newSpte64,
  spteAdEnabled,
  spteNeedsAtomicUpdate,
} from '@mmusim/kvm'
import type { TdpIter } from './tdp-iter.ts'
import { drain, type TdpMmu } from './tdp-mmu.ts'

/** Aging counters (part of the strategy's `stats()`). */
export interface TdpMmuAgingCounters {
  /** Aging and test-age walks (one per memslot piece of a notifier call). */
  age_walks: number
  /** Young leaves the aging walks acted on (Accessed cleared or access tracking attempted). */
  age_sptes: number
  /** A/D disabled: access-tracking cmpxchgs that lost a race (ignored, as KVM does). */
  age_cmpxchg_failed: number
  /**
   * Lockless, A/D enabled: the fetch-and-not landed on a FROZEN SPTE (a shared-mode remover froze
   * the leaf between the walk's read and the atomic), clearing the Accessed bit out of the
   * tombstone (FROZEN_SPTE = SHADOW_NONPRESENT_VALUE | 0x5a0 contains both the EPT and the NPT
   * Accessed bit). A model diagnostic for tdp-mmu.md §10 S24, not a KVM counter.
   */
  age_frozen_clobbered: number
}

/** The aging walkers of one {@link TdpMmu}. */
export class TdpMmuAging {
  readonly mmu: TdpMmu
  /** Whether the walks run without mmu_lock (option `agingLocking: 'lockless'`). */
  readonly lockless: boolean
  readonly counters: TdpMmuAgingCounters = { age_walks: 0, age_sptes: 0, age_cmpxchg_failed: 0, age_frozen_clobbered: 0 }
  /** Scratch SPTE, filled and consumed within one scheduler step. */
  private readonly tmp = newSpte64()

  constructor(mmu: TdpMmu) {
    this.mmu = mmu
    this.lockless = mmu.opts.agingLocking === 'lockless'
  }

  /** `is_accessed_spte()`: A/D enabled → the Accessed bit; A/D disabled → not access-tracked. */
  isAccessedSpte(lo: number, hi: number): boolean {
    const fmt = this.mmu.fmt
    return spteAdEnabled(hi) ? (lo & fmt.accessedLo) !== 0 : !isAccessTrackSpte(fmt, lo, hi)
  }

  /**
   * `kvm_tdp_mmu_age_gfn_range()` (`testOnly` false) / `kvm_tdp_mmu_test_age_gfn()` (true) for
   * [start, end) of address space `asId`. Lockless: no mmu_lock, RCU only, no root references;
   * write-lock: mmu_lock held for write (asserted). Returns whether any leaf was young.
   */
  *kvmTdpMmuAgeGfnRange(asId: number, start: number, end: number, testOnly: boolean): KernelOp<boolean> {
    const mmu = this.mmu
    const vm = mmu.vm
    this.counters.age_walks++
    if (!this.lockless) return yield* this.ageGfnRangeWriteLocked(asId, start, end, testOnly)
    let young = false
    const rcu = vm.rcu
    const iter = mmu.newIter()
    // guard(rcu)(); for_each_tdp_mmu_root_rcu(kvm, root, as_id, KVM_VALID_ROOTS): list_del_rcu keeps
    // a deleted root's `next`, and nothing listed when the section began can be freed before it ends.
    rcu.readLock()
    roots: for (let root = mmu.rootsHead; root !== null; root = root.next) {
      // tdp_mmu_root_match(): role.invalid read without mmu_lock (racy, and monotonic).
      if (root.asId !== asId || root.invalid) continue
      // tdp_root_for_each_leaf_pte()
      for (iter.start(root, 1, start); iter.valid && iter.gfn < end; iter.next()) {
        const lo = iter.oldLo
        if (!isShadowPresentPte(lo) || !isLastSpte(lo, iter.level)) continue
        // Reading the leaf costs a memory reference (no preemption point: nothing is written).
        this.chargeLeafRead()
        if (!this.isAccessedSpte(lo, iter.oldHi)) continue
        young = true
        if (testOnly) break roots
        yield* this.kvmTdpMmuAgeSpte(iter)
      }
    }
    rcu.readUnlock()
    return young
  }

  /** {@link kvmTdpMmuAgeGfnRange} run synchronously in the caller's step (never blocks). */
  ageGfnRange(asId: number, start: number, end: number, testOnly: boolean): boolean {
    return drain(this.kvmTdpMmuAgeGfnRange(asId, start, end, testOnly), this.mmu.vm.sched, testOnly ? 'kvm_tdp_mmu_test_age_gfn' : 'kvm_tdp_mmu_age_gfn_range')
  }

  /**
   * `kvm_tdp_mmu_age_spte()` (≈6.15+): the iterator's `old_spte` is a present, accessed leaf read
   * without any lock; other CPUs run until the atomic operation.
   */
  private *kvmTdpMmuAgeSpte(iter: TdpIter): KernelOp {
    const mmu = this.mmu
    yield mmu.vm.sched.costs.spteCmpxchg
    const m = mmu.mem
    const fmt = mmu.fmt
    const sptep = iter.sptep
    this.counters.age_sptes++
    if (spteAdEnabled(iter.oldHi)) {
      // tdp_mmu_clear_spte_bits_atomic(): atomic64_fetch_and(~shadow_accessed_mask) on whatever
      // the SPTE holds now; iter->old_spte becomes the value it replaced.
      const lo = m.read32(sptep)
      const hi = m.read32(sptep + 4)
      m.write32(sptep, (lo & ~fmt.accessedLo) >>> 0)
      if (isFrozenSpte(lo, hi)) this.counters.age_frozen_clobbered++
      iter.oldLo = lo
      iter.oldHi = hi
      return
    }
    // __tdp_mmu_set_spte_atomic(): try_cmpxchg64 from old_spte; on failure old_spte is refreshed
    // and nothing else happens — no handle_changed_spte either way.
    const t = markSpteForAccessTrack(this.tmp, fmt, iter.oldLo, iter.oldHi)
    if (!m.cmpxchg64(sptep, iter.oldLo, iter.oldHi, t.lo, t.hi)) {
      this.counters.age_cmpxchg_failed++
      iter.read()
    }
  }

  /**
   * The aging walk's read of a present leaf: one memory reference of simulated time (the shadow
   * MMU's rmap walk charges the same per SPTE, so their aging costs compare).
   */
  private chargeLeafRead(): void {
    const sched = this.mmu.vm.sched
    if (sched.current !== null) sched.charge(sched.costs.memoryRef)
  }

  /**
   * 6.13–6.14 `__kvm_tdp_mmu_age_gfn_range()`: mmu_lock held for write (the notifier took it), the
   * non-yielding walk over valid roots of `asId` (`__for_each_tdp_mmu_root`), RCU per root.
   */
  private *ageGfnRangeWriteLocked(asId: number, start: number, end: number, testOnly: boolean): KernelOp<boolean> {
    const mmu = this.mmu
    const rcu = mmu.vm.rcu
    const iter = mmu.newIter()
    let young = false
    for (const root of mmu.rootsWriteLocked(asId, true)) {
      rcu.readLock()
      for (iter.start(root, 1, start); iter.valid && iter.gfn < end; iter.next()) {
        const lo = iter.oldLo
        if (!isShadowPresentPte(lo) || !isLastSpte(lo, iter.level)) continue
        this.chargeLeafRead()
        if (!this.isAccessedSpte(lo, iter.oldHi)) continue
        young = true
        if (testOnly) break
        yield* this.ageSpteWriteLocked(iter)
      }
      rcu.readUnlock()
    }
    return young
  }

  /**
   * 6.13–6.14 `kvm_tdp_mmu_age_spte()` under the write lock: the fast page fault and the CPU can
   * still change a volatile leaf, so A/D enabled → `tdp_mmu_clear_spte_bits()` (fetch-and-not if
   * volatile, else a plain store: only the tolerated Accessed bit can change under us), A/D
   * disabled → `kvm_tdp_mmu_write_spte()` of the access-tracked value (an exchange).
   */
  private *ageSpteWriteLocked(iter: TdpIter): KernelOp {
    const mmu = this.mmu
    mmu.vm.mmuLock.assertHeld('write')
    yield mmu.vm.sched.costs.memoryRef
    const m = mmu.mem
    const fmt = mmu.fmt
    const sptep = iter.sptep
    const oLo = iter.oldLo
    const oHi = iter.oldHi
    this.counters.age_sptes++
    if (spteAdEnabled(oHi)) {
      if (spteNeedsAtomicUpdate(fmt, oLo, oHi)) {
        const lo = m.read32(sptep)
        iter.oldLo = lo
        iter.oldHi = m.read32(sptep + 4)
        m.write32(sptep, (lo & ~fmt.accessedLo) >>> 0)
      } else {
        m.write32(sptep, (oLo & ~fmt.accessedLo) >>> 0)
      }
      return
    }
    const t = markSpteForAccessTrack(this.tmp, fmt, oLo, oHi)
    iter.oldLo = m.read32(sptep)
    iter.oldHi = m.read32(sptep + 4)
    m.write32(sptep, t.lo)
    m.write32(sptep + 4, t.hi)
  }
}
