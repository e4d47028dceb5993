/**
 * The host side of guest memory: a host physical memory, a buddy frame allocator that can hand out
 * 2 MiB- and 1 GiB-aligned runs, VMAs, and a host page table HVA → HPA at 4K / 2M (THP) / 1G
 * (hugetlb) granularity, filled on demand the way KVM's `hva_to_pfn` (GUP) faults pages in.
 * Host mm operations that change the page table (munmap, mprotect, migration, THP split) run the
 * MMU-notifier protocol around the change (`mmu_notifier_invalidate_range_start` → change →
 * `..._end`); aging calls `clear_flush_young` / `test_young`.
 *
 * Simplifications (documented, deliberate): a read fault allocates a private page like a write
 * fault (no shared zero page, so no CoW break later); THP collapse (khugepaged), swap and NUMA are
 * not modelled; writability is a VMA property (mprotect changes the VMA, with the notifier).
 */
import { alignDown, MmusimError, PhysMem } from '@mmusim/x86-hw'
import { KvmError } from './errors.ts'
import type { MmuNotifierOps } from './mmu-notifier.ts'
import type { KernelOp } from './sched/index.ts'
import { TASK_SIZE_MAX } from './memslot.ts'
import { RegionTables } from './pfn-map.ts'

const PAGE = 4096
const SIZE_2M = 0x200000
const SIZE_1G = 0x40000000
/** Buddy order of a 2 MiB run (512 frames). */
export const ORDER_2M = 9
/** Buddy order of a 1 GiB run (262144 frames). */
export const ORDER_1G = 18
const MAX_ORDER = ORDER_1G

/** Host mapping levels, as KVM's `PG_LEVEL_*`. */
export const PG_LEVEL_4K = 1
export const PG_LEVEL_2M = 2
export const PG_LEVEL_1G = 3

/** `-EFAULT`: what KVM's GUP path (`KVM_PFN_ERR_FAULT`) turns any failure into. */
export const HOST_EFAULT = -14

/** Counters of a {@link BuddyFrameAllocator}. */
export interface BuddyStats {
  /** Frames currently allocated. */
  allocated: number
  /** Frames currently free. */
  free: number
  /** Successful allocations per order 0 / 9 / 18 (others counted in `otherOrders`). */
  allocs4k: number
  allocs2m: number
  allocs1g: number
  otherOrders: number
  failures: number
}

/**
 * A deterministic binary-buddy allocator over frames [firstFrame, firstFrame + count) of a
 * {@link PhysMem} (mm/page_alloc.c in miniature): `allocOrder(k)` returns a 2^k-frame run aligned
 * to 2^k frames (absolute frame numbers, so HPAs are aligned too), or -1. Blocks may be freed
 * piecewise (a 2M run freed as 512 single frames coalesces back). Freed frames are zeroed, or
 * poisoned so a stale access throws.
 */
export class BuddyFrameAllocator {
  readonly mem: PhysMem
  readonly firstFrame: number
  readonly count: number
  private readonly freeLists: number[][] = []
  /** Per frame (relative): order of the free block it heads, or -1. */
  private readonly headOrder: Int8Array
  private readonly inUse: Uint8Array
  readonly stats: BuddyStats

  constructor(mem: PhysMem, firstFrame = 0, count = mem.frameCount - firstFrame) {
    if (!Number.isInteger(firstFrame) || !Number.isInteger(count) || firstFrame < 0 || count <= 0 || firstFrame + count > mem.frameCount) {
      throw new KvmError('EINVAL', `BuddyFrameAllocator range [${firstFrame}, ${firstFrame + count}) does not fit ${mem.name} memory of ${mem.frameCount} frames`)
    }
    this.mem = mem
    this.firstFrame = firstFrame
    this.count = count
    this.headOrder = new Int8Array(count).fill(-1)
    this.inUse = new Uint8Array(count)
    for (let o = 0; o <= MAX_ORDER; o++) this.freeLists.push([])
    this.stats = { allocated: 0, free: count, allocs4k: 0, allocs2m: 0, allocs1g: 0, otherOrders: 0, failures: 0 }
    // Carve the range into maximal aligned blocks, low addresses first. Lists are stacks, so push
    // in reverse to pop the lowest block first (deterministic, low-address-first allocation).
    const blocks: [number, number][] = []
    let f = firstFrame
    const end = firstFrame + count
    while (f < end) {
      let o = MAX_ORDER
      while (o > 0 && (f % 2 ** o !== 0 || f + 2 ** o > end)) o--
      blocks.push([f, o])
      f += 2 ** o
    }
    for (let i = blocks.length - 1; i >= 0; i--) this.pushFree(blocks[i]![0], blocks[i]![1])
  }

