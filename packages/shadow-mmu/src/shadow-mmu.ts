/**
 * KVM's shadow MMU (arch/x86/kvm/mmu/mmu.c and paging_tmpl.h), driving either indirect shadow
 * pages for shadow paging (`ept=0`) or direct shadow pages in EPT format (legacy TDP,
 * `tdp_mmu=N`). Every function names the kernel function it models; shadow-mmu.md is the spec.
 *
 * Representation: a shadow page's `spt` is a host page the hardware walks; an SPTE is addressed
 * by its host-physical address (`sptep`); SPTEs are read and written as two 32-bit halves.
 */
import {
  alignDown,
  ACC_WRITE,
  CR0_WP,
  CR4_SMAP,
  CR4_SMEP,
  EFER_NXE,
  EptTranslator,
  EXIT_EPT_MISCONFIG,
  MODE_TDP,
  OP_BATCH,
  PAGING_NONE,
  PFERR_P,
  PFERR_RSVD,
  PFERR_U,
  PFERR_W,
  type PhysMem,
} from '@mmusim/x86-hw'
import {
  type GuestMemory,
  gfnToHvaMemslot,
  gfnToIndex,
  isLargePte,
  isLpageDisallowed,
  isMmioSpte,
  isMmuWritableSpte,
  isShadowPresentPte,
  isWritablePte,
  KVM_MEM_READONLY,
  KVM_REQ_MMU_FREE_OBSOLETE_ROOTS,
  KVM_REQ_MMU_SYNC,
  KvmError,
  type KernelOp,
  FaultContinuation,
  PfnMap,
  PF_PENDING,
  type KvmVcpu,
  kvmIsVisibleMemslot,
  kvmPagesPerHpage,
  kvmSlotDirtyTrackEnabled,
  leafSpteChangeNeedsTlbFlush,
  makeMmioSpte,
  makeNonLeafSpte,
  makeSpte,
  makeSpteFormat,
  markSpteForAccessTrack,
  type Memslot,
  type MemslotChange,
  type MmuInstance,
  type PageFault,
  PFERR_GUEST_PAGE,
  RET_PF_EMULATE,
  RET_PF_FIXED,
  RET_PF_INVALID,
  RET_PF_RETRY,
  RET_PF_SPURIOUS,
  RET_PF_WRITE_PROTECTED,
  type RetPf,
  type Spte64,
  type SpteFormat,
  checkMmioSpte,
  getMmioSpteGfn,
  spteAdEnabled,
  spteToPfn,
  updateGfnDisallowLpageCount,
  type Vm,
  X86_SPTE_FORMAT,
} from '@mmusim/kvm'
import { auditShadowMmu } from './audit.ts'
import { type RmapEntry, rmapArrayAt } from './rmap.ts'
import { GuestWalker } from './guest-walker.ts'
import {
  ACC_ALL,
  ACC_EXEC_MASK,
  ACC_USER_MASK,
  ACC_WRITE_MASK,
  BATCH_ZAP_PAGES,
  INVALID_INDEX,
  KVM_MIN_ALLOC_MMU_PAGES,
  KVM_MIN_FREE_MMU_PAGES,
  KVM_MMU_HASH_SHIFT,
  KVM_PAGE_ARRAY_NR,
  KVM_PERMILLE_MMU_PAGES,
  KVM_REFILL_PAGES,
  listMove,
  MmuPage,
  PageList,
  PTE_PREFETCH_NUM,
  RMAP_RECYCLE_THRESHOLD,
  ROLE_AD_DISABLED,
  ROLE_CR0_WP,
  ROLE_DIRECT,
  ROLE_EFER_NX,
  ROLE_INVALID,
  ROLE_PASSTHROUGH,
  ROLE_QUADRANT_MASK,
  ROLE_SMAP_ANDNOT_WP,
  ROLE_SMEP_ANDNOT_WP,
  roleAccess,
  roleWith,
  SYNC_ROLE_IGN,
} from './mmu-page.ts'
import type { MmuConfig } from './options.ts'

const INVALID_PAGE = -1
/** `KVM_MMU_ROOT_CURRENT`, `KVM_MMU_ROOT_PREVIOUS(i)`, `KVM_MMU_ROOTS_ALL`. */
export const KVM_MMU_ROOT_CURRENT = 1
export const kvmMmuRootPrevious = (i: number): number => 1 << (1 + i)
export const KVM_MMU_ROOTS_ALL = 0xf
export const KVM_MMU_NUM_PREV_ROOTS = 3
const ENOSPC = -28
const EINTR = -4

/** Test-only switches that re-introduce the hazards of the seeds (shadow-mmu.md §13.1). */
export interface MmuHazards {
  /** Seed 000: zap walkers do not restart when prepare-zap reports an unstable active list. */
  seed000IgnoreUnstable: boolean
  /**
   * Seed 001: clear the parent's bit when an unsync child is added to the page vector (Lai's
   * variant) and read mmu_pages_add()'s "full after add" as "not added" — dropping that page.
   */
  seed001DropFullEntry: boolean
  /** Seed 003: trust stale unsync bits — a child with a set bit and no unsync children is synced as if unsync. */
  seed003TrustStaleBits: boolean
}

/** Per-memslot data (`slot->arch.rmap[]`, `slot->arch.gfn_write_track`). */
export interface SlotMmu {
  /** rmap[level-1][gfnToIndex]: the rmap head of that gfn/huge frame ({@link RmapEntry}). */
  readonly rmap: [RmapEntry[], RmapEntry[], RmapEntry[]]
  /** `gfn_write_track`. */
  readonly writeTrack: Uint16Array
}

/** One root slot (`struct kvm_mmu_root_info`). */
export interface RootInfo {
  pgd: number
  hpa: number
}

/** The vCPU's `struct kvm_mmu` (root_mmu) plus the walker. */
export class VcpuMmu {
  readonly vcpu: KvmVcpu
  root: RootInfo = { pgd: 0, hpa: INVALID_PAGE }
  readonly prevRoots: RootInfo[] = [
    { pgd: 0, hpa: INVALID_PAGE },
    { pgd: 0, hpa: INVALID_PAGE },
    { pgd: 0, hpa: INVALID_PAGE },
  ]
  /** `cpu_role.base` and `root_role` words. */
  cpuRole = 0
  rootRole = 0
  /** The context is direct (TDP, or a non-paging guest under shadow paging). */
  direct = false
  /** Guest paging levels (0 with paging off). */
  guestLevels = 0
  readonly walker: GuestWalker
  /** Legacy TDP: translator per root hpa. */
  translator: EptTranslator | null = null
  /**
   * `vcpu->arch.last_retry_eip` / `last_retry_addr`: the instruction (see {@link kvmRipRead}) and
   * address of the last unprotect-and-retry, so the same fault is emulated instead of retried
   * forever. (vCPU state in KVM; kept here because only the MMU reads and writes it.)
   */
  lastRetryEip = 0
  lastRetryAddr = 0
  /** The fault's state that lives across its yields (see ShadowMmu.pageFault). */
  readonly pf = new ShadowFault()

  constructor(vcpu: KvmVcpu, unbackedTables: 'open-bus' | 'kvm' = 'open-bus') {
    this.vcpu = vcpu
    this.walker = new GuestWalker(vcpu, unbackedTables)
  }
}

/** Fault parameters of mmu_set_spte (a null `fault` in the kernel = prefetch/sync). */
interface SetSpteFault {
  write: boolean
  prefetch: boolean
  hostWritable: boolean
}

/**
 * The shadow page fault in progress (`struct kvm_page_fault` and FNAME(fetch)'s position): plain
 * fields, so the fault's generator keeps no locals across its yields.
 */
export class ShadowFault extends FaultContinuation {
  addr = 0
  gfn = 0
  write = false
  /** The error code's U bit. */
  user = false
  slot: Memslot | null = null
  pfn = 0
  hostWritable = true
  hva = 0
  pteAccess = 0
  mmuSeq = 0
  /** FNAME(fetch)'s walk: the shadow page and entry it is at, and the child it is linking. */
  sp: MmuPage | null = null
  level = 0
  idx = 0
  child: MmuPage | null = null
  /** mmu_set_spte()'s fault argument, reused. */
  readonly setSpte: SetSpteFault = { write: false, prefetch: false, hostWritable: true }
  // ---- spfRun's state besides the continuation (phase: an SPH_* step)
  /** The exit's fault, for the whole of pageFault. */
  fault: PageFault | null = null
  /** write_lock(mmu_lock)'s fast-path cost (-1: it blocked). */
  acquireNs = 0
  /** mmu_lock is held for write by this fault (released if the fault throws). */
  lockHeld = false
  /** The result to return once mmu_lock is dropped. */
  ret = 0
}

// Where spfRun (pageFault's state machine) goes on after a yield.
/** kvm_mmu_page_fault()'s start, then GUP's cost. */
const SPH_BEGIN = 0
/** After GUP: write_lock(mmu_lock). */
const SPH_LOCK = 1
/** mmu_lock held: the checks under it and the fault's work cost. */
const SPH_LOCKED = 2
/** Work charged: direct_map() or FNAME(fetch). */
const SPH_MAP = 3
/** mmu_sync_children() returned (opResult) before linking a child. */
const SPH_AFTER_SYNC = 4
/** Drop mmu_lock, then the end. */
const SPH_UNLOCK = 5
/** The result is known: write-protected / ≤6.11 emulation follow-ups, or return. */
const SPH_END = 6
/** A follow-up returned (opResult): return it. */
const SPH_FINAL = 7

/** pageFault's steps: go on (besides RET_PF_*). */
const SPF_GO = -100
/** FNAME(fetch) stopped before linking a child with unsync children: sync it first. */
const FETCH_SYNC = -101
const PREFETCH_FAULT: SetSpteFault = { write: false, prefetch: true, hostWritable: true }

/**
 * The MMU of one VM: shadow pages, rmaps, write tracking, unsync, zapping, roots and the fault
 * paths. One class serves both strategies; `config.tdp` selects legacy TDP (direct EPT pages).
 */
export class ShadowMmu implements MmuInstance {
  readonly vm: Vm
  readonly config: MmuConfig
  readonly fmt: SpteFormat
  readonly mem: PhysMem
  readonly hazards: MmuHazards = { seed000IgnoreUnstable: false, seed001DropFullEntry: false, seed003TrustStaleBits: false }
  /** `active_mmu_pages` (head = newest). */
  readonly activeMmuPages = new PageList('active_mmu_pages')
  /** `zapped_obsolete_pages`. */
  readonly zappedObsoletePages = new PageList('zapped_obsolete_pages')
  /** `mmu_page_hash`: 4096 buckets, most recent first. */
  readonly mmuPageHash: (MmuPage[] | undefined)[] = new Array<MmuPage[] | undefined>(1 << KVM_MMU_HASH_SHIFT)
  /** Every allocated shadow page by the pfn of its spt (`to_shadow_page`). */
  readonly pageByPfn = new PfnMap<MmuPage>()
  /** {@link slotMmu}'s one-entry cache. */
  private lastSlot: Memslot | null = null
  private lastSlotMmu: SlotMmu | null = null
  nUsedMmuPages = 0
  nRequestedMmuPages = 0
  nMaxMmuPages = KVM_MIN_ALLOC_MMU_PAGES
  indirectShadowPages = 0
  mmuValidGen = 0
  readonly vcpuMmus: VcpuMmu[] = []
  /** WARN_ON()s hit (audit reports them). */
  readonly warnings: string[] = []
  /** Debug instrumentation: pages visited by zap walkers (tests of seed 000). */
  zapVisitLog: MmuPage[] | null = null
  /** Counters beyond KVM's stats. */
  readonly counters = {
    syncPages: 0,
    syncSptes: 0,
    unsyncWalks: 0,
    prefetched: 0,
    zapRestarts: 0,
    trackWrites: 0,
    fastFixed: 0,
    sptesWrittenProtected: 0,
    /** Faults that returned RET_PF_WRITE_PROTECTED from the fault path (≥6.12 model). */
    writeProtectedFaults: 0,
    /** Faults kvm_mmu_write_protect_fault() / the ≤6.11 check resolved by unprotect-and-retry. */
    unprotectRetries: 0,
    /** Dummy roots loaded (a guest root gfn without a visible memslot). */
    dummyRootLoads: 0,
    /** SPTEs zapped by kvm_mmu_zap_collapsible_spte() (dirty logging turned off). */
    collapsibleSptesZapped: 0,
  }
  /**
   * The dummy root (`kvm_mmu_get_dummy_root()`: the host's zero page): a host frame that is never
   * written, so every translation through it is a not-present fault and exits. Allocated on first
   * use, freed at VM teardown; it is not a shadow page (not counted as an MMU page table).
   */
  private dummyRootHpa = INVALID_PAGE
  /** What the fault path returns for a write refused by write protection (per `writeProtectedFault`). */
  private readonly retPfWriteProtected: RetPf
  private readonly slotKey: string
  /** Slots removed by a memslot update whose SPTEs may still be zapped (delete/move in flight). */
  private readonly retiredSlots: Memslot[] = []
  private readonly spte: Spte64 = { lo: 0, hi: 0 }
  private wrprot = false
  /** Scratch pvec (`struct kvm_mmu_pages`) and path (`struct mmu_page_path`). */
  private readonly pvecSp: (MmuPage | null)[] = new Array<MmuPage | null>(KVM_PAGE_ARRAY_NR).fill(null)
  private readonly pvecIdx = new Int32Array(KVM_PAGE_ARRAY_NR)
  private pvecNr = 0
  private readonly pathParent: (MmuPage | null)[] = [null, null, null, null, null, null]
  private readonly pathIdx = new Int32Array(6)
  private gLo = 0
  private gHi = 0
  private nrZapped = 0
  private readonly hostWriteScratch = { hostWritable: true }

  constructor(vm: Vm, config: MmuConfig) {
    this.vm = vm
    this.config = config
    this.mem = vm.host.mem
    this.fmt = config.tdp ? makeSpteFormat('ept', { adEnabled: config.eptAdBits, maxPhyAddr: vm.features.maxPhyAddr }) : X86_SPTE_FORMAT
    this.slotKey = config.name
    this.nRequestedMmuPages = config.pageQuota
    if (config.pageQuota > 0) this.nMaxMmuPages = config.pageQuota
    this.retPfWriteProtected = config.writeProtectedFault === 'emulate' ? RET_PF_EMULATE : RET_PF_WRITE_PROTECTED
  }

  // ================================================================== helpers

  private warn(msg: string): void {
    if (this.warnings.length < 1000) this.warnings.push(msg)
  }

  private get costs() {
    return this.vm.sched.costs
  }

  /** Read an SPTE: returns lo, hi in `this.mem.hi64`. */
  private readSpte(sptep: number): number {
    return this.mem.read64(sptep)
  }

  private writeSpte(sptep: number, lo: number, hi: number): void {
    this.mem.write64(sptep, lo >>> 0, hi >>> 0)
  }

  /** `to_shadow_page(hpa)` / `spte_to_child_sp`. */
  spOfHpa(hpa: number): MmuPage {
    const sp = this.pageByPfn.get(Math.floor(hpa / 4096))
    if (sp === undefined) throw new KvmError('EIO', `shadow-mmu: no shadow page at hpa 0x${hpa.toString(16)}`)
    return sp
  }

  private childOf(lo: number, hi: number): MmuPage {
    return this.spOfHpa(spteToPfn(lo, hi) * 4096)
  }

  /** `sptep_to_sp`. */
  spOfSptep(sptep: number): MmuPage {
    return this.spOfHpa(alignDown(sptep, 4096))
  }

  /** The vCPU's MMU context. */
  vmmu(vcpu: KvmVcpu): VcpuMmu {
    return this.vcpuMmus[vcpu.id]!
  }

  /** Memslot of `gfn` in address space `asId`, including slots being deleted (their SPTEs are zapped first in KVM). */
  slotForGfn(asId: number, gfn: number): Memslot | null {
    const s = this.vm.memslots.gfnToMemslot(asId, gfn)
    if (s !== null) return s
    for (const r of this.retiredSlots) if (r.asId === asId && gfn >= r.baseGfn && gfn < r.baseGfn + r.npages) return r
    return null
  }

  /** The slot's rmaps and write-track counts (allocated on first use). */
  /** The slot's data if it has any (no entry made), through {@link slotMmu}'s one-entry cache. */
  private peekSlotMmu(slot: Memslot): SlotMmu | undefined {
    if (slot === this.lastSlot) return this.lastSlotMmu!
    return slot.arch.mmu.get(this.slotKey) as SlotMmu | undefined
  }

