import { ACC_READ, CpuState, Machine, PagingContext, walk, WALK_OK, WalkResult } from '@mmusim/x86-hw'
import { describe, expect, it } from 'vitest'
import type { Cpu, Routine } from './cpu.ts'
import { GuestOs, type GuestOsOptions, textWord } from './guest-os.ts'
import { DIRECT_MAP_BASE_4L, DIRECT_MAP_BASE_5L, KERNEL_TEXT_BASE, PAGE_2M, PAGE_4K } from './layout.ts'
import { clearYoung, collapseHugePage, exec, exitProcess, fork, madviseDontneed, mmap, munmap, splitHugePage, swapOut, testYoung } from './mm-ops.ts'
import type { Mm } from './mm.ts'
import { collectResult, type RunResult } from './run.ts'
import { switchMm } from './tlb-flush.ts'

/** Build a machine + OS, run `program` on every vCPU, return the result. */
function run(vcpus: number, program: (cpu: Cpu, m: Machine) => Routine, opts: GuestOsOptions = {}, memBytes = 32 * 2 ** 20): RunResult {
  const m = new Machine({ memBytes, vcpus })
  const os = GuestOs.forMachine(m, opts)
  os.spawnAll(m, (cpu) => program(cpu, m))
  m.run()
  return collectResult(os, m)
}

/** Walk `la` in `mm` (or the kernel tables) with the x86-hw walker, at CPL `cpl`. */
function walkIn(m: Machine, cpuId: number, cr3: number, la: number, cpl: number): WalkResult {
  const v = m.vcpus[cpuId]!
  const s = new CpuState()
  Object.assign(s, { cr0: v.state.cr0, cr4: v.state.cr4, efer: v.state.efer, cr3, cpl })
  const ctx = new PagingContext(v.features)
  ctx.update(s)
  const res = new WalkResult()
  expect(walk(m.mem, ctx, s, la, ACC_READ, false, null, res)).toBe(WALK_OK)
  return res
}

function val(page: number, tag: number): number {
  return (0x1000000 * tag + page * 7 + 1) >>> 0
}

