import { defineConfig } from 'tsup'
import { packageBuild } from '../../tsup.base.ts'

// The library and the CLI entry (bin/mmusim.js runs dist/bin.js when the sources are absent).
export default defineConfig({ ...packageBuild, entry: ['src/index.ts', 'src/bin.ts'] })
