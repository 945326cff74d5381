"""The Python SDK (Trio): :class:`Client` for apps, :class:`ServiceClient` for backends.

``Client`` keeps the user's view (conversation -> max, read, min, time; unread and the total),
the ``sync_token`` and, optionally, an on-disk cache; it reconnects by itself (exponential
backoff with full jitter, GoAway honoured), re-subscribes and resumes with
``GetSequences(since=token)``. ``ServiceClient`` allocates seqs and manages membership with
many requests in flight on one connection. See ``docs/client.md``.
"""

from __future__ import annotations

import logging
import os
import ssl
import weakref
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from seqactor import _kernel as kernel
from seqactor._proto import seqactor_pb2 as pb
from seqactor.client import _cache
from seqactor.client._backoff import Backoff
from seqactor.client._connection import (
    CONNECT_TIMEOUT_S,
    F_ACK,
    F_ALLOCATED,
    F_UPDATE,
    AuthenticationError,
    BadRequest,
    ClientClosed,
    ClientStats,
    ConnectError,
    ConnectionLost,
    Forbidden,
    Link,
    NotFound,
    RateLimited,
    SeqactorError,
    ServerError,
    SessionReplaced,
    TokenSource,
    TooLarge,
    Unavailable,
    _Endpoint,
    _Waiter,
    unwrap,
)
from seqactor.client._readcounts import ReadCounts, ReadCountsMixin, ReadCountsWatch, WatchMixin
from seqactor.protocol import ErrorCode, unread_count

log = logging.getLogger("seqactor.client")

CACHE_SAVE_INTERVAL_S = 1.0  # a changed view is written at most this often (and on close)
SERVICE_REQUEST_TIMEOUT_S = 30.0  # waiting for a connection + the reply

Row = tuple[int, int, int, int, bool]  # max, read, min, time_ms, frozen

__all__ = [
    "AuthenticationError", "BadRequest", "Allocation", "Change", "ChangeBatch", "ChangeStream",
    "Client", "ClientClosed", "ClientStats", "ConnectError", "ConnectionLost", "Conversation",
    "ErrorCode", "Forbidden", "NotFound", "RateLimited", "ReadCounts", "ReadCountsWatch",
    "SeqactorError", "ServerError",
    "ServiceClient", "SessionReplaced", "SyncInfo", "TooLarge", "Unavailable", "unread_count",
]


# ---------------------------------------------------------------------------------- types


@dataclass(frozen=True, slots=True)
class Conversation:
    """One conversation of the view, as the client holds it."""

    id: str
    max_sequence: int
    read_sequence: int
    min_sequence: int
    time_ms: int
    # True: the user left with keep_history; max, min and time stay as they were when they left
    # (it can still be marked read). A re-add makes it a member again (False).
    frozen: bool = False

    @property
    def unread(self) -> int:
        """Messages not yet read, cleared history excluded (see :func:`unread_count`)."""
        return unread_count(self.max_sequence, self.read_sequence, self.min_sequence)


@dataclass(frozen=True, slots=True)
class Change:
    """A conversation that changed: ``old`` is None when it joined the view, ``new`` is None
    when it left."""

    conversation_id: str
    old: Conversation | None
    new: Conversation | None


@dataclass(frozen=True, slots=True)
class ChangeBatch:
    """The changes since the previous batch (coalesced per conversation), and the total."""

    changes: tuple[Change, ...]
    total_unread: int

    def __len__(self) -> int:
        return len(self.changes)


@dataclass(frozen=True, slots=True)
class SyncInfo:
    """What the last resume/snapshot (``GetSequences`` of the whole view) brought."""

    full: bool  # True: a snapshot; False: a delta since our token
    conversations: int  # conversations in the reply
    removed: int
    bytes: int  # the reply frame on the wire (payload + WebSocket header)
    ms: float  # request sent -> reply applied
    since_token: bool  # we sent a token


