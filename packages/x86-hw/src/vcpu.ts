import {
  ACC_FETCH,
  ACC_READ,
  ACC_WRITE,
  type AccessKind,
  EXIT_CR_ACCESS,
  EXIT_INVLPG,
  EXIT_INVPCID,
  EXIT_MSR_WRITE,
  EXIT_PF,
} from './bits.ts'
import {
  C_ACCESSES,
  C_AD_WRITES,
  C_CR3_WRITES,
  C_DIRTY_REWALKS,
  C_EXIT_CR,
  C_EXIT_EPT_MISCONFIG,
  C_EXIT_EPT_VIOLATION,
  C_EXIT_INVLPG,
  C_EXIT_INVPCID,
  C_EXIT_MSR,
  C_EXIT_NPF,
  C_EXIT_PF,
  C_EXITS,
  C_FETCHES,
  C_GP,
  C_GUEST_PF,
  C_INVLPG,
  C_INVPCID,
  C_MEM_REFS,
  C_PSC_HITS,
  C_READS,
  C_TLB_FLUSHES,
  C_TLB_HIT_4K,
  C_TLB_MISS,
  C_WALK_RESTARTS,
  C_WALKS,
  C_WRITES,
  COUNTER_COUNT,
} from './counters.ts'
import {
  CR0_PE,
  CR0_PG,
  CR0_WP,
  CR4_LA57,
  CR4_PAE,
  CR4_PCIDE,
  CR4_PGE,
  CR4_PKE,
  CR4_PKS,
  CR4_PSE,
  CR4_SMAP,
  CR4_SMEP,
  type CpuFeatures,
  CpuState,
  EFER_LMA,
  EFER_LME,
  EFER_NXE,
  makeFeatures,
  PAGING_NONE,
  PagingContext,
  permIndex,
  rightsFault,
} from './cpu-state.ts'
import { MmusimError } from './errors.ts'
import {
  type GuestOp,
  OP_BATCH,
  OP_CLAC,
  OP_CMPXCHG64,
  OP_FETCH,
  OP_INVLPG,
  OP_INVPCID,
  OP_MOV_CR0,
  OP_MOV_CR3,
  OP_MOV_CR4,
  OP_READ,
  OP_READ64,
  OP_SET_CPL,
  OP_STAC,
  OP_WRITE,
  OP_WRITE64,
  OP_WRMSR_EFER,
  OP_WRPKRU,
  RES_GP,
  RES_OK,
  RES_PF,
} from './isa.ts'
import type { PhysMem } from './phys-mem.ts'
import { PagingStructureCache } from './psc.ts'
import { Tlb, type TlbConfig, TLBF_DIRTY, TLBF_HOSTW, TLBF_HOSTX, TLBF_PKEY_SHIFT, TLBF_RW, TLBF_US, TLBF_XD } from './tlb.ts'
import { type NestedTranslator, walk, walkPagingOff } from './walk.ts'
import { WALK_GP, WALK_OK, WALK_PF, WalkResult } from './walk-result.ts'

/** Hardware modes a hypervisor configures (ARCHITECTURE.md "vCPU execution"). */
export const MODE_BARE = 0
/** Hardware walks the host-format shadow table whose root the MMU supplies; #PF is intercepted. */
export const MODE_SHADOW = 1
/** 2-D walk through the EPT/NPT root the MMU supplies. */
export const MODE_TDP = 2
export type HwMode = 0 | 1 | 2

/** Outcome of executing one op. */
export const EXEC_OK = 0
/** #PF delivered to the guest (CR2 and error code in the op). */
export const EXEC_PF = 1
export const EXEC_GP = 2
/** VM exit: details in `vcpu.exit`; the op did not complete. */
export const EXEC_EXIT = 3
/** The op is for the machine/run loop (PAUSE, IPI, WORK, HALT), not the processor. */
export const EXEC_MACHINE = 4
export type ExecStatus = 0 | 1 | 2 | 3 | 4

