import { describe, expect, it } from 'vitest'
import {
  ACC_READ,
  ACC_WRITE,
  C_DIRTY_REWALKS,
  C_TLB_HIT_4K,
  C_WALKS,
  CR0_PE,
  CR0_PG,
  CR0_WP,
  CR4_LA57,
  CR4_PAE,
  CR4_PCIDE,
  CR4_PGE,
  EFER_LME,
  EFER_NXE,
  EXEC_GP,
  EXEC_OK,
  EXEC_PF,
  FrameAllocator,
  GuestOp,
  OP_BATCH,
  PageTableBuilder,
  PhysMem,
  PTE_A,
  PTE_D,
  PTE_G,
  PTE_P,
  PTE_RW,
  PTE_US,
  RES_PF,
  Vcpu,
} from './index.ts'

const VA = 0x400000
const RW = PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D

/** A 4-level guest on a bare vCPU: two page tables (for two PCIDs) and data frames A and B. */
function setup(options: { pcide?: boolean; pge?: boolean } = {}) {
  const mem = new PhysMem({ sizeBytes: 16 << 20 })
  const alloc = new FrameAllocator(mem, 1)
  const pt1 = new PageTableBuilder(alloc)
  const pt2 = new PageTableBuilder(alloc)
  const A = alloc.allocOrThrow() * 4096
  const B = alloc.allocOrThrow() * 4096
  mem.write32(A, 0xaaaa)
  mem.write32(B, 0xbbbb)
  const g = options.pge === true ? PTE_G : 0
  const pte1 = pt1.map({ va: VA, pa: A, leafLo: RW | g })
  const pte2 = pt2.map({ va: VA, pa: A, leafLo: RW })
  const cpu = new Vcpu(mem)
  expect(cpu.setEfer(EFER_LME | EFER_NXE)).toBe(EXEC_OK)
  expect(cpu.setCr4(CR4_PAE | (options.pge === true ? CR4_PGE : 0))).toBe(EXEC_OK)
  expect(cpu.setCr3(pt1.root, false)).toBe(EXEC_OK)
  expect(cpu.setCr0(CR0_PG | CR0_PE | CR0_WP)).toBe(EXEC_OK)
  if (options.pcide === true) {
    expect(cpu.setCr4(cpu.state.cr4 | CR4_PCIDE)).toBe(EXEC_OK)
    expect(cpu.setCr3(pt1.root + 1, false)).toBe(EXEC_OK)
  }
  /** The data word the vCPU sees at VA (or -1 on a fault). */
  const look = (): number => (cpu.access(VA, ACC_READ, false) === EXEC_OK ? mem.read32(cpu.res.pa) : -1)
  /** Retarget a PTE to frame B in memory, without telling the TLB. */
  const retarget = (pte: number, lo = RW | g): void => { mem.write64(pte, (B | lo) >>> 0, 0); }
  return { mem, cpu, pt1, pt2, pte1, pte2, A, B, look, retarget }
}