describe('boot and the guest page tables (checked with the x86-hw walker)', () => {
  for (const levels of [4, 5] as const) {
    for (const dm of ['1G', '2M'] as const) {
      it(`${String(levels)}-level, direct map with ${dm} pages, 4K user pages and a 2M THP`, () => {
        const checks: string[] = []
        run(
          1,
          function* (cpu, m) {
            const os = cpu.os
            expect(m.vcpus[0]!.ctx.levels).toBe(levels)
            // Direct map: every physical address, supervisor-only, NX, global, of the chosen size.
            expect(os.dmBase).toBe(levels === 4 ? DIRECT_MAP_BASE_4L : DIRECT_MAP_BASE_5L)
            for (const pa of [0, PAGE_4K * 3, 5 * PAGE_2M + 123 * 4, os.memBytes - 4]) {
              const r = walkIn(m, 0, os.kernelPgd, os.directMap(pa), 0)
              expect([r.gpa, r.level, r.rw, r.us, r.xd, r.global]).toEqual([pa, dm === '1G' ? 3 : 2, 1, 0, 1, 1])
            }
            // Kernel text: read-only 4K global pages holding what boot wrote.
            const t = walkIn(m, 0, os.kernelPgd, KERNEL_TEXT_BASE + PAGE_4K + 8, 0)
            expect([t.gpa, t.level, t.rw, t.xd, t.global]).toEqual([os.textPa[1]! + 8, 1, 0, 0, 1])
            expect(m.mem.read32(t.gpa)).toBe(textWord(1, 2))
            // A process: 4K pages demand-faulted, and a THP.
            const task = yield* os.createProcess(cpu)
            yield* switchMm(cpu, task.mm)
            const a = yield* mmap(cpu, task.mm, { length: 8 * PAGE_4K })
            const h = yield* mmap(cpu, task.mm, { length: PAGE_2M, thp: true })
            expect(h % PAGE_2M).toBe(0)
            for (let p = 0; p < 8; p++) yield* cpu.write32(a + p * PAGE_4K, val(p, 1))
            yield* cpu.write32(h + 12345 * 4, 0xabcdef)
            const frames = new Set<number>()
            for (let p = 0; p < 8; p++) {
              const r = walkIn(m, 0, task.mm.pgd, a + p * PAGE_4K + 4, 3)
              expect([r.level, r.rw, r.us, r.xd]).toEqual([1, 1, 1, 1])
              expect(m.mem.read32(r.gpa - 4)).toBe(val(p, 1))
              expect(os.frames.inUse[Math.floor(r.gpa / PAGE_4K)]).toBe(1)
              frames.add(Math.floor(r.gpa / PAGE_4K))
            }
            expect(frames.size).toBe(8)
            const r = walkIn(m, 0, task.mm.pgd, h + 12345 * 4, 3)
            expect([r.level, r.rw, r.us, (r.gpa - 12345 * 4) % PAGE_2M]).toEqual([2, 1, 1, 0])
            expect(m.mem.read32(r.gpa)).toBe(0xabcdef)
            // The kernel half is shared: the process sees the direct map too.
            expect(walkIn(m, 0, task.mm.pgd, os.directMap(PAGE_4K * 7), 0).gpa).toBe(PAGE_4K * 7)
            checks.push('done')
            yield* exitProcess(cpu, task)
          },
          { levels, directMapPageSize: dm },
        )
        expect(checks).toEqual(['done'])
      })
    }
  }

  it('brings up 4 vCPUs in long mode with PCIDE, PGE, SMEP, SMAP and the kernel CR3', () => {
    const r = run(4, function* () {
      // nothing: boot only
    })
    for (const v of r.machine.vcpus) {
      expect(v.ctx.levels).toBe(4)
      expect([v.ctx.pcide, v.ctx.pge, v.ctx.smep, v.ctx.smap, v.ctx.wp, v.ctx.nxe]).toEqual([true, true, true, true, true, true])
      expect(v.ctx.root).toBe(r.os.kernelPgd)
    }
    expect(r.frames.allocated).toBe(0)
  })

  it('builds its page tables with guest ops only (PhysMem written only by vCPU accesses)', () => {
    // Every frame the guest allocated was zeroed through the direct map: clear_page batches.
    const r = run(1, function* (cpu) {
      const t = yield* cpu.os.createProcess(cpu)
      yield* switchMm(cpu, t.mm)
      const a = yield* mmap(cpu, t.mm, { length: PAGE_4K })
      yield* cpu.write32(a, 1)
      yield* exitProcess(cpu, t)
    })
    // PGD + PUD + PMD + PT + 1 data page, each zeroed with one 1024-write batch.
    expect(r.stats.ptPagesAllocated).toBe(4)
    expect(r.machine.vcpus[0]!.counters[27]).toBeGreaterThanOrEqual(5 * 1024)
  })
})

