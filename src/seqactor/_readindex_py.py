"""Pure-Python twin of the compiled read-count kernel (``_readindex.pyx``): same API, same bytes.

:class:`ReadCounter` holds the read seqs of one conversation's *current* members (one slot per
member; frozen and removed members are not in it) and answers "how many members have
``read_sequence >= s``" for a run of consecutive ``s`` (``ReadCounts``, docs/protocol.md "Group read counts").

Algorithm (docs/kernel.md, "Read index"):

* ``reads`` — one ``uint64`` per slot (8 bytes per member); a removed member's slot is put on a
  free list and reused.
* A **Fenwick tree** (binary indexed tree; P. M. Fenwick, "A new data structure for cumulative
  frequency tables", Software: Practice and Experience 24(3), 1994) of ``uint32`` counts over a
  *window* of read values ``[base, base + cap)``: ``tree`` answers "members whose read is in
  ``[base, v)``" in ``O(log cap)``. ``count(read >= s) = n - below - prefix(s - base)``, and a
  run of ``k`` consecutive seqs costs one prefix sum plus ``k`` point reads, each ``O(1)``
  amortized (the point read walks only the low bits of ``i``: the sum of ``log2(lowbit(i))`` over
  consecutive ``i`` averages below 1).
* ``cap`` is a power of two sized by the member count, ``WINDOW_MIN_SEQS <= cap <=
  WINDOW_MAX_SEQS`` and ``cap <= n`` when ``n >= WINDOW_MIN_SEQS``, so the tree costs at most 4
  bytes per member (or a fixed 16 KiB for small groups). When ``max_sequence`` reaches the end of
  the window, the window is refitted (``O(n)``, once per ``cap / 2`` allocations): it starts at 0
  while ``max < cap``, else at ``max + 1 - cap / 2``, so the newest ``cap / 2`` seqs are always
  inside it.
* Reads below ``base`` are counted in ``below``; a query for ``s < base`` (an old message) uses a
  sorted copy of those reads, rebuilt lazily after they change (``O(n log n)``, rare).

Costs: update (MarkRead) ``O(log cap)``; ``counts`` over ``k`` seqs ``O(log cap + k)``; member
add/remove ``O(log cap)``; memory ``8 + 4 * cap / n`` bytes per member.

Errors: seqs outside ``uint64`` raise ``OverflowError``; an unknown or free slot raises
``IndexError``.
"""

from __future__ import annotations

import operator
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import SupportsIndex

WINDOW_MIN_SEQS = 4096  # smallest Fenwick window (read values), 16 KiB
WINDOW_MAX_SEQS = 65536  # largest Fenwick window (read values), 256 KiB
FREE = (1 << 64) - 1  # marker of a free slot in ``reads``
_U64_MAX = (1 << 64) - 1
_U32_MAX = (1 << 32) - 1


def _u64(value: SupportsIndex, what: str) -> int:
    v = int(operator.index(value))
    if not 0 <= v < _U64_MAX:  # 2**64 - 1 is the free-slot marker
        raise OverflowError(f"{what} {v} out of range [0, 2**64 - 2]")
    return v


def _range(from_seq: SupportsIndex, n: SupportsIndex) -> tuple[int, int]:
    """(from_seq, n) checked: any uint64 start; a non-empty range ends below 2**64 - 1."""
    s = int(operator.index(from_seq))
    k = int(operator.index(n))
    if not 0 <= s <= _U64_MAX:
        raise OverflowError(f"from_seq {s} out of range [0, 2**64 - 1]")
    if k < 0:
        raise ValueError("n must not be negative")
    if k and s + k - 1 > _U64_MAX - 1:
        raise OverflowError("from_seq + n - 1 is above the uint64 range")
    return s, k


def window_cap(members: int) -> int:
    """The window size for ``members`` members: the largest power of two ``<= members``,
    clamped to ``[WINDOW_MIN_SEQS, WINDOW_MAX_SEQS]``."""
    cap = WINDOW_MIN_SEQS
    while cap * 2 <= members and cap < WINDOW_MAX_SEQS:
        cap *= 2
    return cap


def _varint(v: int, out: bytearray) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


