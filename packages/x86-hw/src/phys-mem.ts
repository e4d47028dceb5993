import { HwConfigError, MmusimError, PoisonedFrameError } from './errors.ts'

/** Bytes per frame. */
export const PAGE_SIZE = 4096
const WORDS_PER_FRAME = 1024
/** Frames per backing chunk (64 MiB); backing grows chunk by chunk, on first store. */
const CHUNK_SHIFT = 14
const CHUNK_FRAMES = 1 << CHUNK_SHIFT
const SLOT_POISONED = -1
/** Value read from an address beyond installed memory: an aborted bus read returns all ones. */
export const OPEN_BUS = 0xffffffff
/** {@link PhysMem.locate}: the frame has no storage (every word reads as 0). */
export const LOC_ZERO = -1
/** {@link PhysMem.locate}: the address is beyond installed memory (reads {@link OPEN_BUS}). */
export const LOC_OPEN_BUS = -2
const NO_WORDS = new Uint32Array(0)

/**
 * Backing chunks given back by {@link PhysMem.releaseStorage} (a destroyed VM), reused by later
 * PhysMems in this process. A fresh chunk costs the OS a page fault plus zeroing per 4 KiB on
 * first store, which was most of a populate run's wall time; a recycled one is already resident.
 * Pooled chunks are all zero: releaseStorage clears the slots it used in one sequential fill
 * (cheaper than 4 KiB at a time, and it keeps the clearing out of the next VM's run).
 * Capped so that a process keeps at most POOL_MAX_CHUNKS × 64 MiB of idle storage.
 */
const chunkPool: Uint32Array[] = []
const POOL_MAX_CHUNKS = 8

/** Options of a {@link PhysMem}. */
export interface PhysMemOptions {
  /** Installed memory in bytes (a multiple of 4096). Addresses at or above it read as all ones and ignore writes. */
  sizeBytes: number
  /** A name used in messages (e.g. `host`, `guest`). @default 'phys' */
  name?: string
}

/**
 * Physical memory: 4 KiB frames, backed lazily. A frame gets storage only when something stores a
 * non-zero word into it, so a 64 GiB guest touched sparsely fits in a few GiB. Unbacked frames read
 * as zero. A freed frame can be poisoned: any later read or write throws {@link PoisonedFrameError},
 * which is how use-after-free of page tables is caught at once.
 *
 * Words are little-endian 32-bit; a 64-bit entry at `pa` is (read32(pa), read32(pa + 4)).
 */
export class PhysMem {
  readonly name: string
  readonly sizeBytes: number
  readonly frameCount: number
  /** frame → backing slot + 1; 0 = unbacked (reads zero); -1 = poisoned. */
  private readonly slotOf: Int32Array
  private readonly chunks: Uint32Array[] = []
  /** chunks[0] (once allocated), for {@link locate}. */
  private chunk0: Uint32Array = NO_WORDS
  private readonly freeSlots: number[] = []
  private nextSlot = 0
  /** Frames that currently have storage. */
  backedFrames = 0

