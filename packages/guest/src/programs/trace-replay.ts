import type { AccessBatch, Machine } from '@mmusim/x86-hw'
import type { Cpu, Routine } from '../cpu.ts'
import { GuestError } from '../errors.ts'
import type { GuestOs, Task } from '../guest-os.ts'
import { LACKEY_INSTR, LACKEY_MODIFY, LACKEY_STORE, type LackeyBatch, type LackeyReadOptions, type LackeySource, readLackeyTrace } from '../lackey.ts'
import { PAGE_4K, PROT_EXEC, PROT_READ, PROT_WRITE } from '../layout.ts'
import { exitProcess, mmap } from '../mm-ops.ts'
import { switchMm } from '../tlb-flush.ts'

/**
 * State of a trace replay that persists across chunks: the process the trace runs in and a
 * JS-side copy of every word the trace wrote (to check reads).
 */
export class TraceReplayState {
  task: Task | null = null
  /** word address → last value written by the replay. */
  readonly written = new Map<number, number>()
  /** Records replayed so far. */
  records = 0
  /** Sequence number of the next write (the value written derives from it). */
  seq = 0
}

/** Parameters of {@link traceReplay}. */
export interface TraceReplayParams {
  /** Batches of lackey records, already read (see {@link loadLackeyBatches}, {@link streamLackeyReplay}). */
  batches: Iterable<LackeyBatch>
  /** State to continue from (for chunked replays); a fresh process is created when it has none. */
  state?: TraceReplayState
  /** Tear the process down at the end. @default true unless `state` was passed */
  exit?: boolean
}

const KIND_FETCH = 2

/** Value stored by the replay's `seq`-th write. */
function replayValue(seq: number): number {
  return (Math.imul(seq + 1, 0x9e3779b1) ^ 0x5bd1e995) >>> 0 || 1
}

/**
 * Replay a valgrind lackey `--trace-mem=yes` trace in a guest process at CPL 3. The process maps
 * one anonymous read-write-execute VMA over all of user space, so every page the trace touches
 * is demand-faulted on first use (a read or fetch first maps the zero page; a later store copies it).
 * Each record becomes a 4-byte access at its first byte's word (I → fetch, L → read, S → write,
 * M → read then write), plus one at its last byte's word when the record crosses a page, so the
 * set of pages touched is exactly the trace's. Stores write a value derived from a sequence
 * number; loads and fetches are checked against the last value stored (0 if none).
 *
 * Runs on the vCPU it is started on; a batch op per lackey batch.
 */
export function* traceReplay(cpu: Cpu, params: TraceReplayParams): Routine {
  const os = cpu.os
  const st = params.state ?? new TraceReplayState()
  if (st.task === null) {
    const task = yield* os.createProcess(cpu)
    yield* switchMm(cpu, task.mm)
    yield* mmap(cpu, task.mm, { addr: PAGE_4K, length: os.userTop - PAGE_4K, prot: PROT_READ | PROT_WRITE | PROT_EXEC })
    st.task = task
  }
  yield* switchMm(cpu, st.task.mm)
  let b: AccessBatch = { addrs: new Float64Array(0), kinds: new Uint8Array(0), values: new Uint32Array(0) }
  let expected = new Uint32Array(0)
  for (const lb of params.batches) {
    const cap = 4 * lb.count
    if (b.addrs.length < cap) {
      b = { addrs: new Float64Array(cap), kinds: new Uint8Array(cap), values: new Uint32Array(cap) }
      expected = new Uint32Array(cap)
    }
    let n = 0
    const push = (addr: number, kind: number): void => {
      b.addrs[n] = addr
      b.kinds[n] = kind
      if (kind === 1) {
        const v = replayValue(st.seq++)
        b.values[n] = v
        st.written.set(addr, v)
      } else {
        b.values[n] = 0
        expected[n] = st.written.get(addr) ?? 0
      }
      n++
    }
    for (let i = 0; i < lb.count; i++) {
      const k = lb.kinds[i]!
      const first = lb.addrs[i]!
      if (first + lb.sizes[i]! > os.userTop) {
        throw new GuestError('TRACE_UNSUPPORTED', `trace record at line ≥ ${String(lb.firstLine)} touches 0x${first.toString(16)}, above user space; mmusim replays user-space traces`)
      }
      const w0 = first - (first % 4)
      const last = first + lb.sizes[i]! - 1
      const w1 = last - (last % 4)
      const cross = Math.floor(w0 / PAGE_4K) !== Math.floor(w1 / PAGE_4K)
      const kinds = k === LACKEY_INSTR ? [KIND_FETCH] : k === LACKEY_STORE ? [1] : k === LACKEY_MODIFY ? [0, 1] : [0]
      for (const kind of kinds) {
        push(w0, kind)
        if (cross) push(w1, kind)
      }
    }
    st.records += lb.count
    yield* cpu.batch(b, 0, n)
    for (let i = 0; i < n; i++) {
      if (b.kinds[i] !== 1 && b.values[i] !== expected[i]) cpu.mismatch(b.addrs[i]!, expected[i]!, b.values[i]!)
    }
  }
  if (params.exit ?? params.state === undefined) {
    yield* exitProcess(cpu, st.task)
    st.task = null
  }
}