/** Intercept controls (VMCS execution controls / VMCB intercepts) the hypervisor sets. */
export const IC_PF = 1 << 0
export const IC_CR0 = 1 << 1
export const IC_CR3 = 1 << 2
export const IC_CR4 = 1 << 3
export const IC_EFER = 1 << 4
export const IC_INVLPG = 1 << 5
export const IC_INVPCID = 1 << 6

/** What a VM exit reports (the VMCS exit fields / VMCB EXITINFO). Reused per vCPU. */
export class VmExit {
  /** EXIT_* reason. */
  reason = 0
  /** EPT violation exit qualification; for CR accesses the CR number. */
  qual = 0
  /** Faulting guest-physical address (EPT/NPT). */
  gpa = 0
  /** Guest linear address (EPT violation GLA, or the #PF address of an intercepted #PF = CR2). */
  gla = 0
  /** Error code of an intercepted #PF. */
  errorCode = 0
  /** NPF EXITINFO1 halves. */
  info1Lo = 0
  info1Hi = 0
  /** Access kind that caused a memory exit. */
  kind: AccessKind = 0
}

/** Options of a {@link Vcpu}. */
export interface VcpuOptions {
  id?: number
  features?: Partial<CpuFeatures>
  /** TLB geometry. */
  tlb?: Partial<TlbConfig>
  /** Enable the paging-structure caches (1-D walks only). @default false */
  psc?: boolean
}

/**
 * One logical processor: architectural state, TLB (and optional paging-structure caches),
 * hardware counters, and the entry points that run guest instructions in bare, shadow or TDP
 * hardware mode. Every outcome is a value: completed, #PF to the guest, #GP, or a VM exit with
 * what real hardware reports. Nothing is thrown for guest input.
 */
export class Vcpu {
  readonly id: number
  readonly features: CpuFeatures
  /** The guest's architectural state. */
  readonly state = new CpuState()
  /** Paging context derived from the guest state. */
  readonly ctx: PagingContext
  /** In shadow mode: the control state hardware actually runs with (walks the shadow table). */
  readonly hwState = new CpuState()
  readonly hwCtx: PagingContext
  readonly tlb: Tlb
  readonly psc: PagingStructureCache | null
  readonly res = new WalkResult()
  readonly exit = new VmExit()
  readonly counters = new Float64Array(COUNTER_COUNT)
  /** Memory the processor accesses: guest-physical in bare mode, host-physical otherwise. */
  mem: PhysMem
  mode: HwMode = MODE_BARE
  /** Intercept controls (IC_*). */
  intercepts = 0
  /** TLB tag of the current hardware context (VPID and EPTP); 0 on bare metal. */
  asid = 0
  /** Nested translator in TDP mode. */
  nested: NestedTranslator | null = null
  /** Levels of the shadow table in shadow mode. */
  shadowLevels: 4 | 5 = 4
  /** Counter index of the last access's TLB hit (by page size), or -1 when it walked or failed. */
  lastHitCounter = -1
  /** The paging context hardware walks with (guest ctx, or hwCtx in shadow mode). */
  private walkCtx: PagingContext

  constructor(mem: PhysMem, options: VcpuOptions = {}) {
    this.id = options.id ?? 0
    this.features = makeFeatures(options.features)
    this.mem = mem
    this.ctx = new PagingContext(this.features)
    this.hwCtx = new PagingContext(this.features)
    this.ctx.update(this.state)
    this.walkCtx = this.ctx
    this.tlb = new Tlb(options.tlb)
    this.psc = options.psc === true ? new PagingStructureCache() : null
  }

  // ------------------------------------------------------------------ hypervisor side

  /** Bare metal: guest paging only, no intercepts. */
  setBareMode(mem: PhysMem): void {
    this.mem = mem
    this.mode = MODE_BARE
    this.nested = null
    this.intercepts = 0
    this.asid = 0
    this.walkCtx = this.ctx
    this.flushAll()
  }

