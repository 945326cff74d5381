"""Stores behind one interface, chosen by URL: ``memory://``, ``sqlite:///path``, ``redis://``."""

from __future__ import annotations

from seqactor.store._base import (
    Allocated,
    Change,
    ConversationState,
    IncompatibleStore,
    InvalidArgument,
    MemberReads,
    MembersAdded,
    MembersRemoved,
    MinChanged,
    NotFound,
    NotMember,
    ReadMarked,
    Store,
    StoreError,
    StoreReset,
    TooLarge,
    Unavailable,
    ViewData,
)


def open_store(url: str) -> Store:
    """Make (not yet open) the store for ``url``; ``await store.open()`` before use."""
    if url == "memory://" or url.startswith("memory:"):
        from seqactor.store.memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite://"):
        from seqactor.store.sqlite import SQLiteStore

        path = url[len("sqlite://"):]
        if path.startswith("/") and not path.startswith("//"):
            path = path[1:]  # sqlite:///rel/path -> rel/path ; sqlite:////abs -> /abs
        elif path.startswith("//"):
            path = path[1:]
        if not path:
            raise InvalidArgument(f"no database path in store URL {url!r}")
        return SQLiteStore(path)
    if url.startswith(("redis://", "redis+cluster://")):
        from seqactor.store.redis import RedisStore

        return RedisStore(url)
    raise InvalidArgument(
        f"unsupported store URL {url!r} (expected memory://, sqlite:///path, redis://host:port/db or redis+cluster://host:port,...)"
    )


__all__ = [
    "MemberReads",
    "Allocated",
    "Change",
    "ConversationState",
    "IncompatibleStore",
    "InvalidArgument",
    "MembersAdded",
    "MembersRemoved",
    "MinChanged",
    "NotFound",
    "NotMember",
    "ReadMarked",
    "Store",
    "StoreError",
    "StoreReset",
    "TooLarge",
    "Unavailable",
    "ViewData",
    "open_store",
]
