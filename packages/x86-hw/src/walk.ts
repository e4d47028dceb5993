import {
  ACC_FETCH,
  ACC_WRITE,
  type AccessKind,
  PFERR_I,
  PFERR_P,
  PFERR_RSVD,
  PFERR_U,
  PFERR_W,
  PTE_A,
  PTE_D,
  PTE_G,
} from './bits.ts'
import { type CpuState, PAGING_4L, PAGING_NONE, type PagingContext, permIndex, rightsFault } from './cpu-state.ts'
import { HwConfigError } from './errors.ts'
import type { PhysMem } from './phys-mem.ts'
import { WALK_EXIT, WALK_GP, WALK_OK, WALK_PF, type WalkResult, type WalkStatus } from './walk-result.ts'

/**
 * Nested (second-dimension) translation of guest-physical addresses: EPT or NPT. The 1-D walker
 * calls it for every guest paging-structure access and for the final address, which is what
 * makes a 2-D walk cost (n+1)(m+1)-1 references.
 */
export interface NestedTranslator {
  /**
   * Translate `gpa` for an access of `kind`. `final` is true for the final guest-physical address
   * of the linear access, false for a guest paging-structure access. Returns the host-physical
   * address, or -1 after filling the exit fields of `res` (and setting `res.status = WALK_EXIT`).
   * Adds its own entry reads to `res.memRefs` and its A/D writes to `res.adWrites`.
   */
  translate(gpa: number, kind: AccessKind, final: boolean, res: WalkResult): number
  /** Guest paging-structure reads are treated as writes (EPT with A/D enabled; NPT). */
  readonly ptAccessIsWrite: boolean
}

/** What every walk resets in `res` before it starts: its counters, its inputs, full host rights. */
function startWalk(res: WalkResult, la: number, kind: AccessKind): void {
  res.memRefs = 0
  res.adWrites = 0
  res.restarts = 0
  res.la = la
  res.kind = kind
  res.hostW = 1
  res.hostX = 1
  res.nestedLevel = 3
}

/**
 * {@link walk} with paging off (CR0.PG = 0): linear = physical, or guest-physical under nested
 * paging (32-bit addresses), translated through the second dimension alone. A small function of
 * its own, as the vCPU calls it directly on every access of a guest running without paging.
 */
export function walkPagingOff(la: number, kind: AccessKind, nested: NestedTranslator | null, res: WalkResult): WalkStatus {
  startWalk(res, la, kind)
  const gpa = la >>> 0
  res.level = 0
  res.rw = 1
  res.us = 1
  res.xd = 0
  res.pkey = 0
  res.dirty = 1
  res.global = 0
  res.gpa = gpa
  if (nested !== null) {
    const hpa = nested.translate(gpa, kind, true, res)
    if (hpa < 0) return WALK_EXIT
    res.pa = hpa
  } else res.pa = gpa
  return (res.status = WALK_OK)
}

/**
 * Walk the guest (or, in shadow mode, the shadow) page tables for one linear access, with the
 * exact SDM order of checks (x86-hw.md §3.1–§3.5): canonical check, per level P then reserved
 * bits, rights at the leaf, then A/D updates by compare-and-exchange (restarting the walk if an
 * entry changed under it). With `nested`, every table address and the final address go through
 * the second dimension, and guest A/D writes need nested write permission.
 *
 * Models the hardware page walker; KVM's software equivalent is FNAME(walk_addr_generic).
 * Faults are returned as a status and described in `res`; nothing is thrown for guest input.
 *
 * @param startLevel 0 to start at CR3; otherwise a paging-structure-cache hit: walk from
 *   `startTable` at `startLevel` with the rights accumulated above it.
 */
