/**
 * KVM's side of the MMU-notifier protocol (virt/kvm/kvm_main.c, include/linux/kvm_host.h):
 * the invalidation sequence/in-progress state a page fault checks before installing an SPTE
 * (`mmu_invalidate_seq`, `mmu_invalidate_in_progress`, `mmu_invalidate_range_start/end`,
 * `mmu_invalidate_retry_gfn`), and the `mmu_notifier_ops` that turn host (HVA) events into
 * per-memslot gfn ranges for the MMU (`__kvm_handle_hva_range`).
 *
 * Fault-side protocol (shadow-mmu.md §8.9, tdp-mmu.md §6.3):
 * ```
 * const mmuSeq = state.seq                 // fault->mmu_seq, before resolving the pfn
 * ... (may yield) ... resolve gfn → pfn
 * if (state.retryGfnUnsafe(mmuSeq, gfn))   // optional lockless pre-check
 *   return RET_PF_RETRY
 * lock(mmu_lock)
 * if (state.retryGfn(mmuSeq, gfn))         // is_page_fault_stale
 *   return RET_PF_RETRY
 * install SPTE
 * ```
 * Both sides change the state only under mmu_lock held for write. The synchronous notifier
 * methods expect the caller (VM / scheduler) to provide the locking; their `*Op` forms take
 * mmu_lock themselves (through the listener) and may yield inside the unmap.
 */
import type { Memslot, Memslots } from './memslot.ts'
import { hvaToGfnMemslot, KVM_ADDRESS_SPACE_NUM } from './memslot.ts'
import { MmusimError } from '@mmusim/x86-hw'
import type { KernelOp } from './sched/index.ts'

/** `INVALID_GPA` used as "no range recorded yet" for `mmu_invalidate_range_start/end`. */
export const INVALID_GFN = -1

/**
 * Per-VM invalidation state (`struct kvm` fields). The range is in gfns (kernels ≥ 6.8, where
 * `kvm_mmu_invalidate_range_add` records the gfn range of each affected memslot; ranges of
 * concurrent invalidations, and of different address spaces, merge into their hull).
 */
export class MmuNotifierState {
  /** `mmu_invalidate_seq`: bumped at the end of every invalidation. */
  seq = 0
  /** `mmu_invalidate_in_progress`: invalidations between begin and end. */
  inProgress = 0
  /** `mmu_invalidate_range_start` (gfn, inclusive) or {@link INVALID_GFN}. */
  rangeStart = INVALID_GFN
  /** `mmu_invalidate_range_end` (gfn, exclusive) or {@link INVALID_GFN}. */
  rangeEnd = INVALID_GFN
  /** `mn_active_invalidate_count`: notifier invalidations between range_start() and range_end(), memslot or not. */
  activeInvalidateCount = 0

  /** `kvm_mmu_invalidate_begin`: in_progress++; the first one resets the range. */
  invalidateBegin(): void {
    this.inProgress++
    if (this.inProgress === 1) {
      this.rangeStart = INVALID_GFN
      this.rangeEnd = INVALID_GFN
    }
  }

  /** `kvm_mmu_invalidate_range_add`: record [start, end), or widen to the hull of all recorded ranges. */
  invalidateRangeAdd(start: number, end: number): void {
    if (this.inProgress <= 0) {
      throw new MmusimError('INVALIDATE_NOT_BEGUN', 'kvm_mmu_invalidate_range_add() without kvm_mmu_invalidate_begin()')
    }
    if (this.rangeStart === INVALID_GFN) {
      this.rangeStart = start
      this.rangeEnd = end
    } else {
      this.rangeStart = Math.min(this.rangeStart, start)
      this.rangeEnd = Math.max(this.rangeEnd, end)
    }
  }

  /** `kvm_mmu_invalidate_end`: seq++ (made visible before) in_progress--. */
  invalidateEnd(): void {
    this.seq++
    this.inProgress--
    if (this.inProgress < 0) {
      throw new MmusimError('INVALIDATE_UNBALANCED', 'mmu_invalidate_in_progress went negative: an end() without a begin()')
    }
  }

