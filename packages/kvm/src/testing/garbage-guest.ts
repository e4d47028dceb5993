/**
 * A hostile guest for differential tests of guest input the MMU must survive: it points page-table
 * entries beyond its memory (a leaf, then non-leaf entries at every level) and then writes seeded
 * random garbage (reserved bits, PS where it is reserved, NX with EFER.NXE clear, addresses above
 * MAXPHYADDR...) into entries at every level, probing each with reads, writes and fetches at CPL 3
 * and 0. Bare metal reads beyond installed memory as all ones and drops writes, so every outcome
 * (status, #PF error code, CR2, values read) is architectural and must be the same on every
 * platform. Needs 8 MiB of guest memory at GPA 0 and one vCPU.
 *
 * So that platforms may differ only in what the architecture allows (A/D bits of entries walked
 * by a faulting walk), entries only point to the guest's own data area (4–6 MiB, where every
 * value written is even, so it never holds a present entry) or beyond memory; the tables
 * themselves (frames 1–4) are never mapped as data.
 */
import {
  CR0_PE,
  CR0_PG,
  CR0_WP,
  CR4_PAE,
  EFER_LME,
  EFER_NXE,
  type GuestOp,
  type GuestProgram,
  OP_FETCH,
  OP_MOV_CR0,
  OP_MOV_CR3,
  OP_MOV_CR4,
  OP_READ,
  OP_READ64,
  OP_SET_CPL,
  OP_WRITE,
  OP_WRITE64,
  OP_WRMSR_EFER,
  PTE_P,
  PTE_PS,
  PTE_RW,
  PTE_US,
  RES_OK,
  RES_PF,
} from '@mmusim/x86-hw'
import { KVM_MEM_READONLY } from '../memslot.ts'
import { createReference } from '../reference.ts'
import type { Vm } from '../vm.ts'

const TWO32 = 2 ** 32

/** The garbage guest's layout (guest-physical; the kernel identity-maps the first 2 MiB). */
export const GARBAGE = {
  memBytes: 8 << 20,
  pml4: 0x1000,
  pdpt: 0x2000,
  pd: 0x3000,
  pt: 0x4000,
  /** Data area (2 MiB aligned): user pages at VA 0x400000 map it. */
  data: 0x400000,
  /** Beyond guest memory, 1 GiB aligned. */
  beyond: 0x40000000,
  /** Beyond guest memory, far up (below MAXPHYADDR 46). */
  beyondFar: 2 ** 45,
  /** Table frames, for diffGuestMemory's A/D exemption. */
  tableFrames: [1, 2, 3, 4] as readonly number[],
} as const

/** What a garbage-guest run observed: 6 numbers per probe (tag, status, error code, CR2, value lo, value hi). */
export interface GarbageResult {
  log: number[]
}

/** Probe kinds. */
const READ = 0
const WRITE = 1
const FETCH = 2
const READ64 = 3
const WRITE64 = 4
const OPS = [OP_READ, OP_WRITE, OP_FETCH, OP_READ64, OP_WRITE64] as const

/** mulberry32: a small seeded PRNG (32-bit outputs). */
function prng(seed: number): () => number {
  let s = seed >>> 0
  return () => {
    s = (s + 0x6d2b79f5) >>> 0
    let t = s
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return (t ^ (t >>> 14)) >>> 0
  }
}

/**
 * The garbage guest program. `rounds` of random garbage follow the fixed beyond-memory cases.
 */
