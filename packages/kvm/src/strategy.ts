import type { StandardSchemaV1 } from '@standard-schema/spec'
import type { AccessKind } from '@mmusim/x86-hw'
import { KvmError } from './errors.ts'
import type { Memslot, MemslotChange } from './memslot.ts'
import type { KernelOp } from './sched/index.ts'
import type { KvmVcpu } from './kvm-vcpu.ts'
import type { Vm } from './vm.ts'

/** The strategy API version this core implements. A plugin declaring another version is refused. */
export const MMU_API_VERSION = 1

// ---- page-fault return codes (arch/x86/kvm/mmu/mmu_internal.h, enum RET_PF_*) ----
export const RET_PF_CONTINUE = 0
/** Resume the guest and let it fault again (stale fault, invalidation in progress, #PF injected). */
export const RET_PF_RETRY = 1
/** Emulate the instruction (MMIO, or a write to a write-protected shadowed gfn). */
export const RET_PF_EMULATE = 2
/** ≥6.12: the write hit a write-protected gfn; unprotect-and-retry or emulate. */
export const RET_PF_WRITE_PROTECTED = 3
export const RET_PF_INVALID = 4
/** A mapping was installed. */
export const RET_PF_FIXED = 5
/** The mapping was already correct (e.g. another vCPU fixed it). */
export const RET_PF_SPURIOUS = 6
export type RetPf = 0 | 1 | 2 | 3 | 4 | 5 | 6
/** {@link MmuInstance.pageFaultInline}: the fault has to yield; finish it with pageFaultContinue. */
export const PF_PENDING = -1

/**
 * Where a fault run as a state machine ({@link MmuInstance.pageFaultInline}) stopped: the step
 * to go on at, and the cost to yield or the blocking operation to run first. A strategy's
 * per-vCPU fault state extends it; its `pageFaultContinue` yields `pendingNs` (or runs
 * `pendingOp`, keeping the result in `opResult`) and re-enters the machine at `phase`.
 */
export class FaultContinuation {
  /** The step the machine goes on at (the strategy's own numbering). */
  phase = 0
  /** The cost to yield before going on (when pendingOp is null). */
  pendingNs = 0
  /** The blocking operation to run before going on; its result lands in opResult. */
  pendingOp: KernelOp<unknown> | null = null
  opResult: unknown = undefined

  /** Stop at a cost that cannot be charged in place (`tryAdvance` said no); go on at `next`. Returns PF_PENDING. */
  pendCost(ns: number, next: number): number {
    this.pendingNs = ns
    this.phase = next
    return PF_PENDING
  }

  /** Stop at a blocking operation; go on at `next` with its result in opResult. Returns PF_PENDING. */
  pendOp(op: KernelOp<unknown>, next: number): number {
    this.pendingOp = op
    this.phase = next
    return PF_PENDING
  }
}

/** KVM's extra page-fault error-code bits for TDP faults (PFERR_GUEST_FINAL_MASK / PFERR_GUEST_PAGE_MASK, bits 32/33 → numbers). */
export const PFERR_GUEST_FINAL = 2 ** 32
export const PFERR_GUEST_PAGE = 2 ** 33

/** What the hypervisor tells the MMU about a page fault (kvm_mmu_page_fault's arguments). */
export interface PageFault {
  /** CR2 (shadow paging) or the faulting guest-physical address (TDP). */
  addr: number
  /** PFERR_* bits (P, W, U, RSVD, I/D, PK), plus PFERR_GUEST_FINAL/PAGE for TDP faults. */
  errorCode: number
  /** The access kind. */
  kind: AccessKind
  /** Guest linear address when known (TDP: the EPT violation's GLA). */
  gla: number
  /** The VM exit reason that produced the fault (EXIT_PF, EXIT_EPT_VIOLATION, EXIT_EPT_MISCONFIG, EXIT_NPF). */
  exitReason: number
}

/** What a strategy can do; the harness reads it to choose experiments, never to special-case code paths. */
export interface MmuCapabilities {
  /** Hardware mode the vCPUs run in: shadow page tables, or EPT/NPT. */
  hwMode: 'shadow' | 'tdp'
  /** Page-table format driven in TDP mode. */
  tdpFormat?: 'ept' | 'npt'
  /** Faults can run concurrently (under mmu_lock for read). */
  parallelFaults: boolean
  /** Implements dirty logging. */
  dirtyLog: boolean
  /** Maps guest memory with huge pages when the host backing allows. */
  hugePages: boolean
}

/**
 * An MMU instance: everything a KVM MMU is told, and nothing more. Every method that can block,
 * take mmu_lock or yield is a generator (a {@link KernelOp}) run on a thread of the VM's
 * scheduler; the others are plain calls. The core calls these exactly where KVM calls the
 * corresponding kernel function (named in each JSDoc).
 */