  slotMmu(slot: Memslot): SlotMmu {
    // The last slot's data, cached: a fault asks for it several times. An entry, once made, stays
    // with its Memslot object for the slot's life (a changed memslot is a new object).
    if (slot === this.lastSlot) return this.lastSlotMmu!
    let d = slot.arch.mmu.get(this.slotKey) as SlotMmu | undefined
    if (d === undefined) {
      const n2 = slot.arch.lpageInfo[0].length
      const n3 = slot.arch.lpageInfo[1].length
      d = {
        rmap: [new Array<RmapEntry>(slot.npages), new Array<RmapEntry>(n2), new Array<RmapEntry>(n3)],
        writeTrack: new Uint16Array(slot.npages),
      }
      slot.arch.mmu.set(this.slotKey, d)
    }
    this.lastSlot = slot
    this.lastSlotMmu = d
    return d
  }

  /** `kvm_mmu_page_get_gfn(sp, index)`. */
  spGetGfn(sp: MmuPage, i: number): number {
    if (sp.shadowedGfn !== null) return sp.shadowedGfn[i]!
    if ((sp.role & ROLE_PASSTHROUGH) !== 0) return sp.gfn
    return sp.gfn + i * kvmPagesPerHpage(sp.level)
  }

  /** `kvm_mmu_page_get_access(sp, index)`. */
  spGetAccess(sp: MmuPage, i: number): number {
    if (sp.shadowedAccess !== null) return sp.shadowedAccess[i]!
    return roleAccess(sp.role)
  }

  /** `is_obsolete_sp`. */
  isObsoleteSp(sp: MmuPage): boolean {
    return sp.invalid || sp.mmuValidGen !== this.mmuValidGen
  }

  private asIdOf(sp: MmuPage): number {
    return sp.role >>> 24
  }

  private hashBucket(gfn: number): MmuPage[] {
    const h = mmuPageHashIndex(gfn)
    let b = this.mmuPageHash[h]
    if (b === undefined) this.mmuPageHash[h] = b = []
    return b
  }

  /** Every shadow page in the hash (live, or zapped and awaiting commit). */
  *allPages(): Generator<MmuPage> {
    for (const b of this.mmuPageHash) if (b !== undefined) yield* b
  }

  private check(): void {
    if (!this.config.auditEveryOp) return
    const v = this.audit()
    if (v.length > 0) throw new KvmError('EIO', `shadow-mmu audit failed:\n  ${v.slice(0, 10).join('\n  ')}`)
  }

  // ================================================================== MmuInstance: vCPUs and roots

  vcpuCreate(vcpu: KvmVcpu): void {
    const v = new VcpuMmu(vcpu, this.config.unbackedGuestTables)
    this.vcpuMmus[vcpu.id] = v
    this.initMmu(v)
  }

  hasValidRoot(vcpu: KvmVcpu): boolean {
    return this.vmmu(vcpu).root.hpa !== INVALID_PAGE
  }

  /** kvm_mmu_get_dummy_root(): the zero page, allocated on first use. */
  kvmMmuGetDummyRoot(): number {
    if (this.dummyRootHpa === INVALID_PAGE) {
      const f = this.vm.host.frames.alloc()
      if (f < 0) throw new KvmError('ENOMEM', 'host memory exhausted allocating the dummy root (the zero page); give the VM more hostMemBytes')
      this.dummyRootHpa = f * 4096
    }
    return this.dummyRootHpa
  }

  /** kvm_mmu_is_dummy_root(). */
  kvmMmuIsDummyRoot(hpa: number): boolean {
    return hpa !== INVALID_PAGE && hpa === this.dummyRootHpa
  }

  /**
   * kvm_init_mmu(): compute `cpu_role` and `root_role` from CR0/CR4/EFER (shadow paging,
   * kvm_calc_cpu_role + kvm_init_shadow_mmu) or the TDP root role (kvm_calc_tdp_mmu_root_page_role).
   */
  private initMmu(v: VcpuMmu): void {
    const hw = v.vcpu.hw
    if (this.config.tdp) {
      v.direct = true
      v.guestLevels = hw.ctx.levels
      v.cpuRole = ROLE_DIRECT | (ACC_ALL << 8)
      v.rootRole = ROLE_DIRECT | (ACC_ALL << 8) | ROLE_CR0_WP | ROLE_EFER_NX | this.config.eptLevels | (this.config.eptAdBits ? 0 : ROLE_AD_DISABLED)
      return
    }
    const ctx = hw.ctx
    const s = hw.state
    if (ctx.mode === PAGING_NONE) {
      v.direct = true
      v.guestLevels = 0
      v.cpuRole = ROLE_DIRECT | (ACC_ALL << 8)
      // KVM uses PAE roots for non-paging guests; the modelled hardware walks 4/5-level tables only.
      v.rootRole = ROLE_DIRECT | (ACC_ALL << 8) | ROLE_EFER_NX | 4
      return
    }
    v.direct = false
    v.guestLevels = ctx.levels
    const wp = (s.cr0 & CR0_WP) !== 0
    let role = (ACC_ALL << 8) | ctx.levels
    if ((s.efer & EFER_NXE) !== 0) role |= ROLE_EFER_NX
    if (wp) role |= ROLE_CR0_WP
    if ((s.cr4 & CR4_SMEP) !== 0 && !wp) role |= ROLE_SMEP_ANDNOT_WP
    if ((s.cr4 & CR4_SMAP) !== 0 && !wp) role |= ROLE_SMAP_ANDNOT_WP
    v.cpuRole = role >>> 0
    v.rootRole = (role | ROLE_EFER_NX) >>> 0
  }

  /** kvm_mmu_load(): allocate the root, sync it, load it into hardware, flush the current context. */
  *load(vcpu: KvmVcpu): KernelOp<number> {
    const v = this.vmmu(vcpu)
    const vm = this.vm
    yield* vm.mmuLock.writeLock()
    try {
      const r = this.makeMmuPagesAvailable()
      if (r < 0) return r
      if (v.direct) {
        // mmu_alloc_direct_roots()
        v.root.hpa = this.mmuAllocRoot(v, 0, v.rootRole & 0xf)
        v.root.pgd = 0
      } else {
        // mmu_alloc_shadow_roots()
        const pgd = vcpu.hw.state.cr3
        const rootGfn = Math.floor(vcpu.hw.ctx.root / 4096)
        if (!kvmIsVisibleMemslot(this.vm.memslots.gfnToMemslot(vcpu.asId, rootGfn))) {
          // kvm_vcpu_is_visible_gfn() failed: load the dummy root (root.pgd is left as is). Every
          // access faults; FNAME(page_fault) then injects the guest's #PF, or — once a memslot
          // makes the table visible — FNAME(fetch) drops the dummy root and retries.
          v.root.hpa = this.kvmMmuGetDummyRoot()
          this.counters.dummyRootLoads++
        } else {
          v.root.hpa = this.mmuAllocRoot(v, rootGfn, v.guestLevels)
          v.root.pgd = pgd
        }
      }
    } finally {
      vm.mmuLock.writeUnlock()
    }
    yield* this.syncRoots(vcpu)
    this.loadPgd(v)
    vcpu.hw.flushCurrent()
    this.check()
    return 0
  }

  /** kvm_mmu_load_pgd(): point the hardware at the current root. */
  private loadPgd(v: VcpuMmu): void {
    const hw = v.vcpu.hw
    const hpa = v.root.hpa
    if (hpa === INVALID_PAGE) return
    if (this.config.tdp) {
      if (v.translator?.root !== hpa) {
        v.translator = new EptTranslator(this.mem, this.vm.features, { root: hpa, levels: this.config.eptLevels, adEnabled: this.config.eptAdBits })
        if (hw.mode !== MODE_TDP) hw.setTdpMode(this.mem, v.translator, 1)
        else hw.setNested(v.translator, 1)
      }
      return
    }
    const levels: 4 | 5 = (this.kvmMmuIsDummyRoot(hpa) ? v.rootRole & 0xf : this.spOfHpa(hpa).level) === 5 ? 5 : 4
    if (hw.shadowLevels !== levels) hw.setShadowMode(this.mem, 1, levels)
    hw.loadShadowRoot(hpa)
  }

  /** mmu_alloc_root(): find or create the root page and take a root reference. */
  private mmuAllocRoot(v: VcpuMmu, gfn: number, level: number): number {
    const role = ((v.rootRole & ~0xf) | level) >>> 0
    const sp = this.kvmMmuGetShadowPage(v, gfn, role)
    sp.rootCount++
    return sp.hpa
  }

  /** mmu_free_root_page(): drop a root reference; an invalid root is zapped again when unreferenced. */
  private mmuFreeRootPage(root: RootInfo, invalid: PageList): void {
    if (root.hpa === INVALID_PAGE) return
    const sp = this.spOfHpa(root.hpa)
    if (--sp.rootCount === 0 && sp.invalid) this.kvmMmuPrepareZapPage(sp, invalid)
    if (sp.rootCount < 0) this.warn(`root_count of ${sp.toString()} went negative`)
    root.hpa = INVALID_PAGE
    root.pgd = 0
  }

  /** kvm_mmu_free_roots(kvm, mmu, roots_to_free). */
  *kvmMmuFreeRoots(v: VcpuMmu, rootsToFree: number): KernelOp {
    const freeActive = (rootsToFree & KVM_MMU_ROOT_CURRENT) !== 0 && v.root.hpa !== INVALID_PAGE
    if (!freeActive) {
      let any = false
      for (let i = 0; i < KVM_MMU_NUM_PREV_ROOTS; i++) if ((rootsToFree & kvmMmuRootPrevious(i)) !== 0 && v.prevRoots[i]!.hpa !== INVALID_PAGE) any = true
      if (!any) return
    }
    yield* this.vm.mmuLock.writeLock()
    const invalid = new PageList('invalid_list')
    for (let i = 0; i < KVM_MMU_NUM_PREV_ROOTS; i++) if ((rootsToFree & kvmMmuRootPrevious(i)) !== 0) this.mmuFreeRootPage(v.prevRoots[i]!, invalid)
    if (freeActive) {
      if (this.kvmMmuIsDummyRoot(v.root.hpa)) {
        // Nothing to clean up for the dummy root.
        v.root.hpa = INVALID_PAGE
        v.root.pgd = 0
      } else this.mmuFreeRootPage(v.root, invalid)
    }
    this.kvmMmuCommitZapPage(invalid)
    this.vm.mmuLock.writeUnlock()
  }

  /** kvm_mmu_unload(): free every root of the vCPU. */
  *unload(vcpu: KvmVcpu): KernelOp {
    yield* this.kvmMmuFreeRoots(this.vmmu(vcpu), KVM_MMU_ROOTS_ALL)
    this.check()
  }

  /** kvm_mmu_reset_context(): unload, then re-init the roles. */
  *resetContext(vcpu: KvmVcpu): KernelOp {
    const v = this.vmmu(vcpu)
    yield* this.kvmMmuFreeRoots(v, KVM_MMU_ROOTS_ALL)
    this.initMmu(v)
    this.check()
  }

  /** is_root_usable(). */
  private isRootUsable(root: RootInfo, pgd: number, role: number): boolean {
    if (root.hpa === INVALID_PAGE) return false
    if ((role & ROLE_DIRECT) === 0 && pgd !== root.pgd) return false
    const sp = this.pageByPfn.get(root.hpa / 4096)
    return sp?.role === role
  }

  /** kvm_mmu_new_pgd() → fast_pgd_switch(): reuse a cached root for the new CR3, rotating prev_roots. */
  *newPgd(vcpu: KvmVcpu, cr3: number): KernelOp {
    const v = this.vmmu(vcpu)
    if (v.direct && this.config.tdp) return
    // The role may have to follow a paging-mode change that arrives through CR3 alone (never, on x86).
    const role = v.rootRole
    let found = false
    // fast_pgd_switch(): a current root not backed by a shadow page (the dummy root) is never
    // cached; free it first.
    if (v.root.hpa !== INVALID_PAGE && !this.pageByPfn.has(v.root.hpa / 4096)) yield* this.kvmMmuFreeRoots(v, KVM_MMU_ROOT_CURRENT)
    if (v.root.hpa !== INVALID_PAGE) {
      // cached_root_find_and_keep_current()
      if (this.isRootUsable(v.root, cr3, role)) found = true
      else {
        for (let i = 0; i < KVM_MMU_NUM_PREV_ROOTS; i++) {
          const t = v.root
          v.root = v.prevRoots[i]!
          v.prevRoots[i] = t
          if (this.isRootUsable(v.root, cr3, role)) {
            found = true
            break
          }
        }
        if (!found) yield* this.kvmMmuFreeRoots(v, KVM_MMU_ROOT_CURRENT)
      }
    } else {
      // cached_root_find_without_current()
      for (let i = 0; i < KVM_MMU_NUM_PREV_ROOTS; i++) {
        if (this.isRootUsable(v.prevRoots[i]!, cr3, role)) {
          const t = v.root
          v.root = v.prevRoots[i]!
          v.prevRoots[i] = t
          for (; i < KVM_MMU_NUM_PREV_ROOTS - 1; i++) v.prevRoots[i] = v.prevRoots[i + 1]!
          v.prevRoots[i] = { pgd: 0, hpa: INVALID_PAGE }
          found = true
          break
        }
      }
    }
    if (!found) return
    // KVM_REQ_LOAD_MMU_PGD: the hardware switches root before the next entry.
    this.loadPgd(v)
    if (v.root.hpa !== INVALID_PAGE) this.spOfHpa(v.root.hpa).writeFloodingCount = 0
    this.check()
  }

  /** The pcid of a root's pgd (kvm_get_pcid) — only meaningful with CR4.PCIDE. */
  private pcidOf(vcpu: KvmVcpu, pgd: number): number {
    return vcpu.hw.ctx.pcide ? pgd % 4096 : 0
  }

  /** kvm_invalidate_pcid()'s MMU part: free the previous roots with that PCID. */
  *invalidatePcid(vcpu: KvmVcpu, pcid: number): KernelOp {
    const v = this.vmmu(vcpu)
    if (v.direct) return
    let roots = 0
    for (let i = 0; i < KVM_MMU_NUM_PREV_ROOTS; i++) if (this.pcidOf(vcpu, v.prevRoots[i]!.pgd) === pcid) roots |= kvmMmuRootPrevious(i)
    yield* this.kvmMmuFreeRoots(v, roots)
    this.check()
  }

  /** kvm_mmu_invlpg() / kvm_mmu_invpcid_gva() → kvm_mmu_invalidate_addr(). */
  *invalidateGva(vcpu: KvmVcpu, gva: number, pcid: number): KernelOp {
    const v = this.vmmu(vcpu)
    if (v.direct) return // no sync_spte hook
    if (pcid < 0 || pcid === this.pcidOf(vcpu, v.root.pgd)) yield* this.invalidateAddrRoot(v, gva, v.root.hpa)
    for (let i = 0; i < KVM_MMU_NUM_PREV_ROOTS; i++) {
      const r = v.prevRoots[i]!
      if (pcid < 0 || this.pcidOf(vcpu, r.pgd) === pcid) yield* this.invalidateAddrRoot(v, gva, r.hpa)
    }
    this.check()
  }

  /** __kvm_mmu_invalidate_addr(): sync the one SPTE for `addr` in every unsync page on the path. */
  private *invalidateAddrRoot(v: VcpuMmu, addr: number, rootHpa: number): KernelOp {
    // The dummy root has no entries (and no shadow page) to sync. In KVM a vCPU on the dummy root
    // cannot even fetch an INVLPG; the modelled guest ops need no fetch.
    if (rootHpa === INVALID_PAGE || this.kvmMmuIsDummyRoot(rootHpa)) return
    yield* this.vm.mmuLock.writeLock()
    try {
      let sp = this.spOfHpa(rootHpa)
      for (;;) {
        const idx = spteIndex(addr, sp.level)
        const sptep = sp.hpa + idx * 8
        if (sp.unsync) {
          const ret = this.syncSpte(v, sp, idx)
          if (ret < 0) this.mmuPageZapPte(sp, idx, null)
          if (ret !== 0) this.vm.flushRemoteTlbs()
        }
        if (sp.unsyncChildren === 0) break
        const lo = this.readSpte(sptep)
        const hi = this.mem.hi64
        if (!isShadowPresentPte(lo) || sp.level === 1 || isLargePte(lo)) break
        sp = this.childOf(lo, hi)
      }
    } finally {
      this.vm.mmuLock.writeUnlock()
    }
  }

