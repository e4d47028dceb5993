import { cr0WpToggle, madviseDontneed, mmap, PAGE_2M, PROT_EXEC, PROT_READ, PROT_WRITE, switchMm, type Task } from '@mmusim/guest'
import { defineWorkload, fmtTs, memFor, type ParamDef, type Params, type WorkloadContext } from '../workload.ts'
import {
  clearDirtyLogAll,
  enableManualProtect,
  getDirtyLogAll,
  markIdle,
  memstressPass,
  memstressProtect,
  memstressRegion,
  type MemstressRegion,
  passPhase,
  setupPhase,
  teardownPhase,
  toggleDirtyLogging,
} from './memstress-driver.ts'

const M = 2 ** 20
const G = 2 ** 30

const num = (p: Params, k: string): number => p[k] as number
const bool = (p: Params, k: string): boolean => p[k] as boolean

// ---------------------------------------------------------------- common parameters

const vcpusParam = (def = 1): ParamDef => ({ name: 'vcpus', flag: 'v', type: 'int', default: def, min: 1, max: 64, description: 'number of vCPUs' })
const bytesParam = (def: number): ParamDef => ({ name: 'bytesPerVcpu', flag: 'b', type: 'size', default: def, selftestDefault: G, min: 4096, description: 'bytes of memory per vCPU' })
const overlapParam: ParamDef = { name: 'overlap', flag: 'o', type: 'bool', default: false, description: 'all vCPUs share one region instead of one region each' }
const backingParam: ParamDef = {
  name: 'backing',
  flag: 's',
  type: 'enum',
  default: 'anonymous',
  choices: ['anonymous', 'anonymous_thp', 'anonymous_hugetlb'],
  description: 'backing source of guest memory (THP/hugetlb: 2 MiB host pages and guest THP)',
}

const huge = (p: Params): boolean => p.backing !== undefined && p.backing !== 'anonymous'

function region(ctx: WorkloadContext, extra: { stride?: number } = {}): MemstressRegion {
  const p = ctx.params
  return memstressRegion({ bytesPerVcpu: num(p, 'bytesPerVcpu'), overlap: p.overlap === true, thp: huge(p), seed: ctx.seed, vcpus: ctx.vcpus, ...extra })
}

function memstressMem(p: Params, vcpus: number): number {
  const b = num(p, 'bytesPerVcpu')
  return memFor(p.overlap === true ? b / vcpus : b, vcpus, huge(p) ? 4 * M * vcpus : 0)
}

const raceFree = (p: Params, vcpus: number): boolean => vcpus === 1 || p.overlap !== true

/** Log dirty-logging stats shared by dirty-log-perf and page-splitting. */
function dirtyLoop(ctx: WorkloadContext, r: MemstressRegion, o: { iterations: number; manual: boolean; writePercent: number; randomAccess: boolean; onStage?: (stage: string) => void }): { get: number; clear: number } {
  const bitmaps = new Map<number, Uint32Array>()
  let getTotal = 0
  let clearTotal = 0
  for (let it = 1; it <= o.iterations; it++) {
    const t = passPhase(ctx, `Iteration ${String(it)} dirty memory time`, r, { iteration: it, writePercent: o.writePercent, randomAccess: o.randomAccess })
    ctx.metric(`Iteration ${String(it)} dirty memory time`, t / 1e9)
    ctx.line(`Iteration ${String(it)} dirty memory time: ${fmtTs(t)}`)
    const g = ctx.host(`Iteration ${String(it)} get dirty log time`, (vm) => {
      getDirtyLogAll(vm, bitmaps)
    }).simNs
    getTotal += g
    ctx.metric(`Iteration ${String(it)} get dirty log time`, g / 1e9)
    ctx.line(`Iteration ${String(it)} get dirty log time: ${fmtTs(g)}`)
    if (o.manual) {
      const c = ctx.host(`Iteration ${String(it)} clear dirty log time`, (vm) => {
        clearDirtyLogAll(vm, bitmaps)
      }).simNs
      clearTotal += c
      ctx.metric(`Iteration ${String(it)} clear dirty log time`, c / 1e9)
      ctx.line(`Iteration ${String(it)} clear dirty log time: ${fmtTs(c)}`)
    }
    o.onStage?.(`iteration ${String(it)}`)
  }
  return { get: getTotal, clear: clearTotal }
}

