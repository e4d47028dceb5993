import { EPT_PS, EPT_R, EPT_W, EPT_X, PTE_P, PTE_PS, PTE_RW, PTE_US, splitHi, splitLo } from './bits.ts'
import { HwConfigError } from './errors.ts'
import type { FrameAllocator, PhysMem } from './phys-mem.ts'

const TWO32 = 4294967296

/** Index of `va` (signed canonical or unsigned) in its paging structure at `level` (1..5). */
export function tableIndex(va: number, level: number): number {
  const hi = splitHi(va)
  const lo = splitLo(va)
  switch (level) {
    case 1: return (lo >>> 12) & 511
    case 2: return (lo >>> 21) & 511
    case 3: return ((hi & 0x7f) << 2) | (lo >>> 30)
    case 4: return (hi >>> 7) & 511
    default: return (hi >>> 16) & 511
  }
}

/** Page-table format a {@link PageTableBuilder} writes. */
export type TableFormat = 'x86' | 'ept'

/** One mapping request. Flags are raw entry bits (lo, hi) for the leaf; non-leaf flags default to fully permissive. */
export interface MapRequest {
  /** Linear (or guest-physical, for EPT/NPT) address; aligned to the page size. */
  va: number
  /** Physical address; aligned to the page size. */
  pa: number
  /** 1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB. @default 1 */
  level?: 1 | 2 | 3
  /** Leaf low-half bits (P, RW, US, A, D, G, ... / EPT R, W, X, MT, A, D). */
  leafLo: number
  /** Leaf high-half bits (XD, PK / EPT SVE). @default 0 */
  leafHi?: number
  /** Bits of newly created non-leaf entries. @default x86: P|RW|US, EPT: R|W|X */
  tableLo?: number
  tableHi?: number
}

/**
 * Builds x86 (4/5-level, also the NPT format) or EPT page tables in a {@link PhysMem}, allocating
 * table frames from a {@link FrameAllocator}. A test and tooling utility: it writes memory
 * directly, as a loader or the hypervisor would, not through a vCPU.
 */
export class PageTableBuilder {
  readonly mem: PhysMem
  readonly alloc: FrameAllocator
  readonly levels: 4 | 5
  readonly format: TableFormat
  /** Physical address of the top-level table. */
  readonly root: number

  constructor(alloc: FrameAllocator, options: { levels?: 4 | 5; format?: TableFormat } = {}) {
    this.alloc = alloc
    this.mem = alloc.mem
    this.levels = options.levels ?? 4
    this.format = options.format ?? 'x86'
    this.root = alloc.allocOrThrow() * 4096
  }

  /** Index of `va` at `level` (1..5); see {@link tableIndex}. */
  static index(va: number, level: number): number {
    return tableIndex(va, level)
  }

  /** Physical address of the entry for `va` at `level`, creating missing tables above it. */
  entryAddress(va: number, level: number, tableLo?: number, tableHi = 0): number {
    const defLo = tableLo ?? (this.format === 'ept' ? EPT_R | EPT_W | EPT_X : PTE_P | PTE_RW | PTE_US)
    let table = this.root
    for (let l = this.levels; l > level; l--) {
      const ea = table + PageTableBuilder.index(va, l) * 8
      const lo = this.mem.read32(ea)
      const present = this.format === 'ept' ? (lo & 7) !== 0 : (lo & PTE_P) !== 0
      const large = (lo & (this.format === 'ept' ? EPT_PS : PTE_PS)) !== 0 && l <= 3
      if (!present || large) {
        const frame = this.alloc.allocOrThrow()
        this.mem.write64(ea, (frame * 4096 + (defLo & 0xfff)) >>> 0, (Math.floor((frame * 4096) / TWO32) | tableHi) >>> 0)
        table = frame * 4096
      } else {
        table = ((lo & 0xfffff000) >>> 0) + (this.mem.read32(ea + 4) & 0xfffff) * TWO32
      }
    }
    return table + PageTableBuilder.index(va, level) * 8
  }

  /** Map one page; returns the physical address of its leaf entry. */
  map(req: MapRequest): number {
    const level = req.level ?? 1
    const size = level === 1 ? 4096 : level === 2 ? 2 ** 21 : 2 ** 30
    if (req.pa % size !== 0 || (req.va % size !== 0 && (req.va + 2 ** 60) % size !== 0)) {
      throw new HwConfigError(`map: va 0x${req.va.toString(16)} and pa 0x${req.pa.toString(16)} must be aligned to the page size ${String(size)}`)
    }
    const ea = this.entryAddress(req.va, level, req.tableLo, req.tableHi)
    const ps = level > 1 ? (this.format === 'ept' ? EPT_PS : PTE_PS) : 0
    const paLo = req.pa % TWO32
    const paHi = Math.floor(req.pa / TWO32)
    this.mem.write64(ea, ((paLo & 0xfffff000) | (req.leafLo & 0xfff) | ps | (req.leafLo & ~0xfff & (level > 1 ? 0x1000 : 0))) >>> 0, (paHi | (req.leafHi ?? 0)) >>> 0)
    return ea
  }

  /** Map `count` consecutive 4 KiB pages. */
  mapRange(va: number, pa: number, count: number, leafLo: number, leafHi = 0): void {
    for (let i = 0; i < count; i++) this.map({ va: va + i * 4096, pa: pa + i * 4096, leafLo, leafHi })
  }

  /** Identity-map [0, bytes) with pages of `level` (EPT or x86), e.g. an EPT for a whole guest. */
  identity(bytes: number, level: 1 | 2 | 3, leafLo: number, leafHi = 0): void {
    const size = level === 1 ? 4096 : level === 2 ? 2 ** 21 : 2 ** 30
    for (let a = 0; a < bytes; a += size) this.map({ va: a, pa: a, level, leafLo, leafHi })
  }
}