  /**
   * `mmu_invalidate_retry_gfn(kvm, mmu_seq, gfn)` — call under mmu_lock. True (retry the fault)
   * if an invalidation is in progress and gfn is inside its range (or, a KVM bug, no range was
   * recorded yet), or if any invalidation ended since `mmuSeq` was read.
   */
  retryGfn(mmuSeq: number, gfn: number): boolean {
    if (this.inProgress !== 0) {
      if (this.rangeStart === INVALID_GFN || this.rangeEnd === INVALID_GFN) return true
      if (gfn >= this.rangeStart && gfn < this.rangeEnd) return true
    }
    return this.seq !== mmuSeq
  }

  /**
   * `mmu_invalidate_retry_gfn_unsafe`: the lockless pre-check faults do before taking mmu_lock
   * (may give false answers; must be followed by {@link retryGfn} under the lock).
   */
  retryGfnUnsafe(mmuSeq: number, gfn: number): boolean {
    if (this.inProgress !== 0 && gfn >= this.rangeStart && gfn < this.rangeEnd) return true
    return this.seq !== mmuSeq
  }
}

/**
 * What the MMU strategy implements for notifier events (the `kvm_*_gfn_range` handlers of
 * arch/x86/kvm/mmu/mmu.c). Every gfn range is inside `slot` of address space `asId`.
 */
export interface MmuNotifierListener {
  /** Called under the lock right after `kvm_mmu_invalidate_begin` (state already updated). */
  onInvalidateRangeStart?(state: MmuNotifierState, hvaStart: number, hvaEnd: number): void
  /** `kvm_unmap_gfn_range`: zap every leaf SPTE mapping [startGfn, endGfn); return whether a TLB flush is needed. */
  unmapGfnRange(asId: number, slot: Memslot, startGfn: number, endGfn: number, opts: { mayBlock: boolean }): boolean
  /**
   * `kvm_unmap_gfn_range` as a kernel operation, used by the `*Op` notifier methods when present:
   * it may drop and retake mmu_lock (yield) when `opts.mayBlock` (`range->may_block`).
   */
  unmapGfnRangeOp?(asId: number, slot: Memslot, startGfn: number, endGfn: number, opts: { mayBlock: boolean }): KernelOp<boolean>
  /**
   * `KVM_MMU_LOCK` / `KVM_MMU_UNLOCK` of `__kvm_handle_hva_range`: take and drop mmu_lock for
   * write. Required by the `*Op` notifier methods (the synchronous ones expect the caller to hold it).
   */
  mmuWriteLock?(): KernelOp
  mmuWriteUnlock?(): void
  /** Called under the lock right after `kvm_mmu_invalidate_end` (state already updated). */
  onInvalidateRangeEnd?(state: MmuNotifierState, hvaStart: number, hvaEnd: number): void
  /** `kvm_age_gfn`: clear Accessed (or access-track) SPTEs in range; return whether any was young. */
  ageGfnRange(asId: number, slot: Memslot, startGfn: number, endGfn: number): boolean
  /** `kvm_test_age_gfn`: whether any SPTE in range is young (no change). */
  testAgeGfn(asId: number, slot: Memslot, startGfn: number, endGfn: number): boolean
  /**
   * `range->lockless` of `kvm_age_hva_range()` (`CONFIG_KVM_MMU_LOCKLESS_AGING`, x86_64 ≥ 6.15):
   * the aging handlers run without mmu_lock. The `*Op` aging methods then do not take it, and the
   * synchronous ones do not require the caller to hold it. Default false: mmu_lock held for write.
   */
  agingLockless?: boolean
  /** `kvm_age_gfn` as a kernel operation (may be preempted, never blocks); used by the `*Op` aging methods when present. */
  ageGfnRangeOp?(asId: number, slot: Memslot, startGfn: number, endGfn: number): KernelOp<boolean>
  /** `kvm_test_age_gfn` as a kernel operation; used by {@link KvmMmuNotifier.testYoungOp} when present. */
  testAgeGfnOp?(asId: number, slot: Memslot, startGfn: number, endGfn: number): KernelOp<boolean>
  /** `kvm_flush_remote_tlbs` after handlers asked for it (`flush_on_ret`). */
  flushRemoteTlbs?(): void
  /** `kvm_flush_shadow_all` on `release` (the mm is going away). */
  flushShadowAll?(): void
}

