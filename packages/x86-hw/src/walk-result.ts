import type { AccessKind } from './bits.ts'

/** Walk outcome: the translation completed. */
export const WALK_OK = 0
/** Walk outcome: a #PF for the guest (error code and CR2 in the result). */
export const WALK_PF = 1
/** Walk outcome: #GP(0) — non-canonical address; no walk happened. */
export const WALK_GP = 2
/** Walk outcome: a VM exit (EPT violation / misconfiguration / NPF); details in the exit fields. */
export const WALK_EXIT = 3
export type WalkStatus = 0 | 1 | 2 | 3

/**
 * The result of a translation, as a value. One instance is reused per vCPU so that the hot path
 * allocates nothing; read what you need before the next walk.
 */
export class WalkResult {
  status: WalkStatus = WALK_OK
  /** Final physical address (host-physical under EPT/NPT). */
  pa = 0
  /** Final guest-physical address (equals `pa` without nested paging). */
  gpa = 0
  /** Leaf level: 1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB (0 with paging off). */
  level = 0
  /** Effective rights across levels: R/W (AND), U/S (AND), XD (OR, only with NXE). 1 or 0. */
  rw = 0
  us = 0
  xd = 0
  /** Protection key of the leaf (0 when keys do not apply). */
  pkey = 0
  /** Leaf D bit after the access (1 when the translation may be cached as dirty). */
  dirty = 0
  /** Leaf G bit with CR4.PGE. */
  global = 0
  /** Nested rights of the final page (1 when the combined translation may be used for write / fetch). */
  hostW = 1
  hostX = 1
  /** #PF error code and CR2. */
  errorCode = 0
  cr2 = 0
  /** VM exit: reason (EXIT_*), qualification (EPT) or EXITINFO1 halves (NPF), faulting GPA, linear address. */
  exitReason = 0
  exitQual = 0
  exitInfo1Lo = 0
  exitInfo1Hi = 0
  exitGpa = 0
  exitGla = 0
  /** Leaf level of the nested translation of the final address (3 without nested paging); a combined TLB entry is no larger than both. */
  nestedLevel = 3
  /** Memory references made by this walk (paging-structure reads, guest and nested). */
  memRefs = 0
  /** Locked A/D updates made by this walk (guest and nested). */
  adWrites = 0
  /** Restarts because an A/D compare-and-exchange lost a race. */
  restarts = 0
  /** Guest levels walked (for PSC fills): entry physical addresses and values, index = level. */
  readonly pathPa = new Float64Array(6)
  readonly pathLo = new Uint32Array(6)
  readonly pathHi = new Uint32Array(6)
  /** Guest-physical addresses of the entries walked (equal to pathPa without nested paging). */
  readonly pathGpa = new Float64Array(6)
  /** Linear address being translated and the access kind (inputs recorded for nested exits). */
  la = 0
  kind: AccessKind = 0
}