function pageStats(ctx: WorkloadContext, stage: string): void {
  const vm = ctx.vm
  for (const k of ['pages_4k', 'pages_2m', 'pages_1g'] as const) ctx.metric(`${k} after ${stage}`, vm === null ? 0 : vm.stats[k])
  if (vm !== null) ctx.line(`${stage}: pages_4k=${String(vm.stats.pages_4k)} pages_2m=${String(vm.stats.pages_2m)} pages_1g=${String(vm.stats.pages_1g)}`)
}

// ---------------------------------------------------------------- dirty-log-perf

/** dirty_log_perf_test. */
export const dirtyLogPerf = defineWorkload({
  name: 'dirty-log-perf',
  mirrors: 'tools/testing/selftests/kvm/dirty_log_perf_test.c',
  description: 'populate, enable dirty logging, dirty/get/clear iterations, disable (write-protection faults, bitmap harvesting)',
  params: [
    vcpusParam(),
    bytesParam(2 * M),
    { name: 'iterations', flag: 'i', type: 'int', default: 2, min: 1, description: 'dirty-logging iterations after populate' },
    { name: 'writePercent', flag: 'w', type: 'percent', default: 100, description: 'percentage of accesses that write' },
    { name: 'randomAccess', flag: 'a', type: 'bool', default: false, description: 'random page order' },
    { name: 'slots', flag: 'x', type: 'int', default: 1, min: 1, max: 64, description: 'memslots to split guest memory into' },
    overlapParam,
    { name: 'noManualProtect', flag: 'g', type: 'bool', default: false, description: 'do not use MANUAL_DIRTY_LOG_PROTECT2 (GET_DIRTY_LOG clears)' },
    backingParam,
  ],
  metrics: ['Populate memory time', 'Enabling dirty logging time', 'Iteration N dirty memory time', 'Iteration N get dirty log time', 'Iteration N clear dirty log time', 'Disabling dirty logging time', 'Get dirty log total', 'Clear dirty log total'],
  raceFree,
  memBytes: memstressMem,
  thpBacking: huge,
  slots: (p) => num(p, 'slots'),
  run(ctx) {
    const p = ctx.params
    const manual = !bool(p, 'noManualProtect')
    const r = region(ctx)
    if (manual) ctx.host('enable manual protect', enableManualProtect)
    setupPhase(ctx, r)
    const pop = passPhase(ctx, 'Populate memory time', r, { iteration: 0 })
    ctx.metric('Populate memory time', pop / 1e9)
    ctx.line(`Populate memory time: ${fmtTs(pop)}`)
    const en = ctx.host('Enabling dirty logging time', (vm) => {
      toggleDirtyLogging(vm, true)
    }).simNs
    ctx.metric('Enabling dirty logging time', en / 1e9)
    ctx.line(`Enabling dirty logging time: ${fmtTs(en)}`)
    const iters = num(p, 'iterations')
    const t = dirtyLoop(ctx, r, { iterations: iters, manual, writePercent: num(p, 'writePercent'), randomAccess: bool(p, 'randomAccess') })
    const dis = ctx.host('Disabling dirty logging time', (vm) => {
      toggleDirtyLogging(vm, false)
    }).simNs
    ctx.metric('Disabling dirty logging time', dis / 1e9)
    ctx.line(`Disabling dirty logging time: ${fmtTs(dis)}`)
    ctx.metric('Get dirty log total', t.get / 1e9)
    ctx.line(`Get dirty log over ${String(iters)} iterations took ${fmtTs(t.get)}. (Avg ${fmtTs(t.get / iters)}/iteration)`)
    if (manual) {
      ctx.metric('Clear dirty log total', t.clear / 1e9)
      ctx.line(`Clear dirty log over ${String(iters)} iterations took ${fmtTs(t.clear)}. (Avg ${fmtTs(t.clear / iters)}/iteration)`)
    }
    teardownPhase(ctx, r)
  },
})

