import { assertMmuStrategy, type MmuStrategy, parseStrategyOptions } from '@mmusim/kvm'
import { z } from 'zod'
import { HarnessError } from './errors.ts'
import { importModule, isModuleNotFound, isPathSpecifier, resolveSpecifier } from './import-module.ts'

/** The name of the bare-metal reference "strategy" (no hypervisor, no MMU). */
export const BARE_METAL = 'bare-metal'

/** A built-in strategy: which module exports it, under which name. */
export interface BuiltinStrategy {
  readonly module: string
  readonly export: string
  readonly description: string
}

/**
 * Built-in short names. They are resolved through the same loader path as a third-party package:
 * the module is imported, its `strategies` array searched by name, else its default export taken.
 */
export const BUILTIN_STRATEGIES: Readonly<Record<string, BuiltinStrategy>> = Object.freeze({
  shadow: { module: '@mmusim/shadow-mmu', export: 'shadow', description: 'shadow paging (ept=0): KVM mmu.c + paging_tmpl.h, unsync, write tracking' },
  'legacy-tdp': { module: '@mmusim/shadow-mmu', export: 'legacy-tdp', description: 'the legacy MMU driving EPT (tdp_mmu=N): direct shadow pages, faults under the write lock' },
  tdp: { module: '@mmusim/tdp-mmu', export: 'tdp', description: 'the TDP MMU (tdp_mmu=Y): faults under the read lock, atomic SPTE updates' },
})

/** The default strategy list of `mmusim compare`: the reference and the three built-ins. */
export const DEFAULT_STRATEGIES: readonly string[] = [BARE_METAL, 'shadow', 'legacy-tdp', 'tdp']

/**
 * How a strategy is named in a config or on the command line: a short name, a package name
 * (optionally `pkg#name` to pick from its `strategies`), a path to a module (`.ts` too), or a
 * strategy object — alone or as a `[spec, options]` tuple.
 */
export type StrategySpec = string | MmuStrategy | readonly [string | MmuStrategy, unknown]

/** A strategy ready to run. */
export interface LoadedStrategy {
  /** The name shown in reports (the strategy's own `name`, or `bare-metal`). */
  readonly name: string
  /** The string that names it on the command line (null for an inline object). */
  readonly spec: string | null
  /** The strategy, or null for the bare-metal reference. */
  readonly strategy: MmuStrategy | null
  /** Options as given (before validation), for replay commands and reports. */
  readonly rawOptions: unknown
  /** Options after validation with the strategy's schema (defaults applied). */
  readonly options: unknown
  /** Where it came from: `builtin:@mmusim/tdp-mmu`, a file URL, a package name, or `inline`. */
  readonly source: string
}

/** Options of {@link loadStrategy}. */
export interface LoadStrategyOptions {
  /** Folder that relative paths and package names resolve from (the config file's folder). @default process.cwd() */
  readonly from?: string
  /** What to say the spec came from in messages (e.g. the config file). */
  readonly where?: string
}

function describe(value: unknown): string {
  if (value === null) return 'null'
  if (Array.isArray(value)) return 'an array'
  if (typeof value === 'object') {
    const keys = Object.keys(value)
    return `an object with keys [${keys.slice(0, 8).join(', ')}${keys.length > 8 ? ', …' : ''}]`
  }
  return typeof value
}

/** Split `pkg#name` into module and strategy name. */
function splitSelector(spec: string): { module: string; select: string | null } {
  const i = spec.lastIndexOf('#')
  if (i <= 0) return { module: spec, select: null }
  return { module: spec.slice(0, i), select: spec.slice(i + 1) }
}

function strategiesOf(mod: Record<string, unknown>): unknown[] {
  const s = mod.strategies
  return Array.isArray(s) ? (s as unknown[]) : []
}

function nameOf(v: unknown): string | null {
  return typeof v === 'object' && v !== null && typeof (v as { name?: unknown }).name === 'string' ? (v as { name: string }).name : null
}

