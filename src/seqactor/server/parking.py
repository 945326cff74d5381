"""Idle sessions without a task: their sockets wait in one ``epoll`` set, watched by one task.

An open user session on plain TCP that has nothing to read *parks*: its task registers the
socket here and ends. The watcher (:meth:`Parking.run`, one task per server) waits until the
epoll set's own descriptor is readable (``trio.lowlevel.wait_readable``: trio's loop watches
it like any socket), takes the ready sockets out of the set and hands each one's item back
through ``wake`` — the gateway starts a task that reads and processes until the socket is
drained, then parks it again. The session can also be woken without bytes (it is asked to
end: :meth:`unpark`). A parked socket is never closed: it is taken out of the set before its
session's task closes it.

Why: a waiting trio task (the task, its context, its cancel status, the chain of suspended
coroutine frames and trio's registration of the socket) costs ~4 KB of heap per idle
connection (``bench/memory.py``); a parked session costs a dict entry here and the kernel's
epoll item. Linux only (:data:`AVAILABLE`); elsewhere sessions keep their task.
"""

from __future__ import annotations

import errno
import select
from collections.abc import Callable
from typing import Generic, TypeVar

import trio

T = TypeVar("T")

AVAILABLE = hasattr(select, "epoll")
# what epoll's unregister says of a descriptor it does not watch (any more)
NOT_REGISTERED_ERRNOS = frozenset({errno.ENOENT, errno.EBADF})
MAX_EVENTS = 1024  # ready sockets taken per pass (more: the next pass, at once)
# EPOLLIN: bytes to read; the peer's FIN and errors (EPOLLHUP / EPOLLERR, always reported)
# wake the session too, whose read then meets them.
PARK_EVENTS = select.EPOLLIN if AVAILABLE else 0


class Parking(Generic[T]):
    """The parked sockets (descriptor -> item) and the epoll set that watches them."""

    __slots__ = ("_epoll", "_items", "_wake")

    def __init__(self, wake: Callable[[T], None]) -> None:
        self._epoll = select.epoll()
        self._items: dict[int, T] = {}
        self._wake = wake

    def __len__(self) -> int:
        return len(self._items)

    def park(self, fd: int, item: T) -> bool:
        """Watch ``fd`` for ``item``: ``wake(item)`` once it is readable (or hung up);
        False when it cannot be watched (the caller waits for it itself)."""
        if self._epoll.closed:
            return False
        try:
            self._epoll.register(fd, PARK_EVENTS)
        except OSError:
            return False
        self._items[fd] = item
        return True

    def unpark(self, fd: int) -> T | None:
        """Stop watching ``fd``; its item, or None when it was not parked (any more)."""
        item = self._items.pop(fd, None)
        if item is not None and not self._epoll.closed:
            try:
                self._epoll.unregister(fd)
            except OSError as exc:
                if exc.errno not in NOT_REGISTERED_ERRNOS:
                    raise
                # (not registered, or already closed: nothing to undo)
        return item

    async def run(self) -> None:
        """Wake the items of ready sockets, until cancelled or closed (:meth:`close`); then the set
        is closed (what is still parked stays parked: see :meth:`close`)."""
        epoll = self._epoll
        try:
            while True:
                try:
                    await trio.lowlevel.wait_readable(epoll.fileno())
                except trio.ClosedResourceError:
                    return  # closed by close()
                for fd, _ in epoll.poll(0, MAX_EVENTS):
                    item = self.unpark(fd)
                    if item is not None:
                        self._wake(item)
        finally:
            self.close()

    def close(self) -> list[T]:
        """Close the set; the items still parked (nothing wakes them any more)."""
        items = list(self._items.values())
        self._items.clear()
        if not self._epoll.closed:
            # (trio may hold a registration of the descriptor: tell it before it closes)
            trio.lowlevel.notify_closing(self._epoll.fileno())
            self._epoll.close()
        return items
