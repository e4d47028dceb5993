import { createReadStream } from 'node:fs'
import { StringDecoder } from 'node:string_decoder'
import { GuestError } from './errors.ts'

/*
 * Reader for the memory traces of valgrind's lackey tool (`valgrind --tool=lackey --trace-mem=yes`).
 *
 * Format, as lackey (lk_main.c) writes it with `"I  %08lx,%lu\n"`, `" L %08lx,%lu\n"`, ... and as
 * checked against valgrind 3.19 on amd64: one access per line, a 3-column prefix, the address in
 * lower-case hex zero-padded to at least 8 digits, a comma, the size in bytes in decimal:
 *
 *     I  0401ab70,3        instruction fetch of a 3-byte instruction ('I' in column 0)
 *      S 1fff000778,8      store   (' S ': the kind letter in column 1)
 *      L 04033ad0,8        load
 *      M 04033e06,1        modify  (load then store of the same bytes, e.g. `inc [mem]`)
 *
 * The log also holds valgrind's own messages, prefixed `==PID==` (user messages: banner, summary)
 * or `--PID--` / `**PID**` (warnings): with `--log-file` they are interleaved with the records.
 * Lackey asserts data sizes are 1..512 bytes (its MAX_DSIZE) and instruction
 * sizes are valgrind's instruction or client-request lengths (amd64: at most 16 and 19 bytes).
 *
 * The reader accepts upper-case hex, any number of address digits up to 16 (a 64-bit address),
 * CRLF line ends, trailing blanks and blank lines; anything else is a corrupt line.
 */

/** Record kind: instruction fetch (`I  addr,size`). */
export const LACKEY_INSTR = 0
/** Record kind: data load (` L addr,size`). */
export const LACKEY_LOAD = 1
/** Record kind: data store (` S addr,size`). */
export const LACKEY_STORE = 2
/** Record kind: data modify (` M addr,size`): a load and a store of the same bytes. */
export const LACKEY_MODIFY = 3

/** One of {@link LACKEY_INSTR}, {@link LACKEY_LOAD}, {@link LACKEY_STORE}, {@link LACKEY_MODIFY}. */
export type LackeyKind = typeof LACKEY_INSTR | typeof LACKEY_LOAD | typeof LACKEY_STORE | typeof LACKEY_MODIFY

/** Largest data access size lackey emits (its `MAX_DSIZE`); larger sizes are corrupt. */
export const LACKEY_MAX_DATA_SIZE = 512
/**
 * Largest instruction size accepted: above valgrind's longest instruction and client-request
 * lengths on every platform (amd64: 16 and 19); larger sizes are corrupt.
 */
export const LACKEY_MAX_INSTR_SIZE = 32
/** Default number of records per yielded {@link LackeyBatch}. */
export const LACKEY_DEFAULT_BATCH_SIZE = 4096

/** One parsed access, as returned by {@link parseLackeyLine}. */
export interface LackeyRecord {
  /** Access kind ({@link LackeyKind}). */
  readonly kind: LackeyKind
  /** Virtual address of the first byte, an exact integer in [0, 2^53 − size]. */
  readonly addr: number
  /** Size in bytes, 1..{@link LACKEY_MAX_DATA_SIZE} (instructions: 1..{@link LACKEY_MAX_INSTR_SIZE}). */
  readonly size: number
}

/**
 * A batch of consecutive records in structure-of-arrays form. Every batch owns fresh typed
 * arrays (nothing is reused after it is yielded), so a consumer may keep batches. All three
 * arrays have length exactly `count`.
 *
 * `sizes` is a Uint16Array, not a Uint8Array, because lackey emits data sizes up to 512 bytes.
 */
export interface LackeyBatch {
  /** Number of records in the batch (>= 1). */
  readonly count: number
  /** Record kinds ({@link LackeyKind}), one per record. */
  readonly kinds: Uint8Array
  /** Addresses, exact integers below 2^53. */
  readonly addrs: Float64Array
  /** Sizes in bytes. */
  readonly sizes: Uint16Array
  /** 1-based line number of the batch's first record in the trace (banner and blank lines count). */
  readonly firstLine: number
}

/**
 * Where a trace comes from: a file path, a Node readable stream, or any (async) iterable of text
 * or byte chunks. Chunks may split lines (and UTF-8 sequences) anywhere.
 */
