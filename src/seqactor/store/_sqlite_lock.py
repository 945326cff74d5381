"""The lock that keeps one server per SQLite file and operator actions away from a running
server: an exclusive ``flock`` on ``<db>.lock`` beside the database (see
:mod:`seqactor.store._sqlite_admin`, "The lock")."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from seqactor.store._base import Unavailable

LOCK_SUFFIX = ".lock"


def _open_lock_file(db_path: str) -> int:
    try:
        return os.open(lock_path(db_path), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise Unavailable(
            f"cannot create the lock file {lock_path(db_path)}: {exc.strerror or exc}"
        ) from None


class StoreInUse(Unavailable):
    """A server has the store open; the operator action needs it stopped."""


def lock_path(db_path: str) -> str:
    return db_path + LOCK_SUFFIX


def hold_open(db_path: str) -> int | None:
    """Take the lock an open store holds (exclusive: one server per file); returns the fd to
    release (None for ``:memory:``). Never blocks: :class:`StoreInUse` when another server (or
    an operator action) has it."""
    if db_path == ":memory:":
        return None
    where = os.path.abspath(db_path)
    if os.path.isdir(where):
        raise Unavailable(f"{where} is a directory, not a database file")
    if not os.path.isdir(os.path.dirname(where)):
        raise Unavailable(f"cannot create {where}: directory {os.path.dirname(where)} does not exist")
    fd = _open_lock_file(db_path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreInUse(
            f"{where} is open in another seqactor process (a server, or `seqactor store` "
            "restoring it): one server per SQLite file; stop the other one, or share a "
            "redis:// store between nodes"
        ) from None
    return fd


def release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor drops its flock


@contextlib.contextmanager
def exclusive(db_path: str) -> Iterator[None]:
    """Hold the store file exclusively (no server has it open) for an operator action."""
    fd = _open_lock_file(db_path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreInUse(
                f"{db_path} is open in a running seqactor server; stop the server first"
            ) from None
        yield
    finally:
        os.close(fd)
