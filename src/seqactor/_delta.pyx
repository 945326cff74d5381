# cython: language_level=3
"""Compiled delta kernel: columnar view tables -> ``seqactor.v1.SequenceUpdate`` wire bytes.

Same API, semantics and output bytes as the pure-Python twin :mod:`seqactor._delta_py` (read
that module for the reference behaviour). Encoders make two passes: the first computes the
exact output size, the second writes varints in C straight into a preallocated ``bytes``.
The decoder walks the buffer in C and builds the result dict and ``ConversationSeqs`` records
directly.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy
from cpython.number cimport PyNumber_AsSsize_t, PyNumber_Index
from cpython.object cimport PyObject_RichCompare

cimport cython

import math
from collections.abc import Sequence

from seqactor._wire cimport (
    sa_prefetch,
    sa_list_items,
    sa_vsize,
    sa_put_varint,
    sa_key_len,
    sa_key_ptr,
    sa_get_varint,
    sa_skip,
    sa_str,
    sa_u64,
    sa_alloc,
    sa_count_entries,
    sa_len,
    sa_entry,
    SA_OK,
    SA_EVARINT,
    SA_ELEN,
    SA_EWIRE,
    SA_ETAG,
    SA_ESKIP,
    _PyDict_NewPresized,
)


ctypedef unsigned long long u64


class DecodeError(ValueError):
    """Bytes that are not a valid encoding of the expected protobuf message."""


@cython.final
cdef class ConversationSeqs:
    """One decoded ``ConversationSequence``: an immutable record that behaves as the tuple
    ``(max_sequence, read_sequence, min_sequence, max_sequence_time_ms, membership)``.

    It unpacks, indexes, compares and hashes like that tuple (``record == tuple`` both ways).
    The five values are C fields, so the decoder builds one small object per entry instead of
    a tuple and up to five ints, and the cyclic GC never tracks it.
    """

    cdef readonly u64 max_sequence
    cdef readonly u64 read_sequence
    cdef readonly u64 min_sequence
    cdef readonly long long max_sequence_time_ms
    cdef readonly unsigned int membership  # 0 = not sent, 1 = member, 2 = frozen

    __match_args__ = (
        "max_sequence", "read_sequence", "min_sequence", "max_sequence_time_ms", "membership",
    )

    def __cinit__(self, max_sequence, read_sequence, min_sequence, max_sequence_time_ms,
                  membership=0):
        # Ints only (floats are refused, as by operator.index); OverflowError out of range.
        # The decoder allocates instances with sa_alloc and does not come through here.
        self.max_sequence = PyNumber_Index(max_sequence)
        self.read_sequence = PyNumber_Index(read_sequence)
        self.min_sequence = PyNumber_Index(min_sequence)
        self.max_sequence_time_ms = PyNumber_Index(max_sequence_time_ms)
        self.membership = PyNumber_Index(membership)

    def astuple(self):
        """The plain tuple ``(max_sequence, read_sequence, min_sequence, max_sequence_time_ms,
        membership)``."""
        return _seqs_tuple(self)

    def __len__(self):
        return 5

    def __getitem__(self, index):
        cdef Py_ssize_t i
        if isinstance(index, slice):
            return _seqs_tuple(self)[index]
        i = PyNumber_AsSsize_t(index, IndexError)  # as tuple: ints only, IndexError past ssize_t
        if i < 0:
            i += 5
        if i == 0:
            return sa_u64(self.max_sequence)
        if i == 1:
            return sa_u64(self.read_sequence)
        if i == 2:
            return sa_u64(self.min_sequence)
        if i == 3:
            return self.max_sequence_time_ms
        if i == 4:
            return self.membership
        raise IndexError("ConversationSeqs index out of range")

    def __iter__(self):
        return iter(_seqs_tuple(self))

    def __contains__(self, value):
        return value in _seqs_tuple(self)

    def __reversed__(self):
        return reversed(_seqs_tuple(self))

    def count(self, value):
        return _seqs_tuple(self).count(value)

    def index(self, value, start=0, stop=5):
        return _seqs_tuple(self).index(value, start, stop)

    def __richcmp__(self, other, int op):
        if type(other) is ConversationSeqs:
            return PyObject_RichCompare(_seqs_tuple(self), _seqs_tuple(other), op)
        if isinstance(other, tuple):
            return PyObject_RichCompare(_seqs_tuple(self), other, op)
        return NotImplemented

    def __hash__(self):
        return hash(_seqs_tuple(self))

    def __repr__(self):
        return (
            f"ConversationSeqs(max_sequence={self.max_sequence}, "
            f"read_sequence={self.read_sequence}, min_sequence={self.min_sequence}, "
            f"max_sequence_time_ms={self.max_sequence_time_ms}, membership={self.membership})"
        )

    def __reduce__(self):
        return ConversationSeqs, _seqs_tuple(self)


Sequence.register(ConversationSeqs)


cdef inline tuple _seqs_tuple(ConversationSeqs s):
    return (sa_u64(s.max_sequence), sa_u64(s.read_sequence), sa_u64(s.min_sequence),
            s.max_sequence_time_ms, s.membership)


cdef inline ConversationSeqs _new_seqs(u64 mx, u64 rd, u64 mn, long long tm, unsigned int mb):
    cdef ConversationSeqs s = <ConversationSeqs>sa_alloc(ConversationSeqs)
    s.max_sequence = mx
    s.read_sequence = rd
    s.min_sequence = mn
    s.max_sequence_time_ms = tm
    s.membership = mb
    return s


cdef class KeyTable:
    """Interns conversation ids: id <-> small int, with the encoded map-entry key cached."""

    cdef dict _ids
    cdef list _keys
    cdef list _encoded  # b"\x0a" + varint(len) + utf-8 id

    def __init__(self):
        self._ids = {}
        self._keys = []
        self._encoded = []

    def intern(self, key):
        idx = self._ids.get(key)
        if idx is None:
            raw = key.encode("utf-8")
            idx = len(self._keys)
            self._ids[key] = idx
            self._keys.append(key)
            self._encoded.append(b"\x0a" + _varint(len(raw)) + raw)
        return idx

    def lookup(self, key):
        """Id of an already interned key, or -1."""
        return self._ids.get(key, -1)

    def key(self, idx):
        return self._keys[idx]

    def __len__(self):
        return len(self._keys)


cdef bytes _varint(u64 v):
    cdef char buf[10]
    cdef char *end = sa_put_varint(buf, v)
    return PyBytes_FromStringAndSize(buf, end - buf)


# ---------------------------------------------------------------- encoding

cdef inline Py_ssize_t _value_len(u64 mx, u64 rd, u64 mn, u64 tm, u64 mb) noexcept nogil:
    cdef Py_ssize_t n = 0
    if mb:
        n += 1 + sa_vsize(mb)
    if mx:
        n += 1 + sa_vsize(mx)
    if rd:
        n += 1 + sa_vsize(rd)
    if mn:
        n += 1 + sa_vsize(mn)
    if tm:
        n += 1 + sa_vsize(tm)
    return n


cdef inline Py_ssize_t _entry_size(Py_ssize_t klen, Py_ssize_t vlen) noexcept nogil:
    """Bytes of a whole ``conversations`` field: tag, length and the entry."""
    cdef Py_ssize_t elen = klen + 1 + sa_vsize(<u64>vlen) + vlen
    return 1 + sa_vsize(<u64>elen) + elen


cdef inline char *_put_entry(
    char *p, const char *kp, Py_ssize_t klen, u64 mx, u64 rd, u64 mn, u64 tm, u64 mb
) noexcept nogil:
    cdef Py_ssize_t vlen = _value_len(mx, rd, mn, tm, mb)
    p[0] = 0x0A
    p = sa_put_varint(p + 1, <u64>(klen + 1 + sa_vsize(<u64>vlen) + vlen))
    memcpy(p, kp, klen)
    p += klen
    p[0] = 0x12
    p = sa_put_varint(p + 1, <u64>vlen)
    if mx:
        p[0] = 0x08
        p = sa_put_varint(p + 1, mx)
    if rd:
        p[0] = 0x10
        p = sa_put_varint(p + 1, rd)
    if mn:
        p[0] = 0x18
        p = sa_put_varint(p + 1, mn)
    if tm:
        p[0] = 0x20
        p = sa_put_varint(p + 1, tm)
    if mb:
        p[0] = 0x28
        p = sa_put_varint(p + 1, mb)
    return p


cdef class _Tail:
    """The fields after the map: sync_token (2), full (3), removed (4), prepared for writing."""

    cdef bytes token
    cdef bint full
    cdef list removed  # utf-8 bytes per removed id
    cdef Py_ssize_t size

    def __init__(self, sync_token, bint full, removed):
        cdef Py_ssize_t n
        self.token = b""
        self.full = full
        self.removed = []
        self.size = 2 if full else 0
        if sync_token:
            if type(sync_token) is not bytes:
                sync_token = bytes(memoryview(sync_token))
            self.token = sync_token
            n = PyBytes_GET_SIZE(self.token)
            self.size += 1 + sa_vsize(<u64>n) + n
        for rid in removed:
            raw = rid.encode("utf-8")
            if type(raw) is not bytes:
                raw = bytes(raw)
            n = PyBytes_GET_SIZE(raw)
            self.removed.append(raw)
            self.size += 1 + sa_vsize(<u64>n) + n

    cdef char *write(self, char *p):
        cdef Py_ssize_t n
        cdef bytes raw
        n = PyBytes_GET_SIZE(self.token)
        if n:
            p[0] = 0x12
            p = sa_put_varint(p + 1, <u64>n)
            memcpy(p, PyBytes_AS_STRING(self.token), n)
            p += n
        if self.full:
            p[0] = 0x18
            p[1] = 0x01
            p += 2
        for raw in self.removed:
            n = PyBytes_GET_SIZE(raw)
            p[0] = 0x22
            p = sa_put_varint(p + 1, <u64>n)
            memcpy(p, PyBytes_AS_STRING(raw), n)
            p += n
        return p


cdef inline void _check_len(Py_ssize_t a, Py_ssize_t b) except *:
    if a != b:
        raise ValueError(f"table columns differ in length ({a} != {b})")


cdef inline void _key_error(Py_ssize_t k) except *:
    raise IndexError(f"key id {k} not in the key table")


def encode_snapshot(KeyTable keys not None, table, sync_token=b"", full=True, removed=()):
    """Every row of ``table`` with all its fields; ``membership`` 2 on frozen rows only."""
    cdef const unsigned int[::1] kc = table.keys
    cdef const unsigned long long[::1] mxc = table.max_seq
    cdef const unsigned long long[::1] rdc = table.read_seq
    cdef const unsigned long long[::1] mnc = table.min_seq
    cdef const long long[::1] tmc = table.time_ms
    cdef const unsigned char[::1] fzc = table.frozen
    cdef Py_ssize_t n = kc.shape[0]
    _check_len(n, mxc.shape[0])
    _check_len(n, rdc.shape[0])
    _check_len(n, mnc.shape[0])
    _check_len(n, tmc.shape[0])
    _check_len(n, fzc.shape[0])
    cdef list enc = keys._encoded
    cdef Py_ssize_t nkeys = PyList_GET_SIZE(enc)
    cdef _Tail tail = _Tail(sync_token, full, removed)
    cdef Py_ssize_t i, k, total = tail.size
    for i in range(n):
        k = kc[i]
        if k >= nkeys:
            _key_error(k)
        total += _entry_size(
            sa_key_len(enc, k), _value_len(mxc[i], rdc[i], mnc[i], <u64>tmc[i], 2 if fzc[i] else 0)
        )
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char *start = PyBytes_AS_STRING(out)
    cdef char *p = start
    for i in range(n):
        k = kc[i]
        p = _put_entry(p, sa_key_ptr(enc, k), sa_key_len(enc, k),
                       mxc[i], rdc[i], mnc[i], <u64>tmc[i], 2 if fzc[i] else 0)
    p = tail.write(p)
    assert p - start == total
    return out


cdef int _since_mode(since, u64 *out) except -1:
    """0: rows with pos > *out; 1: every row; 2: no row (``since`` compared as Python does)."""
    if not isinstance(since, int):
        try:
            since = math.floor(since)  # pos > x  <=>  pos > floor(x) for integer pos
        except (ValueError, OverflowError):
            return 1 if since < 0 else 2  # -inf: every row; +inf and NaN: none
    if since < 0:
        return 1
    if since >= 0xFFFFFFFFFFFFFFFF:
        return 2
    out[0] = since
    return 0


def encode_delta(KeyTable keys not None, table, since, sync_token=b"", removed=()):
    """Rows whose change position is after ``since``, with all their fields and their
    ``membership`` (1 or 2: the reader may hold the row with the other state); ``full`` false."""
    cdef const unsigned int[::1] kc = table.keys
    cdef const unsigned long long[::1] mxc = table.max_seq
    cdef const unsigned long long[::1] rdc = table.read_seq
    cdef const unsigned long long[::1] mnc = table.min_seq
    cdef const long long[::1] tmc = table.time_ms
    cdef const unsigned long long[::1] psc = table.pos
    cdef const unsigned char[::1] fzc = table.frozen
    cdef Py_ssize_t n = kc.shape[0]
    _check_len(n, mxc.shape[0])
    _check_len(n, rdc.shape[0])
    _check_len(n, mnc.shape[0])
    _check_len(n, tmc.shape[0])
    _check_len(n, psc.shape[0])
    _check_len(n, fzc.shape[0])
    cdef u64 s = 0
    cdef int mode = _since_mode(since, &s)
    cdef list enc = keys._encoded
    cdef Py_ssize_t nkeys = PyList_GET_SIZE(enc)
    cdef _Tail tail = _Tail(sync_token, False, removed)
    cdef Py_ssize_t i, j, k, total = tail.size
    cdef Py_ssize_t nsel = 0, cap = 0
    cdef Py_ssize_t *sel = NULL
    cdef Py_ssize_t *grown
    cdef char *start
    cdef char *p
    if mode == 1:
        s = 0
    try:
        if mode != 2:
            cap = 256
            sel = <Py_ssize_t *>malloc(cap * sizeof(Py_ssize_t))
            if sel == NULL:
                raise MemoryError()
            with nogil:
                for i in range(n):
                    if psc[i] > s or mode == 1:  # mode 1 also takes pos == 0
                        if nsel == cap:
                            cap *= 2
                            grown = <Py_ssize_t *>realloc(sel, cap * sizeof(Py_ssize_t))
                            if grown == NULL:
                                with gil:
                                    raise MemoryError()
                            sel = grown
                        sel[nsel] = i
                        nsel += 1
        for j in range(nsel):
            i = sel[j]
            k = kc[i]
            if k >= nkeys:
                _key_error(k)
            total += _entry_size(sa_key_len(enc, k), _value_len(
                mxc[i], rdc[i], mnc[i], <u64>tmc[i], 2 if fzc[i] else 1))
        out = PyBytes_FromStringAndSize(NULL, total)
        start = PyBytes_AS_STRING(out)
        p = start
        for j in range(nsel):
            i = sel[j]
            k = kc[i]
            p = _put_entry(p, sa_key_ptr(enc, k), sa_key_len(enc, k),
                           mxc[i], rdc[i], mnc[i], <u64>tmc[i], 2 if fzc[i] else 1)
        p = tail.write(p)
        assert p - start == total
        return out
    finally:
        free(sel)


def encode_rows(KeyTable keys not None, table, rows, masks=None, sync_token=b"", full=False,
                removed=()):
    """The listed rows; with ``masks`` (one byte per listed row) only the selected fields.
    Without masks every field, ``membership`` included (1 or 2), as with a mask of 15."""
    cdef const unsigned int[::1] kc = table.keys
    cdef const unsigned long long[::1] mxc = table.max_seq
    cdef const unsigned long long[::1] rdc = table.read_seq
    cdef const unsigned long long[::1] mnc = table.min_seq
    cdef const long long[::1] tmc = table.time_ms
    cdef const unsigned char[::1] fzc = table.frozen
    cdef Py_ssize_t nrow = kc.shape[0]
    # a row must exist in every column, as indexing each column separately requires
    if mxc.shape[0] < nrow:
        nrow = mxc.shape[0]
    if rdc.shape[0] < nrow:
        nrow = rdc.shape[0]
    if mnc.shape[0] < nrow:
        nrow = mnc.shape[0]
    if tmc.shape[0] < nrow:
        nrow = tmc.shape[0]
    if fzc.shape[0] < nrow:
        nrow = fzc.shape[0]
    cdef list rl = rows if type(rows) is list else list(rows)
    cdef Py_ssize_t nsel = len(rl)
    cdef bytes mb
    cdef const unsigned char *mp = NULL
    if masks is not None:
        mb = masks if type(masks) is bytes else bytes(masks)
        if PyBytes_GET_SIZE(mb) < nsel:
            raise IndexError("fewer masks than rows")
        mp = <const unsigned char *>PyBytes_AS_STRING(mb)
    cdef list enc = keys._encoded
    cdef Py_ssize_t nkeys = PyList_GET_SIZE(enc)
    cdef Py_ssize_t j, r, k
    cdef Py_ssize_t *sel = <Py_ssize_t *>malloc((nsel if nsel else 1) * sizeof(Py_ssize_t))
    cdef unsigned char m = 15
    cdef _Tail tail
    cdef Py_ssize_t total
    cdef char *start
    cdef char *p
    if sel == NULL:
        raise MemoryError()
    try:
        for j in range(nsel):
            try:
                r = rl[j]
            except OverflowError:
                raise IndexError("array index out of range") from None
            if r < 0:
                r += nrow
            if r < 0 or r >= nrow:
                raise IndexError("array index out of range")
            sel[j] = r
        tail = _Tail(sync_token, full, removed)
        total = tail.size
        for j in range(nsel):
            r = sel[j]
            k = kc[r]
            if k >= nkeys:
                _key_error(k)
            if mp != NULL:
                m = mp[j]
            total += _entry_size(sa_key_len(enc, k), _value_len(
                mxc[r] if m & 1 else 0, rdc[r] if m & 2 else 0,
                mnc[r] if m & 4 else 0, <u64>tmc[r] if m & 1 else 0,
                (2 if fzc[r] else 1) if m & 8 else 0))
        out = PyBytes_FromStringAndSize(NULL, total)
        start = PyBytes_AS_STRING(out)
        p = start
        for j in range(nsel):
            r = sel[j]
            k = kc[r]
            if mp != NULL:
                m = mp[j]
            p = _put_entry(p, sa_key_ptr(enc, k), sa_key_len(enc, k),
                           mxc[r] if m & 1 else 0, rdc[r] if m & 2 else 0,
                           mnc[r] if m & 4 else 0, <u64>tmc[r] if m & 1 else 0,
                           (2 if fzc[r] else 1) if m & 8 else 0)
        p = tail.write(p)
        assert p - start == total
        return out
    finally:
        free(sel)


cdef inline u64 _u64(v) except? 0xFFFFFFFFFFFFFFFF:
    """``v & (2**64 - 1)`` for any Python int (negative int64 -> two's complement)."""
    if type(v) is int and 0 <= v <= 0xFFFFFFFFFFFFFFFF:
        return <u64>v
    return <u64>(v & 0xFFFFFFFFFFFFFFFF)


def encode_single(KeyTable keys not None, key_id, max_seq, read_seq, min_seq, time_ms,
                  sync_token=b""):
    """A one-conversation update (the hub's broadcast of a new max, encoded once)."""
    cdef bytes kb = keys._encoded[key_id]
    cdef u64 mx = _u64(max_seq), rd = _u64(read_seq), mn = _u64(min_seq), tm = _u64(time_ms)
    cdef Py_ssize_t klen = PyBytes_GET_SIZE(kb)
    cdef Py_ssize_t tn = 0
    if sync_token:
        if type(sync_token) is not bytes:
            sync_token = bytes(memoryview(sync_token))
        tn = PyBytes_GET_SIZE(sync_token)
    cdef Py_ssize_t total = _entry_size(klen, _value_len(mx, rd, mn, tm, 0))
    if tn:
        total += 1 + sa_vsize(<u64>tn) + tn
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char *start = PyBytes_AS_STRING(out)
    cdef char *p = _put_entry(start, PyBytes_AS_STRING(kb), klen, mx, rd, mn, tm, 0)
    if tn:
        p[0] = 0x12
        p = sa_put_varint(p + 1, <u64>tn)
        memcpy(p, PyBytes_AS_STRING(sync_token), tn)
        p += tn
    assert p - start == total
    return out


def frame_update(request_id, update):
    """``ServerMessage{request_id, update}`` bytes around already encoded update bytes."""
    cdef u64 rid = _u64(request_id)
    cdef bytes ub = update if type(update) is bytes else bytes(memoryview(update))
    cdef Py_ssize_t n = PyBytes_GET_SIZE(ub)
    cdef Py_ssize_t total = 1 + sa_vsize(<u64>n) + n
    if rid:
        total += 1 + sa_vsize(rid)
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char *p = PyBytes_AS_STRING(out)
    if rid:
        p[0] = 0x08
        p = sa_put_varint(p + 1, rid)
    p[0] = 0x1A
    p = sa_put_varint(p + 1, <u64>n)
    memcpy(p, PyBytes_AS_STRING(ub), n)
    return out


# ---------------------------------------------------------------- decoding

cdef inline const unsigned char *_tag(
    const unsigned char *p, const unsigned char *end, unsigned int *field, int *wire
) except NULL:
    """Reads a tag; rejects truncation, tags over 32 bits and field number 0."""
    cdef u64 t
    if p[0] < 0x80:  # callers guarantee p < end
        t = p[0]
        p += 1
    else:
        p = sa_get_varint(p, end, &t)
        if p == NULL:
            raise DecodeError("truncated or overlong varint in a tag")
        if t > 0xFFFFFFFF:
            raise DecodeError("field number out of range")
    field[0] = <unsigned int>(t >> 3)
    wire[0] = <int>(t & 7)
    if field[0] == 0:
        raise DecodeError("field number 0")
    return p


cdef inline const unsigned char *_len(
    const unsigned char *p, const unsigned char *end, Py_ssize_t *n
) except NULL:
    cdef u64 v
    p = sa_get_varint(p, end, &v)
    if p == NULL:
        raise DecodeError("truncated or overlong length varint")
    if v > <u64>(end - p):
        raise DecodeError("length-delimited field runs past the end")
    n[0] = <Py_ssize_t>v
    return p


cdef inline const unsigned char *_skip(
    const unsigned char *p, const unsigned char *end, int wire
) except NULL:
    cdef const unsigned char *q = sa_skip(p, end, wire)
    if q == NULL:
        if wire in (0, 1, 2, 5):
            raise DecodeError("truncated unknown field")
        raise DecodeError(f"unsupported wire type {wire}")
    return q


cdef int _raise(int err, str where) except -1:
    if err == SA_EVARINT:
        raise DecodeError(f"truncated or overlong varint in {where}")
    if err == SA_ELEN:
        raise DecodeError(f"length-delimited field runs past the end of {where}")
    if err == SA_EWIRE:
        raise DecodeError(f"wrong wire type for a known field of {where}")
    if err == SA_ETAG:
        raise DecodeError(f"field number 0 or out of range in {where}")
    raise DecodeError(f"truncated unknown field or unsupported wire type in {where}")


cdef void _check_keys(const unsigned char *p, const unsigned char *end) except *:
    """An entry with its key repeated: every occurrence must be valid UTF-8, as protobuf checks.
    (The entry's structure was already validated by sa_entry.)"""
    cdef unsigned int field
    cdef int wire
    cdef Py_ssize_t n
    while p < end:
        p = _tag(p, end, &field, &wire)
        if wire == 2:
            p = _len(p, end, &n)
            if field == 1:
                sa_str(p, n)
            p += n
        else:
            p = _skip(p, end, wire)


def decode_update(data):
    """Parse ``SequenceUpdate`` bytes. Raises :class:`DecodeError` on malformed input.

    Later map entries with the same key replace earlier ones, as protobuf merges maps; a value
    repeated inside one entry merges field by field. A map entry carrying unknown fields of its
    own is left out of the map (the protobuf runtime, upb, keeps it as an unknown field).
    Stricter than protobuf on purpose: wrong wire types for known fields, groups and varints
    over 64 bits are errors (protobuf treats them as unknown fields / truncates).
    """
    try:
        return _decode_update(data if type(data) is bytes else bytes(data))
    except UnicodeDecodeError as exc:
        raise DecodeError(f"invalid UTF-8 in string field: {exc}") from None


cdef tuple _decode_update(bytes buf):
    cdef const unsigned char *base = <const unsigned char *>PyBytes_AS_STRING(buf)
    cdef const unsigned char *p = base
    cdef const unsigned char *end = base + PyBytes_GET_SIZE(buf)
    cdef const unsigned char *eend
    cdef Py_ssize_t n
    cdef unsigned int field
    cdef int wire, nkeys, unknown
    cdef int err = 0
    cdef const unsigned char *kp
    cdef Py_ssize_t kn
    cdef u64 v
    cdef u64 vals[5]
    cdef dict conversations = _PyDict_NewPresized(sa_count_entries(p, end))
    cdef list removed = []
    token = b""
    cdef bint full = False
    while p < end:
        if p[0] == 0x0A:  # the common case: a map entry
            field = 1
            wire = 2
            p += 1
        else:
            p = _tag(p, end, &field, &wire)
        if field == 1:
            if wire != 2:
                raise DecodeError(f"wrong wire type {wire} for SequenceUpdate field 1")
            p = sa_len(p, end, &n, &err)
            if p == NULL:
                _raise(err, "SequenceUpdate")
            eend = p + n
            vals[0] = vals[1] = vals[2] = vals[3] = vals[4] = 0
            kp = NULL
            kn = 0
            nkeys = 0
            unknown = 0
            err = sa_entry(p, eend, &kp, &kn, &nkeys, &unknown, vals)
            if err:
                _raise(err, "a map entry")
            if nkeys > 1:
                _check_keys(p, eend)
            key = sa_str(kp, kn) if nkeys else ""  # checked even when the entry is dropped
            if not unknown:  # upb keeps such an entry as an unknown field, out of the map
                # membership is a uint32: protobuf keeps the low 32 bits of the varint
                conversations[key] = _new_seqs(vals[0], vals[1], vals[2], <long long>vals[3],
                                               <unsigned int>(vals[4] & 0xFFFFFFFFULL))
            p = eend
        elif field == 2:
            if wire != 2:
                raise DecodeError(f"wrong wire type {wire} for SequenceUpdate field 2")
            p = _len(p, end, &n)
            token = PyBytes_FromStringAndSize(<const char *>p, n)
            p += n
        elif field == 3:
            if wire != 0:
                raise DecodeError(f"wrong wire type {wire} for SequenceUpdate field 3")
            p = sa_get_varint(p, end, &v)
            if p == NULL:
                raise DecodeError("truncated or overlong varint")
            full = v != 0
        elif field == 4:
            if wire != 2:
                raise DecodeError(f"wrong wire type {wire} for SequenceUpdate field 4")
            p = _len(p, end, &n)
            removed.append(sa_str(p, n))
            p += n
        else:
            p = _skip(p, end, wire)
    return conversations, token, full, removed


def split_server_message(data):
    """``ServerMessage`` bytes -> (request_id, body field number, body bytes).

    Field number 0 with empty bytes means no body. As protobuf parses a oneof, a body field
    repeated merges (the bodies are concatenated) and a different body field replaces it.
    The body is left for the caller to parse (``decode_update`` for field 3, the protobuf
    runtime for the small ones).
    """
    cdef bytes buf = data if type(data) is bytes else bytes(data)
    cdef const unsigned char *base = <const unsigned char *>PyBytes_AS_STRING(buf)
    cdef const unsigned char *p = base
    cdef const unsigned char *end = base + PyBytes_GET_SIZE(buf)
    cdef Py_ssize_t n
    cdef unsigned int field
    cdef unsigned int body_field = 0
    cdef int wire
    cdef u64 request_id = 0
    body = b""
    while p < end:
        p = _tag(p, end, &field, &wire)
        if field == 1:
            if wire != 0:
                raise DecodeError("wrong wire type for request_id")
            p = sa_get_varint(p, end, &request_id)
            if p == NULL:
                raise DecodeError("truncated or overlong varint")
        elif 2 <= field <= 10:  # Welcome .. GoAway, ReadCounts, Readers (v1.1)
            if wire != 2:
                raise DecodeError(f"wrong wire type {wire} for ServerMessage field {field}")
            p = _len(p, end, &n)
            if field == body_field:
                body += PyBytes_FromStringAndSize(<const char *>p, n)
            else:
                body_field = field
                body = PyBytes_FromStringAndSize(<const char *>p, n)
            p += n
        else:
            p = _skip(p, end, wire)
    return request_id, body_field, body


# ---------------------------------------------------------------- fan-out writes

from libc.errno cimport EINTR, errno

cdef extern from "<sys/socket.h>" nogil:
    ssize_t _socket_send "send"(int fd, const void *buf, size_t n, int flags)
    int MSG_NOSIGNAL
    int MSG_DONTWAIT


def write_many(fds, data, results):
    """Write the same ready bytes to many non-blocking sockets, GIL released.

    Each write is a ``send(2)`` with ``MSG_NOSIGNAL | MSG_DONTWAIT``: a socket's own system
    call, which skips the file layer ``write(2)`` goes through (``vfs_write``, the file
    position lock: about 9 % of the server's CPU in a 10 000-member fan-out under ``perf``).

    ``fds`` is an ``array('i')`` of file descriptors, ``data`` the bytes (a framed WebSocket
    message), ``results`` an ``array('q')`` of the same length that receives, per descriptor,
    the number of bytes written or ``-errno`` (``-EAGAIN``: the socket took nothing).
    """
    cdef const int[:] fdv = fds
    cdef long long[:] out = results
    cdef const unsigned char[:] buf = data
    cdef Py_ssize_t i, n = fdv.shape[0]
    cdef size_t size = buf.shape[0]
    cdef const unsigned char* p
    cdef long r
    if out.shape[0] < n:
        raise ValueError("results is shorter than fds")
    if n == 0:
        return
    if size == 0:
        for i in range(n):
            out[i] = 0
        return
    p = &buf[0]
    with nogil:
        for i in range(n):
            while True:
                r = _socket_send(fdv[i], p, size, MSG_NOSIGNAL | MSG_DONTWAIT)
                if r < 0 and errno == EINTR:
                    continue
                break
            out[i] = r if r >= 0 else -errno


# ---------------------------------------------------------------- fan-out rounds

from cpython.array cimport array as _carray, resize_smart as _resize_smart
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef inline double _monotonic() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline void _push_fd(_carray fds, int fd) except *:
    cdef Py_ssize_t n = len(fds)
    _resize_smart(fds, n + 1)
    fds.data.as_ints[n] = fd


cdef class FanoutSession:
    """What the fan-out rule reads of a session, as C fields (see the pure-Python twin).

    The server's ``SessionState`` extends it: a round reads these per recipient at a fixed
    offset in the object instead of looking each name up (a slot descriptor per attribute:
    about half of the member loop's time before)."""

    cdef public bint subscribed_all
    cdef public bint writer_running
    cdef public bint background
    cdef public int fd
    cdef public object subscribed
    cdef public object pending
    cdef public object pending_removed

    def __init__(self):
        self.fd = -1


cdef class FanoutActor:
    """What a fan-out round reads of a user's actor, as C fields (see the pure-Python twin);
    the server's ``UserActor`` extends it."""

    cdef public object fanned
    cdef public list sessions

    def __init__(self):
        self.sessions = []


cdef bint _route(
    list sessions, object key_id, object mask, object shared, _carray fd0, list s0, _carray fd1,
    list s1,
) except -1:
    """The fan-out rule (see :func:`route`): True when a session got the change pending."""
    cdef bint with_token, marked = False
    cdef int fd
    cdef FanoutSession s
    for o in sessions:
        s = <FanoutSession?>o
        if s.subscribed_all:
            with_token = True
        elif key_id in s.subscribed:
            with_token = False
        else:
            continue
        if shared is not None and not (
            s.writer_running or s.background or s.pending or s.pending_removed
        ):
            fd = s.fd
            if fd >= 0:
                if with_token:
                    _push_fd(fd0, fd)
                    s0.append(s)
                else:
                    _push_fd(fd1, fd)
                    s1.append(s)
                continue
        s.mark(key_id, mask, shared)
        marked = True
    return marked


def route(list sessions not None, key_id, mask, shared, tuple fds not None,
          tuple out not None):
    """The fan-out rule: who gets a change, and how (see the pure-Python twin)."""
    cdef _carray fd0 = <_carray?>fds[0]
    cdef _carray fd1 = <_carray?>fds[1]
    if fd0.ob_descr.typecode != c'i' or fd1.ob_descr.typecode != c'i':
        raise TypeError("fds must be array('i')")
    return _route(sessions, key_id, mask, shared, fd0, <list?>out[0], fd1, <list?>out[1])


cdef int _fan_one(
    FanoutActor actor, object change, object key_id, object mask, object shared, _carray fd0,
    list s0, _carray fd1, list s1,
) except -1:
    if actor.fanned is change:
        return 0  # an earlier round of this conversation handed it this change already
    actor.fanned = change
    if _route(actor.sessions, key_id, mask, shared, fd0, s0, fd1, s1):
        actor.wake()
    return 0


# How far ahead of the member loop each object it reads is prefetched: the actor, its sessions
# list, the list's item array, the first session, that session's pending dict. Each stage
# reads only what an earlier stage asked for, one or two members before.
DEF AHEAD_ACTOR = 8
DEF AHEAD_LIST = 6
DEF AHEAD_ITEMS = 4
DEF AHEAD_SESSION = 2
DEF AHEAD_PENDING = 1


cdef inline list _sessions_at(list members, Py_ssize_t j) noexcept:
    """The sessions list of ``members[j]`` when it is an actor that has one, else None
    (``j`` is in range: the caller checked; a type check and a field read, nothing raises)."""
    cdef object o = <object>PyList_GET_ITEM(members, j)
    if isinstance(o, FanoutActor):
        return (<FanoutActor>o).sessions
    return None


cdef inline void _prefetch_ahead(list members, Py_ssize_t i) noexcept:
    """Prefetch, for the members after ``i``, the objects the loop will read (at 10 000
    members they are spread over megabytes: each would be a cache miss). A hint only: what
    it reads it type-checks, and a wrong guess costs a wasted prefetch. Nothing in it can
    raise (index checks, type checks, field reads, prefetch hints), hence ``noexcept``."""
    cdef Py_ssize_t n = PyList_GET_SIZE(members)  # (read again: a callee may change the list)
    cdef list sl
    cdef PyObject **items
    cdef object s
    if i + AHEAD_ACTOR < n:
        sa_prefetch(PyList_GET_ITEM(members, i + AHEAD_ACTOR))
    if i + AHEAD_LIST < n:
        sl = _sessions_at(members, i + AHEAD_LIST)
        if sl is not None:
            sa_prefetch(<PyObject *>sl)
    if i + AHEAD_ITEMS < n:
        sl = _sessions_at(members, i + AHEAD_ITEMS)
        if sl is not None:
            items = sa_list_items(<PyObject *>sl)
            if items != NULL:
                sa_prefetch(items)
    if i + AHEAD_SESSION < n:
        sl = _sessions_at(members, i + AHEAD_SESSION)
        if sl is not None and PyList_GET_SIZE(sl) > 0:
            sa_prefetch(PyList_GET_ITEM(sl, 0))
    if i + AHEAD_PENDING < n:
        sl = _sessions_at(members, i + AHEAD_PENDING)
        if sl is not None and PyList_GET_SIZE(sl) > 0:
            s = <object>PyList_GET_ITEM(sl, 0)
            if isinstance(s, FanoutSession):
                sa_prefetch(<PyObject *>(<FanoutSession>s).pending)


def fan_slice(list members not None, Py_ssize_t start, key_id, change, mask, shared,
              tuple fds not None, tuple sessions not None, double slice_s,
              Py_ssize_t clock_every):
    """One time slice of a fan-out round (see the pure-Python twin for the contract).

    The per-member loop runs in C; the only Python calls left are for sessions that are not
    idle."""
    cdef Py_ssize_t i = start, n = len(members)
    cdef double deadline = _monotonic() + slice_s
    cdef _carray fd0 = <_carray?>fds[0]
    cdef _carray fd1 = <_carray?>fds[1]
    cdef list s0 = sessions[0]
    cdef list s1 = sessions[1]
    if fd0.ob_descr.typecode != c'i' or fd1.ob_descr.typecode != c'i':
        raise TypeError("fds must be array('i')")
    if clock_every < 1:
        raise ValueError("clock_every must be >= 1")
    if start < 0:
        raise ValueError("start must be >= 0")
    failures = None
    while i < n:
        if i >= PyList_GET_SIZE(members):  # a callee shortened the list: what is left is done
            break
        _prefetch_ahead(members, i)
        actor = members[i]
        i += 1
        try:
            _fan_one(<FanoutActor?>actor, change, key_id, mask, shared, fd0, s0, fd1, s1)
        except Exception as exc:  # one member's failure never stops the others' pushes
            if failures is None:
                failures = []
            failures.append((actor, exc))
        if i % clock_every == 0 and _monotonic() > deadline:
            break
    return i, failures


def settle(table, rows=None, upto=None):
    """Bring active rows up to ``table.shared`` (see the pure-Python twin for the contract)."""
    shared = table.shared
    if shared is None:
        return 0
    cdef const unsigned int[::1] kc = table.keys
    cdef unsigned long long[::1] mxc = table.max_seq
    cdef long long[::1] tmc = table.time_ms
    cdef unsigned long long[::1] psc = table.pos
    cdef const unsigned char[::1] fzc = table.frozen
    cdef const unsigned long long[::1] smx = shared.max_seq
    cdef const long long[::1] stm = shared.time_ms
    cdef const unsigned long long[::1] sps = shared.pos
    cdef Py_ssize_t n = kc.shape[0]
    cdef Py_ssize_t m = smx.shape[0]
    _check_len(n, mxc.shape[0])
    _check_len(n, tmc.shape[0])
    _check_len(n, psc.shape[0])
    _check_len(n, fzc.shape[0])
    _check_len(m, stm.shape[0])
    _check_len(m, sps.shape[0])
    # (upto < 0: nothing was recorded that early; upto >= 2**64: no limit)
    cdef bint none = upto is not None and upto < 0
    cdef u64 limit = 0xFFFFFFFFFFFFFFFF
    if upto is not None and 0 <= upto < 0xFFFFFFFFFFFFFFFF:
        limit = upto
    cdef Py_ssize_t r, k, j, changed = 0
    cdef list rl = None if rows is None else rows if type(rows) is list else list(rows)
    cdef Py_ssize_t count = n if rl is None else len(rl)
    for j in range(count):
        r = j
        if rl is not None:
            r = rl[j]
            if r < 0 or r >= n:
                raise IndexError("row index out of range")
        k = kc[r]
        if not none and k < m and not fzc[r] and smx[k] > mxc[r] and sps[k] <= limit:
            mxc[r] = smx[k]
            tmc[r] = stm[k]
            if sps[k] > psc[r]:
                psc[r] = sps[k]
            changed += 1
    return changed
