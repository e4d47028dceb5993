/** A module with no default export and no `strategies`. */
export const somethingElse = 42
export function helper(): number {
  return 1
}
