/**
 * Global invariant checks at quiescent points (tdp-mmu.md §12.1(13)): recomputed statistics,
 * no FROZEN entry in a linked table, every possible-NX SP linked and disallowed, refcount ==
 * owners, one valid root per role, no present SPTE mapping a freed host page, MMU page accounting.
 */
import { isFrozenSpte, isLastSpte, isShadowPresentPte, spteToPfn, type KvmVcpu } from '@mmusim/kvm'
import type { KvmMmuPage } from './mmu-page.ts'
import { type TdpMmu, TdpVcpuState } from './tdp-mmu.ts'

/** Recomputed gauges. */
export interface RecomputedCounts {
  pages: [number, number, number]
  linkedNonRoot: number
}

/** Walk every linked table of every listed root; report structural problems into `out`. */
export function recount(mmu: TdpMmu, out: string[]): RecomputedCounts {
  const m = mmu.mem
  const pages: [number, number, number] = [0, 0, 0]
  let linkedNonRoot = 0
  const seen = new Set<KvmMmuPage>()
  const frames = mmu.vm.host.frames
  const walk = (sp: KvmMmuPage): void => {
    if (seen.has(sp)) {
      out.push(`${sp.label} is linked twice`)
      return
    }
    seen.add(sp)
    if (sp.freed) out.push(`${sp.label} is linked but freed`)
    for (let i = 0; i < 512; i++) {
      const lo = m.read32(sp.hpa + i * 8)
      const hi = m.read32(sp.hpa + i * 8 + 4)
      if (isFrozenSpte(lo, hi)) {
        out.push(`FROZEN SPTE left in linked ${sp.label} at index ${String(i)}`)
        continue
      }
      if (!isShadowPresentPte(lo)) continue
      if (isLastSpte(lo, sp.level)) {
        pages[sp.level - 1]!++
        const pfn = spteToPfn(lo, hi)
        const n = sp.level === 1 ? 1 : sp.level === 2 ? 512 : 1
        for (let k = 0; k < n; k++) {
          if (!frames.isAllocated(pfn + k)) {
            out.push(`present leaf in ${sp.label} index ${String(i)} maps host frame 0x${(pfn + k).toString(16)}, which the host freed (a missed notifier unmap, S2/S21)`)
            break
          }
        }
      } else {
        const child = mmu.sps.get(spteToPfn(lo, hi))
        if (child === undefined) {
          out.push(`${sp.label} index ${String(i)} points at 0x${(spteToPfn(lo, hi) * 4096).toString(16)}, which is not a TDP MMU page`)
          continue
        }
        if (child.level !== sp.level - 1) out.push(`${child.label} linked at level ${String(sp.level)}`)
        linkedNonRoot++
        walk(child)
      }
    }
  }
  for (let r = mmu.rootsHead; r !== null; r = r.next) walk(r)
  return { pages, linkedNonRoot }
}

/** All invariant violations of `mmu` (empty = consistent). Call only when no thread is inside an MMU operation. */
export function auditTdpMmu(mmu: TdpMmu, vcpus: readonly KvmVcpu[]): string[] {
  const out = [...mmu.violations]
  const c = recount(mmu, out)
  const s = mmu.vm.stats
  if (c.pages[0] !== s.pages_4k || c.pages[1] !== s.pages_2m || c.pages[2] !== s.pages_1g) {
    out.push(`stats drift: pages_4k/2m/1g = ${String(s.pages_4k)}/${String(s.pages_2m)}/${String(s.pages_1g)}, recomputed ${c.pages.join('/')}`)
  }
  if (c.linkedNonRoot !== mmu.counters.tdp_mmu_pages) {
    out.push(`tdp_mmu_pages = ${String(mmu.counters.tdp_mmu_pages)}, but ${String(c.linkedNonRoot)} non-root pages are linked`)
  }
  if (s.nx_lpage_splits !== mmu.possibleNx.length) out.push(`nx_lpage_splits = ${String(s.nx_lpage_splits)} but the list has ${String(mmu.possibleNx.length)}`)
  const linked = new Set<KvmMmuPage>()
  for (const sp of mmu.sps.values()) linked.add(sp)
  for (const sp of mmu.possibleNx) {
    if (!sp.nxHugePageDisallowed) out.push(`${sp.label} is on the possible NX list without nx_huge_page_disallowed`)
    if (sp.freed || !linked.has(sp)) out.push(`${sp.label} is on the possible NX list but freed (S15)`)
  }
  // Root references == owners.
  const roles = new Map<number, KvmMmuPage>()
  for (let r = mmu.rootsHead; r !== null; r = r.next) {
    let owners = r.scheduledToZap || (!r.invalid && mmu.opts.rootLifecycle === 'current') ? 1 : 0
    for (const v of vcpus) {
      const st = v.mmuState
      if (!(st instanceof TdpVcpuState)) continue
      if (st.root === r) owners++
      for (const p of st.prevRoots) if (p === r) owners++
    }
    const n = r.rootCount!.read()
    if (n !== owners) out.push(`${r.label}: refcount ${String(n)} but ${String(owners)} owners (${[...r.rootCount!.holders()].map(([o, k]) => `${o}×${String(k)}`).join(', ')})`)
    if (!r.invalid) {
      const other = roles.get(r.role)
      if (other !== undefined) out.push(`two valid roots with role 0x${r.role.toString(16)}: ${other.label} and ${r.label} (I-R5)`)
      roles.set(r.role, r)
    }
    if (n === 0) out.push(`${r.label} is listed with refcount 0 at a quiescent point`)
    if (r.invalidatedZaps > 1) out.push(`${r.label} was zapped ${String(r.invalidatedZaps)} times by kvm_tdp_mmu_zap_invalidated_roots (seed 004: exactly once)`)
  }
  if (mmu.vm.mmuPagesLive !== mmu.sps.size) out.push(`${String(mmu.vm.mmuPagesLive)} MMU pages allocated but the TDP MMU knows ${String(mmu.sps.size)}`)
  return out
}