/**
 * `struct mmu_notifier_ops` as the host mm calls it (include/linux/mmu_notifier.h). HVA ranges
 * are [start, end). {@link KvmMmuNotifier} is KVM's implementation; {@link HostMemory} calls every
 * registered one.
 */
export interface MmuNotifierOps {
  invalidateRangeStart(start: number, end: number, mayBlock: boolean): void
  invalidateRangeEnd(start: number, end: number): void
  /**
   * {@link invalidateRangeStart} as a kernel operation that takes the subscriber's locks itself
   * and may yield (when `mayBlock`); the host runs it instead of the synchronous form when it runs
   * the operation on a thread.
   */
  invalidateRangeStartOp?(start: number, end: number, mayBlock: boolean): KernelOp
  /** {@link invalidateRangeEnd} as a kernel operation that takes the subscriber's locks itself. */
  invalidateRangeEndOp?(start: number, end: number): KernelOp
  /** `clear_flush_young`: returns young. */
  clearFlushYoung(start: number, end: number): boolean
  /** `clear_young` (no flush): returns young. */
  clearYoung(start: number, end: number): boolean
  /** `test_young`: returns young. */
  testYoung(hva: number): boolean
  /** `release`: the mm is being torn down. */
  release?(): void
}

/** Options of {@link KvmMmuNotifier}. */
export interface KvmMmuNotifierOptions {
  /**
   * `CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG` (selected by x86 since 6.13): `clear_flush_young`
   * does not flush TLBs even when young SPTEs were aged. False gives the older behaviour.
   * @default true
   */
  elideTlbFlushIfYoung?: boolean
}

/** Counters of a {@link KvmMmuNotifier}. */
export interface KvmMmuNotifierStats {
  invalidateStarts: number
  invalidateEnds: number
  /** Start/end pairs that overlapped at least one memslot (took mmu_lock). */
  invalidatesWithSlots: number
  unmapCalls: number
  ageCalls: number
  testAgeCalls: number
  remoteFlushes: number
}

type GfnHandler = (asId: number, slot: Memslot, start: number, end: number) => boolean

/**
 * KVM's `mmu_notifier_ops` (`kvm_mmu_notifier_invalidate_range_start/end`,
 * `kvm_mmu_notifier_clear_flush_young`, `..._clear_young`, `..._test_young`, `..._release`).
 * Each HVA range is clipped to every memslot of every address space it overlaps and converted to
 * a gfn range exactly as `__kvm_handle_hva_range` does; mmu_lock is "taken" (and `on_lock` run)
 * only if some memslot overlaps, so an invalidation that touches no memslot leaves
 * seq/in_progress alone.
 */
export class KvmMmuNotifier implements MmuNotifierOps {
  readonly state: MmuNotifierState
  readonly memslots: Memslots
  listener: MmuNotifierListener
  readonly elideTlbFlushIfYoung: boolean
  readonly stats: KvmMmuNotifierStats = {
    invalidateStarts: 0,
    invalidateEnds: 0,
    invalidatesWithSlots: 0,
    unmapCalls: 0,
    ageCalls: 0,
    testAgeCalls: 0,
    remoteFlushes: 0,
  }

