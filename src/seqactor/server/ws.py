"""The server side of one WebSocket connection (RFC 6455) on wsproto's public API.

Modelled on hypercorn (``protocol/ws_stream.py``: its own upgrade handshake, then a public
``wsproto.connection.Connection`` for frames; ``trio/tcp_server.py``: one task reads and
feeds the protocol, and every byte written goes through one send path).

* **Handshake**: :mod:`seqactor.server.handshake` (sans-IO functions over bytes; why not
  wsproto's ``H11Handshake`` is measured there). Bytes that followed the request head are
  this connection's first frames (``trailing``).
* **Bytes**: :class:`seqactor.server.stream.ActivityStream` (last-rx time, the held rest of a
  direct write, the published descriptor).
* **Frames in**: a ``wsproto.connection.Connection`` parses what the socket delivers. An idle
  connection does not keep one: the connection is dropped whenever it provably holds nothing
  (every byte fed was consumed by complete frames, no message half-received) and a fresh one
  is made when bytes arrive (~4 µs; an idle session saves ~1.7 KB). Pings are answered as
  they are read; a Close is answered and ends the connection. While no parser is held, a
  read that starts with a *simple frame* — complete, final, binary, masked, no reserved bit,
  a minimally encoded length of at most 65 535 bytes and at most ``max_message_bytes`` — is
  taken here without wsproto (:func:`simple_frame`: a session's requests are such frames;
  wsproto's pure-Python unmasking and event machinery cost ~15 µs a frame, this ~1 µs);
  anything else, from the first byte that is not such a frame on, goes to wsproto.
* **Frames out**: one send path. A binary frame (header + payload: no extension is ever
  negotiated) is written straight to the socket when it takes it without waiting
  (:meth:`ServerWebSocket.write_nowait`, the fan-out's direct writes); otherwise, and for
  control frames, under the connection's one lock (made when a send first has to wait: most
  idle sessions never make one). :class:`ActivityStream` holds the unsent rest of a partial
  direct write, which goes out before any other byte; once a Close frame has gone out
  (``close_sent``) nothing else is written.

Errors: the peer going away, a protocol error, an oversized message (close 1009) and our own
close all surface as :class:`ConnectionClosed` (``code``, ``reason``; or the subclass's
``closed_error``) from ``receive`` and ``send_message``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import ClassVar, overload

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from seqactor.protocol import Close
from seqactor.server._frames import ws_binary_frame
from seqactor.server.stream import RECEIVE_BYTES, ActivityStream, read_fd

CONTROL_SEND_TIMEOUT_S = 5.0  # a pong or Close reply the socket does not take by then: drop
MASK_BYTES = 4  # every client frame is masked
SHORT_PAYLOAD_MAX = 125  # payload lengths up to this fit the first header bytes
MEDIUM_PAYLOAD_MAX = 65_535  # ... up to this take 2 more bytes, beyond 8 (RFC 6455 §5.2)
SIMPLE_FRAME_FIRST_BYTE = 0x82  # FIN, no reserved bit, opcode 2 (binary)
MASK_BIT = 0x80  # in the second header byte: the payload is masked
LENGTH_BITS = 0x7F  # in the second header byte: the payload length (or 126 / 127)
LENGTH_16 = 126  # the length follows in 2 bytes
NO_MASK = bytes(MASK_BYTES)  # an all-zero masking key leaves the payload as it is



class ConnectionClosed(Exception):
    """The WebSocket is closed: by the peer, by us, or the connection was lost.

    ``code`` is the close code (1006 when no Close frame was exchanged), ``reason`` its text.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"connection closed ({code} {reason})")
        self.code = code
        self.reason = reason


