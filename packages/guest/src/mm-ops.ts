import { CR0_WP, HI_XD, PFERR_U, PFERR_W, PTE_A, PTE_D, PTE_P, PTE_PS, PTE_RW } from '@mmusim/x86-hw'
import type { Cpu, Routine } from './cpu.ts'
import { GuestError } from './errors.ts'
import { handleMmFault, putPage, splitHugePmd, swapFree, swapPte, swapSlotOf, thpFits, userHi, userLoFlags } from './fault.ts'
import type { Task } from './guest-os.ts'
import {
  alignDown,
  entryLo,
  entryPa,
  FRAMES_PER_2M,
  KERNEL_TEXT_BASE,
  PAGE_2M,
  PAGE_4K,
  PROT_EXEC,
  PROT_NONE,
  PROT_WRITE,
  PTE_PROTNONE,
  ptIndex,
  SWAP_PTE_MARK,
  USER_MMAP_BASE,
} from './layout.ts'
import { kassert, makeVma, type Mm, modifyOldHi, nextBlockAfterMiss, ptepGetAndClear, ptepModify, pteOffset } from './mm.ts'
import { flushTlbMmRange, switchMm } from './tlb-flush.ts'

/*
 * The memory system calls and kernel services, after mm/mmap.c, mm/mprotect.c, mm/madvise.c,
 * kernel/fork.c, mm/vmscan.c and mm/khugepaged.c. Each runs as kernel code on the calling vCPU.
 * Ordering rule everywhere (Linux's mmu_gather): change the entries, flush the TLBs of every vCPU
 * that may cache them, and only then free the frames or tables they pointed to.
 */

/** Options of {@link mmap}. */
export interface MmapOptions {
  /** Length in bytes (rounded up to 4 KiB). */
  length: number
  /** PROT_* bits. @default PROT_READ | PROT_WRITE */
  prot?: number
  /** MAP_FIXED address (replaces whatever was there). Without it the kernel picks a free range. */
  addr?: number
  /** MADV_HUGEPAGE: allow 2 MiB THP for aligned parts (an unfixed mapping is then 2 MiB-aligned). */
  thp?: boolean
  /** MAP_POPULATE: fault every page in now (write faults for writable mappings). */
  populate?: boolean
}

/** Frames and tables to free once the TLBs are flushed (Linux `struct mmu_gather`). */
class Gather {
  readonly pages: number[] = []
  readonly huge: number[] = []
  readonly tables: number[] = []
  changed = false
}

function* finishGather(cpu: Cpu, mm: Mm, g: Gather, start: number, end: number): Routine {
  if (g.changed) yield* flushTlbMmRange(cpu, mm, start, end)
  const fr = cpu.os.frames
  for (const f of g.pages) putPage(cpu, f)
  for (const h of g.huge) {
    kassert(fr.refcount[h]! > 0, 'THP refcount underflow')
    fr.refcount[h] = fr.refcount[h]! - 1
    if (fr.refcount[h] === 0) fr.free2m(cpu.id, h)
  }
  for (const t of g.tables) cpu.os.freeTablePage(cpu, t)
}

function pageLen(len: number): number {
  if (!Number.isSafeInteger(len) || len <= 0) throw new GuestError('INVALID_ARGUMENT', `length must be a positive integer number of bytes; got ${String(len)}`)
  return Math.ceil(len / PAGE_4K) * PAGE_4K
}

function checkRange(cpu: Cpu, start: number, end: number): void {
  if (start % PAGE_4K !== 0 || start < 0 || end > cpu.os.userTop || end <= start) {
    throw new GuestError('INVALID_ARGUMENT', `user range [0x${start.toString(16)}, 0x${end.toString(16)}) must be page-aligned and inside user space`)
  }
}

/** Find a free range of `len` bytes aligned to `align` (Linux `get_unmapped_area`, bottom-up). */
function unmappedArea(cpu: Cpu, mm: Mm, len: number, align: number): number {
  let a = Math.ceil(USER_MMAP_BASE / align) * align
  for (const v of mm.vmas) {
    if (v.end <= a) continue
    if (v.start >= a + len) break
    a = Math.ceil(v.end / align) * align
  }
  if (a + len > cpu.os.userTop) throw new GuestError('OUT_OF_MEMORY', 'no free virtual range for mmap')
  return a
}