  private pushFree(frame: number, order: number): void {
    this.headOrder[frame - this.firstFrame] = order
    this.freeLists[order]!.push(frame)
  }

  /** Pop a valid free block of exactly `order` (lazy deletion: stale entries are skipped). */
  private popFree(order: number): number {
    const list = this.freeLists[order]!
    while (list.length > 0) {
      const f = list.pop()!
      if (this.headOrder[f - this.firstFrame] === order) {
        this.headOrder[f - this.firstFrame] = -1
        return f
      }
    }
    return -1
  }

  /** Allocate an aligned run of 2^order zeroed frames; -1 when no such run is free. */
  allocOrder(order: number): number {
    let k = order
    let f = -1
    for (; k <= MAX_ORDER; k++) {
      f = this.popFree(k)
      if (f >= 0) break
    }
    if (f < 0) {
      this.stats.failures++
      return -1
    }
    // `1 << k`, not `2 ** k` (a pow() call with a variable exponent): k ≤ MAX_ORDER.
    while (k > order) {
      k--
      this.pushFree(f + (1 << k), k) // upper half back to the free list
    }
    const n = 1 << order
    const mem = this.mem
    for (let i = 0; i < n; i++) {
      this.inUse[f - this.firstFrame + i] = 1
      if (mem.isPoisoned(f + i)) mem.unpoison(f + i)
    }
    this.stats.allocated += n
    this.stats.free -= n
    if (order === 0) this.stats.allocs4k++
    else if (order === ORDER_2M) this.stats.allocs2m++
    else if (order === ORDER_1G) this.stats.allocs1g++
    else this.stats.otherOrders++
    return f
  }

  /** Allocate one frame; -1 when exhausted. */
  alloc(): number {
    return this.allocOrder(0)
  }

  /** Free a run of 2^order frames starting at `frame` (each must be allocated). */
  freeOrder(frame: number, order: number, options?: { poison?: boolean }): void {
    const n = 2 ** order
    for (let i = 0; i < n; i++) {
      const r = frame + i - this.firstFrame
      if (!Number.isInteger(r) || r < 0 || r >= this.count) {
        throw new MmusimError('FRAME_OUT_OF_RANGE', `free of frame 0x${(frame + i).toString(16)} outside this allocator`)
      }
      if (this.inUse[r] === 0) {
        throw new MmusimError('DOUBLE_FREE', `frame 0x${(frame + i).toString(16)} freed twice (or never allocated)`)
      }
    }
    for (let i = 0; i < n; i++) {
      this.inUse[frame + i - this.firstFrame] = 0
      if (options?.poison === true) this.mem.poison(frame + i)
      else if (this.mem.isBacked(frame + i)) this.mem.zeroFrame(frame + i)
    }
    this.stats.allocated -= n
    this.stats.free += n
    // Coalesce with free buddies.
    let f = frame
    let o = order
    while (o < MAX_ORDER) {
      const buddy = f % 2 ** (o + 1) === 0 ? f + 2 ** o : f - 2 ** o
      const br = buddy - this.firstFrame
      if (br < 0 || br >= this.count || this.headOrder[br] !== o) break
      this.headOrder[br] = -1 // lazily removed from its list
      f = Math.min(f, buddy)
      o++
    }
    this.pushFree(f, o)
  }

  /** Free one frame. */
  free(frame: number, options?: { poison?: boolean }): void {
    this.freeOrder(frame, 0, options)
  }

  /** Whether `frame` is allocated. */
  isAllocated(frame: number): boolean {
    const r = frame - this.firstFrame
    return r >= 0 && r < this.count && this.inUse[r] === 1
  }
}

/** mmap options of a {@link HostMemory} VMA. */
export interface MmapOptions {
  /** Transparent huge pages (`MADV_HUGEPAGE`): 2M-aligned parts may be backed by 2 MiB runs. */
  thp?: boolean
  /** hugetlbfs with 1 GiB pages: hva and size must be 1 GiB-aligned; every fault maps 1 GiB. */
  hugetlb1G?: boolean
  /** `PROT_READ` only. */
  readonly?: boolean
}

/** A VMA (`struct vm_area_struct`, the part that matters here). [start, end) in bytes. */
export interface Vma {
  start: number
  end: number
  thp: boolean
  hugetlb1G: boolean
  readonly: boolean
}

/**
 * `v`'s flags over [start, end). Field by field (not `{ ...v, end }`): V8 gives objects made by a
 * spread plus further properties a new hidden class once the site is optimized, and the fault
 * path that reads VMAs then deoptimizes.
 */
function vmaPart(v: Vma, start: number, end: number): Vma {
  return { start, end, thp: v.thp, hugetlb1G: v.hugetlb1G, readonly: v.readonly }
}

