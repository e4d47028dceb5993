import {
  type AccessBatch,
  CR0_PE,
  CR0_PG,
  CR0_WP,
  CR4_LA57,
  CR4_PAE,
  CR4_PCIDE,
  CR4_PGE,
  CR4_SMAP,
  CR4_SMEP,
  type CpuFeatures,
  EFER_LME,
  EFER_NXE,
  type GuestOp,
  type GuestProgram,
  HI_XD,
  type InterruptHandler,
  type Machine,
  PTE_A,
  PTE_D,
  PTE_G,
  PTE_P,
  PTE_PS,
  PTE_RW,
} from '@mmusim/x86-hw'
import { Cpu, type CpuCounters, type Routine } from './cpu.ts'
import { GuestError } from './errors.ts'
import { FramePools, type FrameStats } from './frames.ts'
import {
  DIRECT_MAP_BASE_4L,
  DIRECT_MAP_BASE_5L,
  entryHi,
  entryLo,
  KERNEL_TEXT_BASE,
  KERNEL_TEXT_PAGES,
  KERNPG_TABLE_LO,
  PAGE_1G,
  PAGE_2M,
  PAGE_4K,
  ptIndex,
  USER_TOP_4L,
  USER_TOP_5L,
  VECTOR_TLB_SHOOTDOWN,
} from './layout.ts'
import { Mm } from './mm.ts'
import { shootdownHandler, switchMm } from './tlb-flush.ts'

/** Configuration of a {@link GuestOs}. */
export interface GuestOsOptions {
  /** Paging levels: 4 (48-bit) or 5 (LA57). @default 4 */
  levels?: 4 | 5
  /** Page size of the direct map of guest-physical memory. @default '1G' */
  directMapPageSize?: '1G' | '2M'
  /** Use PCIDs (CR4.PCIDE) and the CR3 no-flush bit, as Linux does when the CPU has them. @default true if the CPU supports PCID */
  pcid?: boolean
  /** CR4.PGE with global kernel mappings. @default true */
  pge?: boolean
  /** CR4.SMEP / CR4.SMAP (if the CPU has them). @default true */
  smep?: boolean
  smap?: boolean
  /** Map the shared zero page on read faults of anonymous memory (as Linux does). @default true */
  zeroPage?: boolean
  /** Use INVPCID type 2 for a global flush instead of toggling CR4.PGE. @default false */
  invpcid?: boolean
  /**
   * TEST ONLY: skip the IPIs of TLB shootdowns (the local flush still happens). Lets a test show
   * that stale translations on other vCPUs are then used.
   */
  testSkipShootdown?: boolean
  /** Called after every user batch op with the elements it completed (for recording access sequences). */
  onBatch?: (cpu: number, batch: AccessBatch, start: number, end: number) => void
}

/**
 * What a {@link GuestOs} needs from the platform it runs on: the bare {@link Machine}, or a VM run
 * by the hypervisor. See {@link GuestOs.forMachine}.
 */
export interface GuestPlatform {
  /** Guest-physical memory in bytes. */
  readonly memBytes: number
  /** The CPU model (CPUID) of the vCPUs. */
  readonly features: CpuFeatures
  /** Each vCPU's reusable op (the GuestThread's). Its length is the vCPU count. */
  readonly ops: readonly GuestOp[]
  /** The interrupt table the platform delivers IPIs through; the OS installs its handlers here. */
  readonly idt: (InterruptHandler | undefined)[]
}

/** A process (Linux `task_struct`, single-threaded unless several vCPUs switch to its mm). */
export interface Task {
  readonly pid: number
  mm: Mm
}

/** Kernel event counters (all exact and deterministic for a given run). */
export interface OsStats {
  pageFaults: number
  /** do_anonymous_page with a fresh zeroed page. */
  anonFaults: number
  /** Read faults that mapped the zero page. */
  zeroPageFaults: number
  /** wp_page_copy: copy-on-write breaks that copied (or allocated over the zero page). */
  cowCopies: number
  /** wp_page_reuse: write faults on an exclusively owned write-protected page. */
  cowReuses: number
  /** Faults whose PTE already allowed the access (a stale TLB entry). */
  spuriousFaults: number
  swapIns: number
  swapOuts: number
  thpFaults: number
  thpSplits: number
  thpCollapses: number
  sigsegv: number
  /** Flush requests that needed IPIs, and IPIs sent. */
  shootdowns: number
  ipisSent: number
  invlpgs: number
  fullFlushes: number
  pgeToggles: number
  cr0WpToggles: number
  contextSwitches: number
  cr3Flushes: number
  cr3NoFlush: number
  ptPagesAllocated: number
  ptPagesFreed: number
  forks: number
  execs: number
  exits: number
}

