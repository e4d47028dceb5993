/**
 * mmusim simulator benchmarks (tinybench). Prints ops/s for the hot paths of the hardware model:
 * TLB-hit accesses (batched), cold 4-level walks, cold 2-D (EPT) walks.
 * Usage: pnpm bench [--json out.json] [--time ms]
 *
 * Runs with the debug self-checks off, as published builds do (see ./debug-off.ts, imported first).
 * The machine matters: on a shared 2-vCPU VM, other load moves these figures by 10–30%; note
 * `uptime` and compare runs made back to back.
 * To profile: bundle src/main.ts with esbuild (`bundle`, `platform: 'node'`, `format: 'esm'`,
 * `conditions: ['@mmusim/source']`, `define: { __DEBUG__: 'false' }`) and run `node --cpu-prof`
 * on the bundle; `node --perf-prof` with `perf record -k 1` / `perf inject --jit` gives
 * per-instruction profiles.
 */
import './debug-off.ts'
import { writeFileSync } from 'node:fs'
import { Bench } from 'tinybench'
import { C_MEM_REFS, C_TLB_MISS, C_WALKS, DEBUG, tuneV8ForSimulation } from '@mmusim/x86-hw'
import { bareFixture, eptFixture } from './fixtures.ts'

// As the mmusim CLI does: V8's inlining budget for the simulator's chains of small methods.
tuneV8ForSimulation()

const args = process.argv.slice(2)
const jsonOut = args.includes('--json') ? args[args.indexOf('--json') + 1] : undefined
const time = args.includes('--time') ? Number(args[args.indexOf('--time') + 1]) : 1000

const results: { name: string; opsPerSec: number; rme: number; note: string }[] = []

// 1. TLB hits: 64 pages (fits the TLB), 4096 accesses per batch, all hits after warm-up.
const hit = bareFixture(64, 64)
hit.vcpu.accessMany(hit.las, hit.kinds, hit.las.length, hit.out)
// 2. Cold 4-level walks: flush the TLB before each batch so every access walks (4 refs).
const cold = bareFixture(4096, 1)
// 3. Cold 2-D walks: same under 4-level EPT (24 refs each).
const cold2d = eptFixture(4096, 1)

const bench = new Bench({ time, warmupTime: 300 })
bench.add('TLB-hit access (batched)', () => {
  hit.vcpu.accessMany(hit.las, hit.kinds, hit.las.length, hit.out)
})
bench.add('cold 4-level walk', () => {
  cold.vcpu.tlb.flushAll()
  cold.vcpu.accessMany(cold.las, cold.kinds, cold.las.length, cold.out)
})
bench.add('cold 2-D walk (4-level guest over 4-level EPT)', () => {
  cold2d.vcpu.tlb.flushAll()
  cold2d.vcpu.accessMany(cold2d.las, cold2d.kinds, cold2d.las.length, cold2d.out)
})
bench.runSync()

const perCall = [hit.las.length, cold.las.length, cold2d.las.length]
console.log(`mmusim bench — node ${process.version}, ${String((await import('node:os')).cpus()[0]?.model)}, debug checks ${DEBUG ? 'ON (not what ships)' : 'off'}`)
bench.tasks.forEach((t, i) => {
  if (t.result.state !== 'completed') {
    console.log(`${t.name}: ${t.result.state}`)
    return
  }
  const ops = t.result.throughput.mean * perCall[i]!
  results.push({ name: t.name, opsPerSec: ops, rme: t.result.latency.rme, note: '' })
  console.log(`${t.name.padEnd(48)} ${(ops / 1e6).toFixed(2).padStart(8)} M ops/s  ±${t.result.latency.rme.toFixed(1)}%`)
})
// Deterministic counters that explain the figures.
const c = cold.vcpu.counters
const c2 = cold2d.vcpu.counters
console.log(`refs per cold walk: native ${(c[C_MEM_REFS]! / c[C_WALKS]!).toFixed(2)}, 2-D ${(c2[C_MEM_REFS]! / c2[C_WALKS]!).toFixed(2)} (misses ${String(c2[C_TLB_MISS])})`)
if (jsonOut !== undefined) writeFileSync(jsonOut, JSON.stringify({ node: process.version, results }, null, 2))
