"""The delta kernel: compiled ``_delta`` and pure-Python ``_delta_py`` against each other and
against the official protobuf runtime (the contract is the wire format, not our own decoder)."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from google.protobuf.message import DecodeError as PbDecodeError
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from seqactor import _delta as C  # the compiled kernel must be importable
from seqactor import _delta_py as P
from seqactor._proto import seqactor_pb2 as pb
from seqactor.server._view import FIELD_MAX, FIELD_MEMBERSHIP, FIELD_MIN, FIELD_READ, ViewTable

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
IMPLS = [C, P]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MORE = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ strategies

u64 = st.one_of(
    st.sampled_from([0, 1, 127, 128, 16383, 16384, (1 << 63) - 1, 1 << 63, U64]),
    st.integers(0, U64),
)
i64 = st.one_of(
    st.sampled_from([0, 1, -1, 127, 128, -(1 << 63), (1 << 63) - 1]),
    st.integers(-(1 << 63), (1 << 63) - 1),
)
# ids: ASCII, 2/3/4-byte UTF-8 (no surrogates: they cannot be encoded), and long ones
ids = st.one_of(
    st.text(min_size=0, max_size=20),
    st.text(alphabet="aé€😀𝄞", min_size=1, max_size=40),
    st.sampled_from(["x" * 128, "é" * 64, "😀" * 32, "", "conv:1"]),
)
u32 = st.one_of(st.sampled_from([0, 1, 2, 127, 128, U32]), st.integers(0, U32))
Row = tuple[str, int, int, int, int, int, bool]  # name, max, read, min, time, pos, frozen
rows_st = st.lists(
    st.tuples(ids, u64, u64, u64, i64, st.integers(0, 1000) | u64, st.booleans()),
    max_size=40,
    unique_by=lambda r: r[0],
)
removed_st = st.lists(ids, max_size=4)
token_st = st.binary(max_size=40)


class Built:
    """One table with key ids interned in both implementations' key tables (same order)."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows
        self.keys = {C: C.KeyTable(), P: P.KeyTable()}
        self.table = ViewTable()
        for name, mx, rd, mn, tm, ps, *frozen in rows:
            kid = self.keys[C].intern(name)
            assert self.keys[P].intern(name) == kid
            self.table.upsert(kid, mx, rd, mn, tm, ps, bool(frozen and frozen[0]))


def both(fn: Callable[[Any, Any], bytes], b: Built) -> bytes:
    """Runs ``fn(impl, keys)`` on both implementations and checks the bytes are identical."""
    out_c = fn(C, b.keys[C])
    out_p = fn(P, b.keys[P])
    assert type(out_c) is bytes and type(out_p) is bytes
    assert out_c == out_p
    return out_c


def expected(
    entries: Sequence[tuple[Any, ...]], token: bytes = b"", full: bool = False,
    removed: list[str] | tuple[str, ...] = (),
) -> pb.SequenceUpdate:
    """Entries ``(name, max, read, min, time[, membership])``."""
    msg = pb.SequenceUpdate(sync_token=token, full=full, removed=list(removed))
    for name, mx, rd, mn, tm, *mb in entries:
        cs = msg.conversations[name]
        cs.Clear()  # a repeated row: the last one wins, as the parser merges maps
        cs.max_sequence, cs.read_sequence, cs.min_sequence = mx, rd, mn
        cs.max_sequence_time_ms = tm
        cs.membership = mb[0] if mb else 0
    return msg


def snap_entry(r: Row) -> tuple[Any, ...]:
    """What a snapshot writes for a row: membership 2 when frozen, else nothing (= member)."""
    return (*r[:5], 2 if r[6] else 0)


def stated_entry(r: Row) -> tuple[Any, ...]:
    """What a delta (or rows without masks) writes: membership 1 or 2, always."""
    return (*r[:5], 2 if r[6] else 1)


def parse(data: bytes) -> pb.SequenceUpdate:
    msg = pb.SequenceUpdate()
    msg.ParseFromString(data)
    return msg


def as_tuple(msg: pb.SequenceUpdate) -> tuple[Any, ...]:
    conv = {
        k: (v.max_sequence, v.read_sequence, v.min_sequence, v.max_sequence_time_ms,
            v.membership)
        for k, v in msg.conversations.items()
    }
    return conv, msg.sync_token, msg.full, list(msg.removed)


