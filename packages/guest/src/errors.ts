/**
 * Error codes raised by `@mmusim/guest`. The union lists the codes this package uses today; the
 * `string & {}` arm keeps it open so new modules can add codes without breaking callers that
 * switch on `code`.
 *
 * - `TRACE_CORRUPT`: a memory trace line is not in the format the trace tool writes.
 * - `TRACE_EMPTY`: a memory trace holds no access records at all.
 * - `TRACE_IO`: the trace could not be read (missing file, permission, stream error); see `cause`.
 * - `TRACE_UNSUPPORTED`: a well-formed trace record the model cannot represent (an address above
 *   2^53 − 1, which a JavaScript number cannot hold exactly).
 * - `INVALID_ARGUMENT`: an API was called with an out-of-range option or argument.
 * - `OUT_OF_MEMORY`: the guest kernel ran out of physical frames in a vCPU's pool.
 * - `KERNEL_OOPS`: a guest kernel access faulted where the kernel expects none (a page-table
 *   access through the direct map, for instance) — on a correct MMU this never happens.
 * - `KERNEL_BUG`: the guest kernel's own bookkeeping is inconsistent (double free, bad state).
 * - `GUEST_DEADLOCK`: a guest program spun waiting for a condition longer than its budget.
 */
export type GuestErrorCode =
  | 'TRACE_CORRUPT'
  | 'TRACE_EMPTY'
  | 'TRACE_IO'
  | 'TRACE_UNSUPPORTED'
  | 'INVALID_ARGUMENT'
  | 'OUT_OF_MEMORY'
  | 'KERNEL_OOPS'
  | 'KERNEL_BUG'
  | 'GUEST_DEADLOCK'
  | (string & {})

/** Options of {@link GuestError}: the standard `cause`, plus the 1-based input line when the error is about a line of a file. */
export interface GuestErrorOptions {
  /** The underlying error this one wraps (an I/O error, for instance). */
  readonly cause?: unknown
  /** 1-based line number of the offending input line, when there is one. */
  readonly line?: number
}

/**
 * The error type of `@mmusim/guest`: a bad user input (a trace file, an option) is reported with
 * a machine-readable {@link GuestError.code} and a message saying what was expected and how to fix
 * it. Check with `err instanceof GuestError && err.code === 'TRACE_CORRUPT'`.
 */
export class GuestError extends Error {
  /** Machine-readable reason, one of {@link GuestErrorCode}. */
  readonly code: GuestErrorCode
  /** 1-based line number of the offending input line, or undefined when not about a line. */
  readonly line: number | undefined

  /**
   * @param code machine-readable reason
   * @param message human-readable explanation: what was found, what was expected, how to fix it
   * @param options `cause` of a wrapped error and/or the offending `line`
   */
  constructor(code: GuestErrorCode, message: string, options?: GuestErrorOptions) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause })
    this.name = 'GuestError'
    this.code = code
    this.line = options?.line
  }
}
