/**
 * Tables of 512 entries, one per 2 MiB region of frame (or page) numbers, found through a `Map`
 * by region with the last region used cached: lookups cluster, so one is usually a division, a
 * compare and an array load instead of hashing the number. Memory stays proportional to the
 * regions in use. The base of {@link PfnMap} and of the host's 4K page table.
 */
export class RegionTables<A> {
  protected readonly regions = new Map<number, A>()
  /** NaN: equal to no region (not even the -1 of a negative number). */
  private lastRegion = Number.NaN
  private lastTable: A | null = null

  /** The table of `region`, if it has one. */
  protected table(region: number): A | undefined {
    if (region === this.lastRegion) return this.lastTable!
    const t = this.regions.get(region)
    if (t !== undefined) {
      this.lastRegion = region
      this.lastTable = t
    }
    return t
  }

  /** Give `region` the table `t` (it has none). */
  protected addTable(region: number, t: A): void {
    this.regions.set(region, t)
    this.lastRegion = region
    this.lastTable = t
  }

  /** Drop `region`'s table. */
  protected dropTable(region: number): void {
    this.regions.delete(region)
    if (this.lastRegion === region) {
      this.lastRegion = Number.NaN
      this.lastTable = null
    }
  }
}

/**
 * A map from host page-frame numbers to objects, for what the kernel finds from a frame through
 * its `struct page` (an MMU page from the table address in an SPTE: `sptep_to_sp()`,
 * `spte_to_child_sp()`, `root_to_sp()`), far cheaper than a `Map` on the MMUs' fault paths.
 */
export class PfnMap<T> extends RegionTables<(T | undefined)[]> {
  /** Entries in the map. */
  size = 0

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
      this.addTable(region, t)
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
