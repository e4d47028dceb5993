/**
 * Populate and fork-storm on the shadow and legacy-tdp strategies, 1/2/4 vCPUs: simulator faults
 * per second (wall clock of `vm.run()`, VM set-up and teardown excluded, as in the TDP MMU's
 * benchmark) and simulated time. Run: `pnpm --filter @mmusim/shadow-mmu bench`.
 *
 * - `populate 64 MiB/vCPU`: the selftests' populate pass with loader-built guest page tables
 *   (src/testing/populate-guest.ts): one page fault per 4 KiB page under shadow paging. This is
 *   issue 6's "faults/s (shadow, 1 vCPU)" figure.
 * - `guest-OS memstress 4 MiB/vCPU` and `fork storm`: the guest OS demand-pages (zeroes each new
 *   page, writes its PTEs, breaks CoW), so much of the run is guest work, not MMU work.
 *
 * Each task runs in its own Node process (as JMH forks a JVM per benchmark): V8 compiles the MMU
 * for the type feedback it has seen, and tasks that share a process share that code, so a task's
 * figure would depend on which tasks ran before it. `MMUSIM_BENCH_ISOLATE=0` runs every task in
 * this process instead (the figures of a `compare` over several strategies in one process).
 *
 * Wall-clock figures are the median (p50) and the best over MMUSIM_BENCH_FORKS (default 3)
 * processes per task, each making MMUSIM_BENCH_ITERATIONS (default 8) timed runs after at least
 * MMUSIM_BENCH_WARMUP (default 6) untimed ones lasting MMUSIM_BENCH_WARMUP_MS (default 1000 ms of
 * `vm.run()` in all: short tasks need many runs before V8 has compiled them). Several processes,
 * spread over the run (round after round over all tasks), because shared machines have slow
 * phases lasting seconds; the median rather
 * than the mean because they add long outliers. `MMUSIM_BENCH_ONLY=text` runs the tasks whose
 * name contains it.
 */
import './debug-off.ts'
import { fork } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { Bench } from 'tinybench'
import { type Cpu, forkStorm, GuestOs, memstress, type Routine } from '@mmusim/guest'
import { type MmuStrategy, Vm } from '@mmusim/kvm'
import { tuneV8ForSimulation } from '@mmusim/x86-hw'
import { legacyTdpStrategy, shadowStrategy } from '../src/index.ts'
import { setUpPopulate } from '../src/testing/populate-guest.ts'

// As the mmusim CLI does: V8's inlining budget for the simulator's chains of small methods.
tuneV8ForSimulation()

const MEM = 96 << 20
/** A non-negative integer setting from the environment (`min` at least), or `fallback` when unset. */
function envInt(name: string, fallback: number, min: number): number {
  const raw = process.env[name]
  if (raw === undefined || raw === '') return fallback
  const v = Number(raw)
  if (!Number.isInteger(v) || v < min) throw new Error(`${name} must be an integer ≥ ${String(min)}, got "${raw}"; unset it for the default ${String(fallback)}.`)
  return v
}
const iterations = envInt('MMUSIM_BENCH_ITERATIONS', 8, 1)
const warmupIterations = envInt('MMUSIM_BENCH_WARMUP', 6, 0)
const warmupTime = envInt('MMUSIM_BENCH_WARMUP_MS', 1000, 0)
const only = process.env.MMUSIM_BENCH_ONLY
const forks = envInt('MMUSIM_BENCH_FORKS', 3, 1)
/** In a child process: the one task to run. */
const childTask = process.env.MMUSIM_BENCH_TASK

type Program = ((cpu: Cpu) => Routine) | 'populate'

interface Outcome {
  faults: number
  simNs: number
  lockWaitNs: number
  shadowPages: number
}

/** A VM ready to run `program`, and a check to make after the run. */
function prepare(strategy: MmuStrategy, vcpus: number, program: Program): { vm: Vm; check: () => void } {
  const vm = new Vm({ strategy, vcpus, hostMemBytes: 1 << 30 })
  if (program === 'populate') {
    setUpPopulate(vm, { vcpus, bytesPerVcpu: 64 << 20 })
    return { vm, check: () => undefined }
  }
  vm.addMemory(0, MEM)
  const os = new GuestOs({ memBytes: MEM, features: vm.features, ops: vm.vcpus.map((v) => v.guest.op), idt: vm.idt })
  for (const cpu of os.cpus) vm.spawnGuest(cpu.id, os.main(cpu, program))
  return {
    vm,
    check: () => {
      if (os.totals().mismatches !== 0) throw new Error('guest saw wrong data')
    },
  }
}

function outcome(vm: Vm): Outcome {
  return {
    faults: vm.vcpus.reduce((n, v) => n + v.stats.pf_taken, 0),
    simNs: vm.sched.now,
    lockWaitNs: vm.mmuLock.stats.write.waitNs,
    shadowPages: vm.mmuPagesAllocated,
  }
}