def check_roundtrip(data: bytes, want: pb.SequenceUpdate) -> None:
    got = parse(data)
    assert got == want
    for impl in IMPLS:
        assert impl.decode_update(data) == as_tuple(want)


# ------------------------------------------------------------------ encoding


@FAST
@given(rows_st, token_st, st.booleans(), removed_st)
def test_snapshot(rows: list[Row], token: bytes, full: bool, removed: list[str]) -> None:
    b = Built(rows)
    entries = [snap_entry(r) for r in rows]
    data = both(lambda m, k: m.encode_snapshot(k, b.table, token, full, removed), b)
    check_roundtrip(data, expected(entries, token, full, removed))
    data = both(lambda m, k: m.encode_snapshot(k, b.table), b)  # defaults: full, no token
    check_roundtrip(data, expected(entries, full=True))
    data = both(
        lambda m, k: m.encode_snapshot(k, b.table, sync_token=token, full=False, removed=removed),
        b,
    )
    check_roundtrip(data, expected(entries, token, False, removed))


@FAST
@given(rows_st, st.data(), token_st, removed_st)
def test_delta(rows: list[Row], data: st.DataObject, token: bytes, removed: list[str]) -> None:
    b = Built(rows)
    candidates = [r[5] for r in rows] + [0, -1, U64, U64 + 1, -(1 << 70)]
    since = data.draw(st.sampled_from(candidates) | st.integers(-5, 1005), label="since")
    entries = [stated_entry(r) for r in rows if r[5] > since]
    out = both(lambda m, k: m.encode_delta(k, b.table, since, token, removed), b)
    check_roundtrip(out, expected(entries, token, False, removed))
    out = both(lambda m, k: m.encode_delta(k, b.table, since=since), b)
    check_roundtrip(out, expected(entries))


@FAST
@given(rows_st.filter(bool), st.data(), token_st, st.booleans(), removed_st)
def test_rows(
    rows: list[Row], data: st.DataObject, token: bytes, full: bool, removed: list[str]
) -> None:
    b = Built(rows)
    n = len(rows)
    picked = data.draw(st.lists(st.integers(-n, n - 1), max_size=60), label="rows")
    masks = data.draw(st.binary(min_size=len(picked), max_size=len(picked) + 3), label="masks")
    plain = [stated_entry(rows[i]) for i in picked]
    out = both(lambda m, k: m.encode_rows(k, b.table, picked), b)
    check_roundtrip(out, expected(plain))
    out = both(lambda m, k: m.encode_rows(k, b.table, picked, None, token, full, removed), b)
    check_roundtrip(out, expected(plain, token, full, removed))
    masked = []
    for j, i in enumerate(picked):
        name, mx, rd, mn, tm, _, frozen = rows[i]
        mk = masks[j]
        masked.append((
            name,
            mx if mk & FIELD_MAX else 0,
            rd if mk & FIELD_READ else 0,
            mn if mk & FIELD_MIN else 0,
            tm if mk & FIELD_MAX else 0,
            (2 if frozen else 1) if mk & FIELD_MEMBERSHIP else 0,
        ))
    out = both(lambda m, k: m.encode_rows(k, b.table, picked, masks=masks), b)
    check_roundtrip(out, expected(masked))
    out = both(  # rows as a tuple, masks as a bytearray
        lambda m, k: m.encode_rows(
            k, b.table, tuple(picked), bytearray(masks), sync_token=token, full=full,
            removed=tuple(removed),
        ),
        b,
    )
    check_roundtrip(out, expected(masked, token, full, removed))


@MORE
@given(ids, u64, u64, u64, i64, token_st)
def test_single(name: str, mx: int, rd: int, mn: int, tm: int, token: bytes) -> None:
    b = Built([("other", 1, 1, 1, 1, 1), (name, 0, 0, 0, 0, 0)] if name != "other" else [])
    kid = b.keys[C].intern(name)
    out = both(lambda m, k: m.encode_single(k, kid, mx, rd, mn, tm), b)
    check_roundtrip(out, expected([(name, mx, rd, mn, tm)]))
    out = both(lambda m, k: m.encode_single(k, kid, mx, rd, mn, tm, sync_token=token), b)
    check_roundtrip(out, expected([(name, mx, rd, mn, tm)], token))