/** A successful {@link HostMemory.resolve}. */
export interface HostPfn {
  ok: true
  /** Host frame number of the 4K page containing the HVA. */
  pfn: number
  /** Host physical address of that 4K page (pfn · 4096). */
  hpa: number
  /** Whether the host mapping allows writes (KVM's `writable` out-parameter of `hva_to_pfn`). */
  writable: boolean
  /** Host mapping size: 1 = 4K, 2 = 2M (THP), 3 = 1G. */
  level: number
}

/** Why a {@link HostMemory.resolve} failed (KVM sees `KVM_PFN_ERR_FAULT` for all). */
export type HostFaultReason = 'no-vma' | 'readonly' | 'oom'

/** A failed {@link HostMemory.resolve}: a value, never a throw (the guest caused it). */
export interface HostFault {
  ok: false
  /** {@link HOST_EFAULT}. */
  errno: number
  reason: HostFaultReason
}

/** Counters of a {@link HostMemory}. */
export interface HostMemoryStats {
  /** resolve() calls. */
  resolves: number
  /** resolve() calls that had to fault a page in. */
  demandFaults: number
  /** Faults backed by a fresh 4K frame. */
  pages4k: number
  /** Faults backed by a fresh 2M THP. */
  thpPages: number
  /** THP-eligible faults that fell back to 4K (no aligned 512-frame run free, or 4K pages already there). */
  thpFallbacks: number
  /** Faults backed by a 1G hugetlb page. */
  hugetlbPages: number
  /** Failed resolves. */
  faults: number
  migrations: number
  thpSplits: number
  /** invalidate_range_start calls made to subscribers (nested ones included). */
  notifierInvalidations: number
}

/** Options of a {@link HostMemory}. */
export interface HostMemoryOptions {
  /** An existing host memory to carve frames from; else a new one of `sizeBytes`. */
  mem?: PhysMem
  /** Size of a new host memory. @default 1 GiB */
  sizeBytes?: number
  /** First host frame this allocator manages. @default 0 */
  firstFrame?: number
  /** Frames it manages. @default all from firstFrame */
  frameCount?: number
  /** Poison frames freed by munmap/migration so stale SPTEs are caught. @default true */
  poisonFreed?: boolean
}

/**
 * A notifier phase a host operation's body asks its driver to run for every subscriber:
 * `invalidate_range_start` or `invalidate_range_end` over HVAs [start, end).
 */
interface InvalidateCall {
  phase: 'start' | 'end'
  start: number
  end: number
}

/**
 * The body of a host operation, written once: it yields each notifier phase and gets control back
 * when every subscriber has run it. {@link HostMemory} drives it synchronously (the classic API,
 * the caller holds the subscribers' locks) or as a {@link KernelOp} whose phases are the
 * subscribers' `*Op` methods (the `*Op` API, which may yield inside the phases).
 */
type HostSteps<R> = Generator<InvalidateCall, R, void>

/**
 * The host's 4K mappings: per 2 MiB region a 512-entry table of pfn + 1 (0: unmapped) with the
 * region's mapped count in entry 512, found through a Map by region plus a one-region cache (a
 * populate walks one region at a time). A Map entry per 4K page was most of hva_to_pfn's cost.
 */
class Pte4kTables extends RegionTables<Int32Array> {
  /** Mapped 4K pages in all regions. */
  size = 0

  /** pfn mapped at vpn, or -1. */
  get(vpn: number): number {
    // vpn exceeds 2^31 (HVAs are near 2^47): `vpn % 512` would be a floating-point remainder.
    const region = Math.floor(vpn / 512)
    const t = this.table(region)
    return t === undefined ? -1 : t[vpn - region * 512]! - 1
  }

  /** Map vpn to pfn (replacing any mapping). */
  set(vpn: number, pfn: number): void {
    const region = Math.floor(vpn / 512)
    let t = this.table(region)
    if (t === undefined) {
      t = new Int32Array(513)
      this.addTable(region, t)
    }
    const i = vpn - region * 512
    if (t[i] === 0) {
      t[512]!++
      this.size++
    }
    t[i] = pfn + 1
  }

  /** Unmap vpn; returns its pfn or -1. */
  delete(vpn: number): number {
    const region = Math.floor(vpn / 512)
    const t = this.table(region)
    if (t === undefined) return -1
    const i = vpn - region * 512
    const v = t[i]!
    if (v === 0) return -1
    t[i] = 0
    this.size--
    t[512] = t[512]! - 1
    if (t[512] === 0) this.dropTable(region)
    return v - 1
  }

  /** 4K mappings inside the 2 MiB region (one with any cannot get a THP). */
  countIn(region: number): number {
    const t = this.table(region)
    return t === undefined ? 0 : t[512]!
  }

