/**
 * Memslots: KVM's guest-physical → host-virtual map, per address space, with the exact
 * `KVM_SET_USER_MEMORY_REGION` semantics of virt/kvm/kvm_main.c (`__kvm_set_memory_region`,
 * `kvm_set_memslot`, `kvm_swap_active_memslots`), x86's per-slot metadata
 * (arch/x86/kvm/x86.c `kvm_alloc_memslot_metadata`: `kvm_lpage_info`), the lookup with the
 * last-used-slot caches (`__gfn_to_memslot`, `kvm_vcpu_gfn_to_memslot`) and the dirty log
 * (`kvm_get_dirty_log_protect`, `kvm_clear_dirty_log_protect`, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2).
 *
 * Numbers: gfns and HVAs are plain numbers (all < 2^53 once validated); shifts on them use
 * division, never `>>`, which would truncate to 32 bits.
 */
import { MmusimError } from '@mmusim/x86-hw'
import { DEBUG } from './debug.ts'
import { KvmError } from './errors.ts'

// ---- uapi / kvm_host.h constants ----

/** `KVM_MEM_LOG_DIRTY_PAGES` (include/uapi/linux/kvm.h): the slot keeps a dirty bitmap. */
export const KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
/** `KVM_MEM_READONLY` (include/uapi/linux/kvm.h): guest writes exit as MMIO. x86 defines `__KVM_HAVE_READONLY_MEM`. */
export const KVM_MEM_READONLY = 1 << 1
/** `KVM_MEMSLOT_INVALID` (include/linux/kvm_host.h): kernel-internal flag of a slot being deleted or moved. */
export const KVM_MEMSLOT_INVALID = 1 << 16
/** `KVM_USER_MEM_SLOTS` on x86 (`KVM_MAX_NR_USER_MEMSLOTS`, arch/x86/include/asm/kvm_host.h): 32764. */
export const KVM_USER_MEM_SLOTS = 32764
/** `KVM_ADDRESS_SPACE_NUM` on x86 (`KVM_MAX_NR_ADDRESS_SPACES`): 0 = normal, 1 = SMM. */
export const KVM_ADDRESS_SPACE_NUM = 2
/** `KVM_MEM_MAX_NR_PAGES` (include/linux/kvm_host.h, 64-bit): (1 << 31) - 1 pages per slot. */
export const KVM_MEM_MAX_NR_PAGES = 0x7fffffff
/** `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` (uapi): KVM_GET_DIRTY_LOG does not clear/re-protect. */
export const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
/** `KVM_DIRTY_LOG_INITIALLY_SET` (uapi): new dirty bitmaps start all-ones. */
export const KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
/**
 * `KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS` is BIT_ULL(63) of `kvm_memslots.generation` in the kernel;
 * here the flag is {@link MemslotSet.updateInProgress} and `generation` holds the other bits.
 * Generations advance by {@link KVM_ADDRESS_SPACE_NUM} per swap (`gen += KVM_ADDRESS_SPACE_NUM`
 * in `kvm_swap_active_memslots`), address space `i` starting at `i`, so they are unique across
 * address spaces.
 */
export const KVM_MEMSLOT_GEN_STEP = KVM_ADDRESS_SPACE_NUM
/** `TASK_SIZE_MAX` of 4-level x86-64 ((1 << 47) - PAGE_SIZE): the `access_ok()` limit of a slot's HVA range. */
export const TASK_SIZE_MAX = 0x7ffffffff000
/** `KVM_NR_PAGE_SIZES` on x86: 4K, 2M, 1G. */
export const KVM_NR_PAGE_SIZES = 3

const PAGE_SIZE = 4096
const PAGE_SIZE_N = 4096n
const U64_LIMIT = 1n << 64n

/** `KVM_HPAGE_GFN_SHIFT(level)`: 0 for 4K, 9 for 2M, 18 for 1G. */
export function kvmHpageGfnShift(level: number): number {
  return (level - 1) * 9
}
/** 4K pages per level-1..5 mapping, for {@link kvmPagesPerHpage}. */
const PAGES_PER_HPAGE: readonly number[] = [2 ** -9, 1, 512, 512 * 512, 512 * 512 * 512, 512 ** 4]
/** `KVM_PAGES_PER_HPAGE(level)`: 1, 512, 262144. */
export function kvmPagesPerHpage(level: number): number {
  // A table, not `2 ** ((level - 1) * 9)`: `**` with a variable exponent is a slow pow() call.
  return PAGES_PER_HPAGE[level] ?? 2 ** ((level - 1) * 9)
}
/** `gfn_to_index(gfn, base_gfn, level)` (arch/x86/kvm/mmu.h): index of gfn's huge page inside the slot. */
export function gfnToIndex(gfn: number, baseGfn: number, level: number): number {
  // × 1/d (exact: d is a power of two) rather than two divisions; a hot path of faults and rmaps.
  const r = INV_PAGES_PER_HPAGE[level] ?? 1 / kvmPagesPerHpage(level)
  return Math.floor(gfn * r) - Math.floor(baseGfn * r)
}
/** 1 / {@link kvmPagesPerHpage} per level. */
const INV_PAGES_PER_HPAGE: readonly number[] = [2 ** 9, 1, 2 ** -9, 2 ** -18, 2 ** -27, 2 ** -36]

// ---- the slot ----