const workloads: [string, Program][] = [
  ['populate 64 MiB/vCPU', 'populate'],
  ['guest-OS memstress 4 MiB/vCPU', (cpu) => memstress(cpu, { iterations: 1, bytesPerVcpu: 1024 * 4096 })],
  ['fork storm', (cpu) => forkStorm(cpu, { rounds: 3, pages: 32 })],
]
const strategies: [string, MmuStrategy][] = [
  ['shadow', shadowStrategy],
  ['legacy-tdp', legacyTdpStrategy],
]

const bench = new Bench({ iterations, time: 0, warmupIterations, warmupTime, retainSamples: true })
const outcomes = new Map<string, Outcome>()
for (const [wname, program] of workloads) {
  for (const [sname, strategy] of strategies) {
    for (const n of [1, 2, 4]) {
      const name = `${wname} | ${sname} | ${String(n)} vCPU`
      if (only !== undefined && !name.includes(only)) continue
      if (childTask !== undefined && name !== childTask) continue
      let cur: { vm: Vm; check: () => void } | null = null
      bench.add(
        name,
        () => {
          cur!.vm.run()
        },
        {
          beforeEach() {
            cur = prepare(strategy, n, program)
          },
          afterEach() {
            cur!.check()
            outcomes.set(name, outcome(cur!.vm))
            cur!.vm.destroy()
            cur = null
          },
        },
      )
    }
  }
}
/** One task's figures: timed runs (ms) and the deterministic outcome of its last run. */
interface TaskResult {
  name: string
  samplesMs: number[]
  outcome: Outcome
}

async function runHere(): Promise<TaskResult[]> {
  await bench.run()
  return bench.tasks.map((t) => {
    const r = t.result
    if (r.state !== 'completed') throw new Error(`benchmark task ${t.name} did not complete (${r.state})`)
    return { name: t.name, samplesMs: [...(r.latency.samples ?? [])], outcome: outcomes.get(t.name)! }
  })
}

/** Run `name` in a child process (this script, MMUSIM_BENCH_TASK=name) and collect its result. */
function runForked(name: string): Promise<TaskResult> {
  return new Promise((resolve, reject) => {
    const child = fork(fileURLToPath(import.meta.url), [], { execArgv: process.execArgv, env: { ...process.env, MMUSIM_BENCH_TASK: name } })
    let result: TaskResult | null = null
    child.on('message', (m) => {
      result = m as TaskResult
    })
    child.on('error', reject)
    child.on('exit', (code) => {
      if (code === 0 && result !== null) resolve(result)
      else reject(new Error(`benchmark task ${name}: child process exited with ${String(code)}`))
    })
  })
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2
}

if (childTask !== undefined && (process.send === undefined || bench.tasks.length !== 1)) {
  throw new Error(`MMUSIM_BENCH_TASK is set by this benchmark for its child processes; unset it (got "${childTask}").`)
}
if (bench.tasks.length === 0) throw new Error(`MMUSIM_BENCH_ONLY="${only ?? ''}" matches no task; task names look like "populate 64 MiB/vCPU | shadow | 1 vCPU".`)
if (childTask !== undefined) {
  // A child: run the one task registered above and hand its figures to the parent.
  const [r] = await runHere()
  process.send!(r)
} else {
  let results: TaskResult[]
  if (process.env.MMUSIM_BENCH_ISOLATE === '0') results = await runHere()
  else {
    // Round after round over all tasks, so that each task's processes are spread over the run.
    const forked = bench.tasks.map((): TaskResult[] => [])
    for (let f = 0; f < forks; f++) for (let i = 0; i < bench.tasks.length; i++) forked[i]!.push(await runForked(bench.tasks[i]!.name))
    results = bench.tasks.map((t, i) => {
      const rs = forked[i]!
      // Every process must simulate the same run: the simulation is deterministic.
      for (const r of rs) if (JSON.stringify(r.outcome) !== JSON.stringify(rs[0]!.outcome)) throw new Error(`${t.name}: processes disagree on the simulated outcome`)
      return { name: t.name, samplesMs: rs.flatMap((r) => r.samplesMs), outcome: rs[0]!.outcome }
    })
  }
  const rows = results.map(({ name, samplesMs, outcome: o }) => {
    const ms = median(samplesMs)
    const best = Math.min(...samplesMs)
    return {
      task: name,
      faults: o.faults,
      'wall ms (p50)': ms.toFixed(1),
      'faults/s (p50)': Math.round(o.faults / (ms / 1000)).toLocaleString('en-US'),
      'faults/s (best)': Math.round(o.faults / (best / 1000)).toLocaleString('en-US'),
      'sim µs': (o.simNs / 1000).toFixed(0),
      'sim ns/fault': (o.simNs / o.faults).toFixed(0),
      'mmu_lock wait µs': (o.lockWaitNs / 1000).toFixed(0),
      'MMU pages': o.shadowPages,
    }
  })
  console.log(`${process.env.MMUSIM_BENCH_ISOLATE === '0' ? 'all tasks in one process' : `one process per task × ${String(forks)}`}; ≥ ${String(warmupIterations)} warm-up runs (≥ ${String(warmupTime)} ms) + ${String(iterations)} timed runs per process`)
  console.table(rows)
}
