/**
 * @mmusim/shadow-mmu — KVM's mmu.c / paging_tmpl.h as two mmusim strategies:
 * - `shadow`: shadow paging (ept=0): indirect shadow pages over the guest's page tables, write
 *   protection and emulation of page-table writes, unsync level-1 pages, roots per CR3.
 * - `legacy-tdp`: the same MMU driving EPT with direct shadow pages (tdp_mmu=N), faults under
 *   the write lock.
 */
import { defineMmuStrategy, type Vm } from '@mmusim/kvm'
import { type LegacyTdpOptions, legacyTdpOptionsSchema, makeMmuConfig, type ShadowOptions, shadowOptionsSchema } from './options.ts'
import { ShadowMmu } from './shadow-mmu.ts'

export const shadowStrategy = defineMmuStrategy<ShadowOptions>({
  name: 'shadow',
  apiVersion: 1,
  description: "KVM's shadow MMU (ept=0): indirect shadow pages, write tracking, unsync pages, cached roots",
  capabilities: { hwMode: 'shadow', parallelFaults: false, dirtyLog: true, hugePages: true },
  optionsSchema: shadowOptionsSchema,
  create(vm: Vm, o: ShadowOptions): ShadowMmu {
    return new ShadowMmu(vm, makeMmuConfig('shadow', false, o))
  },
})

export const legacyTdpStrategy = defineMmuStrategy<LegacyTdpOptions>({
  name: 'legacy-tdp',
  apiVersion: 1,
  description: "KVM's legacy MMU driving EPT (tdp_mmu=N): direct shadow pages, faults under the write lock",
  capabilities: { hwMode: 'tdp', tdpFormat: 'ept', parallelFaults: false, dirtyLog: true, hugePages: true },
  optionsSchema: legacyTdpOptionsSchema,
  create(vm: Vm, o: LegacyTdpOptions): ShadowMmu {
    return new ShadowMmu(vm, makeMmuConfig('legacy-tdp', true, o))
  },
})

/** Both strategies of this package. */
export const strategies = [shadowStrategy, legacyTdpStrategy]

export default shadowStrategy

export { ShadowMmu, shadowMmuOf, type MmuHazards, type RootInfo, type SlotMmu, VcpuMmu, spteIndex, detectWriteMisaligned } from './shadow-mmu.ts'
export { MmuPage, PageList } from './mmu-page.ts'
export * from './mmu-page.ts'
export { GuestWalker } from './guest-walker.ts'
export { auditShadowMmu } from './audit.ts'
export { shadowOptionsSchema, legacyTdpOptionsSchema, type ShadowOptions, type LegacyTdpOptions, type MmuConfig } from './options.ts'
