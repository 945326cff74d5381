"""A Redis Pub/Sub subscriber on a raw Trio stream (RESP2, parsed by ``hiredis.Reader``).

The store needs to *know* when its subscription was interrupted (messages published meanwhile
are lost: Pub/Sub is at-most-once), so it owns this connection instead of a client library's
auto-reconnecting one: :func:`subscribe` connects, authenticates, subscribes and then yields
each message's payload; any failure (EOF, reset, no reply to a keep-alive PING) raises
:class:`SubscriptionLost` and the caller decides how to resync.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import cast

import hiredis
import trio

KEEPALIVE_INTERVAL_S = 1.0  # PING the server this often on an idle subscription
KEEPALIVE_TIMEOUT_S = 3.0  # no byte from the server for this long: the subscription is lost
CONNECT_TIMEOUT_S = 2.0
READ_CHUNK_BYTES = 65536


class SubscriptionLost(Exception):
    """The subscription connection failed; messages may have been missed."""


class RespError(Exception):
    """An error reply from the server (AUTH failed, ...)."""


_INCOMPLETE: object = False  # what ``hiredis.Reader.gets`` returns while a reply is partial


class _Conn:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = hiredis.Reader(replyError=RespError)
        self.last_rx = trio.current_time()
        self.lost_reason = ""  # set by the keep-alive when it gives up on the server

    async def send(self, *args: bytes) -> None:
        # (hiredis' stub types the argument as a 1-tuple; it takes any number of parts)
        await self.stream.send_all(hiredis.pack_command(cast("tuple[bytes]", args)))

    async def run(self, handle: Callable[[bytes], None]) -> None:
        """Hand each message's payload to ``handle``, in order, until the subscription fails:
        then raise SubscriptionLost. A keep-alive task PINGs the server while the connection
        is idle and closes it when no byte arrived for ``KEEPALIVE_TIMEOUT_S`` (one timer per
        interval, not a cancel scope per message)."""
        lost: SubscriptionLost | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keepalive)
            try:
                while True:
                    handle(await self.message())
            except SubscriptionLost as exc:
                lost = exc
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                lost = SubscriptionLost(self.lost_reason or f"subscription failed: {exc!r}")
            nursery.cancel_scope.cancel()
        assert lost is not None
        raise lost

    async def _keepalive(self) -> None:
        while True:
            await trio.sleep(KEEPALIVE_INTERVAL_S)
            idle = trio.current_time() - self.last_rx
            if idle > KEEPALIVE_TIMEOUT_S:
                self.lost_reason = "no reply from the server (keep-alive)"
                await self.stream.aclose()  # the reader's receive fails: SubscriptionLost
                return
            if idle >= KEEPALIVE_INTERVAL_S:
                try:
                    await self.send(b"PING")
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the reader sees the failure too

    async def message(self) -> bytes:
        """The next message's payload (PING replies and other frames skipped)."""
        while True:
            msg: object = self._buffered()
            if msg is _INCOMPLETE:
                msg = await self.read()
            if isinstance(msg, list) and len(msg) == 3 and msg[0] == b"message":
                payload = msg[2]
                if isinstance(payload, bytes):
                    return payload

    def _buffered(self) -> object:
        """A complete reply already received, or ``_INCOMPLETE``."""
        try:
            return self.reader.gets()
        except hiredis.ProtocolError as exc:
            raise SubscriptionLost(f"bad reply from the server: {exc}") from None

    async def read(self) -> object:
        """The next complete reply (bytes, int, list, None or a :class:`RespError`)."""
        while True:
            value = self._buffered()
            if value is not _INCOMPLETE:
                return value
            data = await self.stream.receive_some(READ_CHUNK_BYTES)
            if not data:
                raise SubscriptionLost("the server closed the connection")
            self.last_rx = trio.current_time()
            self.reader.feed(data)


@asynccontextmanager
async def subscribe(
    host: str,
    port: int,
    channel: bytes,
    username: str | None = None,
    password: str | None = None,
) -> AsyncIterator[_Conn]:
    """Connect and subscribe; the context yields the connection: ``await conn.run(handle)``.

    The subscription is active when the context is entered. Raises SubscriptionLost on any
    failure (also from the iterator).
    """
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            stream = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        raise SubscriptionLost(f"cannot connect to {host}:{port}: {exc}") from None
    conn = _Conn(stream)
    try:
        async with stream:
            try:
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    if password is not None:
                        args = [b"AUTH"]
                        if username:
                            args.append(username.encode())
                        args.append(password.encode())
                        await conn.send(*args)
                        reply = await conn.read()
                        if isinstance(reply, RespError):
                            raise SubscriptionLost(f"AUTH failed: {reply}")
                    await conn.send(b"SUBSCRIBE", channel)
                    reply = await conn.read()
                    if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
                        raise SubscriptionLost(f"SUBSCRIBE failed: {reply!r}")
            except trio.TooSlowError:
                raise SubscriptionLost("no reply to SUBSCRIBE") from None

            yield conn
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise SubscriptionLost(f"subscription connection failed: {exc!r}") from None
