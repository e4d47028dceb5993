/** A third-party strategy plugin as a .ts file: the kvm example under another name. */
import { defineMmuStrategy, directMapStrategy } from '@mmusim/kvm'

export default defineMmuStrategy({ ...directMapStrategy, name: 'fixture-good', description: 'fixture: the direct-map example as a plugin file' })
