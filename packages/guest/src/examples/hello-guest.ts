import { type Cpu, exitProcess, mmap, type Routine, runGuest, switchMm } from '@mmusim/guest'

/** A guest program: its own process per vCPU, `pages` demand-faulted pages, write then check. */
export function* helloGuest(cpu: Cpu, pages: number): Routine {
  const task = yield* cpu.os.createProcess(cpu)
  yield* switchMm(cpu, task.mm)
  const base = yield* mmap(cpu, task.mm, { length: pages * 4096 })
  for (let p = 0; p < pages; p++) yield* cpu.write32(base + p * 4096, 1000 * cpu.id + p)
  for (let p = 0; p < pages; p++) yield* cpu.check32(base + p * 4096, 1000 * cpu.id + p)
  yield* exitProcess(cpu, task)
}

/** Run it on 2 vCPUs of the bare-metal reference machine. */
export function runHelloGuest(): { accesses: number; pageFaults: number; mismatches: number } {
  const r = runGuest((cpu) => helloGuest(cpu, 16), { vcpus: 2 })
  return { accesses: r.accesses, pageFaults: r.pageFaults, mismatches: r.mismatches } // 64, 32, 0
}
