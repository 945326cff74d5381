"""Pure-Python twin of the compiled delta kernel (``_delta.pyx``): same API, same bytes.

The kernel turns a user's view (columnar tables, see :mod:`seqactor.server._view`) straight into
protobuf wire bytes of ``seqactor.v1.SequenceUpdate`` without building protobuf objects, and
decodes such bytes back into plain Python data for the client.

Wire layout written (field order = field number order, as the protobuf runtime writes):

* ``conversations`` (1): one map entry per row: ``0a <len> [0a <klen> key] [12 <vlen> value]``;
  ``value`` is a ``ConversationSequence`` whose fields equal to 0 are omitted;
  ``membership`` (5) is 2 for a frozen row (``table.frozen``) in every encoder; a member row
  writes 1 where the reader cannot infer it (``encode_delta``, ``encode_rows`` without masks,
  and masks with ``FIELD_MEMBERSHIP``) and nothing in a snapshot (absent there = member);
* ``sync_token`` (2) when non-empty, ``full`` (3) when true, ``removed`` (4) per id.

Push masks (``FIELD_MAX``/``FIELD_READ``/``FIELD_MIN``/``FIELD_MEMBERSHIP`` from
:mod:`seqactor.server._view`) select which fields of a row a push carries; unselected fields
are written as 0 = unchanged.
"""

from __future__ import annotations

import operator
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any, SupportsIndex

_U64_MASK = (1 << 64) - 1
_U64_MAX = _U64_MASK
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_U32_MAX = (1 << 32) - 1


class DecodeError(ValueError):
    """Bytes that are not a valid encoding of the expected protobuf message."""


def _index_in(value: SupportsIndex, lo: int, hi: int) -> int:
    v = int(operator.index(value))  # int() drops bool and int subclasses
    if not lo <= v <= hi:
        raise OverflowError(f"{v} out of range [{lo}, {hi}]")
    return v


class ConversationSeqs(tuple[int, int, int, int, int]):
    """One decoded ``ConversationSequence``: an immutable record that is (here, literally) the
    tuple ``(max_sequence, read_sequence, min_sequence, max_sequence_time_ms, membership)``.

    The compiled kernel's class of the same name holds the values as C fields and behaves as
    this tuple: it unpacks, indexes, compares and hashes alike (``record == tuple`` both ways).
    The constructor takes ints only (``TypeError`` otherwise) and raises ``OverflowError``
    outside uint64 (the seqs), int64 (the time) or uint32 (``membership``, default 0 = not
    sent), as the compiled one does.
    """

    __slots__ = ()
    __match_args__ = (
        "max_sequence", "read_sequence", "min_sequence", "max_sequence_time_ms", "membership",
    )

    def __new__(
        cls, max_sequence: SupportsIndex, read_sequence: SupportsIndex,
        min_sequence: SupportsIndex, max_sequence_time_ms: SupportsIndex,
        membership: SupportsIndex = 0,
    ) -> ConversationSeqs:
        return tuple.__new__(cls, (
            _index_in(max_sequence, 0, _U64_MAX),
            _index_in(read_sequence, 0, _U64_MAX),
            _index_in(min_sequence, 0, _U64_MAX),
            _index_in(max_sequence_time_ms, _I64_MIN, _I64_MAX),
            _index_in(membership, 0, _U32_MAX),
        ))

    def astuple(self) -> tuple[int, int, int, int, int]:
        """The plain tuple ``(max_sequence, read_sequence, min_sequence, max_sequence_time_ms,
        membership)``."""
        return (self[0], self[1], self[2], self[3], self[4])

    @property
    def max_sequence(self) -> int:
        return self[0]

    @property
    def read_sequence(self) -> int:
        return self[1]

    @property
    def min_sequence(self) -> int:
        return self[2]

    @property
    def max_sequence_time_ms(self) -> int:
        return self[3]

    @property
    def membership(self) -> int:
        """0 = not sent (unchanged), 1 = member, 2 = frozen (left with keep_history)."""
        return self[4]

    def __repr__(self) -> str:
        return (
            f"ConversationSeqs(max_sequence={self[0]}, read_sequence={self[1]}, "
            f"min_sequence={self[2]}, max_sequence_time_ms={self[3]}, membership={self[4]})"
        )

    def __reduce__(self) -> tuple[type[ConversationSeqs], tuple[int, int, int, int, int]]:
        return ConversationSeqs, (self[0], self[1], self[2], self[3], self[4])