/** A SIGSEGV delivered to a program (recorded, not fatal to the simulation). */
export interface SigsegvRecord {
  readonly cpu: number
  /** Faulting linear address. */
  readonly address: number
  /** #PF error code, or -1 for a #GP. */
  readonly errorCode: number
}

function zeroStats(): OsStats {
  return {
    pageFaults: 0, anonFaults: 0, zeroPageFaults: 0, cowCopies: 0, cowReuses: 0, spuriousFaults: 0,
    swapIns: 0, swapOuts: 0, thpFaults: 0, thpSplits: 0, thpCollapses: 0, sigsegv: 0, shootdowns: 0,
    ipisSent: 0, invlpgs: 0, fullFlushes: 0, pgeToggles: 0, cr0WpToggles: 0, contextSwitches: 0,
    cr3Flushes: 0, cr3NoFlush: 0, ptPagesAllocated: 0, ptPagesFreed: 0, forks: 0, execs: 0, exits: 0,
  }
}

/** A boot-time entry write: physical address and value halves. */
interface BootWrite {
  pa: number
  lo: number
  hi: number
}

/**
 * The miniature guest OS. It owns the kernel's JS-side metadata (frame pools, processes, VMAs,
 * per-CPU TLB state, swap) while every page-table entry lives in guest memory and is read and
 * written by the vCPUs with 8-byte guest accesses through the kernel's direct map — so under
 * shadow paging each PTE write can hit a write-protected page and be emulated, as in real life.
 *
 * Use {@link GuestOs.forMachine} on the bare machine, then {@link spawnAll} a guest program.
 */
export class GuestOs {
  readonly memBytes: number
  readonly features: CpuFeatures
  readonly levels: 4 | 5
  readonly dmBase: number
  readonly dmPageSize: number
  readonly pcid: boolean
  readonly pge: boolean
  readonly smep: boolean
  readonly smap: boolean
  readonly zeroPageEnabled: boolean
  readonly useInvpcid: boolean
  /** TEST ONLY: see {@link GuestOsOptions.testSkipShootdown}. */
  testSkipShootdown: boolean
  readonly onBatch: GuestOsOptions['onBatch']
  /** First address above user space. */
  readonly userTop: number
  readonly cpus: Cpu[] = []
  /**
   * Every frame that has held a page table during this run (kept after it is freed: its stale
   * entries stay in memory). The differential oracle compares A/D bits in these frames modulo
   * the architecture's freedom (a stale TLB or SPTE may serve an access without setting A).
   */
  readonly pageTableFrames = new Set<number>()
  readonly stats: OsStats = zeroStats()
  readonly sigsegvs: SigsegvRecord[] = []
  /** Physical address of the kernel's top-level table (Linux `swapper_pg_dir`, init_mm.pgd). */
  readonly kernelPgd: number
  /** Physical address of the shared zero page (`empty_zero_page`). */
  readonly zeroPagePa: number
  /** Physical addresses of the kernel text pages mapped read-only at {@link KERNEL_TEXT_BASE}. */
  readonly textPa: number[] = []
  /** Frames above the boot area are in per-vCPU pools. */
  frames!: FramePools
  /** Swap space (JS-side): slot → page contents, and per-slot reference counts (fork shares slots). */
  readonly swap = new Map<number, Uint32Array>()
  readonly swapRefs = new Map<number, number>()
  private readonly swapNext: number[]
  private readonly bootWrites: BootWrite[] = []
  private bootNext = 1
  private booted = false
  private apsUp = 0
  private nextMmId = 1
  private nextPid = 1
  private readonly shared = new Map<string, unknown>()
  private readonly barriers = new Map<string, { arrived: number; gen: number }>()

