"""``redis://host:port/db`` and ``redis+cluster://host:port,host:port,...``: several seqactor
nodes share one state (docs/protocol.md, "Stores"). docs/deployment.md explains the design for operators.

**Layout.** Every key starts with the prefix (``?prefix=``, default ``sa``) and a hash tag,
so every atomic step touches one slot::

    sa{<cid>}:c:<cid>     hash   mx mn tm (max, min, time) ps (row position) ac (active
                                 members) lp (position of the last change of the conversation
                                 or of one of its members)
    sa{<cid>}:m:<cid>     hash   user -> "read,pos,frozen,fmax,fmin,ftime"
    sa{<uid>}:v:<uid>     hash   the user's view index: conversation -> position it was indexed
    sa{<uid>}:t:<uid>     zset   tombstones: conversation -> position it left the view
    sa{<uid>}:h:<uid>     string tombstone horizon (tombstones at or below were pruned)
    sa{meta}:epoch :pos :pt      epoch, position counter, time the last position was handed out
    sa{<slot tag>}:e      string (cluster) a copy of the epoch in every one of the 16384 slots

(``{``/``}`` in ids are replaced in the tag only.) Changes are PUBLISHed on ``<prefix>:ev:<db>``.

**Standalone.** One Lua script per operation takes the position (INCR), changes the
conversation, the members, the users' view indexes and tombstones, and PUBLISHes the change —
one atomic step, so positions are gap-free and published in position order.

**Cluster.** The position counter lives in one slot and a conversation in another, so a write
takes steps (under a per-conversation lock in this node):

1. dry run in the conversation's slot — a no-op answers at once and takes no position;
2. the sequencer script hands out the next position (and its time);
3. membership only: user-slot pre-steps (index a joining conversation; tombstone a leaving one);
4. the operation in the conversation's slot with that position: it refuses a position older
   than the conversation's last (another node got a later one in first: retry) or handed out
   more than ``op_deadline`` ago; it PUBLISHes the change (classic Pub/Sub reaches every
   cluster node);
5. membership only: user-slot post-steps (drop the index entry of a removal unless a later
   join indexed it again; undo pre-steps of users the op did not change).

A position that does not commit is published as a *skip*. Readers tolerate the windows between
steps: a view index entry without a member row is ignored; a tombstone of a conversation still
in the view is ignored. The user index is written *before* a join commits and cleared *after* a
removal commits, so a reader never misses a conversation that is in the view.

**Delivery.** Each node receives every change (its own and others') from Pub/Sub, and its own
also from the script's reply, and hands them to the listeners strictly in position order, each
once (a reorder buffer; skips fill holes). A hole that stays open ``gap_timeout`` (longer than
the op deadline: the missing position can no longer commit) is closed with a ``StoreReset``.
When the subscription drops, the node re-subscribes, reads the position counter, waits out the
op deadline (cluster), and publishes ``StoreReset`` — the hub reloads online views from Redis.

**Data-loss guard.** Every write checks the epoch key. Missing (Redis came back empty): the
write is refused with ``Unavailable`` and logged loudly. A different epoch (``seqactor store
init --force``): the node switches to it, publishes ``StoreReset`` and retries.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, unquote

import coredis
import trio
from coredis._utils import hash_slot
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
    StoreReset,
    TooLarge,
    Unavailable,
    ViewData,
    normalize_count,
    validate_id,
    wall_clock_ms,
)
from seqactor.store._redis_sub import SubscriptionLost, subscribe
from seqactor.store._state import _uint64, _user_ids

log = logging.getLogger("seqactor.store.redis")

DEFAULT_PREFIX = "sa"
DEFAULT_MAX_TOMBSTONES_PER_USER = 10_000
DEFAULT_OP_DEADLINE_S = 0.5  # cluster: a position must commit this soon after it was handed out
DEFAULT_GAP_TIMEOUT_S = 1.5  # a hole in the positions open this long: StoreReset
COMMAND_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0
RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 1.0
MAX_CLUSTER_RETRIES = 50
MAX_BATCH_OPS = 256  # standalone: operations sent in one script call
MAX_INFLIGHT_BATCHES = 4  # standalone: script calls in flight; more ops wait and batch up
CLUSTER_SLOTS = 16384

SEP = "\x1f"
USEP = "\x1e"

_slot_tags: list[str] | None = None

# Group read counts (docs/protocol.md "Group read counts"): a conversation's state and all its
# members in one atomic step (both keys carry the conversation's hash tag: one slot), so the
# member rows are exactly those as of the conversation's last change position ``lp``.
_MEMBERS_LUA = """
local v = redis.call('HMGET', KEYS[1], 'mx', 'mn', 'lp', 'ps')
if not v[4] then return {} end
return {v[1] or '0', v[2] or '0', v[3] or '0', redis.call('HGETALL', KEYS[2])}
"""


def slot_tags() -> list[str]:
    """For every cluster slot, a short string whose hash slot it is (computed once)."""
    global _slot_tags
    if _slot_tags is None:
        tags: list[str | None] = [None] * CLUSTER_SLOTS
        left = CLUSTER_SLOTS
        i = 0
        while left:
            s = str(i)
            slot = hash_slot(s.encode())
            if tags[slot] is None:
                tags[slot] = s
                left -= 1
            i += 1
        _slot_tags = [t for t in tags if t is not None]
    return _slot_tags


def _tag(value: str) -> str:
    return value.replace("{", "(").replace("}", ")")


def _num(x: Any) -> int:
    return int(x) if not isinstance(x, bytes) else int(x.decode())


def parse_url(url: str) -> dict[str, Any]:
    """``redis://[user:pass@]host:port/db?prefix=P`` or ``redis+cluster://h:p,h:p?prefix=P``."""
    cluster = url.startswith("redis+cluster://")
    if not cluster and not url.startswith("redis://"):
        raise InvalidArgument(f"not a redis store URL: {url!r}")
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        cred, netloc = netloc.rsplit("@", 1)
        user, sep, pw = cred.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if sep else unquote(user)
        if not sep:
            username = None
    nodes: list[tuple[str, int]] = []
    for part in netloc.split(","):
        if not part:
            continue
        host, _, port = part.rpartition(":")
        if not host:
            host, port = port, "6379"
        try:
            nodes.append((host.strip("[]"), int(port)))
        except ValueError:
            raise InvalidArgument(f"bad host:port {part!r} in store URL") from None
    if not nodes:
        nodes = [("127.0.0.1", 6379)]
    db = 0
    if path.strip("/"):
        try:
            db = int(path.strip("/"))
        except ValueError:
            raise InvalidArgument(f"bad database number {path!r} in store URL") from None
    if cluster and db:
        raise InvalidArgument("Redis Cluster has only database 0")
    if not cluster and len(nodes) > 1:
        raise InvalidArgument("several hosts: use redis+cluster://")
    q = {k: v[-1] for k, v in parse_qs(query).items()}
    prefix = q.get("prefix", DEFAULT_PREFIX)
    if not prefix or "{" in prefix or "}" in prefix:
        raise InvalidArgument("the key prefix must be non-empty and without braces")
    out: dict[str, Any] = {
        "cluster": cluster, "nodes": nodes, "db": db, "prefix": prefix,
        "username": username, "password": password,
    }
    if "op_deadline_ms" in q:
        out["op_deadline_s"] = float(q["op_deadline_ms"]) / 1000
    if "gap_timeout_ms" in q:
        out["gap_timeout_s"] = float(q["gap_timeout_ms"]) / 1000
    return out