/** Linux `do_mmap` of anonymous private memory. Returns the start address. */
export function* mmap(cpu: Cpu, mm: Mm, opts: MmapOptions): Routine<number> {
  yield* cpu.kernelMode()
  const len = pageLen(opts.length)
  const thp = opts.thp ?? false
  const start = opts.addr ?? unmappedArea(cpu, mm, len, thp ? PAGE_2M : PAGE_4K)
  const end = start + len
  checkRange(cpu, start, end)
  if (opts.addr !== undefined && mm.vmas.some((v) => v.start < end && v.end > start)) yield* munmap(cpu, mm, start, len)
  const vma = makeVma(start, end, opts.prot ?? 3, thp)
  mm.insertVma(vma)
  if (opts.populate === true) yield* populate(cpu, mm, start, end)
  return start
}

/** Fault in [start, end) now, as MAP_POPULATE / `mm_populate` does (write faults if writable). */
export function* populate(cpu: Cpu, mm: Mm, start: number, end: number): Routine {
  kassert(cpu.loadedMm === mm, 'populate runs in the context of the mm (switch to it first)')
  for (let a = start; a < end; ) {
    const vma = mm.findVma(a)
    if (vma === undefined) {
      a += PAGE_4K
      continue
    }
    const ec = PFERR_U | ((vma.prot & PROT_WRITE) !== 0 ? PFERR_W : 0)
    yield* handleMmFault(cpu, a, ec)
    a = thpFits(vma, a) ? alignDown(a, PAGE_2M) + PAGE_2M : a + PAGE_4K
  }
}

/**
 * Allocate every page-table page covering [start, end) now (levels down to the PTE table, or the
 * PMD for THP-enabled blocks) without mapping data. A workload runs this on one vCPU before the
 * others start so that the shared tables are allocated in a reproducible order.
 */
export function* preallocTables(cpu: Cpu, mm: Mm, start: number, end: number): Routine {
  yield* cpu.kernelMode()
  for (let h = alignDown(start, PAGE_2M); h < end; h += PAGE_2M) {
    const vma = mm.findVma(Math.max(h, start))
    yield* pteOffset(cpu, mm, Math.max(h, start), vma !== undefined && thpFits(vma, h) ? 2 : 1, true)
  }
}

/**
 * Clear the entries of [start, end) into `g` (Linux `zap_page_range` → `zap_pte_range`): data
 * frames and swap slots are released after the flush; huge PMDs partly in the range are split
 * first. With `freeTables`, page tables whose whole 2 MiB block is now unused are unlinked too
 * (`free_pgtables`).
 */
function* zapRange(cpu: Cpu, mm: Mm, start: number, end: number, g: Gather, freeTables: boolean): Routine {
  const os = cpu.os
  for (let h = alignDown(start, PAGE_2M); h < end; h += PAGE_2M) {
    const pmdEa = yield* pteOffset(cpu, mm, h, 2, false)
    if (pmdEa < 0) {
      h = nextBlockAfterMiss(h) - PAGE_2M
      continue
    }
    let lo = yield* cpu.kread64(os.directMap(pmdEa))
    let hi = cpu.rhi
    if ((lo & PTE_P) === 0) continue
    const whole = h >= start && h + PAGE_2M <= end
    if ((lo & PTE_PS) !== 0) {
      if (whole) {
        yield* ptepGetAndClear(cpu, pmdEa)
        g.huge.push(entryPa(lo, hi) / PAGE_4K)
        mm.rss -= FRAMES_PER_2M
        g.changed = true
        continue
      }
      yield* splitHugePmd(cpu, mm, h, pmdEa)
      lo = yield* cpu.kread64(os.directMap(pmdEa))
      hi = cpu.rhi
    }
    const table = entryPa(lo, hi)
    const from = Math.max(start, h)
    const to = Math.min(end, h + PAGE_2M)
    for (let a = from; a < to; a += PAGE_4K) {
      const ea = table + ptIndex(a, 1) * 8
      const plo = yield* cpu.kread64(os.directMap(ea))
      const phi = cpu.rhi
      if (plo === 0 && phi === 0) continue
      yield* ptepGetAndClear(cpu, ea)
      g.changed = true
      if ((plo & SWAP_PTE_MARK) !== 0 && (plo & PTE_P) === 0) {
        swapFree(cpu, swapSlotOf(plo, phi))
        continue
      }
      const pa = entryPa(plo, phi)
      if (pa !== os.zeroPagePa) {
        g.pages.push(pa / PAGE_4K)
        mm.rss--
      }
    }
    if (freeTables && whole && !mm.vmas.some((v) => v.start < h + PAGE_2M && v.end > h)) {
      yield* ptepGetAndClear(cpu, pmdEa)
      g.tables.push(table)
      g.changed = true
    }
  }
}

