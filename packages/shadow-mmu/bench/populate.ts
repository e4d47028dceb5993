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
 * Wall-clock figures are the median (p50) of MMUSIM_BENCH_ITERATIONS (default 8) timed runs after
 * MMUSIM_BENCH_WARMUP (default 6) untimed ones, with the best beside it: shared machines add long
 * outliers to a mean, and V8 needs several runs to optimize the fault path fully.
 */
import './debug-off.ts'
import { Bench } from 'tinybench'
import { type Cpu, forkStorm, GuestOs, memstress, type Routine } from '@mmusim/guest'
import { type MmuStrategy, Vm } from '@mmusim/kvm'
import { tuneV8ForSimulation } from '@mmusim/x86-hw'
import { legacyTdpStrategy, shadowStrategy } from '../src/index.ts'
import { setUpPopulate } from '../src/testing/populate-guest.ts'

// As the mmusim CLI does: V8's inlining budget for the simulator's chains of small methods.
tuneV8ForSimulation()

const MEM = 96 << 20
const iterations = Number(process.env.MMUSIM_BENCH_ITERATIONS ?? 8)
const warmupIterations = Number(process.env.MMUSIM_BENCH_WARMUP ?? 6)
const only = process.env.MMUSIM_BENCH_ONLY

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

const bench = new Bench({ iterations, time: 0, warmupIterations, warmupTime: 0 })
const outcomes = new Map<string, Outcome>()
for (const [wname, program] of workloads) {
  for (const [sname, strategy] of strategies) {
    for (const n of [1, 2, 4]) {
      const name = `${wname} | ${sname} | ${String(n)} vCPU`
      if (only !== undefined && !name.includes(only)) continue
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
await bench.run()

const rows = bench.tasks.map((t) => {
  const o = outcomes.get(t.name)!
  const r = t.result
  const ms = r.state === 'completed' ? r.latency.p50 : NaN
  const best = r.state === 'completed' ? r.latency.min : NaN
  return {
    task: t.name,
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
console.table(rows)
