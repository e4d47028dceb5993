import { execFileSync } from 'node:child_process'
import { createReadStream, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { fileURLToPath } from 'node:url'
import { afterAll, describe, expect, it } from 'vitest'
import { GuestError } from './errors.ts'
import {
  LACKEY_INSTR,
  LACKEY_LOAD,
  LACKEY_MODIFY,
  LACKEY_STORE,
  type LackeyBatch,
  type LackeyReadOptions,
  type LackeySource,
  parseLackeyLine,
  readLackeyTrace,
  summarizeLackeyTrace,
} from './lackey.ts'
import { Prng } from './prng.ts'

const FIXTURE = fileURLToPath(new URL('./__fixtures__/lackey-true.txt', import.meta.url))
const FIXTURE_TEXT = readFileSync(FIXTURE, 'utf8')
const TMP = mkdtempSync(join(tmpdir(), 'mmusim-lackey-'))
afterAll(() => {
  rmSync(TMP, { recursive: true, force: true })
})

interface Flat {
  kinds: number[]
  addrs: number[]
  sizes: number[]
  firstLines: number[]
  counts: number[]
}

async function readAll(source: LackeySource, opts?: LackeyReadOptions): Promise<Flat> {
  const out: Flat = { kinds: [], addrs: [], sizes: [], firstLines: [], counts: [] }
  for await (const b of readLackeyTrace(source, opts)) {
    expect(b.kinds.length).toBe(b.count)
    expect(b.addrs.length).toBe(b.count)
    expect(b.sizes.length).toBe(b.count)
    out.kinds.push(...b.kinds)
    out.addrs.push(...b.addrs)
    out.sizes.push(...b.sizes)
    out.firstLines.push(b.firstLine)
    out.counts.push(b.count)
  }
  return out
}

/** Independent reference parse (regex + parseInt), used to cross-check the reader. */
function referenceParse(text: string): { kinds: number[]; addrs: number[]; sizes: number[]; lines: number[] } {
  const ref = { kinds: [] as number[], addrs: [] as number[], sizes: [] as number[], lines: [] as number[] }
  text.split('\n').forEach((line, i) => {
    const m = /^(I {2}| L | S | M )([0-9a-fA-F]+),(\d+)$/.exec(line)
    if (m === null) return
    ref.kinds.push('ILSM'.indexOf(m[1]!.trim()))
    ref.addrs.push(parseInt(m[2]!, 16))
    ref.sizes.push(Number(m[3]))
    ref.lines.push(i + 1)
  })
  return ref
}

async function expectGuestError(p: Promise<unknown>, code: string): Promise<GuestError> {
  try {
    await p
  } catch (e) {
    expect(e).toBeInstanceOf(GuestError)
    const ge = e as GuestError
    expect(ge.name).toBe('GuestError')
    expect(ge.code).toBe(code)
    return ge
  }
  throw new Error(`expected a GuestError ${code}, but the read succeeded`)
}

/** The fixture with line `lineNo` (1-based) replaced. */
function withLine(lineNo: number, line: string): string {
  const lines = FIXTURE_TEXT.split('\n')
  lines[lineNo - 1] = line
  return lines.join('\n')
}

function hasValgrind(): boolean {
  try {
    execFileSync('valgrind', ['--version'], { stdio: 'ignore' })
    return true
  } catch {
    return false
  }
}

describe('lackey fixture (real excerpt of valgrind 3.19 lackey on /bin/true)', () => {
  it('summarizes to the pinned counts', async () => {
    expect(await summarizeLackeyTrace(FIXTURE)).toEqual({
      records: 2000,
      instr: 1522,
      loads: 288,
      stores: 170,
      modifies: 20,
      distinctPages4k: 14,
      minAddr: 0x40003a0,
      maxAddr: 0x1fff000a79,
    })
  })

  it('yields batches matching an independent parse, with exact line numbers', async () => {
    const got = await readAll(FIXTURE, { batchSize: 1000 })
    const ref = referenceParse(FIXTURE_TEXT)
    expect(got.counts).toEqual([1000, 1000])
    expect(got.firstLines).toEqual([7, 1007]) // 6 banner lines precede the first record
    expect(got.firstLines).toEqual([ref.lines[0], ref.lines[1000]])
    expect(got.kinds).toEqual(ref.kinds)
    expect(got.addrs).toEqual(ref.addrs)
    expect(got.sizes).toEqual(ref.sizes)
    expect([got.kinds[0], got.addrs[0], got.sizes[0]]).toEqual([LACKEY_INSTR, 0x0401ab70, 3])
    expect(got.addrs.at(-1)).toBe(0x04919407)
  })

  it('default batch size is 4096: the whole fixture is one batch', async () => {
    const got = await readAll(FIXTURE)
    expect(got.counts).toEqual([2000])
    expect(got.firstLines).toEqual([7])
  })

  it('is deterministic and independent of source type and chunking', async () => {
    const base = await readAll(FIXTURE, { batchSize: 333 })
    expect(await readAll(FIXTURE, { batchSize: 333 })).toEqual(base)
    expect(await readAll([FIXTURE_TEXT], { batchSize: 333 })).toEqual(base)
    expect(await readAll(createReadStream(FIXTURE, { highWaterMark: 7 }), { batchSize: 333 })).toEqual(base)
    expect(await readAll(Readable.from([Buffer.from(FIXTURE_TEXT)]), { batchSize: 333 })).toEqual(base)
    // Random byte chunkings (Buffers), split lines anywhere.
    const bytes = Buffer.from(FIXTURE_TEXT)
    for (let s = 0; s < 5; s++) {
      const rng = new Prng(100).fork(s)
      const chunks: Buffer[] = []
      for (let pos = 0; pos < bytes.length; ) {
        const len = 1 + rng.nextInt(200)
        chunks.push(bytes.subarray(pos, pos + len))
        pos += len
      }
      async function* gen(): AsyncGenerator<Buffer> {
        for (const c of chunks) {
          await Promise.resolve()
          yield c
        }
      }
      expect(await readAll(gen(), { batchSize: 333 })).toEqual(base)
    }
  })

  it('hands out fresh arrays per batch (a kept batch is never overwritten)', async () => {
    const kept: { batch: LackeyBatch; copy: number[] }[] = []
    for await (const b of readLackeyTrace(FIXTURE, { batchSize: 100 })) kept.push({ batch: b, copy: Array.from(b.addrs) })
    expect(kept).toHaveLength(20)
    for (const k of kept) expect(Array.from(k.batch.addrs)).toEqual(k.copy)
    expect(new Set(kept.map((k) => k.batch.addrs.buffer)).size).toBe(20)
  })

  it('tolerates CRLF, blank lines and a missing final newline', async () => {
    const base = await readAll(FIXTURE)
    const crlf = await readAll([FIXTURE_TEXT.replace(/\n/g, '\r\n')])
    expect(crlf).toEqual(base)
    const noFinalNewline = await readAll([FIXTURE_TEXT.trimEnd()])
    expect(noFinalNewline.addrs).toEqual(base.addrs)
    const blank = await readAll(['\n\n' + FIXTURE_TEXT + '\n\n'])
    expect(blank.addrs).toEqual(base.addrs)
    expect(blank.firstLines).toEqual([9])
  })

  it('maxRecords stops early and releases the source', async () => {
    let pulled = 0
    let closed = false
    async function* gen(): AsyncGenerator<string> {
      try {
        for (const line of FIXTURE_TEXT.split('\n')) {
          pulled++
          await Promise.resolve()
          yield line + '\n'
        }
      } finally {
        closed = true
      }
    }
    const got = await readAll(gen(), { maxRecords: 10, batchSize: 4 })
    expect(got.counts).toEqual([4, 4, 2])
    expect(got.addrs).toEqual(referenceParse(FIXTURE_TEXT).addrs.slice(0, 10))
    expect(pulled).toBe(16) // 6 banner lines + 10 records, nothing more
    expect(closed).toBe(true)
  })

  it('skipBanner: false rejects valgrind message lines, naming line 1', async () => {
    const e = await expectGuestError(readAll(FIXTURE, { skipBanner: false }), 'TRACE_CORRUPT')
    expect(e.line).toBe(1)
    expect(e.message).toContain('line 1:')
    expect(e.message).toContain('==5144== Lackey')
    expect(e.message).toContain('skipBanner: true')
    // A records-only file is fine with skipBanner: false.
    const recordsOnly = FIXTURE_TEXT.split('\n').filter((l) => !l.startsWith('==')).join('\n')
    expect((await readAll([recordsOnly], { skipBanner: false })).kinds).toHaveLength(2000)
  })
})

describe.skipIf(!hasValgrind())('lackey on a trace recorded on this machine', () => {
  it('parses a fresh valgrind --tool=lackey --trace-mem=yes /bin/true log completely', async () => {
    const log = join(TMP, 'true.lackey')
    // /bin/true takes well under a second under lackey (~170k lines); `ls` is ~5x bigger.
    execFileSync('valgrind', ['--tool=lackey', '--trace-mem=yes', `--log-file=${log}`, '/bin/true'], {
      stdio: 'ignore',
      timeout: 60_000,
    })
    const text = readFileSync(log, 'utf8')
    const lines = text.split('\n')
    const recordLines = lines.filter((l) => l.length > 0 && !/^==\d+==/.test(l))
    const banner = lines.filter((l) => /^==\d+==/.test(l))
    expect(banner.length).toBeGreaterThan(5)
    expect(recordLines.length).toBeGreaterThan(10_000)

    const s = await summarizeLackeyTrace(log)
    expect(s.records).toBe(recordLines.length)
    expect(s.instr + s.loads + s.stores + s.modifies).toBe(s.records)
    expect(s.instr).toBe(recordLines.filter((l) => l.startsWith('I  ')).length)
    expect(s.loads).toBe(recordLines.filter((l) => l.startsWith(' L ')).length)
    expect(s.stores).toBe(recordLines.filter((l) => l.startsWith(' S ')).length)
    expect(s.modifies).toBe(recordLines.filter((l) => l.startsWith(' M ')).length)
    // lackey's closing summary line "guest instrs: N" counts the same instructions we read.
    const guestInstrs = /guest instrs:\s+([\d,]+)/.exec(text)
    if (guestInstrs !== null) expect(s.instr).toBe(Number(guestInstrs[1]!.replace(/,/g, '')))

    let first = true
    let nonInteger = 0
    let total = 0
    for await (const b of readLackeyTrace(log)) {
      if (first) {
        expect(b.kinds[0]).toBe(LACKEY_INSTR)
        first = false
      }
      for (let i = 0; i < b.count; i++) {
        const a = b.addrs[i]!
        if (!(Number.isSafeInteger(a) && a >= 0)) nonInteger++
      }
      total += b.count
    }
    expect(nonInteger).toBe(0)
    expect(total).toBe(recordLines.length)
  }, 60_000)
})

describe('corrupt traces', () => {
  const cases: [name: string, line: string, detail: RegExp][] = [
    ['bad kind letter', ' X 0401ab70,8', /unknown record kind/],
    ['lower-case kind letter', ' l 0401ab70,8', /unknown record kind/],
    ['program output mixed in', 'hello, world', /--log-file/],
    ['bad hex', ' L 04zz1b70,8', /not hexadecimal/],
    ['missing comma', ' L 0401ab70 8', /missing ','/],
    ['size 0', ' S 0401ab70,0', /size 0/],
    ['data size above 512', ' L 0401ab70,513', /size out of range/],
    ['absurdly long size', ' L 0401ab70,0000000008', /size out of range/],
    ['instruction size above 32', 'I  0401ab70,33', /size out of range/],
    ['non-decimal size', ' M 0401ab70,8x', /not a decimal/],
    ['empty size', ' M 0401ab70,', /not a decimal/],
    ['empty address', ' L ,8', /not hexadecimal/],
    ['more than 64-bit address', ' L 10401ab7000000000,8', /more than 16 hex digits/],
    ['wrong column layout', 'I 0401ab70,3', /unknown record kind/],
  ]
  for (const [name, line, detail] of cases) {
    it(`${name}: TRACE_CORRUPT naming line 1500, quoting it, saying what was expected`, async () => {
      const e = await expectGuestError(summarizeLackeyTrace([withLine(1500, line)]), 'TRACE_CORRUPT')
      expect(e.line).toBe(1500)
      expect(e.message).toContain('line 1500:')
      expect(e.message).toContain(JSON.stringify(line))
      expect(e.message).toContain('expected')
      expect(e.message).toContain('valgrind --tool=lackey --trace-mem=yes')
      expect(e.message).toMatch(detail)
    })
  }

  it('names the kind-specific format when the kind letter is known', async () => {
    const e = await expectGuestError(summarizeLackeyTrace([withLine(20, ' L 0401ab70,0')]), 'TRACE_CORRUPT')
    expect(e.message).toContain("expected ' L <hex-address>,<size>' (size 1..512)")
  })

  it('truncates a long offending line to 80 characters in the message', async () => {
    const long = ' L ' + 'q'.repeat(500)
    const e = await expectGuestError(summarizeLackeyTrace([withLine(9, long)]), 'TRACE_CORRUPT')
    expect(e.message).toContain(JSON.stringify(long.slice(0, 80) + '...'))
    expect(e.message.length).toBeLessThan(500)
  })

  it('records before the corrupt line are yielded first (streaming), then the error', async () => {
    const seen: number[] = []
    const err = await expectGuestError(
      (async () => {
        for await (const b of readLackeyTrace([withLine(1500, ' L nope')], { batchSize: 100 })) seen.push(b.count)
      })(),
      'TRACE_CORRUPT',
    )
    expect(err.line).toBe(1500)
    expect(seen.reduce((a, c) => a + c, 0)).toBe(1400) // lines 7..1499 hold 1493 records: 14 full batches
  })

  it('a line of over 1 MiB without a newline is corrupt, not buffered forever', async () => {
    const big = 'I'.repeat(1 << 16)
    async function* gen(): AsyncGenerator<string> {
      yield 'I  0401ab70,3\n'
      for (let i = 0; i < 40; i++) {
        await Promise.resolve()
        yield big
      }
    }
    const e = await expectGuestError(readAll(gen()), 'TRACE_CORRUPT')
    expect(e.line).toBe(2)
    expect(e.message).toMatch(/longer than/)
  })
})

describe('addresses and parseLackeyLine', () => {
  it('parses each kind, upper- and lower-case hex, CRLF and a trailing newline', () => {
    expect(parseLackeyLine('I  0401ab70,3', 1)).toEqual({ kind: LACKEY_INSTR, addr: 0x401ab70, size: 3 })
    expect(parseLackeyLine(' L 0043A000,8\n', 2)).toEqual({ kind: LACKEY_LOAD, addr: 0x43a000, size: 8 })
    expect(parseLackeyLine(' S 7FF000A48,8\r\n', 3)).toEqual({ kind: LACKEY_STORE, addr: 0x7ff000a48, size: 8 })
    expect(parseLackeyLine(' M 0421c7f0,4', 4)).toEqual({ kind: LACKEY_MODIFY, addr: 0x421c7f0, size: 4 })
    expect(parseLackeyLine(' S 00000000,512', 5)).toEqual({ kind: LACKEY_STORE, addr: 0, size: 512 })
  })

  it('returns null for blank and valgrind message lines unless skipBanner is false', () => {
    expect(parseLackeyLine('', 1)).toBeNull()
    expect(parseLackeyLine('  \r', 1)).toBeNull()
    expect(parseLackeyLine('==5144== Command: /bin/true', 1)).toBeNull()
    expect(parseLackeyLine('--5144-- WARNING: unhandled syscall', 1)).toBeNull()
    expect(parseLackeyLine('**5144** something', 1)).toBeNull()
    expect(() => parseLackeyLine('==5144== Command: /bin/true', 4, false)).toThrow(/line 4:/)
    expect(() => parseLackeyLine('==x== not a pid', 4)).toThrow(GuestError)
  })

  it('keeps addresses exact up to 2^53 - size and rejects beyond with TRACE_UNSUPPORTED', async () => {
    // 0x7ffffffff000: top of the 47-bit user address space.
    expect(parseLackeyLine(' L 7ffffffff000,8', 1)?.addr).toBe(0x7ffffffff000)
    expect(parseLackeyLine(' L 001fffffffffffff,1', 1)?.addr).toBe(2 ** 53 - 1)
    expect(parseLackeyLine(' L 1ffffffffffff8,8', 1)?.addr).toBe(2 ** 53 - 8)
    for (const line of [' L 1ffffffffffff9,8', ' L 20000000000000,1', ' S ffffffffffffffff,8', 'I  ffffffffff600000,4']) {
      let err: unknown
      try {
        parseLackeyLine(line, 77)
      } catch (e) {
        err = e
      }
      expect(err).toBeInstanceOf(GuestError)
      expect((err as GuestError).code).toBe('TRACE_UNSUPPORTED')
      expect((err as GuestError).line).toBe(77)
      expect((err as GuestError).message).toContain('line 77:')
    }
    const e = await expectGuestError(summarizeLackeyTrace([withLine(300, ' L ffffffffff600000,8')]), 'TRACE_UNSUPPORTED')
    expect(e.message).toContain('line 300:')
  })

  it('summary counts pages touched by straddling accesses and the last byte as maxAddr', async () => {
    const s = await summarizeLackeyTrace(['I  00000ffe,4\n L 00002000,8\n M 00002004,2\n S 00002ff8,8\n'])
    expect(s).toEqual({
      records: 4,
      instr: 1,
      loads: 1,
      stores: 1,
      modifies: 1,
      distinctPages4k: 3,
      minAddr: 0xffe,
      maxAddr: 0x2fff,
    })
  })
})

describe('empty traces, I/O errors and options', () => {
  it('TRACE_EMPTY for no records: empty input, banner only, empty file', async () => {
    await expectGuestError(readAll(['']), 'TRACE_EMPTY')
    await expectGuestError(readAll([]), 'TRACE_EMPTY')
    const bannerOnly = FIXTURE_TEXT.split('\n').slice(0, 6).join('\n')
    const e = await expectGuestError(readAll([bannerOnly]), 'TRACE_EMPTY')
    expect(e.message).toContain('6 line(s)')
    expect(e.message).toContain('--trace-mem=yes')
    const empty = join(TMP, 'empty.txt')
    writeFileSync(empty, '')
    const f = await expectGuestError(summarizeLackeyTrace(empty), 'TRACE_EMPTY')
    expect(f.message).toContain(empty)
  })

  it('TRACE_IO for a missing file (with cause) and for a failing stream', async () => {
    const missing = join(TMP, 'does-not-exist.txt')
    const e = await expectGuestError(readAll(missing), 'TRACE_IO')
    expect(e.message).toContain(missing)
    expect(e.message).toContain('ENOENT')
    expect(e.cause).toBeInstanceOf(Error)

    async function* failing(): AsyncGenerator<string> {
      yield 'I  0401ab70,3\n'
      await Promise.resolve()
      throw new Error('disk on fire')
    }
    const f = await expectGuestError(readAll(failing()), 'TRACE_IO')
    expect(f.message).toContain('disk on fire')
  })

  it('rejects bad options with INVALID_ARGUMENT', async () => {
    await expectGuestError(readAll(FIXTURE, { batchSize: 0 }), 'INVALID_ARGUMENT')
    await expectGuestError(readAll(FIXTURE, { batchSize: 1.5 }), 'INVALID_ARGUMENT')
    await expectGuestError(readAll(FIXTURE, { maxRecords: 0 }), 'INVALID_ARGUMENT')
    await expectGuestError(readAll(FIXTURE, { maxRecords: Number.NaN }), 'INVALID_ARGUMENT')
  })
})

describe('streaming', () => {
  it('yields batches long before a 2e6-line source is exhausted, and reads all of it', async () => {
    const linesPerChunk = 1000
    const chunks = 2000 // 2e6 lines
    const rows: string[] = []
    for (let i = 0; i < linesPerChunk; i++) {
      rows.push(i % 4 === 0 ? `I  ${(0x400000 + i * 4).toString(16).padStart(8, '0')},4` : ` L ${(0x7ff000000 + i * 8).toString(16)},8`)
    }
    const chunkText = rows.join('\n') + '\n'
    let pulled = 0
    async function* source(): AsyncGenerator<string> {
      for (let c = 0; c < chunks; c++) {
        pulled++
        await Promise.resolve() // a real stream delivers chunks asynchronously
        yield chunkText
      }
    }
    let pulledAtFirstBatch = -1
    let batches = 0
    let records = 0
    let instr = 0
    let lastFirstLine = 0
    for await (const b of readLackeyTrace(source())) {
      if (pulledAtFirstBatch < 0) pulledAtFirstBatch = pulled
      batches++
      records += b.count
      expect(b.firstLine).toBe(lastFirstLine + (batches === 1 ? 1 : 4096))
      lastFirstLine = b.firstLine
      for (let i = 0; i < b.count; i++) if (b.kinds[i] === LACKEY_INSTR) instr++
    }
    // 4096 records need 5 chunks of 1000 lines; the generator is pulled one chunk at a time.
    expect(pulledAtFirstBatch).toBe(5)
    expect(pulled).toBe(chunks)
    expect(records).toBe(2_000_000)
    expect(instr).toBe(500_000)
    expect(batches).toBe(Math.ceil(2_000_000 / 4096))
  }, 30_000)
})
