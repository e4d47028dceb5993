import { type CpuFeatures, type GuestProgram, type InterruptHandler, makeFeatures, type TlbConfig } from '@mmusim/x86-hw'
import { KvmError } from './errors.ts'
import { GuestMemory } from './guest-memory.ts'
import { HostMemory } from './host-memory.ts'
import { KvmVcpu } from './kvm-vcpu.ts'
import { type DirtyLogMask, type Memslot, type MemslotChange, Memslots, type UserMemoryRegion } from './memslot.ts'
import { KvmMmuNotifier, type MmuNotifierListener, MmuNotifierState } from './mmu-notifier.ts'
import { KVM_REQ_TLB_FLUSH } from './requests.ts'
import { type ChaosOptions, type CostModel, type KernelOp, Mutex, Rcu, type RunResult, RwLock, Scheduler, type Thread, TimerQueue } from './sched/index.ts'
import { VmStats } from './stats.ts'
import { assertMmuInstance, assertMmuStrategy, type MmuInstance, type MmuStrategy, parseStrategyOptions } from './strategy.ts'

/** Options of a {@link Vm}. */
export interface VmOptions {
  /** The MMU strategy plugin and its (unvalidated) options. */
  strategy: MmuStrategy<never> | MmuStrategy
  strategyOptions?: unknown
  /** Number of vCPUs. @default 1 */
  vcpus?: number
  /** Guest CPU features (CPUID). */
  features?: Partial<CpuFeatures>
  /** Host physical memory in bytes (lazily backed). @default 4 GiB */
  hostMemBytes?: number
  tlb?: Partial<TlbConfig>
  /** Cost model overrides (simulated nanoseconds). */
  costs?: Partial<CostModel>
  /** Chaos scheduling (seeded PCT) instead of earliest-clock-first. */
  chaos?: ChaosOptions
  /** Record the schedule (thread id per step) for interleaving comparisons. */
  recordTrace?: boolean
  /**
   * Let threads continue without suspending where the scheduler would resume them next anyway
   * (Scheduler `fastPath`, MMU `pageFaultInline`). Every result is identical either way — tests
   * compare both; turn it off only to check that. @default true
   */
  schedFastPath?: boolean
}

/** The base HVA at which {@link Vm.addMemory} places guest memory (like a VMM's mmap). */
export const GUEST_HVA_BASE = 0x7f0000000000 - 2 ** 40

/**
 * A virtual machine: the KVM core state every MMU strategy plugs into — memslots per address
 * space, host memory with MMU notifiers, mmu_lock / slots_lock / RCU on a deterministic scheduler
 * in simulated time, VM stats, vCPUs with requests and the run loop, and the strategy instance.
 */
export class Vm {
  readonly sched: Scheduler
  /** kvm->mmu_lock. */
  readonly mmuLock: RwLock
  /** kvm->slots_lock. */
  readonly slotsLock: Mutex
  /** The host process's mmap_lock, as far as {@link hostOpYielding} needs it. */
  private readonly mmapLock: Mutex
  readonly rcu: Rcu
  readonly host: HostMemory
  readonly memslots: Memslots
  /** mmu_invalidate_seq / in_progress / range. */
  readonly notifierState = new MmuNotifierState()
  readonly notifier: KvmMmuNotifier
  readonly stats = new VmStats()
  readonly features: CpuFeatures
  readonly vcpus: KvmVcpu[] = []
  readonly mmu: MmuInstance
  readonly strategy: MmuStrategy
  /** The guest OS's interrupt table (vector → handler), shared by every vCPU. */
  idt: (InterruptHandler | undefined)[] = []
  /** Guest memory view of address space 0 (used by the core's emulator; MMUs may make their own). */
  readonly guestMem: GuestMemory
  private readonly tlbConfig: Partial<TlbConfig> | undefined
  private nextHva = GUEST_HVA_BASE
  /** Page-table pages the MMU holds (allocMmuPage − freeMmuPage). */
  mmuPagesLive = 0
  mmuPagesAllocated = 0
  destroyed = false