/** Pick the strategy export from a loaded module: by name from `strategies` (or the default), else the default export. */
function pickExport(mod: Record<string, unknown>, select: string | null, label: string): unknown {
  const list = strategiesOf(mod)
  if (select !== null) {
    const found = list.find((s) => nameOf(s) === select) ?? (nameOf(mod.default) === select ? mod.default : undefined)
    if (found !== undefined) return found
    const names = [...new Set([...list.map(nameOf), nameOf(mod.default)].filter((n): n is string => n !== null))]
    throw new HarnessError(
      'MMU_PLUGIN_NO_SUCH_STRATEGY',
      `MMU strategy '${select}' is not exported by ${label}: its \`strategies\` array and default export ${names.length === 0 ? 'name no strategy' : `name [${names.join(', ')}]`}. ` +
        `Expected \`export const strategies = [${select === '' ? 'strategy' : `defineMmuStrategy({ name: '${select}', ... })`}]\` or a default export with that name.`,
    )
  }
  let def = mod.default
  // CommonJS / double-wrapped default (module.exports = { default: strategy }).
  if (typeof def === 'object' && def !== null && !('create' in def) && 'default' in def) def = (def).default
  if (def !== undefined) return def
  if (list.length === 1) return list[0]
  const exported = Object.keys(mod).filter((k) => k !== '__esModule')
  throw new HarnessError(
    'MMU_PLUGIN_NO_DEFAULT',
    `${label} has no default export${list.length > 1 ? ` and its \`strategies\` array holds ${String(list.length)} strategies` : ''}. ` +
      `It exports [${exported.join(', ')}]. Expected \`export default defineMmuStrategy({ name, apiVersion: 1, description, capabilities, optionsSchema, create })\`` +
      `${list.length > 1 ? `, or pick one with '<module>#<name>' (one of ${list.map((s) => nameOf(s) ?? '?').join(', ')})` : ''}.`,
  )
}

/** Validate the shape and API version of `value`, mapping the core's error to a typed harness error. */
function checkStrategy(value: unknown, label: string): MmuStrategy {
  try {
    assertMmuStrategy(value, `the export of ${label}`)
  } catch (err) {
    const msg = err instanceof Error ? err.message : String(err)
    const api = msg.includes('declares apiVersion')
    throw new HarnessError(
      api ? 'MMU_PLUGIN_API_VERSION' : 'MMU_PLUGIN_SHAPE',
      api ? `${msg} This harness supports apiVersion 1 only.` : `${msg}\n(got ${describe(value)})`,
      { cause: err },
    )
  }
  return value
}

/** Validate options against the strategy's schema; the error lists each bad option and what was expected. */
export function validateStrategyOptions(strategy: MmuStrategy, options: unknown, label = `'${strategy.name}'`): unknown {
  try {
    return parseStrategyOptions(strategy, options)
  } catch (err) {
    const msg = err instanceof Error ? err.message : String(err)
    const known = describeOptions(strategy)
    throw new HarnessError(
      'MMU_PLUGIN_OPTIONS',
      `${msg}\n${known.length === 0 ? `MMU strategy ${label} takes no options.` : `MMU strategy ${label} takes: ${known.map((o) => `${o.name}: ${o.type}${o.default === undefined ? '' : ` = ${JSON.stringify(o.default)}`}`).join(', ')}.`}`,
      { cause: err },
    )
  }
}

/** One option of a strategy, as `mmusim list` shows it. */
export interface StrategyOptionInfo {
  readonly name: string
  readonly type: string
  readonly default?: unknown
  readonly description?: string
}

/** The options a strategy's schema accepts (read from zod schemas through JSON Schema; empty otherwise). */
export function describeOptions(strategy: MmuStrategy): StrategyOptionInfo[] {
  try {
    const js = z.toJSONSchema(strategy.optionsSchema as unknown as z.ZodType, { io: 'input', unrepresentable: 'any' }) as {
      properties?: Record<string, { type?: unknown; default?: unknown; description?: string; enum?: unknown[] }>
    }
    return Object.entries(js.properties ?? {}).map(([name, p]) => ({
      name,
      type: Array.isArray(p.enum) ? p.enum.map((e) => JSON.stringify(e)).join(' | ') : typeof p.type === 'string' ? p.type : 'unknown',
      ...(p.default === undefined ? {} : { default: p.default }),
      ...(p.description === undefined ? {} : { description: p.description }),
    }))
  } catch {
    return []
  }
}

