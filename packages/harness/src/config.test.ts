import path from 'node:path'
import { describe, expect, it } from 'vitest'
import { main } from './cli.ts'
import { compare } from './compare.ts'
import { defineConfig, findConfig, loadConfig } from './config.ts'

const dir = path.join(import.meta.dirname, '__fixtures__', 'config')

describe('mmusim.config.ts', () => {
  it('defineConfig is the identity; the config is found, loaded and its paths resolve from its folder', async () => {
    const c = { workloads: ['gups'] }
    expect(defineConfig(c)).toBe(c)
    const file = findConfig(dir)
    expect(file).toBe(path.join(dir, 'mmusim.config.ts'))
    const loaded = await loadConfig(file!)
    expect(loaded.dir).toBe(dir)
    const r = await compare({ ...loaded.config, from: loaded.dir })
    expect(r.seeds).toEqual([1, 2])
    expect(r.runs.map((x) => `${x.strategy}/${String(x.seed)}/${String(x.oracle?.ok ?? 'ref')}`)).toEqual(['bare-metal/1/ref', 'fixture-good/1/true', 'bare-metal/2/ref', 'fixture-good/2/true'])
    expect(r.runs[1]!.params).toMatchObject({ iterations: 8 })
    expect(r.runs[1]!.strategyOptions).toEqual({ preSetAccessed: false })
  })

  it('an invalid config says which fields are wrong', async () => {
    await expect(loadConfig(path.join(dir, 'bad.config.ts'))).rejects.toThrow(/invalid config[\s\S]*Unrecognized key: "colour"[\s\S]*seeds/)
    await expect(loadConfig(path.join(dir, 'missing.config.ts'))).rejects.toMatchObject({ code: 'CONFIG_NOT_FOUND' })
  })

  it('the CLI picks up ./mmusim.config.ts from the working folder', async () => {
    const out: string[] = []
    const code = await main(['compare', '--json', '--no-timing'], { out: (s) => out.push(s), err: () => undefined, errIsTTY: false, cwd: dir, env: { CI: 'true' } })
    expect(code).toBe(0)
    expect((JSON.parse(out.join('')) as { runs: unknown[] }).runs).toHaveLength(4)
  })
})
