/**
 * Bit layouts of x86 paging structures (SDM Vol. 3A ch. 4, Vol. 3C ch. 28/29), as constants over
 * the two 32-bit halves of a 64-bit entry: `lo` = bits 31:0, `hi` = bits 63:32. Hot paths never use
 * BigInt; a 64-bit entry is always the pair (lo, hi) of unsigned 32-bit numbers.
 */

// ---- ordinary (IA-32e / PAE) paging entries, low half ----
export const PTE_P = 1 << 0
export const PTE_RW = 1 << 1
export const PTE_US = 1 << 2
export const PTE_PWT = 1 << 3
export const PTE_PCD = 1 << 4
export const PTE_A = 1 << 5
export const PTE_D = 1 << 6
/** PS in PDE/PDPTE; PAT in a 4 KiB PTE. */
export const PTE_PS = 1 << 7
export const PTE_G = 1 << 8
/** PAT bit of a 2 MiB / 1 GiB leaf (bit 12). */
export const PTE_PAT_LARGE = 1 << 12
/** Address field of a 4 KiB-aligned entry within the low half (bits 31:12). */
export const LO_ADDR_MASK = 0xfffff000

// ---- high half (bit n of the entry is bit n-32 of hi) ----
/** XD (bit 63). */
export const HI_XD = 0x80000000
/** Protection key, bits 62:59 → hi bits 30:27. */
export const HI_PK_SHIFT = 27
export const HI_PK_MASK = 0xf << HI_PK_SHIFT
/** Address bits 51:32 → hi bits 19:0 (the architectural maximum; MAXPHYADDR trims it). */
export const HI_ADDR_MASK_52 = 0x000fffff

// ---- EPT entries ----
export const EPT_R = 1 << 0
export const EPT_W = 1 << 1
export const EPT_X = 1 << 2
export const EPT_MT_SHIFT = 3
export const EPT_MT_MASK = 7 << EPT_MT_SHIFT
export const EPT_IPAT = 1 << 6
export const EPT_PS = 1 << 7
export const EPT_A = 1 << 8
export const EPT_D = 1 << 9
/** User-execute (MBEC), bit 10. */
export const EPT_XU = 1 << 10
/** Suppress #VE, bit 63. */
export const EPT_HI_SVE = 0x80000000

// ---- #PF error code (SDM 4.7) ----
export const PFERR_P = 1 << 0
export const PFERR_W = 1 << 1
export const PFERR_U = 1 << 2
export const PFERR_RSVD = 1 << 3
export const PFERR_I = 1 << 4
export const PFERR_PK = 1 << 5

// ---- access kinds ----
export const ACC_READ = 0
export const ACC_WRITE = 1
export const ACC_FETCH = 2
/** Access-kind numbers: 0 read, 1 write, 2 fetch. */
export type AccessKind = 0 | 1 | 2

// ---- EPT violation exit qualification (SDM 28.3.3.2 / 27.2.1) ----
export const EPTQ_READ = 1 << 0
export const EPTQ_WRITE = 1 << 1
export const EPTQ_FETCH = 1 << 2
export const EPTQ_R = 1 << 3
export const EPTQ_W = 1 << 4
export const EPTQ_X = 1 << 5
export const EPTQ_XU = 1 << 6
export const EPTQ_GLA_VALID = 1 << 7
export const EPTQ_GLA_FINAL = 1 << 8
export const EPTQ_GLA_USER = 1 << 9
export const EPTQ_GLA_WRITABLE = 1 << 10
export const EPTQ_GLA_NX = 1 << 11

// ---- AMD NPF EXITINFO1 high bits (bit n-32 in the high half) ----
/** EXITINFO1 bit 32: fault while translating the final guest-physical address. */
export const NPF_HI_FINAL = 1 << 0
/** EXITINFO1 bit 33: fault while translating a guest page-table access. */
export const NPF_HI_GUEST_PT = 1 << 1

// ---- VM exit reasons (VMX basic exit reasons where one exists; SVM ones mapped) ----
export const EXIT_NONE = 0
/** Intercepted #PF (shadow paging): VMX exit reason 0 (exception/NMI) with vector 14. */
export const EXIT_PF = 1
export const EXIT_EPT_VIOLATION = 48
export const EXIT_EPT_MISCONFIG = 49
/** AMD #VMEXIT(NPF), exit code 0x400. */
export const EXIT_NPF = 0x400
export const EXIT_CR_ACCESS = 28
export const EXIT_INVLPG = 14
export const EXIT_INVPCID = 58
export const EXIT_MSR_WRITE = 32

const TWO32 = 4294967296

/** Physical address field (bits M-1:12) of an entry, as a number. `hiMask` keeps bits 51:32 below MAXPHYADDR. */
/**
 * `x` rounded down to a multiple of `align` (floor, so also for negative x). For integers and a
 * power-of-two `align` it equals `x - x % align` for x ≥ 0, without `%`: V8 compiles `%` on
 * numbers it does not know to be int32 (gfns, pfns, HVAs and addresses, held as doubles) to a C
 * call (fmod), and this sits on fault paths. Dividing by a power of two is exact below 2^53.
 */
export function alignDown(x: number, align: number): number {
  return Math.floor(x / align) * align
}

export function entryAddr(lo: number, hi: number, hiMask: number): number {
  return ((lo & LO_ADDR_MASK) >>> 0) + (hi & hiMask) * TWO32
}

/** Split a safe integer (possibly negative, e.g. a canonical kernel address) into two's-complement halves. */
export function splitHi(x: number): number {
  return Math.floor(x / TWO32) >>> 0
}
/** Low 32 bits of a safe integer, as unsigned. */
export function splitLo(x: number): number {
  return (x - Math.floor(x / TWO32) * TWO32) >>> 0
}
/** Join two unsigned halves into a number (exact only below 2^53). */
export function joinU64(lo: number, hi: number): number {
  return (hi >>> 0) * TWO32 + (lo >>> 0)
}

/** API-edge helper: a 64-bit value as BigInt → (lo, hi). Never on a hot path. */
export function fromBigInt(v: bigint): { lo: number; hi: number } {
  const u = BigInt.asUintN(64, v)
  return { lo: Number(u & 0xffffffffn), hi: Number(u >> 32n) }
}
/** API-edge helper: (lo, hi) → unsigned 64-bit BigInt, for printing. */
export function toBigInt(lo: number, hi: number): bigint {
  return (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0)
}
/** Hex string of a 64-bit entry, for messages and printing. */
export function hex64(lo: number, hi: number): string {
  return '0x' + (hi >>> 0).toString(16).padStart(8, '0') + (lo >>> 0).toString(16).padStart(8, '0')
}

/**
 * A linear address as a number: canonical addresses are represented signed (kernel addresses are
 * negative), so every 4-level address and every 5-level address with |la| < 2^53 is exact.
 * Converts a BigInt (e.g. `0xffff888000000000n`) to that form.
 */
export function laFromBigInt(v: bigint): number {
  return Number(BigInt.asIntN(64, v))
}
/** The unsigned 64-bit form of a (signed) linear address, for printing. */
export function laToBigInt(la: number): bigint {
  return BigInt.asUintN(64, BigInt(la))
}
