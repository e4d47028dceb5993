import { DEBUG } from './debug.ts'
import { HwConfigError } from './errors.ts'
import { WALK_OK, type WalkResult } from './walk-result.ts'

// ---- entry flags word (Int32) ----
/** Effective R/W (AND over all levels). */
export const TLBF_RW = 1 << 0
/** Effective U/S (AND over all levels). */
export const TLBF_US = 1 << 1
/** Effective XD (OR over all levels, with NXE). */
export const TLBF_XD = 1 << 2
/**
 * Leaf D bit was 1 when the entry was cached. An entry with DIRTY=0 must not complete a write: the
 * hardware re-walks, sets D in memory with a locked RMW and then writes (x86-hw.md §3.5). The
 * vCPU drops the clean entry ({@link Tlb.invalidateEntry}), re-walks for the write and re-inserts.
 */
export const TLBF_DIRTY = 1 << 3
/** Global (leaf G with CR4.PGE): matches every PCID of the same asid, survives PCID flushes. */
export const TLBF_GLOBAL = 1 << 4
/** Nested (EPT/NPT) write permission of the combined mapping. */
export const TLBF_HOSTW = 1 << 5
/** Nested (EPT/NPT) execute permission of the combined mapping. */
export const TLBF_HOSTX = 1 << 6
/** Protection key of the leaf, 4 bits at this shift. */
export const TLBF_PKEY_SHIFT = 8
/** Mask of the protection-key field in the flags word. */
export const TLBF_PKEY_MASK = 0xf << TLBF_PKEY_SHIFT

// ---- counter vector indices ----
/** Lookups that hit a 4 KiB entry. */
export const TLBC_HIT_4K = 0
/** Lookups that hit a 2 MiB entry. */
export const TLBC_HIT_2M = 1
/** Lookups that hit a 1 GiB entry. */
export const TLBC_HIT_1G = 2
/** Lookups that found nothing. */
export const TLBC_MISS = 3
/** Inserts (including those that overwrote a matching entry). */
export const TLBC_INSERT = 4
/** Inserts that had to evict a live entry of another translation. */
export const TLBC_EVICT = 5
/** {@link Tlb.invlpg} calls. */
export const TLBC_INVLPG = 6
/** {@link Tlb.invpcidAddress} calls. */
export const TLBC_INVPCID_ADDR = 7
/** {@link Tlb.invvpidAddress} calls. */
export const TLBC_INVVPID_ADDR = 8
/** {@link Tlb.flushPcid} calls. */
export const TLBC_FLUSH_PCID = 9
/** {@link Tlb.flushAsidNonGlobal} calls. */
export const TLBC_FLUSH_ASID_NG = 10
/** {@link Tlb.flushAsid} calls. */
export const TLBC_FLUSH_ASID = 11
/** {@link Tlb.flushAll} calls. */
export const TLBC_FLUSH_ALL = 12
/** Live entries removed by the per-address operations and {@link Tlb.invalidateEntry}. */
export const TLBC_DROPPED = 13
/** Length of {@link Tlb.counters}. */
export const TLBC_COUNT = 14

/** Names of the TLB counters, by index (stable; used as report keys). */
export const TLB_COUNTER_NAMES: readonly string[] = Object.freeze([
  'hit_4k',
  'hit_2m',
  'hit_1g',
  'miss',
  'insert',
  'evict',
  'invlpg',
  'invpcid_addr',
  'invvpid_addr',
  'flush_pcid',
  'flush_asid_nonglobal',
  'flush_asid',
  'flush_all',
  'dropped',
])

/** Geometry of a {@link Tlb}: one set-associative array per page size. */
export interface TlbConfig {
  /** Sets of the 4 KiB array (power of two). @default 128 */
  sets4k: number
  /** Ways of the 4 KiB array (≥ 1). @default 12 */
  ways4k: number
  /** @default 32 */
  sets2m: number
  /** @default 4 */
  ways2m: number
  /** @default 4 */
  sets1g: number
  /** @default 4 */
  ways1g: number
  /** Number of hardware contexts (asids 0..asids-1) the vCPU may tag entries with. @default 8 */
  asids: number
}