  constructor(memslots: Memslots, listener: MmuNotifierListener, state = new MmuNotifierState(), options: KvmMmuNotifierOptions = {}) {
    this.memslots = memslots
    this.listener = listener
    this.state = state
    this.elideTlbFlushIfYoung = options.elideTlbFlushIfYoung ?? true
    // kvm_swap_active_memslots waits for mn_active_invalidate_count to drop to 0.
    memslots.invalidationActive ??= () => this.state.activeInvalidateCount !== 0
  }

  /**
   * `__kvm_handle_hva_range`: for each address space and each memslot whose HVA range meets
   * [start, end): gfn range = [hva_to_gfn(max(start, slot hva)), hva_to_gfn(min(end, slot end) + 4095)).
   * Returns whether any handler returned true; returns also whether the lock was taken.
   */
  /**
   * The memslot pieces of [start, end) as `__kvm_handle_hva_range` computes them: for each address
   * space and each memslot whose HVA range meets it, gfn range =
   * [hva_to_gfn(max(start, slot hva)), hva_to_gfn(min(end, slot end) + 4095)).
   */
  private *hvaRangeSlots(start: number, end: number): Generator<{ asId: number; slot: Memslot; gStart: number; gEnd: number }, void, void> {
    for (let asId = 0; asId < KVM_ADDRESS_SPACE_NUM; asId++) {
      const set = this.memslots.spaces[asId]!
      for (const slot of set.slotsOverlappingHva(start, end)) {
        const hvaStart = Math.max(start, slot.userspaceAddr)
        const hvaEnd = Math.min(end, slot.userspaceAddr + slot.npages * 4096)
        yield { asId, slot, gStart: hvaToGfnMemslot(hvaStart, slot), gEnd: hvaToGfnMemslot(hvaEnd + 4096 - 1, slot) }
      }
    }
  }

  /**
   * `__kvm_handle_hva_range`: run `handler` on every memslot piece of [start, end) (see
   * {@link hvaRangeSlots}), `onLock` once before the first. Returns whether any handler returned
   * true; returns also whether the lock was taken.
   */
  private handleHvaRange(
    start: number,
    end: number,
    handler: GfnHandler | null,
    onLock: (() => void) | null,
    flushOnRet: boolean,
  ): { ret: boolean; locked: boolean } {
    let ret = false
    let locked = false
    for (const p of this.hvaRangeSlots(start, end)) {
      if (!locked) {
        locked = true
        onLock?.()
        if (handler === null) break
      }
      if (handler?.(p.asId, p.slot, p.gStart, p.gEnd) === true) ret = true
    }
    if (flushOnRet && ret) this.flush()
    return { ret, locked }
  }

  private flush(): void {
    this.stats.remoteFlushes++
    this.listener.flushRemoteTlbs?.()
  }

  /**
   * `kvm_mmu_notifier_invalidate_range_start`: mn_active_invalidate_count++, then under the lock
   * (if a memslot overlaps) `kvm_mmu_invalidate_begin`, and per slot `kvm_mmu_unmap_gfn_range`
   * (= `kvm_mmu_invalidate_range_add` + the MMU's unmap); flush if any unmap asked for it.
   */
  invalidateRangeStart(start: number, end: number, mayBlock = true): void {
    this.stats.invalidateStarts++
    this.state.activeInvalidateCount++
    const l = this.listener
    const r = this.handleHvaRange(
      start,
      end,
      (asId, slot, gs, ge) => {
        this.unmapBegin(gs, ge)
        return l.unmapGfnRange(asId, slot, gs, ge, { mayBlock })
      },
      () => {
        this.lockedBegin(start, end)
      },
      true,
    )
    if (r.locked) this.stats.invalidatesWithSlots++
  }