# Result of decode_update: (conversations, sync_token, full, removed), where conversations maps
# id -> ConversationSeqs (max_sequence, read_sequence, min_sequence, max_sequence_time_ms,
# membership).
DecodedUpdate = tuple[dict[str, ConversationSeqs], bytes, bool, list[str]]


def _varint(value: int) -> bytes:
    value &= _U64_MASK
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _put_varint(out: bytearray, value: int) -> None:
    value &= _U64_MASK
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


class KeyTable:
    """Interns conversation ids: id <-> small int, with the encoded map-entry key cached."""

    __slots__ = ("_ids", "_keys", "_encoded")

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._keys: list[str] = []
        self._encoded: list[bytes] = []  # b"\x0a" + varint(len) + utf-8 id

    def intern(self, key: str) -> int:
        idx = self._ids.get(key)
        if idx is None:
            raw = key.encode("utf-8")
            idx = len(self._keys)
            self._ids[key] = idx
            self._keys.append(key)
            self._encoded.append(b"\x0a" + _varint(len(raw)) + raw)
        return idx

    def lookup(self, key: str) -> int:
        """Id of an already interned key, or -1."""
        return self._ids.get(key, -1)

    def key(self, idx: int) -> str:
        return self._keys[idx]

    def __len__(self) -> int:
        return len(self._keys)


def _put_entry(
    out: bytearray, enc_key: bytes, max_seq: int, read_seq: int, min_seq: int, time_ms: int,
    membership: int = 0,
) -> None:
    value = bytearray()
    if max_seq:
        value.append(0x08)
        _put_varint(value, max_seq)
    if read_seq:
        value.append(0x10)
        _put_varint(value, read_seq)
    if min_seq:
        value.append(0x18)
        _put_varint(value, min_seq)
    if time_ms:
        value.append(0x20)
        _put_varint(value, time_ms)
    if membership:
        value.append(0x28)
        _put_varint(value, membership)
    entry_len = len(enc_key) + 1 + len(_varint(len(value))) + len(value)
    out.append(0x0A)
    _put_varint(out, entry_len)
    out += enc_key
    out.append(0x12)
    _put_varint(out, len(value))
    out += value


def _put_tail(out: bytearray, sync_token: bytes, full: bool, removed: Iterable[str]) -> None:
    if sync_token:
        if type(sync_token) is not bytes:
            sync_token = bytes(memoryview(sync_token))
        out.append(0x12)
        _put_varint(out, len(sync_token))
        out += sync_token
    if full:
        out += b"\x18\x01"
    for rid in removed:
        raw = rid.encode("utf-8")
        out.append(0x22)
        _put_varint(out, len(raw))
        out += raw


def encode_snapshot(
    keys: KeyTable, table: Any, sync_token: bytes = b"", full: bool = True,
    removed: Sequence[str] = (),
) -> bytes:
    """Every row of ``table`` with all its fields; ``membership`` 2 on frozen rows only."""
    enc = keys._encoded
    out = bytearray()
    for k, mx, rd, mn, tm, fz in zip(
        table.keys, table.max_seq, table.read_seq, table.min_seq, table.time_ms, table.frozen,
        strict=True,
    ):
        _put_entry(out, enc[k], mx, rd, mn, tm, 2 if fz else 0)
    _put_tail(out, sync_token, full, removed)
    return bytes(out)