def test_single_masks_to_64_bits() -> None:
    b = Built([("a", 0, 0, 0, 0, 0)])
    out = both(lambda m, k: m.encode_single(k, 0, 1 << 64, -1, (1 << 64) + 5, -2), b)
    check_roundtrip(out, expected([("a", 0, U64, 5, -2)]))


@MORE
@given(u64, st.binary(max_size=300))
def test_frame_update_bytes(request_id: int, update: bytes) -> None:
    """Any body bytes are framed verbatim (they need not parse)."""
    out = C.frame_update(request_id, update)
    assert out == P.frame_update(request_id, update)
    assert split_all(out) == (request_id, 3, update)


@MORE
@given(u64, st.deferred(lambda: updates))
def test_frame_update(request_id: int, msg_in: pb.SequenceUpdate) -> None:
    update = msg_in.SerializeToString()
    out = C.frame_update(request_id, update)
    assert out == P.frame_update(request_id, update)
    assert out == P.frame_update(request_id=request_id, update=bytearray(update))
    assert out == C.frame_update(request_id=request_id, update=memoryview(update))
    msg = pb.ServerMessage()
    msg.ParseFromString(out)
    assert msg.request_id == request_id
    assert msg.WhichOneof("body") == "update" and msg.update == msg_in
    assert split_all(out) == (request_id, 3, update)


def test_frame_real_update() -> None:
    b = Built([("a", 5, 4, 1, -7, 3), ("b", 9, 0, 0, 0, 8)])
    upd = both(lambda m, k: m.encode_snapshot(k, b.table, b"tok"), b)
    msg = pb.ServerMessage()
    msg.ParseFromString(C.frame_update(42, upd))
    assert msg == pb.ServerMessage(request_id=42, update=parse(upd))


def test_empty_table() -> None:
    b = Built([])
    assert both(lambda m, k: m.encode_snapshot(k, b.table), b) == b"\x18\x01"
    assert both(lambda m, k: m.encode_snapshot(k, b.table, full=False), b) == b""
    assert both(lambda m, k: m.encode_delta(k, b.table, 0), b) == b""
    assert both(lambda m, k: m.encode_rows(k, b.table, []), b) == b""


def test_100k_entries() -> None:
    n = 100_000
    rows: list[Row] = [
        (f"conversation-{i:06d}", i * 977 + 1, i * 13, i % 7, 1_700_000_000_000 + i, i)
        for i in range(n)
    ]
    b = Built(rows)
    data = both(lambda m, k: m.encode_snapshot(k, b.table, b"token", True), b)
    msg = parse(data)
    assert len(msg.conversations) == n
    assert msg.conversations["conversation-054321"].max_sequence == 54321 * 977 + 1
    assert C.decode_update(data) == P.decode_update(data)
    delta = both(lambda m, k: m.encode_delta(k, b.table, n - 1000), b)
    assert len(parse(delta).conversations) == 999


def test_key_table() -> None:
    for impl in IMPLS:
        kt = impl.KeyTable()
        assert len(kt) == 0
        assert kt.intern("a") == 0 and kt.intern("😀") == 1 and kt.intern("a") == 0
        assert kt.lookup("😀") == 1 and kt.lookup("zz") == -1
        assert kt.key(1) == "😀" and len(kt) == 2
        with pytest.raises(UnicodeEncodeError):
            kt.intern("\ud800")
        assert issubclass(impl.DecodeError, ValueError)


@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "python"])
def test_bad_arguments_raise_alike(impl: Any) -> None:
    kt = impl.KeyTable()
    t = ViewTable()
    t.upsert(kt.intern("a"), 1, 2, 3, 4, 5)
    t.upsert(5, 1, 2, 3, 4, 5)  # key id not interned
    with pytest.raises(IndexError):
        impl.encode_snapshot(kt, t)
    with pytest.raises(IndexError):
        impl.encode_rows(kt, t, [1])
    with pytest.raises(IndexError):
        impl.encode_rows(kt, t, [2])
    with pytest.raises(IndexError):
        impl.encode_rows(kt, t, [0, 0], masks=b"\x01")
    with pytest.raises(IndexError):
        impl.encode_single(kt, 3, 1, 1, 1, 1)
    t.remove(5)
    t.pos.append(9)  # columns of different lengths
    with pytest.raises(ValueError):
        impl.encode_delta(kt, t, 0)
    t.pos.pop()
    t.max_seq.append(1)
    with pytest.raises(ValueError):
        impl.encode_snapshot(kt, t)


