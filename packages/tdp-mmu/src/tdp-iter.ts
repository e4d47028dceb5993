/**
 * The TDP iterator (arch/x86/kvm/mmu/tdp_iter.{c,h}, tdp-mmu.md §4): a pre-order walk of one root
 * toward `next_last_level_gfn`, re-reading the entry on every move (so it tolerates concurrent
 * writers), with the `yielded` restart and the forward-progress bookkeeping (`yielded_gfn`).
 * SPTEs are read as two 32-bit halves from host memory, where the hardware walks them too.
 */
import { isLastSpte, isShadowPresentPte, spteToPfn } from '@mmusim/kvm'
import type { PhysMem } from '@mmusim/x86-hw'
import { type KvmMmuPage, PAGES_PER_LEVEL } from './mmu-page.ts'

// gfns exceed 2^31, so these cannot use bit operations, and V8 compiles `%` on such numbers to a
// C call (fmod). For gfn ≥ 0 the divisions by powers of two below are exact and give the same
// results as the remainders; the `%` forms remain for any other input.

/** 1 / PAGES_PER_LEVEL[level]: exact powers of two, so a multiply replaces a division. */
const INV_PAGES_PER_LEVEL: readonly number[] = [Infinity, 1, 2 ** -9, 2 ** -18, 2 ** -27, 2 ** -36, 2 ** -45]

/** `round_gfn_for_level(gfn, level)`. */
export function roundGfnForLevel(gfn: number, level: number): number {
  const n = PAGES_PER_LEVEL[level]!
  return gfn >= 0 ? Math.floor(gfn * INV_PAGES_PER_LEVEL[level]!) * n : gfn - (gfn % n)
}

/** `SPTE_INDEX(gfn << PAGE_SHIFT, level)`. */
export function spteIndex(gfn: number, level: number): number {
  const q = Math.floor(gfn * INV_PAGES_PER_LEVEL[level]!)
  return q >= 0 ? q - Math.floor(q * (1 / 512)) * 512 : q % 512
}

/** `struct tdp_iter`. */
export class TdpIter {
  readonly mem: PhysMem
  /** `pt_path[level]`: host-physical address of the table at each level of the current path. */
  readonly ptPath = new Float64Array(7)
  /** `sptep`: host-physical address of the current entry. */
  sptep = 0
  /** `old_spte`, low and high halves: a fresh read whenever the iterator arrives. */
  oldLo = 0
  oldHi = 0
  /** `next_last_level_gfn`. */
  nextLastLevelGfn = 0
  /** `yielded_gfn`: next_last_level_gfn at the last (re)start (forward-progress rule). */
  yieldedGfn = 0
  /** `gfn`: base gfn of the current entry. */
  gfn = 0
  rootLevel = 0
  minLevel = 1
  level = 0
  asId = 0
  /** False once the walk fell off the end. */
  valid = false
  /** Set when the walker dropped mmu_lock/RCU: the next step restarts from the root. */
  yielded = false
  root: KvmMmuPage | null = null
  /** Test hazard S12: after a restart, also advance (the pre-5.16-rc6 bug). */
  advanceAfterRestart = false

  constructor(mem: PhysMem) {
    this.mem = mem
  }

  /** `tdp_iter_start(iter, root, min_level, next_last_level_gfn)`. Returns `valid`. */
  start(root: KvmMmuPage, minLevel: number, gfn: number): boolean {
    if (root.level < 1 || root.level > 5) {
      this.valid = false
      return false
    }
    this.root = root
    this.nextLastLevelGfn = gfn
    this.rootLevel = root.level
    this.minLevel = minLevel
    this.ptPath[root.level] = root.hpa
    this.asId = root.asId
    this.restart()
    return true
  }

  /** Re-read the current entry into old_spte (`kvm_tdp_mmu_read_spte`). */
  read(): void {
    const m = this.mem
    this.oldLo = m.read64(this.sptep)
    this.oldHi = m.hi64
  }

  private refreshSptep(): void {
    this.sptep = this.ptPath[this.level]! + spteIndex(this.gfn, this.level) * 8
    this.read()
  }

  /** `tdp_iter_restart`: back to the root, toward next_last_level_gfn. */
  restart(): void {
    this.yielded = false
    this.yieldedGfn = this.nextLastLevelGfn
    this.level = this.rootLevel
    this.gfn = roundGfnForLevel(this.nextLastLevelGfn, this.level)
    this.refreshSptep()
    this.valid = true
  }

  /** `try_step_down`: re-read the entry; descend only into a present non-leaf. */
  private tryStepDown(): boolean {
    if (this.level === this.minLevel) return false
    this.read()
    const lo = this.oldLo
    if (!isShadowPresentPte(lo) || isLastSpte(lo, this.level)) return false
    const child = spteToPfn(lo, this.oldHi) * 4096
    this.level--
    this.ptPath[this.level] = child
    this.gfn = roundGfnForLevel(this.nextLastLevelGfn, this.level)
    this.refreshSptep()
    return true
  }

  /** `try_step_side`: the next entry of the same table, unless at index 511. */
  private tryStepSide(): boolean {
    if (spteIndex(this.gfn, this.level) === 511) return false
    this.gfn += PAGES_PER_LEVEL[this.level]!
    this.nextLastLevelGfn = this.gfn
    this.sptep += 8
    this.read()
    return true
  }

  /** `try_step_up`: the parent entry (re-read, not presented again). */
  private tryStepUp(): boolean {
    if (this.level === this.rootLevel) return false
    this.level++
    this.gfn = roundGfnForLevel(this.gfn, this.level)
    this.refreshSptep()
    return true
  }

  /** `tdp_iter_next`: restart after a yield, else down, else side (going up as needed). Returns `valid`. */
  next(): boolean {
    if (this.yielded) {
      this.restart()
      if (!this.advanceAfterRestart) return true
    }
    if (this.tryStepDown()) return true
    do {
      if (this.tryStepSide()) return true
    } while (this.tryStepUp())
    this.valid = false
    return false
  }
}
