"""The Redis store's pure parts, each on its own: the event codec, the reorder buffer, the
key layout and hash slots (against a real cluster's ``CLUSTER KEYSLOT``), the URL options and
the packaged Lua scripts."""

from __future__ import annotations

import random

import pytest

from seqactor.store._base import (
    Allocated,
    Change,
    InvalidArgument,
    MembersAdded,
    MembersRemoved,
    MinChanged,
    ReadMarked,
)
from seqactor.store._redis_events import (
    EPOCH_NOTE,
    RS_BYTE,
    SEP,
    USEP,
    ReorderBuffer,
    last_position,
    parse_change,
    payload_position,
    records,
    skip_payload,
    split_replies,
)
from seqactor.store._redis_keys import (
    CLUSTER_SLOTS,
    KeyLayout,
    hash_slot,
    parse_url,
    slot_tags,
)
from seqactor.store._redis_lua import LUA_DIR, OP
from tests._redis import cli, shared_cluster

U64_MAX = 2**64 - 1

# ------------------------------------------------------------------ event codec


def _payload(*parts: object) -> bytes:
    return SEP.join(str(p) for p in parts).encode()


def test_parse_every_kind_of_change() -> None:
    assert parse_change(_payload("A", 7, "c", U64_MAX - 1, U64_MAX, 1700, "u", U64_MAX)) == (
        "A", 7, Allocated("c", U64_MAX - 1, U64_MAX, 1700, 7, "u", U64_MAX))
    assert parse_change(_payload("A", 8, "c", 1, 1, 5, "", 0))[2] == Allocated(
        "c", 1, 1, 5, 8, None, 0)
    assert parse_change(_payload("R", 9, "c", "u", 2**53 + 1)) == (
        "R", 9, ReadMarked("c", "u", 2**53 + 1, 9, True))
    assert parse_change(_payload("M", 10, "c", 4)) == ("M", 10, MinChanged("c", 4, 10, True))
    joined = parse_change(_payload("J", 11, "c", 5, 1, 99, USEP.join(["u", "é"])))
    assert joined == ("J", 11, MembersAdded("c", ("u", "é"), 5, 1, 99, 11, True))
    assert parse_change(_payload("J", 12, "c", 0, 0, 0, ""))[2] == MembersAdded(
        "c", (), 0, 0, 0, 12, True)
    assert parse_change(_payload("L", 13, "c", 1, "u")) == (
        "L", 13, MembersRemoved("c", ("u",), True, 13, True))
    assert parse_change(skip_payload(14)) == ("S", 14, None)
    assert parse_change(EPOCH_NOTE) == ("E", 0, None)


@pytest.mark.parametrize("bad", [
    b"", b"A", b"A\x1fx", b"A\x1f1\x1fc", b"Q\x1f1", b"R\x1f1\x1fc\x1fu\x1fnot-a-number",
    b"\xff\xfe", b"S\x1f1\x1fextra",
])
def test_malformed_payloads_raise_value_error(bad: bytes) -> None:
    with pytest.raises(ValueError):
        parse_change(bad)


def test_a_batch_travels_as_records_in_one_string() -> None:
    a = _payload("A", 7, "c", 1, 1, 5, "", 0)
    r = _payload("R", 9, "c", "u", 3)
    message = RS_BYTE.join([a, skip_payload(8), r])
    assert records(message) == [a, skip_payload(8), r]
    assert last_position(message) == 9 and last_position(a) == 7
    assert last_position(EPOCH_NOTE) is None
    reply = RS_BYTE.join([a, _payload("NOOP", 5, 2), b"NEED", _payload("NEED", "u", "v"),
                          _payload("RETRY", "STALE"), _payload("ERR", "EPOCH"), r])
    assert split_replies(reply) == [
        [b"OK", a], [b"NOOP", b"5", b"2"], [b"NEED"], [b"NEED", b"u", b"v"],
        [b"RETRY", b"STALE"], [b"ERR", b"EPOCH"], [b"OK", r]]


def test_payload_position_reads_only_the_position() -> None:
    assert payload_position(_payload("A", 123, "c", 1, 1, 5, "", 0)) == 123
    assert payload_position(skip_payload(5)) == 5
    assert payload_position(EPOCH_NOTE) is None
    assert payload_position(b"A\x1fzz\x1f") is None


# ------------------------------------------------------------------ reorder buffer


def _change(pos: int) -> Change:
    return MinChanged("c", pos, pos, True)