# ------------------------------------------------------------------ decoding

conv_values = st.tuples(u64, u64, u64, i64, u32)
updates = st.builds(
    lambda conv, token, full, removed: pb.SequenceUpdate(
        conversations={
            k: pb.ConversationSequence(
                max_sequence=v[0], read_sequence=v[1], min_sequence=v[2],
                max_sequence_time_ms=v[3], membership=v[4],
            )
            for k, v in conv.items()
        },
        sync_token=token, full=full, removed=removed,
    ),
    st.dictionaries(ids, conv_values, max_size=12),
    token_st,
    st.booleans(),
    removed_st,
)


def _varint(v: int) -> bytes:
    return P._varint(v)


@st.composite
def unknown_fields(draw: st.DrawFn, min_field: int = 5) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.integers(min_field, (1 << 29) - 1))
        wire = draw(st.sampled_from([0, 1, 2, 5]))
        out += _varint(field << 3 | wire)
        if wire == 0:
            out += _varint(draw(u64))
        elif wire == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        elif wire == 2:
            payload = draw(st.binary(max_size=20))
            out += _varint(len(payload)) + payload
        else:
            out += draw(st.binary(min_size=4, max_size=4))
    return out


def decode_all(data: bytes) -> Any:
    """Decodes with both kernels: both raise DecodeError, or both return the same."""
    results = []
    for impl in IMPLS:
        try:
            results.append(impl.decode_update(data))
        except impl.DecodeError:
            results.append(Rejected)
    assert results[0] == results[1]
    return results[0]


class Rejected(Exception):  # marker: the kernel raised its DecodeError, protobuf DecodeError
    pass


def pb_result(data: bytes) -> Any:
    try:
        return as_tuple(parse(data))
    except PbDecodeError:
        return Rejected


@MORE
@given(updates, unknown_fields())
def test_decode_matches_protobuf(msg: pb.SequenceUpdate, extra: bytes) -> None:
    data = msg.SerializeToString()
    assert decode_all(data) == as_tuple(msg)
    assert decode_all(extra + data + extra) == as_tuple(msg)
    assert C.decode_update(bytearray(data)) == as_tuple(msg)
    assert P.decode_update(memoryview(data)) == as_tuple(msg)


@MORE
@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), ids), st.lists(st.tuples(st.integers(1, 5), u64), max_size=5),
            unknown_fields(min_field=3), unknown_fields(min_field=6),
        ),
        max_size=5,
    ),
    st.booleans(),
)
def test_decode_odd_entries(entries: list[Any], repeat_value: bool) -> None:
    """Hand-built map entries: missing key, fields in any order and repeated, unknown fields in
    the entry and in the value, the value twice (protobuf merges it), a membership (uint32)
    wider than 32 bits (protobuf keeps the low 32) — all as protobuf parses."""
    data = b""
    for key, fields, entry_unknown, value_unknown in entries:
        value = b"".join(_varint(f << 3) + _varint(v) for f, v in fields) + value_unknown
        body = b""
        if key is not None:
            raw = key.encode()
            body += b"\x0a" + _varint(len(raw)) + raw
        body += entry_unknown + b"\x12" + _varint(len(value)) + value
        if repeat_value and fields:
            half = value[: len(_varint(fields[0][0] << 3) + _varint(fields[0][1]))]
            body += b"\x12" + _varint(len(half)) + half
        data += b"\x0a" + _varint(len(body)) + body
    assert decode_all(data) == pb_result(data)


@FAST
@given(updates.filter(lambda m: m.ByteSize() > 0), unknown_fields())
def test_decode_truncated(msg: pb.SequenceUpdate, extra: bytes) -> None:
    data = msg.SerializeToString() + extra
    for cut in range(len(data)):
        prefix = data[:cut]
        want = pb_result(prefix)
        assert decode_all(prefix) == want, (prefix.hex(), want)


