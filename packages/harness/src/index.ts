/**
 * @mmusim/harness — MMU strategies as plugins, the KVM selftest workloads, the runner, the
 * differential oracle against bare metal, fuzzing, reports and the `mmusim` CLI.
 */
export * from './errors.ts'
export * from './loader.ts'
export * from './config.ts'
export * from './workload.ts'
export * from './params.ts'
export * from './session.ts'
export * from './trace.ts'
export * from './runner.ts'
export * from './compare.ts'
export * from './report.ts'
export * from './fuzz.ts'
export { main, createCli, workloadArgs, type CliIo } from './cli.ts'
export { DEFAULT_SUITE, getWorkload, WORKLOADS } from './workloads/index.ts'
export * from './shared-mm.ts'
