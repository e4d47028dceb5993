import { defineProject, type UserWorkspaceConfig } from 'vitest/config'

/** Resolve workspace packages from source (the `@mmusim/source` export condition). */
const conditions = ['@mmusim/source', 'module', 'node', 'import', 'default']

/** The vitest project of one package: source resolution, debug checks on, tests beside the code. */
export function packageProject(name: string): UserWorkspaceConfig {
  return defineProject({
    resolve: { conditions },
    ssr: { resolve: { conditions } },
    define: { __DEBUG__: 'true' },
    test: { name, include: ['src/**/*.test.ts'] },
  })
}
