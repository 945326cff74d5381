"""Delta kernel benchmark: compiled ``_delta`` vs pure-Python ``_delta_py`` vs protobuf runtime.

Usage (from the repo root)::

    .venv/bin/python bench/kernel.py [--quick]

Prints a table and writes ``bench/results/kernel.json`` (a flat JSON object). Timings are
best-of-N wall times (``time.perf_counter``) of one call.

* snapshot 10k: a full ``SequenceUpdate`` of 10 000 conversations. The protobuf baseline starts
  from plain Python data (dict id -> (max, read, min, time)), builds the message with the
  runtime and serializes it — what the server would do without the kernel.
* delta 1M 1%: ``encode_delta`` over a 1 000 000-row view where 1% of rows changed after ``since``.
* decode 10k: bytes -> dict id -> (max, read, min, time, membership): ``decode_update`` returns
  ``ConversationSeqs`` records, which compare equal to those tuples (checked); the protobuf
  baseline is ``ParseFromString`` plus the conversion of the map into a dict of tuples.
* fan-out member loop: ``fan_slice`` over 10 000 of the server's actors (one idle session
  each, in random order, other objects allocated between them), collecting every descriptor
  (no write), per member; "cold" after writing 64 MB to push them out of the caches, "warm"
  right after another pass. The twin (``_delta_py``) on the same objects is the baseline.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf.internal import api_implementation

from seqactor import _delta as C
from seqactor import _delta_py as P
from seqactor._proto import seqactor_pb2 as pb
from seqactor.server._view import FIELD_MAX, SharedMax, ViewTable
from seqactor.server.actor import SessionState, UserActor
from seqactor.server.metrics import HotCounters

RESULTS = Path(__file__).resolve().parent / "results" / "kernel.json"
TOKEN = b"\x01" * 24

GOAL_SNAPSHOT_VS_PROTOBUF = 10.0
GOAL_SNAPSHOT_VS_FALLBACK = 30.0
GOAL_DELTA_1M_MS = 5.0
GOAL_DECODE_VS_PROTOBUF = 5.0


def best(fn: Callable[[], Any], repeat: int, budget_s: float = 0.2) -> float:
    """Best per-call time in seconds over ``repeat`` rounds of ``number`` calls each."""
    fn()  # warm up
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    number = max(1, min(1000, int(budget_s / repeat / max(once, 1e-9))))
    result = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        result = min(result, (time.perf_counter() - t0) / number)
    return result


def make_rows(n: int, seed: int = 1) -> list[tuple[str, int, int, int, int, int]]:
    rnd = random.Random(seed)
    now = 1_760_000_000_000
    rows = []
    for i in range(n):
        mx = rnd.randrange(1, 5_000_000)
        rows.append((
            f"g:{rnd.getrandbits(40):010x}:{i}",
            mx,
            max(0, mx - rnd.randrange(0, 50)),
            rnd.choice((0, 0, 0, rnd.randrange(1, 1000))),
            now - rnd.randrange(0, 86_400_000 * 30),
            rnd.randrange(0, 1_000_000),
        ))
    return rows


def build(impl: Any, rows: list[tuple[str, int, int, int, int, int]]) -> tuple[Any, ViewTable]:
    keys = impl.KeyTable()
    table = ViewTable()
    table.keys = array("I", [keys.intern(r[0]) for r in rows])
    table.max_seq = array("Q", [r[1] for r in rows])
    table.read_seq = array("Q", [r[2] for r in rows])
    table.min_seq = array("Q", [r[3] for r in rows])
    table.time_ms = array("q", [r[4] for r in rows])
    table.pos = array("Q", [r[5] for r in rows])
    table.frozen = bytearray(len(rows))  # every row a member
    return keys, table


FANOUT_MEMBERS = 10_000
CACHE_FLUSH_BYTES = 64 << 20  # more than this machine's caches (L2 2 x 1 MB, L3 32 MB)


class _Host:
    """What an actor asks of its hub when it is made (counters, the shared max)."""

    def __init__(self) -> None:
        self.counters = HotCounters()
        self.shared = SharedMax()


def _no_close(code: int, reason: str) -> None:
    raise AssertionError(f"closed: {code} {reason}")


def fanout_members(n: int, seed: int = 3) -> list[Any]:
    """``n`` actors with one idle session each (subscribed to all, a descriptor published),
    other objects allocated between them as in a server, in random order (a group's index
    is a set: no allocation order)."""
    host, spread, members = _Host(), [], []
    for i in range(n):
        actor = UserActor(host, f"u{i}")  # type: ignore[arg-type]
        spread.append([bytearray(200) for _ in range(4)])
        session = SessionState(f"s{i}", actor.user_id, "", 4, _no_close, host.counters)
        session.subscribed_all = True
        session.fd = 100 + i
        spread.append([bytearray(200) for _ in range(4)])
        actor.sessions.append(session)
        members.append(actor)
    random.Random(seed).shuffle(members)
    members.append(spread)  # (kept alive with the members; not an actor: the loop stops before)
    return members


def member_loop_ns(impl: Any, members: list[Any], cold: bool, repeat: int) -> float:
    """Median ns per member of one ``fan_slice`` over ``members[:-1]`` (see the docstring)."""
    actors = members[:-1]
    flush = bytearray(CACHE_FLUSH_BYTES)
    times = []
    for _ in range(repeat):
        fds: tuple[array[int], array[int]] = (array("i"), array("i"))
        out: tuple[list[Any], list[Any]] = ([], [])
        change = object()  # a new change each time: no member is skipped
        if cold:
            flush[:] = bytes(len(flush))
        t = time.perf_counter()
        done, failures = impl.fan_slice(
            actors, 0, 7, change, FIELD_MAX, (b"a", b"b"), fds, out, 60.0, 16)
        times.append((time.perf_counter() - t) / len(actors) * 1e9)
        assert done == len(actors) and failures is None and len(fds[0]) == len(actors)
    times.sort()
    return times[len(times) // 2]


def protobuf_snapshot(conv: dict[str, tuple[int, int, int, int]]) -> bytes:
    msg = pb.SequenceUpdate(sync_token=TOKEN, full=True)
    entries = msg.conversations
    for cid, (mx, rd, mn, tm) in conv.items():
        cs = entries[cid]
        cs.max_sequence = mx
        cs.read_sequence = rd
        cs.min_sequence = mn
        cs.max_sequence_time_ms = tm
    return msg.SerializeToString()


def protobuf_snapshot_ctor(conv: dict[str, tuple[int, int, int, int]]) -> bytes:
    seq = pb.ConversationSequence
    return pb.SequenceUpdate(
        conversations={
            cid: seq(max_sequence=mx, read_sequence=rd, min_sequence=mn, max_sequence_time_ms=tm)
            for cid, (mx, rd, mn, tm) in conv.items()
        },
        sync_token=TOKEN,
        full=True,
    ).SerializeToString()


def protobuf_decode(data: bytes) -> dict[str, tuple[int, int, int, int, int]]:
    msg = pb.SequenceUpdate()
    msg.ParseFromString(data)
    return {
        k: (v.max_sequence, v.read_sequence, v.min_sequence, v.max_sequence_time_ms,
            v.membership)
        for k, v in msg.conversations.items()
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (< 60 s)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rep = 5 if args.quick else 25
    budget = 0.15 if args.quick else 0.6

    r: dict[str, Any] = {
        "quick": args.quick,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "protobuf_backend": api_implementation.Type(),
    }

    # ---- snapshot of 10k entries
    rows = make_rows(10_000)
    kc, tc = build(C, rows)
    kp, tp = build(P, rows)
    conv = {row[0]: row[1:5] for row in rows}
    snap = C.encode_snapshot(kc, tc, TOKEN, True)
    assert snap == P.encode_snapshot(kp, tp, TOKEN, True)
    parsed = pb.SequenceUpdate()
    parsed.ParseFromString(snap)
    assert parsed.SerializeToString(deterministic=True) == pb.SequenceUpdate.FromString(
        protobuf_snapshot(conv)).SerializeToString(deterministic=True)
    r["snapshot_10k_bytes"] = len(snap)
    r["snapshot_10k_compiled_us"] = best(
        lambda: C.encode_snapshot(kc, tc, TOKEN, True), rep, budget) * 1e6
    r["snapshot_10k_fallback_us"] = best(
        lambda: P.encode_snapshot(kp, tp, TOKEN, True), max(3, rep // 5), budget) * 1e6
    r["snapshot_10k_protobuf_us"] = min(
        best(lambda: protobuf_snapshot(conv), max(3, rep // 3), budget),
        best(lambda: protobuf_snapshot_ctor(conv), max(3, rep // 3), budget),
    ) * 1e6

    # ---- pushes: a few rows with masks, and one conversation
    push_rows = list(range(0, 10_000, 1000))
    masks = bytes([1, 2, 4, 7, 1, 1, 2, 3, 5, 7])
    r["rows_10_masked_compiled_us"] = best(
        lambda: C.encode_rows(kc, tc, push_rows, masks), rep, budget) * 1e6
    r["rows_10_masked_fallback_us"] = best(
        lambda: P.encode_rows(kp, tp, push_rows, masks), rep, budget) * 1e6
    r["single_compiled_us"] = best(
        lambda: C.encode_single(kc, 17, 123456, 0, 0, 1_760_000_000_000), rep, budget) * 1e6
    r["single_fallback_us"] = best(
        lambda: P.encode_single(kp, 17, 123456, 0, 0, 1_760_000_000_000), rep, budget) * 1e6

    # ---- decode of 10k entries
    want = protobuf_decode(snap)
    assert C.decode_update(snap) == (want, TOKEN, True, [])
    assert P.decode_update(snap) == (want, TOKEN, True, [])
    r["decode_10k_compiled_us"] = best(lambda: C.decode_update(snap), rep, budget) * 1e6
    r["decode_10k_fallback_us"] = best(
        lambda: P.decode_update(snap), max(3, rep // 5), budget) * 1e6
    r["decode_10k_protobuf_us"] = best(lambda: protobuf_decode(snap), rep, budget) * 1e6

    # ---- delta over 1M rows, 1% changed after `since`
    big = make_rows(1_000_000, seed=2)
    since = 990_000  # pos is uniform in [0, 1e6): 1% of rows are after it
    kb, tb = build(C, big)
    changed = sum(1 for row in big if row[5] > since)
    delta = C.encode_delta(kb, tb, since, TOKEN)
    assert len(pb.SequenceUpdate.FromString(delta).conversations) == changed
    r["delta_1m_rows_changed"] = changed
    r["delta_1m_1pct_compiled_ms"] = best(
        lambda: C.encode_delta(kb, tb, since, TOKEN), rep, budget) * 1e3
    if not args.quick:
        kbp, tbp = build(P, big)
        r["delta_1m_1pct_fallback_ms"] = best(
            lambda: P.encode_delta(kbp, tbp, since, TOKEN), 2, 0.1) * 1e3

    # ---- fan-out member loop
    members = fanout_members(FANOUT_MEMBERS)
    loops = max(5, rep // 2)
    r["fanout_member_loop_cold_ns"] = member_loop_ns(C, members, True, loops)
    r["fanout_member_loop_warm_ns"] = member_loop_ns(C, members, False, loops)
    r["fanout_member_loop_fallback_ns"] = member_loop_ns(P, members, False, max(3, loops // 3))

    # ---- ratios and goals
    snap_us = r["snapshot_10k_compiled_us"]
    r["snapshot_speedup_vs_protobuf"] = r["snapshot_10k_protobuf_us"] / snap_us
    r["snapshot_speedup_vs_fallback"] = r["snapshot_10k_fallback_us"] / snap_us
    r["decode_speedup_vs_protobuf"] = r["decode_10k_protobuf_us"] / r["decode_10k_compiled_us"]
    r["goal_snapshot_vs_protobuf"] = r["snapshot_speedup_vs_protobuf"] >= GOAL_SNAPSHOT_VS_PROTOBUF
    r["goal_snapshot_vs_fallback"] = r["snapshot_speedup_vs_fallback"] >= GOAL_SNAPSHOT_VS_FALLBACK
    r["goal_delta_1m_under_5ms"] = r["delta_1m_1pct_compiled_ms"] < GOAL_DELTA_1M_MS
    r["goal_decode_vs_protobuf"] = r["decode_speedup_vs_protobuf"] >= GOAL_DECODE_VS_PROTOBUF
    r["goals_met"] = all(r[k] for k in r if k.startswith("goal_"))

    print_table(r)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def print_table(r: dict[str, Any]) -> None:
    def row(name: str, value: str, note: str = "") -> None:
        print(f"{name:<34} {value:>12}  {note}")

    def ok(goal: str) -> str:
        return "goal met" if r[goal] else "GOAL MISSED"

    mode = "quick" if r["quick"] else "full"
    print(f"delta kernel benchmark ({mode}; Python {r['python']}, "
          f"protobuf {r['protobuf_backend']})")
    print("-" * 72)
    row("snapshot 10k, compiled", f"{r['snapshot_10k_compiled_us']:.1f} us")
    row("snapshot 10k, pure Python", f"{r['snapshot_10k_fallback_us']:.1f} us")
    row("snapshot 10k, protobuf runtime", f"{r['snapshot_10k_protobuf_us']:.1f} us")
    row("  speedup vs protobuf", f"{r['snapshot_speedup_vs_protobuf']:.1f} x",
        f"(>= {GOAL_SNAPSHOT_VS_PROTOBUF:.0f}x: {ok('goal_snapshot_vs_protobuf')})")
    row("  speedup vs pure Python", f"{r['snapshot_speedup_vs_fallback']:.1f} x",
        f"(>= {GOAL_SNAPSHOT_VS_FALLBACK:.0f}x: {ok('goal_snapshot_vs_fallback')})")
    row("delta 1M rows 1%, compiled", f"{r['delta_1m_1pct_compiled_ms']:.2f} ms",
        f"(< {GOAL_DELTA_1M_MS:.0f} ms: {ok('goal_delta_1m_under_5ms')})")
    if "delta_1m_1pct_fallback_ms" in r:
        row("delta 1M rows 1%, pure Python", f"{r['delta_1m_1pct_fallback_ms']:.1f} ms")
    row("decode 10k, compiled", f"{r['decode_10k_compiled_us']:.1f} us")
    row("decode 10k, pure Python", f"{r['decode_10k_fallback_us']:.1f} us")
    row("decode 10k, protobuf runtime", f"{r['decode_10k_protobuf_us']:.1f} us")
    row("  speedup vs protobuf", f"{r['decode_speedup_vs_protobuf']:.1f} x",
        f"(>= {GOAL_DECODE_VS_PROTOBUF:.0f}x: {ok('goal_decode_vs_protobuf')})")
    row("push 10 rows masked, compiled", f"{r['rows_10_masked_compiled_us']:.2f} us")
    row("push 10 rows masked, pure Python", f"{r['rows_10_masked_fallback_us']:.2f} us")
    row("single, compiled", f"{r['single_compiled_us']:.2f} us")
    row("single, pure Python", f"{r['single_fallback_us']:.2f} us")
    row("fan-out loop, compiled, cold", f"{r['fanout_member_loop_cold_ns']:.0f} ns",
        f"per member, {FANOUT_MEMBERS} members, caches flushed")
    row("fan-out loop, compiled, warm", f"{r['fanout_member_loop_warm_ns']:.0f} ns")
    row("fan-out loop, pure Python, warm", f"{r['fanout_member_loop_fallback_ns']:.0f} ns",
        f"{r['fanout_member_loop_fallback_ns'] / r['fanout_member_loop_warm_ns']:.0f}x compiled")
    print("-" * 72)
    print("all goals met" if r["goals_met"] else "SOME GOALS MISSED")


if __name__ == "__main__":
    sys.exit(main())