def test_decode_truncated_fixed() -> None:
    msg = pb.SequenceUpdate(
        conversations={
            "a😀": pb.ConversationSequence(
                max_sequence=U64, read_sequence=300, min_sequence=1, max_sequence_time_ms=-1
            ),
            "b": pb.ConversationSequence(max_sequence=7),
        },
        sync_token=b"t" * 130, full=True, removed=["x", "é"],
    )
    data = msg.SerializeToString()
    errors = 0
    for cut in range(len(data)):
        want = pb_result(data[:cut])
        errors += want is Rejected
        assert decode_all(data[:cut]) == want
    assert errors > len(data) // 2


@MORE
@given(st.binary(max_size=60))
def test_decode_random_bytes(data: bytes) -> None:
    got = decode_all(data)  # never anything but DecodeError
    if got is not Rejected:
        assert got == pb_result(data)


@MORE
@given(updates, st.data())
def test_decode_corrupted(msg: pb.SequenceUpdate, data: st.DataObject) -> None:
    raw = bytearray(msg.SerializeToString())
    assume(raw)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        i = data.draw(st.integers(0, len(raw) - 1), label="at")
        op = data.draw(st.sampled_from(["set", "insert", "delete"]), label="op")
        byte = data.draw(st.integers(0, 255), label="byte")
        if op == "set":
            raw[i] = byte
        elif op == "insert":
            raw.insert(i, byte)
        elif len(raw) > 1:
            del raw[i]
    got = decode_all(bytes(raw))
    if got is not Rejected:
        assert got == pb_result(bytes(raw))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x18" + b"\xff" * 9 + b"\x02", id="varint-over-64-bits"),
        pytest.param(b"\x18" + b"\x80" * 10 + b"\x00", id="varint-11-bytes"),
        pytest.param(b"\x18", id="truncated-varint"),
        pytest.param(b"\x12\x05ab", id="length-past-end"),
        pytest.param(b"\x0a\x04\x0a\x05abc", id="key-length-past-entry"),
        pytest.param(b"\x1a\x00", id="wrong-wire-full"),
        pytest.param(b"\x08\x01", id="wrong-wire-conversations"),
        pytest.param(b"\x0a\x02\x08\x01", id="wrong-wire-key"),
        pytest.param(b"\x0a\x04\x12\x02\x0a\x00", id="wrong-wire-value-field"),
        pytest.param(b"\x0a\x04\x0a\x02\xc3\x28", id="bad-utf8-key"),
        pytest.param(b"\x22\x03\xed\xa0\x80", id="surrogate-removed"),
        pytest.param(b"\x00\x00", id="field-0"),
        pytest.param(b"\x0a\x02\x00\x00", id="field-0-in-entry"),
        pytest.param(b"\x2b\x2c", id="group"),
        pytest.param(b"\x2f", id="wire-type-7"),
        pytest.param(b"\x29\x00", id="truncated-fixed64"),
        pytest.param(b"\x2d\x00\x00", id="truncated-fixed32"),
        pytest.param(b"\x80\x80\x80\x80\x10\x00", id="tag-over-32-bits"),
    ],
)
@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "python"])
def test_decode_rejects(impl: Any, data: bytes) -> None:
    with pytest.raises(impl.DecodeError):
        impl.decode_update(data)


def test_decode_duplicates_like_protobuf() -> None:
    # same key twice: the last entry wins whole; the value twice in one entry: merged
    data = (
        b"\x0a\x07\x0a\x01a\x12\x02\x10\x01\x0a\x07\x0a\x01a\x12\x02\x08\x02"
        b"\x0a\x0b\x0a\x01b\x12\x02\x08\x05\x12\x02\x10\x06"
        b"\x18\x01\x18\x00\x12\x01x\x12\x01y"
    )
    assert decode_all(data) == pb_result(data) == ({"a": (2, 0, 0, 0, 0), "b": (5, 6, 0, 0, 0)},
                                                   b"y", False, [])


