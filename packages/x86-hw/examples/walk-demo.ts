/**
 * A tour of the hardware model: a 4-level guest walked on bare metal, then the same guest under
 * 4-level EPT, printing each walk's outcome and the vCPU counters. Run: `pnpm demo`.
 */
import {
  ACC_READ,
  ACC_WRITE,
  COUNTER_NAMES,
  CR0_PE,
  CR0_PG,
  CR0_WP,
  CR4_PAE,
  EFER_LME,
  EFER_NXE,
  EPT_A,
  EPT_R,
  EPT_W,
  EPT_X,
  EptTranslator,
  EXEC_OK,
  EXEC_PF,
  FrameAllocator,
  PageTableBuilder,
  PhysMem,
  PTE_P,
  PTE_RW,
  PTE_US,
  Vcpu,
  eptViolationQualString,
} from '../src/index.ts'

const hex = (n: number): string => '0x' + n.toString(16)
const host = new PhysMem({ sizeBytes: 64 << 20, name: 'memory' })
const guestAlloc = new FrameAllocator(host, 1, 4095) // guest-physical [4 KiB, 16 MiB)
const pt = new PageTableBuilder(guestAlloc, { levels: 4 })
const dataFrame = guestAlloc.allocOrThrow()
pt.map({ va: 0x400000, pa: dataFrame * 4096, leafLo: PTE_P | PTE_RW | PTE_US })
pt.map({ va: 0x401000, pa: guestAlloc.allocOrThrow() * 4096, leafLo: PTE_P | PTE_US }) // read-only

function boot(v: Vcpu): void {
  v.setEfer(EFER_LME | EFER_NXE)
  v.setCr4(CR4_PAE)
  v.setCr3(pt.root, false)
  v.setCr0(CR0_PG | CR0_PE | CR0_WP)
}

function show(v: Vcpu, label: string, la: number, kind: 0 | 1): void {
  const st = v.access(la, kind, false)
  const r = v.res
  const what = kind === ACC_WRITE ? 'write' : 'read '
  if (st === EXEC_OK) console.log(`  ${label} ${what} ${hex(la)} -> pa ${hex(r.pa)} (gpa ${hex(r.gpa)}), ${String(r.memRefs)} refs, ${String(r.adWrites)} A/D writes`)
  else if (st === EXEC_PF) console.log(`  ${label} ${what} ${hex(la)} -> #PF error ${hex(r.errorCode)} cr2 ${hex(r.cr2)}`)
  else console.log(`  ${label} ${what} ${hex(la)} -> VM exit ${String(v.exit.reason)} gpa ${hex(v.exit.gpa)} qual ${eptViolationQualString(v.exit.qual)}`)
}

console.log('bare metal, 4-level paging:')
const bare = new Vcpu(host)
boot(bare)
show(bare, 'cold', 0x400123, ACC_READ)
show(bare, 'TLB ', 0x400456, ACC_READ)
show(bare, 'D=0 ', 0x400010, ACC_WRITE)
show(bare, 'RO  ', 0x401000, ACC_WRITE)

console.log('4-level guest over 4-level EPT (guest-physical = host-physical below 16 MiB):')
const eptAlloc = new FrameAllocator(host, 4096, 4096)
const ept = new PageTableBuilder(eptAlloc, { levels: 4, format: 'ept' })
ept.identity(16 << 20, 1, EPT_R | EPT_W | EPT_X | (6 << 3) | EPT_A)
const v = new Vcpu(host)
v.setTdpMode(host, new EptTranslator(host, v.features, { root: ept.root, levels: 4, adEnabled: false }), 1)
boot(v)
bare.tlb.flushAll()
show(v, 'cold', 0x400123, ACC_READ)
show(v, 'TLB ', 0x400456, ACC_READ)
// Make the data page read-only in EPT: the guest write now exits with an EPT violation.
ept.map({ va: dataFrame * 4096, pa: dataFrame * 4096, leafLo: EPT_R | (6 << 3) })
v.flushAll()
show(v, 'EPT ', 0x400000, ACC_WRITE)

console.log('counters of the EPT vCPU:')
const nonzero = COUNTER_NAMES.map((n, i) => [n, v.counters[i]!] as const).filter(([, x]) => x !== 0)
for (const [n, x] of nonzero) console.log(`  ${n.padEnd(20)} ${String(x)}`)
