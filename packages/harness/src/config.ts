import { existsSync } from 'node:fs'
import path from 'node:path'
import { pathToFileURL } from 'node:url'
import type { CostModel, MmuStrategy } from '@mmusim/kvm'
import { z } from 'zod'
import { HarnessError } from './errors.ts'
import { importModule } from './import-module.ts'
import type { StrategySpec } from './loader.ts'

/** A workload entry of an experiment: its name, or its name with parameter overrides. */
export type WorkloadSpec = string | { readonly name: string; readonly params?: Readonly<Record<string, unknown>> }

/** An experiment: strategies × workloads × parameters × seeds on one machine configuration. */
export interface ExperimentConfig {
  /** Strategies to compare (short names, packages, paths — relative to this file — objects, `[spec, options]`). */
  readonly strategies?: readonly StrategySpec[]
  /** Workloads with optional parameter overrides. */
  readonly workloads?: readonly WorkloadSpec[]
  /** Guest random seeds; each (strategy, workload) runs once per seed. @default [1] */
  readonly seeds?: readonly number[]
  /** vCPU count for every workload that takes one. */
  readonly vcpus?: number
  /** Parameter defaults: the harness's small scale or the selftests' own (`-b 1G` ...). @default 'small' */
  readonly scale?: 'small' | 'selftest'
  /** Guest paging levels. @default 4 */
  readonly levels?: 4 | 5
  /** Back guest memory with THP on the host. @default false */
  readonly thp?: boolean
  /** Guest memory in bytes (default: what each workload needs). */
  readonly memBytes?: number
  /** Cost model overrides (simulated ns). */
  readonly costs?: Partial<CostModel>
  /** Check every run against bare metal. @default true */
  readonly oracle?: boolean
}

/** Identity helper for type inference in `mmusim.config.ts`, as vite's and vitest's. */
export function defineConfig(config: ExperimentConfig): ExperimentConfig {
  return config
}

const strategyLike = z.custom<MmuStrategy | string>((v) => typeof v === 'string' || (typeof v === 'object' && v !== null), { message: 'expected a strategy name, path, package or object' })

/** The schema a config is validated with (errors via z.prettifyError). */
export const configSchema = z
  .object({
    strategies: z.array(z.union([strategyLike, z.tuple([strategyLike, z.unknown()])])).min(1).optional(),
    workloads: z.array(z.union([z.string(), z.object({ name: z.string(), params: z.record(z.string(), z.unknown()).optional() }).strict()])).min(1).optional(),
    seeds: z.array(z.number().int().min(0)).min(1).optional(),
    vcpus: z.number().int().min(1).max(64).optional(),
    scale: z.enum(['small', 'selftest']).optional(),
    levels: z.union([z.literal(4), z.literal(5)]).optional(),
    thp: z.boolean().optional(),
    memBytes: z.number().int().positive().optional(),
    costs: z.record(z.string(), z.number().nonnegative()).optional(),
    oracle: z.boolean().optional(),
  })
  .strict()

/** Config file names looked for in the working folder, in order. */
export const CONFIG_FILES = ['mmusim.config.ts', 'mmusim.config.mts', 'mmusim.config.js', 'mmusim.config.mjs']

/** A loaded config and the folder its relative paths resolve from. */
export interface LoadedConfig {
  readonly config: ExperimentConfig
  readonly file: string
  readonly dir: string
}

/** Find `mmusim.config.*` in `dir` (null when there is none). */
export function findConfig(dir: string): string | null {
  for (const f of CONFIG_FILES) {
    const p = path.join(dir, f)
    if (existsSync(p)) return p
  }
  return null
}

/** Load and validate a config file (`.ts` through jiti when the runtime cannot import it). */
export async function loadConfig(file: string): Promise<LoadedConfig> {
  const abs = path.resolve(file)
  if (!existsSync(abs)) throw new HarnessError('CONFIG_NOT_FOUND', `config file ${abs} does not exist; expected a mmusim.config.ts exporting defineConfig({ ... }).`)
  let mod: Record<string, unknown>
  try {
    mod = await importModule(pathToFileURL(abs).href)
  } catch (err) {
    throw new HarnessError('CONFIG_LOAD', `failed to load ${abs}: ${err instanceof Error ? err.message : String(err)}`, { cause: err })
  }
  const value = mod.default
  if (value === undefined) throw new HarnessError('CONFIG_INVALID', `${abs} has no default export; expected \`export default defineConfig({ strategies: [...], workloads: [...] })\`.`)
  const r = configSchema.safeParse(value)
  if (!r.success) throw new HarnessError('CONFIG_INVALID', `invalid config ${abs}:\n${z.prettifyError(r.error)}`)
  return { config: value as ExperimentConfig, file: abs, dir: path.dirname(abs) }
}
