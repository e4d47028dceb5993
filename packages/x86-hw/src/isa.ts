/**
 * The instruction interface between a guest program and a processor: a guest program is a
 * generator that yields one reusable {@link GuestOp} per instruction (or per batch of data
 * accesses) and receives a status back. The same program runs unchanged on the bare machine
 * (the reference) and on a vCPU run by the hypervisor, which handles VM exits transparently:
 * the guest only ever sees OK, #PF or #GP, as on real hardware.
 */

export const OP_READ = 0
export const OP_WRITE = 1
export const OP_FETCH = 2
/** 8-byte read (e.g. a PTE): result in `valueLo`/`valueHi`. */
export const OP_READ64 = 3
/** 8-byte write of `lo`/`hi` (e.g. a PTE). */
export const OP_WRITE64 = 4
/** 8-byte compare-and-exchange (LOCK CMPXCHG8B): `lo`/`hi` new value, `cmpLo`/`cmpHi` expected; `valueLo`/`valueHi` get the old value. */
export const OP_CMPXCHG64 = 5
/** A batch of 4-byte data accesses described by typed arrays, from `batchStart` to `batchEnd`. */
export const OP_BATCH = 6
export const OP_MOV_CR0 = 7
/** MOV to CR3 with `lo` = new value (a number), `noFlush` = the bit-63 hint. */
export const OP_MOV_CR3 = 8
export const OP_MOV_CR4 = 9
export const OP_WRMSR_EFER = 10
export const OP_INVLPG = 11
/** INVPCID with `invpcidType` 0..3, `pcid` and `addr`. */
export const OP_INVPCID = 12
export const OP_WRPKRU = 13
export const OP_STAC = 14
export const OP_CLAC = 15
/** Privilege change (SYSCALL/SYSRET/IRET): `lo` = new CPL. */
export const OP_SET_CPL = 16
// ---- machine-level operations (handled by the runner, not the processor) ----
/** Spin-wait hint: the runner lets other vCPUs run. */
export const OP_PAUSE = 17
/** Send an IPI with `vector` to the vCPUs in `targets`. */
export const OP_SEND_IPI = 18
/** Pure computation for `lo` nanoseconds of simulated time. */
export const OP_WORK = 19
export const OP_HALT = 20
export const OP_COUNT = 21

/** Results a guest program receives. */
export const RES_OK = 0
/** #PF: `errorCode` and `cr2` are set; for a batch, `index` is the faulting element. */
export const RES_PF = 1
/** #GP(0). */
export const RES_GP = 2

/** The batch element kinds are the access kinds: 0 read, 1 write, 2 fetch. */
export interface AccessBatch {
  /** Linear addresses (4-byte aligned). */
  addrs: Float64Array
  /** 0 read, 1 write, 2 fetch. */
  kinds: Uint8Array
  /** Values written (writes) or read back (reads). */
  values: Uint32Array
}

/**
 * One instruction, reused: a guest program fills the fields of its vCPU's op and yields it.
 * Allocation-free by design (the hot path is a batch of data accesses).
 */
export class GuestOp {
  kind = OP_READ
  addr = 0
  lo = 0
  hi = 0
  cmpLo = 0
  cmpHi = 0
  /** An implicit supervisor access (e.g. a descriptor-table read): SMAP always applies. */
  implicit = false
  noFlush = false
  invpcidType = 0
  pcid = 0
  vector = 0
  targets: readonly number[] = []
  batch: AccessBatch | null = null
  batchStart = 0
  batchEnd = 0
  // ---- results ----
  status = RES_OK
  errorCode = 0
  cr2 = 0
  valueLo = 0
  valueHi = 0
  /** Batch element where execution stopped (== batchEnd when complete). */
  index = 0
  /** Physical address of the last completed data access (for tracing). */
  pa = 0
}

/** A guest program (or interrupt handler): yields ops, receives RES_* statuses. */
export type GuestProgram = Generator<GuestOp, void, number>

/** An interrupt handler factory: the guest OS's IDT entry for a vector. */
export type InterruptHandler = (cpu: number, vector: number) => GuestProgram
