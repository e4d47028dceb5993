/**
 * @mmusim/guest — a miniature guest OS that drives the MMU the way Linux does (page tables in
 * guest memory edited through the vCPU, demand paging, copy-on-write, PCID context switches, TLB
 * shootdowns, reclaim, THP, CR0.WP/CR4.PGE traffic), and the workload programs that run on it.
 */
export * from './errors.js'
export * from './prng.js'
export * from './lackey.js'
export * from './layout.js'
export * from './frames.js'
export * from './cpu.js'
export * from './mm.js'
export * from './fault.js'
export * from './tlb-flush.js'
export * from './mm-ops.js'
export * from './guest-os.js'
export * from './run.js'
export * from './programs/memstress.js'
export * from './programs/fork-storm.js'
export * from './programs/ctx-switch-ring.js'
export * from './programs/mprotect-storm.js'
export * from './programs/gups.js'
export * from './programs/cr0wp-toggle.js'
export * from './programs/trace-replay.js'