class ReadCounter:
    """Read seqs of a conversation's current members, counted over seqs (see the module doc).

    ``ReadCounter(max_sequence)``; members are added with :meth:`add` / :meth:`extend` and get a
    slot (an ``int``) that names them in :meth:`raise_read`, :meth:`remove`, :meth:`read_of`.
    """

    __slots__ = ("_reads", "_free", "_n", "_max", "_base", "_cap", "_tree", "_below", "_low")

    def __init__(self, max_sequence: SupportsIndex = 0) -> None:
        self._reads = array("Q")
        self._free: list[int] = []
        self._n = 0
        self._max = _u64(max_sequence, "max_sequence")
        self._below = 0
        self._low: array[int] | None = array("Q")
        self._refit()

    # ------------------------------------------------------------ window

    def _refit(self) -> None:
        """Size and place the window for the current ``n`` and ``max``; rebuild the tree (O(n))."""
        cap = window_cap(self._n)
        mx = self._max
        base = 0 if mx < cap else mx + 1 - cap // 2
        counts = [0] * (cap + 1)
        below = 0
        for r in self._reads:
            if r == FREE:
                continue
            if r < base:
                below += 1
            else:
                counts[r - base + 1] += 1
        for i in range(1, cap + 1):  # linear-time Fenwick construction
            j = i + (i & -i)
            if j <= cap:
                counts[j] += counts[i]
        self._tree = array("I", counts)
        self._base = base
        self._cap = cap
        self._below = below
        self._low = None

    def _tree_add(self, value: int, delta: int) -> None:
        tree, cap = self._tree, self._cap
        i = value - self._base + 1
        while i <= cap:
            tree[i] += delta
            i += i & -i

    def _prefix(self, k: int) -> int:
        """Members with read in ``[base, base + k)``."""
        tree = self._tree
        k = min(k, self._cap)
        total = 0
        while k > 0:
            total += tree[k]
            k -= k & -k
        return total

    def _point(self, i: int) -> int:
        """Members with read ``base + i - 1`` (``1 <= i <= cap``), O(1) amortized."""
        tree = self._tree
        v = tree[i]
        stop = i - (i & -i)
        j = i - 1
        while j > stop:
            v -= tree[j]
            j -= j & -j
        return v

    def _low_reads(self) -> array[int]:
        low = self._low
        if low is None:
            base = self._base
            low = self._low = array("Q", sorted(r for r in self._reads if r < base))
        return low

    # ------------------------------------------------------------ members

    @property
    def size(self) -> int:
        """Current members counted (``member_count`` of ``ReadCounts``)."""
        return self._n

    @property
    def max_sequence(self) -> int:
        return self._max

    def set_max(self, max_sequence: SupportsIndex) -> None:
        """Raise the conversation's max (never lowers it); refits the window when needed."""
        mx = _u64(max_sequence, "max_sequence")
        if mx <= self._max:
            return
        self._max = mx
        if mx >= self._base + self._cap:
            self._refit()

    def _place(self, read: int, delta: int) -> None:
        if read >= self._base:
            self._tree_add(read, delta)
        else:
            self._below += delta
            self._low = None

    def add(self, read: SupportsIndex) -> int:
        """A new member with ``read`` (raises max if above it) → its slot."""
        r = _u64(read, "read")
        if r > self._max:
            self.set_max(r)
        if self._free:
            slot = self._free.pop()
            self._reads[slot] = r
        else:
            slot = len(self._reads)
            self._reads.append(r)
        self._n += 1
        self._place(r, 1)
        return slot

    def extend(self, reads: Iterable[SupportsIndex]) -> int:
        """Many new members at once (a bulk load) → the slot of the first; the others follow
        it consecutively. Refits the window for the new member count: O(n)."""
        first = len(self._reads)
        values = [_u64(r, "read") for r in reads]
        self._reads.extend(values)
        self._n += len(values)
        top = max(values, default=0)
        if top > self._max:
            self._max = top
        self._refit()
        return first

    def remove(self, slot: SupportsIndex) -> int:
        """Drop the member in ``slot`` (its slot becomes free) → its read."""
        s = self._slot(slot)
        r = self._reads[s]
        self._reads[s] = FREE
        self._free.append(s)
        self._n -= 1
        self._place(r, -1)
        return r

    def raise_read(self, slot: SupportsIndex, read: SupportsIndex) -> int:
        """Set the member's read to ``read`` if higher (I2) → the previous read."""
        s = self._slot(slot)
        r = _u64(read, "read")
        old = self._reads[s]
        if r <= old:
            return old
        if r > self._max:
            self.set_max(r)
        self._place(old, -1)
        self._reads[s] = r
        self._place(r, 1)
        return old

    def read_of(self, slot: SupportsIndex) -> int:
        """The read seq of the member in ``slot``."""
        return self._reads[self._slot(slot)]

    def _slot(self, slot: SupportsIndex) -> int:
        s = int(operator.index(slot))
        if not 0 <= s < len(self._reads) or self._reads[s] == FREE:
            raise IndexError(f"slot {s} holds no member")
        return s

    # ------------------------------------------------------------ queries

    def count_at_least(self, seq: SupportsIndex) -> int:
        """Members with ``read >= seq``."""
        s = _u64(seq, "seq")
        if s >= self._base:
            return self._n - self._below - self._prefix(s - self._base)
        low = self._low_reads()
        return self._n - self._below + len(low) - bisect_left(low, s)

    def counts(self, from_seq: SupportsIndex, n: SupportsIndex) -> list[int]:
        """``[count(read >= from_seq + i) for i in range(n)]`` in ``O(log cap + n)``."""
        s, k = _range(from_seq, n)
        if not k:
            return []
        out: list[int] = []
        base, cap = self._base, self._cap
        while k and s < base:  # old messages: below the window
            out.append(self.count_at_least(s))
            s += 1
            k -= 1
        if not k:
            return out
        i = s - base  # tree index of value s - 1 is i
        c = self._n - self._below - self._prefix(i)
        for _ in range(k):
            out.append(c)
            i += 1
            if i <= cap:
                c -= self._point(i)
        return out

    def readers(
        self, order: Sequence[int], start: SupportsIndex, seq: SupportsIndex, unread: bool,
        limit: SupportsIndex,
    ) -> tuple[list[int], bool]:
        """Scan slots ``order[start:]`` for members with ``read >= seq`` (``unread``: ``<``).

        Returns (the positions in ``order`` of the first ``limit`` matches, whether another
        match follows them). ``order`` is a sequence of slots (e.g. ``array('I')``).
        """
        p = int(operator.index(start))
        s = _u64(seq, "seq")
        lim = int(operator.index(limit))
        reads = self._reads
        found: list[int] = []
        end = len(order)
        while p < end:
            r = reads[order[p]]
            if (r >= s) != unread:
                if len(found) == lim:
                    return found, True
                found.append(p)
            p += 1
        return found, False

    def encode(
        self, request_id: SupportsIndex, conversation_id: str, from_seq: SupportsIndex,
        n: SupportsIndex,
    ) -> bytes:
        """Wire bytes of ``ServerMessage{request_id, read_counts: ReadCounts{conversation_id,
        from_sequence, member_count, counts}}`` for ``n`` seqs from ``from_seq`` (packed
        ``counts``; zero fields omitted, as the protobuf runtime writes them)."""
        rid = int(operator.index(request_id))
        if not 0 <= rid <= _U64_MAX:
            raise OverflowError(f"request_id {rid} out of range [0, 2**64 - 1]")
        f, _ = _range(from_seq, n)
        counts = self.counts(from_seq, n)
        body = bytearray()
        key = conversation_id.encode("utf-8")
        if key:
            body.append(0x0A)
            _varint(len(key), body)
            body += key
        if f:
            body.append(0x10)
            _varint(f, body)
        if self._n:
            body.append(0x18)
            _varint(min(self._n, _U32_MAX), body)
        if counts:
            packed = bytearray()
            for c in counts:
                _varint(c, packed)
            body.append(0x22)
            _varint(len(packed), body)
            body += packed
        out = bytearray()
        if rid:
            out.append(0x08)
            _varint(rid, out)
        out.append(0x4A)
        _varint(len(body), out)
        out += body
        return bytes(out)

    def nbytes(self) -> int:
        """Bytes held by the counting structures (reads, tree, free list, sorted low reads);
        the C sizes, as the compiled kernel reports them."""
        low = self._low
        return (
            8 * len(self._reads) + 4 * (self._cap + 1) + 8 * len(self._free)
            + (8 * len(low) if low is not None else 0)
        )


__all__ = ["FREE", "WINDOW_MAX_SEQS", "WINDOW_MIN_SEQS", "ReadCounter", "window_cap"]