/** Linux `do_munmap`: remove the VMAs, zap the entries, flush every vCPU running the mm, then free. */
export function* munmap(cpu: Cpu, mm: Mm, start: number, length: number): Routine {
  yield* cpu.kernelMode()
  const end = start + pageLen(length)
  checkRange(cpu, start, end)
  mm.carve(start, end)
  const g = new Gather()
  yield* zapRange(cpu, mm, start, end, g, true)
  yield* finishGather(cpu, mm, g, start, end)
}

/** Linux `madvise(MADV_DONTNEED)`: drop the pages (the VMA stays; the next touch faults in zeroes). */
export function* madviseDontneed(cpu: Cpu, mm: Mm, start: number, length: number): Routine {
  yield* cpu.kernelMode()
  const end = start + pageLen(length)
  checkRange(cpu, start, end)
  const g = new Gather()
  yield* zapRange(cpu, mm, start, end, g, false)
  yield* finishGather(cpu, mm, g, start, end)
}

/**
 * Linux `mprotect` (`change_protection`): split the VMAs, rewrite the present entries' rights
 * (writable only where the page is exclusively owned, so copy-on-write survives; PROT_NONE
 * clears P and keeps the frame), flush the range on every vCPU running the mm. Returns false
 * (-ENOMEM) if part of the range is unmapped.
 */
export function* mprotect(cpu: Cpu, mm: Mm, start: number, length: number, prot: number): Routine<boolean> {
  yield* cpu.kernelMode()
  const os = cpu.os
  const end = start + pageLen(length)
  checkRange(cpu, start, end)
  let covered = 0
  for (const v of mm.vmas) covered += Math.max(0, Math.min(end, v.end) - Math.max(start, v.start))
  if (covered !== end - start) return false
  const pieces = mm.carve(start, end)
  for (const p of pieces) mm.insertVma(makeVma(p.start, p.end, prot, p.thp))
  let changed = false
  const xd = (prot & PROT_EXEC) === 0 && os.features.nx ? HI_XD : 0
  for (let h = alignDown(start, PAGE_2M); h < end; h += PAGE_2M) {
    const pmdEa = yield* pteOffset(cpu, mm, h, 2, false)
    if (pmdEa < 0) {
      h = nextBlockAfterMiss(h) - PAGE_2M
      continue
    }
    let lo = yield* cpu.kread64(os.directMap(pmdEa))
    let hi = cpu.rhi
    if ((lo & PTE_P) === 0) continue
    if ((lo & PTE_PS) !== 0) {
      if (h >= start && h + PAGE_2M <= end && prot !== PROT_NONE) {
        const excl = os.frames.refcount[entryPa(lo, hi) / PAGE_4K] === 1
        const setRw = (prot & PROT_WRITE) !== 0 && excl ? PTE_RW | PTE_D : 0
        const old = yield* ptepModify(cpu, pmdEa, PTE_RW, setRw, HI_XD, xd, true)
        if (old >= 0) changed = true
        continue
      }
      yield* splitHugePmd(cpu, mm, h, pmdEa)
      lo = yield* cpu.kread64(os.directMap(pmdEa))
      hi = cpu.rhi
    }
    const table = entryPa(lo, hi)
    for (let a = Math.max(start, h); a < Math.min(end, h + PAGE_2M); a += PAGE_4K) {
      const ea = table + ptIndex(a, 1) * 8
      const plo = yield* cpu.kread64(os.directMap(ea))
      const phi = cpu.rhi
      const mapped = (plo & PTE_P) !== 0 || (plo & PTE_PROTNONE) !== 0
      if (!mapped) continue
      const pa = entryPa(plo, phi)
      const excl = pa !== os.zeroPagePa && os.frames.refcount[pa / PAGE_4K] === 1
      let nlo: number
      if (prot === PROT_NONE) nlo = ((plo & ~(PTE_P | PTE_RW)) | PTE_PROTNONE) >>> 0
      else nlo = ((plo & ~(PTE_RW | PTE_PROTNONE)) | PTE_P | ((prot & PROT_WRITE) !== 0 && excl ? PTE_RW | PTE_D : 0)) >>> 0
      const nhi = ((phi & ~HI_XD) | xd) >>> 0
      if (nlo === plo && nhi === phi) continue
      if (!(yield* cpu.kcmpxchg64(os.directMap(ea), plo, phi, nlo, nhi))) {
        a -= PAGE_4K // the hardware set A/D meanwhile: redo this entry
        continue
      }
      changed = true
    }
  }
  if (changed) yield* flushTlbMmRange(cpu, mm, start, end)
  return true
}

