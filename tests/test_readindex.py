"""The read-count kernel: compiled ``_readindex`` and pure-Python ``_readindex_py`` against each
other, against a brute-force count, and (``encode``) against the official protobuf runtime."""

from __future__ import annotations

from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqactor import _readindex as C  # the compiled kernel must be importable
from seqactor import _readindex_py as P
from seqactor._proto import seqactor_pb2 as pb

IMPLS = [C, P]
U64 = (1 << 64) - 1
MORE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# An op: ("max", delta) | ("read", member index, read) | ("add", read) | ("remove", member index)
ops_st = st.lists(
    st.one_of(
        st.tuples(st.just("max"), st.sampled_from([1, 2, 7, 1000, 5000, 40000, 70000])),
        st.tuples(st.just("read"), st.integers(0, 400), st.integers(0, 1 << 20)),
        st.tuples(st.just("add"), st.integers(0, 1 << 20)),
        st.tuples(st.just("remove"), st.integers(0, 400)),
    ),
    max_size=60,
)


def _run(impl, start_max: int, initial: list[int], ops) -> tuple[object, dict[int, int], int]:
    """Apply ``ops`` to a counter and to a plain dict; return both (and the max)."""
    rc = impl.ReadCounter(start_max)
    mx = start_max
    initial = [min(r, mx) for r in initial]
    first = rc.extend(initial)
    model = {first + i: r for i, r in enumerate(initial)}
    mx = max([mx, *initial])
    for op in ops:
        if op[0] == "max":
            mx += op[1]
            rc.set_max(mx)
        elif op[0] == "read" and model:
            slot = sorted(model)[op[1] % len(model)]
            r = op[2] % (mx + 1)
            assert rc.raise_read(slot, r) == model[slot]
            model[slot] = max(model[slot], r)
        elif op[0] == "add":
            r = op[1] % (mx + 1)
            slot = rc.add(r)
            assert slot not in model
            model[slot] = r
        elif op[0] == "remove" and model:
            slot = sorted(model)[op[1] % len(model)]
            assert rc.remove(slot) == model.pop(slot)
    return rc, model, mx


@given(
    start_max=st.sampled_from([0, 3, 4095, 4096, 10_000, 100_000]),
    initial=st.lists(st.integers(0, 200_000), max_size=80),
    ops=ops_st,
    queries=st.lists(st.tuples(st.integers(0, 300_000), st.integers(0, 1200)), max_size=6),
)
@MORE
def test_counts_match_brute_force_in_both_kernels(start_max, initial, ops, queries):
    results = []
    for impl in IMPLS:
        rc, model, mx = _run(impl, start_max, initial, ops)
        assert rc.size == len(model)
        assert rc.max_sequence == mx
        for slot, r in model.items():
            assert rc.read_of(slot) == r
        got = []
        for f, n in [*queries, (max(0, mx - 999), 1000), (0, 3), (mx, 2)]:
            f = f % (mx + 2)
            want = [sum(1 for r in model.values() if r >= f + i) for i in range(n)]
            counts = rc.counts(f, n)
            assert counts == want, (impl.__name__, f, n)
            assert [rc.count_at_least(f + i) for i in range(min(n, 5))] == want[:5]
            got.append(counts)
        results.append(got)
    assert results[0] == results[1]


@given(
    rid=st.sampled_from([0, 1, 127, 128, U64]) | st.integers(0, U64),
    cid=st.text(min_size=0, max_size=20) | st.sampled_from(["é" * 64, "😀" * 32]),
    reads=st.lists(st.integers(0, 5000), max_size=60),
    f=st.integers(0, 6000),
    n=st.integers(0, 1000),
)
@MORE
def test_encode_is_what_protobuf_decodes_in_both_kernels(rid, cid, reads, f, n):
    outs = []
    for impl in IMPLS:
        rc = impl.ReadCounter(5000)
        rc.extend(reads)
        data = rc.encode(rid, cid, f, n)
        msg = pb.ServerMessage.FromString(data)
        want = pb.ServerMessage(
            request_id=rid,
            read_counts=pb.ReadCounts(
                conversation_id=cid, from_sequence=f, member_count=len(reads),
                counts=[sum(1 for r in reads if r >= f + i) for i in range(n)],
            ),
        )
        assert msg == want
        assert data == want.SerializeToString()  # same bytes as the runtime writes
        outs.append(data)
    assert outs[0] == outs[1]


@given(
    reads=st.lists(st.integers(0, 50), max_size=60),
    seq=st.integers(0, 52),
    unread=st.booleans(),
    start=st.integers(0, 70),
    limit=st.integers(0, 10),
)
@MORE
def test_readers_scan_matches_brute_force(reads, seq, unread, start, limit):
    for impl in IMPLS:
        rc = impl.ReadCounter(50)
        rc.extend(reads)
        order = array("I", reversed(range(len(reads))))  # any order of the slots
        found, more = rc.readers(order, start, seq, unread, limit)
        match = [p for p in range(start, len(order)) if (reads[order[p]] >= seq) != unread]
        assert found == match[:limit]
        assert more == (len(match) > limit)


@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "fallback"])
def test_bad_arguments_raise_clear_errors(impl):
    rc = impl.ReadCounter(10)
    slot = rc.add(3)
    with pytest.raises(OverflowError):
        rc.add(-1)
    with pytest.raises(OverflowError):
        rc.add(U64)  # the free-slot marker
    with pytest.raises(IndexError):
        rc.raise_read(slot + 1, 4)
    rc.remove(slot)
    with pytest.raises(IndexError):
        rc.remove(slot)  # a free slot
    with pytest.raises(ValueError):
        rc.counts(1, -1)
    with pytest.raises(OverflowError):
        rc.counts(U64 - 1, 3)
    with pytest.raises(OverflowError):
        rc.counts(U64 + 1, 0)
    assert rc.counts(U64, 0) == []  # an empty range may start anywhere in uint64
    empty = pb.ServerMessage.FromString(rc.encode(1, "g", U64, 0)).read_counts
    assert empty.from_sequence == U64 and list(empty.counts) == []
    with pytest.raises(TypeError):
        rc.add("3")
    assert rc.size == 0 and rc.counts(0, 2) == [0, 0]


@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "fallback"])
def test_memory_per_member_is_bounded(impl):
    """~8 bytes of reads plus at most 4 bytes of tree per member (large groups)."""
    rc = impl.ReadCounter(10_000)
    rc.extend([i % 10_001 for i in range(20_000)])
    assert rc.nbytes() / 20_000 <= 12.1
    for m in range(10_000, 200_000, 997):  # the window moves: still bounded, still exact
        rc.set_max(m)
    assert rc.nbytes() / 20_000 <= 12.1
    assert rc.counts(0, 1) == [20_000] and rc.counts(10_000, 2) == [1, 0]
