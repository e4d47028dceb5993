import {
  type AccessBatch,
  GuestOp,
  hex64,
  laToBigInt,
  OP_BATCH,
  OP_CLAC,
  OP_CMPXCHG64,
  OP_FETCH,
  OP_HALT,
  OP_INVLPG,
  OP_INVPCID,
  OP_MOV_CR0,
  OP_MOV_CR3,
  OP_MOV_CR4,
  OP_PAUSE,
  OP_READ,
  OP_READ64,
  OP_SEND_IPI,
  OP_SET_CPL,
  OP_STAC,
  OP_WORK,
  OP_WRITE,
  OP_WRITE64,
  OP_WRMSR_EFER,
  RES_OK,
  RES_PF,
} from '@mmusim/x86-hw'
import { GuestError } from './errors.ts'
import { handleMmFault } from './fault.ts'
import type { GuestOs } from './guest-os.ts'
import { NR_DYN_ASIDS } from './layout.ts'
import type { Mm } from './mm.ts'

/** A generator run by a vCPU: yields ops, receives RES_* statuses, returns `T`. Every kernel routine and guest program is one. */
export type Routine<T = void> = Generator<GuestOp, T, number>

/** A pending TLB-flush request on a target vCPU (Linux's `struct flush_tlb_info`). */
export interface FlushRequest {
  readonly mm: Mm
  /** First byte; `end === Infinity` means the whole address space (TLB_FLUSH_ALL). */
  readonly start: number
  readonly end: number
  /** Page size of the range (stride of INVLPG). */
  readonly stride: number
  /** The mm's TLB generation this request brings a CPU up to. */
  readonly newGen: number
  /** Targets that have not yet acknowledged. */
  pending: number
}

/** Per-vCPU counters reported in a run result. */
export interface CpuCounters {
  /** Ops this vCPU yielded (instructions and batches, including kernel ones). */
  ops: number
  /** User data accesses completed by programs (each batch element counts one). */
  accesses: number
  /** #PF handled by the guest kernel on this vCPU. */
  pageFaults: number
  /** Values read back that differ from what the program expected. */
  mismatches: number
  /** Faults outside any VMA or against its protection. */
  sigsegv: number
  /** TLB-shootdown IPIs this vCPU handled. */
  ipisHandled: number
}

const WORDS = 1024

/**
 * One vCPU as the guest kernel and its programs see it: typed accessors that fill the vCPU's
 * reusable {@link GuestOp} and yield it, so a program reads naturally (`yield* cpu.write32(va, v)`),
 * plus the kernel's per-CPU state (Linux's `cpu_tlbstate`: loaded mm, ASID slots and their TLB
 * generations, pending flush requests).
 *
 * User accessors (`read32`, `write32`, `fetch32`, `batch`) run at CPL 3 and call the guest's page
 * fault handler on #PF, then retry — demand paging is invisible to the program. A fault the kernel
 * cannot resolve is a SIGSEGV: counted, and the access reports failure. Kernel accessors
 * (`kread64`, `kwrite64`, `kcmpxchg64`, ...) run at CPL 0 and must not fault (a fault is a
 * `KERNEL_OOPS`).
 */
export class Cpu {
  readonly id: number
  readonly os: GuestOs
  /** The op of the main program. */
  readonly op: GuestOp
  /** A separate op for interrupt handlers, so a handler never clobbers the interrupted op's results. */
  readonly irqOp = new GuestOp()
  /** Result of the last 64-bit kernel read/cmpxchg: low and high halves. */
  rlo = 0
  rhi = 0
  /** The CPL this vCPU runs at (the kernel's mirror of what it set). */
  cpl = 0
  /** CR0/CR4 as last written by the kernel (Linux keeps cr4 in a per-CPU shadow too: cpu_tlbstate.cr4). */
  cr0 = 0
  cr4 = 0
  /** The user address space loaded (Linux `cpu_tlbstate.loaded_mm`); null = the kernel's init_mm. */
  loadedMm: Mm | null = null
  /** ASID slot of the loaded mm (0..NR_DYN_ASIDS-1). */
  loadedAsid = 0
  /** Per ASID slot: the mm context id cached under it (-1 none), and the TLB generation it is flushed up to. */
  readonly asidCtx = new Float64Array(NR_DYN_ASIDS).fill(-1)
  readonly asidGen = new Float64Array(NR_DYN_ASIDS)
  /** Next slot to recycle (round robin, as Linux's `next_asid`). */
  nextAsid = 0
  /** Flush requests sent to this vCPU and not yet handled. */
  readonly flushQueue: FlushRequest[] = []
  /** Counters. */
  readonly counters: CpuCounters = { ops: 0, accesses: 0, pageFaults: 0, mismatches: 0, sigsegv: 0, ipisHandled: 0 }
  /** The first few mismatches, for messages. */
  readonly mismatchLog: string[] = []
  /** Scratch batch for page-sized kernel operations (clear, copy, save, restore). */
  readonly pageBatch: AccessBatch = { addrs: new Float64Array(WORDS), kinds: new Uint8Array(WORDS), values: new Uint32Array(WORDS) }
  /** Spin budget of {@link waitUntil} (PAUSE ops). */
  spinLimit = 50_000_000