  constructor(options: PhysMemOptions) {
    const { sizeBytes } = options
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % PAGE_SIZE !== 0) {
      throw new HwConfigError(`PhysMem sizeBytes must be a positive multiple of 4096, got ${String(sizeBytes)}`)
    }
    const frames = sizeBytes / PAGE_SIZE
    if (frames > 0x40000000) {
      throw new HwConfigError(`PhysMem of ${String(sizeBytes)} bytes is larger than the 4 TiB this model supports`)
    }
    this.name = options.name ?? 'phys'
    this.sizeBytes = sizeBytes
    this.frameCount = frames
    this.slotOf = new Int32Array(frames)
  }

  /**
   * Backing words of the frame found by the last {@link locate} that returned an index ≥ 0. Read it
   * right after the call: any later store may grow the backing.
   */
  locBuf: Uint32Array = NO_WORDS

  /**
   * Resolve `pa` (4-byte aligned) once, for callers that read several words of one frame (a 64-bit
   * entry is two): returns the index of its word in {@link locBuf}, or {@link LOC_ZERO} (unbacked:
   * reads as 0) or {@link LOC_OPEN_BUS} (not installed: reads as all ones). Throws
   * {@link PoisonedFrameError} for a poisoned frame, like {@link read32}.
   */
  locate(pa: number): number {
    // `!(pa < size)` also catches NaN. Below sizeBytes (≤ 2^42) the frame number is < 2^30, so
    // `>>> 0` truncates exactly like Math.floor and stays a small integer for the lookups.
    // Literals, not the module constants: V8 reloads a module binding at every use in hot code.
    if (!(pa < this.sizeBytes) || pa < 0) return -2 // LOC_OPEN_BUS
    const frame = (pa * (1 / 4096)) >>> 0
    const s = this.slotOf[frame]!
    if (s <= 0) {
      if (s === SLOT_POISONED) throw new PoisonedFrameError(frame, 'read', pa)
      return -1 // LOC_ZERO
    }
    const slot = s - 1
    // The first chunk from a field: its load does not wait for `slot`, so the common case (under
    // 64 MiB of backed frames) is two dependent loads, slotOf then the word.
    this.locBuf = slot < 0x4000 ? this.chunk0 : this.chunks[slot >>> 14]! // CHUNK_FRAMES, CHUNK_SHIFT
    // Word index: slot's offset in its chunk (CHUNK_FRAMES - 1 = 0x3fff) plus the word in the frame;
    // `pa & 0xfff` is exact for any integer pa (bitwise ops see its low 32 bits).
    return ((slot & 0x3fff) << 10) | ((pa & 0xfff) >>> 2)
  }

  /** Read the 32-bit word at `pa` (4-byte aligned). */
  read32(pa: number): number {
    // locate() written out, as in read64.
    if (!(pa < this.sizeBytes) || pa < 0) return 0xffffffff // OPEN_BUS
    const frame = (pa * (1 / 4096)) >>> 0
    const s = this.slotOf[frame]!
    if (s <= 0) {
      if (s === SLOT_POISONED) throw new PoisonedFrameError(frame, 'read', pa)
      return 0
    }
    const slot = s - 1
    const buf = slot < 0x4000 ? this.chunk0 : this.chunks[slot >>> 14]!
    return buf[((slot & 0x3fff) << 10) | ((pa & 0xfff) >>> 2)]!
  }

  /**
   * Read the 64-bit entry at `pa` (8-byte aligned) with one frame lookup: returns the low word and
   * leaves the high word in {@link hi64} (no allocation). Same outcomes as two {@link read32} calls.
   */
  read64(pa: number): number {
    // locate() written out: storing locBuf (an object field) costs a write barrier per read.
    if (!(pa < this.sizeBytes) || pa < 0) {
      this.hi64 = 0xffffffff // OPEN_BUS
      return 0xffffffff
    }
    const frame = (pa * (1 / 4096)) >>> 0
    const s = this.slotOf[frame]!
    if (s <= 0) {
      if (s === SLOT_POISONED) throw new PoisonedFrameError(frame, 'read', pa)
      this.hi64 = 0
      return 0
    }
    const slot = s - 1
    const buf = slot < 0x4000 ? this.chunk0 : this.chunks[slot >>> 14]!
    const w = ((slot & 0x3fff) << 10) | ((pa & 0xfff) >>> 2)
    this.hi64 = buf[w + 1]!
    return buf[w]!
  }

  /**
   * {@link read64} for callers that keep coming back to a few frames (a page walker, per level):
   * `hint` (0..15) names a one-entry cache of the frame last read with it, so a repeat skips the
   * frame lookup (the slotOf load leaves the walk's chain of dependent loads). Same outcomes as
   * read64 whatever the hint: the caches hold backed frames only and are dropped whenever any frame
   * gains or loses storage or is poisoned.
   */
  read64Hinted(pa: number, hint: number): number {
    const frame = Math.floor(pa * (1 / 4096)) // exact; NaN or out of range never matches
    if (frame === this.hintFrame[hint]) {
      const w = this.hintBase[hint]! | ((pa & 0xfff) >>> 2)
      const buf = this.chunk0
      this.hi64 = buf[w + 1]!
      return buf[w]!
    }
    const lo = this.read64(pa)
    if (pa >= 0 && pa < this.sizeBytes) {
      const s = this.slotOf[frame]!
      // Chunk 0 only, so a hit needs no chunk lookup either.
      if (s > 0 && s <= 0x4000) {
        this.hintFrame[hint] = frame
        this.hintBase[hint] = (s - 1) << 10
      }
    }
    return lo
  }

  /** Caches of {@link read64Hinted}: frame (-1: none) and the index of its first word in chunk 0. */
  private readonly hintFrame = new Float64Array(16).fill(-1)
  private readonly hintBase = new Int32Array(16)

  /** High word of the entry read by the last {@link read64}. */
  hi64 = 0

  /** Write the 32-bit word at `pa` (4-byte aligned). */
  write32(pa: number, value: number): void {
    if (!(pa < this.sizeBytes) || pa < 0) return
    const frame = (pa * (1 / 4096)) >>> 0 // exact: see locate
    let s = this.slotOf[frame]!
    if (s <= 0) {
      if (s === SLOT_POISONED) throw new PoisonedFrameError(frame, 'write', pa)
      if (value === 0) return // unbacked frames read zero already
      s = this.back(frame)
    }
    const slot = s - 1
    const buf = slot < 0x4000 ? this.chunk0 : this.chunks[slot >>> 14]! // as in locate
    buf[((slot & 0x3fff) << 10) | ((pa & 0xfff) >>> 2)] = value
  }

  /** Write a 64-bit entry as two halves. */
  write64(pa: number, lo: number, hi: number): void {
    this.write32(pa, lo)
    this.write32(pa + 4, hi)
  }

  /**
   * Compare-and-exchange of a 64-bit entry (a locked CMPXCHG8B / the processor's locked A/D update).
   * Returns true and stores the new value if the entry still equals (oldLo, oldHi).
   */
  cmpxchg64(pa: number, oldLo: number, oldHi: number, newLo: number, newHi: number): boolean {
    if (this.read64(pa) !== oldLo >>> 0 || this.hi64 !== oldHi >>> 0) return false
    this.write32(pa, newLo >>> 0)
    this.write32(pa + 4, newHi >>> 0)
    return true
  }

  /** Read one byte. */
  read8(pa: number): number {
    return (this.read32(pa - (pa & 3)) >>> ((pa & 3) << 3)) & 0xff
  }

  /** Write one byte. */
  write8(pa: number, value: number): void {
    const base = pa - (pa & 3)
    const sh = (pa & 3) << 3
    this.write32(base, ((this.read32(base) & ~(0xff << sh)) | ((value & 0xff) << sh)) >>> 0)
  }

  /** Zero a frame and drop its storage. */
  zeroFrame(frame: number): void {
    this.checkFrame(frame)
    const s = this.slotOf[frame]!
    if (s === SLOT_POISONED) throw new PoisonedFrameError(frame, 'write', frame * PAGE_SIZE)
    if (s > 0) this.release(frame, s, 0)
  }

  /** Copy a whole frame (e.g. a copy-on-write break). */
  copyFrame(src: number, dst: number): void {
    this.checkFrame(src)
    this.checkFrame(dst)
    const ss = this.slotOf[src]!
    if (ss === SLOT_POISONED) throw new PoisonedFrameError(src, 'read', src * PAGE_SIZE)
    this.zeroFrame(dst)
    if (ss === 0) return
    const ds = this.back(dst) - 1
    const sslot = ss - 1
    const from = this.chunks[sslot >>> CHUNK_SHIFT]!
    const fo = (sslot & (CHUNK_FRAMES - 1)) << 10
    this.chunks[ds >>> CHUNK_SHIFT]!.set(from.subarray(fo, fo + WORDS_PER_FRAME), (ds & (CHUNK_FRAMES - 1)) << 10)
  }

  /** Poison a frame: its storage is dropped and every later access throws until {@link unpoison}. */
  poison(frame: number): void {
    this.checkFrame(frame)
    const s = this.slotOf[frame]!
    if (s > 0) this.release(frame, s, SLOT_POISONED)
    else this.slotOf[frame] = SLOT_POISONED
  }

  /** Make a poisoned frame usable again (it reads zero). */
  unpoison(frame: number): void {
    this.checkFrame(frame)
    if (this.slotOf[frame] === SLOT_POISONED) this.slotOf[frame] = 0
  }

  /** Whether `frame` is poisoned. */
  isPoisoned(frame: number): boolean {
    return frame < this.frameCount && this.slotOf[frame] === SLOT_POISONED
  }

  /** Whether `frame` currently has storage. */
  isBacked(frame: number): boolean {
    return frame < this.frameCount && this.slotOf[frame]! > 0
  }

  private checkFrame(frame: number): void {
    if (!Number.isInteger(frame) || frame < 0 || frame >= this.frameCount) {
      throw new MmusimError(
        'FRAME_OUT_OF_RANGE',
        `frame 0x${frame.toString(16)} is outside ${this.name} memory (0..0x${(this.frameCount - 1).toString(16)})`,
      )
    }
  }

  private back(frame: number): number {
    let slot: number
    if (this.freeSlots.length > 0) slot = this.freeSlots.pop()!
    else {
      slot = this.nextSlot++
      if ((slot & (CHUNK_FRAMES - 1)) === 0) {
        // Never-used slots are zero: fresh from the OS, or cleared by releaseStorage.
        this.chunks.push(chunkPool.pop() ?? new Uint32Array(CHUNK_FRAMES * WORDS_PER_FRAME))
        this.chunk0 = this.chunks[0]!
      }
    }
    // No hint holds this frame (hints hold backed frames only), so none is dropped.
    this.slotOf[frame] = slot + 1
    this.backedFrames++
    return slot + 1
  }

  /**
   * Drop every frame's storage (all read as zero again; poisoned frames stay poisoned) and give the
   * backing chunks to a process-wide pool for later PhysMems, sparing them the OS's first-touch
   * cost. For the owner of a memory that is done with it (Vm.destroy()).
   */
  releaseStorage(): void {
    const slotOf = this.slotOf
    for (let f = 0; f < slotOf.length; f++) if (slotOf[f]! > 0) slotOf[f] = 0
    // Last chunk first, so that chunk 0 (the most used: its pages are resident) is reused first;
    // a barely used chunk handed out first would make the next VM pay the OS's first-touch faults.
    for (let i = this.chunks.length - 1; i >= 0; i--) {
      if (chunkPool.length >= POOL_MAX_CHUNKS) break
      // Slots handed out from this chunk (all of it unless it is the last one); freed slots were
      // cleared when they were freed, so the used prefix is all that can hold data.
      const used = Math.min(CHUNK_FRAMES, this.nextSlot - i * CHUNK_FRAMES)
      const words = this.chunks[i]!
      words.fill(0, 0, used * WORDS_PER_FRAME)
      chunkPool.push(words)
    }
    this.chunks.length = 0
    this.chunk0 = NO_WORDS
    this.locBuf = NO_WORDS
    this.freeSlots.length = 0
    this.nextSlot = 0
    this.backedFrames = 0
    this.hintFrame.fill(-1)
  }

  private release(frame: number, s: number, newState: number): void {
    const slot = s - 1
    const off = (slot & (CHUNK_FRAMES - 1)) << 10
    this.chunks[slot >>> CHUNK_SHIFT]!.fill(0, off, off + WORDS_PER_FRAME)
    this.freeSlots.push(slot)
    this.slotOf[frame] = newState
    this.backedFrames--
    this.hintFrame.fill(-1)
  }
}

