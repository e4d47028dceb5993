import type { AccessBatch } from '@mmusim/x86-hw'
import type { Cpu, Routine } from '../cpu.ts'
import { GuestError } from '../errors.ts'
import type { Task } from '../guest-os.ts'
import { PAGE_2M, PAGE_4K } from '../layout.ts'
import { mmap, populate, preallocTables } from '../mm-ops.ts'
import { Prng } from '../prng.ts'
import { exitProcess } from '../mm-ops.ts'
import { switchMm } from '../tlb-flush.ts'

/** Parameters of {@link memstress} (KVM selftests' memstress options; defaults are small, not KVM's 1 GiB). */
export interface MemstressParams {
  /** `-b`: bytes per vCPU. @default 1 MiB */
  bytesPerVcpu?: number
  /** `-i`: passes over the region. @default 2 */
  iterations?: number
  /** `-w`: percentage of accesses that write. @default 100 */
  writePercent?: number
  /** `-a`: random page order instead of sequential. @default false */
  randomAccess?: boolean
  /** `-o`: all vCPUs share one region instead of one region each. @default false */
  overlap?: boolean
  /** `-r`: guest random seed. @default 1 */
  seed?: number
  /** Stride between accesses (memstress's guest_page_size). @default 4096 */
  guestPageSize?: number
  /** Back the region with 2 MiB transparent huge pages. @default false */
  thp?: boolean
  /**
   * Map every page before the vCPUs start (vCPU 0 faults them all in, as KVM's memstress host
   * builds the guest mapping up front). Otherwise each vCPU demand-faults its own pages, after
   * vCPU 0 allocated the shared page tables. @default false
   */
  populate?: boolean
  /** Start of the test region (a user address). @default 4 GiB */
  base?: number
  /** Called after each iteration with (vCPU, iteration) — where the KVM test's GUEST_SYNC hands control to the host. */
  onIteration?: (cpu: number, iteration: number) => void
}

/** The value memstress stores for (vCPU, page, iteration): never 0, so a read of a never-written page is distinguishable. */
export function memstressValue(cpu: number, page: number, iteration: number): number {
  return (Math.imul(page + 1, 0x9e3779b1) ^ Math.imul(iteration + 1, 0x85ebca6b) ^ Math.imul(cpu + 1, 0xc2b2ae35) ^ 1) >>> 0 || 1
}

interface MemstressShared {
  task: Task | null
}

/**
 * KVM's `memstress_guest_code`: each vCPU makes `iterations` passes over its region, one 4-byte
 * access per `guestPageSize` stride, writing with probability `writePercent`% (a value derived
 * from vCPU, page and iteration) or reading and checking the last value written. All vCPUs run
 * threads of one process; one pass is one OP_BATCH over typed arrays. With `overlap`, vCPUs race on
 * shared pages, so reads are only checked to be 0 or the page's value (written as f(page)).
 *
 * Exact counts: accesses = pages × iterations per vCPU; demand faults per vCPU = pages with 100%
 * writes (a read-first page costs a zero-page fault, then a copy-on-write fault).
 */
