"""The Redis Cluster write path of the Redis store (a mixin of :class:`RedisStore`).

The position counter lives in one slot and a conversation in another, so a write takes steps.

**Allocations, MarkReads, SetMins** go in batches (:meth:`ClusterWrites._cluster_batcher`):

1. dry runs (MarkRead, SetMin) — a no-op answers at once and takes no position;
2. one sequencer call reserves the positions of the whole batch (``INCRBY n``);
3. the commits, each with its position. A commit refuses a
   position older than the conversation's last (another node got a later one in first:
   ``RETRY``, the op goes into the next batch) or handed out more than ``op_deadline`` ago;
   a position that does not commit is published as a skip by the same script call.

Every stage is one ``OPX`` script call per master (``lua/xbatch.lua``, flag
``allow-cross-slot-keys``), on a direct connection to it, the masters concurrently: it runs
the ops of every slot that master serves, their keys in ARGV. A slot that moved fails its op
at the first key access (the epoch check, before any write): ``RETRY``, the slot map is read
again and the op goes into the next batch.

A conversation in a running batch waits for the next batch, so a node commits the positions
of one conversation in order.

**Membership** ops (rare, several users' slots) take the steps one at a time under a
per-conversation lock in this node: dry run; a position; user-slot pre-steps (index a joining
conversation; tombstone a leaving one); the op in the conversation's slot; user-slot
post-steps (drop the index entry of a removal unless a later join indexed it again; undo
pre-steps of users the op did not change). Readers tolerate the windows between steps: a view
index entry without a member row is ignored; a tombstone of a conversation still in the view
is ignored. The user index is written *before* a join commits and cleared *after* a removal
commits, so a reader never misses a conversation that is in the view. With ``wait_replicas``
each writing step runs on its master's direct connection followed by ``WAIT``: a pre-step not
replicated in time refuses the change before it commits (position skipped, steps undone); a
commit or post-step not replicated refuses only the acknowledgement (the change stands).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import coredis
import trio
from coredis.exceptions import RedisError
from coredis.retry import NoRetryPolicy

from seqactor.store import _redis_lua as lua
from seqactor.store._base import Change, TooLarge, Unavailable
from seqactor.store._redis_events import parse_change, skip_payload, to_int
from seqactor.store._redis_keys import CLUSTER_SLOTS, KeyLayout, hash_slot, slot_tags
from seqactor.store._redis_sub import Pipelined, RespError, SubscriptionLost, connect

log = logging.getLogger("seqactor.store.redis")

COMMAND_TIMEOUT_S = 5.0  # a Redis command's reply must arrive within this
CONNECT_TIMEOUT_S = 2.0  # connecting to a Redis node
MAX_CLUSTER_RETRIES = 50  # an op that keeps meeting later positions: Unavailable
MAX_BATCH_OPS = 256  # operations sent in one batch
CLUSTER_MAX_INFLIGHT_BATCHES = 4  # cluster: batches in flight (each takes 2-3 stages)
BATCHED_CLUSTER_OPS = frozenset({"alloc", "read", "min"})  # membership ops take user steps


class Job:
    """A write waiting for a batcher: the OP script's ``op`` on conversation ``cid`` with its
    own arguments ``argv``; the shared arguments (epoch, mode, position) are added when the
    batch runs. ``done`` is set once ``reply`` or ``error`` is."""

    __slots__ = ("keys", "argv", "op", "cid", "tries", "reply", "error", "done")

    def __init__(self, keys: list[str], argv: list[Any], op: str = "", cid: str = "") -> None:
        self.keys = keys
        self.argv = argv
        self.op = op
        self.cid = cid
        self.tries = 0
        self.reply: list[Any] | None = None
        self.error: BaseException | None = None
        self.done = trio.Event()


class Retry(Exception):
    """The epoch changed under an operation: it was switched; run the operation again."""



class ClusterWrites:
    """The cluster steps; :class:`~seqactor.store.redis.RedisStore` provides the rest."""

    keys: KeyLayout
    epoch: bytes
    max_view_conversations: int
    max_tombstones: int
    _client: Any
    _username: str | None
    _password: str | None
    _op: Any
    _seq: Any
    _user: Any
    _queue: list[Job]
    _batch_wake: trio.Event
    _inflight_cids: dict[str, int]
    _slot_map: list[tuple[str, int]] | None
    _masters: dict[tuple[str, int], Pipelined]
    _master_requests: trio.MemorySendChannel[tuple[tuple[str, int], trio.Event]]
    _opx_sha: str
    op_deadline_s: float
    wait_replicas: int
    wait_timeout_ms: int
    _conv_locks: dict[str, tuple[trio.Lock, int]]

    if TYPE_CHECKING:  # provided by RedisStore (no runtime stubs: they would shadow)

        def _receive(self, pos: int, change: Change | None) -> None: ...

        def _argv(self, op: str, mode: str, pos: int = 0, pt: int = 0) -> list[Any]: ...

        def _batch_call(
            self, mode: str, pt: int, ops: list[tuple[list[str], str, int, list[Any]]]
        ) -> tuple[list[str], list[Any]]: ...

        async def _call(
            self, script: Any, keys: Sequence[str], args: Sequence[Any]
        ) -> list[Any]: ...

        async def _check(self, reply: list[Any]) -> list[Any]: ...

        def _take_replies(self, jobs: Sequence[Job], replies: Sequence[list[Any]]) -> None: ...

        def _batch_replies(self, blob: bytes) -> list[list[Any]]: ...

    async def _write_slot_epochs(self, epoch: bytes, force: bool) -> None:
        """Cluster: the epoch copy in every slot, one script call per master."""
        tags = slot_tags()
        for shard in await self._client.cluster_shards():
            ranges = shard[b"slots"]  # [lo, hi, lo, hi, ...]
            master = next(n for n in shard[b"nodes"] if n[b"role"] == b"master")
            keys = [
                f"{self.keys.prefix}{{{tags[s]}}}:e"
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

    # ------------------------------------------------------------------ cluster batching

    async def _cluster_batcher(self) -> None:
        """Cluster: concurrent allocations, MarkReads and SetMins go in batches. A batch takes
        at most one step per slot per stage: dry runs (MarkRead, SetMin: a no-op takes no
        position), one sequencer call reserving the positions of the whole batch, then the
        commits — every stage's per-slot script calls run concurrently. Conversations in a
        running batch wait for the next one, so one node commits a conversation's positions in
        order (another node's later position in between: ``RETRY``, the op goes again)."""
        slots = trio.Semaphore(CLUSTER_MAX_INFLIGHT_BATCHES)
        async with trio.open_nursery() as nursery:
            while True:
                await self._batch_wake.wait()
                self._batch_wake = trio.Event()
                while self._queue:
                    await slots.acquire()
                    batch = self._take_cluster_batch()
                    if not batch:
                        slots.release()
                        break  # every queued op waits for a running batch
                    nursery.start_soon(self._run_cluster_batch, batch, slots)

    def _take_cluster_batch(self) -> list[Job]:
        busy = self._inflight_cids
        batch: list[Job] = []
        rest: list[Job] = []
        for job in self._queue:
            if len(batch) < MAX_BATCH_OPS and job.cid not in busy:
                batch.append(job)
            else:
                rest.append(job)
        self._queue = rest
        for job in batch:
            busy[job.cid] = busy.get(job.cid, 0) + 1
        return batch

    async def _refresh_slot_map(self) -> list[tuple[str, int]]:
        """Which master serves each slot (``CLUSTER SHARDS``), as (host, port) by slot."""
        owners: list[tuple[str, int]] = [("", 0)] * CLUSTER_SLOTS
        for shard in await self._client.cluster_shards():
            master = next(n for n in shard[b"nodes"] if n[b"role"] == b"master")
            addr = (master[b"ip"].decode(), int(master[b"port"]))
            ranges = shard[b"slots"]
            for lo, hi in zip(ranges[::2], ranges[1::2], strict=True):
                for slot in range(int(lo), int(hi) + 1):
                    owners[slot] = addr
        self._slot_map = owners
        return owners

    async def _master_client(self, addr: tuple[str, int]) -> Pipelined:
        """The direct connection to one master, opened (once) by :meth:`_master_clients`."""
        client = self._masters.get(addr)
        if client is not None:
            return client
        opened = trio.Event()
        await self._master_requests.send((addr, opened))
        await opened.wait()
        client = self._masters.get(addr)
        if client is None:
            raise Unavailable(f"cannot connect to the Redis Cluster master {addr[0]}:{addr[1]}")
        return client

    async def _master_clients(
        self, requests: trio.MemoryReceiveChannel[tuple[tuple[str, int], trio.Event]]
    ) -> None:
        """Owns the direct master connections (:class:`Pipelined`, opened on request, closed
        with the store; one that fails is dropped and opened again on the next request)."""
        async with trio.open_nursery() as nursery:
            async for addr, opened in requests:
                if addr not in self._masters:
                    try:
                        conn = await connect(addr[0], addr[1], self._username, self._password)
                    except SubscriptionLost as exc:
                        log.warning("redis store: cannot connect to master %s:%d: %s",
                                    addr[0], addr[1], exc)
                    else:
                        pipe = Pipelined(conn, COMMAND_TIMEOUT_S)
                        self._masters[addr] = pipe
                        nursery.start_soon(self._run_master, addr, pipe)
                opened.set()

    async def _run_master(self, addr: tuple[str, int], pipe: Pipelined) -> None:
        async with pipe.conn.stream:
            try:
                await pipe.run()
            except SubscriptionLost as exc:
                log.warning("redis store: connection to master %s:%d lost: %s",
                            addr[0], addr[1], exc)
            finally:
                if self._masters.get(addr) is pipe:
                    del self._masters[addr]

    async def _master_eval(
        self, addr: tuple[str, int], script: str, sha: str, keys: Sequence[str],
        args: Sequence[Any], wait: int = 0,
    ) -> tuple[Any, int]:
        """A script call on one master's direct connection: (reply, replicas that confirmed).
        With ``wait``, ``WAIT wait timeout`` follows the script on the same connection (one
        pipeline), so it counts the replicas that have these writes. An error reply raises
        RespError (``MOVED ...``: the slot is another master's; nothing ran), a failed
        connection SubscriptionLost."""
        pipe = await self._master_client(addr)
        cmd = ("EVALSHA", sha, len(keys), *keys, *args)
        waits = [("WAIT", wait, self.wait_timeout_ms)] if wait else []
        replies = await pipe.call(cmd, *waits)
        if isinstance(replies[0], RespError) and str(replies[0]).startswith("NOSCRIPT"):
            await pipe.call(("SCRIPT", "LOAD", script))  # nothing ran: load it, send again
            replies = await pipe.call(cmd, *waits)
        for r in replies:
            if isinstance(r, RespError):
                raise r
        return replies[0], (int(replies[1]) if wait else 0)  # type: ignore[call-overload]

    async def _slot_calls(
        self, mode: str, pt: int, calls: list[tuple[list[str], str, int, list[Any]]]
    ) -> list[list[Any]]:
        """Run OP operations — (keys, op, position, own arguments) each — grouped by the master
        serving their slot: one ``OPX`` call per master (which also publishes the skip of a
        position that did not commit), the masters concurrently. Replies in the order of
        ``calls``; a master whose call failed gets ``[b"FAILED", error]`` for its ops (their
        positions may or may not commit: readers close the hole after the gap timeout), and
        the slot map is read again before the next call."""
        owners = self._slot_map or await self._refresh_slot_map()
        groups: dict[tuple[str, int], list[int]] = {}
        for i, call in enumerate(calls):
            groups.setdefault(owners[hash_slot(call[0][2].encode())], []).append(i)
        out: list[list[Any]] = [[] for _ in calls]
        deadline_us = int(self.op_deadline_s * 1e6)

        async def one(addr: tuple[str, int], idx: list[int]) -> None:
            args: list[Any] = ["xbatch", len(idx), self.epoch, mode, pt, deadline_us,
                               self.keys.channel]
            for i in idx:
                keys, op, pos, own = calls[i]
                args += (len(own) + 5, keys[0], keys[2], keys[3], op, pos, *own)
            wait = self.wait_replicas if mode == "c" else 0
            try:
                blob, acked = await self._master_eval(addr, lua.OPX, self._opx_sha, (), args, wait)
                replies = self._batch_replies(blob)
            except (RespError, SubscriptionLost, Unavailable, ValueError) as exc:
                self._slot_map = None
                for i in idx:
                    out[i] = [b"FAILED", exc]
                return
            for i, r in zip(idx, replies, strict=True):
                out[i] = r
                if out[i][:2] == [b"RETRY", b"MOVED"]:
                    self._slot_map = None
                elif out[i][0] == b"OK" and acked < wait:
                    out[i] = [b"FAILED", Unavailable(
                        f"only {acked} of {wait} replicas of {addr[0]}:{addr[1]} confirmed the "
                        f"write within {self.wait_timeout_ms} ms (it may still survive a "
                        "failover)")]

        if len(groups) == 1:
            addr, idx = next(iter(groups.items()))
            await one(addr, idx)
        else:
            async with trio.open_nursery() as nursery:
                for addr, idx in groups.items():
                    nursery.start_soon(one, addr, idx)
        return out

    async def _run_cluster_batch(self, batch: list[Job], slots: trio.Semaphore) -> None:
        requeue: list[Job] = []
        try:
            dry = [j for j in batch if j.op != "alloc"]
            if dry:
                replies = await self._slot_calls(
                    "d", 0, [(j.keys, j.op, 0, j.argv) for j in dry])
                for job, r in zip(dry, replies, strict=True):
                    if r[0] == b"FAILED":
                        job.error = Unavailable(f"Redis: {r[1]}")
                    elif r[0] == b"RETRY" and job.tries < MAX_CLUSTER_RETRIES:
                        job.tries += 1  # the slot moved: again in the next batch
                        requeue.append(job)
                    elif r[0] != b"NEED":
                        job.reply = r  # NOOP or an error: no position taken
            again0 = {id(j) for j in requeue}
            todo = [j for j in batch
                    if j.reply is None and j.error is None and id(j) not in again0]
            if todo:
                seq = await self._sequence(len(todo))
                if seq[0] != b"OK":
                    for job in todo:
                        job.reply = list(seq)
                    return
                first, pt = int(seq[1]), to_int(seq[2])
                replies = await self._slot_calls(
                    "c", pt, [(j.keys, j.op, first + i, j.argv) for i, j in enumerate(todo)])
                committed = [(job, r) for job, r in zip(todo, replies, strict=True)
                             if r[0] == b"OK"]
                self._take_replies([j for j, _ in committed], [r for _, r in committed])
                for i, (job, r) in enumerate(zip(todo, replies, strict=True)):
                    if r[0] == b"OK":
                        continue
                    if r[0] == b"FAILED":  # (too few replicas: committed, Pub/Sub brings it)
                        job.error = (r[1] if isinstance(r[1], Unavailable)
                                     else Unavailable(f"Redis: {r[1]}"))
                        continue
                    self._receive(first + i, None)  # the script published the skip
                    if r[0] == b"RETRY" and job.tries < MAX_CLUSTER_RETRIES:
                        job.tries += 1
                        requeue.append(job)
                    elif r[0] == b"RETRY":
                        job.error = Unavailable("too much contention on the conversation")
                    else:
                        job.reply = r
        except (RedisError, OSError, trio.BrokenResourceError, ValueError, Unavailable) as exc:
            again = {id(j) for j in requeue}
            for job in batch:
                if job.reply is None and id(job) not in again:
                    job.error = Unavailable(f"Redis: {exc}")
        finally:
            slots.release()
            busy = self._inflight_cids
            for job in batch:
                n = busy[job.cid] - 1
                if n:
                    busy[job.cid] = n
                else:
                    del busy[job.cid]
            again = {id(j) for j in requeue}
            if requeue:
                self._queue[:0] = requeue
            self._batch_wake.set()
            for job in batch:
                if id(job) in again:
                    continue
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
        payload = skip_payload(pos)
        self._receive(pos, None)
        try:
            await self._client.publish(self.keys.channel, payload)
        except (RedisError, OSError) as exc:  # readers close the hole after the gap timeout
            log.warning("redis store: could not publish skip of %d: %s", pos, exc)

    async def _user_step(
        self, step: str, uid: str, cid: str, pos: int, extra: Any = "",
        short: list[str] | None = None,
    ) -> list[Any]:
        vk = self.keys.view_key(uid)
        keys = [self.keys.slot_epoch_key(vk), *self.keys.user_keys(uid)]
        return await self._waited_call(
            self._user, keys, [step, self.epoch, cid, pos, extra], short)

    async def _waited_call(
        self, script: Any, keys: list[str], args: list[Any], short: list[str] | None
    ) -> list[Any]:
        """A writing script call of a membership step (every key in one slot). With
        ``wait_replicas`` (and ``short``, a list: undo steps pass none) it runs on the direct
        connection to the slot's master, followed by ``WAIT`` in one pipeline; a master whose
        replicas do not confirm in time is named in ``short`` (the write stands: the caller
        decides)."""
        if not self.wait_replicas or short is None:
            return await self._call(script, keys, args)
        wait = self.wait_replicas
        for attempt in range(2):
            owners = self._slot_map or await self._refresh_slot_map()
            addr = owners[hash_slot(keys[-1].encode())]
            try:
                reply, acked = await self._master_eval(
                    addr, script.script, script.sha, keys, args, wait)
            except RespError as exc:
                self._slot_map = None
                if str(exc).startswith("MOVED") and attempt == 0:
                    continue  # nothing ran: the slot moved; once more on its master
                raise Unavailable(f"Redis: {exc}") from None
            except SubscriptionLost as exc:
                self._slot_map = None
                raise Unavailable(f"Redis: {exc}") from None
            if acked < wait and short is not None:
                short.append(f"only {acked} of {wait} replicas of {addr[0]}:{addr[1]} confirmed "
                             f"the write within {self.wait_timeout_ms} ms (it may still survive "
                             "a failover)")
            return list(reply)
        raise AssertionError("unreachable")

    async def _sequence(self, n: int) -> list[Any]:
        """Reserve ``n`` positions (the sequencer script) on the meta slot's master directly:
        ``[b"OK", first, time]`` or an error reply of the script."""
        keys = [self.keys.epoch, self.keys.pos, self.keys.pos_time]
        owners = self._slot_map or await self._refresh_slot_map()
        try:
            reply, _ = await self._master_eval(
                owners[hash_slot(self.keys.pos.encode())], self._seq.script, self._seq.sha, keys,
                [self.epoch, n])
        except (RespError, SubscriptionLost) as exc:
            self._slot_map = None
            raise Unavailable(f"Redis: {exc}") from None
        return list(reply)

    async def _cluster_steps(
        self, op: str, cid: str, args: list[Any], users: Sequence[str]
    ) -> list[Any]:
        keys = self.keys.base_keys(cid)
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
                await self._call(
                    self._seq, [self.keys.epoch, self.keys.pos, self.keys.pos_time], [self.epoch])
            )
            pos, pt = int(seq[1]), to_int(seq[2])
            done: list[tuple[str, str]] = []  # (undo step, user) of pre-steps taken
            short: list[str] = []  # with wait_replicas: masters whose replicas fell short
            try:
                if op == "add":
                    for u in need:
                        await self._check(await self._user_step(
                            "join", u, cid, pos, self.max_view_conversations, short))
                        done.append(("unjoin", u))
                elif op == "rm" and args[1] == "0":
                    for u in need:
                        await self._check(await self._user_step(
                            "tomb", u, cid, pos, self.max_tombstones, short))
                        done.append(("untomb", u))
                if short:  # a pre-step is not replicated: refuse before anything commits
                    raise Unavailable(short[0])
                reply = await self._waited_call(
                    self._op, keys, self._argv(op, "c", pos, pt) + args, short)
            except BaseException:
                await self._skip(pos)
                await self._undo(done, cid, pos)
                raise
            if reply[0] == b"OK":  # committed: no skip from here on, whatever fails
                _, _, change = parse_change(reply[1])
                changed = set(getattr(change, "user_ids", ()))
                undo = [(s, u) for s, u in done if u not in changed]
                await self._undo(undo, cid, pos)
                if op == "rm" and args[1] == "0":
                    for u in changed:
                        await self._check(await self._user_step("left", u, cid, pos, "", short))
                if short:  # committed and published: only the acknowledgement is refused
                    raise Unavailable(short[0])
                return reply
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
            reqs = [pipe.hlen(self.keys.view_key(u)) for u in users]
        for u, r in zip(users, reqs, strict=True):
            if await r + 1 > self.max_view_conversations:
                raise TooLarge(
                    f"the view of {u!r} would exceed {self.max_view_conversations} conversations"
                )
