/**
 * vCPU requests (include/linux/kvm_host.h, arch/x86/include/asm/kvm_host.h): bits set by any
 * thread, serviced by the vCPU before it re-enters the guest, in the order of
 * vcpu_enter_guest(): FREE_OBSOLETE_ROOTS, MMU_SYNC, LOAD_MMU_PGD, TLB_FLUSH, then the local
 * flushes (TLB_FLUSH_CURRENT, TLB_FLUSH_GUEST); the root is (re)loaded afterwards by kvm_mmu_reload().
 */
/** KVM_REQ_TLB_FLUSH: flush everything of this vCPU (kvm_vcpu_flush_tlb_all). */
export const KVM_REQ_TLB_FLUSH = 1 << 0
/** KVM_REQ_MMU_RELOAD (≤5.17): unload every root; reload before entry. */
export const KVM_REQ_MMU_RELOAD = 1 << 1
/** KVM_REQ_MMU_SYNC: sync the current root's unsync children (kvm_mmu_sync_roots). */
export const KVM_REQ_MMU_SYNC = 1 << 2
/** KVM_REQ_LOAD_MMU_PGD: load the (switched) root into hardware. */
export const KVM_REQ_LOAD_MMU_PGD = 1 << 3
/** KVM_REQ_TLB_FLUSH_CURRENT: flush the current root's context. */
export const KVM_REQ_TLB_FLUSH_CURRENT = 1 << 4
/** KVM_REQ_TLB_FLUSH_GUEST: flush guest-visible translations (shadow: sync roots first). */
export const KVM_REQ_TLB_FLUSH_GUEST = 1 << 5
/** KVM_REQ_MMU_FREE_OBSOLETE_ROOTS: free roots that became obsolete/invalid. */
export const KVM_REQ_MMU_FREE_OBSOLETE_ROOTS = 1 << 6

/** Names for messages, by bit. */
export const REQUEST_NAMES: Readonly<Record<number, string>> = {
  [KVM_REQ_TLB_FLUSH]: 'KVM_REQ_TLB_FLUSH',
  [KVM_REQ_MMU_RELOAD]: 'KVM_REQ_MMU_RELOAD',
  [KVM_REQ_MMU_SYNC]: 'KVM_REQ_MMU_SYNC',
  [KVM_REQ_LOAD_MMU_PGD]: 'KVM_REQ_LOAD_MMU_PGD',
  [KVM_REQ_TLB_FLUSH_CURRENT]: 'KVM_REQ_TLB_FLUSH_CURRENT',
  [KVM_REQ_TLB_FLUSH_GUEST]: 'KVM_REQ_TLB_FLUSH_GUEST',
  [KVM_REQ_MMU_FREE_OBSOLETE_ROOTS]: 'KVM_REQ_MMU_FREE_OBSOLETE_ROOTS',
}
