import {
  ACC_FETCH,
  ACC_WRITE,
  type AccessKind,
  EPT_A,
  EPT_D,
  EPT_PS,
  EPTQ_FETCH,
  EPTQ_GLA_FINAL,
  EPTQ_GLA_NX,
  EPTQ_GLA_USER,
  EPTQ_GLA_VALID,
  EPTQ_GLA_WRITABLE,
  EPTQ_READ,
  EPTQ_WRITE,
  EXIT_EPT_MISCONFIG,
  EXIT_EPT_VIOLATION,
} from './bits.ts'
import type { CpuFeatures } from './cpu-state.ts'
import { HwConfigError } from './errors.ts'
import type { PhysMem } from './phys-mem.ts'
import type { NestedTranslator } from './walk.ts'
import { WALK_EXIT, type WalkResult } from './walk-result.ts'

/** EPTP memory type UC (0), one of the two VM entry accepts (SDM Vol. 3C 25.6.11 / 26.2.1.1). */
export const EPTP_MT_UC = 0
/** EPTP memory type WB (6), the other one VM entry accepts. */
export const EPTP_MT_WB = 6
/** EPTP bit 6: enable accessed and dirty flags for EPT. */
export const EPTP_AD = 1 << 6

/** Options of an {@link EptTranslator}. */
export interface EptOptions {
  /** Host-physical address of the EPT PML4 (or PML5) table; 4 KiB aligned, below 2^MAXPHYADDR. */
  root: number
  /** 4-level or 5-level EPT (EPTP bits 5:3 = 3 or 4). */
  levels: 4 | 5
  /** EPTP bit 6: EPT A/D flags enabled (and guest paging-structure accesses count as writes). */
  adEnabled: boolean
  /**
   * Whether the qualification of a violation caused by a guest A/D update (a locked
   * read-modify-write) also reports bit 0 "data read". The SDM leaves it implementation-specific;
   * kvm-unit-tests `ept_access_test_paddr_read_only_ad_disabled` sees RD|WR on real CPUs.
   * x86-hw.md §10 switch `eptRmwSetsReadBit`. @default true
   */
  rmwSetsReadBit?: boolean
}


/**
 * Intel EPT as the second dimension of a 2-D walk (SDM Vol. 3C 29.3 "The extended page table
 * mechanism"; x86-hw.md §7.1–§7.5). Translates a guest-physical address through a 4- or 5-level
 * EPT, in the exact order of the hardware and of KVM's `FNAME(walk_addr_generic)` with
 * `PTTYPE_EPT`: per entry present (bits 2:0 ≠ 0) → misconfiguration (reserved bits per
 * `__reset_rsvds_bits_mask_ept`, XWR 010/110, X-only without the capability, leaf memory type
 * 2/3/7) → accumulate R/W/X; the rights check happens once at the leaf. Misconfiguration gives
 * exit reason 49 with only the GPA; a not-present entry or insufficient AND-ed rights gives exit
 * reason 48 with the qualification of SDM 28.2.1 (x86-hw.md §7.4).
 *
 * With A/D enabled (EPTP.6) it sets A in every EPT entry used and D in the leaf on a write, by
 * compare-and-exchange (restarting on a lost race), and every guest paging-structure access is a
 * write (`ptAccessIsWrite`). MBEC, #VE, SPP and supervisor shadow-stack rights are not modelled.
 *
 * Hot path: no allocation, no exceptions; failures return -1 with the exit fields of the result set.
 */
export class EptTranslator implements NestedTranslator {
  /** EPT A/D enabled: guest paging-structure accesses are treated as writes (SDM 29.3.3.2). */
  readonly ptAccessIsWrite: boolean
  readonly mem: PhysMem
  readonly features: CpuFeatures
  /**
   * Host-physical address of the top-level EPT table. Initialised here, not only in the
   * constructor: a field that starts out undefined has a generic representation, and the walk's
   * `table` (starting from it) would then be boxed.
   */
  readonly root: number = 0
  readonly levels: 4 | 5
  readonly adEnabled: boolean
  readonly rmwSetsReadBit: boolean
  /** Address bits 51:32 below MAXPHYADDR, in the high half. */
  private readonly hiAddrMask: number
  /** Bits 51:N, in the high half: reserved at every level. */
  private readonly hiRsvd: number
  /** Reserved low bits of a non-leaf entry by level (bit 7 included where the page size is unsupported). */
  private readonly rsvdLo: Uint32Array
  /** Reserved low bits of a large leaf by level (2 = 2 MiB, 3 = 1 GiB). */
  private readonly rsvdLeafLo: Uint32Array
  /** Levels at which PS=1 makes a leaf (bit per level). */
  private readonly largeLevels: number
  /** Bit per XWR value that is a misconfiguration: 010, 110, and 100 without execute-only. */
  private readonly badXwr: number
  private readonly aOnDescent: boolean
  /** Entries used by the current translation, by level (for the A/D pass). */
  private readonly pathPa = new Float64Array(6)
  private readonly pathLo = new Uint32Array(6)
  private readonly pathHi = new Uint32Array(6)