  /** The mapped vpns in [first, last), ascending. */
  mappedIn(first: number, last: number): number[] {
    const out: number[] = []
    if (last <= first) return out
    const r0 = Math.floor(first / 512)
    const r1 = Math.floor((last - 1) / 512)
    const visit = (r: number): void => {
      const t = this.regions.get(r)
      if (t === undefined) return
      const lo = Math.max(first, r * 512)
      const hi = Math.min(last, r * 512 + 512)
      for (let vpn = lo; vpn < hi; vpn++) if (t[vpn - r * 512] !== 0) out.push(vpn)
    }
    if (r1 - r0 + 1 <= this.regions.size) for (let r = r0; r <= r1; r++) visit(r)
    else for (const r of [...this.regions.keys()].filter((x) => x >= r0 && x <= r1).sort((a, b) => a - b)) visit(r)
    return out
  }
}

/**
 * A host process address space backing guest memory: VMAs, demand-faulted host page table and
 * MMU-notifier subscribers (each VM registers its {@link KvmMmuNotifier}).
 */
export class HostMemory {
  readonly mem: PhysMem
  readonly frames: BuddyFrameAllocator
  readonly stats: HostMemoryStats = {
    resolves: 0,
    demandFaults: 0,
    pages4k: 0,
    thpPages: 0,
    thpFallbacks: 0,
    hugetlbPages: 0,
    faults: 0,
    migrations: 0,
    thpSplits: 0,
    notifierInvalidations: 0,
  }
  private readonly vmas: Vma[] = []
  /** {@link findVma}'s cache. */
  private lastVma: Vma | null = null
  /** hva / 4K → pfn. */
  private readonly pt4k = new Pte4kTables()
  /** hva / 2M → first pfn of a 2M run. */
  private readonly pt2m = new Map<number, number>()
  /** hva / 1G → first pfn of a 1G run. */
  private readonly pt1g = new Map<number, number>()
  private readonly subscribers: MmuNotifierOps[] = []
  private readonly poisonFreed: boolean

  constructor(options: HostMemoryOptions = {}) {
    this.mem = options.mem ?? new PhysMem({ sizeBytes: options.sizeBytes ?? SIZE_1G, name: 'host' })
    this.frames = new BuddyFrameAllocator(this.mem, options.firstFrame ?? 0, options.frameCount)
    this.poisonFreed = options.poisonFreed ?? true
  }

  /** `mmu_notifier_register`: the subscriber will see every later event. */
  registerNotifier(ops: MmuNotifierOps): void {
    this.subscribers.push(ops)
  }

  /** `mmu_notifier_unregister` (calls `release`). */
  unregisterNotifier(ops: MmuNotifierOps): void {
    const i = this.subscribers.indexOf(ops)
    if (i >= 0) {
      this.subscribers.splice(i, 1)
      ops.release?.()
    }
  }

  /** The VMAs, sorted by start (copies). */
  listVmas(): Vma[] {
    return this.vmas.map((v) => ({ ...v }))
  }

  /** `find_vma`-like: the VMA containing hva, or undefined. */
  findVma(hva: number): Vma | undefined {
    // The last VMA found (hva_to_pfn hits the same one fault after fault); dropped whenever the
    // VMA list changes shape.
    const last = this.lastVma
    if (last !== null && hva >= last.start && hva < last.end) return last
    for (const v of this.vmas) {
      if (hva < v.start) return undefined
      if (hva < v.end) {
        this.lastVma = v
        return v
      }
    }
    return undefined
  }

  private checkRange(fn: string, hva: number, size: number): void {
    if (!Number.isSafeInteger(hva) || !Number.isSafeInteger(size) || hva < 0 || size <= 0 || hva % PAGE !== 0 || size % PAGE !== 0) {
      throw new KvmError('EINVAL', `${fn}: address 0x${hva.toString(16)} and length 0x${size.toString(16)} must be positive and 4096-aligned`)
    }
    if (hva + size > TASK_SIZE_MAX) {
      throw new KvmError('EINVAL', `${fn}: [0x${hva.toString(16)}, 0x${(hva + size).toString(16)}) goes above TASK_SIZE_MAX 0x${TASK_SIZE_MAX.toString(16)}`)
    }
  }