/**
 * Linux `fork` → `dup_mmap` / `copy_page_range`: a new mm with the same VMAs whose entries map the
 * same frames; private writable pages are write-protected in both parent and child
 * (`copy_present_pte`: wrprotect + mkold for the child), swap slots gain a reference. The parent's
 * TLBs are flushed afterwards (`flush_tlb_mm`), since its entries lost write permission.
 */
export function* fork(cpu: Cpu, parent: Task): Routine<Task> {
  const os = cpu.os
  const child = yield* os.createProcess(cpu)
  const pm = parent.mm
  const cm = child.mm
  for (const v of pm.vmas) cm.vmas.push(makeVma(v.start, v.end, v.prot, v.thp))
  for (const v of pm.vmas) {
    for (let h = alignDown(v.start, PAGE_2M); h < v.end; h += PAGE_2M) {
      const pmdEa = yield* pteOffset(cpu, pm, h, 2, false)
      if (pmdEa < 0) {
        h = nextBlockAfterMiss(h) - PAGE_2M
        continue
      }
      const lo = yield* cpu.kread64(os.directMap(pmdEa))
      const hi = cpu.rhi
      if ((lo & PTE_P) === 0) continue
      if ((lo & PTE_PS) !== 0) {
        if (h < v.start) continue // already copied with the previous VMA's block
        const old = yield* ptepModify(cpu, pmdEa, PTE_RW, 0, 0, 0, true)
        const cEa = yield* pteOffset(cpu, cm, h, 2, true)
        yield* cpu.kwrite64(os.directMap(cEa), (old & ~(PTE_RW | PTE_A)) >>> 0, modifyOldHi)
        os.frames.refcount[entryPa(old, modifyOldHi) / PAGE_4K]!++
        cm.rss += FRAMES_PER_2M
        continue
      }
      const table = entryPa(lo, hi)
      const from = Math.max(v.start, h)
      const to = Math.min(v.end, h + PAGE_2M)
      let cTable = -1
      for (let a = from; a < to; a += PAGE_4K) {
        const ea = table + ptIndex(a, 1) * 8
        let plo = yield* cpu.kread64(os.directMap(ea))
        let phi = cpu.rhi
        if (plo === 0 && phi === 0) continue
        if (cTable < 0) cTable = (yield* pteOffset(cpu, cm, a, 1, true)) - ptIndex(a, 1) * 8
        if ((plo & PTE_P) === 0 && (plo & SWAP_PTE_MARK) !== 0) {
          const slot = swapSlotOf(plo, phi)
          os.swapRefs.set(slot, (os.swapRefs.get(slot) ?? 1) + 1)
        } else {
          if ((plo & PTE_RW) !== 0) {
            plo = yield* ptepModify(cpu, ea, PTE_RW, 0, 0, 0, false)
            phi = modifyOldHi
          }
          const pa = entryPa(plo, phi)
          if (pa !== os.zeroPagePa) {
            os.frames.refcount[pa / PAGE_4K]!++
            cm.rss++
          }
          plo = (plo & ~(PTE_RW | PTE_A)) >>> 0
        }
        yield* cpu.kwrite64(os.directMap(cTable + ptIndex(a, 1) * 8), plo, phi)
      }
    }
  }
  yield* flushTlbMmRange(cpu, pm, 0, Infinity)
  os.stats.forks++
  return child
}

/**
 * Linux `exit_mmap` + `free_pgd_range` + `pgd_free`: release every page and page table of an mm
 * that no vCPU runs any more (this vCPU switches away first). No flush is needed: a vCPU that
 * still caches the mm's PCID flushes it when the ASID slot is reused for another context id.
 */
export function* exitMm(cpu: Cpu, mm: Mm): Routine {
  if (cpu.loadedMm === mm) yield* switchMm(cpu, null)
  yield* cpu.kernelMode()
  kassert(mm.otherCpus(-1).length === 0, `exit of mm ${String(mm.id)} while vCPUs ${mm.otherCpus(-1).join(',')} still run it`)
  const g = new Gather()
  for (const v of mm.vmas) yield* zapRange(cpu, mm, v.start, v.end, g, false)
  mm.vmas.length = 0
  const os = cpu.os
  for (const f of g.pages) putPage(cpu, f)
  for (const h of g.huge) {
    os.frames.refcount[h] = os.frames.refcount[h]! - 1
    if (os.frames.refcount[h] === 0) os.frames.free2m(cpu.id, h)
  }
  yield* freeTables(cpu, mm.pgd, os.levels, true)
  mm.dead = true
}

