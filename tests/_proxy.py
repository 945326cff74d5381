"""Fault injector: a TCP proxy on 127.0.0.1 that can cut its connections at random.

The listening port stays the same for the proxy's lifetime; ``target`` (the upstream port)
can change, e.g. to point at a restarted server.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

BUFFER_BYTES = 65_536


class _Pipe:
    def __init__(self, client: trio.SocketStream, upstream: trio.SocketStream) -> None:
        self.client = client
        self.upstream = upstream
        self.scope = trio.CancelScope()


# A frame tap sees every WebSocket message payload (unmasked) crossing the proxy once the
# HTTP handshake is through: ``await tap(direction, payload)`` with direction "up" (client to
# server) or "down"; it may wait (holding the stream in that direction) and returns False to
# cut the connection instead of forwarding the frame.
FrameTap = Callable[[str, bytes], Awaitable[bool]]


class _Frames:
    """Splits one direction of a WebSocket byte stream into (raw frame, payload) pairs."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.handshake_done = False

    def feed(self, data: bytes) -> list[tuple[bytes, bytes | None]]:
        """Complete units in ``data``: (raw bytes, payload) — payload None for the handshake
        and control frames."""
        self.buf += data
        out: list[tuple[bytes, bytes | None]] = []
        if not self.handshake_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return out
            out.append((bytes(self.buf[: end + 4]), None))
            del self.buf[: end + 4]
            self.handshake_done = True
        while len(self.buf) >= 2:
            b0, b1 = self.buf[0], self.buf[1]
            masked, size, at = b1 & 0x80, b1 & 0x7F, 2
            if size == 126:
                if len(self.buf) < 4:
                    break
                size, at = int.from_bytes(self.buf[2:4], "big"), 4
            elif size == 127:
                if len(self.buf) < 10:
                    break
                size, at = int.from_bytes(self.buf[2:10], "big"), 10
            mask = b""
            if masked:
                mask, at = bytes(self.buf[at : at + 4]), at + 4
            if len(self.buf) < at + size:
                break
            raw = bytes(self.buf[: at + size])
            payload = bytes(self.buf[at : at + size])
            if masked:
                payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
            del self.buf[: at + size]
            opcode = b0 & 0x0F
            out.append((raw, payload if opcode in (1, 2) else None))
        return out


class Proxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self.tap: FrameTap | None = None  # see FrameTap; read when a connection opens
        self.port = 0
        self.pipes: dict[_Pipe, None] = {}  # insertion order: seeded choices repeat
        self.cuts = 0
        self.accepted = 0
        self._listener: trio.SocketListener | None = None
        self._flowing = trio.Event()  # cleared while paused: bytes are held, not forwarded
        self._flowing.set()

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1"

    async def serve(self, task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self._listener = listeners[0]
        self.port = self._listener.socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        try:
            upstream = await trio.open_tcp_stream(self.host, self.target_port)
        except OSError:
            await trio.aclose_forcefully(client)
            return
        pipe = _Pipe(client, upstream)
        self.pipes[pipe] = None
        tap = self.tap
        try:
            with pipe.scope:
                async with trio.open_nursery() as nursery:
                    if tap is None:
                        nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                        nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)
                    else:
                        for src, dst, direction in ((client, upstream, "up"), (upstream, client, "down")):
                            nursery.start_soon(
                                self._pump_frames, src, dst, direction, tap, pipe,
                                nursery.cancel_scope,
                            )
        finally:
            self.pipes.pop(pipe, None)
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(upstream)

    def pause(self) -> None:
        """Hold every byte in flight (a stalled network) until :meth:`resume`."""
        self._flowing = trio.Event()

    def resume(self) -> None:
        self._flowing.set()

    async def _pump(
        self, src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        try:
            while True:
                data = await src.receive_some(BUFFER_BYTES)
                if not data:
                    break
                await self._flowing.wait()
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    async def _pump_frames(
        self, src: trio.SocketStream, dst: trio.SocketStream, direction: str, tap: FrameTap,
        pipe: _Pipe, scope: trio.CancelScope,
    ) -> None:
        frames = _Frames()
        try:
            while True:
                data = await src.receive_some(BUFFER_BYTES)
                if not data:
                    break
                for raw, payload in frames.feed(data):
                    if payload is not None and not await tap(direction, payload):
                        self.cut(pipe)
                        return
                    await self._flowing.wait()
                    await dst.send_all(raw)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    def cut(self, pipe: _Pipe) -> None:
        """Drop one connection abruptly (both sides see the TCP connection vanish)."""
        self.cuts += 1
        pipe.scope.cancel()

    def cut_random(self, rng: random.Random) -> bool:
        if not self.pipes:
            return False
        self.cut(rng.choice(list(self.pipes)))
        return True

    def cut_all(self) -> None:
        for pipe in list(self.pipes):
            self.cut(pipe)


@asynccontextmanager
async def running_proxy(target_port: int) -> AsyncIterator[Proxy]:
    proxy = Proxy(target_port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()
