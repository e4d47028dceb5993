/**
 * A complete minimal MMU strategy: TDP with 4-level EPT, one EPT per vCPU (no sharing), every
 * guest page mapped at 4 KiB on its first EPT violation. It implements the whole contract, so it
 * shows what a strategy author writes; the README quotes it and the tests run it end to end.
 */
import { z } from 'zod'
import { EPT_A, EPT_D, EPT_R, EPT_W, EPT_X, EptTranslator, type PhysMem } from '@mmusim/x86-hw'
import {
  defineMmuStrategy,
  type KernelOp,
  type KvmVcpu,
  type Memslot,
  type MemslotChange,
  type MmuInstance,
  type PageFault,
  RET_PF_EMULATE,
  RET_PF_FIXED,
  RET_PF_RETRY,
  RET_PF_SPURIOUS,
  type RetPf,
  type Vm,
} from '../index.ts'

const TWO32 = 2 ** 32
const RWX = EPT_R | EPT_W | EPT_X
const WB = 6 << 3

/** One vCPU's EPT: its root and every table page it allocated. */
interface DirectEpt {
  root: number
  /** Table pages below the root; `leafTables` are the level-1 ones (they hold the 4 KiB mappings). */
  tables: number[]
  leafTables: number[]
  translator: EptTranslator
}

/** Options: whether to set EPT A/D in the entries it creates. */
const optionsSchema = z.object({ preSetAccessed: z.boolean().default(true) }).strict()

/** Index of `gpa` at EPT level `level` (1..4). */
function index(gpa: number, level: number): number {
  return Math.floor(gpa / 2 ** (12 + 9 * (level - 1))) % 512
}

