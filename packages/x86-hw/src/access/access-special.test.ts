/**
 * The six special sub-tests of kvm-unit-tests `x86/access.c` that need no hypervisor, run against
 * `walk()` through the same harness as the matrix (each sub-test gets a fresh pool, as access.c's
 * `ac_env_int`). Each step is checked twice: by the harness against the oracle (access.c's own
 * check), and by explicit assertions of the exact error code and A/D bits, so a wrong oracle
 * cannot hide a wrong walker. Run for 4- and 5-level paging.
 *
 * These sub-tests target KVM shadow-paging bugs; on a hardware model they pin down the
 * architectural answer that KVM must reproduce.
 */
import { describe, expect, it } from 'vitest'
import {
  AC_ACC_FETCH,
  AC_ACC_USER,
  AC_ACC_WRITE,
  AC_CPU_SMEP,
  AC_CPU_WP,
  AC_PDE_A,
  AC_PDE_P,
  AC_PDE_PSE,
  AC_PDE_U,
  AC_PDE_W,
  AC_PDPTE_RO,
  AC_PTE_A,
  AC_PTE_D,
  AC_PTE_NX,
  AC_PTE_P,
  AC_PTE_U,
  AC_PTE_W,
  acMask,
} from './access-flags.ts'
import { AC_CODE_DATA_PHYS, AcEnv, AcTest } from './access-harness.ts'

const m = acMask
const A = 0x20
const D = 0x40
const WALK_PF = 1

function va(x: bigint): number {
  return Number(BigInt.asIntN(64, x))
}

/** Expected outcome of one access: `fault` is the exact error code, or null for no fault. */
interface Outcome {
  fault: number | null
  /** Exact A/D bits of the leaf entry afterwards (PTE, or PDE for a 2 MiB page). */
  leafAD?: number
}

function leafLo(env: AcEnv, at: AcTest): number {
  return env.mem.read32(at.ptePa >= 0 ? at.ptePa : at.pdePa)
}

/** ac_test_do_access plus explicit checks of the architectural outcome. */
function access(env: AcEnv, at: AcTest, want: Outcome): void {
  const ok = at.doAccess(env)
  expect(ok ? '' : at.failure).toBe('')
  if (want.fault === null) {
    expect(env.res.status).toBe(0)
  } else {
    expect(env.res.status).toBe(WALK_PF)
    expect('0x' + env.res.errorCode.toString(16)).toBe('0x' + want.fault.toString(16))
    expect(env.res.cr2).toBe(at.virt)
  }
  if (want.leafAD !== undefined) expect(leafLo(env, at) & (A | D)).toBe(want.leafAD)
}