export function garbageGuest(op: GuestOp, result: GarbageResult, options: { seed?: number; rounds?: number } = {}): GuestProgram {
  const rand = prng(options.seed ?? 1)
  const rounds = options.rounds ?? 150
  const L = GARBAGE
  return (function* (): GuestProgram {
    function* put(kind: number, addr: number, lo: number, hi = 0): Generator<GuestOp, number, number> {
      op.kind = kind
      op.addr = addr
      op.lo = lo >>> 0
      op.hi = hi >>> 0
      op.implicit = false
      op.noFlush = false
      return yield op
    }
    /** A kernel write of a 64-bit entry through the identity map, then a full TLB flush (MOV CR3). */
    function* setEntry(pa: number, value: number): Generator<GuestOp, void, number> {
      yield* put(OP_SET_CPL, 0, 0)
      yield* put(OP_WRITE64, pa, value % TWO32, Math.floor(value / TWO32))
      yield* put(OP_MOV_CR3, 0, L.pml4)
    }
    function* setRaw(pa: number, lo: number, hi: number): Generator<GuestOp, void, number> {
      yield* put(OP_SET_CPL, 0, 0)
      yield* put(OP_WRITE64, pa, lo, hi)
      yield* put(OP_MOV_CR3, 0, L.pml4)
    }
    /** One access at CPL `cpl`, logged. Written values are even (never a present entry). */
    function* probe(tag: number, kind: number, va: number, cpl: number, value = 0x5a5a5a5a): Generator<GuestOp, void, number> {
      yield* put(OP_SET_CPL, 0, cpl)
      const st = yield* put(OPS[kind]!, va, value & ~1, value ^ 0x13572468)
      const read = st === RES_OK && (kind === READ || kind === READ64)
      result.log.push(tag, st, st === RES_PF ? op.errorCode : 0, st === RES_PF ? op.cr2 : 0, read ? op.valueLo : 0, read && kind === READ64 ? op.valueHi : 0)
    }
    function* probeAll(tag: number, va: number): Generator<GuestOp, void, number> {
      for (const cpl of [3, 0]) {
        yield* probe(tag, READ, va, cpl)
        yield* probe(tag, WRITE, va, cpl, 0x1234 + tag)
        yield* probe(tag, READ, va, cpl)
        yield* probe(tag, WRITE64, va + 8, cpl, 0x4444 + tag)
        yield* probe(tag, READ64, va + 8, cpl)
        yield* probe(tag, FETCH, va, cpl)
      }
    }

    // Boot with paging off (linear = physical): kernel identity 2 MiB page, a user PT at 4 MiB.
    const u = PTE_P | PTE_RW | PTE_US
    yield* put(OP_WRITE64, L.pml4, L.pdpt | u)
    yield* put(OP_WRITE64, L.pdpt, L.pd | u)
    yield* put(OP_WRITE64, L.pd, PTE_P | PTE_RW | PTE_PS)
    yield* put(OP_WRITE64, L.pd + 2 * 8, L.pt | u)
    yield* put(OP_WRMSR_EFER, 0, EFER_LME | EFER_NXE)
    yield* put(OP_MOV_CR4, 0, CR4_PAE)
    yield* put(OP_MOV_CR3, 0, L.pml4)
    yield* put(OP_MOV_CR0, 0, CR0_PG | CR0_PE | CR0_WP)

    // (a) Leaf PTEs pointing beyond guest memory: reads see all ones, writes vanish.
    yield* setEntry(L.pt, L.beyond + u)
    yield* probeAll(1, 0x400000 + 0x100)
    yield* setEntry(L.pt + 8, L.beyondFar + 0x3000 + u)
    yield* probeAll(2, 0x401000 + 0x208)
    // The same page mapped to real memory afterwards works normally.
    yield* setEntry(L.pt, L.data + u)
    yield* probeAll(3, 0x400000 + 0x100)

    // (b) Non-leaf entries pointing beyond guest memory: the next level reads all ones (RSVD).
    yield* setEntry(L.pd + 3 * 8, L.beyond + u) // PDE → page table beyond memory
    yield* probeAll(4, 0x600000 + 0x5010)
    yield* setEntry(L.pdpt + 8, L.beyondFar + u) // PDPTE → page directory beyond memory
    yield* probeAll(5, 0x40000000 + 0x203010)
    yield* setEntry(L.pml4 + 8, L.beyond + u) // PML4E → PDPT beyond memory
    yield* probeAll(6, 2 ** 39 + 0x40203010)

    // (c) Random garbage at every level (PT[8], PD[3], PDPT[1], PML4[1]), EFER.NXE toggled.
    const slots = [
      { pa: L.pt + 8 * 8, va: 0x408000, span: 0x1000 },
      { pa: L.pd + 3 * 8, va: 0x600000, span: 0x200000 },
      { pa: L.pdpt + 8, va: 0x40000000, span: 0x40000000 },
      { pa: L.pml4 + 8, va: 2 ** 39, span: 2 ** 39 },
    ]
    const targets = [L.data, L.beyond, L.beyondFar]
    let nxe = true
    for (let round = 0; round < rounds; round++) {
      if (rand() % 4 === 0) {
        nxe = !nxe
        yield* put(OP_SET_CPL, 0, 0)
        yield* put(OP_WRMSR_EFER, 0, EFER_LME | (nxe ? EFER_NXE : 0))
      }
      const slot = slots[rand() % slots.length]!
      const target = targets[rand() % targets.length]!
      // Flags: P mostly set; RW, US, PWT, PCD, A, D, PS, G and the ignored bits 11:9 at random.
      let lo = (rand() & 0xfff) | (rand() % 8 !== 0 ? PTE_P : 0)
      // Sometimes bits 20:12 too (another 4K frame of the same region; reserved in a 2M/1G leaf).
      if (rand() % 4 === 0) lo |= rand() & 0x1ff000
      lo = (lo + (target % TWO32)) >>> 0
      // High half: NX, protection key and ignored bits 62:52 at random; sometimes bits 51:46
      // (reserved above MAXPHYADDR 46).
      let hi = (rand() & 0xfff00000) | Math.floor(target / TWO32)
      if (rand() % 4 === 0) hi |= 1 << (14 + (rand() % 6))
      yield* setRaw(slot.pa, lo, hi >>> 0)
      for (let i = 0; i < 3; i++) {
        const off = (rand() * 8) % slot.span
        yield* probe(100 + round, rand() % 5, slot.va + off, rand() % 2 === 0 ? 3 : 0, rand())
      }
    }

    // Everything sane again: the user page still holds what was written through it.
    yield* setEntry(L.pt, L.data + u)
    yield* probe(999, READ, 0x400000 + 0x100, 3)
    yield* put(OP_SET_CPL, 0, 0)
  })()
}

