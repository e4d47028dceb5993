import { z } from 'zod'
import { HarnessError } from './errors.ts'
import type { ParamDef, Params, ParamValue, Workload } from './workload.ts'

/** Which defaults to start from: the harness's small scale or the selftests' own. */
export type Scale = 'small' | 'selftest'

const SIZE = /^(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?$/

/** Parse `64M`, `1G`, `4096`, `2MiB` into bytes. */
export function parseSize(v: string): number | null {
  const m = SIZE.exec(v.trim())
  if (m === null) return null
  const mult: Record<string, number> = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }
  return Math.round(Number(m[1]) * mult[m[2]!.toLowerCase()]!)
}

/** Print bytes the way the CLI accepts them (`64M`). */
export function formatSize(n: number): string {
  for (const [u, m] of [['T', 2 ** 40], ['G', 2 ** 30], ['M', 2 ** 20], ['K', 2 ** 10]] as const) if (n >= m && n % m === 0) return `${String(n / m)}${u}`
  return String(n)
}

/** kebab-case of a camelCase name (`bytesPerVcpu` → `bytes-per-vcpu`). */
export function kebab(name: string): string {
  return name.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)
}

function schemaOf(d: ParamDef): z.ZodType<ParamValue> {
  const coerceNum = (v: unknown): unknown => (typeof v === 'string' ? (d.type === 'size' ? (parseSize(v) ?? v) : v.trim() === '' ? v : Number(v)) : v)
  switch (d.type) {
    case 'bool':
      return z.preprocess((v) => (v === 'true' || v === 'on' || v === '1' || v === '' ? true : v === 'false' || v === 'off' || v === '0' ? false : v), z.boolean())
    case 'enum':
      return z.enum(d.choices as [string, ...string[]])
    case 'string':
      return z.string()
    default: {
      let n = z.number().int()
      if (d.type === 'percent') n = n.min(0).max(100)
      if (d.min !== undefined) n = n.min(d.min)
      if (d.max !== undefined) n = n.max(d.max)
      if (d.type === 'size') n = n.refine((x) => x % 4096 === 0, { message: 'must be a multiple of 4 KiB (e.g. 64M, 1G)' })
      return z.preprocess(coerceNum, n)
    }
  }
}

/**
 * Resolve a workload's parameters: defaults of `scale`, then `raw` (keys are camelCase names,
 * kebab-case names or the selftest's flag letters; values typed or strings like `64M`, `on`).
 * An unknown key or a bad value is a `WORKLOAD_PARAMS` error that names the parameter and says
 * what was expected.
 */
export function resolveParams(w: Workload, raw: Readonly<Record<string, unknown>> = {}, scale: Scale = 'small'): Params {
  const byKey = new Map<string, ParamDef>()
  for (const d of w.params) {
    byKey.set(d.name, d)
    byKey.set(kebab(d.name), d)
    if (d.flag !== undefined) byKey.set(d.flag, d)
  }
  const input: Record<string, unknown> = {}
  const unknown: string[] = []
  for (const [k, v] of Object.entries(raw)) {
    const d = byKey.get(k)
    if (d === undefined) unknown.push(k)
    else input[d.name] = v
  }
  if (unknown.length > 0) {
    throw new HarnessError(
      'WORKLOAD_PARAMS',
      `workload '${w.name}' has no parameter ${unknown.map((u) => `'${u}'`).join(', ')}; it takes: ${w.params.map((d) => `${kebab(d.name)}${d.flag === undefined ? '' : ` (-${d.flag})`}`).join(', ')}.`,
    )
  }
  const shape: Record<string, z.ZodType<ParamValue>> = {}
  for (const d of w.params) {
    const def = scale === 'selftest' && d.selftestDefault !== undefined ? d.selftestDefault : d.default
    shape[d.name] = schemaOf(d).default(def)
  }
  const r = z.object(shape).safeParse(input)
  if (!r.success) {
    throw new HarnessError('WORKLOAD_PARAMS', `invalid parameters for workload '${w.name}':\n${z.prettifyError(r.error)}`)
  }
  return r.data
}

/** The vCPU count of resolved params (the workload's vCPU parameter, default 1). */
export function vcpusOf(w: Workload, p: Params): number {
  const v = p[w.vcpusParam ?? 'vcpus']
  return typeof v === 'number' ? v : 1
}

/** Parameters that differ from the small-scale defaults, as CLI flags (`--bytes-per-vcpu 4M`). */
export function paramsToFlags(w: Workload, p: Params): string[] {
  const out: string[] = []
  for (const d of w.params) {
    const v = p[d.name]
    if (v === undefined || v === d.default) continue
    out.push(`--${kebab(d.name)}`, d.type === 'size' ? formatSize(v as number) : String(v))
  }
  return out
}