/** Options of {@link loadLackeyBatches}. */
export interface LoadLackeyOptions extends LackeyReadOptions {
  /** Upper bound on records read (the rest of the file is not read). @default 1,000,000 */
  maxRecords?: number
}

/**
 * Read a lackey trace into memory as a bounded list of batches (streaming the file; never the
 * whole text), for {@link traceReplay}. Guest programs are synchronous generators and the reader
 * is asynchronous, so the records must be read before the program runs: this loader bounds the
 * memory by `maxRecords` (~11 bytes per record). For traces of any length use
 * {@link streamLackeyReplay}, which alternates reading a chunk and running it.
 */
export async function loadLackeyBatches(source: LackeySource, opts: LoadLackeyOptions = {}): Promise<LackeyBatch[]> {
  const out: LackeyBatch[] = []
  const bounded: LoadLackeyOptions = { ...opts }
  bounded.maxRecords ??= 1_000_000
  for await (const b of readLackeyTrace(source, bounded)) out.push(b)
  return out
}

/** Options of {@link streamLackeyReplay}. */
export interface StreamReplayOptions extends LackeyReadOptions {
  /** Batches read before running them (bounds memory). @default 16 */
  chunkBatches?: number
}

/**
 * Replay a lackey trace of any length on vCPU 0 of a freshly built `machine`/`os` pair (not yet
 * spawned): read `chunkBatches` batches, run them to completion, read the next chunk, and so on —
 * one chunk of the file in memory at a time. The first chunk also boots every vCPU. Returns the
 * replay state (records replayed; the process is torn down at the end).
 *
 * @throws GuestError TRACE_CORRUPT naming the bad line (records before it have been replayed)
 */
export async function streamLackeyReplay(machine: Machine, os: GuestOs, source: LackeySource, opts: StreamReplayOptions = {}): Promise<TraceReplayState> {
  const state = new TraceReplayState()
  const per = opts.chunkBatches ?? 16
  let booted = false
  const runChunk = (batches: LackeyBatch[], last: boolean): void => {
    const body = (cpu: Cpu): Routine => (cpu.id === 0 ? traceReplay(cpu, { batches, state, exit: last }) : idle())
    if (!booted) {
      os.spawnAll(machine, body)
      booted = true
    } else machine.spawn(0, body(os.cpus[0]!))
    machine.run()
  }
  let chunk: LackeyBatch[] = []
  for await (const b of readLackeyTrace(source, opts)) {
    chunk.push(b)
    if (chunk.length === per) {
      runChunk(chunk, false)
      chunk = []
    }
  }
  runChunk(chunk, true)
  return state
}

function* idle(): Routine {
  return
}
