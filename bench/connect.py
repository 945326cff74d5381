"""Session opens per second (issue #12): how fast seqactor lets a crowd of clients back in,
against the WebSocket handshake rate of Bun and of Node + ws on this machine.

Usage (from the repo root; ``make bench-peers`` installs Bun and ws under bench/peers)::

    .venv/bin/python bench/connect.py [--quick] [--sessions N] [--profile OUT.svg|OUT.txt]
                                      [--cprofile OUT.pstats]

Client load comes from separate processes (``bench/_connect_client.py``: one epoll loop
each, every frame made before the clock starts), at most ``CONNECT_CONCURRENCY`` opens in
flight; opened connections stay open, so the server holds N at the end of each phase. Each
phase gets a fresh server:

* **seqactor session opens**: a ``seqactor serve`` subprocess (``memory://`` store; the N
  users are members of one group, added first by a service connection). One open is what the
  Python SDK does: TCP connect, the HTTP upgrade, ``Hello`` -> ``Welcome``, then
  ``Subscribe{all}`` and ``GetSequences`` (the snapshot) pipelined -> both replies.
* **seqactor handshakes**: the same server, TCP + upgrade only (the WebSocket layer's share).
* **Bun** (``Bun.serve`` + ``server.upgrade``) and **Node + ws** (``WebSocketServer``):
  TCP + upgrade, the same clients.

Per phase: opens per second = N / (last open done - first connect started, over every
client's ``time.monotonic()``, system-wide on Linux), the server process's CPU per open
(utime + stime from /proc over the phase, / N), and open latency p50/p99 (connect started ->
last reply). Prints a table with the ratios, writes ``bench/results/connect.json`` (flat) and
``docs/img/connect.png``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import trio
from _common import (
    IMG,
    Child,
    call_all,
    cpu_user_system_s,
    figure,
    git_head,
    listening_server,
    peer_argv,
    percentile,
    raise_nofile,
    write_json,
)
from _common import client_processes as _common_client_processes  # noqa: E402
from fanout import finish_profiler, serve_memory, start_backend, start_profiler, user_ranges

from seqactor._kernel import COMPILED
from seqactor.cli._serve import CPROFILE_ENV

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "connect.json"
PLOT = IMG / "connect.png"
CLIENT = HERE / "_connect_client.py"

GOAL_OPENS_PER_S = 5_000.0
FULL_SESSIONS = 10_000  # per phase
QUICK_SESSIONS = 3_000  # --quick: the whole run well under 90 s
CLIENT_PROCESSES = 2
CONNECT_CONCURRENCY = 256  # opens in flight, all client processes together
OPEN_TIMEOUT_S = 300.0
PROFILE_S = 60  # py-spy's longest run (stopped when the phase ends)
PROFILE_RATE_HZ = 1000  # samples per second: one phase lasts seconds
SETTLE_S = 1.0  # after a server starts (and after the group is set up), before the clock


def client_processes(n: int = CLIENT_PROCESSES) -> AbstractAsyncContextManager[list[Child]]:
    """``n`` processes of this benchmark's load client (see ``_common.client_processes``)."""
    return _common_client_processes(CLIENT, n)


async def open_phase(
    clients: list[Child], port: int, pid: int, n: int, mode: str, secret_file: Path | None,
) -> dict[str, Any]:
    """Open ``n`` connections from all clients; rate, server CPU per open, latency."""
    await trio.sleep(SETTLE_S)
    user0, sys0 = cpu_user_system_s(pid)
    answers = await call_all(clients, [
        {"cmd": "open", "mode": mode, "port": port, "users": list(r),
         "concurrency": CONNECT_CONCURRENCY // len(clients),
         "secret_file": str(secret_file) if secret_file else ""}
        for r in user_ranges(n, len(clients))
    ], OPEN_TIMEOUT_S)
    user1, sys1 = cpu_user_system_s(pid)
    cpu0, cpu1 = user0 + sys0, user1 + sys1
    opened = sum(a["opened"] for a in answers)
    failed = sum(a["failed"] for a in answers)
    wall = max(a["t1"] for a in answers) - min(a["t0"] for a in answers)
    latency = [x for a in answers for x in a["latency_ms"]]
    await call_all(clients, [{"cmd": "close"}] * len(clients))
    if failed or opened != n:
        raise RuntimeError(f"{mode}: {opened}/{n} opened, {failed} failed")
    return {
        "per_s": opened / wall, "wall_s": wall, "server_cpu_s": cpu1 - cpu0,
        "server_cpu_us_per_open": (cpu1 - cpu0) / opened * 1e6,
        "server_system_cpu_us_per_open": (sys1 - sys0) / opened * 1e6,
        "latency_p50_ms": percentile(latency, 0.50), "latency_p99_ms": percentile(latency, 0.99),
    }


