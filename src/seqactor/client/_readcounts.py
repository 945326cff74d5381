"""Group read counts in the Python SDK (docs/protocol.md "Group read counts"):
``read_counts``, ``readers`` and ``watch_read_counts`` for :class:`~seqactor.client.Client`
(and the first two for :class:`~seqactor.client.ServiceClient`). See docs/client.md,
"Group read counts".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from seqactor._proto import seqactor_pb2 as pb
from seqactor.client._connection import Forbidden, Link, ServerError
from seqactor.protocol import ErrorCode

F_READ_COUNTS = 9  # ServerMessage.read_counts
F_READERS = 10  # ServerMessage.readers
READERS_PAGE_SIZE = 100  # user ids per GetReaders page (the server allows up to 1 000)
WATCH_QUEUE_UPDATES = 1  # a watch keeps only the newest update not yet taken (latest wins)


@dataclass(frozen=True, slots=True)
class ReadCounts:
    """``counts[i]``: current members with ``read_sequence >= from_sequence + i``.

    ``from_sequence`` is the clamped start (``max(1, min_sequence)`` or later); ``counts`` is
    empty for an empty range; ``member_count`` counts current members (frozen ones not).
    """

    conversation_id: str
    from_sequence: int
    member_count: int
    counts: tuple[int, ...]

    @property
    def to_sequence(self) -> int:
        """The last seq counted (``from_sequence - 1`` when ``counts`` is empty)."""
        return self.from_sequence + len(self.counts) - 1

    def count(self, seq: int) -> int | None:
        """Members who have read ``seq``, or None when it is outside the range."""
        i = seq - self.from_sequence
        return self.counts[i] if 0 <= i < len(self.counts) else None


def _decode(body: bytes) -> ReadCounts:
    rc = pb.ReadCounts.FromString(body)
    return ReadCounts(rc.conversation_id, rc.from_sequence, rc.member_count, tuple(rc.counts))


def _expect(field: int, want: int) -> None:
    if field != want:
        raise ServerError(ErrorCode.INTERNAL, f"unexpected reply (field {field})")


class ReadCountsWatch:
    """Async iterator of :class:`ReadCounts` for one watched conversation (latest wins: a slow
    consumer gets the newest update, older ones are dropped). Raises ``Forbidden`` when the
    conversation leaves the client's view (or a reconnect's re-watch is refused); ends when the
    watch is closed or the client closes. (A member frozen by ``keep_history`` keeps the
    conversation in the view: the server ends the watch, the iterator just gets no more.)"""

    def __init__(self, owner: WatchMixin, conversation_id: str, from_sequence: int) -> None:
        self._owner = owner
        self.conversation_id = conversation_id
        self.from_sequence = from_sequence
        self._latest: ReadCounts | None = None
        self._event = trio.Event()
        self._closed = False
        self.error: BaseException | None = None

    def _put(self, update: ReadCounts) -> None:
        self._latest = update  # latest wins: memory stays one update per watch
        self._event.set()

    def _end(self, error: BaseException | None = None) -> None:
        self._closed = True
        self.error = self.error or error
        self._event.set()

    def __aiter__(self) -> ReadCountsWatch:
        return self

    async def __anext__(self) -> ReadCounts:
        while self._latest is None:
            if self._closed:
                if self.error is not None:
                    raise self.error
                raise StopAsyncIteration
            await self._event.wait()
            self._event = trio.Event()
        update, self._latest = self._latest, None
        return update

    async def aclose(self) -> None:
        """Stop the watch (``WatchReadCounts{stop}``) and end the iterator."""
        if self._closed:
            return
        self._closed = True
        self._event.set()
        await self._owner._unwatch_read_counts(self)

    async def __aenter__(self) -> ReadCountsWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()


if TYPE_CHECKING:
    from seqactor.client._connection import _Endpoint as _Base
else:
    _Base = object


class ReadCountsMixin(_Base):
    """The SDK's read-count methods; the client class it is mixed into supplies ``_call``."""

    async def _call(self, kind: str, body: Any) -> tuple[int, bytes]:
        raise NotImplementedError  # the client's own ``_call`` comes first in the MRO

    async def read_counts(
        self, conversation_id: str, from_sequence: int = 0, to_sequence: int = 0
    ) -> ReadCounts:
        """``GetReadCounts``: members who have read each seq of ``[from, to]`` (0 = first
        readable / max; clamped by the server). Errors: ``Forbidden`` (not a current member,
        or no such conversation), ``NotFound`` (service, unknown conversation), ``TooLarge``
        (more than 1 000 seqs after clamping)."""
        field, body = await self._call("get_read_counts", pb.GetReadCounts(
            conversation_id=conversation_id, from_sequence=from_sequence, to_sequence=to_sequence,
        ))
        _expect(field, F_READ_COUNTS)
        return _decode(body)

    async def readers(
        self, conversation_id: str, sequence: int, *, unread: bool = False,
        page_size: int = READERS_PAGE_SIZE, after_user_id: str = "",
    ) -> AsyncIterator[list[str]]:
        """``GetReaders`` page by page: lists of current members (ordered by user id, bytewise
        UTF-8) with ``read_sequence >= sequence`` (``unread``: ``<``), at most ``page_size``
        (1–1 000) each; starts after ``after_user_id``. Errors as for :meth:`read_counts`."""
        after = after_user_id
        while True:
            field, body = await self._call("get_readers", pb.GetReaders(
                conversation_id=conversation_id, sequence=sequence, unread=unread,
                limit=page_size, after_user_id=after,
            ))
            _expect(field, F_READERS)
            page = pb.Readers.FromString(body)
            ids = list(page.user_ids)
            if ids:
                yield ids
            after = page.next_after_user_id
            if not after:
                return