// ---------------------------------------------------------------- demand-paging

/** demand_paging_test. */
export const demandPaging = defineWorkload({
  name: 'demand-paging',
  mirrors: 'tools/testing/selftests/kvm/demand_paging_test.c',
  description: 'each vCPU touches its region once; every first touch is a fault (with an injected userfaultfd latency per fault when -u is set)',
  params: [
    vcpusParam(),
    bytesParam(2 * M),
    { name: 'uffdMode', flag: 'u', type: 'enum', default: 'none', choices: ['none', 'MISSING', 'MINOR'], description: 'userfaultfd mode (none: plain demand faults)' },
    { name: 'uffdDelayUs', flag: 'd', type: 'int', default: 0, min: 0, description: 'extra host delay per userfault, µs' },
    overlapParam,
    backingParam,
  ],
  metrics: ['Total guest execution time', 'Overall demand paging rate'],
  raceFree,
  memBytes: memstressMem,
  thpBacking: huge,
  run(ctx) {
    const p = ctx.params
    const r = region(ctx)
    setupPhase(ctx, r)
    const mode = p.uffdMode as string
    // userfaultfd handler cost per fault: UFFDIO_COPY (copy a page) or UFFDIO_CONTINUE, plus -d.
    const perFault = mode === 'none' ? 0 : (mode === 'MISSING' ? 1500 : 600) + num(p, 'uffdDelayUs') * 1000
    const t = ctx.guest('Total guest execution time', function* (cpu) {
      yield* memstressPass(cpu, r, { iteration: 0 })
      const pages = r.bytesPerVcpu / r.stride
      if (perFault > 0) yield* cpu.work(perFault * pages)
    }).simNs
    const pages = (r.bytesPerVcpu / r.stride) * ctx.vcpus
    ctx.metric('Total guest execution time', t / 1e9)
    ctx.metric('Overall demand paging rate', t === 0 ? 0 : pages / (t / 1e9))
    ctx.line(`Total guest execution time: ${fmtTs(t)}`)
    ctx.line(`Overall demand paging rate: ${(t === 0 ? 0 : pages / (t / 1e9)).toFixed(6)} pgs/sec`)
    teardownPhase(ctx, r)
  },
})

// ---------------------------------------------------------------- access-tracking

/** access_tracking_perf_test. */
export const accessTracking = defineWorkload({
  name: 'access-tracking',
  mirrors: 'tools/testing/selftests/kvm/access_tracking_perf_test.c',
  description: 'populate, write, read, mark idle (clear_young through the MMU notifier), write idle, mark idle, read idle',
  params: [vcpusParam(), bytesParam(2 * M), overlapParam, backingParam],
  metrics: ['Populating memory', 'Writing to populated memory', 'Reading from populated memory', 'Mark memory idle', 'Writing to idle memory', 'Reading from idle memory'],
  raceFree,
  memBytes: memstressMem,
  thpBacking: huge,
  run(ctx) {
    const r = region(ctx)
    setupPhase(ctx, r)
    let it = 0
    const step = (name: string, t: number): void => {
      ctx.metric(name, t / 1e9)
      ctx.line(`${name.padEnd(30)}: ${fmtTs(t)}`)
    }
    step('Populating memory', passPhase(ctx, 'Populating memory', r, { iteration: it++ }))
    step('Writing to populated memory', passPhase(ctx, 'Writing to populated memory', r, { iteration: it++ }))
    step('Reading from populated memory', passPhase(ctx, 'Reading from populated memory', r, { iteration: it, writePercent: 0 }))
    const idle1 = ctx.host('Mark memory idle', markIdle).simNs
    step('Mark memory idle', idle1)
    step('Writing to idle memory', passPhase(ctx, 'Writing to idle memory', r, { iteration: it++ }))
    const idle2 = ctx.host('Mark memory idle (2)', markIdle).simNs
    ctx.line(`${'Mark memory idle'.padEnd(30)}: ${fmtTs(idle2)}`)
    step('Reading from idle memory', passPhase(ctx, 'Reading from idle memory', r, { iteration: it, writePercent: 0 }))
    teardownPhase(ctx, r)
  },
})

