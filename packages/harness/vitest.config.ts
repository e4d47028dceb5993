import { defineConfig } from 'vitest/config'

export default defineConfig({
  resolve: { conditions: ['@mmusim/source', 'module', 'node', 'import', 'default'] },
  ssr: { resolve: { conditions: ['@mmusim/source', 'module', 'node', 'import', 'default'] } },
  define: { __DEBUG__: 'true' },
  test: { name: 'harness', include: ['src/**/*.test.ts'] },
})