  /**
   * Shadow paging: the hardware walks a host-format table (`root`, 4 or 5 levels) in host memory
   * with CR0.WP=1 and EFER.NXE=1 (KVM runs shadow guests that way and emulates the guest's WP=0),
   * the guest's SMEP/SMAP/PGE/PCIDE, and the guest's CPL/AC. #PF is intercepted.
   */
  setShadowMode(hostMem: PhysMem, asid: number, levels: 4 | 5): void {
    this.mem = hostMem
    this.mode = MODE_SHADOW
    this.nested = null
    this.asid = asid
    this.shadowLevels = levels
    this.intercepts = IC_PF | IC_CR0 | IC_CR3 | IC_CR4 | IC_EFER | IC_INVLPG | IC_INVPCID
    this.walkCtx = this.hwCtx
    this.syncHwState()
  }

  /** Load the shadow root (the VMCS GUEST_CR3 under shadow paging). Does not flush: KVM flushes explicitly. */
  loadShadowRoot(rootHpa: number): void {
    this.hwState.cr3 = rootHpa + (this.ctx.pcide ? this.ctx.pcid : 0)
    this.hwCtx.update(this.hwState)
  }

  /** TDP: 2-D walks through `nested`; TLB entries tagged with `asid` (VPID+EPTP). */
  setTdpMode(hostMem: PhysMem, nested: NestedTranslator, asid: number): void {
    this.mem = hostMem
    this.mode = MODE_TDP
    this.nested = nested
    this.asid = asid
    this.intercepts = IC_CR0 | IC_CR4 | IC_EFER
    this.walkCtx = this.ctx
  }

  /** Switch the nested root (a new EPTP / nCR3) without flushing. */
  setNested(nested: NestedTranslator, asid: number): void {
    this.nested = nested
    this.asid = asid
  }

  /** Recompute the shadow-mode hardware control state from the guest's. */
  private syncHwState(): void {
    const g = this.state
    const h = this.hwState
    h.cr0 = CR0_PG | CR0_PE | CR0_WP
    h.cr4 = CR4_PAE | (this.shadowLevels === 5 ? CR4_LA57 : 0) | (g.cr4 & (CR4_SMEP | CR4_SMAP | CR4_PGE | CR4_PCIDE | CR4_PKE))
    h.efer = EFER_LME | EFER_LMA | EFER_NXE
    const base = Math.floor(h.cr3 / 4096) * 4096
    h.cr3 = base + (this.ctx.pcide ? this.ctx.pcid : 0)
    this.hwCtx.update(h)
  }

  /** Flush every TLB/PSC entry of this vCPU (all tags). */
  flushAll(): void {
    this.tlb.flushAll()
    this.psc?.invalidateAll()
    this.counters[C_TLB_FLUSHES]!++
  }

  /** Flush every entry of one hardware context (INVVPID single-context / INVEPT single-context). */
  flushAsid(asid: number): void {
    this.tlb.flushAsid(asid)
    this.psc?.invalidateAsid(asid)
    this.counters[C_TLB_FLUSHES]!++
  }

  /** Flush the current context (KVM's kvm_vcpu_flush_tlb_current()). */
  flushCurrent(): void {
    this.flushAsid(this.asid)
  }

  /** Flush one linear address in the current context (INVVPID individual-address; KVM's flush_tlb_gva). */
  flushGva(la: number): void {
    this.tlb.invlpg(this.asid, this.walkCtx.pcid, la)
    this.psc?.invalidatePcid(this.asid, this.walkCtx.pcid)
  }

  // ------------------------------------------------------------------ accesses

