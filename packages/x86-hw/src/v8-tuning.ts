/**
 * V8 settings under which the simulator runs fastest. Its hot paths (the vCPU loop, the MMUs'
 * fault state machines, the page walkers) are chains of many small methods; with V8's default
 * inlining budget (460 bytecodes per callee, 920 in all per optimized function) a good part of
 * them stay real calls. The larger budget below makes a populate run ≈ 15–25 % faster (issue 5's
 * benchmark) and changes no result: it only affects how V8 compiles the same code.
 *
 * The `mmusim` CLI and the benchmarks apply them; a program that embeds the simulator can call
 * {@link tuneV8ForSimulation} first thing, or start Node with the same flags.
 */
export const SIMULATOR_V8_FLAGS: readonly string[] = ['--max-inlined-bytecode-size=1000', '--max-inlined-bytecode-size-cumulative=4000']

/**
 * Apply {@link SIMULATOR_V8_FLAGS} to this process (`v8.setFlagsFromString`). Call it before the
 * simulation runs: functions V8 has already optimized keep their code until re-optimized. Returns
 * false, doing nothing, where `node:v8` is not available (a browser).
 */
export function tuneV8ForSimulation(): boolean {
  const proc = (globalThis as { process?: { getBuiltinModule?: (id: string) => unknown } }).process
  const v8 = proc?.getBuiltinModule?.('node:v8') as { setFlagsFromString(flags: string): void } | undefined
  if (v8 === undefined) return false
  for (const f of SIMULATOR_V8_FLAGS) v8.setFlagsFromString(f)
  return true
}

let hiddenClassProbe: ((a: object, b: object) => boolean) | null | undefined

/**
 * Whether `a` and `b` have the same V8 hidden class (map), through V8's `%HaveSameMap` — for
 * tests and diagnostics of the hot paths, which stay fast only while the objects they read keep
 * one hidden class (a new one deoptimizes every compiled function that reads them). Enables
 * `--allow-natives-syntax` in this process on first use. Returns null where that is not
 * possible (no `node:v8`: a browser).
 */
export function sameHiddenClass(a: object, b: object): boolean | null {
  if (hiddenClassProbe === undefined) {
    const proc = (globalThis as { process?: { getBuiltinModule?: (id: string) => unknown } }).process
    const v8 = proc?.getBuiltinModule?.('node:v8') as { setFlagsFromString(flags: string): void } | undefined
    if (v8 === undefined) hiddenClassProbe = null
    else {
      v8.setFlagsFromString('--allow-natives-syntax')
      // eslint-disable-next-line @typescript-eslint/no-implied-eval -- V8 natives syntax only parses in code compiled after the flag is set
      hiddenClassProbe = new Function('a', 'b', 'return %HaveSameMap(a, b)') as (a: object, b: object) => boolean
    }
  }
  return hiddenClassProbe === null ? null : hiddenClassProbe(a, b)
}
