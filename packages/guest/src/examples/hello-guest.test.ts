import { readFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { expect, it } from 'vitest'
import { runHelloGuest } from './hello-guest.ts'

it('the README example runs, and the README shows it verbatim', () => {
  expect(runHelloGuest()).toEqual({ accesses: 64, pageFaults: 32, mismatches: 0 })
  const src = readFileSync(fileURLToPath(new URL('./hello-guest.ts', import.meta.url)), 'utf8')
  const readme = readFileSync(fileURLToPath(new URL('../../README.md', import.meta.url)), 'utf8')
  expect(readme).toContain(src.trim())
})
