/**
 * `struct kvm_mmu_page`, `union kvm_mmu_page_role` and the intrusive lists the shadow MMU keeps
 * pages on (arch/x86/kvm/mmu/mmu_internal.h, arch/x86/include/asm/kvm_host.h; shadow-mmu.md §2).
 */

// ---- ACC_* (spte.h) ----
export const ACC_EXEC_MASK = 1
export const ACC_WRITE_MASK = 2
export const ACC_USER_MASK = 4
export const ACC_ALL = 7

/** `KVM_PAGE_ARRAY_NR`: entries of the page vector an unsync walk fills. */
export const KVM_PAGE_ARRAY_NR = 16
/** `KVM_MIN_FREE_MMU_PAGES` / `KVM_REFILL_PAGES`. */
export const KVM_MIN_FREE_MMU_PAGES = 5
export const KVM_REFILL_PAGES = 25
/** `KVM_MIN_ALLOC_MMU_PAGES` and `KVM_PERMILLE_MMU_PAGES` (default quota = max(64, pages · 20 / 1000)). */
export const KVM_MIN_ALLOC_MMU_PAGES = 64
export const KVM_PERMILLE_MMU_PAGES = 20
/** `RMAP_RECYCLE_THRESHOLD`: an rmap longer than this is zapped whole. */
export const RMAP_RECYCLE_THRESHOLD = 1000
/** `KVM_MMU_HASH_SHIFT` = 12: 4096 hash buckets. */
export const KVM_MMU_HASH_SHIFT = 12
/** `BATCH_ZAP_PAGES`: the fast zap may yield after this many pages. */
export const BATCH_ZAP_PAGES = 10
/** `PTE_PREFETCH_NUM`. */
export const PTE_PREFETCH_NUM = 8
/** `INVALID_INDEX` of an mmu_page_path / pvec entry (the walk root). */
export const INVALID_INDEX = -1

// ---- union kvm_mmu_page_role, bit for bit ----
export const ROLE_LEVEL_MASK = 0xf
export const ROLE_HAS_4_BYTE_GPTE = 1 << 4
export const ROLE_QUADRANT_SHIFT = 5
export const ROLE_QUADRANT_MASK = 3 << ROLE_QUADRANT_SHIFT
export const ROLE_DIRECT = 1 << 7
export const ROLE_ACCESS_SHIFT = 8
export const ROLE_ACCESS_MASK = 7 << ROLE_ACCESS_SHIFT
export const ROLE_INVALID = 1 << 11
export const ROLE_EFER_NX = 1 << 12
export const ROLE_CR0_WP = 1 << 13
export const ROLE_SMEP_ANDNOT_WP = 1 << 14
export const ROLE_SMAP_ANDNOT_WP = 1 << 15
export const ROLE_AD_DISABLED = 1 << 16
export const ROLE_GUEST_MODE = 1 << 17
export const ROLE_PASSTHROUGH = 1 << 18
export const ROLE_SMM_SHIFT = 24

/** `kvm_sync_page_check`'s ignored fields: level, access, quadrant, passthrough. */
export const SYNC_ROLE_IGN = ROLE_LEVEL_MASK | ROLE_ACCESS_MASK | ROLE_QUADRANT_MASK | ROLE_PASSTHROUGH

export function roleLevel(role: number): number {
  return role & ROLE_LEVEL_MASK
}
export function roleAccess(role: number): number {
  return (role & ROLE_ACCESS_MASK) >>> ROLE_ACCESS_SHIFT
}
export function roleDirect(role: number): boolean {
  return (role & ROLE_DIRECT) !== 0
}
export function roleSmm(role: number): number {
  return role >>> ROLE_SMM_SHIFT
}
/** Replace level and access of a role word. */
export function roleWith(role: number, level: number, access: number): number {
  return ((role & ~(ROLE_LEVEL_MASK | ROLE_ACCESS_MASK)) | level | (access << ROLE_ACCESS_SHIFT)) >>> 0
}

/** A readable role, for messages. */
export function roleToString(role: number): string {
  const f: string[] = [`L${roleLevel(role)}`, `acc=${roleAccess(role)}`]
  if (role & ROLE_DIRECT) f.push('direct')
  if (role & ROLE_INVALID) f.push('invalid')
  if (role & ROLE_CR0_WP) f.push('wp')
  if (role & ROLE_EFER_NX) f.push('nx')
  if (role & ROLE_SMEP_ANDNOT_WP) f.push('smep&!wp')
  if (role & ROLE_SMAP_ANDNOT_WP) f.push('smap&!wp')
  if (role & ROLE_AD_DISABLED) f.push('ad-off')
  if (role & ROLE_PASSTHROUGH) f.push('passthrough')
  return f.join(' ')
}

/**
 * An intrusive doubly-linked list of shadow pages (`struct list_head`): `active_mmu_pages` (head
 * = newest) or an invalid list. A page is on at most one list; walkers that cache only the next
 * element can therefore be led onto another list when that element moves (seed 000).
 */
export class PageList {
  readonly name: string
  head: MmuPage | null = null
  tail: MmuPage | null = null
  size = 0

