import { type AccessObserver, Machine, type MachineOptions } from '@mmusim/x86-hw'
import type { Vm } from './vm.ts'

/**
 * The bare-metal reference of a VM: the same number of processors with the same CPU features and
 * TLB geometry, running directly on a guest-physical memory as large as the VM's highest memslot
 * (address space 0), with no hypervisor and no MMU. Every strategy is judged against it.
 */
export function createReference(vm: Vm, options: Partial<MachineOptions> = {}): Machine {
  let top = 0
  for (const slot of vm.memslots.space(0).sorted) top = Math.max(top, (slot.baseGfn + slot.npages) * 4096)
  const m = new Machine({ memBytes: top, vcpus: vm.vcpus.length, features: vm.features, ...options })
  m.idt = vm.idt
  return m
}

/** One differing 32-bit word between the VM's guest memory and the reference's. */
export interface MemoryDifference {
  gpa: number
  expected: number
  got: number
}

/**
 * Compare guest-physical memory word by word (address space 0, every memslot): the reference
 * machine's memory against the VM's (read through memslots and the host page table). Pages the
 * reference never backed are compared as zero. Returns up to `limit` differences.
 *
 * `pageTableFrames`: frames holding guest page tables. In them the A and D bits of each 64-bit
 * entry are not compared: the architecture lets a cached translation (a TLB entry, or a shadow
 * SPTE) serve accesses without setting A/D again after software cleared them, so their values
 * legitimately differ between platforms (x86-hw.md §6.3); everything else must match exactly.
 */
export function diffGuestMemory(vm: Vm, ref: Machine, limit = 20, pageTableFrames?: ReadonlySet<number>): MemoryDifference[] {
  const out: MemoryDifference[] = []
  for (const slot of vm.memslots.space(0).sorted) {
    for (let gfn = slot.baseGfn; gfn < slot.baseGfn + slot.npages; gfn++) {
      const refBacked = ref.mem.isBacked(gfn)
      const hva = slot.userspaceAddr + (gfn - slot.baseGfn) * 4096
      const host = vm.host.lookup(hva)
      if (!refBacked && host === null) continue
      const adFree = pageTableFrames?.has(gfn) === true
      for (let off = 0; off < 4096; off += 4) {
        const gpa = gfn * 4096 + off
        const expected = ref.mem.read32(gpa)
        const got = host === null ? 0 : vm.host.mem.read32(host.pfn * 4096 + off)
        // Bits 5 (A) and 6 (D) of the low word of each entry.
        const mask = adFree && off % 8 === 0 ? ~0x60 : ~0
        if ((expected & mask) !== (got & mask)) {
          out.push({ gpa, expected, got })
          if (out.length >= limit) return out
        }
      }
    }
  }
  return out
}

/** An access trace (per vCPU) for comparing runs: the reference's observer records into it. */
export class AccessTrace {
  readonly perCpu: number[][] = []

  /** An observer to pass to `Machine.run`. */
  readonly observer: AccessObserver = (cpu, la, kind, status, gpa, errorCode) => {
    let t = this.perCpu[cpu]
    if (t === undefined) this.perCpu[cpu] = t = []
    t.push(la, kind, status, gpa, errorCode)
  }
}
