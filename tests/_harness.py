"""Test harness: an in-process server on 127.0.0.1 and a raw protocol client.

The raw client speaks the wire protocol directly (protobuf frames over trio-websocket), so the
server tests assert exactly what a client on the wire sees.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_websocket as tws

from seqactor._kernel import ConversationSeqs, decode_update
from seqactor._proto import seqactor_pb2 as pb
from seqactor.auth import issue_token
from seqactor.server.config import ServerConfig
from seqactor.server.gateway import Server
from seqactor.store import open_store

SECRET = b"test-secret-0123456789abcdef0123456789"
REPLY_TIMEOUT_S = 5.0


# Settings every running_server() takes unless its caller names them (test modules that run
# on both connection paths set park_idle_sessions through the ``connection_path`` fixture).
SERVER_DEFAULTS: dict[str, Any] = {}


@asynccontextmanager
async def running_server(store_url: str = "memory://", **overrides: Any) -> AsyncIterator[Server]:
    cfg = ServerConfig(host="127.0.0.1", port=0, **{**SERVER_DEFAULTS, **overrides})
    server = Server(cfg, open_store(store_url), SECRET)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        try:
            yield server
        finally:
            server.stop()


def set_connection_path(monkeypatch: Any, path: str) -> None:
    """Run the test's servers on connection path ``path``: "parked" (idle user sessions on
    plain TCP hold no task: the default on Linux) or "task" (a task per connection, as where
    epoll is missing)."""
    assert path in ("parked", "task")
    monkeypatch.setattr(
        "tests._harness.SERVER_DEFAULTS", {"park_idle_sessions": path == "parked"}
    )


def token(user: str, role: str = "user", ttl: float = 3600) -> str:
    return issue_token(SECRET, user, role=role, ttl_s=ttl)


class Closed(Exception):
    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"closed {code} {reason}")
        self.code = code
        self.reason = reason


class RawClient:
    """One WebSocket session. Replies are matched by request id; pushes are queued."""

    def __init__(self, conn: tws.WebSocketConnection) -> None:
        self.conn = conn
        self._ids = itertools.count(1)
        self.pushes: list[pb.ServerMessage] = []
        self.frames: list[pb.ServerMessage] = []  # every frame received, in order
        self.welcome: pb.Welcome | None = None

    async def send(self, msg: pb.ClientMessage) -> None:
        await self.conn.send_message(msg.SerializeToString())

    async def recv(self, timeout: float = REPLY_TIMEOUT_S) -> pb.ServerMessage:
        with trio.fail_after(timeout):
            try:
                data = await self.conn.get_message()
            except tws.ConnectionClosed as exc:
                raise Closed(exc.reason.code, exc.reason.reason) from None
        assert isinstance(data, bytes), "server sent a text frame"
        msg = pb.ServerMessage.FromString(data)
        self.frames.append(msg)
        return msg

    async def request(self, kind: str, timeout: float = REPLY_TIMEOUT_S, **fields: Any) -> pb.ServerMessage:
        rid = next(self._ids)
        msg = pb.ClientMessage(request_id=rid)
        getattr(msg, kind).SetInParent()
        for k, v in fields.items():
            field = getattr(getattr(msg, kind), k)
            if isinstance(v, list | tuple):
                field.extend(v)  # repeated
            else:
                setattr(getattr(msg, kind), k, v)
        await self.send(msg)
        with trio.fail_after(timeout):
            while True:
                reply = await self.recv(math.inf)
                if reply.request_id == rid:
                    return reply
                self.pushes.append(reply)

    async def next_push(self, timeout: float = REPLY_TIMEOUT_S) -> pb.ServerMessage:
        if self.pushes:
            return self.pushes.pop(0)
        msg = await self.recv(timeout)
        assert msg.request_id == 0, f"expected a push, got a reply {msg}"
        return msg

    async def no_push(self, wait: float = 0.2) -> None:
        """Assert nothing arrives within ``wait`` seconds."""
        assert not self.pushes, f"unexpected push {self.pushes[0]}"
        with trio.move_on_after(wait):
            msg = await self.recv(math.inf)
            raise AssertionError(f"unexpected frame {msg}")

    async def wait_closed(self, timeout: float = REPLY_TIMEOUT_S) -> Closed:
        with trio.fail_after(timeout):
            while True:
                try:
                    msg = await self.recv(math.inf)
                except Closed as exc:
                    return exc
                self.pushes.append(msg)

    async def aclose(self) -> None:
        await self.conn.aclose()


@asynccontextmanager
async def raw_connect(
    server: Server, user: str | None = None, role: str = "user", device_id: str = "",
    tok: str | None = None, hello: bool = True, path: str = "/v1",
) -> AsyncIterator[RawClient]:
    async with tws.open_websocket_url(f"ws://127.0.0.1:{server.port}{path}") as conn:
        client = RawClient(conn)
        if hello:
            reply = await client.request(
                "hello", token=tok if tok is not None else token(user or "u", role),
                device_id=device_id,
            )
            if reply.WhichOneof("body") == "welcome":
                client.welcome = reply.welcome
            else:
                client.frames.append(reply)
                client.pushes.append(reply)
        yield client


def update_of(msg: pb.ServerMessage) -> tuple[dict[str, ConversationSeqs], bytes, bool, list[str]]:
    assert msg.WhichOneof("body") == "update", f"expected an update, got {msg}"
    return decode_update(msg.update.SerializeToString())


def body(msg: pb.ServerMessage) -> str:
    return msg.WhichOneof("body") or ""
