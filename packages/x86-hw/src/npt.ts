import {
  ACC_FETCH,
  ACC_WRITE,
  type AccessKind,
  EXIT_NPF,
  LO_ADDR_MASK,
  NPF_HI_FINAL,
  NPF_HI_GUEST_PT,
  PFERR_I,
  PFERR_P,
  PFERR_RSVD,
  PFERR_U,
  PFERR_W,
  PTE_A,
  PTE_D,
  PTE_P,
  PTE_PS,
} from './bits.ts'
import { CR0_PE, CR0_PG, CR4_LA57, CR4_PAE, type CpuFeatures, CpuState, EFER_LMA, EFER_LME, EFER_NXE, PagingContext } from './cpu-state.ts'
import { HwConfigError } from './errors.ts'
import type { PhysMem } from './phys-mem.ts'
import type { NestedTranslator } from './walk.ts'
import { WALK_EXIT, type WalkResult } from './walk-result.ts'

const TWO32 = 4294967296

/** Options of an {@link NptTranslator}. */
export interface NptOptions {
  /** Nested CR3 (VMCB `nCR3`): host-physical address of the nested PML4 (or PML5); bits 11:0 ignored. */
  ncr3: number
  /** The host paging mode's depth: 4-level or 5-level (host CR4.LA57). */
  levels: 4 | 5
  /** Host EFER.NXE: the NX bit of nested entries is honoured; without it bit 63 is reserved. */
  hostNxe: boolean
  /** Host CR4.SMEP: only makes the I/D bit of EXITINFO1 valid (nested accesses are user accesses). @default false */
  hostSmep?: boolean
}

/**
 * AMD nested paging (NPT / RVI) as the second dimension of a 2-D walk (AMD APM Vol. 2 15.25;
 * x86-hw.md §7.6). The nested table has the ordinary long-mode format of the host paging mode,
 * with the host's reserved bits (KVM `__reset_rsvds_bits_mask` with the host's NXE, GBPAGES,
 * MAXPHYADDR and the AMD bit-8 reservation of non-leaf PML4E/PDPTEs when `features.vendor` is
 * 'amd'). Every nested access is a **user** access, and guest page-table accesses are **writes**
 * (KVM translates them with PFERR_USER|PFERR_WRITE in `FNAME(walk_addr_generic)`; Bochs models a
 * user RMW). Nested A/D bits are maintained like ordinary A/D bits.
 *
 * A failure is #VMEXIT(NPF) (exit code 0x400): EXITINFO1 is a #PF-style error code in its low half
 * (P, W, U = 1, RSVD, I/D when host NXE or SMEP) and, in its high half, bit 0 (EXITINFO1 bit 32) for
 * the final GPA or bit 1 (bit 33) for a guest page-table access; EXITINFO2 (`res.exitGpa`) is the
 * faulting guest-physical address. Values match kvm-unit-tests `x86/svm_npt.c`.
 *
 * Hot path: no allocation, no exceptions; failures return -1 with the exit fields of the result set.
 */
export class NptTranslator implements NestedTranslator {
  /** Always true: the nested walk treats guest page-table accesses as writes. */
  readonly ptAccessIsWrite = true
  readonly mem: PhysMem
  readonly features: CpuFeatures
  /**
   * Host-physical address of the top-level nested table. Initialised here, not only in the
   * constructor: a field that starts out undefined has a generic representation, and the walk's
   * `table` (starting from it) would then be boxed.
   */
  readonly root: number = 0
  readonly levels: 4 | 5
  readonly hostNxe: boolean
  readonly hostSmep: boolean
  private readonly hiAddrMask: number
  private readonly rsvdLo: Uint32Array
  private readonly rsvdHi: Uint32Array
  private readonly rsvdLargeLo: Uint32Array
  private readonly rsvdHiLarge: Uint32Array
  private readonly largeLevels: number
  private readonly aOnDescent: boolean
  /** I/D bit for fetch faults (host NXE or SMEP). */
  private readonly fetchBit: number
  private readonly pathPa = new Float64Array(6)
  private readonly pathLo = new Uint32Array(6)
  private readonly pathHi = new Uint32Array(6)

