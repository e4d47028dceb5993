/**
 * A DELIBERATELY BROKEN strategy for the oracle and fuzzing tests: the kvm direct-map example,
 * except that the `wrongPageAfter`-th page it maps (counting EPT violations it fixes, 1-based)
 * is mapped to the host page of the *next* guest frame — the kind of off-by-one a real MMU bug
 * produces. Everything before that is correct, so small programs pass and larger ones diverge.
 * It wraps the example rather than copying it: only the pfn lookup of that one fault is skewed.
 */
import { z } from 'zod'
import { defineMmuStrategy, directMapStrategy, type KernelOp, type MmuInstance, type PageFault, RET_PF_FIXED, type RetPf, type Vm } from '@mmusim/kvm'

/** Options: the example's, plus which mapping to get wrong. */
const optionsSchema = z.object({ preSetAccessed: z.boolean().default(true), wrongPageAfter: z.number().int().positive().default(48) }).strict()

export const brokenStrategy = defineMmuStrategy({
  ...directMapStrategy,
  name: 'broken-wrong-page',
  description: 'BROKEN on purpose: maps one guest page to the wrong host page (oracle/fuzz tests)',
  optionsSchema,
  create(vm: Vm, options: z.infer<typeof optionsSchema>): MmuInstance {
    const inner = directMapStrategy.create(vm, { preSetAccessed: options.preSetAccessed })
    let fixed = 0
    return {
      ...inner,
      *pageFault(vcpu, fault: PageFault): KernelOp<RetPf> {
        if (fixed + 1 !== options.wrongPageAfter) {
          const r = yield* inner.pageFault(vcpu, fault)
          if (r === RET_PF_FIXED) fixed++
          return r
        }
        // The bug: resolve the pfn of the next guest frame for this one fault.
        const gm = vcpu.guestMem
        const real = gm.gpaToHpa.bind(gm)
        gm.gpaToHpa = (gpa: number, write: boolean) => real(gpa + 4096, write)
        try {
          const r = yield* inner.pageFault(vcpu, fault)
          if (r === RET_PF_FIXED) fixed++
          return r
        } finally {
          gm.gpaToHpa = real
        }
      },
    }
  },
})

export default brokenStrategy