export type LackeySource =
  | string
  | NodeJS.ReadableStream
  | AsyncIterable<string | Uint8Array>
  | Iterable<string | Uint8Array>

/** Options of {@link readLackeyTrace} and {@link summarizeLackeyTrace}. */
export interface LackeyReadOptions {
  /** Stop after this many records (the rest of the source is not read). Default: no limit. */
  readonly maxRecords?: number
  /**
   * Ignore valgrind message lines (`==PID==`, `--PID--`, `**PID**`). Default true. When false,
   * such a line is a `TRACE_CORRUPT` error: use it for files that must hold records only.
   */
  readonly skipBanner?: boolean
  /** Records per batch, 1..2^24. Default {@link LACKEY_DEFAULT_BATCH_SIZE}. */
  readonly batchSize?: number
}

/** Totals over a whole trace, from {@link summarizeLackeyTrace}. */
export interface LackeySummary {
  /** Number of records. */
  readonly records: number
  /** Instruction fetches. */
  readonly instr: number
  /** Loads. */
  readonly loads: number
  /** Stores. */
  readonly stores: number
  /** Modifies. */
  readonly modifies: number
  /** Distinct 4 KiB pages touched by any byte of any access (an access may straddle two pages). */
  readonly distinctPages4k: number
  /** Lowest byte address accessed. */
  readonly minAddr: number
  /** Highest byte address accessed (`addr + size − 1` of the access reaching furthest). */
  readonly maxAddr: number
}

// ---------------------------------------------------------------------------------------------
// Line parser core: works on a [start, end) range of a larger string so the streaming reader
// never slices a substring per line. Results go to module-level scratch (no allocation).

const SKIP = -1
const E_KIND = -2
const E_ADDR = -3
const E_ADDR_WIDTH = -4
const E_COMMA = -5
const E_SIZE = -6
const E_SIZE_RANGE = -7
const E_BANNER = -8
const E_ADDR_RANGE = -9
const E_LONG = -10

const TWO_POW_49 = 2 ** 49
const TWO_POW_53 = 2 ** 53
/** A line longer than this (without a newline) cannot be a trace line: stop buffering. */
const MAX_LINE_CHARS = 1 << 20

let outAddr = 0
let outSize = 0

/** True for valgrind message lines: `==123==`, `--123--` or `**123**` at the start. */
function isValgrindMessage(text: string, start: number, end: number): boolean {
  const c = text.charCodeAt(start)
  if ((c !== 61 && c !== 45 && c !== 42) || text.charCodeAt(start + 1) !== c) return false
  let p = start + 2
  const digits = p
  while (p < end && text.charCodeAt(p) >= 48 && text.charCodeAt(p) <= 57) p++
  return p > digits && text.charCodeAt(p) === c && text.charCodeAt(p + 1) === c
}

/**
 * Parses text[start, end). Returns the kind (0..3) with the access in outAddr/outSize, SKIP for a
 * blank or (when skipBanner) valgrind message line, or a negative E_* reason.
 */
