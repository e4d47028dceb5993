import { LO_ADDR_MASK, PTE_A, PTE_P, PTE_PS } from './bits.ts'
import type { PagingContext } from './cpu-state.ts'
import { HwConfigError } from './errors.ts'
import { WALK_OK, type WalkResult } from './walk-result.ts'

const TWO32 = 4294967296

/** Geometry of a {@link PagingStructureCache}: one set-associative array per cached level. */
export interface PscConfig {
  /** PDE cache (level-2 entries; a hit leaves 1 reference). @default 8 sets × 4 ways */
  setsPde: number
  /** Ways of the PDE cache. */
  waysPde: number
  /** PDPTE cache (level 3; a hit leaves 2 references). @default 1 × 4 */
  setsPdpte: number
  /** Ways of the PDPTE cache. */
  waysPdpte: number
  /** PML4E cache (level 4). @default 1 × 2 */
  setsPml4e: number
  /** Ways of the PML4E cache. */
  waysPml4e: number
  /** PML5E cache (level 5). @default 1 × 2 */
  setsPml5e: number
  /** Ways of the PML5E cache. */
  waysPml5e: number
}

/** Defaults: small, like the page-walk caches of current cores (32 PDE entries, a few above). */
export const DEFAULT_PSC_CONFIG: Readonly<PscConfig> = Object.freeze({
  setsPde: 8,
  waysPde: 4,
  setsPdpte: 1,
  waysPdpte: 4,
  setsPml4e: 1,
  waysPml4e: 2,
  setsPml5e: 1,
  waysPml5e: 2,
})

/** Validate and complete a partial PSC geometry; throws {@link HwConfigError} saying what was expected. */
export function makePscConfig(partial: Partial<PscConfig> = {}): PscConfig {
  const c: PscConfig = { ...DEFAULT_PSC_CONFIG, ...partial }
  for (const name of ['Pde', 'Pdpte', 'Pml4e', 'Pml5e'] as const) {
    const sets = c[`sets${name}`]
    const ways = c[`ways${name}`]
    if (!Number.isInteger(sets) || sets < 1 || (sets & (sets - 1)) !== 0 || sets > 65536) {
      throw new HwConfigError(`PscConfig.sets${name} must be a power of two from 1 to 65536; got ${String(sets)}`)
    }
    if (!Number.isInteger(ways) || ways < 1 || ways > 64) {
      throw new HwConfigError(`PscConfig.ways${name} must be an integer from 1 to 64; got ${String(ways)}`)
    }
  }
  return c
}

// ---- counter vector indices ----
/** Lookups whose longest match was a PDE-cache entry (walk starts at level 1). */
export const PSCC_HIT_PDE = 0
/** Longest match in the PDPTE cache (walk starts at level 2). */
export const PSCC_HIT_PDPTE = 1
/** Longest match in the PML4E cache (walk starts at level 3). */
export const PSCC_HIT_PML4E = 2
/** Longest match in the PML5E cache (walk starts at level 4). */
export const PSCC_HIT_PML5E = 3
/** Lookups that matched nothing (walk starts at CR3). */
export const PSCC_MISS = 4
/** Entries created or refreshed by {@link PagingStructureCache.fill}. */
export const PSCC_FILL = 5
/** Fills that evicted a live entry. */
export const PSCC_EVICT = 6
/** Invalidation calls (any kind). */
export const PSCC_INVALIDATE = 7
/** Length of {@link PagingStructureCache.counters}. */
export const PSCC_COUNT = 8

/** Names of the PSC counters, by index. */
export const PSC_COUNTER_NAMES: readonly string[] = Object.freeze([
  'hit_pde',
  'hit_pdpte',
  'hit_pml4e',
  'hit_pml5e',
  'miss',
  'fill',
  'evict',
  'invalidate',
])

/** log2 of the linear-address span mapped by one entry at level L is 3 + 9L (level 2 → 21). */
const INV_SPAN = [0, 0, 1 / 2 ** 21, 1 / 2 ** 30, 1 / 2 ** 39, 1 / 2 ** 48]

/**
 * Paging-structure caches of one vCPU (SDM 4.10.3, x86-hw.md §6.1): PDE, PDPTE, PML4E and PML5E
 * caches of *non-leaf* entries, keyed by (asid, PCID, level, the linear-address bits above that
 * level's span), each holding the physical (guest-physical under EPT/NPT) address of the next
 * table and the rights accumulated down to it (R/W and U/S ANDed, XD ORed). G does not apply.
 * Optional: a vCPU without one always walks from CR3.
 *
 * Use (native paging, or the shadow table; not for a 2-D walk's guest dimension):
 * ```ts
 * const st = psc.lookup(asid, ctx.pcid, la)
 *   ? walk(mem, ctx, state, la, kind, implicit, null, res, psc.startLevel, psc.startTable, psc.startRw, psc.startUs, psc.startXd)
 *   : walk(mem, ctx, state, la, kind, implicit, null, res)
 * if (st === WALK_OK) psc.fill(asid, ctx.pcid, la, res, ctx)
 * ```
 * `fill` knows where the walk began from the preceding `lookup` of the same (asid, pcid, la);
 * {@link fillFrom} takes that explicitly.
 *
 * Replacement per set: first free way, else round-robin. Invalidations are O(capacity), which is
 * tens of entries.
 */
