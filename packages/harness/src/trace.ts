import type { AccessBatch, GuestOp, GuestProgram } from '@mmusim/x86-hw'
import { OP_BATCH, OP_CMPXCHG64, OP_INVLPG, OP_INVPCID, OP_MOV_CR0, OP_MOV_CR3, OP_MOV_CR4, OP_READ, OP_READ64, OP_WRITE, OP_WRITE64, OP_FETCH, RES_PF } from '@mmusim/x86-hw'

/** Numbers per record in a {@link GuestTrace}. */
export const RECORD_WIDTH = 6
/** Batch elements are recorded with kind 100 + element kind. */
const BATCH_KIND = 100

/** Ops whose outcome the guest can observe and that do not depend on timing (no PAUSE, IPI, WORK, HLT). */
function recorded(kind: number): boolean {
  return kind <= OP_CMPXCHG64 || kind === OP_BATCH || kind === OP_MOV_CR0 || kind === OP_MOV_CR3 || kind === OP_MOV_CR4 || kind === OP_INVLPG || kind === OP_INVPCID
}

/**
 * What each vCPU's main program observed, op by op: for every memory op its kind, linear address,
 * status, #PF error code and the value read; batch elements individually (through the guest's
 * `onBatch` hook). Two platforms running the same race-free program must record the same trace.
 */
export class GuestTrace {
  /** Per vCPU, records of {@link RECORD_WIDTH} numbers: kind, address, status, error code, value lo, value hi. */
  readonly perCpu: number[][]

  constructor(vcpus: number) {
    this.perCpu = Array.from({ length: vcpus }, () => [])
  }

  /** The guest OS's `onBatch` hook. */
  readonly onBatch = (cpu: number, batch: AccessBatch, start: number, end: number): void => {
    const t = this.perCpu[cpu]!
    for (let i = start; i < end; i++) t.push(BATCH_KIND + batch.kinds[i]!, batch.addrs[i]!, 0, 0, batch.kinds[i] === 0 ? batch.values[i]! : 0, 0)
  }

  /** Wrap a vCPU's program so every op it completes is recorded. */
  *wrap(cpu: number, program: GuestProgram): GuestProgram {
    const t = this.perCpu[cpu]!
    let r = program.next(0)
    while (r.done !== true) {
      const op: GuestOp = r.value
      const status = yield op
      const k = op.kind
      if (recorded(k)) {
        const reads = k === OP_READ || k === OP_READ64 || k === OP_FETCH || k === OP_CMPXCHG64
        const faulted = op.status === RES_PF
        t.push(k, k === OP_BATCH ? op.index : op.addr, op.status, faulted ? op.errorCode : 0, reads && !faulted ? op.valueLo : 0, reads && !faulted && k !== OP_READ && k !== OP_FETCH ? op.valueHi : 0)
      }
      r = program.next(status)
    }
  }

  /** Number of records of vCPU `cpu`. */
  length(cpu: number): number {
    return (this.perCpu[cpu]?.length ?? 0) / RECORD_WIDTH
  }
}

const KIND_NAMES: Record<number, string> = {
  [OP_READ]: 'read',
  [OP_WRITE]: 'write',
  [OP_FETCH]: 'fetch',
  [OP_READ64]: 'read64',
  [OP_WRITE64]: 'write64',
  [OP_CMPXCHG64]: 'cmpxchg64',
  [OP_BATCH]: 'batch',
  [OP_MOV_CR0]: 'mov cr0',
  [OP_MOV_CR3]: 'mov cr3',
  [OP_MOV_CR4]: 'mov cr4',
  [OP_INVLPG]: 'invlpg',
  [OP_INVPCID]: 'invpcid',
}

function hex(n: number): string {
  return `0x${n.toString(16)}`
}

/** A record, described for a human: `read 0x100000040 → 0x1234`, `write 0x… #PF(err=0x7)`. */
export function describeRecord(r: readonly number[]): string {
  const [kind = 0, addr = 0, status = 0, err = 0, lo = 0, hi = 0] = r
  if (kind >= BATCH_KIND) {
    const k = kind - BATCH_KIND
    return k === 0 ? `batch read ${hex(addr)} → ${hex(lo)}` : `batch ${k === 1 ? 'write' : 'fetch'} ${hex(addr)}`
  }
  const name = KIND_NAMES[kind] ?? `op ${String(kind)}`
  if (kind === OP_BATCH) return `batch ended at element ${String(addr)} (status ${String(status)}${status === RES_PF ? `, #PF err=${hex(err)}` : ''})`
  const st = status === 0 ? 'ok' : status === RES_PF ? `#PF(err=${hex(err)})` : '#GP'
  const val = kind === OP_READ || kind === OP_FETCH ? ` → ${hex(lo)}` : kind === OP_READ64 || kind === OP_CMPXCHG64 ? ` → ${hex(hi)}:${hex(lo)}` : ''
  return `${name} ${kind >= OP_MOV_CR0 && kind !== OP_INVLPG ? '' : hex(addr)} ${st}${status === 0 ? val : ''}`.replace(/\s+/g, ' ').trim()
}

/** The first record where two traces differ, per vCPU order (lowest vCPU first). */
export interface TraceDivergence {
  readonly vcpu: number
  /** Index of the record in that vCPU's trace. */
  readonly index: number
  readonly expected: string
  readonly got: string
}

/** Compare `got` against the reference `expected`; null when identical. */
export function compareTraces(expected: GuestTrace, got: GuestTrace): TraceDivergence | null {
  const n = Math.max(expected.perCpu.length, got.perCpu.length)
  for (let c = 0; c < n; c++) {
    const e = expected.perCpu[c] ?? []
    const g = got.perCpu[c] ?? []
    const len = Math.min(e.length, g.length)
    for (let i = 0; i < len; i++) {
      if (e[i] !== g[i]) {
        const at = Math.floor(i / RECORD_WIDTH) * RECORD_WIDTH
        return { vcpu: c, index: at / RECORD_WIDTH, expected: describeRecord(e.slice(at, at + RECORD_WIDTH)), got: describeRecord(g.slice(at, at + RECORD_WIDTH)) }
      }
    }
    if (e.length !== g.length) {
      return {
        vcpu: c,
        index: len / RECORD_WIDTH,
        expected: e.length > len ? describeRecord(e.slice(len, len + RECORD_WIDTH)) : '(end of trace)',
        got: g.length > len ? describeRecord(g.slice(len, len + RECORD_WIDTH)) : '(end of trace)',
      }
    }
  }
  return null
}
