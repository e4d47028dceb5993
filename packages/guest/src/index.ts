/**
 * @mmusim/guest — a miniature guest OS that drives the MMU the way Linux does (page tables in
 * guest memory edited through the vCPU, demand paging, copy-on-write, PCID context switches, TLB
 * shootdowns, reclaim, THP, CR0.WP/CR4.PGE traffic), and the workload programs that run on it.
 */
export * from './errors.ts'
export * from './prng.ts'
export * from './lackey.ts'
export * from './layout.ts'
export * from './frames.ts'
export * from './cpu.ts'
export * from './mm.ts'
export * from './fault.ts'
export * from './tlb-flush.ts'
export * from './mm-ops.ts'
export * from './guest-os.ts'
export * from './run.ts'
export * from './programs/memstress.ts'
export * from './programs/fork-storm.ts'
export * from './programs/ctx-switch-ring.ts'
export * from './programs/mprotect-storm.ts'
export * from './programs/gups.ts'
export * from './programs/cr0wp-toggle.ts'
export * from './programs/trace-replay.ts'