  /**
   * @throws HwConfigError for an invalid nCR3 or level count, or host NXE without NX support.
   */
  constructor(mem: PhysMem, features: CpuFeatures, options: NptOptions) {
    const { ncr3, levels, hostNxe } = options
    if (levels !== 4 && (levels as number) !== 5) throw new HwConfigError(`NPT levels must be 4 or 5; got ${String(levels)}`)
    if (!Number.isSafeInteger(ncr3) || ncr3 < 0 || ncr3 >= 2 ** features.maxPhyAddr) {
      throw new HwConfigError(
        `nCR3 0x${ncr3.toString(16)} must be a host-physical address below 2^${String(features.maxPhyAddr)} (MAXPHYADDR)`,
      )
    }
    if (hostNxe && !features.nx) throw new HwConfigError('hostNxe requires features.nx (EFER.NXE cannot be set without NX support)')
    // The host paging mode's reserved-bit masks are exactly those of 4/5-level paging (x86-hw.md §2.4).
    const host = new CpuState()
    host.cr0 = CR0_PG | CR0_PE
    host.cr4 = CR4_PAE | (levels === 5 ? CR4_LA57 : 0)
    host.efer = EFER_LME | EFER_LMA | (hostNxe ? EFER_NXE : 0)
    host.cr3 = ncr3
    const ctx = new PagingContext(features)
    ctx.update(host)
    this.mem = mem
    this.features = features
    this.root = ctx.root
    this.levels = levels
    this.hostNxe = hostNxe
    this.hostSmep = options.hostSmep ?? false
    this.hiAddrMask = ctx.hiAddrMask
    this.rsvdLo = ctx.rsvdLo.slice()
    this.rsvdHi = ctx.rsvdHi.slice()
    this.rsvdLargeLo = ctx.rsvdLargeLo.slice()
    this.rsvdHiLarge = ctx.rsvdHiLarge.slice()
    this.largeLevels = ctx.largeLevels
    this.aOnDescent = features.nonLeafAOnDescent
    this.fetchBit = hostNxe || this.hostSmep ? PFERR_I : 0
  }

