"""``Client``, the Python SDK for apps (Trio); backends use
:class:`~seqactor.client.ServiceClient`.

``Client`` keeps the user's view (conversation -> max, read, min, time; unread and the total),
the ``sync_token`` and, optionally, an on-disk cache; it reconnects by itself (exponential
backoff with full jitter, GoAway honoured), re-subscribes and resumes with
``GetSequences(since=token)``. See ``docs/client.md``.
"""

from __future__ import annotations

import logging
import os
import ssl
import weakref
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

from seqactor import _kernel as kernel
from seqactor._proto import seqactor_pb2 as pb
from seqactor.client import _cache
from seqactor.client._backoff import Backoff
from seqactor.client._changes import ChangeStream
from seqactor.client._connection import (
    CONNECT_TIMEOUT_S,
    F_ACK,
    F_UPDATE,
    ConnectionLost,
    Forbidden,
    Link,
    SeqactorError,
    TokenSource,
    _Endpoint,
    _Waiter,
    connected,
)
from seqactor.client._readcounts import ReadCountsWatch, WatchMixin
from seqactor.client._records import Conversation, Row, SyncInfo, conversation_of, unread_of

log = logging.getLogger("seqactor.client")

CACHE_SAVE_INTERVAL_S = 1.0  # a changed view is written at most this often (and on close)



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
    def connect(
        cls, url: str, token: TokenSource, *, device_id: str = "",
        cache_path: str | os.PathLike[str] | None = None, subscribe_all: bool = True,
        offline_ok: bool = False, connect_timeout_s: float = CONNECT_TIMEOUT_S,
        backoff: Backoff | None = None, ssl_context: ssl.SSLContext | None = None,
        platform: str = "python", client_version: str = "",
    ) -> AbstractAsyncContextManager[Client]:
        """``async with Client.connect(url, token) as client:`` — connect and sync; on exit
        close the connection and save the cache.

        The first connection must succeed (else :class:`ConnectError` /
        :class:`AuthenticationError`) unless ``offline_ok``: then the block is entered at once
        with the cached view and the client keeps trying in the background. After the first
        success, drops are retried forever; 4001 and 4009 stop the client and are raised
        (from pending calls, the change stream, and at the end of the ``async with``).
        A malformed ``url`` raises :class:`ConnectError` at this call, before ``async with``.
        """
        client = cls(
            url, token, device_id=device_id, cache_path=cache_path, subscribe_all=subscribe_all,
            connect_timeout_s=connect_timeout_s, backoff=backoff, ssl_context=ssl_context,
            platform=platform, client_version=client_version,
        )
        return connected(client, offline_ok)

    # ------------------------------------------------------------------ the view
    @property
    def view(self) -> dict[str, Conversation]:
        """A copy of the whole view."""
        return {cid: Conversation(cid, *row) for cid, row in self._view.items()}

    def get(self, conversation_id: str) -> Conversation | None:
        """The local state of one conversation (None: not in the view)."""
        return conversation_of(conversation_id, self._view.get(conversation_id))

    def __len__(self) -> int:
        return len(self._view)

    def __contains__(self, conversation_id: object) -> bool:
        return conversation_id in self._view

    @property
    def total_unread(self) -> int:
        """Unread messages over the whole view (the sum of every conversation's ``unread``)."""
        return self._total_unread

    @property
    def sync_token(self) -> bytes:
        """The resume point of the view held (opaque bytes; empty before the first sync): a
        reconnect sends it as ``GetSequences.since`` and gets only what changed since."""
        return self._token_bytes

    def rows(self) -> dict[str, tuple[int, int, int, int]]:
        """The view as plain tuples ``(max, read, min, time_ms)`` (a copy; ``get(id).frozen``
        tells a frozen row)."""
        return {cid: row[:4] for cid, row in self._view.items()}

    def _forget_stream(self, stream: ChangeStream) -> None:
        """A closed change stream stops getting changes."""
        self._streams.discard(stream)

    def _start_tasks(self, nursery: trio.Nursery) -> None:
        if self.cache_path is not None:
            nursery.start_soon(self._cache_loop)

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
        """Stop following these conversations (or, with ``all``, everything); kept across
        reconnects."""
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
            total += unread_of(after) - unread_of(before)
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
        self._total_unread = sum(unread_of(r) for r in self._view.values())

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


