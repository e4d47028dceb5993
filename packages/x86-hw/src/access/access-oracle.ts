import {
  AC_ACC_FETCH as I_AC_ACC_FETCH,
  AC_ACC_TWICE as I_AC_ACC_TWICE,
  AC_ACC_USER as I_AC_ACC_USER,
  AC_ACC_WRITE as I_AC_ACC_WRITE,
  AC_CPU_NXE as I_AC_CPU_NXE,
  AC_CPU_PKE as I_AC_CPU_PKE,
  AC_CPU_SMEP as I_AC_CPU_SMEP,
  AC_CPU_WP as I_AC_CPU_WP,
  AC_PDE_A as I_AC_PDE_A,
  AC_PDE_BIT13 as I_AC_PDE_BIT13,
  AC_PDE_BIT36 as I_AC_PDE_BIT36,
  AC_PDE_BIT51 as I_AC_PDE_BIT51,
  AC_PDE_NX as I_AC_PDE_NX,
  AC_PDE_P as I_AC_PDE_P,
  AC_PDE_PSE as I_AC_PDE_PSE,
  AC_PDE_U as I_AC_PDE_U,
  AC_PDE_W as I_AC_PDE_W,
  AC_PDPTE_RO as I_AC_PDPTE_RO,
  AC_PKU_AD as I_AC_PKU_AD,
  AC_PKU_PKEY as I_AC_PKU_PKEY,
  AC_PKU_WD as I_AC_PKU_WD,
  AC_PTE_BIT36 as I_AC_PTE_BIT36,
  AC_PTE_BIT51 as I_AC_PTE_BIT51,
  AC_PTE_NX as I_AC_PTE_NX,
  AC_PTE_P as I_AC_PTE_P,
  AC_PTE_U as I_AC_PTE_U,
  AC_PTE_W as I_AC_PTE_W,
} from './access-flags.ts'

// Module-local copies: imported bindings become getters under the test runner's module transform,
// which costs more than the rest of a case on this hot path.
const AC_ACC_FETCH = I_AC_ACC_FETCH
const AC_ACC_TWICE = I_AC_ACC_TWICE
const AC_ACC_USER = I_AC_ACC_USER
const AC_ACC_WRITE = I_AC_ACC_WRITE
const AC_CPU_NXE = I_AC_CPU_NXE
const AC_CPU_PKE = I_AC_CPU_PKE
const AC_CPU_SMEP = I_AC_CPU_SMEP
const AC_CPU_WP = I_AC_CPU_WP
const AC_PDE_A = I_AC_PDE_A
const AC_PDE_BIT13 = I_AC_PDE_BIT13
const AC_PDE_BIT36 = I_AC_PDE_BIT36
const AC_PDE_BIT51 = I_AC_PDE_BIT51
const AC_PDE_NX = I_AC_PDE_NX
const AC_PDE_P = I_AC_PDE_P
const AC_PDE_PSE = I_AC_PDE_PSE
const AC_PDE_U = I_AC_PDE_U
const AC_PDE_W = I_AC_PDE_W
const AC_PDPTE_RO = I_AC_PDPTE_RO
const AC_PKU_AD = I_AC_PKU_AD
const AC_PKU_PKEY = I_AC_PKU_PKEY
const AC_PKU_WD = I_AC_PKU_WD
const AC_PTE_BIT36 = I_AC_PTE_BIT36
const AC_PTE_BIT51 = I_AC_PTE_BIT51
const AC_PTE_NX = I_AC_PTE_NX
const AC_PTE_P = I_AC_PTE_P
const AC_PTE_U = I_AC_PTE_U
const AC_PTE_W = I_AC_PTE_W

// Error-code and entry bits, restated here so the oracle depends on nothing it is checking.
/** #PF error code bits (SDM 4.7). */
export const EC_P = 0x01
export const EC_W = 0x02
export const EC_U = 0x04
export const EC_RSVD = 0x08
export const EC_I = 0x10
export const EC_PK = 0x20
/** Accessed and dirty bits of an entry's low half. */
export const ENTRY_A = 0x20
export const ENTRY_D = 0x40

/**
 * What access.c expects of one test case (its `expected_*` fields), relative to the entries as
 * they were just before the access(es): the leaf bits the access must add, the PDE bits it must
 * add, and the PDE bits whose value is not checked.
 */
export class AcExpectation {
  /** A #PF is expected (of the last access, for TWICE). */
  fault = false
  /** Its exact error code. */
  error = 0
  /** Bits the 4 KiB PTE must gain (only checked when the PDE is not a 2 MiB leaf). */
  pteSet = 0
  /** Bits the PDE must gain (A/D of a 2 MiB leaf; A of a non-leaf PDE). */
  pdeSet = 0
  /** PDE bits excluded from the comparison (A, when the access faults and pde.a was clear). */
  pdeIgnore = 0
}

function bit(flags: number, b: number): boolean {
  return ((flags >>> b) & 1) !== 0
}

