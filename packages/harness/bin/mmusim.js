#!/usr/bin/env node
/* global process, URL */
// The mmusim CLI launcher. Works from a fresh clone without a build: when the TypeScript sources
// are present it runs src/bin.ts under tsx with the `@mmusim/source` export condition (so every
// @mmusim package resolves to its source); a published install runs the built dist/bin.js.
import { spawnSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { createRequire } from 'node:module'
import { fileURLToPath, pathToFileURL } from 'node:url'

const src = fileURLToPath(new URL('../src/bin.ts', import.meta.url))
const dist = fileURLToPath(new URL('../dist/bin.js', import.meta.url))

if (existsSync(src)) {
  const require = createRequire(import.meta.url)
  const tsx = pathToFileURL(require.resolve('tsx')).href
  const r = spawnSync(process.execPath, ['--conditions=@mmusim/source', '--import', tsx, src, ...process.argv.slice(2)], { stdio: 'inherit' })
  if (r.error) throw r.error
  process.exitCode = r.status ?? (r.signal ? 1 : 0)
} else {
  await import(pathToFileURL(dist).href)
}
