import { GuestError } from './errors.ts'

/*
 * Seeded, deterministic PRNG for guest programs and workloads.
 *
 * Generator: sfc32 (Chris Doty-Humphrey's "small fast chaotic" generator, 128-bit state with a
 * 32-bit counter, so no seed can land on a short cycle: the period is at least 2^32). It needs only
 * 32-bit adds, xors and shifts, so it runs on plain numbers with `| 0` / `>>> 0` — no BigInt and
 * no allocation per draw. Seeds and stream ids are hashed with a bijective 32-bit mixer
 * ("lowbias32", Chris Wellons) so nearby seeds give unrelated sequences.
 */

const TWO_POW_32 = 0x1_0000_0000
const TWO_POW_53 = 2 ** 53
const TWO_POW_21 = 0x20_0000

/** Bijective 32-bit avalanche mixer (lowbias32); returns an unsigned 32-bit integer. */
function mix32(x: number): number {
  x ^= x >>> 16
  x = Math.imul(x, 0x7feb352d)
  x ^= x >>> 15
  x = Math.imul(x, 0x846ca68b)
  x ^= x >>> 16
  return x >>> 0
}

/** Low and high 32-bit words of a safe integer, two's complement for negatives (no BigInt). */
function lowWord(v: number): number {
  return v >>> 0
}
function highWord(v: number): number {
  return Math.floor(v / TWO_POW_32) >>> 0
}

function checkSafeInteger(what: string, v: number): void {
  if (!Number.isSafeInteger(v)) {
    throw new GuestError(
      'INVALID_ARGUMENT',
      `Prng: ${what} must be a safe integer (|v| <= 2^53 - 1), got ${String(v)}; pass e.g. 42 or Date.now()`,
    )
  }
}

/**
 * A seeded deterministic pseudo-random number generator (sfc32).
 *
 * The same seed always yields the same sequence on every platform. Use {@link Prng.fork} to give
 * each vCPU (or each sub-task) its own independent stream: a child depends only on the parent's
 * seed lineage and the stream id, never on how many numbers the parent has drawn, so adding a draw
 * in one place does not perturb the other streams.
 *
 * Not cryptographically secure.
 */
export class Prng {
  // sfc32 state: three chaotic words and a counter, all kept as int32.
  private a = 0
  private b = 0
  private c = 0
  private d = 0
  // The two 32-bit key words this generator was seeded from; fork() derives children from them.
  private k0: number
  private k1: number

  /**
   * @param seed any safe integer (32-bit or up to 53-bit); both halves of a 53-bit seed matter.
   * @throws GuestError `INVALID_ARGUMENT` when `seed` is not a safe integer
   */
  constructor(seed: number) {
    checkSafeInteger('seed', seed)
    this.k0 = lowWord(seed)
    this.k1 = highWord(seed)
    this.init()
  }

  /** Builds a generator straight from key words (used by fork; bypasses the seed split). */
  private static fromKey(k0: number, k1: number): Prng {
    // Seeding with 0 first keeps one construction path (and one object shape); fork is rare, so
    // the wasted warm-up is irrelevant.
    const p = new Prng(0)
    p.k0 = k0
    p.k1 = k1
    p.init()
    return p
  }

  private init(): void {
    // Distinct constants per word so (k0, k1) and (k1, k0) seed differently.
    this.a = mix32(this.k0 ^ 0x9e3779b9) | 0
    this.b = mix32(this.k1 ^ 0x85ebca6b) | 0
    this.c = mix32((this.k0 + Math.imul(this.k1, 0x27d4eb2f)) ^ 0xc2b2ae35) | 0
    this.d = 1
    // Warm-up rounds, as sfc reference seeding does, so the first outputs are well mixed.
    for (let i = 0; i < 12; i++) this.nextU32()
  }

  /** Next uniformly distributed unsigned 32-bit integer in [0, 2^32). */
  nextU32(): number {
    const a = this.a
    const b = this.b
    const c = this.c
    const t = (((a + b) | 0) + this.d) | 0
    this.d = (this.d + 1) | 0
    this.a = b ^ (b >>> 9)
    this.b = (c + (c << 3)) | 0
    this.c = (((c << 21) | (c >>> 11)) + t) | 0
    return t >>> 0
  }

  /**
   * Uniform integer in [0, n), without modulo bias (rejection sampling).
   *
   * @param n exclusive bound, an integer with 1 <= n <= 2^53; bounds above 2^32 draw 53-bit values
   * @throws GuestError `INVALID_ARGUMENT` when `n` is out of range or not an integer
   */
  nextInt(n: number): number {
    if (n >= 1 && n <= TWO_POW_32 && Number.isInteger(n)) {
      // Accept only draws below the largest multiple of n that fits in 2^32, so every residue is
      // equally likely. Rejection probability < 1/2; expected draws < 2. (2^32 % n is exact in doubles.)
      const limit = TWO_POW_32 - (TWO_POW_32 % n)
      for (;;) {
        const x = this.nextU32()
        if (x < limit) return x % n
      }
    }
    if (n > TWO_POW_32 && n <= TWO_POW_53 && Number.isInteger(n)) {
      const limit = TWO_POW_53 - (TWO_POW_53 % n)
      for (;;) {
        // 21 high bits * 2^32 + 32 low bits: an exact 53-bit integer.
        const x = (this.nextU32() % TWO_POW_21) * TWO_POW_32 + this.nextU32()
        if (x < limit) return x % n
      }
    }
    throw new GuestError(
      'INVALID_ARGUMENT',
      `Prng.nextInt: bound must be an integer in [1, 2^53], got ${String(n)}`,
    )
  }

  /** Uniform float in [0, 1) with 53 random bits (every representable multiple of 2^-53). */
  nextFloat(): number {
    const hi = this.nextU32() >>> 5 // 27 bits
    const lo = this.nextU32() >>> 6 // 26 bits
    return (hi * 0x400_0000 + lo) / TWO_POW_53
  }

  /**
   * An independent deterministic child generator for stream `stream` (e.g. the vCPU index).
   *
   * `p.fork(s)` depends only on `p`'s seed lineage and `s`: calling it twice gives two generators
   * with identical sequences, different `s` give unrelated sequences, and the parent's own state
   * is neither read nor advanced. Children can fork further.
   *
   * @param stream any safe integer
   * @throws GuestError `INVALID_ARGUMENT` when `stream` is not a safe integer
   */
  fork(stream: number): Prng {
    checkSafeInteger('stream', stream)
    const h = mix32(lowWord(stream) ^ 0x632be5ab) ^ mix32((highWord(stream) + 0x1b873593) | 0)
    const c0 = mix32(this.k0 ^ h ^ 0x5bd1e995)
    const c1 = mix32((this.k1 + Math.imul(h, 0x9e3779b9) + c0) | 0)
    return Prng.fromKey(c0, c1)
  }

  /**
   * Shuffles `arr` in place (Fisher–Yates) and returns it. Works on arrays and typed arrays.
   * Every permutation is equally likely, and the result is a pure function of the generator state.
   */
  shuffle<A extends { length: number; [index: number]: unknown }>(arr: A): A {
    for (let i = arr.length - 1; i > 0; i--) {
      const j = this.nextInt(i + 1)
      const t = arr[i]
      arr[i] = arr[j]
      arr[j] = t
    }
    return arr
  }
}
