/** A strategy written against a future contract. */
import { directMapStrategy } from '@mmusim/kvm'

export default { ...directMapStrategy, name: 'from-the-future', apiVersion: 2 }