export interface MmuInstance {
  /** Called once per vCPU as it is created (kvm_mmu_create / kvm_init_mmu). */
  vcpuCreate(vcpu: KvmVcpu): void
  /** Whether the vCPU has a valid current root (kvm_mmu_reload's check of root.hpa). */
  hasValidRoot(vcpu: KvmVcpu): boolean
  /**
   * kvm_mmu_load(): allocate or reuse the root, sync it, and load it into hardware
   * (`vcpu.hw.loadShadowRoot()` or `vcpu.hw.setNested()`). Returns 0 or a negative errno.
   */
  load(vcpu: KvmVcpu): KernelOp<number>
  /** kvm_mmu_unload(): free every root of the vCPU (current and previous). */
  unload(vcpu: KvmVcpu): KernelOp
  /** kvm_mmu_page_fault(): handle a #PF exit (shadow) or EPT violation/misconfig/NPF (TDP). Returns RET_PF_*. */
  pageFault(vcpu: KvmVcpu, fault: PageFault): KernelOp<RetPf>
  /**
   * Optional, with {@link pageFaultContinue}: {@link pageFault} as a plain call, for the vCPU's
   * exit path. It does what pageFault does, charging each cost where pageFault would yield it
   * with `sched.tryAdvance(ns)` (which succeeds only when no other thread could run in between,
   * so results are identical), and returns RET_PF_* when the fault completed, or
   * {@link PF_PENDING} when it reached a yield it could not take in place or an operation that
   * blocks; the core then runs `pageFaultContinue(vcpu)` at once to finish the fault. A strategy
   * that has both spares the simulator a generator and a suspension per fault.
   */
  pageFaultInline?(vcpu: KvmVcpu, fault: PageFault): number
  /** Finish the fault {@link pageFaultInline} left pending on this vCPU: yield what it stopped at and go on. */
  pageFaultContinue?(vcpu: KvmVcpu): KernelOp<RetPf>
  /** kvm_mmu_reset_context(): CR0/CR4/EFER bits that define the MMU role changed. */
  resetContext(vcpu: KvmVcpu): KernelOp
  /**
   * kvm_mmu_new_pgd(): the guest loaded CR3 (only meaningful for shadow paging; TDP MMUs may
   * ignore it). The core then requests the sync/flush that the no-flush bit and PCID imply.
   */
  newPgd(vcpu: KvmVcpu, cr3: number): KernelOp
  /** kvm_mmu_invlpg() / kvm_mmu_invalidate_addr(): INVLPG or INVPCID-address for `gva`; `pcid` -1 means all roots. */
  invalidateGva(vcpu: KvmVcpu, gva: number, pcid: number): KernelOp
  /** kvm_invalidate_pcid(): a PCID was flushed (CR3 write without no-flush, INVPCID single-context). */
  invalidatePcid(vcpu: KvmVcpu, pcid: number): KernelOp
  /** KVM_REQ_MMU_SYNC → kvm_mmu_sync_roots(). */
  syncRoots(vcpu: KvmVcpu): KernelOp
  /** KVM_REQ_TLB_FLUSH_GUEST → kvm_vcpu_flush_tlb_guest()'s MMU part (shadow: sync current and previous roots). */
  flushTlbGuest(vcpu: KvmVcpu): KernelOp
  /** KVM_REQ_MMU_FREE_OBSOLETE_ROOTS → kvm_mmu_free_obsolete_roots(). */
  freeObsoleteRoots(vcpu: KvmVcpu): KernelOp
  /**
   * A memslot was created, deleted, moved or changed flags (kvm_arch_flush_shadow_memslot before a
   * delete/move takes effect, kvm_arch_commit_memory_region after).
   */
  memslotChanged(change: MemslotChange): KernelOp
  /**
   * MMU notifier: unmap [startGfn, endGfn) of `slot` (kvm_unmap_gfn_range). Called with mmu_lock
   * held for write by the core. Returns whether a TLB flush is needed (the core flushes).
   */
  unmapGfnRange(asId: number, slot: Memslot, startGfn: number, endGfn: number): boolean
  /**
   * MMU notifier: kvm_unmap_gfn_range() with `range->may_block` — the same unmap as
   * {@link unmapGfnRange}, as a kernel operation that may drop and retake mmu_lock (yield, flushing
   * what it zapped first) when `mayBlock`. Called with mmu_lock held for write and returns with it
   * held; returns whether a TLB flush is still needed (the core flushes). Optional: the core uses
   * it, when present, for host operations run with {@link Vm.hostOpYielding}; otherwise it calls
   * {@link unmapGfnRange}.
   */
  unmapGfnRangeOp?(asId: number, slot: Memslot, startGfn: number, endGfn: number, mayBlock: boolean): KernelOp<boolean>
  /**
   * MMU notifier: clear accessed state, return whether any was young (kvm_age_gfn). Called with
   * mmu_lock held for write, unless the instance declares {@link agingLockless}.
   */
  ageGfnRange(asId: number, slot: Memslot, startGfn: number, endGfn: number): boolean
  /**
   * MMU notifier: whether any SPTE is young (kvm_test_age_gfn). Called with mmu_lock held for
   * write, unless the instance declares {@link agingLockless}.
   */
  testAgeGfn(asId: number, slot: Memslot, startGfn: number, endGfn: number): boolean
  /**
   * Aging runs without mmu_lock: `CONFIG_KVM_MMU_LOCKLESS_AGING` (selected by x86_64 since 6.15),
   * under which virt/kvm/kvm_main.c's `kvm_age_hva_range()` sets `range->lockless` and
   * `__kvm_handle_hva_range()` skips `KVM_MMU_LOCK()` around the handlers; the TDP MMU then walks
   * its roots under RCU only (`kvm_tdp_mmu_age_gfn_range`). When true, the core calls
   * {@link ageGfnRange} / {@link testAgeGfn} and their `*Op` forms without taking mmu_lock (the
   * strategy protects itself); when false or absent, with mmu_lock held for write, as for the
   * shadow MMU's rmap walk and every MMU before 6.15. Optional; default false.
   */
  readonly agingLockless?: boolean
  /**
   * {@link ageGfnRange} as a kernel operation, so that a lockless walk can be preempted between
   * reading an SPTE and the atomic update that depends on it (it must not block: none of the
   * notifiers that funnel into aging may sleep). Optional: the core uses it, when present, for
   * aging run on a thread ({@link Vm.hostAgeOp}); otherwise it calls {@link ageGfnRange}.
   */
  ageGfnRangeOp?(asId: number, slot: Memslot, startGfn: number, endGfn: number): KernelOp<boolean>
  /** {@link testAgeGfn} as a kernel operation (see {@link ageGfnRangeOp}). Optional. */
  testAgeGfnOp?(asId: number, slot: Memslot, startGfn: number, endGfn: number): KernelOp<boolean>
  /**
   * Dirty logging: write-protect (or clear D of) the gfns `slot.baseGfn + gfnOffset + i` for
   * every set bit i of the 64-bit mask (maskLo = bits 0..31, maskHi = 32..63)
   * (kvm_arch_mmu_enable_log_dirty_pt_masked). Called with mmu_lock held for write.
   */
  logDirtyPtMasked(slot: Memslot, gfnOffset: number, maskLo: number, maskHi: number): void
  /** Emulated guest write to a gfn the MMU write-tracks (kvm_mmu_track_write / page-track notifier). */
  trackWrite(vcpu: KvmVcpu, gpa: number, bytes: number): KernelOp
  /** Whether the MMU write-tracks `gfn` (kvm_gfn_is_write_tracked); the emulator then calls trackWrite. */
  isWriteTracked(asId: number, gfn: number): boolean
  /** kvm_mmu_zap_all(): drop every shadow page / root table. */
  zapAll(): KernelOp
  /** KVM_SET_NR_MMU_PAGES: change the page quota (0 = automatic). Strategies without a quota ignore it. */
  changeMmuPages(nrPages: number): KernelOp
  /** VM teardown: free everything; afterwards no page, root or pending callback may remain. */
  destroy(): KernelOp
  /** Strategy-specific counters (KVM's VM stats are in `vm.stats`). */
  stats(): Record<string, number>
  /** Check the strategy's invariants; return one message per violation (empty = consistent). */
  audit(): string[]
}