/** x86 per-slot metadata (`struct kvm_arch_memory_slot`). */
export interface MemslotArch {
  /**
   * `lpage_info[level - 2]` for level 2 (2M) and 3 (1G): the `disallow_lpage` count of each huge
   * page the slot touches (index by {@link gfnToIndex}). Non-zero forbids a huge mapping there.
   */
  readonly lpageInfo: readonly [Int32Array, Int32Array]
  /**
   * Per-MMU data hung off the slot (rmaps, gfn_track, …), keyed by the strategy's name. Shared by
   * a FLAGS_ONLY update (the kernel memcpy()s `arch`), fresh after CREATE and MOVE.
   */
  readonly mmu: Map<string, unknown>
}

/**
 * One memslot (`struct kvm_memory_slot`). Immutable except the dirty bitmap's contents and the
 * arch metadata: an update installs a new object (as `kvm_set_memslot` does) so the old one can
 * still be handed to the MMU.
 */
export class Memslot {
  constructor(
    /** `id` (low 16 bits of the ioctl's `slot`). */
    readonly id: number,
    /** `as_id` (high 16 bits of the ioctl's `slot`). */
    readonly asId: number,
    /** `base_gfn`. */
    readonly baseGfn: number,
    /** `npages`. */
    readonly npages: number,
    /** `userspace_addr` (HVA of baseGfn). */
    readonly userspaceAddr: number,
    /** `flags`: KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY (| KVM_MEMSLOT_INVALID transiently). */
    readonly flags: number,
    /**
     * `dirty_bitmap`: bit i (LE, word i >>> 5, bit i & 31) = page baseGfn + i. Allocated as whole
     * 64-bit longs (`kvm_dirty_bitmap_bytes`), i.e. 2·⌈npages/64⌉ words. Null when not logging.
     */
    readonly dirtyBitmap: Uint32Array | null,
    readonly arch: MemslotArch,
  ) {}

  /** One past the last gfn. */
  get endGfn(): number {
    return this.baseGfn + this.npages
  }
}

