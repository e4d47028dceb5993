import { it } from 'vitest'
import { runGuest } from '../run.js'
import { memstress } from './memstress.js'
import { forkStorm } from './fork-storm.js'
import { contextSwitchRing } from './ctx-switch-ring.js'
import { mprotectStorm } from './mprotect-storm.js'
import { gups } from './gups.js'
import { cr0WpToggle } from './cr0wp-toggle.js'
import type { Cpu, Routine } from '../cpu.js'

const progs: [string, (cpu: Cpu) => Routine][] = [
  ['memstress', (c) => memstress(c, { bytesPerVcpu: 64 * 4096, iterations: 2, writePercent: 50, randomAccess: true })],
  ['memstress-thp', (c) => memstress(c, { bytesPerVcpu: 2 ** 21, iterations: 2, thp: true })],
  ['fork', (c) => forkStorm(c)],
  ['ring', (c) => contextSwitchRing(c, { processes: 8 })],
  ['mprotect', (c) => mprotectStorm(c)],
  ['gups', (c) => gups(c)],
  ['cr0wp', (c) => cr0WpToggle(c)],
]
for (const [name, p] of progs) {
  for (const n of [1, 2, 4]) {
    it(`${name} ${n}`, () => {
      const t0 = performance.now()
      const r = runGuest(p, { vcpus: n })
      const s = r.stats
      console.log(name, n, Math.round(performance.now() - t0), 'ms acc', r.accesses, 'pf', r.pageFaults, 'mm', r.mismatches, 'segv', r.sigsegv, 'cow', s.cowCopies, s.cowReuses, 'anon', s.anonFaults, 'zero', s.zeroPageFaults, 'sd', s.shootdowns, 'thp', s.thpFaults, 'cs', s.contextSwitches, s.cr3Flushes, s.cr3NoFlush, 'ops', r.perCpu.map((c) => c.ops).join(','), 'frames', r.frames.allocated, r.mismatchLog.slice(0, 2))
    })
  }
}