def test_reorder_buffer_hands_out_in_order_once() -> None:
    buf = ReorderBuffer()
    assert buf.add(2, _change(2)) and buf.add(3, None)  # 3 is a skip
    assert list(buf.ready(now=1.0)) == [] and buf.position == 0
    assert buf.gap_since == 1.0 and buf.missing() == (1, 1)
    assert not buf.add(2, _change(2))  # duplicate (the other source)
    assert buf.add(1, _change(1))
    seen = []
    for ch in buf.ready(now=2.0):
        seen.append((ch.position, buf.position))  # position advances with each change
    assert seen == [(1, 1), (2, 2)]
    assert buf.position == 3 and buf.gap_since is None and len(buf) == 0
    assert not buf.add(3, _change(3)) and not buf.add(1, _change(1))


def test_reorder_buffer_jump_closes_holes() -> None:
    buf = ReorderBuffer(10)
    buf.add(12, _change(12))
    buf.add(15, _change(15))
    list(buf.ready(now=0.0))
    assert buf.missing() == (11, 11)
    buf.jump_to(11)  # a reload covers position 11
    assert [c.position for c in buf.ready(now=0.5)] == [12]
    assert buf.missing() == (13, 14) and buf.gap_since == 0.5
    buf.jump_to(20)
    assert len(buf) == 0 and buf.missing() is None and buf.position == 20
    buf.jump_to(3)  # never goes back
    assert buf.position == 20


def test_reorder_buffer_random_arrival_orders() -> None:
    rng = random.Random(7)
    for _ in range(50):
        n = rng.randint(1, 40)
        arrivals = [p for p in range(1, n + 1) for _ in range(rng.randint(1, 2))]
        rng.shuffle(arrivals)
        buf = ReorderBuffer()
        out: list[int] = []
        for p in arrivals:
            buf.add(p, None if p % 5 == 0 else _change(p))
            out += [c.position for c in buf.ready(now=0.0)]
        assert out == [p for p in range(1, n + 1) if p % 5]
        assert buf.position == n and buf.gap_since is None


# ------------------------------------------------------------------ keys and slots


def test_hash_slot_matches_cluster_keyslot() -> None:
    """Our CRC16 slots equal Redis' own for plain keys, hash tags, empty and odd tags."""
    port = shared_cluster().nodes[0].port
    keys = ["", "foo", "123456789", "{user1000}.following", "foo{}{bar}", "foo{{bar}}zap",
            "foo{bar}{zap}", "{}", "}{", "a{b", "é{ü}", "sa{c}:m:c", "x" * 300]
    for key in keys:
        expected = int(cli(port, "CLUSTER", "KEYSLOT", key).strip())
        assert hash_slot(key.encode()) == expected, key
    assert hash_slot(b"123456789") == 0x31C3 % CLUSTER_SLOTS  # CRC16/XMODEM check value


def test_slot_tags_cover_every_slot() -> None:
    tags = slot_tags()
    assert len(tags) == CLUSTER_SLOTS
    assert [hash_slot(t.encode()) for t in tags] == list(range(CLUSTER_SLOTS))


def test_keys_of_one_step_share_a_slot() -> None:
    keys = KeyLayout("p", cluster=True)
    for cid in ["c", "a{b}c", "}{", "{", "é", "x" * 128]:
        assert len({hash_slot(k.encode()) for k in keys.base_keys(cid)}) == 1, cid
    for uid in ["u", "{u}", "}"]:
        vk = keys.view_key(uid)
        group = [vk, *keys.user_keys(uid), keys.slot_epoch_key(vk)]
        assert len({hash_slot(k.encode()) for k in group}) == 1
    standalone = KeyLayout("p", cluster=False)
    assert standalone.base_keys("c")[:2] == ["p{meta}:epoch", "p{meta}:pos"]


def test_url_options() -> None:
    cfg = parse_url("redis://h:1/2?prefix=app&wait_replicas=2&wait_timeout_ms=250")
    assert (cfg.wait_replicas, cfg.wait_timeout_ms, cfg.prefix, cfg.db) == (2, 250, "app", 2)
    assert parse_url("redis://h:1").wait_replicas == 0
    for bad in ["redis://h:1?wait_replicas=-1", "redis://h:1?wait_replicas=1.5",
                "redis://h:1?wait_replicas=x", "redis://h:1?wait_timeout_ms=0",
                "redis://h:1?op_deadline_ms=zz"]:
        with pytest.raises(InvalidArgument):
            parse_url(bad)


# ------------------------------------------------------------------ Lua files


def test_lua_scripts_are_package_files() -> None:
    names = sorted(p.name for p in LUA_DIR.iterdir() if p.name.endswith(".lua"))
    assert names == ["common.lua", "floor.lua", "op.lua", "op_main.lua", "posinfo.lua",
                     "row.lua", "sequence.lua", "slot_epochs.lua", "user.lua", "xbatch.lua"]
    assert "local function uadd" in OP and "if op == 'alloc' then" in OP