/**
 * Defaults: the 4 KiB array is shaped like the unified second-level STLB of Skylake-class cores
 * (1536 entries, 12-way); 2 MiB gets 128 entries 4-way and 1 GiB 16 entries 4-way, also
 * Skylake-STLB-like. One level only: an L1 DTLB in front changes timing, not architectural outcomes.
 */
export const DEFAULT_TLB_CONFIG: Readonly<TlbConfig> = Object.freeze({
  sets4k: 128,
  ways4k: 12,
  sets2m: 32,
  ways2m: 4,
  sets1g: 4,
  ways1g: 4,
  asids: 8,
})

/** Upper bound of {@link TlbConfig.asids}: the per-(asid, PCID) flush table has asids × 4096 slots. */
export const TLB_MAX_ASIDS = 256
const MAX_WAYS = 64
const MAX_ENTRIES_PER_SIZE = 1 << 20

/** Validate and complete a partial TLB geometry; throws {@link HwConfigError} saying what was expected. */
export function makeTlbConfig(partial: Partial<TlbConfig> = {}): TlbConfig {
  const c: TlbConfig = { ...DEFAULT_TLB_CONFIG, ...partial }
  for (const size of ['4k', '2m', '1g'] as const) {
    const sets = c[`sets${size}`]
    const ways = c[`ways${size}`]
    if (!Number.isInteger(sets) || sets < 1 || (sets & (sets - 1)) !== 0) {
      throw new HwConfigError(`TlbConfig.sets${size} must be a power of two ≥ 1 (the set index is low page-number bits); got ${String(sets)}`)
    }
    if (!Number.isInteger(ways) || ways < 1 || ways > MAX_WAYS) {
      throw new HwConfigError(`TlbConfig.ways${size} must be an integer from 1 to ${MAX_WAYS}; got ${String(ways)}`)
    }
    if (sets * ways > MAX_ENTRIES_PER_SIZE) {
      throw new HwConfigError(`TlbConfig ${size} array has ${String(sets * ways)} entries; at most ${MAX_ENTRIES_PER_SIZE} are supported`)
    }
  }
  if (!Number.isInteger(c.asids) || c.asids < 1 || c.asids > TLB_MAX_ASIDS) {
    throw new HwConfigError(`TlbConfig.asids must be an integer from 1 to ${TLB_MAX_ASIDS}; got ${String(c.asids)}`)
  }
  return c
}

const INV_4K = 1 / 4096
const INV_2M = 1 / 2097152
const INV_1G = 1 / 1073741824
/** Flush sequence numbers are renormalised (see {@link Tlb.compact}) before they would overflow Int32. */
const SEQ_LIMIT = 0x7ffffff0

/**
 * The TLB of one vCPU: caches completed translations (x86-hw.md §6.1), tagged by `asid` (a small
 * number the vCPU assigns to a hardware context, i.e. a (VPID, EPTP) pair under VMX, an ASID under
 * SVM, 0 natively) and PCID. It caches *rights*, not decisions: CR0.WP, SMEP, SMAP, RFLAGS.AC,
 * PKRU/PKRS and CPL are applied by the vCPU at use time (so toggling them needs no flush), and an
 * entry with {@link TLBF_DIRTY} = 0 must not complete a write (the hardware re-walks to set D, §3.5).
 *
 * Layout: three independent set-associative arrays (4 KiB, 2 MiB, 1 GiB), stored as disjoint
 * regions of one structure of typed arrays so an entry index is global: [0, cap4k) are 4 KiB
 * entries, then 2 MiB, then 1 GiB. Set index = low bits of the page number (la / pageSize);
 * ways of a set are contiguous. Replacement: a free (empty or flushed) way first, lowest index
 * first; otherwise per-set round-robin (FIFO; hits do not update it), so victims are deterministic.
 *
 * Whole-context flushes are O(1): every flush bumps a sequence number into a threshold (all /
 * per asid / per asid non-global / per (asid, PCID)), and an entry is live only if it was inserted
 * at or after every threshold that covers it (global entries ignore the non-global thresholds).
 * Per-address operations clear matching entries in place.
 *
 * Hot-path methods ({@link lookup}, {@link insert}, the invalidations) allocate nothing and throw
 * only on misuse under DEBUG.
 */