  /**
   * Translate one access. Returns an ExecStatus; on EXEC_OK `res.pa` holds the physical address
   * (host-physical under shadow/TDP) and `res.gpa` the guest-physical one.
   *
   * Only the TLB-hit path is here, kept small so that V8 inlines it into batch loops
   * ({@link accessMany}, {@link runBatch}); misses and refused hits go out of line.
   */
  access(la: number, kind: AccessKind, implicit: boolean): ExecStatus {
    const c = this.counters
    c[C_ACCESSES]!++
    this.lastHitCounter = -1
    const ctx = this.walkCtx
    if (ctx.mode === PAGING_NONE) return this.walkAndFill(la, kind, implicit)
    const tlb = this.tlb
    const i = tlb.lookup(this.asid, ctx.pcid, la)
    if (i < 0) {
      c[C_TLB_MISS]!++
      return this.walkAndFill(la, kind, implicit)
    }
    const fl = tlb.flags[i]!
    const state = this.state
    // Rights from the precomputed bitmap (KVM's permission_fault()), indexed by the entry's
    // TLBF_RW | TLBF_US | TLBF_XD = fl & 7; with protection keys, the reference rightsFault().
    const denied = ctx.keys
      ? this.keyedRightsFault(fl, kind, implicit)
      : (ctx.perm[permIndex(kind, state.cpl === 3 && !implicit, !implicit && state.ac)]! >>> (fl & 7)) & 1
    if (
      denied !== 0 ||
      (kind === ACC_WRITE && (fl & (TLBF_DIRTY | TLBF_HOSTW)) !== (TLBF_DIRTY | TLBF_HOSTW)) ||
      (kind === ACC_FETCH && (fl & TLBF_HOSTX) === 0)
    ) {
      return this.rewalk(la, kind, implicit, fl)
    }
    // Offset in the page: `la & (size - 1)` is exact for signed la (bitwise ops see its low 32 bits).
    const off = la & (tlb.pageSize[i]! - 1)
    const res = this.res
    res.pa = tlb.base[i]! + off
    res.gpa = tlb.gpaBase[i]! + off
    res.memRefs = 0
    res.adWrites = 0
    const ctr = C_TLB_HIT_4K - 1 + tlb.level[i]! // C_TLB_HIT_4K, _2M, _1G are consecutive, by level
    c[ctr]!++
    this.lastHitCounter = ctr
    return EXEC_OK
  }

  /** {@link rightsFault} for a TLB entry's flags, when protection keys apply. */
  private keyedRightsFault(fl: number, kind: AccessKind, implicit: boolean): number {
    const state = this.state
    return rightsFault(
      this.walkCtx, state, kind, state.cpl === 3 && !implicit, implicit,
      fl & TLBF_RW ? 1 : 0, fl & TLBF_US ? 1 : 0, fl & TLBF_XD ? 1 : 0, (fl >>> TLBF_PKEY_SHIFT) & 15,
    )
  }

  /**
   * A cached entry that does not allow the access: hardware re-walks (to set D, or to see an
   * upgraded entry) rather than fault from stale rights — the fresh-walk outcome.
   */
  private rewalk(la: number, kind: AccessKind, implicit: boolean, fl: number): ExecStatus {
    if (kind === ACC_WRITE && (fl & TLBF_DIRTY) === 0) this.counters[C_DIRTY_REWALKS]!++
    this.tlb.invlpg(this.asid, this.walkCtx.pcid, la)
    return this.walkAndFill(la, kind, implicit)
  }

