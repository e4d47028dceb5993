import { MmusimError } from './errors.ts'
import type { CpuFeatures } from './cpu-state.ts'
import { type GuestProgram, type InterruptHandler, OP_BATCH, OP_HALT, OP_PAUSE, OP_SEND_IPI, OP_WORK, RES_GP, RES_OK, RES_PF } from './isa.ts'
import { GuestThread } from './guest-thread.ts'
import { PhysMem } from './phys-mem.ts'
import type { TlbConfig } from './tlb.ts'
import { EXEC_MACHINE, EXEC_OK, EXEC_PF, Vcpu } from './vcpu.ts'

/** Options of a bare-metal {@link Machine}. */
export interface MachineOptions {
  /** Guest-physical memory in bytes. */
  memBytes: number
  /** Number of vCPUs. @default 1 */
  vcpus?: number
  features?: Partial<CpuFeatures>
  tlb?: Partial<TlbConfig>
  psc?: boolean
  /** Simulated nanoseconds charged per op (a batch element counts as one op). @default 1 */
  opCost?: number
  /** Ops after which `run` stops with MACHINE_RUNAWAY. @default 1e9 */
  maxOps?: number
}

/**
 * Observer of every completed or faulting memory access (the differential oracle's hook).
 * `gpa` is -1 for a fault.
 */
export type AccessObserver = (cpu: number, la: number, kind: number, status: number, gpa: number, errorCode: number) => void

/**
 * Bare metal: N processors over one guest-physical memory, no hypervisor. This is the reference
 * every MMU strategy is judged against. Guest programs run interleaved deterministically in
 * simulated time (the processor with the smallest clock steps next; ties by index), with IPIs
 * delivered at op boundaries.
 */
export class Machine {
  readonly mem: PhysMem
  readonly vcpus: Vcpu[] = []
  readonly threads: GuestThread[] = []
  readonly clocks: Float64Array
  /** The guest OS's interrupt table: vector → handler factory. */
  idt: (InterruptHandler | undefined)[] = []
  private readonly opCost: number
  private readonly maxOps: number
  totalOps = 0

  constructor(options: MachineOptions) {
    this.mem = new PhysMem({ sizeBytes: options.memBytes, name: 'guest' })
    const n = options.vcpus ?? 1
    if (!Number.isInteger(n) || n < 1 || n > 256) {
      throw new MmusimError('HW_CONFIG_INVALID', `vcpus must be an integer from 1 to 256; got ${String(n)}`)
    }
    for (let i = 0; i < n; i++) {
      this.vcpus.push(new Vcpu(this.mem, { id: i, features: options.features, tlb: options.tlb, psc: options.psc }))
      this.threads.push(new GuestThread(i))
    }
    this.clocks = new Float64Array(n)
    this.opCost = options.opCost ?? 1
    this.maxOps = options.maxOps ?? 1e9
  }

  /** Start `program` on vCPU `cpu`. */
  spawn(cpu: number, program: GuestProgram): void {
    const t = this.threads[cpu]
    if (t === undefined) throw new MmusimError('HW_CONFIG_INVALID', `no vCPU ${String(cpu)} (machine has ${String(this.threads.length)})`)
    t.start(program, this.idt)
  }

  /** Run until every program has finished. */
  run(observer: AccessObserver | null = null): void {
    const threads = this.threads
    for (;;) {
      let best = -1
      let bestClock = Infinity
      for (let i = 0; i < threads.length; i++) {
        const t = threads[i]!
        if (t.done || (t.halted && !t.hasPending)) continue
        if (this.clocks[i]! < bestClock) {
          bestClock = this.clocks[i]!
          best = i
        }
      }
      if (best < 0) {
        if (threads.some((t) => !t.done)) {
          throw new MmusimError('MACHINE_DEADLOCK', 'every unfinished vCPU is halted with no interrupt pending')
        }
        return
      }
      this.step(best, observer)
      if (this.totalOps > this.maxOps) {
        throw new MmusimError('MACHINE_RUNAWAY', `guest programs ran more than ${String(this.maxOps)} ops; raise maxOps or check for a livelock`)
      }
    }
  }

  private step(i: number, observer: AccessObserver | null): void {
    const t = this.threads[i]!
    const op = t.next()
    if (op === null) return
    const v = this.vcpus[i]!
    this.totalOps++
    const st = v.execute(op)
    let cost = this.opCost
    if (st === EXEC_MACHINE) {
      switch (op.kind) {
        case OP_PAUSE:
          break
        case OP_WORK:
          cost = op.lo
          break
        case OP_HALT:
          t.halted = true
          break
        case OP_SEND_IPI:
          for (const target of op.targets) {
            const tt = this.threads[target]
            if (tt === undefined) {
              throw new MmusimError('GUEST_BAD_IPI', `vCPU ${String(i)} sent an IPI to vCPU ${String(target)}, which does not exist`)
            }
            tt.raise(op.vector)
          }
          break
        default:
          throw new MmusimError('GUEST_BAD_OP', `vCPU ${String(i)} yielded an op of unknown kind ${String(op.kind)}`)
      }
      op.status = RES_OK
      t.lastStatus = RES_OK
    } else {
      if (op.kind === OP_BATCH) cost = this.opCost * Math.max(1, op.index - op.batchStart)
      t.lastStatus = st === EXEC_OK ? RES_OK : st === EXEC_PF ? RES_PF : RES_GP
      if (observer !== null && op.kind <= 5) observer(i, op.addr, op.kind, t.lastStatus, st === EXEC_OK ? v.res.gpa : -1, op.errorCode)
    }
    this.clocks[i]! += cost
  }
}
