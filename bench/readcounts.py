"""Group read counts benchmark: the read index vs an SQL count per seq, and a live watch run.

Usage (from the repo root)::

    .venv/bin/python bench/readcounts.py [--quick]

Prints a table and writes ``bench/results/readcounts.json`` (flat) and the plot
``docs/img/readcounts.png``.

**Index** (groups of 10 000, 100 000 and 1 000 000 members; max seq 20 000; every member's read
uniform over the last 10 000 seqs), in one process:

* ``read_counts_1000_us_*`` — server-side time of one GetReadCounts over the newest 1 000 seqs
  with the compiled kernel: range clamping + counting + encoding the ``ServerMessage`` bytes
  (median of batches of calls; the network and ``store.sync`` are not included).
* ``fallback_read_counts_1000_us_*`` — the same with the pure-Python twin.
* ``sql_read_counts_1000_us_*`` — the baseline the way systems do it today: an SQLite table
  ``(conversation, user, read)`` with an index on ``(conversation, read)``, one
  ``SELECT COUNT(*) ... WHERE conversation = ? AND read >= ?`` per seq. ``--quick`` times 100
  of the 1 000 seqs (evenly spread) and scales to 1 000 (``sql_seqs_timed_*``).
* ``mark_read_index_update_us_*`` — one MarkRead applied to the index as the server does it
  (``ReadIndex.apply``: member lookup + kernel update), mean over a round of distinct random
  members (100 000 in all), best of 5 rounds (``kernel_update_us_*``: the kernel call alone).
* ``index_bytes_per_member_*`` — the counting index's C arrays (reads, Fenwick tree, free
  list) plus the slot order for GetReaders (``array('I')``). ``index_ids_bytes_per_member_*``:
  the Python objects for the member ids on top (dict + sorted list + strings, tracemalloc).

**Live** (a ``seqactor serve`` subprocess on ``memory://``; 100 000 members, 10 watcher
sessions with ``WatchReadCounts`` over ``[1, 1000]``, 100 member sessions (a lean WebSocket
client, ``RawConn`` of bench/fanout.py) each marking read one seq further every time, 10 000
MarkReads/s in total, sent in batches every 5 ms, for 10 s; ``--quick``: 20 000 members,
2 000/s for 3 s): ``watch_pushes_per_s`` (all watchers), staleness of the counts = for the k-th
acknowledged MarkRead, the time from its Ack to the first push whose counts include k
MarkReads (the sum of the counts grows by one per MarkRead), p50/p99 over every watcher;
server CPU = the subprocess's user+system CPU seconds per wall second (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from array import array
from pathlib import Path
from typing import Any

import trio
import trio_websocket as tws

from seqactor import _kernel
from seqactor import _readindex as C
from seqactor import _readindex_py as P
from seqactor._kernel import split_server_message
from seqactor._proto import seqactor_pb2 as pb
from seqactor.auth import issue_token
from seqactor.server.readcounts import ReadIndex
from seqactor.store import MemberReads, ReadMarked

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure  # noqa: E402
from _fanout_client import RawConn  # noqa: E402 - the lean client of bench/fanout.py

ROOT = Path(__file__).resolve().parent.parent
F_ACK = 4  # ServerMessage.ack
RESULTS = ROOT / "bench" / "results" / "readcounts.json"
PLOT = ROOT / "docs" / "img" / "readcounts.png"
SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000}
MAX_SEQ = 20_000
READ_SPREAD_SEQS = 10_000
RANGE_SEQS = 1_000
UPDATES = 100_000
UPDATE_ROUNDS = 5
SQL_QUICK_SEQS = 100

LIVE_MEMBERS, LIVE_RATE, LIVE_SECONDS = 100_000, 10_000, 10.0
QUICK_LIVE_MEMBERS, QUICK_LIVE_RATE, QUICK_LIVE_SECONDS = 20_000, 2_000, 3.0
LIVE_WATCHERS = 10
LIVE_MARKERS = 100  # member sessions sending MarkReads (100/s each: under the 200 ops/s limit)
PACE_TICK_S = 0.005  # the load is sent in batches this often
LIVE_SEQS = 1_000
ADD_BATCH = 4_000  # ids per AddMembers (a frame stays under the 64 KiB limit)
LIVE_SETTLE_S = 1.5  # after the load: the last pushes arrive
INTERVAL_MS = 250  # the server's default read_counts_interval_ms
SECRET = b"bench-secret-0123456789abcdef0123456789"

GOAL_RANGE_1M_US = 1_000.0
GOAL_SQL_RATIO = 100.0
GOAL_UPDATE_US = 2.0
GOAL_BYTES_PER_MEMBER = 16.0
GOAL_STALENESS_P99_MS = INTERVAL_MS + 50.0


# ------------------------------------------------------------------ index


def member_ids(n: int) -> list[str]:
    return [f"user-{i:07d}" for i in range(n)]


def snapshot(n: int, rng: random.Random) -> MemberReads:
    reads = array("Q", (rng.randint(MAX_SEQ - READ_SPREAD_SEQS + 1, MAX_SEQ) for _ in range(n)))
    return MemberReads("bench-group", 1, MAX_SEQ, 0, member_ids(n), reads)


def build(impl: Any, snap: MemberReads) -> ReadIndex:
    saved = _kernel.ReadCounter
    _kernel.ReadCounter = impl.ReadCounter
    try:
        return ReadIndex(snap)
    finally:
        _kernel.ReadCounter = saved


def time_range(idx: ReadIndex, batches: int, per_batch: int) -> float:
    """Median µs of one GetReadCounts' index work (clamp + count + encode) over 1 000 seqs."""
    cid = idx.conversation_id
    samples = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for rid in range(per_batch):
            lo, n = idx.clamp(MAX_SEQ - RANGE_SEQS + 1, MAX_SEQ)
            idx.counter.encode(rid + 1, cid, lo, n)
        samples.append((time.perf_counter() - t0) / per_batch * 1e6)
    return statistics.median(samples)