/** Whether `gfn` lies in `slot` (`try_get_memslot`'s range check). */
export function memslotContainsGfn(slot: Memslot, gfn: number): boolean {
  return gfn >= slot.baseGfn && gfn < slot.baseGfn + slot.npages
}
/** `__gfn_to_hva_memslot(slot, gfn)`. */
export function gfnToHvaMemslot(slot: Memslot, gfn: number): number {
  return slot.userspaceAddr + (gfn - slot.baseGfn) * PAGE_SIZE
}
/** `hva_to_gfn_memslot(hva, slot)`. */
export function hvaToGfnMemslot(hva: number, slot: Memslot): number {
  return slot.baseGfn + Math.floor((hva - slot.userspaceAddr) / PAGE_SIZE)
}
/** `kvm_slot_dirty_track_enabled(slot)` (bitmap flavour: the slot logs dirty pages). */
export function kvmSlotDirtyTrackEnabled(slot: Memslot): boolean {
  return (slot.flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0
}
/** `kvm_is_visible_memslot(slot)`: a slot that exists, is not being deleted/moved, and is not internal. */
export function kvmIsVisibleMemslot(slot: Memslot | null): boolean {
  return slot !== null && slot.id < KVM_USER_MEM_SLOTS && (slot.flags & KVM_MEMSLOT_INVALID) === 0
}

/** The `kvm_lpage_info` entry count of a level (2 or 3): `__kvm_mmu_slot_lpages`. */
function slotLpages(baseGfn: number, npages: number, level: number): number {
  return gfnToIndex(baseGfn + npages - 1, baseGfn, level) + 1
}

/**
 * `kvm_alloc_memslot_metadata` (arch/x86/kvm/x86.c), lpage_info part: for 2M and 1G, disallow a
 * huge page at an unaligned head (`base_gfn` not a multiple) and an unaligned tail
 * (`base_gfn + npages` not a multiple), and everywhere when gfn and hva are not congruent modulo
 * the huge page size (`(base_gfn ^ ugfn) & (KVM_PAGES_PER_HPAGE(level) - 1)`).
 */
export function allocMemslotArch(baseGfn: number, npages: number, userspaceAddr: number): MemslotArch {
  const ugfn = Math.floor(userspaceAddr / PAGE_SIZE)
  const infos: Int32Array[] = []
  for (let level = 2; level <= KVM_NR_PAGE_SIZES; level++) {
    const per = kvmPagesPerHpage(level)
    const lpages = slotLpages(baseGfn, npages, level)
    const linfo = new Int32Array(lpages)
    if (baseGfn % per !== 0) linfo[0] = 1
    if ((baseGfn + npages) % per !== 0) linfo[lpages - 1] = 1
    if (baseGfn % per !== ugfn % per) linfo.fill(1)
    infos.push(linfo)
  }
  return { lpageInfo: [infos[0]!, infos[1]!], mmu: new Map() }
}

/** `lpage_info_slot(gfn, slot, level)->disallow_lpage != 0`: may not map gfn with a `level` huge page. */
export function isLpageDisallowed(slot: Memslot, gfn: number, level: number): boolean {
  if (level < 2) return false
  return slot.arch.lpageInfo[level - 2]![gfnToIndex(gfn, slot.baseGfn, level)]! !== 0
}

/**
 * `update_gfn_disallow_lpage_count(slot, gfn, count)` (mmu.c): add `count` to the disallow count of
 * gfn's 2M and 1G regions. `kvm_mmu_gfn_disallow_lpage` is count = +1, `kvm_mmu_gfn_allow_lpage` -1
 * (used when a gfn becomes a shadowed guest page table).
 */
export function updateGfnDisallowLpageCount(slot: Memslot, gfn: number, count: number): void {
  for (let level = 2; level <= KVM_NR_PAGE_SIZES; level++) {
    const linfo = slot.arch.lpageInfo[level - 2]!
    const i = gfnToIndex(gfn, slot.baseGfn, level)
    const v = linfo[i]! + count
    // WARN_ON_ONCE(linfo->disallow_lpage < 0) in the kernel: an unbalanced allow.
    if (DEBUG && v < 0) {
      throw new MmusimError(
        'LPAGE_COUNT_UNDERFLOW',
        `disallow_lpage of gfn 0x${gfn.toString(16)} at level ${level} in slot ${slot.id} went negative: ` +
          'every kvm_mmu_gfn_allow_lpage() must pair with an earlier kvm_mmu_gfn_disallow_lpage()',
      )
    }
    linfo[i] = v
  }
}

// ---- lookup caches ----

/**
 * A vCPU's last-used-slot cache (`vcpu->last_used_slot` + `last_used_slot_gen`), consulted first
 * by {@link Memslots.gfnToMemslot} as `kvm_vcpu_gfn_to_memslot` does. Reset when the generation of
 * the address space it is used with differs (which also covers switching address spaces, since
 * generations differ across address spaces).
 */
export class MemslotCache {
  slot: Memslot | null = null
  generation = -1
  /** Lookups through this cache. */
  lookups = 0
  /** Lookups answered by the cached slot. */
  hits = 0
}

// ---- the per-address-space set ----

/** `struct kvm_memslots` of one address space (the active set; updates swap in place). */
export class MemslotSet {
  readonly asId: number
  /** `generation` without the in-progress bit (advances by 2 per swap; starts at asId). */
  generation: number
  /** `generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS`: true only while a swap is under way. */
  updateInProgress = false
  /** Slots sorted by baseGfn (the kernel's gfn rb-tree). */
  readonly sorted: Memslot[] = []
  /** id → slot (`id_hash`). */
  readonly byId = new Map<number, Memslot>()
  /** `last_used_slot` used by the VM-wide lookup (`__gfn_to_memslot`). */
  lastUsedSlot: Memslot | null = null
  /** VM-wide lookups and `last_used_slot` hits. */
  lookups = 0
  lastUsedHits = 0

  constructor(asId: number) {
    this.asId = asId
    this.generation = asId // kvm_create_vm: "Generations must be different for each address space."
  }

  /** `search_memslots(slots, gfn, false)`: binary search over base gfns. */
  search(gfn: number): Memslot | null {
    const a = this.sorted
    let lo = 0
    let hi = a.length - 1
    let found = -1
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1
      if (a[mid]!.baseGfn <= gfn) {
        found = mid
        lo = mid + 1
      } else hi = mid - 1
    }
    if (found < 0) return null
    const s = a[found]!
    return gfn < s.baseGfn + s.npages ? s : null
  }

  /** `kvm_for_each_memslot_in_gfn_range` + overlap test of `kvm_check_memslot_overlap`. */
  overlapsOther(id: number, start: number, end: number): boolean {
    for (const s of this.sorted) {
      if (s.baseGfn >= end) break
      if (s.baseGfn + s.npages > start && s.id !== id) return true
    }
    return false
  }

  /** Slots whose HVA range intersects [start, end) (the `hva_tree` interval query). */
  slotsOverlappingHva(start: number, end: number): Memslot[] {
    const out: Memslot[] = []
    for (const s of this.sorted) {
      const sEnd = s.userspaceAddr + s.npages * PAGE_SIZE
      if (s.userspaceAddr < end && start < sEnd) out.push(s)
    }
    return out
  }

  /** `kvm_replace_memslot(old, new)` on this set. */
  replace(old: Memslot | null, neu: Memslot | null): void {
    if (old !== null) {
      this.byId.delete(old.id)
      const i = this.sorted.indexOf(old)
      if (i >= 0) this.sorted.splice(i, 1)
      if (this.lastUsedSlot === old) this.lastUsedSlot = neu
    }
    if (neu !== null) {
      this.byId.set(neu.id, neu)
      let i = 0
      while (i < this.sorted.length && this.sorted[i]!.baseGfn < neu.baseGfn) i++
      this.sorted.splice(i, 0, neu)
    }
  }
}

// ---- requests, changes, listeners ----

/** A `struct kvm_userspace_memory_region` (slot split into id and address space). u64 fields may be BigInt. */
export interface UserMemoryRegion {
  /** Slot id (the low 16 bits of the kernel's `slot`). */
  slot: number
  /** Address space (the high 16 bits of the kernel's `slot`). @default 0 */
  asId?: number
  flags: number
  guestPhysAddr: number | bigint
  memorySize: number | bigint
  userspaceAddr: number | bigint
}

/** `enum kvm_mr_change`, plus `'none'` for the kernel's "Nothing to change" early return. */
export type MemslotChangeKind = 'create' | 'delete' | 'move' | 'flags-only' | 'none'

