import { defineConfig } from 'vitest/config'
import { SummaryReporter } from './vitest.summary-reporter.ts'

export default defineConfig({
  test: {
    projects: ['packages/*', 'apps/*'],
    reporters: ['default', new SummaryReporter()],
    passWithNoTests: true,
  },
})
