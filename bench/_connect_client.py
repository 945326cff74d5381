"""Session-open benchmark: one client process opening many WebSocket sessions (see
bench/connect.py).

Run by ``bench/connect.py`` as a subprocess, driven by JSON lines on stdin, one JSON line
answered per command on stdout. Lean on purpose (its CPU competes with the server's on a
2-core machine): one thread, one epoll, non-blocking sockets, every frame it sends made
before the clock starts (masked with the all-zero key, which leaves the payload as it is).

Per connection, as the Python SDK opens a session: TCP connect, the HTTP upgrade (101
expected), ``Hello`` -> ``Welcome``, then ``Subscribe{all}`` and ``GetSequences`` pipelined ->
both replies. ``mode: "plain"`` stops after the 101 (the peers' handshake rate). Opened
connections stay open (unregistered from epoll) until ``close``.

Commands (one JSON object per line):

* ``{"cmd": "open", "mode": "seqactor"|"plain", "port": P, "users": [first, last),
  "concurrency": C, "secret_file": F}`` — open one connection per user, at most C in flight;
  answers ``{"opened", "failed", "t0", "t1", "latency_ms": [...]}`` (``time.monotonic()``,
  system-wide on Linux, so the driver can compare clients' clocks).
* ``{"cmd": "close"}`` — close every connection.
* ``{"cmd": "exit"}``.
"""

from __future__ import annotations

import errno
import json
import select
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from _common import raise_nofile

from seqactor._proto import seqactor_pb2 as pb
from seqactor.auth import issue_token

TOKEN_TTL_S = 3600.0
RECEIVE_BYTES = 65_536
POLL_TIMEOUT_S = 1.0
OPEN_TIMEOUT_S = 120.0  # the whole batch; connections still opening then count as failed
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # any valid Sec-WebSocket-Key (the server only echoes it)

# Steps per connection.
CONNECTING, UPGRADING, HELLO, SYNC = range(4)
SYNC_REPLIES = 2  # Subscribe's Ack and GetSequences' update


def client_frame(payload: bytes) -> bytes:
    """A masked binary frame (all-zero key: the payload bytes go as they are)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x82, 0x80 | n))
    elif n < 1 << 16:
        header = bytes((0x82, 0xFE)) + struct.pack(">H", n)
    else:
        header = bytes((0x82, 0xFF)) + struct.pack(">Q", n)
    return header + b"\0\0\0\0" + payload


def complete_frames(buf: bytearray) -> int:
    """Count (and consume) the complete server frames at the head of ``buf``; -1 on a Close."""
    count = 0
    i = 0
    n = len(buf)
    while n - i >= 2:
        if buf[i] & 0x0F == 8:
            return -1
        length = buf[i + 1] & 0x7F
        start = i + 2
        if length == 126:
            if n - i < 4:
                break
            length = (buf[i + 2] << 8) | buf[i + 3]
            start = i + 4
        elif length == 127:
            if n - i < 10:
                break
            length = int.from_bytes(buf[i + 2:i + 10], "big")
            start = i + 10
        if n < start + length:
            break
        i = start + length
        count += 1
    if i:
        del buf[:i]
    return count


class Conn:
    __slots__ = ("sock", "step", "buf", "hello", "started", "want")

    def __init__(self, sock: socket.socket, hello: bytes, started: float) -> None:
        self.sock = sock
        self.step = CONNECTING
        self.buf = bytearray()
        self.hello = hello
        self.started = started
        self.want = 0


def open_all(cmd: dict[str, Any], held: list[socket.socket]) -> dict[str, Any]:
    port = int(cmd["port"])
    first, last = cmd["users"]
    plain = cmd["mode"] == "plain"
    concurrency = int(cmd["concurrency"])
    request = (
        f"GET /v1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: " + KEY.decode() + "\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    hellos: list[bytes] = []
    if not plain:
        secret = Path(cmd["secret_file"]).read_bytes().strip()
        for u in range(first, last):
            token = issue_token(secret, f"u{u:06d}", ttl_s=TOKEN_TTL_S)
            hellos.append(client_frame(pb.ClientMessage(
                request_id=1, hello=pb.Hello(token=token, device_id="bench")).SerializeToString()))
    sync = client_frame(pb.ClientMessage(
        request_id=2, subscribe=pb.Subscribe(all=True)).SerializeToString()) + client_frame(
        pb.ClientMessage(request_id=3, get_sequences=pb.GetSequences()).SerializeToString())
    ep = select.epoll()
    conns: dict[int, Conn] = {}
    latency: list[float] = []
    failed = 0
    todo = last - first
    next_user = 0
    t0 = time.monotonic()
    deadline = t0 + OPEN_TIMEOUT_S

    def start_one() -> None:
        nonlocal next_user
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = s.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, "connect failed")
        conns[s.fileno()] = Conn(s, b"" if plain else hellos[next_user], time.monotonic())
        next_user += 1
        ep.register(s.fileno(), select.EPOLLOUT)

    def finish(fd: int, c: Conn, ok: bool) -> None:
        nonlocal failed
        ep.unregister(fd)
        del conns[fd]
        if ok:
            latency.append((time.monotonic() - c.started) * 1000.0)
            held.append(c.sock)
        else:
            failed += 1
            c.sock.close()

    while next_user < todo and len(conns) < concurrency:
        start_one()
    while conns and time.monotonic() < deadline:
        for fd, mask in ep.poll(POLL_TIMEOUT_S):
            c = conns[fd]
            if c.step == CONNECTING:
                if mask & (select.EPOLLERR | select.EPOLLHUP) or c.sock.getsockopt(
                        socket.SOL_SOCKET, socket.SO_ERROR):
                    finish(fd, c, False)
                else:
                    c.sock.send(request)
                    c.step = UPGRADING
                    ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = c.sock.recv(RECEIVE_BYTES)
            except OSError:
                data = b""
            if not data:
                finish(fd, c, False)
                continue
            c.buf += data
            if c.step == UPGRADING:
                end = c.buf.find(b"\r\n\r\n")
                if end < 0:
                    continue
                if not c.buf.startswith(b"HTTP/1.1 101"):
                    finish(fd, c, False)
                    continue
                del c.buf[:end + 4]
                if plain:
                    finish(fd, c, True)
                    continue
                c.sock.send(c.hello)
                c.step, c.want = HELLO, 1
            got = complete_frames(c.buf)
            if got < 0:
                finish(fd, c, False)
                continue
            c.want -= got
            if c.want > 0:
                continue
            if c.step == HELLO:
                c.sock.send(sync)
                c.step, c.want = SYNC, SYNC_REPLIES + c.want
                if c.want > 0:
                    continue
            finish(fd, c, True)
        while next_user < todo and len(conns) < concurrency:
            start_one()
    t1 = time.monotonic()
    for fd, c in list(conns.items()):
        finish(fd, c, False)
    ep.close()
    return {"opened": len(latency), "failed": failed + (todo - next_user), "t0": t0, "t1": t1,
            "latency_ms": latency}


def main() -> None:
    raise_nofile()
    held: list[socket.socket] = []
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "open":
                answer = open_all(cmd, held)
            elif cmd["cmd"] == "close":
                for s in held:
                    s.close()
                answer = {"closed": len(held)}
                held.clear()
            elif cmd["cmd"] == "exit":
                return
            else:
                answer = {"error": f"unknown command {cmd['cmd']!r}"}
        except Exception as exc:  # reported to the driver, which stops the run
            answer = {"error": repr(exc)}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
