import {
  ACC_FETCH,
  ACC_READ,
  ACC_WRITE,
  type AccessKind,
  C_ACCESSES,
  C_MEM_REFS,
  CR0_PG,
  CR0_WP,
  CR4_LA57,
  CR4_PAE,
  CR4_PCIDE,
  CR4_PGE,
  CR4_PKE,
  CR4_PSE,
  CR4_SMAP,
  CR4_SMEP,
  EFER_LMA,
  EFER_LME,
  EFER_NXE,
  EXEC_EXIT,
  EXEC_MACHINE,
  EXEC_OK,
  EXEC_PF,
  EXIT_CR_ACCESS,
  EXIT_EPT_MISCONFIG,
  EXIT_EPT_VIOLATION,
  EXIT_INVLPG,
  EXIT_INVPCID,
  EXIT_MSR_WRITE,
  EXIT_NPF,
  EXIT_PF,
  EPTQ_FETCH,
  EPTQ_GLA_FINAL,
  EPTQ_R,
  EPTQ_W,
  EPTQ_WRITE,
  EPTQ_X,
  GuestThread,
  type GuestOp,
  type GuestProgram,
  MODE_SHADOW,
  MODE_TDP,
  OP_BATCH,
  OP_CMPXCHG64,
  OP_FETCH,
  OP_HALT,
  OP_MOV_CR0,
  OP_MOV_CR3,
  OP_MOV_CR4,
  OP_PAUSE,
  OP_READ,
  OP_READ64,
  OP_SEND_IPI,
  OP_WORK,
  OP_WRITE,
  OP_WRITE64,
  OP_WRMSR_EFER,
  PFERR_I,
  PFERR_P,
  PFERR_W,
  RES_GP,
  RES_OK,
  RES_PF,
  type TlbConfig,
  Vcpu,
  walk,
  WALK_OK,
  WALK_PF,
  WalkResult,
} from '@mmusim/x86-hw'
import { KvmError } from './errors.ts'
import { GuestMemory } from './guest-memory.ts'
import { MemslotCache } from './memslot.ts'
import {
  KVM_REQ_LOAD_MMU_PGD,
  KVM_REQ_MMU_FREE_OBSOLETE_ROOTS,
  KVM_REQ_MMU_RELOAD,
  KVM_REQ_MMU_SYNC,
  KVM_REQ_TLB_FLUSH,
  KVM_REQ_TLB_FLUSH_CURRENT,
  KVM_REQ_TLB_FLUSH_GUEST,
} from './requests.ts'
import { cost, type KernelOp, type Thread, WaitQueue } from './sched/index.ts'
import { VcpuStats } from './stats.ts'
import {
  type PageFault,
  PF_PENDING,
  type RetPf,
  PFERR_GUEST_FINAL,
  PFERR_GUEST_PAGE,
  RET_PF_EMULATE,
  RET_PF_FIXED,
  RET_PF_RETRY,
  RET_PF_SPURIOUS,
  RET_PF_WRITE_PROTECTED,
} from './strategy.ts'
import type { Vm } from './vm.ts'

/** CR0 bits that define the MMU role (KVM_MMU_CR0_ROLE_BITS). */
const CR0_ROLE_BITS = CR0_PG | CR0_WP
/** CR4 bits that define the MMU role (KVM_MMU_CR4_ROLE_BITS). */
const CR4_ROLE_BITS = CR4_PSE | CR4_PAE | CR4_LA57 | CR4_SMEP | CR4_SMAP | CR4_PKE
/** EFER bits that define the MMU role (KVM_MMU_EFER_ROLE_BITS). */
const EFER_ROLE_BITS = EFER_LME | EFER_LMA | EFER_NXE

/**
 * A KVM vCPU: the x86-hw processor it runs on, the guest program it runs, its request bits,
 * stats, and the run loop (vcpu_run / vcpu_enter_guest) as a kernel thread: service requests,
 * make sure a root is loaded, run guest instructions until one exits, handle the exit (page
 * faults go to the MMU; CR/INVLPG/INVPCID/EFER writes are emulated and forwarded), repeat.
 */