  /**
   * @throws HwConfigError if the root or level count is invalid (a hypervisor bug, not guest input).
   */
  constructor(mem: PhysMem, features: CpuFeatures, options: EptOptions) {
    const { root, levels, adEnabled } = options
    const m = features.maxPhyAddr
    if (levels !== 4 && (levels as number) !== 5) {
      throw new HwConfigError(`EPT levels must be 4 or 5 (EPTP bits 5:3 = 3 or 4); got ${String(levels)}`)
    }
    if (!Number.isSafeInteger(root) || root < 0 || root % 4096 !== 0 || root >= 2 ** m) {
      throw new HwConfigError(
        `EPT root 0x${root.toString(16)} must be a 4 KiB-aligned host-physical address below 2^${String(m)} (MAXPHYADDR)`,
      )
    }
    this.mem = mem
    this.features = features
    this.root = root
    this.levels = levels
    this.adEnabled = adEnabled
    this.ptAccessIsWrite = adEnabled
    this.rmwSetsReadBit = options.rmwSetsReadBit ?? true
    this.aOnDescent = features.nonLeafAOnDescent
    this.hiAddrMask = m >= 52 ? 0xfffff : (1 << (m - 32)) - 1
    this.hiRsvd = (~this.hiAddrMask & 0xfffff) >>> 0
    const rsvdLo = new Uint32Array(6)
    const rsvdLeafLo = new Uint32Array(6)
    let largeLevels = 0
    // PML5E / PML4E: bits 7:3 reserved (no 512 GiB pages).
    rsvdLo[5] = 0xf8
    rsvdLo[4] = 0xf8
    // PDPTE / PDE referencing a table: bits 6:3; bit 7 too where that page size is unsupported.
    rsvdLo[3] = 0x78 | (features.ept1G ? 0 : EPT_PS)
    rsvdLo[2] = 0x78 | (features.ept2M ? 0 : EPT_PS)
    if (features.ept1G) largeLevels |= 1 << 3
    if (features.ept2M) largeLevels |= 1 << 2
    // 1 GiB leaf: bits 29:12; 2 MiB leaf: bits 20:12; 4 KiB leaf: none in the low half.
    rsvdLeafLo[3] = 0x3ffff000
    rsvdLeafLo[2] = 0x001ff000
    this.rsvdLo = rsvdLo
    this.rsvdLeafLo = rsvdLeafLo
    this.largeLevels = largeLevels
    this.badXwr = (1 << 2) | (1 << 6) | (features.eptExecOnly ? 0 : 1 << 4)
  }

  /**
   * Decode an EPTP (VMCS field; SDM Vol. 3C 25.6.11, x86-hw.md §7.1): bits 2:0 memory type
   * (UC or WB), 5:3 walk length − 1 (3 or 4), 6 A/D enable, 11:7 must be 0 (supervisor
   * shadow-stack rights, bit 7, are not modelled), N−1:12 the root, 63:N reserved.
   * Models the VM-entry checks of KVM's `nested_vmx_check_eptp()`.
   *
   * @throws HwConfigError for an EPTP that would make VM entry fail.
   */
  static fromEptp(mem: PhysMem, features: CpuFeatures, eptp: number, options?: { rmwSetsReadBit?: boolean }): EptTranslator {
    if (!Number.isSafeInteger(eptp) || eptp < 0) {
      throw new HwConfigError(`EPTP must be a non-negative safe integer; got ${String(eptp)}`)
    }
    const mt = eptp & 7
    if (mt !== EPTP_MT_UC && mt !== EPTP_MT_WB) {
      throw new HwConfigError(`EPTP 0x${eptp.toString(16)}: memory type (bits 2:0) ${String(mt)} is invalid; use 0 (UC) or 6 (WB). VM entry would fail.`)
    }
    const wl = (eptp >>> 3) & 7
    if (wl !== 3 && wl !== 4) {
      throw new HwConfigError(
        `EPTP 0x${eptp.toString(16)}: page-walk length (bits 5:3) ${String(wl)} is invalid; use 3 (4-level EPT) or 4 (5-level EPT). VM entry would fail.`,
      )
    }
    if (((eptp >>> 7) & 0x1f) !== 0) {
      throw new HwConfigError(
        `EPTP 0x${eptp.toString(16)}: bits 11:7 must be 0 (bit 7, supervisor shadow-stack rights, is not modelled). VM entry would fail.`,
      )
    }
    if (eptp >= 2 ** features.maxPhyAddr) {
      throw new HwConfigError(
        `EPTP 0x${eptp.toString(16)}: bits 63:${String(features.maxPhyAddr)} are reserved (MAXPHYADDR ${String(features.maxPhyAddr)}). VM entry would fail.`,
      )
    }
    const root = eptp - (eptp % 4096)
    const opts: EptOptions = { root, levels: wl === 4 ? 5 : 4, adEnabled: ((eptp >>> 6) & 1) === 1 }
    if (options?.rmwSetsReadBit !== undefined) opts.rmwSetsReadBit = options.rmwSetsReadBit
    return new EptTranslator(mem, features, opts)
  }

