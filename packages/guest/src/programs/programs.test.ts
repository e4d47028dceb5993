import type { AccessObserver } from '@mmusim/x86-hw'
import { describe, expect, it } from 'vitest'
import type { Cpu, Routine } from '../cpu.ts'
import { runGuest, type RunGuestOptions, type RunResult } from '../run.ts'
import { contextSwitchRing } from './ctx-switch-ring.ts'
import { cr0WpToggle } from './cr0wp-toggle.ts'
import { forkStorm } from './fork-storm.ts'
import { gups } from './gups.ts'
import { memstress } from './memstress.ts'
import { mprotectStorm } from './mprotect-storm.ts'

const VCPUS = [1, 2, 4]

function clean(r: RunResult): void {
  expect(r.mismatchLog).toEqual([])
  expect(r.mismatches).toBe(0)
  expect(r.frames.allocated).toBe(0) // everything freed at exit
}

describe('memstress', () => {
  const pages = 64
  for (const n of VCPUS) {
    it(`${String(n)} vCPU(s), sequential, 100% writes: pages × iterations accesses, one demand fault per page`, () => {
      const r = runGuest((c) => memstress(c, { bytesPerVcpu: pages * 4096, iterations: 3 }), { vcpus: n })
      clean(r)
      expect(r.accesses).toBe(pages * 3 * n)
      expect(r.perCpu.map((c) => c.accesses)).toEqual(new Array(n).fill(pages * 3))
      expect([r.pageFaults, r.stats.anonFaults, r.sigsegv]).toEqual([pages * n, pages * n, 0])
    })
    it(`${String(n)} vCPU(s), random access, 50% writes: data checked, exact access count`, () => {
      const r = runGuest((c) => memstress(c, { bytesPerVcpu: pages * 4096, iterations: 3, writePercent: 50, randomAccess: true }), { vcpus: n })
      clean(r)
      expect(r.accesses).toBe(pages * 3 * n)
      // Every fault is either a first touch (anon or zero page) or a write after a zero-page read.
      expect(r.stats.anonFaults + r.stats.zeroPageFaults + r.stats.cowCopies).toBe(r.pageFaults)
    })
    it(`${String(n)} vCPU(s), overlapped regions (-o), THP backing, and pre-populated`, () => {
      const o = runGuest((c) => memstress(c, { bytesPerVcpu: pages * 4096, iterations: 2, overlap: true, writePercent: 70, randomAccess: true }), { vcpus: n })
      clean(o)
      expect(o.accesses).toBe(pages * 2 * n)
      const t = runGuest((c) => memstress(c, { bytesPerVcpu: 2 ** 21, iterations: 1, thp: true, guestPageSize: 2 ** 14 }), { vcpus: n })
      clean(t)
      expect([t.accesses, t.pageFaults, t.stats.thpFaults]).toEqual([128 * n, n, n])
      const p = runGuest((c) => memstress(c, { bytesPerVcpu: pages * 4096, iterations: 2, populate: true }), { vcpus: n })
      clean(p)
      expect([p.pageFaults, p.stats.anonFaults, p.accesses]).toEqual([0, pages * n, pages * 2 * n])
    })
  }
})

