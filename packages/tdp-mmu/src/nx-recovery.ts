/**
 * KVM's per-VM NX huge page recovery thread (arch/x86/kvm/mmu/mmu.c:
 * `kvm_mmu_post_init_vm` → `kvm_mmu_start_lpage_recovery`, the vhost task
 * `"kvm-nx-lpage-recovery"` running `kvm_nx_huge_page_recovery_worker`,
 * `calc_nx_huge_pages_recovery_period`, `nx_huge_pages_to_zap`, `kvm_mmu_pre_destroy_vm`;
 * tdp-mmu.md §6.6) as a daemon kernel thread on the VM's scheduler: it sleeps in simulated time
 * until `nx_huge_page_last + period`, runs `kvm_recover_nx_huge_pages()` (6.18 for the TDP MMU:
 * mmu_lock held for read + RCU, ceil(nr / ratio) SPs taken from the head of the possible-NX list,
 * each zapped by an identity-checked cmpxchg of `sp->ptep` unless its memslot is dirty-logged),
 * records the time, and goes back to sleep — interleaving with guest faults — until the VM is
 * destroyed.
 */
import { type KernelOp, type Thread, WaitQueue } from '@mmusim/kvm'
import type { TdpMmu } from './tdp-mmu.ts'
import { TdpMmuError } from './tdp-mmu.ts'

/** One run of the recovery worker (a wake-up whose timeout had expired). */
export interface NxRecoveryRun {
  /** Simulated time the run started (the worker's wake-up time). */
  start: number
  /** Simulated time it finished (the new `nx_huge_page_last`). */
  end: number
  /** `possible_nx_huge_pages[KVM_TDP_MMU].nr_pages` when it started. */
  nrPages: number
  /** `nx_huge_pages_to_zap()`: ceil(nrPages / ratio). */
  toZap: number
  /** SPs whose parent SPTE was zapped (the others were already gone or dirty-logged). */
  zapped: number
}

/** `kvm->arch.nx_huge_page_recovery_thread` and its bookkeeping. */
export class NxHugePageRecoveryWorker {
  readonly mmu: TdpMmu
  /** The vhost task, once started by the first KVM_RUN (null while recovery is off). */
  thread: Thread<void> | null = null
  /** `kvm->arch.nx_huge_page_last`: when the thread started, then when the last run ended. */
  last = 0
  /** Simulated time the thread was started (-1: not started). */
  startedAt = -1
  /** Every run, in order. */
  readonly runs: NxRecoveryRun[] = []
  /** `VHOST_TASK_FLAGS_STOP`. */
  private stopping = false
  /** Where the task sleeps when recovery is disabled (vhost_task_fn's schedule()). */
  private readonly parked: WaitQueue

  constructor(mmu: TdpMmu) {
    this.mmu = mmu
    this.parked = new WaitQueue(mmu.vm.sched, 'kvm-nx-lpage-recovery:parked')
  }

  /**
   * `calc_nx_huge_pages_recovery_period()`: recovery is on iff `nx_huge_pages` and
   * `nx_huge_pages_recovery_ratio` are non-zero; the period is `nx_huge_pages_recovery_period_ms`,
   * or, when that is 0, 60·60·1000 / min(ratio, 3600) ms (integer division: a halving time of one
   * hour, never below one second). Returned in simulated ns; -1 when recovery is off.
   */
  calcNxHugePagesRecoveryPeriod(): number {
    const o = this.mmu.opts
    const ratio = o.nxRecoveryRatio
    if (!o.nxHugePages || ratio === 0) return -1
    let ms = o.nxRecoveryPeriodMs
    if (ms === 0) ms = Math.floor((60 * 60 * 1000) / Math.min(ratio, 3600))
    return ms * 1_000_000
  }

  /**
   * `kvm_mmu_post_init_vm()` from `kvm_arch_vcpu_ioctl_run()` (≥6.13: the thread is spawned on
   * demand at the first KVM_RUN, `call_once(&kvm->arch.nx_once, kvm_mmu_start_lpage_recovery)`):
   * `nx_huge_page_last = now`, then start the task. KVM starts it even when recovery is disabled,
   * where it sleeps until a module-parameter write wakes it; the model's parameters are fixed per
   * VM, so it starts the task only when recovery is enabled (an eternal sleeper changes nothing
   * observable).
   */
  kvmMmuPostInitVm(): void {
    if (this.thread !== null || this.stopping || this.calcNxHugePagesRecoveryPeriod() < 0) return
    const vm = this.mmu.vm
    this.last = vm.sched.now
    this.startedAt = this.last
    this.thread = vm.spawnKernelThread('kvm-nx-lpage-recovery', () => this.vhostTaskFn())
  }

  /**
   * `kvm_mmu_pre_destroy_vm()` → `vhost_task_stop()`: set the stop flag, wake the task (ending its
   * `schedule_timeout()` early) and wait for it to exit. Must run on a thread.
   */
  *kvmMmuPreDestroyVm(): KernelOp {
    this.stopping = true
    const t = this.thread
    if (t === null) return
    const vm = this.mmu.vm
    vm.timers.wakeUp(t)
    this.parked.wakeAll()
    yield* vm.sched.join(t)
    if (t.state !== 'done') throw new TdpMmuError('TDP_MMU_LEAK', `the NX recovery thread ${t.label} did not exit at VM destruction (${t.state})`)
  }

  /** `vhost_task_fn()`: call the worker until stopped; sleep when it had nothing to do. */
  private *vhostTaskFn(): KernelOp {
    while (!this.stopRequested()) {
      const didWork = yield* this.kvmNxHugePageRecoveryWorker()
      if (!didWork && !this.stopRequested()) yield* this.parked.wait()
    }
  }

  /** `test_bit(VHOST_TASK_FLAGS_STOP, &vtsk->flags)` (set by another thread while this one sleeps). */
  private stopRequested(): boolean {
    return this.stopping
  }

  /**
   * `kvm_nx_huge_page_recovery_worker()`: if the period has not elapsed since
   * `nx_huge_page_last`, `schedule_timeout()` for the rest of it and come back; otherwise
   * `kvm_recover_nx_huge_pages()` (for the TDP MMU type; the shadow MMU's list is empty here) and
   * `nx_huge_page_last = now`. Returns false when recovery is off.
   */
  private *kvmNxHugePageRecoveryWorker(): KernelOp<boolean> {
    const period = this.calcNxHugePagesRecoveryPeriod()
    if (period < 0) return false
    const mmu = this.mmu
    const vm = mmu.vm
    const now = vm.sched.now
    const remaining = this.last + period - now
    if (remaining > 0) {
      yield* vm.timers.sleepUntil(now + remaining)
      return true
    }
    const nrPages = mmu.possibleNx.length
    const ratio = mmu.opts.nxRecoveryRatio
    const zapped = yield* mmu.kvmRecoverNxHugePages(ratio)
    this.last = vm.sched.now
    this.runs.push({ start: now, end: this.last, nrPages, toZap: Math.ceil(nrPages / ratio), zapped })
    return true
  }
}
