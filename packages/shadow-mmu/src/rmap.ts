/**
 * One rmap head (`struct kvm_rmap_head`): the addresses of the present leaf SPTEs that map a
 * gfn/huge frame. As KVM keeps a lone sptep in the head itself and allocates a `pte_list_desc`
 * only for a second one, a single SPTE is stored as its address / 8 (a small integer, so nothing
 * is allocated for it: most gfns have one mapping); several as an array. Anything that reads or
 * edits a head as an array gets it through {@link rmapArrayAt}, which turns a single into one.
 */
export type RmapEntry = number | number[] | undefined

/** The SPTE addresses of an rmap entry, without changing it (audits). */
export function rmapSptes(e: RmapEntry): readonly number[] {
  return e === undefined ? [] : typeof e === 'number' ? [e * 8] : e
}

/** Entry `i` of an rmap level as an array (a single SPTE becomes a one-element array, stored back). */
export function rmapArrayAt(arr: RmapEntry[], i: number): number[] | undefined {
  const h = arr[i]
  if (typeof h !== 'number') return h
  const a = [h * 8]
  arr[i] = a
  return a
}