export class PagingStructureCache {
  readonly config: Readonly<PscConfig>
  readonly capacity: number
  /** Counters, indexed by PSCC_*. */
  readonly counters = new Float64Array(PSCC_COUNT)

  /** Set by {@link lookup}: level at which the walk starts (0 = at CR3, after a miss). */
  startLevel = 0
  /** Set by {@link lookup}: physical address of the table at `startLevel`. */
  startTable = 0
  /** Set by {@link lookup}: R/W accumulated above `startLevel` (1 after a miss). */
  startRw = 1
  /** Set by {@link lookup}: U/S accumulated above `startLevel` (1 after a miss). */
  startUs = 1
  /** Set by {@link lookup}: XD accumulated above `startLevel` (0 after a miss). */
  startXd = 0

  /** (ctx tag, la) of the last lookup, so that fill knows where the following walk began. */
  private lastTag = -1
  private lastLa = NaN
  /** Region offset, ways and set mask per level (index 2..5). */
  private readonly off = new Int32Array(6)
  private readonly ways = new Int32Array(6)
  private readonly mask = new Int32Array(6)
  private readonly rrOff = new Int32Array(6)
  /** Upper linear-address bits (la / span, signed); NaN = empty. */
  private readonly key: Float64Array
  /** asid << 12 | pcid. */
  private readonly tag: Int32Array
  private readonly table: Float64Array
  /** bit 0 rw, bit 1 us, bit 2 xd. */
  private readonly rights: Uint8Array
  private readonly rr: Uint8Array

  constructor(config: Partial<PscConfig> = {}) {
    const c = makePscConfig(config)
    this.config = Object.freeze(c)
    const geo: [number, number][] = [
      [c.setsPde, c.waysPde],
      [c.setsPdpte, c.waysPdpte],
      [c.setsPml4e, c.waysPml4e],
      [c.setsPml5e, c.waysPml5e],
    ]
    let cap = 0
    let sets = 0
    for (let l = 2; l <= 5; l++) {
      const [s, w] = geo[l - 2]!
      this.off[l] = cap
      this.ways[l] = w
      this.mask[l] = s - 1
      this.rrOff[l] = sets
      cap += s * w
      sets += s
    }
    this.capacity = cap
    this.key = new Float64Array(cap).fill(NaN)
    this.tag = new Int32Array(cap)
    this.table = new Float64Array(cap)
    this.rights = new Uint8Array(cap)
    this.rr = new Uint8Array(sets)
  }

  /**
   * Find the longest match (lowest level: PDE, then PDPTE, PML4E, PML5E) for `la` in
   * (`asid`, `pcid`) and set the start fields for `walk()`. Returns whether anything matched.
   * Unchecked (hot path): `pcid` in 0..4095.
   */
  lookup(asid: number, pcid: number, la: number): boolean {
    const ctx = (asid << 12) | pcid
    this.lastTag = ctx
    this.lastLa = la
    for (let l = 2; l <= 5; l++) {
      const k = Math.floor(la * INV_SPAN[l]!)
      const ways = this.ways[l]!
      const start = this.off[l]! + (k & this.mask[l]!) * ways
      const end = start + ways
      for (let i = start; i < end; i++) {
        if (this.key[i] === k && this.tag[i] === ctx) {
          const r = this.rights[i]!
          this.startLevel = l - 1
          this.startTable = this.table[i]!
          this.startRw = r & 1
          this.startUs = (r >>> 1) & 1
          this.startXd = (r >>> 2) & 1
          this.counters[PSCC_HIT_PDE + l - 2]!++
          return true
        }
      }
    }
    this.startLevel = 0
    this.startTable = 0
    this.startRw = 1
    this.startUs = 1
    this.startXd = 0
    this.counters[PSCC_MISS]!++
    return false
  }

  /**
   * Cache the non-leaf entries of the successful walk `res` of `la` under `ctx` (its MAXPHYADDR
   * mask and paging levels). If the last {@link lookup} was for this (asid, pcid, la) the walk
   * began where that lookup said (its start level and rights); otherwise at CR3. See
   * {@link fillFrom}. Returns the number of entries written.
   */
  fill(asid: number, pcid: number, la: number, res: WalkResult, ctx: PagingContext): number {
    if (this.lastTag === ((asid << 12) | pcid) && this.lastLa === la && this.startLevel > 0) {
      return this.fillFrom(asid, pcid, la, res, ctx.hiAddrMask, this.startLevel, this.startRw, this.startUs, this.startXd)
    }
    return this.fillFrom(asid, pcid, la, res, ctx.hiAddrMask, ctx.levels, 1, 1, 0)
  }