def time_updates(idx: ReadIndex, snap: MemberReads, rng: random.Random) -> tuple[float, float]:
    """µs of one MarkRead applied to the index (full path; then the kernel call alone): the
    mean over a round of distinct random members, best of ``UPDATE_ROUNDS`` rounds (the
    machine is shared: the best round is the one least disturbed)."""
    n = len(snap.user_ids)
    k = min(UPDATES, n)
    picks = rng.sample(range(n), k)
    per_round = k // (2 * UPDATE_ROUNDS)
    full: list[float] = []
    kernel_only: list[float] = []
    raise_read = idx.counter.raise_read
    for r in range(UPDATE_ROUNDS):
        chunk = picks[2 * r * per_round:(2 * r + 1) * per_round]
        changes = [
            ReadMarked(idx.conversation_id, snap.user_ids[i], MAX_SEQ, 2 + j, True)
            for j, i in enumerate(chunk)
        ]
        t0 = time.perf_counter()
        for ch in changes:
            idx.apply(ch)
        full.append((time.perf_counter() - t0) / len(changes) * 1e6)
        chunk = picks[(2 * r + 1) * per_round:(2 * r + 2) * per_round]
        slots = [idx.slots[snap.user_ids[i]] for i in chunk]
        t0 = time.perf_counter()
        for s in slots:
            raise_read(s, MAX_SEQ)
        kernel_only.append((time.perf_counter() - t0) / len(slots) * 1e6)
    return min(full), min(kernel_only)


