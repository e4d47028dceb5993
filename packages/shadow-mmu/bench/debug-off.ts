/**
 * Imported first by the benchmark: measure what ships. Builds compile `__DEBUG__` to false, which
 * folds away the debug self-checks; tsx has no `define`, so this sets the global that the
 * packages' debug.ts reads before any of them is evaluated (ES modules evaluate in import order).
 */
;(globalThis as { __DEBUG__?: boolean }).__DEBUG__ = false