export function walk(
  mem: PhysMem,
  ctx: PagingContext,
  state: CpuState,
  la: number,
  kind: AccessKind,
  implicit: boolean,
  nested: NestedTranslator | null,
  res: WalkResult,
  startLevel = 0,
  startTable = 0,
  startRw = 1,
  startUs = 1,
  startXd = 0,
): WalkStatus {
  if (ctx.mode === PAGING_NONE) return walkPagingOff(la, kind, nested, res)
  startWalk(res, la, kind)
  const user = state.cpl === 3 && !implicit
  if (ctx.mode < PAGING_4L) {
    throw new HwConfigError('32-bit and PAE paging are not modelled yet; run the guest with 4-level or 5-level paging')
  }
  if (la < -ctx.canonLimit || la >= ctx.canonLimit || !Number.isSafeInteger(la)) {
    res.errorCode = 0
    return (res.status = WALK_GP)
  }
  const hiAddr = ctx.hiAddrMask
  const nxe = ctx.nxe
  const ptKind: AccessKind = nested?.ptAccessIsWrite === true ? ACC_WRITE : 0
  const aOnDescent = ctx.aOnDescent
  const largeLevels = ctx.largeLevels
  const rsvdLo = ctx.rsvdLo
  const rsvdHi = ctx.rsvdHi
  const rsvdLargeLo = ctx.rsvdLargeLo
  const rsvdHiLarge = ctx.rsvdHiLarge
  const pathPa = res.pathPa
  const pathGpa = res.pathGpa
  const pathLo = res.pathLo
  const pathHi = res.pathHi
  const top = startLevel > 0 ? startLevel : ctx.levels
  // la as two 32-bit halves (exact for safe integers, negative canonical ones included), so a
  // level's table index is integer shifts: bits [9L + 3, 9L + 11] of la.
  const laLo = la >>> 0
  const laHi = Math.floor(la / 4294967296) | 0 // 2^32

  restart: for (;;) {
    let level = top
    let shift = 9 * top + 3
    let table = startLevel > 0 ? startTable : ctx.root
    let rw = startRw
    let us = startUs
    let xd = startXd
    let eLo: number
    let eHi: number
    // A non-leaf entry still needs its A bit from the A/D pass (KVM-style walkers set it after the walk).
    let adPending = false
    // The PTE bits and 2^32 appear as literals (named in comments) in this loop: V8 reloads a
    // module-level binding (an imported one through its cell) at every use.
    for (;;) {
      // Index bits of this level (JS shift counts are taken mod 32: `32 - shift` is 20, 11 or 2).
      const idx = shift < 32 ? ((laLo >>> shift) | (laHi << (32 - shift))) & 511 : (laHi >>> (shift - 32)) & 511
      const ea = table + idx * 8
      let hea = ea
      if (nested !== null) {
        hea = nested.translate(ea, ptKind, false, res)
        if (hea < 0) return WALK_EXIT
      }
      // Hint per level (1..5): a walk's upper tables are usually the last walk's (PhysMem.read64Hinted).
      eLo = mem.read64Hinted(hea, level)
      eHi = mem.hi64
      res.memRefs++
      if ((eLo & 1) === 0) return pageFault(ctx, res, la, kind, user, 0) // PTE_P
      const large = (eLo & 0x80) !== 0 && ((largeLevels >>> level) & 1) !== 0 // PTE_PS
      if (
        large
          ? (eLo & rsvdLargeLo[level]!) !== 0 || (eHi & rsvdHiLarge[level]!) !== 0
          : (eLo & rsvdLo[level]!) !== 0 || (eHi & rsvdHi[level]!) !== 0
      ) {
        return pageFault(ctx, res, la, kind, user, PFERR_P | PFERR_RSVD)
      }
      rw &= (eLo >>> 1) & 1
      us &= (eLo >>> 2) & 1
      if (nxe) xd |= eHi >>> 31
      pathPa[level] = hea
      pathGpa[level] = ea
      pathLo[level] = eLo
      pathHi[level] = eHi
      if (level === 1 || large) break
      if ((eLo & 0x20) === 0) { // PTE_A
        if (aOnDescent) {
          // Hardware sets A on each entry it uses as it descends (locked RMW).
          if (nested !== null && !nested.ptAccessIsWrite && nested.translate(ea, ACC_WRITE, false, res) < 0) return WALK_EXIT
          const nLo = (eLo | PTE_A) >>> 0
          if (!mem.cmpxchg64(hea, eLo, eHi, nLo, eHi)) {
            res.restarts++
            continue restart
          }
          res.adWrites++
          eLo = nLo
          pathLo[level] = nLo
        } else adPending = true
      }
      table = ((eLo & 0xfffff000) >>> 0) + (eHi & hiAddr) * 4294967296 // LO_ADDR_MASK, 2^32
      level--
      shift -= 9
    }
    const leafLevel = level

    const pkey = ctx.pke || ctx.pks ? (eHi >>> 27) & 0xf : 0 // HI_PK_SHIFT
    // Without protection keys the precomputed bitmap gives rightsFault()'s answer (PFERR_P or 0).
    const denied = ctx.keys
      ? rightsFault(ctx, state, kind, user, implicit, rw, us, xd, pkey)
      : (ctx.perm[permIndex(kind, user, !implicit && state.ac)]! >>> (rw | (us << 1) | (xd << 2))) & 1
    if (denied !== 0) return pageFault(ctx, res, la, kind, user, denied)

    // Final guest-physical address (`la & mask` is exact: bitwise ops see la's low 32 bits).
    let gpa: number
    if (leafLevel === 1) gpa = ((eLo & 0xfffff000) >>> 0) + (eHi & hiAddr) * 4294967296 + (la & 0xfff)
    else if (leafLevel === 2) gpa = ((eLo & 0xffe00000) >>> 0) + (eHi & hiAddr) * 4294967296 + (la & 0x1fffff)
    else gpa = ((eLo & 0xc0000000) >>> 0) + (eHi & hiAddr) * 4294967296 + (la & 0x3fffffff)
    res.gpa = gpa
    res.rw = rw
    res.us = us
    res.xd = xd
    res.pkey = pkey
    res.level = leafLevel
    if (nested !== null) {
      // KVM's order: the final GPA is translated before the guest A/D writes.
      const hpa = nested.translate(gpa, kind, true, res)
      if (hpa < 0) return WALK_EXIT
      res.pa = hpa
    } else res.pa = gpa

    // A/D updates, top-down, as locked compare-and-exchange; restart the walk if an entry changed.
    // Skipped outright when no entry changes (the common case: A already set, D set or a read).
    let leafLo = eLo
    if (adPending || (eLo & 0x20) === 0 || (kind === 1 && (eLo & 0x40) === 0)) { // PTE_A; ACC_WRITE, PTE_D
      for (let l = top; l >= leafLevel; l--) {
        const lo = pathLo[l]!
        let want = lo | PTE_A
        if (l === leafLevel && kind === ACC_WRITE) want |= PTE_D
        want >>>= 0
        if (want === lo) continue
        const hea = pathPa[l]!
        if (nested !== null && !nested.ptAccessIsWrite) {
          // The A/D write is a write to the guest paging structure: it needs nested write permission.
          if (nested.translate(pathGpa[l]!, ACC_WRITE, false, res) < 0) return WALK_EXIT
        }
        if (!mem.cmpxchg64(hea, lo, pathHi[l]!, want, pathHi[l]!)) {
          res.restarts++
          continue restart
        }
        res.adWrites++
        pathLo[l] = want
      }
      leafLo = pathLo[leafLevel]!
    }
    res.dirty = (leafLo & PTE_D) !== 0 ? 1 : 0
    res.global = ctx.pge && (leafLo & PTE_G) !== 0 ? 1 : 0
    return (res.status = WALK_OK)
  }
}

function pageFault(ctx: PagingContext, res: WalkResult, la: number, kind: number, user: boolean, bits: number): WalkStatus {
  let ec = bits
  if (kind === ACC_WRITE) ec |= PFERR_W
  if (user) ec |= PFERR_U
  if (kind === ACC_FETCH && (ctx.smep || ctx.nxe)) ec |= PFERR_I
  res.errorCode = ec
  res.cr2 = la
  return (res.status = WALK_PF)
}