describe.each([4, 5] as const)('access.c special sub-tests, %i-level paging', (levels) => {
  const newEnv = (): AcEnv => new AcEnv({ levels, maxPhyAddr: 46 })

  it('corrupt_hugepage_trigger: two 2 MiB aliases, read-only and writable', () => {
    const env = newEnv()
    const at1 = new AcTest().init(env, va(0xffff923400000000n))
    const at2 = new AcTest().init(env, va(0xffffe66600000000n), at1)
    // Separate PDs (the PDPT indices differ), one physical 2 MiB page.
    expect(at2.pageTables[3]).not.toBe(at1.pageTables[3])

    at2.flags = m(AC_CPU_WP) | m(AC_PDE_PSE) | m(AC_PDE_P)
    at2.setupPtes(env)
    access(env, at2, { fault: null, leafAD: A })

    at1.flags = at2.flags | m(AC_PDE_W)
    at1.setupPtes(env)
    access(env, at1, { fault: null, leafAD: A })

    at1.flags |= m(AC_ACC_WRITE)
    at1.setExpected(env)
    access(env, at1, { fault: null, leafAD: A | D })
    expect(env.res.pa).toBe(AC_CODE_DATA_PHYS)

    // The read-only alias must still fault (W=1, P=1) and stay clean.
    at2.flags |= m(AC_ACC_WRITE)
    at2.setExpected(env)
    access(env, at2, { fault: 0x3, leafAD: A })
  })

  it('check_pfec_on_prefetch_pte: reserved XD (EFER.NXE=0) in a neighbour PTE gives P|RSVD', () => {
    const env = newEnv()
    const at1 = new AcTest().init(env, va(0xffff923406001000n))
    const at2 = new AcTest().init(env, va(0xffff923406003000n), at1)
    // Same PT: the two PTEs are neighbours (what KVM would prefetch).
    expect(at2.pageTables[2]).toBe(at1.pageTables[2])

    at1.flags = m(AC_PDE_P) | m(AC_PTE_P)
    at1.setupPtes(env)
    at2.flags = at1.flags | m(AC_PTE_NX)
    at2.setupPtes(env)
    expect(at2.ptePa - at1.ptePa).toBe(16)

    access(env, at1, { fault: null, leafAD: A })
    // Supervisor read, NXE=0: XD is reserved → P|RSVD; the PTE gains no A bit.
    access(env, at2, { fault: 0x9, leafAD: 0 })
    expect(env.mem.read32(at2.ptePa + 4)).toBe(0x80000000)

    // Beyond access.c: a fetch reports no I/D bit (NXE=0, SMEP=0), a write adds W.
    at2.flags |= m(AC_ACC_FETCH)
    at2.setExpected(env)
    access(env, at2, { fault: 0x9, leafAD: 0 })
    at2.flags = (at2.flags & ~m(AC_ACC_FETCH)) | m(AC_ACC_WRITE)
    at2.setExpected(env)
    access(env, at2, { fault: 0xb, leafAD: 0 })
  })

  it('check_large_pte_dirty_for_nowp: D is set through each alias of a read-only 2 MiB page written with CR0.WP=0', () => {
    const env = newEnv()
    const at1 = new AcTest().init(env, va(0xffff923403000000n))
    const at2 = new AcTest().init(env, va(0xffffe66606000000n), at1)

    at2.flags = m(AC_PDE_P) | m(AC_PDE_PSE)
    at2.setupPtes(env)
    access(env, at2, { fault: null, leafAD: A })

    at1.flags = at2.flags | m(AC_ACC_WRITE)
    at1.setupPtes(env)
    access(env, at1, { fault: null, leafAD: A | D })
    expect(env.res.pa).toBe(AC_CODE_DATA_PHYS)

    // The first alias was clean; writing through it must set its own D bit.
    expect(leafLo(env, at2) & D).toBe(0)
    at2.flags |= m(AC_ACC_WRITE)
    at2.setExpected(env)
    access(env, at2, { fault: null, leafAD: A | D })
  })

  it('check_smep_andnot_wp: as access.c runs it (CR0.WP=1), the write faults and the SMEP fetch faults with I/D', () => {
    const env = newEnv()
    const at = new AcTest().init(env, va(0xffff923406001000n))
    at.flags =
      m(AC_PDE_P) | m(AC_PTE_P) | m(AC_PDE_U) | m(AC_PTE_U) | m(AC_PDE_A) | m(AC_PTE_A) |
      m(AC_CPU_SMEP) | m(AC_CPU_WP) | m(AC_ACC_WRITE)
    at.setupPtes(env)
    // Supervisor write to a read-only user page with WP=1: W|P.
    access(env, at, { fault: 0x3, leafAD: A })

    at.flags = (at.flags & ~m(AC_ACC_WRITE)) | m(AC_ACC_FETCH)
    at.setExpected(env)
    // Supervisor fetch from a user page with SMEP: I|P (EFER.NXE=0, but SMEP makes I/D valid).
    access(env, at, { fault: 0x11, leafAD: A })
  })

  it('[intended variant] check_smep_andnot_wp with CR0.WP=0: the write succeeds, the SMEP fetch still faults', () => {
    const env = newEnv()
    const at = new AcTest().init(env, va(0xffff923406001000n))
    at.flags =
      m(AC_PDE_P) | m(AC_PTE_P) | m(AC_PDE_U) | m(AC_PTE_U) | m(AC_PDE_A) | m(AC_PTE_A) | m(AC_CPU_SMEP) | m(AC_ACC_WRITE)
    at.setupPtes(env)
    access(env, at, { fault: null, leafAD: A | D })
    at.flags = (at.flags & ~m(AC_ACC_WRITE)) | m(AC_ACC_FETCH)
    at.setExpected(env)
    access(env, at, { fault: 0x11, leafAD: A | D })
  })

  it('check_toggle_cr0_wp: a supervisor write to a read-only page follows the current CR0.WP', () => {
    const env = newEnv()
    const at = new AcTest().init(env, va(0xffff923042007000n))
    const base = m(AC_PDE_P) | m(AC_PDE_A) | m(AC_PTE_P) | m(AC_PTE_A) | m(AC_ACC_WRITE)
    at.flags = base
    at.setupPtes(env)

    const doCr0WpAccess = (wp: boolean, want: Outcome): void => {
      at.flags = base | (wp ? m(AC_CPU_WP) : 0)
      at.setExpected(env)
      // Load the inverse WP and toggle EFER.NX so that a stale context would hold the wrong WP.
      env.setWp(!wp)
      env.sync()
      env.setNxe(true)
      env.sync()
      env.setNxe(false)
      env.sync()
      access(env, at, want)
    }
    doCr0WpAccess(false, { fault: null, leafAD: A | D })
    doCr0WpAccess(true, { fault: 0x3, leafAD: A | D })
    // And back (beyond access.c): WP=0 allows the write again.
    doCr0WpAccess(false, { fault: null, leafAD: A | D })
  })

  it('check_effective_sp_permissions: one PD under a writable and a read-only PDPTE', () => {
    const env = newEnv()
    const ptr1 = 0xffff923480000000n
    const ptr2 = ptr1 + 0x200000n
    const ptr3 = ptr1 + 0x40000000n
    const ptr4 = ptr3 + 0x200000n
    const userRead = m(AC_PDE_P) | m(AC_PTE_P) | m(AC_PDE_U) | m(AC_PTE_U) | m(AC_PDE_A) | m(AC_PTE_A) | m(AC_PTE_W) | m(AC_ACC_USER)

    const at1 = new AcTest().init(env, va(ptr1))
    at1.flags = userRead
    at1.setupPtes(env)

    const at2 = new AcTest().init(env, va(ptr2), at1)
    at2.flags = at1.flags | m(AC_PDE_W) | m(AC_PTE_D) | m(AC_ACC_WRITE)
    at2.setupPtes(env)

    const at3 = new AcTest().init(env, va(ptr3), at1)
    at3.pageTables[3] = at1.pageTables[3]! // its PDPTE points at ptr1's PD
    at3.flags = m(AC_PDPTE_RO) | at1.flags
    at3.setupPtes(env)

    const at4 = new AcTest().init(env, va(ptr4), at2)
    at4.pageTables[3] = at1.pageTables[3]!
    at4.flags = m(AC_PDPTE_RO) | at2.flags
    at4.setupPtes(env)

    // ptr3/ptr4 reach the very PDEs/PTEs of ptr1/ptr2, through a different PDPTE.
    expect(at3.pdePa).toBe(at1.pdePa)
    expect(at4.pdePa).toBe(at2.pdePa)
    expect(at4.ptePa).toBe(at2.ptePa)

    access(env, at1, { fault: null, leafAD: A })
    access(env, at2, { fault: null, leafAD: A | D })
    access(env, at3, { fault: null, leafAD: A })
    // User write through the read-only PDPTE: P|W|U, although the PDE and PTE are writable.
    access(env, at4, { fault: 0x7, leafAD: A | D })
  })
})