def test_decode_membership_like_protobuf() -> None:
    """``membership`` is a uint32: a wider varint keeps its low 32 bits, as protobuf parses."""
    for v, want in ((2, 2), (U32, U32), (U32 + 1 + 5, 5), (U64, U32)):
        value = b"\x28" + _varint(v)
        entry = b"\x0a\x01c\x12" + _varint(len(value)) + value
        data = b"\x0a" + _varint(len(entry)) + entry
        assert decode_all(data) == pb_result(data) == ({"c": (0, 0, 0, 0, want)}, b"", False, [])


# ------------------------------------------------------------------ ConversationSeqs

SEQS_FIELDS = ("max_sequence", "read_sequence", "min_sequence", "max_sequence_time_ms",
               "membership")


def one_entry(mx: int, rd: int, mn: int, tm: int, mb: int = 0) -> bytes:
    msg = pb.SequenceUpdate()
    cs = msg.conversations["c"]
    cs.max_sequence, cs.read_sequence, cs.min_sequence = mx, rd, mn
    cs.max_sequence_time_ms = tm
    cs.membership = mb
    return msg.SerializeToString()


@MORE
@given(u64, u64, u64, i64, u32)
def test_seqs_is_its_tuple(mx: int, rd: int, mn: int, tm: int, mb: int) -> None:
    t = (mx, rd, mn, tm, mb)
    records = []
    for impl in IMPLS:
        decoded = impl.decode_update(one_entry(*t))[0]["c"]
        built = impl.ConversationSeqs(*t)
        for rec in (decoded, built):
            assert type(rec) is impl.ConversationSeqs
            assert (rec.max_sequence, rec.read_sequence, rec.min_sequence,
                    rec.max_sequence_time_ms, rec.membership) == t
            a, b, c, d, e = rec
            assert (a, b, c, d, e) == t
            assert [rec[i] for i in range(5)] == list(t)
            assert [rec[i] for i in range(-5, 0)] == list(t)
            assert rec.astuple() == t and type(rec.astuple()) is tuple
            assert rec == t and t == rec and not rec != t and not t != rec
            assert hash(rec) == hash(t)
            records.append(rec)
    for x in records:  # compiled and pure-Python records, decoded and built: all equal
        for y in records:
            assert x == y and not x != y and hash(x) == hash(y)


@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "python"])
def test_seqs_behaves_as_a_tuple(impl: Any) -> None:
    seqs = impl.ConversationSeqs
    rec = seqs(7, 5, 2, -3, 2)
    assert len(rec) == 5
    assert rec[0] == 7 and rec[-1] == 2 and rec[-2] == -3 and rec[-5] == 7
    assert rec[1:3] == (5, 2) and rec[::-1] == (2, -3, 2, 5, 7) and rec[:] == (7, 5, 2, -3, 2)
    for bad in (5, -6, 1 << 70):
        with pytest.raises(IndexError):
            rec[bad]
    for wrong in ("max_sequence", 1.0, None):
        with pytest.raises(TypeError):
            rec[wrong]
    assert list(rec) == [7, 5, 2, -3, 2] and list(reversed(rec)) == [2, -3, 2, 5, 7]
    assert 5 in rec and 6 not in rec
    assert rec.count(2) == 2 and rec.index(2) == 2 and rec.index(2, 3) == 4
    with pytest.raises(ValueError):
        rec.index(6)
    # equality and order with tuples both ways, and with records
    assert rec == (7, 5, 2, -3, 2) and (7, 5, 2, -3, 2) == rec
    assert rec != (7, 5, 2, -3, 1) and (7, 5, 2, -3, 1) != rec
    assert rec != (7, 5, 2, -3) and (7, 5, 2, -3, 2, 0) != rec
    assert rec != [7, 5, 2, -3, 2] and rec != "x" and rec != None  # noqa: E711
    assert rec == seqs(7, 5, 2, -3, 2) and rec != seqs(7, 5, 2, -3)
    assert seqs(7, 5, 2, -3) == (7, 5, 2, -3, 0)  # membership defaults to 0 (not sent)
    assert rec < (7, 5, 3, 0, 0) and (7, 5, 3, 0, 0) > rec and rec > seqs(7, 5, 2, -4, 9)
    assert sorted([seqs(2, 0, 0, 0), (1, 9, 9, 9, 9), seqs(1, 0, 0, 0)]) == [
        (1, 0, 0, 0, 0), (1, 9, 9, 9, 9), (2, 0, 0, 0, 0)]
    with pytest.raises(TypeError):
        _ = rec < [7, 5, 2, -3, 2]
    assert hash(rec) == hash((7, 5, 2, -3, 2))
    assert {rec: 1}[(7, 5, 2, -3, 2)] == 1 and {(7, 5, 2, -3, 2): 1}[rec] == 1
    assert repr(rec) == (
        "ConversationSeqs(max_sequence=7, read_sequence=5, min_sequence=2, "
        "max_sequence_time_ms=-3, membership=2)")
    assert seqs.__match_args__ == SEQS_FIELDS
    match rec:
        case seqs(mx, rd, mn, tm, mb):
            assert (mx, rd, mn, tm, mb) == (7, 5, 2, -3, 2)
        case _:
            pytest.fail("no positional match")
    assert isinstance(rec, Sequence)


