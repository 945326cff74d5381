"""The Redis store's own connections on raw Trio streams (RESP2, packed and parsed by
``hiredis``): the Pub/Sub subscriber, and :class:`Pipelined` for the batch calls.

The store needs to *know* when its subscription was interrupted (messages published meanwhile
are lost: Pub/Sub is at-most-once), so it owns this connection instead of a client library's
auto-reconnecting one: :func:`subscribe` connects, authenticates, subscribes and then yields
each message's payload; any failure (EOF, reset, no reply to a keep-alive PING) raises
:class:`SubscriptionLost` and the caller decides how to resync.
"""

from __future__ import annotations

from collections import deque
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


async def connect(
    host: str, port: int, username: str | None = None, password: str | None = None,
    db: int = 0,
) -> _Conn:
    """A connection, authenticated (``AUTH``) and on database ``db`` (``SELECT``); the caller
    closes its stream. Raises SubscriptionLost on any failure."""
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            stream = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        raise SubscriptionLost(f"cannot connect to {host}:{port}: {exc}") from None
    conn = _Conn(stream)
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
            if db:
                await conn.send(b"SELECT", str(db).encode())
                reply = await conn.read()
                if isinstance(reply, RespError):
                    raise SubscriptionLost(f"SELECT {db} failed: {reply}")
    except trio.TooSlowError:
        await stream.aclose()
        raise SubscriptionLost(f"no reply from {host}:{port}") from None
    except (SubscriptionLost, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await stream.aclose()
        if isinstance(exc, SubscriptionLost):
            raise
        raise SubscriptionLost(f"connection to {host}:{port} failed: {exc!r}") from None
    return conn


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
    conn = await connect(host, port, username, password)
    try:
        async with conn.stream:
            try:
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    await conn.send(b"SUBSCRIBE", channel)
                    reply = await conn.read()
                    if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
                        raise SubscriptionLost(f"SUBSCRIBE failed: {reply!r}")
            except trio.TooSlowError:
                raise SubscriptionLost("no reply to SUBSCRIBE") from None

            yield conn
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise SubscriptionLost(f"subscription connection failed: {exc!r}") from None


class Pipelined:
    """Commands on one connection, pipelined: concurrent callers write in turn and their
    replies come back in the same order (:meth:`run` reads them). The store's batch calls go
    here instead of through a client library (one packed write, ``hiredis`` parsing, no
    per-command machinery), and a batch's ``WAIT`` follows its script on the same connection.
    When the connection fails, every caller waiting gets SubscriptionLost."""

    def __init__(self, conn: _Conn, timeout_s: float) -> None:
        self.conn = conn
        self.timeout_s = timeout_s
        self._send_lock = trio.Lock()
        self._pending: deque[_Call] = deque()
        self.error: SubscriptionLost | None = None

    async def call(self, *commands: tuple[bytes | str | int, ...]) -> list[object]:
        """Send ``commands`` in one write; their replies (error replies as
        :class:`RespError` values), once all arrived within the timeout."""
        if self.error is not None:
            raise self.error
        data = b"".join(hiredis.pack_command(cast("tuple[bytes]", c)) for c in commands)
        call = _Call(len(commands))
        async with self._send_lock:  # the order of _pending is the order on the wire
            self._pending.append(call)
            try:
                await self.conn.stream.send_all(data)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._fail(SubscriptionLost(f"sending failed: {exc!r}"))
        with trio.move_on_after(self.timeout_s):
            await call.done.wait()
        if call.error is not None:
            raise call.error
        if not call.done.is_set():  # replies would be out of step: drop the connection
            self._fail(SubscriptionLost(f"no reply within {self.timeout_s:g} s"))
            await self.conn.stream.aclose()
            raise SubscriptionLost(f"no reply within {self.timeout_s:g} s")
        return call.replies

    async def run(self) -> None:
        """Read replies and hand them to the callers in order, until the connection fails
        (then raise SubscriptionLost)."""
        conn = self.conn
        pending = self._pending
        try:
            while True:
                reply = conn._buffered()
                if reply is _INCOMPLETE:
                    reply = await conn.read()
                if not pending:
                    raise SubscriptionLost(f"a reply nobody asked for: {reply!r}")
                call = pending[0]
                call.replies.append(reply)
                if len(call.replies) == call.n:
                    pending.popleft()
                    call.done.set()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail(SubscriptionLost(f"connection failed: {exc!r}"))
        except SubscriptionLost as exc:
            self._fail(exc)
        assert self.error is not None
        raise self.error

    def _fail(self, error: SubscriptionLost) -> None:
        if self.error is None:
            self.error = error
        while self._pending:
            call = self._pending.popleft()
            call.error = self.error
            call.done.set()


class _Call:
    __slots__ = ("n", "replies", "error", "done")

    def __init__(self, n: int) -> None:
        self.n = n
        self.replies: list[object] = []
        self.error: SubscriptionLost | None = None
        self.done = trio.Event()
