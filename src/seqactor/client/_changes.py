"""``Client.changes()``: an async iterator of coalesced :class:`ChangeBatch` es."""

from __future__ import annotations

from typing import Protocol

import trio

from seqactor.client._records import Change, ChangeBatch, Row, conversation_of


class ChangeSource(Protocol):
    """What a change stream reads of its client (:class:`~seqactor.client.Client`)."""

    @property
    def total_unread(self) -> int: ...
    @property
    def error(self) -> BaseException | None: ...
    @property
    def closing(self) -> bool: ...
    def _forget_stream(self, stream: ChangeStream) -> None: ...


class ChangeStream:
    """Async iterator of :class:`ChangeBatch`. Pending changes coalesce per conversation (first
    ``old``, latest ``new``), so a slow consumer costs memory bounded by the view's size."""

    def __init__(self, client: ChangeSource) -> None:
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
                    Change(cid, conversation_of(cid, old), conversation_of(cid, new))
                    for cid, (old, new) in pending.items() if old != new
                )
                if changes:
                    return ChangeBatch(changes, client.total_unread)
                continue
            if client.error is not None:
                raise client.error
            if self._closed or client.closing:
                raise StopAsyncIteration
            await self._event.wait()
            self._event = trio.Event()

    def close(self) -> None:
        self._closed = True
        self._event.set()
        self._client._forget_stream(self)

    async def __aenter__(self) -> ChangeStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
