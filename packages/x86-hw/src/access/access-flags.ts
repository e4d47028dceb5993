/**
 * The flag space of kvm-unit-tests `x86/access.c`: one bit per test dimension, enumerated as a
 * binary counter, plus its legality (skip) rules. Bit numbers follow access.c's enum order, so the
 * enumeration order (and hence how entries evolve from one case to the next) is the same as on
 * real hardware. FEP (forced emulation) has a bit number but is always invalid here: there is no
 * instruction emulator in this package.
 */

// ---- bit numbers (access.c enum order; PRESENT and reserved bits high so they toggle rarely) ----
export const AC_PTE_W = 0
export const AC_PTE_U = 1
export const AC_PTE_A = 2
export const AC_PTE_D = 3
export const AC_PTE_NX = 4
export const AC_PTE_P = 5
export const AC_PTE_BIT51 = 6
export const AC_PTE_BIT36 = 7
export const AC_PDE_W = 8
export const AC_PDE_U = 9
export const AC_PDE_A = 10
export const AC_PDE_D = 11
export const AC_PDE_PSE = 12
export const AC_PDE_NX = 13
export const AC_PDE_P = 14
export const AC_PDE_BIT51 = 15
export const AC_PDE_BIT36 = 16
export const AC_PDE_BIT13 = 17
/** The PDPTE is read-only (R/W=0); otherwise it is writable. */
export const AC_PDPTE_RO = 18
/** PKRU.AD of key 1. */
export const AC_PKU_AD = 19
/** PKRU.WD of key 1. */
export const AC_PKU_WD = 20
/** The leaf entry carries protection key 1 (and the non-leaf PDE key 2, which must be ignored). */
export const AC_PKU_PKEY = 21
export const AC_ACC_USER = 22
export const AC_ACC_WRITE = 23
export const AC_ACC_FETCH = 24
/** A supervisor read of the address precedes the access. */
export const AC_ACC_TWICE = 25
export const AC_CPU_NXE = 26
export const AC_CPU_WP = 27
export const AC_CPU_SMEP = 28
export const AC_CPU_PKE = 29
/** Forced emulation prefix; never valid in this package. */
export const AC_FEP = 30
/** Number of flag bits (the counter runs below 2^31). */
export const AC_NR_FLAGS = 31

/** Mask of one flag bit. */
export function acMask(bit: number): number {
  return (1 << bit) >>> 0
}

/** Names as access.c prints them (`ac_names`), indexed by bit number. */
export const AC_FLAG_NAMES: readonly string[] = [
  'pte.rw', 'pte.user', 'pte.a', 'pte.d', 'pte.nx', 'pte.p', 'pte.51', 'pte.36',
  'pde.rw', 'pde.user', 'pde.a', 'pde.d', 'pde.pse', 'pde.nx', 'pde.p', 'pde.51', 'pde.36', 'pde.13',
  'pdpte.ro', 'pkru.ad', 'pkru.wd', 'pkey=1',
  'user', 'write', 'fetch', 'twice',
  'efer.nx', 'cr0.wp', 'cr4.smep', 'cr4.pke', 'fep',
]

/** Decode a flag word into access.c's names, e.g. `pte.p pde.p write cr0.wp`. */
export function acFlagNames(flags: number): string {
  const out: string[] = []
  for (let b = 0; b < AC_NR_FLAGS; b++) if (((flags >>> b) & 1) !== 0) out.push(AC_FLAG_NAMES[b]!)
  return out.length === 0 ? '(none)' : out.join(' ')
}

/** What the CPU under test supports; decides which flags are meaningful (access.c's `invalid_mask`). */
export interface AcCpu {
  /** CPUID.80000008H:EAX[7:0]. */
  maxPhyAddr: number
  /** Protection keys (CR4.PKE) available. */
  pku: boolean
  /** SMEP available. */
  smep: boolean
}

/**
 * Flags that the counter never sets on this CPU (access.c `ac_test_run`): bit 51 when it is an
 * address bit (M ≥ 52), bit 36 when it is an address bit (M ≥ 37), the PKU flags without PKU,
 * SMEP without SMEP, and FEP always (no emulator).
 */
