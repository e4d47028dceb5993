/**
 * Populate benchmark (issue 5): every vCPU touches each 4 KiB page of its own 64 MiB region once
 * (one write per page, guest paging off so each touch is exactly one EPT violation), with 1, 2, 4
 * and 8 vCPUs on the TDP MMU. Prints the simulator's speed (faults per wall-clock second, measured
 * by tinybench over fresh VMs) and the simulated populate time, which should stay nearly flat as
 * vCPUs are added because faults run in parallel under mmu_lock held for read.
 *
 *   pnpm --filter @mmusim/tdp-mmu bench    (MMUSIM_BENCH_ITERATIONS=10, MMUSIM_BENCH_WARMUP=8 by default)
 *
 * Wall-clock figures are the median (p50) of the timed runs, with the best and the mean beside it:
 * shared machines add long outliers to a mean, and V8 needs several runs before the fault path is
 * fully optimized (hence the warm-up runs, which are not timed).
 */
import './debug-off.ts'
import { Bench } from 'tinybench'
import { Vm } from '@mmusim/kvm'
import { tuneV8ForSimulation } from '@mmusim/x86-hw'
import { tdpStrategy } from '../src/index.ts'
import { pageBatch, rawGuest, WRITE } from '../src/testing/raw-guest.ts'

// As the mmusim CLI does: V8's inlining budget for the simulator's chains of small methods.
tuneV8ForSimulation()

const REGION = 64 << 20
const PAGES = REGION / 4096
const GPA_BASE = 1 << 30
const iterations = Number(process.env.MMUSIM_BENCH_ITERATIONS ?? 10)
const warmupIterations = Number(process.env.MMUSIM_BENCH_WARMUP ?? 8)

interface Sample {
  faults: number
  simNs: number
  mmuPages: number
  readWaitNs: number
}

function makeVm(vcpus: number): Vm {
  const vm = new Vm({ strategy: tdpStrategy, vcpus, hostMemBytes: vcpus * REGION + (64 << 20) })
  vm.addMemory(GPA_BASE, vcpus * REGION)
  for (let c = 0; c < vcpus; c++) {
    vm.spawnGuest(c, rawGuest(vm.vcpus[c]!.guest.op, [pageBatch(GPA_BASE + c * REGION, PAGES, WRITE, c << 20)]))
  }
  return vm
}

const bench = new Bench({ iterations, warmupIterations, time: 0, warmupTime: 0 })
const samples = new Map<number, Sample[]>()
for (const vcpus of [1, 2, 4, 8]) {
  let vm: Vm | null = null
  const list: Sample[] = []
  samples.set(vcpus, list)
  bench.add(
    `populate ${String(vcpus)} vCPU${vcpus > 1 ? 's' : ''} × 64 MiB`,
    () => {
      const v = vm!
      const t0 = v.sched.now
      v.run()
      list.push({
        faults: v.vcpus.reduce((n, x) => n + x.stats.pf_fixed, 0),
        simNs: v.sched.now - t0,
        mmuPages: v.mmuPagesLive,
        readWaitNs: v.mmuLock.stats.read.waitNs,
      })
    },
    {
      beforeEach() {
        vm = makeVm(vcpus)
      },
      afterEach() {
        // Outside the timed region; as the harness does, and it lets the next VM reuse the storage.
        vm?.destroy()
        vm = null
      },
    },
  )
}

await bench.run()

const rows = bench.tasks.map((task) => {
  const vcpus = Number(/populate (\d+)/.exec(task.name)![1])
  const list = samples.get(vcpus)!.slice(-iterations)
  const r = task.result
  if (r.state !== 'completed') throw new Error(`${task.name}: ${r.state}`)
  const faults = list[0]!.faults
  const { p50, min, mean } = r.latency
  const simMs = list.reduce((n, s) => n + s.simNs, 0) / list.length / 1e6
  const perSec = (ms: number) => Math.round(faults / (ms / 1000)).toLocaleString('en-US')
  return {
    vCPUs: vcpus,
    faults,
    'wall ms (p50)': p50.toFixed(1),
    'faults/s (p50)': perSec(p50),
    'faults/s (best)': perSec(min),
    'faults/s (mean)': perSec(mean),
    'simulated populate ms': simMs.toFixed(3),
    'sim ns/fault/vCPU': ((simMs * 1e6) / (faults / vcpus)).toFixed(0),
    'MMU pages': list[0]!.mmuPages,
  }
})
console.table(rows)