export function* memstress(cpu: Cpu, params: MemstressParams = {}): Routine {
  const os = cpu.os
  const bytes = params.bytesPerVcpu ?? 2 ** 20
  const stride = params.guestPageSize ?? PAGE_4K
  const iterations = params.iterations ?? 2
  const writePercent = params.writePercent ?? 100
  const overlap = params.overlap ?? false
  const base = params.base ?? 2 ** 32
  const n = os.cpus.length
  if (bytes % stride !== 0 || stride % 4 !== 0 || bytes <= 0) {
    throw new GuestError('INVALID_ARGUMENT', `memstress: bytesPerVcpu (${String(bytes)}) must be a positive multiple of guestPageSize (${String(stride)})`)
  }
  const shared = os.sharedState<MemstressShared>('memstress', () => ({ task: null }))
  if (cpu.id === 0) {
    // Setup, as the selftest's host does before starting the vCPUs.
    const task = yield* os.createProcess(cpu)
    yield* switchMm(cpu, task.mm)
    const len = overlap ? bytes : bytes * n
    const thp = params.thp ?? false
    if (thp && (base % PAGE_2M !== 0 || bytes % PAGE_2M !== 0)) {
      throw new GuestError('INVALID_ARGUMENT', 'memstress: thp needs a 2 MiB-aligned base and bytesPerVcpu')
    }
    yield* mmap(cpu, task.mm, { addr: base, length: len, thp })
    if (params.populate === true) yield* populate(cpu, task.mm, base, base + len)
    else yield* preallocTables(cpu, task.mm, base, base + len)
    shared.task = task
  }
  yield* os.barrier(cpu, 'memstress:setup')
  const task = shared.task!
  yield* switchMm(cpu, task.mm)

  const region = base + (overlap ? 0 : cpu.id * bytes)
  const pages = bytes / stride
  const prng = new Prng(params.seed ?? 1).fork(cpu.id)
  const b: AccessBatch = { addrs: new Float64Array(pages), kinds: new Uint8Array(pages), values: new Uint32Array(pages) }
  const last = new Uint32Array(pages)
  for (let it = 0; it < iterations; it++) {
    const spec = { region, stride, pages, total: pages, every: 1, randomAccess: params.randomAccess === true, writePercent, overlap, iteration: it }
    yield* memstressAccessPass(cpu, spec, prng, b, last)
    params.onIteration?.(cpu.id, it)
  }
  yield* switchMm(cpu, null)
  yield* os.barrier(cpu, 'memstress:done')
  if (cpu.id === 0) yield* exitProcess(cpu, task)
}

/** One pass of memstress over a vCPU's region (see {@link memstressAccessPass}). */
export interface MemstressPassSpec {
  /** First byte of this vCPU's region. */
  region: number
  /** Access stride (guest_page_size). */
  stride: number
  /** Accesses in this pass. */
  pages: number
  /** Pages in the region (the random-access range). */
  total: number
  /** Sequential passes touch every `every`-th page. */
  every: number
  randomAccess: boolean
  writePercent: number
  /** All vCPUs share one region (`-o`): values written are vCPU-independent. */
  overlap: boolean
  iteration: number
}

/**
 * The loop body of the selftests' memstress guest_code: one access per page (random or
 * sequential), a write with probability writePercent storing {@link memstressValue}, else a read
 * checked against the last value this vCPU wrote there — as one batch op. `last[page]` carries the
 * written values across passes. Mismatches are recorded on the vCPU.
 */
export function* memstressAccessPass(cpu: Cpu, s: MemstressPassSpec, prng: Prng, b: AccessBatch, last: Uint32Array): Routine {
  const expected = new Uint32Array(s.pages)
  for (let i = 0; i < s.pages; i++) {
    const page = s.randomAccess ? prng.nextInt(s.total) : i * s.every
    b.addrs[i] = s.region + page * s.stride
    if (prng.nextInt(100) < s.writePercent) {
      const v = s.overlap ? memstressValue(0, page, 0) : memstressValue(cpu.id, page, s.iteration)
      b.kinds[i] = 1
      b.values[i] = v
      last[page] = v
    } else {
      b.kinds[i] = 0
      b.values[i] = 0
      expected[i] = last[page]!
    }
  }
  yield* cpu.batch(b, 0, s.pages)
  for (let i = 0; i < s.pages; i++) {
    if (b.kinds[i] !== 0) continue
    const got = b.values[i]!
    if (s.overlap) {
      // Another vCPU may or may not have written the shared page yet.
      const page = (b.addrs[i]! - s.region) / s.stride
      if (got !== 0 && got !== memstressValue(0, page, 0)) cpu.mismatch(b.addrs[i]!, memstressValue(0, page, 0), got)
    } else if (got !== expected[i]) cpu.mismatch(b.addrs[i]!, expected[i]!, got)
  }
}