  /**
   * Translate a guest-physical address through the nested table (APM 15.25.5). A guest page-table
   * access (`final` false) is always a user write, whatever `kind` says. One memory reference per
   * nested entry read (`res.memRefs`), one per A/D update (`res.adWrites`). For `final`, sets
   * `res.hostW` / `res.hostX` from the nested rights.
   *
   * @returns the host-physical address, or -1 with `res.status = WALK_EXIT`, `res.exitReason = EXIT_NPF`,
   *   `res.exitInfo1Lo/Hi` and `res.exitGpa` (EXITINFO2) set.
   */
  translate(gpa: number, kind: AccessKind, final: boolean, res: WalkResult): number {
    const mem = this.mem
    const k = final ? kind : ACC_WRITE
    const gHi = (gpa / TWO32) >>> 0
    const gLo = gpa >>> 0
    const hiAddr = this.hiAddrMask
    const nxe = this.hostNxe
    restart: for (;;) {
      let level: number = this.levels
      let table = this.root
      let rw = 1
      let us = 1
      let xd = 0
      let lo: number
      let hi: number
      let ea: number
      for (;;) {
        let idx: number
        switch (level) {
          case 1: idx = (gLo >>> 12) & 511; break
          case 2: idx = (gLo >>> 21) & 511; break
          case 3: idx = ((gHi & 0x7f) << 2) | (gLo >>> 30); break
          case 4: idx = (gHi >>> 7) & 511; break
          default: idx = (gHi >>> 16) & 511
        }
        ea = table + idx * 8
        lo = mem.read64(ea) // one frame lookup for both halves
        hi = mem.hi64
        res.memRefs++
        if ((lo & PTE_P) === 0) return this.npf(gpa, k, final, 0, res)
        const large = (lo & PTE_PS) !== 0 && ((this.largeLevels >>> level) & 1) !== 0
        if (large) {
          if ((lo & this.rsvdLargeLo[level]!) !== 0 || (hi & this.rsvdHiLarge[level]!) !== 0) {
            return this.npf(gpa, k, final, PFERR_P | PFERR_RSVD, res)
          }
        } else if ((lo & this.rsvdLo[level]!) !== 0 || (hi & this.rsvdHi[level]!) !== 0) {
          return this.npf(gpa, k, final, PFERR_P | PFERR_RSVD, res)
        }
        rw &= (lo >>> 1) & 1
        us &= (lo >>> 2) & 1
        if (nxe) xd |= hi >>> 31
        if (level === 1 || large) break
        if (this.aOnDescent && (lo & PTE_A) === 0) {
          const nLo = (lo | PTE_A) >>> 0
          if (!mem.cmpxchg64(ea, lo, hi, nLo, hi)) {
            res.restarts++
            continue restart
          }
          res.adWrites++
          lo = nLo
        }
        this.pathPa[level] = ea
        this.pathLo[level] = lo
        this.pathHi[level] = hi
        table = ((lo & LO_ADDR_MASK) >>> 0) + (hi & hiAddr) * TWO32
        level--
      }

      // Rights of a user-mode access (SDM 4.6 with CPL 3): U/S everywhere, R/W for writes, NX for fetches.
      if (us === 0 || (k === ACC_WRITE && rw === 0) || (k === ACC_FETCH && xd !== 0)) {
        return this.npf(gpa, k, final, PFERR_P, res)
      }

      // A on every entry used, D on the leaf for a write (locked RMWs, top-down).
      for (let l = this.levels; l > level; l--) {
        const eLo = this.pathLo[l]!
        if ((eLo & PTE_A) !== 0) continue
        if (!mem.cmpxchg64(this.pathPa[l]!, eLo, this.pathHi[l]!, (eLo | PTE_A) >>> 0, this.pathHi[l]!)) {
          res.restarts++
          continue restart
        }
        res.adWrites++
      }
      const want = (lo | PTE_A | (k === ACC_WRITE ? PTE_D : 0)) >>> 0
      if (want !== lo) {
        if (!mem.cmpxchg64(ea, lo, hi, want, hi)) {
          res.restarts++
          continue restart
        }
        res.adWrites++
      }

      if (final) {
        res.hostW = rw
        res.hostX = xd ^ 1
        res.nestedLevel = level
      }
      if (level === 1) return ((lo & LO_ADDR_MASK) >>> 0) + (hi & hiAddr) * TWO32 + (gLo & 0xfff)
      if (level === 2) return ((lo & 0xffe00000) >>> 0) + (hi & hiAddr) * TWO32 + (gLo & 0x1fffff)
      return ((lo & 0xc0000000) >>> 0) + (hi & hiAddr) * TWO32 + (gLo & 0x3fffffff)
    }
  }

  /** #VMEXIT(NPF): EXITINFO1 = error code | (final ? bit 32 : bit 33); EXITINFO2 = the GPA. */
  private npf(gpa: number, k: AccessKind, final: boolean, bits: number, res: WalkResult): number {
    let ec = bits | PFERR_U
    if (k === ACC_WRITE) ec |= PFERR_W
    else if (k === ACC_FETCH) ec |= this.fetchBit
    res.status = WALK_EXIT
    res.exitReason = EXIT_NPF
    res.exitQual = 0
    res.exitInfo1Lo = ec
    res.exitInfo1Hi = final ? NPF_HI_FINAL : NPF_HI_GUEST_PT
    res.exitGpa = gpa
    res.exitGla = res.la
    return -1
  }
}
