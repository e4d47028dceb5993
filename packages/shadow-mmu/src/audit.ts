/**
 * The structural invariants of shadow-mmu.md §13.2, checked over the whole MMU. Each violation
 * is one message; an empty list means consistent.
 */
import {
  gfnToIndex,
  isLargePte,
  isLpageDisallowed,
  isMmuWritableSpte,
  isShadowPresentPte,
  isWritablePte,
  spteToPfn,
  spteWritableInvariantViolation,
} from '@mmusim/kvm'
import type { MmuPage } from './mmu-page.ts'
import { rmapSptes } from './rmap.ts'
import type { ShadowMmu, SlotMmu } from './shadow-mmu.ts'

function popcount(x: number): number {
  let v = x >>> 0
  let n = 0
  while (v !== 0) {
    v &= v - 1
    n++
  }
  return n
}

/** Check every invariant; returns the violations (capped at `limit`). */
export function auditShadowMmu(mmu: ShadowMmu, limit = 50): string[] {
  const out: string[] = []
  const bad = (m: string): void => {
    if (out.length < limit) out.push(m)
  }
  for (const w of mmu.warnings) bad(`WARN: ${w}`)
  const mem = mmu.mem
  const fmt = mmu.fmt
  const pages: MmuPage[] = [...mmu.allPages()]
  const stats = mmu.vm.stats
  // (5) lists and hash
  let unsyncCount = 0
  let nUsed = 0
  let indirect = 0
  const seen = new Set<string>()
  for (const sp of pages) {
    if (sp.freed) bad(`${sp.toString()} is freed but still hashed`)
    if (mmu.pageByPfn.get(sp.hpa / 4096) !== sp) bad(`${sp.toString()} is not registered by pfn`)
    if (!sp.invalid && sp.list !== mmu.activeMmuPages) bad(`(5) live ${sp.toString()} is not on active_mmu_pages (on ${sp.list?.name ?? 'no list'})`)
    if (sp.invalid && sp.list === mmu.activeMmuPages) bad(`(5) invalid ${sp.toString()} is on active_mmu_pages`)
    if (sp.invalid && sp.rootCount === 0) bad(`(5) invalid ${sp.toString()} with root_count 0 was not freed`)
    if (sp.list === mmu.activeMmuPages || (sp.invalid && sp.list === null)) nUsed++
    if (sp.unsync) unsyncCount++
    if (!sp.invalid && sp.hasGptes) indirect++
    // (1)
    let pc = 0
    for (let w = 0; w < 16; w++) pc += popcount(sp.unsyncChildBitmap[w]!)
    if (sp.unsyncChildren < 0 || sp.unsyncChildren !== pc) bad(`(1) ${sp.toString()}: unsync_children ${sp.unsyncChildren} != popcount ${pc}`)
    // (2) unsync pages are level-1 indirect
    if (sp.unsync && (sp.level !== 1 || !sp.hasGptes)) bad(`(2) ${sp.toString()} is unsync but not an indirect level-1 page`)
    // (12)
    if (!mmu.isObsoleteSp(sp)) {
      const key = `${sp.gfn}:${sp.role}`
      if (seen.has(key)) bad(`(12) two live pages for gfn 0x${sp.gfn.toString(16)} role ${sp.role}`)
      seen.add(key)
    }
    // (14)
    if (sp.mmuValidGen !== 0 && sp.mmuValidGen !== 1) bad(`(14) ${sp.toString()} has generation ${sp.mmuValidGen}`)
  }
  let activeLen = 0
  for (let sp = mmu.activeMmuPages.head; sp !== null; sp = sp.next) {
    activeLen++
    if (sp.list !== mmu.activeMmuPages) bad(`(5) ${sp.toString()} linked into active_mmu_pages but owned by ${sp.list?.name ?? 'none'}`)
    if (activeLen > pages.length + 1) {
      bad('(5) active_mmu_pages is cyclic')
      break
    }
  }
  if (activeLen !== mmu.activeMmuPages.size) bad(`(5) active_mmu_pages has ${activeLen} entries but size ${mmu.activeMmuPages.size}`)
  // (6) (7) (13)
  if (nUsed !== mmu.nUsedMmuPages) bad(`(6) n_used_mmu_pages ${mmu.nUsedMmuPages} != ${nUsed} pages not on an invalid list`)
  if (indirect !== mmu.indirectShadowPages) bad(`(7) indirect_shadow_pages ${mmu.indirectShadowPages} != ${indirect}`)
  if (unsyncCount !== stats.mmu_unsync) bad(`(13) mmu_unsync stat ${stats.mmu_unsync} != ${unsyncCount} unsync pages`)
  if (pages.length !== mmu.vm.mmuPagesLive) bad(`${pages.length} shadow pages but ${mmu.vm.mmuPagesLive} MMU pages allocated`)
  if (mmu.mmuValidGen !== 0 && mmu.mmuValidGen !== 1) bad(`(14) mmu_valid_gen ${mmu.mmuValidGen}`)

  // (3) parent links, (4) rmaps, (10) SPTE bits
  const leafCount = [0, 0, 0, 0]
  const leaves = new Map<number, { sp: MmuPage; idx: number }>()
  for (const sp of pages) {
    for (let i = 0; i < sp.parentSps.length; i++) {
      const p = sp.parentSps[i]!
      const idx = sp.parentIdx[i]!
      const lo = mem.read64(p.hpa + idx * 8)
      const hi = mem.hi64
      if (!isShadowPresentPte(lo) || isLargePte(lo) || spteToPfn(lo, hi) * 4096 !== sp.hpa) bad(`(3) ${sp.toString()} lists parent ${p.toString()}[${idx}] which does not point at it`)
    }
    for (let i = 0; i < 512; i++) {
      const lo = mem.read64(sp.hpa + i * 8)
      const hi = mem.hi64
      if (!isShadowPresentPte(lo)) continue
      if (sp.invalid && sp.rootCount === 0) bad(`${sp.toString()} is invalid but has present SPTE ${i}`)
      if (sp.level > 1 && !isLargePte(lo)) {
        const child = mmu.pageByPfn.get(spteToPfn(lo, hi))
        if (child === undefined) {
          bad(`(3) ${sp.toString()}[${i}] points at no shadow page`)
          continue
        }
        let found = false
        for (let k = 0; k < child.parentSps.length; k++) if (child.parentSps[k] === sp && child.parentIdx[k] === i) found = true
        if (!found) bad(`(3) ${sp.toString()}[${i}] → ${child.toString()} is missing from its parent_ptes`)
        if (child.level !== sp.level - 1) bad(`(3) ${sp.toString()}[${i}] → ${child.toString()} has the wrong level`)
        continue
      }
      leafCount[sp.level]!++
      leaves.set(sp.hpa + i * 8, { sp, idx: i })
      const inv = spteWritableInvariantViolation(fmt, lo, hi)
      if (inv !== null) bad(`(10) ${sp.toString()}[${i}]: ${inv}`)
      if (isWritablePte(lo) && (lo & fmt.dirtyLo) === 0 && fmt.adEnabled) bad(`(10) ${sp.toString()}[${i}] is writable but not dirty`)
    }
  }
  if (leafCount[1] !== stats.pages_4k || leafCount[2] !== stats.pages_2m || leafCount[3] !== stats.pages_1g) {
    bad(`pages_4k/2m/1g ${stats.pages_4k}/${stats.pages_2m}/${stats.pages_1g} != leaves ${leafCount[1]}/${leafCount[2]}/${leafCount[3]}`)
  }
  // (4) every rmap entry is a present leaf with that gfn; every leaf is in exactly one rmap
  const inRmap = new Set<number>()
  const slots = [...mmu.vm.memslots.space(0).sorted, ...mmu.vm.memslots.space(1).sorted]
  for (const slot of slots) {
    const d = slot.arch.mmu.get(mmu.config.name) as SlotMmu | undefined
    if (d === undefined) continue
    for (let level = 1; level <= 3; level++) {
      const arr = d.rmap[level - 1]!
      for (let k = 0; k < arr.length; k++) {
        const head = arr[k]
        if (head === undefined) continue
        for (const sptep of rmapSptes(head)) {
          const leaf = leaves.get(sptep)
          if (leaf === undefined) {
            bad(`(4) rmap of slot ${slot.id} level ${level} index ${k} holds 0x${sptep.toString(16)}, not a present leaf`)
            continue
          }
          if (inRmap.has(sptep)) bad(`(4) ${leaf.sp.toString()}[${leaf.idx}] is in two rmaps`)
          inRmap.add(sptep)
          const gfn = mmu.spGetGfn(leaf.sp, leaf.idx)
          if (leaf.sp.level !== level || gfnToIndex(gfn, slot.baseGfn, level) !== k || gfn < slot.baseGfn || gfn >= slot.baseGfn + slot.npages) {
            bad(`(4) ${leaf.sp.toString()}[${leaf.idx}] (gfn 0x${gfn.toString(16)}) is in the wrong rmap (slot ${slot.id} level ${level} index ${k})`)
          }
        }
      }
    }
  }
  for (const [sptep, leaf] of leaves) if (!inRmap.has(sptep)) bad(`(4) leaf ${leaf.sp.toString()}[${leaf.idx}] is in no rmap`)

  // (2) no lost unsync: every path from a root to an unsync page has its bits set
  for (const sp of pages) {
    if (!sp.unsync) continue
    const todo: MmuPage[] = [sp]
    const visited = new Set<MmuPage>()
    while (todo.length > 0) {
      const c = todo.pop()!
      if (visited.has(c)) continue
      visited.add(c)
      for (let i = 0; i < c.parentSps.length; i++) {
        const p = c.parentSps[i]!
        if (!p.testUnsyncChildBit(c.parentIdx[i]!)) bad(`(2) lost unsync: ${p.toString()}[${c.parentIdx[i]}] → ${c.toString()} has no unsync bit (below unsync ${sp.toString()})`)
        todo.push(p)
      }
    }
  }
  // (8) (9) write tracking and protection of shadowed gfns
  for (const sp of pages) {
    if (sp.invalid || !sp.hasGptes) continue
    const slot = mmu.slotForGfn(sp.role >>> 24, sp.gfn)
    if (slot === null) continue
    const d = slot.arch.mmu.get(mmu.config.name) as SlotMmu | undefined
    if (sp.level > 1 && (d === undefined || d.writeTrack[sp.gfn - slot.baseGfn]! < 1)) bad(`(8) ${sp.toString()} is not write-tracked`)
    if (slot.npages >= 512 && !isLpageDisallowed(slot, sp.gfn, 2)) bad(`(8) huge pages are allowed over shadowed ${sp.toString()}`)
    if (d === undefined) continue
    for (let level = 1; level <= 3; level++) {
      const head = d.rmap[level - 1]![gfnToIndex(sp.gfn, slot.baseGfn, level)]
      for (const sptep of rmapSptes(head)) {
        const lo = mem.read64(sptep)
        const hi = mem.hi64
        if (sp.level > 1 && (isWritablePte(lo) || isMmuWritableSpte(fmt, lo, hi))) bad(`(9) SPTE 0x${sptep.toString(16)} maps write-tracked ${sp.toString()} writable`)
        if (sp.level === 1 && !sp.unsync && isWritablePte(lo)) bad(`(9) SPTE 0x${sptep.toString(16)} maps sync ${sp.toString()} writable`)
      }
    }
  }
  // (11) root counts
  const refs = new Map<MmuPage, number>()
  for (const v of mmu.vcpuMmus) {
    for (const r of [v.root, ...v.prevRoots]) {
      if (r.hpa < 0) continue
      if (mmu.kvmMmuIsDummyRoot(r.hpa)) {
        // The dummy root is never cached (fast_pgd_switch frees it) and must stay all zeros.
        if (r !== v.root) bad(`(11) vCPU ${v.vcpu.id} caches the dummy root as a previous root`)
        for (let i = 0; i < 512; i++) {
          if ((mem.read64(r.hpa + i * 8) | mem.hi64) !== 0) {
            bad(`the dummy root has a non-zero entry ${i}`)
            break
          }
        }
        continue
      }
      const sp = mmu.pageByPfn.get(r.hpa / 4096)
      if (sp === undefined) {
        bad(`(11) vCPU ${v.vcpu.id} holds root 0x${r.hpa.toString(16)} that is no shadow page`)
        continue
      }
      refs.set(sp, (refs.get(sp) ?? 0) + 1)
    }
  }
  for (const sp of pages) if ((refs.get(sp) ?? 0) !== sp.rootCount) bad(`(11) ${sp.toString()}: root_count ${sp.rootCount} != ${refs.get(sp) ?? 0} root slots`)
  return out
}
