import { ConcurrencyError } from './errors.ts'

/**
 * Small seeded PRNG: xoshiro128** (Blackman & Vigna) on 32-bit integers, its 128-bit state
 * seeded from one 32-bit seed through splitmix32. Fast, no allocation per draw, and the same
 * seed gives the same sequence on every JS engine (only Math.imul and 32-bit shifts are used).
 */
export class Prng {
  private s0: number
  private s1: number
  private s2: number
  private s3: number

  constructor(seed: number) {
    if (!Number.isInteger(seed)) {
      throw new ConcurrencyError('INVALID_ARGUMENT', `Prng seed must be an integer, got ${seed}; pass e.g. 42.`)
    }
    let x = seed | 0
    const next = (): number => {
      x = (x + 0x9e3779b9) | 0
      let z = x ^ (x >>> 16)
      z = Math.imul(z, 0x21f0aaad)
      z ^= z >>> 15
      z = Math.imul(z, 0x735a2d97)
      return (z ^ (z >>> 15)) >>> 0
    }
    this.s0 = next()
    this.s1 = next()
    this.s2 = next()
    this.s3 = next()
    // The all-zero state is a fixed point of xoshiro; splitmix32 practically never yields it.
    if ((this.s0 | this.s1 | this.s2 | this.s3) === 0) this.s0 = 1
  }

  /** Next uniformly distributed unsigned 32-bit integer. */
  nextU32(): number {
    const s1 = this.s1
    const r = Math.imul(rotl(Math.imul(s1, 5), 7), 9) >>> 0
    const t = s1 << 9
    this.s2 ^= this.s0
    this.s3 ^= this.s1
    this.s1 ^= this.s2
    this.s0 ^= this.s3
    this.s2 ^= t
    this.s3 = rotl(this.s3, 11)
    return r
  }

  /** Uniform integer in [0, n), without modulo bias (rejection sampling); 1 ≤ n ≤ 2^32. */
  nextInt(n: number): number {
    if (!Number.isInteger(n) || n < 1 || n > 0x1_0000_0000) {
      throw new ConcurrencyError('INVALID_ARGUMENT', `Prng.nextInt(n) needs an integer 1 ≤ n ≤ 2^32, got ${n}.`)
    }
    // Reject the top partial bucket so every residue is equally likely.
    const limit = 0x1_0000_0000 - (0x1_0000_0000 % n)
    for (;;) {
      const v = this.nextU32()
      if (v < limit) return v % n
    }
  }

  /** Uniform float in [0, 1) with 32 bits of randomness. */
  nextFloat(): number {
    return this.nextU32() / 0x1_0000_0000
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k))
}