  constructor(platform: GuestPlatform, options: GuestOsOptions = {}) {
    const f = platform.features
    this.features = f
    this.memBytes = platform.memBytes
    this.levels = options.levels ?? 4
    if (this.levels === 5 && !f.la57) throw new GuestError('INVALID_ARGUMENT', 'levels: 5 needs a CPU with LA57 (features.la57)')
    this.dmPageSize = (options.directMapPageSize ?? '1G') === '1G' ? PAGE_1G : PAGE_2M
    if (this.dmPageSize === PAGE_1G && !f.gbPages) throw new GuestError('INVALID_ARGUMENT', "directMapPageSize '1G' needs a CPU with 1 GiB pages (features.gbPages); use '2M'")
    this.dmBase = this.levels === 5 ? DIRECT_MAP_BASE_5L : DIRECT_MAP_BASE_4L
    this.pcid = (options.pcid ?? f.pcid) && f.pcid
    this.pge = options.pge ?? true
    this.smep = (options.smep ?? true) && f.smep
    this.smap = (options.smap ?? true) && f.smap
    this.zeroPageEnabled = options.zeroPage ?? true
    this.useInvpcid = (options.invpcid ?? false) && f.invpcid
    this.testSkipShootdown = options.testSkipShootdown ?? false
    this.onBatch = options.onBatch
    this.userTop = this.levels === 5 ? USER_TOP_5L : USER_TOP_4L
    if (this.memBytes > 2 ** 32) throw new GuestError('INVALID_ARGUMENT', 'the guest boots with paging off (linear = physical, 32-bit): give it at most 4 GiB')
    const n = platform.ops.length
    for (let i = 0; i < n; i++) this.cpus.push(new Cpu(this, i, platform.ops[i]!))
    this.swapNext = Array.from({ length: n }, (_, i) => i + 1)
    this.zeroPagePa = this.bootAlloc()
    this.kernelPgd = this.bootAlloc()
    this.pageTableFrames.add(this.kernelPgd / PAGE_4K)
    this.planKernelTables()
    this.frames = new FramePools(this.memBytes / PAGE_4K, this.bootNext, n)
    platform.idt[VECTOR_TLB_SHOOTDOWN] = (cpu) => shootdownHandler(this.cpus[cpu]!)
  }

  /** A GuestOs on the bare-metal reference {@link Machine} (installs its IPI handlers in `machine.idt`). */
  static forMachine(machine: Machine, options: GuestOsOptions = {}): GuestOs {
    return new GuestOs(
      { memBytes: machine.mem.sizeBytes, features: machine.vcpus[0]!.features, ops: machine.threads.map((t) => t.op), idt: machine.idt },
      options,
    )
  }

  /** Kernel virtual address of physical address `pa` (Linux `__va`). */
  directMap(pa: number): number {
    return this.dmBase + pa
  }

  // ------------------------------------------------------------------ boot

  private bootAlloc(): number {
    const pa = this.bootNext * PAGE_4K
    this.bootNext++
    if (pa + PAGE_4K > this.memBytes) throw new GuestError('INVALID_ARGUMENT', 'guest memory too small for the boot page tables')
    return pa
  }

  /** Lay out the kernel half: the direct map and the kernel text (computed JS-side, written by vCPU 0 at boot). */
  private planKernelTables(): void {
    const g = this.pge ? PTE_G : 0
    const xd = this.features.nx ? HI_XD : 0
    // Entry slot (table pa + index) -> the table it points to.
    const tables = new Map<number, number>()
    // Find or create the table for `va` at `level` (1..levels-1), under the kernel PGD.
    const tableFor = (va: number, level: number): number => {
      let table = this.kernelPgd
      for (let l = this.levels; l > level; l--) {
        const key = table + ptIndex(va, l) * 8
        let next = tables.get(key)
        if (next === undefined) {
          next = this.bootAlloc()
          this.pageTableFrames.add(next / PAGE_4K)
          tables.set(key, next)
          this.bootWrites.push({ pa: table + ptIndex(va, l) * 8, lo: entryLo(next, KERNPG_TABLE_LO), hi: 0 })
        }
        table = next
      }
      return table
    }
    // Direct map: every byte of guest-physical memory, NX, global.
    const level = this.dmPageSize === PAGE_1G ? 3 : 2
    for (let pa = 0; pa < this.memBytes; pa += this.dmPageSize) {
      const va = this.dmBase + pa
      const t = tableFor(va, level)
      this.bootWrites.push({ pa: t + ptIndex(va, level) * 8, lo: entryLo(pa, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_PS | g), hi: entryHi(pa, xd) })
    }
    // Kernel text: read-only, executable, global 4 KiB pages.
    for (let i = 0; i < KERNEL_TEXT_PAGES; i++) {
      const pa = this.bootAlloc()
      this.textPa.push(pa)
      const va = KERNEL_TEXT_BASE + i * PAGE_4K
      const t = tableFor(va, 1)
      this.bootWrites.push({ pa: t + ptIndex(va, 1) * 8, lo: entryLo(pa, PTE_P | PTE_A | g), hi: 0 })
    }
  }