describe('fork and copy-on-write', () => {
  it('child and parent writes are isolated; CoW copy and reuse counts are exact', () => {
    const r = run(1, function* (cpu) {
      const os = cpu.os
      const parent = yield* os.createProcess(cpu)
      yield* switchMm(cpu, parent.mm)
      const a = yield* mmap(cpu, parent.mm, { length: 8 * PAGE_4K })
      for (let p = 0; p < 8; p++) yield* cpu.write32(a + p * PAGE_4K, val(p, 1))
      const child = yield* fork(cpu, parent)
      yield* switchMm(cpu, child.mm)
      for (let p = 0; p < 3; p++) yield* cpu.write32(a + p * PAGE_4K, val(p, 2)) // 3 copies
      for (let p = 0; p < 8; p++) yield* cpu.check32(a + p * PAGE_4K, p < 3 ? val(p, 2) : val(p, 1))
      yield* switchMm(cpu, parent.mm)
      for (let p = 0; p < 8; p++) yield* cpu.check32(a + p * PAGE_4K, val(p, 1))
      yield* cpu.write32(a + 5 * PAGE_4K, val(5, 3)) // shared with the child: copy
      yield* switchMm(cpu, child.mm)
      yield* cpu.check32(a + 5 * PAGE_4K, val(5, 1))
      yield* exitProcess(cpu, child)
      yield* switchMm(cpu, parent.mm)
      yield* cpu.write32(a + 6 * PAGE_4K, val(6, 3)) // exclusive again: reuse
      yield* cpu.write32(a, val(0, 3)) // parent's page 0 was never copied by the parent: exclusive, reuse
      for (let p = 0; p < 8; p++) yield* cpu.check32(a + p * PAGE_4K, p === 5 || p === 6 || p === 0 ? val(p, 3) : val(p, 1))
      yield* exitProcess(cpu, parent)
    })
    expect(r.mismatches).toBe(0)
    expect([r.stats.cowCopies, r.stats.cowReuses, r.stats.anonFaults, r.stats.forks]).toEqual([4, 2, 8, 1])
    expect(r.frames.allocated).toBe(0)
  })

  it('exec replaces the address space and frees the old one', () => {
    const r = run(1, function* (cpu) {
      const t = yield* cpu.os.createProcess(cpu)
      yield* switchMm(cpu, t.mm)
      const a = yield* mmap(cpu, t.mm, { length: 4 * PAGE_4K, populate: true })
      yield* cpu.check32(a, 0)
      const old: Mm = t.mm
      yield* exec(cpu, t)
      expect(old.dead).toBe(true)
      expect(cpu.loadedMm).toBe(t.mm)
      expect(yield* cpu.read32(a)).toBe(-1) // nothing mapped in the new image
      yield* exitProcess(cpu, t)
    })
    expect([r.sigsegv, r.stats.execs, r.frames.allocated]).toEqual([1, 1, 0])
  })
})

describe('munmap and TLB shootdown', () => {
  /**
   * Every vCPU runs a thread of one process and caches the translation of page X (reads it);
   * vCPU 0 munmaps X; then every vCPU reads X again. Returns what each vCPU read afterwards (-1 = SIGSEGV).
   */
  function staleTest(vcpus: number, skip: boolean): { after: number[]; r: RunResult } {
    const after = new Array<number>(vcpus).fill(-2)
    const shared: { mm: Mm | null; x: number } = { mm: null, x: 0 }
    const r = run(
      vcpus,
      function* (cpu) {
        const os = cpu.os
        if (cpu.id === 0) {
          const t = yield* os.createProcess(cpu)
          yield* switchMm(cpu, t.mm)
          shared.x = yield* mmap(cpu, t.mm, { length: 2 * PAGE_4K })
          yield* cpu.write32(shared.x, 0x5eed)
          shared.mm = t.mm
        }
        yield* os.barrier(cpu, 'setup')
        yield* switchMm(cpu, shared.mm)
        yield* cpu.check32(shared.x, 0x5eed) // now in this vCPU's TLB
        yield* os.barrier(cpu, 'cached')
        if (cpu.id === 0) yield* munmap(cpu, shared.mm!, shared.x, PAGE_4K)
        yield* os.barrier(cpu, 'unmapped')
        after[cpu.id] = yield* cpu.read32(shared.x)
        yield* switchMm(cpu, null)
        yield* os.barrier(cpu, 'done')
        if (cpu.id === 0) yield* exitProcess(cpu, { pid: 0, mm: shared.mm! })
      },
      { testSkipShootdown: skip },
    )
    return { after, r }
  }

  for (const n of [2, 4]) {
    it(`${String(n)} vCPUs: after munmap returns, every vCPU faults (SIGSEGV) on the page`, () => {
      const { after, r } = staleTest(n, false)
      expect(after).toEqual(new Array(n).fill(-1))
      expect(r.sigsegv).toBe(n)
      expect(r.stats.shootdowns).toBe(1)
      expect(r.stats.ipisSent).toBe(n - 1)
      expect(r.perCpu.slice(1).map((c) => c.ipisHandled)).toEqual(new Array(n - 1).fill(1))
      expect(r.frames.allocated).toBe(0)
    })
  }

  it('the test can fail: without the shootdown, other vCPUs keep using the stale translation', () => {
    const { after, r } = staleTest(4, true)
    expect(after[0]).toBe(-1) // the local INVLPG still happened
    expect(after.slice(1)).toEqual([0x5eed, 0x5eed, 0x5eed]) // read through a freed page's stale TLB entry
    expect(r.sigsegv).toBe(1)
  })
})

