import { ConcurrencyError } from './errors.ts'

/**
 * Simulated costs in nanoseconds. Numbers are for a ~3 GHz x86 server core (Skylake-SP /
 * Ice Lake class) and are meant to get orders of magnitude and ratios right, not to predict a
 * particular machine. Every field says where its default comes from; "estimate" marks numbers
 * that are our own rounding of a range rather than a single published measurement.
 */
export interface CostModel {
  /**
   * Uncontended lock acquire: one LOCK-prefixed RMW on a line already in the local cache.
   * Agner Fog's instruction tables give ~18–20 cycles for LOCK CMPXCHG/XADD on Skylake
   * (≈ 6–7 ns at 3 GHz); rounded up to 10 ns for the surrounding check (estimate).
   */
  readonly lockAcquire: number
  /** Lock release: a store-release (write unlock) or LOCK XADD (read unlock); estimate, 5 ns. */
  readonly lockRelease: number
  /**
   * Extra cost when the lock was contended: the lock's cache line moves from the releasing
   * core to the acquiring one. Core-to-core latency on one Intel Xeon socket measures
   * ~40–80 ns (published core-to-core latency matrices); 60 ns (estimate).
   */
  readonly cacheLineTransfer: number
  /** A memory reference that hits the cache hierarchy (L1 ~1 ns, L2 ~4 ns); 2 ns (estimate). */
  readonly memoryRef: number
  /** A memory reference that misses to local DRAM: ~80–100 ns on servers; 90 ns (estimate). */
  readonly dramRef: number
  /**
   * SPTE compare-and-exchange (try_cmpxchg64 on the SPTE): uncontended LOCK CMPXCHG ~18–20
   * cycles plus the load that precedes it; 20 ns (estimate, rounds up for cache effects).
   */
  readonly spteCmpxchg: number
  /**
   * Remote TLB flush with IPIs (kvm_flush_remote_tlbs → kick vCPUs and wait for acks).
   * IPI round trips measure ~1–3 µs on bare metal and more when targets are in guest mode
   * (they must exit first); 3 µs (estimate).
   */
  readonly tlbFlushIpi: number
  /**
   * VM exit + re-entry round trip including KVM's minimal handling (e.g. CPUID exit).
   * kvm-unit-tests "vmexit" reports roughly 1–2 µs on modern Intel hosts; 1.2 µs (estimate).
   */
  readonly vmExitRoundTrip: number
  /** Page allocation from the per-CPU free lists (alloc_page fast path): ~100–300 ns; 200 ns (estimate). */
  readonly pageAlloc: number
  /** Zeroing a 4 KiB page (clear_page with REP STOSB at ~16 GB/s): ≈ 256 ns; 250 ns (estimate). */
  readonly pageZero: number
  /**
   * Normal (non-expedited) RCU grace period. With HZ=1000 grace periods take from about one
   * jiffy to several ms (kernel RCU documentation: "several milliseconds"); we use the low end,
   * 1 ms (estimate). Override with a small value in tests that only care about ordering.
   */
  readonly rcuGracePeriod: number
  /**
   * Context switch charged when a thread really reschedules (need_resched in cond_resched) or
   * sleeps and is woken (mutex). lmbench lat_ctx reports ~1–3 µs; 1.5 µs (estimate).
   */
  readonly contextSwitch: number
  /**
   * How long a thread may run before a preemption is due (need_resched). EEVDF's default base
   * slice since Linux 6.6 is 0.75 ms (sysctl_sched_base_slice = 750000 ns).
   */
  readonly schedSlice: number
  /**
   * One guest data access that hits the TLB: ~4–5 cycles of L1 load-use latency plus address
   * generation at 3 GHz ≈ 1.5 ns; 1 ns (estimate). Walk references add `memoryRef` each.
   */
  readonly guestAccess: number
  /** One PAUSE in a guest spin loop: ~140 cycles on Skylake and later (Intel optimization manual) ≈ 40 ns. */
  readonly pause: number
  /** Sending an IPI from the guest with APICv / posted interrupts (no exit): ~0.5 µs ICR write + delivery (estimate). */
  readonly ipiSend: number
  /**
   * Resolving a guest page to a host page (hva_to_pfn → get_user_pages_fast on a present host
   * PTE): a page-table walk plus a page refcount atomic, ~100–300 ns (estimate); 150 ns. This is
   * the window between snapshotting mmu_invalidate_seq and taking mmu_lock in which an MMU
   * notifier invalidation can race with a fault.
   */
  readonly gup: number
  /**
   * The MMU's own software work to handle one page fault once it holds mmu_lock: walking and
   * installing SPTEs, shadow-page/rmap bookkeeping, memslot and lpage lookups. Derived from
   * anchors.md §B.12 (LKML, dirty_log_perf_test, 64 vCPUs × 1 GiB): the legacy MMU populated
   * 16.8 M faults in 20.4 s, i.e. ≤ 1.2 µs of work serialized per fault under the write lock;
   * 0.8 µs here, the rest being lock hand-over (cacheLineTransfer) and exit costs (estimate).
   * Under the write lock (legacy MMU, shadow) it serializes vCPUs; under the read lock (TDP MMU)
   * it overlaps.
   */
  readonly mmuFaultWork: number
}

/** The defaults documented on {@link CostModel}. */
export const DEFAULT_COSTS: Readonly<CostModel> = Object.freeze({
  lockAcquire: 10,
  lockRelease: 5,
  cacheLineTransfer: 60,
  memoryRef: 2,
  dramRef: 90,
  spteCmpxchg: 20,
  tlbFlushIpi: 3000,
  vmExitRoundTrip: 1200,
  pageAlloc: 200,
  pageZero: 250,
  rcuGracePeriod: 1_000_000,
  contextSwitch: 1500,
  schedSlice: 750_000,
  guestAccess: 1,
  pause: 40,
  ipiSend: 500,
  gup: 150,
  mmuFaultWork: 800,
})

/**
 * The default cost model with `overrides` applied. Every value must be a finite number ≥ 0;
 * a bad value throws `INVALID_ARGUMENT` naming the field.
 */
export function makeCostModel(overrides?: Partial<CostModel>): Readonly<CostModel> {
  const merged: CostModel = { ...DEFAULT_COSTS, ...overrides }
  const fields = merged as unknown as Record<string, unknown>
  for (const key of Object.keys(fields)) {
    if (!Object.hasOwn(DEFAULT_COSTS, key)) {
      throw new ConcurrencyError('INVALID_ARGUMENT', `unknown cost "${key}"; known: ${Object.keys(DEFAULT_COSTS).join(', ')}.`)
    }
    const v = fields[key]
    if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) {
      throw new ConcurrencyError(
        'INVALID_ARGUMENT',
        `cost "${key}" must be a finite number of nanoseconds ≥ 0, got ${String(v)}; fix the costs override.`,
      )
    }
  }
  return Object.freeze(merged)
}
