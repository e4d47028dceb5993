/**
 * A DELIBERATELY BROKEN strategy for the shared-mm fuzz tests: it LOSES REMOTE TLB FLUSHES.
 *
 * It is a "virtual TLB" shadow MMU (the oldest shadow-paging design): each vCPU has its own
 * 4-level shadow table mapping GVA → HPA at 4 KiB, filled on intercepted #PFs by a walk of the
 * guest's tables (which sets guest A/D exactly as the hardware walker does) and emptied whenever
 * the guest flushes its TLB (flushing CR3 loads, PCID invalidations, guest TLB flushes); INVLPG
 * zaps the one entry. A per-vCPU shadow then behaves like that vCPU's TLB, so it is exact for a
 * guest that follows the TLB rules — but only if every invalidation the guest sends reaches it.
 *
 * The optimisation that breaks it: guest page tables are write-tracked (writes to them exit and
 * are emulated; the shadow is not touched, like a hardware TLB), and INVLPG is *elided* when no
 * guest page-table write happened since the vCPU's shadow was last emptied — nothing can be stale.
 * The bug (`loseRemoteFlushes`, on by default) counts page-table writes per *writing* vCPU, so a
 * write by vCPU A never makes vCPU B's INVLPG zap anything: when A unmaps or write-protects a page
 * and shoots down B, B's INVLPG (sent by A's IPI) is a no-op and B keeps using the old translation
 * until its next flushing CR3 load. A flush initiated by the vCPU that changed the entry works, so
 * a vCPU running its own process never sees the bug; threads of one mm do.
 * With `loseRemoteFlushes: false` the count is VM-wide and the strategy is correct.
 */
import { z } from 'zod'
import { ACC_WRITE, tableIndex as index, PFERR_U, PTE_P, PTE_RW, PTE_US, WALK_OK, WALK_PF, walk, WalkResult } from '@mmusim/x86-hw'
import { defineMmuStrategy, type KernelOp, type KvmVcpu, type MmuInstance, type PageFault, RET_PF_EMULATE, RET_PF_FIXED, RET_PF_RETRY, type RetPf, type Vm } from '@mmusim/kvm'

const TWO32 = 2 ** 32

/** One vCPU's virtual TLB: its root and every table page below it (`leaves`: the level-1 ones). */
interface Vtlb {
  root: number
  tables: number[]
  leaves: number[]
}

const optionsSchema = z.object({ loseRemoteFlushes: z.boolean().default(true) }).strict()