  /** is_unsync_root(). */
  private isUnsyncRoot(hpa: number): boolean {
    if (hpa === INVALID_PAGE || this.kvmMmuIsDummyRoot(hpa)) return false
    const sp = this.pageByPfn.get(hpa / 4096)
    if (sp === undefined) {
      this.warn(`is_unsync_root: root 0x${hpa.toString(16)} is no shadow page`)
      return false
    }
    return sp.unsync || sp.unsyncChildren !== 0
  }

  /** kvm_mmu_sync_roots(). */
  *syncRoots(vcpu: KvmVcpu): KernelOp {
    const v = this.vmmu(vcpu)
    if (v.direct || v.root.hpa === INVALID_PAGE) return
    if (!this.isUnsyncRoot(v.root.hpa)) return
    yield* this.vm.mmuLock.writeLock()
    try {
      yield* this.mmuSyncChildren(v, this.spOfHpa(v.root.hpa), true)
    } finally {
      this.vm.mmuLock.writeUnlock()
    }
    this.check()
  }

  /** kvm_vcpu_flush_tlb_guest(): sync the current root, free unsync previous roots. */
  *flushTlbGuest(vcpu: KvmVcpu): KernelOp {
    if (this.config.tdp) return
    yield* this.syncRoots(vcpu)
    // kvm_mmu_sync_prev_roots()
    const v = this.vmmu(vcpu)
    let roots = 0
    for (let i = 0; i < KVM_MMU_NUM_PREV_ROOTS; i++) if (this.isUnsyncRoot(v.prevRoots[i]!.hpa)) roots |= kvmMmuRootPrevious(i)
    yield* this.kvmMmuFreeRoots(v, roots)
    this.check()
  }

  /** is_obsolete_root(). */
  private isObsoleteRoot(hpa: number): boolean {
    if (hpa === INVALID_PAGE) return false
    const sp = this.pageByPfn.get(hpa / 4096)
    return sp === undefined || this.isObsoleteSp(sp)
  }

  /** kvm_mmu_free_obsolete_roots(). */
  *freeObsoleteRoots(vcpu: KvmVcpu): KernelOp {
    const v = this.vmmu(vcpu)
    let roots = 0
    if (this.isObsoleteRoot(v.root.hpa)) roots |= KVM_MMU_ROOT_CURRENT
    for (let i = 0; i < KVM_MMU_NUM_PREV_ROOTS; i++) if (this.isObsoleteRoot(v.prevRoots[i]!.hpa)) roots |= kvmMmuRootPrevious(i)
    if (roots !== 0) yield* this.kvmMmuFreeRoots(v, roots)
    this.check()
  }

  // ================================================================== shadow page lookup and allocation

  /** kvm_mmu_child_role(). */
  private childRole(parentRole: number, direct: boolean, access: number): number {
    let role = roleWith(parentRole, (parentRole & 0xf) - 1, access)
    role &= ~(ROLE_DIRECT | ROLE_PASSTHROUGH | ROLE_QUADRANT_MASK | ROLE_INVALID)
    if (direct) role |= ROLE_DIRECT
    return role >>> 0
  }

  /** kvm_mmu_get_shadow_page() = kvm_mmu_find_shadow_page() or kvm_mmu_alloc_shadow_page(). */
  kvmMmuGetShadowPage(v: VcpuMmu, gfn: number, role: number): MmuPage {
    const bucket = this.hashBucket(gfn)
    const invalid = new PageList('invalid_list')
    let found: MmuPage | null = null
    let collisions = 0
    for (let i = 0; i < bucket.length; i++) {
      const sp = bucket[i]!
      if (this.isObsoleteSp(sp)) continue
      if (sp.gfn !== gfn) {
        collisions++
        continue
      }
      if (sp.role !== role) {
        // The gfn is becoming an upper-level table: an unsync page of it cannot stay writable.
        if ((role & 0xf) > 1 && sp.unsync) this.kvmMmuPrepareZapPage(sp, invalid)
        continue
      }
      if (!sp.direct && sp.unsync) {
        // A transient sync: re-read the gPTEs without write-protecting or clearing unsync.
        const ret = this.kvmSyncPage(v, sp, invalid)
        if (ret < 0) break
        if (ret > 0) this.vm.flushRemoteTlbs()
      }
      sp.writeFloodingCount = 0
      found = sp
      break
    }
    if (found === null) this.vm.stats.mmu_cache_miss++
    this.kvmMmuCommitZapPage(invalid)
    if (collisions > this.vm.stats.max_mmu_page_hash_collisions) this.vm.stats.max_mmu_page_hash_collisions = collisions
    return found ?? this.kvmMmuAllocShadowPage(gfn, role, bucket)
  }

  /** kvm_mmu_alloc_shadow_page(). */
  private kvmMmuAllocShadowPage(gfn: number, role: number, bucket: MmuPage[]): MmuPage {
    const hpa = this.vm.allocMmuPage()
    const sp = new MmuPage(gfn, role, hpa, this.mmuValidGen)
    this.pageByPfn.set(hpa / 4096, sp)
    this.activeMmuPages.addHead(sp)
    this.nUsedMmuPages++
    this.vm.stats.mmu_shadow_pages++
    bucket.unshift(sp)
    if (sp.hasGptes) this.accountShadowed(sp)
    return sp
  }

  /** account_shadowed(): write-track (level > 1) or just write-protect (level 1) the shadowed gfn. */
  private accountShadowed(sp: MmuPage): void {
    this.indirectShadowPages++
    const slot = this.slotForGfn(this.asIdOf(sp), sp.gfn)
    if (slot === null) return
    if (sp.level > 1) {
      // __kvm_write_track_add_gfn()
      this.slotMmu(slot).writeTrack[sp.gfn - slot.baseGfn]!++
      updateGfnDisallowLpageCount(slot, sp.gfn, 1)
      if (this.slotGfnWriteProtect(slot, sp.gfn, 1, true)) this.vm.flushRemoteTlbs()
      return
    }
    updateGfnDisallowLpageCount(slot, sp.gfn, 1)
    if (this.slotGfnWriteProtect(slot, sp.gfn, 1, true)) this.vm.flushRemoteTlbs()
  }

  /** unaccount_shadowed(). */
  private unaccountShadowed(sp: MmuPage): void {
    this.indirectShadowPages--
    const slot = this.slotForGfn(this.asIdOf(sp), sp.gfn)
    if (slot === null) return
    if (sp.level > 1) this.slotMmu(slot).writeTrack[sp.gfn - slot.baseGfn]!--
    updateGfnDisallowLpageCount(slot, sp.gfn, -1)
  }

  /** kvm_gfn_is_write_tracked(). */
  gfnIsWriteTracked(asId: number, gfn: number): boolean {
    const slot = this.slotForGfn(asId, gfn)
    if (slot === null) return false
    const d = this.peekSlotMmu(slot)
    return d !== undefined && d.writeTrack[gfn - slot.baseGfn]! > 0
  }

  // ================================================================== linking

  /** link_shadow_page(): point `sptep` (in `parent` at `idx`) at `sp`. */
  private linkShadowPage(parent: MmuPage, idx: number, sp: MmuPage): void {
    const sptep = parent.hpa + idx * 8
    const lo = this.readSpte(sptep)
    if (isShadowPresentPte(lo)) {
      // drop_large_spte(): the entry must be a huge leaf being replaced by a table.
      if (!isLargePte(lo)) this.warn(`link_shadow_page over a non-leaf SPTE in ${parent.toString()}[${idx}]`)
      this.dropSpte(parent, idx)
      this.vm.flushRemoteTlbs()
    }
    const s = makeNonLeafSpte(this.spte, this.fmt, sp.hpa, (sp.role & ROLE_AD_DISABLED) !== 0)
    this.writeSpte(sptep, s.lo, s.hi)
    this.vm.sched.charge(this.costs.memoryRef)
    sp.addParent(parent, idx)
    if (sp.unsyncChildren !== 0) this.warn(`link_shadow_page: ${sp.toString()} still has unsync children`)
    if (sp.unsyncChildren !== 0 || sp.unsync) this.markUnsync(parent, idx)
  }

  /** drop_parent_pte(): unlink `sp` from the parent SPTE and clear it (the child may become an orphan). */
  private dropParentPte(sp: MmuPage, parent: MmuPage, idx: number): void {
    if (!sp.removeParent(parent, idx)) this.warn(`drop_parent_pte: ${parent.toString()}[${idx}] is not a parent of ${sp.toString()}`)
    this.writeSpte(parent.hpa + idx * 8, 0, 0)
  }

  /** validate_direct_spte(): a direct child with other access must be replaced. */
  /** Where {@link directDescend} stopped: the SP and index of the entry at the goal level. */
  private descSp!: MmuPage
  private descIdx = 0

  /**
   * The descent through direct shadow pages shared by FNAME(fetch)'s direct part and direct_map():
   * from entry `idx` of `sp` (at `level`) down to `goal`, reusing present non-leaf children and
   * creating the missing ones (kvm_mmu_get_child_sp + link_shadow_page). FNAME(fetch) first
   * validates each direct SPTE against the guest's access (validate_direct_spte). Leaves the result
   * in descSp/descIdx (no allocation on the fault path).
   */
  private directDescend(v: VcpuMmu, sp: MmuPage, idx: number, addr: number, gfn: number, level: number, goal: number, access: number, validate: boolean): void {
    for (; level > goal; level--) {
      if (validate) this.validateDirectSpte(sp, idx, access)
      const lo = this.readSpte(sp.hpa + idx * 8)
      const hi = this.mem.hi64
      let child: MmuPage
      if (isShadowPresentPte(lo) && !isLargePte(lo)) child = this.childOf(lo, hi)
      else {
        const baseGfn = alignDown(gfn, kvmPagesPerHpage(level))
        child = this.kvmMmuGetShadowPage(v, baseGfn, this.childRole(sp.role, true, access))
        this.linkShadowPage(sp, idx, child)
      }
      sp = child
      idx = spteIndex(addr, level - 1)
    }
    this.descSp = sp
    this.descIdx = idx
  }

  private validateDirectSpte(parent: MmuPage, idx: number, access: number): void {
    const lo = this.readSpte(parent.hpa + idx * 8)
    const hi = this.mem.hi64
    if (!isShadowPresentPte(lo) || isLargePte(lo)) return
    const child = this.childOf(lo, hi)
    if (roleAccess(child.role) === access) return
    this.dropParentPte(child, parent, idx)
    this.vm.flushRemoteTlbs()
  }

  // ================================================================== rmaps and SPTE updates

  /** The rmap head of (slot, level, gfn) as an array, or undefined if it never had an SPTE. */
  private rmapHead(slot: Memslot, level: number, gfn: number): number[] | undefined {
    return rmapArrayAt(this.slotMmu(slot).rmap[level - 1]!, gfnToIndex(gfn, slot.baseGfn, level))
  }

  private updatePageStats(level: number, delta: number): void {
    const s = this.vm.stats
    if (level === 1) s.pages_4k += delta
    else if (level === 2) s.pages_2m += delta
    else s.pages_1g += delta
  }

  /** rmap_add(). */
  private rmapAdd(slot: Memslot, sp: MmuPage, idx: number, gfn: number, access: number): void {
    if (sp.shadowedGfn !== null) {
      sp.shadowedGfn[idx] = gfn
      sp.shadowedAccess![idx] = access
    }
    this.updatePageStats(sp.level, 1)
    const sptep = sp.hpa + idx * 8
    const arr = this.slotMmu(slot).rmap[sp.level - 1]!
    const i = gfnToIndex(gfn, slot.baseGfn, sp.level)
    const h = arr[i]
    // The first SPTE goes in place (no allocation); a second makes the head an array.
    if (h === undefined || (typeof h !== 'number' && h.length === 0)) {
      arr[i] = sptep / 8
      if (this.vm.stats.max_mmu_rmap_size < 1) this.vm.stats.max_mmu_rmap_size = 1
      return
    }
    let head: number[]
    if (typeof h === 'number') arr[i] = head = [h * 8, sptep]
    else (head = h).push(sptep)
    const n = head.length
    if (n > this.vm.stats.max_mmu_rmap_size) this.vm.stats.max_mmu_rmap_size = n
    if (n > RMAP_RECYCLE_THRESHOLD) {
      // kvm_zap_all_rmap_sptes()
      while (head.length > 0) this.dropSpteAt(head[head.length - 1]!)
      this.vm.flushRemoteTlbs()
    }
  }

  /** rmap_remove(). */
  private rmapRemove(sp: MmuPage, idx: number): void {
    const gfn = this.spGetGfn(sp, idx)
    const slot = this.slotForGfn(this.asIdOf(sp), gfn)
    const sptep = sp.hpa + idx * 8
    if (slot !== null) {
      // A single SPTE in place: empty the head.
      const arr = this.slotMmu(slot).rmap[sp.level - 1]!
      const k = gfnToIndex(gfn, slot.baseGfn, sp.level)
      if (arr[k] === sptep / 8) {
        arr[k] = undefined
        return
      }
    }
    const head = slot === null ? undefined : this.rmapHead(slot, sp.level, gfn)
    const i = head === undefined ? -1 : head.indexOf(sptep)
    if (i < 0) {
      this.warn(`rmap_remove: SPTE ${sp.toString()}[${idx}] for gfn 0x${gfn.toString(16)} is in no rmap`)
      return
    }
    const last = head!.length - 1
    head![i] = head![last]!
    head!.pop()
  }

  /** drop_spte(): clear a leaf and remove it from its rmap. */
  private dropSpte(sp: MmuPage, idx: number): void {
    const sptep = sp.hpa + idx * 8
    const lo = this.readSpte(sptep)
    this.writeSpte(sptep, 0, 0)
    if (isShadowPresentPte(lo)) {
      this.rmapRemove(sp, idx)
      this.updatePageStats(sp.level, -1)
    }
  }

  private dropSpteAt(sptep: number): void {
    const sp = this.spOfSptep(sptep)
    this.dropSpte(sp, (sptep - alignDown(sptep, 4096)) / 8)
  }

  /** mmu_page_zap_pte(): zap one entry of `sp`; a non-leaf only loses its link (child orphaned). */
  private mmuPageZapPte(sp: MmuPage, idx: number, _invalid: PageList | null): boolean {
    const sptep = sp.hpa + idx * 8
    const lo = this.readSpte(sptep)
    const hi = this.mem.hi64
    if (isShadowPresentPte(lo)) {
      if (sp.level === 1 || isLargePte(lo)) this.dropSpte(sp, idx)
      else this.dropParentPte(this.childOf(lo, hi), sp, idx)
      return true
    }
    if ((lo | hi) !== 0 && isMmioSpte(this.fmt, lo, hi)) this.writeSpte(sptep, 0, 0)
    return false
  }

  /** spte_write_protect() over an rmap; `ptProtect` also clears MMU-writable. Returns whether a flush is needed. */
  private rmapWriteProtect(head: number[] | undefined, ptProtect: boolean): boolean {
    if (head === undefined) return false
    const fmt = this.fmt
    let flush = false
    for (let i = 0; i < head.length; i++) {
      const sptep = head[i]!
      let lo = this.readSpte(sptep)
      let hi = this.mem.hi64
      const mmuW = isMmuWritableSpte(fmt, lo, hi)
      if (!isWritablePte(lo) && !(ptProtect && mmuW)) continue
      if (isWritablePte(lo)) flush = true
      if (ptProtect) {
        lo &= ~fmt.mmuWritableLo
        hi &= ~fmt.mmuWritableHi
        if (mmuW) flush = true
      }
      lo &= ~2
      this.writeSpte(sptep, lo, hi)
      this.counters.sptesWrittenProtected++
    }
    return flush
  }

  /** kvm_mmu_slot_gfn_write_protect(slot, gfn, min_level) with pt_protect (levels min..3). */
  private slotGfnWriteProtect(slot: Memslot, gfn: number, minLevel: number, ptProtect: boolean): boolean {
    let flush = false
    for (let level = minLevel; level <= 3; level++) flush = this.rmapWriteProtect(this.rmapHead(slot, level, gfn), ptProtect) || flush
    return flush
  }

  // ================================================================== make_spte / mmu_set_spte

