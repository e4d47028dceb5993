/** Codes of {@link HarnessError}. */
export type HarnessErrorCode =
  /** The strategy's module (package or file) could not be found. */
  | 'MMU_PLUGIN_NOT_FOUND'
  /** The module was found but threw while loading. */
  | 'MMU_PLUGIN_LOAD'
  /** The module has no default export (and no single strategy in `strategies`). */
  | 'MMU_PLUGIN_NO_DEFAULT'
  /** The module does not export a strategy of the requested name. */
  | 'MMU_PLUGIN_NO_SUCH_STRATEGY'
  /** The export is not shaped like an MMU strategy. */
  | 'MMU_PLUGIN_SHAPE'
  /** The strategy declares an API version this harness does not implement. */
  | 'MMU_PLUGIN_API_VERSION'
  /** The strategy's options do not fit its schema. */
  | 'MMU_PLUGIN_OPTIONS'
  /** The config file is missing, failed to load, or is invalid. */
  | 'CONFIG_NOT_FOUND'
  | 'CONFIG_LOAD'
  | 'CONFIG_INVALID'
  /** No workload of that name. */
  | 'WORKLOAD_UNKNOWN'
  /** A workload parameter is invalid. */
  | 'WORKLOAD_PARAMS'
  /** A command-line argument is invalid. */
  | 'CLI_ARGS'

/**
 * A harness error: a stable `code`, a message that says what was expected and how to fix it, and
 * the underlying error as `cause` when one was wrapped.
 */
export class HarnessError extends Error {
  readonly code: HarnessErrorCode

  constructor(code: HarnessErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'HarnessError'
    this.code = code
  }
}
