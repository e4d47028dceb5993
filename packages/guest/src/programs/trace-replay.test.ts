import { readFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { Machine } from '@mmusim/x86-hw'
import { describe, expect, it } from 'vitest'
import { GuestError } from '../errors.ts'
import { GuestOs } from '../guest-os.ts'
import { runGuest } from '../run.ts'
import { loadLackeyBatches, streamLackeyReplay, traceReplay, TraceReplayState } from './trace-replay.ts'

const FIXTURE = fileURLToPath(new URL('../__fixtures__/lackey-true.txt', import.meta.url))

/** Independent count from the raw text: distinct pages, and pages first touched by a load/fetch and later stored to. */
function expectedFaults(): { pages: number; readThenWritten: number } {
  const first = new Map<number, boolean>() // page -> first access was a store
  const written = new Set<number>()
  for (const line of readFileSync(FIXTURE, 'utf8').split('\n')) {
    const m = /^(I | [LSM]) ([0-9a-f]+),(\d+)$/.exec(line.trimEnd())
    if (m === null) continue
    const kind = m[1]!.trim()
    const a = parseInt(m[2]!, 16)
    const last = a + parseInt(m[3]!, 10) - 1
    for (const p of new Set([Math.floor(a / 4096), Math.floor(last / 4096)])) {
      if (!first.has(p)) first.set(p, kind === 'S')
      if (kind === 'S' || kind === 'M') written.add(p)
    }
  }
  let readThenWritten = 0
  for (const [p, storeFirst] of first) if (!storeFirst && written.has(p)) readThenWritten++
  return { pages: first.size, readThenWritten }
}

describe('lackey trace replay', () => {
  it('replays the real fixture into a process with an exact count of demand-faulted pages', async () => {
    const batches = await loadLackeyBatches(FIXTURE)
    const { pages, readThenWritten } = expectedFaults()
    expect(pages).toBe(14) // as pinned in __fixtures__/README.md
    // Without the zero page every first touch allocates a page: one fault per distinct page.
    const a = runGuest((c) => traceReplay(c, { batches }), { zeroPage: false })
    expect([a.pageFaults, a.stats.anonFaults, a.mismatches, a.sigsegv, a.frames.allocated]).toEqual([14, 14, 0, 0, 0])
    // With it (Linux's default): loads/fetches first map the zero page, a later store copies it.
    const b = runGuest((c) => traceReplay(c, { batches }))
    expect([b.stats.anonFaults + b.stats.zeroPageFaults, b.stats.cowCopies, b.mismatches]).toEqual([14, readThenWritten, 0])
    expect(b.pageFaults).toBe(14 + readThenWritten)
    // 2000 records: one access each, plus a second for M (load + store); none crosses a page here.
    expect(a.accesses).toBe(2000 + 20)
  })

  it('streams a trace chunk by chunk with the same outcome', async () => {
    const m = new Machine({ memBytes: 32 * 2 ** 20, vcpus: 2 })
    const os = GuestOs.forMachine(m, { zeroPage: false })
    const st = await streamLackeyReplay(m, os, FIXTURE, { batchSize: 100, chunkBatches: 3 })
    expect([st.records, os.stats.anonFaults, os.totals().mismatches, os.frameStats().allocated]).toEqual([2000, 14, 0, 0])
  })

  it('a corrupt trace is a GuestError naming the line', async () => {
    const lines = readFileSync(FIXTURE, 'utf8').split('\n')
    lines[99] = ' L 0401zz70,8'
    const bad = [lines.join('\n')]
    await expect(loadLackeyBatches(bad)).rejects.toThrow(GuestError)
    await expect(loadLackeyBatches(bad)).rejects.toMatchObject({ code: 'TRACE_CORRUPT', line: 100 })
    const m = new Machine({ memBytes: 32 * 2 ** 20 })
    const os = GuestOs.forMachine(m)
    await expect(streamLackeyReplay(m, os, bad, { batchSize: 10, chunkBatches: 2 })).rejects.toMatchObject({ code: 'TRACE_CORRUPT', line: 100 })
  })

  it('state carries across chunks (reads see earlier chunks\' writes)', async () => {
    const batches = await loadLackeyBatches(FIXTURE, { batchSize: 500 })
    const st = new TraceReplayState()
    const r = runGuest(function* (c) {
      for (const b of batches) yield* traceReplay(c, { batches: [b], state: st, exit: false })
      yield* traceReplay(c, { batches: [], state: st, exit: true })
    })
    expect([st.records, r.mismatches, r.frames.allocated]).toEqual([2000, 0, 0])
  })
})
