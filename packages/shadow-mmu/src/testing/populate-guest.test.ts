import { describe, expect, it } from 'vitest'
import { createReference, diffGuestMemory, Vm } from '@mmusim/kvm'
import { legacyTdpStrategy, shadowStrategy } from '../index.ts'
import { POPULATE_BASE, type PopulateLayout, populateProgram, setUpPopulate, writePopulateTables } from './populate-guest.ts'

/** Frames of the loader's page tables (A/D there may differ between platforms, see diffGuestMemory). */
function tableFrames(l: PopulateLayout): Set<number> {
  const s = new Set<number>([1, 2, 3])
  const pts = (l.vcpus * l.bytesPerVcpu) / 2 ** 21
  for (let i = 0; i < pts; i++) s.add(0x100 + i)
  return s
}

describe('populate guest (selftest populate pass with loader-built guest page tables)', () => {
  for (const [name, strategy] of [['shadow', shadowStrategy], ['legacy-tdp', legacyTdpStrategy]] as const) {
    for (const vcpus of [1, 2]) {
      it(`${name}, ${String(vcpus)} vCPU: one fault per page on shadow paging, memory equal to bare metal`, () => {
        const l: PopulateLayout = { vcpus, bytesPerVcpu: 4 << 20 }
        const pages = l.bytesPerVcpu / 4096
        const vm = new Vm({ strategy, vcpus, hostMemBytes: 64 << 20 })
        setUpPopulate(vm, l)
        vm.run()
        const ref = createReference(vm)
        writePopulateTables(ref.mem, l)
        for (let c = 0; c < vcpus; c++) ref.spawn(c, populateProgram(ref.threads[c]!.op, l, c))
        ref.run()
        expect(diffGuestMemory(vm, ref, 5, tableFrames(l))).toEqual([])
        // vCPU 1's last page holds its value: (1 << 20) + 1023.
        expect(vm.guestMem.read32(POPULATE_BASE + vcpus * l.bytesPerVcpu - 4096)).toBe((((vcpus - 1) << 20) + pages - 1) >>> 0)
        for (const v of vm.vcpus) {
          if (name === 'shadow') {
            // Neighbouring gptes are not Accessed yet, so prefetch maps none: exactly one fault per page.
            expect(v.stats.pf_taken).toBe(pages)
            expect(v.stats.pf_fixed).toBe(pages)
            expect(v.stats.pf_emulate).toBe(0)
          } else {
            // EPT violations: the data pages, plus the guest page tables the hardware walk touches first.
            expect(v.stats.pf_fixed).toBeGreaterThanOrEqual(pages)
            expect(v.stats.pf_fixed).toBeLessThanOrEqual(pages + 3 + (l.vcpus * l.bytesPerVcpu) / 2 ** 21)
          }
        }
        vm.destroy()
      })
    }
  }

  it('rejects a layout it cannot map', () => {
    expect(() => { writePopulateTables({ write32: () => undefined }, { vcpus: 1, bytesPerVcpu: 4096 }); }).toThrow(/multiple of 2 MiB/)
    expect(() => { writePopulateTables({ write32: () => undefined }, { vcpus: 64, bytesPerVcpu: 1 << 30 }); }).toThrow(/PTs in all/)
  })
})