export class Tlb {
  readonly config: Readonly<TlbConfig>
  /** Total entries (all sizes). */
  readonly capacity: number
  /** First entry index of the 4 KiB / 2 MiB / 1 GiB regions. */
  readonly offset4k = 0
  readonly offset2m: number
  readonly offset1g: number
  /** Page base physical address of each entry (host-physical for combined mappings). */
  readonly base: Float64Array
  /** Guest-physical page base of each entry (equals `base` without nested paging). */
  readonly gpaBase: Float64Array
  /** Flags word of each entry: TLBF_* bits. */
  readonly flags: Int32Array
  /** Page level of each entry: 1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB (fixed by the region). */
  readonly level: Uint8Array
  /** Page size in bytes of each entry (fixed by the region). */
  readonly pageSize: Float64Array
  /** Counters, indexed by TLBC_*. */
  readonly counters = new Float64Array(TLBC_COUNT)

  /** Page number (la / pageSize, signed); NaN = empty, so it never matches. */
  private readonly vpn: Float64Array
  /**
   * Context tag: asid << 12 | pcid for a non-global entry; ~asid (negative) for a global one,
   * whose PCID no operation needs (globals match every PCID and only asid-wide or per-address
   * operations remove them).
   */
  private readonly tag: Int32Array
  /** Flush sequence number at insert time. */
  private readonly seq: Int32Array
  /** Next round-robin victim way, per set (4 KiB sets, then 2 MiB, then 1 GiB). */
  private readonly rr: Uint8Array
  private readonly rrOff2m: number
  private readonly rrOff1g: number
  private readonly ways4k: number
  private readonly ways2m: number
  private readonly ways1g: number
  private readonly mask4k: number
  private readonly mask2m: number
  private readonly mask1g: number
  private readonly setBits4k: number
  /**
   * Per 4 KiB set, a 32-bit filter of the page numbers it holds (bit (vpn >> log2(sets)) & 31):
   * a clear bit skips the 12-way scan, which is most of the cost of a 2 MiB / 1 GiB hit or a miss.
   * Kept exact on every change of the set (see {@link sigReplace}); flushed entries leave false positives only.
   */
  private readonly sig4k: Int32Array
  /** Per 4 KiB set and signature bit, how many ways set it (so the signature updates in O(1)). */
  private readonly sigCount: Uint8Array
  /**
   * Per 4 KiB set, the sequence number at which an insert found every way live (-1: not known).
   * Ways only become free through a flush (which bumps the sequence number) or
   * {@link invalidateEntry} (which clears this), so while it equals the current sequence number an
   * insert of a page the set cannot hold skips the scan and evicts.
   */
  private readonly fullSeq: Int32Array
  /** Current flush sequence number (inserts are stamped with it). */
  private seqNow = 0
  /** Sequence number of the latest 2 MiB / 1 GiB insert (-1: none yet). */
  private largeSeq = -1
  /** Thresholds: flushAll; per asid (incl. globals); per asid non-global; per (asid, pcid) non-global. */
  private seqAll = 0
  private readonly seqAsid: Int32Array
  private readonly seqAsidNg: Int32Array
  private readonly seqPcid: Int32Array
  /** Context whose thresholds lookup cached (-1: none, after any flush). */
  private curCtx = -1
  private curThrG = 0
  private curThrN = 0