export class KvmVcpu {
  readonly vm: Vm
  readonly id: number
  /** The processor. */
  readonly hw: Vcpu
  /** The guest side: program, interrupt handlers, pending IPIs. */
  readonly guest: GuestThread
  readonly stats = new VcpuStats()
  /** Pending KVM_REQ_* bits. */
  requests = 0
  /** Per-vCPU state owned by the MMU strategy (its `kvm_mmu` context). */
  mmuState: unknown = null
  /** kvm_vcpu_gfn_to_memslot's last-used-slot cache. */
  readonly memslotCache = new MemslotCache()
  /** Guest memory view for this vCPU's address space (SMM would switch asId). */
  readonly guestMem: GuestMemory
  /** Address space (0 normal, 1 SMM). */
  asId = 0
  /** The run-loop thread once started. */
  thread: Thread | null = null
  private readonly haltWq: WaitQueue
  private readonly emuRes = new WalkResult()
  private injectedPf = false
  private injectedAddr = 0
  private injectedCode = 0
  private readonly fault: PageFault = { addr: 0, errorCode: 0, kind: 0, gla: 0, exitReason: 0 }
  /** Page faults go through the strategy's pageFaultInline (it has one, and the scheduler's fast path is on). */
  private readonly inlineFaults: boolean

  constructor(vm: Vm, id: number, tlb: Partial<TlbConfig> | undefined) {
    this.vm = vm
    this.id = id
    this.hw = new Vcpu(vm.host.mem, { id, features: vm.features, tlb })
    this.guest = new GuestThread(id)
    this.guestMem = new GuestMemory(vm.memslots, vm.host, 0)
    this.haltWq = new WaitQueue(vm.sched, `vcpu${String(id)}:halt`)
    const mode = vm.strategy.capabilities.hwMode
    // Shadow vCPUs walk host-format shadow tables; TDP vCPUs get their nested root at load time.
    if (mode === 'shadow') this.hw.setShadowMode(vm.host.mem, 1, 4)
    this.inlineFaults = vm.mmu.pageFaultInline !== undefined && vm.sched.fastPathEnabled
  }

  /** kvm_make_request(). */
  makeRequest(req: number): void {
    this.requests |= req
  }

  /** Whether `req` is pending. */
  hasRequest(req: number): boolean {
    return (this.requests & req) !== 0
  }

  /**
   * Inject a #PF into the guest (kvm_inject_page_fault / kvm_inject_emulated_page_fault): the
   * current instruction completes with #PF(errorCode) at `addr` as if the hardware had delivered it.
   */
  injectPageFault(addr: number, errorCode: number): void {
    this.injectedPf = true
    this.injectedAddr = addr
    this.injectedCode = errorCode
  }

  /** Deliver an IPI to this vCPU (the guest's interrupt handler runs at its next op boundary). */
  deliverInterrupt(vector: number): void {
    this.guest.raise(vector)
    this.haltWq.wakeAll()
  }

  /** Start the vCPU running `program` (KVM_RUN). */
  start(program: GuestProgram): void {
    this.guest.start(program, this.vm.idt)
    this.thread = this.vm.sched.spawn(`vcpu${String(this.id)}`, () => this.run(), { startTime: this.vm.sched.now })
  }

  // ------------------------------------------------------------------ the run loop