  private walkAndFill(la: number, kind: AccessKind, implicit: boolean): ExecStatus {
    const c = this.counters
    const ctx = this.walkCtx
    const res = this.res
    const state = this.state
    c[C_WALKS]!++
    let st
    const psc = this.psc
    if (ctx.mode === PAGING_NONE) st = walkPagingOff(la, kind, this.nested, res)
    else if (psc !== null && this.nested === null && psc.lookup(this.asid, ctx.pcid, la)) {
      c[C_PSC_HITS]!++
      st = walk(this.mem, ctx, state, la, kind, implicit, null, res, psc.startLevel, psc.startTable, psc.startRw, psc.startUs, psc.startXd)
    } else {
      // Every argument given (start at CR3 with full rights): no default-parameter handling per walk.
      st = walk(this.mem, ctx, state, la, kind, implicit, this.nested, res, 0, 0, 1, 1, 0)
    }
    c[C_MEM_REFS]! += res.memRefs
    c[C_AD_WRITES]! += res.adWrites
    c[C_WALK_RESTARTS]! += res.restarts
    if (st === WALK_OK) {
      if (ctx.mode !== PAGING_NONE) {
        this.tlb.insert(this.asid, ctx.pcid, la, res, res.nestedLevel)
        if (psc !== null && this.nested === null) psc.fill(this.asid, ctx.pcid, la, res, ctx)
      }
      return EXEC_OK
    }
    if (st === WALK_PF) {
      if ((this.intercepts & IC_PF) !== 0) {
        const e = this.exit
        e.reason = EXIT_PF
        e.errorCode = res.errorCode
        e.gla = la
        e.kind = kind
        c[C_EXITS]!++
        c[C_EXIT_PF]!++
        return EXEC_EXIT
      }
      state.cr2 = la
      c[C_GUEST_PF]!++
      return EXEC_PF
    }
    if (st === WALK_GP) {
      c[C_GP]!++
      return EXEC_GP
    }
    // WALK_EXIT: nested paging fault.
    const e = this.exit
    e.reason = res.exitReason
    e.qual = res.exitQual
    e.gpa = res.exitGpa
    e.gla = la
    e.info1Lo = res.exitInfo1Lo
    e.info1Hi = res.exitInfo1Hi
    e.kind = kind
    c[C_EXITS]!++
    c[res.exitReason === 48 ? C_EXIT_EPT_VIOLATION : res.exitReason === 49 ? C_EXIT_EPT_MISCONFIG : C_EXIT_NPF]!++
    return EXEC_EXIT
  }

  /**
   * Run a batch of 4-byte data accesses (reads store the value read into `values[i]`, writes store
   * `values[i]`) from `op.batchStart` to `op.batchEnd`. Stops at the first #PF/#GP/exit and sets
   * `op.index` to that element (the caller resumes from there); `op.index = batchEnd` when done.
   */
  runBatch(op: GuestOp): ExecStatus {
    const b = op.batch
    if (b === null) return EXEC_GP
    const { addrs, kinds, values } = b
    const end = op.batchEnd
    const mem = this.mem
    const c = this.counters
    const res = this.res
    // A repeat of the last TLB hit (same 4 KiB page, same kind) hits the same entry with the same
    // rights decision: nothing in a batch changes the TLB or the control state between two hits
    // (hits do not touch replacement state), so it is counted as a hit without the lookup. This
    // is what makes page-sized loops (a guest clearing a page) cheap; counters stay exact.
    let hitVpn = Number.NaN
    let hitKind = -1
    let hitPa = 0
    let hitGpa = 0
    let hitCtr = 0
    for (let i = op.batchStart; i < end; i++) {
      const kind = kinds[i]! as AccessKind
      const la = addrs[i]!
      const vpn = Math.floor(la * (1 / 4096)) // exact: a power-of-two scaling of a safe integer
      let pa: number
      if (vpn === hitVpn && kind === hitKind) {
        const off = la & 0xfff
        pa = hitPa + off
        res.pa = pa
        res.gpa = hitGpa + off
        res.memRefs = 0
        res.adWrites = 0
        c[C_ACCESSES]!++
        c[hitCtr]!++
      } else {
        const st = this.access(la, kind, false)
        if (st !== EXEC_OK) {
          op.index = i
          return this.finishFault(op, st)
        }
        pa = res.pa
        if (this.lastHitCounter >= 0) {
          hitVpn = vpn
          hitKind = kind
          hitPa = pa - (la & 0xfff)
          hitGpa = res.gpa - (la & 0xfff)
          hitCtr = this.lastHitCounter
        } else hitVpn = Number.NaN
      }
      if (kind === ACC_WRITE) {
        mem.write32(pa, values[i]!)
        c[C_WRITES]!++
      } else {
        if (kind === ACC_READ) values[i] = mem.read32(pa)
        c[kind === ACC_READ ? C_READS : C_FETCHES]!++
      }
      op.pa = pa
    }
    op.index = end
    op.status = RES_OK
    return EXEC_OK
  }

