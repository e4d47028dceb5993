import { PTE_P, PTE_PS } from '@mmusim/x86-hw'
import type { Cpu, Routine } from './cpu.ts'
import { GuestError } from './errors.ts'
import { entryHi, entryLo, entryPa, levelSize, PAGE_TABLE_LO, ptIndex } from './layout.ts'

/** A virtual memory area (Linux `struct vm_area_struct`): [start, end), PROT_* bits, and whether THP may back it. */
export interface Vma {
  start: number
  end: number
  /** PROT_READ | PROT_WRITE | PROT_EXEC. */
  prot: number
  /** MADV_HUGEPAGE: 2 MiB-aligned parts may be backed by transparent huge pages. */
  thp: boolean
}

/**
 * A {@link Vma}, field by field: every VMA then has one hidden class. (V8 gives objects built as
 * `{ ...v, end }` a new hidden class once the site is optimized, and every fault path that reads
 * VMAs deoptimizes.)
 */
export function makeVma(start: number, end: number, prot: number, thp: boolean): Vma {
  return { start, end, prot, thp }
}

/**
 * An address space (Linux `struct mm_struct`): the physical address of its top-level table
 * (`pgd`), its VMAs, its context id and TLB generation (`mm->context.ctx_id`, `tlb_gen`) and the
 * set of vCPUs currently running it (`mm_cpumask`). The page tables themselves live only in
 * guest memory; this object never caches an entry.
 */
export class Mm {
  /** Context id: unique for the life of the guest, never reused (Linux `ctx_id`). */
  readonly id: number
  /** Physical address of the top-level table (PML4 or PML5). */
  readonly pgd: number
  readonly vmas: Vma[] = []
  /** Bumped by every flush request (Linux `context.tlb_gen`). */
  tlbGen = 1
  /** vCPUs running this mm now (Linux `mm_cpumask`). */
  readonly cpumask: Uint8Array
  /** Pages mapped (4 KiB pages; a THP counts 512). */
  rss = 0
  /** Set once torn down. */
  dead = false

  constructor(id: number, pgd: number, nCpus: number) {
    this.id = id
    this.pgd = pgd
    this.cpumask = new Uint8Array(nCpus)
  }

  /** The VMA containing `va`, or undefined (Linux `find_vma` + the `vm_start <= addr` check). */
  findVma(va: number): Vma | undefined {
    for (const v of this.vmas) if (va >= v.start && va < v.end) return v
    return undefined
  }

  /** vCPUs in the cpumask other than `self` (the targets of a shootdown). */
  otherCpus(self: number): number[] {
    const out: number[] = []
    for (let i = 0; i < this.cpumask.length; i++) if (i !== self && this.cpumask[i] === 1) out.push(i)
    return out
  }

  /** Insert a VMA keeping the list sorted; callers have made room. */
  insertVma(v: Vma): void {
    let i = 0
    while (i < this.vmas.length && this.vmas[i]!.start < v.start) i++
    this.vmas.splice(i, 0, v)
  }

  /**
   * Remove [start, end) from the VMA list, splitting VMAs that straddle it (Linux `__split_vma`
   * in `do_vmi_munmap`). Returns the removed pieces.
   */
  carve(start: number, end: number): Vma[] {
    const removed: Vma[] = []
    const kept: Vma[] = []
    for (const v of this.vmas) {
      if (v.end <= start || v.start >= end) {
        kept.push(v)
        continue
      }
      if (v.start < start) kept.push(makeVma(v.start, start, v.prot, v.thp))
      if (v.end > end) kept.push(makeVma(end, v.end, v.prot, v.thp))
      removed.push(makeVma(Math.max(v.start, start), Math.min(v.end, end), v.prot, v.thp))
    }
    this.vmas.length = 0
    for (const v of kept) this.insertVma(v)
    return removed
  }
}

/** Level at which the last {@link pteOffset} stopped early on a huge leaf (2 or 3), else 0. */
export let walkStoppedAt = 0
/** Level of the missing entry when the last {@link pteOffset} returned -1. */
export let walkMissingLevel = 0

/**
 * The next 2 MiB block to visit after `h` when {@link pteOffset} found no table for it: skip the
 * whole range the missing entry would have covered (range walkers stay fast over sparse spaces).
 */