  constructor(os: GuestOs, id: number, op: GuestOp) {
    this.os = os
    this.id = id
    this.op = op
  }

  // ------------------------------------------------------------------ raw ops

  private *run(op: GuestOp): Routine<number> {
    this.counters.ops++
    yield op
    // The op's own status field: valid even if an interrupt ran between the op and this resume.
    return op.status
  }

  private oops(what: string, va: number): GuestError {
    const op = this.op
    return new GuestError(
      'KERNEL_OOPS',
      `guest kernel on vCPU ${String(this.id)}: ${what} at 0x${laToBigInt(va).toString(16)} faulted (status ${String(op.status)}, error code 0x${op.errorCode.toString(16)}); the kernel's direct map must always be accessible — this is an MMU bug or a corrupted kernel page table`,
    )
  }

  /** Enter the kernel (SYSCALL / exception entry): CPL 0 if not already. */
  *kernelMode(): Routine {
    if (this.cpl !== 0) yield* this.setCpl(0)
  }

  /** Return to user mode (SYSRET / IRET): CPL 3 if not already. */
  *userMode(): Routine {
    if (this.cpl !== 3) yield* this.setCpl(3)
  }

  /** Privilege change (SYSCALL/SYSRET/IRET). */
  *setCpl(cpl: number): Routine {
    const op = this.op
    op.kind = OP_SET_CPL
    op.lo = cpl
    yield* this.run(op)
    this.cpl = cpl
  }

  // ------------------------------------------------------------------ kernel accessors (CPL 0, must not fault)

  /** 64-bit kernel read (e.g. a PTE through the direct map); result in `rlo`/`rhi`, returns `rlo`. */
  *kread64(va: number): Routine<number> {
    const op = this.op
    op.kind = OP_READ64
    op.addr = va
    op.implicit = false
    if ((yield* this.run(op)) !== RES_OK) throw this.oops('8-byte read', va)
    this.rlo = op.valueLo
    this.rhi = op.valueHi
    return op.valueLo
  }

  /** 64-bit kernel write (Linux `set_pte`/`native_set_pte`: one MOV of the whole entry). */
  *kwrite64(va: number, lo: number, hi: number): Routine {
    const op = this.op
    op.kind = OP_WRITE64
    op.addr = va
    op.lo = lo >>> 0
    op.hi = hi >>> 0
    op.implicit = false
    if ((yield* this.run(op)) !== RES_OK) throw this.oops('8-byte write', va)
  }

  /**
   * LOCK CMPXCHG8B on a kernel address (Linux `ptep_cmpxchg`/`try_cmpxchg64`): stores (lo, hi)
   * if the entry equals (cmpLo, cmpHi). Returns whether it did; the old value is in `rlo`/`rhi`.
   */
  *kcmpxchg64(va: number, cmpLo: number, cmpHi: number, lo: number, hi: number): Routine<boolean> {
    const op = this.op
    op.kind = OP_CMPXCHG64
    op.addr = va
    op.cmpLo = cmpLo >>> 0
    op.cmpHi = cmpHi >>> 0
    op.lo = lo >>> 0
    op.hi = hi >>> 0
    op.implicit = false
    if ((yield* this.run(op)) !== RES_OK) throw this.oops('cmpxchg8b', va)
    this.rlo = op.valueLo
    this.rhi = op.valueHi
    return op.valueLo === cmpLo >>> 0 && op.valueHi === cmpHi >>> 0
  }

