/**
 * The selftests' populate pass (memstress, dirty_log_perf_test's first iteration) with guest paging
 * on, as the selftests run it under `ept=0`/`npt=0`: the loader writes the guest's 4-level page
 * tables (4K PTEs with P|RW and no A/D bits, as `virt_map()` does), each vCPU's region mapped at
 * the same virtual address, and then every vCPU enables paging and writes one word in each page of
 * its region once. Under shadow paging each write is exactly one page fault (FNAME(page_fault):
 * the guest walk that sets A and D in guest memory, the shadow pages, the SPTE); under two-
 * dimensional paging one EPT violation. The benchmark of issue 6 and its tests use it.
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
  OP_BATCH,
  OP_MOV_CR0,
  OP_MOV_CR3,
  OP_MOV_CR4,
  OP_WRMSR_EFER,
} from '@mmusim/x86-hw'
import { KvmError, type Vm } from '@mmusim/kvm'

/** Where the populate workload lives. */
export interface PopulateLayout {
  /** vCPUs, each with its own region. */
  readonly vcpus: number
  /** Bytes per vCPU (a multiple of 2 MiB). */
  readonly bytesPerVcpu: number
}

/** Guest-physical (and virtual) base of vCPU 0's region; vCPU c's follows at c × bytesPerVcpu. */
export const POPULATE_BASE = 2 ** 30
/** Page-table memory: [0, 16 MiB), PML4 at 0x1000, PDPT at 0x2000, PDs from 0x3000, PTs from 1 MiB. */
export const POPULATE_TABLES_BYTES = 16 << 20
const PML4 = 0x1000
const PDPT = 0x2000
const PD0 = 0x3000
const PT0 = 0x100000
const P_RW = 3

function checkLayout(l: PopulateLayout): void {
  const pts = (l.vcpus * l.bytesPerVcpu) / 2 ** 21
  if (!Number.isInteger(l.vcpus) || l.vcpus < 1 || l.bytesPerVcpu <= 0 || l.bytesPerVcpu % 2 ** 21 !== 0 || PT0 + pts * 4096 > POPULATE_TABLES_BYTES || l.vcpus * l.bytesPerVcpu > 2 ** 38) {
    throw new KvmError('EINVAL', `populate layout needs ≥ 1 vCPU and a positive multiple of 2 MiB per vCPU, at most ${String((POPULATE_TABLES_BYTES - PT0) / 4096)} PTs in all; got ${String(l.vcpus)} × ${String(l.bytesPerVcpu)} bytes`)
  }
}

/** The memslots: slot 0 for the page tables, slot 1 for the regions. */
export function addPopulateMemory(vm: Vm, l: PopulateLayout): void {
  checkLayout(l)
  vm.addMemory(0, POPULATE_TABLES_BYTES)
  vm.addMemory(POPULATE_BASE, l.vcpus * l.bytesPerVcpu, { slot: 1 })
}

/** Write the page tables through `write32` (guest memory of a VM, or a reference machine's memory). */
export function writePopulateTables(mem: { write32(gpa: number, value: number): void }, l: PopulateLayout): void {
  checkLayout(l)
  const put = (gpa: number, lo: number): void => {
    mem.write32(gpa, lo >>> 0)
    mem.write32(gpa + 4, 0)
  }
  put(PML4, PDPT | P_RW)
  const pages = (l.vcpus * l.bytesPerVcpu) / 4096
  const firstPt = POPULATE_BASE / 2 ** 21 // PD entries counted from VA 0
  for (let p = 0; p < pages; p++) {
    const va = POPULATE_BASE + p * 4096
    const pdIndex = Math.floor(va / 2 ** 21) // global 2 MiB index
    const pt = PT0 + (pdIndex - firstPt) * 4096
    if (p % 512 === 0) {
      const gib = Math.floor(va / 2 ** 30)
      const pd = PD0 + (gib - 1) * 4096
      if (pdIndex % 512 === 0 || p === 0) put(PDPT + gib * 8, pd | P_RW)
      put(pd + (pdIndex % 512) * 8, pt | P_RW)
    }
    put(pt + (p % 512) * 8, va | P_RW)
  }
}

/**
 * vCPU `cpu`'s program: enable 4-level paging (EFER.LME|NXE, CR4.PAE, CR3, CR0.PG|PE|WP), then one
 * batch writing `value + i` to page i of its region.
 */
export function populateProgram(op: GuestOp, l: PopulateLayout, cpu: number, value = cpu << 20): GuestProgram {
  checkLayout(l)
  const pages = l.bytesPerVcpu / 4096
  const addrs = new Float64Array(pages)
  const kinds = new Uint8Array(pages).fill(1) // ACC_WRITE
  const values = new Uint32Array(pages)
  const base = POPULATE_BASE + cpu * l.bytesPerVcpu
  for (let i = 0; i < pages; i++) {
    addrs[i] = base + i * 4096
    values[i] = (value + i) >>> 0
  }
  const boot: [number, number][] = [
    [OP_WRMSR_EFER, EFER_LME | EFER_NXE],
    [OP_MOV_CR4, CR4_PAE],
    [OP_MOV_CR3, PML4],
    [OP_MOV_CR0, CR0_PG | CR0_PE | CR0_WP],
  ]
  return (function* (): GuestProgram {
    for (const [kind, v] of boot) {
      op.kind = kind
      op.lo = v
      op.addr = 0
      op.noFlush = false
      op.implicit = false
      yield op
    }
    op.kind = OP_BATCH
    op.batch = { addrs, kinds, values }
    op.batchStart = 0
    op.batchEnd = pages
    op.implicit = false
    yield op
  })()
}

/** Set up a VM for the populate pass: memslots, loader-written tables, one program per vCPU. */
export function setUpPopulate(vm: Vm, l: PopulateLayout): void {
  addPopulateMemory(vm, l)
  writePopulateTables(vm.guestMem, l)
  for (let c = 0; c < l.vcpus; c++) vm.spawnGuest(c, populateProgram(vm.vcpus[c]!.guest.op, l, c))
}