def simple_frame(buf: bytes, at: int, max_payload: int) -> tuple[bytes, int] | None:
    """The unmasked payload of the simple frame at ``buf[at:]`` and the index after it, or
    None when the bytes there are not (or not yet all) one: a complete, final, binary, masked
    frame without reserved bits, with a minimally encoded length of at most
    ``min(max_payload, MEDIUM_PAYLOAD_MAX)``. What is not one is left to wsproto, which
    parses it (and refuses what is invalid) as it always does."""
    n = len(buf) - at
    if n < 2 + MASK_BYTES or buf[at] != SIMPLE_FRAME_FIRST_BYTE:
        return None
    second = buf[at + 1]
    if not second & MASK_BIT:
        return None
    length = second & LENGTH_BITS
    start = at + 2
    if length == LENGTH_16:
        if n < 4 + MASK_BYTES:
            return None
        length = (buf[at + 2] << 8) | buf[at + 3]
        if length <= SHORT_PAYLOAD_MAX:
            return None  # not minimal: wsproto refuses it
        start += 2
    elif length > LENGTH_16:
        return None  # 64-bit lengths: left to wsproto
    if length > max_payload:
        return None
    end = start + MASK_BYTES + length
    if end - at > n:
        return None
    mask = buf[start:start + MASK_BYTES]
    payload = buf[start + MASK_BYTES:end]
    if mask != NO_MASK:
        key = (mask * (length // MASK_BYTES + 1))[:length]
        payload = (
            int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
        ).to_bytes(length, "little")
    return payload, end


def _client_frame_bytes(payload: int) -> int:
    """Wire size of a masked (client) frame with ``payload`` bytes (minimal length encoding,
    which wsproto enforces)."""
    if payload <= SHORT_PAYLOAD_MAX:
        return 2 + MASK_BYTES + payload
    if payload <= MEDIUM_PAYLOAD_MAX:
        return 4 + MASK_BYTES + payload
    return 10 + MASK_BYTES + payload


# --------------------------------------------------------------------------- the connection


class ServerWebSocket:
    """One open server-side WebSocket over an :class:`ActivityStream` (after the 101).

    ``receive`` returns whole messages (``bytes``, or ``str`` for a text message) of at most
    ``max_message_bytes``; larger ones close the connection with 1009. ``send_message`` sends
    one binary message; ``close`` sends a Close frame and waits for the peer's (the caller
    bounds the wait). One task receives at a time; any number may send. Closes are raised as
    ``closed_error(code, reason)`` (a subclass may name its own exception: no wrapper
    coroutine per call, which an idle connection would hold while it waits).
    """

    closed_error: ClassVar[type[Exception]] = ConnectionClosed

    __slots__ = (
        "stream", "max_message_bytes", "_ws", "_fed", "_used", "_frame_bytes", "_in_message",
        "_reusable", "_parts", "_parts_bytes", "_lock", "close_sent", "closed", "_rx", "_rx_at",
        "_batch", "_on_rest",
    )

    def __init__(self, stream: ActivityStream, max_message_bytes: int, trailing: bytes = b"") -> None:
        self.stream = stream
        self.max_message_bytes = max_message_bytes
        # The frame parser while bytes are in flight (None: idle, nothing buffered).
        self._ws: Connection | None = None
        self._fed = 0  # bytes given to ``_ws``
        self._used = 0  # ... of which complete frames account for
        self._frame_bytes = 0  # payload bytes so far of a frame not yet complete
        self._in_message = False  # a fragmented message has begun and not ended
        self._reusable = True  # False once ``_ws`` must be kept (text decoding, closing)
        self._parts: list[bytes | str] | None = None  # fragments of the message being read
        self._parts_bytes = 0
        # Made when a send first has to wait (then kept: a session whose socket filled once
        # is likely to again); an idle session that never waited holds none (~340 bytes).
        self._lock: trio.StrictFIFOLock | None = None
        self.close_sent = False  # a Close frame has been handed to the send path
        self.closed: tuple[int, str] | None = None  # (code, reason) once closed
        # Bytes read while no parser is held, from ``_rx_at`` on not yet taken: each starts
        # at a frame boundary (simple frames are taken from it; the rest goes to wsproto).
        self._rx = trailing
        self._rx_at = 0
        # Frames written by write_nowait while a batch is open (begin_batch), and what to
        # call if the socket does not take them all when the batch is written.
        self._batch: list[bytes] | None = None
        self._on_rest: Callable[[], None] | None = None

    @property
    def buffered(self) -> bool:
        """Bytes of a further frame are already read and not yet parsed."""
        return self._ws is None and self._rx_at < len(self._rx)

    @property
    def parsing(self) -> bool:
        """A frame parser is held or unparsed bytes are (bytes of an unfinished frame or
        message are in flight, or the connection is closing); False while idle."""
        return self._ws is not None or self._rx_at < len(self._rx)

    # ---------------------------------------------------------------- receiving
    def _parser(self) -> Connection:
        ws = self._ws
        if ws is None:
            ws = self._ws = Connection(ConnectionType.SERVER)
            self._fed = self._used = 0
            if self._rx_at < len(self._rx):  # unparsed bytes come first
                rest = self._rx[self._rx_at:]
                self._rx, self._rx_at = b"", 0
                self._fed = len(rest)
                ws.receive_data(rest)
        return ws

    def _feed(self, data: bytes) -> None:
        ws = self._parser()
        self._fed += len(data)
        ws.receive_data(data)

    def _idle(self) -> bool:
        """The parser provably holds nothing: a fresh one would behave the same."""
        return (
            self._reusable and not self._in_message and not self._frame_bytes
            and self._used == self._fed
        )

    @overload
    async def receive(self) -> bytes | str: ...
    @overload
    async def receive(self, wait: bool) -> bytes | str | None: ...

    async def receive(self, wait: bool = True) -> bytes | str | None:
        """The next message. Raises :class:`ConnectionClosed` when the connection closes.

        ``wait=False`` (plain TCP): None instead of waiting when nothing is left to take and
        the socket has nothing to read now — the caller may park the connection
        (:mod:`seqactor.server.parking`) and call again once the socket is readable. The
        parser's state lives in this object, so nothing is lost in between."""
        while True:
            if self._ws is not None:  # (no local name for it: it would outlive the drop)
                message = await self._next_message(self._ws)
                if message is not None:
                    return message
                if self._idle():
                    self._ws = None
            elif self._rx_at < len(self._rx):
                rx = self._rx
                frame = (
                    None if self.close_sent
                    else simple_frame(rx, self._rx_at, self.max_message_bytes)
                )
                if frame is not None:
                    payload, at = frame
                    if at < len(rx):
                        self._rx_at = at
                    else:
                        self._rx, self._rx_at = b"", 0
                    return payload
                self._parser()  # not a simple frame (or not all of it yet): wsproto takes it
                continue
            if self.closed is not None:
                raise self.closed_error(*self.closed)
            if self._batch is not None:
                self._end_batch()  # before any wait: what was held back goes out now
            stream = self.stream
            tcp = stream.tcp
            data: bytes | bytearray | None
            try:
                if tcp is None:
                    data = await stream.receive_some(RECEIVE_BYTES)
                else:
                    # ActivityStream.receive_some's plain-TCP read, inlined: every idle
                    # connection waits here, and a call would hold one coroutine frame more.
                    await trio.lowlevel.checkpoint_if_cancelled()
                    data = read_fd(tcp.fileno(), RECEIVE_BYTES)
                    if data is None:
                        if not wait:
                            return None
                        while data is None:
                            await trio.lowlevel.wait_readable(tcp.fileno())
                            data = read_fd(tcp.fileno(), RECEIVE_BYTES)
                    else:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    stream.last_rx = trio.current_time()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._lost("connection lost")
            if self._ws is None:
                self._rx, self._rx_at = bytes(data), 0  # taken at the top of the loop
            else:
                self._feed(bytes(data))

    async def _next_message(self, ws: Connection) -> bytes | str | None:
        """Handle the parsed events up to the next complete message (None: none yet)."""
        for event in ws.events():
            if isinstance(event, BytesMessage | TextMessage):
                data: bytes | str
                if isinstance(event, TextMessage):
                    self._reusable = False  # its decoder may hold part of a character
                    data = event.data
                    size = len(data.encode())
                else:
                    data = bytes(event.data)  # (already bytes: no copy)
                    size = len(data)
                self._frame_bytes += size
                if event.frame_finished:
                    self._used += _client_frame_bytes(self._frame_bytes)
                    self._frame_bytes = 0
                self._in_message = not event.message_finished
                if self.close_sent:
                    continue  # waiting for the peer's Close: data is dropped
                if self._parts_bytes + size > self.max_message_bytes:
                    await self._fail(Close.TOO_BIG, "message larger than max_frame_bytes")
                if event.message_finished and self._parts is None:
                    return self._deliver(data)
                if self._parts is None:
                    self._parts = []
                self._parts.append(data)
                self._parts_bytes += size
                if event.message_finished:
                    parts, self._parts, self._parts_bytes = self._parts, None, 0
                    if isinstance(data, str):
                        return "".join(p for p in parts if isinstance(p, str))
                    return self._deliver(b"".join(p for p in parts if isinstance(p, bytes)))
            elif isinstance(event, Ping):
                self._used += _client_frame_bytes(len(event.payload))
                if not self.close_sent:
                    await self._send_control(ws.send(event.response()))
            elif isinstance(event, Pong):
                self._used += _client_frame_bytes(len(event.payload))
            elif isinstance(event, CloseConnection):
                self._reusable = False
                code, reason = int(event.code), event.reason or ""
                state = ws.state
                if state is ConnectionState.REMOTE_CLOSING:  # the peer began closing
                    self.close_sent = True
                    self.stream.stop_direct()
                    self.closed = (code, reason)
                    await self._send_control(ws.send(event.response()))
                elif state is ConnectionState.CLOSED:  # the peer answered our Close
                    self.closed = (code, reason)
                else:  # a protocol error: wsproto names the close code
                    await self._fail(code, reason)
                raise self.closed_error(code, reason)
        return None

    def _deliver(self, message: bytes | str) -> bytes | str:
        """A complete message: the parser goes now if it holds nothing more (the session may
        then stay idle for long)."""
        if self._idle():
            self._ws = None
        return message

    def _lost(self, reason: str) -> None:
        """The byte stream ended or broke without a Close frame."""
        self.stream.stop_direct()
        self.close_sent = True
        if self.closed is None:
            self.closed = (Close.ABNORMAL, reason)
        raise self.closed_error(*self.closed)

    async def _fail(self, code: int, reason: str) -> None:
        """Close with ``code`` now (no wait for the peer's Close) and raise."""
        if not self.close_sent:
            await self._send_close(code, reason)
        self.closed = (code, reason)
        raise self.closed_error(code, reason)

    # ---------------------------------------------------------------- sending
    def begin_batch(self, on_rest: Callable[[], None]) -> None:
        """Hold back what :meth:`write_nowait` writes until this connection next reads from
        the socket or sends through its send path, then write it in one go (one ``write``
        for the replies to pipelined requests). Meanwhile nobody else writes directly. If the
        socket does not take it all, the stream holds the rest (first in line) and
        ``on_rest`` is called (it must see that a writer flushes it). Nothing happens when a
        direct write is not possible now."""
        if self._batch is None and self.stream.fd >= 0:
            self._batch = []
            self._on_rest = on_rest
            self.stream.pause_direct(True)

    def _take_batch(self) -> bytes:
        batch = self._batch
        self._batch = self._on_rest = None
        self.stream.pause_direct(False)
        return b"".join(batch) if batch else b""

    def _end_batch(self) -> None:
        on_rest = self._on_rest
        data = self._take_batch()
        if not data:
            return
        fd = self.stream.fd
        n = 0
        if fd >= 0:
            try:
                n = os.write(fd, data)
            except OSError:  # (full, or failed: the writer's locked send meets the error)
                n = 0
        if n < len(data):
            self.stream.hold(data[n:])
            assert on_rest is not None
            on_rest()

    def write_nowait(self, payload: bytes) -> bytes | None:
        """Write one binary message now if the socket takes it: None = not possible (use
        :meth:`send_message`), b"" = written (or, in a batch, held back to go first), else
        the framed bytes still to go (held by the stream: :meth:`flush` sends them)."""
        if self._batch is not None:
            self._batch.append(ws_binary_frame(payload))
            return b""
        fd = self.stream.fd
        if fd < 0:
            return None
        raw = ws_binary_frame(payload)
        try:
            n = os.write(fd, raw)
        except BlockingIOError:
            n = 0
        except OSError:
            return None  # the locked send meets the error and reports it
        rest = raw[n:]
        if rest:
            self.stream.hold(rest)
        return rest

    async def _locked_send(self, data: bytes) -> None:
        """The one send path for anything that may wait: the held rest, then ``data``."""
        batch = self._batch
        if batch is not None:  # what a batch held back goes first (no direct write meanwhile)
            self._batch = self._on_rest = None
            data = b"".join(batch) + bytes(data)
        lock = self._lock
        if lock is None:
            lock = self._lock = trio.StrictFIFOLock()
        try:
            async with lock:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.stream.stop_direct()
            self.close_sent = True
            if self.closed is None:
                self.closed = (Close.ABNORMAL, "connection lost")
            raise self.closed_error(*self.closed) from None
        finally:
            if batch is not None:
                self.stream.pause_direct(False)

    async def send_message(self, frame: bytes) -> None:
        """Send one binary message. Raises :class:`ConnectionClosed` once closed."""
        if self.close_sent:
            raise self.closed_error(*(self.closed or (Close.ABNORMAL, "closing")))
        await trio.lowlevel.checkpoint_if_cancelled()
        rest = self.write_nowait(frame)
        if rest == b"":
            return  # written (no yield to the scheduler: a session writes a bounded outbox)
        await self._locked_send(ws_binary_frame(frame) if rest is None else b"")

    async def send_raw(self, data: bytes) -> None:
        """Send bytes that are not a data frame (the 101 response): written at once when the
        socket takes them all (no scheduler round trip), else through the send path."""
        fd = self.stream.fd
        if fd >= 0:
            try:
                n = os.write(fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                n = 0  # the locked send meets the error and reports it
            if n == len(data):
                return
            data = data[n:]
        await self._locked_send(data)

    async def flush(self) -> None:
        """Send the held rest of a direct write (nothing if it already went out)."""
        await self._locked_send(b"")

    async def _send_control(self, data: bytes) -> None:
        """A pong or Close reply: it must not be cut short by a cancellation (a half-sent
        frame would corrupt the stream), nor wait forever on a peer that does not read."""
        with trio.move_on_after(CONTROL_SEND_TIMEOUT_S) as scope:
            scope.shield = True
            await self._locked_send(data)
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self.stream)
            self._lost("write timeout")

    async def _send_close(self, code: int, reason: str) -> None:
        self._reusable = False
        data = self._parser().send(CloseConnection(code=code, reason=reason))
        self.close_sent = True
        self.stream.stop_direct()
        await self._send_control(data)

    async def close(self, code: int, reason: str) -> None:
        """Send a Close frame (``code``, ``reason``: wsproto truncates it to 123 bytes) and
        wait for the peer's; the caller bounds the wait. Quiet if already closed."""
        try:
            if not self.close_sent:
                await self._send_close(code, reason)
            while self.closed is None:
                await self.receive()  # data is dropped until the peer's Close
        except self.closed_error:
            pass
