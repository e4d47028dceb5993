/**
 * The `tdp` MMU strategy: KVM's TDP MMU behind the @mmusim/kvm strategy contract. Each method
 * names the kernel function the core calls it for; the TDP MMU itself is {@link TdpMmu}.
 */
import {
  defineMmuStrategy,
  drainNothing,
  type KernelOp,
  KVM_MEM_LOG_DIRTY_PAGES,
  KVM_MEM_READONLY,
  type Memslot,
  type MemslotChange,
  type MmuInstance,
  mmioGenerationWrapped,
  type PageFault,
  type RetPf,
  type Vm,
} from './deps.ts'
import { TdpMmuAging } from './aging.ts'
import { auditTdpMmu } from './audit.ts'
import { NxHugePageRecoveryWorker } from './nx-recovery.ts'
import { tdpOptionsSchema, type TdpMmuOptions } from './options.ts'
import { drain, TdpMmu, TdpVcpuState, tdpVcpuState } from './tdp-mmu.ts'

export { tdpVcpuState }

/** The parts of one VM's TDP MMU. */
interface TdpParts {
  mmu: TdpMmu
  aging: TdpMmuAging
  nxWorker: NxHugePageRecoveryWorker
}

const parts = new WeakMap<Vm, TdpParts>()

function partsOf(vm: Vm): TdpParts {
  const p = parts.get(vm)
  if (p === undefined) throw new Error('this VM does not use the tdp strategy')
  return p
}

/** The {@link TdpMmu} behind a VM created with the `tdp` strategy (for tests and experiments). */
export function getTdpMmu(vm: Vm): TdpMmu {
  return partsOf(vm).mmu
}

/** The aging walkers of a `tdp` VM (`kvm_tdp_mmu_age_gfn_range`, `kvm_tdp_mmu_test_age_gfn`). */
export function getTdpMmuAging(vm: Vm): TdpMmuAging {
  return partsOf(vm).aging
}

/** The NX huge page recovery thread of a `tdp` VM (`kvm-nx-lpage-recovery`). */
export function getNxRecoveryWorker(vm: Vm): NxHugePageRecoveryWorker {
  return partsOf(vm).nxWorker
}