/** What an accepted `KVM_SET_USER_MEMORY_REGION` did, for the MMU (`kvm_arch_commit_memory_region`). */
export interface MemslotChange {
  kind: MemslotChangeKind
  asId: number
  slotId: number
  /** The slot before (null for create). */
  old: Memslot | null
  /** The slot after (null for delete). */
  new: Memslot | null
  /** The address space's generation after the update. */
  generation: number
}

/**
 * Hooks the VM calls during an update, in the kernel's order. All optional.
 * - `flushShadowMemslot(old)`: `kvm_arch_flush_shadow_memslot` — DELETE/MOVE, after the INVALID
 *   copy of the slot became active and before the new layout is installed.
 * - `memslotsUpdated(asId, gen)`: `kvm_arch_memslots_updated` — every swap, while the set's
 *   generation still has the in-progress flag; x86 checks for an MMIO generation wrap here.
 * - `commitMemoryRegion(change)`: `kvm_arch_commit_memory_region` — after the final swap.
 */
export interface MemslotsListener {
  flushShadowMemslot?(old: Memslot): void
  memslotsUpdated?(asId: number, generation: number): void
  commitMemoryRegion?(change: MemslotChange): void
}

/** Options of {@link Memslots}. */
export interface MemslotsOptions {
  /**
   * Guest-physical address width the MMU can map: `kvm_mmu_max_gfn()` = 2^(bits-12) - 1, with
   * bits = host MAXPHYADDR under TDP, 52 under shadow paging. @default 52
   */
  maxGpaBits?: number
  listener?: MemslotsListener
  /**
   * `mn_active_invalidate_count != 0`: `kvm_swap_active_memslots` would wait for invalidations to
   * end. This synchronous model cannot wait, so an update then throws EBUSY (before any change).
   */
  invalidationActive?: () => boolean
}

/** A 64-page chunk of dirty-log bits to re-protect: `kvm_arch_mmu_enable_log_dirty_pt_masked(kvm, slot, gfn_offset, mask)`. */
export interface DirtyLogMask {
  slot: Memslot
  /** Page offset in the slot of bit 0 (a multiple of 64). */
  gfnOffset: number
  /** Bits 0..31 of the 64-bit mask. */
  lo: number
  /** Bits 32..63 of the 64-bit mask. */
  hi: number
}

/** The gfns of a {@link DirtyLogMask}, ascending. */
export function dirtyLogMaskGfns(m: DirtyLogMask): number[] {
  const out: number[] = []
  const base = m.slot.baseGfn + m.gfnOffset
  for (let b = 0; b < 32; b++) if ((m.lo >>> b) & 1) out.push(base + b)
  for (let b = 0; b < 32; b++) if ((m.hi >>> b) & 1) out.push(base + 32 + b)
  return out
}

/** Result of {@link Memslots.getDirtyLog}. */
export interface DirtyLogResult {
  /** The copy handed to userspace (same length as the slot's bitmap). */
  bitmap: Uint32Array
  /** Any bit set (`*is_dirty` of `kvm_get_dirty_log`). */
  isDirty: boolean
  /** Harvested chunks to write-protect again (empty in manual-protect mode). */
  masks: DirtyLogMask[]
  /** `kvm_arch_flush_remote_tlbs_memslot` is needed (some bit was harvested). */
  flush: boolean
}

/** Result of {@link Memslots.clearDirtyLog}. */
export interface ClearDirtyLogResult {
  /** Bits actually cleared, per 64-page chunk, to write-protect again. */
  masks: DirtyLogMask[]
  flush: boolean
}

/** JSON-able picture of the whole memslot state, for "nothing changed" assertions. */
export interface MemslotsSnapshot {
  manualDirtyLogProtect: number
  nrMemslotPages: number
  spaces: {
    asId: number
    generation: number
    updateInProgress: boolean
    slots: {
      id: number
      baseGfn: number
      npages: number
      userspaceAddr: number
      flags: number
      dirtyBitmap: number[] | null
      lpageInfo: number[][]
    }[]
  }[]
}

function einval(fn: string, what: string): KvmError {
  return new KvmError('EINVAL', `${fn}: ${what}`)
}

/** Convert a u64 API argument to BigInt, or EINVAL. */
function u64(v: number | bigint, name: string): bigint {
  if (typeof v === 'bigint') {
    if (v < 0n || v >= U64_LIMIT) throw einval('KVM_SET_USER_MEMORY_REGION', `${name} must be a u64, got ${v}`)
    return v
  }
  if (!Number.isSafeInteger(v) || v < 0) {
    throw einval('KVM_SET_USER_MEMORY_REGION', `${name} must be a non-negative integer (or a BigInt u64), got ${v}`)
  }
  return BigInt(v)
}

function hex(v: number | bigint): string {
  return '0x' + v.toString(16)
}

/**
 * All memslots of a VM: {@link KVM_ADDRESS_SPACE_NUM} address spaces, the dirty-log mode, and
 * `KVM_SET_USER_MEMORY_REGION`.
 */
