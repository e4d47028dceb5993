/**
 * FNAME(walk_addr_generic) for 4/5-level guests (paging_tmpl.h, shadow-mmu.md §8.3): the x86-hw
 * walker run on the guest's tables in host memory, with a private paging context whose
 * `nonLeafAOnDescent` is off, so — as KVM's software walker — A/D bits are written into guest
 * memory only after the walk succeeded (top-down, compare-and-exchange, restart on a lost race).
 * The per-level record FNAME(fetch) needs (table gfns, gPTE addresses and values, pt_access) is
 * derived from the walk's path.
 */
import {
  ACC_FETCH,
  ACC_WRITE,
  type AccessKind,
  type CpuState,
  type NestedTranslator,
  PagingContext,
  PFERR_I,
  PFERR_U,
  PFERR_W,
  walk,
  WALK_EXIT,
  WALK_OK,
  WALK_PF,
  WalkResult,
} from '@mmusim/x86-hw'
import type { GuestMemory, KvmVcpu } from '@mmusim/kvm'
import { ACC_ALL, ACC_EXEC_MASK, ACC_USER_MASK, ACC_WRITE_MASK } from './mmu-page.ts'

/** Entries of {@link GptTranslator}'s cache of guest-table frames. */
const TABLE_CACHE = 8

/**
 * The walker's second dimension: guest page-table GPAs go through the memslots to host memory
 * (`kvm_vcpu_gfn_to_hva` + `__get_user`); the final GPA is *not* touched (KVM's walker only
 * computes the gfn; the pfn is looked up later by the fault path).
 *
 * KVM reads a gPTE with `__get_user()` on its HVA, through the host's page tables and TLB; this
 * model keeps a small cache of the host frames of recently read guest tables (gfn → host address)
 * in that role. It holds only successful read translations and is dropped at the start of a walk
 * unless the host mapping (mmu_invalidate_seq, no invalidation in progress), the memslots (their
 * generation) and the address space are those it was filled under; writes (the A/D updates,
 * which mark the page dirty) always translate afresh.
 */
class GptTranslator implements NestedTranslator {
  readonly ptAccessIsWrite = false
  gm: GuestMemory | null = null
  /**
   * KVM's rule for a table no visible memslot backs (`!kvm_is_visible_memslot(slot)` or a failed
   * `get_user()` → `goto error`): the walk stops (-1). Off: the table reads as open bus.
   * A/D updates are never failures: KVM skips them for tables it cannot write.
   */
  kvmUnbacked = false
  private readonly cacheGfn = new Float64Array(TABLE_CACHE).fill(-1)
  private readonly cacheHpa = new Float64Array(TABLE_CACHE)
  private cacheNext = 0
  private cacheSeq = -1
  private cacheGen = -1
  private cacheGm: GuestMemory | null = null

  /**
   * Start a walk over `gm`: keep the cached frames only if `seq` (mmu_invalidate_seq, -1 while an
   * invalidation is in progress) and `gen` (the memslot generation) are those they were read under.
   */
  begin(gm: GuestMemory, seq: number, gen: number): void {
    if (seq < 0 || seq !== this.cacheSeq || gen !== this.cacheGen || gm !== this.cacheGm) {
      this.cacheGfn.fill(-1)
      this.cacheSeq = seq
      this.cacheGen = gen
      this.cacheGm = gm
    }
    this.gm = gm
  }

  translate(gpa: number, kind: AccessKind, final: boolean, res: WalkResult): number {
    if (final) return gpa
    const gm = this.gm!
    if (kind === ACC_WRITE) return gm.translate(gpa, kind, false, res)
    const gfn = Math.floor(gpa / 4096)
    const off = gpa - gfn * 4096
    const cached = this.cacheGfn
    for (let i = 0; i < TABLE_CACHE; i++) if (cached[i] === gfn) return this.cacheHpa[i]! + off
    const hpa = this.kvmUnbacked ? this.unbacked(gm.gpaToHpa(gpa, false)) : gm.translate(gpa, kind, false, res)
    if (this.cacheSeq >= 0 && hpa >= 0 && hpa < gm.host.mem.sizeBytes) {
      const i = this.cacheNext
      cached[i] = gfn
      this.cacheHpa[i] = hpa - off
      this.cacheNext = (i + 1) & (TABLE_CACHE - 1)
    }
    return hpa
  }

  private unbacked(hpa: number): number {
    return hpa >= 0 ? hpa : -1
  }
}