  /** Translate-and-access entry point for many addresses (benchmarks, replay): physical addresses into `outPa`. Returns the index where it stopped. */
  accessMany(las: Float64Array, kinds: Uint8Array, count: number, outPa: Float64Array): number {
    for (let i = 0; i < count; i++) {
      if (this.access(las[i]!, kinds[i]! as AccessKind, false) !== EXEC_OK) return i
      outPa[i] = this.res.pa
    }
    return count
  }

  private finishFault(op: GuestOp, st: ExecStatus): ExecStatus {
    if (st === EXEC_PF) {
      op.status = RES_PF
      op.errorCode = this.res.errorCode
      op.cr2 = this.res.cr2
    } else if (st === EXEC_GP) op.status = RES_GP
    return st
  }

  // ------------------------------------------------------------------ instructions

  /**
   * Execute one guest op. Returns EXEC_OK/PF/GP with the op's result fields set, EXEC_EXIT when
   * intercepted or when the access exits (the op is left for the hypervisor to resume or
   * emulate), or EXEC_MACHINE for runner-level ops.
   */
  execute(op: GuestOp): ExecStatus {
    const k = op.kind
    if (k <= OP_CMPXCHG64) return this.execMemory(op)
    if (k === OP_BATCH) return this.runBatch(op)
    const ic = this.intercepts
    let st: ExecStatus
    switch (k) {
      case OP_MOV_CR0:
        if ((ic & IC_CR0) !== 0) return this.insnExit(EXIT_CR_ACCESS, 0, C_EXIT_CR)
        st = this.setCr0(op.lo)
        break
      case OP_MOV_CR3:
        if ((ic & IC_CR3) !== 0) return this.insnExit(EXIT_CR_ACCESS, 3, C_EXIT_CR)
        st = this.setCr3(op.lo, op.noFlush)
        break
      case OP_MOV_CR4:
        if ((ic & IC_CR4) !== 0) return this.insnExit(EXIT_CR_ACCESS, 4, C_EXIT_CR)
        st = this.setCr4(op.lo)
        break
      case OP_WRMSR_EFER:
        if ((ic & IC_EFER) !== 0) return this.insnExit(EXIT_MSR_WRITE, 0, C_EXIT_MSR)
        st = this.setEfer(op.lo)
        break
      case OP_INVLPG:
        if ((ic & IC_INVLPG) !== 0) {
          this.exit.gla = op.addr
          return this.insnExit(EXIT_INVLPG, 0, C_EXIT_INVLPG)
        }
        st = this.invlpg(op.addr)
        break
      case OP_INVPCID:
        if ((ic & IC_INVPCID) !== 0) return this.insnExit(EXIT_INVPCID, op.invpcidType, C_EXIT_INVPCID)
        st = this.invpcid(op.invpcidType, op.pcid, op.addr)
        break
      case OP_WRPKRU:
        if ((this.state.cr4 & CR4_PKE) === 0) st = EXEC_GP
        else {
          this.state.pkru = op.lo >>> 0
          st = EXEC_OK
        }
        break
      case OP_STAC:
      case OP_CLAC:
        if (!this.features.smap) st = EXEC_GP
        else {
          this.state.ac = k === OP_STAC
          st = EXEC_OK
        }
        break
      case OP_SET_CPL:
        this.state.cpl = op.lo & 3
        st = EXEC_OK
        break
      default:
        return EXEC_MACHINE
    }
    op.status = st === EXEC_OK ? RES_OK : RES_GP
    return st
  }

  private insnExit(reason: number, qual: number, counter: number): ExecStatus {
    this.exit.reason = reason
    this.exit.qual = qual
    this.counters[C_EXITS]!++
    this.counters[counter]!++
    return EXEC_EXIT
  }