@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "python"])
def test_seqs_is_immutable_and_checked(impl: Any) -> None:
    seqs = impl.ConversationSeqs
    rec = seqs(1, 2, 3, 4, 1)
    for name in SEQS_FIELDS:
        with pytest.raises(AttributeError):
            setattr(rec, name, 9)
    with pytest.raises(AttributeError):
        rec.other = 1
    with pytest.raises(TypeError):
        rec[0] = 9
    assert rec == (1, 2, 3, 4, 1)
    top = seqs(U64, U64, U64, -(1 << 63), U32)
    assert top == (U64, U64, U64, -(1 << 63), U32) and top.max_sequence == U64
    assert seqs(0, 0, 0, (1 << 63) - 1).max_sequence_time_ms == (1 << 63) - 1
    assert type(seqs(True, 0, 0, 0)[0]) is int and type(seqs(0, 0, 0, 0, True)[4]) is int
    for args in ((-1, 0, 0, 0), (0, U64 + 1, 0, 0), (0, 0, -1, 0), (0, 0, 0, 1 << 63),
                 (0, 0, 0, -(1 << 63) - 1), (0, 0, 0, 0, -1), (0, 0, 0, 0, U32 + 1)):
        with pytest.raises(OverflowError):
            seqs(*args)
    for args in ((1.0, 0, 0, 0), (0, "1", 0, 0), (0, 0, None, 0), (0, 0, 0, 2.5),
                 (0, 0, 0, 0, 1.0)):
        with pytest.raises(TypeError):
            seqs(*args)
    with pytest.raises(TypeError):
        seqs(1, 2, 3)
    with pytest.raises(TypeError):
        seqs(1, 2, 3, 4, 5, 6)


@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "python"])
def test_seqs_extremes_round_trip(impl: Any) -> None:
    t = (U64, U64 - 1, 1 << 63, -(1 << 63), U32)
    convs, token, full, removed = impl.decode_update(one_entry(*t))
    rec = convs["c"]
    assert rec == t and rec.astuple() == t and tuple(rec) == t
    assert (token, full, removed) == (b"", False, [])
    assert pickle.loads(pickle.dumps(rec)) == t
    assert type(pickle.loads(pickle.dumps(rec))) is impl.ConversationSeqs
    assert copy.copy(rec) == t and copy.deepcopy(rec) == t
    neg = impl.decode_update(one_entry(0, 0, 0, -1))[0]["c"]
    assert neg.max_sequence_time_ms == -1 and neg == (0, 0, 0, -1, 0)


def test_kernel_exports_the_record_type() -> None:
    from seqactor import _kernel

    assert "ConversationSeqs" in _kernel.__all__
    impl = C if _kernel.COMPILED else P
    assert _kernel.ConversationSeqs is impl.ConversationSeqs
    assert type(_kernel.decode_update(one_entry(1, 2, 3, 4))[0]["c"]) is _kernel.ConversationSeqs


# ------------------------------------------------------------------ ServerMessage

BODY_FIELDS = {"welcome": 2, "update": 3, "ack": 4, "error": 5, "pong": 6, "allocated": 7,
               "go_away": 8, "read_counts": 9, "readers": 10}