export function nextBlockAfterMiss(h: number): number {
  const size = levelSize(walkMissingLevel)
  return Math.floor(h / size) * size + size
}

/**
 * Find the entry for `va` at `level` (1 = PTE, 2 = PMD) in `mm`'s tables, reading each level
 * through the direct map with 8-byte guest reads (Linux `pgd_offset` … `pte_offset_map`). With
 * `alloc`, missing tables are allocated, zeroed and linked with a compare-and-exchange
 * (`__pte_alloc`/`__pmd_alloc`: the loser of a race frees its page). Returns the physical address
 * of the entry, or -1 if a table is missing and `alloc` is false. If a huge leaf sits above
 * `level`, returns that leaf's address and sets {@link walkStoppedAt} to its level.
 */
export function* pteOffset(cpu: Cpu, mm: Mm, va: number, level: number, alloc: boolean): Routine<number> {
  const os = cpu.os
  walkStoppedAt = 0
  let table = mm.pgd
  for (let l = os.levels; l > level; l--) {
    const ea = table + ptIndex(va, l) * 8
    let lo = yield* cpu.kread64(os.directMap(ea))
    let hi = cpu.rhi
    if ((lo & PTE_P) === 0) {
      if (!alloc) {
        walkMissingLevel = l
        return -1
      }
      const pa = yield* os.allocTablePage(cpu)
      if (yield* cpu.kcmpxchg64(os.directMap(ea), lo, hi, entryLo(pa, PAGE_TABLE_LO), entryHi(pa, 0))) {
        lo = entryLo(pa, PAGE_TABLE_LO)
        hi = entryHi(pa, 0)
      } else {
        // Another vCPU populated it first (pmd_populate under the lock in Linux): use theirs.
        os.freeTablePage(cpu, pa)
        lo = cpu.rlo
        hi = cpu.rhi
      }
    } else if ((lo & PTE_PS) !== 0 && l <= 3) {
      walkStoppedAt = l
      return ea
    }
    table = entryPa(lo, hi)
  }
  return table + ptIndex(va, level) * 8
}

/**
 * Atomically replace an entry using a compare-and-exchange loop: `update(lo, hi)` returns the new
 * value in `cpu.rlo`/`cpu.rhi`… kept simple: the caller passes bits to clear and set in the low and
 * high halves (Linux `ptep_set_wrprotect` / `ptep_test_and_clear_young`, which are atomic bit ops).
 * Returns the old low half (old high half in `oldHi`), or -1 if the entry was not present and
 * `onlyPresent` is set.
 */
export function* ptepModify(cpu: Cpu, eaPa: number, clearLo: number, setLo: number, clearHi: number, setHi: number, onlyPresent: boolean): Routine<number> {
  const va = cpu.os.directMap(eaPa)
  let lo = yield* cpu.kread64(va)
  let hi = cpu.rhi
  for (;;) {
    if (onlyPresent && (lo & PTE_P) === 0) return -1
    const nlo = ((lo & ~clearLo) | setLo) >>> 0
    const nhi = ((hi & ~clearHi) | setHi) >>> 0
    if (nlo === lo && nhi === hi) break
    if (yield* cpu.kcmpxchg64(va, lo, hi, nlo, nhi)) break
    lo = cpu.rlo
    hi = cpu.rhi
  }
  modifyOldHi = hi
  return lo
}

/** High half of the entry before the last {@link ptepModify}/{@link ptepGetAndClear}. */
export let modifyOldHi = 0

/** Atomically clear an entry and return its old low half (old high half in {@link modifyOldHi}) — Linux `ptep_get_and_clear` (XCHG). */
export function* ptepGetAndClear(cpu: Cpu, eaPa: number, newLo = 0, newHi = 0): Routine<number> {
  const va = cpu.os.directMap(eaPa)
  let lo = yield* cpu.kread64(va)
  let hi = cpu.rhi
  while (!(yield* cpu.kcmpxchg64(va, lo, hi, newLo, newHi))) {
    lo = cpu.rlo
    hi = cpu.rhi
  }
  modifyOldHi = hi
  return lo
}

/** Throw a KERNEL_BUG unless `cond` holds. */
export function kassert(cond: boolean, what: string): asserts cond {
  if (!cond) throw new GuestError('KERNEL_BUG', `guest kernel invariant violated: ${what}`)
}
