import { describe, expect, it } from 'vitest'
import { Vm } from '@mmusim/kvm'
import { sameHiddenClass } from '@mmusim/x86-hw'
import { legacyTdpStrategy, shadowOptionsSchema, shadowStrategy } from './index.ts'
import { shadowMmuOf } from './shadow-mmu.ts'
import { setUpPopulate } from './testing/populate-guest.ts'

// The fault path's compiled code checks the hidden class of every object it reads (the MMU's
// config, the walker's paging context and its features). An object that gets a new class in a
// later VM deoptimizes that code in every VM from then on: a benchmark series of VMs ran at less
// than half speed from the ninth VM on, when the config was built as `{ ...options, name, tdp }`.

describe('objects the fault path reads keep one hidden class from VM to VM', () => {
  for (const strategy of [shadowStrategy, legacyTdpStrategy]) {
    it(`${strategy.name}: config, walker context and features of 24 VMs`, () => {
      let first: { config: object; features: object; ctx: object } | null = null
      for (let i = 0; i < 24; i++) {
        const vm = new Vm({ strategy, vcpus: 1, hostMemBytes: 64 << 20 })
        setUpPopulate(vm, { vcpus: 1, bytesPerVcpu: 2 << 20 })
        vm.run()
        expect(vm.vcpus[0]!.stats.pf_fixed).toBeGreaterThan(0)
        const mmu = shadowMmuOf(vm)
        const walker = mmu.vmmu(vm.vcpus[0]!).walker
        // The software walker shares the vCPU's features; only its A-on-descent rule differs.
        expect(walker.ctx.features).toBe(vm.vcpus[0]!.hw.features)
        expect(walker.ctx.aOnDescent).toBe(false)
        expect(vm.vcpus[0]!.hw.ctx.aOnDescent).toBe(true)
        const cur = { config: mmu.config, features: walker.ctx.features, ctx: walker.ctx }
        if (first === null) first = cur
        else for (const k of ['config', 'features', 'ctx'] as const) expect(sameHiddenClass(cur[k], first[k]), `${k} of VM ${String(i)}`).toBe(true)
        vm.destroy()
      }
    })
  }

  it('the config holds every option of the strategy as parsed, plus name and tdp', () => {
    const vm = new Vm({ strategy: shadowStrategy, strategyOptions: { prefetch: false, pageQuota: 100 }, vcpus: 1 })
    const parsed = shadowOptionsSchema.parse({ prefetch: false, pageQuota: 100 })
    expect(shadowMmuOf(vm).config).toEqual({ ...parsed, name: 'shadow', tdp: false, eptLevels: 4, eptAdBits: true, fastPageFault: false })
    vm.destroy()
  })
})
