/** The local view, how updates apply to it, and change batches. */

import type { Row } from "./wire.js";

/** One conversation of the view, as the client holds it. */
export interface Conversation {
  readonly id: string;
  readonly maxSequence: number;
  readonly readSequence: number;
  readonly minSequence: number;
  /** server time of the newest allocation (ms since the epoch) */
  readonly timeMs: number;
  /** docs/protocol.md#unread: max − max(read, min − 1) when min > 0, else max − read; never negative */
  readonly unread: number;
  /** the user left with keep_history: max, min and time stay as they were (it can still be
   * marked read); a re-add makes it a member again (false) */
  readonly frozen: boolean;
}

/** A conversation that changed: `old` is null when it joined the view, `new` when it left. */
export interface Change {
  readonly conversationId: string;
  readonly old: Conversation | null;
  readonly new: Conversation | null;
}

/** The changes since the previous batch (coalesced per conversation), and the total. */
export interface ChangeBatch {
  readonly changes: readonly Change[];
  readonly totalUnread: number;
}

export type Pair = [Row | null, Row | null];

/** docs/protocol.md#unread. Messages below `min` (cleared history) are never unread. */
export function unreadOf(max: number, read: number, min: number): number {
  const floor = min > 0 ? Math.max(read, min - 1) : read;
  return max > floor ? max - floor : 0;
}

export function rowUnread(row: Row | null | undefined): number {
  return row ? unreadOf(row.max, row.read, row.min) : 0;
}

export function toConversation(id: string, row: Row | null | undefined): Conversation | null {
  if (!row) return null;
  return {
    id,
    maxSequence: row.max,
    readSequence: row.read,
    minSequence: row.min,
    timeMs: row.timeMs,
    unread: unreadOf(row.max, row.read, row.min),
    frozen: row.membership === 2,
  };
}

function same(a: Row | null, b: Row | null): boolean {
  if (a === null || b === null) return a === b;
  return a.max === b.max && a.read === b.read && a.min === b.min && a.timeMs === b.timeMs &&
    a.membership === b.membership;
}

/** Apply one update to `view` in place; returns what changed (old, new) per conversation.
 *
 * A snapshot (`full`) replaces the view exactly. Otherwise fields equal to 0 leave values as
 * they are, `removed` drops, and seqs only move forward (a late frame cannot roll back).
 * `membership` 2 freezes a row, 1 makes it a member again, 0 keeps what it was (in a snapshot
 * or for a row new to the view: a member). */
export function applyUpdate(
  view: Map<string, Row>,
  convs: Map<string, Row>,
  full: boolean,
  removed: readonly string[],
): Map<string, Pair> {
  const changed = new Map<string, Pair>();
  if (full) {
    for (const [cid, row] of view) {
      if (!convs.has(cid)) {
        changed.set(cid, [row, null]);
        view.delete(cid);
      }
    }
  }
  for (const [cid, seqs] of convs) {
    const old = view.get(cid) ?? null;
    let next: Row;
    if (old === null || full) {
      next = { max: seqs.max, read: seqs.read, min: seqs.min, timeMs: seqs.timeMs, membership: seqs.membership === 2 ? 2 : 0 };
    } else {
      let max = old.max;
      let timeMs = old.timeMs;
      if (seqs.max && seqs.max >= old.max) {
        max = seqs.max;
        timeMs = seqs.timeMs || old.timeMs;
      }
      next = {
        max,
        read: seqs.read > old.read ? seqs.read : old.read,
        min: seqs.min > old.min ? seqs.min : old.min,
        timeMs,
        membership: seqs.membership ? (seqs.membership === 2 ? 2 : 0) : old.membership,
      };
    }
    if (!same(old, next)) {
      view.set(cid, next);
      changed.set(cid, [old, next]);
    }
  }
  for (const cid of removed) {
    const dropped = view.get(cid);
    if (dropped !== undefined) {
      view.delete(cid);
      const prev = changed.get(cid);
      changed.set(cid, [prev ? prev[0] : dropped, null]);
    }
  }
  return changed;
}

/** Async iterator of {@link ChangeBatch}. Pending changes coalesce per conversation (first
 * `old`, latest `new`), so a slow consumer costs memory bounded by the view's size. */
export class ChangeStream implements AsyncIterableIterator<ChangeBatch> {
  private pending = new Map<string, Pair>();
  private wake: (() => void) | null = null;
  private closed = false;

  constructor(
    private readonly total: () => number,
    private readonly failure: () => Error | null,
    private readonly onClose: (s: ChangeStream) => void,
  ) {}

  /** @internal */
  add(changed: Map<string, Pair>): void {
    for (const [cid, [old, next]] of changed) {
      const prev = this.pending.get(cid);
      this.pending.set(cid, [prev ? prev[0] : old, next]);
    }
    this.notify();
  }

  /** @internal */
  notify(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  [Symbol.asyncIterator](): this {
    return this;
  }

  async next(): Promise<IteratorResult<ChangeBatch>> {
    for (;;) {
      if (this.pending.size) {
        const pending = this.pending;
        this.pending = new Map();
        const changes: Change[] = [];
        for (const [cid, [old, next]] of pending) {
          if (!same(old, next)) changes.push({ conversationId: cid, old: toConversation(cid, old), new: toConversation(cid, next) });
        }
        if (changes.length) return { done: false, value: { changes, totalUnread: this.total() } };
        continue;
      }
      const err = this.failure();
      if (err) throw err;
      if (this.closed) return { done: true, value: undefined };
      await new Promise<void>((resolve) => (this.wake = resolve));
    }
  }

  async return(): Promise<IteratorResult<ChangeBatch>> {
    this.close();
    return { done: true, value: undefined };
  }

  close(): void {
    this.closed = true;
    this.onClose(this);
    this.notify();
  }
}