  constructor(options: VmOptions) {
    assertMmuStrategy(options.strategy, 'VmOptions.strategy')
    const strategy = options.strategy as MmuStrategy
    const strategyOptions = parseStrategyOptions(strategy, options.strategyOptions)
    this.features = makeFeatures(options.features)
    this.sched = new Scheduler({ costs: options.costs, chaos: options.chaos, recordTrace: options.recordTrace ?? false, fastPath: options.schedFastPath ?? true })
    this.mmuLock = new RwLock(this.sched, 'mmu_lock')
    this.slotsLock = new Mutex(this.sched, 'slots_lock')
    this.mmapLock = new Mutex(this.sched, 'mmap_lock')
    this.rcu = new Rcu(this.sched)
    this.host = new HostMemory({ sizeBytes: options.hostMemBytes ?? 4 * 2 ** 30 })
    this.memslots = new Memslots()
    this.guestMem = new GuestMemory(this.memslots, this.host)
    this.tlbConfig = options.tlb
    this.strategy = strategy
    this.mmu = strategy.create(this, strategyOptions)
    assertMmuInstance(this.mmu, strategy.name)
    this.notifier = new KvmMmuNotifier(this.memslots, this.notifierListener(), this.notifierState)
    this.host.registerNotifier(this.notifier)
    const n = options.vcpus ?? 1
    if (!Number.isInteger(n) || n < 1 || n > 64) throw new KvmError('EINVAL', `vcpus must be an integer from 1 to 64; got ${String(n)}`)
    for (let i = 0; i < n; i++) this.createVcpu()
  }

  /** KVM_CREATE_VCPU. */
  createVcpu(): KvmVcpu {
    const v = new KvmVcpu(this, this.vcpus.length, this.tlbConfig)
    this.vcpus.push(v)
    this.mmu.vcpuCreate(v)
    return v
  }

  // ------------------------------------------------------------------ memory

  /**
   * Convenience for a VMM: mmap `bytes` of anonymous host memory (THP if asked) and register it as
   * memslot `slot` at `gpa` in address space `asId`. Returns the memslot change.
   */
  addMemory(gpa: number, bytes: number, options: { slot?: number; asId?: number; thp?: boolean; flags?: number; readonly?: boolean } = {}): MemslotChange {
    const align = 2 ** 30
    const hva = Math.ceil(this.nextHva / align) * align + (gpa % align)
    const asId = options.asId ?? 0
    const set = this.memslots.space(asId)
    let free = 0
    while (set.byId.has(free)) free++
    this.host.mmap(hva, bytes, { thp: options.thp ?? false, readonly: options.readonly ?? false })
    try {
      const change = this.setUserMemoryRegion({
        slot: options.slot ?? free,
        asId,
        flags: options.flags ?? 0,
        guestPhysAddr: gpa,
        memorySize: bytes,
        userspaceAddr: hva,
      })
      this.nextHva = hva + bytes
      return change
    } catch (err) {
      // A rejected memslot leaves nothing behind: undo the mapping made for it.
      this.host.munmap(hva, bytes)
      throw err
    }
  }

  /**
   * KVM_SET_USER_MEMORY_REGION from userspace: validated first (a rejected request changes
   * nothing), then the MMU is told (kvm_arch_flush_shadow_memslot / commit_memory_region) on a
   * kernel thread holding slots_lock. Runs the scheduler until that thread is done.
   */
  setUserMemoryRegion(region: UserMemoryRegion): MemslotChange {
    const change = this.memslots.setUserMemoryRegion(region)
    if (change.kind !== 'none') {
      this.runKernel('set_memory_region', function* (this: Vm): KernelOp {
        yield* this.slotsLock.lock()
        try {
          yield* this.mmu.memslotChanged(change)
        } finally {
          this.slotsLock.unlock()
        }
      }.bind(this))
    }
    return change
  }

  /** Run one kernel operation to completion on its own thread (from "userspace", outside a run). */
  runKernel<R>(name: string, fn: () => KernelOp<R>): R {
    const t = this.sched.spawn(name, fn, { startTime: this.sched.now })
    this.sched.run()
    if (t.state === 'failed') throw t.error
    return t.result as R
  }

  /** Allocate a zeroed host page for an MMU page table; returns its host-physical address. */
  allocMmuPage(): number {
    const f = this.host.frames.alloc()
    if (f < 0) throw new KvmError('ENOMEM', 'host memory exhausted allocating an MMU page table; give the VM more hostMemBytes')
    this.mmuPagesLive++
    this.mmuPagesAllocated++
    this.sched.charge(this.sched.costs.pageAlloc)
    return f * 4096
  }