function parseRange(text: string, start: number, end: number, skipBanner: boolean): number {
  // Trailing blanks: '\r' of CRLF files, stray spaces.
  while (end > start) {
    const c = text.charCodeAt(end - 1)
    if (c === 13 || c === 32 || c === 9) end--
    else break
  }
  if (end === start) return SKIP
  const c0 = text.charCodeAt(start)
  let kind: number
  if (c0 === 73 /* I */) {
    if (text.charCodeAt(start + 1) !== 32 || text.charCodeAt(start + 2) !== 32) return E_KIND
    kind = LACKEY_INSTR
  } else if (c0 === 32) {
    const c1 = text.charCodeAt(start + 1)
    if (c1 === 76 /* L */) kind = LACKEY_LOAD
    else if (c1 === 83 /* S */) kind = LACKEY_STORE
    else if (c1 === 77 /* M */) kind = LACKEY_MODIFY
    else return E_KIND
    if (text.charCodeAt(start + 2) !== 32) return E_KIND
  } else if (isValgrindMessage(text, start, end)) {
    return skipBanner ? SKIP : E_BANNER
  } else {
    return E_KIND
  }

  // Address: hex digits. Stay exact: while addr < 2^49, addr*16 + d < 2^53.
  let p = start + 3
  let addr = 0
  let digits = 0
  let tooBig = false
  for (; p < end; p++) {
    const c = text.charCodeAt(p)
    let d: number
    if (c >= 48 && c <= 57) d = c - 48
    else if (c >= 97 && c <= 102) d = c - 87
    else if (c >= 65 && c <= 70) d = c - 55
    else break
    if (addr >= TWO_POW_49) tooBig = true
    else addr = addr * 16 + d
    digits++
  }
  if (digits === 0 || p >= end || text.charCodeAt(p) !== 44 /* , */) {
    // Tell a bad digit from a missing comma: is there a comma later on the line?
    const comma = text.indexOf(',', p)
    return comma >= 0 && comma < end ? E_ADDR : E_COMMA
  }
  if (digits > 16) return E_ADDR_WIDTH

  // Size: decimal digits up to the end of the line.
  p++
  let size = 0
  const sizeStart = p
  for (; p < end; p++) {
    const c = text.charCodeAt(p)
    if (c < 48 || c > 57) return E_SIZE
    if (p - sizeStart >= 6) {
      outSize = -1 // too many digits: reported as out of range, not as its value
      return E_SIZE_RANGE
    }
    size = size * 10 + (c - 48)
  }
  if (p === sizeStart) return E_SIZE
  if (size === 0 || size > (kind === LACKEY_INSTR ? LACKEY_MAX_INSTR_SIZE : LACKEY_MAX_DATA_SIZE)) {
    outSize = size
    return E_SIZE_RANGE
  }
  // The whole access must fit below 2^53 so that addr + size − 1 is exact too.
  if (tooBig || addr > TWO_POW_53 - size) return E_ADDR_RANGE
  outAddr = addr
  outSize = size
  return kind
}

const KIND_LETTERS = 'ILSM'

function expectedFormat(text: string, start: number): string {
  const c0 = text.charAt(start)
  const c1 = text.charAt(start + 1)
  const k = c0 === 'I' ? 0 : c0 === ' ' ? KIND_LETTERS.indexOf(c1) : -1
  const shape =
    k === 0
      ? `'I  <hex-address>,<size>' (size 1..${LACKEY_MAX_INSTR_SIZE})`
      : k > 0
        ? `' ${KIND_LETTERS.charAt(k)} <hex-address>,<size>' (size 1..${LACKEY_MAX_DATA_SIZE})`
        : `'I  <hex-address>,<size>' or ' L|S|M <hex-address>,<size>'`
  return `expected ${shape} as written by valgrind --tool=lackey --trace-mem=yes`
}

function quoteLine(text: string, start: number, end: number): string {
  const line = text.slice(start, Math.min(end, start + 80))
  return JSON.stringify(end - start > 80 ? `${line}...` : line)
}

function corruptError(where: string, reason: number, text: string, start: number, end: number, lineNo: number): GuestError {
  let why: string
  switch (reason) {
    case E_KIND:
      why = 'unknown record kind (a lackey line starts with "I  ", " L ", " S " or " M ")'
      break
    case E_ADDR:
      why = 'address is not hexadecimal'
      break
    case E_ADDR_WIDTH:
      why = 'address has more than 16 hex digits (more than 64 bits)'
      break
    case E_COMMA:
      why = "missing ',' between address and size"
      break
    case E_SIZE:
      why = 'size is not a decimal number'
      break
    case E_SIZE_RANGE:
      why = `size ${outSize === 0 ? '0' : 'out of range'}`
      break
    case E_BANNER:
      why = 'valgrind message line while skipBanner is false'
      break
    case E_LONG:
      why = `line longer than ${MAX_LINE_CHARS} characters (is this a text file?)`
      break
    default:
      why = 'malformed line'
  }
  const hint =
    reason === E_BANNER
      ? '; pass skipBanner: true to ignore valgrind messages'
      : reason === E_KIND || reason === E_LONG
        ? "; if the program's own output is mixed into the trace, rerun valgrind with --log-file=FILE"
        : ''
  return new GuestError(
    'TRACE_CORRUPT',
    `${where}: line ${lineNo}: ${why} in ${quoteLine(text, start, end)}; ${expectedFormat(text, start)}${hint}`,
    { line: lineNo },
  )
}

function rangeError(where: string, text: string, start: number, end: number, lineNo: number): GuestError {
  return new GuestError(
    'TRACE_UNSUPPORTED',
    `${where}: line ${lineNo}: access ${quoteLine(text, start, end)} reaches beyond 2^53 - 1, which a JavaScript ` +
      'number cannot hold exactly; mmusim models user-space traces (addresses below 2^47) — filter such lines out',
    { line: lineNo },
  )
}

