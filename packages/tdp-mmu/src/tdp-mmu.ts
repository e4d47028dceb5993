/**
 * The TDP MMU (arch/x86/kvm/mmu/tdp_mmu.c and the TDP parts of mmu.c), modelled on the newest
 * upstream code described in tdp-mmu.md: roots with the TDP MMU's own reference, RCU-freed page
 * tables, SPTE updates by compare-and-exchange under mmu_lock held for read, the single
 * bookkeeping point (`handle_changed_spte`), frozen-entry teardown of disconnected tables, the
 * multi-pass root zap, the walkers (notifier unmap, aging, dirty logging, eager split, huge-page
 * recovery, NX recovery) and the flush rules F1/F2 as run-time checks.
 *
 * Every operation that can block or is a preemption point is a generator (`KernelOp`) on the VM's
 * scheduler. Synchronous entry points the core calls with mmu_lock held for write (notifier unmap
 * and aging, masked dirty-log clear) drive the same generators with {@link drain}, which refuses
 * to block: they cannot yield (documented divergence from "notifier unmap may yield").
 */
import {
  checkMmioSpte,
  isAccessTrackSpte,
  isFrozenSpte,
  isLargePte,
  isLastSpte,
  isLpageDisallowed,
  isMmioSpte,
  isMmuWritableSpte,
  isShadowPresentPte,
  isWritablePte,
  KVM_MEMSLOT_INVALID,
  KVM_REQ_MMU_FREE_OBSOLETE_ROOTS,
  type KernelOp,
  FaultContinuation,
  PfnMap,
  PF_PENDING,
  KvmError,
  type KvmVcpu,
  makeHugeSpte,
  makeMmioSpte,
  makeNonLeafSpte,
  makeSmallSpte,
  makeSpte,
  type MakeSpteParams,
  makeSpteFormat,
  type Memslot,
  newSpte64,
  type PageFault,
  PREEMPT,
  Refcount,
  restoreAccTrackSpte,
  type Scheduler,
  SHADOW_NONPRESENT_VALUE_HI,
  Spinlock,
  spteAdEnabled,
  spteNeedsAtomicUpdate,
  type SpteFormat,
  spteToPfn,
  spteToString,
  spteWritableInvariantViolation,
  type Vm,
  ACC_ALL,
  FROZEN_SPTE_HI,
  FROZEN_SPTE_LO,
  PT_PRESENT_MASK,
  PT_WRITABLE_MASK,
  kvmSlotDirtyTrackEnabled,
  gfnToHvaMemslot,
  KVM_MEM_READONLY,
  isExecutablePte,
} from '@mmusim/kvm'
import { EptTranslator, MmusimError, NptTranslator, PFERR_I, PFERR_P, PFERR_RSVD, PFERR_W, type PhysMem } from '@mmusim/x86-hw'
import { KvmMmuPage, makeRoleWord, PAGES_PER_LEVEL, ROLE_AD_DISABLED } from './mmu-page.ts'
import type { TdpMmuOptions } from './options.ts'
import { roundGfnForLevel, TdpIter } from './tdp-iter.ts'

// ---- page-fault return codes (mirrors @mmusim/kvm's RET_PF_*, typed as literals) ----
const RET_PF_RETRY = 1
const RET_PF_EMULATE = 2
const RET_PF_INVALID = 4
const RET_PF_FIXED = 5
const RET_PF_SPURIOUS = 6
type RetPf = 0 | 1 | 2 | 3 | 4 | 5 | 6

/** {@link TdpMmu.commitAtomicWrite}'s result when the cmpxchg lost a race. */
const CMPXCHG_FAILED = false

const NP_LO = 0
const NP_HI = SHADOW_NONPRESENT_VALUE_HI

/** A bug in the TDP MMU or a broken invariant (KVM_BUG_ON / WARN turned into an error). */
export class TdpMmuError extends MmusimError {}

/**
 * Run a kernel operation to completion synchronously (the caller holds mmu_lock for write and is
 * not allowed to yield). Costs are charged to the current thread; blocking throws.
 */
export function drain<R>(op: KernelOp<R>, sched: Scheduler, what: string): R {
  for (;;) {
    const r = op.next()
    if (r.done === true) return r.value
    if (typeof r.value === 'number') {
      if (r.value > 0) sched.charge(r.value)
    } else {
      throw new TdpMmuError('TDP_MMU_WOULD_BLOCK', `${what} runs in a synchronous callback (mmu_lock held for write) and may not block, but it waited on ${r.value.describeWait(sched.current!)}`)
    }
  }
}

/** The per-fault state (`struct kvm_page_fault`, the fields the TDP MMU reads). */
export class TdpFault extends FaultContinuation {
  gfn = 0
  write = false
  exec = false
  present = false
  rsvd = false
  prefetch = false
  slot: Memslot | null = null
  /** Host frame of the gfn's 4K page (-1: no slot). */
  pfn = -1
  hostWritable = false
  hostLevel = 1
  mmuSeq = 0
  maxLevel = 1
  reqLevel = 1
  goalLevel = 1
  hugePageDisallowed = false
  // ---- the map walk's state between its steps (see kvmMmuPageFault)
  /** Return value so far (RET_PF_RETRY until the walk decides otherwise). */
  ret: RetPf = RET_PF_RETRY
  /** The SPTE value the pending cmpxchg installs. */
  nLo = 0
  nHi = 0
  /** Target level: the old SPTE was a table that the new huge leaf replaces. */
  replacesTable = false
  /** Target level: the memslot as read before the write (null: MMIO SPTE). */
  targetSlot: Memslot | null = null
  /** Link/split: the new child table. */
  sp: KvmMmuPage | null = null
  // ---- pfRun's state besides the continuation (phase: a PH_* step)
  /** The exit's fault, until pfBegin has decoded it. */
  pf: PageFault | null = null
  /** MAP_TARGET or MAP_LINK: what the pending cmpxchg is for. */
  mapAct = 0
}

/** kvmMmuPageFault's own codes besides RET_PF_*: go on with the slow path; run fast_page_fault() first. */
const PF_GO = -100
const PF_FAST = -101
/** pfLock(): the lockless invalidation pre-check says retry. */
const PF_LOCK_RETRY = -2

// Where pfRun (kvmMmuPageFault's state machine) goes on after a yield.
/** Decode the exit's fault (kvm_mmu_page_fault's start). */
const PH_BEGIN = 0
/** fast_page_fault() returned (fault.opResult). */
const PH_AFTER_FAST = 1
/** kvm_mmu_faultin_pfn(), then GUP's cost. */
const PH_FAULTIN = 2
/** After GUP: the invalidation pre-check and read_lock(mmu_lock). */
const PH_LOCK = 3
/** read_lock() returned after blocking: the fault's work cost. */
const PH_LOCKED = 4
/** mmu_lock held and the work charged: kvm_tdp_mmu_map(). */
const PH_MAP = 5
/** The cmpxchg's cost was charged: do it (tdp_mmu_set_spte_atomic()). */
const PH_COMMIT = 6
/** handle_removed_pt() returned after a successful cmpxchg. */
const PH_AFTER_REMOVED = 7
/** tdp_mmu_split_huge_page() returned (fault.opResult: whether it succeeded). */
const PH_AFTER_SPLIT = 8
/** tdp_mmu_pages_lock taken to track an NX-disallowed page. */
const PH_NX_LOCKED = 9

// Steps of the map walk of kvmMmuPageFault (what pfRun must do next).
/** The walk is over; the result is in `fault.ret` (locks still held). */
const MAP_DONE = 0
/** cmpxchg the target-level SPTE to (fault.nLo, fault.nHi). */
const MAP_TARGET = 1
/** cmpxchg a non-present SPTE to the link of fault.sp. */
const MAP_LINK = 2
/** Split the huge leaf at the iterator into fault.sp. */
const MAP_SPLIT = 3
/** fault.sp was linked for an NX-disallowed huge page: track it under tdp_mmu_pages_lock. */
const MAP_NX_TRACK = 4

/** Per-vCPU MMU state (`vcpu->arch.mmu`): current root, previous roots, scratch objects. */
export class TdpVcpuState {
  /** `root.hpa`: the vCPU owns one reference on it. */
  root: KvmMmuPage | null = null
  /** `prev_roots[KVM_MMU_NUM_PREV_ROOTS]`, each owning a reference while cached. */
  readonly prevRoots: (KvmMmuPage | null)[] = [null, null, null]
  /** root_role.guest_mode (only changed by the prev-roots test API). */
  guestMode = false
  readonly fault = new TdpFault()
  readonly iter: TdpIter
  readonly owner: string

  constructor(mem: PhysMem, id: number) {
    this.iter = new TdpIter(mem)
    this.owner = `vcpu${String(id)}`
  }
}

/** The TDP MMU state of a vCPU. */
export function tdpVcpuState(vcpu: KvmVcpu): TdpVcpuState {
  const st = vcpu.mmuState
  if (!(st instanceof TdpVcpuState)) throw new Error(`vCPU ${String(vcpu.id)} has no TDP MMU state`)
  return st
}

/** Counters of the strategy (`stats()`): events, not gauges KVM already has in `vm.stats`. */
export interface TdpMmuCounters {
  roots_allocated: number
  roots_freed: number
  roots_reused: number
  roots_invalidated: number
  sp_allocated: number
  sp_freed: number
  fault_link_races: number
  atomic_retries: number
  split_huge_pages: number
  recovered_huge_pages: number
  nx_recovered: number
  yields: number
  fast_zaps: number
  tdp_mmu_pages: number
}

/** The TDP MMU of one VM. */
export class TdpMmu {
  readonly vm: Vm
  readonly opts: TdpMmuOptions
  readonly mem: PhysMem
  readonly fmt: SpteFormat
  readonly rootLevel: 4 | 5
  readonly maxHugeLevel: number
  /** `tdp_mmu_max_gfn_exclusive()`. */
  readonly maxGfn: number
  /** `kvm->arch.tdp_mmu_pages_lock`. */
  readonly pagesLock: Spinlock
  /** Every allocated TDP MMU page (linked, or disconnected and awaiting its RCU free), by frame. */
  readonly sps = new PfnMap<KvmMmuPage>()
  /** `kvm->arch.tdp_mmu_roots` (newest first; an RCU list). */
  rootsHead: KvmMmuPage | null = null
  /** `kvm->arch.possible_nx_huge_pages` (FIFO: track at the tail, recover from the head). */
  readonly possibleNx: KvmMmuPage[] = []
  /** Invariant violations recorded by WARN-like checks (reported by audit()). */
  readonly violations: string[] = []
  readonly counters: TdpMmuCounters = {
    roots_allocated: 0,
    roots_freed: 0,
    roots_reused: 0,
    roots_invalidated: 0,
    sp_allocated: 0,
    sp_freed: 0,
    fault_link_races: 0,
    atomic_retries: 0,
    split_huge_pages: 0,
    recovered_huge_pages: 0,
    nx_recovered: 0,
    yields: 0,
    fast_zaps: 0,
    tdp_mmu_pages: 0,
  }
  /** VM teardown in progress (invalidation without mmu_lock is allowed; F7: no flushes). */
  teardown = false
  /** Per thread id: remote_tlb_flush count when a leaf was zapped without a flush since (F1), or -1. */
  private readonly owedLeafFlush: number[] = []
  /** Per thread id: the same for disconnected tables (F2). */
  private readonly owedTableFlush: number[] = []
  private readonly tmp = newSpte64()
  /** Scratch parameters of {@link makeSpte} (filled completely before every use). */
  private readonly spteParams: MakeSpteParams
  /** Value returned by the last {@link writeSpte} (the SPTE actually replaced). */
  private wLo = 0
  private wHi = 0
  private readonly hz: TdpMmuOptions['testHazards']
  private readonly pre64: boolean
  private readonly adDisabled: boolean
  /** Costs the fault path yields, read once (the cost model is immutable): GUP's host walk (two DRAM references), the fault's work, a cmpxchg. */
  private readonly gupNs: number
  private readonly mmuFaultWorkNs: number
  private readonly spteCmpxchgNs: number

