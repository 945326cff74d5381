"""The Redis store's change delivery (a mixin of :class:`~seqactor.store.redis.RedisStore`):
the Pub/Sub subscriber, the ordered hand-over to the listeners, resynchronization.

Each node receives every change (its own and others') from Pub/Sub — a batch's changes in
one message — and its own also from the script's reply, and hands them to the listeners
strictly in position order, each once
(:class:`~seqactor.store._redis_events.ReorderBuffer`; skips fill holes). A hole that stays
open ``gap_timeout`` (longer than the op deadline: the missing position can no longer commit)
is closed with a ``StoreReset``. When the subscription drops (or the keep-alive gives up on a
silent one), the node re-subscribes, reads the position counter, waits out the op deadline
(cluster), and publishes ``StoreReset`` — the hub reloads online views from Redis. An epoch
note (``store init --force``) or a vanished epoch (data loss) is followed here too.
"""

from __future__ import annotations

import heapq
import logging
from typing import TYPE_CHECKING, Any

import trio
from coredis.exceptions import RedisError

from seqactor.store._base import Change, StoreReset, Unavailable
from seqactor.store._redis_events import ReorderBuffer, last_position, parse_change, records
from seqactor.store._redis_keys import KeyLayout
from seqactor.store._redis_sub import SubscriptionLost, subscribe

log = logging.getLogger("seqactor.store.redis")

RECONNECT_MIN_S = 0.05  # Pub/Sub reconnect back-off: first delay
RECONNECT_MAX_S = 1.0  # ... and the longest
SEEN_BATCHES = 16  # the last Pub/Sub messages kept parsed for their batch's reply
MAINTENANCE_TICK_S = 0.1  # the maintenance task looks at holes and the epoch this often
LOST_DATA_RECHECK_S = 1.0  # while the epoch is missing, look for it again this often