describe('TLB behaviour seen through the vCPU', () => {
  it('a stale translation after a PTE change is used until INVLPG', () => {
    const { cpu, pte1, look, retarget } = setup()
    expect(look()).toBe(0xaaaa)
    retarget(pte1)
    expect(look()).toBe(0xaaaa) // stale, as hardware may
    expect(look()).toBe(0xaaaa)
    cpu.invlpg(VA + 0x123)
    expect(look()).toBe(0xbbbb)
  })

  it('P 1→0 without a flush keeps the old translation; not-present entries are never cached', () => {
    const { cpu, mem, pte1, look } = setup()
    expect(look()).toBe(0xaaaa)
    mem.write64(pte1, 0, 0)
    expect(look()).toBe(0xaaaa)
    cpu.invlpg(VA)
    expect(look()).toBe(-1)
    expect(cpu.res.errorCode).toBe(0) // supervisor read, not present
    // P 0→1 needs no flush: nothing was cached from the not-present entry.
    mem.write64(pte1, (0x7000 | RW) >>> 0, 0)
    expect(cpu.access(VA, ACC_READ, false)).toBe(EXEC_OK)
    expect(cpu.res.pa).toBe(0x7000)
  })

  it('MOV CR3 (PCIDE=0) flushes non-global entries; global entries survive it', () => {
    const s = setup()
    expect(s.look()).toBe(0xaaaa)
    s.retarget(s.pte1)
    s.cpu.setCr3(s.pt1.root, false)
    expect(s.look()).toBe(0xbbbb)

    const g = setup({ pge: true })
    expect(g.look()).toBe(0xaaaa)
    g.retarget(g.pte1)
    g.cpu.setCr3(g.pt1.root, false)
    expect(g.look()).toBe(0xaaaa) // global: survives the CR3 write
    g.cpu.setCr4(g.cpu.state.cr4 & ~CR4_PGE) // toggling PGE flushes everything
    expect(g.look()).toBe(0xbbbb)
  })

  it('PCIDs tag entries; MOV CR3 with the no-flush bit keeps the target PCID’s entries, without it flushes them', () => {
    const { cpu, pt1, pt2, pte1, look, retarget } = setup({ pcide: true })
    expect(look()).toBe(0xaaaa) // cached under PCID 1
    cpu.setCr3(pt2.root + 2, false) // switch to PCID 2
    retarget(pte1)
    cpu.setCr3(pt1.root + 1, true) // back to PCID 1 with the no-flush hint
    expect(look()).toBe(0xaaaa) // PCID 1's entry survived both switches
    cpu.setCr3(pt1.root + 1, false)
    expect(look()).toBe(0xbbbb)
  })

  it('INVPCID: individual address, single context, all including globals, all except globals', () => {
    const { cpu, pte1, look, retarget } = setup({ pcide: true, pge: true })
    // Type 0 removes only non-global entries: the global one stays.
    expect(look()).toBe(0xaaaa)
    retarget(pte1)
    expect(cpu.invpcid(0, 1, VA)).toBe(EXEC_OK)
    expect(look()).toBe(0xaaaa)
    // Type 1 (single context) keeps globals too.
    expect(cpu.invpcid(1, 1, 0)).toBe(EXEC_OK)
    expect(look()).toBe(0xaaaa)
    // Type 3 (all except globals) keeps it; type 2 removes it.
    expect(cpu.invpcid(3, 0, 0)).toBe(EXEC_OK)
    expect(look()).toBe(0xaaaa)
    expect(cpu.invpcid(2, 0, 0)).toBe(EXEC_OK)
    expect(look()).toBe(0xbbbb)
    // Bad type, PCID or a non-canonical type-0 address: #GP.
    expect(cpu.invpcid(4, 0, 0)).toBe(EXEC_GP)
    expect(cpu.invpcid(0, 4096, 0)).toBe(EXEC_GP)
    expect(cpu.invpcid(0, 1, 2 ** 47)).toBe(EXEC_GP)
  })

  it('an entry cached by a read is not writable until the walk sets D in memory', () => {
    const { cpu, mem, pte1 } = setup()
    mem.write64(pte1, (mem.read32(pte1) & ~PTE_D) >>> 0, 0)
    expect(cpu.access(VA, ACC_READ, false)).toBe(EXEC_OK)
    expect(mem.read32(pte1) & PTE_D).toBe(0)
    const walks = cpu.counters[C_WALKS]!
    expect(cpu.access(VA, ACC_WRITE, false)).toBe(EXEC_OK)
    expect(cpu.counters[C_WALKS]! - walks).toBe(1) // the write re-walked
    expect(cpu.counters[C_DIRTY_REWALKS]).toBe(1)
    expect(mem.read32(pte1) & PTE_D).toBe(PTE_D)
    const hits = cpu.counters[C_TLB_HIT_4K]!
    expect(cpu.access(VA, ACC_WRITE, false)).toBe(EXEC_OK) // now a dirty hit
    expect(cpu.counters[C_TLB_HIT_4K]! - hits).toBe(1)
  })

  it('a permission upgrade without a flush is seen by a fresh walk (no spurious #PF)', () => {
    const { cpu, mem, pte1 } = setup()
    mem.write64(pte1, (mem.read32(pte1) & ~PTE_RW) >>> 0, 0)
    expect(cpu.access(VA, ACC_READ, false)).toBe(EXEC_OK)
    expect(cpu.access(VA, ACC_WRITE, false)).toBe(EXEC_PF) // read-only, WP=1
    expect(cpu.res.errorCode).toBe(0x3)
    expect(cpu.state.cr2).toBe(VA)
    mem.write64(pte1, (mem.read32(pte1) | PTE_RW) >>> 0, 0)
    expect(cpu.access(VA, ACC_WRITE, false)).toBe(EXEC_OK)
  })
})

