import path from 'node:path'
import { directMapStrategy, type MmuStrategy } from '@mmusim/kvm'
import { describe, expect, it } from 'vitest'
import { HarnessError } from './errors.ts'
import { BUILTIN_STRATEGIES, describeOptions, isUnavailable, loadStrategy, validateStrategyOptions } from './loader.ts'

const from = path.join(import.meta.dirname, '__fixtures__')

async function failure(spec: Parameters<typeof loadStrategy>[0]): Promise<HarnessError> {
  try {
    await loadStrategy(spec, { from })
  } catch (err) {
    expect(err).toBeInstanceOf(HarnessError)
    return err as HarnessError
  }
  throw new Error(`expected ${JSON.stringify(spec)} to fail`)
}

describe('loadStrategy', () => {
  it('loads a .ts plugin file relative to the config folder, with defaults applied', async () => {
    const l = await loadStrategy('./good-strategy.ts', { from })
    expect(l.name).toBe('fixture-good')
    expect(l.options).toEqual({ preSetAccessed: true })
    expect(l.source).toMatch(/^file:.*good-strategy\.ts$/)
  })

  it('loads a plain JavaScript module and an inline object, and the bare-metal reference', async () => {
    expect((await loadStrategy('./plain-js-strategy.mjs', { from })).name).toBe('fixture-js')
    const inline = await loadStrategy([directMapStrategy, { preSetAccessed: false }])
    expect(inline).toMatchObject({ name: 'direct-map', spec: null, source: 'inline', options: { preSetAccessed: false } })
    expect(await loadStrategy('bare-metal')).toMatchObject({ name: 'bare-metal', strategy: null })
  })

  it("picks a strategy from a module's `strategies` with module#name", async () => {
    expect((await loadStrategy('./multi-strategy.ts#beta', { from })).name).toBe('beta')
  })

  it('module not found: says where it looked and what names are accepted', async () => {
    const e = await failure('./does-not-exist.ts')
    expect(e.code).toBe('MMU_PLUGIN_NOT_FOUND')
    expect(e.message).toContain('Cannot find MMU strategy module')
    expect(e.message).toContain('does-not-exist.ts')
    expect(e.message).toContain('bare-metal, shadow, legacy-tdp, tdp')
    const pkg = await failure('@acme/no-such-mmu')
    expect(pkg.code).toBe('MMU_PLUGIN_NOT_FOUND')
    expect(isUnavailable(pkg)).toBe(true)
  })

  it('a module that throws while loading is a load error wrapping the cause', async () => {
    const e = await failure('./throws-on-load.ts')
    expect(e.code).toBe('MMU_PLUGIN_LOAD')
    expect(e.message).toContain('fixture exploded while loading')
    expect(e.cause).toBeInstanceOf(Error)
  })

  it('no default export: lists the exports and shows the expected default export', async () => {
    const e = await failure('./no-default.ts')
    expect(e.code).toBe('MMU_PLUGIN_NO_DEFAULT')
    expect(e.message).toContain('has no default export')
    expect(e.message).toContain('It exports [somethingElse, helper]')
    expect(e.message).toContain('export default defineMmuStrategy({ name, apiVersion: 1')
    const multi = await failure('./multi-strategy.ts')
    expect(multi.message).toContain("pick one with '<module>#<name>' (one of alpha, beta)")
  })

  it('no such strategy in a module: lists the names it has', async () => {
    const e = await failure('./multi-strategy.ts#gamma')
    expect(e.code).toBe('MMU_PLUGIN_NO_SUCH_STRATEGY')
    expect(e.message).toContain("MMU strategy 'gamma' is not exported")
    expect(e.message).toContain('name [alpha, beta]')
  })

  it('wrong shape: lists each problem and prints the expected object form', async () => {
    const e = await failure('./wrong-shape.ts')
    expect(e.code).toBe('MMU_PLUGIN_SHAPE')
    expect(e.message).toContain('does not have the shape of an MMU strategy')
    expect(e.message).toContain('create must be a function (vm, options) => MmuInstance')
    expect(e.message).toContain('Expected:\n{\n  name: string,\n  apiVersion: 1,')
    expect(e.message).toContain('(got an object with keys [name, apiVersion, create])')
    const notObject = await failure([42 as unknown as MmuStrategy, undefined])
    expect(notObject.code).toBe('MMU_PLUGIN_SHAPE')
    expect(notObject.message).toContain('is not an object (got number)')
  })

  it('unsupported apiVersion: names both versions and what to upgrade', async () => {
    const e = await failure('./wrong-api.ts')
    expect(e.code).toBe('MMU_PLUGIN_API_VERSION')
    expect(e.message).toContain("'from-the-future' declares apiVersion 2")
    expect(e.message).toContain('implements apiVersion 1')
    expect(e.message).toContain('This harness supports apiVersion 1 only.')
  })

  it('invalid options: which option, what was expected, and what the strategy takes', async () => {
    const e = await failure(['./good-strategy.ts', { preSetAccessed: 'yes', bogus: 1 }])
    expect(e.code).toBe('MMU_PLUGIN_OPTIONS')
    expect(e.message).toContain('preSetAccessed: Invalid input: expected boolean, received string')
    expect(e.message).toContain('Unrecognized key: "bogus"')
    expect(e.message).toContain("takes: preSetAccessed: boolean = true.")
    const bare = await failure(['bare-metal', { x: 1 }])
    expect(bare.code).toBe('MMU_PLUGIN_OPTIONS')
    expect(bare.message).toContain('takes no options')
  })

  it('validates options of an already loaded strategy and describes its schema', () => {
    const s = directMapStrategy as MmuStrategy
    expect(validateStrategyOptions(s, {})).toEqual({ preSetAccessed: true })
    expect(() => validateStrategyOptions(s, { preSetAccessed: 3 })).toThrow(/preSetAccessed: Invalid input: expected boolean, received number/)
    expect(describeOptions(s)).toEqual([{ name: 'preSetAccessed', type: 'boolean', default: true }])
  })

  it('built-in short names go through the same loader path (module + strategies array), or report unavailable', async () => {
    for (const [name, b] of Object.entries(BUILTIN_STRATEGIES)) {
      try {
        const l = await loadStrategy(name)
        expect(l.name).toBe(b.export)
        expect(l.source).toBe(`builtin:${b.module}`)
      } catch (err) {
        expect(isUnavailable(err)).toBe(true)
        expect((err as Error).message).toContain(b.module)
      }
    }
  })
})