/** `struct guest_walker`: one per vCPU, reused. Levels are indexed 1..5 (index 0 unused). */
export class GuestWalker {
  /** Leaf level (1 = 4K, 2 = 2M, 3 = 1G) and the guest's top level. */
  level = 0
  maxLevel = 0
  /** The translated gfn (exact 4K frame, also inside a guest huge page). */
  gfn = 0
  /** ACC_* of the whole walk (`pte_access`), after protect_clean_gpte. */
  pteAccess = 0
  /** #PF error code when the walk failed. */
  errorCode = 0
  /** gfn of the guest table holding the gPTE of level L (`table_gfn[L-1]`). */
  readonly tableGfn = new Float64Array(6)
  /** GPA of the gPTE of level L (`pte_gpa[L-1]`). */
  readonly pteGpa = new Float64Array(6)
  /**
   * Where each gPTE was read in host memory, and the host-mapping epoch it was read in:
   * mmu_invalidate_seq (-1 if an invalidation was in progress) and the memslot generation. While
   * both are unchanged, a re-read of the gPTE (gpte_changed) may use this address instead of
   * translating its GPA again: the host mapping and the memslots are as they were.
   */
  readonly pteHpa = new Float64Array(6)
  walkSeq = -1
  walkGen = -1
  /** gPTE of level L after the A/D update (`ptes[L-1]`). */
  readonly ptesLo = new Uint32Array(6)
  readonly ptesHi = new Uint32Array(6)
  /** ACC_* accumulated over the gPTEs *above* the table of level L (`pt_access[L-1]`). */
  readonly ptAccess = new Uint8Array(6)
  /** The 8 gPTEs around the level-1 gPTE, read by gpte_changed (`prefetch_ptes`). */
  readonly prefetchLo = new Uint32Array(8)
  readonly prefetchHi = new Uint32Array(8)
  readonly res = new WalkResult()
  /** The software walker's paging context (KVM's walk_mmu), refreshed when the vCPU's changes. */
  readonly ctx: PagingContext
  private ctxGen = -1
  private readonly translator = new GptTranslator()

  /**
   * `unbackedTables`: how a guest table at a GPA without a visible memslot reads — `open-bus`
   * (all ones, the walk faults with RSVD as on bare metal) or `kvm` (the walk fails as not present,
   * FNAME(walk_addr_generic)'s `!kvm_is_visible_memslot(slot)` → `goto error`).
   */
  constructor(vcpu: KvmVcpu, unbackedTables: 'open-bus' | 'kvm' = 'open-bus') {
    this.ctx = new PagingContext(vcpu.hw.features, { nonLeafAOnDescent: false })
    this.translator.kvmUnbacked = unbackedTables === 'kvm'
  }

  /** Bring the private context up to date with the vCPU's (after CR0/CR3/CR4/EFER changes). */
  refresh(vcpu: KvmVcpu): PagingContext {
    const g = vcpu.hw.ctx.generation
    if (g !== this.ctxGen) {
      this.ctx.update(vcpu.hw.state)
      this.ctxGen = g
    }
    return this.ctx
  }

  /**
   * FNAME(walk_addr): walk `addr` for an access of `kind`. Returns true on success (fields set),
   * false with `errorCode` set for a guest #PF.
   */
  walkAddr(vcpu: KvmVcpu, addr: number, kind: AccessKind, errorCode: number): boolean {
    const ctx = this.refresh(vcpu)
    const state: CpuState = vcpu.hw.state
    // The error code says whether the access was a user access (PFERR_U); an implicit supervisor
    // access at CPL 3 has it clear.
    const implicit = state.cpl === 3 && (errorCode & 4) === 0
    const ns = vcpu.vm.notifierState
    this.walkSeq = ns.inProgress === 0 ? ns.seq : -1
    this.walkGen = vcpu.vm.memslots.space(vcpu.asId).generation
    this.translator.begin(vcpu.guestMem, this.walkSeq, this.walkGen)
    const res = this.res
    // Every argument given (from CR3, full rights): no default-parameter handling per walk.
    const st = walk(vcpu.guestMem.host.mem, ctx, state, addr, kind, implicit, this.translator, res, 0, 0, 1, 1, 0)
    if (st !== WALK_OK) {
      // A guest table outside guest memory reads as open bus (GuestMemory.translate): all ones,
      // so the walk fails with RSVD like on bare metal. With `unbackedTables: 'kvm'` the table
      // read fails instead (WALK_EXIT) and, as in KVM's `error:` label, only the access bits are
      // reported: W and U from the access, I for a fetch when NX or SMEP is on (has_pferr_fetch).
      if (st === WALK_PF) this.errorCode = res.errorCode
      else if (st === WALK_EXIT) this.errorCode = (errorCode & (PFERR_W | PFERR_U)) | (kind === ACC_FETCH && (ctx.nxe || ctx.smep) ? PFERR_I : 0)
      else this.errorCode = 0
      return false
    }
    const top = ctx.levels
    const nxe = ctx.nxe
    this.maxLevel = top
    this.level = res.level
    this.gfn = Math.floor(res.gpa / 4096)
    let acc = ACC_ALL
    for (let l = top; l >= res.level; l--) {
      const lo = res.pathLo[l]!
      const hi = res.pathHi[l]!
      this.ptAccess[l] = acc
      this.pteGpa[l] = res.pathGpa[l]!
      this.pteHpa[l] = res.pathPa[l]!
      this.tableGfn[l] = Math.floor(res.pathGpa[l]! / 4096)
      this.ptesLo[l] = lo
      this.ptesHi[l] = hi
      acc &= gpteAccess(lo, hi, nxe)
    }
    // FNAME(protect_clean_gpte): a read/fetch of a clean page maps it read-only, so the first
    // write faults and sets D.
    if (kind !== ACC_WRITE && res.dirty === 0) acc &= ~ACC_WRITE_MASK
    this.pteAccess = acc
    return true
  }
}

/** FNAME(gpte_access): ACC_* of one gPTE (NX only counts with EFER.NXE). */
export function gpteAccess(lo: number, hi: number, nxe: boolean): number {
  return ((lo & 2) !== 0 ? ACC_WRITE_MASK : 0) | ((lo & 4) !== 0 ? ACC_USER_MASK : 0) | (nxe && hi >>> 31 !== 0 ? 0 : ACC_EXEC_MASK)
}