  constructor(config: Partial<TlbConfig> = {}) {
    const c = makeTlbConfig(config)
    this.config = Object.freeze(c)
    const cap4k = c.sets4k * c.ways4k
    const cap2m = c.sets2m * c.ways2m
    const cap1g = c.sets1g * c.ways1g
    this.offset2m = cap4k
    this.offset1g = cap4k + cap2m
    const cap = cap4k + cap2m + cap1g
    this.capacity = cap
    this.base = new Float64Array(cap)
    this.gpaBase = new Float64Array(cap)
    this.flags = new Int32Array(cap)
    this.level = new Uint8Array(cap)
    this.pageSize = new Float64Array(cap)
    this.vpn = new Float64Array(cap).fill(NaN)
    this.tag = new Int32Array(cap)
    this.seq = new Int32Array(cap)
    this.level.fill(1, 0, cap4k)
    this.level.fill(2, cap4k, cap4k + cap2m)
    this.level.fill(3, cap4k + cap2m, cap)
    this.pageSize.fill(4096, 0, cap4k)
    this.pageSize.fill(2 ** 21, cap4k, cap4k + cap2m)
    this.pageSize.fill(2 ** 30, cap4k + cap2m, cap)
    this.rr = new Uint8Array(c.sets4k + c.sets2m + c.sets1g)
    this.rrOff2m = c.sets4k
    this.rrOff1g = c.sets4k + c.sets2m
    this.ways4k = c.ways4k
    this.ways2m = c.ways2m
    this.ways1g = c.ways1g
    this.mask4k = c.sets4k - 1
    this.mask2m = c.sets2m - 1
    this.mask1g = c.sets1g - 1
    this.setBits4k = Math.log2(c.sets4k)
    this.sig4k = new Int32Array(c.sets4k)
    this.sigCount = new Uint8Array(c.sets4k * 32)
    this.fullSeq = new Int32Array(c.sets4k).fill(-1)
    this.seqAsid = new Int32Array(c.asids)
    this.seqAsidNg = new Int32Array(c.asids)
    this.seqPcid = new Int32Array(c.asids * 4096)
  }

  // ---------------------------------------------------------------- lookup

  /**
   * Find a live entry that translates `la` for (`asid`, `pcid`): a non-global entry of that PCID
   * or a global entry of any PCID of that asid. Searches 4 KiB, then 2 MiB, then 1 GiB (when
   * several sizes are cached for one address, SDM 4.10.2.3 lets any be used). Counts a hit per
   * size or a miss. Unchecked (hot path): `asid` < `config.asids`, `pcid` in 0..4095.
   * Returns the entry index (read `base`, `gpaBase`, `flags`, `level`, `pageSize` at it, or use
   * {@link pa}), or -1.
   */
  lookup(asid: number, pcid: number, la: number): number {
    const ctx = (asid << 12) | pcid
    if (ctx !== this.curCtx) this.setContext(asid, ctx)
    const gtag = ~asid
    const thrN = this.curThrN
    const thrG = this.curThrG
    const vpnA = this.vpn
    const tagA = this.tag
    const seqA = this.seq
    // The hottest code of the simulator: loops written out per size, the 4 KiB probe kept small.
    const vpn = Math.floor(la * (1 / 4096)) // INV_4K as a literal: no module-binding load
    const set = vpn & this.mask4k
    let i = set * this.ways4k
    const end = (this.sig4k[set]! >>> ((vpn >> this.setBits4k) & 31)) & 1 ? i + this.ways4k : i
    for (; i < end; i++) {
      if (vpnA[i] === vpn) {
        const t = tagA[i]!
        if (t === ctx ? seqA[i]! >= thrN : t === gtag && seqA[i]! >= thrG) {
          this.counters[TLBC_HIT_4K]!++
          return i
        }
      }
    }
    // Every 2 MiB / 1 GiB entry was stamped at or before largeSeq; below the threshold of global
    // entries (the lower of the two) none of them is live here: a miss without scanning.
    if (this.largeSeq < thrG) {
      this.counters[TLBC_MISS]!++
      return -1
    }
    return this.lookupLarge(la, ctx, gtag, thrN, thrG)
  }