  /**
   * make_spte(): the SPTE for `pfn` with `access` into `this.spte`; sets `this.wrprot` when the
   * write had to be refused (the gfn is shadowed and cannot go unsync).
   */
  private makeSpteFor(sp: MmuPage, slot: Memslot | null, access: number, gfn: number, pfn: number, oldLo: number, prefetch: boolean, synchronizing: boolean, hostWritable: boolean): Spte64 {
    const level = sp.level
    let acc = access
    if (!hostWritable) acc &= ~ACC_WRITE_MASK
    let writable = false
    this.wrprot = false
    if ((acc & ACC_WRITE_MASK) !== 0) {
      writable = true
      if (!isWritablePte(oldLo) && slot !== null && this.mmuTryToUnsyncPages(slot, gfn, synchronizing, prefetch) !== 0) {
        this.wrprot = true
        writable = false
        acc &= ~ACC_WRITE_MASK
      }
    }
    const ad = (sp.role & ROLE_AD_DISABLED) === 0
    const s = makeSpte(this.spte, this.fmt, {
      hpa: pfn * 4096,
      level,
      writable,
      user: (acc & ACC_USER_MASK) !== 0,
      exec: (acc & ACC_EXEC_MASK) !== 0,
      accessed: !prefetch || synchronizing,
      dirty: writable,
      hostWritable,
      mmuWritable: writable,
      adEnabled: ad,
    })
    if (writable && slot !== null && kvmSlotDirtyTrackEnabled(slot)) {
      if (level > 1) this.warn(`make_spte: writable huge SPTE in dirty-logged slot ${slot.id}`)
      this.vm.memslots.markPageDirty(slot, gfn)
    }
    return s
  }

  /** mmu_try_to_unsync_pages(): 0, or non-zero to keep the SPTE write-protected. */
  private mmuTryToUnsyncPages(slot: Memslot, gfn: number, synchronizing: boolean, prefetch: boolean): number {
    const d = this.peekSlotMmu(slot)
    if (d !== undefined && d.writeTrack[gfn - slot.baseGfn]! > 0) return -1 // -EPERM
    if (this.indirectShadowPages === 0) return 0
    const bucket = this.mmuPageHash[mmuPageHashIndex(gfn)]
    if (bucket === undefined) return 0
    for (let i = 0; i < bucket.length; i++) {
      const sp = bucket[i]!
      if (sp.gfn !== gfn || !sp.hasGptes || this.isObsoleteSp(sp)) continue
      if (synchronizing) return -1
      if (sp.unsync) continue
      if (prefetch) return -17 // -EEXIST
      if (!this.config.unsync) return -1
      if (sp.level !== 1) this.warn(`mmu_try_to_unsync_pages: ${sp.toString()} is not level 1`)
      this.kvmUnsyncPage(sp)
    }
    return 0
  }

  /** kvm_unsync_page(). */
  private kvmUnsyncPage(sp: MmuPage): void {
    this.vm.stats.mmu_unsync++
    sp.unsync = true
    this.markParentsUnsync(sp)
  }

  /** kvm_mmu_mark_parents_unsync(). */
  private markParentsUnsync(sp: MmuPage): void {
    for (let i = 0; i < sp.parentSps.length; i++) this.markUnsync(sp.parentSps[i]!, sp.parentIdx[i]!)
  }

  /** mark_unsync(): set the bit for this edge; the first unsync child propagates further up. */
  private markUnsync(parent: MmuPage, idx: number): void {
    if (parent.testAndSetUnsyncChildBit(idx)) return
    if (parent.unsyncChildren++ !== 0) return
    this.markParentsUnsync(parent)
  }

  /**
   * mmu_set_spte(): install the leaf for `pfn` at `sp[idx]`. Returns RET_PF_FIXED, _SPURIOUS,
   * _EMULATE (no memslot: an MMIO SPTE) or _WRITE_PROTECTED (the write was refused because the gfn
   * is a write-protected shadowed table; RET_PF_EMULATE with `writeProtectedFault: 'emulate'`).
   */
  private mmuSetSpte(slot: Memslot | null, sp: MmuPage, idx: number, access: number, gfn: number, pfn: number, fault: SetSpteFault): RetPf {
    const sptep = sp.hpa + idx * 8
    const level = sp.level
    if (slot === null) {
      // mark_mmio_spte()
      const gen = this.vm.memslots.space(this.asIdOf(sp)).generation
      const s = makeMmioSpte(this.spte, this.fmt, gfn, access, gen)
      this.writeSpte(sptep, s.lo, s.hi)
      return RET_PF_EMULATE
    }
    let flush = false
    let wasRmapped = false
    let oldLo = this.readSpte(sptep)
    let oldHi = this.mem.hi64
    if (isShadowPresentPte(oldLo)) {
      if (level > 1 && !isLargePte(oldLo)) {
        // A huge leaf replaces a table: the child is orphaned.
        this.dropParentPte(this.childOf(oldLo, oldHi), sp, idx)
        flush = true
      } else if (pfn !== spteToPfn(oldLo, oldHi)) {
        this.dropSpte(sp, idx)
        flush = true
      } else wasRmapped = true
      if (!wasRmapped) {
        oldLo = 0
        oldHi = 0
      }
    }
    const s = this.makeSpteFor(sp, slot, access, gfn, pfn, oldLo, fault.prefetch, false, fault.hostWritable)
    let ret: RetPf = RET_PF_FIXED
    if (s.lo === oldLo && s.hi === oldHi) ret = RET_PF_SPURIOUS
    else {
      // mmu_spte_update()
      if (isShadowPresentPte(oldLo) && leafSpteChangeNeedsTlbFlush(this.fmt, oldLo, oldHi, s.lo, s.hi)) flush = true
      this.writeSpte(sptep, s.lo, s.hi)
      this.vm.sched.charge(this.costs.memoryRef)
    }
    if (this.wrprot && fault.write) ret = this.retPfWriteProtected
    if (flush) this.vm.flushRemoteTlbs()
    if (!wasRmapped) {
      if (ret === RET_PF_SPURIOUS) this.warn('mmu_set_spte: spurious fault on an unmapped SPTE')
      this.rmapAdd(slot, sp, idx, gfn, access)
    } else if (sp.shadowedAccess !== null) sp.shadowedAccess[idx] = access
    return ret
  }

  // ================================================================== unsync walk and sync

  /** clear_unsync_child_bit(). */
  private clearUnsyncChildBit(sp: MmuPage, idx: number): void {
    if (--sp.unsyncChildren < 0) this.warn(`unsync_children of ${sp.toString()} went negative`)
    sp.clearUnsyncChildBitOnly(idx)
  }

  /** mmu_pages_add(): always adds (unsync leaves are deduplicated); returns "the vector is now full". */
  private mmuPagesAdd(sp: MmuPage, idx: number): boolean {
    if (sp.unsync) for (let i = 0; i < this.pvecNr; i++) if (this.pvecSp[i] === sp) return false
    this.pvecSp[this.pvecNr] = sp
    this.pvecIdx[this.pvecNr] = idx
    this.pvecNr++
    return this.pvecNr === KVM_PAGE_ARRAY_NR
  }

  /** __mmu_unsync_walk(): >0 unsync leaves found, 0 none, -ENOSPC when the vector filled. */
  private mmuUnsyncWalkInner(sp: MmuPage): number {
    let nrUnsyncLeaf = 0
    const bm = sp.unsyncChildBitmap
    for (let w = 0; w < 16; w++) {
      // for_each_set_bit(): find_next_bit re-reads the bitmap, so bits cleared meanwhile are skipped.
      let bits = bm[w]!
      while (bits !== 0) {
        const b = 31 - Math.clz32(bits & -bits)
        const r = this.unsyncWalkChild(sp, w * 32 + b)
        if (r < 0) return r
        nrUnsyncLeaf += r
        bits = bm[w]! & ~((2 << b) - 1)
      }
    }
    return nrUnsyncLeaf
  }

  /** One iteration of __mmu_unsync_walk's loop body for bit `i` of `sp`. */
  private unsyncWalkChild(sp: MmuPage, i: number): number {
    const lo = this.readSpte(sp.hpa + i * 8)
    const hi = this.mem.hi64
    if (!isShadowPresentPte(lo) || isLargePte(lo) || sp.level === 1) {
      this.clearUnsyncChildBit(sp, i)
      return 0
    }
    const child = this.childOf(lo, hi)
    if (child.unsyncChildren !== 0) {
      if (this.mmuPagesAdd(child, i)) return ENOSPC
      const ret = this.mmuUnsyncWalkInner(child)
      if (ret === 0) {
        this.clearUnsyncChildBit(sp, i)
        return 0
      }
      return ret
    }
    if (child.unsync || this.hazards.seed003TrustStaleBits) {
      if (this.hazards.seed001DropFullEntry) {
        // Lai's ordering with the misread API: clear first, then treat "full" as "not added".
        this.clearUnsyncChildBit(sp, i)
        if (this.mmuPagesAdd(child, i)) {
          this.pvecNr--
          return ENOSPC
        }
        return 1
      }
      if (this.mmuPagesAdd(child, i)) return ENOSPC
      return 1
    }
    this.clearUnsyncChildBit(sp, i)
    return 0
  }

  /** mmu_unsync_walk(). */
  mmuUnsyncWalk(sp: MmuPage): number {
    this.counters.unsyncWalks++
    this.pvecNr = 0
    if (sp.unsyncChildren === 0) return 0
    this.mmuPagesAdd(sp, INVALID_INDEX)
    return this.mmuUnsyncWalkInner(sp)
  }

  /** mmu_pages_first(): the first level-1 entry of the vector (index), setting up the path. */
  private mmuPagesFirst(): number {
    if (this.pvecNr === 0) return 0
    const sp = this.pvecSp[0]!
    const level = sp.level
    if (level === 1) this.warn('mmu_pages_first: the walk root is level 1')
    this.pathParent[level - 2] = sp
    // The sentinel above the walk root: clear_parents never goes past it.
    this.pathParent[level - 1] = null
    return this.mmuPagesNext(0)
  }

  /** mmu_pages_next(). */
  private mmuPagesNext(i: number): number {
    let n = i + 1
    for (; n < this.pvecNr; n++) {
      const sp = this.pvecSp[n]!
      const level = sp.level
      this.pathIdx[level - 1] = this.pvecIdx[n]!
      if (level === 1) break
      this.pathParent[level - 2] = sp
    }
    return n
  }

  /** mmu_pages_clear_parents() (mainline only; the seed-003 variant leaves the bits to the next walk). */
  private mmuPagesClearParents(): void {
    if (this.config.unsyncWalk === 'seed-003' || this.hazards.seed001DropFullEntry) return
    let level = 0
    let sp: MmuPage | null
    do {
      sp = this.pathParent[level] ?? null
      if (sp === null) return
      this.clearUnsyncChildBit(sp, this.pathIdx[level]!)
      level++
    } while (sp.unsyncChildren === 0)
  }

  /** kvm_unlink_unsync_page(). */
  private kvmUnlinkUnsyncPage(sp: MmuPage): void {
    if (!sp.unsync) this.warn(`kvm_unlink_unsync_page: ${sp.toString()} is not unsync`)
    sp.unsync = false
    this.vm.stats.mmu_unsync--
  }

  /**
   * mmu_sync_children(): write-protect, then re-read every unsync descendant, batch by batch,
   * until the walk finds nothing. With `canYield` false a due reschedule returns -EINTR after
   * requesting KVM_REQ_MMU_SYNC.
   */
  *mmuSyncChildren(v: VcpuMmu, parent: MmuPage, canYield: boolean): KernelOp<number> {
    const invalid = new PageList('invalid_list')
    let flush = false
    const vm = this.vm
    let rounds = 0
    while (this.mmuUnsyncWalk(parent) !== 0) {
      // Every batch makes progress in KVM; a walk that keeps finding work is a livelock (a bug).
      if (++rounds > 10_000) {
        this.warn(`mmu_sync_children(${parent.toString()}) does not converge`)
        break
      }
      let prot = false
      for (let i = this.mmuPagesFirst(); i < this.pvecNr; i = this.mmuPagesNext(i)) {
        const sp = this.pvecSp[i]!
        const slot = this.slotForGfn(this.asIdOf(sp), sp.gfn)
        if (slot !== null && this.slotGfnWriteProtect(slot, sp.gfn, 1, true)) prot = true
      }
      if (prot) {
        this.kvmMmuRemoteFlushOrZap(invalid, true)
        flush = false
      }
      for (let i = this.mmuPagesFirst(); i < this.pvecNr; i = this.mmuPagesNext(i)) {
        const sp = this.pvecSp[i]!
        this.kvmUnlinkUnsyncPage(sp)
        if (this.kvmSyncPage(v, sp, invalid) > 0) flush = true
        this.mmuPagesClearParents()
      }
      if (vm.sched.needResched() || vm.mmuLock.needBreak()) {
        this.kvmMmuRemoteFlushOrZap(invalid, flush)
        if (!canYield) {
          v.vcpu.makeRequest(KVM_REQ_MMU_SYNC)
          return EINTR
        }
        yield* vm.mmuLock.condResched('write')
        flush = false
      }
    }
    this.kvmMmuRemoteFlushOrZap(invalid, flush)
    return 0
  }

  /** kvm_sync_page(): re-read all gPTEs of `sp`; a failure zaps it. Returns <0, 0, or >0 (flush). */
  private kvmSyncPage(v: VcpuMmu, sp: MmuPage, invalid: PageList): number {
    this.counters.syncPages++
    let ret: number
    // kvm_sync_page_check()
    if (sp.direct || v.direct || ((sp.role ^ v.rootRole) & ~SYNC_ROLE_IGN) !== 0) {
      this.warn(`kvm_sync_page_check failed for ${sp.toString()}`)
      ret = -1
    } else {
      ret = 0
      for (let i = 0; i < 512; i++) {
        const lo = this.readSpte(sp.hpa + i * 8)
        if ((lo | this.mem.hi64) === 0) continue
        const r = this.syncSpte(v, sp, i)
        if (r < -1) {
          ret = -1
          break
        }
        ret |= r
      }
    }
    if (ret < 0) this.kvmMmuPrepareZapPage(sp, invalid)
    return ret
  }

  /** Read the 8-byte gPTE at `gpa` without faulting host memory in (kvm_vcpu_read_guest_atomic) into gLo/gHi. */
  private readGpteAtomic(gm: GuestMemory, gpa: number): boolean {
    const hpa = this.gpteHpa(gm, gpa)
    if (hpa < 0) return false
    this.gLo = this.mem.read64(hpa)
    this.gHi = this.mem.hi64
    this.vm.sched.charge(this.costs.memoryRef)
    return true
  }

  /** Where {@link readGpteAtomic} reads `gpa` (no fault-in: the page must be present), or -1. */
  private gpteHpa(gm: GuestMemory, gpa: number): number {
    const gfn = Math.floor(gpa / 4096)
    const slot = this.vm.memslots.gfnToMemslot(gm.asId, gfn, gm.cache)
    if (slot === null) return -1
    const pfn = this.vm.host.lookupPfn(gfnToHvaMemslot(slot, gfn))
    if (pfn < 0) return -1
    return pfn * 4096 + (gpa - gfn * 4096)
  }

  /** FNAME(prefetch_invalid_gpte): not present, reserved bits, or not accessed → drop the SPTE. */
  private prefetchInvalidGpte(v: VcpuMmu, sp: MmuPage, idx: number, lo: number, hi: number): boolean {
    const ctx = v.walker.ctx
    if ((lo & 1) === 0 || (lo & ctx.rsvdLo[1]!) !== 0 || (hi & ctx.rsvdHi[1]!) !== 0 || (lo & 0x20) === 0) {
      this.dropSpte(sp, idx)
      return true
    }
    return false
  }

