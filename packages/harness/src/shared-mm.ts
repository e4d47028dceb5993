import { type Cpu, exitProcess, mmap, PROT_EXEC, PROT_READ, PROT_WRITE, type Routine, switchMm, type Task } from '@mmusim/guest'
import fc from 'fast-check'
import { applyFuzzCommand, type FuzzCommand, type FuzzRegion } from './fuzz-ops.ts'

/*
 * The shared-mm fuzz mode: every vCPU runs a thread of ONE process, and a generated sequence of
 * lockstep steps changes that address space one vCPU at a time. Around each change the other
 * vCPUs touch the pages it is about to change (so their TLBs hold the translations the shootdown
 * must remove) and touch them again afterwards (so a lost, partial or late flush is guest-visible:
 * a stale value read, a write that lands in a freed or shared page, a missing SIGSEGV).
 *
 * Everything the guest can observe is independent of timing: vCPUs meet at a guest barrier
 * before every step, and within a step they take numbered turns (touch-before by each other vCPU
 * in id order, the act, touch-after in id order), so exactly one vCPU executes recorded ops at a
 * time — the waiting ones only spin (PAUSE) and answer shootdown IPIs, whose handlers are not part
 * of the trace. The differential oracle can therefore compare every access exactly, while chaos
 * schedules still vary how the waiting vCPUs interleave.
 */

/** What one step does (the same vocabulary as the per-process programs). */
/** A step's command: the same commands as the per-process mode's programs. */
export type StepCommand = FuzzCommand

/**
 * One lockstep step: vCPU `cpu` (modulo the vCPU count) executes the command on the shared
 * process while the others touch before and after. `switch` toggles the acting vCPU between the
 * shared process and a private one (CR3 with PCID / no-flush exactly as the guest's `switchMm`
 * decides); any other command from a vCPU that is away switches it back first.
 */
export type SharedStep = StepCommand & { readonly cpu: number }

/** A generated shared-mm case: the vCPU count, the steps, and an optional chaos schedule. */
export interface SharedFuzzCase {
  readonly mode: 'shared'
  /** vCPUs, all threads of one process (2–4 when generated). */
  readonly vcpus: number
  readonly steps: readonly SharedStep[]
  /** PCT chaos-scheduling seed of the VM's threads (null: earliest-clock-first). */
  readonly chaos: number | null
}

/** JS-side state shared by the vCPUs of one run (what the threads of one process agree on). */
interface SharedState {
  task: Task | null
  readonly regions: FuzzRegion[]
  /** The next turn; the owner of turn k waits until `turn === k`. */
  turn: number
}

/** Pages of a region that the other vCPUs touch around a change of the whole region. */
const TOUCH_PAGES = 6
/** Value an observer writes in its touch-after (distinct per step and vCPU, so a misplaced write shows). */
function touchValue(step: number, cpu: number): number {
  return (0x5e000000 + step * 16 + cpu) >>> 0
}

/** Which pages (region index, page) the other vCPUs touch around step `s`, evaluated on the shared state. */
function targets(st: SharedState, s: StepCommand): { region: number; pages: number[] }[] {
  const rs = st.regions
  const at = (i: number): number => (rs.length === 0 ? -1 : i % rs.length)
  const spread = (r: FuzzRegion): number[] => {
    const out: number[] = []
    for (let p = 0; p < Math.min(r.pages, TOUCH_PAGES); p++) out.push(p)
    if (r.pages > TOUCH_PAGES) out.push(r.pages - 1)
    return out
  }
  switch (s.op) {
    case 'mmap':
      // The region this mmap creates (it does not exist yet before the act).
      return [{ region: rs.length, pages: Array.from({ length: Math.min(s.pages, TOUCH_PAGES) }, (_, p) => p) }]
    case 'munmap':
    case 'mprotect': {
      const i = at(s.region)
      return i < 0 ? [] : [{ region: i, pages: spread(rs[i]!) }]
    }
    case 'write':
    case 'read':
    case 'fetch':
    case 'invlpg':
    case 'clearYoung': {
      const i = at(s.region)
      return i < 0 ? [] : [{ region: i, pages: [s.page % rs[i]!.pages] }]
    }
    case 'fork':
      return rs.map((r, i) => ({ region: i, pages: r.pages > 1 ? [0, r.pages - 1] : [0] }))
    case 'switch':
      return []
  }
}

/**
 * Interpret a shared-mm case on one vCPU (every vCPU runs this with the same steps): vCPU 0
 * creates the shared process, every vCPU a private one to switch away to; then the steps in
 * lockstep; then every vCPU leaves, and the processes are torn down.
 */