  /** The 2 MiB and 1 GiB part of {@link lookup}, out of line so that the 4 KiB part is small enough for V8 to inline. */
  private lookupLarge(la: number, ctx: number, gtag: number, thrN: number, thrG: number): number {
    const vpnA = this.vpn
    const tagA = this.tag
    const seqA = this.seq
    let vpn = Math.floor(la * INV_2M)
    let i = this.offset2m + (vpn & this.mask2m) * this.ways2m
    let end = i + this.ways2m
    for (; i < end; i++) {
      if (vpnA[i] === vpn) {
        const t = tagA[i]!
        if (t === ctx ? seqA[i]! >= thrN : t === gtag && seqA[i]! >= thrG) {
          this.counters[TLBC_HIT_2M]!++
          return i
        }
      }
    }
    vpn = Math.floor(la * INV_1G)
    i = this.offset1g + (vpn & this.mask1g) * this.ways1g
    end = i + this.ways1g
    for (; i < end; i++) {
      if (vpnA[i] === vpn) {
        const t = tagA[i]!
        if (t === ctx ? seqA[i]! >= thrN : t === gtag && seqA[i]! >= thrG) {
          this.counters[TLBC_HIT_1G]!++
          return i
        }
      }
    }
    this.counters[TLBC_MISS]!++
    return -1
  }

  /** Cache the liveness thresholds of (asid, ctx) for lookups; every flush resets the cache. */
  private setContext(asid: number, ctx: number): void {
    let thrG = this.seqAsid[asid]!
    if (this.seqAll > thrG) thrG = this.seqAll
    let thrN = this.seqAsidNg[asid]!
    if (thrG > thrN) thrN = thrG
    const tp = this.seqPcid[ctx]!
    if (tp > thrN) thrN = tp
    this.curCtx = ctx
    this.curThrG = thrG
    this.curThrN = thrN
  }

  /** Page size − 1 of entry `i`: `base[i] + (la & pageOffsetMask(i))` is the physical address. */
  pageOffsetMask(i: number): number {
    const l = this.level[i]!
    return l === 1 ? 0xfff : l === 2 ? 0x1fffff : 0x3fffffff
  }
  /** Physical address of `la` through entry `i` (which must translate `la`). Exact for negative `la`. */
  pa(i: number, la: number): number {
    return this.base[i]! + (la & this.pageOffsetMask(i))
  }
  /** Guest-physical address of `la` through entry `i`. */
  gpa(i: number, la: number): number {
    return this.gpaBase[i]! + (la & this.pageOffsetMask(i))
  }

  // ---------------------------------------------------------------- insert