  /**
   * kvm_sync_spte() → FNAME(sync_spte)(): re-read the gPTE of entry `i` and bring the SPTE in line.
   * Returns 0, 1 (flush), or -1 (unreadable gPTE). A never-used entry is skipped; an invalid gPTE
   * drops the SPTE; an MMIO SPTE is cleared if the gfn moved, else re-marked with the new access
   * and the current generation (sync_mmio_spte()); a present SPTE whose gfn moved is dropped.
   */
  private syncSpte(v: VcpuMmu, sp: MmuPage, i: number): number {
    const sptep = sp.hpa + i * 8
    // kvm_sync_spte(): the entry still has the value the page was allocated with.
    if ((this.readSpte(sptep) | this.mem.hi64) === 0) return 0
    if (sp.direct || sp.shadowedGfn === null) {
      this.warn(`sync_spte on ${sp.toString()}, which has no gPTEs`)
      return 0
    }
    this.counters.syncSptes++
    v.walker.refresh(v.vcpu)
    if (!this.readGpteAtomic(v.vcpu.guestMem, sp.gfn * 4096 + i * 8)) return -1
    const gLo = this.gLo
    const gHi = this.gHi
    if (this.prefetchInvalidGpte(v, sp, i, gLo, gHi)) return 1
    const gfn = Math.floor(((gLo & 0xfffff000) >>> 0) / 4096) + (gHi & v.walker.ctx.hiAddrMask) * 0x100000
    let access = roleAccess(sp.role) & gpteAccessOf(gLo, gHi, v.walker.ctx.nxe)
    if ((gLo & 0x40) === 0) access &= ~ACC_WRITE_MASK // protect_clean_gpte
    const lo = this.readSpte(sptep)
    const hi = this.mem.hi64
    if (isMmioSpte(this.fmt, lo, hi)) {
      // sync_mmio_spte()
      if (gfn !== getMmioSpteGfn(this.fmt, lo, hi)) this.writeSpte(sptep, 0, 0)
      else {
        const m = makeMmioSpte(this.spte, this.fmt, gfn, access, this.vm.memslots.space(this.asIdOf(sp)).generation)
        this.writeSpte(sptep, m.lo, m.hi)
      }
      return 0
    }
    if (!isShadowPresentPte(lo)) return 0
    if (gfn !== this.spGetGfn(sp, i)) {
      this.dropSpte(sp, i)
      return 1
    }
    if (this.spGetAccess(sp, i) === access) return 0
    sp.shadowedAccess![i] = access
    const hostWritable = (lo & this.fmt.hostWritableLo) !== 0 || (hi & this.fmt.hostWritableHi) !== 0
    const slot = this.slotForGfn(this.asIdOf(sp), gfn)
    const s = this.makeSpteFor(sp, slot, access, gfn, spteToPfn(lo, hi), lo, true, true, hostWritable)
    const flush = leafSpteChangeNeedsTlbFlush(this.fmt, lo, hi, s.lo, s.hi)
    this.writeSpte(sptep, s.lo, s.hi)
    return flush ? 1 : 0
  }

  // ================================================================== zapping

  /** kvm_mmu_prepare_zap_page() wrapper: the number of pages zapped (self included). */
  kvmMmuPrepareZapPage(sp: MmuPage, invalid: PageList): number {
    this.prepareZapPage(sp, invalid)
    return this.nrZapped
  }