  constructor(vm: Vm, opts: TdpMmuOptions) {
    this.vm = vm
    this.opts = opts
    this.mem = vm.host.mem
    this.hz = opts.testHazards
    this.pre64 = opts.rootLifecycle === 'pre-6.4'
    const f = vm.features
    this.fmt =
      opts.format === 'ept'
        ? makeSpteFormat('ept', { adEnabled: opts.adEnabled, execOnly: f.eptExecOnly, maxPhyAddr: f.maxPhyAddr })
        : makeSpteFormat('x86', { maxPhyAddr: f.maxPhyAddr })
    this.adDisabled = !this.fmt.adEnabled
    this.spteParams = { hpa: 0, level: 1, writable: false, user: true, exec: false, accessed: false, dirty: false, hostWritable: false, mmuWritable: false, adEnabled: this.fmt.adEnabled }
    this.rootLevel = opts.levels
    this.maxHugeLevel = opts.format === 'ept' ? (f.ept1G ? 3 : f.ept2M ? 2 : 1) : f.gbPages ? 3 : 2
    this.maxGfn = 2 ** (f.maxPhyAddr - 12)
    this.pagesLock = new Spinlock(vm.sched, 'tdp_mmu_pages_lock')
    const costs = vm.sched.costs
    this.gupNs = costs.dramRef * 2
    this.mmuFaultWorkNs = costs.mmuFaultWork
    this.spteCmpxchgNs = costs.spteCmpxchg
  }

  // ================================================================== small helpers

  private get sched(): Scheduler {
    return this.vm.sched
  }

  /** A reference owner name for the current thread (iterators' transient references). */
  private threadOwner(): string {
    const t = this.sched.current
    return t === null ? 'callback' : `t${String(t.id)}`
  }

  private adjustPages(level: number, delta: number): void {
    const s = this.vm.stats
    if (level === 1) s.pages_4k += delta
    else if (level === 2) s.pages_2m += delta
    else s.pages_1g += delta
  }

  private warn(msg: string): void {
    this.violations.push(msg)
  }

  private bug(msg: string): never {
    throw new TdpMmuError('TDP_MMU_BUG', `KVM_BUG_ON: ${msg}`)
  }

  /** kvm_flush_remote_tlbs() (satisfies every owed flush: the count moves on). */
  flushRemoteTlbs(): void {
    this.vm.flushRemoteTlbs()
  }

  private owe(arr: number[]): void {
    const t = this.sched.current
    if (t === null) return
    const now = this.vm.stats.remote_tlb_flush
    arr[t.id] = now
  }

  private isOwed(arr: number[]): boolean {
    const t = this.sched.current
    if (t === null) return false
    const v = arr[t.id]
    return v !== undefined && v >= 0 && v === this.vm.stats.remote_tlb_flush
  }

  /** F1: leaving mmu_lock with a zapped-but-unflushed SPTE is a bug. */
  private checkF1(where: string): void {
    if (this.isOwed(this.owedLeafFlush)) {
      throw new TdpMmuError('MISSING_TLB_FLUSH', `F1 violated at ${where}: mmu_lock is dropped while a zapped SPTE of a valid root has not been flushed from remote TLBs (tdp-mmu.md §5.6, S6)`)
    }
  }

  /** F2: leaving RCU after disconnecting a table without a flush is a bug. */
  private checkF2(where: string): void {
    if (this.isOwed(this.owedTableFlush)) {
      throw new TdpMmuError('MISSING_TLB_FLUSH', `F2 violated at ${where}: the RCU read-side section is left after page tables were disconnected but before the remote TLB flush (tdp-mmu.md §5.6, S7)`)
    }
  }

  /** rcu_read_unlock() with the F2 check. */
  rcuUnlock(where: string): void {
    this.checkF2(where)
    this.vm.rcu.readUnlock()
  }

  /** read_unlock / write_unlock of mmu_lock with the F1 check. */
  mmuUnlock(mode: 'read' | 'write', where: string): void {
    this.checkF1(where)
    this.vm.mmuLock.unlock(mode)
  }

  /** Look up the SP of a table by its host-physical address. */
  spOfTable(hpa: number): KvmMmuPage {
    const sp = this.sps.get(hpa / 4096)
    if (sp === undefined) this.bug(`no TDP MMU page at 0x${hpa.toString(16)}`)
    return sp
  }

  /** `spte_to_child_sp`. */
  private childSp(lo: number, hi: number): KvmMmuPage {
    return this.spOfTable(spteToPfn(lo, hi) * 4096)
  }

  // ================================================================== page allocation

  /**
   * tdp_mmu_alloc_sp + tdp_mmu_init_sp: a table page pre-filled with SHADOW_NONPRESENT_VALUE
   * (≈6.10+), from the vCPU caches (never fails in the model).
   */
  private allocSp(level: number, gfn: number, role: number, asId: number, ptep: number): KvmMmuPage {
    const hpa = this.vm.allocMmuPage()
    const m = this.mem
    for (let i = 0; i < 512; i++) m.write32(hpa + i * 8 + 4, NP_HI)
    const sp = new KvmMmuPage(hpa, level, gfn, role, asId, ptep)
    this.sps.set(sp.frame, sp)
    this.counters.sp_allocated++
    return sp
  }

  /** tdp_mmu_alloc_sp for a child of the iterator's current entry (tdp_mmu_init_child_sp). */
  private allocChildSp(iter: TdpIter): KvmMmuPage {
    const parent = this.spOfTable(iter.ptPath[iter.level]!)
    return this.allocSp(iter.level - 1, iter.gfn, (parent.role & ~0xf) | (iter.level - 1), parent.asId, iter.sptep)
  }

  /** tdp_mmu_free_sp(). */
  private freeSp(sp: KvmMmuPage): void {
    if (sp.freed) this.bug(`${sp.label} freed twice`)
    if (sp.onPossibleNxList) this.bug(`${sp.label} freed while on the possible NX huge page list (S15)`)
    sp.freed = true
    this.sps.delete(sp.frame)
    this.counters.sp_freed++
    this.vm.freeMmuPage(sp.hpa)
  }

  /** tdp_mmu_free_sp_rcu_callback(). Roots must be empty by now (they were zapped before the last put). */
  private readonly freeSpRcuCallback = (sp: KvmMmuPage): void => {
    if (sp.isRoot) {
      const m = this.mem
      for (let i = 0; i < 512; i++) {
        const lo = m.read32(sp.hpa + i * 8)
        if (isShadowPresentPte(lo)) {
          this.warn(`${sp.label} freed with a present SPTE at index ${String(i)} (${spteToString(lo, m.read32(sp.hpa + i * 8 + 4), this.fmt)}): its subtree leaks (S12)`)
          break
        }
      }
      this.counters.roots_freed++
    }
    this.freeSp(sp)
  }

  // ================================================================== roots (§3)

  /** kvm_tdp_mmu_get_root(): refcount_inc_not_zero. */
  getRoot(root: KvmMmuPage, owner: string): boolean {
    const rc = root.rootCount!
    if (this.hz.plainIncInNextRoot) {
      rc.inc(owner)
      return true
    }
    return rc.incNotZero(owner)
  }

  /** kvm_tdp_mmu_put_root(): dec-and-test; the last put deletes the root from the list and frees it via RCU. */
  *putRoot(root: KvmMmuPage, owner: string): KernelOp {
    if (!root.rootCount!.decAndTest(owner)) return
    if (this.pre64 && !root.invalid) {
      // ≤ 6.3 (5.13–5.17 shape, synchronous): the last vCPU put tears a valid root down. Nobody can
      // take a reference any more (count 0), so marking it invalid is invisible to readers.
      root.invalid = true
      const mode = this.vm.mmuLock.heldByCurrent()
      if (mode === 'none') this.bug(`last put of ${root.label} without mmu_lock`)
      yield* this.tdpMmuZapRoot(root, mode === 'read', false)
    }
    if (!root.invalid) this.bug(`last reference of ${root.label} put while it is still valid (I-R2)`)
    yield* this.pagesLock.lock()
    this.listDelRcu(root)
    this.pagesLock.unlock()
    this.vm.rcu.callRcu(this.freeSpRcuCallback, root)
  }

  private listAddHeadRcu(root: KvmMmuPage): void {
    root.next = this.rootsHead
    root.prev = null
    if (this.rootsHead !== null) this.rootsHead.prev = root
    this.rootsHead = root
    root.onList = true
  }

  /** list_del_rcu(): unlink, keeping `next` for concurrent walkers. */
  private listDelRcu(root: KvmMmuPage): void {
    if (!root.onList) this.bug(`${root.label} deleted from the root list twice`)
    if (root.prev !== null) root.prev.next = root.next
    else this.rootsHead = root.next
    if (root.next !== null) root.next.prev = root.prev
    root.onList = false
  }

  /**
   * tdp_mmu_next_root(): the next root after `prev` (or the first) matching `asId` (-1: all) and,
   * if `onlyValid`, valid; takes a reference on it, then puts `prev`. mmu_lock held in any mode.
   */
  *tdpMmuNextRoot(prev: KvmMmuPage | null, asId: number, onlyValid: boolean, owner: string): KernelOp<KvmMmuPage | null> {
    this.vm.mmuLock.assertHeld('any')
    const rcu = this.vm.rcu
    rcu.readLock()
    let next = prev === null ? this.rootsHead : prev.next
    while (next !== null) {
      if ((asId < 0 || next.asId === asId) && (!onlyValid || !next.invalid) && this.getRoot(next, owner)) break
      next = next.next
    }
    rcu.readUnlock()
    if (prev !== null) yield* this.putRoot(prev, owner)
    return next
  }

  /** The non-yielding, reference-free root walk (`__for_each_tdp_mmu_root`): mmu_lock held for write. */
  rootsWriteLocked(asId: number, onlyValid: boolean): KvmMmuPage[] {
    this.vm.mmuLock.assertHeld('write')
    const out: KvmMmuPage[] = []
    for (let r = this.rootsHead; r !== null; r = r.next) {
      if ((asId < 0 || r.asId === asId) && (!onlyValid || !r.invalid)) out.push(r)
    }
    return out
  }

  /** The role a root must have for this vCPU (`root_role`). */
  rootRole(vcpu: KvmVcpu, st: TdpVcpuState): number {
    return makeRoleWord(this.rootLevel, vcpu.asId === 1, this.adDisabled, st.guestMode)
  }

  /**
   * kvm_tdp_mmu_alloc_root() (≈6.9+): under mmu_lock held for read, reuse a valid root of the
   * same role (the iterator's reference becomes the vCPU's), else recheck under
   * tdp_mmu_pages_lock and allocate one with refcount 2 (vCPU + TDP MMU; 1 before 6.4).
   */
  *kvmTdpMmuAllocRoot(vcpu: KvmVcpu, st: TdpVcpuState): KernelOp<KvmMmuPage> {
    const role = this.rootRole(vcpu, st)
    const asId = vcpu.asId
    const lock = this.vm.mmuLock
    yield* lock.readLock()
    let found: KvmMmuPage | null = null
    for (let r = yield* this.tdpMmuNextRoot(null, asId, true, st.owner); r !== null; r = yield* this.tdpMmuNextRoot(r, asId, true, st.owner)) {
      if (r.role === role) {
        found = r // leaving the loop keeps the reference: it is the vCPU's now
        break
      }
    }
    if (found !== null) this.counters.roots_reused++
    else {
      yield* this.pagesLock.lock()
      for (let r = this.rootsHead; r !== null; r = r.next) {
        if (!r.invalid && r.role === role) {
          if (!this.getRoot(r, st.owner)) this.bug(`valid ${r.label} has refcount 0`)
          found = r
          this.counters.roots_reused++
          break
        }
      }
      if (found === null) {
        const r = this.allocSp(this.rootLevel, 0, role, asId, -1)
        r.rootCount = new Refcount(this.pre64 ? 1 : 2, {
          name: `${r.label} tdp_mmu_root_count`,
          trackOwners: true,
          owners: this.pre64 ? [st.owner] : ['tdp_mmu', st.owner],
        })
        r.translator =
          this.opts.format === 'ept'
            ? new EptTranslator(this.mem, this.vm.features, { root: r.hpa, levels: this.rootLevel, adEnabled: this.fmt.adEnabled })
            : new NptTranslator(this.mem, this.vm.features, { ncr3: r.hpa, levels: this.rootLevel, hostNxe: true })
        this.listAddHeadRcu(r)
        r.rootCount.publish()
        this.counters.roots_allocated++
        found = r
      }
      this.pagesLock.unlock()
    }
    lock.readUnlock()
    return found
  }