// ---------------------------------------------------------------- memslot-perf


/** memslot_perf_test (map, unmap, unmap-chunked, move-inactive, RW; move-active is not modelled). */
export const memslotPerf = defineWorkload({
  name: 'memslot-perf',
  mirrors: 'tools/testing/selftests/kvm/memslot_perf_test.c',
  description: 'guest writes a test area while the host drops (MADV_DONTNEED), moves or verifies it; memslot setup and per-iteration times',
  params: [
    { name: 'slotCap', flag: 's', type: 'int', default: 8, selftestDefault: -1, min: -1, description: 'memslots the test area is split into (-1: as many as the area has 2 MiB chunks)' },
    { name: 'firstTest', flag: 'f', type: 'int', default: 0, min: 0, max: 4, description: 'first test (0 map, 1 unmap, 2 unmap-chunked, 3 move-inactive, 4 rw)' },
    { name: 'lastTest', flag: 'e', type: 'int', default: 4, min: 0, max: 4, description: 'last test' },
    { name: 'iterations', flag: 'l', type: 'int', default: 2, selftestDefault: 100, min: 1, description: 'iterations per test (the selftest runs -l 5 seconds)' },
    { name: 'runs', flag: 'r', type: 'int', default: 1, min: 1, description: 'runs per test (best is reported)' },
    { name: 'areaBytes', type: 'size', default: 4 * M, selftestDefault: 32 * M, min: 2 * M, description: 'test area size (the selftest uses 32 MiB for map, 128 MiB for unmap, 512 MiB for RW)' },
  ],
  metrics: ['slot setup time', 'iteration time', 'avg per iteration', 'best per iteration'],
  raceFree: () => true,
  memBytes: (p) => memFor(4 * M, 1, num(p, 'areaBytes') * 2),
  slots: (p) => (num(p, 'slotCap') < 0 ? 32 : Math.max(1, num(p, 'slotCap'))),
  run(ctx) {
    const p = ctx.params
    const area = num(p, 'areaBytes')
    const names = ['map', 'unmap', 'unmap-chunked', 'move-inactive', 'rw']
    const r = memstressRegion({ bytesPerVcpu: area, seed: ctx.seed, vcpus: ctx.vcpus })
    setupPhase(ctx, r)
    for (let t = num(p, 'firstTest'); t <= num(p, 'lastTest'); t++) {
      const name = names[t]!
      let best = Infinity
      for (let run = 0; run < num(p, 'runs'); run++) {
        let dummyHva = 0
        const setup = ctx.host(`${name}: slot setup`, (vm) => {
          if (name === 'move-inactive') {
            dummyHva = 0x600000000000
            vm.host.mmap(dummyHva, 2 * M)
            vm.setUserMemoryRegion({ slot: 100, asId: 0, flags: 0, guestPhysAddr: 64 * G, memorySize: 2 * M, userspaceAddr: dummyHva })
          }
        }).simNs
        let total = 0
        for (let i = 0; i < num(p, 'iterations'); i++) {
          total += ctx.guest(`${name}: iteration`, (cpu) => memstressPass(cpu, r, { iteration: i, writePercent: name === 'rw' ? 100 : 100, every: name === 'map' ? 2 : 1 })).simNs
          if (name === 'move-inactive') {
            total += ctx.host(`${name}: move slot`, (vm) => {
              vm.setUserMemoryRegion({ slot: 100, asId: 0, flags: 0, guestPhysAddr: (i % 2 === 0 ? 65 : 64) * G, memorySize: 2 * M, userspaceAddr: dummyHva })
            }).simNs
          } else if (name !== 'rw') {
            // Drop the area (one page or one 2 MiB chunk at a time): MADV_DONTNEED from the guest
            // process, so the next pass faults the pages back in. (The selftest drops host pages
            // behind the memslot; the guest-visible effect, zapped translations refaulted, is the same.)
            const chunk = name === 'unmap-chunked' ? 2 * M : name === 'map' ? area / 2 : 4096
            total += ctx.guest(`${name}: dontneed`, function* (cpu) {
              yield* switchMm(cpu, r.task!.mm)
              for (let off = 0; off < area; off += chunk) yield* madviseDontneed(cpu, r.task!.mm, r.base + off, chunk)
            }, [0]).simNs
          }
        }
        ctx.host(`${name}: slot teardown`, (vm) => {
          if (name === 'move-inactive') vm.setUserMemoryRegion({ slot: 100, asId: 0, flags: 0, guestPhysAddr: 0, memorySize: 0, userspaceAddr: dummyHva })
        })
        const avg = total / num(p, 'iterations')
        best = Math.min(best, avg)
        ctx.metric(`${name}: slot setup time`, setup / 1e9)
        ctx.metric(`${name}: iteration time`, total / 1e9)
        ctx.metric(`${name}: avg per iteration`, avg / 1e9)
        ctx.line(`Test took ${fmtTs(setup)} for slot setup + ${fmtTs(total)} for all iterations`)
        ctx.line(`Done ${String(num(p, 'iterations'))} iterations, avg ${fmtTs(avg)} each`)
      }
      ctx.metric(`${name}: best per iteration`, best / 1e9)
      ctx.line(`Best runtime result was ${fmtTs(best)} per iteration (with ${String(num(p, 'iterations'))} iterations)`)
    }
    teardownPhase(ctx, r)
  },
})