export const directMapStrategy = defineMmuStrategy({
  name: 'direct-map',
  apiVersion: 1,
  description: 'Minimal example: per-vCPU 4-level EPT, 4 KiB mappings created on EPT violations',
  capabilities: { hwMode: 'tdp', tdpFormat: 'ept', parallelFaults: false, dirtyLog: false, hugePages: false },
  optionsSchema,
  create(vm: Vm, options: z.infer<typeof optionsSchema>): MmuInstance {
    const mem: PhysMem = vm.host.mem
    const epts: (DirectEpt | null)[] = []
    const leafBits = RWX | WB | (options.preSetAccessed ? EPT_A | EPT_D : 0)
    let retries = 0

    const eptOf = (vcpu: KvmVcpu): DirectEpt | null => epts[vcpu.id] ?? null

    /** Walk to the leaf entry for `gpa`, allocating tables when `create`; returns its HPA or -1. */
    function leafEntry(ept: DirectEpt, gpa: number, create: boolean): number {
      let table = ept.root
      for (let level = 4; level > 1; level--) {
        const ea = table + index(gpa, level) * 8
        const lo = mem.read32(ea)
        if ((lo & RWX) === 0) {
          if (!create) return -1
          const page = vm.allocMmuPage()
          ept.tables.push(page)
          if (level === 2) ept.leafTables.push(page)
          mem.write64(ea, (page % TWO32) + RWX, Math.floor(page / TWO32))
          table = page
        } else {
          table = ((lo & 0xfffff000) >>> 0) + (mem.read32(ea + 4) & 0xfffff) * TWO32
        }
      }
      return table + index(gpa, 1) * 8
    }

    function zapRange(startGfn: number, endGfn: number): boolean {
      let zapped = false
      for (const ept of epts) {
        if (ept === null) continue
        for (let gfn = startGfn; gfn < endGfn; gfn++) {
          const ea = leafEntry(ept, gfn * 4096, false)
          if (ea >= 0 && (mem.read32(ea) & RWX) !== 0) {
            mem.write64(ea, 0, 0)
            vm.stats.pages_4k--
            zapped = true
          }
        }
      }
      return zapped
    }

    function freeEpt(ept: DirectEpt): void {
      // The 4 KiB mappings disappear with their tables (the pages_4k gauge follows).
      for (const t of ept.leafTables) for (let i = 0; i < 512; i++) if ((mem.read32(t + i * 8) & RWX) !== 0) vm.stats.pages_4k--
      for (const t of ept.tables) vm.freeMmuPage(t)
      vm.freeMmuPage(ept.root)
    }

    return {
      vcpuCreate(vcpu) {
        epts[vcpu.id] = null
      },
      hasValidRoot: (vcpu) => eptOf(vcpu) !== null,
      *load(vcpu): KernelOp<number> {
        const root = vm.allocMmuPage()
        const ept: DirectEpt = { root, tables: [], leafTables: [], translator: new EptTranslator(mem, vm.features, { root, levels: 4, adEnabled: false }) }
        epts[vcpu.id] = ept
        vcpu.hw.setTdpMode(mem, ept.translator, 1)
        vcpu.hw.flushCurrent() // kvm_mmu_load(): the provenance of a new root is unknown
        yield 0
        return 0
      },
      *unload(vcpu) {
        const ept = eptOf(vcpu)
        if (ept !== null) freeEpt(ept)
        epts[vcpu.id] = null
      },
      *pageFault(vcpu, fault: PageFault): KernelOp<RetPf> {
        const ept = eptOf(vcpu)
        if (ept === null) return RET_PF_RETRY
        // kvm_faultin_pfn(): snapshot mmu_invalidate_seq, then resolve the host page (may sleep);
        // an invalidation in that window makes the fault retry instead of installing a stale pfn.
        const seq = vm.notifierState.seq
        const gfn = Math.floor(fault.addr / 4096)
        // No memslot (or a read-only one): KVM's MMIO path. The core emulates the access (open bus).
        const hpa = vcpu.guestMem.gpaToHpa(gfn * 4096, true)
        if (hpa < 0) return RET_PF_EMULATE
        yield vm.sched.costs.gup
        yield* vm.mmuLock.writeLock()
        try {
          // mmu_invalidate_retry_gfn(): an invalidation raced with us; let the guest fault again.
          if (vm.notifierState.retryGfn(seq, gfn)) {
            retries++
            return RET_PF_RETRY
          }
          const ea = leafEntry(ept, gfn * 4096, true)
          if ((mem.read32(ea) & RWX) !== 0) return RET_PF_SPURIOUS
          mem.write64(ea, (hpa % TWO32) + leafBits, Math.floor(hpa / TWO32))
          vm.stats.pages_4k++
          return RET_PF_FIXED
        } finally {
          vm.mmuLock.writeUnlock()
        }
      },
      *resetContext() {
        // The EPT does not depend on the guest's paging mode.
      },
      *newPgd() {
        // Guest CR3 does not matter to a TDP MMU.
      },
      *invalidateGva() {
        // The core already flushed the hardware TLB entry; EPT entries are not per-GVA.
      },
      *invalidatePcid() {
        // Nothing cached per PCID.
      },
      *syncRoots() {
        // Nothing is ever unsync in a TDP MMU.
      },
      *flushTlbGuest() {
        // The core flushes the hardware context; no shadow state to sync.
      },
      *freeObsoleteRoots() {
        // Roots never become obsolete here (no fast zap).
      },
      *memslotChanged(change: MemslotChange) {
        const old = change.old
        if (old !== null && (change.kind === 'delete' || change.kind === 'move')) {
          yield* vm.mmuLock.writeLock()
          if (zapRange(old.baseGfn, old.baseGfn + old.npages)) vm.flushRemoteTlbs()
          vm.mmuLock.writeUnlock()
        }
      },
      unmapGfnRange: (_asId: number, _slot: Memslot, s: number, e: number) => zapRange(s, e),
      ageGfnRange: () => false,
      testAgeGfn: () => false,
      logDirtyPtMasked() {
        // No dirty logging (capabilities.dirtyLog is false).
      },
      *trackWrite() {
        // No gfn is write-tracked.
      },
      isWriteTracked: () => false,
      *zapAll() {
        yield* vm.mmuLock.writeLock()
        for (let i = 0; i < epts.length; i++) {
          const ept = epts[i] ?? null
          if (ept === null) continue
          freeEpt(ept)
          epts[i] = null
        }
        vm.mmuLock.writeUnlock()
      },
      *changeMmuPages() {
        // No page quota.
      },
      *destroy() {
        yield* this.zapAll()
      },
      stats: () => ({ epts: epts.filter((e) => e !== null).length, invalidation_retries: retries }),
      audit() {
        const tables = epts.reduce((n, e) => n + (e === null ? 0 : e.tables.length + 1), 0)
        return tables === vm.mmuPagesLive ? [] : [`direct-map: ${String(tables)} tables owned but ${String(vm.mmuPagesLive)} MMU pages allocated`]
      },
    }
  },
})