  /** 32-bit kernel read. */
  *kread32(va: number): Routine<number> {
    const op = this.op
    op.kind = OP_READ
    op.addr = va
    op.implicit = false
    if ((yield* this.run(op)) !== RES_OK) throw this.oops('read', va)
    return op.valueLo
  }

  /** 32-bit kernel write. */
  *kwrite32(va: number, value: number): Routine {
    const op = this.op
    op.kind = OP_WRITE
    op.addr = va
    op.lo = value >>> 0
    op.implicit = false
    if ((yield* this.run(op)) !== RES_OK) throw this.oops('write', va)
  }

  /** A 32-bit write that reports its status instead of faulting (for probing protections, e.g. the WP test). */
  *tryWrite32(va: number, value: number): Routine<number> {
    const op = this.op
    op.kind = OP_WRITE
    op.addr = va
    op.lo = value >>> 0
    op.implicit = false
    return yield* this.run(op)
  }

  /** A 32-bit read that reports its status (value in `op.valueLo`) instead of handling faults. */
  *tryRead32(va: number): Routine<number> {
    const op = this.op
    op.kind = OP_READ
    op.addr = va
    op.implicit = false
    return yield* this.run(op)
  }

  /** Run a kernel batch from `start` to `end`; any fault is an oops. */
  *kbatch(b: AccessBatch, start: number, end: number): Routine {
    const op = this.op
    op.kind = OP_BATCH
    op.batch = b
    op.batchStart = start
    op.batchEnd = end
    if ((yield* this.run(op)) !== RES_OK) throw this.oops('batch access', b.addrs[op.index]!)
  }

  /** Zero the frame at physical address `pa` through the direct map (Linux `clear_page`): one batch of 1024 writes. */
  *clearPage(pa: number): Routine {
    const b = this.pageBatch
    const base = this.os.directMap(pa)
    for (let i = 0; i < WORDS; i++) {
      b.addrs[i] = base + i * 4
      b.kinds[i] = 1
      b.values[i] = 0
    }
    yield* this.kbatch(b, 0, WORDS)
  }

  /** Read a frame through the direct map into `out` (1024 words). */
  *readPage(pa: number, out: Uint32Array): Routine {
    const b = this.pageBatch
    const base = this.os.directMap(pa)
    for (let i = 0; i < WORDS; i++) {
      b.addrs[i] = base + i * 4
      b.kinds[i] = 0
    }
    yield* this.kbatch(b, 0, WORDS)
    out.set(b.values)
  }

  /** Write 1024 words into a frame through the direct map. */
  *writePage(pa: number, data: Uint32Array): Routine {
    const b = this.pageBatch
    const base = this.os.directMap(pa)
    for (let i = 0; i < WORDS; i++) {
      b.addrs[i] = base + i * 4
      b.kinds[i] = 1
    }
    b.values.set(data)
    yield* this.kbatch(b, 0, WORDS)
  }

  /** Copy a frame through the direct map (Linux `copy_page`): a batch of 1024 reads, then one of 1024 writes. */
  *copyPage(dstPa: number, srcPa: number): Routine {
    const b = this.pageBatch
    let base = this.os.directMap(srcPa)
    for (let i = 0; i < WORDS; i++) {
      b.addrs[i] = base + i * 4
      b.kinds[i] = 0
    }
    yield* this.kbatch(b, 0, WORDS)
    base = this.os.directMap(dstPa)
    for (let i = 0; i < WORDS; i++) {
      b.addrs[i] = base + i * 4
      b.kinds[i] = 1
    }
    yield* this.kbatch(b, 0, WORDS)
  }

  // ------------------------------------------------------------------ user accessors (CPL 3, demand paged)

  /**
   * Resolve a #PF taken by a user access (or a kernel access to a user address). Returns true to
   * retry the access, false for a SIGSEGV.
   */
  private *userFault(): Routine<boolean> {
    const op = this.op
    const cr2 = op.cr2
    const ec = op.errorCode
    const cpl = this.cpl
    this.counters.pageFaults++
    const ok = yield* handleMmFault(this, cr2, ec)
    if (!ok) {
      this.counters.sigsegv++
      this.os.recordSigsegv(this, cr2, ec)
    }
    // IRET back to the faulting context.
    if (this.cpl !== cpl) yield* this.setCpl(cpl)
    return ok
  }

  /** User 32-bit read; returns the value, or -1 after a SIGSEGV. */
  *read32(va: number): Routine<number> {
    if (this.cpl !== 3) yield* this.setCpl(3)
    return yield* this.access32(OP_READ, va, 0)
  }

