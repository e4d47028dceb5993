import type { ProgressEvent } from './compare.ts'

/** Where progress goes and how: an updating line on a terminal, plain lines in CI or a pipe. */
export interface ProgressSink {
  readonly write: (s: string) => void
  readonly isTTY: boolean
}

/** Whether to draw live progress: a TTY and not CI (ecosystem.md §4.6). */
export function isInteractive(stream: { isTTY?: boolean }, env: NodeJS.ProcessEnv = process.env): boolean {
  return stream.isTTY === true && env.CI !== 'true' && env.CI !== '1'
}

/** A progress reporter for {@link compare}. */
export function progressReporter(sink: ProgressSink): (e: ProgressEvent) => void {
  return (e) => {
    const head = `[${String(e.index)}/${String(e.total)}] ${e.strategy} · ${e.workload}`
    if (sink.isTTY) {
      if (e.done === null) sink.write(`\r\x1b[2K${head}${e.phase === null ? '' : ` · ${e.phase}`}`)
      else sink.write(`\r\x1b[2K${e.index === e.total ? '' : head}${e.index === e.total ? '' : ''}`)
      return
    }
    if (e.done !== null) {
      const r = e.done
      const verdict = r.error !== null ? 'ERROR' : r.oracle === null ? 'done' : r.oracle.ok ? 'oracle ok' : 'DIVERGED'
      sink.write(`${head}: ${verdict} (${r.wallMs.toFixed(0)} ms)\n`)
    }
  }
}