  /**
   * {@link invalidateRangeStart} as a kernel operation (the real `kvm_mmu_notifier_invalidate_range_start`
   * order): if a memslot overlaps, take mmu_lock for write, `kvm_mmu_invalidate_begin`, per slot
   * range-add and the MMU's unmap — the listener's yielding `unmapGfnRangeOp` when it has one
   * (it may drop and retake the lock when `mayBlock`), else `unmapGfnRange` — flush if asked,
   * unlock. A fault that runs while the unmap yields sees `in_progress` and the range, and retries.
   */
  *invalidateRangeStartOp(start: number, end: number, mayBlock = true): KernelOp {
    this.stats.invalidateStarts++
    this.state.activeInvalidateCount++
    const l = this.listener
    let locked = false
    let ret = false
    try {
      for (const p of this.hvaRangeSlots(start, end)) {
        if (!locked) {
          yield* this.mmuWriteLock()
          locked = true
          this.lockedBegin(start, end)
        }
        this.unmapBegin(p.gStart, p.gEnd)
        const flush = l.unmapGfnRangeOp !== undefined
          ? yield* l.unmapGfnRangeOp(p.asId, p.slot, p.gStart, p.gEnd, { mayBlock })
          : l.unmapGfnRange(p.asId, p.slot, p.gStart, p.gEnd, { mayBlock })
        if (flush) ret = true
      }
      if (ret) this.flush()
    } finally {
      if (locked) this.mmuWriteUnlock()
    }
    if (locked) this.stats.invalidatesWithSlots++
  }

  private *mmuWriteLock(): KernelOp {
    const l = this.listener
    if (l.mmuWriteLock === undefined || l.mmuWriteUnlock === undefined) {
      throw new MmusimError('NOTIFIER_NO_LOCK', 'the notifier listener has no mmuWriteLock/mmuWriteUnlock: the *Op notifier methods cannot take mmu_lock')
    }
    yield* l.mmuWriteLock()
  }

  private mmuWriteUnlock(): void {
    this.listener.mmuWriteUnlock!()
  }

  /** Under the lock, first overlapping slot of a start: `kvm_mmu_invalidate_begin` + on_lock. */
  private lockedBegin(start: number, end: number): void {
    this.state.invalidateBegin()
    this.listener.onInvalidateRangeStart?.(this.state, start, end)
  }

  /** Per slot of a start, before the unmap: `kvm_mmu_invalidate_range_add`. */
  private unmapBegin(gs: number, ge: number): void {
    this.state.invalidateRangeAdd(gs, ge)
    this.stats.unmapCalls++
  }

  /**
   * `kvm_mmu_notifier_invalidate_range_end`: under the lock (if a memslot overlaps)
   * `kvm_mmu_invalidate_end` (seq++, in_progress--), then mn_active_invalidate_count--.
   * Memslots cannot change in between (see {@link Memslots} `invalidationActive`), so the
   * overlap test gives the same answer as at start.
   */
  invalidateRangeEnd(start: number, end: number): void {
    this.stats.invalidateEnds++
    this.handleHvaRange(
      start,
      end,
      null,
      () => {
        this.lockedEnd(start, end)
      },
      false,
    )
    this.endDone()
  }

  /** {@link invalidateRangeEnd} as a kernel operation that takes mmu_lock for write itself. */
  *invalidateRangeEndOp(start: number, end: number): KernelOp {
    this.stats.invalidateEnds++
    if (!this.hvaRangeSlots(start, end).next().done) {
      yield* this.mmuWriteLock()
      try {
        this.lockedEnd(start, end)
      } finally {
        this.mmuWriteUnlock()
      }
    }
    this.endDone()
  }

  private lockedEnd(start: number, end: number): void {
    this.state.invalidateEnd()
    this.listener.onInvalidateRangeEnd?.(this.state, start, end)
  }

  private endDone(): void {
    const st = this.state
    st.activeInvalidateCount--
    if (st.activeInvalidateCount < 0) {
      throw new MmusimError('INVALIDATE_UNBALANCED', 'mn_active_invalidate_count went negative: range_end() without range_start()')
    }
  }

