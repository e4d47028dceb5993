import { clearYoung, type Cpu, exitProcess, flushTlbMmRange, fork, mmap, mprotect, munmap, type Routine, switchMm, type Task } from '@mmusim/guest'

/** One command of a generated guest program (JSON, so a failure prints as a regression test). */
export type FuzzCommand =
  | { readonly op: 'mmap'; readonly pages: number; readonly prot: number }
  | { readonly op: 'munmap'; readonly region: number }
  | { readonly op: 'mprotect'; readonly region: number; readonly prot: number }
  | { readonly op: 'write'; readonly region: number; readonly page: number; readonly value: number }
  | { readonly op: 'read'; readonly region: number; readonly page: number }
  | { readonly op: 'fetch'; readonly region: number; readonly page: number }
  | { readonly op: 'fork'; readonly childWrites: number }
  | { readonly op: 'switch' }
  | { readonly op: 'invlpg'; readonly region: number; readonly page: number }
  | { readonly op: 'clearYoung'; readonly region: number; readonly page: number; readonly flush: boolean }

/** A region a fuzz program mmapped, addressed by index (modulo the count). */
export interface FuzzRegion {
  readonly base: number
  readonly pages: number
  mapped: boolean
}

/**
 * Run one generated command on `task`'s address space, for both fuzz modes: everything but
 * `switch` (which each mode interprets its own way). Region and page indices wrap, so every
 * generated or shrunk command is meaningful; commands on unmapped regions do nothing.
 */
export function* applyFuzzCommand(cpu: Cpu, task: Task, regions: FuzzRegion[], c: Exclude<FuzzCommand, { op: 'switch' }>): Routine {
  const mm = task.mm
  const region = (k: number): FuzzRegion | null => (regions.length === 0 ? null : regions[k % regions.length]!)
  const va = (r: FuzzRegion, page: number): number => r.base + (page % r.pages) * 4096
  switch (c.op) {
    case 'mmap': {
      const base = yield* mmap(cpu, mm, { length: c.pages * 4096, prot: c.prot })
      regions.push({ base, pages: c.pages, mapped: true })
      break
    }
    case 'munmap': {
      const r = region(c.region)
      if (r?.mapped === true) {
        yield* munmap(cpu, mm, r.base, r.pages * 4096)
        r.mapped = false
      }
      break
    }
    case 'mprotect': {
      const r = region(c.region)
      if (r?.mapped === true) yield* mprotect(cpu, mm, r.base, r.pages * 4096, c.prot)
      break
    }
    case 'write': {
      const r = region(c.region)
      if (r !== null) yield* cpu.write32(va(r, c.page), c.value)
      break
    }
    case 'read': {
      const r = region(c.region)
      if (r !== null) yield* cpu.read32(va(r, c.page))
      break
    }
    case 'fetch': {
      const r = region(c.region)
      if (r !== null) yield* cpu.fetch32(va(r, c.page))
      break
    }
    case 'invlpg': {
      const r = region(c.region)
      if (r !== null) yield* cpu.invlpg(va(r, c.page))
      break
    }
    case 'clearYoung': {
      const r = region(c.region)
      if (r?.mapped !== true) break
      const page = va(r, c.page)
      yield* clearYoung(cpu, mm, page, c.flush)
      // Without a flush the A bit is architecturally undefined until the next flush: a TLB — or,
      // under shadow paging, an SPTE every vCPU shares — may keep serving the page without setting
      // A, and the guest kernel reads its PTEs (so A is guest-visible). Reclaim's batched flush
      // (try_to_unmap_flush) comes before anyone acts on the result; do it here so A stays comparable.
      if (!c.flush) yield* flushTlbMmRange(cpu, mm, page, page + 4096)
      break
    }
    case 'fork': {
      const child = yield* fork(cpu, task)
      yield* switchMm(cpu, child.mm)
      const live = regions.filter((r) => r.mapped)
      for (let w = 0; w < c.childWrites && live.length > 0; w++) {
        const r = live[w % live.length]!
        yield* cpu.read32(va(r, w))
        yield* cpu.write32(va(r, w), 0xc0de0000 + w)
      }
      yield* switchMm(cpu, mm)
      yield* exitProcess(cpu, child)
      break
    }
  }
}