  private execMemory(op: GuestOp): ExecStatus {
    const k = op.kind
    const kind: AccessKind = k === OP_FETCH ? ACC_FETCH : k === OP_READ || k === OP_READ64 ? ACC_READ : ACC_WRITE
    const st = this.access(op.addr, kind, op.implicit)
    if (st !== EXEC_OK) return this.finishFault(op, st)
    const pa = this.res.pa
    const mem = this.mem
    const c = this.counters
    op.pa = pa
    switch (k) {
      case OP_READ:
        op.valueLo = mem.read32(pa)
        c[C_READS]!++
        break
      case OP_FETCH:
        op.valueLo = mem.read32(pa)
        c[C_FETCHES]!++
        break
      case OP_READ64:
        op.valueLo = mem.read32(pa)
        op.valueHi = mem.read32(pa + 4)
        c[C_READS]!++
        break
      case OP_WRITE:
        mem.write32(pa, op.lo >>> 0)
        c[C_WRITES]!++
        break
      case OP_WRITE64:
        mem.write64(pa, op.lo >>> 0, op.hi >>> 0)
        c[C_WRITES]!++
        break
      default: {
        // CMPXCHG8B: locked; always a write access (the processor writes back the old value on failure).
        op.valueLo = mem.read32(pa)
        op.valueHi = mem.read32(pa + 4)
        mem.cmpxchg64(pa, op.cmpLo, op.cmpHi, op.lo, op.hi)
        c[C_WRITES]!++
      }
    }
    op.status = RES_OK
    return EXEC_OK
  }

  /**
   * MOV to CR0 with its architectural checks and TLB effects (SDM 2.5, 4.10.4.1). Used natively and
   * by a hypervisor emulating an intercepted write. Returns EXEC_OK or EXEC_GP.
   */
  setCr0(value: number): ExecStatus {
    const s = this.state
    const v = value >>> 0
    if ((v & CR0_PG) !== 0 && (v & CR0_PE) === 0) return this.gp()
    if ((v & CR0_PG) !== 0 && (s.efer & EFER_LME) !== 0 && (s.cr4 & CR4_PAE) === 0) return this.gp()
    if ((v & CR0_PG) !== 0 && ((s.cr4 & CR4_PAE) === 0 || (s.efer & EFER_LME) === 0)) {
      throw new MmusimError(
        'UNSUPPORTED_PAGING_MODE',
        '32-bit and PAE paging are not modelled yet: set CR4.PAE and EFER.LME before CR0.PG (4-level or 5-level paging)',
      )
    }
    const old = s.cr0
    s.cr0 = v
    s.efer = (v & CR0_PG) !== 0 && (s.efer & EFER_LME) !== 0 ? s.efer | EFER_LMA : s.efer & ~EFER_LMA
    this.ctx.update(s)
    if (((old ^ v) & CR0_PG) !== 0) this.flushAsid(this.asid)
    if (this.mode === MODE_SHADOW) this.syncHwState()
    return EXEC_OK
  }

  /** MOV to CR3 (SDM 4.10.4.1): flushes non-global entries of the (new) PCID unless the no-flush hint is given with PCIDE. */
  setCr3(value: number, noFlush: boolean): ExecStatus {
    const s = this.state
    const m = this.features.maxPhyAddr
    if (value < 0 || !Number.isSafeInteger(value) || value >= 2 ** m) return this.gp()
    s.cr3 = value
    this.ctx.update(s)
    this.counters[C_CR3_WRITES]!++
    const pcid = this.ctx.pcid
    if (this.mode !== MODE_SHADOW && !(this.ctx.pcide && noFlush)) {
      this.tlb.flushPcid(this.asid, pcid)
      this.psc?.invalidatePcid(this.asid, pcid)
    }
    if (this.mode === MODE_SHADOW) this.syncHwState()
    return EXEC_OK
  }