  /** Free an MMU page table; it is poisoned so any stale use throws at once. */
  freeMmuPage(hpa: number): void {
    this.host.frames.free(hpa / 4096, { poison: true })
    this.mmuPagesLive--
  }

  // ------------------------------------------------------------------ TLB flushes and requests

  /** kvm_make_all_cpus_request(). */
  makeAllCpusRequest(req: number): void {
    for (const v of this.vcpus) v.makeRequest(req)
  }

  /**
   * kvm_flush_remote_tlbs(): every vCPU flushes its TLB before it next runs guest code
   * (KVM_REQ_TLB_FLUSH with wait; a vCPU services requests before each guest instruction here,
   * which is the kick). Counted in remote_tlb_flush(_requests).
   */
  flushRemoteTlbs(): void {
    this.stats.remote_tlb_flush_requests++
    this.stats.remote_tlb_flush++
    this.makeAllCpusRequest(KVM_REQ_TLB_FLUSH)
    if (this.sched.current !== null) this.sched.charge(this.sched.costs.tlbFlushIpi)
  }

  // ------------------------------------------------------------------ host-side events

  /**
   * Run a host-side memory operation (munmap, mprotect, migrate, THP split, age) as a kernel
   * thread at simulated time `at`, holding mmu_lock for write around the MMU-notifier callbacks
   * (x86 takes it exclusively for unmap/age). A vCPU fault that snapshotted mmu_invalidate_seq
   * before it will retry.
   */
  hostOp(name: string, at: number, op: (host: HostMemory) => void): void {
    this.sched.spawn(
      `host:${name}`,
      function* (this: Vm): KernelOp {
        yield* this.mmuLock.writeLock()
        try {
          op(this.host)
        } finally {
          this.mmuLock.writeUnlock()
        }
      }.bind(this),
      { startTime: at },
    )
  }

  /**
   * Run a host-side memory operation as a kernel thread at simulated time `at`, split-phase as
   * KVM runs it: `op` returns the operation's kernel-op form (`host.munmapOp`, `mprotectOp`,
   * `migratePageOp`, `splitThpOp`), whose notifier phases take mmu_lock themselves —
   * `invalidate_range_start` (lock, in_progress++, range add, the MMU's unmap, which may yield
   * when the strategy has `unmapGfnRangeOp`, flush, unlock), then the host page-table change
   * without mmu_lock, then `invalidate_range_end` (lock, seq++, in_progress--, unlock). A fault
   * racing with it sees `mmu_invalidate_in_progress` and retries. Host operations run this way
   * are serialized among themselves by the host's mmap_lock.
   */
  hostOpYielding(name: string, at: number, op: (host: HostMemory) => KernelOp<unknown>): void {
    this.sched.spawn(
      `host:${name}`,
      function* (this: Vm): KernelOp {
        yield* this.mmapLock.lock()
        try {
          yield* op(this.host)
        } finally {
          this.mmapLock.unlock()
        }
      }.bind(this),
      { startTime: at },
    )
  }

  /**
   * Run an MMU-notifier aging callback on a host kernel thread at simulated time `at`, for
   * [hva, hva + bytes): `clear_flush_young` (reclaim's `folio_referenced()` →
   * `ptep_clear_flush_young_notify()`), `clear_young` (idle page tracking, MGLRU) or
   * `test_young` (on [hva, hva + 1)). KVM's `kvm_age_hva_range()` takes mmu_lock for write around
   * the handlers unless the strategy ages locklessly ({@link MmuInstance.agingLockless},
   * `CONFIG_KVM_MMU_LOCKLESS_AGING`), in which case the walk runs concurrently with faults (and is
   * preempted inside when the strategy has `ageGfnRangeOp`). The thread's result is "young".
   */
  hostAgeOp(name: string, at: number, hva: number, bytes: number, kind: 'clear_flush_young' | 'clear_young' | 'test_young' = 'clear_flush_young'): Thread<boolean> {
    const n = this.notifier
    return this.sched.spawn(
      `host:${name}`,
      function* (): KernelOp<boolean> {
        if (kind === 'test_young') return yield* n.testYoungOp(hva)
        if (kind === 'clear_young') return yield* n.clearYoungOp(hva, hva + bytes)
        return yield* n.clearFlushYoungOp(hva, hva + bytes)
      },
      { startTime: at },
    )
  }