def parse_change(payload: bytes) -> tuple[str, int, Change | None]:
    """A published payload -> (kind, position, change); skips and epoch notes have no change."""
    parts = payload.decode("utf-8").split(SEP)
    kind = parts[0]
    pos = int(parts[1])
    if kind == "A":
        _, _, cid, first, last, tm, sender, sread = parts
        return kind, pos, Allocated(
            cid, int(first), int(last), int(tm), pos, sender or None, int(sread)
        )
    if kind == "R":
        _, _, cid, uid, read = parts
        return kind, pos, ReadMarked(cid, uid, int(read), pos, True)
    if kind == "M":
        _, _, cid, mn = parts
        return kind, pos, MinChanged(cid, int(mn), pos, True)
    if kind == "J":
        _, _, cid, mx, mn, tm, users = parts
        return kind, pos, MembersAdded(
            cid, tuple(users.split(USEP)) if users else (), int(mx), int(mn), int(tm), pos, True
        )
    if kind == "L":
        _, _, cid, keep, users = parts
        return kind, pos, MembersRemoved(
            cid, tuple(users.split(USEP)) if users else (), keep == "1", pos, True
        )
    return kind, pos, None  # "S" skip, "E" new epoch


class _Job:
    """A standalone write waiting for the batcher."""

    __slots__ = ("keys", "argv", "reply", "error", "done")

    def __init__(self, keys: list[str], argv: list[Any]) -> None:
        self.keys = keys
        self.argv = argv
        self.reply: list[Any] | None = None
        self.error: BaseException | None = None
        self.done = trio.Event()


