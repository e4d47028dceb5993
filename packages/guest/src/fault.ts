import { HI_XD, PFERR_I, PFERR_W, PTE_A, PTE_D, PTE_P, PTE_PS, PTE_RW, PTE_US } from '@mmusim/x86-hw'
import type { Cpu, Routine } from './cpu.ts'
import { GuestError } from './errors.ts'
import { alignDown, entryHi, entryLo, entryPa, FRAMES_PER_2M, PAGE_2M, PAGE_4K, PAGE_TABLE_LO, PROT_EXEC, PTE_PROTNONE, PROT_READ, PROT_WRITE, SWAP_PTE_MARK } from './layout.ts'
import { kassert, type Mm, ptepModify, pteOffset, type Vma, walkStoppedAt } from './mm.ts'
import { flushTlbMmRange } from './tlb-flush.ts'

/*
 * The guest's page-fault handler, after mm/memory.c and mm/huge_memory.c: demand paging of
 * anonymous memory (with the shared zero page), copy-on-write, swap-in, and transparent huge
 * pages. Every page-table change is a guest compare-and-exchange through the direct map, so two
 * vCPUs faulting on the same entry resolve the race as Linux's PTE lock would (the loser backs off).
 */

/** High half of a user leaf for `vma`: XD unless executable (NX needs EFER.NXE, which the guest sets when the CPU has it). */
export function userHi(cpu: Cpu, vma: Vma, pa: number): number {
  return entryHi(pa, (vma.prot & PROT_EXEC) === 0 && cpu.os.features.nx ? HI_XD : 0)
}

/** Low-half flags of a user leaf for `vma` (Linux `vm_get_page_prot` + mkyoung [+ mkwrite/mkdirty]). */
export function userLoFlags(vma: Vma, writable: boolean): number {
  return PTE_P | PTE_US | PTE_A | (writable && (vma.prot & PROT_WRITE) !== 0 ? PTE_RW | PTE_D : 0)
}

/** Whether the 2 MiB-aligned block around `va` lies wholly inside a THP-enabled `vma`. */
export function thpFits(vma: Vma, va: number): boolean {
  const h = alignDown(va, PAGE_2M)
  return vma.thp && h >= vma.start && h + PAGE_2M <= vma.end
}

/**
 * Resolve a #PF at `va` with error code `ec` in the address space loaded on `cpu` (Linux
 * `do_user_addr_fault` → `handle_mm_fault`). Returns true when the access should be retried,
 * false for a SIGSEGV (no VMA, or the VMA forbids the access).
 */
export function* handleMmFault(cpu: Cpu, va: number, ec: number): Routine<boolean> {
  const os = cpu.os
  os.stats.pageFaults++
  yield* cpu.kernelMode()
  const mm = cpu.loadedMm
  if (mm === null || va < 0 || va >= os.userTop) return false
  const vma = mm.findVma(va)
  if (vma === undefined) return false
  const write = (ec & PFERR_W) !== 0
  const fetch = (ec & PFERR_I) !== 0
  if (write ? (vma.prot & PROT_WRITE) === 0 : fetch ? (vma.prot & PROT_EXEC) === 0 : (vma.prot & PROT_READ) === 0) return false

  if (thpFits(vma, va)) {
    const pmdEa = yield* pteOffset(cpu, mm, va, 2, true)
    const lo = yield* cpu.kread64(os.directMap(pmdEa))
    const hi = cpu.rhi
    if ((lo & PTE_P) === 0 && lo === 0 && hi === 0) {
      if (yield* doHugePmdAnonymousPage(cpu, mm, vma, pmdEa)) return true
    } else if ((lo & PTE_P) !== 0 && (lo & PTE_PS) !== 0) {
      if (!write || (lo & PTE_RW) !== 0) {
        os.stats.spuriousFaults++
        return true
      }
      const head = entryPa(lo, hi) / PAGE_4K
      if (os.frames.refcount[head] === 1) {
        // do_huge_pmd_wp_page → reuse: make it writable in place; an upgrade needs no flush.
        if ((yield* ptepModify(cpu, pmdEa, 0, PTE_RW | PTE_D, 0, 0, true)) >= 0) os.stats.cowReuses++
        return true
      }
      // Shared THP: split it and break CoW on the 4 KiB page (what current Linux does).
      yield* splitHugePmd(cpu, mm, va, pmdEa)
    }
  }

  let ea = yield* pteOffset(cpu, mm, va, 1, true)
  if (walkStoppedAt === 2) {
    // A huge PMD where the VMA no longer allows one (mprotect/munmap of part of it): split first.
    yield* splitHugePmd(cpu, mm, va, ea)
    ea = yield* pteOffset(cpu, mm, va, 1, true)
  }
  const page = alignDown(va, PAGE_4K)
  const lo = yield* cpu.kread64(os.directMap(ea))
  const hi = cpu.rhi
  if ((lo & PTE_P) === 0) {
    if ((lo & SWAP_PTE_MARK) !== 0) return yield* doSwapPage(cpu, mm, vma, ea, lo, hi)
    if ((lo & PTE_PROTNONE) !== 0) {
      // The VMA allows access again (mprotect is restoring it): make the entry present.
      yield* ptepModify(cpu, ea, PTE_PROTNONE, PTE_P, 0, 0, false)
      return true
    }
    kassert(lo === 0 && hi === 0, `non-present PTE 0x${hi.toString(16)}${lo.toString(16)} is neither none nor a swap entry`)
    return yield* doAnonymousPage(cpu, mm, vma, ea, write)
  }
  if (write && (lo & PTE_RW) === 0) return yield* doWpPage(cpu, mm, vma, page, ea, lo, hi)
  // The PTE already allows the access: a stale TLB entry, or another vCPU resolved it first.
  os.stats.spuriousFaults++
  return true
}

