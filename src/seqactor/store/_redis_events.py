"""The Redis store's change events: the codec of published payloads and the reorder buffer
that hands changes to listeners strictly in position order (pure: no I/O, no Trio).

**Payloads** (fields joined by ``SEP``; user lists by ``USEP``), written by the Lua scripts
(``lua/op.lua``) and parsed by :func:`parse_change`::

    A pos cid first last time sender sender_read      Allocated
    R pos cid user read                               ReadMarked
    M pos cid min                                     MinChanged
    J pos cid max min time users                      MembersAdded
    L pos cid keep(0/1) users                         MembersRemoved
    S pos                                             skip: the position will never commit
    E 0                                               the epoch changed (store init --force)

Numbers are decimal (seqs: uint64, positions: int, times: ms since the Unix epoch). A batch
script call publishes its changes in one message: their payloads joined by ``RS``, in
position order (:func:`records`). Its reply is one string too: a record per op, joined by
``RS`` (:func:`split_replies`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from seqactor.store._base import (
    Allocated,
    Change,
    MembersAdded,
    MembersRemoved,
    MinChanged,
    ReadMarked,
)

SEP = "\x1f"
USEP = "\x1e"
SEP_BYTE = b"\x1f"
RS_BYTE = b"\x1d"  # between the records of a batch (lua/common.lua: RS)
EPOCH_NOTE = b"E\x1f0"  # published by ``store init --force``: nodes re-read the epoch


def to_int(x: Any) -> int:
    """A number from a Redis reply (bytes, str or int)."""
    return int(x) if not isinstance(x, bytes) else int(x.decode())


def parse_change(payload: bytes) -> tuple[str, int, Change | None]:
    """A published payload -> (kind, position, change); skips (``S``) and epoch notes
    (``E``) have no change. Malformed: ValueError (UnicodeDecodeError is one)."""
    parts = payload.decode("utf-8").split(SEP)
    if len(parts) < 2:
        raise ValueError(f"an event needs a kind and a position: {payload[:80]!r}")
    kind = parts[0]
    pos = int(parts[1])
    if kind == "A":
        _, _, cid, first, last, tm, sender, sread = parts
        return kind, pos, Allocated(
            cid, int(first), int(last), int(tm), pos, sender or None, int(sread)
        )
    if kind == "R":
        _, _, cid, uid, read = parts
        return kind, pos, ReadMarked(cid, uid, int(read), pos, True)
    if kind == "M":
        _, _, cid, mn = parts
        return kind, pos, MinChanged(cid, int(mn), pos, True)
    if kind == "J":
        _, _, cid, mx, mn, tm, users = parts
        return kind, pos, MembersAdded(
            cid, tuple(users.split(USEP)) if users else (), int(mx), int(mn), int(tm), pos, True
        )
    if kind == "L":
        _, _, cid, keep, users = parts
        return kind, pos, MembersRemoved(
            cid, tuple(users.split(USEP)) if users else (), keep == "1", pos, True
        )
    if kind in ("S", "E") and len(parts) == 2:
        return kind, pos, None
    raise ValueError(f"unknown event kind {kind!r}")


def payload_position(payload: bytes) -> int | None:
    """The position of a payload without decoding the rest (``None``: an epoch note or
    malformed) — to drop a change this node already delivered cheaply."""
    if payload[:1] == b"E":
        return None
    end = payload.find(SEP_BYTE, 2)
    try:
        return int(payload[2:end if end >= 0 else len(payload)])
    except ValueError:
        return None


def last_position(message: bytes) -> int | None:
    """The position of a published message's last record (the highest: records are in
    position order), without decoding the rest; ``None``: an epoch note or malformed."""
    return payload_position(message[message.rfind(RS_BYTE) + 1:])


def records(message: bytes) -> list[bytes]:
    """The payloads of one published message (a batch publishes several in one)."""
    return message.split(RS_BYTE)


def split_replies(blob: bytes) -> list[list[Any]]:
    """A batch call's reply -> one reply per op, as a single call answers it:
    ``[b"OK", payload]`` for a committed op (its record is the change payload, a one-letter
    kind), else the record's fields (``[b"NOOP", position, ...]``, ``[b"ERR", kind, msg]``,
    ``[b"RETRY", why]``, ``[b"NEED", users...]``)."""
    out: list[list[Any]] = []
    for rec in blob.split(RS_BYTE):
        if rec[1:2] == SEP_BYTE:
            out.append([b"OK", rec])
        else:
            out.append(rec.split(SEP_BYTE))
    return out


def skip_payload(pos: int) -> bytes:
    """The payload of a skip of ``pos``."""
    return f"S{SEP}{pos}".encode()


class ReorderBuffer:
    """Positions arrive in any order, duplicated, from two sources (the script's reply and
    Pub/Sub); :meth:`ready` hands out each change once, in position order, without holes.

    ``position`` is the last position handed out (or jumped over). ``gap_since`` is the time
    (caller's clock, seconds) since which a later position waits for a missing one, ``None``
    when nothing waits.
    """

    __slots__ = ("position", "_pending", "gap_since")

    def __init__(self, position: int = 0) -> None:
        self.position = position
        self._pending: dict[int, Change | None] = {}
        self.gap_since: float | None = None

    def add(self, pos: int, change: Change | None) -> bool:
        """Hold ``change`` (``None``: a skip) for ``pos``; False when ``pos`` was handed out
        already or is held."""
        if pos <= self.position or pos in self._pending:
            return False
        self._pending[pos] = change
        return True

    def ready(self, now: float) -> Iterator[Change]:
        """The held changes that follow ``position`` without a hole, in order; ``position``
        advances as each is taken (a listener reading it sees the change's own position).
        Updates ``gap_since`` when the iteration ends."""
        pending = self._pending
        while self.position + 1 in pending:
            change = pending.pop(self.position + 1)
            self.position += 1
            if change is not None:
                yield change
        if pending:
            if self.gap_since is None:
                self.gap_since = now
        else:
            self.gap_since = None

    def jump_to(self, pos: int) -> None:
        """Positions up to ``pos`` need no delivery (the caller reloads them)."""
        if pos > self.position:
            self.position = pos
        for p in [p for p in self._pending if p <= self.position]:
            del self._pending[p]
        self.gap_since = None

    def missing(self) -> tuple[int, int] | None:
        """The first run of missing positions ``(first, last)`` before a held one, if any."""
        if not self._pending:
            return None
        nxt = min(self._pending)
        if nxt <= self.position + 1:
            return None
        return self.position + 1, nxt - 1

    def __len__(self) -> int:
        return len(self._pending)
