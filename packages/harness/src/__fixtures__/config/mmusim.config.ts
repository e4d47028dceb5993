import { defineConfig } from '../../config.ts'

export default defineConfig({
  strategies: ['bare-metal', ['../good-strategy.ts', { preSetAccessed: false }]],
  workloads: [{ name: 'cr0wp-toggle', params: { iterations: 8 } }],
  seeds: [1, 2],
  oracle: true,
})
