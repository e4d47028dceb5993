import { CR4_PGE, type GuestOp, type GuestProgram, OP_INVLPG, OP_MOV_CR3, OP_MOV_CR4, OP_INVPCID } from '@mmusim/x86-hw'
import type { Cpu, FlushRequest, Routine } from './cpu.ts'
import { FLUSH_CEILING_PAGES, NR_DYN_ASIDS, PAGE_4K, VECTOR_TLB_SHOOTDOWN } from './layout.ts'
import type { Mm } from './mm.ts'

/*
 * The guest's TLB discipline, after arch/x86/mm/tlb.c: PCID-tagged address spaces with per-CPU
 * ASID slots, TLB generations per mm, and IPI shootdowns to the CPUs in mm_cpumask.
 */

/** The CR3 value for `mm` in ASID slot `asid` (Linux `build_cr3`: pgd | kern_pcid(asid), PCID = asid + 1). */
export function buildCr3(cpu: Cpu, pgd: number, asid: number): number {
  return cpu.os.pcid ? pgd + asid + 1 : pgd
}

/**
 * Switch this vCPU to address space `next` (null = the kernel's init_mm), Linux
 * `switch_mm_irqs_off`: mark the CPU in `next`'s cpumask *before* reading its TLB generation,
 * pick an ASID slot (`choose_new_asid`: reuse the slot that caches `next` if any, flushing only if
 * the mm's generation moved on; otherwise recycle the next slot and flush), and load CR3 with the
 * no-flush bit when no flush is needed. Without PCIDs every switch flushes (a plain MOV CR3).
 */
export function* switchMm(cpu: Cpu, next: Mm | null): Routine {
  const os = cpu.os
  const prev = cpu.loadedMm
  if (prev === next) return
  yield* cpu.kernelMode()
  os.stats.contextSwitches++
  if (prev !== null) prev.cpumask[cpu.id] = 0
  if (next === null) {
    cpu.loadedMm = null
    // init_mm's PGD holds only kernel (global) mappings; nothing user-visible is cached under PCID 0.
    yield* cpu.movCr3(os.kernelPgd, os.pcid)
    return
  }
  next.cpumask[cpu.id] = 1
  const nextGen = next.tlbGen
  let asid = -1
  let needFlush = true
  if (os.pcid) {
    for (let i = 0; i < NR_DYN_ASIDS; i++) {
      if (cpu.asidCtx[i] === next.id) {
        asid = i
        needFlush = cpu.asidGen[i]! < nextGen
        break
      }
    }
    if (asid < 0) {
      asid = cpu.nextAsid
      cpu.nextAsid = (cpu.nextAsid + 1) % NR_DYN_ASIDS
      needFlush = true
    }
  } else asid = 0
  cpu.asidCtx[asid] = next.id
  cpu.asidGen[asid] = nextGen
  cpu.loadedMm = next
  cpu.loadedAsid = asid
  if (needFlush) os.stats.cr3Flushes++
  else os.stats.cr3NoFlush++
  yield* cpu.movCr3(buildCr3(cpu, next.pgd, asid), os.pcid && !needFlush)
}

/**
 * Flush this CPU's TLB for a request if it is running the request's mm (Linux
 * `flush_tlb_func`): nothing if the CPU's ASID is already at the mm's generation; INVLPG per page
 * for a range request that is exactly one generation ahead; otherwise a full flush of the PCID by
 * reloading CR3 without the no-flush bit (`flush_tlb_local`).
 * `op` is the op to use (the handler's own op inside an IPI).
 */
export function* flushTlbFunc(cpu: Cpu, req: FlushRequest, op: GuestOp): Routine {
  const mm = req.mm
  if (cpu.loadedMm !== mm) return // switched away: the generation check at the next switch flushes
  const asid = cpu.loadedAsid
  const local = cpu.asidGen[asid]!
  const mmGen = mm.tlbGen
  if (local >= mmGen) return
  const pages = req.end === Infinity ? Infinity : (req.end - req.start) / req.stride
  if (req.end !== Infinity && req.newGen === local + 1 && req.newGen === mmGen && pages <= FLUSH_CEILING_PAGES) {
    for (let a = req.start; a < req.end; a += req.stride) {
      op.kind = OP_INVLPG
      op.addr = a
      cpu.counters.ops++
      yield op
      cpu.os.stats.invlpgs++
    }
  } else {
    op.kind = OP_MOV_CR3
    op.lo = buildCr3(cpu, mm.pgd, asid)
    op.noFlush = false
    cpu.counters.ops++
    yield op
    cpu.os.stats.fullFlushes++
  }
  cpu.asidGen[asid] = mmGen
}