class OrderedDelivery:
    """Subscriber, reorder buffer and resync; :class:`RedisStore` provides the rest."""

    keys: KeyLayout
    epoch: bytes
    nodes: list[tuple[str, int]]
    channel: bytes
    cluster: bool
    data_lost: bool
    gap_timeout_s: float
    _buf: ReorderBuffer
    _client: Any
    _floor: Any
    _username: str | None
    _password: str | None
    _closed: bool
    _resyncing: int
    _sub_down: bool
    _subscribed: trio.Event
    _wake: trio.Event
    _epoch_note: bool
    _waiters: list[tuple[int, int, trio.Event]]
    _waiter_ids: int
    _seen_batches: dict[bytes, list[tuple[int, Change]]]

    if TYPE_CHECKING:  # provided by Store / RedisStore (no runtime stubs: they would shadow)

        def _publish(self, change: Change) -> None: ...

        async def _read_position(self) -> tuple[int, float]: ...

    async def _subscriber(self) -> None:
        first = True
        delay = RECONNECT_MIN_S
        node = 0
        while True:
            host, port = self.nodes[node % len(self.nodes)]
            try:
                async with subscribe(host, port, self.channel, self._username,
                                     self._password) as conn:
                    if first:
                        first = False
                        self._subscribed.set()
                    else:
                        await self._resync("the Pub/Sub connection came back")
                    delay = RECONNECT_MIN_S
                    await conn.run(self._on_payload)
            except (SubscriptionLost, RedisError, OSError, Unavailable) as exc:
                if not first:
                    self._sub_down = True  # until the resync: changes may have been missed
                level = logging.WARNING if delay == RECONNECT_MIN_S else logging.DEBUG
                log.log(level, "redis store: subscription to %s:%d lost (%s); reconnecting",
                        host, port, exc)
            node += 1
            await trio.sleep(delay)
            delay = min(RECONNECT_MAX_S, delay * 2)

    async def _resync(self, why: str) -> None:
        """Jump to the current position and tell listeners to reload (StoreReset)."""
        self._resyncing += 1
        try:
            c = self._client
            if c is None:
                raise Unavailable("the store is closed")
            try:
                epoch = await c.get(self.keys.epoch)
                if epoch is None:
                    self._report_lost()
                else:
                    if bytes(epoch) != self.epoch:
                        log.warning("redis store: new epoch %s (store init --force); switching",
                                    bytes(epoch).hex())
                        self.epoch = bytes(epoch)
                        # positions never go back: tokens of this node's clients stay usable
                        await self._floor(keys=[self.keys.pos], args=[self.position])
                    if self.data_lost:
                        log.warning("redis store: the epoch is back; accepting writes again")
                    self.data_lost = False
                pos, wait_s = await self._read_position()
                if epoch is not None and pos < self.position:
                    # a replica that lacked the last writes was promoted: positions never go
                    # back (a reused position would be dropped as already delivered)
                    log.warning("redis store: the position counter went back from %d to %d "
                                "(failover to a replica without the last writes?); raising it",
                                self.position, pos)
                    await self._floor(keys=[self.keys.pos], args=[self.position])
            except (RedisError, OSError) as exc:
                raise Unavailable(f"Redis: {exc}") from None
            await trio.sleep(wait_s)
        finally:
            self._resyncing -= 1
        self._sub_down = False
        # everything up to ``pos`` is committed (or never will be) and readable in Redis
        self._jump_to(pos, drain=False)
        log.warning("redis store: %s; listeners reload from Redis (position %d)",
                    why, self.position)
        self._deliver(StoreReset(self.position))
        if not self._held():
            self._drain()

    @property
    def position(self) -> int:
        """The last position handed to the listeners (every change up to it is in Redis)."""
        return self._buf.position

    @position.setter
    def position(self, value: int) -> None:
        self._buf.jump_to(value)

    def _jump_to(self, pos: int, drain: bool = True) -> None:
        """Positions up to ``pos`` need no delivery (the caller reloads them from Redis)."""
        self._buf.jump_to(pos)
        if drain and not self._held():
            self._drain()

    def _held(self) -> bool:
        return self._sub_down or self._resyncing > 0

    def _report_lost(self) -> None:
        if not self.data_lost:
            log.error(
                "REDIS DATA LOST: the epoch key %s is gone (Redis restarted empty or was "
                "flushed). Refusing writes so seqs do not start again from 1. Restore the data, "
                "or run `seqactor store init --force --store URL` to start a new epoch.",
                self.keys.epoch,
            )
        self.data_lost = True

    async def _maintenance(self) -> None:
        """Closes holes that stay open too long; follows epoch changes."""
        last_lost_check = 0.0
        while True:
            with trio.move_on_after(MAINTENANCE_TICK_S):
                await self._wake.wait()
            self._wake = trio.Event()
            if self.data_lost and trio.current_time() - last_lost_check > LOST_DATA_RECHECK_S:
                last_lost_check = trio.current_time()
                self._epoch_note = True
            if self._epoch_note:
                self._epoch_note = False
                try:
                    epoch = await self._client.get(self.keys.epoch)
                except (RedisError, OSError):
                    epoch = None
                if epoch is not None and (bytes(epoch) != self.epoch or self.data_lost):
                    try:
                        await self._resync("the store was re-initialized (new epoch)")
                    except Unavailable as exc:
                        log.warning("redis store: resync failed: %s", exc)
            gap_since = self._buf.gap_since
            if (
                gap_since is not None
                and not self._held()
                and trio.current_time() - gap_since > self.gap_timeout_s
            ):
                hole = self._buf.missing()
                if hole is not None:
                    log.warning("redis store: positions %d..%d never arrived; resync", *hole)
                    self._jump_to(hole[1], drain=False)
                    self._deliver(StoreReset(self.position))
                self._buf.gap_since = None
                self._drain()

    # ------------------------------------------------------------------ ordered delivery

    def _on_payload(self, message: bytes) -> None:
        pos = last_position(message)
        if pos is not None and pos <= self._buf.position:
            return  # already delivered (e.g. this node's own changes, from the reply)
        add = self._buf.add
        fresh = False
        parsed: list[tuple[int, Change]] | None = []
        for payload in records(message):
            try:
                kind, pos, change = parse_change(payload)
            except ValueError:
                log.error("redis store: malformed event %r", payload[:200])
                parsed = None
                continue
            if change is None:
                parsed = None
                if kind == "E":
                    self._epoch_note = True
                    self._wake.set()
                    continue
            elif parsed is not None:
                parsed.append((pos, change))
            fresh = add(pos, change) or fresh
        if parsed:
            # this node's own batch, when Pub/Sub beat the reply: its reply takes these
            seen = self._seen_batches
            if len(seen) >= SEEN_BATCHES:
                del seen[next(iter(seen))]
            seen[message] = parsed
        if fresh and not self._held():
            self._drain()

    def _receive(self, pos: int, change: Change | None) -> None:
        if self._buf.add(pos, change) and not self._held():
            self._drain()

    def _drain(self) -> None:
        buf = self._buf
        had_gap = buf.gap_since is not None
        for change in buf.ready(trio.current_time()):
            self._deliver(change)
        if buf.gap_since is not None and not had_gap:
            self._wake.set()  # the maintenance task times the hole
        waiters = self._waiters
        while waiters and waiters[0][0] <= self.position:
            heapq.heappop(waiters)[2].set()

    def _deliver(self, change: Change) -> None:
        self._publish(change)

    async def _delivered(self, pos: int) -> None:
        """Wait until ``pos`` was handed to the listeners (bounded by the gap timeout)."""
        if pos <= self.position or self._closed:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        ev = trio.Event()
        self._waiter_ids += 1
        heapq.heappush(self._waiters, (pos, self._waiter_ids, ev))
        with trio.move_on_after(self.gap_timeout_s * 2 + 1):
            await ev.wait()