  constructor(name: string) {
    this.name = name
  }

  /** `list_add(&sp->link, list)`: insert at the head. */
  addHead(sp: MmuPage): void {
    sp.list = this
    sp.prev = null
    sp.next = this.head
    if (this.head !== null) this.head.prev = sp
    else this.tail = sp
    this.head = sp
    this.size++
  }

  /** `list_del(&sp->link)`. */
  remove(sp: MmuPage): void {
    if (sp.prev !== null) sp.prev.next = sp.next
    else this.head = sp.next
    if (sp.next !== null) sp.next.prev = sp.prev
    else this.tail = sp.prev
    sp.prev = null
    sp.next = null
    sp.list = null
    this.size--
  }

  isEmpty(): boolean {
    return this.head === null
  }
}

/** `list_move(&sp->link, to)` / `list_add` when the page is on no list. */
export function listMove(sp: MmuPage, to: PageList): void {
  if (sp.list !== null) sp.list.remove(sp)
  to.addHead(sp)
}

let nextPageId = 1

/**
 * `struct kvm_mmu_page`: one shadow page table (its `spt` is a host page the hardware walks, at
 * `hpa`) plus its metadata.
 */
export class MmuPage {
  readonly id = nextPageId++
  /** `gfn`: the shadowed guest table (indirect) or the first gfn mapped (direct). */
  readonly gfn: number
  /** `role.word`; `invalid` is set in place by prepare-zap. */
  role: number
  /** Host-physical address of `spt`. */
  readonly hpa: number
  /** `mmu_valid_gen`. */
  readonly mmuValidGen: number
  unsync = false
  /** `unsync_children` and `unsync_child_bitmap` (512 bits). */
  unsyncChildren = 0
  readonly unsyncChildBitmap = new Uint32Array(16)
  /** `parent_ptes` as a multiset of (parent page, index). */
  readonly parentSps: MmuPage[] = []
  readonly parentIdx: number[] = []
  /** `root_count`. */
  rootCount = 0
  /** `write_flooding_count`. */
  writeFloodingCount = 0
  /** `shadowed_translation`: gfn and ACC_* access per index (pages with gPTEs only). */
  readonly shadowedGfn: Float64Array | null
  readonly shadowedAccess: Uint8Array | null
  // ---- list membership (`link`) ----
  list: PageList | null = null
  prev: MmuPage | null = null
  next: MmuPage | null = null
  /** Freed by commit (debug: any later use is a use-after-free). */
  freed = false

  constructor(gfn: number, role: number, hpa: number, gen: number) {
    this.gfn = gfn
    this.role = role
    this.hpa = hpa
    this.mmuValidGen = gen
    const gptes = (role & (ROLE_DIRECT | ROLE_PASSTHROUGH)) === 0
    this.shadowedGfn = gptes ? new Float64Array(512) : null
    this.shadowedAccess = gptes ? new Uint8Array(512) : null
  }

  get level(): number {
    return this.role & ROLE_LEVEL_MASK
  }
  get direct(): boolean {
    return (this.role & ROLE_DIRECT) !== 0
  }
  get invalid(): boolean {
    return (this.role & ROLE_INVALID) !== 0
  }
  /** `sp_has_gptes()`: indirect and not passthrough. */
  get hasGptes(): boolean {
    return (this.role & (ROLE_DIRECT | ROLE_PASSTHROUGH)) === 0
  }

  testUnsyncChildBit(i: number): boolean {
    return ((this.unsyncChildBitmap[i >>> 5]! >>> (i & 31)) & 1) !== 0
  }
  /** Set bit i; returns whether it was already set (`__test_and_set_bit`). */
  testAndSetUnsyncChildBit(i: number): boolean {
    const w = i >>> 5
    const m = 1 << (i & 31)
    const old = this.unsyncChildBitmap[w]!
    this.unsyncChildBitmap[w] = old | m
    return (old & m) !== 0
  }
  clearUnsyncChildBitOnly(i: number): void {
    this.unsyncChildBitmap[i >>> 5]! &= ~(1 << (i & 31))
  }

  /** `mmu_page_add_parent_pte`. */
  addParent(parent: MmuPage, idx: number): void {
    this.parentSps.push(parent)
    this.parentIdx.push(idx)
  }
  /** `mmu_page_remove_parent_pte`; false if (parent, idx) was not recorded (KVM_BUG in the kernel). */
  removeParent(parent: MmuPage, idx: number): boolean {
    const ps = this.parentSps
    for (let i = 0; i < ps.length; i++) {
      if (ps[i] === parent && this.parentIdx[i] === idx) {
        const last = ps.length - 1
        ps[i] = ps[last]!
        this.parentIdx[i] = this.parentIdx[last]!
        ps.pop()
        this.parentIdx.pop()
        return true
      }
    }
    return false
  }

  toString(): string {
    return `sp#${this.id}(gfn=0x${this.gfn.toString(16)} ${roleToString(this.role)}${this.unsync ? ' unsync' : ''}${this.rootCount ? ` roots=${this.rootCount}` : ''})`
  }
}
