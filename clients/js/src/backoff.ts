/** Reconnect delays: exponential backoff with full jitter, bounded, reset after a stable link.
 *
 * `delay = uniform(0, min(capMs, baseMs * 2 ** attempt))` (AWS "full jitter"). A connection
 * that stayed up for `stableAfterMs` resets the attempt counter. Same rules as the Python SDK. */

export const BACKOFF_BASE_MS = 500;
export const BACKOFF_CAP_MS = 30_000;
export const BACKOFF_STABLE_AFTER_MS = 10_000;
export const GOAWAY_JITTER_FRACTION = 0.25; // GoAway delay d -> uniform(d, d * 1.25)

export interface BackoffOptions {
  baseMs?: number;
  capMs?: number;
  stableAfterMs?: number;
  /** uniform [0, 1) source; Math.random by default (tests pass a seeded one). */
  random?: () => number;
}

export class Backoff {
  readonly baseMs: number;
  readonly capMs: number;
  readonly stableAfterMs: number;
  readonly random: () => number;
  attempt = 0;
  private openedAt: number | null = null;

  constructor(opts: BackoffOptions = {}) {
    this.baseMs = opts.baseMs ?? BACKOFF_BASE_MS;
    this.capMs = opts.capMs ?? BACKOFF_CAP_MS;
    this.stableAfterMs = opts.stableAfterMs ?? BACKOFF_STABLE_AFTER_MS;
    this.random = opts.random ?? Math.random;
    if (!(this.baseMs > 0) || this.capMs < this.baseMs) throw new RangeError("need 0 < baseMs <= capMs");
  }

  /** Upper bound of the next delay. */
  ceiling(): number {
    return Math.min(this.capMs, this.baseMs * 2 ** Math.min(this.attempt, 62));
  }

  /** The delay before the next attempt; each call counts one more failed attempt. */
  nextDelay(): number {
    const delay = this.random() * this.ceiling();
    this.attempt += 1;
    return delay;
  }

  /** The server asked us to wait `ms`: never less, spread a little. */
  goawayDelay(ms: number): number {
    return ms * (1 + this.random() * GOAWAY_JITTER_FRACTION);
  }

  reset(): void {
    this.attempt = 0;
  }

  connected(now: number): void {
    this.openedAt = now;
  }

  disconnected(now: number): void {
    if (this.openedAt !== null && now - this.openedAt >= this.stableAfterMs) this.reset();
    this.openedAt = null;
  }
}
