"""Fault injector: a TCP proxy on 127.0.0.1 that can cut its connections at random.

The listening port stays the same for the proxy's lifetime; ``target`` (the upstream port)
can change, e.g. to point at a restarted server.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

BUFFER_BYTES = 65_536


class _Pipe:
    def __init__(self, client: trio.SocketStream, upstream: trio.SocketStream) -> None:
        self.client = client
        self.upstream = upstream
        self.scope = trio.CancelScope()


class Proxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
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
        try:
            with pipe.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)
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
