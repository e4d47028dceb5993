// A strategy plugin written in plain JavaScript (as a published package would ship).
import { directMapStrategy } from '@mmusim/kvm'

export default { ...directMapStrategy, name: 'fixture-js' }