  /**
   * Cache the completed translation `res` of `la` for (`asid`, `pcid`): page size from
   * `res.level`, global from `res.global`, rights, D, protection key, nested W/X. Only successful
   * walks may be cached (SDM 4.10.2.1: never from not-present or faulting entries; the walk has
   * set A first); the vCPU must not call this after a fault (checked under DEBUG).
   *
   * @param nestedLevel leaf level of the nested (EPT/NPT) translation of the final address: a
   *   combined mapping is cached at the smaller of the two page sizes (a 2 MiB guest page backed
   *   by 4 KiB host pages becomes 4 KiB entries). Default 3 (no limit). Paging-off translations
   *   (`res.level` 0) are cached as 4 KiB entries.
   * @returns the index of the entry written.
   */
  insert(asid: number, pcid: number, la: number, res: WalkResult, nestedLevel = 3): number {
    if (DEBUG) this.checkInsert(asid, pcid, la, res, nestedLevel)
    let level = res.level < nestedLevel ? res.level : nestedLevel
    if (level < 1) level = 1
    let vpn: number, off: number, ways: number, set: number, rrIdx: number, offMask: number
    if (level === 1) {
      vpn = Math.floor(la * (1 / 4096)) // INV_4K
      off = 0
      ways = this.ways4k
      set = vpn & this.mask4k
      rrIdx = set
      offMask = 0xfff
    } else if (level === 2) {
      vpn = Math.floor(la * INV_2M)
      off = this.offset2m
      ways = this.ways2m
      set = vpn & this.mask2m
      rrIdx = this.rrOff2m + set
      offMask = 0x1fffff
    } else {
      vpn = Math.floor(la * INV_1G)
      off = this.offset1g
      ways = this.ways1g
      set = vpn & this.mask1g
      rrIdx = this.rrOff1g + set
      offMask = 0x3fffffff
    }
    const tag = (res.global & 1) !== 0 ? ~asid : (asid << 12) | pcid
    const start = off + set * ways
    const end = start + ways
    const vpnA = this.vpn
    const tagA = this.tag
    const seqA = this.seq
    // Liveness without the full threshold check in the common cases: an entry stamped with the
    // current sequence number was inserted after every flush (live); one older than the last
    // flushAll is dead. Only entries in between need {@link isLive}.
    const seqNow = this.seqNow
    const seqAll = this.seqAll
    // A clear signature bit proves no way holds this page number: the first free way will do, and
    // if the set was found full of live entries since the last flush there is none: evict at once.
    const mayHold = level !== 1 || ((this.sig4k[set]! >>> ((vpn >> this.setBits4k) & 31)) & 1) !== 0
    const knownFull = !mayHold && this.fullSeq[set] === seqNow
    // 1. A live entry with the same tag and page is refreshed in place (no duplicates in a set;
    //    a global and a non-global entry for one page may coexist, as on hardware).
    // 2. Else the first free way (empty, or made stale by a flush). 3. Else the round-robin victim.
    let victim = -1
    let free = -1
    for (let i = knownFull ? end : start; i < end; i++) {
      const v = vpnA[i]!
      if (v !== vpn) {
        if (free < 0) {
          const sq = seqA[i]!
          if (v !== v || (sq !== seqNow && (sq < seqAll || !this.isLive(i)))) {
            free = i
            if (!mayHold) break
          }
        }
        continue
      }
      const sq = seqA[i]!
      if (sq !== seqNow && (sq < seqAll || !this.isLive(i))) {
        if (free < 0) free = i
        continue
      }
      if (tagA[i] === tag) {
        victim = i
        break
      }
    }
    if (victim < 0) {
      if (free >= 0) victim = free
      else {
        if (level === 1) this.fullSeq[set] = seqNow
        const w = this.rr[rrIdx]!
        victim = start + w
        this.rr[rrIdx] = w + 1 === ways ? 0 : w + 1
        this.counters[TLBC_EVICT]!++
      }
    }
    if (level === 1) this.sigReplace(set, vpnA[victim]!, vpn)
    else this.largeSeq = seqNow
    const pageOff = la & offMask
    vpnA[victim] = vpn
    tagA[victim] = tag
    seqA[victim] = seqNow
    this.base[victim] = res.pa - pageOff
    this.gpaBase[victim] = res.gpa - pageOff
    this.flags[victim] =
      (res.rw & 1) |
      ((res.us & 1) << 1) |
      ((res.xd & 1) << 2) |
      ((res.dirty & 1) << 3) |
      ((res.global & 1) << 4) |
      ((res.hostW & 1) << 5) |
      ((res.hostX & 1) << 6) |
      ((res.pkey & 0xf) << TLBF_PKEY_SHIFT)
    this.counters[TLBC_INSERT]!++
    return victim
  }

  private checkInsert(asid: number, pcid: number, la: number, res: WalkResult, nestedLevel: number): void {
    if (res.status !== WALK_OK) {
      throw new HwConfigError(`Tlb.insert: only successful walks may be cached (SDM 4.10.2.1); the walk of 0x${la.toString(16)} ended with status ${String(res.status)}`)
    }
    this.checkTag('insert', asid, pcid)
    if (!Number.isSafeInteger(la)) throw new HwConfigError(`Tlb.insert: la must be a safe integer (signed canonical form); got ${String(la)}`)
    if (res.level < 0 || res.level > 3 || nestedLevel < 1 || nestedLevel > 3) {
      throw new HwConfigError(`Tlb.insert: levels must be 1..3 (res.level 0 allowed for paging off); got res.level ${String(res.level)}, nestedLevel ${String(nestedLevel)}`)
    }
  }

  private checkTag(op: string, asid: number, pcid: number): void {
    if (!Number.isInteger(asid) || asid < 0 || asid >= this.config.asids) {
      throw new HwConfigError(`Tlb.${op}: asid must be an integer from 0 to ${String(this.config.asids - 1)} (TlbConfig.asids); got ${String(asid)}`)
    }
    if (!Number.isInteger(pcid) || pcid < 0 || pcid > 4095) {
      throw new HwConfigError(`Tlb.${op}: pcid must be an integer from 0 to 4095; got ${String(pcid)}`)
    }
  }