  /** User 32-bit write; returns false after a SIGSEGV. */
  *write32(va: number, value: number): Routine<boolean> {
    if (this.cpl !== 3) yield* this.setCpl(3)
    return (yield* this.access32(OP_WRITE, va, value)) >= 0
  }

  /** User instruction fetch of 4 bytes; returns the value or -1 after a SIGSEGV. */
  *fetch32(va: number): Routine<number> {
    if (this.cpl !== 3) yield* this.setCpl(3)
    return yield* this.access32(OP_FETCH, va, 0)
  }

  /** Read and compare with `expected`; a difference counts as a data mismatch. Returns whether the read succeeded. */
  *check32(va: number, expected: number): Routine<boolean> {
    const v = yield* this.read32(va)
    if (v < 0) return false
    if (v !== expected >>> 0) this.mismatch(va, expected, v)
    return true
  }

  /** One access at the current CPL with fault handling; returns the value read (0 for writes) or -1 on SIGSEGV. */
  private *access32(kind: number, va: number, value: number): Routine<number> {
    const op = this.op
    for (;;) {
      op.kind = kind
      op.addr = va
      op.lo = value >>> 0
      op.implicit = false
      const st = yield* this.run(op)
      if (st === RES_OK) {
        this.counters.accesses++
        return kind === OP_WRITE ? 0 : op.valueLo
      }
      if (st !== RES_PF) return this.gpFault(va)
      if (!(yield* this.userFault())) return -1
    }
  }

  private gpFault(va: number): number {
    // A #GP (non-canonical address) is a SIGSEGV for a user program, as on Linux.
    this.counters.sigsegv++
    this.os.recordSigsegv(this, va, -1)
    return -1
  }

  /**
   * Run user accesses `start..end` of a batch with demand paging: one op per batch; on #PF at
   * `op.index` the kernel resolves it and the batch resumes there. An element that SIGSEGVs is
   * skipped (its `values` entry is left as it was) and reported in the returned count.
   * Returns the number of elements that SIGSEGV'd (0 normally).
   */
  *batch(b: AccessBatch, start: number, end: number): Routine<number> {
    if (this.cpl !== 3) yield* this.setCpl(3)
    return yield* this.faultingBatch(b, start, end)
  }

  /** Like {@link batch} but at the current CPL (the kernel touching user memory, e.g. `copy_to_user`). */
  private *faultingBatch(b: AccessBatch, start: number, end: number): Routine<number> {
    const op = this.op
    let i = start
    let segv = 0
    while (i < end) {
      op.kind = OP_BATCH
      op.batch = b
      op.batchStart = i
      op.batchEnd = end
      const st = yield* this.run(op)
      this.counters.accesses += op.index - i
      this.os.onBatch?.(this.id, b, i, op.index)
      if (st === RES_OK) return segv
      i = op.index
      if (st !== RES_PF) {
        this.gpFault(b.addrs[i]!)
        segv++
        i++
        continue
      }
      if (!(yield* this.userFault())) {
        segv++
        i++
      }
    }
    return segv
  }

  /**
   * `copy_to_user` / `copy_from_user` of one word (Linux brackets them with STAC/CLAC under SMAP):
   * the kernel touches a user address at CPL 0, and a #PF there is resolved like a user fault.
   * Returns the value read (reads) or 0, or -1 if the address is bad (-EFAULT).
   */
  *userAccessFromKernel(kind: typeof OP_READ | typeof OP_WRITE, va: number, value: number): Routine<number> {
    yield* this.kernelMode()
    const smap = this.os.features.smap
    if (smap) yield* this.simple(OP_STAC)
    const r = yield* this.access32(kind, va, value)
    if (smap) yield* this.simple(OP_CLAC)
    return r
  }

  /** Count a data mismatch (a wrong translation made visible as wrong data). */
  mismatch(va: number, expected: number, got: number): void {
    this.counters.mismatches++
    if (this.mismatchLog.length < 16) {
      this.mismatchLog.push(
        `vCPU ${String(this.id)}: at 0x${laToBigInt(va).toString(16)} expected 0x${(expected >>> 0).toString(16)}, read 0x${(got >>> 0).toString(16)}`,
      )
    }
  }

  // ------------------------------------------------------------------ instructions