// ---------------------------------------------------------------- memslot-modification-stress

/** memslot_modification_stress_test: memstress while the host adds and deletes a 1-page memslot. */
export const memslotModificationStress = defineWorkload({
  name: 'memslot-modification-stress',
  mirrors: 'tools/testing/selftests/kvm/memslot_modification_stress_test.c',
  description: 'vCPUs run memstress while the host repeatedly adds and deletes a 1-page memslot (zaps and root invalidations under faults in flight)',
  params: [
    vcpusParam(),
    bytesParam(2 * M),
    { name: 'iterations', flag: 'i', type: 'int', default: 10, min: 1, description: 'memslot add/delete pairs' },
    { name: 'delayUs', flag: 'd', type: 'int', default: 0, min: 0, description: 'delay between memslot operations, µs (simulated)' },
    overlapParam,
  ],
  metrics: ['Total guest execution time', 'memslot modifications'],
  raceFree,
  memBytes: memstressMem,
  run(ctx) {
    const p = ctx.params
    const r = region(ctx)
    setupPhase(ctx, r)
    const vm = ctx.vm
    if (vm !== null) {
      // Host threads adding/deleting the dummy slot while the vCPUs run (KVM_SET_USER_MEMORY_REGION
      // from another thread), spread over the run in simulated time.
      const hva = 0x600000000000
      vm.host.mmap(hva, 4096)
      const gpa = 64 * G
      const gap = 20_000 + num(p, 'delayUs') * 1000
      const start = vm.sched.now
      for (let i = 0; i < num(p, 'iterations') * 2; i++) {
        const add = i % 2 === 0
        vm.sched.spawn(`memslot_mod:${String(i)}`, function* () {
          yield* vm.slotsLock.lock()
          try {
            const change = vm.memslots.setUserMemoryRegion({ slot: 200, asId: 0, flags: 0, guestPhysAddr: gpa, memorySize: add ? 4096 : 0, userspaceAddr: hva })
            yield* vm.mmu.memslotChanged(change)
          } finally {
            vm.slotsLock.unlock()
          }
        }, { startTime: start + (i + 1) * gap })
      }
    }
    const t = passPhase(ctx, 'Total guest execution time', r, { iteration: 0 })
    ctx.metric('Total guest execution time', t / 1e9)
    ctx.metric('memslot modifications', vm === null ? 0 : num(p, 'iterations') * 2)
    ctx.line(`Total guest execution time: ${fmtTs(t)}`)
    teardownPhase(ctx, r)
  },
})

// ---------------------------------------------------------------- max-guest-memory, mmu-stress

