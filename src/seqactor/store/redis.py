"""``redis://host:port/db`` and ``redis+cluster://host:port,host:port,...``: several seqactor
nodes share one state (docs/protocol.md, "Stores"). docs/deployment.md explains the design for operators.

The parts: :mod:`._redis_keys` (key layout, hash slots, the URL), :mod:`._redis_events` (the
published payloads and the reorder buffer), :mod:`._redis_lua` with ``lua/*.lua`` (the
scripts), :mod:`._redis_cluster` (the cluster write steps), :mod:`._redis_delivery` (the
subscriber, ordered delivery, resync), :mod:`._redis_sub` (the Pub/Sub connection); this
module is the store that joins them: lifecycle, batching, writes, reads, operator actions.

**Standalone.** One Lua script call per *batch* of operations: while calls are in flight,
concurrent writes on this node gather (like SQLite's group commit) and go in one call; each
operation in it is atomic on its own — takes the position (the counter is read and written
once per call), changes the conversation,
the members, the users' view indexes and tombstones — so positions are gap-free; the call
PUBLISHes the batch's changes in one message, in position order, and answers with one string
(a record per op). Each caller's ``await`` returns with its own operation's result. The batch
calls go on the store's own pipelined connection (:class:`~._redis_sub.Pipelined`: hiredis
packs and parses; a long queue goes as two batches back to back, so Redis runs one while
this node takes the other's replies); reads and operator actions use coredis.

**Cluster.** See :mod:`._redis_cluster`: batches with per-slot script calls, positions of a
batch reserved in one sequencer call, skips for positions that do not commit.

**Replicas.** With ``?wait_replicas=N`` a batch's script call is followed, on the same
connection in the same pipeline, by ``WAIT N timeout``: its writes are acknowledged only once
N replicas have them (fewer in time: ``Unavailable``; the writes may still survive), so a
replica promoted after the master died cannot hand out an acknowledged seq again. On a
cluster the same holds per master: for the batched ops (allocations, MarkReads, SetMins) after
each master's share, for membership changes after each step that writes (the user-slot steps
and the commit), each on the direct connection to the step's master.

**Delivery.** See :mod:`._redis_delivery`: every change reaches the listeners once, in
position order, from the script's reply or Pub/Sub; holes and lost subscriptions end in a
``StoreReset`` after which listeners reload from Redis.

**Data-loss guard.** Every write checks the epoch key. Missing (Redis came back empty): the
write is refused with ``Unavailable`` and logged loudly. A different epoch (``seqactor store
init --force``): the node switches to it, publishes ``StoreReset`` and retries.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import coredis
import trio
from coredis.exceptions import RedisError
from coredis.retry import NoRetryPolicy

from seqactor.store import _redis_lua as lua
from seqactor.store._base import (
    EPOCH_BYTES,
    Allocated,
    Change,
    ConversationState,
    InvalidArgument,
    MemberReads,
    MembersAdded,
    MembersRemoved,
    MinChanged,
    NotFound,
    NotMember,
    ReadMarked,
    Store,
    TooLarge,
    Unavailable,
    ViewData,
    check_uint64,
    check_user_ids,
    normalize_count,
    validate_id,
    wall_clock_ms,
)
from seqactor.store._redis_cluster import (
    BATCHED_CLUSTER_OPS,
    COMMAND_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    MAX_BATCH_OPS,
    ClusterWrites,
    Job,
    Retry,
)
from seqactor.store._redis_delivery import RECONNECT_MAX_S, RECONNECT_MIN_S, OrderedDelivery
from seqactor.store._redis_events import (
    EPOCH_NOTE,
    ReorderBuffer,
    parse_change,
    split_replies,
    to_int,
)
from seqactor.store._redis_keys import DEFAULT_PREFIX, KeyLayout, RedisURL, parse_url
from seqactor.store._redis_sub import Pipelined, RespError, SubscriptionLost, connect

log = logging.getLogger("seqactor.store.redis")

__all__ = ["DEFAULT_PREFIX", "RedisStore", "RedisURL", "init_store", "parse_url"]

DEFAULT_MAX_TOMBSTONES_PER_USER = 10_000
DEFAULT_OP_DEADLINE_S = 0.5  # cluster: a position must commit this soon after it was handed out
DEFAULT_GAP_TIMEOUT_S = 1.5  # a hole in the positions open this long: StoreReset
MAX_INFLIGHT_BATCHES = 4  # standalone: script calls in flight; more ops wait and batch up
SPLIT_BATCH_OPS = 32  # standalone: a queue of at least twice this goes as two batches
MASTER_REQUESTS = 64  # cluster: pending requests to open a master connection

# Group read counts (docs/protocol.md "Group read counts"): a conversation's state and all its
# members in one atomic step (both keys carry the conversation's hash tag: one slot), so the
# member rows are exactly those as of the conversation's last change position ``lp``.
_MEMBERS_LUA = """
local v = redis.call('HMGET', KEYS[1], 'mx', 'mn', 'lp', 'ps')
if not v[4] then return {} end
return {v[1] or '0', v[2] or '0', v[3] or '0', redis.call('HGETALL', KEYS[2])}
"""


class RedisStore(OrderedDelivery, ClusterWrites, Store):
    """The Store on Redis or Redis Cluster. See the module docstring for the design.

    ``url``: see :func:`~seqactor.store._redis_keys.parse_url` (query: ``prefix``,
    ``op_deadline_ms``, ``gap_timeout_ms``, ``wait_replicas``, ``wait_timeout_ms``); a bad URL
    raises InvalidArgument. Keyword arguments:
    ``max_view_conversations``, ``max_conversation_members``, ``max_tombstones`` (per user,
    default 10 000), ``op_deadline_s`` (cluster, default 0.5 s), ``gap_timeout_s`` (default
    1.5 s, longer than the op deadline). Writes raise Unavailable when Redis fails, lost its
    data (the epoch is gone) or, with ``wait_replicas``, too few replicas confirmed in time;
    the other errors are the Store contract's.
    """

    def __init__(
        self,
        url: str,
        *,
        max_view_conversations: int | None = None,
        max_conversation_members: int | None = None,
        max_tombstones: int = DEFAULT_MAX_TOMBSTONES_PER_USER,
        op_deadline_s: float | None = None,
        gap_timeout_s: float | None = None,
    ) -> None:
        super().__init__()
        cfg = parse_url(url)
        self.url = url
        self.cluster: bool = cfg.cluster
        self.nodes: list[tuple[str, int]] = cfg.nodes
        self.db: int = cfg.db
        self.prefix: str = cfg.prefix
        self.keys = KeyLayout(cfg.prefix, cfg.cluster, cfg.db)
        self.wait_replicas: int = cfg.wait_replicas
        self.wait_timeout_ms: int = cfg.wait_timeout_ms
        self._username: str | None = cfg.username
        self._password: str | None = cfg.password
        if max_view_conversations is not None:
            self.max_view_conversations = max_view_conversations
        if max_conversation_members is not None:
            self.max_conversation_members = max_conversation_members
        if max_tombstones < 1:
            raise InvalidArgument("max_tombstones must be at least 1")
        self.max_tombstones = max_tombstones
        self.op_deadline_s = op_deadline_s or cfg.op_deadline_s or DEFAULT_OP_DEADLINE_S
        self.gap_timeout_s = gap_timeout_s or cfg.gap_timeout_s or DEFAULT_GAP_TIMEOUT_S
        if self.gap_timeout_s <= self.op_deadline_s:
            raise InvalidArgument("gap_timeout must be longer than op_deadline")
        self.epoch = b""
        self._buf = ReorderBuffer()
        self.channel = self.keys.channel
        self._client: Any = None
        self._opened = False
        self._closed = False
        self.data_lost = False  # the epoch vanished: refuse writes until init --force
        # ordered delivery
        self._resyncing = 0  # resyncs in progress: buffer, do not deliver
        self._sub_down = False  # the subscription dropped: buffer until the resync
        self._waiters: list[tuple[int, int, trio.Event]] = []
        self._waiter_ids = 0
        self._conv_locks: dict[str, tuple[trio.Lock, int]] = {}
        self._bg_scope: trio.CancelScope | None = None
        self._bg_done = trio.Event()
        self._subscribed = trio.Event()
        self._wake = trio.Event()  # for the maintenance task: epoch note or gap
        self._epoch_note = False
        self._seen_batches: dict[bytes, list[tuple[int, Change]]] = {}  # see _batch_replies
        self._queue: list[Job] = []
        self._batch_wake = trio.Event()
        self._inflight_cids: dict[str, int] = {}  # cluster: conversations in a running batch
        self._slot_map: list[tuple[str, int]] | None = None  # cluster: master of each slot
        self._masters: dict[tuple[str, int], Pipelined] = {}  # cluster: direct to masters
        self._opx_sha = hashlib.sha1(lua.OPX.encode()).hexdigest()
        self._op_sha = hashlib.sha1(lua.OP.encode()).hexdigest()
        self._pipe: Pipelined | None = None  # standalone: the batch calls' connection
        self._pipe_ready = trio.Event()

    # ------------------------------------------------------------------ lifecycle

    def _make_client(self) -> Any:
        common: dict[str, Any] = {
            "username": self._username, "password": self._password,
            "stream_timeout": COMMAND_TIMEOUT_S, "connect_timeout": CONNECT_TIMEOUT_S,
            "retry_policy": NoRetryPolicy(),
        }
        if self.cluster:
            return coredis.RedisCluster(
                startup_nodes=[coredis.connection.TCPLocation(h, p) for h, p in self.nodes],
                **common,
            )
        host, port = self.nodes[0]
        return coredis.Redis(host=host, port=port, db=self.db, **common)

    async def open(self) -> None:
        if self._opened:
            await trio.lowlevel.checkpoint()
            return
        client = self._make_client()
        self._op = client.register_script(lua.OP)
        self._row = client.register_script(lua.ROW)
        self._user = client.register_script(lua.USER)
        self._seq = client.register_script(lua.SEQUENCE)
        self._floor = client.register_script(lua.FLOOR)
        self._posinfo_script = client.register_script(lua.POSINFO)
        # The client (its connection pool's task group) lives in the background task, so a
        # failure inside coredis can never cancel the code that called open().
        self._bg_scope = trio.CancelScope()
        self._ready = trio.Event()
        self._open_error: BaseException | None = None
        trio.lowlevel.spawn_system_task(
            self._background, client, name=f"redis-store {self._where()}"
        )
        try:
            await self._ready.wait()
            if self._open_error is not None:
                raise Unavailable(
                    f"cannot connect to Redis at {self._where()}: {self._open_error}"
                )
            with trio.fail_after(COMMAND_TIMEOUT_S):
                await self._subscribed.wait()  # subscribed before the position is read
            self.epoch = await self._ensure_epoch()
            pos, wait_s = await self._read_position()
            await trio.sleep(wait_s)
            self._jump_to(pos)  # changes up to ``pos`` are in Redis; later ones arrive
        except trio.TooSlowError:
            await self._shutdown()
            raise Unavailable(f"cannot subscribe to Redis at {self._where()}") from None
        except (RedisError, OSError) as exc:
            await self._shutdown()
            raise Unavailable(f"Redis at {self._where()}: {exc}") from None
        except BaseException:
            await self._shutdown()
            raise
        self._opened = True
        log.info("redis store open at %s (prefix %s, position %d)",
                 self._where(), self.prefix, self.position)

    def _where(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.nodes)

    async def aclose(self) -> None:
        self._closed = True
        await self._shutdown()

    async def _shutdown(self) -> None:
        if self._bg_scope is not None:
            self._bg_scope.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await self._bg_done.wait()
            self._bg_scope = None
        self._client = None
        for _, _, ev in self._waiters:
            ev.set()
        await trio.lowlevel.checkpoint()

    async def _ensure_epoch(self) -> bytes:
        """Read the epoch, creating it (SET NX) if the store is new."""
        c = self._client
        epoch = await c.get(self.keys.epoch)
        if epoch is not None:
            return bytes(epoch)
        fresh = os.urandom(EPOCH_BYTES)
        if not self.cluster:
            await c.set(self.keys.epoch, fresh, condition=coredis.PureToken.NX)
            return bytes(await c.get(self.keys.epoch))
        # cluster: agree on one epoch, copy it into every slot, then publish it in meta
        await c.set(self.keys.epoch_init, fresh, condition=coredis.PureToken.NX)
        chosen = bytes(await c.get(self.keys.epoch_init))
        await self._write_slot_epochs(chosen, force=False)
        await c.set(self.keys.epoch, chosen, condition=coredis.PureToken.NX)
        return bytes(await c.get(self.keys.epoch))

    async def _read_position(self) -> tuple[int, float]:
        """(position counter, seconds until every position handed out so far has committed
        or can no longer commit)."""
        pos, pt, now_us = await self._posinfo()
        wait_s = 0.0
        if self.cluster and pt:
            age_s = (now_us - pt) / 1e6
            wait_s = max(0.0, min(self.op_deadline_s, self.op_deadline_s - age_s + 0.01))
        return pos, wait_s

    async def _posinfo(self) -> tuple[int, int, int]:
        """(position counter, time the last position was handed out, server time), in µs."""
        r = await self._posinfo_script(keys=[self.keys.pos, self.keys.pos_time], args=[])
        return to_int(r[0]), to_int(r[1]), to_int(r[2])

    # ------------------------------------------------------------------ background

    async def _background(self, client: Any) -> None:
        assert self._bg_scope is not None
        try:
            with self._bg_scope:
                try:
                    async with client:
                        self._client = client
                        self._ready.set()
                        try:
                            async with trio.open_nursery() as nursery:
                                nursery.start_soon(self._subscriber)
                                nursery.start_soon(self._maintenance)
                                nursery.start_soon(
                                    self._cluster_batcher if self.cluster else self._batcher
                                )
                                if not self.cluster:
                                    nursery.start_soon(self._pipe_keeper)
                                if self.cluster:
                                    send, receive = trio.open_memory_channel[
                                        tuple[tuple[str, int], trio.Event]](MASTER_REQUESTS)
                                    self._master_requests = send
                                    nursery.start_soon(self._master_clients, receive)
                        finally:
                            self._client = None
                except (RedisError, OSError) as exc:
                    if not self._ready.is_set():
                        self._open_error = exc
                    else:
                        raise
        except BaseException:  # a system task must never raise
            log.exception("redis store background task failed")
        finally:
            self._client = None
            queued, self._queue = self._queue, []
            for job in queued:
                job.error = Unavailable("the store is closing")
                job.done.set()
            self._ready.set()
            self._bg_done.set()

    # ------------------------------------------------------------------ running scripts

    def _check_writable(self) -> None:
        if not self._opened or self._closed or self._client is None:
            raise Unavailable("the store is not open")
        if self.data_lost:
            raise Unavailable("Redis lost its data; run `seqactor store init --force`")

    async def _call(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> list[Any]:
        try:
            reply = await script(keys=list(keys), args=list(args))
        except (RedisError, OSError, trio.BrokenResourceError) as exc:
            raise Unavailable(f"Redis: {exc}") from None
        return list(reply)

    async def _check(self, reply: list[Any]) -> list[Any]:
        """Raise the error a script reply carries; switch epochs when it changed."""
        if reply[0] != b"ERR":
            return reply
        kind = reply[1].decode()
        msg = reply[2].decode("utf-8", "replace") if len(reply) > 2 else ""
        if kind == "NOTFOUND":
            raise NotFound(msg)
        if kind == "NOTMEMBER":
            raise NotMember(msg)
        if kind == "TOOLARGE":
            raise TooLarge(msg)
        if kind == "FAILED":  # a Redis error inside the op (a key of the wrong type, say)
            raise Unavailable(f"Redis: {msg}")
        if kind == "NOEPOCH":
            self._report_lost()
            raise Unavailable("Redis lost its data; run `seqactor store init --force`")
        if kind == "EPOCH":
            await self._resync("the store was re-initialized (new epoch)")
            raise Retry()
        raise Unavailable(f"unexpected reply from the store script: {reply!r}")

    async def _committed(self, reply: list[Any]) -> Change:
        """The change of a committed op's reply (``[b"OK", payload]``, or with the position
        and change a batch parsed already), once it was handed to the listeners."""
        change: Change | None
        if len(reply) == 4:
            pos, change = reply[2], reply[3]
        else:
            _, pos, change = parse_change(reply[1])
            self._receive(pos, change)
        assert change is not None
        if pos > self.position:  # (the write awaited its reply: a checkpoint was taken)
            await self._delivered(pos)
        return change

    def _batch_call(
        self, mode: str, pt: int, ops: list[tuple[list[str], str, int, list[Any]]]
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the OP script's 'batch' form for ``ops`` — (keys, op, position,
        own arguments) each — in ``mode`` with position time ``pt`` (µs)."""
        keys: list[str] = ops[0][0][:2]  # epoch key and counter: the same for every op here
        args: list[Any] = ["batch", len(ops), self.epoch, mode, pt,
                           int(self.op_deadline_s * 1e6), self.channel]
        for op_keys, op, pos, own in ops:
            keys += op_keys[2:]
            args += (len(own) + 3, len(op_keys) - 2, op, pos, *own)
        return keys, args

    def _argv(self, op: str, mode: str, pos: int = 0, pt: int = 0) -> list[Any]:
        deadline_us = int(self.op_deadline_s * 1e6)
        return [op, self.epoch, mode, pos, pt, deadline_us, self.channel]

    async def _write(
        self, op: str, cid: str, args: list[Any], users: Sequence[str] = ()
    ) -> list[Any]:
        """Run a write; returns the reply of the committing script (OK or NOOP); a NOOP's
        position (``reply[1]``) is made consistent with this node's delivered position."""
        self._check_writable()
        start = self.position
        for _ in range(3):
            try:
                if self.cluster:
                    if op in BATCHED_CLUSTER_OPS:
                        reply = await self._check(
                            await self._wait_job(Job(self.keys.base_keys(cid), args, op, cid))
                        )
                    else:
                        reply = await self._cluster_write(op, cid, args, users)
                    if reply[0] == b"NOOP":
                        reply[1] = max(to_int(reply[1]), start)
                    return reply
                keys = self.keys.base_keys(cid)
                if op in ("add", "rm"):
                    for u in users:
                        keys += [self.keys.view_key(u), self.keys.tomb_key(u), self.keys.horizon_key(u)]
                return await self._check(await self._wait_job(Job(keys, args, op, cid)))
            except Retry:
                self._check_writable()
                continue
        raise Unavailable("the store epoch keeps changing")

    # ------------------------------------------------------------------ standalone batching

    async def _wait_job(self, job: Job) -> list[Any]:
        """Run one op through the batcher: while calls are in flight, concurrent writes gather
        and go in one script call (each op still atomic on its own); returns its reply."""
        self._queue.append(job)
        self._batch_wake.set()
        # A cancelled caller leaves its op to the batcher: it still commits (the store
        # contract) and its change still reaches the listeners (Pub/Sub); the caller is just
        # not told. Bounded: a batch sets ``done`` when its call ends (the command timeout)
        # and closing fails queued jobs.
        await job.done.wait()
        if job.error is not None:
            raise job.error
        if job.reply is None:
            raise Unavailable("Redis: no reply")
        return job.reply

    async def _batcher(self) -> None:
        slots = trio.Semaphore(MAX_INFLIGHT_BATCHES)
        async with trio.open_nursery() as nursery:
            while True:
                await self._batch_wake.wait()
                self._batch_wake = trio.Event()
                while self._queue:
                    await slots.acquire()
                    # A long queue goes as two batches, back to back on the connection: Redis
                    # runs the second while this node takes the first one's replies (and
                    # its callers queue their next ops), so both sides work at once.
                    n = len(self._queue)
                    size = min(MAX_BATCH_OPS, n if n < 2 * SPLIT_BATCH_OPS else (n + 1) // 2)
                    batch = self._queue[:size]
                    del self._queue[:size]
                    nursery.start_soon(self._run_batch, batch, slots)

    async def _pipe_keeper(self) -> None:
        """Standalone: keeps the batch calls' connection (:class:`Pipelined`) open, opening it
        again after a failure (with back-off)."""
        host, port = self.nodes[0]
        delay = RECONNECT_MIN_S
        while True:
            try:
                conn = await connect(host, port, self._username, self._password, self.db)
            except SubscriptionLost as exc:
                log.log(logging.WARNING if delay == RECONNECT_MIN_S else logging.DEBUG,
                        "redis store: batch connection to %s:%d: %s", host, port, exc)
                await trio.sleep(delay)
                delay = min(RECONNECT_MAX_S, delay * 2)
                continue
            delay = RECONNECT_MIN_S
            pipe = Pipelined(conn, COMMAND_TIMEOUT_S)
            async with conn.stream:
                self._pipe = pipe
                self._pipe_ready.set()
                try:
                    await pipe.run()
                except SubscriptionLost as exc:
                    log.warning("redis store: batch connection to %s:%d lost (%s); reconnecting",
                                host, port, exc)
                finally:
                    self._pipe = None
                    self._pipe_ready = trio.Event()

    async def _batch_pipe(self) -> Pipelined:
        pipe = self._pipe
        if pipe is None:
            with trio.move_on_after(CONNECT_TIMEOUT_S):
                await self._pipe_ready.wait()
            pipe = self._pipe
            if pipe is None:
                raise Unavailable(f"Redis: cannot connect to {self._where()}")
        return pipe

    async def _run_batch(self, batch: list[Job], slots: trio.Semaphore) -> None:
        try:
            keys, args = self._batch_call("s", 0, [(j.keys, j.op, 0, j.argv) for j in batch])
            script = ("EVALSHA", self._op_sha, len(keys), *keys, *args)
            # WAIT counts the replicas that have this connection's writes: it follows the
            # script on the same connection (one pipeline)
            waits = [("WAIT", self.wait_replicas, self.wait_timeout_ms)] if self.wait_replicas else []
            pipe = await self._batch_pipe()
            replies = await pipe.call(script, *waits)
            if isinstance(replies[0], RespError) and str(replies[0]).startswith("NOSCRIPT"):
                await pipe.call(("SCRIPT", "LOAD", lua.OP))  # nothing ran: load it, again
                replies = await pipe.call(script, *waits)
            for r in replies:
                if isinstance(r, RespError):
                    raise Unavailable(f"Redis: {r}")
            blob = replies[0]
            acked = int(replies[1]) if waits else 0  # type: ignore[call-overload]
            if not isinstance(blob, bytes):
                raise Unavailable(f"Redis: unexpected reply {blob!r:.200}")
            ops = self._batch_replies(blob)
            if len(ops) != len(batch):
                raise Unavailable(f"Redis: {len(ops)} replies to a batch of {len(batch)}")
            self._take_replies(batch, ops)
            if acked < self.wait_replicas:
                for job in batch:
                    job.error = Unavailable(
                        f"only {acked} of {self.wait_replicas} replicas confirmed the write "
                        f"within {self.wait_timeout_ms} ms (it may still survive a failover)")
        except (SubscriptionLost, ValueError) as exc:
            for job in batch:
                job.error = Unavailable(f"Redis: {exc}")
        except Unavailable as exc:
            for job in batch:
                job.error = exc
        finally:
            slots.release()
            for job in batch:
                if job.reply is None and job.error is None:
                    job.error = Unavailable("the store is closing")
                job.done.set()

    def _batch_replies(self, blob: bytes) -> list[list[Any]]:
        """A batch call's reply, one per op. When Pub/Sub brought the same batch first (every
        op committed: the published message and the reply are the same bytes), its parsed
        changes are taken instead of parsing them again."""
        seen = self._seen_batches.pop(blob, None)
        if seen is not None:
            return [[b"OK", b"", pos, change] for pos, change in seen]
        return split_replies(blob)

    def _take_replies(self, jobs: Sequence[Job], replies: Sequence[list[Any]]) -> None:
        """Give each job its reply; a committed op's change is parsed here, once, and handed
        to the reorder buffer (``[b"OK", payload, position, change]``), so its caller finds
        it delivered."""
        add = self._buf.add
        for job, reply in zip(jobs, replies, strict=True):
            if reply[0] == b"OK" and len(reply) == 2:
                _, pos, change = parse_change(reply[1])
                reply += (pos, change)
                add(pos, change)
            job.reply = reply
        if not self._held():
            self._drain()

    # ------------------------------------------------------------------ writes

    async def allocate(
        self, conversation_id: str, count: int, sender_user_id: str | None = None
    ) -> Allocated:
        await trio.lowlevel.checkpoint_if_cancelled()
        validate_id(conversation_id, "conversation_id")
        n = normalize_count(count)
        sender = validate_id(sender_user_id, "sender_user_id") if sender_user_id else ""
        # Allocations are stamped with Redis' clock (one clock for every node) unless the
        # store's clock was replaced (tests step it back).
        clock = "" if self.clock_ms is wall_clock_ms else self.clock_ms()
        reply = await self._write("alloc", conversation_id, [conversation_id, n, sender, clock])
        return await self._committed(reply)  # type: ignore[return-value]

    async def mark_read(
        self, conversation_id: str, user_id: str, read_sequence: int
    ) -> ReadMarked:
        await trio.lowlevel.checkpoint_if_cancelled()
        validate_id(conversation_id, "conversation_id")
        validate_id(user_id, "user_id")
        read = check_uint64(read_sequence, "read_sequence")
        reply = await self._write("read", conversation_id, [conversation_id, user_id, read])
        if reply[0] == b"NOOP":
            return ReadMarked(conversation_id, user_id, to_int(reply[2]), to_int(reply[1]), False)
        return await self._committed(reply)  # type: ignore[return-value]

    async def set_min_sequence(self, conversation_id: str, min_sequence: int) -> MinChanged:
        await trio.lowlevel.checkpoint_if_cancelled()
        validate_id(conversation_id, "conversation_id")
        value = check_uint64(min_sequence, "min_sequence")
        reply = await self._write("min", conversation_id, [conversation_id, value])
        if reply[0] == b"NOOP":
            return MinChanged(conversation_id, to_int(reply[2]), to_int(reply[1]), False)
        return await self._committed(reply)  # type: ignore[return-value]

    async def add_members(self, conversation_id: str, user_ids: Sequence[str]) -> MembersAdded:
        await trio.lowlevel.checkpoint_if_cancelled()
        validate_id(conversation_id, "conversation_id")
        uids = check_user_ids(user_ids)
        reply = await self._write(
            "add", conversation_id,
            [conversation_id, self.max_view_conversations, self.max_conversation_members, *uids],
            uids,
        )
        if reply[0] == b"NOOP":
            return MembersAdded(
                conversation_id, (), to_int(reply[2]), to_int(reply[3]), to_int(reply[4]),
                to_int(reply[1]), False,
            )
        return await self._committed(reply)  # type: ignore[return-value]

    async def remove_members(
        self, conversation_id: str, user_ids: Sequence[str], keep_history: bool
    ) -> MembersRemoved:
        await trio.lowlevel.checkpoint_if_cancelled()
        validate_id(conversation_id, "conversation_id")
        uids = check_user_ids(user_ids)
        keep = "1" if keep_history else "0"
        reply = await self._write(
            "rm", conversation_id, [conversation_id, keep, self.max_tombstones, *uids], uids
        )
        if reply[0] == b"NOOP":
            return MembersRemoved(
                conversation_id, (), bool(keep_history), to_int(reply[1]), False
            )
        return await self._committed(reply)  # type: ignore[return-value]

    # ------------------------------------------------------------------ reads

    def _check_readable(self) -> Any:
        if self._client is None:
            raise Unavailable("the store is not open")
        return self._client

    async def load_view(self, user_id: str) -> ViewData:
        await trio.lowlevel.checkpoint()
        validate_id(user_id, "user_id")
        c = self._check_readable()
        data = ViewData(self.position)  # every change up to here is in Redis
        try:
            index = await c.hkeys(self.keys.view_key(user_id))
            cids = sorted(x.decode() for x in index)
            if not cids:
                return data
            async with c.pipeline(transaction=False) as pipe:
                reqs = [
                    self._row(keys=[self.keys.conv_key(cid), self.keys.members_key(cid)], args=[user_id],
                              client=pipe)
                    for cid in cids
                ]
            rows = [await r for r in reqs]
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis: {exc}") from None
        for cid, r in zip(cids, rows, strict=True):
            if not r:
                continue  # an index entry without a member row (a step in flight)
            mx, mn, tm, ps = (to_int(x) for x in r[:4])
            read, mpos, frozen, fmax, fmin, ftime = (int(x) for x in r[4].decode().split(","))
            data.conversation_ids.append(cid)
            if frozen:
                data.max_seq.append(fmax)
                data.min_seq.append(fmin)
                data.time_ms.append(ftime)
                data.pos.append(mpos)
            else:
                data.max_seq.append(mx)
                data.min_seq.append(mn)
                data.time_ms.append(tm)
                data.pos.append(max(mpos, ps))
            data.read_seq.append(read)
            data.frozen.append(1 if frozen else 0)
        return data

    async def removed_since(self, user_id: str, position: int) -> list[str] | None:
        await trio.lowlevel.checkpoint()
        validate_id(user_id, "user_id")
        position = check_uint64(position, "position")
        c = self._check_readable()
        if position > self.position:
            return None
        try:
            async with c.pipeline(transaction=False) as pipe:
                r_h = pipe.get(self.keys.horizon_key(user_id))
                r_t = pipe.zrangebyscore(self.keys.tomb_key(user_id), f"({position}", "+inf")
            horizon = to_int(await r_h or 0)
            if position < horizon:
                return None
            cids = [x.decode() for x in await r_t]
            if not cids:
                return []
            async with c.pipeline(transaction=False) as pipe:
                reqs = [pipe.hexists(self.keys.members_key(cid), user_id) for cid in cids]
            present = [await r for r in reqs]
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis: {exc}") from None
        return [cid for cid, inside in zip(cids, present, strict=True) if not inside]

    async def view_contains(self, user_id: str, conversation_id: str) -> bool:
        await trio.lowlevel.checkpoint()
        validate_id(user_id, "user_id")
        validate_id(conversation_id, "conversation_id")
        c = self._check_readable()
        try:
            return bool(await c.hexists(self.keys.members_key(conversation_id), user_id))
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis: {exc}") from None

    async def conversation(self, conversation_id: str) -> ConversationState | None:
        await trio.lowlevel.checkpoint()
        validate_id(conversation_id, "conversation_id")
        c = self._check_readable()
        try:
            v = await c.hmget(self.keys.conv_key(conversation_id), ["mx", "mn", "tm", "ps", "ac"])
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis: {exc}") from None
        if v[3] is None:
            return None
        return ConversationState(
            conversation_id, to_int(v[0]), to_int(v[1]), to_int(v[2]), to_int(v[4] or 0)
        )

    # ------------------------------------------------------------------ operator actions

    async def init_epoch(self, force: bool) -> tuple[bytes, bool]:
        """``seqactor store init``: create the epoch if missing; with ``force`` start a new one
        (also after Redis lost its data). The position counter moves to at least the current
        time in µs, so positions after the new epoch are above every position seen before.
        Returns (epoch, created)."""
        c = self._check_readable()
        current = await c.get(self.keys.epoch)
        if current is not None and not force:
            return bytes(current), False
        fresh = os.urandom(EPOCH_BYTES)
        _, _, now_us = await self._posinfo()
        await self._floor(keys=[self.keys.pos], args=[now_us])
        if self.cluster:
            await c.set(self.keys.epoch_init, fresh)
            await self._write_slot_epochs(fresh, force=True)
        await c.set(self.keys.epoch, fresh)
        await c.publish(self.channel, EPOCH_NOTE)
        return fresh, True

    # ------------------------------------------------------------------ group read counts

    async def load_members(self, conversation_id: str) -> MemberReads | None:
        """Current members' read seqs, read atomically with the conversation's last change
        position (``lp``): every change of it at or below is in the rows, none above."""
        await trio.lowlevel.checkpoint()
        validate_id(conversation_id, "conversation_id")
        c = self._check_readable()
        script = getattr(self, "_members_script", None)
        if script is None:  # registered on first use: a node that never serves counts skips it
            script = c.register_script(_MEMBERS_LUA)
            self._members_script = script
        try:
            r = await script(
                keys=[self.keys.conv_key(conversation_id), self.keys.members_key(conversation_id)],
                args=[],
            )
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis: {exc}") from None
        if not r:
            return None
        data = MemberReads(conversation_id, to_int(r[2]), to_int(r[0]), to_int(r[1]))
        flat = r[3]
        uids = data.user_ids
        reads = data.read_seq
        for i in range(0, len(flat), 2):
            read, _pos, frozen, _rest = flat[i + 1].decode().split(",", 3)
            if frozen == "0":
                uids.append(flat[i].decode())
                reads.append(int(read))
        return data

    async def sync(self) -> None:
        """Wait until every position handed out before the call was delivered to the
        listeners (committed ones in order; ones that cannot commit any more as skips)."""
        self._check_readable()
        try:
            pos, _ = await self._read_position()
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis: {exc}") from None
        await self._delivered(pos)

async def init_store(url: str, force: bool) -> tuple[bytes, bool]:
    """``seqactor store init [--force]`` without opening a node: (epoch, created)."""
    store = RedisStore(url)
    client = store._make_client()
    try:
        await client.__aenter__()
    except (RedisError, OSError) as exc:
        raise Unavailable(f"cannot connect to Redis at {store._where()}: {exc}") from None
    store._client = client
    store._floor = client.register_script(lua.FLOOR)
    store._posinfo_script = client.register_script(lua.POSINFO)
    try:
        return await store.init_epoch(force)
    except (RedisError, OSError) as exc:
        raise Unavailable(f"Redis: {exc}") from None
    finally:
        store._client = None
        await client.__aexit__(None, None, None)