/**
 * Linux `flush_tlb_mm_range`: bump the mm's TLB generation, flush locally if this CPU runs the mm,
 * and shoot down every other CPU in `mm_cpumask`: queue the request, send the IPI, and spin until
 * all targets acknowledged (`native_flush_tlb_multi` → `smp_call_function_many_cond` with wait).
 * Only then may the caller free the pages that were unmapped. `end = Infinity` flushes the whole mm
 * (`flush_tlb_mm`).
 */
export function* flushTlbMmRange(cpu: Cpu, mm: Mm, start: number, end: number, stride = PAGE_4K): Routine {
  const os = cpu.os
  const newGen = ++mm.tlbGen
  const req: FlushRequest = { mm, start, end, stride, newGen, pending: 0 }
  if (cpu.loadedMm === mm) yield* flushTlbFunc(cpu, req, cpu.op)
  if (os.testSkipShootdown) return
  const targets = mm.otherCpus(cpu.id)
  if (targets.length === 0) return
  req.pending = targets.length
  for (const t of targets) os.cpus[t]!.flushQueue.push(req)
  os.stats.shootdowns++
  os.stats.ipisSent += targets.length
  yield* cpu.sendIpi(targets, VECTOR_TLB_SHOOTDOWN)
  yield* cpu.waitUntil(() => req.pending === 0, 'TLB shootdown acknowledgements')
}

/** The IPI handler for {@link VECTOR_TLB_SHOOTDOWN}: run every queued request and acknowledge it (`flush_smp_call_function_queue`). */
export function* shootdownHandler(cpu: Cpu): GuestProgram {
  const q = cpu.flushQueue
  while (q.length > 0) {
    const req = q.shift()!
    yield* flushTlbFunc(cpu, req, cpu.irqOp)
    req.pending--
    cpu.counters.ipisHandled++
  }
}

/**
 * Flush everything on this CPU, global kernel entries included (Linux `__flush_tlb_global` /
 * `native_flush_tlb_global`): INVPCID all-contexts when the kernel is configured to use it,
 * otherwise toggle CR4.PGE off and on (each MOV CR4 that changes PGE flushes all PCIDs), or with
 * PGE off reload CR3. All user ASID slots become stale.
 */
export function* flushTlbAllLocal(cpu: Cpu, op: GuestOp = cpu.op): Routine {
  const os = cpu.os
  cpu.counters.ops++
  if (os.useInvpcid) {
    op.kind = OP_INVPCID
    op.invpcidType = 2
    op.pcid = 0
    op.addr = 0
    yield op
  } else if ((cpu.cr4 & CR4_PGE) !== 0) {
    op.kind = OP_MOV_CR4
    op.lo = (cpu.cr4 & ~CR4_PGE) >>> 0
    yield op
    cpu.counters.ops++
    op.kind = OP_MOV_CR4
    op.lo = cpu.cr4
    yield op
    os.stats.pgeToggles++
  } else {
    op.kind = OP_MOV_CR3
    op.lo = cpu.loadedMm === null ? os.kernelPgd : buildCr3(cpu, cpu.loadedMm.pgd, cpu.loadedAsid)
    op.noFlush = false
    yield op
  }
  // Every ASID slot was flushed: bring the loaded one up to date and forget the others.
  for (let i = 0; i < NR_DYN_ASIDS; i++) {
    if (cpu.loadedMm !== null && i === cpu.loadedAsid) cpu.asidGen[i] = cpu.loadedMm.tlbGen
    else cpu.asidCtx[i] = -1
  }
}