/** Counters of a {@link FrameAllocator}. */
export interface FrameAllocatorStats {
  allocated: number
  free: number
  peak: number
  totalAllocs: number
  totalFrees: number
}

/**
 * A deterministic frame allocator over `[firstFrame, firstFrame + count)` of a {@link PhysMem}.
 * Freed frames are reused most-recently-freed first. A freed frame may be poisoned so that any
 * stale access throws; allocation un-poisons it. Double frees are errors.
 */
export class FrameAllocator {
  readonly mem: PhysMem
  readonly firstFrame: number
  readonly count: number
  private bump = 0
  private readonly freeList: number[] = []
  private readonly inUse: Uint8Array
  private allocatedNow = 0
  private peakNow = 0
  private allocs = 0
  private frees = 0

  constructor(mem: PhysMem, firstFrame = 0, count = mem.frameCount - firstFrame) {
    if (firstFrame < 0 || count <= 0 || firstFrame + count > mem.frameCount) {
      throw new HwConfigError(
        `FrameAllocator range [${String(firstFrame)}, ${String(firstFrame + count)}) does not fit ${mem.name} memory of ${String(mem.frameCount)} frames`,
      )
    }
    this.mem = mem
    this.firstFrame = firstFrame
    this.count = count
    this.inUse = new Uint8Array(count)
  }

