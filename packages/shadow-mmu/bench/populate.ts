/**
 * Populate and fork-storm on the shadow and legacy-tdp strategies, 1/2/4 vCPUs: simulator
 * faults per second (wall clock, whole VM run) and simulated time. Run: `pnpm bench`.
 */
import { Bench } from 'tinybench'
import { type Cpu, forkStorm, GuestOs, memstress, type Routine } from '@mmusim/guest'
import { type MmuStrategy, Vm } from '@mmusim/kvm'
import { legacyTdpStrategy, shadowStrategy } from '../src/index.ts'

const MEM = 96 << 20

interface Outcome {
  faults: number
  simNs: number
  lockWaitNs: number
  shadowPages: number
  /** Wall time spent inside the MMU's pageFault (ms). */
  mmuMs: number
}

/** Time every step of the MMU's page-fault generator (excluding what other threads do while it waits). */
function instrument(vm: Vm): { ms: number } {
  const acc = { ms: 0 }
  const mmu = vm.mmu
  const orig = mmu.pageFault.bind(mmu)
  mmu.pageFault = function* (vcpu, fault) {
    const g = orig(vcpu, fault)
    let input: unknown = undefined
    for (;;) {
      const t0 = performance.now()
      const r = g.next(input)
      acc.ms += performance.now() - t0
      if (r.done === true) return r.value
      input = yield r.value
    }
  }
  return acc
}

function runOnce(strategy: MmuStrategy, vcpus: number, program: (cpu: Cpu) => Routine): Outcome {
  const vm = new Vm({ strategy, vcpus, hostMemBytes: 1 << 30 })
  vm.addMemory(0, MEM)
  const timer = instrument(vm)
  const os = new GuestOs({ memBytes: MEM, features: vm.features, ops: vm.vcpus.map((v) => v.guest.op), idt: vm.idt })
  for (const cpu of os.cpus) vm.spawnGuest(cpu.id, os.main(cpu, program))
  vm.run()
  if (os.totals().mismatches !== 0) throw new Error('guest saw wrong data')
  const out: Outcome = {
    faults: vm.vcpus.reduce((n, v) => n + v.stats.pf_taken, 0),
    simNs: vm.sched.now,
    lockWaitNs: vm.mmuLock.stats.write.waitNs,
    shadowPages: vm.mmuPagesAllocated,
    mmuMs: timer.ms,
  }
  vm.destroy()
  return out
}

const workloads: [string, (cpu: Cpu) => Routine][] = [
  ['populate 4 MiB/vCPU', (cpu) => memstress(cpu, { iterations: 1, bytesPerVcpu: 1024 * 4096 })],
  ['fork storm', (cpu) => forkStorm(cpu, { rounds: 3, pages: 32 })],
]
const strategies: [string, MmuStrategy][] = [
  ['shadow', shadowStrategy],
  ['legacy-tdp', legacyTdpStrategy],
]

const bench = new Bench({ iterations: 3, time: 0, warmup: true, warmupIterations: 1, warmupTime: 0 })
const outcomes = new Map<string, Outcome>()
for (const [wname, program] of workloads) {
  for (const [sname, strategy] of strategies) {
    for (const n of [1, 2, 4]) {
      const name = `${wname} | ${sname} | ${n} vCPU`
      bench.add(name, () => {
        outcomes.set(name, runOnce(strategy, n, program))
      })
    }
  }
}
await bench.run()

const rows = bench.tasks.map((t) => {
  const o = outcomes.get(t.name)!
  const r = t.result
  const ms = r.state === 'completed' ? r.latency.mean : NaN
  return {
    task: t.name,
    faults: o.faults,
    'wall ms': ms.toFixed(1),
    'faults/s (VM)': Math.round(o.faults / (ms / 1000)).toLocaleString('en-US'),
    'faults/s (MMU)': Math.round(o.faults / (o.mmuMs / 1000)).toLocaleString('en-US'),
    'sim µs': (o.simNs / 1000).toFixed(0),
    'sim ns/fault': (o.simNs / o.faults).toFixed(0),
    'mmu_lock wait µs': (o.lockWaitNs / 1000).toFixed(0),
    'MMU pages': o.shadowPages,
  }
})
console.table(rows)
