"""Listening sockets shared by several server processes on one port (``SO_REUSEPORT``): the
supervisor of ``seqactor serve --workers N`` reserves the port with one, each worker listens
on its own (the kernel spreads new connections over them)."""

from __future__ import annotations

import socket

import trio

LISTEN_BACKLOG = 1024  # each worker's listen() backlog


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEADDR`` and ``SO_REUSEPORT`` (not
    listening). ``port`` 0: a free port (read it with ``getsockname()``). Raises OSError."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def reuse_port_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """The worker side: one listener on ``host:port`` sharing the port with the other
    workers (``SO_REUSEPORT``). Raises OSError (port taken by a process of another user)."""
    sock = reuse_port_socket(host, port)
    sock.listen(LISTEN_BACKLOG)
    return [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