  /** vcpu_run(): the vCPU thread. Returns when the guest program has finished. */
  *run(): KernelOp {
    const hw = this.hw
    const g = this.guest
    const vm = this.vm
    const sched = vm.sched
    const costs = sched.costs
    let op: GuestOp | null = null
    // `if (!sched.tryAdvance(x)) yield x` is `yield cost(x)` without the suspension when nothing
    // else could run in between (see Scheduler.tryAdvance).
    for (;;) {
      // vcpu_enter_guest(): requests, then kvm_mmu_reload().
      if (this.requests !== 0) yield* this.serviceRequests()
      if (!vm.mmu.hasValidRoot(this)) {
        this.stats.req_mmu_reload++
        const r = yield* vm.mmu.load(this)
        if (r < 0) throw new KvmError('EFAULT', `vCPU ${String(this.id)}: the MMU failed to load a root (errno ${String(r)})`)
        if (this.requests !== 0) continue
      }
      if (op === null) {
        op = g.next()
        if (op === null) {
          if (g.done) return
          // HLT: sleep until an interrupt arrives.
          yield* this.haltWq.waitEvent(() => g.hasPending)
          continue
        }
      }
      const accesses0 = hw.counters[C_ACCESSES]!
      const refs0 = hw.counters[C_MEM_REFS]!
      const st = hw.execute(op)
      const ns = costs.guestAccess * (hw.counters[C_ACCESSES]! - accesses0) + costs.memoryRef * (hw.counters[C_MEM_REFS]! - refs0)
      if (st === EXEC_MACHINE) {
        const mns = ns + this.machineOp(op)
        if (!sched.tryAdvance(mns)) yield cost(mns)
        op = null
        continue
      }
      if (st !== EXEC_EXIT) {
        g.lastStatus = st === EXEC_OK ? RES_OK : st === EXEC_PF ? RES_PF : RES_GP
        if (st === EXEC_PF) this.stats.pf_guest++
        op = null
        if (!sched.tryAdvance(ns)) yield cost(ns)
        continue
      }
      const ens = ns + costs.vmExitRoundTrip
      if (!sched.tryAdvance(ens)) yield cost(ens)
      this.stats.exits++
      // Page-fault exits are handled inline (handlePageFaultExit's body): the MMU's generator is
      // then the only one between this loop and the fault's yields, and none is created for the handler.
      const reason = hw.exit.reason
      let done: boolean
      if (reason === EXIT_EPT_VIOLATION || reason === EXIT_PF || reason === EXIT_NPF || reason === EXIT_EPT_MISCONFIG) {
        // A plain call when the strategy has one and nothing else runs meanwhile; otherwise the
        // fault as a kernel op, through the scheduler's call protocol (its yields resume it directly).
        const mmu = vm.mmu
        let r: RetPf
        if (this.inlineFaults) {
          const x = mmu.pageFaultInline!(this, this.pageFaultFromExit())
          r = x !== PF_PENDING ? (x as RetPf) : ((yield sched.call(mmu.pageFaultContinue!(this))) as RetPf)
        } else r = (yield sched.call(mmu.pageFault(this, this.pageFaultFromExit()))) as RetPf
        done = this.pageFaultNeedsEmulation(r) ? yield* this.emulateAccess(op) : false
      } else {
        done = yield* this.handleExit(op)
      }
      if (this.injectedPf) {
        this.injectedPf = false
        op.status = RES_PF
        op.errorCode = this.injectedCode
        op.cr2 = this.injectedAddr
        hw.state.cr2 = this.injectedAddr
        this.stats.pf_guest++
        g.lastStatus = RES_PF
        op = null
      } else if (done) {
        g.lastStatus = op.status
        op = null
      } else if (op.kind === OP_BATCH) {
        op.batchStart = op.index // resume the batch where it exited
      }
    }
  }

  /** Runner-level ops: IPIs, PAUSE, WORK, HLT. Returns the simulated ns they cost. */
  private machineOp(op: GuestOp): number {
    const g = this.guest
    op.status = RES_OK
    g.lastStatus = RES_OK
    switch (op.kind) {
      case OP_PAUSE:
        this.vm.sched.yieldHint()
        return this.vm.sched.costs.pause
      case OP_WORK:
        return op.lo
      case OP_HALT:
        g.halted = true
        return 0
      case OP_SEND_IPI:
        for (const t of op.targets) {
          const target = this.vm.vcpus[t]
          if (target === undefined) throw new KvmError('EINVAL', `vCPU ${String(this.id)} sent an IPI to vCPU ${String(t)}, which does not exist`)
          target.deliverInterrupt(op.vector)
        }
        return this.vm.sched.costs.ipiSend
      default:
        throw new KvmError('EINVAL', `vCPU ${String(this.id)}: the guest yielded an op of unknown kind ${String(op.kind)}`)
    }
  }