  /** The EPTP value that selects this EPT (write-back paging-structure memory type). */
  eptp(): number {
    return this.root + (this.adEnabled ? EPTP_AD : 0) + ((this.levels - 1) << 3) + EPTP_MT_WB
  }

  /**
   * Translate a guest-physical address (SDM 29.3.2; x86-hw.md §7.5 `eptTranslate`). `gpa` is an
   * unsigned physical address below 2^52; a 4-level EPT uses bits 47:0, a 5-level one bits 51:0.
   * One memory reference per EPT entry read (`res.memRefs`), one per A/D update (`res.adWrites`).
   * For `final`, sets `res.hostW` / `res.hostX` from the AND-ed W and X so a combined TLB entry can
   * carry the EPT rights.
   *
   * @returns the host-physical address, or -1 with `res.status = WALK_EXIT` and the exit fields set.
   */
  translate(gpa: number, kind: AccessKind, final: boolean, res: WalkResult): number {
    const mem = this.mem
    // With EPT A/D, every guest paging-structure access is a write (SDM 29.3.3.2).
    const write = kind === ACC_WRITE || (!final && this.adEnabled)
    const need = write ? 2 : kind === ACC_FETCH ? 4 : 1
    const hiAddr = this.hiAddrMask
    const hiRsvd = this.hiRsvd
    const ad = this.adEnabled
    const badXwr = this.badXwr
    const largeLevels = this.largeLevels
    const rsvdLo = this.rsvdLo
    const rsvdLeafLo = this.rsvdLeafLo
    const top = this.levels
    // gpa * scale puts the index bits of a level at bit 0 (2^-12 at level 1, × 2^-9 per level up);
    // exact for gpa < 2^53. Literals below stand for module constants (V8 reloads those at every use).
    const topScale = top === 5 ? 1 / 281474976710656 : 1 / 549755813888 // 2^-48, 2^-39
    restart: for (;;) {
      let level: number = top
      let scale = topScale
      let table = this.root
      let rights = 7
      let lo: number
      let hi: number
      let ea: number
      for (;;) {
        ea = table + (Math.floor(gpa * scale) & 511) * 8
        // Hints 6..10 (guest table addresses) and 11..15 (final addresses), apart from the guest
        // walker's 1..5: each keeps the EPT table last read at that level for that use.
        lo = mem.read64Hinted(ea, final ? level + 10 : level + 5)
        hi = mem.hi64
        res.memRefs++
        const xwr = lo & 7
        // Not present: its other bits are ignored; the AND of the rights becomes 0.
        if (xwr === 0) return this.violation(gpa, kind, final, 0, res)
        if (((badXwr >>> xwr) & 1) !== 0 || (hi & hiRsvd) !== 0) return misconfig(gpa, res)
        let leaf: boolean
        if (level === 1) leaf = true
        else if ((lo & 0x80) !== 0 && ((largeLevels >>> level) & 1) !== 0) { // EPT_PS
          if ((lo & rsvdLeafLo[level]!) !== 0) return misconfig(gpa, res)
          leaf = true
        } else {
          if ((lo & rsvdLo[level]!) !== 0) return misconfig(gpa, res)
          leaf = false
        }
        // Leaf memory types 2, 3 and 7 are misconfigurations (KVM's bad_mt_xwr): bits of 0x8c.
        if (leaf && ((0x8c >>> ((lo >>> 3) & 7)) & 1) !== 0) return misconfig(gpa, res)
        rights &= xwr
        if (leaf) break
        if (ad) {
          if (this.aOnDescent && (lo & EPT_A) === 0) {
            const nLo = (lo | EPT_A) >>> 0
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
        }
        table = ((lo & 0xfffff000) >>> 0) + (hi & hiAddr) * 4294967296
        level--
        scale *= 512
      }

      if ((rights & need) === 0) return this.violation(gpa, kind, final, rights, res)

      if (ad) {
        // A in every entry used, D in the leaf on a write: locked RMWs, top-down (SDM 29.3.5).
        for (let l = this.levels; l > level; l--) {
          const eLo = this.pathLo[l]!
          if ((eLo & EPT_A) !== 0) continue
          if (!mem.cmpxchg64(this.pathPa[l]!, eLo, this.pathHi[l]!, (eLo | EPT_A) >>> 0, this.pathHi[l]!)) {
            res.restarts++
            continue restart
          }
          res.adWrites++
        }
        const want = (lo | EPT_A | (write ? EPT_D : 0)) >>> 0
        if (want !== lo) {
          if (!mem.cmpxchg64(ea, lo, hi, want, hi)) {
            res.restarts++
            continue restart
          }
          res.adWrites++
        }
      }

      if (final) {
        res.hostW = (rights >>> 1) & 1
        res.hostX = (rights >>> 2) & 1
        res.nestedLevel = level
      }
      // Page offset: `gpa & mask` is exact (bitwise ops see the low 32 bits of gpa).
      if (level === 1) return ((lo & 0xfffff000) >>> 0) + (hi & hiAddr) * 4294967296 + (gpa & 0xfff)
      if (level === 2) return ((lo & 0xffe00000) >>> 0) + (hi & hiAddr) * 4294967296 + (gpa & 0x1fffff)
      return ((lo & 0xc0000000) >>> 0) + (hi & hiAddr) * 4294967296 + (gpa & 0x3fffffff)
    }
  }

  /** EPT violation (exit reason 48) with the qualification of SDM 28.2.1 table 28-7. */
  private violation(gpa: number, kind: AccessKind, final: boolean, rights: number, res: WalkResult): number {
    let q = EPTQ_GLA_VALID | (rights << 3)
    if (final) {
      q |= kind === ACC_WRITE ? EPTQ_WRITE : kind === ACC_FETCH ? EPTQ_FETCH : EPTQ_READ
      // Advanced EPT-violation information: effective guest U/S, R/W, XD of the linear address.
      q |= EPTQ_GLA_FINAL | (res.us === 0 ? 0 : EPTQ_GLA_USER) | (res.rw === 0 ? 0 : EPTQ_GLA_WRITABLE) | (res.xd === 0 ? 0 : EPTQ_GLA_NX)
    } else if (this.adEnabled) {
      // Guest paging-structure access with EPT A/D: a read that counts as a write (kvm-unit-tests: RD|WR).
      q |= EPTQ_READ | EPTQ_WRITE
    } else if (kind === ACC_WRITE) {
      // Guest A/D update: a locked read-modify-write.
      q |= EPTQ_WRITE | (this.rmwSetsReadBit ? EPTQ_READ : 0)
    } else {
      q |= EPTQ_READ
    }
    res.status = WALK_EXIT
    res.exitReason = EXIT_EPT_VIOLATION
    res.exitQual = q
    res.exitInfo1Lo = 0
    res.exitInfo1Hi = 0
    res.exitGpa = gpa
    res.exitGla = res.la
    return -1
  }
}

/** EPT misconfiguration (exit reason 49): only the GPA is reported; qualification and GLA are cleared. */
function misconfig(gpa: number, res: WalkResult): number {
  res.status = WALK_EXIT
  res.exitReason = EXIT_EPT_MISCONFIG
  res.exitQual = 0
  res.exitInfo1Lo = 0
  res.exitInfo1Hi = 0
  res.exitGpa = gpa
  res.exitGla = 0
  return -1
}

const RWX_NAMES = ['---', 'R--', '-W-', 'RW-', '--X', 'R-X', '-WX', 'RWX']

/**
 * A readable rendering of an EPT-violation exit qualification (SDM 28.2.1 table 28-7), for
 * messages: e.g. `0x18b [RD|WR ept=R-- gla-valid final]`.
 */
export function eptViolationQualString(q: number): string {
  const acc: string[] = []
  if ((q & EPTQ_READ) !== 0) acc.push('RD')
  if ((q & EPTQ_WRITE) !== 0) acc.push('WR')
  if ((q & EPTQ_FETCH) !== 0) acc.push('FETCH')
  const parts = [acc.length > 0 ? acc.join('|') : 'no-access', `ept=${RWX_NAMES[(q >>> 3) & 7]!}`]
  if ((q & (1 << 6)) !== 0) parts.push('XU')
  if ((q & EPTQ_GLA_VALID) !== 0) {
    parts.push('gla-valid')
    if ((q & EPTQ_GLA_FINAL) !== 0) {
      parts.push('final')
      parts.push((q & EPTQ_GLA_USER) !== 0 ? 'user' : 'supervisor')
      parts.push((q & EPTQ_GLA_WRITABLE) !== 0 ? 'writable' : 'read-only')
      if ((q & EPTQ_GLA_NX) !== 0) parts.push('nx')
    } else parts.push('paging-structure')
  }
  if ((q & (1 << 12)) !== 0) parts.push('nmi-unblocking')
  return `0x${(q >>> 0).toString(16)} [${parts.join(' ')}]`
}