export class Memslots {
  readonly spaces: readonly [MemslotSet, MemslotSet]
  /** `kvm->manual_dirty_log_protect` (KVM_DIRTY_LOG_* flags). */
  manualDirtyLogProtect = 0
  /** `kvm->nr_memslot_pages`. */
  nrMemslotPages = 0
  /** `kvm->nr_memslots_dirty_logging`. */
  nrMemslotsDirtyLogging = 0
  /** `kvm_mmu_max_gfn()`. */
  readonly maxGfn: number
  listener: MemslotsListener | undefined
  /** See {@link MemslotsOptions.invalidationActive}; {@link KvmMmuNotifier} installs one if unset. */
  invalidationActive: (() => boolean) | undefined

  constructor(options: MemslotsOptions = {}) {
    const bits = options.maxGpaBits ?? 52
    if (!Number.isInteger(bits) || bits < 13 || bits > 52) {
      throw new KvmError('EINVAL', `Memslots maxGpaBits must be an integer in 13..52, got ${bits}`)
    }
    this.maxGfn = 2 ** (bits - 12) - 1
    this.spaces = [new MemslotSet(0), new MemslotSet(1)]
    this.listener = options.listener
    this.invalidationActive = options.invalidationActive
  }

  /** The set of an address space (throws EINVAL for a bad asId). */
  space(asId: number): MemslotSet {
    const s = Number.isInteger(asId) ? this.spaces[asId] : undefined
    if (s === undefined) {
      throw einval('memslots', `address space ${asId} does not exist (x86 has 0 = normal and 1 = SMM)`)
    }
    return s
  }

  /** `id_to_memslot(__kvm_memslots(kvm, as_id), id)`. */
  idToMemslot(asId: number, id: number): Memslot | null {
    return this.space(asId).byId.get(id) ?? null
  }

  /**
   * `gfn_to_memslot` / `kvm_vcpu_gfn_to_memslot`: the slot containing gfn in address space asId,
   * or null. With a vCPU `cache`, its last-used slot is tried first (reset when the generation
   * changed) and refreshed on a miss; without, the set's VM-wide `last_used_slot` plays that role.
   */
  gfnToMemslot(asId: number, gfn: number, cache?: MemslotCache): Memslot | null {
    const set = this.spaces[asId]
    if (set === undefined) return null
    if (cache !== undefined) {
      cache.lookups++
      if (cache.generation !== set.generation) {
        cache.slot = null
        cache.generation = set.generation
      }
      const c = cache.slot
      if (c !== null && gfn >= c.baseGfn && gfn < c.baseGfn + c.npages) {
        cache.hits++
        return c
      }
      const s = set.search(gfn)
      if (s !== null) cache.slot = s
      return s
    }
    set.lookups++
    const last = set.lastUsedSlot
    if (last !== null && gfn >= last.baseGfn && gfn < last.baseGfn + last.npages) {
      set.lastUsedHits++
      return last
    }
    const s = set.search(gfn)
    if (s !== null) set.lastUsedSlot = s
    return s
  }

  /**
   * `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (`kvm_vm_ioctl_enable_cap_generic`): `args0` is
   * KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, optionally | KVM_DIRTY_LOG_INITIALLY_SET, or 0 to turn
   * manual protection off. INITIALLY_SET without MANUAL_PROTECT_ENABLE, or unknown bits → EINVAL.
   */
  enableManualDirtyLogProtect(args0: number): void {
    let allowed = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    if (args0 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) allowed |= KVM_DIRTY_LOG_INITIALLY_SET
    if (!Number.isInteger(args0) || args0 < 0 || (args0 & ~allowed) !== 0) {
      throw einval(
        'KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2',
        `args[0] = ${hex(args0)} has bits outside 0x${allowed.toString(16)}; ` +
          'KVM_DIRTY_LOG_INITIALLY_SET (2) is only valid together with KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE (1)',
      )
    }
    this.manualDirtyLogProtect = args0
  }

  /** `kvm_dirty_log_manual_protect_and_init_set(kvm)`. */
  get manualProtectAndInitSet(): boolean {
    return (this.manualDirtyLogProtect & KVM_DIRTY_LOG_INITIALLY_SET) !== 0
  }

