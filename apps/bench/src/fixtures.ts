import {
  ACC_READ,
  CR0_PE,
  CR0_PG,
  CR0_WP,
  CR4_LA57,
  CR4_PAE,
  EFER_LMA,
  EFER_LME,
  EFER_NXE,
  EPT_A,
  EPT_D,
  EPT_R,
  EPT_W,
  EPT_X,
  EptTranslator,
  FrameAllocator,
  PageTableBuilder,
  PhysMem,
  PTE_A,
  PTE_D,
  PTE_P,
  PTE_RW,
  PTE_US,
  Vcpu,
} from '@mmusim/x86-hw'

/** A guest with `pages` 4 KiB pages mapped at linear 0x4000_0000, on a bare vCPU (or under EPT). */
export interface WalkFixture {
  vcpu: Vcpu
  las: Float64Array
  kinds: Uint8Array
  out: Float64Array
  pages: number
}

const GUEST_VA = 0x40000000

/** Build guest tables in `mem` mapping `pages` pages; entries pre-set A/D so walks are pure reads. */
function buildGuest(alloc: FrameAllocator, levels: 4 | 5, pages: number): PageTableBuilder {
  const b = new PageTableBuilder(alloc, { levels, format: 'x86' })
  const flags = PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D
  for (let i = 0; i < pages; i++) {
    const data = alloc.allocOrThrow()
    b.map({ va: GUEST_VA + i * 4096, pa: data * 4096, leafLo: flags, tableLo: flags })
  }
  return b
}

function guestState(v: Vcpu, root: number, levels: 4 | 5): void {
  v.state.efer = EFER_LME | EFER_NXE
  v.state.cr4 = CR4_PAE | (levels === 5 ? CR4_LA57 : 0)
  v.state.cr3 = root
  v.setCr0(CR0_PG | CR0_PE | CR0_WP)
  v.state.efer |= EFER_LMA
  v.ctx.update(v.state)
}

function accesses(pages: number, perPage: number): { las: Float64Array; kinds: Uint8Array; out: Float64Array } {
  const n = pages * perPage
  const las = new Float64Array(n)
  for (let i = 0; i < n; i++) las[i] = GUEST_VA + (i % pages) * 4096 + ((i * 64) % 4096)
  return { las, kinds: new Uint8Array(n).fill(ACC_READ), out: new Float64Array(n) }
}

/** Bare-metal 4-level guest. */
export function bareFixture(pages: number, perPage: number, options: { levels?: 4 | 5; psc?: boolean } = {}): WalkFixture {
  const levels = options.levels ?? 4
  const mem = new PhysMem({ sizeBytes: 512 << 20, name: 'guest' })
  const alloc = new FrameAllocator(mem, 1)
  const b = buildGuest(alloc, levels, pages)
  const vcpu = new Vcpu(mem, { psc: options.psc === true })
  guestState(vcpu, b.root, levels)
  return { vcpu, pages, ...accesses(pages, perPage) }
}

/** A 4-level guest under 4-level EPT with 4 KiB EPT pages (a cold walk is 24 references). GPA = HPA. */
export function eptFixture(pages: number, perPage: number): WalkFixture {
  const host = new PhysMem({ sizeBytes: 512 << 20, name: 'host' })
  const guestBytes = 128 << 20
  const galloc = new FrameAllocator(host, 1, guestBytes / 4096 - 1)
  const eptAlloc = new FrameAllocator(host, guestBytes / 4096, 4096 * 16)
  const gb = buildGuest(galloc, 4, pages)
  const ept = new PageTableBuilder(eptAlloc, { levels: 4, format: 'ept' })
  ept.identity(guestBytes, 1, EPT_R | EPT_W | EPT_X | (6 << 3) | EPT_A | EPT_D)
  const vcpu = new Vcpu(host)
  const nested = new EptTranslator(host, vcpu.features, { root: ept.root, levels: 4, adEnabled: false })
  vcpu.setTdpMode(host, nested, 1)
  guestState(vcpu, gb.root, 4)
  return { vcpu, pages, ...accesses(pages, perPage) }
}