  /** CR4 value the kernel runs with (before PCIDE). */
  private baseCr4(): number {
    return (CR4_PAE | (this.levels === 5 ? CR4_LA57 : 0) | (this.pge ? CR4_PGE : 0) | (this.smep ? CR4_SMEP : 0) | (this.smap ? CR4_SMAP : 0)) >>> 0
  }

  /**
   * Boot this vCPU. vCPU 0 (the BSP) writes the kernel page tables with 8-byte guest writes at
   * physical addresses (paging is still off, so linear = physical) and fills the kernel text; every
   * vCPU then enables long-mode paging itself — EFER.LME|NXE, CR4.PAE[|LA57][|PGE][|SMEP|SMAP],
   * CR3, CR0.PG|PE|WP, then CR4.PCIDE (which needs CR3[11:0] = 0 and long mode). APs wait for the BSP.
   */
  *boot(cpu: Cpu): Routine {
    if (cpu.id === 0) {
      for (const w of this.bootWrites) yield* cpu.kwrite64(w.pa, w.lo, w.hi)
      for (let i = 0; i < this.textPa.length; i++) {
        for (let w = 0; w < 16; w++) yield* cpu.kwrite32(this.textPa[i]! + w * 4, textWord(i, w))
      }
      this.booted = true
    } else {
      yield* cpu.waitUntil(() => this.booted, 'the BSP to build the kernel page tables')
    }
    yield* cpu.wrmsrEfer(EFER_LME | (this.features.nx ? EFER_NXE : 0))
    yield* cpu.movCr4(this.baseCr4())
    yield* cpu.movCr3(this.kernelPgd, false)
    yield* cpu.movCr0(CR0_PE | CR0_PG | CR0_WP)
    if (this.pcid) yield* cpu.movCr4(this.baseCr4() | CR4_PCIDE)
    this.apsUp++
    // Like smp_init(): nobody proceeds until every CPU is up.
    yield* cpu.waitUntil(() => this.apsUp === this.cpus.length, 'all vCPUs to come up')
  }

  /** Whether vCPU 0 has finished building the kernel tables. */
  get isBooted(): boolean {
    return this.booted
  }

  // ------------------------------------------------------------------ frames

  /** Allocate a 4 KiB frame from `cpu`'s pool and zero it through the direct map; returns its physical address. */
  *allocZeroedPage(cpu: Cpu): Routine<number> {
    const f = this.frames.alloc4k(cpu.id)
    if (f < 0) throw new GuestError('OUT_OF_MEMORY', `vCPU ${String(cpu.id)}'s frame pool is exhausted; give the machine more memory or shrink the workload`)
    const pa = f * PAGE_4K
    yield* cpu.clearPage(pa)
    return pa
  }

  /** A zeroed page-table page (Linux `pte_alloc_one` / `__get_free_page(GFP_PGTABLE_USER)`). */
  *allocTablePage(cpu: Cpu): Routine<number> {
    const pa = yield* this.allocZeroedPage(cpu)
    this.stats.ptPagesAllocated++
    this.pageTableFrames.add(pa / PAGE_4K)
    return pa
  }

  /** Free a page-table page (after any TLB flush that could still use it). */
  freeTablePage(cpu: Cpu, pa: number): void {
    this.frames.free4k(cpu.id, pa / PAGE_4K)
    this.stats.ptPagesFreed++
  }

