"""A minimal Redis Pub/Sub subscriber on a raw Trio stream (RESP2).

The store needs to *know* when its subscription was interrupted (messages published meanwhile
are lost: Pub/Sub is at-most-once), so it owns this connection instead of a client library's
auto-reconnecting one: :func:`subscribe` connects, authenticates, subscribes and then yields
each message's payload; any failure (EOF, reset, no reply to a keep-alive PING) raises
:class:`SubscriptionLost` and the caller decides how to resync.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

KEEPALIVE_INTERVAL_S = 1.0  # PING the server this often on an idle subscription
KEEPALIVE_TIMEOUT_S = 3.0  # no byte from the server for this long: the subscription is lost
CONNECT_TIMEOUT_S = 2.0
READ_CHUNK_BYTES = 65536


class SubscriptionLost(Exception):
    """The subscription connection failed; messages may have been missed."""


def _command(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class _Reader:
    """Incremental RESP2 parser over a byte buffer."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0

    def feed(self, data: bytes) -> None:
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data

    def _line(self) -> bytes | None:
        end = self.buf.find(b"\r\n", self.pos)
        if end < 0:
            return None
        line = bytes(self.buf[self.pos:end])
        self.pos = end + 2
        return line

    def parse(self) -> object:
        """One complete value, or ``_INCOMPLETE`` (the buffer is left as it was)."""
        start = self.pos
        value = self._value()
        if value is _INCOMPLETE:
            self.pos = start
        return value

    def _value(self) -> object:
        line = self._line()
        if line is None:
            return _INCOMPLETE
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RespError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            if len(self.buf) < self.pos + n + 2:
                return _INCOMPLETE
            data = bytes(self.buf[self.pos:self.pos + n])
            self.pos += n + 2
            return data
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            items = []
            for _ in range(n):
                item = self._value()
                if item is _INCOMPLETE:
                    return _INCOMPLETE
                items.append(item)
            return items
        raise SubscriptionLost(f"unexpected RESP type {kind!r}")


class RespError(Exception):
    pass


_INCOMPLETE = object()


class _Conn:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = _Reader()
        self.last_rx = trio.current_time()

    async def send(self, *args: bytes) -> None:
        await self.stream.send_all(_command(*args))

    async def message(self) -> bytes:
        """The next message's payload. PINGs the server while idle; no byte from it for
        ``KEEPALIVE_TIMEOUT_S``: SubscriptionLost."""
        while True:
            msg: object = _INCOMPLETE
            with trio.move_on_after(KEEPALIVE_INTERVAL_S):
                msg = await self.read()
            if msg is _INCOMPLETE:
                if trio.current_time() - self.last_rx > KEEPALIVE_TIMEOUT_S:
                    raise SubscriptionLost("no reply from the server (keep-alive)")
                await self.send(b"PING")
                continue
            if isinstance(msg, list) and len(msg) == 3 and msg[0] == b"message":
                payload = msg[2]
                if isinstance(payload, bytes):
                    return payload

    async def read(self) -> object:
        while True:
            value = self.reader.parse()
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