/** Run the garbage guest on vCPU 0 of `vm` (8 MiB of guest memory added at GPA 0 first). */
export function runGarbageGuestOnVm(vm: Vm, options: { seed?: number; rounds?: number } = {}): number[] {
  vm.addMemory(0, GARBAGE.memBytes)
  const r: GarbageResult = { log: [] }
  vm.spawnGuest(0, garbageGuest(vm.vcpus[0]!.guest.op, r, options))
  vm.run()
  return r.log
}

/** Run the garbage guest on the bare-metal reference of `vm` (after {@link runGarbageGuestOnVm}). */
export function runGarbageGuestOnReference(vm: Vm, options: { seed?: number; rounds?: number } = {}): { ref: ReturnType<typeof createReference>; log: number[] } {
  const ref = createReference(vm)
  const r: GarbageResult = { log: [] }
  ref.spawn(0, garbageGuest(ref.threads[0]!.op, r, options))
  ref.run()
  return { ref, log: r.log }
}

/**
 * A guest writing into a read-only memslot (a ROM; KVM exits to userspace as MMIO, here open bus:
 * the write is dropped). Paging stays off. Adds 2 MiB of RAM at 0 and a 64 KiB ROM at `GARBAGE.data`
 * to `vm`, runs, and returns [status, value] of: ROM read, ROM write, ROM read, ROM write64, ROM
 * read64 (lo, hi), RAM write, RAM read.
 */
export function runRomGuest(vm: Vm): number[] {
  vm.addMemory(0, 2 << 20)
  vm.addMemory(GARBAGE.data, 64 << 10, { flags: KVM_MEM_READONLY })
  const op = vm.vcpus[0]!.guest.op
  const out: number[] = []
  vm.spawnGuest(
    0,
    (function* (): GuestProgram {
      const steps: [number, number, number][] = [
        [OP_READ, GARBAGE.data + 0x10, 0],
        [OP_WRITE, GARBAGE.data + 0x10, 0x1234],
        [OP_READ, GARBAGE.data + 0x10, 0],
        [OP_WRITE64, GARBAGE.data + 0x1008, 0x5678],
        [OP_READ64, GARBAGE.data + 0x1008, 0],
        [OP_WRITE, 0x100010, 0x9abc],
        [OP_READ, 0x100010, 0],
      ]
      for (const [kind, addr, lo] of steps) {
        op.kind = kind
        op.addr = addr
        op.lo = lo
        op.hi = lo
        op.implicit = false
        const st = yield op
        out.push(st, kind === OP_READ || kind === OP_READ64 ? op.valueLo : 0)
        if (kind === OP_READ64) out.push(op.valueHi)
      }
    })(),
  )
  vm.run()
  return out
}

/** What {@link runRomGuest} returns on a correct platform: ROM reads 0 (writes dropped), RAM works. */
export const ROM_GUEST_EXPECTED: readonly number[] = [RES_OK, 0, RES_OK, 0, RES_OK, 0, RES_OK, 0, RES_OK, 0, 0, RES_OK, 0, RES_OK, 0x9abc]