function failLine(where: string, reason: number, text: string, start: number, end: number, lineNo: number): GuestError {
  return reason === E_ADDR_RANGE
    ? rangeError(where, text, start, end, lineNo)
    : corruptError(where, reason, text, start, end, lineNo)
}

/**
 * Parses one line of a lackey trace.
 *
 * @param line the line, without or with its line terminator
 * @param lineNo 1-based line number, used in error messages
 * @param skipBanner whether valgrind message lines (`==PID==` ...) are skipped (default) or corrupt
 * @returns the record, or null for a blank or skipped valgrind message line
 * @throws GuestError `TRACE_CORRUPT` for a malformed line, `TRACE_UNSUPPORTED` for an access
 *   reaching beyond 2^53 − 1; both name `lineNo` and quote the line
 */
export function parseLackeyLine(line: string, lineNo: number, skipBanner = true): LackeyRecord | null {
  let end = line.length
  if (end > 0 && line.charCodeAt(end - 1) === 10) end--
  const r = parseRange(line, 0, end, skipBanner)
  if (r === SKIP) return null
  if (r < 0) throw failLine('lackey trace', r, line, 0, end, lineNo)
  return { kind: r as LackeyKind, addr: outAddr, size: outSize }
}

// ---------------------------------------------------------------------------------------------
// Streaming reader.

function checkOption(name: string, v: number, min: number, max: number): void {
  if (!(Number.isInteger(v) || v === Infinity) || v < min || v > max) {
    throw new GuestError(
      'INVALID_ARGUMENT',
      `readLackeyTrace: option ${name} must be an integer in [${min}, ${max}], got ${String(v)}`,
    )
  }
}

function ioError(where: string, cause: unknown): GuestError {
  const detail = cause instanceof Error ? cause.message : String(cause)
  return new GuestError(
    'TRACE_IO',
    `${where}: cannot read the trace: ${detail}; check the path and permissions of the valgrind --log-file output`,
    { cause },
  )
}

function toAsyncIterator(source: Exclude<LackeySource, string>): AsyncIterator<string | Uint8Array> | Iterator<string | Uint8Array> {
  if (Symbol.asyncIterator in source) return (source as AsyncIterable<string | Uint8Array>)[Symbol.asyncIterator]()
  return (source as Iterable<string | Uint8Array>)[Symbol.iterator]()
}

/**
 * Reads a valgrind lackey `--trace-mem=yes` trace as a stream of {@link LackeyBatch}es, holding
 * at most one source chunk, one partial line and one batch in memory (never the whole file).
 *
 * Batches are fresh arrays each time (see {@link LackeyBatch}). Reading is deterministic: the
 * same trace yields the same batches whatever the chunking of the source. Records before a
 * corrupt line have already been yielded when the error is thrown; to reject a bad file before
 * acting on any of it, validate it first with {@link summarizeLackeyTrace}.
 * The source is closed when the reader finishes, throws, or the consumer stops early.
 *
 * @param source a file path, a Node readable stream, or an (async) iterable of string/byte chunks
 * @param opts `maxRecords`, `skipBanner` (default true), `batchSize` (default 4096)
 * @throws GuestError `TRACE_CORRUPT` (message names the line number, quotes the line and says
 *   what was expected), `TRACE_UNSUPPORTED` (address at or above 2^53), `TRACE_EMPTY` (no
 *   records at all), `TRACE_IO` (read failure, with `cause`), `INVALID_ARGUMENT` (bad option)
 */
