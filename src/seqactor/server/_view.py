"""One user's view as columnar tables: the data the delta kernel encodes.

Rows are stored in typed ``array.array`` columns (no per-entry Python objects besides the
row index); conversation ids are interned once in a process-wide :class:`KeyTable` (from the
kernel), so a group's id is one object however many members are online.
Rows are removed by swapping the last row into the hole (order is not meaningful).

A conversation's max is the same for every member, so the node keeps it once: a
:class:`SharedMax` (one per hub) holds each conversation's newest max, and a member's
active row may lag behind it. A fan-out round then costs no row update per member (only the
routing of the ready frame). Whoever reads rows settles them first (``kernel.settle``:
max, time and position taken from the shared column where it is ahead; frozen rows keep
their own values).
"""

from __future__ import annotations

from array import array

# Field masks for pushes: which fields of a row changed (0 in the frame = unchanged).
FIELD_MAX = 1  # max_sequence and max_sequence_time_ms
FIELD_READ = 2
FIELD_MIN = 4
FIELD_ALL = FIELD_MAX | FIELD_READ | FIELD_MIN
# membership (1 = member, 2 = frozen): set when a row freezes or a frozen row's user rejoins
FIELD_MEMBERSHIP = 8


class SharedMax:
    """Each conversation's newest max, time (ms) and change position, by key id: the value
    every active member row is at least at (``kernel.settle`` copies it into rows)."""

    __slots__ = ("max_seq", "time_ms", "pos")

    def __init__(self) -> None:
        self.max_seq = array("Q")
        self.time_ms = array("q")
        self.pos = array("Q")

    def advance(self, key_id: int, max_seq: int, time_ms: int, pos: int) -> None:
        """A committed allocation: ``max_seq`` at change position ``pos`` (values only move
        forward: a smaller or equal max changes nothing)."""
        n = len(self.max_seq)
        if key_id >= n:
            zeros = bytes(8 * (key_id + 1 - n))
            self.max_seq.frombytes(zeros)
            self.time_ms.frombytes(zeros)
            self.pos.frombytes(zeros)
        if max_seq > self.max_seq[key_id]:
            self.max_seq[key_id] = max_seq
            self.time_ms[key_id] = time_ms
            if pos > self.pos[key_id]:
                self.pos[key_id] = pos


class ViewTable:
    """Columnar rows: key id, max, read, min, time (ms), change position.

    ``shared``: the node's :class:`SharedMax` that active rows may lag behind (None: rows are
    always exact)."""

    __slots__ = ("rows", "frozen", "max_seq", "time_ms", "pos", "keys", "read_seq", "min_seq",
                 "shared")

    def __init__(self, shared: SharedMax | None = None) -> None:
        self.shared = shared
        self.keys = array("I")
        self.max_seq = array("Q")
        self.read_seq = array("Q")
        self.min_seq = array("Q")
        self.time_ms = array("q")
        self.pos = array("Q")
        self.frozen = bytearray()  # 1 = left with keep_history: ignores conversation changes
        self.rows: dict[int, int] = {}  # key id -> row index (read-only outside this class)

    def __len__(self) -> int:
        return len(self.keys)

    def row_of(self, key_id: int) -> int:
        """Row index of ``key_id``, or -1 when the conversation is not in the view."""
        return self.rows.get(key_id, -1)

    def upsert(
        self, key_id: int, max_seq: int, read_seq: int, min_seq: int, time_ms: int, pos: int,
        frozen: bool = False,
    ) -> int:
        row = self.rows.get(key_id, -1)
        if row < 0:
            row = len(self.keys)
            self.rows[key_id] = row
            self.keys.append(key_id)
            self.max_seq.append(max_seq)
            self.read_seq.append(read_seq)
            self.min_seq.append(min_seq)
            self.time_ms.append(time_ms)
            self.pos.append(pos)
            self.frozen.append(1 if frozen else 0)
            return row
        self.max_seq[row] = max_seq
        self.read_seq[row] = read_seq
        self.min_seq[row] = min_seq
        self.time_ms[row] = time_ms
        self.pos[row] = pos
        self.frozen[row] = 1 if frozen else 0
        return row

    def remove(self, key_id: int) -> int:
        """Drop a row; returns the index of the row that moved into its place (or -1)."""
        row = self.rows.pop(key_id, -1)
        if row < 0:
            return -1
        last = len(self.keys) - 1
        moved = -1
        if row != last:
            moved_key = self.keys[last]
            for col in (self.keys, self.max_seq, self.read_seq, self.min_seq, self.time_ms, self.pos):
                col[row] = col[last]
            self.frozen[row] = self.frozen[last]
            self.rows[moved_key] = row
            moved = row
        for col in (self.keys, self.max_seq, self.read_seq, self.min_seq, self.time_ms, self.pos):
            col.pop()
        self.frozen.pop()
        return moved