class _Retry(Exception):
    """The epoch changed under an operation: it was switched; run the operation again."""


class RedisStore(Store):
    """The Store on Redis or Redis Cluster. See the module docstring for the design.

    Keyword arguments: ``max_view_conversations``, ``max_conversation_members``,
    ``max_tombstones`` (per user), ``op_deadline_s``, ``gap_timeout_s`` (URL query:
    ``op_deadline_ms``, ``gap_timeout_ms``, ``prefix``).
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
        self.cluster: bool = cfg["cluster"]
        self.nodes: list[tuple[str, int]] = cfg["nodes"]
        self.db: int = cfg["db"]
        self.prefix: str = cfg["prefix"]
        self._username: str | None = cfg["username"]
        self._password: str | None = cfg["password"]
        if max_view_conversations is not None:
            self.max_view_conversations = max_view_conversations
        if max_conversation_members is not None:
            self.max_conversation_members = max_conversation_members
        if max_tombstones < 1:
            raise InvalidArgument("max_tombstones must be at least 1")
        self.max_tombstones = max_tombstones
        self.op_deadline_s = op_deadline_s or cfg.get("op_deadline_s", DEFAULT_OP_DEADLINE_S)
        self.gap_timeout_s = gap_timeout_s or cfg.get("gap_timeout_s", DEFAULT_GAP_TIMEOUT_S)
        if self.gap_timeout_s <= self.op_deadline_s:
            raise InvalidArgument("gap_timeout must be longer than op_deadline")
        self.epoch = b""
        self.position = 0
        self.channel = f"{self.prefix}:ev:{self.db}".encode()
        p = self.prefix
        self._k_epoch = f"{p}{{meta}}:epoch"
        self._k_epoch_init = f"{p}{{meta}}:epoch_init"
        self._k_pos = f"{p}{{meta}}:pos"
        self._k_pt = f"{p}{{meta}}:pt"
        self._client: Any = None
        self._opened = False
        self._closed = False
        self.data_lost = False  # the epoch vanished: refuse writes until init --force
        # ordered delivery
        self._pending: dict[int, Change | None] = {}
        self._gap_since: float | None = None
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
        self._queue: list[_Job] = []
        self._batch_wake = trio.Event()

    # ------------------------------------------------------------------ keys

    def conv_key(self, cid: str) -> str:
        return f"{self.prefix}{{{_tag(cid)}}}:c:{cid}"

    def members_key(self, cid: str) -> str:
        return f"{self.prefix}{{{_tag(cid)}}}:m:{cid}"

    def view_key(self, uid: str) -> str:
        return f"{self.prefix}{{{_tag(uid)}}}:v:{uid}"

    def tomb_key(self, uid: str) -> str:
        return f"{self.prefix}{{{_tag(uid)}}}:t:{uid}"

    def horizon_key(self, uid: str) -> str:
        return f"{self.prefix}{{{_tag(uid)}}}:h:{uid}"

    def slot_epoch_key(self, key: str) -> str:
        """The epoch key in ``key``'s slot (cluster) or the one epoch key (standalone)."""
        if not self.cluster:
            return self._k_epoch
        return f"{self.prefix}{{{slot_tags()[hash_slot(key.encode())]}}}:e"

    def all_slot_epoch_keys(self) -> list[str]:
        return [f"{self.prefix}{{{t}}}:e" for t in slot_tags()]

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
        epoch = await c.get(self._k_epoch)
        if epoch is not None:
            return bytes(epoch)
        fresh = os.urandom(EPOCH_BYTES)
        if not self.cluster:
            await c.set(self._k_epoch, fresh, condition=coredis.PureToken.NX)
            return bytes(await c.get(self._k_epoch))
        # cluster: agree on one epoch, copy it into every slot, then publish it in meta
        await c.set(self._k_epoch_init, fresh, condition=coredis.PureToken.NX)
        chosen = bytes(await c.get(self._k_epoch_init))
        await self._write_slot_epochs(chosen, force=False)
        await c.set(self._k_epoch, chosen, condition=coredis.PureToken.NX)
        return bytes(await c.get(self._k_epoch))

    async def _write_slot_epochs(self, epoch: bytes, force: bool) -> None:
        """Cluster: the epoch copy in every slot, one script call per master."""
        tags = slot_tags()
        for shard in await self._client.cluster_shards():
            ranges = shard[b"slots"]  # [lo, hi, lo, hi, ...]
            master = next(n for n in shard[b"nodes"] if n[b"role"] == b"master")
            keys = [
                f"{self.prefix}{{{tags[s]}}}:e"
                for lo, hi in zip(ranges[::2], ranges[1::2], strict=True)
                for s in range(int(lo), int(hi) + 1)
            ]
            if not keys:
                continue
            direct = coredis.Redis(
                host=master[b"ip"].decode(), port=int(master[b"port"]), username=self._username,
                password=self._password, stream_timeout=COMMAND_TIMEOUT_S,
                connect_timeout=CONNECT_TIMEOUT_S, retry_policy=NoRetryPolicy(),
            )
            async with direct:
                script = direct.register_script(lua.SLOT_EPOCHS)
                await script(keys=[], args=[epoch, "1" if force else "0", *keys])

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
        r = await self._posinfo_script(keys=[self._k_pos, self._k_pt], args=[])
        return _num(r[0]), _num(r[1]), _num(r[2])

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
                                nursery.start_soon(self._batcher)
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
            self._ready.set()
            self._bg_done.set()

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
                    while True:
                        self._on_payload(await conn.message())
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
                epoch = await c.get(self._k_epoch)
                if epoch is None:
                    self._report_lost()
                else:
                    if bytes(epoch) != self.epoch:
                        log.warning("redis store: new epoch %s (store init --force); switching",
                                    bytes(epoch).hex())
                        self.epoch = bytes(epoch)
                        # positions never go back: tokens of this node's clients stay usable
                        await self._floor(keys=[self._k_pos], args=[self.position])
                    if self.data_lost:
                        log.warning("redis store: the epoch is back; accepting writes again")
                    self.data_lost = False
                pos, wait_s = await self._read_position()
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

    def _jump_to(self, pos: int, drain: bool = True) -> None:
        """Positions up to ``pos`` need no delivery (the caller reloads them from Redis)."""
        if pos > self.position:
            self.position = pos
        for p in [p for p in self._pending if p <= self.position]:
            del self._pending[p]
        self._gap_since = None
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
                self._k_epoch,
            )
        self.data_lost = True

    async def _maintenance(self) -> None:
        """Closes holes that stay open too long; follows epoch changes."""
        last_lost_check = 0.0
        while True:
            with trio.move_on_after(0.1):
                await self._wake.wait()
            self._wake = trio.Event()
            if self.data_lost and trio.current_time() - last_lost_check > 1.0:
                last_lost_check = trio.current_time()
                self._epoch_note = True
            if self._epoch_note:
                self._epoch_note = False
                try:
                    epoch = await self._client.get(self._k_epoch)
                except (RedisError, OSError):
                    epoch = None
                if epoch is not None and (bytes(epoch) != self.epoch or self.data_lost):
                    try:
                        await self._resync("the store was re-initialized (new epoch)")
                    except Unavailable as exc:
                        log.warning("redis store: resync failed: %s", exc)
            if (
                self._gap_since is not None
                and not self._held()
                and trio.current_time() - self._gap_since > self.gap_timeout_s
            ):
                nxt = min(self._pending, default=self.position + 1)
                if nxt > self.position + 1:
                    log.warning("redis store: positions %d..%d never arrived; resync",
                                self.position + 1, nxt - 1)
                    self._jump_to(nxt - 1, drain=False)
                    self._deliver(StoreReset(self.position))
                self._gap_since = None
                self._drain()

    # ------------------------------------------------------------------ ordered delivery

    def _on_payload(self, payload: bytes) -> None:
        try:
            if payload[:1] != b"E" and int(payload[2:payload.index(b"\x1f", 2)]) <= self.position:
                return  # already delivered (e.g. this node's own change, from the reply)
        except ValueError:
            pass
        try:
            kind, pos, change = parse_change(payload)
        except (ValueError, UnicodeDecodeError):
            log.error("redis store: malformed event %r", payload[:200])
            return
        if kind == "E":
            self._epoch_note = True
            self._wake.set()
            return
        self._receive(pos, change)

    def _receive(self, pos: int, change: Change | None) -> None:
        if pos <= self.position or pos in self._pending:
            return
        self._pending[pos] = change
        if not self._held():
            self._drain()

    def _drain(self) -> None:
        pending = self._pending
        while self.position + 1 in pending:
            change = pending.pop(self.position + 1)
            self.position += 1
            if change is not None:
                self._deliver(change)
        if pending:
            if self._gap_since is None:
                self._gap_since = trio.current_time()
                self._wake.set()
        else:
            self._gap_since = None
        waiters = self._waiters
        while waiters and waiters[0][0] <= self.position:
            heapq.heappop(waiters)[2].set()

    def _deliver(self, change: Change) -> None:
        for fn in list(self._listeners):
            try:
                fn(change)
            except Exception:
                log.exception("store listener %r failed on %r", fn, change)

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
        if kind == "NOEPOCH":
            self._report_lost()
            raise Unavailable("Redis lost its data; run `seqactor store init --force`")
        if kind == "EPOCH":
            await self._resync("the store was re-initialized (new epoch)")
            raise _Retry()
        raise Unavailable(f"unexpected reply from the store script: {reply!r}")

    async def _committed(self, payload: bytes) -> Change:
        _, pos, change = parse_change(payload)
        assert change is not None
        self._receive(pos, change)
        await self._delivered(pos)
        return change

    def _base_keys(self, cid: str) -> list[str]:
        ck = self.conv_key(cid)
        ek = self.slot_epoch_key(ck)
        return [ek, self._k_pos if not self.cluster else ek, ck, self.members_key(cid)]

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
                    reply = await self._cluster_write(op, cid, args, users)
                    if reply[0] == b"NOOP":
                        reply[1] = max(_num(reply[1]), start)
                    return reply
                keys = self._base_keys(cid)
                if op in ("add", "rm"):
                    for u in users:
                        keys += [self.view_key(u), self.tomb_key(u), self.horizon_key(u)]
                return await self._check(await self._submit(keys, self._argv(op, "s") + args))
            except _Retry:
                self._check_writable()
                continue
        raise Unavailable("the store epoch keeps changing")

    # ------------------------------------------------------------------ standalone batching

    async def _submit(self, keys: list[str], argv: list[Any]) -> list[Any]:
        """Run the op script through the batcher: while calls are in flight, concurrent
        writes gather and go in one script call (each op still atomic on its own)."""
        job = _Job(keys, argv)
        self._queue.append(job)
        self._batch_wake.set()
        # shielded: the op may commit, its result is not thrown away (bounded wait)
        with trio.CancelScope(shield=True, deadline=trio.current_time() + COMMAND_TIMEOUT_S * 2):
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
                    batch = self._queue[:MAX_BATCH_OPS]
                    del self._queue[:MAX_BATCH_OPS]
                    nursery.start_soon(self._run_batch, batch, slots)

    async def _run_batch(self, batch: list[_Job], slots: trio.Semaphore) -> None:
        try:
            if len(batch) == 1:
                job = batch[0]
                job.reply = list(await self._op(keys=job.keys, args=job.argv))
            else:
                keys: list[str] = []
                head: list[Any] = ["batch", len(batch)]
                rest: list[Any] = []
                for job in batch:
                    keys += job.keys
                    head += [len(job.keys), len(job.argv)]
                    rest += job.argv
                replies = await self._op(keys=keys, args=head + rest)
                for job, reply in zip(batch, replies, strict=True):
                    job.reply = list(reply)
        except (RedisError, OSError, trio.BrokenResourceError, ValueError) as exc:
            for job in batch:
                job.error = Unavailable(f"Redis: {exc}")
        finally:
            slots.release()
            for job in batch:
                if job.reply is None and job.error is None:
                    job.error = Unavailable("the store is closing")
                job.done.set()

    # ------------------------------------------------------------------ cluster writes

    async def _cluster_write(
        self, op: str, cid: str, args: list[Any], users: Sequence[str]
    ) -> list[Any]:
        lock, n = self._conv_locks.get(cid, (None, 0))
        if lock is None:
            lock = trio.Lock()
        self._conv_locks[cid] = (lock, n + 1)
        try:
            reply: list[Any] | None = None
            async with lock:
                with trio.CancelScope(shield=True):  # a handed-out position must resolve
                    reply = await self._cluster_steps(op, cid, args, users)
            assert reply is not None
            return reply
        finally:
            lock2, n2 = self._conv_locks[cid]
            if n2 <= 1:
                del self._conv_locks[cid]
            else:
                self._conv_locks[cid] = (lock2, n2 - 1)

    async def _skip(self, pos: int) -> None:
        payload = f"S{SEP}{pos}".encode()
        self._receive(pos, None)
        try:
            await self._client.publish(self.channel, payload)
        except (RedisError, OSError) as exc:  # readers close the hole after the gap timeout
            log.warning("redis store: could not publish skip of %d: %s", pos, exc)

    async def _user_step(
        self, step: str, uid: str, cid: str, pos: int, extra: Any = ""
    ) -> list[Any]:
        vk = self.view_key(uid)
        keys = [self.slot_epoch_key(vk), vk, self.tomb_key(uid), self.horizon_key(uid)]
        return await self._call(self._user, keys, [step, self.epoch, cid, pos, extra])

    async def _cluster_steps(
        self, op: str, cid: str, args: list[Any], users: Sequence[str]
    ) -> list[Any]:
        keys = self._base_keys(cid)
        for _ in range(MAX_CLUSTER_RETRIES):
            need: list[str] = []
            if op != "alloc":
                dry = await self._check(await self._call(self._op, keys, self._argv(op, "d") + args))
                if dry[0] == b"NOOP":
                    return dry
                need = [u.decode() for u in dry[1:]]
                if op == "add" and need:
                    await self._check_view_room(need)
            seq = await self._check(
                await self._call(self._seq, [self._k_epoch, self._k_pos, self._k_pt], [self.epoch])
            )
            pos, pt = int(seq[1]), _num(seq[2])
            done: list[tuple[str, str]] = []  # (undo step, user) of pre-steps taken
            try:
                if op == "add":
                    for u in need:
                        await self._check(await self._user_step(
                            "join", u, cid, pos, self.max_view_conversations))
                        done.append(("unjoin", u))
                elif op == "rm" and args[1] == "0":
                    for u in need:
                        await self._check(await self._user_step(
                            "tomb", u, cid, pos, self.max_tombstones))
                        done.append(("untomb", u))
                reply = await self._call(self._op, keys, self._argv(op, "c", pos, pt) + args)
                if reply[0] == b"OK":
                    _, _, change = parse_change(reply[1])
                    changed = set(getattr(change, "user_ids", ()))
                    undo = [(s, u) for s, u in done if u not in changed]
                    await self._undo(undo, cid, pos)
                    if op == "rm" and args[1] == "0":
                        for u in changed:
                            await self._check(await self._user_step("left", u, cid, pos))
                    return reply
            except BaseException:
                await self._skip(pos)
                await self._undo(done, cid, pos)
                raise
            await self._skip(pos)
            await self._undo(done, cid, pos)
            if reply[0] == b"RETRY":
                continue
            return await self._check(reply)  # NOOP (raced) or an error
        raise Unavailable("too much contention on the conversation; try again")

    async def _undo(self, steps: list[tuple[str, str]], cid: str, pos: int) -> None:
        for step, uid in steps:
            try:
                await self._user_step(step, uid, cid, pos)
            except Unavailable as exc:
                log.warning("redis store: could not undo %s of %r in %r: %s", step, uid, cid, exc)

    async def _check_view_room(self, users: list[str]) -> None:
        """Cluster: the view limit, checked before a position is taken (and again in the
        user's slot before the join commits)."""
        async with self._client.pipeline(transaction=False) as pipe:
            reqs = [pipe.hlen(self.view_key(u)) for u in users]
        for u, r in zip(users, reqs, strict=True):
            if await r + 1 > self.max_view_conversations:
                raise TooLarge(
                    f"the view of {u!r} would exceed {self.max_view_conversations} conversations"
                )

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
        return await self._committed(reply[1])  # type: ignore[return-value]

    async def mark_read(
        self, conversation_id: str, user_id: str, read_sequence: int
    ) -> ReadMarked:
        await trio.lowlevel.checkpoint_if_cancelled()
        validate_id(conversation_id, "conversation_id")
        validate_id(user_id, "user_id")
        read = _uint64(read_sequence, "read_sequence")
        reply = await self._write("read", conversation_id, [conversation_id, user_id, read])
        if reply[0] == b"NOOP":
            return ReadMarked(conversation_id, user_id, _num(reply[2]), _num(reply[1]), False)
        return await self._committed(reply[1])  # type: ignore[return-value]

    async def set_min_sequence(self, conversation_id: str, min_sequence: int) -> MinChanged:
        await trio.lowlevel.checkpoint_if_cancelled()
        validate_id(conversation_id, "conversation_id")
        value = _uint64(min_sequence, "min_sequence")
        reply = await self._write("min", conversation_id, [conversation_id, value])
        if reply[0] == b"NOOP":
            return MinChanged(conversation_id, _num(reply[2]), _num(reply[1]), False)
        return await self._committed(reply[1])  # type: ignore[return-value]

    async def add_members(self, conversation_id: str, user_ids: Sequence[str]) -> MembersAdded:
        await trio.lowlevel.checkpoint_if_cancelled()
        validate_id(conversation_id, "conversation_id")
        uids = _user_ids(user_ids)
        reply = await self._write(
            "add", conversation_id,
            [conversation_id, self.max_view_conversations, self.max_conversation_members, *uids],
            uids,
        )
        if reply[0] == b"NOOP":
            return MembersAdded(
                conversation_id, (), _num(reply[2]), _num(reply[3]), _num(reply[4]),
                _num(reply[1]), False,
            )
        return await self._committed(reply[1])  # type: ignore[return-value]

    async def remove_members(
        self, conversation_id: str, user_ids: Sequence[str], keep_history: bool
    ) -> MembersRemoved:
        await trio.lowlevel.checkpoint_if_cancelled()
        validate_id(conversation_id, "conversation_id")
        uids = _user_ids(user_ids)
        keep = "1" if keep_history else "0"
        reply = await self._write(
            "rm", conversation_id, [conversation_id, keep, self.max_tombstones, *uids], uids
        )
        if reply[0] == b"NOOP":
            return MembersRemoved(
                conversation_id, (), bool(keep_history), _num(reply[1]), False
            )
        return await self._committed(reply[1])  # type: ignore[return-value]

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
            index = await c.hkeys(self.view_key(user_id))
            cids = sorted(x.decode() for x in index)
            if not cids:
                return data
            async with c.pipeline(transaction=False) as pipe:
                reqs = [
                    self._row(keys=[self.conv_key(cid), self.members_key(cid)], args=[user_id],
                              client=pipe)
                    for cid in cids
                ]
            rows = [await r for r in reqs]
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis: {exc}") from None
        for cid, r in zip(cids, rows, strict=True):
            if not r:
                continue  # an index entry without a member row (a step in flight)
            mx, mn, tm, ps = (_num(x) for x in r[:4])
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
        position = _uint64(position, "position")
        c = self._check_readable()
        if position > self.position:
            return None
        try:
            async with c.pipeline(transaction=False) as pipe:
                r_h = pipe.get(self.horizon_key(user_id))
                r_t = pipe.zrangebyscore(self.tomb_key(user_id), f"({position}", "+inf")
            horizon = _num(await r_h or 0)
            if position < horizon:
                return None
            cids = [x.decode() for x in await r_t]
            if not cids:
                return []
            async with c.pipeline(transaction=False) as pipe:
                reqs = [pipe.hexists(self.members_key(cid), user_id) for cid in cids]
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
            return bool(await c.hexists(self.members_key(conversation_id), user_id))
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis: {exc}") from None

    async def conversation(self, conversation_id: str) -> ConversationState | None:
        await trio.lowlevel.checkpoint()
        validate_id(conversation_id, "conversation_id")
        c = self._check_readable()
        try:
            v = await c.hmget(self.conv_key(conversation_id), ["mx", "mn", "tm", "ps", "ac"])
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis: {exc}") from None
        if v[3] is None:
            return None
        return ConversationState(
            conversation_id, _num(v[0]), _num(v[1]), _num(v[2]), _num(v[4] or 0)
        )

    # ------------------------------------------------------------------ operator actions

    async def init_epoch(self, force: bool) -> tuple[bytes, bool]:
        """``seqactor store init``: create the epoch if missing; with ``force`` start a new one
        (also after Redis lost its data). The position counter moves to at least the current
        time in µs, so positions after the new epoch are above every position seen before.
        Returns (epoch, created)."""
        c = self._check_readable()
        current = await c.get(self._k_epoch)
        if current is not None and not force:
            return bytes(current), False
        fresh = os.urandom(EPOCH_BYTES)
        _, _, now_us = await self._posinfo()
        await self._floor(keys=[self._k_pos], args=[now_us])
        if self.cluster:
            await c.set(self._k_epoch_init, fresh)
            await self._write_slot_epochs(fresh, force=True)
        await c.set(self._k_epoch, fresh)
        await c.publish(self.channel, f"E{SEP}0".encode())
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
                keys=[self.conv_key(conversation_id), self.members_key(conversation_id)], args=[]
            )
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis: {exc}") from None
        if not r:
            return None
        data = MemberReads(conversation_id, _num(r[2]), _num(r[0]), _num(r[1]))
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