export function* interpretShared(cpu: Cpu, c: SharedFuzzCase): Routine {
  const os = cpu.os
  const n = os.cpus.length
  const me = cpu.id
  const st = os.sharedState<SharedState>('mmusim-fuzz-shared', () => ({ task: null, regions: [], turn: 0 }))
  if (me === 0) st.task = yield* os.createProcess(cpu)
  const priv = yield* os.createProcess(cpu)
  let privPage = -1
  yield* os.barrier(cpu, 'fuzz-setup')
  const shared = st.task!
  yield* switchMm(cpu, shared.mm)
  let away = false
  let turn = 0
  /** Run `body` in turn `k` (turns are taken in order by whoever owns them). */
  function* inTurn(body: () => Routine): Routine {
    const k = turn++
    yield* cpu.waitUntil(() => st.turn === k, `turn ${String(k)} of the lockstep fuzz case`)
    yield* body()
    st.turn = k + 1
  }
  /** A round of turns, one per vCPU in id order: this vCPU runs `body` in its own, unless it is the actor or away. */
  function* observe(actor: number, body: () => Routine): Routine {
    for (let o = 0; o < n; o++) {
      if (o !== me) turn++
      else
        yield* inTurn(function* () {
          if (o !== actor && !away) yield* body()
        })
    }
  }
  const va = (r: FuzzRegion, page: number): number => r.base + (page % r.pages) * 4096
  function* comeBack(): Routine {
    yield* switchMm(cpu, shared.mm)
    away = false
    // Touch what this vCPU may still cache for the shared mm: a missed flush on return shows here.
    for (const r of st.regions) yield* cpu.read32(r.base)
  }
  function* act(i: number, s: SharedStep): Routine {
    if (s.op === 'switch') {
      if (away) {
        yield* comeBack()
        return
      }
      yield* switchMm(cpu, priv.mm)
      if (privPage < 0) privPage = yield* mmap(cpu, priv.mm, { length: 4096, prot: PROT_READ | PROT_WRITE })
      yield* cpu.write32(privPage, touchValue(i, me))
      away = true
      return
    }
    if (away) yield* comeBack()
    // Every other command runs on the shared process.
    yield* applyFuzzCommand(cpu, shared, st.regions, s)
  }
  for (const [i, s] of c.steps.entries()) {
    yield* os.barrier(cpu, 'fuzz-step')
    const actor = s.cpu % n
    // Every vCPU computes the same targets from the same shared state before any turn of this step.
    const tg = targets(st, s)
    const exec = s.op === 'fetch' || (s.op === 'mprotect' && (s.prot & PROT_EXEC) !== 0)
    yield* observe(actor, function* () {
      for (const t of tg) {
        const r = st.regions[t.region]
        if (r !== undefined) for (const p of t.pages) yield* cpu.read32(va(r, p))
      }
    })
    if (actor === me) yield* inTurn(() => act(i, s))
    else turn++
    yield* observe(actor, function* () {
      for (const t of tg) {
        const r = st.regions[t.region]
        if (r === undefined) continue
        for (const p of t.pages) {
          yield* cpu.read32(va(r, p))
          yield* cpu.write32(va(r, p), touchValue(i, me))
          if (exec) yield* cpu.fetch32(va(r, p))
        }
      }
    })
  }
  yield* os.barrier(cpu, 'fuzz-end')
  yield* switchMm(cpu, null)
  yield* os.barrier(cpu, 'fuzz-left')
  if (me === 0) yield* exitProcess(cpu, shared)
  yield* exitProcess(cpu, priv)
}

const PROTS = [PROT_READ, PROT_READ | PROT_WRITE, PROT_READ | PROT_WRITE | PROT_EXEC, 0]

/**
 * fast-check arbitrary of one step's command. Compared with the per-process mix it favours the
 * operations that change translations other vCPUs cache (munmap, mprotect incl. reductions,
 * CoW after fork, flushing A-bit clears, switching away) and allows regions beyond the 33-page
 * flush ceiling, so remote flushes take both the INVLPG and the full-flush path.
 */
export function stepCommandArb(): fc.Arbitrary<StepCommand> {
  const region = fc.nat({ max: 3 })
  const page = fc.nat({ max: 39 })
  return fc.oneof(
    { weight: 4, arbitrary: fc.record({ op: fc.constant('mmap' as const), pages: fc.oneof({ weight: 4, arbitrary: fc.integer({ min: 1, max: 8 }) }, { weight: 1, arbitrary: fc.integer({ min: 34, max: 40 }) }), prot: fc.constantFrom(...PROTS.slice(0, 3)) }) },
    { weight: 2, arbitrary: fc.record({ op: fc.constant('munmap' as const), region }) },
    { weight: 3, arbitrary: fc.record({ op: fc.constant('mprotect' as const), region, prot: fc.constantFrom(...PROTS) }) },
    { weight: 4, arbitrary: fc.record({ op: fc.constant('write' as const), region, page, value: fc.integer({ min: 1, max: 0x7fffffff }) }) },
    { weight: 2, arbitrary: fc.record({ op: fc.constant('read' as const), region, page }) },
    { weight: 1, arbitrary: fc.record({ op: fc.constant('fetch' as const), region, page }) },
    { weight: 1, arbitrary: fc.record({ op: fc.constant('fork' as const), childWrites: fc.nat({ max: 4 }) }) },
    { weight: 2, arbitrary: fc.record({ op: fc.constant('switch' as const) }) },
    { weight: 1, arbitrary: fc.record({ op: fc.constant('invlpg' as const), region, page }) },
    { weight: 2, arbitrary: fc.record({ op: fc.constant('clearYoung' as const), region, page, flush: fc.boolean() }) },
  )
}

/** fast-check arbitrary of one step: the acting vCPU (taken modulo the vCPU count) and its command. */
export function sharedStepArb(): fc.Arbitrary<SharedStep> {
  return fc.tuple(fc.nat({ max: 3 }), stepCommandArb()).map(([cpu, cmd]): SharedStep => ({ cpu, ...cmd }))
}

/** fast-check arbitrary of a shared-mm case: 2–4 vCPUs, up to `maxSteps` steps, a chaos schedule half the time. */
export function sharedCaseArb(maxSteps: number): fc.Arbitrary<SharedFuzzCase> {
  return fc.record({
    mode: fc.constant('shared' as const),
    vcpus: fc.integer({ min: 2, max: 4 }),
    steps: fc.array(sharedStepArb(), { minLength: 1, maxLength: Math.max(1, maxSteps) }),
    chaos: fc.option(fc.integer({ min: 1, max: 1_000_000 }), { nil: null }),
  })
}