  /**
   * Service pending requests in vcpu_enter_guest()'s order: FREE_OBSOLETE_ROOTS, MMU_RELOAD,
   * MMU_SYNC, LOAD_MMU_PGD, TLB_FLUSH (which also satisfies FLUSH_CURRENT), then the local
   * flushes (kvm_service_local_tlb_flush_requests: CURRENT, GUEST).
   */
  *serviceRequests(): KernelOp {
    const mmu = this.vm.mmu
    if (this.takeRequest(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)) {
      this.stats.req_free_obsolete_roots++
      yield* mmu.freeObsoleteRoots(this)
    }
    if (this.takeRequest(KVM_REQ_MMU_RELOAD)) {
      yield* mmu.unload(this)
    }
    if (this.takeRequest(KVM_REQ_MMU_SYNC)) {
      this.stats.req_mmu_sync++
      yield* mmu.syncRoots(this)
    }
    if (this.takeRequest(KVM_REQ_LOAD_MMU_PGD)) this.stats.req_load_mmu_pgd++
    if (this.takeRequest(KVM_REQ_TLB_FLUSH)) {
      // kvm_vcpu_flush_tlb_all(): flushing everything covers "current" too.
      this.requests &= ~KVM_REQ_TLB_FLUSH_CURRENT
      this.stats.req_tlb_flush++
      this.stats.tlb_flush++
      this.hw.flushAll()
    }
    if (this.takeRequest(KVM_REQ_TLB_FLUSH_CURRENT)) {
      this.stats.req_tlb_flush_current++
      this.hw.flushCurrent()
    }
    if (this.takeRequest(KVM_REQ_TLB_FLUSH_GUEST)) {
      // kvm_vcpu_flush_tlb_guest(): shadow paging syncs roots first (the guest's flush is the
      // point where unsync shadow pages must be brought up to date).
      this.stats.req_tlb_flush_guest++
      this.stats.tlb_flush++
      yield* mmu.flushTlbGuest(this)
      this.hw.flushCurrent()
    }
  }

  private takeRequest(req: number): boolean {
    if ((this.requests & req) === 0) return false
    this.requests &= ~req
    return true
  }

  // ------------------------------------------------------------------ exits

  /** Handle one VM exit. Returns true when the op completed (emulated), false to re-execute it. */
  private *handleExit(op: GuestOp): KernelOp<boolean> {
    const e = this.hw.exit
    const s = this.stats
    switch (e.reason) {
      case EXIT_PF:
      case EXIT_EPT_VIOLATION:
      case EXIT_EPT_MISCONFIG:
      case EXIT_NPF:
        return yield* this.handlePageFaultExit(op)
      case EXIT_CR_ACCESS:
        s.exits_cr_access++
        s.insn_emulation++
        return yield* this.emulateCrWrite(op)
      case EXIT_MSR_WRITE:
        s.exits_msr_write++
        return yield* this.emulateEferWrite(op)
      case EXIT_INVLPG:
        s.exits_invlpg++
        s.invlpg++
        yield* this.kvmMmuInvlpg(op.addr)
        op.status = RES_OK
        return true
      case EXIT_INVPCID:
        s.exits_invpcid++
        return yield* this.handleInvpcid(op)
      default:
        throw new KvmError('EIO', `vCPU ${String(this.id)}: unhandled VM exit reason ${String(e.reason)}`)
    }
  }

  /** kvm_mmu_page_fault(): build the fault, call the MMU, act on RET_PF_* (inlined in {@link run}). */
  private *handlePageFaultExit(op: GuestOp): KernelOp<boolean> {
    const r = yield* this.vm.mmu.pageFault(this, this.pageFaultFromExit())
    return this.pageFaultNeedsEmulation(r) ? yield* this.emulateAccess(op) : false
  }