  /** Next swap slot for this vCPU (per-vCPU numbering keeps PTE contents reproducible). */
  allocSwapSlot(cpu: Cpu): number {
    const s = this.swapNext[cpu.id]!
    this.swapNext[cpu.id] = s + this.cpus.length
    return s
  }

  // ------------------------------------------------------------------ processes

  /**
   * A new empty address space (Linux `mm_alloc` + `pgd_alloc`): a zeroed PGD whose kernel half is
   * copied from the kernel's (`clone_pgd_range` of swapper_pg_dir), so every process shares the
   * kernel's lower tables.
   */
  *newMm(cpu: Cpu): Routine<Mm> {
    yield* cpu.kernelMode()
    const pgd = yield* this.allocTablePage(cpu)
    const b = cpu.pageBatch
    const kbase = this.directMap(this.kernelPgd)
    for (let i = 0; i < 512; i++) {
      b.addrs[i] = kbase + 2048 + i * 4
      b.kinds[i] = 0
    }
    yield* cpu.kbatch(b, 0, 512)
    const nbase = this.directMap(pgd)
    for (let i = 0; i < 512; i++) {
      b.addrs[i] = nbase + 2048 + i * 4
      b.kinds[i] = 1
    }
    yield* cpu.kbatch(b, 0, 512)
    return new Mm(this.nextMmId++, pgd, this.cpus.length)
  }

  /** Create a process with an empty address space (no VMAs yet). */
  *createProcess(cpu: Cpu): Routine<Task> {
    const mm = yield* this.newMm(cpu)
    return { pid: this.nextPid++, mm }
  }

  /** Context-switch this vCPU to `task` (null: the idle/kernel context). */
  *switchTo(cpu: Cpu, task: Task | null): Routine {
    yield* switchMm(cpu, task === null ? null : task.mm)
  }

  // ------------------------------------------------------------------ bookkeeping for programs

  /** Record a SIGSEGV (called by the fault path). */
  recordSigsegv(cpu: Cpu, address: number, errorCode: number): void {
    this.stats.sigsegv++
    if (this.sigsegvs.length < 1000) this.sigsegvs.push({ cpu: cpu.id, address, errorCode })
  }

  /** State shared by the vCPUs of one program run, created by whoever asks first (JS-side; not guest memory). */
  sharedState<T>(key: string, init: () => T): T {
    if (!this.shared.has(key)) this.shared.set(key, init())
    return this.shared.get(key) as T
  }

  /** Spin until every vCPU has arrived at barrier `name` (reusable: generation-counted). */
  *barrier(cpu: Cpu, name = 'barrier'): Routine {
    let b = this.barriers.get(name)
    if (b === undefined) {
      b = { arrived: 0, gen: 0 }
      this.barriers.set(name, b)
    }
    const bb = b
    const gen = bb.gen
    if (++bb.arrived === this.cpus.length) {
      bb.arrived = 0
      bb.gen++
      return
    }
    yield* cpu.waitUntil(() => bb.gen !== gen, `barrier '${name}'`)
  }

  /**
   * The complete program of one vCPU: boot, run `program`, then return to the kernel context
   * (switch to init_mm so the vCPU leaves every mm_cpumask and receives no more shootdowns).
   */
  *main(cpu: Cpu, program: (cpu: Cpu) => Routine): GuestProgram {
    yield* this.boot(cpu)
    yield* program(cpu)
    yield* switchMm(cpu, null)
  }

  /** Spawn `program` (after boot) on every vCPU of the machine. */
  spawnAll(machine: Machine, program: (cpu: Cpu) => Routine): void {
    for (const cpu of this.cpus) machine.spawn(cpu.id, this.main(cpu, program))
  }

  /** Counters summed over vCPUs. */
  totals(): CpuCounters {
    const t: CpuCounters = { ops: 0, accesses: 0, pageFaults: 0, mismatches: 0, sigsegv: 0, ipisHandled: 0 }
    for (const c of this.cpus) {
      for (const k of Object.keys(t) as (keyof CpuCounters)[]) t[k] += c.counters[k]
    }
    return t
  }

  /** Frame allocator counters. */
  frameStats(): FrameStats {
    return this.frames.stats()
  }
}

/** The initial contents of kernel text word `w` of page `i` (recognisable "code"). */
export function textWord(page: number, w: number): number {
  return (0x90900000 + page * 256 + w) >>> 0
}