/** Free the user half of a table tree (the kernel half of a PGD is shared and never freed). */
function* freeTables(cpu: Cpu, table: number, level: number, top: boolean): Routine {
  const os = cpu.os
  if (level > 1) {
    for (let i = 0; i < (top ? 256 : 512); i++) {
      const lo = yield* cpu.kread64(os.directMap(table + i * 8))
      const hi = cpu.rhi
      if ((lo & PTE_P) === 0 || (lo & PTE_PS) !== 0) continue
      yield* freeTables(cpu, entryPa(lo, hi), level - 1, false)
    }
  }
  os.freeTablePage(cpu, table)
}

/** Linux `do_exit` of a process: its mm is torn down. */
export function* exitProcess(cpu: Cpu, task: Task): Routine {
  yield* exitMm(cpu, task.mm)
  cpu.os.stats.exits++
}

/** Linux `execve` (`exec_mmap`): give the task a fresh empty mm, switch to it, and tear the old one down. */
export function* exec(cpu: Cpu, task: Task): Routine {
  const old = task.mm
  const mm = yield* cpu.os.newMm(cpu)
  task.mm = mm
  if (cpu.loadedMm === old) yield* switchMm(cpu, mm)
  yield* exitMm(cpu, old)
  cpu.os.stats.execs++
}

// ---------------------------------------------------------------------------------------------
// Reclaim and aging (mm/vmscan.c, mm/rmap.c)

/** The PTE address of a 4 KiB user page, or -1 (no table, or a huge mapping). */
function* userPte(cpu: Cpu, mm: Mm, va: number): Routine<number> {
  const ea = yield* pteOffset(cpu, mm, va, 1, false)
  return ea
}

/**
 * Clear the accessed bit of the PTE of `va` and report whether it was set (Linux
 * `ptep_test_and_clear_young`; with `flush`, `ptep_clear_flush_young`, which flushes so the next
 * access sets A again — x86 Linux itself skips that flush, hence both variants).
 */
export function* clearYoung(cpu: Cpu, mm: Mm, va: number, flush: boolean): Routine<boolean> {
  yield* cpu.kernelMode()
  const ea = yield* userPte(cpu, mm, va)
  if (ea < 0) return false
  const old = yield* ptepModify(cpu, ea, PTE_A, 0, 0, 0, true)
  const young = old >= 0 && (old & PTE_A) !== 0
  if (young && flush) {
    const page = alignDown(va, PAGE_4K)
    yield* flushTlbMmRange(cpu, mm, page, page + PAGE_4K)
  }
  return young
}

/** Whether the PTE of `va` has its accessed bit set (Linux `pte_young`). */
export function* testYoung(cpu: Cpu, mm: Mm, va: number): Routine<boolean> {
  yield* cpu.kernelMode()
  const ea = yield* userPte(cpu, mm, va)
  if (ea < 0) return false
  const lo = yield* cpu.kread64(cpu.os.directMap(ea))
  return (lo & PTE_P) !== 0 && (lo & PTE_A) !== 0
}

/**
 * Swap out the 4 KiB page at `va` (Linux `try_to_unmap_one` + `swap_writepage`): replace the PTE
 * with a swap entry, flush it from every vCPU, then save the contents (read through the direct
 * map) in the JS-side swap area and free the frame. Only exclusively owned pages are swapped;
 * returns whether the page was.
 */
export function* swapOut(cpu: Cpu, mm: Mm, va: number): Routine<boolean> {
  yield* cpu.kernelMode()
  const os = cpu.os
  const ea = yield* userPte(cpu, mm, va)
  if (ea < 0) return false
  const lo = yield* cpu.kread64(os.directMap(ea))
  const hi = cpu.rhi
  if ((lo & PTE_P) === 0) return false
  const pa = entryPa(lo, hi)
  if (pa === os.zeroPagePa || os.frames.refcount[pa / PAGE_4K] !== 1) return false
  const slot = os.allocSwapSlot(cpu)
  const sp = swapPte(slot)
  if (!(yield* cpu.kcmpxchg64(os.directMap(ea), lo, hi, sp.lo, sp.hi))) return false
  const page = alignDown(va, PAGE_4K)
  yield* flushTlbMmRange(cpu, mm, page, page + PAGE_4K)
  const data = new Uint32Array(1024)
  yield* cpu.readPage(pa, data)
  os.swap.set(slot, data)
  os.swapRefs.set(slot, 1)
  putPage(cpu, pa / PAGE_4K)
  mm.rss--
  os.stats.swapOuts++
  return true
}