describe('workloads on 1, 2 and 4 vCPUs', () => {
  for (const n of VCPUS) {
    it(`fork storm, ${String(n)} vCPU(s): exact CoW copies and reuses`, () => {
      const r = runGuest((c) => forkStorm(c, { pages: 12, rounds: 3, children: 2, childWrites: 5, parentWrites: 4 }), { vcpus: n })
      clean(r)
      expect([r.stats.cowCopies, r.stats.cowReuses, r.stats.anonFaults, r.stats.forks, r.stats.exits]).toEqual([3 * 2 * 5 * n, 3 * 4 * n, 12 * n, 6 * n, 7 * n])
    })
    it(`context-switch ring, ${String(n)} vCPU(s): PCID switches without flushes while the ring fits the ASIDs`, () => {
      const r = runGuest((c) => contextSwitchRing(c, { processes: 4, laps: 8 }), { vcpus: n })
      clean(r)
      expect([r.stats.contextSwitches, r.stats.cr3Flushes, r.stats.cr3NoFlush]).toEqual([37 * n, 4 * n, 32 * n])
      const big = runGuest((c) => contextSwitchRing(c, { processes: 8, laps: 2 }), { vcpus: n })
      clean(big)
      expect(big.stats.cr3NoFlush).toBe(0) // 8 processes > 6 ASID slots: every switch recycles a PCID
      const nopcid = runGuest((c) => contextSwitchRing(c, { processes: 4, laps: 2 }), { vcpus: n, pcid: false })
      clean(nopcid)
      expect(nopcid.stats.cr3NoFlush).toBe(0)
    })
    it(`mprotect/munmap storm, ${String(n)} vCPU(s): exact SIGSEGVs and shootdowns to the other threads`, () => {
      const r = runGuest((c) => mprotectStorm(c, { pages: 8, iterations: 3 }), { vcpus: n })
      clean(r)
      expect([r.sigsegv, r.stats.anonFaults]).toEqual([2 * 3 * n, 8 * 3 * n])
      if (n === 1) expect(r.stats.shootdowns).toBe(0)
      else expect(r.stats.shootdowns).toBeGreaterThan(0)
    })
    it(`GUPS, ${String(n)} vCPU(s): 2 × updates accesses, data checked`, () => {
      const r = runGuest((c) => gups(c, { bytesPerVcpu: 2 ** 20, updates: 2048 }), { vcpus: n })
      clean(r)
      expect(r.accesses).toBe(2 * 2048 * n)
    })
    it(`CR0.WP toggling, ${String(n)} vCPU(s): patches land, WP=1 writes fault`, () => {
      const r = runGuest((c) => cr0WpToggle(c, { iterations: 40, pgeEvery: 8 }), { vcpus: n })
      clean(r)
      expect([r.stats.cr0WpToggles, r.stats.pgeToggles]).toEqual([40 * n, 5 * n])
      expect(r.machine.vcpus.map((v) => v.state.cr0 & (1 << 16))).toEqual(new Array(n).fill(1 << 16))
    })
  }
  it('GUPS over THP, and 5-level paging with a 2M direct map', () => {
    const r = runGuest((c) => gups(c, { bytesPerVcpu: 2 ** 21, updates: 1024, thp: true }), { vcpus: 2, levels: 5, directMapPageSize: '2M' })
    clean(r)
    expect(r.stats.thpFaults).toBe(2)
  })
})

/** Record the op-level access sequence (observer) and every batch element (onBatch) of a run. */
function record(program: (cpu: Cpu) => Routine, opts: RunGuestOptions): string[] {
  const log: string[] = []
  const observer: AccessObserver = (cpu, la, kind, status, gpa, ec) => log.push(`${String(cpu)} ${String(la)} ${String(kind)} ${String(status)} ${String(gpa)} ${String(ec)}`)
  runGuest(program, {
    ...opts,
    observer,
    onBatch: (cpu, b, s, e) => {
      for (let i = s; i < e; i++) log.push(`${String(cpu)} B ${String(b.addrs[i])} ${String(b.kinds[i])} ${String(b.values[i])}`)
    },
  })
  return log
}

describe('determinism', () => {
  const prog = (seed: number) => (c: Cpu) => memstress(c, { bytesPerVcpu: 32 * 4096, iterations: 2, writePercent: 50, randomAccess: true, seed })
  it('the same seed gives the same access sequence; a different seed a different one', () => {
    const a = record(prog(1), { vcpus: 2 })
    const b = record(prog(1), { vcpus: 2 })
    const c = record(prog(2), { vcpus: 2 })
    expect(a.length).toBeGreaterThan(1000)
    expect(b).toEqual(a)
    expect(c).not.toEqual(a)
  })
  it('fork storm with the same seed repeats exactly (observer sequence)', () => {
    const p = (c: Cpu): Routine => forkStorm(c, { pages: 6, rounds: 2 })
    expect(record(p, { vcpus: 2 })).toEqual(record(p, { vcpus: 2 }))
  })
})