  /** Whether entry `i` holds a translation no flush has covered since it was inserted. */
  private isLive(i: number): boolean {
    const v = this.vpn[i]!
    if (v !== v) return false // NaN: empty
    const t = this.tag[i]!
    const asid = t < 0 ? ~t : t >> 12
    const s = this.seq[i]!
    if (s < this.seqAll || s < this.seqAsid[asid]!) return false
    if (t < 0) return true // global
    return s >= this.seqAsidNg[asid]! && s >= this.seqPcid[t]!
  }

  // ---------------------------------------------------------------- invalidation

  /**
   * INVLPG `la` executed with (`asid`, `pcid`) current (SDM 4.10.4.1, x86-hw.md §6.2): removes the
   * entries of every page size that translate `la` in `pcid`, and global entries for that page in
   * any PCID of the asid. The PSC part (all PSC entries of the PCID) is the
   * {@link PagingStructureCache}'s job. The vCPU treats a non-canonical `la` as a no-op before calling.
   */
  invlpg(asid: number, pcid: number, la: number): void {
    if (DEBUG) this.checkTag('invlpg', asid, pcid)
    this.counters[TLBC_INVLPG]!++
    this.dropPage(asid, (asid << 12) | pcid, la, 0)
  }

  /**
   * INVPCID type 0, individual address (SDM 4.10.4.1): removes the non-global entries (every page
   * size) that translate `la` in `pcid`; global entries stay.
   */
  invpcidAddress(asid: number, pcid: number, la: number): void {
    if (DEBUG) this.checkTag('invpcidAddress', asid, pcid)
    this.counters[TLBC_INVPCID_ADDR]!++
    this.dropPage(asid, (asid << 12) | pcid, la, 1)
  }

  /**
   * INVVPID type 0, individual address (SDM 30.3.3.3), and AMD INVLPGA: removes every entry
   * (every size, every PCID, global or not) that translates `la` in `asid`.
   */
  invvpidAddress(asid: number, la: number): void {
    if (DEBUG) this.checkTag('invvpidAddress', asid, 0)
    this.counters[TLBC_INVVPID_ADDR]!++
    this.dropPage(asid, asid << 12, la, 2)
  }

  /**
   * All non-global entries of one PCID (SDM 4.10.4.1): INVPCID type 1; MOV to CR3 with PCIDE=1 and
   * bit 63 = 0 (for the new PCID); MOV to CR3 with PCIDE=0 and task switches (PCID 0). Globals and
   * other PCIDs stay. O(1).
   */
  flushPcid(asid: number, pcid: number): void {
    if (DEBUG) this.checkTag('flushPcid', asid, pcid)
    this.counters[TLBC_FLUSH_PCID]!++
    this.seqPcid[(asid << 12) | pcid] = this.bump()
    this.curCtx = -1
  }

  /**
   * All non-global entries of every PCID of `asid`: INVPCID type 3 (all contexts except global),
   * INVVPID type 3 (single context retaining globals), AMD TLB_CONTROL 7. O(1).
   */
  flushAsidNonGlobal(asid: number): void {
    if (DEBUG) this.checkTag('flushAsidNonGlobal', asid, 0)
    this.counters[TLBC_FLUSH_ASID_NG]!++
    this.seqAsidNg[asid] = this.bump()
    this.curCtx = -1
  }

  /**
   * Every entry of `asid`, globals included: INVPCID type 2; MOV to CR4 changing PGE or clearing
   * PCIDE; MOV to CR0 clearing PG; INVVPID type 1; INVEPT (for each asid using the EPTP); VM entry
   * or exit with VPID disabled; AMD TLB_CONTROL 3. O(1).
   */
  flushAsid(asid: number): void {
    if (DEBUG) this.checkTag('flushAsid', asid, 0)
    this.counters[TLBC_FLUSH_ASID]!++
    this.seqAsid[asid] = this.bump()
    this.curCtx = -1
  }

  /** Every entry of every asid: INVVPID type 2, INVEPT type 2 (all contexts), AMD TLB_CONTROL 1. O(1). */
  flushAll(): void {
    this.counters[TLBC_FLUSH_ALL]!++
    this.seqAll = this.bump()
    this.curCtx = -1
  }