def ids_bytes(snap: MemberReads) -> float:
    """Bytes per member of the Python objects a ReadIndex adds for the ids (tracemalloc)."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    idx = build(C, snap)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    n = len(snap.user_ids)
    return (used - idx.nbytes()) / n


def sql_baseline(snap: MemberReads, timed_seqs: int) -> float:
    """µs for 1 000 seqs of ``SELECT COUNT(*) ... WHERE read >= ?`` (scaled from ``timed_seqs``)."""
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "reads.db")
        db.execute("CREATE TABLE member (conversation TEXT, user TEXT, read INTEGER, "
                   "PRIMARY KEY (conversation, user))")
        db.execute("CREATE INDEX member_read ON member (conversation, read)")
        db.executemany(
            "INSERT INTO member VALUES (?, ?, ?)",
            zip([snap.conversation_id] * len(snap.user_ids), snap.user_ids, snap.read_seq,
                strict=True),
        )
        db.commit()
        db.execute("ANALYZE")
        first = MAX_SEQ - RANGE_SEQS + 1
        step = RANGE_SEQS // timed_seqs
        seqs = [first + i * step for i in range(timed_seqs)]
        sql = "SELECT COUNT(*) FROM member WHERE conversation = ? AND read >= ?"
        db.execute(sql, (snap.conversation_id, first)).fetchone()  # warm the cache
        t0 = time.perf_counter()
        for s in seqs:
            db.execute(sql, (snap.conversation_id, s)).fetchone()
        elapsed = time.perf_counter() - t0
        db.close()
    return elapsed / timed_seqs * RANGE_SEQS * 1e6


def bench_index(quick: bool, r: dict[str, Any]) -> None:
    rng = random.Random(7)
    for label, n in SIZES.items():
        print(f"index {label}: building ...", file=sys.stderr, flush=True)
        snap = snapshot(n, rng)
        idx = build(C, snap)
        twin = build(P, snap)
        want = idx.counter.counts(MAX_SEQ - RANGE_SEQS + 1, RANGE_SEQS)
        assert twin.counter.counts(MAX_SEQ - RANGE_SEQS + 1, RANGE_SEQS) == want
        r[f"read_counts_1000_us_{label}"] = round(time_range(idx, 20, 200), 3)
        r[f"fallback_read_counts_1000_us_{label}"] = round(time_range(twin, 5, 2), 1)
        del twin
        r[f"index_bytes_per_member_{label}"] = round(idx.nbytes() / n, 2)
        full, kernel_only = time_updates(idx, snap, rng)
        r[f"mark_read_index_update_us_{label}"] = round(full, 3)
        r[f"kernel_update_us_{label}"] = round(kernel_only, 3)
        del idx
        r[f"index_ids_bytes_per_member_{label}"] = round(ids_bytes(snap), 1)
        timed = SQL_QUICK_SEQS if quick else RANGE_SEQS
        print(f"index {label}: SQL baseline ({timed} seqs) ...", file=sys.stderr, flush=True)
        r[f"sql_read_counts_1000_us_{label}"] = round(sql_baseline(snap, timed), 1)
        r[f"sql_seqs_timed_{label}"] = timed
        r[f"sql_ratio_{label}"] = round(
            r[f"sql_read_counts_1000_us_{label}"] / r[f"read_counts_1000_us_{label}"], 1
        )
        r[f"fallback_ratio_{label}"] = round(
            r[f"fallback_read_counts_1000_us_{label}"] / r[f"read_counts_1000_us_{label}"], 1
        )


# ------------------------------------------------------------------ live


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux ``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def start_server(tmp: Path) -> tuple[trio.Process, int]:
    secret = tmp / "secret"
    secret.write_bytes(SECRET)
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "seqactor.cli", "serve", "--host", "127.0.0.1", "--port", "0",
         "--store", "memory://", "--secret-file", str(secret), "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    buf = b""
    with trio.fail_after(30):
        while (m := re.search(rb"listening on ws://[^:]+:(\d+)/v1", buf)) is None:
            chunk = await proc.stdout.receive_some(4096)
            if not chunk:
                raise RuntimeError("seqactor serve exited")
            buf += chunk
    return proc, int(m.group(1))


def frame(rid: int, **body: Any) -> bytes:
    msg = pb.ClientMessage(request_id=rid)
    kind, value = next(iter(body.items()))
    getattr(msg, kind).CopyFrom(value)
    return msg.SerializeToString()


async def session(
    nursery: trio.Nursery, url: str, user: str, role: str = "user"
) -> tws.WebSocketConnection:
    conn = await tws.connect_websocket_url(nursery, url, message_queue_size=1024)
    tok = issue_token(SECRET, user, role=role, ttl_s=3600)
    await conn.send_message(frame(1, hello=pb.Hello(token=tok)))
    reply = pb.ServerMessage.FromString(await conn.get_message())
    assert reply.WhichOneof("body") == "welcome", reply
    return conn


async def raw_session(port: int, user: str) -> RawConn:
    """A lean WebSocket session (bench/_fanout_client.py's ``RawConn``) for the load."""
    conn = await RawConn.connect(port)
    tok = issue_token(SECRET, user, ttl_s=3600)
    await conn.send(frame(1, hello=pb.Hello(token=tok)))
    (reply,) = await conn.receive()
    assert pb.ServerMessage.FromString(reply).WhichOneof("body") == "welcome"
    return conn


def ws_frame(payload: bytes) -> bytes:
    """A masked client frame (all-zero key: the payload is sent as it is)."""
    n = len(payload)
    assert n < 126
    return bytes((0x82, 0x80 | n)) + b"\0\0\0\0" + payload


async def call(conn: tws.WebSocketConnection, rid: int, **body: Any) -> pb.ServerMessage:
    await conn.send_message(frame(rid, **body))
    while True:
        reply = pb.ServerMessage.FromString(await conn.get_message())
        if reply.request_id == rid:
            assert reply.WhichOneof("body") != "error", reply
            return reply


async def live(members: int, rate: int, seconds: float) -> dict[str, Any]:
    cid = "live-group"
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = await start_server(Path(tmp))
        url = f"ws://127.0.0.1:{port}/v1"
        try:
            async with trio.open_nursery() as nursery:
                svc = await session(nursery, url, "bench-backend", "service")
                ids = [f"w{i}" for i in range(LIVE_WATCHERS)] + [
                    f"m{i:04d}" for i in range(LIVE_MARKERS)]
                ids += [f"x{i:07d}" for i in range(members - len(ids))]
                for i in range(0, len(ids), ADD_BATCH):
                    await call(svc, 2 + i, add_members=pb.AddMembers(
                        conversation_id=cid, user_ids=ids[i:i + ADD_BATCH]))
                await call(svc, 1, allocate_sequences=pb.AllocateSequences(
                    conversation_id=cid, count=LIVE_SEQS))
                watchers = [await session(nursery, url, f"w{i}") for i in range(LIVE_WATCHERS)]
                markers = [await raw_session(port, f"m{i:04d}") for i in range(LIVE_MARKERS)]
                pushes: list[list[tuple[float, int]]] = [[] for _ in watchers]
                acks: list[float] = []
                stop = trio.Event()

                async def watch(i: int, conn: tws.WebSocketConnection) -> None:
                    await conn.send_message(frame(7, watch_read_counts=pb.WatchReadCounts(
                        conversation_id=cid, from_sequence=1)))
                    while True:
                        msg = pb.ServerMessage.FromString(await conn.get_message())
                        if msg.request_id == 0 and msg.WhichOneof("body") == "read_counts":
                            pushes[i].append((time.monotonic(), sum(msg.read_counts.counts)))

                async def acks_in(conn: RawConn) -> None:
                    while True:
                        for data in await conn.receive():
                            if split_server_message(data)[1] == F_ACK:
                                acks.append(time.monotonic())

                async def pace(start: float) -> None:
                    """Every tick: the MarkReads due so far, round-robin over the marker
                    sessions, each session's share in one write (its next read seqs)."""
                    sent = 0
                    nxt = [0] * len(markers)
                    turn = 0
                    while not stop.is_set():
                        due = int((trio.current_time() - start) * rate) - sent
                        batches: dict[int, list[bytes]] = {}
                        for _ in range(max(0, due)):
                            m = turn % len(markers)
                            turn += 1
                            if nxt[m] >= LIVE_SEQS:
                                continue
                            nxt[m] += 1
                            batches.setdefault(m, []).append(ws_frame(frame(
                                nxt[m] + 10, mark_read=pb.MarkRead(
                                    conversation_id=cid, read_sequence=nxt[m]))))
                        sent += max(0, due)
                        for m, frames in batches.items():
                            await markers[m].stream.send_all(b"".join(frames))
                        await trio.sleep(PACE_TICK_S)

                for i, w in enumerate(watchers):
                    nursery.start_soon(watch, i, w)
                await trio.sleep(0.5)  # the first pushes (nothing read yet)
                cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
                start = trio.current_time() + 0.1
                for m in markers:
                    nursery.start_soon(acks_in, m)
                nursery.start_soon(pace, start)
                await trio.sleep_until(start + seconds)
                stop.set()
                marks_done = len(acks)
                await trio.sleep(LIVE_SETTLE_S)
                cpu1, wall1 = cpu_seconds(proc.pid), time.monotonic()
                nursery.cancel_scope.cancel()
        finally:
            proc.terminate()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
    acks.sort()
    staleness: list[float] = []
    for got in pushes:
        j = 0
        for k, t_ack in enumerate(acks, start=1):
            while j < len(got) and got[j][1] < k:
                j += 1
            if j == len(got):
                break
            staleness.append(max(0.0, got[j][0] - t_ack) * 1000.0)
    q = statistics.quantiles(staleness, n=100) if len(staleness) >= 2 else [0.0] * 99
    n_push = sum(len(p) for p in pushes)
    return {
        "live_members": members,
        "live_watchers": LIVE_WATCHERS,
        "live_mark_read_target_per_s": rate,
        "live_mark_read_achieved_per_s": round(marks_done / seconds, 1),
        "live_seconds": seconds,
        "watch_pushes_per_s": round(n_push / (seconds + LIVE_SETTLE_S), 2),
        "watch_pushes_per_s_per_watcher": round(n_push / (seconds + LIVE_SETTLE_S) / LIVE_WATCHERS, 2),
        "watch_staleness_p50_ms": round(q[49], 1),
        "watch_staleness_p99_ms": round(q[98], 1),
        "watch_staleness_samples": len(staleness),
        "server_cpu_per_s": round((cpu1 - cpu0) / (wall1 - wall0), 3),
        "read_counts_interval_ms": INTERVAL_MS,
    }


# ------------------------------------------------------------------ report


def plot(r: dict[str, Any], path: Path) -> None:
    labels = list(SIZES)
    series = [
        ("read index (compiled)", "read_counts_1000_us"),
        ("read index (pure Python)", "fallback_read_counts_1000_us"),
        ("SQLite COUNT(*) per seq", "sql_read_counts_1000_us"),
    ]
    with figure(path, figsize=(7, 4)) as (fig, ax):
        width = 0.26
        for i, (name, key) in enumerate(series):
            xs = [j + (i - 1) * width for j in range(len(labels))]
            ax.bar(xs, [r[f"{key}_{s}"] for s in labels], width, label=name)
        ax.axhline(GOAL_RANGE_1M_US, color="grey", linestyle="--", linewidth=1, label="goal (1 ms)")
        ax.set_yscale("log")
        ax.set_xticks(range(len(labels)), [f"{SIZES[s]:,} members" for s in labels])
        ax.set_ylabel("µs per GetReadCounts of 1 000 seqs (log)")
        ax.set_title("Group read counts: one 1 000-seq range")
        ax.legend(fontsize=8)


def print_table(r: dict[str, Any]) -> None:
    print(f"group read counts benchmark ({r['mode']}; Python {r['python']}, {r['machine']})")
    head = f"{'':34}" + "".join(f"{s:>14}" for s in SIZES)
    print(head)
    rows = [
        ("GetReadCounts 1000 seqs, µs", "read_counts_1000_us"),
        ("  pure-Python twin, µs", "fallback_read_counts_1000_us"),
        ("  SQLite COUNT(*) per seq, µs", "sql_read_counts_1000_us"),
        ("  SQL / index (x)", "sql_ratio"),
        ("  twin / compiled (x)", "fallback_ratio"),
        ("MarkRead index update, µs", "mark_read_index_update_us"),
        ("  kernel call alone, µs", "kernel_update_us"),
        ("index bytes / member", "index_bytes_per_member"),
        ("  + id objects, bytes / member", "index_ids_bytes_per_member"),
    ]
    for name, key in rows:
        print(f"{name:34}" + "".join(f"{r[f'{key}_{s}']:>14,}" for s in SIZES))
    print(
        f"live: {r['live_members']:,} members, {r['live_watchers']} watchers, MarkReads "
        f"{r['live_mark_read_achieved_per_s']:,.0f}/s (target {r['live_mark_read_target_per_s']:,}) "
        f"for {r['live_seconds']} s"
    )
    print(f"  pushes {r['watch_pushes_per_s']}/s ({r['watch_pushes_per_s_per_watcher']}/s per "
          f"watcher), staleness p50 {r['watch_staleness_p50_ms']} ms, p99 "
          f"{r['watch_staleness_p99_ms']} ms (goal <= {GOAL_STALENESS_P99_MS:.0f}), server CPU "
          f"{r['server_cpu_per_s']:.2f} cores")
    goals = [
        ("1M: 1 000 seqs <= 1 ms", r["read_counts_1000_us_1m"] <= GOAL_RANGE_1M_US),
        ("1M: >= 100x the SQL baseline", r["sql_ratio_1m"] >= GOAL_SQL_RATIO),
        ("index update <= 2 µs", max(r[f"mark_read_index_update_us_{s}"] for s in SIZES)
         <= GOAL_UPDATE_US),
        ("<= 16 bytes per member", max(r[f"index_bytes_per_member_{s}"] for s in SIZES)
         <= GOAL_BYTES_PER_MEMBER),
        ("staleness p99 <= interval + 50 ms", r["watch_staleness_p99_ms"] <= GOAL_STALENESS_P99_MS),
    ]
    print("goals: " + ", ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in goals))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller SQL sample and live run (< 90 s)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    started = time.monotonic()
    r: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "compiled_kernel": _kernel.READINDEX_COMPILED,
    }
    bench_index(args.quick, r)
    print("live run ...", file=sys.stderr, flush=True)
    if args.quick:
        r.update(trio.run(live, QUICK_LIVE_MEMBERS, QUICK_LIVE_RATE, QUICK_LIVE_SECONDS))
    else:
        r.update(trio.run(live, LIVE_MEMBERS, LIVE_RATE, LIVE_SECONDS))
    r["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=2) + "\n")
    plot_path = PLOT if args.out == RESULTS else args.out.with_suffix(".png")  # docs: default run
    plot(r, plot_path)
    print_table(r)
    print(f"\nwrote {args.out} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