def encode_delta(
    keys: KeyTable, table: Any, since: int, sync_token: bytes = b"",
    removed: Sequence[str] = (),
) -> bytes:
    """Rows whose change position is after ``since``, with all their fields and their
    ``membership`` (1 or 2: the reader may hold the row with the other state); ``full`` false."""
    enc = keys._encoded
    out = bytearray()
    for k, mx, rd, mn, tm, ps, fz in zip(
        table.keys, table.max_seq, table.read_seq, table.min_seq, table.time_ms, table.pos,
        table.frozen, strict=True,
    ):
        if ps > since:
            _put_entry(out, enc[k], mx, rd, mn, tm, 2 if fz else 1)
    _put_tail(out, sync_token, False, removed)
    return bytes(out)


def encode_rows(
    keys: KeyTable, table: Any, rows: Sequence[int], masks: bytes | None = None,
    sync_token: bytes = b"", full: bool = False, removed: Sequence[str] = (),
) -> bytes:
    """The listed rows; with ``masks`` (one byte per listed row) only the selected fields.
    Without masks every field, ``membership`` included (1 or 2), as with a mask of 15."""
    enc = keys._encoded
    kc, mxc, rdc, mnc, tmc = table.keys, table.max_seq, table.read_seq, table.min_seq, table.time_ms
    fzc = table.frozen
    out = bytearray()
    for i, row in enumerate(rows):
        m = 15 if masks is None else masks[i]
        _put_entry(
            out, enc[kc[row]],
            mxc[row] if m & 1 else 0,
            rdc[row] if m & 2 else 0,
            mnc[row] if m & 4 else 0,
            tmc[row] if m & 1 else 0,
            (2 if fzc[row] else 1) if m & 8 else 0,
        )
    _put_tail(out, sync_token, full, removed)
    return bytes(out)


def encode_single(
    keys: KeyTable, key_id: int, max_seq: int, read_seq: int, min_seq: int, time_ms: int,
    sync_token: bytes = b"",
) -> bytes:
    """A one-conversation update (the hub's broadcast of a new max, encoded once)."""
    out = bytearray()
    _put_entry(
        out, keys._encoded[key_id], max_seq & _U64_MASK, read_seq & _U64_MASK,
        min_seq & _U64_MASK, time_ms & _U64_MASK,
    )
    _put_tail(out, sync_token, False, ())
    return bytes(out)


def frame_update(request_id: int, update: bytes) -> bytes:
    """``ServerMessage{request_id, update}`` bytes around already encoded update bytes."""
    out = bytearray()
    request_id &= _U64_MASK
    if request_id:
        out.append(0x08)
        _put_varint(out, request_id)
    out.append(0x1A)
    _put_varint(out, len(update))
    out += update
    return bytes(out)


# ---------------------------------------------------------------- decoding


def _get_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise DecodeError("truncated varint")
        b = data[pos]
        pos += 1
        if shift == 63 and b > 1:
            raise DecodeError("varint overflows 64 bits")
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise DecodeError("varint too long")