  /**
   * Cache the non-leaf entries of a successful walk of `la`: every level from `topLevel` (where
   * the walk began: `ctx.levels`, or the `startLevel` of a PSC hit) down to just above the leaf,
   * with rights accumulated top-down from (`rw`, `us`, `xd`), the rights above `topLevel`.
   * `hiAddrMask` is `PagingContext.hiAddrMask` (address bits 51:32 below MAXPHYADDR).
   * Creates nothing for a walk that did not complete, and skips entries that are not present,
   * have A=0 or are leaves (SDM 4.10.3.1: only from present entries after A is set; the walk has
   * already rejected reserved bits). Returns the number of entries written.
   */
  fillFrom(asid: number, pcid: number, la: number, res: WalkResult, hiAddrMask: number, topLevel: number, rw = 1, us = 1, xd = 0): number {
    if (res.status !== WALK_OK || res.level < 1) return 0
    const ctx = (asid << 12) | pcid
    let n = 0
    for (let l = topLevel; l > res.level; l--) {
      const lo = res.pathLo[l]!
      const hi = res.pathHi[l]!
      if ((lo & PTE_P) === 0 || (lo & PTE_A) === 0 || ((lo & PTE_PS) !== 0 && l <= 3)) return n
      rw &= (lo >>> 1) & 1
      us &= (lo >>> 2) & 1
      xd |= hi >>> 31
      this.put(l, Math.floor(la * INV_SPAN[l]!), ctx, ((lo & LO_ADDR_MASK) >>> 0) + (hi & hiAddrMask) * TWO32, rw | (us << 1) | (xd << 2))
      n++
    }
    return n
  }

  private put(level: number, k: number, ctx: number, table: number, rights: number): void {
    const ways = this.ways[level]!
    const set = k & this.mask[level]!
    const start = this.off[level]! + set * ways
    const end = start + ways
    let victim = -1
    let free = -1
    for (let i = start; i < end; i++) {
      const ki = this.key[i]!
      if (ki !== ki) {
        if (free < 0) free = i
      } else if (ki === k && this.tag[i] === ctx) {
        victim = i
        break
      }
    }
    if (victim < 0) {
      if (free >= 0) victim = free
      else {
        const r = this.rrOff[level]! + set
        const w = this.rr[r]!
        victim = start + w
        this.rr[r] = w + 1 === ways ? 0 : w + 1
        this.counters[PSCC_EVICT]!++
      }
    }
    this.key[victim] = k
    this.tag[victim] = ctx
    this.table[victim] = table
    this.rights[victim] = rights
    this.counters[PSCC_FILL]!++
  }

  /**
   * All PSC entries of one PCID: INVLPG (any address: SDM 4.10.4.1 says all PSC entries of the
   * current PCID), INVPCID types 0 and 1, MOV to CR3 (the new PCID, or PCID 0 with PCIDE=0), task
   * switch, MOV to CR4 changing PAE or setting SMEP (current PCID). Also what #PF delivery needs
   * (it may invalidate more than the entries that would translate the faulting address).
   */
  invalidatePcid(asid: number, pcid: number): void {
    this.counters[PSCC_INVALIDATE]!++
    const ctx = (asid << 12) | pcid
    for (let i = 0; i < this.capacity; i++) if (this.tag[i] === ctx) this.key[i] = NaN
  }

  /**
   * All PSC entries of `asid`, every PCID: INVPCID types 2 and 3, MOV to CR4 changing PGE or
   * clearing PCIDE, MOV to CR0 clearing PG, INVVPID (any type: PSC entries are never global),
   * INVEPT for the EPTP of `asid`, AMD TLB_CONTROL 3 and 7.
   */
  invalidateAsid(asid: number): void {
    this.counters[PSCC_INVALIDATE]!++
    for (let i = 0; i < this.capacity; i++) if (this.tag[i]! >> 12 === asid) this.key[i] = NaN
  }

  /** Every entry: INVVPID/INVEPT type 2 (all contexts), AMD TLB_CONTROL 1. */
  invalidateAll(): void {
    this.counters[PSCC_INVALIDATE]!++
    this.key.fill(NaN)
  }

  /** Number of valid entries (for statistics and tests). */
  liveEntries(): number {
    let n = 0
    for (let i = 0; i < this.capacity; i++) if (this.key[i] === this.key[i]) n++
    return n
  }
}