  /**
   * kvm_tdp_mmu_invalidate_roots(): mark every valid root invalid and scheduled-to-zap, gifting the
   * TDP MMU's reference to the zapper (pre-6.4: take a reference for it). mmu_lock held for write
   * (waived at VM destruction).
   */
  kvmTdpMmuInvalidateRoots(): void {
    if (!this.teardown) this.vm.mmuLock.assertHeld('write')
    for (let r = this.rootsHead; r !== null; r = r.next) {
      if (r.invalid) continue
      if (this.pre64 && !this.getRoot(r, 'tdp_mmu')) continue
      r.scheduledToZap = true
      r.invalid = true
      this.counters.roots_invalidated++
    }
  }

  /**
   * kvm_tdp_mmu_zap_invalidated_roots(kvm, shared): zap every root still owing its zap, then put
   * the gifted reference — after the zap (I-R4), exactly once (I-R6). Caller holds slots_lock.
   */
  *kvmTdpMmuZapInvalidatedRoots(shared: boolean): KernelOp {
    const mode = shared ? 'read' : 'write'
    yield* this.vm.mmuLock.lock(mode)
    const owner = this.threadOwner()
    for (let r = yield* this.tdpMmuNextRoot(null, -1, false, owner); r !== null; r = yield* this.tdpMmuNextRoot(r, -1, false, owner)) {
      if (this.hz.rezapInvalidRoots ? !r.invalid : !r.scheduledToZap) continue
      r.scheduledToZap = false
      if (!r.invalid) this.bug(`${r.label} scheduled to zap but valid`)
      r.invalidatedZaps++
      // No TLB flush: every vCPU was kicked and reloads with a local flush (F6).
      yield* this.tdpMmuZapRoot(r, shared, true)
      yield* this.putRoot(r, 'tdp_mmu')
    }
    this.mmuUnlock(mode, 'kvm_tdp_mmu_zap_invalidated_roots')
  }