  private notifierListener(): MmuNotifierListener {
    const mmu = this.mmu
    const lockless = mmu.agingLockless === true
    return {
      unmapGfnRange: (asId, slot, s, e) => {
        this.mmuLock.assertHeld('write')
        return this.mmu.unmapGfnRange(asId, slot, s, e)
      },
      // The optional handlers are always present (undefined when the strategy has none): one
      // hidden class for every VM's listener, which the notifier reads on every event.
      unmapGfnRangeOp:
        mmu.unmapGfnRangeOp === undefined
          ? undefined
          : function* (this: Vm, asId: number, slot: Memslot, s: number, e: number, opts: { mayBlock: boolean }): KernelOp<boolean> {
              this.mmuLock.assertHeld('write')
              const flush = yield* mmu.unmapGfnRangeOp!(asId, slot, s, e, opts.mayBlock)
              this.mmuLock.assertHeld('write')
              return flush
            }.bind(this),
      mmuWriteLock: () => this.mmuLock.writeLock(),
      mmuWriteUnlock: () => {
        this.mmuLock.writeUnlock()
      },
      // CONFIG_KVM_MMU_LOCKLESS_AGING: range->lockless, no mmu_lock around the aging handlers.
      agingLockless: lockless,
      ageGfnRange: (asId, slot, s, e) => {
        if (!lockless) this.mmuLock.assertHeld('write')
        return this.mmu.ageGfnRange(asId, slot, s, e)
      },
      testAgeGfn: (asId, slot, s, e) => {
        if (!lockless) this.mmuLock.assertHeld('write')
        return this.mmu.testAgeGfn(asId, slot, s, e)
      },
      ageGfnRangeOp:
        mmu.ageGfnRangeOp === undefined
          ? undefined
          : function* (this: Vm, asId: number, slot: Memslot, s: number, e: number): KernelOp<boolean> {
              if (!lockless) this.mmuLock.assertHeld('write')
              return yield* mmu.ageGfnRangeOp!(asId, slot, s, e)
            }.bind(this),
      testAgeGfnOp:
        mmu.testAgeGfnOp === undefined
          ? undefined
          : function* (this: Vm, asId: number, slot: Memslot, s: number, e: number): KernelOp<boolean> {
              if (!lockless) this.mmuLock.assertHeld('write')
              return yield* mmu.testAgeGfnOp!(asId, slot, s, e)
            }.bind(this),
      flushRemoteTlbs: () => {
        this.flushRemoteTlbs()
      },
    }
  }

  // ------------------------------------------------------------------ kernel threads and timers

  private timerQueue: TimerQueue | null = null

  /**
   * The VM's timers (`schedule_timeout()` for its kernel threads, e.g. the MMU's
   * `kvm-nx-lpage-recovery` task), created on first use so VMs without timed threads schedule
   * exactly as before.
   */
  get timers(): TimerQueue {
    this.timerQueue ??= new TimerQueue(this.sched, 'vm-timers')
    return this.timerQueue
  }

  /**
   * Start a per-VM kernel thread (a vhost task / kthread such as `kvm-nx-lpage-recovery`) as a
   * daemon of the scheduler: it does not keep {@link run} going once the guests are done (see
   * `SpawnOptions.daemon`). Whoever starts it must stop it before the VM is destroyed.
   */
  spawnKernelThread<R>(name: string, fn: () => KernelOp<R>): Thread<R> {
    return this.sched.spawn(name, fn, { daemon: true })
  }

  // ------------------------------------------------------------------ SMM

  /**
   * `kvm_smm_changed(vcpu, entering_smm)` (arch/x86/kvm/smm.c): set or clear HF_SMM_MASK, which
   * selects the vCPU's memslot address space (`kvm_arch_vcpu_memslots_id()`: 1 in SMM, 0
   * otherwise), then `kvm_mmu_reset_context()`: the MMU role's `smm` bit changed, so the vCPU's
   * roots are unloaded and the next entry loads (or reuses) a root of the new role. Only the MMU
   * side of SMM is modelled (no SMRAM state save, no RSM emulation); the core's emulator keeps
   * using address space 0. Call it on the vCPU's own thread or while the vCPU is not running.
   */
  *kvmSmmChanged(vcpu: KvmVcpu, enteringSmm: boolean): KernelOp {
    vcpu.asId = enteringSmm ? 1 : 0
    yield* this.mmu.resetContext(vcpu)
  }

