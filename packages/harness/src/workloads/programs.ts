import { contextSwitchRing, cr0WpToggle, forkStorm, gups, loadLackeyBatches, type LackeyBatch, mprotectStorm, traceReplay } from '@mmusim/guest'
import { fileURLToPath } from 'node:url'
import { defineWorkload, fmtTs, memFor, type Params, type WorkloadContext } from '../workload.ts'

const M = 2 ** 20
const num = (p: Params, k: string): number => p[k] as number

/** Report a phase's simulated time `t` (ns) as metric `name` (seconds) and as a line `name: t` (+ `extra`). */
function reportTime(ctx: WorkloadContext, name: string, t: number, extra = ''): void {
  ctx.metric(name, t / 1e9)
  ctx.line(`${name}: ${fmtTs(t)}${extra}`)
}

/** The lackey trace bundled with the harness (valgrind --tool=lackey --trace-mem=yes /bin/true). */
export const DEFAULT_TRACE = fileURLToPath(new URL('./traces/lackey-true.txt', import.meta.url))

/** fork-storm: rmap_fork / process creation (CoW). */
export const forkStormWorkload = defineWorkload({
  name: 'fork-storm',
  mirrors: "Peter Xu's rmap_fork; VMware 'process creation'",
  description: 'each vCPU: a process writes its pages, forks children that check and CoW-write them, repeatedly',
  params: [
    { name: 'vcpus', flag: 'v', type: 'int', default: 1, min: 1, max: 64, description: 'vCPUs' },
    { name: 'pages', type: 'int', default: 16, min: 1, description: 'pages of the parent' },
    { name: 'rounds', type: 'int', default: 4, min: 1, description: 'fork rounds' },
    { name: 'children', type: 'int', default: 2, min: 1, description: 'children per round' },
    { name: 'childWrites', type: 'int', default: 4, min: 0, description: 'CoW writes per child' },
    { name: 'parentWrites', type: 'int', default: 4, min: 0, description: 'writes by the parent per round' },
  ],
  metrics: ['fork storm time'],
  raceFree: () => true,
  memBytes: (p, v) => memFor(num(p, 'pages') * 4096 * (2 + num(p, 'children')) * 2, v),
  run(ctx) {
    const p = ctx.params
    const t = ctx.guest('fork storm', (cpu) =>
      forkStorm(cpu, { pages: num(p, 'pages'), rounds: num(p, 'rounds'), children: num(p, 'children'), childWrites: num(p, 'childWrites'), parentWrites: num(p, 'parentWrites'), seed: ctx.seed }),
    ).simNs
    reportTime(ctx, 'fork storm time', t)
  },
})

/** context-switch: lmbench lat_ctx. */
export const contextSwitchWorkload = defineWorkload({
  name: 'context-switch',
  mirrors: 'lmbench lat_ctx (pipe ring); VMware "context switch"',
  description: 'each vCPU switches around a ring of processes (CR3 loads with and without PCID no-flush)',
  params: [
    { name: 'vcpus', flag: 'v', type: 'int', default: 1, min: 1, max: 64, description: 'vCPUs' },
    { name: 'processes', type: 'int', default: 4, min: 2, description: 'processes in the ring' },
    { name: 'laps', type: 'int', default: 8, min: 1, description: 'laps around the ring' },
  ],
  metrics: ['context switch time'],
  raceFree: () => true,
  memBytes: (_p, v) => memFor(2 * M, v),
  run(ctx) {
    const p = ctx.params
    const t = ctx.guest('context switches', (cpu) => contextSwitchRing(cpu, { processes: num(p, 'processes'), laps: num(p, 'laps') })).simNs
    reportTime(ctx, 'context switch time', t)
  },
})

/** mprotect-storm: mmap/mprotect/munmap churn in one mm shared by the vCPUs (shootdowns). */
export const mprotectStormWorkload = defineWorkload({
  name: 'mprotect-storm',
  mirrors: 'mmap/mprotect/munmap churn (VMware "mmap" class)',
  description: 'threads of one process map, write, write-protect (a write then faults), unprotect and unmap; TLB shootdowns with >1 vCPU',
  params: [
    { name: 'vcpus', flag: 'v', type: 'int', default: 2, min: 1, max: 64, description: 'vCPUs' },
    { name: 'pages', type: 'int', default: 8, min: 1, description: 'pages per mapping' },
    { name: 'iterations', type: 'int', default: 4, min: 1, description: 'iterations' },
  ],
  metrics: ['mprotect storm time'],
  raceFree: (_p, v) => v === 1,
  memBytes: (_p, v) => memFor(2 * M, v),
  run(ctx) {
    const p = ctx.params
    const t = ctx.guest('mprotect storm', (cpu) => mprotectStorm(cpu, { pages: num(p, 'pages'), iterations: num(p, 'iterations') })).simNs
    reportTime(ctx, 'mprotect storm time', t)
  },
})