// ---------------------------------------------------------------------------------------------
// Transparent huge pages (mm/khugepaged.c)

/**
 * Linux `collapse_huge_page` (khugepaged): replace the 512 PTEs of the 2 MiB block at `va` with
 * one huge PMD. Requires every PTE present and exclusively owned. Order as in Linux: clear the PMD
 * and flush (`pmdp_collapse_flush`), copy the pages into a new 2 MiB page through the direct map,
 * install the huge PMD, then free the old pages and the page table. Returns whether it collapsed.
 */
export function* collapseHugePage(cpu: Cpu, mm: Mm, va: number): Routine<boolean> {
  yield* cpu.kernelMode()
  const os = cpu.os
  const h = alignDown(va, PAGE_2M)
  const vma = mm.findVma(h)
  if (vma === undefined || h + PAGE_2M > vma.end || h < vma.start) return false
  const pmdEa = yield* pteOffset(cpu, mm, h, 2, false)
  if (pmdEa < 0) return false
  const lo = yield* cpu.kread64(os.directMap(pmdEa))
  const hi = cpu.rhi
  if ((lo & PTE_P) === 0 || (lo & PTE_PS) !== 0) return false
  const table = entryPa(lo, hi)
  const frames: number[] = []
  for (let i = 0; i < 512; i++) {
    const plo = yield* cpu.kread64(os.directMap(table + i * 8))
    const pa = entryPa(plo, cpu.rhi)
    if ((plo & PTE_P) === 0 || pa === os.zeroPagePa || os.frames.refcount[pa / PAGE_4K] !== 1) return false
    frames.push(pa)
  }
  const head = os.frames.alloc2m(cpu.id)
  if (head < 0) return false
  yield* ptepGetAndClear(cpu, pmdEa)
  yield* flushTlbMmRange(cpu, mm, h, h + PAGE_2M)
  const hpa = head * PAGE_4K
  for (let i = 0; i < 512; i++) yield* cpu.copyPage(hpa + i * PAGE_4K, frames[i]!)
  yield* cpu.kwrite64(os.directMap(pmdEa), entryLo(hpa, userLoFlags(vma, true) | PTE_PS), userHi(cpu, vma, hpa))
  os.frames.refcount[head] = 1
  for (const pa of frames) putPage(cpu, pa / PAGE_4K)
  os.freeTablePage(cpu, table)
  os.stats.thpCollapses++
  return true
}

/** Split the huge PMD mapping `va`, if any (Linux `split_huge_pmd`). Returns whether there was one. */
export function* splitHugePage(cpu: Cpu, mm: Mm, va: number): Routine<boolean> {
  yield* cpu.kernelMode()
  const pmdEa = yield* pteOffset(cpu, mm, va, 2, false)
  if (pmdEa < 0) return false
  const lo = yield* cpu.kread64(cpu.os.directMap(pmdEa))
  if ((lo & PTE_P) === 0 || (lo & PTE_PS) === 0) return false
  yield* splitHugePmd(cpu, mm, va, pmdEa)
  return true
}

// ---------------------------------------------------------------------------------------------
// Control-register traffic

/**
 * Patch a word of read-only kernel text the old way (pre-4.x `text_poke` without a temporary
 * mm): clear CR0.WP so supervisor writes ignore R/W, write through the read-only text mapping,
 * restore CR0.WP. Each MOV CR0 that toggles WP is what KVM's shadow MMU must react to.
 */
export function* patchKernelText(cpu: Cpu, page: number, word: number, value: number): Routine {
  yield* cpu.kernelMode()
  const cr0 = cpu.cr0
  yield* cpu.movCr0((cr0 & ~CR0_WP) >>> 0)
  yield* cpu.kwrite32(KERNEL_TEXT_BASE + page * PAGE_4K + word * 4, value)
  yield* cpu.movCr0(cr0)
  cpu.os.stats.cr0WpToggles++
}

/** Kernel virtual address of text word `word` of text page `page`. */
export function kernelTextVa(page: number, word: number): number {
  return KERNEL_TEXT_BASE + page * PAGE_4K + word * 4
}