  /** MOV to CR4 with its checks (#GP on unsupported bits, LA57 toggle in long mode, PCIDE rules) and flushes. */
  setCr4(value: number): ExecStatus {
    const s = this.state
    const f = this.features
    const v = value >>> 0
    const supported =
      CR4_PSE | CR4_PAE | CR4_PGE | (1 << 9) | (1 << 10) |
      (f.la57 ? CR4_LA57 : 0) | (f.pcid ? CR4_PCIDE : 0) | (f.smep ? CR4_SMEP : 0) | (f.smap ? CR4_SMAP : 0) |
      (f.pku ? CR4_PKE : 0) | (f.pks ? CR4_PKS : 0)
    if ((v & ~supported) !== 0) return this.gp()
    const lma = (s.efer & EFER_LMA) !== 0
    if (lma && ((v ^ s.cr4) & CR4_LA57) !== 0) return this.gp()
    if (lma && (v & CR4_PAE) === 0) return this.gp()
    if ((v & CR4_PCIDE) !== 0 && (s.cr4 & CR4_PCIDE) === 0 && (!lma || s.cr3 % 4096 !== 0)) return this.gp()
    const changed = (s.cr4 ^ v) >>> 0
    s.cr4 = v
    this.ctx.update(s)
    if ((changed & (CR4_PGE | CR4_PCIDE | CR4_PAE | CR4_SMEP | CR4_LA57 | CR4_PSE)) !== 0) this.flushAsid(this.asid)
    if (this.mode === MODE_SHADOW) this.syncHwState()
    return EXEC_OK
  }

  /** WRMSR IA32_EFER: LME cannot change while paging is on; NXE needs the feature. */
  setEfer(value: number): ExecStatus {
    const s = this.state
    const v = value >>> 0
    const allowed = EFER_LME | EFER_LMA | (this.features.nx ? EFER_NXE : 0) | 1
    if ((v & ~allowed) !== 0) return this.gp()
    if ((s.cr0 & CR0_PG) !== 0 && ((v ^ s.efer) & EFER_LME) !== 0) return this.gp()
    const changed = (s.efer ^ v) & EFER_NXE
    s.efer = (v & ~EFER_LMA) | (s.efer & EFER_LMA)
    this.ctx.update(s)
    if (changed !== 0) this.flushAsid(this.asid)
    if (this.mode === MODE_SHADOW) this.syncHwState()
    return EXEC_OK
  }

  /** INVLPG (SDM 4.10.4.1): the page in the current PCID, global entries for it, and all PSC entries of the PCID; non-canonical: no-op. */
  invlpg(la: number): ExecStatus {
    this.counters[C_INVLPG]!++
    const ctx = this.walkCtx
    if (la < -ctx.canonLimit || la >= ctx.canonLimit) return EXEC_OK
    this.tlb.invlpg(this.asid, ctx.pcid, la)
    this.psc?.invalidatePcid(this.asid, ctx.pcid)
    return EXEC_OK
  }

  /** INVPCID types 0–3 (SDM "INVPCID"). #GP for a bad type, PCID > 4095, or a non-canonical type-0 address. */
  invpcid(type: number, pcid: number, la: number): ExecStatus {
    if (!this.features.invpcid) return this.gp()
    this.counters[C_INVPCID]!++
    const asid = this.asid
    switch (type) {
      case 0:
        if (pcid < 0 || pcid > 4095 || la < -this.ctx.canonLimit || la >= this.ctx.canonLimit) return this.gp()
        this.tlb.invpcidAddress(asid, pcid, la)
        this.psc?.invalidatePcid(asid, pcid)
        return EXEC_OK
      case 1:
        if (pcid < 0 || pcid > 4095) return this.gp()
        this.tlb.flushPcid(asid, pcid)
        this.psc?.invalidatePcid(asid, pcid)
        return EXEC_OK
      case 2:
        this.tlb.flushAsid(asid)
        this.psc?.invalidateAsid(asid)
        return EXEC_OK
      case 3:
        this.tlb.flushAsidNonGlobal(asid)
        this.psc?.invalidateAsid(asid)
        return EXEC_OK
      default:
        return this.gp()
    }
  }

  private gp(): ExecStatus {
    this.counters[C_GP]!++
    return EXEC_GP
  }

  /** Counter values as an object keyed by counter name. */
  countersSnapshot(): Float64Array {
    return this.counters.slice()
  }

  /** Complete an op that the hypervisor emulated after an exit (e.g. an emulated PTE write). */
  completeOp(op: GuestOp, status: number): void {
    op.status = status
    if (op.kind === OP_BATCH && status === RES_OK) op.index = op.batchStart + 1
  }
}

export { RES_GP, RES_OK, RES_PF }
