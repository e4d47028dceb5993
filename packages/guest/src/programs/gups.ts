import type { AccessBatch } from '@mmusim/x86-hw'
import type { Cpu, Routine } from '../cpu.ts'
import type { Task } from '../guest-os.ts'
import { PAGE_2M } from '../layout.ts'
import { exitProcess, mmap, preallocTables } from '../mm-ops.ts'
import { Prng } from '../prng.ts'
import { switchMm } from '../tlb-flush.ts'

/** Parameters of {@link gups}. */
export interface GupsParams {
  /** Table bytes per vCPU (a multiple of 2 MiB with thp). @default 2 MiB */
  bytesPerVcpu?: number
  /** Read-modify-write updates per vCPU. @default 4096 */
  updates?: number
  /** Updates per batch op. @default 512 */
  batch?: number
  /** Back the table with THP. @default false */
  thp?: boolean
  /** @default 1 */
  seed?: number
  /** Start of the table. @default 8 GiB */
  base?: number
}

interface Shared {
  task: Task | null
}

/**
 * GUPS (HPCC RandomAccess): random read-modify-write (`t[i] ^= r`) over a large working set, the
 * classic TLB-miss-heavy workload. vCPUs are threads of one process, each with its own table.
 * Each update is a read then a write of the same word in one batch; reads are checked against a
 * JS-side copy of the table. Exact counts: accesses = 2 × updates per vCPU.
 */
export function* gups(cpu: Cpu, params: GupsParams = {}): Routine {
  const os = cpu.os
  const bytes = params.bytesPerVcpu ?? PAGE_2M
  const updates = params.updates ?? 4096
  const per = params.batch ?? 512
  const base = params.base ?? 2 ** 33
  const shared = os.sharedState<Shared>('gups', () => ({ task: null }))
  if (cpu.id === 0) {
    const task = yield* os.createProcess(cpu)
    yield* switchMm(cpu, task.mm)
    const len = bytes * os.cpus.length
    yield* mmap(cpu, task.mm, { addr: base, length: len, thp: params.thp ?? false })
    yield* preallocTables(cpu, task.mm, base, base + len)
    shared.task = task
  }
  yield* os.barrier(cpu, 'gups:setup')
  const task = shared.task!
  yield* switchMm(cpu, task.mm)
  const region = base + cpu.id * bytes
  const words = bytes / 4
  const table = new Uint32Array(words)
  const prng = new Prng(params.seed ?? 1).fork(cpu.id)
  const b: AccessBatch = { addrs: new Float64Array(2 * per), kinds: new Uint8Array(2 * per), values: new Uint32Array(2 * per) }
  const expected = new Uint32Array(per)
  for (let done = 0; done < updates; done += per) {
    const n = Math.min(per, updates - done)
    for (let j = 0; j < n; j++) {
      const idx = prng.nextInt(words)
      const r = prng.nextU32()
      b.addrs[2 * j] = b.addrs[2 * j + 1] = region + idx * 4
      b.kinds[2 * j] = 0
      b.kinds[2 * j + 1] = 1
      expected[j] = table[idx]!
      table[idx] = (table[idx]! ^ r) >>> 0
      b.values[2 * j + 1] = table[idx]!
    }
    yield* cpu.batch(b, 0, 2 * n)
    for (let j = 0; j < n; j++) if (b.values[2 * j] !== expected[j]) cpu.mismatch(b.addrs[2 * j]!, expected[j]!, b.values[2 * j]!)
  }
  yield* switchMm(cpu, null)
  yield* os.barrier(cpu, 'gups:done')
  if (cpu.id === 0) yield* exitProcess(cpu, task)
}