async def seqactor_phase(
    clients: list[Child], tmp: Path, n: int, mode: str, profile: str | None,
    cprofile: str | None = None,
) -> dict[str, Any]:
    if cprofile:  # the server (a child process) inherits it: cProfile over its whole run
        os.environ[CPROFILE_ENV] = str(Path(cprofile).resolve())
    try:
        return await _seqactor_phase(clients, tmp, n, mode, profile)
    finally:
        os.environ.pop(CPROFILE_ENV, None)


async def _seqactor_phase(
    clients: list[Child], tmp: Path, n: int, mode: str, profile: str | None,
) -> dict[str, Any]:
    async with serve_memory(tmp) as served, trio.open_nursery() as nursery:
        backend = await start_backend(nursery, served.port, served.secret, n)
        spy = (await start_profiler(profile, served.child.pid, PROFILE_S, PROFILE_RATE_HZ)
               if profile else None)
        try:
            return await open_phase(
                clients, served.port, served.child.pid, n, mode, served.secret_file,
            )
        finally:
            if spy is not None:
                spy.send_signal(2)  # SIGINT: py-spy writes what it has
                await finish_profiler(spy)
            await backend.conn.aclose()
            nursery.cancel_scope.cancel()


async def peer_phase(clients: list[Child], name: str, n: int) -> dict[str, Any]:
    async with listening_server(peer_argv(name), name) as (child, port):
        return await open_phase(clients, port, child.pid, n, "plain", None)


async def run(n: int, profile: str | None, cprofile: str | None = None) -> dict[str, Any]:
    peer_argv("bun"), peer_argv("ws")  # fail early when the peers are not installed
    tmp = Path(tempfile.mkdtemp(prefix="seqactor-connect-"))
    phases: dict[str, dict[str, Any]] = {}
    try:
        async with client_processes() as clients:
            steps: list[tuple[str, Any]] = [
                ("seqactor",
                 lambda: seqactor_phase(clients, tmp, n, "seqactor", profile, cprofile)),
                ("seqactor_handshake", lambda: seqactor_phase(clients, tmp, n, "plain", None)),
                ("bun", lambda: peer_phase(clients, "bun", n)),
                ("ws", lambda: peer_phase(clients, "ws", n)),
            ]
            for name, phase in steps:
                print(f"  {name}: {n} connections ...", flush=True)
                phases[name] = await phase()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    s, h, b, w = (phases[k] for k in ("seqactor", "seqactor_handshake", "bun", "ws"))
    return {
        "sessions": n,
        "session_opens_per_s": s["per_s"],
        "server_cpu_us_per_open": s["server_cpu_us_per_open"],
        "bun_handshakes_per_s": b["per_s"],
        "ws_handshakes_per_s": w["per_s"],
        "seqactor_handshakes_per_s": h["per_s"],
        "seqactor_cpu_us_per_handshake": h["server_cpu_us_per_open"],
        "bun_cpu_us_per_handshake": b["server_cpu_us_per_open"],
        "ws_cpu_us_per_handshake": w["server_cpu_us_per_open"],
        "session_open_p50_ms": s["latency_p50_ms"],
        "session_open_p99_ms": s["latency_p99_ms"],
        "opens_vs_bun_handshakes": s["per_s"] / b["per_s"],
        "opens_vs_ws_handshakes": s["per_s"] / w["per_s"],
        "goal_session_opens_per_s": GOAL_OPENS_PER_S,
        "goal_session_opens_met": s["per_s"] >= GOAL_OPENS_PER_S,
        "phases": phases,
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "compiled_kernel": COMPILED, "git_head": git_head(),
                    "client_processes": CLIENT_PROCESSES,
                    "connect_concurrency": CONNECT_CONCURRENCY},
    }


