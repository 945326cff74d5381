"""Reconnect delays: exponential backoff with full jitter, bounded, reset after a stable link.

``delay = uniform(0, min(cap_s, base_s * 2**attempt))`` (AWS "full jitter"): the ceiling
doubles per failed attempt up to ``cap_s``, and every delay is spread over the whole range so a
crowd of clients dropped at once does not come back at once. A connection that stayed up for
``stable_after_s`` resets the attempt counter: the next drop starts again from ``base_s``.
"""

from __future__ import annotations

import random

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
BACKOFF_STABLE_AFTER_S = 10.0
GOAWAY_JITTER_FRACTION = 0.25  # GoAway delay d -> uniform(d, d * 1.25)


class Backoff:
    """Delays for successive reconnect attempts. Not thread-safe; one per client."""

    def __init__(
        self, base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_CAP_S,
        stable_after_s: float = BACKOFF_STABLE_AFTER_S, rng: random.Random | None = None,
    ) -> None:
        if base_s <= 0 or cap_s < base_s:
            raise ValueError("need 0 < base_s <= cap_s")
        self.base_s = base_s
        self.cap_s = cap_s
        self.stable_after_s = stable_after_s
        self.rng = rng or random.Random()
        self.attempt = 0
        self._opened_at: float | None = None

    def ceiling(self) -> float:
        """Upper bound of the next delay."""
        # 2**attempt overflows floats long after the cap applies: clamp the exponent.
        return min(self.cap_s, self.base_s * 2.0 ** min(self.attempt, 62))

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts one more failed attempt."""
        delay = self.rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def goaway_delay(self, reconnect_after_s: float) -> float:
        """The server asked us to wait ``reconnect_after_s``: never less, spread a little."""
        return reconnect_after_s * (1.0 + self.rng.uniform(0.0, GOAWAY_JITTER_FRACTION))

    def reset(self) -> None:
        self.attempt = 0

    def connected(self, now: float) -> None:
        """A connection is up (authenticated) at ``now`` (any monotonic clock)."""
        self._opened_at = now

    def disconnected(self, now: float) -> None:
        """The connection went down at ``now``: reset if it had been stable long enough."""
        if self._opened_at is not None and now - self._opened_at >= self.stable_after_s:
            self.reset()
        self._opened_at = None
