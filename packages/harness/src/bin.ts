/**
 * The `mmusim` executable's entry (run from source by bin/mmusim.js with tsx and the
 * `@mmusim/source` condition, or from the build).
 */
import { tuneV8ForSimulation } from '@mmusim/x86-hw'
import { main } from './cli.ts'

// V8's inlining budget for the simulator's chains of small methods (same results, faster runs).
tuneV8ForSimulation()

const code = await main(process.argv.slice(2), {
  out: (s) => process.stdout.write(s),
  err: (s) => process.stderr.write(s),
  errIsTTY: process.stderr.isTTY,
  cwd: process.cwd(),
  env: process.env,
})
process.exitCode = code