/** gups: HPCC RandomAccess (TLB-miss heavy). */
export const gupsWorkload = defineWorkload({
  name: 'gups',
  mirrors: 'HPCC RandomAccess (GUPS); BadgerTrap-style TLB-miss-heavy walk',
  description: 'random read-modify-write updates over a region much larger than TLB reach (walks, refs per walk)',
  params: [
    { name: 'vcpus', flag: 'v', type: 'int', default: 1, min: 1, max: 64, description: 'vCPUs' },
    { name: 'bytesPerVcpu', flag: 'b', type: 'size', default: 4 * M, selftestDefault: 256 * M, min: 2 * M, description: 'table size per vCPU' },
    { name: 'updates', type: 'int', default: 8192, min: 1, description: 'updates per vCPU' },
    { name: 'thp', type: 'bool', default: false, description: 'back the table with 2 MiB THP (guest and host)' },
  ],
  metrics: ['gups time', 'GUPS'],
  raceFree: () => true,
  memBytes: (p, v) => memFor(num(p, 'bytesPerVcpu'), v, p.thp === true ? 4 * M * v : 0),
  thpBacking: (p) => p.thp === true,
  run(ctx) {
    const p = ctx.params
    const t = ctx.guest('gups', (cpu) => gups(cpu, { bytesPerVcpu: num(p, 'bytesPerVcpu'), updates: num(p, 'updates'), thp: p.thp === true, seed: ctx.seed })).simNs
    const rate = t === 0 ? 0 : (num(p, 'updates') * ctx.vcpus) / t
    reportTime(ctx, 'gups time', t, ` (${rate.toFixed(6)} GUPS)`)
    ctx.metric('GUPS', rate)
  },
})

/** cr0wp-toggle: vmexit toggle_cr0_wp / Krause's ssdd benchmark (§B.12(3)). */
export const cr0WpToggleWorkload = defineWorkload({
  name: 'cr0wp-toggle',
  mirrors: 'kvm-unit-tests vmexit toggle_cr0_wp; Mathias Krause ssdd 10 50000 (grsecurity text patching)',
  description: 'patch read-only kernel text by clearing and restoring CR0.WP (an MMU-role change each time), with periodic CR4.PGE toggles',
  params: [
    { name: 'vcpus', flag: 'v', type: 'int', default: 1, min: 1, max: 64, description: 'vCPUs' },
    { name: 'iterations', type: 'int', default: 64, min: 1, description: 'CR0.WP toggles per vCPU' },
    { name: 'pgeEvery', type: 'int', default: 8, min: 1, description: 'toggle CR4.PGE every N iterations' },
  ],
  metrics: ['cr0.wp toggle time'],
  raceFree: () => true,
  memBytes: (_p, v) => memFor(2 * M, v),
  run(ctx) {
    const p = ctx.params
    const t = ctx.guest('cr0.wp toggles', (cpu) => cr0WpToggle(cpu, { iterations: num(p, 'iterations'), pgeEvery: num(p, 'pgeEvery') })).simNs
    reportTime(ctx, 'cr0.wp toggle time', t)
  },
})

/** trace-replay: a valgrind lackey trace replayed in a guest process on vCPU 0. */
export const traceReplayWorkload = defineWorkload({
  name: 'trace-replay',
  mirrors: 'valgrind --tool=lackey --trace-mem=yes',
  description: 'replay a lackey memory trace (I/L/S/M records) at CPL 3 on vCPU 0; every touched page demand-faults',
  params: [
    { name: 'trace', type: 'string', default: 'bundled:lackey-true', description: "path to a lackey trace ('bundled:lackey-true' is /bin/true's)" },
    { name: 'maxRecords', type: 'int', default: 200_000, min: 1, description: 'records to replay at most' },
  ],
  metrics: ['trace replay time', 'records'],
  raceFree: () => true,
  memBytes: () => memFor(16 * M, 1),
  prepare: async (p) => loadLackeyBatches(p.trace === 'bundled:lackey-true' ? DEFAULT_TRACE : String(p.trace), { maxRecords: num(p, 'maxRecords') }),
  run(ctx) {
    const batches = ctx.prepared as LackeyBatch[]
    const t = ctx.guest('replay', (cpu) => traceReplay(cpu, { batches }), [0]).simNs
    const records = batches.reduce((n, b) => n + b.count, 0)
    reportTime(ctx, 'trace replay time', t, ` (${String(records)} records)`)
    ctx.metric('records', records)
  },
})

/** The guest-program workloads (beyond the selftest family). */
export const programWorkloads = [forkStormWorkload, contextSwitchWorkload, mprotectStormWorkload, gupsWorkload, cr0WpToggleWorkload, traceReplayWorkload]