  /** Allocate a zeroed frame; returns -1 when exhausted (callers decide: -ENOMEM or an error). */
  alloc(): number {
    let frame: number
    if (this.freeList.length > 0) frame = this.freeList.pop()!
    else if (this.bump < this.count) frame = this.firstFrame + this.bump++
    else return -1
    this.inUse[frame - this.firstFrame] = 1
    this.mem.unpoison(frame)
    this.allocatedNow++
    this.allocs++
    if (this.allocatedNow > this.peakNow) this.peakNow = this.allocatedNow
    return frame
  }

  /** Allocate or throw `OUT_OF_MEMORY`. */
  allocOrThrow(): number {
    const f = this.alloc()
    if (f < 0) {
      throw new MmusimError(
        'OUT_OF_MEMORY',
        `${this.mem.name} frame allocator exhausted (${String(this.count)} frames); give the machine more memory`,
      )
    }
    return f
  }

  /** Free a frame. With `poison`, any later access throws until it is allocated again. */
  free(frame: number, options?: { poison?: boolean }): void {
    const i = frame - this.firstFrame
    if (!Number.isInteger(frame) || i < 0 || i >= this.count) {
      throw new MmusimError('FRAME_OUT_OF_RANGE', `free of frame 0x${frame.toString(16)} outside this allocator`)
    }
    if (this.inUse[i] === 0) {
      throw new MmusimError('DOUBLE_FREE', `frame 0x${frame.toString(16)} freed twice (or never allocated)`)
    }
    this.inUse[i] = 0
    if (options?.poison === true) this.mem.poison(frame)
    else this.mem.zeroFrame(frame)
    this.freeList.push(frame)
    this.allocatedNow--
    this.frees++
  }

  /** Whether `frame` is currently allocated. */
  isAllocated(frame: number): boolean {
    const i = frame - this.firstFrame
    return i >= 0 && i < this.count && this.inUse[i] === 1
  }

  stats(): FrameAllocatorStats {
    return {
      allocated: this.allocatedNow,
      free: this.count - this.allocatedNow,
      peak: this.peakNow,
      totalAllocs: this.allocs,
      totalFrees: this.frees,
    }
  }
}