  /**
   * `mmap(hva, size, PROT_READ[|PROT_WRITE], MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED_NOREPLACE)`:
   * reserve a VMA; nothing is allocated until {@link resolve}. EINVAL: misaligned, zero, beyond
   * TASK_SIZE_MAX, hugetlb1G not 1G-aligned, thp together with hugetlb1G; EEXIST: overlaps a VMA.
   */
  mmap(hva: number, size: number, options: MmapOptions = {}): void {
    this.checkRange('mmap', hva, size)
    const hugetlb1G = options.hugetlb1G ?? false
    const thp = options.thp ?? false
    if (hugetlb1G && (hva % SIZE_1G !== 0 || size % SIZE_1G !== 0)) {
      throw new KvmError('EINVAL', `mmap: a 1 GiB hugetlb mapping needs a 1 GiB-aligned address and length, got 0x${hva.toString(16)}+0x${size.toString(16)}`)
    }
    if (hugetlb1G && thp) throw new KvmError('EINVAL', 'mmap: thp and hugetlb1G are exclusive (hugetlbfs VMAs never use THP)')
    for (const v of this.vmas) {
      if (v.start < hva + size && hva < v.end) {
        throw new KvmError('EEXIST', `mmap: [0x${hva.toString(16)}, 0x${(hva + size).toString(16)}) overlaps the VMA [0x${v.start.toString(16)}, 0x${v.end.toString(16)}) (MAP_FIXED_NOREPLACE)`)
      }
    }
    this.vmas.push({ start: hva, end: hva + size, thp, hugetlb1G, readonly: options.readonly ?? false })
    this.vmas.sort((a, b) => a.start - b.start)
    this.lastVma = null
  }

  /** The pfn mapped at hva and its level, without faulting anything in; null if unmapped. */
  lookup(hva: number): { pfn: number; level: number } | null {
    const pfn = this.lookupPfn(hva)
    return pfn < 0 ? null : { pfn, level: this.outLevel }
  }

  /** {@link lookup} without allocating: the pfn (level in `outLevel`), or -1 if unmapped. */
  lookupPfn(hva: number): number {
    // `hva - g * SIZE` rather than `hva % SIZE`: HVAs are beyond 2^31, where % is a C call.
    if (this.pt1g.size > 0) {
      const g = Math.floor(hva / SIZE_1G)
      const p1 = this.pt1g.get(g)
      if (p1 !== undefined) {
        this.outLevel = PG_LEVEL_1G
        return p1 + Math.floor((hva - g * SIZE_1G) / PAGE)
      }
    }
    if (this.pt2m.size > 0) {
      const r = Math.floor(hva / SIZE_2M)
      const p2 = this.pt2m.get(r)
      if (p2 !== undefined) {
        this.outLevel = PG_LEVEL_2M
        return p2 + Math.floor((hva - r * SIZE_2M) / PAGE)
      }
    }
    const p = this.pt4k.get(Math.floor(hva / PAGE))
    if (p < 0) return -1
    this.outLevel = PG_LEVEL_4K
    return p
  }

  /** Mapping level of the last successful {@link resolvePfn} or lookup (1 = 4K, 2 = 2M, 3 = 1G). */
  outLevel = PG_LEVEL_4K
  /** Whether the host mapping of the last successful {@link resolvePfn} allows writes. */
  outWritable = false
  /** Why the last failed {@link resolvePfn} failed. */
  outReason: HostFaultReason = 'no-vma'

  /**
   * `host_pfn_mapping_level` (mmu.c): the size of the host mapping of hva (1 = 4K, 2 = 2M, 3 = 1G);
   * an unmapped hva reports 4K, as the kernel's walk does.
   */
  hostMappingLevel(hva: number): number {
    return this.lookupPfn(hva) < 0 ? PG_LEVEL_4K : this.outLevel
  }

  /**
   * `hva_to_pfn` (GUP): the host page behind hva, faulting it in on first use. Writes to a
   * read-only VMA, and HVAs outside any VMA, fail with a {@link HostFault} (-EFAULT); so does an
   * exhausted host memory. A THP VMA backs a 2M-aligned region lying wholly inside it with one
   * aligned 512-frame run when one is free and no 4K page is already mapped there.
   */
  resolve(hva: number, write: boolean): HostPfn | HostFault {
    const pfn = this.resolvePfn(hva, write)
    if (pfn < 0) return { ok: false, errno: HOST_EFAULT, reason: this.outReason }
    return { ok: true, pfn, hpa: pfn * PAGE, writable: this.outWritable, level: this.outLevel }
  }