  /** kvm_mmu_page_fault()'s first part: count the exit and build the fault from it. */
  private pageFaultFromExit(): PageFault {
    const e = this.hw.exit
    const f = this.fault
    const s = this.stats
    f.exitReason = e.reason
    f.kind = e.kind
    f.gla = e.gla
    if (e.reason === EXIT_PF) {
      s.exits_pf++
      f.addr = e.gla
      f.errorCode = e.errorCode
    } else if (e.reason === EXIT_NPF) {
      s.exits_npf++
      f.addr = e.gpa
      // EXITINFO1: a #PF-style error code plus bits 32/33 (final GPA / guest page-table access).
      f.errorCode = (e.info1Lo >>> 0) + ((e.info1Hi & 1) !== 0 ? PFERR_GUEST_FINAL : 0) + ((e.info1Hi & 2) !== 0 ? PFERR_GUEST_PAGE : 0)
    } else {
      if (e.reason === EXIT_EPT_VIOLATION) s.exits_ept_violation++
      else s.exits_ept_misconfig++
      f.addr = e.gpa
      f.errorCode = e.reason === EXIT_EPT_MISCONFIG ? PFERR_P | 8 : eptQualToPferr(e.qual)
    }
    s.pf_taken++
    return f
  }

  /**
   * kvm_mmu_page_fault()'s second part: count the MMU's RET_PF_*. True when the access must be
   * emulated (the caller then runs emulateAccess); false: re-execute the op.
   */
  private pageFaultNeedsEmulation(r: RetPf): boolean {
    const s = this.stats
    switch (r) {
      case RET_PF_FIXED:
        s.pf_fixed++
        return false
      case RET_PF_SPURIOUS:
        s.pf_spurious++
        return false
      case RET_PF_RETRY:
        s.pf_retry++
        return false
      case RET_PF_EMULATE:
      case RET_PF_WRITE_PROTECTED:
        s.pf_emulate++
        s.insn_emulation++
        return true
      default:
        throw new KvmError('EIO', `vCPU ${String(this.id)}: the MMU returned ${String(r)} from pageFault; expected RET_PF_FIXED, RET_PF_SPURIOUS, RET_PF_RETRY, RET_PF_EMULATE or RET_PF_WRITE_PROTECTED`)
    }
  }

  /**
   * x86_emulate_instruction() for the memory op that faulted: translate the linear address with
   * KVM's software walk of the guest tables (gva_to_gpa), do the access on guest memory, and
   * notify the page-track hook (kvm_page_track_write → kvm_mmu_track_write) for written gfns the
   * MMU write-tracks. A guest #PF from the walk is injected. Returns true when the op completed.
   */
  private *emulateAccess(op: GuestOp): KernelOp<boolean> {
    const k = op.kind
    let la: number
    let kind: AccessKind
    let bytes = 4
    if (k === OP_BATCH) {
      const b = op.batch!
      la = b.addrs[op.index]!
      kind = b.kinds[op.index]! as AccessKind
    } else {
      la = op.addr
      kind = k === OP_FETCH ? ACC_FETCH : k === OP_READ || k === OP_READ64 ? ACC_READ : ACC_WRITE
      if (k === OP_READ64 || k === OP_WRITE64 || k === OP_CMPXCHG64) bytes = 8
    }
    const gm = this.guestMem
    const res = this.emuRes
    const st = walk(gm.host.mem, this.hw.ctx, this.hw.state, la, kind, op.implicit, gm, res)
    if (st === WALK_PF) {
      this.injectPageFault(la, res.errorCode)
      return true
    }
    if (st !== WALK_OK) {
      op.status = RES_GP
      return true
    }
    const gpa = res.gpa
    // An unbacked GPA (no memslot, or a write to a read-only one: KVM's MMIO exit to userspace,
    // which has no device model here) translates to open bus: reads all ones, writes dropped.
    const hpa = res.pa
    const mem = gm.host.mem
    if (kind === ACC_WRITE) {
      if (k === OP_BATCH) mem.write32(hpa, op.batch!.values[op.index]!)
      else if (k === OP_WRITE) mem.write32(hpa, op.lo >>> 0)
      else if (k === OP_WRITE64) mem.write64(hpa, op.lo >>> 0, op.hi >>> 0)
      else {
        op.valueLo = mem.read32(hpa)
        op.valueHi = mem.read32(hpa + 4)
        mem.cmpxchg64(hpa, op.cmpLo, op.cmpHi, op.lo, op.hi)
      }
      const gfn = Math.floor(gpa / 4096)
      // kvm_page_track_write() follows only a write that reached guest memory.
      if (hpa < mem.sizeBytes && this.vm.mmu.isWriteTracked(this.asId, gfn)) yield* this.vm.mmu.trackWrite(this, gpa, bytes)
    } else if (k === OP_BATCH) {
      op.batch!.values[op.index] = mem.read32(hpa)
    } else {
      op.valueLo = mem.read32(hpa)
      if (bytes === 8) op.valueHi = mem.read32(hpa + 4)
    }
    op.pa = hpa
    if (k === OP_BATCH) {
      // One element emulated; the rest of the batch runs natively.
      op.index++
      if (op.index < op.batchEnd) {
        op.batchStart = op.index
        return false
      }
    }
    op.status = RES_OK
    return true
  }

