import type { CompareResult } from './compare.ts'
import type { RunRecord } from './runner.ts'

/** Version of the JSON report schema (bumped on any incompatible change; see README). */
export const RESULTS_SCHEMA = 'mmusim-results/1'

/** Format simulated ns for a table (`812 ns`, `1.31 ms`). */
export function fmtNs(ns: number): string {
  if (ns < 1e3) return `${String(Math.round(ns))} ns`
  if (ns < 1e6) return `${(ns / 1e3).toFixed(2)} µs`
  if (ns < 1e9) return `${(ns / 1e6).toFixed(2)} ms`
  return `${(ns / 1e9).toFixed(3)} s`
}

function fmtInt(n: number): string {
  return Math.round(n).toLocaleString('en-US')
}

/** One comparison row: a label and a value per strategy column. */
interface Row {
  readonly workload: string
  readonly metric: string
  readonly cells: readonly string[]
}

/** The rows of the comparison table (workload × metric, one column per available strategy). */
function rows(result: CompareResult): { header: string[]; rows: Row[] } {
  const cols = result.strategies.filter((s) => s.available).map((s) => s.name)
  const out: Row[] = []
  for (const w of result.workloads) {
    for (const seed of result.seeds) {
      const runs = cols.map((c) => result.runs.find((r) => r.workload === w && r.strategy === c && r.seed === seed) ?? null)
      const label = result.seeds.length > 1 ? `${w} (seed ${String(seed)})` : w
      const add = (metric: string, f: (r: RunRecord) => string): void => {
        out.push({ workload: label, metric, cells: runs.map((r) => (r === null ? '—' : r.error !== null && metric !== 'oracle' ? 'error' : f(r))) })
      }
      add('simulated time', (r) => fmtNs(r.totals.simNs))
      const first = runs.find((r) => r !== null && Object.keys(r.metrics).length > 0) ?? null
      const mainMetric = first === null ? undefined : Object.keys(first.metrics)[0]
      if (mainMetric !== undefined) add(mainMetric, (r) => (r.metrics[mainMetric] === undefined ? '—' : /time|memory|idle|run|reset|ro|rw/i.test(mainMetric) ? fmtNs(r.metrics[mainMetric] * 1e9) : String(r.metrics[mainMetric])))
      add('VM exits', (r) => fmtInt(r.totals.exits))
      add('guest PT-write exits', (r) => fmtInt(r.totals.ptWriteExits))
      add('KVM page faults', (r) => fmtInt(r.totals.kvmFaults))
      add('refs per walk', (r) => r.totals.refsPerWalk.toFixed(2))
      add('TLB misses', (r) => fmtInt(r.totals.tlbMisses))
      add('mmu_lock wait', (r) => fmtNs(r.totals.mmuLockWaitNs))
      add('oracle', (r) => (r.oracle === null ? (r.error === null ? 'reference' : 'error') : r.oracle.ok ? 'ok' : 'DIVERGED'))
    }
  }
  return { header: ['workload', 'metric', ...cols], rows: out }
}

/** The comparison as a plain-text table (fixed-width columns). */
export function renderTable(result: CompareResult): string {
  const { header, rows: rs } = rows(result)
  const grid = [header, ...rs.map((r) => [r.workload, r.metric, ...r.cells])]
  const widths = header.map((_, i) => Math.max(...grid.map((g) => (g[i] ?? '').length)))
  const line = (cells: string[]): string => cells.map((c, i) => (i < 2 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ').trimEnd()
  const out: string[] = [line(header), widths.map((w) => '─'.repeat(w)).join('  ')]
  let last = ''
  for (const r of rs) {
    out.push(line([r.workload === last ? '' : r.workload, r.metric, ...r.cells]))
    last = r.workload
  }
  out.push(...footer(result))
  return out.join('\n')
}

/** The comparison as a Markdown table. */
export function renderMarkdown(result: CompareResult): string {
  const { header, rows: rs } = rows(result)
  const esc = (s: string): string => s.replace(/\|/g, '\\|')
  const out = [`| ${header.map(esc).join(' | ')} |`, `| ${header.map((_, i) => (i < 2 ? '---' : '---:')).join(' | ')} |`]
  let last = ''
  for (const r of rs) {
    out.push(`| ${[r.workload === last ? '' : r.workload, r.metric, ...r.cells].map(esc).join(' | ')} |`)
    last = r.workload
  }
  const f = footer(result)
  if (f.length > 0) out.push('', ...f.map((l) => `- ${l.trim()}`))
  return out.join('\n')
}

function footer(result: CompareResult): string[] {
  const out: string[] = []
  for (const s of result.strategies) if (!s.available) out.push(`unavailable: ${s.spec} — ${s.reason ?? ''}`)
  for (const r of result.runs) {
    if (r.error !== null) out.push(`error: ${r.strategy} on ${r.workload}: ${r.error.split('\n')[0]!}\n  replay: ${r.replay}`)
    else if (r.oracle !== null && !r.oracle.ok) out.push(`DIVERGED: ${r.strategy} on ${r.workload}: ${r.oracle.problems[0] ?? ''}\n  replay: ${r.replay}`)
  }
  return out
}

/** The stable JSON document of a comparison (see the README for the schema). */
export function toJson(result: CompareResult, options: { timing?: boolean } = {}): string {
  const timing = options.timing ?? true
  const doc = {
    schema: RESULTS_SCHEMA,
    strategies: result.strategies,
    workloads: result.workloads,
    seeds: result.seeds,
    runs: result.runs.map((r) => (timing ? r : { ...r, wallMs: undefined })),
    summary: {
      runs: result.runs.length,
      oracleFailures: result.runs.filter((r) => r.oracle !== null && !r.oracle.ok).length,
      errors: result.runs.filter((r) => r.error !== null).length,
      unavailable: result.strategies.filter((s) => !s.available).map((s) => s.spec),
    },
  }
  return JSON.stringify(doc, null, 2)
}

/** Whether the comparison found no divergence and no error. */
export function compareOk(result: CompareResult): boolean {
  return result.runs.every((r) => r.error === null && (r.oracle === null || r.oracle.ok))
}
