import { PFERR_P, PFERR_W, RES_PF } from '@mmusim/x86-hw'
import type { Cpu, Routine } from '../cpu.ts'
import { KERNEL_TEXT_PAGES } from '../layout.ts'
import { kernelTextVa, patchKernelText } from '../mm-ops.ts'
import { flushTlbAllLocal } from '../tlb-flush.ts'

/** Parameters of {@link cr0WpToggle}. */
export interface Cr0WpToggleParams {
  /** Patches per vCPU (each toggles CR0.WP off and on). @default 64 */
  iterations?: number
  /** Every this many patches, a global flush by toggling CR4.PGE (0: never). @default 8 */
  pgeEvery?: number
}

/** The value vCPU `cpu` patches in at iteration `it`. */
export function patchValue(cpu: number, it: number): number {
  return (0xcc000000 + cpu * 0x10000 + it) >>> 0
}

/**
 * CR0.WP toggling (KVM's `toggle_cr0_wp` vmexit test; the old `text_poke`): each iteration
 * patches a word of read-only kernel text with CR0.WP cleared, reads it back (must be the new
 * value), and probes a write with CR0.WP set (must #PF with P|W). Every `pgeEvery` iterations it
 * flushes the whole TLB by toggling CR4.PGE (`__flush_tlb_global`). vCPUs patch disjoint words.
 *
 * Exact counts per vCPU: cr0WpToggles = iterations; pgeToggles = floor(iterations / pgeEvery).
 */
export function* cr0WpToggle(cpu: Cpu, params: Cr0WpToggleParams = {}): Routine {
  const iterations = params.iterations ?? 64
  const pgeEvery = params.pgeEvery ?? 8
  yield* cpu.kernelMode()
  for (let it = 0; it < iterations; it++) {
    const page = it % KERNEL_TEXT_PAGES
    const word = 64 + cpu.id * 16 + (it % 16)
    const v = patchValue(cpu.id, it)
    yield* patchKernelText(cpu, page, word, v)
    const got = yield* cpu.kread32(kernelTextVa(page, word))
    if (got !== v) cpu.mismatch(kernelTextVa(page, word), v, got)
    const st = yield* cpu.tryWrite32(kernelTextVa(page, word), 0)
    if (st !== RES_PF || cpu.op.errorCode !== (PFERR_P | PFERR_W)) cpu.mismatch(kernelTextVa(page, word), RES_PF, st)
    if (pgeEvery > 0 && (it + 1) % pgeEvery === 0) yield* flushTlbAllLocal(cpu)
  }
}