  /** kvm_set_cr0 / kvm_set_cr3 / kvm_set_cr4 for an intercepted MOV to CR. */
  private *emulateCrWrite(op: GuestOp): KernelOp<boolean> {
    const hw = this.hw
    const mmu = this.vm.mmu
    const tdp = hw.mode === MODE_TDP
    if (op.kind === OP_MOV_CR0) {
      const old = hw.state.cr0
      if (hw.setCr0(op.lo) !== EXEC_OK) return this.gp(op)
      const now = hw.state.cr0
      // kvm_post_set_cr0(): clearing PG flushes the guest TLB; role bits reset the MMU context
      // (with TDP a WP-only toggle only recomputes the CPU role: CR0.WP is guest-owned since 6.4).
      if (((now ^ old) & CR0_PG) !== 0 && (now & CR0_PG) === 0) this.makeRequest(KVM_REQ_TLB_FLUSH_GUEST)
      if (((now ^ old) & CR0_ROLE_BITS) !== 0 && !(tdp && ((now ^ old) & ~CR0_WP) === 0)) yield* mmu.resetContext(this)
    } else if (op.kind === OP_MOV_CR3) {
      if (!(yield* this.kvmSetCr3(op.lo, op.noFlush))) return this.gp(op)
    } else if (op.kind === OP_MOV_CR4) {
      const old = hw.state.cr4
      if (hw.setCr4(op.lo) !== EXEC_OK) return this.gp(op)
      const now = hw.state.cr4
      // kvm_post_set_cr4()
      if (((now ^ old) & CR4_ROLE_BITS) !== 0) yield* mmu.resetContext(this)
      if (!tdp && (now & CR4_PCIDE) !== 0 && (old & CR4_PCIDE) === 0) yield* mmu.unload(this)
      if (((now ^ old) & CR4_PGE) !== 0 || ((now & CR4_PCIDE) === 0 && (old & CR4_PCIDE) !== 0)) {
        this.makeRequest(KVM_REQ_TLB_FLUSH_GUEST)
      } else if (((now ^ old) & CR4_PAE) !== 0 || ((now & CR4_SMEP) !== 0 && (old & CR4_SMEP) === 0)) {
        this.makeRequest(KVM_REQ_TLB_FLUSH_CURRENT)
      }
    } else return this.gp(op)
    op.status = RES_OK
    return true
  }

  /**
   * kvm_set_cr3(): switch the MMU's root if CR3 changed (kvm_mmu_new_pgd), then, unless the
   * no-flush bit was set with PCIDE, invalidate the PCID (kvm_invalidate_pcid).
   */
  private *kvmSetCr3(value: number, noFlushHint: boolean): KernelOp<boolean> {
    const hw = this.hw
    const pcide = (hw.state.cr4 & CR4_PCIDE) !== 0
    const skipFlush = pcide && noFlushHint
    const pcid = pcide ? value % 4096 : 0
    const changed = value !== hw.state.cr3
    if (hw.setCr3(value, true) !== EXEC_OK) return false
    if (changed) yield* this.vm.mmu.newPgd(this, value)
    if (!skipFlush) yield* this.kvmInvalidatePcid(pcid)
    return true
  }