/**
 * Load one strategy: resolve the spec (built-in short name, package, `pkg#name`, path, object),
 * import the module, pick the export, check its shape and API version and validate its options.
 * Every failure is a {@link HarnessError} whose message says what was expected.
 */
export async function loadStrategy(spec: StrategySpec, options: LoadStrategyOptions = {}): Promise<LoadedStrategy> {
  const from = options.from ?? process.cwd()
  const [target, rawOptions] = Array.isArray(spec) ? (spec as readonly [string | MmuStrategy, unknown]) : [spec as string | MmuStrategy, undefined]
  if (typeof target !== 'string') {
    const strategy = checkStrategy(target, 'the inline strategy object')
    return { name: strategy.name, spec: null, strategy, rawOptions, options: validateStrategyOptions(strategy, rawOptions), source: 'inline' }
  }
  if (target === BARE_METAL) {
    if (rawOptions !== undefined && !(typeof rawOptions === 'object' && rawOptions !== null && Object.keys(rawOptions).length === 0)) {
      throw new HarnessError('MMU_PLUGIN_OPTIONS', `'${BARE_METAL}' (the reference machine) takes no options; got ${JSON.stringify(rawOptions)}.`)
    }
    return { name: BARE_METAL, spec: BARE_METAL, strategy: null, rawOptions: undefined, options: {}, source: 'builtin' }
  }
  const builtin = Object.hasOwn(BUILTIN_STRATEGIES, target) ? BUILTIN_STRATEGIES[target]! : null
  const { module, select } = builtin !== null ? { module: builtin.module, select: builtin.export } : splitSelector(target)
  const resolved = builtin !== null ? module : resolveSpecifier(module, from)
  const label = builtin !== null ? `built-in strategy '${target}' (module '${module}')` : `'${target}'${options.where === undefined ? '' : ` (from ${options.where})`}`
  let mod: Record<string, unknown>
  try {
    mod = await importModule(resolved)
  } catch (err) {
    const msg = err instanceof Error ? err.message.split('\n')[0]! : String(err)
    if (isModuleNotFound(err, resolved) || isModuleNotFound(err, module)) {
      throw new HarnessError(
        'MMU_PLUGIN_NOT_FOUND',
        builtin !== null
          ? `${label} is not available: module '${module}' could not be loaded (${msg}). Is @mmusim/${module.split('/')[1] ?? ''} built and does it export a strategy named '${builtin.export}'?`
          : `Cannot find MMU strategy module ${label}${isPathSpecifier(module) ? ` at ${resolved}` : ''}. Expected a built-in name (${[BARE_METAL, ...Object.keys(BUILTIN_STRATEGIES)].join(', ')}), an installed package name, or a path to a module relative to ${from}.`,
        { cause: err },
      )
    }
    throw new HarnessError('MMU_PLUGIN_LOAD', `Failed to load MMU strategy ${label}: ${msg}`, { cause: err })
  }
  const picked = pickExport(mod, select, label)
  const strategy = checkStrategy(picked, label)
  return {
    name: strategy.name,
    spec: target,
    strategy,
    rawOptions,
    options: validateStrategyOptions(strategy, rawOptions, label),
    source: builtin !== null ? `builtin:${module}` : resolved,
  }
}

/** Whether `err` says a strategy is simply not available (module missing or strategy not exported yet). */
export function isUnavailable(err: unknown): err is HarnessError {
  return err instanceof HarnessError && (err.code === 'MMU_PLUGIN_NOT_FOUND' || err.code === 'MMU_PLUGIN_NO_SUCH_STRATEGY' || err.code === 'MMU_PLUGIN_NO_DEFAULT')
}
