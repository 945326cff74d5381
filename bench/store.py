"""Store benchmark: durable group commit vs commit-each, MarkRead, load_view of 10k rows.

Usage (from the repo root)::

    .venv/bin/python bench/store.py [--quick]

Prints a table and writes ``bench/results/store.json`` (a flat JSON object).

* ``alloc group commit``: 64 Trio tasks allocate (count 1) on random conversations out of
  1 000, on a SQLiteStore in a temporary directory with ``synchronous=FULL`` (each commit is
  fsync'd); group commit batches whatever arrives while a commit is in progress.
* ``alloc commit each`` (baseline, same run): the same store and load with ``max_batch=1``:
  one transaction and one fsync per allocation.
* ``mark read``: 64 tasks, each its own user, mark read one seq further every time (each is a
  change), group commit.
* Group commit, commit-each and MarkRead run alternately for a few rounds; the best round of
  each is reported (all rounds are in the JSON): on a shared machine fsync latency varies.
* ``load_view 10k``: median time of ``load_view`` for a user in 10 000 conversations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from seqactor.store.sqlite import SQLiteStore

RESULTS = Path(__file__).resolve().parent / "results" / "store.json"
TASKS = 64
WIDE_TASKS = 256  # context: more concurrent allocators, bigger batches
CONVERSATIONS = 1_000
VIEW_ROWS = 10_000

GOAL_SPEEDUP = 20.0
GOAL_ALLOC_PER_S = 50_000.0
GOAL_LOAD_VIEW_10K_MS = 10.0


async def run_tasks(n_tasks: int, fn: Any) -> None:
    async with trio.open_nursery() as nursery:
        for i in range(n_tasks):
            nursery.start_soon(fn, i)


async def bench_alloc(
    path: Path, total: int, max_batch: int, tasks: int = TASKS
) -> dict[str, float]:
    store = SQLiteStore(path, max_batch=max_batch)
    await store.open()
    per_task = total // tasks
    convs = [f"conv-{i}" for i in range(CONVERSATIONS)]

    plan = [[random.Random(i * 7919 + k).choice(convs) for k in range(per_task)]
            for i in range(tasks)]

    async def worker(i: int) -> None:
        allocate = store.allocate
        for cid in plan[i]:
            await allocate(cid, 1)

    await run_tasks(tasks, worker)  # warm-up (creates the conversations)
    b0, o0 = store.batches_committed, store.ops_committed
    t0 = time.perf_counter()
    await run_tasks(tasks, worker)
    elapsed = time.perf_counter() - t0
    ops = store.ops_committed - o0
    batches = store.batches_committed - b0
    await store.aclose()
    return {"per_s": ops / elapsed, "ops": ops, "seconds": elapsed, "avg_batch": ops / batches}


async def bench_markread(path: Path, total: int) -> dict[str, float]:
    store = SQLiteStore(path)
    await store.open()
    per_task = total // TASKS
    for i in range(TASKS):
        await store.add_members(f"room-{i % 16}", [f"user-{i}"])
    for r in range(16):
        await store.allocate(f"room-{r}", 10_000)
        await store.allocate(f"room-{r}", 10_000)

    async def worker(i: int) -> None:
        cid, uid = f"room-{i % 16}", f"user-{i}"
        mark_read = store.mark_read
        for seq in range(1, per_task + 1):
            await mark_read(cid, uid, seq)

    t0 = time.perf_counter()
    await run_tasks(TASKS, worker)
    elapsed = time.perf_counter() - t0
    await store.aclose()
    return {"per_s": TASKS * per_task / elapsed, "seconds": elapsed}


async def bench_load_view(path: Path, repeat: int) -> dict[str, float]:
    store = SQLiteStore(path)
    await store.open()

    async def joiner(i: int) -> None:
        for k in range(i, VIEW_ROWS, TASKS):
            cid = f"group-{k}"
            await store.add_members(cid, ["big", f"other-{k % 97}"])
            if k % 3 == 0:
                await store.allocate(cid, 1 + k % 7, sender_user_id="big")
            if k % 10 == 0:
                await store.remove_members(cid, ["big"], keep_history=True)

    await run_tasks(TASKS, joiner)
    view = await store.load_view("big")
    assert len(view.conversation_ids) == VIEW_ROWS
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await store.load_view("big")
        times.append(time.perf_counter() - t0)
    await store.aclose()
    # reopen: load everything back into memory
    t0 = time.perf_counter()
    again = SQLiteStore(path)
    await again.open()
    reopen = time.perf_counter() - t0
    await again.aclose()
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3,
            "reopen_ms": reopen * 1e3}


def fsync_us(directory: Path) -> float:
    """Raw fsync latency of the file system under test (context for the numbers)."""
    p = directory / "fsync.bin"
    fd = os.open(p, os.O_RDWR | os.O_CREAT)
    try:
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(fd, b"x" * 100)
            os.fsync(fd)
        return (time.perf_counter() - t0) / n * 1e6
    finally:
        os.close(fd)
        p.unlink()


async def main(quick: bool) -> dict[str, Any]:
    group_total = 64_000 if quick else 256_000
    each_total = 2_048 if quick else 8_192
    rounds = 2 if quick else 3
    with tempfile.TemporaryDirectory(prefix="seqactor-bench-") as tmp:
        d = Path(tmp)
        fs = fsync_us(d)
        # alternate the two, best of ROUNDS each: the machine may be shared (noisy fsync)
        groups, eaches, marks = [], [], []
        for r in range(rounds):
            eaches.append(await bench_alloc(d / f"each{r}.db", each_total, max_batch=1))
            groups.append(await bench_alloc(d / f"group{r}.db", group_total, max_batch=4096))
            marks.append(await bench_markread(d / f"read{r}.db", group_total // 2))
        group = max(groups, key=lambda x: x["per_s"])
        each = max(eaches, key=lambda x: x["per_s"])
        mark = max(marks, key=lambda x: x["per_s"])
        wide = await bench_alloc(d / "wide.db", group_total, max_batch=4096, tasks=WIDE_TASKS)
        view = await bench_load_view(d / "view.db", 30 if quick else 100)
    res: dict[str, Any] = {
        "alloc_per_s_group_commit": group["per_s"],
        "alloc_per_s_commit_each": each["per_s"],
        "group_commit_speedup": group["per_s"] / each["per_s"],
        "group_commit_avg_batch_ops": group["avg_batch"],
        "alloc_per_s_group_commit_256_tasks": wide["per_s"],
        "group_commit_speedup_256_tasks": wide["per_s"] / each["per_s"],
        "alloc_ops_measured": group["ops"],
        "markread_per_s": mark["per_s"],
        "load_view_10k_ms": view["median_ms"],
        "load_view_10k_min_ms": view["min_ms"],
        "reopen_10k_view_store_ms": view["reopen_ms"],
        "fsync_us": fs,
        "tasks": TASKS,
        "rounds": rounds,
        "alloc_per_s_group_commit_rounds": [g["per_s"] for g in groups],
        "alloc_per_s_commit_each_rounds": [e["per_s"] for e in eaches],
        "synchronous": "FULL",
        "journal_mode": "wal",
        "quick": quick,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    res["goal_speedup_20x"] = res["group_commit_speedup"] >= GOAL_SPEEDUP
    res["goal_alloc_50k_per_s"] = res["alloc_per_s_group_commit"] >= GOAL_ALLOC_PER_S
    res["goal_load_view_10k_under_10ms"] = res["load_view_10k_ms"] < GOAL_LOAD_VIEW_10K_MS
    res["goals_met"] = all(v for k, v in res.items() if k.startswith("goal_"))
    return res


def table(res: dict[str, Any]) -> str:
    rows = [
        ("alloc/s, group commit (64 tasks, FULL)", f"{res['alloc_per_s_group_commit']:,.0f}",
         f"avg batch {res['group_commit_avg_batch_ops']:.1f} ops"),
        ("alloc/s, commit each (baseline)", f"{res['alloc_per_s_commit_each']:,.0f}",
         f"fsync {res['fsync_us']:.0f} us"),
        ("group commit speedup", f"{res['group_commit_speedup']:.1f}x",
         f"goal >= {GOAL_SPEEDUP:.0f}x"),
        ("alloc/s, group commit (256 tasks, FULL)",
         f"{res['alloc_per_s_group_commit_256_tasks']:,.0f}",
         f"{res['group_commit_speedup_256_tasks']:.1f}x commit each"),
        ("mark_read/s, group commit (64 tasks)", f"{res['markread_per_s']:,.0f}", ""),
        ("load_view 10k rows (median)", f"{res['load_view_10k_ms']:.2f} ms",
         f"min {res['load_view_10k_min_ms']:.2f} ms"),
        ("reopen (10k-row store) ", f"{res['reopen_10k_view_store_ms']:.0f} ms", ""),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{'store benchmark':<{w0}}  {'value':>{w1}}  note", "-" * (w0 + w1 + 30)]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    lines.append(f"goals met: {res['goals_met']}  (quick={res['quick']}, "
                 f"python {res['python']}, sqlite {res['sqlite']}, {res['cpus']} cpus)")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (< 60 s)")
    args = parser.parse_args()
    result = trio.run(main, args.quick)
    print(table(result))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {RESULTS}", file=sys.stderr)
