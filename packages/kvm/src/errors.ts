import { MmusimError } from '@mmusim/x86-hw'

/**
 * errno values the KVM ioctls of this model return (include/uapi/asm-generic/errno-base.h).
 * A bad request from *userspace* (a memslot, a dirty-log call, an mmap) is a {@link KvmError}
 * carrying one of these; a guest-caused condition is never an error, it is a value.
 */
export const KVM_ERRNO = {
  EIO: 5,
  ENXIO: 6,
  EAGAIN: 11,
  ENOMEM: 12,
  EFAULT: 14,
  EBUSY: 16,
  EEXIST: 17,
  EINVAL: 22,
  ENOENT: 2,
} as const

/** The errno-like code of a {@link KvmError}. */
export type KvmErrorCode = keyof typeof KVM_ERRNO

/**
 * A KVM ioctl (or host mm call) rejected its arguments, with the errno the kernel returns.
 * `code` is the errno name (`'EINVAL'`, `'EEXIST'`, …), `errno` its positive number; the message
 * says which rule of the kernel function (named in it) was broken and what was expected.
 * A rejected request has changed nothing.
 */
export class KvmError extends MmusimError {
  declare readonly code: KvmErrorCode
  /** The positive errno number (the kernel returns its negation). */
  readonly errno: number

  constructor(code: KvmErrorCode, message: string, options?: { cause?: unknown }) {
    super(code, message, options)
    this.errno = KVM_ERRNO[code]
  }
}

/** Whether `e` is a {@link KvmError}, optionally with the given code. */
export function isKvmError(e: unknown, code?: KvmErrorCode): e is KvmError {
  return e instanceof KvmError && (code === undefined || e.code === code)
}