  /**
   * {@link resolve} without allocating, for the page-fault path: returns the pfn and leaves the
   * mapping's writability and level in {@link outWritable} / {@link outLevel}, or returns
   * {@link HOST_EFAULT} with the reason in {@link outReason}. Same effects and stats as resolve.
   */
  resolvePfn(hva: number, write: boolean): number {
    this.stats.resolves++
    const vma = this.findVma(hva)
    if (vma === undefined) return this.fault('no-vma')
    if (write && vma.readonly) return this.fault('readonly')
    this.outWritable = !vma.readonly
    const hit = this.lookupPfn(hva)
    if (hit >= 0) return hit
    this.stats.demandFaults++
    if (vma.hugetlb1G) {
      const f = this.frames.allocOrder(ORDER_1G)
      if (f < 0) return this.fault('oom')
      this.pt1g.set(Math.floor(hva / SIZE_1G), f)
      this.stats.hugetlbPages++
      this.outLevel = PG_LEVEL_1G
      return f + Math.floor((hva % SIZE_1G) / PAGE)
    }
    if (vma.thp) {
      const base = alignDown(hva, SIZE_2M)
      const region = base / SIZE_2M
      if (base >= vma.start && base + SIZE_2M <= vma.end && this.pt4k.countIn(region) === 0) {
        const f = this.frames.allocOrder(ORDER_2M)
        if (f >= 0) {
          this.pt2m.set(region, f)
          this.stats.thpPages++
          this.outLevel = PG_LEVEL_2M
          return f + Math.floor((hva - base) / PAGE)
        }
        this.stats.thpFallbacks++
      } else if (base >= vma.start && base + SIZE_2M <= vma.end) {
        this.stats.thpFallbacks++
      }
    }
    const f = this.frames.alloc()
    if (f < 0) return this.fault('oom')
    this.map4k(Math.floor(hva / PAGE), f)
    this.stats.pages4k++
    this.outLevel = PG_LEVEL_4K
    return f
  }

  private fault(reason: HostFaultReason): number {
    this.stats.faults++
    this.outReason = reason
    return HOST_EFAULT
  }

  private map4k(vpn: number, pfn: number): void {
    this.pt4k.set(vpn, pfn)
  }

  private unmap4k(vpn: number): number | undefined {
    const pfn = this.pt4k.delete(vpn)
    return pfn < 0 ? undefined : pfn
  }

  // ---- notifier plumbing ----

  /** Run a host operation's body, calling the subscribers' synchronous notifier methods. */
  private runSync<R>(steps: HostSteps<R>): R {
    for (;;) {
      const r = steps.next()
      if (r.done === true) return r.value
      const c = r.value
      if (c.phase === 'start') {
        this.stats.notifierInvalidations++
        for (const s of this.subscribers) s.invalidateRangeStart(c.start, c.end, true)
      } else {
        for (const s of this.subscribers) s.invalidateRangeEnd(c.start, c.end)
      }
    }
  }

  /**
   * Run a host operation's body as a kernel operation: each notifier phase runs the subscribers'
   * `invalidateRangeStartOp` / `invalidateRangeEndOp` (which take their locks themselves and may
   * yield, `may_block`), or their synchronous methods when they have none.
   */
  private *runOp<R>(steps: HostSteps<R>): KernelOp<R> {
    for (;;) {
      const r = steps.next()
      if (r.done === true) return r.value
      const c = r.value
      if (c.phase === 'start') {
        this.stats.notifierInvalidations++
        for (const s of this.subscribers) {
          if (s.invalidateRangeStartOp !== undefined) yield* s.invalidateRangeStartOp(c.start, c.end, true)
          else s.invalidateRangeStart(c.start, c.end, true)
        }
      } else {
        for (const s of this.subscribers) {
          if (s.invalidateRangeEndOp !== undefined) yield* s.invalidateRangeEndOp(c.start, c.end)
          else s.invalidateRangeEnd(c.start, c.end)
        }
      }
    }
  }

  /** `__split_huge_pmd`: replace the 2M mapping of region by 512 4K mappings of the same frames, inside its own notifier range. */
  private *splitRegion(region: number): HostSteps<void> {
    const f = this.pt2m.get(region)
    if (f === undefined) return
    const start = region * SIZE_2M
    yield { phase: 'start', start, end: start + SIZE_2M }
    this.pt2m.delete(region)
    for (let i = 0; i < 512; i++) this.map4k(region * 512 + i, f + i)
    this.stats.thpSplits++
    yield { phase: 'end', start, end: start + SIZE_2M }
  }

  /**
   * Split a THP (`split_huge_pmd`): if hva is mapped by a 2M page, it becomes 512 4K mappings of
   * the same frames, with an invalidate_range_start/end over the 2M range. Returns whether a split
   * happened.
   */
  splitThp(hva: number): boolean {
    return this.runSync(this.splitThpSteps(hva))
  }

  /** {@link splitThp} as a kernel operation whose notifier phases may yield (see {@link munmapOp}). */
  splitThpOp(hva: number): KernelOp<boolean> {
    return this.runOp(this.splitThpSteps(hva))
  }

  private *splitThpSteps(hva: number): HostSteps<boolean> {
    const region = Math.floor(hva / SIZE_2M)
    if (!this.pt2m.has(region)) return false
    yield* this.splitRegion(region)
    return true
  }

  /** Split any THP straddling `addr` (a range boundary), as change/zap of a partial PMD does. */
  private *splitAt(addr: number): HostSteps<void> {
    if (addr % SIZE_2M !== 0) yield* this.splitRegion(Math.floor(addr / SIZE_2M))
  }

