/**
 * A scripted guest for scenario tests: 4-level tables written by the loader (before any shadow
 * page exists), then a program that enables paging and runs explicit steps — user reads through
 * its own page tables, kernel writes to those tables through an identity map, CR3 reloads and
 * INVLPGs — so each KVM path is hit exactly when the test says.
 *
 * Layout (guest-physical = kernel virtual for the low 32 MiB, mapped by 2 MiB supervisor pages):
 * PML4 0x1000, PDPT 0x2000, PD0 0x3000 (identity), user PDs at 0x4000 + 0x1000·d mapping user
 * VA (1 + d) GiB, user PTs at 0x100000 + 0x1000·t, data frames from 0x800000.
 */
import {
  CR0_PE,
  CR0_PG,
  CR0_WP,
  CR4_PAE,
  EFER_LME,
  EFER_NXE,
  type GuestOp,
  type GuestProgram,
  OP_INVLPG,
  OP_MOV_CR0,
  OP_MOV_CR3,
  OP_MOV_CR4,
  OP_READ,
  OP_READ64,
  OP_SET_CPL,
  OP_WRITE,
  OP_WRITE64,
  OP_WRMSR_EFER,
  RES_OK,
  RES_PF,
} from '@mmusim/x86-hw'
import { createReference, type Vm } from '@mmusim/kvm'

export const L = {
  pml4: 0x1000,
  pdpt: 0x2000,
  pd0: 0x3000,
  userPd: (d: number) => 0x4000 + d * 0x1000,
  pt: (t: number) => 0x100000 + t * 0x1000,
  frame: (f: number) => 0x800000 + f * 0x1000,
  /** User VA of page `j` of the 2 MiB region `k` of user PD `d`. */
  va: (d: number, k: number, j: number) => (1 + d) * 2 ** 30 + k * 2 ** 21 + j * 4096,
} as const

export const P = 1
export const RW = 2
export const US = 4
export const A = 0x20
export const D = 0x40
export const PS = 0x80

/** Where a loader writes: a VM's guest memory, or a bare-metal machine's physical memory. */
export interface GuestPhys {
  write32(gpa: number, value: number): unknown
}

function physOf(target: Vm | GuestPhys): GuestPhys {
  return 'guestMem' in target ? target.guestMem : target
}

/** Loader: write a 64-bit entry at `gpa` from the host (like a VMM preparing the guest). */
export function poke(target: Vm | GuestPhys, gpa: number, lo: number, hi = 0): void {
  const m = physOf(target)
  m.write32(gpa, lo >>> 0)
  m.write32(gpa + 4, hi >>> 0)
}

export function peek(vm: Vm, gpa: number): number {
  return vm.guestMem.read32(gpa)
}

/** The kernel part: PML4[0] → PDPT; PDPT[0] → identity PD of 2 MiB pages (0..32 MiB), A/D set. */
export function loadKernelTables(vm: Vm | GuestPhys): void {
  poke(vm, L.pml4, L.pdpt | P | RW | US | A)
  poke(vm, L.pdpt, L.pd0 | P | RW | A)
  for (let i = 0; i < 16; i++) poke(vm, L.pd0 + i * 8, (i << 21) | P | RW | A | D | PS)
}

/** Link user PD `d` (VA (1+d) GiB) and make its entry `k` point at PT `t`. */
export function linkUserPt(vm: Vm | GuestPhys, d: number, k: number, t: number): void {
  poke(vm, L.pdpt + (1 + d) * 8, L.userPd(d) | P | RW | US | A)
  poke(vm, L.userPd(d) + k * 8, L.pt(t) | P | RW | US | A)
}

/** PTE `j` of PT `t` → frame `f` (user, writable, A|D). */
export function mapUser(vm: Vm | GuestPhys, t: number, j: number, f: number): void {
  poke(vm, L.pt(t) + j * 8, L.frame(f) | P | RW | US | A | D)
}

/** Fill frame `f` with `value` in its first word (loader side). */
export function fillFrame(vm: Vm | GuestPhys, f: number, value: number): void {
  physOf(vm).write32(L.frame(f), value)
}

/** Ops a scripted program yields (each returns the op's status; reads leave the value in `op.valueLo`). */
export class Script {
  readonly op: GuestOp
  constructor(op: GuestOp) {
    this.op = op
  }

  private *put(kind: number, addr: number, lo = 0, hi = 0, noFlush = false): Generator<GuestOp, number, number> {
    const op = this.op
    op.kind = kind
    op.addr = addr
    op.lo = lo
    op.hi = hi
    op.implicit = false
    op.noFlush = noFlush
    return yield op
  }

