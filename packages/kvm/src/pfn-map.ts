/**
 * A map from host page-frame numbers to objects, for what the kernel finds from a frame through
 * its `struct page` (an MMU page from the table address in an SPTE: `sptep_to_sp()`,
 * `spte_to_child_sp()`, `root_to_sp()`). Frames are grouped by 512 (a 2 MiB region) in small
 * arrays, with the last region used cached: page tables cluster in memory, so a lookup is usually
 * a division, a compare and an array load — far cheaper than hashing the number in a `Map` on the
 * MMUs' fault paths — and memory stays proportional to the regions in use.
 */
export class PfnMap<T> {
  private readonly regions = new Map<number, (T | undefined)[]>()
  /** NaN: equal to no region (not even the -1 of a negative pfn). */
  private lastRegion = Number.NaN
  private lastTable: (T | undefined)[] | null = null
  /** Entries in the map. */
  size = 0

  private table(region: number): (T | undefined)[] | undefined {
    if (region === this.lastRegion) return this.lastTable!
    const t = this.regions.get(region)
    if (t !== undefined) {
      this.lastRegion = region
      this.lastTable = t
    }
    return t
  }

  /** The object of frame `pfn`, or undefined (also for a pfn that is not a non-negative integer). */
  get(pfn: number): T | undefined {
    const region = Math.floor(pfn / 512)
    const t = this.table(region)
    // A fractional or negative pfn indexes no element (or a negative region that is never created).
    return t === undefined ? undefined : t[pfn - region * 512]
  }

  has(pfn: number): boolean {
    return this.get(pfn) !== undefined
  }

  /** Map `pfn` (a non-negative integer) to `value`, replacing any entry. */
  set(pfn: number, value: T): void {
    if (!Number.isSafeInteger(pfn) || pfn < 0) throw new RangeError(`PfnMap.set: a pfn is a non-negative integer, got ${String(pfn)}`)
    const region = Math.floor(pfn / 512)
    let t = this.table(region)
    if (t === undefined) {
      t = new Array<T | undefined>(512).fill(undefined)
      this.regions.set(region, t)
      this.lastRegion = region
      this.lastTable = t
    }
    const i = pfn - region * 512
    if (t[i] === undefined) this.size++
    t[i] = value
  }

  /** Remove `pfn`'s entry; returns whether there was one. */
  delete(pfn: number): boolean {
    const region = Math.floor(pfn / 512)
    const t = this.table(region)
    if (t === undefined) return false
    const i = pfn - region * 512
    if (t[i] === undefined) return false
    t[i] = undefined
    this.size--
    return true
  }

  /** Every entry's value, in pfn order within each region (regions in creation order). */
  *values(): IterableIterator<T> {
    for (const t of this.regions.values()) for (const v of t) if (v !== undefined) yield v
  }
}
