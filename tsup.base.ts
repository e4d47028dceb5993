import type { Options } from 'tsup'

/** The build every published package uses: ESM + d.ts for Node 20, debug self-checks compiled out. */
export const packageBuild: Options = {
  entry: ['src/index.ts'],
  format: ['esm'],
  dts: true,
  sourcemap: true,
  clean: true,
  target: 'node20',
  platform: 'node',
  define: { __DEBUG__: 'false' },
}