def _get_tag(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(field number, wire type, new pos); rejects field 0 and tags wider than 32 bits."""
    tag, pos = _get_varint(data, pos, end)
    if tag > 0xFFFFFFFF:
        raise DecodeError("field number out of range")
    field = tag >> 3
    if field == 0:
        raise DecodeError("field number 0")
    return field, tag & 7, pos


def _skip(data: bytes, pos: int, end: int, wire: int) -> int:
    if wire == 0:
        return _get_varint(data, pos, end)[1]
    if wire == 1:
        pos += 8
    elif wire == 2:
        n, pos = _get_varint(data, pos, end)
        pos += n
    elif wire == 5:
        pos += 4
    else:
        raise DecodeError(f"unsupported wire type {wire}")
    if pos > end:
        raise DecodeError("truncated field")
    return pos


def _get_len(data: bytes, pos: int, end: int) -> tuple[int, int]:
    n, pos = _get_varint(data, pos, end)
    if n > end - pos:
        raise DecodeError("length-delimited field runs past the end")
    return pos + n, pos


def _get_str(data: bytes, start: int, stop: int) -> str:
    try:
        return data[start:stop].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"invalid UTF-8 in string field: {exc}") from None


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


_Value = tuple[int, int, int, int, int]


def _decode_value(data: bytes, pos: int, end: int, prev: _Value) -> _Value:
    mx, rd, mn, tm, mb = prev
    while pos < end:
        field, wire, pos = _get_tag(data, pos, end)
        if wire == 0 and 1 <= field <= 5:
            v, pos = _get_varint(data, pos, end)
            if field == 1:
                mx = v
            elif field == 2:
                rd = v
            elif field == 3:
                mn = v
            elif field == 4:
                tm = _signed64(v)
            else:
                mb = v & _U32_MAX  # uint32: protobuf keeps the low 32 bits of the varint
        elif 1 <= field <= 5:
            raise DecodeError(f"wrong wire type {wire} for ConversationSequence field {field}")
        else:
            pos = _skip(data, pos, end, wire)
    return mx, rd, mn, tm, mb


def _decode_entry(data: bytes, pos: int, end: int) -> tuple[str, _Value, bool]:
    """(key, value, whether the entry held unknown fields)."""
    key = ""
    value = (0, 0, 0, 0, 0)
    unknown = False
    while pos < end:
        field, wire, pos = _get_tag(data, pos, end)
        if field in (1, 2) and wire != 2:
            raise DecodeError(f"wrong wire type {wire} for map entry field {field}")
        if field == 1:
            stop, start = _get_len(data, pos, end)
            key = _get_str(data, start, stop)
            pos = stop
        elif field == 2:
            stop, start = _get_len(data, pos, end)
            value = _decode_value(data, start, stop, value)
            pos = stop
        else:
            pos = _skip(data, pos, end, wire)
            unknown = True
    return key, value, unknown


def decode_update(data: bytes) -> DecodedUpdate:
    """Parse ``SequenceUpdate`` bytes. Raises :class:`DecodeError` on malformed input.

    Later map entries with the same key replace earlier ones, as protobuf merges maps; a value
    repeated inside one entry merges field by field. A map entry carrying unknown fields of its
    own is left out of the map (the protobuf runtime, upb, keeps it as an unknown field).
    Stricter than protobuf on purpose: wrong wire types for known fields, groups and varints
    over 64 bits are errors (protobuf treats them as unknown fields / truncates).
    """
    data = bytes(data)
    conversations: dict[str, ConversationSeqs] = {}
    token = b""
    full = False
    removed: list[str] = []
    new_seqs = tuple.__new__
    pos, end = 0, len(data)
    while pos < end:
        field, wire, pos = _get_tag(data, pos, end)
        if field in (1, 2, 4) and wire != 2 or field == 3 and wire != 0:
            raise DecodeError(f"wrong wire type {wire} for SequenceUpdate field {field}")
        if field == 1:
            stop, start = _get_len(data, pos, end)
            key, value, unknown = _decode_entry(data, start, stop)
            if not unknown:  # upb keeps such an entry as an unknown field, out of the map
                # tuple.__new__ skips the checks: the values are in range by construction
                conversations[key] = new_seqs(ConversationSeqs, value)
            pos = stop
        elif field == 2:
            stop, start = _get_len(data, pos, end)
            token = data[start:stop]
            pos = stop
        elif field == 3:
            v, pos = _get_varint(data, pos, end)
            full = v != 0
        elif field == 4:
            stop, start = _get_len(data, pos, end)
            removed.append(_get_str(data, start, stop))
            pos = stop
        else:
            pos = _skip(data, pos, end, wire)
    return conversations, token, full, removed


def split_server_message(data: bytes) -> tuple[int, int, bytes]:
    """``ServerMessage`` bytes -> (request_id, body field number, body bytes).

    Field number 0 with empty bytes means no body. As protobuf parses a oneof, a body field
    repeated merges (the bodies are concatenated) and a different body field replaces it.
    The body is left for the caller to parse (``decode_update`` for field 3, the protobuf
    runtime for the small ones).
    """
    data = bytes(data)
    request_id = 0
    body_field = 0
    body = b""
    pos, end = 0, len(data)
    while pos < end:
        field, wire, pos = _get_tag(data, pos, end)
        if field == 1:
            if wire != 0:
                raise DecodeError("wrong wire type for request_id")
            request_id, pos = _get_varint(data, pos, end)
        elif 2 <= field <= 10:  # Welcome .. GoAway, ReadCounts, Readers (v1.1)
            if wire != 2:
                raise DecodeError(f"wrong wire type {wire} for ServerMessage field {field}")
            stop, start = _get_len(data, pos, end)
            if field == body_field:
                body += data[start:stop]
            else:
                body_field, body = field, data[start:stop]
            pos = stop
        else:
            pos = _skip(data, pos, end, wire)
    return request_id, body_field, body


# ---------------------------------------------------------------- fan-out writes


def write_many(fds: Any, data: bytes, results: Any) -> None:
    """Write the same ready bytes to many non-blocking sockets.

    ``results[i]`` receives the number of bytes written to ``fds[i]`` or ``-errno``
    (``-EAGAIN``: the socket took nothing).
    """
    if len(results) < len(fds):
        raise ValueError("results is shorter than fds")
    for i, fd in enumerate(fds):
        try:
            results[i] = os.write(fd, data) if data else 0
        except InterruptedError:
            try:
                results[i] = os.write(fd, data)
            except OSError as exc:
                results[i] = -(exc.errno or 1)
        except OSError as exc:
            results[i] = -(exc.errno or 1)


class FanoutSession:
    """What the fan-out rule (:func:`route`) reads of one session; the server's
    ``SessionState`` extends it.

    ``subscribed_all`` (bool), ``subscribed`` (a set of key ids), ``writer_running`` and
    ``background`` (bool), ``pending`` (key id -> field mask) and ``pending_removed`` (a set
    of conversation ids): a session with anything of the last four is busy and gets a change
    pending; ``fd`` (the socket's descriptor while a direct write is possible, else -1).
    The compiled kernel keeps them as C fields, read at fixed offsets by a round."""

    __slots__ = (
        "subscribed_all", "writer_running", "background", "fd", "subscribed", "pending",
        "pending_removed",
    )

    def __init__(self) -> None:
        self.subscribed_all = False
        self.writer_running = False
        self.background = False
        self.fd = -1
        self.subscribed: Any = None
        self.pending: Any = None
        self.pending_removed: Any = None


class FanoutActor:
    """What a fan-out round (:func:`fan_slice`) reads of a user's actor: ``fanned`` (the
    change a round last handed the user) and ``sessions`` (its :class:`FanoutSession` list);
    the server's ``UserActor`` extends it."""

    __slots__ = ("fanned", "sessions")

    def __init__(self) -> None:
        self.fanned: Any = None
        self.sessions: list[Any] = []


def route(
    sessions: Sequence[Any], key_id: int, mask: int, shared: Any, fds: tuple[Any, Any],
    out: tuple[list[Any], list[Any]],
) -> bool:
    """The fan-out rule — who gets a change, and how — written once for every path (a fan-out
    round's slice and an actor's own changes).

    For each session state (``subscribed_all``, ``subscribed``, ``writer_running``,
    ``background``, ``pending``, ``pending_removed``, ``fd``, ``mark()``) that follows
    ``key_id`` (subscribed to all, or to it): when ``shared`` (the ready frames, with token and
    without) is given and the session is idle with a published descriptor, its ``fd`` and
    itself go to ``fds[0]``/``out[0]`` if it follows all (the frame with the sync token) else
    ``fds[1]``/``out[1]``, for one batch write; otherwise the change is marked pending
    (``mark(key_id, mask, shared)``: coalesced, latest wins). Returns True when a session got
    it pending (the caller wakes the actor)."""
    fd0, fd1 = fds
    s0, s1 = out
    marked = False
    for s in sessions:
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
                    fd0.append(fd)
                    s0.append(s)
                else:
                    fd1.append(fd)
                    s1.append(s)
                continue
        s.mark(key_id, mask, shared)
        marked = True
    return marked


def fan_slice(
    members: Sequence[Any], start: int, key_id: int, change: Any, mask: int, shared: Any,
    fds: tuple[Any, Any], sessions: tuple[list[Any], list[Any]], slice_s: float,
    clock_every: int,
) -> tuple[int, list[tuple[Any, Exception]] | None]:
    """One time slice of a fan-out round: a conversation's new max for ``members[start:]``.

    ``members`` are :class:`FanoutActor` objects (the server's actors: ``fanned``, ``sessions``,
    ``wake()``) whose sessions are :class:`FanoutSession` objects (``subscribed_all``,
    ``subscribed``, ``writer_running``, ``background``, ``pending``, ``pending_removed``,
    ``fd``, ``mark()``); a member that is not, or has a session that is not, is reported as a
    failure (the compiled kernel, which reads C fields, checks the classes and reports a
    ``TypeError``; this twin reads attributes by name). No view row is touched: the
    conversation's max is kept once, in the hub's ``SharedMax`` (see :func:`settle`). Per
    member whose ``fanned`` is not ``change`` (an object naming the change; an earlier round
    may have handed it already): ``fanned`` becomes ``change`` and its sessions are routed by
    :func:`route` into ``fds``/``sessions`` or pending (then its actor is woken). Stops after
    ``slice_s`` seconds (the clock is read every ``clock_every`` members).
    Returns (index of the next member, failures): a member whose handling raised is reported
    as (actor, exception) and the slice goes on.
    """
    if start < 0:
        raise ValueError("start must be >= 0")
    i, n = start, len(members)
    deadline = time.perf_counter() + slice_s
    failures: list[tuple[Any, Exception]] | None = None
    while i < n:
        if i >= len(members):  # a callee shortened the list: what is left is done
            break
        actor = members[i]
        i += 1
        try:
            if actor.fanned is not change:
                actor.fanned = change
                if route(actor.sessions, key_id, mask, shared, fds, sessions):
                    actor.wake()
        except Exception as exc:  # one member's failure never stops the others' pushes
            if failures is None:
                failures = []
            failures.append((actor, exc))
        if not i % clock_every and time.perf_counter() > deadline:
            break
    return i, failures


def settle(table: Any, rows: Iterable[int] | None = None, upto: int | None = None) -> int:
    """Bring a view's active rows up to the conversation-wide max (``table.shared``, a
    ``SharedMax``: max, time ms and position by key id). A fan-out round does not touch
    members' rows, so whoever reads rows settles them first.

    For each row in ``rows`` (row indices; all rows when None) that is not frozen and whose
    key's shared max is greater than the row's (and, with ``upto``, recorded at a position
    <= ``upto``: replaying an older change must not take a newer max): the row takes the
    shared max and time, and the shared position when it is later. Returns how many rows
    changed; 0 when ``table.shared`` is None. Raises IndexError for a row out of range and
    ValueError when columns differ in length.
    """
    shared = table.shared
    if shared is None:
        return 0
    keys, mx, tm, ps, fz = table.keys, table.max_seq, table.time_ms, table.pos, table.frozen
    smx, stm, sps = shared.max_seq, shared.time_ms, shared.pos
    n, m = len(keys), len(smx)
    for col in (mx, tm, ps, fz):
        if len(col) != n:
            raise ValueError(f"table columns differ in length ({n} != {len(col)})")
    for col in (stm, sps):
        if len(col) != m:
            raise ValueError(f"table columns differ in length ({m} != {len(col)})")
    changed = 0
    for r in range(n) if rows is None else rows:
        if not 0 <= r < n:
            raise IndexError("row index out of range")
        k = keys[r]
        if k < m and not fz[r] and smx[k] > mx[r] and (upto is None or sps[k] <= upto):
            mx[r] = smx[k]
            tm[r] = stm[k]
            if sps[k] > ps[r]:
                ps[r] = sps[k]
            changed += 1
    return changed