  /**
   * __kvm_mmu_prepare_zap_page(): returns whether `active_mmu_pages` may have become unstable
   * (children were zapped); the number of pages moved to `invalid` (self included when not a
   * referenced root) is left in {@link lastNrZapped}.
   */
  prepareZapPage(sp: MmuPage, invalid: PageList): boolean {
    this.vm.stats.mmu_shadow_zapped++
    if (this.zapVisitLog !== null) this.zapVisitLog.push(sp)
    if (sp.freed) this.warn(`prepare_zap of freed ${sp.toString()}`)
    if (sp.list !== null && sp.list !== this.activeMmuPages && !sp.invalid) this.warn(`prepare_zap: ${sp.toString()} on ${sp.list.name}`)
    if (sp.invalid && sp.list !== null) this.warn(`prepare_zap of already-zapped ${sp.toString()} on ${sp.list.name}`)
    let nr = this.mmuZapUnsyncChildren(sp, invalid)
    nr += this.unlinkChildren(sp)
    this.unlinkParents(sp)
    const listUnstable = nr !== 0
    if (!sp.invalid && sp.hasGptes) this.unaccountShadowed(sp)
    if (sp.unsync) this.kvmUnlinkUnsyncPage(sp)
    let zappedRoot = false
    if (sp.rootCount === 0) {
      nr++
      listMove(sp, invalid)
      this.nUsedMmuPages--
    } else {
      if (sp.list !== null) sp.list.remove(sp)
      zappedRoot = !this.isObsoleteSp(sp)
    }
    sp.role = (sp.role | ROLE_INVALID) >>> 0
    if (zappedRoot) this.vm.makeAllCpusRequest(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
    this.nrZapped = nr
    return listUnstable
  }

  /** The `nr_zapped` out-parameter of the last {@link prepareZapPage}. */
  get lastNrZapped(): number {
    return this.nrZapped
  }

  /** mmu_zap_unsync_children(). Zapping a level-1 page never walks, so the vector stays intact. */
  private mmuZapUnsyncChildren(parent: MmuPage, invalid: PageList): number {
    if (parent.level === 1) return 0
    let zapped = 0
    while (this.mmuUnsyncWalk(parent) !== 0) {
      for (let i = this.mmuPagesFirst(); i < this.pvecNr; i = this.mmuPagesNext(i)) {
        this.kvmMmuPrepareZapPage(this.pvecSp[i]!, invalid)
        this.mmuPagesClearParents()
        zapped++
      }
    }
    return zapped
  }

  /** kvm_mmu_unlink_children(): drop every entry (leaves zapped, children orphaned). */
  private unlinkChildren(sp: MmuPage): number {
    for (let i = 0; i < 512; i++) {
      const lo = this.readSpte(sp.hpa + i * 8)
      if ((lo | this.mem.hi64) !== 0) this.mmuPageZapPte(sp, i, null)
    }
    return 0
  }

  /** kvm_mmu_unlink_parents(). */
  private unlinkParents(sp: MmuPage): void {
    while (sp.parentSps.length > 0) this.dropParentPte(sp, sp.parentSps[0]!, sp.parentIdx[0]!)
  }

  /** kvm_mmu_commit_zap_page(): one remote flush, then free every page on `invalid`. */
  kvmMmuCommitZapPage(invalid: PageList): void {
    if (invalid.isEmpty()) return
    this.vm.flushRemoteTlbs()
    while (invalid.head !== null) {
      const sp = invalid.head
      if (!sp.invalid || sp.rootCount !== 0) this.warn(`commit_zap: ${sp.toString()} is not an unreferenced invalid page`)
      invalid.remove(sp)
      this.kvmMmuFreeShadowPage(sp)
    }
  }

  /** kvm_mmu_free_shadow_page(): leave the hash, free the table. */
  private kvmMmuFreeShadowPage(sp: MmuPage): void {
    const b = this.hashBucket(sp.gfn)
    const i = b.indexOf(sp)
    if (i >= 0) b.splice(i, 1)
    this.pageByPfn.delete(sp.hpa / 4096)
    sp.freed = true
    this.vm.stats.mmu_shadow_pages--
    this.vm.freeMmuPage(sp.hpa)
  }

  /** kvm_mmu_remote_flush_or_zap(). */
  private kvmMmuRemoteFlushOrZap(invalid: PageList, flush: boolean): void {
    if (!invalid.isEmpty()) this.kvmMmuCommitZapPage(invalid)
    else if (flush) this.vm.flushRemoteTlbs()
  }

  /** kvm_mmu_zap_oldest_mmu_pages(): zap from the tail, skipping roots, until `n` pages are gone. */
  kvmMmuZapOldestMmuPages(n: number): number {
    if (this.activeMmuPages.isEmpty()) return 0
    const invalid = new PageList('invalid_list')
    let total = 0
    let steps = 0
    restart: for (;;) {
      let next: MmuPage | null
      for (let sp = this.activeMmuPages.tail; sp !== null; sp = next) {
        // list_for_each_entry_safe_reverse: only the next element is cached.
        next = sp.prev
        if (++steps > 100 * (this.pageByPfn.size + 10)) {
          this.warn('zap_oldest does not terminate')
          break restart
        }
        if (sp.rootCount !== 0) continue
        const unstable = this.prepareZapPage(sp, invalid)
        total += this.nrZapped
        if (total >= n) break restart
        if (unstable && !this.hazards.seed000IgnoreUnstable) {
          this.counters.zapRestarts++
          continue restart
        }
      }
      break
    }
    this.kvmMmuCommitZapPage(invalid)
    this.vm.stats.mmu_recycled += total
    return total
  }

  /** kvm_mmu_available_pages(). */
  private availablePages(): number {
    return this.nMaxMmuPages > this.nUsedMmuPages ? this.nMaxMmuPages - this.nUsedMmuPages : 0
  }

  /** make_mmu_pages_available(): 0 or -ENOSPC. */
  makeMmuPagesAvailable(): number {
    const avail = this.availablePages()
    if (avail >= KVM_MIN_FREE_MMU_PAGES) return 0
    this.kvmMmuZapOldestMmuPages(KVM_REFILL_PAGES - avail)
    if (this.availablePages() === 0) return ENOSPC
    return 0
  }

  /** kvm_mmu_change_mmu_pages() (KVM_SET_NR_MMU_PAGES; 0 = back to the automatic quota). */
  *changeMmuPages(nrPages: number): KernelOp {
    this.nRequestedMmuPages = nrPages
    const goal0 = nrPages === 0 ? this.defaultMmuPages() : nrPages
    yield* this.vm.mmuLock.writeLock()
    this.kvmMmuChangeMmuPages(goal0)
    this.vm.mmuLock.writeUnlock()
    this.check()
  }

  private kvmMmuChangeMmuPages(goal0: number): void {
    let goal = goal0
    if (this.nUsedMmuPages > goal) {
      this.kvmMmuZapOldestMmuPages(this.nUsedMmuPages - goal)
      goal = this.nUsedMmuPages
    }
    this.nMaxMmuPages = goal
  }

  /** kvm_mmu_calculate_default_mmu_pages(). */
  private defaultMmuPages(): number {
    return Math.max(KVM_MIN_ALLOC_MMU_PAGES, Math.floor((this.vm.memslots.nrMemslotPages * KVM_PERMILLE_MMU_PAGES) / 1000))
  }

  /** kvm_mmu_zap_all(): zap every page, restarting after unstable zaps and yields. */
  *zapAll(): KernelOp {
    const vm = this.vm
    yield* vm.mmuLock.writeLock()
    const invalid = new PageList('invalid_list')
    restart: for (;;) {
      let next: MmuPage | null
      for (let sp = this.activeMmuPages.head; sp !== null; sp = next) {
        next = sp.next
        if (sp.invalid) {
          this.warn(`zap_all: invalid ${sp.toString()} on the active list`)
          continue
        }
        if (this.prepareZapPage(sp, invalid) && !this.hazards.seed000IgnoreUnstable) {
          this.counters.zapRestarts++
          continue restart
        }
        if (yield* vm.mmuLock.condResched('write')) continue restart
      }
      break
    }
    this.kvmMmuCommitZapPage(invalid)
    vm.mmuLock.writeUnlock()
    this.check()
  }

  /** kvm_mmu_zap_all_fast(): obsolete every page by flipping the generation, then zap from the tail. */
  *kvmMmuZapAllFast(): KernelOp {
    const vm = this.vm
    yield* vm.mmuLock.writeLock()
    this.mmuValidGen = this.mmuValidGen ^ 1
    vm.makeAllCpusRequest(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
    yield* this.kvmZapObsoletePages()
    vm.mmuLock.writeUnlock()
  }

  /** kvm_zap_obsolete_pages(). */
  private *kvmZapObsoletePages(): KernelOp {
    let batch = 0
    restart: for (;;) {
      let next: MmuPage | null
      for (let sp = this.activeMmuPages.tail; sp !== null; sp = next) {
        next = sp.prev
        if (!this.isObsoleteSp(sp)) break
        if (sp.invalid) {
          this.warn(`zap_obsolete: invalid ${sp.toString()} on the active list`)
          continue
        }
        if (batch >= BATCH_ZAP_PAGES && (yield* this.vm.mmuLock.condResched('write'))) {
          batch = 0
          continue restart
        }
        const unstable = this.prepareZapPage(sp, this.zappedObsoletePages)
        batch += this.nrZapped
        if (unstable && !this.hazards.seed000IgnoreUnstable) {
          this.counters.zapRestarts++
          continue restart
        }
      }
      break
    }
    this.kvmMmuCommitZapPage(this.zappedObsoletePages)
  }

  /** kvm_mmu_unprotect_page(): zap every shadow page of `gfn` (caller holds mmu_lock for write). */
  kvmMmuUnprotectPage(asId: number, gfn: number): boolean {
    const invalid = new PageList('invalid_list')
    let r = false
    for (const sp of this.hashBucket(gfn).slice()) {
      if (sp.gfn !== gfn || !sp.hasGptes || this.isObsoleteSp(sp) || this.asIdOf(sp) !== asId) continue
      r = true
      this.kvmMmuPrepareZapPage(sp, invalid)
    }
    this.kvmMmuCommitZapPage(invalid)
    return r
  }

  // ================================================================== page faults

  /**
   * kvm_mmu_page_fault(): the MMIO fast path for reserved-bit faults, else the MMU's page_fault
   * hook; a RET_PF_WRITE_PROTECTED from it is resolved by kvm_mmu_write_protect_fault() into
   * RET_PF_RETRY (unprotected) or RET_PF_EMULATE. With `writeProtectedFault: 'emulate'` (≤6.11) the
   * hook returns RET_PF_EMULATE itself and a direct MMU unprotects and retries every emulation
   * whose error code is PFERR_NESTED_GUEST_PAGE.
   */
  *pageFault(vcpu: KvmVcpu, fault: PageFault): KernelOp<RetPf> {
    const r = this.pageFaultInline(vcpu, fault)
    if (r !== PF_PENDING) return r as RetPf
    return yield* this.pageFaultContinue(vcpu)
  }

  /**
   * {@link pageFault} as a plain call (MmuInstance.pageFaultInline): the fault is a state machine
   * ({@link spfRun}) over plain methods that charges each cost in place when nothing else could
   * run meanwhile (Scheduler.tryAdvance) and otherwise stops there. RET_PF_* when it completed,
   * PF_PENDING when {@link pageFaultContinue} must finish it.
   */
  pageFaultInline(vcpu: KvmVcpu, fault: PageFault): number {
    const v = this.vmmu(vcpu)
    const p = v.pf
    p.phase = SPH_BEGIN
    p.fault = fault
    return this.spfGuard(v)
  }

  /** Finish a fault {@link pageFaultInline} left pending: yield what it stopped at (or run the blocking operation) and go on. */
  *pageFaultContinue(vcpu: KvmVcpu): KernelOp<RetPf> {
    const v = this.vmmu(vcpu)
    const p = v.pf
    for (;;) {
      const op = p.pendingOp
      try {
        if (op !== null) {
          p.pendingOp = null
          p.opResult = yield* op
        } else yield p.pendingNs
      } catch (e) {
        this.spfUnlockOnThrow(p)
        throw e
      }
      const r = this.spfGuard(v)
      if (r !== PF_PENDING) return r as RetPf
    }
  }

  /** {@link spfRun}, releasing mmu_lock if it throws while holding it (the kernel path's try/finally). */
  private spfGuard(v: VcpuMmu): number {
    try {
      return this.spfRun(v)
    } catch (e) {
      this.spfUnlockOnThrow(v.pf)
      throw e
    }
  }

  private spfUnlockOnThrow(p: ShadowFault): void {
    if (p.lockHeld) {
      p.lockHeld = false
      this.vm.mmuLock.writeUnlock()
    }
  }

  /**
   * kvm_mmu_page_fault() → FNAME(page_fault) / direct_page_fault() from `v.pf.phase` on, until
   * it completes (RET_PF_*) or has to yield (PF_PENDING). Each `tryAdvance(x) … else
   * pendCost(x)` is a `yield x` of the kernel path; the yields, their costs and order are
   * those of the kernel functions.
   */
  private spfRun(v: VcpuMmu): number {
    const p = v.pf
    const sched = this.vm.sched
    const lock = this.vm.mmuLock
    let r: number = RET_PF_RETRY
    let ph = p.phase
    for (;;) {
      switch (ph) {
        case SPH_BEGIN:
          r = this.pageFaultBegin(v, p.fault!)
          if (r !== SPF_GO) {
            ph = SPH_END
            continue
          }
          // hva_to_pfn(): GUP may sleep, so invalidations can run between the seq snapshot and mmu_lock.
          if (!sched.tryAdvance(this.costs.gup)) return p.pendCost(this.costs.gup, SPH_LOCK)
          ph = SPH_LOCK
          continue
        case SPH_LOCK: {
          if (!v.direct) this.shadowFaultAdjustAccess(v)
          const acquireNs = lock.writeLockFast() // write_lock() without a generator when uncontended
          p.acquireNs = acquireNs
          if (acquireNs < 0) return p.pendOp(lock.writeLock(), SPH_LOCKED)
          ph = SPH_LOCKED
          continue
        }
        case SPH_LOCKED: {
          p.lockHeld = true
          const acquireNs = p.acquireNs
          // Checked once the lock is taken (held for write: no other thread can change what they read).
          r = this.shadowFaultLocked(v)
          if (r !== SPF_GO) {
            p.ret = r
            if (acquireNs >= 0 && !sched.tryAdvance(acquireNs)) return p.pendCost(acquireNs, SPH_UNLOCK)
            ph = SPH_UNLOCK
            continue
          }
          // The acquisition (fast path) and the fault's software work, done holding mmu_lock for
          // write (it serializes vCPUs): one yield, as this thread changes nothing visible between.
          const ns = (acquireNs >= 0 ? acquireNs : 0) + this.costs.mmuFaultWork
          if (!sched.tryAdvance(ns)) return p.pendCost(ns, SPH_MAP)
          ph = SPH_MAP
          continue
        }
        case SPH_MAP:
          r = v.direct ? this.directMap(v) : this.fetchStart(v)
          if (r === FETCH_SYNC) {
            // Sync before link: the guest may use a just-made-present gPTE without flushing.
            return p.pendOp(this.mmuSyncChildren(v, p.child!, false), SPH_AFTER_SYNC)
          }
          p.ret = r
          ph = SPH_UNLOCK
          continue
        case SPH_AFTER_SYNC:
          r = (p.opResult as number) !== 0 ? RET_PF_RETRY : this.fetchResume(v)
          if (r === FETCH_SYNC) return p.pendOp(this.mmuSyncChildren(v, p.child!, false), SPH_AFTER_SYNC)
          p.ret = r
          ph = SPH_UNLOCK
          continue
        case SPH_UNLOCK:
          p.lockHeld = false
          lock.writeUnlock()
          r = p.ret
          ph = SPH_END
          continue
        case SPH_END: {
          const fault = p.fault!
          if (r === RET_PF_WRITE_PROTECTED) {
            this.counters.writeProtectedFaults++
            return p.pendOp(this.kvmMmuWriteProtectFault(v, fault), SPH_FINAL)
          }
          if (r === RET_PF_EMULATE && this.config.writeProtectedFault === 'emulate' && v.direct && isWriteToGuestPageTable(fault.errorCode)) {
            return p.pendOp(this.unprotectAndRetry(v.vcpu, fault), SPH_FINAL)
          }
          p.fault = null
          this.check()
          return r
        }
        case SPH_FINAL:
          p.fault = null
          this.check()
          return p.opResult as RetPf
        default:
          throw new KvmError('EIO', `shadow-mmu: pageFault reached no phase ${String(ph)} (a bug in the fault state machine)`)
      }
    }
  }

  /**
   * ≤6.11 (`writeProtectedFault: 'emulate'`): "a RO violation while translating the guest page" —
   * unprotect, resume the guest, whether or not anything was unprotected.
   */
  private *unprotectAndRetry(vcpu: KvmVcpu, fault: PageFault): KernelOp<RetPf> {
    yield* this.vm.mmuLock.writeLock()
    try {
      this.kvmMmuUnprotectPage(vcpu.asId, Math.floor(fault.addr / 4096))
    } finally {
      this.vm.mmuLock.writeUnlock()
    }
    this.counters.unprotectRetries++
    return RET_PF_RETRY
  }

  /**
   * kvm_mmu_page_fault() up to GUP: no root → retry; an MMIO fault (handle_mmio_page_fault); then
   * FNAME(page_fault)'s or direct_page_fault()'s part before GUP. SPF_GO or a RET_PF_*.
   */
  private pageFaultBegin(v: VcpuMmu, fault: PageFault): RetPf | typeof SPF_GO {
    if (v.root.hpa === INVALID_PAGE) return RET_PF_RETRY
    if ((fault.errorCode & PFERR_RSVD) !== 0 || (this.config.tdp && fault.exitReason === EXIT_EPT_MISCONFIG)) {
      const r = this.handleMmioPageFault(v, fault.addr)
      if (r !== RET_PF_INVALID) return r
    }
    return v.direct ? this.directFaultBegin(v, fault) : this.shadowFaultBegin(v, fault)
  }

  /**
   * handle_mmio_page_fault(): a reserved-bit fault (EPT misconfiguration) comes from an MMIO SPTE.
   * Walk to the last SPTE for `addr` without the lock: an MMIO SPTE of the current memslot
   * generation is emulated; one of an older generation (a memslot was created or changed since)
   * goes to the slow path (RET_PF_INVALID), which maps the gfn anew; no MMIO SPTE (zapped
   * meanwhile) retries.
   */
  private handleMmioPageFault(v: VcpuMmu, addr: number): RetPf {
    const hpa = v.root.hpa
    if (this.kvmMmuIsDummyRoot(hpa)) return RET_PF_RETRY
    let sp = this.pageByPfn.get(hpa / 4096)
    let lo = 0
    let hi = 0
    while (sp !== undefined) {
      lo = this.readSpte(sp.hpa + spteIndex(addr, sp.level) * 8)
      hi = this.mem.hi64
      if (!isShadowPresentPte(lo) || sp.level === 1 || isLargePte(lo)) break
      sp = this.childOf(lo, hi)
    }
    if (!isMmioSpte(this.fmt, lo, hi)) return RET_PF_RETRY
    const set = this.vm.memslots.space(v.vcpu.asId)
    return checkMmioSpte(lo, hi, set.generation, set.updateInProgress) ? RET_PF_EMULATE : RET_PF_INVALID
  }

  /**
   * kvm_mmu_write_protect_fault(): a write hit a gfn KVM write-protects to shadow a guest page
   * table. Emulate at once when this instruction and address were unprotected and retried before
   * (last_retry_eip/addr: retrying again could loop forever); else clear that record and, for a
   * direct MMU whose fault was a write to a guest page table (PFERR_GUEST_PAGE|W|P, nested TDP)
   * or an indirect MMU with an event awaiting reinjection, unprotect the gfn and retry if a shadow
   * page was zapped. Otherwise emulate, allowing the emulator to unprotect and retry
   * (EMULTYPE_ALLOW_RETRY_PF) — which x86_emulate_instruction() does only for instructions that do
   * not write page tables (!x86_page_table_writing_insn()); every write the modelled ISA has (MOV,
   * CMPXCHG8B, batched MOVs) is one that does, so it emulates.
   */
  *kvmMmuWriteProtectFault(v: VcpuMmu, f: PageFault): KernelOp<RetPf> {
    const vcpu = v.vcpu
    if (v.lastRetryEip === kvmRipRead(vcpu) && v.lastRetryAddr === f.addr) return RET_PF_EMULATE
    v.lastRetryEip = 0
    v.lastRetryAddr = 0
    // WARN_ON_ONCE(mmio_info_in_cache()): the model keeps no MMIO cache.
    if (((v.direct && isWriteToGuestPageTable(f.errorCode)) || (!v.direct && kvmEventNeedsReinjection(vcpu))) && (yield* this.kvmMmuUnprotectGfnAndRetry(v, f.addr, false))) {
      this.counters.unprotectRetries++
      return RET_PF_RETRY
    }
    return RET_PF_EMULATE
  }

  /**
   * __kvm_mmu_unprotect_gfn_and_retry(): zap every valid shadow page with gPTEs of the gfn the
   * faulting address writes (a GVA is translated with a write walk of the guest tables,
   * kvm_mmu_gva_to_gpa_write), so the guest can re-execute the write natively. Returns whether
   * anything was zapped; records the instruction and address for the loop guard when it was (or
   * when `alwaysRetry`).
   */
  *kvmMmuUnprotectGfnAndRetry(v: VcpuMmu, cr2OrGpa: number, alwaysRetry: boolean): KernelOp<boolean> {
    const vcpu = v.vcpu
    let r = false
    if (this.indirectShadowPages !== 0) {
      let gpa = cr2OrGpa
      let ok = true
      if (!v.direct) {
        const access = PFERR_W | (vcpu.hw.state.cpl === 3 ? PFERR_U : 0)
        ok = v.walker.walkAddr(vcpu, cr2OrGpa, ACC_WRITE, access)
        gpa = v.walker.gfn * 4096
      }
      if (ok) {
        yield* this.vm.mmuLock.writeLock()
        try {
          r = this.kvmMmuUnprotectPage(vcpu.asId, Math.floor(gpa / 4096))
        } finally {
          this.vm.mmuLock.writeUnlock()
        }
      }
    }
    if (r || alwaysRetry) {
      v.lastRetryEip = kvmRipRead(vcpu)
      v.lastRetryAddr = cr2OrGpa
    }
    return r
  }

  /**
   * is_page_fault_stale(): the root is obsolete; or it is not backed by a shadow page (the dummy
   * root) and KVM_REQ_MMU_FREE_OBSOLETE_ROOTS is pending; or an invalidation covered the gfn.
   */
  private isPageFaultStale(v: VcpuMmu, mmuSeq: number, gfn: number, slot: Memslot | null): boolean {
    if (v.root.hpa === INVALID_PAGE) return true
    const sp = this.pageByPfn.get(v.root.hpa / 4096)
    if (sp !== undefined && this.isObsoleteSp(sp)) return true
    if (sp === undefined && v.vcpu.hasRequest(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)) return true
    return slot !== null && this.vm.notifierState.retryGfn(mmuSeq, gfn)
  }

  /** kvm_mmu_hugepage_adjust(): the goal level of the leaf. */
  private hugepageAdjust(slot: Memslot | null, gfn: number, maxLevel0: number, hva: number): number {
    if (maxLevel0 <= 1 || slot === null || kvmSlotDirtyTrackEnabled(slot)) return 1
    let maxLevel = Math.min(maxLevel0, 3)
    if (this.config.tdp) {
      if (!this.vm.features.ept1G) maxLevel = Math.min(maxLevel, 2)
      if (!this.vm.features.ept2M) maxLevel = 1
    } else if (!this.vm.features.gbPages) maxLevel = Math.min(maxLevel, 2)
    for (; maxLevel > 1; maxLevel--) if (!isLpageDisallowed(slot, gfn, maxLevel)) break
    if (maxLevel === 1) return 1
    return Math.min(this.vm.host.hostMappingLevel(hva), maxLevel)
  }

  /**
   * kvm_mmu_faultin_pfn() for the fault in `p` (gfn and write set): snapshot mmu_invalidate_seq,
   * then the memslot and the host pfn (slot null: no visible memslot, an MMIO SPTE). False: a
   * write to a read-only memslot (kvm_handle_error_pfn: emulated, an MMIO exit; here open bus).
   */
  private faultinPfn(vcpu: KvmVcpu, p: ShadowFault): boolean {
    p.mmuSeq = this.vm.notifierState.seq
    const gfn = p.gfn
    const slot = this.vm.memslots.gfnToMemslot(vcpu.asId, gfn, vcpu.memslotCache)
    if (slot === null || !kvmIsVisibleMemslot(slot)) {
      p.slot = null
      return true
    }
    p.slot = slot
    const hva = gfnToHvaMemslot(slot, gfn)
    const readonlySlot = (slot.flags & KVM_MEM_READONLY) !== 0
    if (p.write && readonlySlot) return false
    const host = this.vm.host
    const pfn = host.resolvePfn(hva, p.write)
    if (pfn < 0) throw new KvmError('EFAULT', `vCPU ${vcpu.id}: the host refused gfn 0x${gfn.toString(16)} (hva 0x${hva.toString(16)}): ${host.outReason}`)
    p.pfn = pfn
    p.hostWritable = host.outWritable && !readonlySlot
    p.hva = hva
    return true
  }


  /**
   * FNAME(page_fault)() up to GUP: walk the guest tables (FNAME(walk_addr), injecting a #PF),
   * page_fault_handle_page_track(), snapshot mmu_invalidate_seq, faultin the pfn. SPF_GO or RET_PF_*.
   */
  private shadowFaultBegin(v: VcpuMmu, f: PageFault): RetPf | typeof SPF_GO {
    const vcpu = v.vcpu
    const vm = this.vm
    const ec = f.errorCode
    const write = (ec & PFERR_W) !== 0
    const w = v.walker
    vm.sched.charge(this.costs.memoryRef * (v.guestLevels + 1))
    if (!w.walkAddr(vcpu, f.addr, f.kind, ec)) {
      vcpu.injectPageFault(f.addr, w.errorCode)
      return RET_PF_RETRY
    }
    const gfn = w.gfn
    // page_fault_handle_page_track(): a present write to a write-tracked gfn cannot be fixed here.
    if (write && (ec & (PFERR_P | PFERR_RSVD)) === PFERR_P && this.gfnIsWriteTracked(vcpu.asId, gfn)) {
      this.shadowPageTableClearFloodingCount(v, f.addr)
      return this.retPfWriteProtected
    }
    const p = v.pf
    p.addr = f.addr
    p.gfn = gfn
    p.write = write
    if (!this.faultinPfn(vcpu, p)) return RET_PF_EMULATE
    p.pteAccess = w.pteAccess
    p.user = (ec & PFERR_U) !== 0
    return SPF_GO
  }

  /** CR0.WP=0: a supervisor write to a read-only page maps it writable, supervisor-only. */
  private shadowFaultAdjustAccess(v: VcpuMmu): void {
    const p = v.pf
    const state = v.vcpu.hw.state
    if (p.write && (p.pteAccess & ACC_WRITE_MASK) === 0 && (state.cr0 & CR0_WP) === 0 && !p.user && p.slot !== null) {
      p.pteAccess |= ACC_WRITE_MASK
      p.pteAccess &= ~ACC_USER_MASK
      if ((state.cr4 & CR4_SMEP) !== 0) p.pteAccess &= ~ACC_EXEC_MASK
    }
  }

  /** Under mmu_lock: is_page_fault_stale() and make_mmu_pages_available(). SPF_GO or RET_PF_RETRY. */
  private shadowFaultLocked(v: VcpuMmu): RetPf | typeof SPF_GO {
    const p = v.pf
    if (this.isPageFaultStale(v, p.mmuSeq, p.gfn, p.slot)) return RET_PF_RETRY
    if (this.makeMmuPagesAvailable() < 0) throw new KvmError('ENOMEM', 'shadow-mmu: no shadow pages left (every page is a root)')
    return SPF_GO
  }

  /** clear_sp_write_flooding_count() on the shadow walk of `addr` (kvm_mmu_pte_write's reset on a tracked fault). */
  private shadowPageTableClearFloodingCount(v: VcpuMmu, addr: number): void {
    if (v.root.hpa === INVALID_PAGE || this.kvmMmuIsDummyRoot(v.root.hpa)) return
    let sp = this.spOfHpa(v.root.hpa)
    for (;;) {
      sp.writeFloodingCount = 0
      const lo = this.readSpte(sp.hpa + spteIndex(addr, sp.level) * 8)
      const hi = this.mem.hi64
      if (!isShadowPresentPte(lo) || sp.level === 1 || isLargePte(lo)) return
      sp = this.childOf(lo, hi)
    }
  }

  /** FNAME(gpte_changed)(): re-read the gPTE of `level` (and the 8 prefetch gPTEs at level 1). */
  private gpteChanged(v: VcpuMmu, level: number): boolean {
    const w = v.walker
    const gm = v.vcpu.guestMem
    const gpa = w.pteGpa[level]!
    if (level === 1) {
      const base = alignDown(gpa, PTE_PREFETCH_NUM * 8)
      const index = (gpa - base) / 8
      // The 8 gPTEs share one guest page: translate it once, then 8 reads.
      const cached = this.walkedGpteHpa(v, level)
      const hpa = cached >= 0 ? cached - (gpa - base) : this.gpteHpa(gm, base)
      if (hpa < 0) {
        w.prefetchLo.fill(0)
        w.prefetchHi.fill(0)
        return true
      }
      const m = this.mem
      for (let i = 0; i < PTE_PREFETCH_NUM; i++) {
        w.prefetchLo[i] = m.read64(hpa + i * 8)
        w.prefetchHi[i] = m.hi64
      }
      this.vm.sched.charge(this.costs.memoryRef * PTE_PREFETCH_NUM)
      return w.prefetchLo[index] !== w.ptesLo[level] || w.prefetchHi[index] !== w.ptesHi[level]
    }
    const cached = this.walkedGpteHpa(v, level)
    if (cached >= 0) {
      this.gLo = this.mem.read64(cached)
      this.gHi = this.mem.hi64
      this.vm.sched.charge(this.costs.memoryRef)
    } else if (!this.readGpteAtomic(gm, gpa)) return true
    return this.gLo !== w.ptesLo[level] || this.gHi !== w.ptesHi[level]
  }

  /**
   * The host address the walk read the gPTE of `level` at, if the host mapping and the memslots
   * are unchanged since (no invalidation then or since, same memslot generation); else -1 and
   * the caller translates the GPA again, as kvm_vcpu_read_guest_atomic() always does.
   */
  private walkedGpteHpa(v: VcpuMmu, level: number): number {
    const w = v.walker
    const ns = this.vm.notifierState
    if (w.walkSeq < 0 || ns.inProgress !== 0 || ns.seq !== w.walkSeq) return -1
    if (this.vm.memslots.space(v.vcpu.asId).generation !== w.walkGen) return -1
    const hpa = w.pteHpa[level]!
    return hpa < this.mem.sizeBytes ? hpa : -1
  }

  /**
   * FNAME(fetch)(), as plain steps over v.pf: re-check the walked gPTEs, find or create a shadow
   * page per guest table and link it, then the direct part and the leaf (mmu_set_spte, prefetch).
   * Returns RET_PF_* or FETCH_SYNC: a child to link has unsync children; the caller syncs it
   * (mmuSyncChildren, which may yield) and continues with fetchResume().
   */
  private fetchStart(v: VcpuMmu): RetPf | typeof FETCH_SYNC {
    const w = v.walker
    if (this.gpteChanged(v, w.maxLevel)) return RET_PF_RETRY
    if (this.kvmMmuIsDummyRoot(v.root.hpa)) {
      // The root gfn became visible (a memslot was created) after the dummy root was loaded:
      // drop the dummy root through KVM_REQ_MMU_FREE_OBSOLETE_ROOTS and retry on a real one.
      v.vcpu.makeRequest(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
      return RET_PF_RETRY
    }
    const p = v.pf
    p.sp = this.spOfHpa(v.root.hpa)
    p.level = p.sp.level
    p.idx = spteIndex(p.addr, p.level)
    return this.fetchWalk(v)
  }

  /** FNAME(fetch) after syncing the unsync children of v.pf.child: link it and go on. */
  private fetchResume(v: VcpuMmu): RetPf | typeof FETCH_SYNC {
    if (!this.fetchLinkChild(v, true)) return RET_PF_RETRY
    return this.fetchWalk(v)
  }

  /** FNAME(fetch)'s indirect part from v.pf's position: one shadow page per guest table. */
  private fetchWalk(v: VcpuMmu): RetPf | typeof FETCH_SYNC {
    const w = v.walker
    const p = v.pf
    for (;;) {
      const sp = p.sp!
      sp.writeFloodingCount = 0
      if (p.level === w.level) break
      const lo = this.readSpte(sp.hpa + p.idx * 8)
      const hi = this.mem.hi64
      if (isShadowPresentPte(lo) && !isLargePte(lo)) {
        p.child = this.childOf(lo, hi)
        if (!this.fetchLinkChild(v, false)) return RET_PF_RETRY
      } else {
        p.child = this.kvmMmuGetShadowPage(v, w.tableGfn[p.level - 1]!, this.childRole(sp.role, false, w.ptAccess[p.level - 1]!))
        if (p.child.unsyncChildren !== 0) return FETCH_SYNC
        if (!this.fetchLinkChild(v, true)) return RET_PF_RETRY
      }
    }
    return this.fetchLeaf(v)
  }

  /** FNAME(fetch)'s step down to v.pf.child: the gpte_changed re-check, link a new child. False: retry. */
  private fetchLinkChild(v: VcpuMmu, created: boolean): boolean {
    const p = v.pf
    if (this.gpteChanged(v, p.level - 1)) return false
    if (created) this.linkShadowPage(p.sp!, p.idx, p.child!)
    p.sp = p.child
    p.level--
    p.idx = spteIndex(p.addr, p.level)
    return true
  }

  /** FNAME(fetch)'s direct part (a guest huge page backed by smaller host mappings) and the leaf. */
  private fetchLeaf(v: VcpuMmu): RetPf {
    const w = v.walker
    const p = v.pf
    const goal = this.hugepageAdjust(p.slot, p.gfn, w.level, p.hva)
    this.directDescend(v, p.sp!, p.idx, p.addr, p.gfn, p.level, goal, w.pteAccess, true)
    const sp = this.descSp
    const idx = this.descIdx
    const pages = kvmPagesPerHpage(goal)
    const baseGfn = alignDown(p.gfn, pages)
    if (p.slot === null) v.vcpu.stats.pf_mmio_spte_created++ // mmu_set_spte()'s MMIO SPTE
    const sf = p.setSpte
    sf.write = p.write
    sf.prefetch = false
    sf.hostWritable = p.hostWritable
    const ret = this.mmuSetSpte(p.slot, sp, idx, p.pteAccess, baseGfn, alignDown(p.pfn, pages), sf)
    if (ret !== RET_PF_SPURIOUS && this.config.prefetch) this.ptePrefetch(v, sp, idx)
    return ret
  }

  /** FNAME(pte_prefetch)(): map the present, accessed neighbours of the faulting gPTE. */
  private ptePrefetch(v: VcpuMmu, sp: MmuPage, idx: number): void {
    if (sp.level > 1) return
    if (this.vm.notifierState.inProgress !== 0) return
    if (sp.direct) {
      this.directPtePrefetch(v, sp, idx)
      return
    }
    const w = v.walker
    const base = idx - (idx % PTE_PREFETCH_NUM)
    for (let i = 0; i < PTE_PREFETCH_NUM; i++) {
      const j = base + i
      if (j === idx) continue
      if (isShadowPresentPte(this.readSpte(sp.hpa + j * 8))) continue
      if (!this.prefetchGpte(v, sp, j, w.prefetchLo[i]!, w.prefetchHi[i]!)) break
    }
  }

  /** Whether the host page of `gfn` is present and writable (gfn_to_pfn_memslot_atomic, write); its pfn or -1. */
  private atomicPfn(slot: Memslot, gfn: number): number {
    if ((slot.flags & KVM_MEM_READONLY) !== 0) return -1
    const hva = gfnToHvaMemslot(slot, gfn)
    const pfn = this.vm.host.lookupPfn(hva)
    if (pfn < 0) return -1
    const vma = this.vm.host.findVma(hva)
    if (vma === undefined || vma.readonly) return -1
    return pfn
  }

  /** FNAME(prefetch_gpte)(). */
  private prefetchGpte(v: VcpuMmu, sp: MmuPage, idx: number, gLo: number, gHi: number): boolean {
    if (this.prefetchInvalidGpte(v, sp, idx, gLo, gHi)) return false
    const ctx = v.walker.ctx
    const gfn = Math.floor(((gLo & 0xfffff000) >>> 0) / 4096) + (gHi & ctx.hiAddrMask) * 0x100000
    let access = roleAccess(sp.role) & gpteAccessOf(gLo, gHi, ctx.nxe)
    if ((gLo & 0x40) === 0) access &= ~ACC_WRITE_MASK
    const slot = this.vm.memslots.gfnToMemslot(this.asIdOf(sp), gfn)
    if (slot === null || !kvmIsVisibleMemslot(slot)) return false
    if ((access & ACC_WRITE_MASK) !== 0 && kvmSlotDirtyTrackEnabled(slot)) return false
    const pfn = this.atomicPfn(slot, gfn)
    if (pfn < 0) return false
    this.mmuSetSpte(slot, sp, idx, access, gfn, pfn, PREFETCH_FAULT)
    this.counters.prefetched++
    return true
  }

  /** __direct_pte_prefetch(): runs of non-present entries around `idx` in a direct page. */
  private directPtePrefetch(_v: VcpuMmu, sp: MmuPage, idx: number): void {
    if ((sp.role & ROLE_AD_DISABLED) !== 0) return
    const base = idx - (idx % PTE_PREFETCH_NUM)
    let start = -1
    for (let i = base; i < base + PTE_PREFETCH_NUM; i++) {
      const present = isShadowPresentPte(this.readSpte(sp.hpa + i * 8))
      if (present || i === idx) {
        if (start < 0) continue
        if (!this.directPtePrefetchMany(sp, start, i)) return
        start = -1
      } else if (start < 0) start = i
    }
    if (start >= 0) this.directPtePrefetchMany(sp, start, base + PTE_PREFETCH_NUM)
  }

  /** direct_pte_prefetch_many(): map [start, end) while the host pages are there. */
  private directPtePrefetchMany(sp: MmuPage, start: number, end: number): boolean {
    const access = roleAccess(sp.role)
    let gfn = this.spGetGfn(sp, start)
    const slot = this.vm.memslots.gfnToMemslot(this.asIdOf(sp), gfn)
    if (slot === null || !kvmIsVisibleMemslot(slot)) return false
    if ((access & ACC_WRITE_MASK) !== 0 && kvmSlotDirtyTrackEnabled(slot)) return false
    if (gfn + (end - start) > slot.baseGfn + slot.npages) return false
    let n = 0
    for (let i = start; i < end; i++, gfn++) {
      const pfn = this.atomicPfn(slot, gfn)
      if (pfn < 0) break
      this.mmuSetSpte(slot, sp, i, access, gfn, pfn, PREFETCH_FAULT)
      this.counters.prefetched++
      n++
    }
    return n > 0
  }

  /** direct_page_fault() up to GUP: page tracking, fast_page_fault(), seq snapshot, faultin. SPF_GO or RET_PF_*. */
  private directFaultBegin(v: VcpuMmu, f: PageFault): RetPf | typeof SPF_GO {
    const vcpu = v.vcpu
    const ec = f.errorCode
    const write = (ec & PFERR_W) !== 0
    const gpa = f.addr
    const gfn = Math.floor(gpa / 4096)
    // Dummy roots are used only for shadowing bad guest roots.
    if (this.kvmMmuIsDummyRoot(v.root.hpa)) {
      this.warn('direct_page_fault on the dummy root')
      return RET_PF_RETRY
    }
    if (write && (ec & (PFERR_P | PFERR_RSVD)) === PFERR_P && this.gfnIsWriteTracked(vcpu.asId, gfn)) return this.retPfWriteProtected
    if (this.config.tdp && this.config.fastPageFault) {
      const r = this.fastPageFault(v, gpa, ec)
      if (r !== 0) return r
    }
    const p = v.pf
    p.addr = gpa
    p.gfn = gfn
    p.write = write
    return this.faultinPfn(vcpu, p) ? SPF_GO : RET_PF_EMULATE
  }

  /** direct_map(): descend (linking direct pages), install the leaf, prefetch. */
  private directMap(v: VcpuMmu): RetPf {
    const p = v.pf
    const slot = p.slot
    const gfn = p.gfn
    const maxLevel = this.config.tdp ? 3 : 2
    const goal = this.hugepageAdjust(slot, gfn, maxLevel, p.hva)
    const root = this.spOfHpa(v.root.hpa)
    this.directDescend(v, root, spteIndex(p.addr, root.level), p.addr, gfn, root.level, goal, ACC_ALL, false)
    const sp = this.descSp
    const idx = this.descIdx
    const pages = kvmPagesPerHpage(goal)
    if (slot === null) v.vcpu.stats.pf_mmio_spte_created++ // mmu_set_spte()'s MMIO SPTE
    const sf = p.setSpte
    sf.write = p.write
    sf.prefetch = false
    sf.hostWritable = p.hostWritable
    const ret = this.mmuSetSpte(slot, sp, idx, ACC_ALL, alignDown(gfn, pages), alignDown(p.pfn, pages), sf)
    if (ret !== RET_PF_SPURIOUS && this.config.prefetch && goal === 1 && this.vm.notifierState.inProgress === 0) this.directPtePrefetch(v, sp, idx)
    return ret
  }

  /**
   * fast_page_fault() (lockless, direct MMUs): a write to an SPTE that is MMU-writable but not
   * writable (dirty logging, or access tracking) is fixed in place. 0 = RET_PF_INVALID.
   */
  private fastPageFault(v: VcpuMmu, gpa: number, ec: number): RetPf | 0 {
    if ((ec & PFERR_RSVD) !== 0 || (ec & PFERR_P) === 0 || (ec & PFERR_W) === 0) return 0
    let sp = this.spOfHpa(v.root.hpa)
    for (;;) {
      const sptep = sp.hpa + spteIndex(gpa, sp.level) * 8
      const lo = this.readSpte(sptep)
      const hi = this.mem.hi64
      if (!isShadowPresentPte(lo)) return 0
      if (sp.level === 1 || isLargePte(lo)) {
        if (isWritablePte(lo)) return RET_PF_SPURIOUS
        if (!isMmuWritableSpte(this.fmt, lo, hi)) return 0
        const gfn = this.spGetGfn(sp, (sptep - alignDown(sptep, 4096)) / 8)
        const slot = this.vm.memslots.gfnToMemslot(this.asIdOf(sp), gfn)
        if (slot !== null && kvmSlotDirtyTrackEnabled(slot)) {
          if (sp.level > 1) return 0
          this.vm.memslots.markPageDirty(slot, gfn)
        }
        this.writeSpte(sptep, lo | 2 | this.fmt.dirtyLo, hi)
        this.vm.sched.charge(this.costs.spteCmpxchg)
        this.vcpuStatFast(v)
        return RET_PF_FIXED
      }
      sp = this.childOf(lo, hi)
    }
  }

  private vcpuStatFast(v: VcpuMmu): void {
    v.vcpu.stats.pf_fast++
    this.counters.fastFixed++
  }

  // ================================================================== emulated writes

  /** kvm_gfn_is_write_tracked() as seen by the page-track notifier: the emulator then calls trackWrite. */
  isWriteTracked(_asId: number, _gfn: number): boolean {
    // kvm_page_track_write() reaches kvm_mmu_track_write() for every emulated write; its own
    // "no indirect shadow pages" check is the only filter.
    return this.indirectShadowPages !== 0
  }

  /** kvm_mmu_track_write(): zap the SPTEs shadowing the written gPTE; misaligned or flooded pages are zapped. */
  *trackWrite(vcpu: KvmVcpu, gpa0: number, bytes0: number): KernelOp {
    if (this.indirectShadowPages === 0) return
    const vm = this.vm
    yield* vm.mmuLock.writeLock()
    try {
      // mmu_pte_write_fetch_gpte(): PAE/64-bit guests: a 4-byte write re-reads the whole 8-byte gPTE.
      let gpa = gpa0
      let bytes = bytes0
      if (bytes === 4) {
        gpa -= gpa % 8
        bytes = 8
      }
      let gentry = 0
      if (bytes === 8 && this.readGpteAtomic(vcpu.guestMem, gpa)) gentry = (this.gLo | this.gHi) !== 0 ? 1 : 0
      vm.stats.mmu_pte_write++
      this.counters.trackWrites++
      const gfn = Math.floor(gpa / 4096)
      const invalid = new PageList('invalid_list')
      let flush = false
      const bucket = this.hashBucket(gfn)
      for (let k = 0; k < bucket.length; k++) {
        const sp = bucket[k]!
        if (sp.gfn !== gfn || !sp.hasGptes || this.isObsoleteSp(sp) || this.asIdOf(sp) !== vcpu.asId) continue
        if (detectWriteMisaligned(gpa, bytes) || this.detectWriteFlooding(sp)) {
          this.kvmMmuPrepareZapPage(sp, invalid)
          vm.stats.mmu_flooded++
          continue
        }
        // get_written_sptes(): one SPTE for 8-byte gPTEs.
        const idx = (gpa % 4096) >>> 3
        const lo = this.readSpte(sp.hpa + idx * 8)
        this.mmuPageZapPte(sp, idx, null)
        if (gentry !== 0 && sp.level !== 1) vm.stats.mmu_pde_zapped++
        if (isShadowPresentPte(lo)) flush = true
      }
      this.kvmMmuRemoteFlushOrZap(invalid, flush)
    } finally {
      vm.mmuLock.writeUnlock()
    }
    this.check()
  }

  /** detect_write_flooding(). */
  private detectWriteFlooding(sp: MmuPage): boolean {
    if (sp.level === 1) return false
    return ++sp.writeFloodingCount >= 3
  }

  // ================================================================== memslots, notifiers, dirty logging

  /** kvm_arch_flush_shadow_memslot() (delete/move) and kvm_arch_commit_memory_region(). */
  *memslotChanged(change: MemslotChange): KernelOp {
    const old = change.old
    if ((change.kind === 'delete' || change.kind === 'move') && old !== null) {
      this.retiredSlots.push(old)
      try {
        if (this.config.slotZapAll) yield* this.kvmMmuZapAllFast()
        else yield* this.kvmMmuZapMemslot(old)
      } finally {
        this.retiredSlots.splice(this.retiredSlots.indexOf(old), 1)
      }
    }
    if (this.nRequestedMmuPages === 0 && (change.kind === 'create' || change.kind === 'delete')) {
      yield* this.vm.mmuLock.writeLock()
      this.kvmMmuChangeMmuPages(this.defaultMmuPages())
      this.vm.mmuLock.writeUnlock()
    }
    const neu = change.new
    // kvm_mmu_slot_apply_flags(): only a flags-only change of a writable slot toggling dirty logging.
    if (change.kind === 'flags-only' && neu !== null && old !== null && (neu.flags & KVM_MEM_READONLY) === 0) {
      const logOn = kvmSlotDirtyTrackEnabled(neu) && !kvmSlotDirtyTrackEnabled(old)
      const logOff = !kvmSlotDirtyTrackEnabled(neu) && kvmSlotDirtyTrackEnabled(old)
      if (logOff) yield* this.kvmMmuRecoverHugePages(neu)
      if (logOn && !this.vm.memslots.manualProtectAndInitSet) {
        // kvm_mmu_slot_remove_write_access(): write-protect every leaf of the slot.
        yield* this.vm.mmuLock.writeLock()
        const d = this.slotMmu(neu)
        let flush = false
        for (let l = 0; l < 3; l++) {
          const arr = d.rmap[l]!
          for (let i = 0; i < arr.length; i++) if (arr[i] !== undefined) flush = this.rmapWriteProtect(rmapArrayAt(arr, i), false) || flush
        }
        this.vm.mmuLock.writeUnlock()
        if (flush) this.vm.flushRemoteTlbs()
      }
    }
    this.check()
  }

  /**
   * kvm_mmu_zap_memslot() (KVM_X86_QUIRK_SLOT_ZAP_ALL disabled): unmap every leaf SPTE of the slot
   * (kvm_unmap_gfn_range), then kvm_mmu_zap_memslot_pages_and_flush(): prepare-zap every valid
   * shadow page with gPTEs whose gfn is in the slot — their accounting lives in the slot — gfn by
   * gfn, committing (or flushing) before yielding mmu_lock, and once at the end.
   */
  *kvmMmuZapMemslot(slot: Memslot): KernelOp {
    const vm = this.vm
    yield* vm.mmuLock.writeLock()
    try {
      let flush = this.unmapGfnRange(slot.asId, slot, slot.baseGfn, slot.baseGfn + slot.npages)
      const invalid = new PageList('invalid_list')
      if (!this.activeMmuPages.isEmpty()) {
        for (let gfn = slot.baseGfn; gfn < slot.baseGfn + slot.npages; gfn++) {
          const bucket = this.mmuPageHash[mmuPageHashIndex(gfn)]
          if (bucket !== undefined) {
            // for_each_gfn_valid_sp_with_gptes(): zapped pages stay in the hash until commit.
            for (let k = 0; k < bucket.length; k++) {
              const sp = bucket[k]!
              if (sp.gfn === gfn && sp.hasGptes && !this.isObsoleteSp(sp) && this.asIdOf(sp) === slot.asId) this.kvmMmuPrepareZapPage(sp, invalid)
            }
          }
          if (vm.sched.needResched() || vm.mmuLock.needBreak()) {
            this.kvmMmuRemoteFlushOrZap(invalid, flush)
            flush = false
            yield* vm.mmuLock.condResched('write')
          }
        }
      }
      this.kvmMmuRemoteFlushOrZap(invalid, flush)
    } finally {
      vm.mmuLock.writeUnlock()
    }
  }

  /**
   * kvm_mmu_recover_huge_pages() (kvm_mmu_zap_collapsible_sptes() before 6.13), rmap part:
   * dirty logging of `slot` stopped, so 4K (and 2M) leaves of direct shadow pages that could now
   * be mapped bigger are zapped; the next fault maps the huge page. Indirect leaves mirror the
   * guest's own page sizes and stay.
   */
  *kvmMmuRecoverHugePages(slot: Memslot): KernelOp {
    yield* this.vm.mmuLock.writeLock()
    try {
      // kvm_rmap_zap_collapsible_sptes(): levels 4K..KVM_MAX_HUGEPAGE_LEVEL-1, flush on yield.
      if (yield* this.walkSlotRmaps(slot, this.zapCollapsibleSpte, 1, 2, true)) this.vm.flushRemoteTlbs() // kvm_flush_remote_tlbs_memslot
    } finally {
      this.vm.mmuLock.writeUnlock()
    }
  }

  /**
   * kvm_mmu_zap_collapsible_spte(): zap each leaf of a direct shadow page whose level is below
   * what the gfn range of that page could be mapped with now (kvm_mmu_max_mapping_level at the
   * page's gfn), restarting the rmap walk after every zap. Returns whether a TLB flush is needed
   * (x86 without Hyper-V has no ranged remote flush, so the caller flushes the memslot once).
   */
  private readonly zapCollapsibleSpte = (head: number[], slot: Memslot): boolean => {
    let needFlush = false
    restart: for (;;) {
      for (let i = 0; i < head.length; i++) {
        const sptep = head[i]!
        const sp = this.spOfSptep(sptep)
        if (sp.direct && sp.level < this.kvmMmuMaxMappingLevel(slot, sp.gfn)) {
          this.dropSpteAt(sptep) // kvm_zap_one_rmap_spte()
          this.counters.collapsibleSptesZapped++
          needFlush = true
          continue restart
        }
      }
      return needFlush
    }
  }

  /**
   * __walk_slot_rmaps(): `fn` over every rmap head of levels [startLevel, endLevel] of `slot`.
   * Between heads, if a reschedule is due or mmu_lock is contended, yield it (cond_resched_rwlock_write),
   * first flushing what was done when `flushOnYield`. Returns whether a flush is still owed.
   */
  private *walkSlotRmaps(slot: Memslot, fn: (head: number[], slot: Memslot) => boolean, startLevel: number, endLevel: number, flushOnYield: boolean): KernelOp<boolean> {
    const d = slot.arch.mmu.get(this.slotKey) as SlotMmu | undefined
    if (d === undefined) return false
    const vm = this.vm
    let flush = false
    for (let level = startLevel; level <= endLevel; level++) {
      const arr = d.rmap[level - 1]!
      for (let i = 0; i < arr.length; i++) {
        const head = arr[i] === undefined ? undefined : rmapArrayAt(arr, i)
        if (head !== undefined && head.length > 0 && fn(head, slot)) flush = true
        if (vm.sched.needResched() || vm.mmuLock.needBreak()) {
          if (flush && flushOnYield) {
            vm.flushRemoteTlbs()
            flush = false
          }
          yield* vm.mmuLock.condResched('write')
        }
      }
    }
    return flush
  }

  /** `max_huge_page_level` (kvm_configure_mmu): EPT's huge page support with TDP, else 1G iff GBPAGES. */
  private maxHugePageLevel(): number {
    const f = this.vm.features
    if (this.config.tdp) return !f.ept2M ? 1 : f.ept1G ? 3 : 2
    return f.gbPages ? 3 : 2
  }

  /**
   * kvm_mmu_max_mapping_level(kvm, slot, gfn): the largest level ≤ max_huge_page_level whose huge
   * page around `gfn` is not disallowed (lpage_info), capped by the host's mapping level of the
   * gfn's HVA (host_pfn_mapping_level).
   */
  kvmMmuMaxMappingLevel(slot: Memslot, gfn: number): number {
    let maxLevel = this.maxHugePageLevel()
    for (; maxLevel > 1; maxLevel--) if (!isLpageDisallowed(slot, gfn, maxLevel)) break
    if (maxLevel === 1) return 1
    return Math.min(this.vm.host.hostMappingLevel(gfnToHvaMemslot(slot, gfn)), maxLevel)
  }

  private forEachRmapInRange(slot: Memslot, start: number, end: number, fn: (head: number[]) => void): void {
    const d = slot.arch.mmu.get(this.slotKey) as SlotMmu | undefined
    if (d === undefined) return
    for (let level = 1; level <= 3; level++) {
      const arr = d.rmap[level - 1]!
      const a = gfnToIndex(Math.max(start, slot.baseGfn), slot.baseGfn, level)
      const b = gfnToIndex(Math.min(end, slot.baseGfn + slot.npages) - 1, slot.baseGfn, level)
      for (let i = a; i <= b; i++) {
        const h = arr[i] === undefined ? undefined : rmapArrayAt(arr, i)
        if (h !== undefined && h.length > 0) fn(h)
      }
    }
  }

  /** kvm_unmap_gfn_range() → kvm_zap_rmap over every level. */
  unmapGfnRange(_asId: number, slot: Memslot, startGfn: number, endGfn: number): boolean {
    let flush = false
    this.forEachRmapInRange(slot, startGfn, endGfn, (head) => {
      while (head.length > 0) {
        this.dropSpteAt(head[head.length - 1]!)
        flush = true
      }
    })
    return flush
  }

  /** kvm_age_gfn() → kvm_rmap_age_gfn_range(): clear Accessed (or access-track), report young. */
  ageGfnRange(_asId: number, slot: Memslot, startGfn: number, endGfn: number): boolean {
    let young = false
    const fmt = this.fmt
    let reads = 0
    let updates = 0
    this.forEachRmapInRange(slot, startGfn, endGfn, (head) => {
      for (const sptep of head) {
        const lo = this.readSpte(sptep)
        const hi = this.mem.hi64
        reads++
        if (spteAdEnabled(hi)) {
          if ((lo & fmt.accessedLo) === 0) continue
          young = true
          this.writeSpte(sptep, lo & ~fmt.accessedLo, hi)
        } else {
          if ((lo & fmt.accTrackLo) === 0) continue
          young = true
          const s = markSpteForAccessTrack(this.spte, fmt, lo, hi)
          this.writeSpte(sptep, s.lo, s.hi)
        }
        updates++
      }
    })
    // The walk's cost, as the TDP MMU's aging charges it: a read per SPTE, an atomic per update.
    this.chargeIfRunning(reads * this.costs.memoryRef + updates * this.costs.spteCmpxchg)
    return young
  }

  /** Charge simulated time to the running thread, if the caller runs on one (host-side calls may not). */
  private chargeIfRunning(ns: number): void {
    if (ns > 0 && this.vm.sched.current !== null) this.vm.sched.charge(ns)
  }

  /** kvm_test_age_gfn(). */
  testAgeGfn(_asId: number, slot: Memslot, startGfn: number, endGfn: number): boolean {
    let young = false
    const fmt = this.fmt
    let reads = 0
    this.forEachRmapInRange(slot, startGfn, endGfn, (head) => {
      for (const sptep of head) {
        const lo = this.readSpte(sptep)
        const hi = this.mem.hi64
        reads++
        if (spteAdEnabled(hi) ? (lo & fmt.accessedLo) !== 0 : (lo & fmt.accTrackLo) !== 0) young = true
      }
    })
    this.chargeIfRunning(reads * this.costs.memoryRef)
    return young
  }

  /** kvm_arch_mmu_enable_log_dirty_pt_masked() → kvm_mmu_write_protect_pt_masked(). */
  logDirtyPtMasked(slot: Memslot, gfnOffset: number, maskLo: number, maskHi: number): void {
    const base = slot.baseGfn + gfnOffset
    let first = -1
    let last = -1
    for (let b = 0; b < 64; b++) {
      const bit = b < 32 ? (maskLo >>> b) & 1 : (maskHi >>> (b - 32)) & 1
      if (bit === 0) continue
      if (first < 0) first = base + b
      last = base + b
      this.rmapWriteProtect(this.rmapHead(slot, 1, base + b), false)
    }
    if (first >= 0 && this.vm.memslots.manualProtectAndInitSet) {
      this.slotGfnWriteProtect(slot, first, 2, false)
      if (Math.floor(first / 512) !== Math.floor(last / 512)) this.slotGfnWriteProtect(slot, last, 2, false)
    }
  }

  // ================================================================== teardown, stats, audit

  *destroy(): KernelOp {
    for (const v of this.vcpuMmus) yield* this.kvmMmuFreeRoots(v, KVM_MMU_ROOTS_ALL)
    yield* this.zapAll()
    if (this.dummyRootHpa !== INVALID_PAGE) {
      this.vm.host.frames.free(this.dummyRootHpa / 4096, { poison: true })
      this.dummyRootHpa = INVALID_PAGE
    }
  }

  stats(): Record<string, number> {
    return {
      n_used_mmu_pages: this.nUsedMmuPages,
      n_max_mmu_pages: this.nMaxMmuPages,
      indirect_shadow_pages: this.indirectShadowPages,
      active_mmu_pages: this.activeMmuPages.size,
      mmu_valid_gen: this.mmuValidGen,
      warnings: this.warnings.length,
      ...this.counters,
    }
  }

  audit(): string[] {
    return auditShadowMmu(this)
  }

  /** Test access: the root slots of a vCPU. */
  rootsOf(vcpu: KvmVcpu): { root: RootInfo; prev: RootInfo[] } {
    const v = this.vmmu(vcpu)
    return { root: v.root, prev: v.prevRoots }
  }
}

/** The {@link ShadowMmu} of a VM created with a strategy of this package (throws otherwise). */
export function shadowMmuOf(vm: Vm): ShadowMmu {
  const m = vm.mmu
  if (!(m instanceof ShadowMmu)) throw new KvmError('EINVAL', `the VM runs strategy '${vm.strategy.name}', not one of @mmusim/shadow-mmu`)
  return m
}

/**
 * is_write_to_guest_page_table(): PFERR_GUEST_PAGE | PFERR_WRITE | PFERR_PRESENT all set (≤6.11's
 * PFERR_NESTED_GUEST_PAGE test) — the CPU wrote a guest page table while walking it (TDP).
 */
export function isWriteToGuestPageTable(errorCode: number): boolean {
  // PFERR_GUEST_PAGE is bit 33: test it arithmetically.
  return Math.floor(errorCode / PFERR_GUEST_PAGE) % 2 === 1 && (errorCode & (PFERR_W | PFERR_P)) === (PFERR_W | PFERR_P)
}

/**
 * kvm_rip_read() for the loop guard of unprotect-and-retry. The modelled guest has no RIP; an
 * instruction is identified by how many ops its vCPU has fetched (a retried op is not fetched
 * again) and, inside a batch, by the element index.
 */
export function kvmRipRead(vcpu: KvmVcpu): number {
  const g = vcpu.guest
  return g.steps * 2 ** 20 + (g.op.kind === OP_BATCH ? g.op.index : 0)
}

/**
 * kvm_event_needs_reinjection(): an exception or interrupt was being delivered when the fault
 * hit. The model delivers interrupts between ops, never through guest memory, so no event is
 * ever pending reinjection.
 */
export function kvmEventNeedsReinjection(_vcpu: KvmVcpu): boolean {
  return false
}

/** Index of `addr` in a table of `level` (signed canonical addresses are exact). */
/**
 * The gfn hash bucket (kvm_page_table_hashfn, here gfn mod 2^KVM_MMU_HASH_SHIFT): the low bits,
 * with `&` (ToInt32 keeps a safe integer's low 32 bits exactly) rather than `%`, which is a
 * floating-point remainder call when V8 holds gfn as a double.
 */
function mmuPageHashIndex(gfn: number): number {
  return gfn & ((1 << KVM_MMU_HASH_SHIFT) - 1)
}

export function spteIndex(addr: number, level: number): number {
  // Levels 1 and 2 index bits below 32: an unsigned shift of the low half (exact for any safe
  // integer). Above, × an exact power of two from a table (`2 ** n` with a variable n is pow()).
  if (level === 1) return (addr >>> 12) & 511
  if (level === 2) return (addr >>> 21) & 511
  return Math.floor(addr * INDEX_SCALE[level]!) & 511
}

/** 2^-(12 + 9·(level - 1)) per level. */
const INDEX_SCALE: readonly number[] = [1, 2 ** -12, 2 ** -21, 2 ** -30, 2 ** -39, 2 ** -48]

/** FNAME(gpte_access). */
function gpteAccessOf(lo: number, hi: number, nxe: boolean): number {
  return ((lo & 2) !== 0 ? ACC_WRITE_MASK : 0) | ((lo & 4) !== 0 ? ACC_USER_MASK : 0) | (nxe && hi >>> 31 !== 0 ? 0 : ACC_EXEC_MASK)
}

/** detect_write_misaligned() for 8-byte gPTEs. */
export function detectWriteMisaligned(gpa: number, bytes: number): boolean {
  const offset = gpa % 4096
  if ((offset & 7) === 0 && bytes === 1) return false
  return ((offset ^ (offset + bytes - 1)) & ~7) !== 0 || bytes < 4
}

