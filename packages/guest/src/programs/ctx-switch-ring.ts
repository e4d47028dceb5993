import type { Cpu, Routine } from '../cpu.ts'
import type { Task } from '../guest-os.ts'
import { OP_READ, OP_WRITE } from '@mmusim/x86-hw'
import { PAGE_4K, USER_MMAP_BASE } from '../layout.ts'
import { exitProcess, mmap } from '../mm-ops.ts'
import { switchMm } from '../tlb-flush.ts'

/** Parameters of {@link contextSwitchRing}. */
export interface ContextSwitchRingParams {
  /** Processes in each vCPU's ring (more than 6 forces PCID recycling and flushes). @default 4 */
  processes?: number
  /** Times the token goes round the ring. @default 8 */
  laps?: number
}

/**
 * A pipe ring (lmbench `lat_ctx`): on each vCPU, `processes` processes pass a token. For each hop
 * the kernel switches to the next process (`switch_mm_irqs_off`, PCID no-flush switches while the
 * ring fits in the ASID slots), writes the token into its mailbox page with `copy_to_user`
 * (STAC/CLAC under SMAP), the process reads and checks it and stores token + 1, and the kernel
 * reads that back with `copy_from_user`.
 *
 * Exact counts per vCPU: context switches = processes × laps (+ setup and teardown), mismatches 0.
 */
export function* contextSwitchRing(cpu: Cpu, params: ContextSwitchRingParams = {}): Routine {
  const os = cpu.os
  const n = params.processes ?? 4
  const laps = params.laps ?? 8
  const mailbox = USER_MMAP_BASE
  const ring: Task[] = []
  for (let i = 0; i < n; i++) {
    const t = yield* os.createProcess(cpu)
    yield* switchMm(cpu, t.mm)
    yield* mmap(cpu, t.mm, { addr: mailbox, length: PAGE_4K })
    yield* cpu.write32(mailbox, 0)
    ring.push(t)
  }
  let token = 1 + cpu.id * 1_000_000
  for (let lap = 0; lap < laps; lap++) {
    for (const t of ring) {
      yield* switchMm(cpu, t.mm)
      yield* cpu.userAccessFromKernel(OP_WRITE, mailbox, token)
      const got = yield* cpu.read32(mailbox)
      if (got !== token) cpu.mismatch(mailbox, token, got)
      yield* cpu.write32(mailbox, got + 1)
      const back = yield* cpu.userAccessFromKernel(OP_READ, mailbox, 0)
      if (back !== got + 1) cpu.mismatch(mailbox, got + 1, back)
      token = back
    }
  }
  for (const t of ring) yield* exitProcess(cpu, t)
}
