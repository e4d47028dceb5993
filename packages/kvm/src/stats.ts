/**
 * KVM's statistics, with KVM's names (arch/x86/kvm/x86.c `kvm_vm_stats_desc` / `kvm_vcpu_stats_desc`,
 * shadow-mmu.md §12, tdp-mmu.md §11). Cumulative counters and gauges are plain numeric fields of
 * fixed-shape objects, so updating one is a field increment.
 */

/** VM-wide statistics (`kvm->stat`). */
export class VmStats {
  /** Cumulative prepare-zap calls. */
  mmu_shadow_zapped = 0
  /** kvm_mmu_track_write invocations past the "no indirect SPs" check. */
  mmu_pte_write = 0
  /** SPTEs zapped by track_write in upper-level SPs. */
  mmu_pde_zapped = 0
  /** SPs zapped by track_write for misaligned or flooding writes. */
  mmu_flooded = 0
  /** Pages zapped to make room (zap oldest). */
  mmu_recycled = 0
  /** Shadow-page lookups that allocated. */
  mmu_cache_miss = 0
  /** Gauge: SPs currently unsync. */
  mmu_unsync = 0
  /** Gauge: shadow pages. */
  mmu_shadow_pages = 0
  /** Remote TLB flushes performed / requested (generic KVM). */
  remote_tlb_flush = 0
  remote_tlb_flush_requests = 0
  /** Gauges: present leaf SPTEs per level. */
  pages_4k = 0
  pages_2m = 0
  pages_1g = 0
  /** Gauge: SPs on the possible-NX-huge-page list. */
  nx_lpage_splits = 0
  /** High-water marks. */
  max_mmu_page_hash_collisions = 0
  max_mmu_rmap_size = 0
}

/** Per-vCPU statistics (`vcpu->stat`), plus exits by reason. */
export class VcpuStats {
  pf_taken = 0
  pf_fixed = 0
  pf_emulate = 0
  pf_spurious = 0
  pf_fast = 0
  pf_mmio_spte_created = 0
  /** #PF injected into the guest. */
  pf_guest = 0
  /** Guest TLB flushes (KVM_REQ_TLB_FLUSH_GUEST) and all-context flushes. */
  tlb_flush = 0
  /** INVLPG / INVPCID-address emulated. */
  invlpg = 0
  /** VM exits handled, total and by reason. */
  exits = 0
  exits_pf = 0
  exits_ept_violation = 0
  exits_ept_misconfig = 0
  exits_npf = 0
  exits_cr_access = 0
  exits_invlpg = 0
  exits_invpcid = 0
  exits_msr_write = 0
  /** Instructions emulated (page-table writes to write-protected gfns, MMIO, CR accesses). */
  insn_emulation = 0
  /** Fault retries (RET_PF_RETRY) */
  pf_retry = 0
  /** Requests serviced before guest entry. */
  req_tlb_flush = 0
  req_tlb_flush_current = 0
  req_tlb_flush_guest = 0
  req_mmu_sync = 0
  req_load_mmu_pgd = 0
  req_free_obsolete_roots = 0
  req_mmu_reload = 0
}

/** A stats object as a plain record (for reports and snapshots). */
export function statsToRecord(s: VmStats | VcpuStats): Record<string, number> {
  const out: Record<string, number> = {}
  for (const [k, v] of Object.entries(s)) if (typeof v === 'number') out[k] = v
  return out
}