def table(r: dict[str, Any]) -> str:
    p = r["phases"]
    rows = [
        ("seqactor session open (TCP, upgrade, Hello, Welcome, Subscribe, snapshot)",
         p["seqactor"]),
        ("seqactor WebSocket handshake only", p["seqactor_handshake"]),
        ("Bun handshake (Bun.serve, server.upgrade)", p["bun"]),
        ("Node ws handshake (WebSocketServer)", p["ws"]),
    ]
    width = 78
    out = [
        f"{r['sessions']} connections per phase, {r['machine']['client_processes']} client "
        f"processes, {r['machine']['connect_concurrency']} in flight",
        f"{'':<{width}} {'per s':>8} {'cpu us':>7} {'p50 ms':>7} {'p99 ms':>7}",
    ]
    for label, ph in rows:
        out.append(f"{label:<{width}} {ph['per_s']:8,.0f} {ph['server_cpu_us_per_open']:7.0f} "
                   f"{ph['latency_p50_ms']:7.1f} {ph['latency_p99_ms']:7.1f}")
    met = "met" if r["goal_session_opens_met"] else "MISSED"
    out += [
        "",
        f"session opens / Bun handshakes     {r['opens_vs_bun_handshakes']:6.2f}x",
        f"session opens / ws handshakes      {r['opens_vs_ws_handshakes']:6.2f}x",
        f"session opens/s goal >= {r['goal_session_opens_per_s']:,.0f}: {met}",
        "(cpu us: the server process's CPU per open, user + system)",
    ]
    return "\n".join(out)


def plot(r: dict[str, Any], path: Path) -> None:
    p = r["phases"]
    labels = ["seqactor\nsession open", "seqactor\nhandshake", "Bun\nhandshake",
              "Node ws\nhandshake"]
    keys = ["seqactor", "seqactor_handshake", "bun", "ws"]
    colors = ["#1f77b4", "#aec7e8", "#ff7f0e", "#2ca02c"]
    with figure(path, 1, 2, figsize=(10, 4), dpi=100) as (fig, (left, right)):
        left.bar(labels, [p[k]["per_s"] for k in keys], color=colors)
        left.axhline(GOAL_OPENS_PER_S, color="grey", linestyle="--", linewidth=1)
        left.text(3.4, GOAL_OPENS_PER_S, "goal", va="bottom", ha="right", color="grey")
        left.set_ylabel("opens per second")
        left.set_title(f"{r['sessions']:,} connections per phase")
        right.bar(labels, [p[k]["server_cpu_us_per_open"] for k in keys], color=colors)
        right.set_ylabel("server CPU per open (µs)")
        right.set_title("server CPU per open")
        fig.suptitle(f"Session opens vs WebSocket handshakes (git {r['machine']['git_head']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK_SESSIONS} connections per phase (default {FULL_SESSIONS})")
    ap.add_argument("--sessions", type=int, default=None, help="connections per phase")
    ap.add_argument("--profile", default=None,
                    help="py-spy profile of the server during the session-open phase "
                         "(.svg flame graph, .txt raw, .json speedscope)")
    ap.add_argument("--cprofile", default=None,
                    help="cProfile the server of the session-open phase over its whole run "
                         "(pstats file; the figures are then slowed down by the profiler)")
    ap.add_argument("--out", default=str(RESULTS), help="results JSON (default %(default)s)")
    ap.add_argument("--plot", default=str(PLOT), help="plot PNG (default %(default)s)")
    args = ap.parse_args()
    n = args.sessions or (QUICK_SESSIONS if args.quick else FULL_SESSIONS)
    raise_nofile()
    t0 = time.monotonic()
    result = trio.run(run, n, args.profile, args.cprofile)
    result["quick"] = args.quick
    result["total_s"] = time.monotonic() - t0
    print()
    print(table(result))
    plot(result, Path(args.plot))
    out = write_json(args.out, result)
    print(f"wrote {out} and {args.plot}  ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