  /**
   * KVM_SET_VCPU_EVENTS with `KVM_VCPUEVENT_VALID_SMM` from userspace, while the vCPU is not
   * running (`kvm_vcpu_ioctl_x86_set_vcpu_events`): if `smi.smm` differs from the vCPU's state,
   * {@link kvmSmmChanged}. Strategies derive the root role's `smm` bit from `vcpu.asId`.
   */
  setVcpuSmm(cpu: number, smm: boolean): void {
    const v = this.vcpus[cpu]
    if (v === undefined) throw new KvmError('EINVAL', `no vCPU ${String(cpu)}; the VM has ${String(this.vcpus.length)}`)
    if ((v.asId === 1) === smm) return
    this.runKernel(`vcpu${String(cpu)}:set_vcpu_events`, () => this.kvmSmmChanged(v, smm))
  }

  // ------------------------------------------------------------------ running guests

  /** Start a guest program on vCPU `cpu` (its main program; interrupts use `vm.idt`). */
  spawnGuest(cpu: number, program: GuestProgram): void {
    const v = this.vcpus[cpu]
    if (v === undefined) throw new KvmError('EINVAL', `no vCPU ${String(cpu)}; the VM has ${String(this.vcpus.length)}`)
    v.start(program)
  }

  /** KVM_RUN on every started vCPU until their programs finish (or `until` simulated ns). */
  run(options: { until?: number; maxSteps?: number } = {}): RunResult {
    const r = this.sched.run(options)
    for (const t of this.sched.allThreads) {
      if (t.state === 'failed') throw t.error
    }
    return r
  }

  /**
   * KVM_GET_DIRTY_LOG (kvm_get_dirty_log_protect): copy the slot's bitmap; unless manual-protect
   * is on, clear it and have the MMU write-protect the harvested pages again under mmu_lock,
   * then flush remote TLBs.
   */
  getDirtyLog(asId: number, slotId: number): Uint32Array {
    const r = this.memslots.getDirtyLog(asId, slotId)
    this.reprotect(r.masks, r.flush)
    return r.bitmap
  }

  /** KVM_CLEAR_DIRTY_LOG (manual protect): clear the given bits and re-protect those pages. */
  clearDirtyLog(asId: number, slotId: number, firstPage: number, numPages: number, bitmap: Uint32Array): void {
    const r = this.memslots.clearDirtyLog(asId, slotId, firstPage, numPages, bitmap)
    this.reprotect(r.masks, r.flush)
  }

  private reprotect(masks: readonly DirtyLogMask[], flush: boolean): void {
    if (masks.length === 0 && !flush) return
    this.runKernel('dirty_log_protect', function* (this: Vm): KernelOp {
      yield* this.mmuLock.writeLock()
      try {
        for (const m of masks) this.mmu.logDirtyPtMasked(m.slot, m.gfnOffset, m.lo, m.hi)
      } finally {
        this.mmuLock.writeUnlock()
      }
      if (flush) this.flushRemoteTlbs()
    }.bind(this))
  }

  /** Look up the memslot of `gfn` in address space `asId`. */
  gfnToMemslot(asId: number, gfn: number): Memslot | null {
    return this.memslots.gfnToMemslot(asId, gfn)
  }

  /** Tear the VM down: the MMU frees everything; then no MMU page may remain (asserted). */
  destroy(): void {
    if (this.destroyed) return
    for (const v of this.vcpus) {
      this.runKernel(`vcpu${String(v.id)}:destroy`, () => this.mmu.unload(v))
    }
    this.runKernel('vm:destroy', () => this.mmu.destroy())
    this.runKernel('rcu_barrier', () => this.rcu.barrier())
    this.host.unregisterNotifier(this.notifier)
    this.destroyed = true
    if (this.mmuPagesLive !== 0) {
      throw new KvmError('EBUSY', `VM destroyed with ${String(this.mmuPagesLive)} MMU page tables still allocated: the strategy leaked them`)
    }
    // The VM owns its host memory: recycle its storage for the next VM (a fresh one costs the OS
    // a page fault per 4 KiB touched). Counters and stats are untouched.
    this.host.mem.releaseStorage()
  }
}