  private checkHugetlbAlignment(fn: string, start: number, end: number): void {
    for (const v of this.vmas) {
      if (!v.hugetlb1G || v.end <= start || v.start >= end) continue
      if (Math.max(start, v.start) % SIZE_1G !== 0 || Math.min(end, v.end) % SIZE_1G !== 0) {
        throw new KvmError('EINVAL', `${fn}: a 1 GiB hugetlb VMA can only be changed in 1 GiB-aligned pieces`)
      }
    }
  }

  /** Split the VMA containing `addr` (strictly inside it) into two at `addr` (`split_vma`). */
  private splitVmasAt(addr: number): void {
    const i = this.vmas.findIndex((v) => v.start < addr && addr < v.end)
    if (i < 0) return
    const v = this.vmas[i]!
    this.vmas.splice(i, 1, vmaPart(v, v.start, addr), vmaPart(v, addr, v.end))
    this.lastVma = null
  }

  private overlapsAnyVma(start: number, end: number): boolean {
    return this.vmas.some((v) => v.start < end && start < v.end)
  }

  private forEachMapped4k(start: number, end: number, fn: (vpn: number) => void): void {
    for (const vpn of this.pt4k.mappedIn(start / PAGE, end / PAGE)) fn(vpn)
  }

  /**
   * `munmap(hva, size)`: invalidate_range_start over [hva, hva + size); THPs cut by the range are
   * split first (each with its own nested notifier range, as `__split_huge_pmd` does); mapped pages
   * are freed (poisoned); then invalidate_range_end and the VMAs are clipped. Unmapping a range
   * with no VMA does nothing (and fires no notifier). EINVAL: misaligned or zero length, or a
   * hugetlb VMA cut at a non-1G boundary.
   */
  munmap(hva: number, size: number): void {
    this.runSync(this.munmapSteps(hva, size))
  }

  /**
   * {@link munmap} as a kernel operation: the same body, but each notifier phase runs the
   * subscribers' `*Op` methods, which take their locks themselves and may yield (KVM's unmap with
   * `may_block`), so other threads run between invalidate_range_start and the page-table change.
   */
  munmapOp(hva: number, size: number): KernelOp {
    return this.runOp(this.munmapSteps(hva, size))
  }

  private *munmapSteps(hva: number, size: number): HostSteps<void> {
    this.checkRange('munmap', hva, size)
    const start = hva
    const end = hva + size
    this.checkHugetlbAlignment('munmap', start, end)
    if (!this.overlapsAnyVma(start, end)) return
    yield { phase: 'start', start, end }
    yield* this.splitAt(start)
    yield* this.splitAt(end)
    const poison = this.poisonFreed
    for (const [g, f] of [...this.pt1g]) {
      if (g * SIZE_1G >= start && (g + 1) * SIZE_1G <= end) {
        this.pt1g.delete(g)
        this.frames.freeOrder(f, ORDER_1G, { poison })
      }
    }
    for (const [r, f] of [...this.pt2m]) {
      if (r * SIZE_2M >= start && (r + 1) * SIZE_2M <= end) {
        this.pt2m.delete(r)
        this.frames.freeOrder(f, ORDER_2M, { poison })
      }
    }
    this.forEachMapped4k(start, end, (vpn) => {
      const f = this.unmap4k(vpn)!
      this.frames.free(f, { poison })
    })
    // The VMAs go before invalidate_range_end, so no demand fault can map a page in the range
    // while the end phase waits for its locks (mmap_lock is not modelled).
    this.splitVmasAt(start)
    this.splitVmasAt(end)
    for (let i = this.vmas.length - 1; i >= 0; i--) {
      const v = this.vmas[i]!
      if (v.start >= start && v.end <= end) {
        this.vmas.splice(i, 1)
        this.lastVma = null
      }
    }
    yield { phase: 'end', start, end }
  }

  /**
   * `mprotect(hva, size, readonly ? PROT_READ : PROT_READ|PROT_WRITE)`: invalidate_range_start,
   * split THPs cut by the range, change the VMAs' protection, invalidate_range_end. ENOMEM when
   * part of the range is not mapped by a VMA (as Linux); EINVAL as for munmap.
   */
  mprotect(hva: number, size: number, readonly: boolean): void {
    this.runSync(this.mprotectSteps(hva, size, readonly))
  }

  /** {@link mprotect} as a kernel operation whose notifier phases may yield (see {@link munmapOp}). */
  mprotectOp(hva: number, size: number, readonly: boolean): KernelOp {
    return this.runOp(this.mprotectSteps(hva, size, readonly))
  }