const maxMemParams: ParamDef[] = [
  { name: 'vcpus', flag: 'c', type: 'int', default: 2, min: 1, max: 64, description: 'vCPUs (the selftest defaults to ¾ of host CPUs)' },
  { name: 'maxMem', flag: 'm', type: 'size', default: 8 * M, selftestDefault: 128 * G, min: 2 * M, description: 'guest memory to touch, in total' },
  { name: 'slotSize', flag: 's', type: 'size', default: 2 * M, selftestDefault: 2 * G, min: 2 * M, description: 'memslot size' },
  { name: 'hugepages', flag: 'H', type: 'bool', default: false, description: 'back guest memory with huge pages' },
]

/** Guest memory, THP backing and memslots of the max-mem family (memslots of `slotSize` over `maxMem`). */
const maxMemSizing = {
  memBytes: (p: Params, v: number) => memFor(num(p, 'maxMem') / v, v, 4 * M * v),
  thpBacking: (p: Params) => bool(p, 'hugepages'),
  slots: (p: Params) => Math.max(1, Math.floor((num(p, 'maxMem') + 16 * M) / num(p, 'slotSize'))),
}

function maxMemRegion(ctx: WorkloadContext): MemstressRegion {
  const p = ctx.params
  return memstressRegion({ bytesPerVcpu: Math.floor(num(p, 'maxMem') / ctx.vcpus / PAGE_2M) * PAGE_2M || PAGE_2M, thp: bool(p, 'hugepages'), seed: ctx.seed, vcpus: ctx.vcpus })
}

function maxMemPhases(ctx: WorkloadContext, r: MemstressRegion): Record<string, number> {
  const out: Record<string, number> = {}
  out.run1 = passPhase(ctx, 'run1', r, { iteration: 0 })
  // Toggle CR0.WP on every vCPU: an MMU context reset (kvm_mmu_reset_context).
  out.reset = ctx.guest('reset', (cpu) => cr0WpToggle(cpu, { iterations: 1, pgeEvery: 1 << 30 })).simNs
  out.run2 = passPhase(ctx, 'run2', r, { iteration: 1 })
  return out
}

/** max_guest_memory_test. */
export const maxGuestMemory = defineWorkload({
  name: 'max-guest-memory',
  mirrors: 'tools/testing/selftests/kvm/max_guest_memory_test.c',
  description: 'every vCPU writes its share of guest memory (run1), toggles CR0.WP (reset), writes again (run2)',
  params: maxMemParams,
  metrics: ['run1', 'reset', 'run2'],
  raceFree: () => true,
  vcpusParam: 'vcpus',
  ...maxMemSizing,
  run(ctx) {
    const r = maxMemRegion(ctx)
    setupPhase(ctx, r)
    const t = maxMemPhases(ctx, r)
    for (const [k, v] of Object.entries(t)) ctx.metric(k, v / 1e9)
    ctx.line(`run1 = ${fmtTs(t.run1!)}, reset = ${fmtTs(t.reset!)}, run2 = ${fmtTs(t.run2!)}`)
    teardownPhase(ctx, r)
  },
})

/** mmu_stress_test. */
export const mmuStress = defineWorkload({
  name: 'mmu-stress',
  mirrors: 'tools/testing/selftests/kvm/mmu_stress_test.c',
  description: 'write all, toggle CR0.WP, re-write, read-only phase (writes must fault), read-write phase',
  params: maxMemParams,
  metrics: ['run1', 'reset', 'run2', 'ro', 'rw', 'ro write faults'],
  raceFree: () => true,
  ...maxMemSizing,
  run(ctx) {
    const r = maxMemRegion(ctx)
    setupPhase(ctx, r)
    const t = maxMemPhases(ctx, r)
    // The selftest mprotect()s the host mapping and expects EFAULT; here the guest's own mapping
    // is made read-only, so writes fault in the guest (#PF, SIGSEGV recorded) and reads must work.
    ctx.guest('mprotect ro', (cpu) => memstressProtect(cpu, r, PROT_READ), [0])
    let faults = 0
    t.ro = ctx.guest('ro', function* (cpu) {
      yield* memstressPass(cpu, r, { iteration: 2, writePercent: 0 })
      const st = yield* cpu.tryWrite32(r.base + cpu.id * r.bytesPerVcpu, 1)
      if (st !== 0) faults++
    }).simNs
    ctx.guest('mprotect rw', (cpu) => memstressProtect(cpu, r, PROT_READ | PROT_WRITE), [0])
    t.rw = passPhase(ctx, 'rw', r, { iteration: 3 })
    for (const [k, v] of Object.entries(t)) ctx.metric(k, v / 1e9)
    ctx.metric('ro write faults', faults)
    ctx.line(`run1 = ${fmtTs(t.run1!)}, reset = ${fmtTs(t.reset!)}, run2 = ${fmtTs(t.run2!)}, ro = ${fmtTs(t.ro)}, rw = ${fmtTs(t.rw)}`)
    teardownPhase(ctx, r)
  },
})