  /**
   * `KVM_SET_USER_MEMORY_REGION` (`kvm_vm_ioctl_set_memory_region` → `__kvm_set_memory_region` →
   * `kvm_set_memslot`). Checks in the kernel's order, all before any change:
   * slot id ≥ KVM_USER_MEM_SLOTS, unknown flags, size/gpa/hva not page aligned, hva range not
   * `access_ok`, as_id ≥ 2, gpa + size wrapping u64, more than KVM_MEM_MAX_NR_PAGES pages → EINVAL;
   * delete (size 0) of a slot that does not exist → EINVAL (`if (!old || !old->npages) return
   * -EINVAL;`, kvm_main.c since v5.17); modifying a slot with another hva or size, or toggling
   * KVM_MEM_READONLY → EINVAL; create or move overlapping another slot of the address space →
   * EEXIST; created or moved slot ending above `kvm_mmu_max_gfn()` → EINVAL
   * (`kvm_arch_prepare_memory_region`).
   *
   * Deviation: the kernel runs that last check *after* invalidating the old slot of a MOVE (so a
   * failed move still bumps the generation and zaps the slot); here a rejected request changes
   * nothing at all.
   */
  setUserMemoryRegion(region: UserMemoryRegion): MemslotChange {
    const fn = 'KVM_SET_USER_MEMORY_REGION'
    const id = region.slot
    const asId = region.asId ?? 0
    if (!Number.isInteger(id) || id < 0 || id > 0xffff || !Number.isInteger(asId) || asId < 0 || asId > 0xffff) {
      throw einval(fn, `slot id and address space must be 16-bit unsigned integers, got slot ${id}, as_id ${asId}`)
    }
    // kvm_vm_ioctl_set_memory_region: (u16)mem->slot >= KVM_USER_MEM_SLOTS
    if (id >= KVM_USER_MEM_SLOTS) {
      throw einval(fn, `slot id ${id} must be below KVM_USER_MEM_SLOTS (${KVM_USER_MEM_SLOTS})`)
    }
    // check_memory_region_flags
    const flags = region.flags
    if (!Number.isInteger(flags) || flags < 0 || (flags & ~(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY)) !== 0) {
      throw einval(
        fn,
        `flags ${Number.isInteger(flags) ? hex(flags) : String(flags)} contain bits other than ` +
          'KVM_MEM_LOG_DIRTY_PAGES (1) and KVM_MEM_READONLY (2)',
      )
    }
    const size = u64(region.memorySize, 'memory_size')
    const gpa = u64(region.guestPhysAddr, 'guest_phys_addr')
    const hva = u64(region.userspaceAddr, 'userspace_addr')
    if (size % PAGE_SIZE_N !== 0n) throw einval(fn, `memory_size ${hex(size)} must be a multiple of 4096`)
    if (gpa % PAGE_SIZE_N !== 0n) throw einval(fn, `guest_phys_addr ${hex(gpa)} must be 4096-aligned`)
    if (hva % PAGE_SIZE_N !== 0n) throw einval(fn, `userspace_addr ${hex(hva)} must be 4096-aligned`)
    const limit = BigInt(TASK_SIZE_MAX)
    if (size > limit || hva > limit - size) {
      throw einval(
        fn,
        `userspace range [${hex(hva)}, ${hex(hva + size)}) must lie below TASK_SIZE_MAX ${hex(limit)} (access_ok)`,
      )
    }
    if (asId >= KVM_ADDRESS_SPACE_NUM) {
      throw einval(fn, `address space ${asId} must be below KVM_ADDRESS_SPACE_NUM (${KVM_ADDRESS_SPACE_NUM})`)
    }
    if (gpa + size >= U64_LIMIT) {
      throw einval(fn, `guest_phys_addr ${hex(gpa)} + memory_size ${hex(size)} wraps around 2^64`)
    }
    if (size / PAGE_SIZE_N > BigInt(KVM_MEM_MAX_NR_PAGES)) {
      throw einval(fn, `memory_size ${hex(size)} exceeds KVM_MEM_MAX_NR_PAGES (${KVM_MEM_MAX_NR_PAGES}) pages`)
    }

    const set = this.spaces[asId]!
    const old = set.byId.get(id) ?? null
    const hvaN = Number(hva)

    if (size === 0n) {
      if (old === null || old.npages === 0) {
        throw einval(fn, `cannot delete slot ${id} of address space ${asId}: it does not exist`)
      }
      this.checkNotBlocked()
      return this.setMemslot(set, old, null, 'delete')
    }

    const baseGfnB = gpa / PAGE_SIZE_N
    const npagesB = size / PAGE_SIZE_N
    let kind: MemslotChangeKind
    if (old === null) {
      kind = 'create'
    } else {
      if (hva !== BigInt(old.userspaceAddr) || npagesB !== BigInt(old.npages) || ((flags ^ old.flags) & KVM_MEM_READONLY) !== 0) {
        throw einval(
          fn,
          `slot ${id} exists (gfn 0x${old.baseGfn.toString(16)}, ${old.npages} pages, hva 0x${old.userspaceAddr.toString(16)}, ` +
            `flags ${hex(old.flags)}); only its guest_phys_addr or KVM_MEM_LOG_DIRTY_PAGES may change — delete it ` +
            'first to change the size, userspace_addr or KVM_MEM_READONLY',
        )
      }
      if (baseGfnB !== BigInt(old.baseGfn)) kind = 'move'
      else if (flags !== old.flags) kind = 'flags-only'
      else return { kind: 'none', asId, slotId: id, old, new: old, generation: set.generation }
    }

    // __kvm_set_memory_region checks overlap (EEXIST) before kvm_arch_prepare_memory_region checks
    // the max gfn (EINVAL). A range beyond 2^53 cannot overlap a valid slot (those end below 2^40).
    const endB = baseGfnB + npagesB
    if ((kind === 'create' || kind === 'move') && endB <= BigInt(Number.MAX_SAFE_INTEGER)) {
      if (set.overlapsOther(id, Number(baseGfnB), Number(endB))) {
        throw new KvmError(
          'EEXIST',
          `${fn}: gfns [${hex(baseGfnB)}, ${hex(endB)}) of slot ${id} overlap another slot of address space ${asId} ` +
            '(kvm_check_memslot_overlap); delete or move that slot first',
        )
      }
    }
    if (endB - 1n > BigInt(this.maxGfn)) {
      throw einval(
        fn,
        `slot ${id} would end at gfn ${hex(endB - 1n)}, above kvm_mmu_max_gfn() = 0x${this.maxGfn.toString(16)} ` +
          '(kvm_arch_prepare_memory_region)',
      )
    }
    const baseGfn = Number(baseGfnB)
    const npages = Number(npagesB)
    this.checkNotBlocked()

    // kvm_prepare_memory_region: dirty bitmap; kvm_arch_prepare_memory_region: arch metadata.
    let bitmap: Uint32Array | null = null
    if (flags & KVM_MEM_LOG_DIRTY_PAGES) {
      if (old?.dirtyBitmap) bitmap = old.dirtyBitmap
      else {
        bitmap = new Uint32Array(2 * Math.ceil(npages / 64))
        if (this.manualProtectAndInitSet) setBits(bitmap, npages)
      }
    }
    const arch = kind === 'flags-only' ? old!.arch : allocMemslotArch(baseGfn, npages, hvaN)
    const neu = new Memslot(id, asId, baseGfn, npages, hvaN, flags, bitmap, arch)
    return this.setMemslot(set, old, neu, kind)
  }

