import { ConcurrencyError } from './errors.ts'

/** Largest count; one more increment is an overflow (refcount_t saturates at REFCOUNT_SATURATED and warns). */
export const REFCOUNT_MAX = 0x7fff_ffff

export interface RefcountOptions {
  /** Name in diagnostics (e.g. "root 0x1000 tdp_mmu_root_count"). */
  readonly name?: string
  /**
   * Track who holds each reference. Every get/put must then name its owner, and a put by an
   * owner that holds no reference throws `REFCOUNT_FOREIGN_PUT`.
   */
  readonly trackOwners?: boolean
  /** With trackOwners: the owners of the initial references (length must equal the initial count). */
  readonly owners?: readonly string[]
}

/**
 * refcount_t with the kernel's rules, turned from WARNs into errors:
 * increment from 0 (`REFCOUNT_INC_FROM_ZERO`), decrement below 0 (`REFCOUNT_UNDERFLOW`),
 * overflow (`REFCOUNT_SATURATED`), refcount_dec() reaching 0 (`REFCOUNT_DEC_TO_ZERO`: the last
 * put must use decAndTest so someone frees the object). `set()` is allowed only before the
 * object is published (first get/put or `publish()`); forcing a count afterwards is an error
 * (seed 004: "KVM should never force a refcount to '0'"). With `trackOwners`, dropping a
 * reference another task took is caught (seed 004: "_this_ task can't drop a reference taken
 * by the other task").
 */
export class Refcount {
  readonly name: string
  private count: number
  private published = false
  private readonly owners: Map<string, number> | null

  /** refcount_set() at creation. `initial` ≥ 1 for a live object, 0 for a dead one. */
  constructor(initial: number, options: RefcountOptions = {}) {
    this.name = options.name ?? 'refcount'
    checkCount(this.name, initial)
    this.count = initial
    this.owners = options.trackOwners === true ? new Map() : null
    if (this.owners !== null) this.setOwners(initial, options.owners ?? [])
    else if (options.owners !== undefined) {
      throw new ConcurrencyError('INVALID_ARGUMENT', `Refcount "${this.name}": owners given without trackOwners: true.`)
    }
  }

  /** refcount_read(). */
  read(): number {
    return this.count
  }

  /** Whether the object has been published (further `set()` calls throw). */
  get isPublished(): boolean {
    return this.published
  }

  /** Mark the object visible to other threads (e.g. list_add_rcu of a root); `set()` is then illegal. */
  publish(): void {
    this.published = true
  }

  /**
   * refcount_set(): only before publication. Afterwards throws `REFCOUNT_SET_AFTER_PUBLISH`:
   * another thread may hold or be taking a reference, so forcing a value loses or invents one.
   */
  set(n: number, owners: readonly string[] = []): void {
    if (this.published) {
      throw new ConcurrencyError(
        'REFCOUNT_SET_AFTER_PUBLISH',
        `refcount_set(${this.name}, ${n}) after the object was published (count ${this.count}${this.describeOwners()}); other threads may hold references. Set the count only at creation and release references with decAndTest().`,
      )
    }
    checkCount(this.name, n)
    this.count = n
    if (this.owners !== null) this.setOwners(n, owners)
  }

  /** refcount_inc(): take a reference on an object known to be live. */
  inc(owner?: string): void {
    this.published = true
    if (this.count === 0) {
      throw new ConcurrencyError(
        'REFCOUNT_INC_FROM_ZERO',
        `refcount_inc(${this.name}) on 0: the object is being freed (refcount_t: "addition on 0; use-after-free"). Use incNotZero() to take a reference that may fail.`,
      )
    }
    this.increment(owner, 'refcount_inc')
  }

  /** refcount_inc_not_zero(): take a reference unless the count is 0 (object dying); returns success. */
  incNotZero(owner?: string): boolean {
    this.published = true
    if (this.count === 0) return false
    this.increment(owner, 'refcount_inc_not_zero')
    return true
  }

