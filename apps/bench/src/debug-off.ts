/**
 * Imported first by main.ts: measure what ships. Published builds compile `__DEBUG__` to false
 * (tsup `define`), which folds away the debug self-checks of the hot paths (x86-hw src/debug.ts).
 * `pnpm bench` runs the TypeScript sources through tsx, which has no `define`; debug.ts reads a
 * free `__DEBUG__`, which resolves to this global, and ES modules evaluate in import order, so
 * setting it here (before @mmusim/x86-hw is evaluated) gives the same DEBUG = false.
 * Bundlers that define `__DEBUG__` make this assignment a no-op.
 */
;(globalThis as { __DEBUG__?: boolean }).__DEBUG__ = false
