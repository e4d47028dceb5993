import { MmusimError } from './errors.ts'
import { GuestOp, type GuestProgram, type InterruptHandler, RES_OK } from './isa.ts'

/**
 * The guest side of one vCPU: its program, the interrupt handlers it is running, and pending
 * interrupts. Shared by the bare machine and by the hypervisor's run loop, so a guest program
 * sees the same interrupt delivery on every MMU. Interrupts are delivered at op boundaries,
 * one at a time (a handler runs with interrupts off, as Linux's IPI handlers do).
 */
export class GuestThread {
  readonly cpu: number
  /** The op object this vCPU's programs fill and yield. */
  readonly op = new GuestOp()
  private readonly stack: GuestProgram[] = []
  private readonly pending: number[] = []
  private idt: readonly (InterruptHandler | undefined)[] = []
  /** Status to send into the program at the next step. */
  lastStatus = RES_OK
  /** True once the main program has returned. */
  done = false
  /** True while halted (HLT) waiting for an interrupt. */
  halted = false
  /** Status owed to the interrupted main program, saved while a handler runs. */
  private savedStatus = RES_OK
  /** Ops stepped (for runaway detection). */
  steps = 0
  interruptsDelivered = 0

  constructor(cpu: number) {
    this.cpu = cpu
  }

  /** Install the main program and the interrupt table (the guest OS's IDT). */
  start(program: GuestProgram, idt: readonly (InterruptHandler | undefined)[] = []): void {
    this.stack.length = 0
    this.stack.push(program)
    this.idt = idt
    this.done = false
    this.halted = false
    this.lastStatus = RES_OK
  }

  /** Queue an interrupt (an IPI) for this vCPU. */
  raise(vector: number): void {
    this.pending.push(vector)
    this.halted = false
  }

  /** Whether an interrupt is waiting to be delivered. */
  get hasPending(): boolean {
    return this.pending.length > 0
  }

  /** Depth of running handlers plus the main program. */
  get depth(): number {
    return this.stack.length
  }

  /**
   * Advance to the next op: deliver a pending interrupt if the main program is running, resume
   * the innermost program with the last status, pop finished handlers. Returns the op to
   * execute, or null when the main program has finished or the vCPU is halted.
   */
  next(): GuestOp | null {
    for (;;) {
      if (this.done) return null
      if (this.stack.length === 1 && this.pending.length > 0) {
        const vector = this.pending.shift()!
        const handler = this.idt[vector]
        if (handler === undefined) {
          throw new MmusimError('GUEST_NO_HANDLER', `vCPU ${String(this.cpu)} received interrupt vector ${String(vector)} but the guest installed no handler for it`)
        }
        this.stack.push(handler(this.cpu, vector))
        this.interruptsDelivered++
        this.halted = false
        // The interrupted program must later receive the status of its own last op.
        this.savedStatus = this.lastStatus
        this.lastStatus = RES_OK
      }
      if (this.halted) return null
      const prog = this.stack[this.stack.length - 1]!
      const r = prog.next(this.lastStatus)
      this.steps++
      if (r.done === true) {
        this.stack.pop()
        this.lastStatus = this.stack.length === 1 ? this.savedStatus : RES_OK
        if (this.stack.length === 0) {
          this.done = true
          return null
        }
        continue
      }
      return r.value
    }
  }
}
