import { ACC_WRITE, type AccessKind, type NestedTranslator, type WalkResult } from '@mmusim/x86-hw'
import type { HostMemory } from './host-memory.ts'
import { gfnToHvaMemslot, KVM_MEM_READONLY, type Memslot, MemslotCache, type Memslots } from './memslot.ts'

/**
 * Guest-physical memory as KVM sees it: GPA → memslot → HVA → host page (GUP). Implements
 * {@link NestedTranslator} so KVM's *software* walks of guest page tables (FNAME(walk_addr) in the
 * shadow MMU, the emulator's gva_to_gpa) reuse the hardware walker with exactly the SDM rules,
 * reading and A/D-updating guest tables in host memory. Models kvm_vcpu_gfn_to_hva() +
 * hva_to_pfn(); writes mark the page dirty in the dirty log (mark_page_dirty_in_slot).
 */
export class GuestMemory implements NestedTranslator {
  readonly ptAccessIsWrite = false
  readonly memslots: Memslots
  readonly host: HostMemory
  asId: number
  readonly cache = new MemslotCache()
  /** The memslot of the last successful translation. */
  lastSlot: Memslot | null = null

  constructor(memslots: Memslots, host: HostMemory, asId = 0) {
    this.memslots = memslots
    this.host = host
    this.asId = asId
  }

  /**
   * Translate `gpa` for an access. Never fails: a GPA that is not backed (see {@link gpaToHpa}'s
   * -1/-2) gives an address beyond host memory, which PhysMem treats as open bus (reads all ones,
   * writes dropped).
   */
  translate(gpa: number, kind: AccessKind, _final: boolean, _res: WalkResult): number {
    const hpa = this.gpaToHpa(gpa, kind === ACC_WRITE)
    return hpa >= 0 ? hpa : this.host.mem.sizeBytes + (gpa % 4096)
  }

  /** GPA → HPA, -1 if no memslot (MMIO), -2 if the host refused (read-only slot/mapping on write, no VMA). */
  gpaToHpa(gpa: number, write: boolean): number {
    const gfn = Math.floor(gpa / 4096)
    const slot = this.memslots.gfnToMemslot(this.asId, gfn, this.cache)
    if (slot === null) return -1
    if (write && (slot.flags & KVM_MEM_READONLY) !== 0) return -2
    const off = gpa - gfn * 4096
    const pfn = this.host.resolvePfn(gfnToHvaMemslot(slot, gfn) + off, write)
    if (pfn < 0) return -2
    if (write) this.memslots.markPageDirty(slot, gfn)
    this.lastSlot = slot
    return pfn * 4096 + off
  }

  /** kvm_vcpu_read_guest of a 32-bit word; returns -1 when the GPA is not readable guest memory. */
  read32(gpa: number): number {
    const hpa = this.gpaToHpa(gpa, false)
    return hpa < 0 ? -1 : this.host.mem.read32(hpa)
  }

  /** kvm_vcpu_write_guest of a 32-bit word; false when the GPA is not writable guest memory. */
  write32(gpa: number, value: number): boolean {
    const hpa = this.gpaToHpa(gpa, true)
    if (hpa < 0) return false
    this.host.mem.write32(hpa, value >>> 0)
    return true
  }
}