/** The fixture: a per-vCPU virtual-TLB shadow MMU whose INVLPG elision loses remote flushes. */
export const lostRemoteFlushStrategy = defineMmuStrategy({
  name: 'broken-lost-remote-flush',
  apiVersion: 1,
  description: 'BROKEN on purpose: per-vCPU virtual-TLB shadow MMU whose INVLPG elision ignores page-table writes by other vCPUs (shared-mm fuzz tests)',
  capabilities: { hwMode: 'shadow', parallelFaults: false, dirtyLog: false, hugePages: false },
  optionsSchema,
  create(vm: Vm, options: z.infer<typeof optionsSchema>): MmuInstance {
    const mem = vm.host.mem
    const vtlbs: (Vtlb | null)[] = []
    /** gfns of guest paging structures seen by walks: write-protected, writes emulated. */
    const tracked = new Set<number>()
    const res = new WalkResult()
    /** Guest page-table writes: VM-wide (correct) and by writing vCPU (the bug). */
    let writes = 0
    const writesBy: number[] = []
    /** Per vCPU: the write count when its virtual TLB was last emptied. */
    const cleanAt: number[] = []
    let elided = 0
    let zapped = 0

    const stamp = (v: KvmVcpu): number => (options.loseRemoteFlushes ? (writesBy[v.id] ?? 0) : writes)

    function drop(v: KvmVcpu): void {
      const t = vtlbs[v.id] ?? null
      if (t === null) return
      for (const p of t.tables) vm.freeMmuPage(p)
      vm.freeMmuPage(t.root)
      vtlbs[v.id] = null
    }

    /** Empty a vCPU's virtual TLB (a guest TLB flush); the core loads a fresh root before the next entry. */
    function flush(v: KvmVcpu): void {
      drop(v)
    }

    function leafEntry(t: Vtlb, gva: number, create: boolean): number {
      let table = t.root
      for (let level = 4; level > 1; level--) {
        const ea = table + index(gva, level) * 8
        const lo = mem.read32(ea)
        if ((lo & PTE_P) === 0) {
          if (!create) return -1
          const page = vm.allocMmuPage()
          t.tables.push(page)
          if (level === 2) t.leaves.push(page)
          mem.write64(ea, (page % TWO32) + (PTE_P | PTE_RW | PTE_US), Math.floor(page / TWO32))
          table = page
        } else table = ((lo & 0xfffff000) >>> 0) + (mem.read32(ea + 4) & 0xfffff) * TWO32
      }
      return table + index(gva, 1) * 8
    }

    /** Start write-tracking a guest paging structure: write-protect every shadow entry that maps it. */
    function track(v: KvmVcpu, gfn: number): void {
      tracked.add(gfn)
      const hpa = v.guestMem.gpaToHpa(gfn * 4096, false)
      for (const t of vtlbs) {
        if (t === null) continue
        for (const leaf of t.leaves) {
          for (let i = 0; i < 512; i++) {
            const ea = leaf + i * 8
            const lo = mem.read32(ea)
            if ((lo & (PTE_P | PTE_RW)) !== (PTE_P | PTE_RW)) continue
            if (((lo & 0xfffff000) >>> 0) + (mem.read32(ea + 4) & 0xfffff) * TWO32 === hpa) mem.write32(ea, (lo & ~PTE_RW) >>> 0)
          }
        }
      }
      vm.flushRemoteTlbs()
    }

    return {
      vcpuCreate(v) {
        vtlbs[v.id] = null
        writesBy[v.id] = 0
        cleanAt[v.id] = 0
      },
      hasValidRoot: (v) => (vtlbs[v.id] ?? null) !== null,
      *load(v): KernelOp<number> {
        const root = vm.allocMmuPage()
        vtlbs[v.id] = { root, tables: [], leaves: [] }
        v.hw.loadShadowRoot(root)
        v.hw.flushCurrent()
        cleanAt[v.id] = stamp(v)
        yield 0
        return 0
      },
      *unload(v) {
        drop(v)
      },
      *pageFault(v, fault: PageFault): KernelOp<RetPf> {
        const t = vtlbs[v.id] ?? null
        if (t === null) return RET_PF_RETRY
        const gva = fault.addr
        const st = walk(mem, v.hw.ctx, v.hw.state, gva, fault.kind, false, v.guestMem, res)
        if (st === WALK_PF) {
          v.injectPageFault(gva, res.errorCode)
          return RET_PF_RETRY
        }
        if (st !== WALK_OK) throw new Error(`lost-remote-flush: walk of 0x${gva.toString(16)} ended with status ${String(st)}`)
        for (let l = v.hw.ctx.levels; l >= res.level && l >= 1; l--) {
          const g = Math.floor(res.pathGpa[l]! / 4096)
          if (!tracked.has(g)) track(v, g)
        }
        const gfn = Math.floor(res.gpa / 4096)
        if (fault.kind === ACC_WRITE && tracked.has(gfn)) return RET_PF_EMULATE
        // Everything from the walk is read before taking the lock: `res` is shared by the vCPUs.
        const user = (fault.errorCode & PFERR_U) !== 0
        let rw = res.rw !== 0 && res.dirty !== 0
        let us = res.us
        // CR0.WP=0: a supervisor write to a read-only page is allowed; map it writable but
        // supervisor-only (KVM's trick, since the hardware runs with WP=1).
        if (!v.hw.ctx.wp && !user && fault.kind === ACC_WRITE) {
          rw = true
          us = 0
        }
        const hpa = res.pa - (res.pa % 4096)
        const xd = res.xd !== 0
        yield* vm.mmuLock.writeLock()
        try {
          // The virtual TLB may have been emptied while this vCPU waited for the lock.
          const cur = vtlbs[v.id] ?? null
          if (cur !== t) return RET_PF_RETRY
          if (tracked.has(gfn)) rw = false
          const ea = leafEntry(t, gva, true)
          mem.write64(ea, ((hpa % TWO32) | PTE_P | (rw ? PTE_RW : 0) | (us !== 0 ? PTE_US : 0)) >>> 0, (Math.floor(hpa / TWO32) | (xd ? 0x80000000 : 0)) >>> 0)
          return RET_PF_FIXED
        } finally {
          vm.mmuLock.writeUnlock()
        }
      },
      *resetContext(v) {
        flush(v)
      },
      *newPgd(v) {
        flush(v)
      },
      *invalidateGva(v, gva) {
        const t = vtlbs[v.id] ?? null
        if (t === null) return
        // The elision: no guest page-table write since this virtual TLB was emptied, so every
        // entry in it still matches the guest's tables. (The bug: `stamp` only sees this vCPU's writes.)
        if (stamp(v) === cleanAt[v.id]) {
          elided++
          return
        }
        const ea = leafEntry(t, gva, false)
        if (ea >= 0) {
          mem.write64(ea, 0, 0)
          zapped++
        }
      },
      *invalidatePcid(v) {
        flush(v)
      },
      *syncRoots(v) {
        flush(v)
      },
      *flushTlbGuest(v) {
        flush(v)
      },
      *freeObsoleteRoots() {
        // Never obsolete.
      },
      *memslotChanged() {
        for (const v of vm.vcpus) flush(v)
        vm.flushRemoteTlbs()
      },
      unmapGfnRange: () => {
        for (const v of vm.vcpus) flush(v)
        return true
      },
      ageGfnRange: () => false,
      testAgeGfn: () => false,
      logDirtyPtMasked() {
        // No dirty logging.
      },
      *trackWrite(v) {
        // A guest page-table write: counted; the virtual TLBs keep their entries, as hardware TLBs do.
        writes++
        writesBy[v.id] = (writesBy[v.id] ?? 0) + 1
      },
      isWriteTracked: (_asId, gfn) => tracked.has(gfn),
      *zapAll() {
        for (const v of vm.vcpus) flush(v)
      },
      *changeMmuPages() {
        // No quota.
      },
      *destroy() {
        for (const v of vm.vcpus) drop(v)
      },
      stats: () => ({ tracked_gfns: tracked.size, pt_writes: writes, invlpg_elided: elided, invlpg_zapped: zapped }),
      audit: () => [],
    }
  },
})

export default lostRemoteFlushStrategy