@dataclass(frozen=True, slots=True)
class Allocation:
    first_sequence: int
    last_sequence: int
    time_ms: int


def _conv(cid: str, row: Row | None) -> Conversation | None:
    return None if row is None else Conversation(cid, *row)


def _unread(row: Row | None) -> int:
    return 0 if row is None else unread_count(row[0], row[1], row[2])


# ---------------------------------------------------------------------------------- changes


class ChangeStream:
    """Async iterator of :class:`ChangeBatch`. Pending changes coalesce per conversation (first
    ``old``, latest ``new``), so a slow consumer costs memory bounded by the view's size."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._pending: dict[str, tuple[Row | None, Row | None]] = {}
        self._event = trio.Event()
        self._closed = False

    def _add(self, changed: dict[str, tuple[Row | None, Row | None]]) -> None:
        pending = self._pending
        for cid, (old, new) in changed.items():
            prev = pending.get(cid)
            pending[cid] = (old if prev is None else prev[0], new)
        self._event.set()

    def _wake(self) -> None:
        self._event.set()

    def __aiter__(self) -> ChangeStream:
        return self

    async def __anext__(self) -> ChangeBatch:
        client = self._client
        while True:
            if self._pending:
                pending, self._pending = self._pending, {}
                changes = tuple(
                    Change(cid, _conv(cid, old), _conv(cid, new))
                    for cid, (old, new) in pending.items() if old != new
                )
                if changes:
                    return ChangeBatch(changes, client.total_unread)
                continue
            if client.error is not None:
                raise client.error
            if self._closed or client._closing:
                raise StopAsyncIteration
            await self._event.wait()
            self._event = trio.Event()

    def close(self) -> None:
        self._closed = True
        self._event.set()
        self._client._streams.discard(self)

    async def __aenter__(self) -> ChangeStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------- Client


class Client(WatchMixin, _Endpoint):
    """A user's live view of their conversations. Use :meth:`connect`."""

    def __init__(
        self, url: str, token: TokenSource, *, device_id: str = "",
        cache_path: str | os.PathLike[str] | None = None, subscribe_all: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(url, token, device_id=device_id, **kwargs)
        self.cache_path = cache_path
        self._view: dict[str, Row] = {}
        self._token_bytes = b""
        self._total_unread = 0
        self._sub_all = subscribe_all
        self._sub_ids: set[str] = set()
        self._recheck: set[str] = set()
        self._streams: weakref.WeakSet[ChangeStream] = weakref.WeakSet()
        self._dirty = False
        self._cache_user = ""
        self._synced = trio.Event()
        # True from a link's opening until its resume reply is applied: pushes meanwhile are
        # applied (values only move forward) but their token is not adopted. A push can
        # overtake the resume reply; were its token kept and the link cut before the reply,
        # the next resume would start after changes (a `removed`) this client never saw.
        self._resuming = False
        self._rc_watches: dict[str, list[ReadCountsWatch]] = {}  # read-count watches (§4.9)
        self.last_sync: SyncInfo | None = None
        self.syncs: list[SyncInfo] = []
        if cache_path is not None:
            self._load_cache()

    # ------------------------------------------------------------------ connect
    @classmethod
    @asynccontextmanager
    async def connect(
        cls, url: str, token: TokenSource, *, device_id: str = "",
        cache_path: str | os.PathLike[str] | None = None, subscribe_all: bool = True,
        offline_ok: bool = False, connect_timeout_s: float = CONNECT_TIMEOUT_S,
        backoff: Backoff | None = None, ssl_context: ssl.SSLContext | None = None,
        platform: str = "python", client_version: str = "",
    ) -> AsyncIterator[Client]:
        """Connect and sync; on exit close the connection and save the cache.

        The first connection must succeed (else :class:`ConnectError` /
        :class:`AuthenticationError`) unless ``offline_ok``: then the block is entered at once
        with the cached view and the client keeps trying in the background. After the first
        success, drops are retried forever; 4001 and 4009 stop the client and are raised
        (from pending calls, the change stream, and at the end of the ``async with``).
        """
        client = cls(
            url, token, device_id=device_id, cache_path=cache_path, subscribe_all=subscribe_all,
            connect_timeout_s=connect_timeout_s, backoff=backoff, ssl_context=ssl_context,
            platform=platform, client_version=client_version,
        )
        client._fail_first = not offline_ok
        async with _running(client, wait=not offline_ok):
            yield client

    # ------------------------------------------------------------------ the view
    @property
    def view(self) -> dict[str, Conversation]:
        """A copy of the whole view."""
        return {cid: Conversation(cid, *row) for cid, row in self._view.items()}

    def get(self, conversation_id: str) -> Conversation | None:
        """The local state of one conversation (None: not in the view)."""
        return _conv(conversation_id, self._view.get(conversation_id))

    def __len__(self) -> int:
        return len(self._view)

    def __contains__(self, conversation_id: object) -> bool:
        return conversation_id in self._view

    @property
    def total_unread(self) -> int:
        return self._total_unread

    @property
    def sync_token(self) -> bytes:
        return self._token_bytes

    def rows(self) -> dict[str, tuple[int, int, int, int]]:
        """The view as plain tuples ``(max, read, min, time_ms)`` (a copy; ``get(id).frozen``
        tells a frozen row)."""
        return {cid: row[:4] for cid, row in self._view.items()}

    def changes(self) -> ChangeStream:
        """A new change stream; it sees every change applied after this call."""
        stream = ChangeStream(self)
        self._streams.add(stream)
        return stream

    # ------------------------------------------------------------------ operations
    async def _call(self, kind: str, body: Any, meta: Any = None) -> tuple[int, bytes]:
        """Send when synced; a drop re-sends on the next link (user ops are idempotent)."""
        while True:
            link = await self._wait_link()
            try:
                return await self._request(link, kind, body, meta)
            except ConnectionLost:
                await trio.lowlevel.checkpoint()
                continue

    async def wait_synced(self) -> None:
        """Wait until the client is connected and its view is in sync with the server."""
        await self._wait_link()

    async def fetch(self, conversation_ids: Iterable[str]) -> dict[str, Conversation]:
        """Ask the server for the current state of these conversations (``GetSequences``)
        and apply it; ids outside the view are absent from the result (and dropped locally)."""
        ids = list(dict.fromkeys(conversation_ids))
        await self._call("get_sequences", pb.GetSequences(conversation_ids=ids), ("get", ids))
        return {cid: c for cid in ids if (c := self.get(cid)) is not None}

    async def subscribe(self, conversation_ids: Iterable[str] = (), *, all: bool = False) -> None:
        """Follow these conversations (or the whole view, with ``all``); kept across reconnects."""
        ids = list(conversation_ids)
        await self._call("subscribe", pb.Subscribe(conversation_ids=ids, all=all))
        self._sub_ids.update(ids)
        self._sub_all = self._sub_all or all

    async def unsubscribe(self, conversation_ids: Iterable[str] = (), *, all: bool = False) -> None:
        ids = list(conversation_ids)
        if all:
            self._sub_all = False
            self._sub_ids.clear()
        self._sub_ids.difference_update(ids)
        await self._call("unsubscribe", pb.Unsubscribe(conversation_ids=ids, all=all))

    async def mark_read(self, conversation_id: str, read_sequence: int | None = None) -> int:
        """Mark read up to ``read_sequence`` (default: the local max); returns the effective
        read seq from the server's ``Ack`` (already applied to the view)."""
        if read_sequence is None:
            row = self._view.get(conversation_id)
            read_sequence = row[0] if row is not None else 0
        _f, body = await self._call(
            "mark_read", pb.MarkRead(conversation_id=conversation_id, read_sequence=read_sequence),
            ("mark_read", conversation_id),
        )
        return pb.Ack.FromString(body).read_sequence

    async def set_background(self, background: bool) -> None:
        """In background the server holds (and coalesces) pushes; back in foreground it
        flushes them at once. Pings are 4x less frequent in background."""
        self._background = background
        await self._call("set_background", pb.SetBackground(background=background))

    # ------------------------------------------------------------------ link hooks
    async def _on_open(self, link: Link) -> None:
        self._synced = trio.Event()
        user = link.welcome.user_id
        if self._cache_user and self._cache_user != user:
            log.warning(
                "seqactor cache belongs to user %r, not %r: ignored; doing a full sync",
                self._cache_user, user,
            )
            self._token_bytes = b""
        self._cache_user = user
        self._resuming = True
        # Subscribe first, then sync: pushes that arrive between the two are older than the
        # sync reply and are applied before it, in order (the server runs a session's user
        # ops one at a time).
        sub = None
        if self._sub_all or self._sub_ids:
            sub = await self._start(
                link, "subscribe",
                pb.Subscribe(all=self._sub_all, conversation_ids=sorted(self._sub_ids)),
            )
        since = self._token_bytes
        get = await self._start(
            link, "get_sequences", pb.GetSequences(since=since), ("sync", since)
        )
        bg = None
        if self._background:
            bg = await self._start(link, "set_background", pb.SetBackground(background=True))
        forbidden = False
        if sub is not None:
            try:
                await sub.wait()
            except Forbidden:
                forbidden = True  # a listed conversation left the view meanwhile
        await get.wait()
        if bg is not None:
            await bg.wait()
        if forbidden:
            self._sub_ids &= self._view.keys()
            if self._sub_ids or self._sub_all:
                await self._request(link, "subscribe", pb.Subscribe(
                    all=self._sub_all, conversation_ids=sorted(self._sub_ids)))
        recheck = sorted(self._recheck | (self._sub_ids if forbidden else set()))
        if recheck:
            await self._request(
                link, "get_sequences", pb.GetSequences(conversation_ids=recheck),
                ("get", recheck),
            )
            self._recheck.clear()
        await self._rewatch_read_counts(link)
        link.ready = True
        self._synced.set()
        self._notify()

    def _on_close(self, link: Link) -> None:
        # MarkReads without an Ack: a push may have carried a token past our own read (the
        # server defers it to the Ack), so re-read those conversations after the resume.
        for waiter in link.waiters.values():
            if waiter.meta is not None and waiter.meta[0] == "mark_read":
                self._recheck.add(waiter.meta[1])

    def _on_push(self, body: bytes, size: int) -> None:
        convs, token, full, removed = kernel.decode_update(body)
        self._apply(convs, b"" if self._resuming else token, full, removed)

    def _on_reply(self, waiter: _Waiter, field: int, body: bytes, size: int) -> None:
        meta = waiter.meta
        if meta is None:
            return
        what = meta[0]
        if what == "mark_read" and field == F_ACK:
            read = pb.Ack.FromString(body).read_sequence
            row = self._view.get(meta[1])
            if row is not None and read > row[1]:
                self._apply({meta[1]: kernel.ConversationSeqs(0, read, 0, 0)}, b"", False, [])
        elif what == "sync" and field == F_UPDATE:
            convs, token, full, removed = kernel.decode_update(body)
            self._apply(convs, token, full, removed)
            self._resuming = False
            info = SyncInfo(
                full=full, conversations=len(convs), removed=len(removed), bytes=size,
                ms=(trio.current_time() - waiter.sent_at) * 1000.0, since_token=bool(meta[1]),
            )
            self.last_sync = info
            self.syncs.append(info)
            del self.syncs[:-16]
        elif what == "get" and field == F_UPDATE:
            convs, _token, _full, removed = kernel.decode_update(body)
            gone = [cid for cid in meta[1] if cid not in convs and cid in self._view]
            self._apply(convs, b"", False, list(removed) + gone)

    def _on_fatal(self, err: SeqactorError) -> None:
        for stream in list(self._streams):
            stream._wake()
        self._end_watches(err)

    # ------------------------------------------------------------------ applying updates
    def _apply(
        self, convs: dict[str, kernel.ConversationSeqs], token: bytes, full: bool,
        removed: list[str],
    ) -> None:
        """Apply one update. Fields equal to 0 leave values as they are; ``removed`` drops;
        ``full`` replaces. Outside a snapshot, seqs only move forward (a conversation's max,
        a member's read and min never decrease), so a late frame cannot roll a value back.
        ``membership`` 2 freezes a row, 1 makes it a member again; 0 keeps what it was (in a
        snapshot, or for a row new to the view: a member)."""
        view = self._view
        changed: dict[str, tuple[Row | None, Row | None]] = {}
        if full:
            for cid in [c for c in view if c not in convs]:
                changed[cid] = (view.pop(cid), None)
        for cid, seqs in convs.items():
            old = view.get(cid)
            mx, rd, mn, tm, mb = seqs.astuple()  # the view holds plain tuples
            if old is None or full:
                new = (mx, rd, mn, tm, mb == 2)
            else:
                omx, ord_, omn, otm, ofz = old
                if mx >= omx and mx:
                    nmx, ntm = mx, (tm or otm)
                else:
                    nmx, ntm = omx, otm
                new = (
                    nmx, rd if rd > ord_ else ord_, mn if mn > omn else omn, ntm,
                    mb == 2 if mb else ofz,
                )
            if new != old:
                view[cid] = new
                changed[cid] = (old, new)
        for cid in removed:
            dropped = view.pop(cid, None)
            if dropped is not None:
                prev = changed.get(cid)
                changed[cid] = (prev[0] if prev is not None else dropped, None)
        if token:
            if token != self._token_bytes:
                self._dirty = True
            self._token_bytes = token
        if not changed:
            return
        if self._rc_watches:  # a read-count watch ends when its conversation leaves the view
            self._watches_left([cid for cid, (_, after) in changed.items() if after is None])
        total = self._total_unread
        for before, after in changed.values():
            total += _unread(after) - _unread(before)
        self._total_unread = total
        self._dirty = True
        for stream in list(self._streams):
            stream._add(changed)

    # ------------------------------------------------------------------ cache
    def _load_cache(self) -> None:
        assert self.cache_path is not None
        data = _cache.load(self.cache_path)
        if data is None:
            return
        self._view = dict(data.view)
        self._token_bytes = data.token
        self._cache_user = data.user
        self._total_unread = sum(_unread(r) for r in self._view.values())

    def _cache_bytes(self) -> bytes:
        return _cache.encode(_cache.CacheData(
            user=self._cache_user, url=self.url, token=self._token_bytes, view=self._view,
        ))

    async def save_cache(self) -> None:
        """Write the view and token now (atomically); a no-op without ``cache_path``."""
        if self.cache_path is None or not self._cache_user:
            return
        raw = self._cache_bytes()  # view and token from the same instant
        self._dirty = False
        await trio.to_thread.run_sync(_cache.write_atomic, self.cache_path, raw)

    async def _cache_loop(self) -> None:
        while True:
            await trio.sleep(CACHE_SAVE_INTERVAL_S)
            if self._dirty:
                try:
                    await self.save_cache()
                except OSError as exc:
                    log.warning("seqactor cache %s not written: %s", self.cache_path, exc)

    async def _aclose(self) -> None:
        await self._shutdown()
        for stream in list(self._streams):
            stream._wake()
        self._end_watches(None)
        if self.cache_path is not None and self._dirty:
            with trio.CancelScope(shield=True):
                try:
                    await self.save_cache()
                except OSError as exc:
                    log.warning("seqactor cache %s not written: %s", self.cache_path, exc)


# ---------------------------------------------------------------------------------- service


class ServiceClient(ReadCountsMixin, _Endpoint):
    """A backend's connection (service token). Requests run concurrently on one connection.

    A request in flight when the connection drops raises :class:`ConnectionLost` (it may or
    may not have been applied: allocation is not idempotent, the caller decides). Errors from
    the server raise :class:`ServerError` subclasses carrying ``code``.
    """

    def __init__(
        self, url: str, token: TokenSource, *,
        request_timeout_s: float = SERVICE_REQUEST_TIMEOUT_S, **kwargs: Any,
    ) -> None:
        super().__init__(url, token, **kwargs)
        self.request_timeout_s = request_timeout_s

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, url: str, token: TokenSource, *, device_id: str = "",
        request_timeout_s: float = SERVICE_REQUEST_TIMEOUT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S, backoff: Backoff | None = None,
        ssl_context: ssl.SSLContext | None = None, offline_ok: bool = False,
    ) -> AsyncIterator[ServiceClient]:
        client = cls(
            url, token, device_id=device_id, request_timeout_s=request_timeout_s,
            connect_timeout_s=connect_timeout_s, backoff=backoff, ssl_context=ssl_context,
            platform="service",
        )
        client._fail_first = not offline_ok
        async with _running(client, wait=not offline_ok):
            yield client

    async def _call(self, kind: str, body: Any) -> tuple[int, bytes]:
        with trio.move_on_after(self.request_timeout_s) as cs:
            link = await self._wait_link()
            return await self._request(link, kind, body)
        assert cs.cancelled_caught
        raise ConnectionLost(
            f"no reply within {self.request_timeout_s:.0f}s"
            + (f" (last error: {self.last_error})" if self.last_error else "")
        )

    async def allocate(
        self, conversation_id: str, count: int = 1, sender_user_id: str | None = None
    ) -> Allocation:
        """Allocate the next ``count`` seqs (creating the conversation if new)."""
        field, body = await self._call("allocate_sequences", pb.AllocateSequences(
            conversation_id=conversation_id, count=count, sender_user_id=sender_user_id or "",
        ))
        if field != F_ALLOCATED:
            raise ServerError(ErrorCode.INTERNAL, f"unexpected reply (field {field})")
        a = pb.Allocated.FromString(body)
        return Allocation(a.first_sequence, a.last_sequence, a.time_ms)

    async def add_members(self, conversation_id: str, user_ids: Iterable[str]) -> None:
        await self._call("add_members", pb.AddMembers(
            conversation_id=conversation_id, user_ids=list(user_ids)))

    async def remove_members(
        self, conversation_id: str, user_ids: Iterable[str], keep_history: bool = False
    ) -> None:
        await self._call("remove_members", pb.RemoveMembers(
            conversation_id=conversation_id, user_ids=list(user_ids), keep_history=keep_history))

    async def set_min_sequence(self, conversation_id: str, min_sequence: int) -> None:
        await self._call("set_min_sequence", pb.SetMinSequence(
            conversation_id=conversation_id, min_sequence=min_sequence))

    async def _aclose(self) -> None:
        await self._shutdown()


# ---------------------------------------------------------------------------------- running


@asynccontextmanager
async def _running(client: Client | ServiceClient, wait: bool) -> AsyncIterator[None]:
    """Run the client's tasks around the caller's block; re-raise a fatal error at the end."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_supervise, client, nursery.cancel_scope)
            if isinstance(client, Client) and client.cache_path is not None:
                nursery.start_soon(client._cache_loop)
            try:
                if wait:
                    await client._wait_link()
                yield
            finally:
                await client._aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        leaf = unwrap(group)
        if leaf is group:
            raise
        raise leaf from None
    if client.error is not None and not isinstance(client.error, ClientClosed):
        raise client.error


async def _supervise(client: Client | ServiceClient, scope: trio.CancelScope) -> None:
    await client._run()
    if client.error is not None and not client._closing:
        scope.cancel()  # a fatal error ends the caller's block; raised after it
