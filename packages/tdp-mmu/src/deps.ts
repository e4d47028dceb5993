/** Re-exports from @mmusim/kvm and @mmusim/x86-hw used by the strategy wiring, plus tiny helpers. */
import type { KernelOp } from '@mmusim/kvm'
export {
  defineMmuStrategy,
  type KernelOp,
  KVM_MEM_LOG_DIRTY_PAGES,
  KVM_MEM_READONLY,
  kvmSlotDirtyTrackEnabled,
  type KvmVcpu,
  type Memslot,
  type MemslotChange,
  type MmuInstance,
  mmioGenerationWrapped,
  type PageFault,
  RET_PF_INVALID,
  type RetPf,
  type Vm,
} from '@mmusim/kvm'
export { PFERR_I, PFERR_P, PFERR_RSVD, PFERR_W } from '@mmusim/x86-hw'

/** A kernel operation with nothing to do (the contract requires a generator). */
export function* drainNothing(): KernelOp {
  return
}
