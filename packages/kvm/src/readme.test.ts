import { readFileSync } from 'node:fs'
import { expect, it } from 'vitest'

it('the README quotes the example strategy exactly as the tests run it', () => {
  const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8')
  const example = readFileSync(new URL('./examples/direct-map-strategy.ts', import.meta.url), 'utf8')
  expect(readme.includes(example)).toBe(true)
})