  /** Drop entry `i` (always allowed: a processor may drop any entry at any time, SDM 4.10.2.2). */
  invalidateEntry(i: number): void {
    if (this.isLive(i)) this.counters[TLBC_DROPPED]!++
    if (i < this.offset2m) {
      const set = (i / this.ways4k) | 0
      this.sigReplace(set, this.vpn[i]!, NaN)
      this.fullSeq[set] = -1
    }
    this.vpn[i] = NaN
  }

  /** Number of live entries (O(capacity); for statistics and tests). */
  liveEntries(): number {
    let n = 0
    for (let i = 0; i < this.capacity; i++) if (this.isLive(i)) n++
    return n
  }

  /**
   * Physically clear flushed entries and reset every flush sequence number to 0, without changing
   * which entries are live. Runs automatically before the sequence number would overflow;
   * O(capacity + asids × 4096).
   */
  compact(): void {
    for (let i = 0; i < this.capacity; i++) {
      if (this.isLive(i)) this.seq[i] = 0
      else this.vpn[i] = NaN
    }
    for (let set = 0; set <= this.mask4k; set++) this.resig(set)
    this.fullSeq.fill(-1)
    this.seqNow = 0
    this.largeSeq = 0 // live large entries now have seq 0 (conservative if there are none)
    this.seqAll = 0
    this.seqAsid.fill(0)
    this.seqAsidNg.fill(0)
    this.seqPcid.fill(0)
    this.curCtx = -1
  }

  private resig(set: number): void {
    const start = set * this.ways4k
    const cnt = this.sigCount
    cnt.fill(0, set * 32, set * 32 + 32)
    let m = 0
    for (let i = start; i < start + this.ways4k; i++) {
      const v = this.vpn[i]!
      if (v === v) {
        const bit = (v >> this.setBits4k) & 31
        cnt[set * 32 + bit]!++
        m |= 1 << bit
      }
    }
    this.sig4k[set] = m
  }

  /**
   * Keep the signature of a 4 KiB set exact when one way's page number changes from `oldVpn` to
   * `newVpn` (NaN = empty): a per-bit count of the ways that set it, so no rescan of the set.
   */
  private sigReplace(set: number, oldVpn: number, newVpn: number): void {
    const cnt = this.sigCount
    const sh = this.setBits4k
    let m = this.sig4k[set]!
    if (oldVpn === oldVpn) {
      const bit = (oldVpn >> sh) & 31
      const left = --cnt[set * 32 + bit]!
      if (left === 0) m &= ~(1 << bit)
    }
    if (newVpn === newVpn) {
      const bit = (newVpn >> sh) & 31
      cnt[set * 32 + bit]!++
      m |= 1 << bit
    }
    this.sig4k[set] = m
  }

  private bump(): number {
    if (this.seqNow >= SEQ_LIMIT) this.compact()
    return ++this.seqNow
  }

  /** mode 0: INVLPG (tag === ctx, or global of the asid); 1: non-global with tag === ctx; 2: any of the asid. */
  private dropPage(asid: number, ctx: number, la: number, mode: number): void {
    let vpn = Math.floor(la * INV_4K)
    this.dropIn(0, this.ways4k, vpn & this.mask4k, vpn, asid, ctx, mode)
    vpn = Math.floor(la * INV_2M)
    this.dropIn(this.offset2m, this.ways2m, vpn & this.mask2m, vpn, asid, ctx, mode)
    vpn = Math.floor(la * INV_1G)
    this.dropIn(this.offset1g, this.ways1g, vpn & this.mask1g, vpn, asid, ctx, mode)
  }

  private dropIn(off: number, ways: number, set: number, vpn: number, asid: number, ctx: number, mode: number): void {
    const start = off + set * ways
    const end = start + ways
    for (let i = start; i < end; i++) {
      if (this.vpn[i] !== vpn) continue
      const t = this.tag[i]!
      const hit = mode === 0 ? t === ctx || t === ~asid : mode === 1 ? t === ctx : t === ~asid || t >> 12 === asid
      if (hit) this.invalidateEntry(i)
    }
  }
}