/** A strategy plugin: a named, versioned factory with a typed options schema. */
export interface MmuStrategy<Options = unknown> {
  /** Short name, e.g. `tdp`, `shadow`, `legacy-tdp`, `my-mmu`. */
  readonly name: string
  /** Must equal {@link MMU_API_VERSION}. */
  readonly apiVersion: number
  /** One line for `mmusim list`. */
  readonly description: string
  readonly capabilities: MmuCapabilities
  /** Options schema (any Standard Schema: zod, valibot, typebox...). */
  readonly optionsSchema: StandardSchemaV1<unknown, Options>
  /** Create the MMU of `vm` (the vCPUs do not exist yet). */
  create(vm: Vm, options: Options): MmuInstance
}

/** Identity helper for type inference, as vite's `defineConfig`. */
export function defineMmuStrategy<Options>(strategy: MmuStrategy<Options>): MmuStrategy<Options> {
  return strategy
}

const EXPECTED_SHAPE = `{
  name: string,
  apiVersion: ${String(MMU_API_VERSION)},
  description: string,
  capabilities: { hwMode: 'shadow' | 'tdp', parallelFaults: boolean, dirtyLog: boolean, hugePages: boolean },
  optionsSchema: StandardSchemaV1 (e.g. a zod schema),
  create(vm, options): MmuInstance
}`

