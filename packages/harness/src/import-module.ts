import { createRequire } from 'node:module'
import path from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'
import { createJiti } from 'jiti'

/** Extensions that need a TypeScript-aware loader on Node 20. */
const TS_EXT = /\.(?:c|m)?tsx?$/

/** Whether `spec` names a file (relative, absolute, or file: URL) rather than a package. */
export function isPathSpecifier(spec: string): boolean {
  return spec.startsWith('.') || spec.startsWith('/') || spec.startsWith('file:') || /^[A-Za-z]:[\\/]/.test(spec) || TS_EXT.test(spec) || /\.(?:c|m)?js$/.test(spec)
}

/** Whether an import failure means "there is no such module" (as opposed to "it threw while loading"). */
export function isModuleNotFound(err: unknown, target: string): boolean {
  if (!(err instanceof Error)) return false
  const code = (err as { code?: unknown }).code
  const msg = err.message
  const notFound = code === 'ERR_MODULE_NOT_FOUND' || code === 'MODULE_NOT_FOUND' || /Cannot find (?:module|package)|Failed to load url|Failed to resolve (?:entry|import)|does not exist|ENOENT/.test(msg)
  if (!notFound) return false
  // A module that exists but imports a missing module is a load error of that module; report
  // "not found" only when the message is about the target itself.
  const base = path.basename(target.replace(/^file:\/\//, ''))
  return msg.includes(target) || msg.includes(base) || msg.includes(target.replace(/^file:\/\//, ''))
}

/**
 * Import a module by file URL or bare specifier. `.ts` files are imported natively when the
 * runtime can (vitest, tsx) and through jiti otherwise (plain Node 20 has no type stripping).
 */
export async function importModule(spec: string): Promise<Record<string, unknown>> {
  try {
    return (await import(/* @vite-ignore */ spec)) as Record<string, unknown>
  } catch (err) {
    const code = (err as { code?: unknown }).code
    if (code === 'ERR_UNKNOWN_FILE_EXTENSION' && spec.startsWith('file:') && TS_EXT.test(spec)) {
      const jiti = createJiti(import.meta.url, { interopDefault: false })
      return await jiti.import<Record<string, unknown>>(fileURLToPath(spec))
    }
    throw err
  }
}

/**
 * Resolve `spec` from folder `fromDir`: a path becomes a file URL; a bare package name is
 * resolved from `fromDir`'s node_modules when possible (returning its file URL), else returned
 * unchanged so the harness's own resolution (with its export conditions) applies.
 */
export function resolveSpecifier(spec: string, fromDir: string): string {
  if (spec.startsWith('file:')) return spec
  if (isPathSpecifier(spec)) return pathToFileURL(path.resolve(fromDir, spec)).href
  try {
    const req = createRequire(path.join(fromDir, 'noop.js'))
    return pathToFileURL(req.resolve(spec)).href
  } catch {
    return spec
  }
}