/** Create the MmuInstance of `vm`. */
function createTdpMmu(vm: Vm, options: TdpMmuOptions): MmuInstance {
  const mmu = new TdpMmu(vm, options)
  const aging = new TdpMmuAging(mmu)
  const nxWorker = new NxHugePageRecoveryWorker(mmu)
  parts.set(vm, { mmu, aging, nxWorker })
  const sched = vm.sched
  const eagerSplit = options.eagerSplit

  return {
    /** kvm_mmu_create(). */
    vcpuCreate(vcpu) {
      vcpu.mmuState = new TdpVcpuState(vm.host.mem, vcpu.id)
    },
    /** kvm_mmu_reload()'s VALID_PAGE(root.hpa). */
    hasValidRoot: (vcpu) => tdpVcpuState(vcpu).root !== null,
    /**
     * kvm_mmu_load(): mmu_alloc_direct_roots → kvm_tdp_mmu_alloc_root, load EPTP/nCR3, local flush.
     * The first load is the vCPU's first KVM_RUN, whose kvm_mmu_post_init_vm() starts the NX
     * recovery thread (once per VM).
     */
    *load(vcpu): KernelOp<number> {
      nxWorker.kvmMmuPostInitVm()
      const st = tdpVcpuState(vcpu)
      const root = yield* mmu.kvmTdpMmuAllocRoot(vcpu, st)
      st.root = root
      vcpu.hw.setTdpMode(vm.host.mem, root.translator!, 1)
      vcpu.hw.flushCurrent() // "the provenance of the root is unknown"
      return 0
    },
    /** kvm_mmu_unload(): kvm_mmu_free_roots(KVM_MMU_ROOTS_ALL). */
    *unload(vcpu) {
      yield* mmu.kvmMmuFreeRoots(tdpVcpuState(vcpu), true, 7, false)
    },
    /**
     * kvm_mmu_page_fault() → kvm_tdp_page_fault(): the TDP MMU's own generator, not a wrapper
     * around it (one generator less on every yield of the hottest path).
     */
    pageFault: (vcpu, pf: PageFault): KernelOp<RetPf> => mmu.kvmMmuPageFault(vcpu, tdpVcpuState(vcpu), pf),
    pageFaultInline: (vcpu, pf: PageFault): number => mmu.pageFaultInline(vcpu, tdpVcpuState(vcpu), pf),
    pageFaultContinue: (vcpu): KernelOp<RetPf> => mmu.pageFaultContinue(vcpu, tdpVcpuState(vcpu)),
    /** kvm_mmu_reset_context() → kvm_mmu_unload(). */
    *resetContext(vcpu) {
      yield* mmu.kvmMmuFreeRoots(tdpVcpuState(vcpu), true, 7, false)
    },
    /** kvm_mmu_new_pgd(): a direct root is usable for any pgd (is_root_usable), nothing to do. */
    *newPgd() {
      yield* drainNothing()
    },
    /** kvm_mmu_invalidate_addr(): nothing per GVA in a TDP MMU. */
    *invalidateGva() {
      yield* drainNothing()
    },
    /** kvm_invalidate_pcid(): nothing per PCID. */
    *invalidatePcid() {
      yield* drainNothing()
    },
    /** kvm_mmu_sync_roots(): TDP roots are never unsync. */
    *syncRoots() {
      yield* drainNothing()
    },
    /** kvm_vcpu_flush_tlb_guest(): no shadow state to sync. */
    *flushTlbGuest() {
      yield* drainNothing()
    },
    /** kvm_mmu_free_obsolete_roots(): put current/previous roots that are invalid. */
    *freeObsoleteRoots(vcpu) {
      yield* mmu.kvmMmuFreeRoots(tdpVcpuState(vcpu), true, 7, true)
    },
    /**
     * kvm_arch_flush_shadow_memslot (DELETE/MOVE → kvm_mmu_zap_all_fast, the SLOT_ZAP_ALL quirk)
     * and kvm_arch_commit_memory_region (FLAGS_ONLY → kvm_mmu_slot_apply_flags; an MMIO
     * generation wrap → kvm_mmu_zap_all_fast). Caller holds slots_lock.
     */
    *memslotChanged(change: MemslotChange) {
      if (change.kind === 'delete' || change.kind === 'move') {
        yield* mmu.kvmMmuZapAllFast()
        return
      }
      if (mmioGenerationWrapped(change.generation)) yield* mmu.kvmMmuZapAllFast()
      if (change.kind === 'flags-only') yield* kvmMmuSlotApplyFlags(change.old!, change.new!)
    },
    /** kvm_unmap_gfn_range() → kvm_tdp_mmu_unmap_gfn_range (mmu_lock held for write). */
    unmapGfnRange: (asId: number, _slot: Memslot, s: number, e: number) => mmu.kvmTdpMmuUnmapGfnRange(asId, s, e, false),
    /** kvm_unmap_gfn_range() with range->may_block → kvm_tdp_mmu_unmap_gfn_range (yields when mayBlock). */
    unmapGfnRangeOp: (asId: number, _slot: Memslot, s: number, e: number, mayBlock: boolean) => mmu.kvmTdpMmuUnmapGfnRangeOp(asId, s, e, mayBlock, false),
    /** CONFIG_KVM_MMU_LOCKLESS_AGING (≈6.15+): the notifier calls aging without mmu_lock. */
    agingLockless: aging.lockless,
    /** kvm_age_gfn() → kvm_tdp_mmu_age_gfn_range. */
    ageGfnRange: (asId: number, _slot: Memslot, s: number, e: number) => aging.ageGfnRange(asId, s, e, false),
    /** kvm_test_age_gfn() → kvm_tdp_mmu_test_age_gfn. */
    testAgeGfn: (asId: number, _slot: Memslot, s: number, e: number) => aging.ageGfnRange(asId, s, e, true),
    /** kvm_age_gfn() → kvm_tdp_mmu_age_gfn_range, preemptible between each read and its atomic update. */
    ageGfnRangeOp: (asId: number, _slot: Memslot, s: number, e: number) => aging.kvmTdpMmuAgeGfnRange(asId, s, e, false),
    /** kvm_test_age_gfn() → kvm_tdp_mmu_test_age_gfn. */
    testAgeGfnOp: (asId: number, _slot: Memslot, s: number, e: number) => aging.kvmTdpMmuAgeGfnRange(asId, s, e, true),
    /**
     * kvm_arch_mmu_enable_log_dirty_pt_masked(): in manual-protect + initially-set mode, eager split
     * and write-protect the huge pages covering the mask first; then write-protect the 4K PTEs
     * (kvm_mmu_write_protect_pt_masked → kvm_tdp_mmu_clear_dirty_pt_masked(wrprot)). No PML here.
     */
    logDirtyPtMasked(slot: Memslot, gfnOffset: number, maskLo: number, maskHi: number) {
      const base = slot.baseGfn + gfnOffset
      if (vm.memslots.manualProtectAndInitSet) {
        let first = -1
        let last = -1
        for (let b = 0; b < 64; b++) {
          if ((((b < 32 ? maskLo >>> b : maskHi >>> (b - 32)) & 1) !== 0)) {
            if (first < 0) first = b
            last = b
          }
        }
        if (first >= 0) {
          const start = base + first
          const end = base + last
          if (eagerSplit) drain(mmu.kvmTdpMmuTrySplitHugePages(slot, start, end + 1, 1, false, false), sched, 'kvm_mmu_try_split_huge_pages')
          mmu.kvmTdpMmuWriteProtectGfn(slot, start, 2)
          if (Math.floor(start / 512) !== Math.floor(end / 512)) mmu.kvmTdpMmuWriteProtectGfn(slot, end, 2)
        }
      }
      mmu.kvmTdpMmuClearDirtyPtMasked(slot, base, maskLo, maskHi, true)
    },
    *trackWrite() {
      yield* drainNothing()
    },
    /** No gfn is write-tracked (no shadowed guest page tables, no page-track users). */
    isWriteTracked: () => false,
    /** kvm_mmu_zap_all() → kvm_tdp_mmu_zap_all (write lock, invalid roots included, no flush). */
    *zapAll() {
      yield* vm.mmuLock.writeLock()
      yield* mmu.kvmTdpMmuZapAll()
      vm.mmuLock.writeUnlock()
    },
    *changeMmuPages() {
      yield* drainNothing()
    },
    /** kvm_mmu_pre_destroy_vm() (stop the NX recovery thread), then kvm_mmu_uninit_tdp_mmu(). */
    *destroy() {
      yield* nxWorker.kvmMmuPreDestroyVm()
      yield* mmu.kvmMmuUninitTdpMmu()
    },
    // Read once per report, not on a hot path: the spread's hidden class does not matter.
    // eslint-disable-next-line no-restricted-syntax
    stats: () => ({ ...mmu.counters, ...aging.counters, nx_recovery_runs: nxWorker.runs.length, possible_nx_huge_pages: mmu.possibleNx.length, roots: countRoots(mmu) }),
    audit: () => auditTdpMmu(mmu, vm.vcpus),
  }

  /** kvm_mmu_slot_apply_flags(): dirty logging toggled on a FLAGS_ONLY update. */
  function* kvmMmuSlotApplyFlags(old: Memslot, neu: Memslot): KernelOp {
    const log = (neu.flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0
    if (((old.flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0) === log) return
    const lock = vm.mmuLock
    if (!log) {
      // kvm_mmu_recover_huge_pages() (≈6.13+; zap_collapsible_sptes before).
      if ((neu.flags & KVM_MEM_READONLY) === 0) {
        yield* lock.readLock()
        yield* mmu.kvmTdpMmuRecoverHugePages(neu)
        mmu.mmuUnlock('read', 'kvm_mmu_recover_huge_pages')
      }
      return
    }
    if (vm.memslots.manualProtectAndInitSet) return
    if (eagerSplit) {
      // kvm_mmu_slot_try_split_huge_pages()
      yield* lock.readLock()
      yield* mmu.kvmTdpMmuTrySplitHugePages(neu, neu.baseGfn, neu.endGfn, 1, true, true)
      mmu.mmuUnlock('read', 'kvm_mmu_slot_try_split_huge_pages')
    }
    // kvm_mmu_slot_remove_write_access(kvm, slot, PG_LEVEL_4K)
    yield* lock.readLock()
    const changed = yield* mmu.kvmTdpMmuWrprotSlot(neu, 1)
    mmu.mmuUnlock('read', 'kvm_mmu_slot_remove_write_access')
    if (changed) mmu.flushRemoteTlbs()
  }
}

function countRoots(mmu: TdpMmu): number {
  let n = 0
  for (let r = mmu.rootsHead; r !== null; r = r.next) n++
  return n
}

/** KVM's TDP MMU (tdp_mmu.c): parallel faults under mmu_lock held for read, atomic SPTEs, the root lifecycle. */
export const tdpStrategy = defineMmuStrategy({
  name: 'tdp',
  apiVersion: 1,
  description: "KVM's TDP MMU: EPT/NPT roots shared by vCPUs, parallel faults under the read lock, atomic SPTE updates, RCU-freed tables",
  capabilities: { hwMode: 'tdp', tdpFormat: 'ept', parallelFaults: true, dirtyLog: true, hugePages: true },
  optionsSchema: tdpOptionsSchema,
  create: createTdpMmu,
})