  private checkNotBlocked(): void {
    if (this.invalidationActive?.() === true) {
      throw new KvmError(
        'EBUSY',
        'kvm_swap_active_memslots would wait: an mmu_notifier invalidation is in progress ' +
          '(mn_active_invalidate_count != 0). Finish it (invalidateRangeEnd) before changing memslots.',
      )
    }
  }

  /** `kvm_set_memslot`: invalidate (DELETE/MOVE), install, swap, commit. */
  private setMemslot(set: MemslotSet, old: Memslot | null, neu: Memslot | null, kind: MemslotChangeKind): MemslotChange {
    if (kind === 'delete' || kind === 'move') {
      // kvm_invalidate_memslot: make an INVALID copy active, then let the MMU zap the old slot.
      const o = old!
      const invalid = new Memslot(o.id, o.asId, o.baseGfn, o.npages, o.userspaceAddr, o.flags | KVM_MEMSLOT_INVALID, o.dirtyBitmap, o.arch)
      set.replace(o, invalid)
      this.swap(set)
      this.listener?.flushShadowMemslot?.(o)
      set.replace(invalid, neu)
    } else {
      set.replace(old, neu)
    }
    this.swap(set)
    // kvm_commit_memory_region
    if (kind === 'delete') this.nrMemslotPages -= old!.npages
    else if (kind === 'create') this.nrMemslotPages += neu!.npages
    const oldLog = old !== null && (old.flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0
    const newLog = neu !== null && (neu.flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0
    if (oldLog !== newLog) this.nrMemslotsDirtyLogging += newLog ? 1 : -1
    const change: MemslotChange = { kind, asId: set.asId, slotId: (neu ?? old)!.id, old, new: neu, generation: set.generation }
    this.listener?.commitMemoryRegion?.(change)
    return change
  }

  /** `kvm_swap_active_memslots`: in-progress while swapping, then generation += KVM_ADDRESS_SPACE_NUM. */
  private swap(set: MemslotSet): void {
    set.updateInProgress = true
    const gen = set.generation + KVM_MEMSLOT_GEN_STEP
    this.listener?.memslotsUpdated?.(set.asId, gen)
    set.generation = gen
    set.updateInProgress = false
  }

  // ---- dirty log ----

  /**
   * `mark_page_dirty_in_slot(kvm, slot, gfn)`: set gfn's bit if the slot logs dirty pages. A gfn
   * outside the slot is a simulator bug (throws).
   */
  markPageDirty(slot: Memslot | null, gfn: number): void {
    if (slot === null || (slot.flags & KVM_MEM_LOG_DIRTY_PAGES) === 0 || slot.dirtyBitmap === null) return
    const rel = gfn - slot.baseGfn
    if (rel < 0 || rel >= slot.npages) {
      throw new MmusimError('GFN_NOT_IN_SLOT', `mark_page_dirty: gfn 0x${gfn.toString(16)} is not in slot ${slot.id}`)
    }
    slot.dirtyBitmap[rel >>> 5]! |= 1 << (rel & 31)
  }

  private dirtyLogSlot(fn: string, asId: number, slotId: number): Memslot {
    if (!Number.isInteger(asId) || asId < 0 || asId >= KVM_ADDRESS_SPACE_NUM || !Number.isInteger(slotId) || slotId < 0 || slotId >= KVM_USER_MEM_SLOTS) {
      throw einval(fn, `slot ${slotId} of address space ${asId} is out of range (as_id < 2, id < ${KVM_USER_MEM_SLOTS})`)
    }
    const slot = this.spaces[asId]!.byId.get(slotId)
    if (slot?.dirtyBitmap == null) {
      throw new KvmError(
        'ENOENT',
        `${fn}: slot ${slotId} of address space ${asId} ${slot === undefined ? 'does not exist' : 'does not have KVM_MEM_LOG_DIRTY_PAGES set'}`,
      )
    }
    return slot
  }

  /**
   * `KVM_GET_DIRTY_LOG` (`kvm_get_dirty_log_protect`): a copy of the slot's bitmap. Normally each
   * non-zero 64-bit word is exchanged with 0 and returned as a chunk to write-protect again
   * (`kvm_arch_mmu_enable_log_dirty_pt_masked`), flush if any; with manual protection the bitmap
   * is copied untouched and nothing is re-protected. EINVAL: bad as_id/id; ENOENT: no such slot
   * or no dirty bitmap.
   */
  getDirtyLog(asId: number, slotId: number): DirtyLogResult {
    const slot = this.dirtyLogSlot('KVM_GET_DIRTY_LOG', asId, slotId)
    const bm = slot.dirtyBitmap!
    const copy = bm.slice()
    let isDirty = false
    for (let i = 0; i < bm.length; i++) if (bm[i] !== 0) isDirty = true
    const masks: DirtyLogMask[] = []
    if (this.manualDirtyLogProtect === 0) {
      for (let i = 0; i < bm.length; i += 2) {
        const lo = bm[i]!
        const hi = bm[i + 1]!
        if ((lo | hi) === 0) continue
        bm[i] = 0
        bm[i + 1] = 0
        masks.push({ slot, gfnOffset: i * 32, lo, hi })
      }
    }
    return { bitmap: copy, isDirty, masks, flush: masks.length > 0 }
  }

  /**
   * `KVM_CLEAR_DIRTY_LOG` (`kvm_clear_dirty_log_protect`): clear the bits of `bitmap` (bit 0 =
   * page `firstPage` of the slot) in [firstPage, firstPage + numPages) and return the bits that
   * really were set, to write-protect again. Errors in the kernel's order: bad as_id/id → EINVAL;
   * `firstPage & 63` → EINVAL; no slot / no bitmap → ENOENT; range beyond the slot, or `numPages`
   * not a multiple of 64 without reaching the slot's end → EINVAL; `bitmap` shorter than
   * ⌈numPages/64⌉ longs → EFAULT (`copy_from_user`). The kernel does not require manual-protect
   * mode for this ioctl, and neither does this model.
   */
  clearDirtyLog(asId: number, slotId: number, firstPage: number, numPages: number, bitmap: Uint32Array): ClearDirtyLogResult {
    const fn = 'KVM_CLEAR_DIRTY_LOG'
    if (!Number.isInteger(asId) || asId < 0 || asId >= KVM_ADDRESS_SPACE_NUM || !Number.isInteger(slotId) || slotId < 0 || slotId >= KVM_USER_MEM_SLOTS) {
      throw einval(fn, `slot ${slotId} of address space ${asId} is out of range (as_id < 2, id < ${KVM_USER_MEM_SLOTS})`)
    }
    if (!Number.isSafeInteger(firstPage) || firstPage < 0 || !Number.isSafeInteger(numPages) || numPages < 0) {
      throw einval(fn, `first_page and num_pages must be non-negative integers, got ${firstPage}, ${numPages}`)
    }
    if (firstPage % 64 !== 0) throw einval(fn, `first_page ${firstPage} must be a multiple of 64`)
    const slot = this.dirtyLogSlot(fn, asId, slotId)
    if (
      firstPage > slot.npages ||
      numPages > slot.npages - firstPage ||
      (numPages < slot.npages - firstPage && numPages % 64 !== 0)
    ) {
      throw einval(
        fn,
        `[first_page ${firstPage}, +num_pages ${numPages}) must lie inside the slot's ${slot.npages} pages, and ` +
          'num_pages must be a multiple of 64 unless the range reaches the end of the slot',
      )
    }
    const longs = Math.ceil(numPages / 64)
    if (bitmap.length < longs * 2) {
      throw new KvmError('EFAULT', `${fn}: the bitmap has ${bitmap.length} 32-bit words, ${longs * 2} are needed for ${numPages} pages`)
    }
    const bm = slot.dirtyBitmap!
    const masks: DirtyLogMask[] = []
    for (let n = 0; n < longs; n++) {
      const w = firstPage / 32 + n * 2
      const ulo = bitmap[n * 2]!
      const uhi = bitmap[n * 2 + 1]!
      if ((ulo | uhi) === 0) continue
      // mask &= atomic_long_fetch_andnot(mask, p): only bits that were really set count.
      const lo = (bm[w]! & ulo) >>> 0
      const hi = (bm[w + 1]! & uhi) >>> 0
      bm[w] = bm[w]! & ~ulo
      bm[w + 1] = bm[w + 1]! & ~uhi
      if ((lo | hi) !== 0) masks.push({ slot, gfnOffset: firstPage + n * 64, lo, hi })
    }
    return { masks, flush: masks.length > 0 }
  }

  /** A deep, JSON-able copy of the state (generations, slots, bitmaps, lpage_info). */
  snapshot(): MemslotsSnapshot {
    return {
      manualDirtyLogProtect: this.manualDirtyLogProtect,
      nrMemslotPages: this.nrMemslotPages,
      spaces: this.spaces.map((s) => ({
        asId: s.asId,
        generation: s.generation,
        updateInProgress: s.updateInProgress,
        slots: s.sorted.map((m) => ({
          id: m.id,
          baseGfn: m.baseGfn,
          npages: m.npages,
          userspaceAddr: m.userspaceAddr,
          flags: m.flags,
          dirtyBitmap: m.dirtyBitmap ? Array.from(m.dirtyBitmap) : null,
          lpageInfo: m.arch.lpageInfo.map((a) => Array.from(a)),
        })),
      })),
    }
  }
}

/** `bitmap_set(bitmap, 0, n)`. */
function setBits(bm: Uint32Array, n: number): void {
  const full = n >>> 5
  bm.fill(0xffffffff, 0, full)
  if (n & 31) bm[full] = (1 << (n & 31)) - 1
}