describe('control-register and instruction checks', () => {
  it('#GP for illegal MOV to CR0/CR3/CR4 and EFER writes, with nothing changed', () => {
    const { cpu } = setup()
    const cr4 = cpu.state.cr4
    expect(cpu.setCr4(cr4 | CR4_LA57)).toBe(EXEC_GP) // LA57 cannot toggle in long mode
    expect(cpu.setCr4(cr4 & ~CR4_PAE)).toBe(EXEC_GP) // PAE cannot clear in long mode
    expect(cpu.setCr4(cr4 | (1 << 30))).toBe(EXEC_GP) // reserved bit
    expect(cpu.state.cr4).toBe(cr4)
    expect(cpu.setCr0(CR0_PG)).toBe(EXEC_GP) // PG without PE
    expect(cpu.setCr3(2 ** 46, false)).toBe(EXEC_GP) // above MAXPHYADDR 46
    expect(cpu.setEfer(0)).toBe(EXEC_GP) // LME cannot change while paging
    expect(cpu.access(2 ** 47, ACC_READ, false)).toBe(EXEC_GP) // non-canonical
    expect(cpu.access(-(2 ** 47) - 4096, ACC_READ, false)).toBe(EXEC_GP)
    cpu.invlpg(2 ** 47) // a non-canonical INVLPG is a no-op
  })

  it('a batch stops at the first faulting element and reports it', () => {
    const { cpu, mem, pte1 } = setup()
    const op = new GuestOp()
    const addrs = new Float64Array([VA, VA + 4, VA + 0x1000, VA + 8])
    op.kind = OP_BATCH
    op.batch = { addrs, kinds: new Uint8Array([1, 0, 0, 0]), values: new Uint32Array([0x55, 0, 0, 0]) }
    op.batchStart = 0
    op.batchEnd = 4
    expect(cpu.execute(op)).toBe(EXEC_PF)
    expect(op.status).toBe(RES_PF)
    expect(op.index).toBe(2)
    expect(op.cr2).toBe(VA + 0x1000)
    expect(op.batch.values[1]).toBe(0) // the word after the written one
    expect(mem.read32(mem.read32(pte1) & ~0xfff)).toBe(0x55)
  })

  it('a batch counts exactly what the same accesses one by one would (same-page repeats included)', () => {
    const one = setup()
    const many = setup()
    const addrs = new Float64Array(64)
    const kinds = new Uint8Array(64)
    for (let i = 0; i < 64; i++) {
      addrs[i] = VA + ((i * 4) % 4096)
      kinds[i] = i % 3 === 0 ? 1 : 0
    }
    const op = new GuestOp()
    op.kind = OP_BATCH
    op.batch = { addrs, kinds, values: new Uint32Array(64).fill(7) }
    op.batchStart = 0
    op.batchEnd = 64
    expect(many.cpu.execute(op)).toBe(EXEC_OK)
    for (let i = 0; i < 64; i++) {
      const single = new GuestOp()
      single.kind = kinds[i] === 1 ? 1 : 0
      single.addr = addrs[i]!
      single.lo = 7
      expect(one.cpu.execute(single)).toBe(EXEC_OK)
    }
    expect(Array.from(many.cpu.counters)).toEqual(Array.from(one.cpu.counters))
    expect(many.cpu.counters[C_TLB_HIT_4K]).toBe(63)
  })
})

