/** A module exporting several strategies in `strategies` and no default (pick with `#name`). */
import { defineMmuStrategy, directMapStrategy } from '@mmusim/kvm'

export const strategies = [
  defineMmuStrategy({ ...directMapStrategy, name: 'alpha' }),
  defineMmuStrategy({ ...directMapStrategy, name: 'beta' }),
]