/**
 * Linux `do_anonymous_page`: a read maps the shared zero page read-only; a write (or a read with
 * the zero page disabled) maps a freshly zeroed page, writable and dirty if the VMA allows.
 */
function* doAnonymousPage(cpu: Cpu, mm: Mm, vma: Vma, ea: number, write: boolean): Routine<boolean> {
  const os = cpu.os
  const eva = os.directMap(ea)
  if (!write && os.zeroPageEnabled) {
    if (yield* cpu.kcmpxchg64(eva, 0, 0, entryLo(os.zeroPagePa, PTE_P | PTE_US | PTE_A), userHi(cpu, vma, os.zeroPagePa))) os.stats.zeroPageFaults++
    return true
  }
  const pa = yield* os.allocZeroedPage(cpu)
  if (!(yield* cpu.kcmpxchg64(eva, 0, 0, entryLo(pa, userLoFlags(vma, true)), userHi(cpu, vma, pa)))) {
    os.frames.free4k(cpu.id, pa / PAGE_4K)
    return true
  }
  os.frames.refcount[pa / PAGE_4K] = 1
  mm.rss++
  os.stats.anonFaults++
  return true
}

/**
 * Linux `do_wp_page`: a write to a write-protected present page. An exclusively owned page is
 * made writable in place (`wp_page_reuse`); a shared one (after fork) or the zero page is copied
 * (`wp_page_copy`): copy through the direct map, install the new PTE with a compare-and-exchange,
 * flush the old translation everywhere (`ptep_clear_flush` → `flush_tlb_page`), and only then drop
 * the old page.
 */
function* doWpPage(cpu: Cpu, mm: Mm, vma: Vma, page: number, ea: number, lo: number, hi: number): Routine<boolean> {
  const os = cpu.os
  const oldPa = entryPa(lo, hi)
  const oldFrame = oldPa / PAGE_4K
  const isZero = oldPa === os.zeroPagePa
  if (!isZero && os.frames.refcount[oldFrame] === 1) {
    if (yield* cpu.kcmpxchg64(os.directMap(ea), lo, hi, (lo | PTE_RW | PTE_D | PTE_A) >>> 0, hi)) os.stats.cowReuses++
    return true
  }
  let pa: number
  if (isZero) pa = yield* os.allocZeroedPage(cpu)
  else {
    const f = os.frames.alloc4k(cpu.id)
    if (f < 0) throw new GuestError('OUT_OF_MEMORY', `vCPU ${String(cpu.id)}'s frame pool is exhausted during copy-on-write`)
    pa = f * PAGE_4K
    yield* cpu.copyPage(pa, oldPa)
  }
  if (!(yield* cpu.kcmpxchg64(os.directMap(ea), lo, hi, entryLo(pa, userLoFlags(vma, true)), userHi(cpu, vma, pa)))) {
    os.frames.free4k(cpu.id, pa / PAGE_4K)
    return true
  }
  os.frames.refcount[pa / PAGE_4K] = 1
  os.stats.cowCopies++
  yield* flushTlbMmRange(cpu, mm, page, page + PAGE_4K)
  if (!isZero) {
    mm.rss-- // the old page leaves this mm; the new one replaces it
    putPage(cpu, oldFrame)
  }
  mm.rss++
  return true
}

/** Drop one mapping of a 4 KiB frame; free it when none is left (Linux `put_page`). */
export function putPage(cpu: Cpu, frame: number): void {
  const fr = cpu.os.frames
  kassert(fr.refcount[frame]! > 0, `put_page of frame 0x${frame.toString(16)} with refcount 0`)
  fr.refcount[frame] = fr.refcount[frame]! - 1
  if (fr.refcount[frame] === 0) fr.free4k(cpu.id, frame)
}

