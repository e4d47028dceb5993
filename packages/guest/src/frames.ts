import { GuestError } from './errors.ts'
import { FRAMES_PER_2M } from './layout.ts'

/** One vCPU's share of free physical memory: 4 KiB frames grow up from `lo`, 2 MiB chunks down from `hi`. */
class Pool {
  next4k: number
  top2m: number
  readonly free4k: number[] = []
  readonly free2m: number[] = []
  constructor(lo: number, hi: number) {
    this.next4k = lo
    this.top2m = hi
  }
}

/** Counters of a {@link FramePools}. */
export interface FrameStats {
  /** 4 KiB frames currently allocated (a 2 MiB chunk counts 512). */
  allocated: number
  /** Highest `allocated` seen. */
  peak: number
  /** 4 KiB allocations so far. */
  allocs4k: number
  /** 2 MiB allocations so far. */
  allocs2m: number
  /** Frees so far (a 2 MiB chunk counts once). */
  frees: number
}

/**
 * The guest's physical-page allocator (Linux's buddy allocator with per-CPU page lists, reduced to
 * what the workloads need): free memory above the boot area is partitioned into one pool per
 * vCPU, so the frames a vCPU gets depend only on its own program's allocations and frees — a
 * multi-vCPU run allocates the same frames on every MMU. A frame is freed into the pool of the
 * vCPU that frees it. Each pool hands out 4 KiB frames from its bottom and 2 MiB-aligned chunks
 * (for THP) from its top; freed frames are reused most-recently-freed first.
 *
 * The allocator is the kernel's own metadata (struct page), kept JS-side; it never touches guest
 * memory. Zeroing a frame is the caller's job, done through the vCPU (see `Cpu.clearPage`).
 */
export class FramePools {
  /** Frame mapping count (Linux's page refcount/mapcount merged): PTEs/PMDs mapping the frame. For a THP, kept on the head frame. */
  readonly refcount: Uint16Array
  /** 1 on the head frame of an allocated 2 MiB chunk that is still mapped huge. */
  readonly thpHead: Uint8Array
  /** 1 while a frame is allocated. */
  readonly inUse: Uint8Array
  private readonly pools: Pool[] = []
  private readonly st: FrameStats = { allocated: 0, peak: 0, allocs4k: 0, allocs2m: 0, frees: 0 }

  /**
   * @param frameCount frames of guest-physical memory
   * @param firstFree first frame above the boot area
   * @param nPools number of vCPUs
   */
  constructor(frameCount: number, firstFree: number, nPools: number) {
    this.refcount = new Uint16Array(frameCount)
    this.thpHead = new Uint8Array(frameCount)
    this.inUse = new Uint8Array(frameCount)
    const chunks = Math.floor(frameCount / FRAMES_PER_2M)
    const firstChunk = Math.ceil(firstFree / FRAMES_PER_2M)
    const perPool = Math.floor((chunks - firstChunk) / nPools)
    if (perPool < 1) {
      throw new GuestError(
        'INVALID_ARGUMENT',
        `guest memory of ${String(frameCount * 4096)} bytes leaves less than one 2 MiB chunk per vCPU after the boot area; give the machine at least ${String((firstChunk + nPools) * 2)} MiB`,
      )
    }
    for (let i = 0; i < nPools; i++) {
      const lo = (firstChunk + i * perPool) * FRAMES_PER_2M
      const hi = i === nPools - 1 ? chunks * FRAMES_PER_2M : lo + perPool * FRAMES_PER_2M
      const p = new Pool(lo, hi)
      // The boot area's leftover frames below the first chunk go to pool 0.
      if (i === 0) for (let f = FRAMES_PER_2M * firstChunk - 1; f >= firstFree; f--) p.free4k.push(f)
      this.pools.push(p)
    }
  }

  /** Allocate one 4 KiB frame from `cpu`'s pool (Linux `alloc_page`); -1 when the pool is empty. */
  alloc4k(cpu: number): number {
    const p = this.pools[cpu]!
    let f: number
    if (p.free4k.length > 0) f = p.free4k.pop()!
    else if (p.next4k < p.top2m) f = p.next4k++
    else if (p.free2m.length > 0) {
      // Break a free 2 MiB chunk into 4 KiB frames.
      const head = p.free2m.pop()!
      for (let i = FRAMES_PER_2M - 1; i >= 1; i--) p.free4k.push(head + i)
      f = head
    } else return -1
    this.inUse[f] = 1
    this.refcount[f] = 0
    this.st.allocs4k++
    this.bump(1)
    return f
  }

  /** Allocate a 2 MiB-aligned chunk of 512 frames from `cpu`'s pool (Linux `alloc_pages(order 9)`); returns the head frame or -1. */
  alloc2m(cpu: number): number {
    const p = this.pools[cpu]!
    let head: number
    if (p.free2m.length > 0) head = p.free2m.pop()!
    else if (p.top2m - FRAMES_PER_2M >= p.next4k) {
      p.top2m -= FRAMES_PER_2M
      head = p.top2m
    } else return -1
    for (let i = 0; i < FRAMES_PER_2M; i++) {
      this.inUse[head + i] = 1
      this.refcount[head + i] = 0
    }
    this.thpHead[head] = 1
    this.st.allocs2m++
    this.bump(FRAMES_PER_2M)
    return head
  }

  /** Free a 4 KiB frame into `cpu`'s pool (Linux `__free_page`). */
  free4k(cpu: number, frame: number): void {
    if (this.inUse[frame] !== 1) throw new GuestError('KERNEL_BUG', `guest kernel freed frame 0x${frame.toString(16)} that is not allocated`)
    this.inUse[frame] = 0
    this.pools[cpu]!.free4k.push(frame)
    this.st.frees++
    this.st.allocated--
  }

  /** Free a whole 2 MiB chunk (still mapped huge until now) into `cpu`'s pool. */
  free2m(cpu: number, head: number): void {
    if (this.thpHead[head] !== 1) throw new GuestError('KERNEL_BUG', `guest kernel freed 0x${head.toString(16)} as a 2 MiB page, but it is not a THP head`)
    this.thpHead[head] = 0
    for (let i = 0; i < FRAMES_PER_2M; i++) this.inUse[head + i] = 0
    this.pools[cpu]!.free2m.push(head)
    this.st.frees++
    this.st.allocated -= FRAMES_PER_2M
  }

  /** Turn a THP into 512 independent frames, each with the head's refcount (split_huge_page). */
  splitChunk(head: number): void {
    const rc = this.refcount[head]!
    this.thpHead[head] = 0
    for (let i = 0; i < FRAMES_PER_2M; i++) this.refcount[head + i] = rc
  }

  /** Counters. */
  stats(): FrameStats {
    return { ...this.st }
  }

  private bump(n: number): void {
    this.st.allocated += n
    if (this.st.allocated > this.st.peak) this.st.peak = this.st.allocated
  }
}