  private *simple(kind: number): Routine<number> {
    const op = this.op
    op.kind = kind
    return yield* this.run(op)
  }

  /** INVLPG (Linux `native_flush_tlb_one_user` / `__flush_tlb_one_user` without PTI). */
  *invlpg(va: number): Routine {
    const op = this.op
    op.kind = OP_INVLPG
    op.addr = va
    yield* this.run(op)
  }

  /** INVPCID of `type` (0 address, 1 single context, 2 all incl. global, 3 all non-global). */
  *invpcid(type: number, pcid: number, va: number): Routine<number> {
    const op = this.op
    op.kind = OP_INVPCID
    op.invpcidType = type
    op.pcid = pcid
    op.addr = va
    return yield* this.run(op)
  }

  /** MOV to CR3 (Linux `native_write_cr3`); `noFlush` sets bit 63 (CR3_NOFLUSH) with PCIDs. */
  *movCr3(value: number, noFlush: boolean): Routine {
    const op = this.op
    op.kind = OP_MOV_CR3
    op.lo = value
    op.noFlush = noFlush
    if ((yield* this.run(op)) !== RES_OK) throw new GuestError('KERNEL_OOPS', `MOV CR3 of 0x${value.toString(16)} raised #GP on vCPU ${String(this.id)}`)
  }

  /** MOV to CR0 (Linux `native_write_cr0`). */
  *movCr0(value: number): Routine {
    const op = this.op
    op.kind = OP_MOV_CR0
    op.lo = value >>> 0
    if ((yield* this.run(op)) !== RES_OK) throw new GuestError('KERNEL_OOPS', `MOV CR0 of 0x${(value >>> 0).toString(16)} raised #GP on vCPU ${String(this.id)}`)
    this.cr0 = value >>> 0
  }

  /** MOV to CR4 (Linux `native_write_cr4`). */
  *movCr4(value: number): Routine {
    const op = this.op
    op.kind = OP_MOV_CR4
    op.lo = value >>> 0
    if ((yield* this.run(op)) !== RES_OK) throw new GuestError('KERNEL_OOPS', `MOV CR4 of 0x${(value >>> 0).toString(16)} raised #GP on vCPU ${String(this.id)}`)
    this.cr4 = value >>> 0
  }

  /** WRMSR IA32_EFER. */
  *wrmsrEfer(value: number): Routine {
    const op = this.op
    op.kind = OP_WRMSR_EFER
    op.lo = value >>> 0
    if ((yield* this.run(op)) !== RES_OK) throw new GuestError('KERNEL_OOPS', `WRMSR EFER of 0x${(value >>> 0).toString(16)} raised #GP on vCPU ${String(this.id)}`)
  }

  /** PAUSE (`cpu_relax`): lets other vCPUs run. */
  *pause(): Routine {
    yield* this.simple(OP_PAUSE)
  }

  /** Pure computation for `ns` of simulated time. */
  *work(ns: number): Routine {
    const op = this.op
    op.kind = OP_WORK
    op.lo = ns
    yield* this.run(op)
  }

  /** HLT until an interrupt. */
  *halt(): Routine {
    yield* this.simple(OP_HALT)
  }

  /** Send IPI `vector` to `targets` (the APIC ICR write of `native_send_call_func_ipi`). */
  *sendIpi(targets: readonly number[], vector: number): Routine {
    const op = this.op
    op.kind = OP_SEND_IPI
    op.targets = targets
    op.vector = vector
    yield* this.run(op)
  }

  /**
   * Spin (PAUSE loop, interrupts enabled) until `cond()` holds — the guest's `smp_cond_load_acquire`
   * / barrier wait. Throws GUEST_DEADLOCK after {@link spinLimit} iterations.
   */
  *waitUntil(cond: () => boolean, what = 'condition'): Routine {
    let n = 0
    while (!cond()) {
      if (++n > this.spinLimit) throw new GuestError('GUEST_DEADLOCK', `vCPU ${String(this.id)} spun ${String(this.spinLimit)} times waiting for ${what}`)
      yield* this.pause()
    }
  }

  /** Human-readable state, for messages. */
  describe(): string {
    return `vCPU ${String(this.id)} cpl=${String(this.cpl)} cr0=${hex64(this.cr0, 0)} cr4=${hex64(this.cr4, 0)} mm=${this.loadedMm === null ? 'init_mm' : String(this.loadedMm.id)}`
  }
}
