"""The byte stream under one server WebSocket connection: :class:`ActivityStream`."""

from __future__ import annotations

import errno
import os
from typing import Protocol

import trio

RECEIVE_BYTES = 65_536  # one read from the socket asks for at most this many bytes


class DirectSink(Protocol):
    """Where the stream publishes its direct-write descriptor (the session's state)."""

    fd: int


class ActivityStream(trio.abc.Stream):
    """The connection's byte stream: records when bytes last arrived, holds the unsent rest
    of a direct write, and publishes the descriptor a push may be written to directly.

    It wraps either a plain TCP trio socket (read and written here directly: no
    ``trio.SocketStream`` per connection) or any trio stream (TLS: a ``trio.SSLStream``; a
    ``trio.SocketStream`` is taken apart into its socket).

    Every byte the server sends goes through :meth:`send_all` (under the connection's send
    lock) or a direct write while ``fd`` is published, and the socket is only ever closed
    through :meth:`aclose`. So ``fd`` — the plain TCP socket's descriptor while nothing is
    being sent, no unsent rest is held, no Close frame is going out or has gone out
    (:meth:`stop_direct`) and the stream is open, else -1 — is exact without asking the lock,
    wsproto or the socket on every push. It is copied to ``sink.fd`` (the session's state),
    which the fan-out reads per recipient.
    """

    __slots__ = (
        "inner", "last_rx", "held", "_tcp", "_fd_open", "_sending", "_closing", "sink", "_paused",
    )

    def __init__(self, inner: trio.abc.Stream | trio.socket.SocketType) -> None:
        # A plain TCP connection's trio socket: read and written here directly.
        if isinstance(inner, trio.SocketStream):
            inner = inner.socket
        self._tcp = inner if isinstance(inner, trio.socket.SocketType) else None
        self.inner: trio.abc.Stream | None = None if self._tcp is not None else inner  # type: ignore[assignment]
        self.last_rx = trio.current_time()
        # The unsent rest of a frame written directly to the socket: it goes out before any
        # other byte, whoever writes next, so frames never interleave on the wire.
        self.held: bytes | None = None
        # Direct writes need the plain socket (TLS bytes go through the SSL stream).
        self._fd_open = self._tcp.fileno() if self._tcp is not None else -1
        self._sending = False
        self._paused = False  # the connection holds frames back to write them together
        self._closing = False  # a Close frame is going out (or the stream closed): no more frames
        self.sink: DirectSink | None = None

    @property
    def tcp(self) -> trio.socket.SocketType | None:
        """The plain TCP socket (None under TLS): the connection reads it directly."""
        return self._tcp

    @property
    def fd(self) -> int:
        if self._sending or self._paused or self._closing or self.held is not None:
            return -1
        return self._fd_open

    def _publish(self) -> None:
        if self.sink is not None:
            self.sink.fd = self.fd

    def attach(self, sink: DirectSink) -> None:
        self.sink = sink
        sink.fd = self.fd

    def hold(self, rest: bytes) -> None:
        """Keep the unsent rest of a direct write; it goes out before anything else."""
        assert self.held is None
        self.held = rest
        self._publish()

    def pause_direct(self, paused: bool) -> None:
        """No direct writes by others while ``paused`` (the connection batches its own)."""
        self._paused = paused
        self._publish()

    def stop_direct(self) -> None:
        """No more direct writes, for good (a Close frame is about to go out)."""
        self._closing = True
        self._publish()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        tcp = self._tcp
        if tcp is None:
            assert self.inner is not None
            data: bytes | bytearray = await self.inner.receive_some(max_bytes)
        else:
            # What trio.SocketStream.receive_some does (try now, else wait until readable;
            # the same checkpoints and error translation), in this one frame: every idle
            # connection waits here, and trio's path holds four more frames and a context
            # manager while waiting (~1 KB a connection). The descriptor is read at every
            # attempt: a closed socket answers -1 (EBADF), never a reused number.
            size = RECEIVE_BYTES if max_bytes is None else max_bytes
            if size < 1:
                raise ValueError("max_bytes must be >= 1")
            # (Never waits inside an ``except`` block: the exception and its traceback would
            # be held for as long as the connection is idle.)
            await trio.lowlevel.checkpoint_if_cancelled()
            got = read_fd(tcp.fileno(), size)
            if got is None:
                while got is None:
                    await trio.lowlevel.wait_readable(tcp.fileno())
                    got = read_fd(tcp.fileno(), size)
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
            data = got
        self.last_rx = trio.current_time()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send the held rest (if any), then ``data``; callers hold the send lock."""
        self._sending = True
        self._publish()
        try:
            held = self.held
            if held is not None:
                self.held = None
                await self._send(held)
            if data:
                await self._send(data)
            elif held is None and self._tcp is not None and self._tcp.fileno() < 0:
                raise trio.ClosedResourceError("socket was already closed")
        finally:
            self._sending = False
            self._publish()

    async def _send(self, data: bytes | bytearray | memoryview) -> None:
        tcp = self._tcp
        if tcp is None:
            assert self.inner is not None
            await self.inner.send_all(data)
            return
        # What trio.SocketStream.send_all does: write what the socket takes, wait until it
        # is writable again, repeat; errors as trio's streams report them.
        await trio.lowlevel.checkpoint_if_cancelled()
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                n = write_fd(tcp.fileno(), view[sent:])
                if n is None:
                    await trio.lowlevel.wait_writable(tcp.fileno())
                else:
                    sent += n
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        if self._tcp is None:
            assert self.inner is not None
            await self.inner.wait_send_all_might_not_block()
        else:
            await trio.lowlevel.wait_writable(self._tcp.fileno())

    def close_now(self) -> None:
        """Close without waiting (a plain socket closes at once; a TLS stream's socket too,
        without close_notify). A task waiting to read or write gets ClosedResourceError."""
        self._fd_open = -1  # before the descriptor can be closed and its number reused
        self._closing = True
        self._publish()
        if self._tcp is not None:
            self._tcp.close()  # (trio's close wakes the tasks waiting on it)

    async def aclose(self) -> None:
        self.close_now()
        if self._tcp is not None:
            await trio.lowlevel.checkpoint()
        else:
            assert self.inner is not None
            await self.inner.aclose()


def write_fd(fd: int, data: memoryview) -> int | None:
    """One non-blocking write (None: the socket takes nothing now), errors as trio's streams
    report them."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise trio.ClosedResourceError("this socket was already closed") from None
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


def read_fd(fd: int, size: int) -> bytes | None:
    """One non-blocking read (None: nothing to read yet), errors as trio's streams report
    them."""
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise trio.ClosedResourceError("this socket was already closed") from None
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