  private *mprotectSteps(hva: number, size: number, readonly: boolean): HostSteps<void> {
    this.checkRange('mprotect', hva, size)
    const start = hva
    const end = hva + size
    let covered = start
    for (const v of this.vmas) {
      if (v.end <= covered) continue
      if (v.start > covered) break
      covered = v.end
      if (covered >= end) break
    }
    if (covered < end) {
      throw new KvmError('ENOMEM', `mprotect: [0x${start.toString(16)}, 0x${end.toString(16)}) is not entirely mapped (unmapped from 0x${covered.toString(16)})`)
    }
    this.checkHugetlbAlignment('mprotect', start, end)
    yield { phase: 'start', start, end }
    yield* this.splitAt(start)
    yield* this.splitAt(end)
    this.splitVmasAt(start)
    this.splitVmasAt(end)
    for (const v of this.vmas) if (v.start >= start && v.end <= end) v.readonly = readonly
    yield { phase: 'end', start, end }
  }

  /**
   * Migrate the page mapping hva (`migrate_pages` of one folio: the whole THP / hugetlb page it
   * belongs to): allocate the target first (nothing happens if none is free), then
   * invalidate_range_start over the folio, copy the data, switch the mapping, free (poison) the
   * old frames, invalidate_range_end. Returns the old and new pfn of hva's 4K page, or null.
   */
  migratePage(hva: number): { oldPfn: number; newPfn: number } | null {
    return this.runSync(this.migratePageSteps(hva))
  }

  /** {@link migratePage} as a kernel operation whose notifier phases may yield (see {@link munmapOp}). */
  migratePageOp(hva: number): KernelOp<{ oldPfn: number; newPfn: number } | null> {
    return this.runOp(this.migratePageSteps(hva))
  }

  private *migratePageSteps(hva: number): HostSteps<{ oldPfn: number; newPfn: number } | null> {
    const g = Math.floor(hva / SIZE_1G)
    const r = Math.floor(hva / SIZE_2M)
    const vpn = Math.floor(hva / PAGE)
    let order: number
    let base: number
    let oldFirst: number
    if (this.pt1g.has(g)) {
      order = ORDER_1G
      base = g * SIZE_1G
      oldFirst = this.pt1g.get(g)!
    } else if (this.pt2m.has(r)) {
      order = ORDER_2M
      base = r * SIZE_2M
      oldFirst = this.pt2m.get(r)!
    } else if (this.pt4k.get(vpn) >= 0) {
      order = 0
      base = vpn * PAGE
      oldFirst = this.pt4k.get(vpn)
    } else return null
    const n = 2 ** order
    const newFirst = this.frames.allocOrder(order)
    if (newFirst < 0) return null
    const end = base + n * PAGE
    yield { phase: 'start', start: base, end }
    for (let i = 0; i < n; i++) if (this.mem.isBacked(oldFirst + i)) this.mem.copyFrame(oldFirst + i, newFirst + i)
    if (order === ORDER_1G) this.pt1g.set(g, newFirst)
    else if (order === ORDER_2M) this.pt2m.set(r, newFirst)
    else this.pt4k.set(vpn, newFirst)
    this.frames.freeOrder(oldFirst, order, { poison: this.poisonFreed })
    this.stats.migrations++
    yield { phase: 'end', start: base, end }
    const off = Math.floor((hva - base) / PAGE)
    return { oldPfn: oldFirst + off, newPfn: newFirst + off }
  }

  /**
   * Age [hva, hva + size) (`ptep_clear_flush_young_notify` / `mmu_notifier_clear_flush_young`):
   * asks every subscriber to clear its Accessed state; returns whether any reported young.
   */
  age(hva: number, size: number): boolean {
    let young = false
    for (const s of this.subscribers) if (s.clearFlushYoung(hva, hva + size)) young = true
    return young
  }

  /** `mmu_notifier_test_young(mm, hva)`: whether any subscriber reports hva young. */
  testYoung(hva: number): boolean {
    let young = false
    for (const s of this.subscribers) if (s.testYoung(hva)) young = true
    return young
  }

  /** Read a 32-bit word at hva through the host page table (faulting it in). Throws on a host fault (API misuse). */
  read32(hva: number): number {
    const r = this.resolve(hva, false)
    if (!r.ok) throw new KvmError('EFAULT', `read32: host fault at 0x${hva.toString(16)} (${r.reason})`)
    return this.mem.read32(r.hpa + (hva % PAGE))
  }

  /** Write a 32-bit word at hva through the host page table (faulting it in). Throws on a host fault (API misuse). */
  write32(hva: number, value: number): void {
    const r = this.resolve(hva, true)
    if (!r.ok) throw new KvmError('EFAULT', `write32: host fault at 0x${hva.toString(16)} (${r.reason})`)
    this.mem.write32(r.hpa + (hva % PAGE), value)
  }
}
