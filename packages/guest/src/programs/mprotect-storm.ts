import type { Cpu, Routine } from '../cpu.ts'
import type { Task } from '../guest-os.ts'
import { PAGE_2M, PAGE_4K, PROT_READ, PROT_WRITE } from '../layout.ts'
import { exitProcess, mmap, mprotect, munmap } from '../mm-ops.ts'
import { switchMm } from '../tlb-flush.ts'

/** Parameters of {@link mprotectStorm}. */
export interface MprotectStormParams {
  /** Pages mapped per iteration (even). @default 8 */
  pages?: number
  /** @default 4 */
  iterations?: number
  /** Start of the per-vCPU slots (each vCPU works in its own 2 MiB slot). @default 1 GiB */
  base?: number
}

function value(cpu: number, it: number, page: number, phase: number): number {
  return (Math.imul(page + 1, 0x9e3779b1) ^ Math.imul(it + 1, 0x85ebca6b) ^ Math.imul(phase + 1, 0x27d4eb2f) ^ (cpu << 24)) >>> 0 || 1
}

interface Shared {
  task: Task | null
}

/**
 * mprotect/munmap storm: all vCPUs run threads of one process, each in its own 2 MiB slot, so every
 * permission change and unmap needs a TLB shootdown to the other vCPUs. Per iteration: mmap,
 * write every page, mprotect read-only, check, probe a write (must SIGSEGV), mprotect read-write,
 * rewrite and check, munmap the upper half and probe a read there (must SIGSEGV), munmap the rest.
 *
 * Exact counts per vCPU: sigsegv = 2 × iterations; anonymous faults = pages × iterations.
 */
export function* mprotectStorm(cpu: Cpu, params: MprotectStormParams = {}): Routine {
  const os = cpu.os
  const pages = params.pages ?? 8
  const iterations = params.iterations ?? 4
  const shared = os.sharedState<Shared>('mprotect-storm', () => ({ task: null }))
  if (cpu.id === 0) shared.task = yield* os.createProcess(cpu)
  yield* os.barrier(cpu, 'mprotect-storm:setup')
  const task = shared.task!
  const mm = task.mm
  yield* switchMm(cpu, mm)
  const slot = (params.base ?? 2 ** 30) + cpu.id * PAGE_2M
  const len = pages * PAGE_4K
  const half = (pages >> 1) * PAGE_4K
  for (let it = 0; it < iterations; it++) {
    const a = yield* mmap(cpu, mm, { addr: slot, length: len })
    for (let p = 0; p < pages; p++) yield* cpu.write32(a + p * PAGE_4K, value(cpu.id, it, p, 0))
    yield* mprotect(cpu, mm, a, len, PROT_READ)
    for (let p = 0; p < pages; p++) yield* cpu.check32(a + p * PAGE_4K, value(cpu.id, it, p, 0))
    if (yield* cpu.write32(a, 0xdead)) cpu.mismatch(a, 0, 0xdead) // the write must not succeed
    yield* mprotect(cpu, mm, a, len, PROT_READ | PROT_WRITE)
    for (let p = 0; p < pages; p++) yield* cpu.write32(a + p * PAGE_4K, value(cpu.id, it, p, 1))
    for (let p = 0; p < pages; p++) yield* cpu.check32(a + p * PAGE_4K, value(cpu.id, it, p, 1))
    yield* munmap(cpu, mm, a + half, len - half)
    if ((yield* cpu.read32(a + half)) >= 0) cpu.mismatch(a + half, 0, 0) // unmapped: must SIGSEGV
    yield* munmap(cpu, mm, a, half)
  }
  yield* switchMm(cpu, null)
  yield* os.barrier(cpu, 'mprotect-storm:done')
  if (cpu.id === 0) yield* exitProcess(cpu, task)
}