/**
 * Validate that `value` is a usable strategy: the right shape and API version. Throws a
 * {@link KvmError} that shows the expected shape and what was wrong.
 */
export function assertMmuStrategy(value: unknown, where = 'strategy'): asserts value is MmuStrategy {
  const problems: string[] = []
  if (typeof value !== 'object' || value === null) {
    throw new KvmError('EINVAL', `${where} is not an object (got ${value === null ? 'null' : typeof value}); expected an MMU strategy of the shape\n${EXPECTED_SHAPE}\nmade with defineMmuStrategy({...}).`)
  }
  const v = value as Record<string, unknown>
  if (typeof v.name !== 'string' || v.name === '') problems.push('name must be a non-empty string')
  if (typeof v.description !== 'string') problems.push('description must be a string')
  if (typeof v.create !== 'function') problems.push('create must be a function (vm, options) => MmuInstance')
  const caps = v.capabilities as Record<string, unknown> | undefined
  if (typeof caps !== 'object' || (caps.hwMode !== 'shadow' && caps.hwMode !== 'tdp')) {
    problems.push("capabilities.hwMode must be 'shadow' or 'tdp'")
  }
  const schema = v.optionsSchema as Record<string, unknown> | undefined
  const std = schema?.['~standard'] as Record<string, unknown> | undefined
  if (typeof std !== 'object' || typeof std.validate !== 'function') {
    problems.push("optionsSchema must implement Standard Schema (an object with a '~standard.validate' function, e.g. a zod schema)")
  }
  if (problems.length > 0) {
    throw new KvmError('EINVAL', `${where} does not have the shape of an MMU strategy:\n  - ${problems.join('\n  - ')}\nExpected:\n${EXPECTED_SHAPE}`)
  }
  if (v.apiVersion !== MMU_API_VERSION) {
    throw new KvmError(
      'EINVAL',
      `${where} '${String(v.name)}' declares apiVersion ${String(v.apiVersion)}, but this @mmusim/kvm implements apiVersion ${String(MMU_API_VERSION)}. ` +
        (typeof v.apiVersion === 'number' && v.apiVersion > MMU_API_VERSION ? 'Upgrade @mmusim/kvm.' : 'Update the strategy to the current contract.'),
    )
  }
}

/**
 * Validate the instance a strategy's `create()` returned, where one method needs another: a
 * {@link MmuInstance.pageFaultInline} without {@link MmuInstance.pageFaultContinue} (or the
 * reverse) could not finish a pending fault. Throws a {@link KvmError} EINVAL.
 */
export function assertMmuInstance(mmu: unknown, name: string): asserts mmu is MmuInstance {
  if (typeof mmu !== 'object' || mmu === null || typeof (mmu as Record<string, unknown>).pageFault !== 'function') {
    throw new KvmError('EINVAL', `strategy '${name}': create() must return an MmuInstance (an object with pageFault, load, ... methods); got ${mmu === null ? 'null' : typeof mmu}`)
  }
  const m = mmu as Record<string, unknown>
  const pair = ['pageFaultInline', 'pageFaultContinue'] as const
  const given = pair.filter((k) => m[k] !== undefined)
  if (given.length === 0) return
  const wrong = pair.filter((k) => typeof m[k] !== 'function')
  if (wrong.length > 0) {
    const what = wrong.map((k) => `${k} ${m[k] === undefined ? 'is missing' : `is a ${typeof m[k]}`}`).join(', ')
    throw new KvmError(
      'EINVAL',
      `strategy '${name}': the MmuInstance has ${given.join(' and ')}, but ${what}; implement both as functions (a pending fault needs pageFaultContinue to finish), or neither (the core then runs pageFault).`,
    )
  }
}

/**
 * Validate `options` against the strategy's schema. Throws a {@link KvmError} listing each
 * invalid option (path and message) when they do not fit.
 */
export function parseStrategyOptions<O>(strategy: MmuStrategy<O>, options: unknown): O {
  const result = strategy.optionsSchema['~standard'].validate(options ?? {})
  if (result instanceof Promise) {
    throw new KvmError('EINVAL', `strategy '${strategy.name}' has an asynchronous options schema; MMU options must validate synchronously`)
  }
  if (result.issues !== undefined) {
    const lines = result.issues.map((i) => {
      const path = (i.path ?? []).map((p) => (typeof p === 'object' ? String(p.key) : String(p))).join('.')
      return `  - ${path === '' ? '(options)' : path}: ${i.message}`
    })
    throw new KvmError('EINVAL', `invalid options for MMU strategy '${strategy.name}':\n${lines.join('\n')}`)
  }
  return result.value
}
