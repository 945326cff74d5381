"""Fan-out benchmark baselines: the raw-socket ceiling and the naive trio-websocket server.

Run by ``bench/fanout.py`` as a subprocess: ``python bench/_fanout_servers.py raw|naive
--payload HEX``. It prints ``listening on PORT`` once listening (as the peer servers in
``bench/peers/`` do), accepts WebSocket handshakes on ``/v1`` from then on, and obeys JSON
lines on stdin (the peers' fan-out mode speaks the same, ``bench/peers/control.js``):

* ``{"cmd": "count"}`` -> ``{"connected": n}``
* ``{"cmd": "blast", "seconds": S}`` -> writes the frame to every connection, round after
  round, as fast as it can for S seconds, then ``{"sent": frames, "secs": elapsed}``.
* ``{"cmd": "exit"}``

``raw``: the ceiling. Handshakes by wsproto over plain non-blocking sockets (selectors); the
blast is one ``socket.send`` of the ready WebSocket frame (header + payload, encoded once) per
recipient; a socket whose buffer is full is parked in epoll until writable (a partial write
keeps its remainder, so the stream stays well-formed). Nothing else happens per frame.

``naive``: what a straightforward server does: trio-websocket, and for each message a loop
over all connections calling ``await conn.send_message(payload)``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import select
import selectors
import socket
import struct
import sys
import time
from typing import Any

from _common import raise_nofile
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

LISTEN_BACKLOG = 4096


def ws_binary_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x82, n)) + payload
    if n < 1 << 16:
        return b"\x82\x7e" + struct.pack(">H", n) + payload
    return b"\x82\x7f" + struct.pack(">Q", n) + payload


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- raw


def blast_raw(socks: list[socket.socket], frame: bytes, seconds: float) -> dict[str, Any]:
    """One ``send`` per frame per recipient; full sockets wait in epoll; no per-frame Python
    beyond the loop itself."""
    ep = select.epoll()
    by_fd = {s.fileno(): s for s in socks}
    remainder: dict[int, memoryview] = {}
    ready = list(by_fd)
    parked: set[int] = set()
    sent = 0
    size = len(frame)
    t0 = time.monotonic()
    deadline = t0 + seconds
    try:
        while True:
            blocked = []
            for fd in ready:
                sock = by_fd[fd]
                rest = remainder.pop(fd, None)
                try:
                    if rest is not None:
                        n = sock.send(rest)
                        if n < len(rest):
                            remainder[fd] = rest[n:]
                            blocked.append(fd)
                            continue
                        sent += 1
                    n = sock.send(frame)
                except BlockingIOError:
                    if rest is not None:
                        remainder[fd] = rest
                    blocked.append(fd)
                    continue
                except OSError:
                    continue  # peer gone: drop it
                if n < size:
                    remainder[fd] = memoryview(frame)[n:]
                    blocked.append(fd)
                else:
                    sent += 1
            now = time.monotonic()
            if now >= deadline:
                break
            if blocked:
                if len(blocked) < len(ready):
                    blocked_set = set(blocked)
                    ready = [fd for fd in ready if fd not in blocked_set]
                else:
                    ready = []
                for fd in blocked:
                    if fd not in parked:
                        ep.register(fd, select.EPOLLOUT)
                        parked.add(fd)
            if not ready:
                events = ep.poll(min(0.05, deadline - now))
                for fd, _ in events:
                    ep.unregister(fd)
                    parked.discard(fd)
                    ready.append(fd)
    finally:
        ep.close()
    return {"sent": sent, "secs": time.monotonic() - t0}


def serve_raw(frame: bytes) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(LISTEN_BACKLOG)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    stdin_fd = sys.stdin.fileno()
    sel.register(stdin_fd, selectors.EVENT_READ, "stdin")
    handshaking: dict[int, tuple[socket.socket, WSConnection]] = {}
    open_socks: list[socket.socket] = []
    buf = b""
    print(f"listening on {listener.getsockname()[1]}", flush=True)
    while True:
        for key, _ in sel.select():
            if key.data == "accept":
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    handshaking[sock.fileno()] = (sock, WSConnection(ConnectionType.SERVER))
                    sel.register(sock, selectors.EVENT_READ, "hs")
            elif key.data == "hs":
                sock, ws = handshaking[key.fd]
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(sock)
                    del handshaking[key.fd]
                    sock.close()
                    continue
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, Request):
                        sock.sendall(ws.send(AcceptConnection()))  # small: fits the buffer
                        sel.unregister(sock)
                        del handshaking[key.fd]
                        open_socks.append(sock)
                        break
            else:
                chunk = os.read(stdin_fd, 65536)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    cmd = json.loads(line)
                    if cmd["cmd"] == "count":
                        reply({"connected": len(open_socks)})
                    elif cmd["cmd"] == "blast":
                        reply(blast_raw(open_socks, frame, cmd["seconds"]))
                    elif cmd["cmd"] == "exit":
                        return


# --------------------------------------------------------------------------- naive


def serve_naive(payload: bytes) -> None:
    import trio
    import trio_websocket as tws

    conns: list[tws.WebSocketConnection] = []

    async def handler(request: tws.WebSocketRequest) -> None:
        conn = await request.accept()
        conns.append(conn)
        try:
            await conn.get_message()  # clients never send: wait for the close
        except tws.ConnectionClosed:
            pass
        finally:
            conns.remove(conn)

    async def blast(seconds: float) -> dict[str, Any]:
        sent = 0
        t0 = time.monotonic()
        deadline = t0 + seconds
        while time.monotonic() < deadline:
            for conn in list(conns):  # one message, every member, one send_message each
                try:
                    await conn.send_message(payload)
                    sent += 1
                except tws.ConnectionClosed:
                    pass
        return {"sent": sent, "secs": time.monotonic() - t0}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, lambda s: _serve_one(s, handler), 0,
                                  host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            print(f"listening on {port}", flush=True)
            stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
            buf = b""
            while True:
                chunk = await stdin.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    cmd = json.loads(line)
                    if cmd["cmd"] == "count":
                        reply({"connected": len(conns)})
                    elif cmd["cmd"] == "blast":
                        reply(await blast(cmd["seconds"]))
                    elif cmd["cmd"] == "exit":
                        nursery.cancel_scope.cancel()
                        return
            nursery.cancel_scope.cancel()

    async def _serve_one(stream: trio.SocketStream, handler: Any) -> None:
        async with trio.open_nursery() as n:
            request = await tws.wrap_server_stream(n, stream)
            await handler(request)
            n.cancel_scope.cancel()

    trio.run(main)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("raw", "naive"))
    ap.add_argument("--payload", required=True, help="the ServerMessage bytes, hex")
    args = ap.parse_args()
    raise_nofile()
    payload = bytes.fromhex(args.payload)
    if args.mode == "raw":
        serve_raw(ws_binary_frame(payload))
    else:
        serve_naive(payload)


if __name__ == "__main__":
    main()