  /**
   * refcount_dec(): drop a reference that is not the last. Reaching 0 throws
   * `REFCOUNT_DEC_TO_ZERO` (nobody would free the object); use decAndTest() for a put that may be last.
   */
  dec(owner?: string): void {
    this.published = true
    if (this.count === 1) {
      throw new ConcurrencyError(
        'REFCOUNT_DEC_TO_ZERO',
        `refcount_dec(${this.name}) dropped the last reference (refcount_t: "decrement hit 0; leaking memory"). Use decAndTest() and free the object when it returns true.`,
      )
    }
    this.decrement(owner, 'refcount_dec')
  }

  /** refcount_dec_and_test(): drop a reference; true if it was the last (the caller frees). */
  decAndTest(owner?: string): boolean {
    this.published = true
    this.decrement(owner, 'refcount_dec_and_test')
    return this.count === 0
  }

  /** refcount_dec_not_one(): drop a reference unless it is the last one; true if dropped. */
  decNotOne(owner?: string): boolean {
    this.published = true
    if (this.count === 1) {
      this.ownerCheck(owner, 'refcount_dec_not_one')
      return false
    }
    this.decrement(owner, 'refcount_dec_not_one')
    return true
  }

  /** refcount_dec_if_one(): drop the reference only if it is the last one; true if dropped (count now 0). */
  decIfOne(owner?: string): boolean {
    this.published = true
    if (this.count !== 1) {
      this.ownerCheck(owner, 'refcount_dec_if_one')
      return false
    }
    this.decrement(owner, 'refcount_dec_if_one')
    return true
  }

  /** With trackOwners: references held per owner (owners with 0 are omitted). */
  holders(): ReadonlyMap<string, number> {
    return this.owners ?? new Map<string, number>()
  }

  private increment(owner: string | undefined, op: string): void {
    if (this.count >= REFCOUNT_MAX) {
      throw new ConcurrencyError(
        'REFCOUNT_SATURATED',
        `${op}(${this.name}) overflows the count ${this.count} (refcount_t: "saturated; leaking memory"); a reference is being leaked in a loop.`,
      )
    }
    const o = this.ownerCheck(owner, op)
    this.count++
    if (o !== null) this.owners!.set(o, (this.owners!.get(o) ?? 0) + 1)
  }

  private decrement(owner: string | undefined, op: string): void {
    if (this.count === 0) {
      throw new ConcurrencyError(
        'REFCOUNT_UNDERFLOW',
        `${op}(${this.name}) on 0 (refcount_t: "underflow; use-after-free"): a reference was put twice or never taken.`,
      )
    }
    const o = this.ownerCheck(owner, op)
    if (o !== null) {
      const mine = this.owners!.get(o) ?? 0
      if (mine === 0) {
        throw new ConcurrencyError(
          'REFCOUNT_FOREIGN_PUT',
          `${op}(${this.name}) by "${o}", which holds no reference (count ${this.count}${this.describeOwners()}): it would drop a reference another task took. Put only references you got.`,
        )
      }
      if (mine === 1) this.owners!.delete(o)
      else this.owners!.set(o, mine - 1)
    }
    this.count--
  }

  private ownerCheck(owner: string | undefined, op: string): string | null {
    if (this.owners === null) return null
    if (owner === undefined) {
      throw new ConcurrencyError(
        'REFCOUNT_OWNER_REQUIRED',
        `${op}(${this.name}): owner tracking is on, so every get/put must name its owner (e.g. the thread or object holding the reference).`,
      )
    }
    return owner
  }

  private setOwners(n: number, owners: readonly string[]): void {
    if (owners.length !== n) {
      throw new ConcurrencyError(
        'INVALID_ARGUMENT',
        `Refcount "${this.name}": with trackOwners, give one owner per reference (${n} references, ${owners.length} owners).`,
      )
    }
    const m = this.owners!
    m.clear()
    for (const o of owners) m.set(o, (m.get(o) ?? 0) + 1)
  }

  private describeOwners(): string {
    if (this.owners === null) return ''
    const parts: string[] = []
    for (const [o, n] of this.owners) parts.push(`${o}×${n}`)
    return `; holders: ${parts.length === 0 ? 'none' : parts.join(', ')}`
  }
}

function checkCount(name: string, n: number): void {
  if (!Number.isInteger(n) || n < 0 || n > REFCOUNT_MAX) {
    throw new ConcurrencyError('INVALID_ARGUMENT', `Refcount "${name}": count must be an integer in [0, ${REFCOUNT_MAX}], got ${n}.`)
  }
}
