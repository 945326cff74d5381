"""A Redis Pub/Sub subscriber on a raw Trio stream (RESP2, parsed by ``hiredis.Reader``).

The store needs to *know* when its subscription was interrupted (messages published meanwhile
are lost: Pub/Sub is at-most-once), so it owns this connection instead of a client library's
auto-reconnecting one: :func:`subscribe` connects, authenticates, subscribes and then yields
each message's payload; any failure (EOF, reset, no reply to a keep-alive PING) raises
:class:`SubscriptionLost` and the caller decides how to resync.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
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
_TIMED_OUT = object()


class _Conn:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = hiredis.Reader(replyError=RespError)
        self.last_rx = trio.current_time()

    async def send(self, *args: bytes) -> None:
        # (hiredis' stub types the argument as a 1-tuple; it takes any number of parts)
        await self.stream.send_all(hiredis.pack_command(cast("tuple[bytes]", args)))

    async def message(self) -> bytes:
        """The next message's payload. PINGs the server while idle; no byte from it for
        ``KEEPALIVE_TIMEOUT_S``: SubscriptionLost."""
        while True:
            msg: object = self._buffered()
            if msg is _INCOMPLETE:  # wait for bytes (no cancel scope per buffered message)
                msg = _TIMED_OUT
                with trio.move_on_after(KEEPALIVE_INTERVAL_S):
                    msg = await self.read()
            if msg is _TIMED_OUT:
                if trio.current_time() - self.last_rx > KEEPALIVE_TIMEOUT_S:
                    raise SubscriptionLost("no reply from the server (keep-alive)")
                await self.send(b"PING")
                continue
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
    """Connect and subscribe; the context yields the connection: ``await conn.message()``.

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