/**
 * One access as access.c's `ac_emulate_access` sees it, written from the architectural rules:
 * the PDE decides first (not present → P=0; a reserved bit → RSVD, bits 51/36/13 and NX while
 * EFER.NXE=0), then, unless the PDE is a 2 MiB leaf, the PTE the same way; a complete translation
 * is then checked for rights (user access to a supervisor page; write to a read-only page unless
 * supervisor with CR0.WP=0; fetch from an XD page; supervisor fetch from a user page with SMEP;
 * PKRU.AD / PKRU.WD of key 1 for data accesses to user pages), and only if allowed the leaf gains
 * A, plus D for a write. A non-leaf PDE that was used gains A. Accumulates into `out`.
 */
function emulateOne(flags: number, out: AcExpectation): void {
  const user = bit(flags, AC_ACC_USER)
  const write = bit(flags, AC_ACC_WRITE)
  const fetch = bit(flags, AC_ACC_FETCH)
  const nxe = bit(flags, AC_CPU_NXE)
  const wp = bit(flags, AC_CPU_WP)
  const smep = bit(flags, AC_CPU_SMEP)

  let error = (write ? EC_W : 0) | (user ? EC_U : 0) | (fetch && (nxe || smep) ? EC_I : 0)
  let fault = false
  let leafSet = 0
  const pse = bit(flags, AC_PDE_PSE)

  // Level 2.
  const pdeRsvd =
    bit(flags, AC_PDE_BIT51) || bit(flags, AC_PDE_BIT36) || (pse && bit(flags, AC_PDE_BIT13)) || (!nxe && bit(flags, AC_PDE_NX))
  let complete = false
  // Effective rights over PDPTE (U=1, W unless pdpte.ro), PDE, and (4 KiB) PTE.
  let w = !bit(flags, AC_PDPTE_RO)
  let u = true
  let x = true
  if (!bit(flags, AC_PDE_P)) {
    fault = true
  } else if (pdeRsvd) {
    fault = true
    error |= EC_P | EC_RSVD
  } else {
    w &&= bit(flags, AC_PDE_W)
    u &&= bit(flags, AC_PDE_U)
    x &&= !(nxe && bit(flags, AC_PDE_NX))
    if (pse) {
      complete = true
    } else {
      out.pdeSet |= ENTRY_A
      // Level 1.
      const pteRsvd = bit(flags, AC_PTE_BIT51) || bit(flags, AC_PTE_BIT36) || (!nxe && bit(flags, AC_PTE_NX))
      if (!bit(flags, AC_PTE_P)) {
        fault = true
      } else if (pteRsvd) {
        fault = true
        error |= EC_P | EC_RSVD
      } else {
        w &&= bit(flags, AC_PTE_W)
        u &&= bit(flags, AC_PTE_U)
        x &&= !(nxe && bit(flags, AC_PTE_NX))
        complete = true
      }
    }
  }

  if (complete) {
    error |= EC_P
    // A supervisor write with CR0.WP=0 ignores R/W (and PKRU.WD).
    const supervisorOverridesRo = !user && !wp
    if (user && !u) fault = true
    if (write && !w && !supervisorOverridesRo) fault = true
    if (fetch && !x) fault = true
    if (fetch && !user && u && smep) fault = true
    // The leaf's key is 1 with pkey=1, else 0; PKRU has AD/WD only for key 1 (key 0 is open), and
    // key 2 (the non-leaf PDE's) must not matter.
    if (!fetch && u && bit(flags, AC_CPU_PKE) && bit(flags, AC_PKU_PKEY)) {
      const ad = bit(flags, AC_PKU_AD)
      const wd = bit(flags, AC_PKU_WD)
      if (ad || (write && wd && !supervisorOverridesRo)) {
        fault = true
        error |= EC_PK
      }
    }
    if (!fault) leafSet = ENTRY_A | (write ? ENTRY_D : 0)
  }

  if (pse) out.pdeSet |= leafSet
  else out.pteSet |= leafSet
  out.fault = fault
  out.error = fault ? error : 0
  // access.c does not check the PDE's A bit after a fault if the test did not set it itself.
  out.pdeIgnore = fault && !bit(flags, AC_PDE_A) ? ENTRY_A : 0
}

/**
 * access.c `__ac_set_expected_status` / `ac_emulate_access`: the expectation for a case. With
 * TWICE, a supervisor read of the same address comes first; its fault (if any) is ignored, but the
 * A bits it sets are expected too.
 */
export function acExpect(flags: number, out: AcExpectation): AcExpectation {
  out.fault = false
  out.error = 0
  out.pteSet = 0
  out.pdeSet = 0
  out.pdeIgnore = 0
  if (bit(flags, AC_ACC_TWICE)) {
    emulateOne(flags & ~((1 << AC_ACC_WRITE) | (1 << AC_ACC_FETCH) | (1 << AC_ACC_USER)), out)
  }
  emulateOne(flags, out)
  return out
}
