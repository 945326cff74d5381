# cython: language_level=3
"""Compiled read-count kernel: the same API and bytes as ``_readindex_py`` (read its docstring
for the algorithm: per-slot ``uint64`` reads + a ``uint32`` Fenwick tree over a window of read
values; P. M. Fenwick, Software: Practice and Experience 24(3), 1994).

Memory is C arrays (``malloc``); ``nbytes()`` reports them.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc, qsort
from libc.string cimport memcpy, memset

cimport cython

import operator

ctypedef uint64_t u64
ctypedef uint32_t u32

WINDOW_MIN_SEQS = 4096
WINDOW_MAX_SEQS = 65536
FREE = 0xFFFFFFFFFFFFFFFF
cdef Py_ssize_t _WMIN = 4096
cdef Py_ssize_t _WMAX = 65536
cdef u64 _FREE = 0xFFFFFFFFFFFFFFFF
cdef u64 _U32_MAX = 0xFFFFFFFF


cdef u64 _u64(value, str what) except? 0xFFFFFFFFFFFFFFFF:
    v = operator.index(value)
    if v < 0 or v >= 0xFFFFFFFFFFFFFFFF:
        raise OverflowError(f"{what} {int(v)} out of range [0, 2**64 - 2]")
    return <u64>v


cdef u64 _u64_any(value, str what) except? 0xFFFFFFFFFFFFFFFF:
    v = operator.index(value)
    if v < 0 or v > 0xFFFFFFFFFFFFFFFF:
        raise OverflowError(f"{what} {int(v)} out of range [0, 2**64 - 1]")
    return <u64>v


def window_cap(members):
    """The window size for ``members`` members: the largest power of two ``<= members``,
    clamped to ``[WINDOW_MIN_SEQS, WINDOW_MAX_SEQS]``."""
    return _window_cap(operator.index(members))


cdef Py_ssize_t _window_cap(Py_ssize_t members) noexcept:
    cdef Py_ssize_t cap = _WMIN
    while cap * 2 <= members and cap < _WMAX:
        cap *= 2
    return cap


cdef int _cmp_u64(const void *a, const void *b) noexcept nogil:
    cdef u64 x = (<const u64 *>a)[0]
    cdef u64 y = (<const u64 *>b)[0]
    return (x > y) - (x < y)


cdef inline Py_ssize_t _varint_len(u64 v) noexcept nogil:
    cdef Py_ssize_t n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline char *_put_varint(char *p, u64 v) noexcept nogil:
    while v >= 0x80:
        p[0] = <char>((v & 0x7F) | 0x80)
        p += 1
        v >>= 7
    p[0] = <char>v
    return p + 1


@cython.final
cdef class ReadCounter:
    """Read seqs of a conversation's current members, counted over seqs (see ``_readindex_py``).

    ``ReadCounter(max_sequence)``; members are added with :meth:`add` / :meth:`extend` and get a
    slot (an ``int``) that names them in :meth:`raise_read`, :meth:`remove`, :meth:`read_of`.
    """

    cdef u64 *reads
    cdef Py_ssize_t nslots, slots_cap
    cdef Py_ssize_t *free_slots
    cdef Py_ssize_t nfree, free_cap
    cdef Py_ssize_t n
    cdef u64 mx, base
    cdef Py_ssize_t cap
    cdef u32 *tree
    cdef Py_ssize_t below
    cdef u64 *low
    cdef Py_ssize_t nlow
    cdef bint low_ok

    def __cinit__(self, max_sequence=0):
        self.reads = NULL
        self.free_slots = NULL
        self.tree = NULL
        self.low = NULL
        self.nslots = self.slots_cap = self.nfree = self.free_cap = self.n = 0
        self.below = 0
        self.nlow = 0
        self.low_ok = True
        self.mx = _u64(max_sequence, "max_sequence")
        self._refit()

    def __dealloc__(self):
        free(self.reads)
        free(self.free_slots)
        free(self.tree)
        free(self.low)

    # ------------------------------------------------------------ window

    cdef int _refit(self) except -1:
        cdef Py_ssize_t cap = _window_cap(self.n)
        cdef u64 base = 0 if self.mx < <u64>cap else self.mx + 1 - <u64>(cap // 2)
        cdef u32 *tree = <u32 *>malloc((cap + 1) * sizeof(u32))
        if tree == NULL:
            raise MemoryError()
        memset(tree, 0, (cap + 1) * sizeof(u32))
        cdef Py_ssize_t below = 0, i, j
        cdef u64 r
        for i in range(self.nslots):
            r = self.reads[i]
            if r == _FREE:
                continue
            if r < base:
                below += 1
            else:
                tree[<Py_ssize_t>(r - base) + 1] += 1
        for i in range(1, cap + 1):
            j = i + (i & -i)
            if j <= cap:
                tree[j] += tree[i]
        free(self.tree)
        self.tree = tree
        self.base = base
        self.cap = cap
        self.below = below
        self.low_ok = False
        return 0

    cdef inline void _tree_add(self, u64 value, int delta) noexcept nogil:
        cdef Py_ssize_t i = <Py_ssize_t>(value - self.base) + 1
        cdef Py_ssize_t cap = self.cap
        cdef u32 *tree = self.tree
        while i <= cap:
            tree[i] += <u32>delta
            i += i & -i

    cdef inline Py_ssize_t _prefix(self, u64 k) noexcept nogil:
        cdef Py_ssize_t kk = self.cap if k > <u64>self.cap else <Py_ssize_t>k
        cdef Py_ssize_t total = 0
        while kk > 0:
            total += self.tree[kk]
            kk -= kk & -kk
        return total

    cdef inline Py_ssize_t _point(self, Py_ssize_t i) noexcept nogil:
        cdef u32 *tree = self.tree
        cdef Py_ssize_t v = tree[i]
        cdef Py_ssize_t stop = i - (i & -i)
        cdef Py_ssize_t j = i - 1
        while j > stop:
            v -= tree[j]
            j -= j & -j
        return v

    cdef int _low_reads(self) except -1:
        if self.low_ok:
            return 0
        cdef u64 *low = <u64 *>realloc(self.low, (self.below + 1) * sizeof(u64))
        if low == NULL:
            raise MemoryError()
        self.low = low
        cdef Py_ssize_t i, k = 0
        cdef u64 r, base = self.base
        for i in range(self.nslots):
            r = self.reads[i]
            if r < base:
                low[k] = r
                k += 1
        qsort(low, k, sizeof(u64), _cmp_u64)
        self.nlow = k
        self.low_ok = True
        return 0

    cdef Py_ssize_t _count_low(self, u64 s) except -1:
        self._low_reads()
        cdef Py_ssize_t lo = 0, hi = self.nlow, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self.low[mid] < s:
                lo = mid + 1
            else:
                hi = mid
        return self.n - self.below + self.nlow - lo

    # ------------------------------------------------------------ members

    @property
    def size(self):
        """Current members counted (``member_count`` of ``ReadCounts``)."""
        return self.n

    @property
    def max_sequence(self):
        return self.mx

    cdef int _set_max(self, u64 mx) except -1:
        if mx <= self.mx:
            return 0
        self.mx = mx
        if mx >= self.base + <u64>self.cap:
            self._refit()
        return 0

    def set_max(self, max_sequence):
        """Raise the conversation's max (never lowers it); refits the window when needed."""
        self._set_max(_u64(max_sequence, "max_sequence"))

    cdef inline void _place(self, u64 read, int delta) noexcept nogil:
        if read >= self.base:
            self._tree_add(read, delta)
        else:
            self.below += delta
            self.low_ok = False

    cdef int _grow_slots(self, Py_ssize_t need) except -1:
        if need <= self.slots_cap:
            return 0
        cdef Py_ssize_t c = self.slots_cap * 2 if self.slots_cap else 16
        if c < need:
            c = need
        cdef u64 *p = <u64 *>realloc(self.reads, c * sizeof(u64))
        if p == NULL:
            raise MemoryError()
        self.reads = p
        self.slots_cap = c
        return 0

    def add(self, read):
        """A new member with ``read`` (raises max if above it) → its slot."""
        cdef u64 r = _u64(read, "read")
        cdef Py_ssize_t slot
        if r > self.mx:
            self._set_max(r)
        if self.nfree:
            self.nfree -= 1
            slot = self.free_slots[self.nfree]
        else:
            self._grow_slots(self.nslots + 1)
            slot = self.nslots
            self.nslots += 1
        self.reads[slot] = r
        self.n += 1
        self._place(r, 1)
        return slot

    def extend(self, reads):
        """Many new members at once (a bulk load) → the slot of the first; the others follow
        it consecutively. Refits the window for the new member count: O(n)."""
        values = list(reads)
        cdef Py_ssize_t k = len(values), i
        cdef Py_ssize_t first = self.nslots
        cdef u64 r, top = self.mx
        self._grow_slots(first + k)
        for i in range(k):
            r = _u64(values[i], "read")
            self.reads[first + i] = r
            if r > top:
                top = r
        self.nslots += k
        self.n += k
        self.mx = top
        self._refit()
        return first

    cdef Py_ssize_t _slot(self, slot) except -1:
        cdef Py_ssize_t s = operator.index(slot)
        if s < 0 or s >= self.nslots or self.reads[s] == _FREE:
            raise IndexError(f"slot {s} holds no member")
        return s

    def remove(self, slot):
        """Drop the member in ``slot`` (its slot becomes free) → its read."""
        cdef Py_ssize_t s = self._slot(slot)
        cdef u64 r = self.reads[s]
        cdef Py_ssize_t *p
        if self.nfree == self.free_cap:
            self.free_cap = self.free_cap * 2 if self.free_cap else 16
            p = <Py_ssize_t *>realloc(self.free_slots, self.free_cap * sizeof(Py_ssize_t))
            if p == NULL:
                raise MemoryError()
            self.free_slots = p
        self.reads[s] = _FREE
        self.free_slots[self.nfree] = s
        self.nfree += 1
        self.n -= 1
        self._place(r, -1)
        return r

    def raise_read(self, slot, read):
        """Set the member's read to ``read`` if higher (I2) → the previous read."""
        cdef Py_ssize_t s = self._slot(slot)
        cdef u64 r = _u64(read, "read")
        cdef u64 old = self.reads[s]
        if r <= old:
            return old
        if r > self.mx:
            self._set_max(r)
        self._place(old, -1)
        self.reads[s] = r
        self._place(r, 1)
        return old

    def read_of(self, slot):
        """The read seq of the member in ``slot``."""
        return self.reads[self._slot(slot)]

    # ------------------------------------------------------------ queries

    cdef Py_ssize_t _count(self, u64 s) except -1:
        if s >= self.base:
            return self.n - self.below - self._prefix(s - self.base)
        return self._count_low(s)

    def count_at_least(self, seq):
        """Members with ``read >= seq``."""
        return self._count(_u64(seq, "seq"))

    cdef int _fill(self, u64 s, Py_ssize_t k, u32 *out) except -1:
        cdef Py_ssize_t idx = 0
        while idx < k and s < self.base:
            out[idx] = <u32>self._count_low(s)
            s += 1
            idx += 1
        if idx == k:
            return 0
        cdef Py_ssize_t i = <Py_ssize_t>(s - self.base) if s - self.base < <u64>self.cap else self.cap
        cdef Py_ssize_t c = self.n - self.below - self._prefix(s - self.base)
        cdef Py_ssize_t cap = self.cap
        while idx < k:
            out[idx] = <u32>c
            idx += 1
            i += 1
            if i <= cap:
                c -= self._point(i)
        return 0

    cdef u64 _check_range(self, from_seq, n, Py_ssize_t *k) except? 0xFFFFFFFFFFFFFFFF:
        cdef u64 s = _u64_any(from_seq, "from_seq")
        cdef Py_ssize_t kk = operator.index(n)
        if kk < 0:
            raise ValueError("n must not be negative")
        if kk and s + <u64>(kk - 1) < s or (kk and s + <u64>(kk - 1) >= _FREE):
            raise OverflowError("from_seq + n - 1 is above the uint64 range")
        k[0] = kk
        return s

    def counts(self, from_seq, n):
        """``[count(read >= from_seq + i) for i in range(n)]`` in ``O(log cap + n)``."""
        cdef Py_ssize_t k
        cdef u64 s = self._check_range(from_seq, n, &k)
        cdef u32 *buf = <u32 *>malloc((k + 1) * sizeof(u32))
        if buf == NULL:
            raise MemoryError()
        cdef Py_ssize_t i
        try:
            self._fill(s, k, buf)
            return [buf[i] for i in range(k)]
        finally:
            free(buf)

    def readers(self, order, start, seq, bint unread, limit):
        """Scan slots ``order[start:]`` for members with ``read >= seq`` (``unread``: ``<``).

        Returns (the positions in ``order`` of the first ``limit`` matches, whether another
        match follows them). ``order`` is a buffer of ``uint32`` slots (``array('I')``).
        """
        cdef const u32[::1] view = order
        cdef Py_ssize_t p = operator.index(start)
        cdef u64 s = _u64(seq, "seq")
        cdef Py_ssize_t lim = operator.index(limit)
        cdef Py_ssize_t end = view.shape[0]
        cdef u32 slot
        cdef u64 r
        found = []
        if p < 0:
            p = 0
        while p < end:
            slot = view[p]
            if slot >= self.nslots:
                raise IndexError(f"slot {slot} holds no member")
            r = self.reads[slot]
            if (r >= s) != unread:
                if len(found) == lim:
                    return found, True
                found.append(p)
            p += 1
        return found, False

    def encode(self, request_id, str conversation_id, from_seq, n):
        """Wire bytes of ``ServerMessage{request_id, read_counts: ReadCounts{conversation_id,
        from_sequence, member_count, counts}}`` for ``n`` seqs from ``from_seq`` (packed
        ``counts``; zero fields omitted, as the protobuf runtime writes them)."""
        cdef u64 rid = _u64_any(request_id, "request_id")
        cdef Py_ssize_t k
        cdef u64 s = self._check_range(from_seq, n, &k)
        cdef bytes key = conversation_id.encode("utf-8")
        cdef Py_ssize_t klen = len(key)
        cdef u32 *buf = <u32 *>malloc((k + 1) * sizeof(u32))
        if buf == NULL:
            raise MemoryError()
        cdef Py_ssize_t i, packed = 0, body = 0, total = 0
        cdef u64 members = <u64>self.n if <u64>self.n < _U32_MAX else _U32_MAX
        cdef bytes out
        cdef char *p
        try:
            self._fill(s, k, buf)
            for i in range(k):
                packed += _varint_len(buf[i])
            if klen:
                body += 1 + _varint_len(klen) + klen
            if s:
                body += 1 + _varint_len(s)
            if members:
                body += 1 + _varint_len(members)
            if k:
                body += 1 + _varint_len(packed) + packed
            if rid:
                total += 1 + _varint_len(rid)
            total += 1 + _varint_len(body) + body
            out = PyBytes_FromStringAndSize(NULL, total)
            p = PyBytes_AS_STRING(out)
            if rid:
                p[0] = 0x08
                p = _put_varint(p + 1, rid)
            p[0] = 0x4A
            p = _put_varint(p + 1, body)
            if klen:
                p[0] = 0x0A
                p = _put_varint(p + 1, klen)
                memcpy(p, PyBytes_AS_STRING(key), klen)
                p += klen
            if s:
                p[0] = 0x10
                p = _put_varint(p + 1, s)
            if members:
                p[0] = 0x18
                p = _put_varint(p + 1, members)
            if k:
                p[0] = 0x22
                p = _put_varint(p + 1, packed)
                for i in range(k):
                    p = _put_varint(p, buf[i])
            return out
        finally:
            free(buf)

    def nbytes(self):
        """Bytes held by the counting structures (reads, tree, free list, sorted low reads);
        the C sizes, as the compiled kernel reports them."""
        return (
            8 * self.nslots + 4 * (self.cap + 1) + 8 * self.nfree
            + (8 * self.nlow if self.low_ok else 0)
        )