  /** Enable 4-level paging with CR3 = `cr3` (the PML4 by default; CPL 0). */
  *boot(cr3: number = L.pml4): Generator<GuestOp, void, number> {
    yield* this.put(OP_WRMSR_EFER, 0, EFER_LME | EFER_NXE)
    yield* this.put(OP_MOV_CR4, 0, CR4_PAE)
    yield* this.put(OP_MOV_CR3, 0, cr3)
    yield* this.put(OP_MOV_CR0, 0, CR0_PG | CR0_PE | CR0_WP)
  }

  /** A user-mode 4-byte read; returns the value (or -1 on a fault). */
  *userRead(va: number): Generator<GuestOp, number, number> {
    yield* this.put(OP_SET_CPL, 0, 3)
    const st = yield* this.put(OP_READ, va)
    const v = this.op.valueLo
    yield* this.put(OP_SET_CPL, 0, 0)
    return st === RES_OK ? v : -1
  }

  /** A user-mode 4-byte write; returns the status. */
  *userWrite(va: number, v: number): Generator<GuestOp, number, number> {
    yield* this.put(OP_SET_CPL, 0, 3)
    const st = yield* this.put(OP_WRITE, va, v >>> 0)
    yield* this.put(OP_SET_CPL, 0, 0)
    return st
  }

  /** A kernel 4-byte read at a kernel (identity) address. */
  *read(va: number): Generator<GuestOp, number, number> {
    const st = yield* this.put(OP_READ, va)
    return st === RES_OK ? this.op.valueLo : -1
  }

  *read64(va: number): Generator<GuestOp, number, number> {
    const st = yield* this.put(OP_READ64, va)
    return st === RES_OK ? this.op.valueLo : -1
  }

  /** A kernel 8-byte write (a PTE update through the identity map). */
  *write64(va: number, lo: number, hi = 0): Generator<GuestOp, number, number> {
    return yield* this.put(OP_WRITE64, va, lo >>> 0, hi >>> 0)
  }

  *write32(va: number, v: number): Generator<GuestOp, number, number> {
    return yield* this.put(OP_WRITE, va, v >>> 0)
  }

  /** MOV CR3 (flushing unless `noFlush`). */
  *movCr3(v: number = L.pml4, noFlush = false): Generator<GuestOp, number, number> {
    return yield* this.put(OP_MOV_CR3, 0, v, 0, noFlush)
  }

  *invlpg(va: number): Generator<GuestOp, number, number> {
    return yield* this.put(OP_INVLPG, va)
  }

  /**
   * One logged access at CPL `cpl`: `kind` is OP_READ, OP_WRITE or OP_FETCH. Pushes [status,
   * #PF error code, CR2, value read] (zeros where they do not apply) onto `log`.
   */
  *probe(log: number[], kind: number, va: number, cpl: number, value = 0): Generator<GuestOp, void, number> {
    yield* this.put(OP_SET_CPL, 0, cpl)
    const st = yield* this.put(kind, va, value >>> 0)
    const op = this.op
    log.push(st, st === RES_PF ? op.errorCode : 0, st === RES_PF ? op.cr2 : 0, st === RES_OK && kind === OP_READ ? op.valueLo : 0)
    yield* this.put(OP_SET_CPL, 0, 0)
  }
}

/**
 * The same script on the bare-metal reference of `vm`: `load` prepares its memory as the VM's
 * loader did, then one program boots and runs `bodies` in order (host-side steps a VM run has
 * between them — memslot flags, dirty logging — do not exist on bare metal). Returns the machine.
 */
export function runScriptOnReference(vm: Vm, load: (mem: GuestPhys) => void, bodies: ((s: Script) => Generator<GuestOp, void, number>)[]): ReturnType<typeof createReference> {
  const ref = createReference(vm)
  load(ref.mem)
  const s = new Script(ref.threads[0]!.op)
  ref.spawn(
    0,
    (function* (): GuestProgram {
      yield* s.boot()
      for (const body of bodies) yield* body(s)
    })(),
  )
  ref.run()
  return ref
}

/** Run `body` as vCPU 0's program (after boot, unless this continues an earlier script). */
export function runScript(vm: Vm, body: (s: Script) => Generator<GuestOp, void, number>, boot = true): void {
  const s = new Script(vm.vcpus[0]!.guest.op)
  vm.spawnGuest(
    0,
    (function* (): GuestProgram {
      if (boot) yield* s.boot()
      yield* body(s)
    })(),
  )
  vm.run()
}
