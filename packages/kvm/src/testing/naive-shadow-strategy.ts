/**
 * A deliberately naive shadow-paging strategy for the core's tests (the real one is
 * @mmusim/shadow-mmu): one 4-level shadow table per vCPU mapping GVA → HPA at 4 KiB, filled on
 * intercepted #PFs by a software walk of the guest tables, and thrown away on every CR3 load,
 * guest TLB flush and context reset. With `trackPageTables`, guest page-table pages are
 * write-protected and writes to them are emulated (RET_PF_EMULATE → page-track hook), which
 * exercises the core's emulation path. Correct for a guest that follows the TLB rules.
 */
import { z } from 'zod'
import { ACC_WRITE, tableIndex as index, PFERR_U, PTE_P, PTE_RW, PTE_US, type WalkResult, WalkResult as WalkResultClass, walk, WALK_OK, WALK_PF } from '@mmusim/x86-hw'
import { defineMmuStrategy, KVM_MEM_READONLY, type KernelOp, type KvmVcpu, type MmuInstance, type PageFault, RET_PF_EMULATE, RET_PF_FIXED, RET_PF_RETRY, type RetPf, type Vm } from '../index.ts'

const TWO32 = 2 ** 32

interface ShadowTable {
  root: number
  tables: number[]
}

const optionsSchema = z.object({ trackPageTables: z.boolean().default(false) }).strict()