// ---------------------------------------------------------------- page-table

/** kvm_page_table_test. */
export const pageTable = defineWorkload({
  name: 'page-table',
  mirrors: 'tools/testing/selftests/kvm/kvm_page_table_test.c',
  description: 'create mappings (one access per large page), update them with dirty logging on (huge mappings split), adjust with it off (coalesced); even vCPUs write, odd read',
  params: [vcpusParam(), bytesParam(4 * M), { ...backingParam, default: 'anonymous_thp' }],
  metrics: ['KVM_CREATE_MAPPINGS', 'KVM_UPDATE_MAPPINGS', 'KVM_ADJUST_MAPPINGS'],
  raceFree: () => true,
  memBytes: memstressMem,
  thpBacking: huge,
  run(ctx) {
    const r = region(ctx)
    setupPhase(ctx, r)
    const wp = (cpu: number): number => (cpu % 2 === 0 ? 100 : 0)
    const stage = (name: string, t: number): void => {
      ctx.metric(name, t / 1e9)
      ctx.line(`${name}: total execution time: ${fmtTs(t)}`)
    }
    stage('KVM_CREATE_MAPPINGS', ctx.guest('KVM_CREATE_MAPPINGS', (cpu) => memstressPass(cpu, r, { iteration: 0, writePercent: wp(cpu.id), every: 512 })).simNs)
    ctx.host('enable dirty logging', (vm) => {
      toggleDirtyLogging(vm, true)
    })
    stage('KVM_UPDATE_MAPPINGS', ctx.guest('KVM_UPDATE_MAPPINGS', (cpu) => memstressPass(cpu, r, { iteration: 1, writePercent: wp(cpu.id) })).simNs)
    ctx.host('disable dirty logging', (vm) => {
      toggleDirtyLogging(vm, false)
    })
    stage('KVM_ADJUST_MAPPINGS', ctx.guest('KVM_ADJUST_MAPPINGS', (cpu) => memstressPass(cpu, r, { iteration: 2, writePercent: 0 })).simNs)
    teardownPhase(ctx, r)
  },
})

// ---------------------------------------------------------------- nx-huge-pages

