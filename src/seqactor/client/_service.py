"""``ServiceClient``: a backend's connection (service token) — allocate seqs, manage members,
read counts — with many requests in flight on one connection. See ``docs/client.md``."""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

from seqactor._proto import seqactor_pb2 as pb
from seqactor.client._backoff import Backoff
from seqactor.client._connection import (
    CONNECT_TIMEOUT_S,
    F_ALLOCATED,
    ConnectionLost,
    ServerError,
    TokenSource,
    _Endpoint,
    connected,
)
from seqactor.client._readcounts import ReadCountsMixin
from seqactor.client._records import Allocation
from seqactor.protocol import ErrorCode

SERVICE_REQUEST_TIMEOUT_S = 30.0  # waiting for a connection + the reply


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
    def connect(
        cls, url: str, token: TokenSource, *, device_id: str = "",
        request_timeout_s: float = SERVICE_REQUEST_TIMEOUT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S, backoff: Backoff | None = None,
        ssl_context: ssl.SSLContext | None = None, offline_ok: bool = False,
    ) -> AbstractAsyncContextManager[ServiceClient]:
        """``async with ServiceClient.connect(url, token) as svc:`` — connect with a
        service token; on exit close the session.

        The first connection must succeed (else :class:`ConnectError` /
        :class:`AuthenticationError`) unless ``offline_ok``. Each call waits for a
        connection and its reply, together at most ``request_timeout_s`` (s), then raises
        :class:`ConnectionLost`. A malformed ``url`` raises :class:`ConnectError` at this call,
        before ``async with``.
        """
        client = cls(
            url, token, device_id=device_id, request_timeout_s=request_timeout_s,
            connect_timeout_s=connect_timeout_s, backoff=backoff, ssl_context=ssl_context,
            platform="service",
        )
        return connected(client, offline_ok)

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
        """Add ``user_ids`` to the conversation (created if new); users already members are
        left as they are, a frozen (``keep_history``) row becomes a member again.

        Raises :class:`TooLarge` past the view or group size limits (nothing is added),
        another :class:`ServerError` for bad ids, :class:`ConnectionLost` as above."""
        await self._call("add_members", pb.AddMembers(
            conversation_id=conversation_id, user_ids=list(user_ids)))

    async def remove_members(
        self, conversation_id: str, user_ids: Iterable[str], keep_history: bool = False
    ) -> None:
        """Remove ``user_ids`` from the conversation: its row leaves their views (their
        sessions get ``removed``), or with ``keep_history`` stays frozen at its current
        values. Users who are not members are ignored.

        Raises :class:`NotFound` for an unknown conversation, another :class:`ServerError`
        for bad ids, :class:`ConnectionLost` as above."""
        await self._call("remove_members", pb.RemoveMembers(
            conversation_id=conversation_id, user_ids=list(user_ids), keep_history=keep_history))

    async def set_min_sequence(self, conversation_id: str, min_sequence: int) -> None:
        """Clear history: seqs below ``min_sequence`` are no longer readable (clamped to
        the conversation's max; it never goes back).

        Raises :class:`NotFound` for an unknown conversation, another :class:`ServerError`
        for a bad value, :class:`ConnectionLost` as above."""
        await self._call("set_min_sequence", pb.SetMinSequence(
            conversation_id=conversation_id, min_sequence=min_sequence))
