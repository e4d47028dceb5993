import { laFromBigInt, PTE_A, PTE_P, PTE_RW, PTE_US } from '@mmusim/x86-hw'

/*
 * The guest's virtual and physical layout, and the page-table entry conventions it uses.
 * Everything here is a constant or a pure function.
 */

/** Bytes in a 4 KiB page. */
export const PAGE_4K = 4096
/** Bytes in a 2 MiB page. */
export const PAGE_2M = 2 ** 21
/** Bytes in a 1 GiB page. */
export const PAGE_1G = 2 ** 30
/** Frames in a 2 MiB page. */
export const FRAMES_PER_2M = 512

const TWO32 = 4294967296

/**
 * Base of the direct map of all guest-physical memory (Linux's `PAGE_OFFSET`, `__va(pa)`), 4-level
 * paging: Linux's own 0xffff888000000000, as a signed linear address.
 */
export const DIRECT_MAP_BASE_4L: number = laFromBigInt(0xffff888000000000n)
/**
 * Direct-map base with 5-level paging. Linux uses 0xff11000000000000, but linear addresses are
 * signed safe integers here (|la| < 2^53), so mmusim picks 0xfff0000000000000 = -2^52: upper half,
 * PML5 index 496, exact in a double.
 */
export const DIRECT_MAP_BASE_5L: number = laFromBigInt(0xfff0000000000000n)
/** Kernel text (Linux's `__START_KERNEL_map`, 0xffffffff80000000): the same number in both modes. */
export const KERNEL_TEXT_BASE: number = laFromBigInt(0xffffffff80000000n)
/** Pages of kernel text mapped read-only (the target of the CR0.WP patching sequence). */
export const KERNEL_TEXT_PAGES = 4

/** Lowest user address handed out by mmap without a fixed address (Linux's mmap_min_addr is 64 KiB; we start higher). */
export const USER_MMAP_BASE = 0x10000000
/** First address above user space with 4-level paging (2^47). */
export const USER_TOP_4L = 2 ** 47
/** First address above user space with 5-level paging (2^56). */
export const USER_TOP_5L = 2 ** 56

/** IPI vector of the TLB-shootdown handler (Linux's CALL_FUNCTION_VECTOR, 0xfb). */
export const VECTOR_TLB_SHOOTDOWN = 0xfb

/** PCIDs available to user address spaces (Linux's TLB_NR_DYN_ASIDS). PCID = ASID slot + 1; PCID 0 is the kernel's. */
export const NR_DYN_ASIDS = 6
/** Above this many pages a range flush becomes a full flush (Linux's tlb_single_page_flush_ceiling). */
export const FLUSH_CEILING_PAGES = 33

/** Non-leaf entry bits of a page-table page (Linux's `_PAGE_TABLE`: P|RW|US|A). */
export const PAGE_TABLE_LO = PTE_P | PTE_RW | PTE_US | PTE_A
/** Kernel non-leaf entry bits (Linux's `_KERNPG_TABLE`: P|RW|A). */
export const KERNPG_TABLE_LO = PTE_P | PTE_RW | PTE_A
/** Marker bit of a swap entry (a non-present PTE that names a swap slot). Ignored by hardware since P = 0. */
export const SWAP_PTE_MARK = 1 << 10
/** Marker of a PROT_NONE page: P = 0 with bit 8 set (Linux's `_PAGE_PROTNONE`, which reuses the G bit). The frame stays in the entry. */
export const PTE_PROTNONE = 1 << 8
/** The "no flush" hint of MOV CR3 (bit 63), as Linux's CR3_NOFLUSH. */
export const CR3_NOFLUSH = true

/** Protection bits of a mapping (PROT_READ/PROT_WRITE/PROT_EXEC). */
export const PROT_NONE = 0
/** PROT_READ. */
export const PROT_READ = 1
/** PROT_WRITE. */
export const PROT_WRITE = 2
/** PROT_EXEC. */
export const PROT_EXEC = 4

/** Index of linear address `va` at paging level 1..5 (works for signed kernel addresses). */
export function ptIndex(va: number, level: number): number {
  const hi = Math.floor(va / TWO32) >>> 0
  const lo = (va - Math.floor(va / TWO32) * TWO32) >>> 0
  switch (level) {
    case 1:
      return (lo >>> 12) & 511
    case 2:
      return (lo >>> 21) & 511
    case 3:
      return ((hi & 0x7f) << 2) | (lo >>> 30)
    case 4:
      return (hi >>> 7) & 511
    default:
      return (hi >>> 16) & 511
  }
}

/** Bytes mapped by one entry at `level` (1: 4 KiB, 2: 2 MiB, 3: 1 GiB, 4: 512 GiB, 5: 256 TiB). */
export function levelSize(level: number): number {
  return 2 ** (12 + 9 * (level - 1))
}

/** Round `x` down to a multiple of `align` (works for negative x); the x86-hw helper, re-exported. */
export { alignDown } from '@mmusim/x86-hw'

/** Physical address held in an entry (bits 51:12), from its halves. */
export function entryPa(lo: number, hi: number): number {
  return ((lo & 0xfffff000) >>> 0) + (hi & 0xfffff) * TWO32
}

/** Low half of an entry that maps physical address `pa` with flags `flags`. */
export function entryLo(pa: number, flags: number): number {
  return ((pa % TWO32) | flags) >>> 0
}

/** High half of an entry that maps physical address `pa` with high flags `hiFlags` (XD, keys). */
export function entryHi(pa: number, hiFlags: number): number {
  return (Math.floor(pa / TWO32) | hiFlags) >>> 0
}