export function acInvalidMask(cpu: AcCpu): number {
  let m = acMask(AC_FEP)
  if (cpu.maxPhyAddr >= 52) m |= acMask(AC_PDE_BIT51) | acMask(AC_PTE_BIT51)
  if (cpu.maxPhyAddr >= 37) m |= acMask(AC_PDE_BIT36) | acMask(AC_PTE_BIT36)
  if (!cpu.pku) m |= acMask(AC_PKU_AD) | acMask(AC_PKU_WD) | acMask(AC_PKU_PKEY) | acMask(AC_CPU_PKE)
  if (!cpu.smep) m |= acMask(AC_CPU_SMEP)
  return m >>> 0
}

/**
 * Which SMEP rule to apply. `current` is today's access.c: every combination with CR4.SMEP is
 * skipped (the SMEP half of the matrix was disabled in 2021). `legacy` is the earlier rule, used
 * here only as a clearly labelled extension: SMEP allowed, but not together with a user access
 * (the old test made its own code pages supervisor-only while SMEP was on, so it could not drop
 * to CPL 3).
 */
export type AcSmepRule = 'current' | 'legacy'

const RSVD_ALWAYS =
  acMask(AC_PDE_BIT51) | acMask(AC_PDE_BIT36) | acMask(AC_PDE_BIT13) | acMask(AC_PTE_BIT51) | acMask(AC_PTE_BIT36)
const NX_BITS = acMask(AC_PDE_NX) | acMask(AC_PTE_NX)

/**
 * access.c `ac_test_legal`: whether the counter value is a case that is run.
 * Rules: no SMEP (current rule); no fetch+write; no user access with SMEP; PKRU AD/WD only with
 * CR4.PKE; PDE bit 13 only with PDE.PSE (it is a reserved bit of a 2 MiB PDE only); at most one
 * reserved-bit flag, counting the NX flags as reserved when EFER.NXE=0.
 */
export function acLegal(flags: number, smepRule: AcSmepRule = 'current'): boolean {
  const f = flags >>> 0
  const smep = (f >>> AC_CPU_SMEP) & 1
  if (smep !== 0 && smepRule === 'current') return false
  if (((f >>> AC_ACC_FETCH) & (f >>> AC_ACC_WRITE) & 1) !== 0) return false
  if (smep !== 0 && ((f >>> AC_ACC_USER) & 1) !== 0) return false
  if (((f >>> AC_CPU_PKE) & 1) === 0 && ((f >>> AC_PKU_AD) & 3) !== 0) return false
  if (((f >>> AC_PDE_PSE) & 1) === 0 && ((f >>> AC_PDE_BIT13) & 1) !== 0) return false
  let rsvd = RSVD_ALWAYS
  if (((f >>> AC_CPU_NXE) & 1) === 0) rsvd |= NX_BITS
  rsvd &= f
  return (rsvd & (rsvd - 1)) === 0
}

/**
 * access.c `ac_test_bump`: the next legal counter value after `flags`, skipping invalid bits by
 * carrying through them, or -1 when the counter passes 2^31. FEP must be in `invalidMask`: since it
 * is the top bit, a carry into it ends the enumeration, which keeps every counter value below 2^30
 * (a small integer for the JIT, so the 2^28-step loop allocates nothing).
 */
export function acNext(flags: number, invalidMask: number, smepRule: AcSmepRule = 'current'): number {
  if ((invalidMask & FEP_MASK) === 0) throw new RangeError('acNext: FEP must be invalid (no instruction emulator here)')
  const inv = invalidMask & (FEP_MASK - 1)
  const skipSmep = smepRule === 'current'
  let f = flags
  for (;;) {
    f = ((f | inv) + 1) & ~inv
    if (f >= FEP_MASK) return -1
    // Every value with SMEP set is illegal under the current rule: jump to the next carry out of it.
    if (skipSmep && (f & SMEP_MASK) !== 0) {
      f |= SMEP_MASK - 1
      continue
    }
    if (acLegal(f, smepRule)) return f
  }
}

const FEP_MASK = 1 << AC_FEP
const SMEP_MASK = 1 << AC_CPU_SMEP

/**
 * Number of cases access.c runs in its main loop for this invalid mask: the first case (all flags
 * clear, always legal) plus every legal successor.
 */
export function acCountCases(invalidMask: number, smepRule: AcSmepRule = 'current'): number {
  let n = 0
  for (let f = 0; f >= 0; f = acNext(f, invalidMask, smepRule)) n++
  return n
}
