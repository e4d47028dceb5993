import type { Cpu, Routine } from '../cpu.ts'
import type { Task } from '../guest-os.ts'
import { PAGE_4K } from '../layout.ts'
import { exitProcess, fork, mmap } from '../mm-ops.ts'
import { Prng } from '../prng.ts'
import { switchMm } from '../tlb-flush.ts'

/** Parameters of {@link forkStorm}. */
export interface ForkStormParams {
  /** Pages of the parent's private anonymous memory. @default 16 */
  pages?: number
  /** Fork rounds. @default 4 */
  rounds?: number
  /** Children forked per round (alive at the same time). @default 2 */
  children?: number
  /** Distinct pages each child writes (each is one copy-on-write copy). @default 4 */
  childWrites?: number
  /** Distinct pages the parent writes after its children exited (each is one CoW reuse). @default 4 */
  parentWrites?: number
  /** @default 1 */
  seed?: number
}

/** Value stored by process `who` (0 = parent) in `page` at `round`. */
function value(cpu: number, who: number, page: number, round: number): number {
  return (Math.imul(page + 1, 0x9e3779b1) ^ Math.imul(who + 7, 0x85ebca6b) ^ Math.imul(round + 3, 0x27d4eb2f) ^ (cpu << 28)) >>> 0 || 1
}

/**
 * Fork storm (Peter Xu's `rmap_fork`, VMware's process-creation test): on each vCPU a parent
 * fills its pages, then each round forks `children` children; every child checks it sees the
 * parent's data, writes `childWrites` pages (copy-on-write copies) and checks them; the parent
 * checks its data is unchanged; the children exit; the parent writes `parentWrites` pages (CoW
 * reuses, the pages being exclusive again).
 *
 * Exact counts per vCPU: cowCopies = rounds × children × childWrites, cowReuses = rounds × parentWrites,
 * anonymous faults = pages, forks = rounds × children.
 */
export function* forkStorm(cpu: Cpu, params: ForkStormParams = {}): Routine {
  const os = cpu.os
  const pages = params.pages ?? 16
  const rounds = params.rounds ?? 4
  const nChildren = params.children ?? 2
  const childWrites = Math.min(params.childWrites ?? 4, pages)
  const parentWrites = Math.min(params.parentWrites ?? 4, pages)
  const prng = new Prng(params.seed ?? 1).fork(cpu.id)
  const parent = yield* os.createProcess(cpu)
  yield* switchMm(cpu, parent.mm)
  const base = yield* mmap(cpu, parent.mm, { length: pages * PAGE_4K })
  const mine = new Uint32Array(pages)
  for (let p = 0; p < pages; p++) {
    mine[p] = value(cpu.id, 0, p, 0)
    yield* cpu.write32(base + p * PAGE_4K, mine[p]!)
  }
  for (let round = 0; round < rounds; round++) {
    const kids: Task[] = []
    for (let c = 0; c < nChildren; c++) kids.push(yield* fork(cpu, parent))
    for (let c = 0; c < nChildren; c++) {
      yield* switchMm(cpu, kids[c]!.mm)
      for (let p = 0; p < pages; p++) yield* cpu.check32(base + p * PAGE_4K, mine[p]!)
      const written = prng.shuffle(Array.from({ length: pages }, (_, i) => i)).slice(0, childWrites)
      for (const p of written) yield* cpu.write32(base + p * PAGE_4K, value(cpu.id, c + 1, p, round))
      for (let p = 0; p < pages; p++) yield* cpu.check32(base + p * PAGE_4K, written.includes(p) ? value(cpu.id, c + 1, p, round) : mine[p]!)
    }
    yield* switchMm(cpu, parent.mm)
    for (let p = 0; p < pages; p++) yield* cpu.check32(base + p * PAGE_4K, mine[p]!)
    for (const k of kids) yield* exitProcess(cpu, k)
    const written = prng.shuffle(Array.from({ length: pages }, (_, i) => i)).slice(0, parentWrites)
    for (const p of written) {
      mine[p] = value(cpu.id, 0, p, round + 1)
      yield* cpu.write32(base + p * PAGE_4K, mine[p])
    }
  }
  for (let p = 0; p < pages; p++) yield* cpu.check32(base + p * PAGE_4K, mine[p]!)
  yield* exitProcess(cpu, parent)
}