/** x86/nx_huge_pages_test: read/exec three 2 MiB pages; pages_2m and nx_lpage_splits after each step (§B.9). */
export const nxHugePages = defineWorkload({
  name: 'nx-huge-pages',
  mirrors: 'tools/testing/selftests/kvm/x86/nx_huge_pages_test.c',
  description: 'read hp1, read hp2, exec hp1, exec hp3, read hp1, read hp3 on three 2 MiB pages; KVM page-size stats after each step',
  params: [{ name: 'guestHugePages', type: 'bool', default: true, description: 'the guest maps the three pages with 2 MiB pages (off: 4 KiB)' }],
  metrics: ['pages_2m after <step>', 'nx_lpage_splits after <step>'],
  raceFree: () => true,
  memBytes: () => 32 * M,
  thpBacking: () => true,
  run(ctx) {
    const st: { task: Task | null; base: number } = { task: null, base: 0 }
    const guestHuge = bool(ctx.params, 'guestHugePages')
    ctx.guest('setup', function* (cpu) {
      const task = yield* cpu.os.createProcess(cpu)
      yield* switchMm(cpu, task.mm)
      st.base = yield* mmap(cpu, task.mm, { addr: 4 * G, length: 3 * PAGE_2M, prot: PROT_READ | PROT_WRITE | PROT_EXEC, thp: guestHuge, populate: true })
      st.task = task
    }, [0])
    const report = (step: string): void => {
      const vm = ctx.vm
      ctx.metric(`pages_2m after ${step}`, vm === null ? 0 : vm.stats.pages_2m)
      ctx.metric(`nx_lpage_splits after ${step}`, vm === null ? 0 : vm.stats.nx_lpage_splits)
      if (vm !== null) ctx.line(`${step}: pages_2m=${String(vm.stats.pages_2m)} nx_lpage_splits=${String(vm.stats.nx_lpage_splits)}`)
    }
    report('initial')
    const steps: [string, number, 'read' | 'exec'][] = [
      ['read hp1', 0, 'read'],
      ['read hp2', 1, 'read'],
      ['exec hp1', 0, 'exec'],
      ['exec hp3', 2, 'exec'],
      ['read hp1 again', 0, 'read'],
      ['read hp3', 2, 'read'],
    ]
    for (const [name, hp, kind] of steps) {
      ctx.guest(name, function* (cpu) {
        yield* switchMm(cpu, st.task!.mm)
        const va = st.base + hp * PAGE_2M + 64
        if (kind === 'read') yield* cpu.read32(va)
        else yield* cpu.fetch32(va)
      }, [0])
      report(name)
    }
  },
})

// ---------------------------------------------------------------- page-splitting

/** x86/dirty_log_page_splitting_test: page-size stats at each stage of dirty logging on huge-page-backed memory (§B.10). */
export const pageSplitting = defineWorkload({
  name: 'page-splitting',
  mirrors: 'tools/testing/selftests/kvm/x86/dirty_log_page_splitting_test.c',
  description: 'populate huge-page-backed memory, enable dirty logging, 2 iterations (with or without manual protect), disable, re-touch; pages_4k/2m/1g at each stage',
  params: [
    vcpusParam(2),
    bytesParam(4 * M),
    { name: 'slots', type: 'int', default: 2, min: 1, description: 'memslots' },
    { name: 'iterations', type: 'int', default: 2, min: 1, description: 'dirty-logging iterations' },
    { name: 'noManualProtect', flag: 'g', type: 'bool', default: false, description: 'do not use MANUAL_DIRTY_LOG_PROTECT2' },
  ],
  metrics: ['pages_4k after <stage>', 'pages_2m after <stage>', 'pages_1g after <stage>'],
  raceFree: () => true,
  memBytes: (p, v) => memFor(num(p, 'bytesPerVcpu'), v, 4 * M * v),
  thpBacking: () => true,
  slots: (p) => num(p, 'slots'),
  run(ctx) {
    const p = ctx.params
    const manual = !bool(p, 'noManualProtect')
    const r = memstressRegion({ bytesPerVcpu: num(p, 'bytesPerVcpu'), thp: true, seed: ctx.seed, vcpus: ctx.vcpus })
    if (manual) ctx.host('enable manual protect', enableManualProtect)
    setupPhase(ctx, r)
    passPhase(ctx, 'populate', r, { iteration: 0 })
    pageStats(ctx, 'populate')
    ctx.host('enable dirty logging', (vm) => {
      toggleDirtyLogging(vm, true)
    })
    pageStats(ctx, 'enable dirty logging')
    dirtyLoop(ctx, r, { iterations: num(p, 'iterations'), manual, writePercent: 100, randomAccess: false, onStage: (s) => { pageStats(ctx, s); } })
    ctx.host('disable dirty logging', (vm) => {
      toggleDirtyLogging(vm, false)
    })
    passPhase(ctx, 're-touch', r, { iteration: 9 })
    pageStats(ctx, 'disable and re-touch')
    teardownPhase(ctx, r)
  },
})

/** The KVM selftest family. */
export const selftestWorkloads = [dirtyLogPerf, demandPaging, accessTracking, memslotPerf, memslotModificationStress, maxGuestMemory, mmuStress, pageTable, nxHugePages, pageSplitting]

