import { packageProject } from '../../vitest.shared.ts'

export default packageProject('x86-hw')
