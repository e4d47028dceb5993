import { afterEach, describe, expect, it, vi } from 'vitest'
import { SIMULATOR_V8_FLAGS, tuneV8ForSimulation } from './v8-tuning.ts'

describe('tuneV8ForSimulation', () => {
  afterEach(() => {
    vi.unstubAllGlobals()
  })

  it('hands every flag to v8.setFlagsFromString under Node, and the flags are V8 inlining limits', () => {
    const seen: string[] = []
    const fake = { setFlagsFromString: (f: string) => seen.push(f) }
    vi.stubGlobal('process', { ...process, getBuiltinModule: (id: string) => (id === 'node:v8' ? fake : undefined) })
    expect(tuneV8ForSimulation()).toBe(true)
    expect(seen).toEqual([...SIMULATOR_V8_FLAGS])
    for (const f of SIMULATOR_V8_FLAGS) expect(f).toMatch(/^--max-inlined-bytecode-size(-cumulative)?=\d+$/)
  })

  it('does nothing and returns false without node:v8 (a browser)', () => {
    vi.stubGlobal('process', undefined)
    expect(tuneV8ForSimulation()).toBe(false)
  })

  it('applies to the real process (Node 20.16+ has process.getBuiltinModule)', () => {
    expect(tuneV8ForSimulation()).toBe(true)
  })
})