  /** `kvm_mmu_notifier_clear_flush_young` → `kvm_age_gfn` per slot; flush unless elided (6.13+). */
  clearFlushYoung(start: number, end: number): boolean {
    return this.handleHvaRange(start, end, this.ageHandler, null, !this.elideTlbFlushIfYoung).ret
  }

  /** `kvm_mmu_notifier_clear_young` → `kvm_age_gfn`, never flushes. */
  clearYoung(start: number, end: number): boolean {
    return this.handleHvaRange(start, end, this.ageHandler, null, false).ret
  }

  /** `kvm_mmu_notifier_test_young` → `kvm_test_age_gfn` on [hva, hva + 1). */
  testYoung(hva: number): boolean {
    return this.handleHvaRange(
      hva,
      hva + 1,
      (asId, slot, gs, ge) => {
        this.stats.testAgeCalls++
        return this.listener.testAgeGfn(asId, slot, gs, ge)
      },
      null,
      false,
    ).ret
  }

  /**
   * `kvm_mmu_notifier_clear_flush_young` as a kernel operation: `kvm_age_hva_range()` →
   * `__kvm_handle_hva_range()` with `may_block = false` and `lockless` = the listener's
   * {@link MmuNotifierListener.agingLockless}. Unless lockless, mmu_lock is taken for write at
   * the first overlapping memslot and dropped at the end (after the flush); per memslot piece
   * the listener's `ageGfnRangeOp` (or `ageGfnRange`); a remote flush if any was young and the
   * flush is not elided (`CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG`). Returns young.
   */
  *clearFlushYoungOp(start: number, end: number): KernelOp<boolean> {
    return yield* this.ageHvaRangeOp(start, end, false, !this.elideTlbFlushIfYoung)
  }

  /** `kvm_mmu_notifier_clear_young` as a kernel operation (see {@link clearFlushYoungOp}); never flushes. */
  *clearYoungOp(start: number, end: number): KernelOp<boolean> {
    return yield* this.ageHvaRangeOp(start, end, false, false)
  }

  /** `kvm_mmu_notifier_test_young` as a kernel operation on [hva, hva + 1) (see {@link clearFlushYoungOp}). */
  *testYoungOp(hva: number): KernelOp<boolean> {
    return yield* this.ageHvaRangeOp(hva, hva + 1, true, false)
  }

  /** `kvm_age_hva_range()` / `__kvm_handle_hva_range()` for the aging notifiers, as a kernel operation. */
  private *ageHvaRangeOp(start: number, end: number, testOnly: boolean, flushOnRet: boolean): KernelOp<boolean> {
    const l = this.listener
    const lockless = l.agingLockless === true
    let locked = false
    let ret = false
    try {
      for (const p of this.hvaRangeSlots(start, end)) {
        if (!locked && !lockless) {
          yield* this.mmuWriteLock()
          locked = true
        }
        let young: boolean
        if (testOnly) {
          this.stats.testAgeCalls++
          young = l.testAgeGfnOp !== undefined ? yield* l.testAgeGfnOp(p.asId, p.slot, p.gStart, p.gEnd) : l.testAgeGfn(p.asId, p.slot, p.gStart, p.gEnd)
        } else {
          this.stats.ageCalls++
          young = l.ageGfnRangeOp !== undefined ? yield* l.ageGfnRangeOp(p.asId, p.slot, p.gStart, p.gEnd) : l.ageGfnRange(p.asId, p.slot, p.gStart, p.gEnd)
        }
        if (young) ret = true
      }
      if (flushOnRet && ret) this.flush()
    } finally {
      if (locked) this.mmuWriteUnlock()
    }
    return ret
  }

  /** `kvm_mmu_notifier_release` → `kvm_flush_shadow_all`. */
  release(): void {
    this.listener.flushShadowAll?.()
  }

  private readonly ageHandler: GfnHandler = (asId, slot, gs, ge) => {
    this.stats.ageCalls++
    return this.listener.ageGfnRange(asId, slot, gs, ge)
  }
}