  /**
   * kvm_mmu_zap_all_fast(): invalidate every root and request FREE_OBSOLETE_ROOTS in the same
   * write-locked section, then zap the invalidated roots under the read lock. Caller holds slots_lock.
   */
  *kvmMmuZapAllFast(): KernelOp {
    this.vm.slotsLock.assertHeld()
    this.counters.fast_zaps++
    yield* this.vm.mmuLock.writeLock()
    this.kvmTdpMmuInvalidateRoots()
    this.vm.makeAllCpusRequest(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
    this.mmuUnlock('write', 'kvm_mmu_zap_all_fast')
    yield* this.kvmTdpMmuZapInvalidatedRoots(true)
  }

  // ================================================================== vCPU roots (§3.6)

  /** kvm_mmu_free_roots(kvm, mmu, mask) for TDP: mmu_lock held for read, put each selected root. */
  *kvmMmuFreeRoots(st: TdpVcpuState, current: boolean, prevMask: number, onlyObsolete: boolean): KernelOp {
    const lock = this.vm.mmuLock
    yield* lock.readLock()
    if (current && st.root !== null && (!onlyObsolete || st.root.invalid)) {
      const r = st.root
      st.root = null
      yield* this.putRoot(r, st.owner)
    }
    for (let i = 0; i < st.prevRoots.length; i++) {
      const r = st.prevRoots[i] ?? null
      if (r === null || (prevMask & (1 << i)) === 0 || (onlyObsolete && !r.invalid)) continue
      st.prevRoots[i] = null
      yield* this.putRoot(r, st.owner)
    }
    lock.readUnlock()
  }

  /**
   * Root-role switch with the prev-roots cache (kvm_mmu_new_pgd → fast_pgd_switch →
   * cached_root_find_and_keep_current, as for L1↔L2 transitions): the current root moves into
   * prev_roots (evicting the LRU entry, whose reference is put); a cached root of the new role,
   * if any, becomes current. Otherwise the next kvm_mmu_reload allocates one.
   */
  *switchRootRole(vcpu: KvmVcpu, st: TdpVcpuState, guestMode: boolean): KernelOp {
    if (st.guestMode === guestMode) return
    st.guestMode = guestMode
    const want = this.rootRole(vcpu, st)
    const cur = st.root
    let hit = -1
    for (let i = 0; i < st.prevRoots.length; i++) {
      const r = st.prevRoots[i] ?? null
      if (r !== null && !r.invalid && r.role === want) {
        hit = i
        break
      }
    }
    let evicted: KvmMmuPage | null = null
    if (hit >= 0) {
      const r = st.prevRoots[hit]!
      st.prevRoots.splice(hit, 1)
      st.prevRoots.unshift(cur)
      st.root = r
    } else {
      evicted = st.prevRoots.pop() ?? null
      st.prevRoots.unshift(cur)
      st.root = null
    }
    if (evicted !== null) {
      yield* this.vm.mmuLock.readLock()
      yield* this.putRoot(evicted, st.owner)
      this.vm.mmuLock.readUnlock()
    }
    if (st.root !== null) {
      vcpu.hw.setTdpMode(this.mem, st.root.translator!, 1)
      vcpu.hw.flushCurrent()
    }
  }

  // ================================================================== SPTE updates (§5)

  /**
   * kvm_tdp_mmu_write_spte(): a volatile present leaf is replaced by an atomic exchange and the
   * value actually replaced is returned; anything else by a plain store (returning `old`). A
   * plain store that overwrites a concurrent change other than the (tolerated, lossy) Accessed
   * bit is recorded as a lost update (S11).
   */
  private *writeSpte(sptep: number, oldLo: number, oldHi: number, newLo: number, newHi: number, level: number): KernelOp<boolean> {
    yield this.sched.costs.memoryRef // the store; other CPUs run between the caller's read and it
    return this.writeSpteStore(sptep, oldLo, oldHi, newLo, newHi, level)
  }

  /** {@link writeSpte} after its window: the store itself. */
  private writeSpteStore(sptep: number, oldLo: number, oldHi: number, newLo: number, newHi: number, level: number): boolean {
    const m = this.mem
    const curLo = m.read32(sptep)
    const curHi = m.read32(sptep + 4)
    m.write32(sptep, newLo)
    m.write32(sptep + 4, newHi)
    const volatile = isShadowPresentPte(oldLo) && isLastSpte(oldLo, level) && spteNeedsAtomicUpdate(this.fmt, oldLo, oldHi)
    if (volatile && !this.hz.plainWriteForVolatile) {
      this.wLo = curLo
      this.wHi = curHi
      return true
    }
    const a = this.fmt.accessedLo
    if (((curLo ^ oldLo) & ~a) !== 0 || curHi !== oldHi >>> 0) {
      this.warn(
        `lost update at 0x${sptep.toString(16)}: a plain store replaced ${spteToString(curLo, curHi, this.fmt)} believing it was ${spteToString(oldLo, oldHi, this.fmt)} (a volatile bit set by the CPU or the fast page fault was dropped, S11)`,
      )
    }
    this.wLo = oldLo
    this.wHi = oldHi
    return false
  }


  /**
   * tdp_mmu_set_spte_atomic(): one cmpxchg from iter.old_spte to `new` under mmu_lock held for
   * read. On failure iter.old_spte holds the current value and nothing else happened (-EBUSY).
   * The hot fault path inlines this sequence (check, yield, commit) in its own frame; keep the two
   * in step.
   */
  *tdpMmuSetSpteAtomic(iter: TdpIter, newLo: number, newHi: number, flushable: boolean): KernelOp<boolean> {
    this.checkAtomicWrite(iter)
    // The cmpxchg's cost, and the window in which other CPUs may change the SPTE under our feet.
    yield this.sched.costs.spteCmpxchg
    const r = this.commitAtomicWrite(iter, newLo, newHi, flushable)
    if (r === CMPXCHG_FAILED) return false
    // handle_changed_spte()'s generator part only when a table was removed (rare).
    if (r !== null) yield* this.handleRemovedPt(r, true, flushable)
    return true
  }

  /** tdp_mmu_set_spte_atomic()'s checks, made before its cmpxchg window opens. */
  private checkAtomicWrite(iter: TdpIter): void {
    this.vm.mmuLock.assertHeld('read')
    if (iter.yielded) this.bug('SPTE write with a yielded iterator')
    if (isFrozenSpte(iter.oldLo, iter.oldHi)) this.bug('cmpxchg from a FROZEN SPTE')
  }

  /**
   * tdp_mmu_set_spte_atomic() after its cmpxchg window: the cmpxchg itself and the non-yielding
   * part of handle_changed_spte(). Returns {@link CMPXCHG_FAILED} (iter.old_spte refreshed), or
   * the table the change disconnected (the caller must run handle_removed_pt() on it), or null.
   */
  private commitAtomicWrite(iter: TdpIter, newLo: number, newHi: number, flushable: boolean): KvmMmuPage | null | typeof CMPXCHG_FAILED {
    const oldLo = iter.oldLo
    const oldHi = iter.oldHi
    if (!this.mem.cmpxchg64(iter.sptep, oldLo, oldHi, newLo >>> 0, newHi >>> 0)) {
      iter.read()
      this.counters.atomic_retries++
      return CMPXCHG_FAILED
    }
    return this.changedSpteBookkeeping(iter.asId, iter.gfn, oldLo, oldHi, newLo >>> 0, newHi >>> 0, iter.level, flushable)
  }

  /** tdp_mmu_iter_set_spte(): a write-lock update; iter.old_spte becomes the value replaced. */
  *tdpMmuIterSetSpte(iter: TdpIter, newLo: number, newHi: number, flushable: boolean): KernelOp {
    this.checkIterSetSpte(iter, newLo, newHi)
    yield this.sched.costs.memoryRef // writeSpte's store window
    const removed = this.commitIterSetSpte(iter, newLo, newHi, flushable)
    if (removed !== null) yield* this.handleRemovedPt(removed, false, flushable)
  }

  /** tdp_mmu_iter_set_spte()'s checks, before its store window (hot walkers inline the sequence). */
  private checkIterSetSpte(iter: TdpIter, newLo: number, newHi: number): void {
    this.vm.mmuLock.assertHeld('write')
    if (iter.yielded) this.bug('SPTE write with a yielded iterator')
    if (isFrozenSpte(iter.oldLo, iter.oldHi) || isFrozenSpte(newLo, newHi)) this.bug('tdp_mmu_set_spte to or from FROZEN')
  }

  /**
   * tdp_mmu_iter_set_spte() after its store window: the store, iter.old_spte = the value
   * replaced, and handle_changed_spte()'s non-yielding part. Returns the table the change
   * disconnected (the caller runs handle_removed_pt() on it) or null.
   */
  private commitIterSetSpte(iter: TdpIter, newLo: number, newHi: number, flushable: boolean): KvmMmuPage | null {
    this.writeSpteStore(iter.sptep, iter.oldLo, iter.oldHi, newLo >>> 0, newHi >>> 0, iter.level)
    const oLo = this.wLo
    const oHi = this.wHi
    iter.oldLo = oLo
    iter.oldHi = oHi
    return this.changedSpteBookkeeping(iter.asId, iter.gfn, oLo, oHi, newLo >>> 0, newHi >>> 0, iter.level, flushable)
  }

  /**
   * handle_changed_spte(): the single bookkeeping point (§5.3). `flushable`: the root is valid, so
   * a zap creates a flush obligation (F1/F2); invalid roots and teardown need none (F6/F7).
   */
  *handleChangedSpte(asId: number, gfn: number, oldLo: number, oldHi: number, newLo: number, newHi: number, level: number, shared: boolean, flushable: boolean): KernelOp {
    const removed = this.changedSpteBookkeeping(asId, gfn, oldLo, oldHi, newLo, newHi, level, flushable)
    if (removed !== null) yield* this.handleRemovedPt(removed, shared, flushable)
  }

  /**
   * The non-yielding part of {@link handleChangedSpte}: checks and accounting. Returns the child
   * table the change disconnected (the caller must run handle_removed_pt() on it), or null.
   */
  private changedSpteBookkeeping(asId: number, gfn: number, oldLo: number, oldHi: number, newLo: number, newHi: number, level: number, flushable: boolean): KvmMmuPage | null {
    const wasP = isShadowPresentPte(oldLo)
    const isP = isShadowPresentPte(newLo)
    const wasLeaf = wasP && isLastSpte(oldLo, level)
    const isLeaf = isP && isLastSpte(newLo, level)
    const pfnChanged = spteToPfn(oldLo, oldHi) !== spteToPfn(newLo, newHi)
    if (wasLeaf && isLeaf && pfnChanged) {
      this.bug(`leaf SPTE for gfn 0x${gfn.toString(16)} L${String(level)} changed pfn without going through non-present: ${spteToString(oldLo, oldHi, this.fmt)} → ${spteToString(newLo, newHi, this.fmt)}`)
    }
    if (oldLo === newLo && oldHi === newHi) return null
    if (isLeaf) {
      const bad = spteWritableInvariantViolation(this.fmt, newLo, newHi)
      if (bad !== null) this.bug(`check_spte_writable_invariants: ${bad}`)
    }
    if (!wasP && !isP) {
      if (!isMmioSpte(this.fmt, oldLo, oldHi) && !isMmioSpte(this.fmt, newLo, newHi) && !isFrozenSpte(newLo, newHi)) {
        this.warn(`illegal non-present → non-present change for gfn 0x${gfn.toString(16)} as_id ${String(asId)} L${String(level)}: ${spteToString(oldLo, oldHi, this.fmt)} → ${spteToString(newLo, newHi, this.fmt)}`)
      }
      return null
    }
    if (wasLeaf !== isLeaf) this.adjustPages(level, isLeaf ? 1 : -1)
    if (flushable && wasLeaf && !isP) this.owe(this.owedLeafFlush)
    if (wasP && !wasLeaf && (isLeaf || !isP || pfnChanged)) {
      if (!isLeaf && isP) this.warn(`non-leaf SPTE for gfn 0x${gfn.toString(16)} changed its child table in place`)
      if (flushable) {
        this.owe(this.owedLeafFlush)
        this.owe(this.owedTableFlush)
      }
      return this.childSp(oldLo, oldHi)
    }
    return null
  }

  /**
   * handle_removed_pt(): tear down a disconnected table, exactly once, by the thread that
   * disconnected it. Shared: exchange every entry with FROZEN (spinning while another owner holds
   * one frozen) so stale walkers' cmpxchgs fail; exclusive: replace present entries (atomically
   * if volatile). Each old value is bookkept; the table is freed after an RCU grace period.
   */
  private *handleRemovedPt(sp: KvmMmuPage, shared: boolean, flushable: boolean): KernelOp {
    yield* this.tdpMmuUnlinkSp(sp)
    const m = this.mem
    const per = PAGES_PER_LEVEL[sp.level]!
    for (let i = 0; i < 512; i++) {
      const ea = sp.hpa + i * 8
      const gfn = sp.gfn + i * per
      let oLo: number
      let oHi: number
      if (shared) {
        if (this.hz.readRemovalWithoutFreeze) {
          oLo = m.read32(ea)
          oHi = m.read32(ea + 4)
          if (!isShadowPresentPte(oLo)) continue
          yield* this.handleChangedSpte(sp.asId, gfn, oLo, oHi, NP_LO, NP_HI, sp.level, shared, flushable)
          yield PREEMPT
          continue
        }
        for (;;) {
          oLo = m.read32(ea)
          oHi = m.read32(ea + 4)
          m.write32(ea, FROZEN_SPTE_LO)
          m.write32(ea + 4, FROZEN_SPTE_HI)
          if (!isFrozenSpte(oLo, oHi)) break
          yield PREEMPT // someone else holds it frozen: spin (S10)
        }
      } else {
        oLo = m.read32(ea)
        oHi = m.read32(ea + 4)
        if (!isShadowPresentPte(oLo)) continue
        yield* this.writeSpte(ea, oLo, oHi, FROZEN_SPTE_LO, FROZEN_SPTE_HI, sp.level)
        oLo = this.wLo
        oHi = this.wHi
      }
      yield* this.handleChangedSpte(sp.asId, gfn, oLo, oHi, FROZEN_SPTE_LO, FROZEN_SPTE_HI, sp.level, shared, flushable)
      if (isShadowPresentPte(oLo)) yield PREEMPT
    }
    this.vm.rcu.callRcu(this.freeSpRcuCallback, sp)
  }

  /** tdp_mmu_unlink_sp(): unaccount; clear nx_huge_page_disallowed and untrack under the pages lock. */
  private *tdpMmuUnlinkSp(sp: KvmMmuPage): KernelOp {
    this.counters.tdp_mmu_pages--
    if (!sp.nxHugePageDisallowed) return
    yield* this.pagesLock.lock()
    sp.nxHugePageDisallowed = false
    if (sp.onPossibleNxList) this.untrackPossibleNxHugePage(sp)
    this.pagesLock.unlock()
  }

  /** track_possible_nx_huge_page() (tdp_mmu_pages_lock held). */
  private trackPossibleNxHugePage(sp: KvmMmuPage): void {
    this.pagesLock.assertHeld()
    if (sp.onPossibleNxList) return
    sp.onPossibleNxList = true
    this.possibleNx.push(sp)
    this.vm.stats.nx_lpage_splits++
  }

  /** untrack_possible_nx_huge_page() (tdp_mmu_pages_lock held). */
  private untrackPossibleNxHugePage(sp: KvmMmuPage): void {
    this.pagesLock.assertHeld()
    const i = this.possibleNx.indexOf(sp)
    if (i < 0) this.bug(`${sp.label} not on the possible NX list`)
    this.possibleNx.splice(i, 1)
    sp.onPossibleNxList = false
    this.vm.stats.nx_lpage_splits--
  }

  /** make_nonleaf_spte() for a link to `sp`, in `this.tmp`. */
  private nonLeafSpteFor(sp: KvmMmuPage): { lo: number; hi: number } {
    return makeNonLeafSpte(this.tmp, this.fmt, sp.hpa, (sp.role & ROLE_AD_DISABLED) !== 0)
  }

  /** tdp_mmu_link_sp(): install a non-leaf SPTE pointing at `sp` and account it (inlined in {@link kvmMmuPageFault}). */
  private *tdpMmuLinkSp(iter: TdpIter, sp: KvmMmuPage, shared: boolean): KernelOp<boolean> {
    const t = this.nonLeafSpteFor(sp)
    const lo = t.lo
    const hi = t.hi
    if (shared) {
      if (!(yield* this.tdpMmuSetSpteAtomic(iter, lo, hi, true))) return false
    } else {
      yield* this.tdpMmuIterSetSpte(iter, lo, hi, true)
    }
    this.counters.tdp_mmu_pages++
    return true
  }

  /**
   * tdp_mmu_split_huge_page(): fill `sp` with the 512 equivalent smaller SPTEs of the huge leaf
   * (unpublished: plain stores), link it in place of the leaf (no flush needed, F4), then account
   * 512 leaves one level down.
   */
  private *tdpMmuSplitHugePage(iter: TdpIter, sp: KvmMmuPage, shared: boolean): KernelOp<boolean> {
    const hLo = iter.oldLo
    const hHi = iter.oldHi
    const m = this.mem
    const t = this.tmp
    const nx = this.opts.nxHugePages
    for (let i = 0; i < 512; i++) {
      makeSmallSpte(t, hLo, hHi, sp.level, i)
      // make_small_spte(): 4K children of a huge page are executable again under the NX mitigation.
      if (sp.level === 1 && nx) this.makeSpteExecutable(t)
      m.write32(sp.hpa + i * 8, t.lo)
      m.write32(sp.hpa + i * 8 + 4, t.hi)
    }
    if (!(yield* this.tdpMmuLinkSp(iter, sp, shared))) return false
    this.adjustPages(sp.level, 512)
    this.counters.split_huge_pages++
    return true
  }

  /** make_spte_executable(). */
  private makeSpteExecutable(t: { lo: number; hi: number }): void {
    let lo = t.lo
    let hi = t.hi
    if (isAccessTrackSpte(this.fmt, lo, hi)) {
      // The saved X bit is restored with the others.
      hi |= (this.fmt.xLo << 22) >>> 0
    } else {
      lo |= this.fmt.xLo
    }
    hi &= ~this.fmt.nxHi
    t.lo = lo >>> 0
    t.hi = hi >>> 0
  }

  /** make_spte_nonexecutable(). */
  private makeSpteNonExecutable(t: { lo: number; hi: number }): void {
    t.lo = (t.lo & ~this.fmt.xLo) >>> 0
    t.hi = (t.hi | this.fmt.nxHi) >>> 0
  }

  // ================================================================== yielding (§4.3)

  /**
   * tdp_mmu_iter_cond_resched(): if a reschedule is due or mmu_lock is contended, and the walk
   * moved since its last (re)start, flush what is pending, leave RCU, drop and retake mmu_lock,
   * re-enter RCU and mark the iterator yielded.
   */
  *tdpMmuIterCondResched(iter: TdpIter, flush: boolean, shared: boolean): KernelOp<boolean> {
    const due = this.condReschedDue(iter)
    if (due === 0) return false
    yield* this.tdpMmuIterYield(iter, flush, shared, due === 1)
    return true
  }

  /**
   * tdp_mmu_iter_cond_resched()'s decision, without a generator (hot walkers call it on every
   * entry and enter {@link tdpMmuIterYield} only when it says so): 0 = go on, 1 = a reschedule
   * is due, 2 = mmu_lock is contended.
   */
  private condReschedDue(iter: TdpIter): number {
    if (iter.yielded) this.bug('cond_resched with an already yielded iterator')
    const resched = this.sched.needResched()
    if (!resched && !this.vm.mmuLock.needBreak()) return 0
    if (!this.hz.noForwardProgressRule && iter.nextLastLevelGfn === iter.yieldedGfn) return 0
    return resched ? 1 : 2
  }

  /** tdp_mmu_iter_cond_resched()'s yield, once {@link condReschedDue} said so. */
  private *tdpMmuIterYield(iter: TdpIter, flush: boolean, shared: boolean, resched: boolean): KernelOp {
    const sched = this.sched
    const lock = this.vm.mmuLock
    if (flush && !this.hz.noFlushBeforeYield && !this.hz.flushAfterRcuUnlock) this.flushRemoteTlbs()
    this.rcuUnlock('tdp_mmu_iter_cond_resched')
    if (flush && this.hz.flushAfterRcuUnlock) this.flushRemoteTlbs()
    const mode = shared ? 'read' : 'write'
    this.mmuUnlock(mode, 'tdp_mmu_iter_cond_resched')
    if (resched) {
      yield sched.costs.contextSwitch
      sched.noteResched(sched.current!)
    } else {
      yield PREEMPT
    }
    yield* lock.lock(mode)
    this.vm.rcu.readLock()
    if (iter.gfn > iter.nextLastLevelGfn) this.bug('iterator moved backwards across a yield')
    iter.yielded = true
    this.counters.yields++
  }

  /** A fresh iterator (walkers other than the vCPU fault path), with the S12 hazard applied. */
  newIter(): TdpIter {
    const it = new TdpIter(this.mem)
    it.advanceAfterRestart = this.hz.advanceAfterRestart
    return it
  }

  // ================================================================== zapping (§7)

  /**
   * tdp_mmu_zap_root() (≈6.9+): four passes (4K, 2M, 1G, root level), each zapping entries at the
   * pass level small-first (non-leaf entries take their subtrees with them, without yielding);
   * yields without flushing. WARNs unless someone holds a reference (I-R4).
   */
  *tdpMmuZapRoot(root: KvmMmuPage, shared: boolean, canYield: boolean): KernelOp {
    if (root.rootCount!.read() === 0 && !this.pre64) this.bug(`zapping ${root.label} with refcount 0 (I-R4)`)
    this.vm.mmuLock.assertHeld(shared ? 'read' : 'write')
    const rcu = this.vm.rcu
    rcu.readLock()
    const iter = this.newIter()
    const levels = [1, 2, 3, root.level]
    for (const zapLevel of levels) {
      outer: for (iter.start(root, zapLevel, 0); iter.valid && iter.gfn < this.maxGfn; iter.next()) {
        for (;;) {
          if (canYield) {
            const due = this.condReschedDue(iter)
            if (due !== 0) {
              yield* this.tdpMmuIterYield(iter, false, shared, due === 1)
              continue outer
            }
          }
          if (!isShadowPresentPte(iter.oldLo)) continue outer
          if (iter.level > zapLevel) continue outer
          if (!shared) {
            // tdpMmuIterSetSpte(), inlined: a teardown writes every entry of the tree.
            this.checkIterSetSpte(iter, NP_LO, NP_HI)
            yield this.sched.costs.memoryRef
            const removed = this.commitIterSetSpte(iter, NP_LO, NP_HI, false)
            if (removed !== null) yield* this.handleRemovedPt(removed, false, false)
            continue outer
          }
          if (yield* this.tdpMmuSetSpteAtomic(iter, NP_LO, NP_HI, false)) continue outer
          // retry: every predicate is re-evaluated on the refreshed old_spte
          if (isFrozenSpte(iter.oldLo, iter.oldHi)) yield PREEMPT
        }
      }
    }
    this.rcuUnlock('tdp_mmu_zap_root')
  }

  /**
   * tdp_mmu_zap_leafs(): zap present leaves of [start, end) under mmu_lock held for write; tables
   * stay. Optionally yields (flushing first). Returns the pending flush.
   */
  *tdpMmuZapLeafs(root: KvmMmuPage, start: number, end: number, canYield: boolean, flushIn: boolean): KernelOp<boolean> {
    this.vm.mmuLock.assertHeld('write')
    let flush = flushIn
    end = Math.min(end, this.maxGfn)
    const rcu = this.vm.rcu
    rcu.readLock()
    const iter = this.newIter()
    for (iter.start(root, 1, start); iter.valid && iter.gfn < end; iter.next()) {
      if (canYield) {
        const due = this.condReschedDue(iter)
        if (due !== 0) {
          yield* this.tdpMmuIterYield(iter, flush, false, due === 1)
          flush = false
          continue
        }
      }
      if (!isShadowPresentPte(iter.oldLo) || !isLastSpte(iter.oldLo, iter.level)) continue
      // tdpMmuIterSetSpte(), inlined
      this.checkIterSetSpte(iter, NP_LO, NP_HI)
      yield this.sched.costs.memoryRef
      const removed = this.commitIterSetSpte(iter, NP_LO, NP_HI, !root.invalid)
      if (removed !== null) yield* this.handleRemovedPt(removed, false, !root.invalid)
      if (!root.invalid) flush = true
    }
    this.rcuUnlock('tdp_mmu_zap_leafs')
    return flush
  }

  /** kvm_tdp_mmu_zap_leafs() (kvm_zap_gfn_range): valid roots of every address space, may yield. */
  *kvmTdpMmuZapLeafs(start: number, end: number, flushIn: boolean): KernelOp<boolean> {
    this.vm.mmuLock.assertHeld('write')
    let flush = flushIn
    const owner = this.threadOwner()
    for (let r = yield* this.tdpMmuNextRoot(null, -1, true, owner); r !== null; r = yield* this.tdpMmuNextRoot(r, -1, true, owner)) {
      flush = yield* this.tdpMmuZapLeafs(r, start, end, true, flush)
    }
    return flush
  }

  /**
   * kvm_zap_gfn_range() for the TDP MMU: write lock, zap leaves of [start, end) in valid roots,
   * flush before unlocking (F1).
   */
  *kvmZapGfnRange(start: number, end: number): KernelOp {
    yield* this.vm.mmuLock.writeLock()
    const flush = yield* this.kvmTdpMmuZapLeafs(start, end, false)
    if (flush) this.flushRemoteTlbs()
    this.mmuUnlock('write', 'kvm_zap_gfn_range')
  }

  /**
   * kvm_tdp_mmu_unmap_gfn_range(): the notifier's unmap, mmu_lock held for write; roots of the
   * address space including invalid ones (S2). Synchronous: never yields, for notifier calls made
   * synchronously; {@link kvmTdpMmuUnmapGfnRangeOp} is the form that honours `may_block`.
   */
  kvmTdpMmuUnmapGfnRange(asId: number, start: number, end: number, flushIn: boolean): boolean {
    let flush = flushIn
    for (const r of this.rootsWriteLocked(asId, this.hz.unmapSkipsInvalidRoots)) {
      flush = drain(this.tdpMmuZapLeafs(r, start, end, false, flush), this.sched, 'kvm_tdp_mmu_unmap_gfn_range')
    }
    return flush
  }

  /**
   * kvm_tdp_mmu_unmap_gfn_range() with `range->may_block`, as KVM runs it: mmu_lock held for write;
   * the yield-safe root iterator over the roots of the address space including invalid ones (S2),
   * each holding a reference across yields; tdp_mmu_zap_leafs() with can_yield = `mayBlock`, which
   * flushes what it zapped before dropping the lock. Returns the pending flush.
   */
  *kvmTdpMmuUnmapGfnRangeOp(asId: number, start: number, end: number, mayBlock: boolean, flushIn: boolean): KernelOp<boolean> {
    this.vm.mmuLock.assertHeld('write')
    let flush = flushIn
    const owner = this.threadOwner()
    const onlyValid = this.hz.unmapSkipsInvalidRoots
    for (let r = yield* this.tdpMmuNextRoot(null, asId, onlyValid, owner); r !== null; r = yield* this.tdpMmuNextRoot(r, asId, onlyValid, owner)) {
      flush = yield* this.tdpMmuZapLeafs(r, start, end, mayBlock, flush)
    }
    return flush
  }

  /** kvm_tdp_mmu_zap_all(): mm release / VM destruction; direct roots including invalid; no flush (F7). */
  *kvmTdpMmuZapAll(): KernelOp {
    this.vm.mmuLock.assertHeld('write')
    const owner = this.threadOwner()
    for (let r = yield* this.tdpMmuNextRoot(null, -1, false, owner); r !== null; r = yield* this.tdpMmuNextRoot(r, -1, false, owner)) {
      yield* this.tdpMmuZapRoot(r, false, true)
    }
  }

  // ================================================================== aging (§7.5)

  // kvm_tdp_mmu_age_gfn_range() / kvm_tdp_mmu_test_age_gfn(): see aging.ts (lockless ≈6.15+ and
  // the 6.13–6.14 write-lock walk).

  // ================================================================== faults (§6)

  /** `is_access_allowed(fault, spte)`. */
  private isAccessAllowed(f: TdpFault, lo: number, hi: number): boolean {
    if (f.exec) return isExecutablePte(this.fmt, lo, hi)
    if (f.write) return isWritablePte(lo)
    return (lo & PT_PRESENT_MASK) !== 0
  }

  /** kvm_mmu_max_mapping_level(): lpage_info of the slot, clamped by the host mapping level. */
  kvmMmuMaxMappingLevel(slot: Memslot, gfn: number, hostLevel: number): number {
    let max = this.maxHugeLevel
    for (; max > 1; max--) if (!isLpageDisallowed(slot, gfn, max)) break
    if (max === 1) return 1
    return Math.min(hostLevel, max)
  }

  /** kvm_mmu_hugepage_adjust(). */
  private kvmMmuHugepageAdjust(f: TdpFault): void {
    f.hugePageDisallowed = f.exec && this.opts.nxHugePages
    f.goalLevel = 1
    f.reqLevel = 1
    const slot = f.slot
    if (f.maxLevel === 1 || slot === null || f.pfn < 0 || kvmSlotDirtyTrackEnabled(slot)) return
    f.reqLevel = Math.min(f.maxLevel, this.kvmMmuMaxMappingLevel(slot, f.gfn, f.hostLevel))
    if (f.reqLevel === 1 || f.hugePageDisallowed) return
    f.goalLevel = f.reqLevel
  }

  /** disallowed_hugepage_adjust(): never replace a table kept for an executable 4K region by a huge page. */
  private disallowedHugepageAdjust(f: TdpFault, lo: number, hi: number, level: number): void {
    if (level > 1 && level === f.goalLevel && isShadowPresentPte(lo) && !isLargePte(lo)) {
      const child = this.sps.get(spteToPfn(lo, hi))
      if (child?.nxHugePageDisallowed === true) f.goalLevel--
    }
  }

  /**
   * kvm_mmu_page_fault() → kvm_tdp_page_fault() → kvm_tdp_mmu_page_fault() → kvm_tdp_mmu_map() →
   * tdp_mmu_map_handle_target_level(), with tdp_mmu_link_sp() and tdp_mmu_set_spte_atomic()
   * inlined. The fault is a state machine ({@link pfRun}) over plain methods: it charges each cost
   * in place when nothing else could run meanwhile (Scheduler.tryAdvance) and otherwise stops
   * there, and this generator yields the cost (or delegates to the blocking operation) and goes
   * on. The yields — their costs, order and the windows they open for other threads — are
   * exactly those of the nested kernel functions.
   */
  *kvmMmuPageFault(vcpu: KvmVcpu, st: TdpVcpuState, pf: PageFault): KernelOp<RetPf> {
    // Decoded when the operation starts running, not when it is created.
    const r = this.pageFaultInline(vcpu, st, pf)
    if (r !== PF_PENDING) return r as RetPf
    return yield* this.pageFaultContinue(vcpu, st)
  }

  /**
   * {@link kvmMmuPageFault} as a plain call (the strategy's `pageFaultInline`): RET_PF_* when the
   * fault completed without having to yield, or PF_PENDING, after which the caller runs
   * {@link pageFaultContinue} to finish it.
   */
  pageFaultInline(vcpu: KvmVcpu, st: TdpVcpuState, pf: PageFault): number {
    const f = st.fault
    f.phase = PH_BEGIN
    f.pf = pf
    return this.pfRun(vcpu, st)
  }

  /** Finish a fault that {@link pageFaultInline} left pending: yield what it stopped at, run on. */
  *pageFaultContinue(vcpu: KvmVcpu, st: TdpVcpuState): KernelOp<RetPf> {
    const f = st.fault
    for (;;) {
      const op = f.pendingOp
      if (op !== null) {
        f.pendingOp = null
        f.opResult = yield* op
      } else yield f.pendingNs
      const r = this.pfRun(vcpu, st)
      if (r !== PF_PENDING) return r as RetPf
    }
  }

  /**
   * The fault from `fault.phase` on, until it completes (RET_PF_*) or has to yield (PF_PENDING,
   * with fault.pendingNs or fault.pendingOp set). Each `tryAdvance(x) … else pendCost(x)` is a
   * `yield x` of the kernel path.
   */
  private pfRun(vcpu: KvmVcpu, st: TdpVcpuState): number {
    const f = st.fault
    const iter = st.iter
    const sched = this.sched
    let a: number
    let ph = f.phase
    phases: for (;;) {
      switch (ph) {
        case PH_BEGIN: {
          const r0 = this.pfBegin(vcpu, st, f.pf!)
          f.pf = null
          if (r0 === PF_FAST) return f.pendOp(this.fastPageFault(vcpu, st, f), PH_AFTER_FAST)
          if (r0 !== PF_GO) return r0
          ph = PH_FAULTIN
          continue
        }
        case PH_AFTER_FAST:
          if ((f.opResult as RetPf) !== RET_PF_INVALID) return f.opResult as RetPf
          ph = PH_FAULTIN
          continue
        case PH_FAULTIN: {
          const r1 = this.pfFaultin(vcpu, f)
          if (r1 !== PF_GO) return r1
          // hva_to_pfn(): a host page-table walk (two DRAM references); GUP may sleep, so
          // invalidations can run between the sequence snapshot and mmu_lock (S21).
          if (!sched.tryAdvance(this.gupNs)) return f.pendCost(this.gupNs, PH_LOCK)
          ph = PH_LOCK
          continue
        }
        case PH_LOCK: {
          const acquireNs = this.pfLock(f)
          if (acquireNs === PF_LOCK_RETRY) return RET_PF_RETRY
          if (acquireNs < 0) return f.pendOp(this.vm.mmuLock.readLock(), PH_LOCKED)
          // Then the fault's software work, done holding mmu_lock for read: faults on other vCPUs
          // overlap it. One yield for both when the lock was free: this thread changes nothing
          // between them (the lock is held throughout), so no other thread could observe a difference.
          const ns = acquireNs + this.mmuFaultWorkNs
          if (!sched.tryAdvance(ns)) return f.pendCost(ns, PH_MAP)
          a = this.pfMapBegin(vcpu, st)
          break phases
        }
        case PH_LOCKED:
          if (!sched.tryAdvance(this.mmuFaultWorkNs)) return f.pendCost(this.mmuFaultWorkNs, PH_MAP)
          a = this.pfMapBegin(vcpu, st)
          break phases
        case PH_MAP:
          a = this.pfMapBegin(vcpu, st)
          break phases
        case PH_COMMIT:
          a = this.pfCommit(vcpu, st)
          if (a === PF_PENDING) return PF_PENDING
          break phases
        case PH_AFTER_REMOVED:
          a = f.mapAct === MAP_TARGET ? this.pfTargetWritten(vcpu, f, true) : this.pfLinked(vcpu, st, true, true)
          break phases
        case PH_AFTER_SPLIT:
          a = this.pfLinked(vcpu, st, f.opResult as boolean, false)
          break phases
        case PH_NX_LOCKED: {
          const sp = f.sp!
          if (sp.nxHugePageDisallowed) this.trackPossibleNxHugePage(sp) // recheck under the lock (S15)
          this.pagesLock.unlock()
          iter.next()
          a = this.pfMapWalk(vcpu, st)
          break phases
        }
        default:
          return this.bug(`kvmMmuPageFault reached no phase ${String(ph)}`)
      }
    }
    // The map walk: act on each of its steps until it is over.
    for (;;) {
      if (a === MAP_DONE) {
        this.rcuUnlock('kvm_tdp_mmu_map')
        this.mmuUnlock('read', 'kvm_tdp_mmu_page_fault')
        return f.ret
      }
      if (a === MAP_TARGET || a === MAP_LINK) {
        // tdp_mmu_set_spte_atomic(), inlined
        this.checkAtomicWrite(iter)
        f.mapAct = a
        if (!sched.tryAdvance(this.spteCmpxchgNs)) return f.pendCost(this.spteCmpxchgNs, PH_COMMIT)
        a = this.pfCommit(vcpu, st)
        if (a === PF_PENDING) return PF_PENDING
      } else if (a === MAP_SPLIT) {
        return f.pendOp(this.tdpMmuSplitHugePage(iter, f.sp!, true), PH_AFTER_SPLIT)
      } else {
        // MAP_NX_TRACK
        return f.pendOp(this.pagesLock.lock(), PH_NX_LOCKED)
      }
    }
  }

  /** The cmpxchg of tdp_mmu_set_spte_atomic() after its cost: the next map step, or PF_PENDING to free a removed table. */
  private pfCommit(vcpu: KvmVcpu, st: TdpVcpuState): number {
    const f = st.fault
    const removed = this.commitAtomicWrite(st.iter, f.nLo, f.nHi, true)
    if (removed !== CMPXCHG_FAILED && removed !== null) return f.pendOp(this.handleRemovedPt(removed, true, true), PH_AFTER_REMOVED)
    const ok = removed !== CMPXCHG_FAILED
    return f.mapAct === MAP_TARGET ? this.pfTargetWritten(vcpu, f, ok) : this.pfLinked(vcpu, st, ok, true)
  }

  /**
   * kvmMmuPageFault's start: decode the error code, handle an MMIO fault, and decide whether
   * fast_page_fault() runs first. Returns a RET_PF_*, {@link PF_FAST} or {@link PF_GO}.
   */
  private pfBegin(vcpu: KvmVcpu, st: TdpVcpuState, pf: PageFault): RetPf | typeof PF_GO | typeof PF_FAST {
    // Decoded when the operation starts running, not when it is created.
    const f = st.fault
    // Only bits of the low half are tested, and `&` already takes its operand modulo 2^32 (a
    // `% 2 ** 32` here would be a floating-point remainder, a C call in V8).
    const ec = pf.errorCode
    f.gfn = Math.floor(pf.addr / 4096)
    f.write = (ec & PFERR_W) !== 0
    f.exec = (ec & PFERR_I) !== 0
    f.present = (ec & PFERR_P) !== 0
    f.rsvd = (ec & PFERR_RSVD) !== 0
    f.prefetch = false
    if (st.root === null) return RET_PF_RETRY // WARN and retry (kvm_mmu_page_fault)
    if (f.rsvd) {
      const r = this.handleMmioPageFault(vcpu, st, f.gfn)
      if (r !== RET_PF_INVALID) return r
    }
    // ---- kvm_tdp_page_fault(): page_fault_can_be_fast() first, so the common not-present fault
    // creates no generator for it.
    return this.opts.fastPageFault && this.pageFaultCanBeFast(st, f) ? PF_FAST : PF_GO
  }

  /** kvm_mmu_faultin_pfn() for kvmMmuPageFault: {@link PF_GO} or a RET_PF_*. */
  private pfFaultin(vcpu: KvmVcpu, f: TdpFault): RetPf | typeof PF_GO {
    const early = this.kvmMmuFaultinPfn(vcpu, f)
    return early ?? PF_GO
  }

  /**
   * After GUP: the lockless invalidation pre-check, then read_lock(mmu_lock) without a generator
   * when uncontended. Returns the acquisition's cost (≥ 0), -1 (contended: the caller blocks in
   * readLock()) or {@link PF_LOCK_RETRY}.
   */
  private pfLock(f: TdpFault): number {
    if (f.slot !== null && !this.hz.skipInvalidationRetry && this.vm.notifierState.retryGfnUnsafe(f.mmuSeq, f.gfn)) return PF_LOCK_RETRY
    const ns = this.vm.mmuLock.readLockFast()
    return ns >= 0 ? ns : -1
  }

  /** kvm_tdp_mmu_map()'s start (mmu_lock held for read): stale check, level, RCU, first walk step. */
  private pfMapBegin(vcpu: KvmVcpu, st: TdpVcpuState): number {
    const f = st.fault
    f.ret = RET_PF_RETRY
    if (this.isPageFaultStale(st, f)) {
      this.vm.rcu.readLock() // balanced by kvmMmuPageFault's rcuUnlock (nothing was walked)
      return MAP_DONE
    }
    this.kvmMmuHugepageAdjust(f)
    this.vm.rcu.readLock()
    st.iter.start(st.root!, 1, f.gfn) // not null: isPageFaultStale() just checked
    return this.pfMapWalk(vcpu, st)
  }

  /**
   * kvm_tdp_mmu_map()'s walk from the iterator's position to its next step: the target-level
   * decision (tdp_mmu_map_handle_target_level() up to its write), or a table to link or split.
   */
  private pfMapWalk(vcpu: KvmVcpu, st: TdpVcpuState): number {
    const f = st.fault
    const iter = st.iter
    const nx = this.opts.nxHugePages
    for (; iter.valid && iter.gfn < f.gfn + 1; iter.next()) {
      if (nx) this.disallowedHugepageAdjust(f, iter.oldLo, iter.oldHi, iter.level)
      if (isFrozenSpte(iter.oldLo, iter.oldHi)) return MAP_DONE
      if (iter.level === f.goalLevel) {
        // ---- tdp_mmu_map_handle_target_level()
        // What the function reads before its cmpxchg window is captured before it, as there.
        const oLo = iter.oldLo
        f.replacesTable = isShadowPresentPte(oLo) && !isLastSpte(oLo, iter.level)
        f.targetSlot = f.slot
        if (!this.makeTargetSpte(vcpu, f, iter)) {
          f.ret = RET_PF_SPURIOUS
          return MAP_DONE
        }
        // Copied out of the shared scratch SPTE before the yield: other threads use it meanwhile.
        f.nLo = this.tmp.lo
        f.nHi = this.tmp.hi
        if (f.nLo !== oLo >>> 0 || f.nHi !== iter.oldHi >>> 0) return MAP_TARGET
        f.ret = this.mapTargetLevelDone(vcpu, f, f.targetSlot, false, f.replacesTable, f.nLo)
        return MAP_DONE
      }
      const present = isShadowPresentPte(iter.oldLo)
      if (present && !isLargePte(iter.oldLo)) continue
      const sp = this.allocChildSp(iter)
      sp.nxHugePageDisallowed = f.hugePageDisallowed
      f.sp = sp
      if (present) return MAP_SPLIT
      // tdp_mmu_link_sp(shared) with tdp_mmu_set_spte_atomic(), inlined (see tdpMmuLinkSp).
      const t = this.nonLeafSpteFor(sp)
      f.nLo = t.lo
      f.nHi = t.hi
      return MAP_LINK
    }
    return MAP_DONE
  }

  /** After the target-level cmpxchg: RET_PF_RETRY if it failed, else tdp_mmu_map_handle_target_level()'s end. */
  private pfTargetWritten(vcpu: KvmVcpu, f: TdpFault, ok: boolean): number {
    if (ok) f.ret = this.mapTargetLevelDone(vcpu, f, f.targetSlot, true, f.replacesTable, f.nLo)
    return MAP_DONE
  }

  /** After linking (cmpxchg `linked`) or splitting into fault.sp: go on down, or give up (RET_PF_RETRY). */
  private pfLinked(vcpu: KvmVcpu, st: TdpVcpuState, ok: boolean, linked: boolean): number {
    const f = st.fault
    const sp = f.sp!
    if (ok && linked) this.counters.tdp_mmu_pages++
    if (!ok) {
      // Never published: free at once.
      sp.nxHugePageDisallowed = false
      this.freeSp(sp)
      this.counters.fault_link_races++
      return MAP_DONE
    }
    if (f.hugePageDisallowed && f.reqLevel >= st.iter.level) return MAP_NX_TRACK
    st.iter.next()
    return this.pfMapWalk(vcpu, st)
  }

  /**
   * kvm_mmu_faultin_pfn(): snapshot mmu_invalidate_seq, then resolve the memslot and the host pfn
   * into the fault. Null: go on mapping; RET_PF_RETRY: the memslot is being deleted or moved;
   * RET_PF_EMULATE: a write to a read-only memslot (kvm_handle_error_pfn on KVM_PFN_ERR_RO_FAULT:
   * KVM's MMIO exit to userspace, which this model completes as open bus).
   */
  private kvmMmuFaultinPfn(vcpu: KvmVcpu, f: TdpFault): RetPf | null {
    const vm = this.vm
    f.mmuSeq = vm.notifierState.seq
    const slot = vm.memslots.gfnToMemslot(vcpu.asId, f.gfn, vcpu.memslotCache)
    f.maxLevel = this.maxHugeLevel
    if (slot !== null && (slot.flags & KVM_MEMSLOT_INVALID) !== 0) return RET_PF_RETRY
    f.slot = slot
    if (slot === null) {
      f.pfn = -1
      f.hostWritable = false
      f.hostLevel = 1
      return null
    }
    if (f.write && (slot.flags & KVM_MEM_READONLY) !== 0) return RET_PF_EMULATE
    const host = vm.host
    const pfn = host.resolvePfn(gfnToHvaMemslot(slot, f.gfn), f.write)
    if (pfn < 0) throw new KvmError('EFAULT', `vCPU ${String(vcpu.id)}: hva_to_pfn failed for gfn 0x${f.gfn.toString(16)} (${host.outReason}): KVM returns -EFAULT to userspace`)
    f.pfn = pfn
    f.hostWritable = host.outWritable && (slot.flags & KVM_MEM_READONLY) === 0
    f.hostLevel = host.outLevel
    return null
  }

  /** is_page_fault_stale(): obsolete root, or a racing invalidation (§6.3, S20/S21). */
  private isPageFaultStale(st: TdpVcpuState, f: TdpFault): boolean {
    if (st.root === null || st.root.invalid) return true
    return f.slot !== null && !this.hz.skipInvalidationRetry && this.vm.notifierState.retryGfn(f.mmuSeq, f.gfn)
  }

  /**
   * tdp_mmu_map_handle_target_level() up to its SPTE write: false if the present leaf already
   * allows the access (RET_PF_SPURIOUS), else the new SPTE (MMIO if there is no memslot) is left
   * in `this.tmp`.
   */
  private makeTargetSpte(vcpu: KvmVcpu, f: TdpFault, iter: TdpIter): boolean {
    const oLo = iter.oldLo
    const level = iter.level
    if (isShadowPresentPte(oLo) && isLastSpte(oLo, level) && (f.prefetch || this.isAccessAllowed(f, oLo, iter.oldHi))) return false
    if (f.slot === null) makeMmioSpte(this.tmp, this.fmt, f.gfn, ACC_ALL, this.vm.memslots.space(vcpu.asId).generation)
    else this.makeSpte(f, level)
    return true
  }

  /**
   * tdp_mmu_map_handle_target_level() after its SPTE write. `slot`: the fault's memslot as read
   * before the write (null: an MMIO SPTE); `wrote`: the cmpxchg installed `nLo` (false: the SPTE
   * was already identical, RET_PF_SPURIOUS); `replacedTable`: the old SPTE was a table, now
   * replaced by a huge leaf (F3/F2: flush while still inside RCU).
   */
  private mapTargetLevelDone(vcpu: KvmVcpu, f: TdpFault, slot: Memslot | null, wrote: boolean, replacedTable: boolean, nLo: number): RetPf {
    if (wrote && replacedTable) this.flushRemoteTlbs()
    if (wrote && slot !== null && isWritablePte(nLo) && kvmSlotDirtyTrackEnabled(slot)) {
      this.vm.memslots.markPageDirty(slot, f.gfn)
    }
    if (slot === null) {
      vcpu.stats.pf_mmio_spte_created++
      return RET_PF_EMULATE
    }
    return wrote ? RET_PF_FIXED : RET_PF_SPURIOUS
  }

  /**
   * make_spte() for a direct TDP mapping (pte_access = ACC_ALL): X unless huge under the NX
   * mitigation; W | MMU-writable | D when the host mapping is writable; Accessed unless prefetch.
   * Leaves the SPTE in `this.tmp`.
   */
  private makeSpte(f: TdpFault, level: number): void {
    const exec = !(level > 1 && this.opts.nxHugePages)
    const w = f.hostWritable
    // A reused parameter block: an object literal here would be one allocation per fault.
    const p = this.spteParams
    p.hpa = (f.pfn - (f.gfn - roundGfnForLevel(f.gfn, level))) * 4096
    p.level = level
    p.writable = w
    p.exec = exec
    p.accessed = !f.prefetch
    p.dirty = w
    p.hostWritable = w
    p.mmuWritable = w
    makeSpte(this.tmp, this.fmt, p)
  }

  /** page_fault_can_be_fast() (and a root to walk): otherwise fast_page_fault() returns RET_PF_INVALID at once. */
  private pageFaultCanBeFast(st: TdpVcpuState, f: TdpFault): boolean {
    if (f.rsvd) return false
    if (!f.present ? this.fmt.adEnabled : !f.write) return false
    return st.root !== null
  }

  /**
   * fast_page_fault() (lockless, RCU only): fix a write-protected (MMU-writable) or access-tracked
   * leaf with one cmpxchg; no bookkeeping (leafness and pfn never change). Up to 4 retries.
   */
  private *fastPageFault(vcpu: KvmVcpu, st: TdpVcpuState, f: TdpFault): KernelOp<RetPf> {
    if (!this.pageFaultCanBeFast(st, f)) return RET_PF_INVALID
    const root = st.root!
    const rcu = this.vm.rcu
    rcu.readLock()
    const iter = st.iter
    let ret: RetPf = RET_PF_INVALID
    const m = this.mem
    const fmt = this.fmt
    for (let retry = 0; retry < 5; retry++) {
      // kvm_tdp_mmu_fast_pf_get_last_sptep()
      let sptep = -1
      let lo = 0
      let hi = 0
      let level = 0
      for (iter.start(root, 1, f.gfn); iter.valid && iter.gfn < f.gfn + 1; iter.next()) {
        sptep = iter.sptep
        lo = iter.oldLo
        hi = iter.oldHi
        level = iter.level
      }
      if (sptep < 0 || !isShadowPresentPte(lo) || !isLastSpte(lo, level)) break
      if (this.isAccessAllowed(f, lo, hi)) {
        ret = RET_PF_SPURIOUS
        break
      }
      let nLo = lo
      let nHi = hi
      if (!fmt.adEnabled && isAccessTrackSpte(fmt, lo, hi)) {
        const t = restoreAccTrackSpte(this.tmp, fmt, lo, hi)
        nLo = (t.lo | fmt.accessedLo) >>> 0
        nHi = t.hi
      }
      let wrote = false
      if (f.write && isMmuWritableSpte(fmt, lo, hi)) {
        nLo = (nLo | PT_WRITABLE_MASK | fmt.dirtyLo) >>> 0
        wrote = !isWritablePte(lo)
        if (level > 1) {
          const slot = this.vm.memslots.gfnToMemslot(vcpu.asId, f.gfn, vcpu.memslotCache)
          if (slot !== null && kvmSlotDirtyTrackEnabled(slot)) break // needs a 4K mapping: slow path
        }
      }
      if ((nLo === lo && nHi === hi) || !this.isAccessAllowed(f, nLo, nHi)) break
      yield this.sched.costs.spteCmpxchg
      if (m.cmpxchg64(sptep, lo, hi, nLo, nHi)) {
        if (wrote) {
          const slot = this.vm.memslots.gfnToMemslot(vcpu.asId, f.gfn, vcpu.memslotCache)
          this.vm.memslots.markPageDirty(slot, f.gfn)
        }
        ret = RET_PF_FIXED
        break
      }
    }
    rcu.readUnlock()
    if (ret !== RET_PF_INVALID) vcpu.stats.pf_fast++
    return ret
  }

  /**
   * handle_mmio_page_fault(): a reserved-bit fault on a current MMIO SPTE is emulated; a stale
   * generation (or no MMIO SPTE) goes to the slow path, which rebuilds it.
   */
  handleMmioPageFault(vcpu: KvmVcpu, st: TdpVcpuState, gfn: number): RetPf {
    const root = st.root
    if (root === null) return RET_PF_RETRY
    const rcu = this.vm.rcu
    rcu.readLock()
    const iter = st.iter
    let lo = 0
    let hi = 0
    for (iter.start(root, 1, gfn); iter.valid && iter.gfn < gfn + 1; iter.next()) {
      lo = iter.oldLo
      hi = iter.oldHi
    }
    rcu.readUnlock()
    if (!isMmioSpte(this.fmt, lo, hi)) return RET_PF_INVALID
    const set = this.vm.memslots.space(vcpu.asId)
    if (!checkMmioSpte(lo, hi, set.generation, set.updateInProgress)) return RET_PF_INVALID
    return RET_PF_EMULATE
  }

  // ================================================================== dirty logging (§7.6)

  /** kvm_tdp_mmu_wrprot_slot(): clear W (keep MMU-writable) on leaves ≥ minLevel, mmu_lock held for read. */
  *kvmTdpMmuWrprotSlot(slot: Memslot, minLevel: number): KernelOp<boolean> {
    this.vm.mmuLock.assertHeld('read')
    let spteSet = false
    const owner = this.threadOwner()
    for (let r = yield* this.tdpMmuNextRoot(null, slot.asId, true, owner); r !== null; r = yield* this.tdpMmuNextRoot(r, slot.asId, true, owner)) {
      this.vm.rcu.readLock()
      const iter = this.newIter()
      outer: for (iter.start(r, minLevel, slot.baseGfn); iter.valid && iter.gfn < slot.endGfn; iter.next()) {
        for (;;) {
          if (yield* this.tdpMmuIterCondResched(iter, false, true)) continue outer
          const lo = iter.oldLo
          if (!isShadowPresentPte(lo) || !isLastSpte(lo, iter.level) || !isWritablePte(lo)) continue outer
          if (yield* this.tdpMmuSetSpteAtomic(iter, (lo & ~PT_WRITABLE_MASK) >>> 0, iter.oldHi, true)) {
            spteSet = true
            continue outer
          }
        }
      }
      this.rcuUnlock('kvm_tdp_mmu_wrprot_slot')
    }
    return spteSet
  }

  /**
   * kvm_tdp_mmu_clear_dirty_slot(): clear D (A/D enabled) or W (A/D disabled) on every leaf of
   * the slot, mmu_lock held for read; after a failed cmpxchg every predicate is re-evaluated (S14).
   */
  *kvmTdpMmuClearDirtySlot(slot: Memslot): KernelOp<boolean> {
    this.vm.mmuLock.assertHeld('read')
    let spteSet = false
    const owner = this.threadOwner()
    for (let r = yield* this.tdpMmuNextRoot(null, slot.asId, true, owner); r !== null; r = yield* this.tdpMmuNextRoot(r, slot.asId, true, owner)) {
      this.vm.rcu.readLock()
      const iter = this.newIter()
      outer: for (iter.start(r, 1, slot.baseGfn); iter.valid && iter.gfn < slot.endGfn; iter.next()) {
        for (;;) {
          if (yield* this.tdpMmuIterCondResched(iter, false, true)) continue outer
          const lo = iter.oldLo
          if (!isShadowPresentPte(lo) || !isLastSpte(lo, iter.level)) continue outer
          const bit = spteAdEnabled(iter.oldHi) ? this.fmt.dirtyLo : PT_WRITABLE_MASK
          if ((lo & bit) === 0) continue outer
          if (yield* this.tdpMmuSetSpteAtomic(iter, (lo & ~bit) >>> 0, iter.oldHi, true)) {
            spteSet = true
            continue outer
          }
        }
      }
      this.rcuUnlock('kvm_tdp_mmu_clear_dirty_slot')
    }
    return spteSet
  }

  /**
   * kvm_tdp_mmu_clear_dirty_pt_masked(): mmu_lock held for write; 4K leaves of
   * [gfn + ffs(mask), gfn + 64) whose bit is set: clear W (`wrprot` or A/D disabled) or D, with
   * tdp_mmu_clear_spte_bits (atomic if volatile), no bookkeeping.
   */
  kvmTdpMmuClearDirtyPtMasked(slot: Memslot, gfn: number, maskLo: number, maskHi: number, wrprot: boolean): void {
    const m = this.mem
    let first = 0
    while (first < 64 && ((first < 32 ? maskLo >>> first : maskHi >>> (first - 32)) & 1) === 0) first++
    if (first === 64) return
    const rcu = this.vm.rcu
    rcu.readLock()
    const iter = this.newIter()
    for (const root of this.rootsWriteLocked(slot.asId, true)) {
      for (iter.start(root, 1, gfn + first); iter.valid && iter.gfn < gfn + 64; iter.next()) {
        const lo = iter.oldLo
        if (iter.level > 1 || !isShadowPresentPte(lo) || !isLastSpte(lo, iter.level)) continue
        const b = iter.gfn - gfn
        if (((b < 32 ? maskLo >>> b : maskHi >>> (b - 32)) & 1) === 0) continue
        const bit = wrprot || !spteAdEnabled(iter.oldHi) ? PT_WRITABLE_MASK : this.fmt.dirtyLo
        if ((lo & bit) === 0) continue
        // Only A/D/W bits move: an atomic fetch-and-not, no handle_changed_spte.
        m.write32(iter.sptep, (m.read32(iter.sptep) & ~bit) >>> 0)
      }
    }
    rcu.readUnlock()
  }

  /**
   * kvm_tdp_mmu_write_protect_gfn(): clear W and MMU-writable on leaves ≥ minLevel mapping gfn,
   * mmu_lock held for write; the caller flushes (F5). Returns whether anything changed.
   */
  kvmTdpMmuWriteProtectGfn(slot: Memslot, gfn: number, minLevel: number): boolean {
    let changed = false
    const rcu = this.vm.rcu
    rcu.readLock()
    const iter = this.newIter()
    const fmt = this.fmt
    for (const root of this.rootsWriteLocked(slot.asId, true)) {
      for (iter.start(root, minLevel, gfn); iter.valid && iter.gfn < gfn + 1; iter.next()) {
        const lo = iter.oldLo
        const hi = iter.oldHi
        if (!isShadowPresentPte(lo) || !isLastSpte(lo, iter.level)) continue
        const nLo = (lo & ~(PT_WRITABLE_MASK | fmt.mmuWritableLo)) >>> 0
        const nHi = (hi & ~fmt.mmuWritableHi) >>> 0
        if (nLo === lo >>> 0 && nHi === hi >>> 0) continue
        drain(this.tdpMmuIterSetSpte(iter, nLo, nHi, true), this.sched, 'kvm_tdp_mmu_write_protect_gfn')
        changed = true
      }
    }
    rcu.readUnlock()
    return changed
  }

  // ================================================================== eager split (§7.8)

  /**
   * kvm_tdp_mmu_try_split_huge_pages(): split every huge leaf of [start, end) in valid roots of the
   * slot's address space down to `targetLevel`. Without a spare SP it leaves RCU and mmu_lock to
   * allocate (unless `canDropLock` is false: the synchronous manual-protect path allocates in place).
   */
  *kvmTdpMmuTrySplitHugePages(slot: Memslot, start: number, end: number, targetLevel: number, shared: boolean, canDropLock: boolean): KernelOp<number> {
    this.vm.mmuLock.assertHeld(shared ? 'read' : 'write')
    const owner = this.threadOwner()
    let r: number
    for (let root = yield* this.tdpMmuNextRoot(null, slot.asId, true, owner); root !== null; root = yield* this.tdpMmuNextRoot(root, slot.asId, true, owner)) {
      r = yield* this.tdpMmuSplitHugePagesRoot(root, start, end, targetLevel, shared, canDropLock)
      if (r < 0) {
        yield* this.putRoot(root, owner)
        return r
      }
    }
    return 0
  }

  private *tdpMmuSplitHugePagesRoot(root: KvmMmuPage, start: number, end: number, targetLevel: number, shared: boolean, canDropLock: boolean): KernelOp<number> {
    const rcu = this.vm.rcu
    const lock = this.vm.mmuLock
    const mode = shared ? 'read' : 'write'
    let sp: KvmMmuPage | null = null
    let spare = -1 // host address of a spare table allocated outside the lock
    rcu.readLock()
    const iter = this.newIter()
    outer: for (iter.start(root, targetLevel + 1, start); iter.valid && iter.gfn < end; iter.next()) {
      for (;;) {
        if (yield* this.tdpMmuIterCondResched(iter, false, shared)) continue outer
        if (!isShadowPresentPte(iter.oldLo) || !isLargePte(iter.oldLo)) continue outer
        if (sp === null) {
          if (spare < 0 && canDropLock) {
            // tdp_mmu_alloc_sp_for_split(): may sleep, so leave RCU and mmu_lock.
            this.rcuUnlock('tdp_mmu_split_huge_pages_root')
            this.mmuUnlock(mode, 'tdp_mmu_split_huge_pages_root')
            spare = this.vm.allocMmuPage()
            yield this.sched.costs.pageZero
            yield* lock.lock(mode)
            rcu.readLock()
            iter.yielded = true
            continue outer
          }
          if (spare >= 0) this.vm.freeMmuPage(spare)
          spare = -1
          sp = this.allocChildSp(iter)
        }
        if (yield* this.tdpMmuSplitHugePage(iter, sp, shared)) {
          sp = null
          continue outer
        }
        // retry with the refreshed old_spte (the SP stays ours, unpublished)
      }
    }
    this.rcuUnlock('tdp_mmu_split_huge_pages_root')
    // "A vCPU doing NX splitting may have won the race": free what was not used.
    if (sp !== null) this.freeSp(sp)
    if (spare >= 0) this.vm.freeMmuPage(spare)
    return 0
  }

  // ================================================================== huge page recovery (§7.7)

  /**
   * kvm_tdp_mmu_recover_huge_pages() (≈6.13+): when dirty logging is disabled, replace tables that
   * could be a huge mapping by a huge SPTE built from their first present leaf; flush before
   * leaving RCU (F2/F3). mmu_lock held for read.
   */
  *kvmTdpMmuRecoverHugePages(slot: Memslot): KernelOp {
    this.vm.mmuLock.assertHeld('read')
    const owner = this.threadOwner()
    for (let root = yield* this.tdpMmuNextRoot(null, slot.asId, true, owner); root !== null; root = yield* this.tdpMmuNextRoot(root, slot.asId, true, owner)) {
      const rcu = this.vm.rcu
      rcu.readLock()
      let flush = false
      const iter = this.newIter()
      outer: for (iter.start(root, 2, slot.baseGfn); iter.valid && iter.gfn < slot.endGfn; iter.next()) {
        for (;;) {
          if (yield* this.tdpMmuIterCondResched(iter, flush, true)) {
            flush = false
            continue outer
          }
          const lo = iter.oldLo
          if (iter.level > this.maxHugeLevel || !isShadowPresentPte(lo) || isLastSpte(lo, iter.level)) continue outer
          const per = PAGES_PER_LEVEL[iter.level]!
          if (iter.gfn < slot.baseGfn || iter.gfn + per > slot.endGfn) continue outer
          const hva = gfnToHvaMemslot(slot, iter.gfn)
          if (this.kvmMmuMaxMappingLevel(slot, iter.gfn, this.vm.host.hostMappingLevel(hva)) < iter.level) continue outer
          // tdp_mmu_make_huge_spte(): the first present leaf below.
          const small = this.firstPresentLeaf(this.childSp(lo, iter.oldHi))
          if (small === null) continue outer
          const t = makeHugeSpte(this.tmp, small.lo, small.hi, iter.level)
          if (this.opts.nxHugePages) this.makeSpteNonExecutable(t)
          if (yield* this.tdpMmuSetSpteAtomic(iter, t.lo, t.hi, true)) {
            flush = true
            this.counters.recovered_huge_pages++
            continue outer
          }
        }
      }
      if (flush) this.flushRemoteTlbs()
      this.rcuUnlock('kvm_tdp_mmu_recover_huge_pages')
    }
  }

  private firstPresentLeaf(sp: KvmMmuPage): { lo: number; hi: number } | null {
    const m = this.mem
    for (let i = 0; i < 512; i++) {
      const lo = m.read32(sp.hpa + i * 8)
      if (!isShadowPresentPte(lo)) continue
      const hi = m.read32(sp.hpa + i * 8 + 4)
      if (isLastSpte(lo, sp.level)) return { lo, hi }
      return this.firstPresentLeaf(this.childSp(lo, hi))
    }
    return null
  }

  // ================================================================== NX recovery (§6.6)

  /**
   * kvm_recover_nx_huge_pages() for the TDP MMU (6.18: mmu_lock held for read): take
   * ceil(nr / ratio) SPs from the head of the possible-NX list, unaccount each under the pages
   * lock, and zap it if its parent SPTE still points at it (identity check, S16) — unless its
   * memslot (looked up in the SP's own address space, S17) is dirty-logged.
   */
  *kvmRecoverNxHugePages(ratio = this.opts.nxRecoveryRatio): KernelOp<number> {
    if (ratio === 0) return 0
    const vm = this.vm
    const lock = vm.mmuLock
    const rcu = vm.rcu
    // nx_huge_pages_to_zap(): read before SRCU and mmu_lock are taken.
    const toZap = Math.ceil(this.possibleNx.length / ratio)
    yield* lock.readLock()
    rcu.readLock()
    let flush = false
    let zapped = 0
    for (let i = 0; i < toZap; i++) {
      yield* this.pagesLock.lock()
      const sp = this.possibleNx[0]
      if (sp === undefined) {
        this.pagesLock.unlock()
        break
      }
      sp.nxHugePageDisallowed = false
      this.untrackPossibleNxHugePage(sp)
      this.pagesLock.unlock()
      const slot = vm.memslots.gfnToMemslot(sp.asId, sp.gfn)
      if (slot === null || !kvmSlotDirtyTrackEnabled(slot)) {
        if (yield* this.kvmTdpMmuZapPossibleNxHugePage(sp)) {
          flush = true
          zapped++
        }
      }
      if (vm.sched.needResched() || lock.needBreak()) {
        if (flush) this.flushRemoteTlbs()
        flush = false
        this.rcuUnlock('kvm_recover_nx_huge_pages')
        this.mmuUnlock('read', 'kvm_recover_nx_huge_pages')
        yield PREEMPT
        yield* lock.readLock()
        rcu.readLock()
      }
    }
    if (flush) this.flushRemoteTlbs()
    this.rcuUnlock('kvm_recover_nx_huge_pages')
    this.mmuUnlock('read', 'kvm_recover_nx_huge_pages')
    this.counters.nx_recovered += zapped
    return zapped
  }

  /** kvm_tdp_mmu_zap_possible_nx_huge_page(): cmpxchg the parent SPTE to non-present iff it still points at `sp`. */
  private *kvmTdpMmuZapPossibleNxHugePage(sp: KvmMmuPage): KernelOp<boolean> {
    this.vm.mmuLock.assertHeld('read')
    const iter = this.newIter()
    iter.sptep = sp.ptep
    iter.level = sp.level + 1
    iter.gfn = sp.gfn - (sp.gfn % PAGES_PER_LEVEL[sp.level + 1]!)
    iter.asId = sp.asId
    iter.read()
    const lo = iter.oldLo
    if (!isShadowPresentPte(lo) || isLastSpte(lo, iter.level) || spteToPfn(lo, iter.oldHi) !== sp.frame) return false
    if (!(yield* this.tdpMmuSetSpteAtomic(iter, NP_LO, NP_HI, true))) {
      if (spteToPfn(iter.oldLo, iter.oldHi) === sp.frame && isShadowPresentPte(iter.oldLo)) this.warn(`cmpxchg on the parent of ${sp.label} failed while it still points at it`)
      return false
    }
    return true
  }

  // ================================================================== VM teardown (§3.7)

  /** kvm_mmu_uninit_tdp_mmu(): invalidate everything, zap and put every gifted reference, drain RCU. */
  *kvmMmuUninitTdpMmu(): KernelOp {
    this.teardown = true
    this.kvmTdpMmuInvalidateRoots()
    yield* this.kvmTdpMmuZapInvalidatedRoots(false)
    yield* this.vm.rcu.barrier()
    const left: string[] = []
    for (let r = this.rootsHead; r !== null; r = r.next) left.push(`${r.label} (refcount ${String(r.rootCount!.read())})`)
    if (left.length > 0) throw new TdpMmuError('TDP_MMU_LEAK', `VM destroyed with roots still listed: ${left.join(', ')}`)
    if (this.counters.tdp_mmu_pages !== 0) throw new TdpMmuError('TDP_MMU_LEAK', `VM destroyed with ${String(this.counters.tdp_mmu_pages)} TDP MMU pages still accounted`)
    if (this.possibleNx.length !== 0) throw new TdpMmuError('TDP_MMU_LEAK', `VM destroyed with ${String(this.possibleNx.length)} SPs on the possible NX list`)
    if (this.sps.size !== 0) throw new TdpMmuError('TDP_MMU_LEAK', `VM destroyed with ${String(this.sps.size)} TDP MMU pages allocated`)
    if (this.vm.rcu.pendingCallbacks !== 0) throw new TdpMmuError('TDP_MMU_LEAK', `VM destroyed with ${String(this.vm.rcu.pendingCallbacks)} RCU callbacks pending`)
  }
}
