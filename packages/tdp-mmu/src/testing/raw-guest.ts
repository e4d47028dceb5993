/**
 * A raw guest program for exact-count scenarios and the benchmark: the vCPU stays in its reset
 * state (paging off, linear = guest-physical), so every access is translated by the TDP tables
 * alone and the guest's own page tables do not add faults. One `OP_BATCH` of 4-byte accesses.
 */
import { type AccessBatch, type GuestOp, type GuestProgram, OP_BATCH, RES_OK } from '@mmusim/x86-hw'

/** Access kinds of a batch element. */
export const READ = 0
export const WRITE = 1
export const FETCH = 2

/** A batch touching `pages` 4K pages from `gpa` once each (`kind`), writing `value + i`. */
export function pageBatch(gpa: number, pages: number, kind: number, value = 0): AccessBatch {
  const addrs = new Float64Array(pages)
  const kinds = new Uint8Array(pages).fill(kind)
  const values = new Uint32Array(pages)
  for (let i = 0; i < pages; i++) {
    addrs[i] = gpa + i * 4096
    values[i] = (value + i) >>> 0
  }
  return { addrs, kinds, values }
}

/** Run `batches` in order on `op`'s vCPU; `result.ok` stays true if every batch completed. */
export function rawGuest(op: GuestOp, batches: readonly AccessBatch[], result: { ok: boolean } = { ok: true }): GuestProgram {
  return (function* (): GuestProgram {
    for (const b of batches) {
      op.kind = OP_BATCH
      op.batch = b
      op.batchStart = 0
      op.batchEnd = b.addrs.length
      op.implicit = false
      const st = yield op
      if (st !== RES_OK) result.ok = false
    }
  })()
}