export const naiveShadowStrategy = defineMmuStrategy({
  name: 'naive-shadow',
  apiVersion: 1,
  description: 'Test strategy: per-vCPU 4K shadow tables rebuilt on every flush',
  capabilities: { hwMode: 'shadow', parallelFaults: false, dirtyLog: false, hugePages: false },
  optionsSchema,
  create(vm: Vm, options: z.infer<typeof optionsSchema>): MmuInstance {
    const mem = vm.host.mem
    const shadows: (ShadowTable | null)[] = []
    /** gfns of guest page tables seen by walks (write-protected when tracking). */
    const tracked = new Set<number>()
    const res: WalkResult = new WalkResultClass()
    let emulated = 0
    let tracks = 0

    function drop(vcpu: KvmVcpu): void {
      const s = shadows[vcpu.id] ?? null
      if (s === null) return
      for (const t of s.tables) vm.freeMmuPage(t)
      vm.freeMmuPage(s.root)
      shadows[vcpu.id] = null
    }

    function dropAll(): void {
      for (const v of vm.vcpus) drop(v)
    }

    function leafEntry(s: ShadowTable, gva: number, create: boolean): number {
      let table = s.root
      for (let level = 4; level > 1; level--) {
        const ea = table + index(gva, level) * 8
        const lo = mem.read32(ea)
        if ((lo & PTE_P) === 0) {
          if (!create) return -1
          const page = vm.allocMmuPage()
          s.tables.push(page)
          mem.write64(ea, (page % TWO32) + (PTE_P | PTE_RW | PTE_US), Math.floor(page / TWO32))
          table = page
        } else table = ((lo & 0xfffff000) >>> 0) + (mem.read32(ea + 4) & 0xfffff) * TWO32
      }
      return table + index(gva, 1) * 8
    }

    const instance: MmuInstance = {
      vcpuCreate(vcpu) {
        shadows[vcpu.id] = null
      },
      hasValidRoot: (vcpu) => (shadows[vcpu.id] ?? null) !== null,
      *load(vcpu): KernelOp<number> {
        const root = vm.allocMmuPage()
        shadows[vcpu.id] = { root, tables: [] }
        vcpu.hw.loadShadowRoot(root)
        vcpu.hw.flushCurrent()
        return 0
      },
      *unload(vcpu) {
        drop(vcpu)
      },
      *pageFault(vcpu, fault: PageFault): KernelOp<RetPf> {
        const s = shadows[vcpu.id] ?? null
        if (s === null) return RET_PF_RETRY
        const gva = fault.addr
        // FNAME(walk_addr): the guest's own tables, with its own control state.
        const st = walk(mem, vcpu.hw.ctx, vcpu.hw.state, gva, fault.kind, false, vcpu.guestMem, res)
        if (st === WALK_PF) {
          vcpu.injectPageFault(gva, res.errorCode)
          return RET_PF_RETRY
        }
        if (st !== WALK_OK) throw new Error(`naive-shadow: walk of 0x${gva.toString(16)} ended with status ${String(st)}`)
        const gfn = Math.floor(res.gpa / 4096)
        // No memslot, or a write to a read-only one: KVM's MMIO path; the core emulates (open bus).
        const slot = vm.memslots.gfnToMemslot(vcpu.asId, gfn, vcpu.memslotCache)
        const readonlySlot = slot !== null && (slot.flags & KVM_MEM_READONLY) !== 0
        if (slot === null || (readonlySlot && fault.kind === ACC_WRITE)) return RET_PF_EMULATE
        if (options.trackPageTables) {
          for (let l = vcpu.hw.ctx.levels; l >= res.level && l >= 1; l--) tracked.add(Math.floor(res.pathGpa[l]! / 4096))
          if (fault.kind === ACC_WRITE && tracked.has(gfn)) {
            emulated++
            return RET_PF_EMULATE
          }
        }
        yield* vm.mmuLock.writeLock()
        try {
          const ea = leafEntry(s, gva, true)
          const user = (fault.errorCode & PFERR_U) !== 0
          let rw = res.rw !== 0 && res.dirty !== 0
          let us = res.us
          // CR0.WP=0: a supervisor write to a read-only page is allowed; map it writable but
          // supervisor-only (KVM's trick, since hardware runs with WP=1).
          if (!vcpu.hw.ctx.wp && !user && fault.kind === ACC_WRITE) {
            rw = true
            us = 0
          }
          if ((options.trackPageTables && tracked.has(gfn)) || readonlySlot) rw = false
          const hpa = res.pa - (res.pa % 4096)
          mem.write64(ea, ((hpa % TWO32) | PTE_P | (rw ? PTE_RW : 0) | (us !== 0 ? PTE_US : 0)) >>> 0, (Math.floor(hpa / TWO32) | (res.xd !== 0 ? 0x80000000 : 0)) >>> 0)
          return RET_PF_FIXED
        } finally {
          vm.mmuLock.writeUnlock()
        }
      },
      *resetContext(vcpu) {
        drop(vcpu)
      },
      *newPgd(vcpu) {
        drop(vcpu)
      },
      *invalidateGva(vcpu, gva) {
        const s = shadows[vcpu.id] ?? null
        if (s === null) return
        const ea = leafEntry(s, gva, false)
        if (ea >= 0) mem.write64(ea, 0, 0)
      },
      *invalidatePcid(vcpu) {
        drop(vcpu)
      },
      *syncRoots(vcpu) {
        drop(vcpu)
      },
      *flushTlbGuest(vcpu) {
        drop(vcpu)
      },
      *freeObsoleteRoots() {
        // Never obsolete.
      },
      *memslotChanged() {
        dropAll()
        vm.flushRemoteTlbs()
      },
      unmapGfnRange: () => {
        dropAll()
        return true
      },
      ageGfnRange: () => false,
      testAgeGfn: () => false,
      logDirtyPtMasked() {
        // No dirty logging.
      },
      *trackWrite() {
        // A guest page-table write: every vCPU's shadow may now be stale.
        tracks++
        dropAll()
        vm.flushRemoteTlbs()
      },
      isWriteTracked: (_asId, gfn) => options.trackPageTables && tracked.has(gfn),
      *zapAll() {
        dropAll()
      },
      *changeMmuPages() {
        // No quota.
      },
      *destroy() {
        dropAll()
      },
      stats: () => ({ emulated, track_writes: tracks, tracked_gfns: tracked.size }),
      audit: () => [],
    }
    return instance
  },
})