bodies = st.one_of(
    st.builds(lambda u, s, h, r: pb.ServerMessage(welcome=pb.Welcome(
        user_id=u, session_id=s, heartbeat_interval_ms=h, role=r)), ids, ids,
        st.integers(0, 2**32 - 1), ids),
    updates.map(lambda u: pb.ServerMessage(update=u)),
    u64.map(lambda v: pb.ServerMessage(ack=pb.Ack(read_sequence=v))),
    st.builds(lambda c, m: pb.ServerMessage(error=pb.Error(code=c, message=m)),
              st.integers(0, 8), ids),
    st.builds(lambda a, b: pb.ServerMessage(pong=pb.Pong(client_time_ms=a, server_time_ms=b)),
              i64, i64),
    st.builds(lambda a, b, t: pb.ServerMessage(allocated=pb.Allocated(
        first_sequence=a, last_sequence=b, time_ms=t)), u64, u64, i64),
    st.builds(lambda r, ms: pb.ServerMessage(go_away=pb.GoAway(reason=r, reconnect_after_ms=ms)),
              ids, st.integers(0, 2**32 - 1)),
    st.builds(lambda c, f, n, cs: pb.ServerMessage(read_counts=pb.ReadCounts(
        conversation_id=c, from_sequence=f, member_count=n, counts=cs)), ids, u64,
        st.integers(0, 2**32 - 1), st.lists(st.integers(0, 2**32 - 1), max_size=20)),
    st.builds(lambda us, nx: pb.ServerMessage(readers=pb.Readers(user_ids=us, next_after_user_id=nx)),
              st.lists(ids, max_size=5), ids),
    st.just(pb.ServerMessage()),
)


def split_all(data: bytes) -> tuple[int, int, bytes]:
    got = C.split_server_message(data)
    assert got == P.split_server_message(data)
    return got


def check_split(data: bytes) -> None:
    msg = pb.ServerMessage()
    msg.ParseFromString(data)
    rid, field, body = split_all(data)
    assert rid == msg.request_id
    kind = msg.WhichOneof("body")
    if kind is None:
        assert (field, body) == (0, b"")
        return
    assert field == BODY_FIELDS[kind]
    sub = getattr(msg, kind)
    parsed = type(sub)()
    parsed.ParseFromString(body)
    assert parsed == sub
    if kind == "update":
        for impl in IMPLS:
            assert impl.decode_update(body) == as_tuple(sub)


@MORE
@given(bodies, u64)
def test_split_server_message(msg: pb.ServerMessage, rid: int) -> None:
    msg.request_id = rid
    data = msg.SerializeToString()
    check_split(data)
    kind = msg.WhichOneof("body")
    if kind is not None:  # the body fields' own bytes come back exactly
        assert split_all(data)[2] == getattr(msg, kind).SerializeToString()


@FAST
@given(st.lists(bodies, min_size=2, max_size=4), unknown_fields(min_field=11))
def test_split_concatenated(msgs: list[pb.ServerMessage], extra: bytes) -> None:
    """Concatenated messages: a repeated body kind merges, another kind replaces it."""
    check_split(extra.join(m.SerializeToString() for m in msgs) + extra)


@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "python"])
def test_split_rejects(impl: Any) -> None:
    for bad in (b"\x08", b"\x0a\x00", b"\x1a\x05ab", b"\x1b", b"\x00", b"\x18\x01"):
        with pytest.raises(impl.DecodeError):
            impl.split_server_message(bad)


# ------------------------------------------------------------------ kernel selection


@pytest.mark.parametrize(("value", "compiled"), [("1", False), (None, True)])
def test_kernel_env_switch(value: str | None, compiled: bool) -> None:
    env = dict(os.environ)
    env.pop("SEQACTOR_NO_EXTENSIONS", None)
    if value is not None:
        env["SEQACTOR_NO_EXTENSIONS"] = value
    code = (
        "import seqactor._kernel as k, sys; "
        "sys.stdout.write(repr((k.COMPILED, k.encode_snapshot.__module__)))"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], env=env, capture_output=True, text=True,
        check=True,
    ).stdout
    module = "seqactor._delta" if compiled else "seqactor._delta_py"
    assert out == repr((compiled, module))