class WatchMixin(ReadCountsMixin):
    """``watch_read_counts`` for :class:`~seqactor.client.Client` (re-watched on reconnect)."""

    _rc_watches: dict[str, list[ReadCountsWatch]]

    async def watch_read_counts(
        self, conversation_id: str, from_sequence: int = 0
    ) -> ReadCountsWatch:
        """``WatchReadCounts``: an async iterator (and async context manager) of
        :class:`ReadCounts` for ``[from_sequence, max]`` (at most the newest 1 000 seqs), the
        current counts first, then on every change, at most once per server interval (250 ms
        by default). Errors as for :meth:`read_counts`; ``TooLarge`` beyond 16 watches."""
        watch = ReadCountsWatch(self, conversation_id, from_sequence)
        self._rc_watches.setdefault(conversation_id, []).append(watch)
        try:
            await self._call("watch_read_counts", pb.WatchReadCounts(
                conversation_id=conversation_id, from_sequence=from_sequence,
            ))
        except BaseException:
            self._forget(watch)
            raise
        return watch

    def _forget(self, watch: ReadCountsWatch) -> bool:
        """Drop ``watch``; True when it was the conversation's last one."""
        watches = self._rc_watches.get(watch.conversation_id, [])
        if watch in watches:
            watches.remove(watch)
        if not watches:
            self._rc_watches.pop(watch.conversation_id, None)
            return True
        return False

    async def _unwatch_read_counts(self, watch: ReadCountsWatch) -> None:
        if self._forget(watch):
            try:
                await self._call("watch_read_counts", pb.WatchReadCounts(
                    conversation_id=watch.conversation_id, stop=True,
                ))
            except ServerError:
                pass  # the server ended it already (the conversation left the view)
        else:  # another watch of the same conversation stays: re-send its range
            others = self._rc_watches[watch.conversation_id]
            await self._call("watch_read_counts", pb.WatchReadCounts(
                conversation_id=watch.conversation_id, from_sequence=others[-1].from_sequence,
            ))

    async def _rewatch_read_counts(self, link: Link) -> None:
        """On a new link: watch again what was watched (a refusal ends those watches)."""
        for cid, watches in list(self._rc_watches.items()):
            try:
                await self._request(link, "watch_read_counts", pb.WatchReadCounts(
                    conversation_id=cid, from_sequence=watches[-1].from_sequence,
                ))
            except ServerError as exc:
                for watch in watches:
                    watch._end(exc)
                self._rc_watches.pop(cid, None)

    def _on_read_counts(self, body: bytes) -> None:
        """A watch push (``ServerMessage{request_id: 0, read_counts}``)."""
        update = _decode(body)
        for watch in self._rc_watches.get(update.conversation_id, ()):
            watch._put(update)

    def _watches_left(self, conversation_ids: list[str]) -> None:
        """These conversations left the view: their watches end with ``Forbidden`` (the server
        ended them too)."""
        for cid in conversation_ids:
            for watch in self._rc_watches.pop(cid, ()):
                watch._end(Forbidden(ErrorCode.FORBIDDEN, "conversation left your view"))

    def _end_watches(self, error: BaseException | None) -> None:
        for watches in list(self._rc_watches.values()):
            for watch in watches:
                watch._end(error)
        self._rc_watches.clear()
