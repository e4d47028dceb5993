import { Tlb, WalkResult } from '/work/main/packages/x86-hw/src/index.ts'
const t = new Tlb(); const r = new WalkResult(); r.status = 0; r.level = 1; r.rw = 1; r.us = 1; r.dirty = 1
const las = new Float64Array(4096); for (let i = 0; i < 4096; i++) las[i] = 0x40000000 + i * 4096
let t0 = performance.now(); let n = 0
while (performance.now() - t0 < 1500) { t.flushAll(); for (let i = 0; i < 4096; i++) { r.pa = i * 4096; r.gpa = r.pa; t.insert(0, 0, las[i]!, r, 3) } n += 4096 }
console.log('insert', (n / 1.5 / 1e6).toFixed(2), 'M/s')
t0 = performance.now(); n = 0
while (performance.now() - t0 < 1500) { for (let i = 0; i < 4096; i++) { t.lookup(0, 0, las[i]!) } n += 4096 }
console.log('lookup(miss-heavy)', (n / 1.5 / 1e6).toFixed(2), 'M/s')