/** Linux `do_swap_page`: read the page back from swap into a new frame and map it (writable only if the swap slot was not shared). */
function* doSwapPage(cpu: Cpu, mm: Mm, vma: Vma, ea: number, lo: number, hi: number): Routine<boolean> {
  const os = cpu.os
  const slot = swapSlotOf(lo, hi)
  const data = os.swap.get(slot)
  kassert(data !== undefined, `swap entry names slot ${String(slot)}, which holds nothing`)
  const f = os.frames.alloc4k(cpu.id)
  if (f < 0) throw new GuestError('OUT_OF_MEMORY', `vCPU ${String(cpu.id)}'s frame pool is exhausted during swap-in`)
  const pa = f * PAGE_4K
  yield* cpu.writePage(pa, data)
  const refs = os.swapRefs.get(slot) ?? 1
  if (!(yield* cpu.kcmpxchg64(os.directMap(ea), lo, hi, entryLo(pa, userLoFlags(vma, refs === 1)), userHi(cpu, vma, pa)))) {
    os.frames.free4k(cpu.id, f)
    return true
  }
  os.frames.refcount[f] = 1
  mm.rss++
  os.stats.swapIns++
  swapFree(cpu, slot)
  return true
}

/** Swap slot named by a swap PTE. */
export function swapSlotOf(lo: number, hi: number): number {
  return (lo >>> 12) + hi * 2 ** 20
}

/** The non-present PTE naming swap `slot` (Linux `swp_entry_to_pte`). */
export function swapPte(slot: number): { lo: number; hi: number } {
  return { lo: (((slot % 2 ** 20) << 12) | SWAP_PTE_MARK) >>> 0, hi: Math.floor(slot / 2 ** 20) >>> 0 }
}

/** Drop one reference to a swap slot (Linux `swap_free`). */
export function swapFree(cpu: Cpu, slot: number): void {
  const os = cpu.os
  const r = (os.swapRefs.get(slot) ?? 1) - 1
  if (r <= 0) {
    os.swapRefs.delete(slot)
    os.swap.delete(slot)
  } else os.swapRefs.set(slot, r)
}

/**
 * Linux `do_huge_pmd_anonymous_page`: back the 2 MiB block with a freshly zeroed 2 MiB page
 * mapped by one PMD leaf. Returns false (fall back to 4 KiB pages) when no 2 MiB chunk is free.
 */
function* doHugePmdAnonymousPage(cpu: Cpu, mm: Mm, vma: Vma, pmdEa: number): Routine<boolean> {
  const os = cpu.os
  const head = os.frames.alloc2m(cpu.id)
  if (head < 0) return false
  const pa = head * PAGE_4K
  for (let i = 0; i < FRAMES_PER_2M; i++) yield* cpu.clearPage(pa + i * PAGE_4K)
  if (!(yield* cpu.kcmpxchg64(os.directMap(pmdEa), 0, 0, entryLo(pa, userLoFlags(vma, true) | PTE_PS), userHi(cpu, vma, pa)))) {
    os.frames.free2m(cpu.id, head)
    return true
  }
  os.frames.refcount[head] = 1
  mm.rss += FRAMES_PER_2M
  os.stats.thpFaults++
  return true
}

/**
 * Linux `__split_huge_pmd`: replace a 2 MiB PMD leaf with a page table of 512 PTEs mapping the
 * same frames with the same rights. The new table is filled before it is linked (plain guest
 * writes to a page nobody walks yet), the PMD is swapped with a compare-and-exchange, and the 2 MiB
 * translation is flushed on every vCPU running the mm (a page-size change must be invalidated).
 */
export function* splitHugePmd(cpu: Cpu, mm: Mm, va: number, pmdEa: number): Routine {
  const os = cpu.os
  const epa = os.directMap(pmdEa)
  const lo = yield* cpu.kread64(epa)
  const hi = cpu.rhi
  if ((lo & PTE_P) === 0 || (lo & PTE_PS) === 0) return
  const pt = yield* os.allocTablePage(cpu)
  const base = entryPa(lo, hi)
  const flags = lo & 0xfff & ~PTE_PS
  const b = cpu.pageBatch
  const tva = os.directMap(pt)
  for (let i = 0; i < 512; i++) {
    const pa = base + i * PAGE_4K
    b.addrs[2 * i] = tva + i * 8
    b.addrs[2 * i + 1] = tva + i * 8 + 4
    b.kinds[2 * i] = 1
    b.kinds[2 * i + 1] = 1
    b.values[2 * i] = entryLo(pa, flags)
    b.values[2 * i + 1] = hi
  }
  yield* cpu.kbatch(b, 0, 1024)
  if (!(yield* cpu.kcmpxchg64(epa, lo, hi, entryLo(pt, PAGE_TABLE_LO), entryHi(pt, 0)))) {
    os.freeTablePage(cpu, pt)
    return
  }
  os.frames.splitChunk(base / PAGE_4K)
  os.stats.thpSplits++
  const h = alignDown(va, PAGE_2M)
  yield* flushTlbMmRange(cpu, mm, h, h + PAGE_2M, PAGE_2M)
}
