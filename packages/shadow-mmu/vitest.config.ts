import { packageProject } from '../../vitest.shared.ts'

export default packageProject('shadow-mmu')