  /** kvm_invalidate_pcid(). */
  private *kvmInvalidatePcid(pcid: number): KernelOp {
    if (this.hw.mode === MODE_TDP) {
      this.makeRequest(KVM_REQ_TLB_FLUSH_GUEST)
      return
    }
    if (this.hw.ctx.pcid === pcid) {
      this.makeRequest(KVM_REQ_MMU_SYNC)
      this.makeRequest(KVM_REQ_TLB_FLUSH_CURRENT)
    }
    if ((this.hw.state.cr4 & CR4_PCIDE) !== 0) yield* this.vm.mmu.invalidatePcid(this, pcid)
  }

  /** kvm_mmu_invlpg() → kvm_mmu_invalidate_addr(): flush the hardware entry, then the MMU's roots. */
  private *kvmMmuInvlpg(gva: number): KernelOp {
    const lim = this.hw.ctx.canonLimit
    if (gva < -lim || gva >= lim) return
    this.hw.flushGva(gva)
    yield* this.vm.mmu.invalidateGva(this, gva, -1)
  }

  /** kvm_handle_invpcid(). */
  private *handleInvpcid(op: GuestOp): KernelOp<boolean> {
    const type = op.invpcidType
    const pcid = op.pcid
    if (type < 0 || type > 3 || pcid < 0 || pcid > 4095) return this.gp(op)
    switch (type) {
      case 0: {
        const lim = this.hw.ctx.canonLimit
        if (op.addr < -lim || op.addr >= lim) return this.gp(op)
        this.stats.invlpg++
        // kvm_mmu_invpcid_gva(): the hardware entry if the PCID is active, then roots with that PCID.
        if (this.hw.ctx.pcid === pcid) this.hw.flushGva(op.addr)
        else this.hw.tlb.invpcidAddress(this.hw.asid, pcid, op.addr)
        yield* this.vm.mmu.invalidateGva(this, op.addr, pcid)
        break
      }
      case 1:
        yield* this.kvmInvalidatePcid(pcid)
        break
      default:
        this.makeRequest(KVM_REQ_TLB_FLUSH_GUEST)
    }
    op.status = RES_OK
    return true
  }

  /** set_efer(): role bits changing resets the MMU context. */
  private *emulateEferWrite(op: GuestOp): KernelOp<boolean> {
    if (op.kind !== OP_WRMSR_EFER) return this.gp(op)
    const old = this.hw.state.efer
    if (this.hw.setEfer(op.lo) !== EXEC_OK) return this.gp(op)
    if (((this.hw.state.efer ^ old) & EFER_ROLE_BITS) !== 0) yield* this.vm.mmu.resetContext(this)
    op.status = RES_OK
    return true
  }

  private gp(op: GuestOp): boolean {
    op.status = RES_GP
    return true
  }

  /** Whether this vCPU runs with shadow paging. */
  get isShadow(): boolean {
    return this.hw.mode === MODE_SHADOW
  }
}

/**
 * EPT violation exit qualification → KVM's page-fault error code (handle_ept_violation):
 * W from the write bit, I from the fetch bit, P when the GPA was readable/writable/executable at
 * all, plus PFERR_GUEST_FINAL (final GPA) or PFERR_GUEST_PAGE (guest page-table access).
 */
export function eptQualToPferr(q: number): number {
  let ec = 0
  if ((q & EPTQ_WRITE) !== 0) ec |= PFERR_W
  if ((q & EPTQ_FETCH) !== 0) ec |= PFERR_I
  if ((q & (EPTQ_R | EPTQ_W | EPTQ_X)) !== 0) ec |= PFERR_P
  return ec + ((q & EPTQ_GLA_FINAL) !== 0 ? PFERR_GUEST_FINAL : PFERR_GUEST_PAGE)
}