export async function* readLackeyTrace(
  source: LackeySource,
  opts: LackeyReadOptions = {},
): AsyncGenerator<LackeyBatch, void, undefined> {
  const batchSize = opts.batchSize ?? LACKEY_DEFAULT_BATCH_SIZE
  const maxRecords = opts.maxRecords ?? Infinity
  const skipBanner = opts.skipBanner ?? true
  checkOption('batchSize', batchSize, 1, 2 ** 24)
  checkOption('maxRecords', maxRecords, 1, Infinity)

  const where = typeof source === 'string' ? `lackey trace '${source}'` : 'lackey trace'
  let it: AsyncIterator<string | Uint8Array> | Iterator<string | Uint8Array>
  try {
    it = toAsyncIterator(typeof source === 'string' ? createReadStream(source, { highWaterMark: 1 << 16 }) : source)
  } catch (e) {
    throw ioError(where, e)
  }

  const decoder = new StringDecoder('utf8')
  let kinds = new Uint8Array(batchSize)
  let addrs = new Float64Array(batchSize)
  let sizes = new Uint16Array(batchSize)
  let n = 0
  let firstLine = 0
  let lineNo = 0
  let records = 0
  let skipped = 0
  let carry = ''
  let done = false

  const take = (): LackeyBatch => {
    const batch: LackeyBatch =
      n === batchSize
        ? { count: n, kinds, addrs, sizes, firstLine }
        : { count: n, kinds: kinds.subarray(0, n), addrs: addrs.subarray(0, n), sizes: sizes.subarray(0, n), firstLine }
    kinds = new Uint8Array(batchSize)
    addrs = new Float64Array(batchSize)
    sizes = new Uint16Array(batchSize)
    n = 0
    return batch
  }

  try {
    while (!done) {
      let text: string
      let r: IteratorResult<string | Uint8Array>
      try {
        r = await it.next()
      } catch (e) {
        throw ioError(where, e)
      }
      if (r.done === true) {
        done = true
        text = carry + decoder.end()
        if (text.length === 0) break
        text += '\n' // the last line may lack its newline
      } else {
        const chunk = typeof r.value === 'string' ? r.value : decoder.write(r.value)
        text = carry.length === 0 ? chunk : carry + chunk
      }

      let pos = 0
      for (;;) {
        const nl = text.indexOf('\n', pos)
        if (nl < 0) break
        lineNo++
        const k = parseRange(text, pos, nl, skipBanner)
        if (k >= 0) {
          if (n === 0) firstLine = lineNo
          kinds[n] = k
          addrs[n] = outAddr
          sizes[n] = outSize
          n++
          records++
          if (records === maxRecords) {
            yield take()
            return
          }
          if (n === batchSize) yield take()
        } else if (k === SKIP) {
          skipped++
        } else {
          throw failLine(where, k, text, pos, nl, lineNo)
        }
        pos = nl + 1
      }
      carry = pos === 0 ? text : text.slice(pos)
      if (carry.length > MAX_LINE_CHARS) {
        throw corruptError(where, E_LONG, carry, 0, carry.length, lineNo + 1)
      }
    }
    if (n > 0) yield take()
    if (records === 0) {
      throw new GuestError(
        'TRACE_EMPTY',
        `${where} holds no access records (${lineNo} line(s), ${skipped} of them blank or valgrind messages); ` +
          "expected lines like 'I  0401ab70,3' — record the trace with valgrind --tool=lackey --trace-mem=yes " +
          '--log-file=FILE (without --trace-mem=yes lackey prints only totals)',
      )
    }
  } finally {
    if (!done) {
      // Stopped early (maxRecords, consumer break, error): release the source (closes files).
      try {
        await it.return?.()
      } catch {
        // The source failing to close does not change the outcome of the read.
      }
    }
  }
}

/**
 * Reads a whole lackey trace (streaming, constant memory apart from the page set) and returns
 * its totals. Also a cheap way to validate a file before replaying it.
 *
 * @param source as for {@link readLackeyTrace}
 * @param opts as for {@link readLackeyTrace}
 * @throws GuestError as {@link readLackeyTrace}
 */
export async function summarizeLackeyTrace(source: LackeySource, opts: LackeyReadOptions = {}): Promise<LackeySummary> {
  const perKind = [0, 0, 0, 0]
  const pages = new Set<number>()
  let records = 0
  let minAddr = Infinity
  let maxAddr = -Infinity
  for await (const b of readLackeyTrace(source, opts)) {
    records += b.count
    for (let i = 0; i < b.count; i++) {
      perKind[b.kinds[i]!]! += 1
      const first = b.addrs[i]!
      const last = first + b.sizes[i]! - 1
      if (first < minAddr) minAddr = first
      if (last > maxAddr) maxAddr = last
      const p0 = Math.floor(first / 4096)
      const p1 = Math.floor(last / 4096)
      pages.add(p0)
      if (p1 !== p0) pages.add(p1)
    }
  }
  return {
    records,
    instr: perKind[LACKEY_INSTR]!,
    loads: perKind[LACKEY_LOAD]!,
    stores: perKind[LACKEY_STORE]!,
    modifies: perKind[LACKEY_MODIFY]!,
    distinctPages4k: pages.size,
    minAddr,
    maxAddr,
  }
}
