/** Group read counts (docs/protocol.md, "Group read counts"): `readCounts`, `readers` and `watchReadCounts`. */

import { ErrorCode, ServerError } from "./errors.js";

/** `counts[i]`: current members with `read_sequence >= fromSequence + i`. `fromSequence` is
 * the clamped start; `counts` is empty for an empty range; `memberCount` counts current
 * members (frozen ones not). */
export class ReadCounts {
  constructor(
    readonly conversationId: string,
    readonly fromSequence: number,
    readonly memberCount: number,
    readonly counts: readonly number[],
  ) {}

  /** the last seq counted (`fromSequence - 1` when `counts` is empty) */
  get toSequence(): number {
    return this.fromSequence + this.counts.length - 1;
  }

  /** members who have read `seq`, or null outside the range */
  count(seq: number): number | null {
    const i = seq - this.fromSequence;
    return i >= 0 && i < this.counts.length ? this.counts[i]! : null;
  }
}

export const READERS_PAGE_SIZE = 100; // user ids per GetReaders page (the server allows up to 1 000)

export function expectField(field: number, want: number): void {
  if (field !== want) throw new ServerError(ErrorCode.INTERNAL, `unexpected reply (field ${field})`);
}

/** Async iterator of {@link ReadCounts} for one watched conversation. Latest wins: a slow
 * consumer gets the newest update, older ones are dropped. Ends when `close()` is called,
 * when a reconnect's re-watch is refused (the conversation left the view), or with the
 * client. */
export class ReadCountsWatch implements AsyncIterableIterator<ReadCounts> {
  private latest: ReadCounts | null = null;
  private wake: (() => void) | null = null;
  private closed = false;
  error: Error | null = null;

  constructor(
    readonly conversationId: string,
    readonly fromSequence: number,
    private readonly stop: (w: ReadCountsWatch) => Promise<void>,
  ) {}

  /** @internal */
  put(update: ReadCounts): void {
    this.latest = update;
    this.notify();
  }

  /** @internal */
  end(error: Error | null = null): void {
    this.closed = true;
    this.error ??= error;
    this.notify();
  }

  private notify(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  [Symbol.asyncIterator](): this {
    return this;
  }

  async next(): Promise<IteratorResult<ReadCounts>> {
    while (this.latest === null) {
      if (this.closed) {
        if (this.error) throw this.error;
        return { done: true, value: undefined };
      }
      await new Promise<void>((r) => (this.wake = r));
    }
    const value = this.latest;
    this.latest = null;
    return { done: false, value };
  }

  async return(): Promise<IteratorResult<ReadCounts>> {
    await this.close();
    return { done: true, value: undefined };
  }

  /** Stop the watch (`WatchReadCounts{stop}`) and end the iterator. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.notify();
    await this.stop(this);
  }
}
