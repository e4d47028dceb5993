import type { Thread } from './scheduler.ts'

/**
 * FIFO of blocked threads with a small integer tag each (e.g. read/write), kept in two
 * parallel arrays with a moving head so push/shift allocate nothing in the steady state.
 * Internal to the lock implementations.
 */
export class WaiterQueue {
  private threads: (Thread | undefined)[] = []
  private tags: number[] = []
  private head = 0

  get size(): number {
    return this.threads.length - this.head
  }

  push(t: Thread, tag: number): void {
    this.threads.push(t)
    this.tags.push(tag)
  }

  /** Oldest waiter; call only when size > 0. */
  peekThread(): Thread {
    return this.threads[this.head]!
  }

  /** Tag of the oldest waiter; call only when size > 0. */
  peekTag(): number {
    return this.tags[this.head]!
  }

  shift(): Thread {
    const t = this.threads[this.head]!
    this.threads[this.head] = undefined
    this.head++
    if (this.head === this.threads.length) {
      // Empty: rewind instead of reallocating.
      this.threads.length = 0
      this.tags.length = 0
      this.head = 0
    } else if (this.head >= 64 && this.head * 2 >= this.threads.length) {
      this.threads = this.threads.slice(this.head)
      this.tags = this.tags.slice(this.head)
      this.head = 0
    }
    return t
  }

  /** Waiters oldest first as `label[tag]` strings, for diagnostics. */
  describe(tagName: (tag: number) => string): string {
    const parts: string[] = []
    for (let i = this.head; i < this.threads.length; i++) parts.push(`${this.threads[i]!.label}${tagName(this.tags[i]!)}`)
    return parts.length === 0 ? 'none' : parts.join(', ')
  }
}