describe('reclaim, madvise and THP', () => {
  it('aging: clear young with flush re-arms A; swap out and back in keeps the data', () => {
    const r = run(1, function* (cpu) {
      const t = yield* cpu.os.createProcess(cpu)
      yield* switchMm(cpu, t.mm)
      const a = yield* mmap(cpu, t.mm, { length: 2 * PAGE_4K })
      yield* cpu.write32(a + 40, 0x1234)
      expect(yield* testYoung(cpu, t.mm, a)).toBe(true)
      expect(yield* clearYoung(cpu, t.mm, a, true)).toBe(true)
      expect(yield* testYoung(cpu, t.mm, a)).toBe(false)
      yield* cpu.check32(a + 40, 0x1234)
      expect(yield* testYoung(cpu, t.mm, a)).toBe(true) // flushed, so the walk set A again
      expect(yield* clearYoung(cpu, t.mm, a, false)).toBe(true) // Linux x86's variant: no flush
      expect(yield* swapOut(cpu, t.mm, a)).toBe(true)
      yield* cpu.check32(a + 40, 0x1234) // swap-in fault
      yield* cpu.write32(a + 44, 7)
      yield* madviseDontneed(cpu, t.mm, a, PAGE_4K)
      yield* cpu.check32(a + 40, 0) // fresh zero page after MADV_DONTNEED
      yield* exitProcess(cpu, t)
    })
    expect(r.mismatches).toBe(0)
    expect([r.stats.swapOuts, r.stats.swapIns, r.stats.zeroPageFaults]).toEqual([1, 1, 1])
    expect(r.os.swap.size).toBe(0)
    expect(r.frames.allocated).toBe(0)
  })

  it('collapse 512 4K pages into a THP and split it again, keeping the data', () => {
    const levels: number[] = []
    const r = run(1, function* (cpu, m) {
      const t = yield* cpu.os.createProcess(cpu)
      yield* switchMm(cpu, t.mm)
      const a = yield* mmap(cpu, t.mm, { length: PAGE_2M, addr: 2 ** 31 })
      for (let p = 0; p < 512; p++) yield* cpu.write32(a + p * PAGE_4K, val(p, 4))
      levels.push(walkIn(m, 0, t.mm.pgd, a, 3).level)
      expect(yield* collapseHugePage(cpu, t.mm, a)).toBe(true)
      levels.push(walkIn(m, 0, t.mm.pgd, a + 77 * PAGE_4K, 3).level)
      for (let p = 0; p < 512; p++) yield* cpu.check32(a + p * PAGE_4K, val(p, 4))
      expect(yield* splitHugePage(cpu, t.mm, a)).toBe(true)
      levels.push(walkIn(m, 0, t.mm.pgd, a + 77 * PAGE_4K, 3).level)
      for (let p = 0; p < 512; p += 7) yield* cpu.check32(a + p * PAGE_4K, val(p, 4))
      yield* munmap(cpu, t.mm, a + PAGE_4K, PAGE_4K)
      expect(yield* cpu.read32(a + PAGE_4K)).toBe(-1)
      yield* exitProcess(cpu, t)
    })
    expect(levels).toEqual([1, 2, 1])
    expect([r.mismatches, r.sigsegv, r.stats.thpCollapses, r.stats.thpSplits]).toEqual([0, 1, 1, 1])
    expect(r.frames.allocated).toBe(0)
  })

  it('munmap of part of a THP splits it; the rest stays mapped', () => {
    const r = run(1, function* (cpu) {
      const t = yield* cpu.os.createProcess(cpu)
      yield* switchMm(cpu, t.mm)
      const a = yield* mmap(cpu, t.mm, { length: PAGE_2M, thp: true })
      yield* cpu.write32(a + 3 * PAGE_4K, 33)
      yield* munmap(cpu, t.mm, a, PAGE_4K)
      yield* cpu.check32(a + 3 * PAGE_4K, 33)
      expect(yield* cpu.read32(a)).toBe(-1)
      yield* exitProcess(cpu, t)
    })
    expect([r.mismatches, r.sigsegv, r.stats.thpFaults, r.stats.thpSplits, r.frames.allocated]).toEqual([0, 1, 1, 1, 0])
  })
})
