"""Reliability benchmark (issue #7): crash under load, reconnect storm, stuck consumers.

Usage (from the repo root)::

    .venv/bin/python bench/reliability.py [--quick] [--only crash,storm,slow,failover] [--out FILE]

The full-size versions of tests/test_reliability.py. The server is a child process (the real
``seqactor serve``, or tests/_load.py's launcher where a setting has no CLI flag); clients
are the SDK (``seqactor.Client``, default backoff: full jitter, base 0.5 s, cap 30 s) in this
process. Every scenario also checks the promise it measures and reports ``ok``.

* **crash** (SQLite): N sessions following their groups and a lobby, 4 backend tasks
  allocating, 6 tasks marking read through user sessions; ``kill -9`` after a number of
  acknowledgements; restart on the same file and port. Reports acknowledgements before the
  crash, restart time, time until every client holds exactly the server's view, and checks
  that no acknowledged allocation or read was lost and the next allocation follows the last
  durable seq (I1, I3).
* **storm**: N sessions (RLIMIT_NOFILE raised to the hard limit on both sides) all cut at once
  (their TCP connections shut down in one sweep) while the backend keeps allocating. Reports
  time until all are back and until all converged, reconnect attempts, server RSS before /
  peak / after.
* **slow**: M served sessions and K stuck ones (small receive buffer, never read) in the same
  groups, the backend allocating at a fixed rate. Staleness of the served sessions
  (AllocateSequences sent -> the client's view holds the seq: the commit, the fan-out and the
  client's own processing; pushes go out before the reply, so measured from ``Allocated`` it
  would be ~0) with the stuck sessions online vs without them
  (a fresh server, same membership), as a p99 ratio (goal < 2x); RSS; and when the stuck
  sessions were closed by the write timeout.
* **failover** (Redis, tests/_failover.py): a master, a replica, Sentinel, two store nodes and
  16 writers allocating; replication stalls, ``kill -9`` the master, Sentinel promotes the
  replica, the nodes follow it. Run twice — without ``?wait_replicas`` and with
  ``?wait_replicas=1`` — and reports the acknowledged seqs handed out twice (goal with the
  option: 0), allocations refused, promotion and resume times.

Prints a table and writes ``bench/results/reliability.json`` (latest run flat at the top level;
the latest quick and full runs under ``runs``).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests._load: the helpers the tests use

from _common import git_head, percentile  # noqa: E402

from seqactor import Backoff, SeqactorError, ServiceClient  # noqa: E402
from seqactor._kernel import COMPILED  # noqa: E402
from seqactor.store.sqlite import SQLiteStore  # noqa: E402
from tests._failover import run_failover  # noqa: E402
from tests._load import (  # noqa: E402
    Crowd,
    Model,
    ServerProcess,
    check_store_invariants,
    free_port,
    launcher_argv,
    metric_async,
    raise_nofile,
    serve_argv,
    setup_members,
    snapshot,
    stuck_session,
    token,
    view_rows,
    wait_converged,
    wait_reconnected,
    write_secret,
)

RESULTS = HERE / "results" / "reliability.json"
GOAL_STALENESS_RATIO = 2.0
CONVERGE_TIMEOUT_S = 600.0

SIZES = {
    "quick": {"crash_users": 100, "crash_acks": 500, "storm_users": 1_000, "served": 200,
              "stuck": 20, "slow_groups": 10, "slow_rate": 50.0, "slow_window_s": 6.0,
              "write_timeout_s": 5.0, "failover_before": 200, "failover_during": 20,
              "failover_after": 200},
    "full": {"crash_users": 200, "crash_acks": 2_000, "storm_users": 5_000, "served": 1_000,
             "stuck": 100, "slow_groups": 20, "slow_rate": 100.0, "slow_window_s": 10.0,
             "write_timeout_s": 10.0, "failover_before": 1_000, "failover_during": 100,
             "failover_after": 1_000},
}


def default_backoff(i: int) -> Backoff:
    return Backoff(rng=random.Random(i))


def nofile_to_hard() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def groups_for(users: list[str], size: int, lobby: bool = True) -> dict[str, list[str]]:
    groups = {f"g{k}": users[k * size:(k + 1) * size] for k in range(len(users) // size)}
    if lobby:
        groups["lobby"] = users
    return groups


# ------------------------------------------------------------------ crash


async def crash(tmp: Path, users_n: int, min_acks: int) -> dict[str, Any]:
    port = free_port()
    db = tmp / "crash.db"
    argv = serve_argv(port, f"sqlite:///{db}", write_secret(tmp / "secret"))
    log = tmp / "crash.log"
    users = [f"u{i}" for i in range(users_n)]
    groups = groups_for(users, 8)
    ranges: dict[str, list[tuple[int, int]]] = {}
    reads: dict[tuple[str, str], int] = {}
    counts = {"allocs": 0, "reads": 0}

    server = await ServerProcess.start(argv, log, preexec_fn=nofile_to_hard)
    async with trio.open_nursery() as nursery:
        async with ServiceClient.connect(server.url, token("backend", "service")) as svc:
            await setup_members(svc, Model(), groups)
        crowd = await nursery.start(Crowd(server.url, users, default_backoff).run, 200)

        async def backend(seed: int) -> None:
            rng = random.Random(seed)
            async with ServiceClient.connect(server.url, token("backend", "service"),
                                             request_timeout_s=5) as svc:
                while True:
                    cid = rng.choice(sorted(groups))
                    sender = rng.choice([*groups[cid], None])
                    a = await svc.allocate(cid, rng.randint(1, 3), sender)
                    ranges.setdefault(cid, []).append((a.first_sequence, a.last_sequence))
                    if sender:
                        key = (cid, sender)
                        reads[key] = max(reads.get(key, 0), a.last_sequence)
                    counts["allocs"] += 1

        async def reader(seed: int) -> None:
            rng = random.Random(seed)
            while True:
                user = rng.choice(users)
                rows = crowd.clients[user].rows()
                cid = rng.choice(sorted(rows))
                read = await crowd.clients[user].mark_read(cid, rows[cid][0])
                reads[(cid, user)] = max(reads.get((cid, user), 0), read)
                counts["reads"] += 1

        async def quiet(coro: Any) -> None:
            try:
                await coro
            except (SeqactorError, trio.TooSlowError):
                pass

        async with trio.open_nursery() as load:
            for i in range(4):
                load.start_soon(quiet, backend(i))
            for i in range(6):
                load.start_soon(quiet, reader(100 + i))
            while counts["allocs"] < min_acks:
                await trio.sleep(0.01)
            server.kill9()
            await server.proc.wait()
            await trio.sleep(0.2)
            load.cancel_scope.cancel()
        t_restart = time.monotonic()
        server = await ServerProcess.start(argv, log, preexec_fn=nofile_to_hard)
        restart_s = time.monotonic() - t_restart

        lost = reused = 0
        for rs in ranges.values():
            rs.sort()
            reused += sum(1 for (_a, l1), (f2, _b) in zip(rs, rs[1:], strict=False) if f2 <= l1)
        for cid in groups:
            view = await snapshot(server.url, groups[cid][0])
            acked = max((last for _f, last in ranges.get(cid, [])), default=0)
            lost += view[cid][0] < acked
            async with ServiceClient.connect(server.url, token("backend", "service")) as svc:
                a = await svc.allocate(cid, 1)
            reused += a.first_sequence != view[cid][0] + 1

        converged_s = None
        deadline = time.monotonic() + CONVERGE_TIMEOUT_S
        while time.monotonic() < deadline:
            want = {u: await snapshot(server.url, u) for u in users}
            if not crowd.diverged(want):
                converged_s = time.monotonic() - t_restart
                break
            await trio.sleep(0.2)
        lost_reads = sum(1 for (cid, u), r in reads.items() if want[u][cid][1] < r)
        nursery.cancel_scope.cancel()
    await server.stop()
    store = SQLiteStore(str(db))
    await store.open()
    try:
        check_store_invariants(store)
        store_equal = all([view_rows(await store.load_view(u)) == want[u] for u in users])
    finally:
        await store.aclose()
    ok = (lost == 0 and reused == 0 and lost_reads == 0 and converged_s is not None
          and store_equal)
    return {"sessions": users_n, "alloc_acks": counts["allocs"], "read_acks": counts["reads"],
            "lost_allocations": lost, "reused_or_gap": reused, "lost_reads": lost_reads,
            "restart_s": restart_s, "converged_after_restart_s": converged_s,
            "store_equals_clients": store_equal, "ok": ok}


# ------------------------------------------------------------------ storm


async def storm(tmp: Path, users_n: int) -> dict[str, Any]:
    raise_nofile()
    server = await ServerProcess.start(
        serve_argv(free_port(), "memory://", write_secret(tmp / "secret")),
        tmp / "storm.log", preexec_fn=nofile_to_hard)
    users = [f"u{i}" for i in range(users_n)]
    groups = groups_for(users, 10)
    cids = sorted(groups)
    model = Model()
    rng = random.Random(1)
    out: dict[str, Any] = {"sessions": users_n}
    try:
        async with trio.open_nursery() as nursery, \
                ServiceClient.connect(server.url, token("backend", "service")) as svc:

            async def allocate(n: int, pause: float) -> None:
                for _ in range(n):
                    cid = rng.choice(cids)
                    a = await svc.allocate(cid, 1)
                    model.allocated(cid, a.last_sequence, a.time_ms)
                    if pause:
                        await trio.sleep(pause)

            await setup_members(svc, model, groups)
            t0 = time.monotonic()
            crowd = await nursery.start(Crowd(server.url, users, default_backoff).run, 200)
            out["connect_all_s"] = time.monotonic() - t0
            await allocate(200, 0)
            await wait_converged(crowd, model.views, CONVERGE_TIMEOUT_S)
            await trio.sleep(2.0)
            before = server.rss_kb()
            attempts0 = sum(c.stats.attempts for c in crowd.clients.values())
            connects0 = {u: c.stats.connects for u, c in crowd.clients.items()}
            peak = before
            back_s = None
            t0 = time.monotonic()
            crowd.drop_all()
            async with trio.open_nursery() as during:
                during.start_soon(allocate, 200, 0.002)

                async def sample() -> None:
                    nonlocal peak, back_s
                    while True:
                        peak = max(peak, server.rss_kb())
                        if back_s is None and all(
                                c.connected and c.stats.connects > connects0[u]
                                for u, c in crowd.clients.items()):
                            back_s = time.monotonic() - t0
                        await trio.sleep(0.05)

                during.start_soon(sample)
                await wait_reconnected(crowd, connects0, CONVERGE_TIMEOUT_S)
                converged = await wait_converged(crowd, model.views, CONVERGE_TIMEOUT_S, 0.1)
                converged_s = time.monotonic() - t0
                during.cancel_scope.cancel()
            await trio.sleep(3.0)
            after = server.rss_kb()
            sample_users = rng.sample(users, 50)
            exact = all([crowd.clients[u].rows() == await snapshot(server.url, u)
                         for u in sample_users])
            out.update({
                "all_back_s": back_s if back_s is not None else converged_s,
                "converged_s": converged_s, "converge_poll_s": converged,
                "reconnect_attempts": sum(c.stats.attempts for c in crowd.clients.values())
                - attempts0,
                "rss_before_mb": before / 1024, "rss_peak_mb": peak / 1024,
                "rss_after_mb": after / 1024, "server_alive": server.alive(),
                "sampled_equal_server_view": exact,
            })
            out["ok"] = bool(server.alive() and exact and after <= before * 1.5 + 40 * 1024)
            nursery.cancel_scope.cancel()
    finally:
        await server.stop()
    return out


# ------------------------------------------------------------------ slow consumers


async def slow_phase(tmp: Path, cfg: dict[str, Any], with_stuck: bool) -> dict[str, Any]:
    raise_nofile()
    mport = free_port()
    server = await ServerProcess.start(
        launcher_argv(free_port(), "memory://", write_timeout_s=cfg["write_timeout_s"],
                      metrics_port=mport, heartbeat_interval_s=120.0),
        tmp / f"slow-{with_stuck}.log", preexec_fn=nofile_to_hard)
    served = [f"s{i}" for i in range(cfg["served"])]
    stuck = [f"x{i}" for i in range(cfg["stuck"])]
    per = cfg["served"] // cfg["slow_groups"]
    groups = {f"{k:02d}-" + "g" * 110: served[k * per:(k + 1) * per] + stuck
              for k in range(cfg["slow_groups"])}
    cids = sorted(groups)
    model = Model()
    out: dict[str, Any] = {}
    try:
        async with trio.open_nursery() as nursery, \
                ServiceClient.connect(server.url, token("backend", "service")) as svc:
            await setup_members(svc, model, groups)
            crowd = await nursery.start(Crowd(server.url, served, default_backoff).run, 200)
            sampled = served[:: max(1, len(served) // 200)]
            seen: dict[tuple[str, str], tuple[list[int], list[float]]] = {}

            async def watch(user: str) -> None:
                async with crowd.clients[user].changes() as stream:
                    async for batch in stream:
                        now = time.monotonic()
                        for ch in batch.changes:
                            if ch.new is not None:
                                maxes, times = seen.setdefault((user, ch.conversation_id),
                                                               ([], []))
                                maxes.append(ch.new.max_sequence)
                                times.append(now)

            for u in sampled:
                nursery.start_soon(watch, u)
            rss0 = server.rss_kb()
            conns = []
            t_stuck = time.monotonic()
            if with_stuck:
                conns = [await stuck_session(nursery, server.port, u) for u in stuck]
            acks: list[tuple[str, int, float]] = []
            interval = 1.0 / cfg["slow_rate"]
            start = trio.current_time()
            peak = rss0
            i = 0
            while trio.current_time() - start < cfg["slow_window_s"]:
                cid = cids[i % len(cids)]
                i += 1
                t_sent = time.monotonic()
                a = await svc.allocate(cid, 1)
                acks.append((cid, a.last_sequence, t_sent))
                model.allocated(cid, a.last_sequence, a.time_ms)
                if i % 50 == 0:
                    peak = max(peak, server.rss_kb())
                await trio.sleep_until(start + i * interval)
            await wait_converged(crowd, model.views, CONVERGE_TIMEOUT_S)
            stale: list[float] = []
            missing = 0
            for user in sampled:
                for cid, last, t_ack in acks:
                    if user not in groups[cid]:
                        continue
                    maxes, times = seen.get((user, cid), ([], []))
                    j = bisect.bisect_left(maxes, last)
                    if j == len(maxes):
                        missing += 1
                        continue
                    stale.append(max(0.0, times[j] - t_ack) * 1000)
            closed_s = None
            if with_stuck:
                with trio.move_on_after(cfg["write_timeout_s"] * 6 + 60):
                    while await metric_async(mport, "seqactor_session_closes_total",
                                             '{code="1001"}') < len(stuck):
                        await svc.allocate(cids[0], 1)
                        await trio.sleep(0.05)
                    closed_s = time.monotonic() - t_stuck
                for c in conns:
                    with trio.move_on_after(1):
                        await c.aclose()
            await trio.sleep(1.0)
            out = {
                "allocations": len(acks), "staleness_points": len(stale),
                "staleness_missing": missing,
                "staleness_p50_ms": percentile(stale, 0.50), "staleness_p99_ms": percentile(stale, 0.99),
                "staleness_max_ms": max(stale, default=float("nan")),
                "rss_before_mb": rss0 / 1024, "rss_peak_mb": peak / 1024,
                "rss_after_mb": server.rss_kb() / 1024,
                "stuck_closed_after_s": closed_s,
                "served_reconnects": sum(c.stats.connects - 1 for c in crowd.clients.values()),
            }
            nursery.cancel_scope.cancel()
    finally:
        await server.stop()
    return out


async def failover(tmp: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for wait in (0, 1):
        r = await run_failover(tmp / f"failover{wait}", wait_replicas=wait,
                               before=cfg["failover_before"], during=cfg["failover_during"],
                               after=cfg["failover_after"])
        out["with_wait" if wait else "without_wait"] = {
            "acknowledged": r.acknowledged, "refused": r.refused,
            "stalled_acknowledged": r.stalled_acknowledged, "reissued": r.reissued,
            "promote_s": r.promote_s, "resume_s": r.resume_s,
        }
    out["ok"] = out["with_wait"]["reissued"] == 0
    return out


async def slow(tmp: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    without = await slow_phase(tmp, cfg, False)
    with_ = await slow_phase(tmp, cfg, True)
    ratio = with_["staleness_p99_ms"] / max(without["staleness_p99_ms"], 1.0)
    return {
        "served": cfg["served"], "stuck": cfg["stuck"], "groups": cfg["slow_groups"],
        "rate_per_s": cfg["slow_rate"], "write_timeout_s": cfg["write_timeout_s"],
        "without_stuck": without, "with_stuck": with_, "p99_ratio": ratio,
        "goal_p99_ratio": GOAL_STALENESS_RATIO,
        "ok": (ratio < GOAL_STALENESS_RATIO and with_["stuck_closed_after_s"] is not None
               and with_["served_reconnects"] == 0 and with_["staleness_missing"] == 0),
    }


# ------------------------------------------------------------------ report


def table(r: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str]] = []

    def f(x: Any, spec: str = ".2f") -> str:
        return "-" if x is None else format(x, spec)

    if "crash" in r:
        c = r["crash"]
        rows += [
            ("crash: sessions / acks before kill -9", f"{c['sessions']} / {c['alloc_acks']} "
             f"allocs, {c['read_acks']} reads", ""),
            ("crash: lost allocs / reused-or-gap / lost reads",
             f"{c['lost_allocations']} / {c['reused_or_gap']} / {c['lost_reads']}", "must be 0"),
            ("crash: restart s / all converged after s",
             f"{f(c['restart_s'])} / {f(c['converged_after_restart_s'])}",
             f"store == clients: {c['store_equals_clients']}; ok: {c['ok']}"),
        ]
    if "storm" in r:
        s = r["storm"]
        rows += [
            ("storm: sessions / initial connect s", f"{s['sessions']} / {f(s['connect_all_s'])}",
             ""),
            ("storm: all back s / all converged s",
             f"{f(s['all_back_s'])} / {f(s['converged_s'])}",
             f"{s['reconnect_attempts']} attempts"),
            ("storm: server RSS MB before / peak / after",
             f"{f(s['rss_before_mb'], '.1f')} / {f(s['rss_peak_mb'], '.1f')} / "
             f"{f(s['rss_after_mb'], '.1f')}", f"ok: {s['ok']}"),
        ]
    if "slow" in r:
        s = r["slow"]
        w, wo = s["with_stuck"], s["without_stuck"]
        rows += [
            ("slow: served / stuck / allocs/s",
             f"{s['served']} / {s['stuck']} / {s['rate_per_s']:g}", f"{s['groups']} groups"),
            ("slow: staleness p50 / p99 ms without stuck",
             f"{f(wo['staleness_p50_ms'], '.1f')} / {f(wo['staleness_p99_ms'], '.1f')}",
             f"{wo['staleness_points']} points"),
            ("slow: staleness p50 / p99 ms with stuck",
             f"{f(w['staleness_p50_ms'], '.1f')} / {f(w['staleness_p99_ms'], '.1f')}",
             f"{w['staleness_points']} points, {w['staleness_missing']} missing"),
            ("slow: p99 with / without", f"{s['p99_ratio']:.2f}x",
             f"< {GOAL_STALENESS_RATIO:g}x: {s['p99_ratio'] < GOAL_STALENESS_RATIO}"),
            ("slow: stuck closed after s (write timeout)",
             f"{f(w['stuck_closed_after_s'], '.1f')}", f"write_timeout_s {s['write_timeout_s']:g}"),
            ("slow: server RSS MB before / peak / after",
             f"{w['rss_before_mb']:.1f} / {w['rss_peak_mb']:.1f} / {w['rss_after_mb']:.1f}",
             f"served reconnects {w['served_reconnects']}; ok: {s['ok']}"),
        ]
    if "failover" in r:
        fo = r["failover"]
        wo, w = fo["without_wait"], fo["with_wait"]
        rows += [
            ("failover: reissued seqs without / with wait_replicas=1",
             f"{wo['reissued']} / {w['reissued']}", "with: must be 0"),
            ("failover: acknowledged after the stall without / with",
             f"{wo['stalled_acknowledged']} / {w['stalled_acknowledged']}",
             f"refused {wo['refused']} / {w['refused']}"),
            ("failover: promoted after s / writes resumed after s (with)",
             f"{f(w['promote_s'])} / {f(w['resume_s'])}",
             f"without: {f(wo['promote_s'])} / {f(wo['resume_s'])}; ok: {fo['ok']}"),
        ]
    w1 = max(len(a) for a, _, _ in rows)
    w2 = max(len(b) for _, b, _ in rows)
    lines = [f"{'reliability (' + r['mode'] + ')':<{w1}}  {'value':>{w2}}  goal / note",
             "-" * (w1 + w2 + 30)]
    lines += [f"{a:<{w1}}  {b:>{w2}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


async def run(mode: str, only: set[str]) -> dict[str, Any]:
    cfg = SIZES[mode]
    tmp = Path(tempfile.mkdtemp(prefix="seqactor-reliability-"))
    result: dict[str, Any] = {"mode": mode, "sizes": cfg}
    try:
        if "crash" in only:
            result["crash"] = await crash(tmp, cfg["crash_users"], cfg["crash_acks"])
        if "storm" in only:
            result["storm"] = await storm(tmp, cfg["storm_users"])
        if "slow" in only:
            result["slow"] = await slow(tmp, cfg)
        if "failover" in only:
            result["failover"] = await failover(tmp, cfg)
    except BaseException:
        print(f"server logs kept in {tmp}", file=sys.stderr)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    result["machine"] = {
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "compiled_kernel": COMPILED,
        "loadavg_at_end": os.getloadavg()[0], "git_head": git_head(),
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    ap.add_argument("--only", default="crash,storm,slow,failover")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    result = trio.run(run, mode, set(args.only.split(",")))
    print(table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = {}
    if out.exists():
        try:
            runs = json.loads(out.read_text()).get("runs", {})
        except (ValueError, OSError):
            runs = {}
    previous = runs.get(mode, {})
    runs[mode] = {**previous, **result}  # --only keeps the other scenarios' last figures
    out.write_text(json.dumps({**runs[mode], "runs": runs}, indent=2) + "\n")
    failed = [k for k in ("crash", "storm", "slow", "failover")
              if k in result and not result[k]["ok"]]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
