/**
 * Typed errors shared by every mmusim package. Each carries a stable `code`, a message that says
 * what was expected and how to fix it, and `cause` when wrapping. Guest-visible faults are never
 * errors: they are values (see {@link WalkResult}). Errors are for bad *user* input (a config, an
 * API misuse) and for simulator invariant violations (use-after-free of a frame).
 */
export class MmusimError extends Error {
  /** Stable machine-readable code, e.g. `FRAME_POISONED`. */
  readonly code: string

  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.code = code
    this.name = new.target.name
  }
}

/** A read or write touched a frame that was freed and poisoned: a use-after-free in the simulator. */
export class PoisonedFrameError extends MmusimError {
  readonly frame: number
  readonly access: 'read' | 'write'
  readonly address: number

  constructor(frame: number, access: 'read' | 'write', address: number) {
    super(
      'FRAME_POISONED',
      `use-after-free: ${access} of physical address 0x${address.toString(16)} in frame 0x${frame.toString(16)}, ` +
        'which was freed and poisoned. Whatever still points at this frame (an SPTE, a root, a cached pointer) ' +
        'must be dropped before the frame is freed, or the free deferred past an RCU grace period.',
    )
    this.frame = frame
    this.access = access
    this.address = address
  }
}

/** Invalid configuration or API argument of the hardware model. */
export class HwConfigError extends MmusimError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('HW_CONFIG_INVALID', message, options)
  }
}
