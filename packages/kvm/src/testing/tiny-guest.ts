/**
 * A tiny guest kernel for the core's tests (the full guest OS is @mmusim/guest): it boots with
 * paging off, builds 4-level tables in low memory with guest writes, enables paging, then runs a
 * user-mode loop over `pages` pages at 0x40_0000 that are demand-mapped by its #PF handler
 * (which edits the PTE through its identity-mapped kernel view), writing and reading back data.
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
  OP_PAUSE,
  OP_READ,
  OP_SET_CPL,
  OP_WRITE,
  OP_WRITE64,
  OP_WRMSR_EFER,
  PTE_P,
  PTE_PS,
  PTE_RW,
  PTE_US,
  RES_OK,
  RES_PF,
} from '@mmusim/x86-hw'

/** Layout: PML4 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000; kernel identity 2 MiB page at 0; user pages at 0x400000. */
export const TINY = { pml4: 0x1000, pdpt: 0x2000, pd: 0x3000, pt: 0x4000, userVa: 0x400000, dataBase: 0x200000 } as const

/** What a tiny-guest run observed (the same on every correct MMU). */
export interface TinyResult {
  faults: number[]
  values: number[]
  mismatches: number
}

function* put(op: GuestOp, kind: number, addr: number, lo: number, hi = 0): Generator<GuestOp, number, number> {
  op.kind = kind
  op.addr = addr
  op.lo = lo
  op.hi = hi
  op.implicit = false
  op.noFlush = false
  return yield op
}

/** The tiny guest program for vCPU `cpu` (each vCPU uses its own slice of user pages). */
export function tinyGuest(
  op: GuestOp,
  result: TinyResult,
  options: { pages: number; rounds: number; cpu?: number; boot?: boolean; ready?: { booted: boolean } },
): GuestProgram {
  const cpu = options.cpu ?? 0
  const ready = options.ready ?? { booted: false }
  return (function* (): GuestProgram {
    if (options.boot ?? true) {
      // Paging off: linear = physical. Build the tables with ordinary guest writes.
      yield* put(op, OP_WRITE64, TINY.pml4, TINY.pdpt | PTE_P | PTE_RW | PTE_US)
      yield* put(op, OP_WRITE64, TINY.pdpt, TINY.pd | PTE_P | PTE_RW | PTE_US)
      yield* put(op, OP_WRITE64, TINY.pd, PTE_P | PTE_RW | PTE_PS) // 0..2 MiB, supervisor identity map
      yield* put(op, OP_WRITE64, TINY.pd + 2 * 8, TINY.pt | PTE_P | PTE_RW | PTE_US) // 4..6 MiB: user PT
      ready.booted = true
    } else {
      // Secondary vCPUs wait (PAUSE loop) for the boot vCPU's tables.
      while (!ready.booted) yield* put(op, OP_PAUSE, 0, 0)
    }
    yield* put(op, OP_WRMSR_EFER, 0, EFER_LME | EFER_NXE)
    yield* put(op, OP_MOV_CR4, 0, CR4_PAE)
    yield* put(op, OP_MOV_CR3, 0, TINY.pml4)
    yield* put(op, OP_MOV_CR0, 0, CR0_PG | CR0_PE | CR0_WP)
    const first = cpu * options.pages
    for (let round = 0; round < options.rounds; round++) {
      for (let i = first; i < first + options.pages; i++) {
        const va = TINY.userVa + i * 4096 + ((round * 4) % 4096)
        const value = (i * 1000 + round) >>> 0
        yield* put(op, OP_SET_CPL, 0, 3)
        let st = yield* put(op, OP_WRITE, va, value)
        while (st === RES_PF) {
          // The guest's #PF handler (CPL 0): map the page, user RW, through the kernel's view of the PT.
          result.faults.push(op.cr2, op.errorCode)
          yield* put(op, OP_SET_CPL, 0, 0)
          const pageIndex = Math.floor((op.cr2 - TINY.userVa) / 4096)
          yield* put(op, OP_WRITE64, TINY.pt + pageIndex * 8, (TINY.dataBase + pageIndex * 4096) | PTE_P | PTE_RW | PTE_US)
          yield* put(op, OP_INVLPG, op.cr2, 0)
          yield* put(op, OP_SET_CPL, 0, 3)
          st = yield* put(op, OP_WRITE, va, value)
        }
        st = yield* put(op, OP_READ, va, 0)
        if (st !== RES_OK || op.valueLo !== value) result.mismatches++
        result.values.push(op.valueLo)
      }
    }
    yield* put(op, OP_SET_CPL, 0, 0)
  })()
}
