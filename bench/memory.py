"""Memory per idle session (issue #4): server RSS per session, and what one session holds.

Usage (from the repo root)::

    .venv/bin/python bench/memory.py [--quick] [--sessions N] [--top K] [--out FILE]

N (default 10 000; ``--quick`` 1 000) users are added to one group by a service connection
(``AddMembers``), then each opens a session (Hello, GetSequences snapshot, Subscribe{all}) from
client processes (``bench/_fanout_client.py``, the fan-out benchmark's; client memory never
counts). Two runs:

* **RSS**, a sweep over 1 000, 2 500, 5 000 ... N sessions, a fresh server each: a
  ``seqactor serve`` subprocess (``memory://`` store), measured exactly as
  ``bench/fanout.py`` does: (VmRSS with n idle sessions - VmRSS before they connected) / n,
  each read after a settle pause; then, the same way, the peers of ``bench/peers/`` holding n
  idle WebSocket connections (handshake only: they have no sessions): Node + ``ws`` and Bun.
* **tracemalloc**: the server in this process with ``tracemalloc`` on; a snapshot before the
  sessions connect and one after (both after ``gc.collect()``), compared by allocation line.
  The difference / N is the Python-heap bytes one idle session holds, by file:line (top K)
  and by component (the file's package: trio-websocket, wsproto, h11, trio, seqactor ...).
  The driver's own connections are made before the first snapshot, so they do not count.

The two figures differ by what the allocator keeps around: freed blocks (handshake buffers,
transient objects) that stay in pymalloc arenas or malloc's free lists count in RSS only.

Prints a table, writes ``bench/results/memory.json`` and plots RSS per session against
sessions (``memory_rss.png``: ``docs/img/`` for a default run, else ``bench/results/``).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import secrets
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    Child,
    call_all,
    figure,
    git_head,
    listening_server,
    peer_argv,
    plot_path,
    raise_nofile,
    rss_kb,
)
from fanout import (  # noqa: E402 - the fan-out benchmark's process helpers
    GOAL_RSS_PER_SESSION_KB,
    GROUP,
    HEARTBEAT_INTERVAL_S,
    client_processes,
    serve_memory,
    start_backend,
    user_ranges,
)

from seqactor._kernel import COMPILED  # noqa: E402
from seqactor.server.config import ServerConfig
from seqactor.server.gateway import Server  # noqa: E402
from seqactor.store import open_store  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "memory.json"

DEFAULT_SESSIONS = 10_000
QUICK_SESSIONS = 1_000  # --quick (make bench-quick): about 20 s
SWEEP = (1_000, 2_500, 5_000)  # RSS also at these session counts below N
GOAL_RSS_AT_10K_KB = 6.0  # issue #12: at 10 000 sessions (Node ws's level)
PEERS = (("ws", "Node ws"), ("bun", "Bun"))
DEFAULT_TOP = 25
CLIENT_PROCESSES = 2
CONNECT_CONCURRENCY = 200  # handshakes in flight, all client processes together
NO_SAMPLING = 1 << 30  # sample_every for the clients: no session records pushes
SETTLE_S = 2.0  # pause before each RSS read / snapshot
TRACE_FRAMES = 1  # frames per traceback: group by the allocating line
CONNECT_TIMEOUT_S = 600.0


async def _connect_sessions(
    clients: list[Child], port: int, members: int, secret_file: Path | None, mode: str = "seqactor",
) -> float:
    """``members`` sessions (``mode`` "plain": WebSocket handshakes only); seconds taken."""
    t0 = time.monotonic()
    answers = await call_all(clients, [
        {"cmd": "connect", "mode": mode, "port": port, "users": list(r_),
         "transport": "raw", "concurrency": CONNECT_CONCURRENCY // len(clients),
         "sample_every": NO_SAMPLING, "group": GROUP,
         "secret_file": str(secret_file) if secret_file else ""}
        for r_ in user_ranges(members, len(clients))
    ], CONNECT_TIMEOUT_S)
    connected = sum(a["connected"] for a in answers)
    if connected != members:
        raise RuntimeError(f"only {connected}/{members} sessions: {answers}")
    return time.monotonic() - t0


async def rss_run(n: int, clients: list[Child], tmp: Path) -> dict[str, Any]:
    """RSS per idle session of a ``seqactor serve`` subprocess (as bench/fanout.py reads it)."""
    async with serve_memory(tmp) as served, trio.open_nursery() as nursery:
        await start_backend(nursery, served.port, served.secret, n)
        await trio.sleep(SETTLE_S)
        before = rss_kb(served.child.pid)
        connect_s = await _connect_sessions(clients, served.port, n, served.secret_file)
        await trio.sleep(SETTLE_S)
        idle = rss_kb(served.child.pid)
        await call_all(clients, [{"cmd": "close"}] * len(clients))
        nursery.cancel_scope.cancel()
    return {
        "server_rss_before_sessions_mb": before / 1024,
        "server_rss_idle_mb": idle / 1024,
        "rss_per_session_kb": (idle - before) / n,
        "connect_s": connect_s,
    }


async def peer_rss_run(name: str, n: int, clients: list[Child]) -> float:
    """RSS per idle connection (KB) of peer ``name`` (bench/peers) holding ``n`` connections."""
    async with listening_server(peer_argv(name), name) as (peer, port):
        await trio.sleep(SETTLE_S)
        before = rss_kb(peer.pid)
        await _connect_sessions(clients, port, n, None, mode="plain")
        while (await peer.call({"cmd": "count"}))["connected"] < n:
            await trio.sleep(0.1)
        await trio.sleep(SETTLE_S)
        idle = rss_kb(peer.pid)
        await call_all(clients, [{"cmd": "close"}] * len(clients))
    return (idle - before) / n


def _component(filename: str) -> str:
    """The package an allocation's file belongs to (seqactor: the module)."""
    if filename.startswith("<attrs generated"):  # attrs' generated __init__ etc.
        return filename.split()[-1].split(".", 1)[0]
    parts = Path(filename).parts
    for i, part in enumerate(parts):
        if part == "site-packages" and i + 1 < len(parts):
            return parts[i + 1].removesuffix(".py")
        if part == "seqactor" and i + 1 < len(parts):
            return "seqactor/" + parts[i + 1]
    if "python3" in filename:
        return "stdlib/" + Path(filename).name
    return filename


def _short(filename: str) -> str:
    parts = Path(filename).parts
    for i, part in enumerate(parts):
        if part in ("site-packages", "src"):
            return "/".join(parts[i + 1:])
    if "python3" in filename:
        return "stdlib/" + Path(filename).name
    return filename


async def trace_run(n: int, clients: list[Child], tmp: Path, top: int) -> dict[str, Any]:
    """What one idle session holds on the Python heap (server in this process)."""
    secret = secrets.token_hex(32).encode()
    secret_file = tmp / "secret-trace"
    secret_file.write_bytes(secret)
    cfg = ServerConfig(host="127.0.0.1", port=0, heartbeat_interval_s=HEARTBEAT_INTERVAL_S)
    server = Server(cfg, open_store("memory://"), secret)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        await start_backend(nursery, server.port, secret, n)
        await trio.sleep(SETTLE_S)
        tracemalloc.start(TRACE_FRAMES)
        try:
            gc.collect()
            before = tracemalloc.take_snapshot()
            await _connect_sessions(clients, server.port, n, secret_file)
            await trio.sleep(SETTLE_S)
            if len(server.sessions) != n + 1:  # + the backend's
                raise RuntimeError(f"{len(server.sessions)} sessions on the server, want {n + 1}")
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        await call_all(clients, [{"cmd": "close"}] * len(clients))
        server.stop()
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    before, after = before.filter_traces(filters), after.filter_traces(filters)
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    lines = [
        {"where": f"{_short(s.traceback[0].filename)}:{s.traceback[0].lineno}",
         "bytes_per_session": s.size_diff / n, "blocks_per_session": s.count_diff / n}
        for s in sorted(stats, key=lambda s: -s.size_diff)[:top]
    ]
    by_component: dict[str, int] = {}
    for s in stats:
        key = _component(s.traceback[0].filename)
        by_component[key] = by_component.get(key, 0) + s.size_diff
    components = sorted(
        ({"component": k, "bytes_per_session": v / n} for k, v in by_component.items()),
        key=lambda c: -c["bytes_per_session"],
    )
    return {
        "python_heap_per_session_kb": total / n / 1024,
        "blocks_per_session": sum(s.count_diff for s in stats) / n,
        "components": components,
        "top": lines,
    }


async def run(n: int, top: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="seqactor-memory-"))
    sweep: list[dict[str, Any]] = []
    try:
        async with client_processes() as clients:
            for size in [s for s in SWEEP if s < n] + [n]:
                print(f"RSS: {size} idle sessions on a seqactor serve subprocess, then "
                      f"{size} connections on {', '.join(label for _, label in PEERS)} ...",
                      flush=True)
                rss = await rss_run(size, clients, tmp)
                point = {"sessions": size, "seqactor_rss_per_session_kb": rss["rss_per_session_kb"]}
                for name, _ in PEERS:
                    point[f"{name}_rss_per_session_kb"] = await peer_rss_run(name, size, clients)
                sweep.append(point)
            print(f"tracemalloc: {n} idle sessions on an in-process server ...", flush=True)
            trace = await trace_run(n, clients, tmp, top)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "sessions": n,
        **rss,  # the sweep's last point: n sessions
        "ws_rss_per_session_kb": sweep[-1]["ws_rss_per_session_kb"],
        "bun_rss_per_session_kb": sweep[-1]["bun_rss_per_session_kb"],
        "rss_vs_ws": rss["rss_per_session_kb"] / sweep[-1]["ws_rss_per_session_kb"],
        "goal_rss_per_session_kb": GOAL_RSS_PER_SESSION_KB,
        "goal_rss_per_session_met": rss["rss_per_session_kb"] <= GOAL_RSS_PER_SESSION_KB,
        "goal_rss_at_10k_kb": GOAL_RSS_AT_10K_KB,
        "goal_rss_at_10k_met": n == 10_000 and rss["rss_per_session_kb"] <= GOAL_RSS_AT_10K_KB,
        "sweep": sweep,
        **trace,
        "rss_minus_python_heap_per_session_kb":
            rss["rss_per_session_kb"] - trace["python_heap_per_session_kb"],
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "compiled_kernel": COMPILED, "git_head": git_head()},
    }


def table(r: dict[str, Any]) -> str:
    met = "met" if r["goal_rss_per_session_met"] else "MISSED"
    out = [
        f"{r['sessions']} idle sessions (Hello, snapshot, Subscribe{{all}}), one group",
        f"  server RSS before / idle MB     {r['server_rss_before_sessions_mb']:8.1f} / "
        f"{r['server_rss_idle_mb']:.1f}",
        f"  RSS per idle session KB        {r['rss_per_session_kb']:8.1f}   "
        f"goal <= {r['goal_rss_per_session_kb']:g}: {met}; at 10 000 <= "
        f"{r['goal_rss_at_10k_kb']:g}: {'met' if r['goal_rss_at_10k_met'] else 'MISSED'}",
        f"  Node ws / Bun per connection KB {r['ws_rss_per_session_kb']:7.1f} / "
        f"{r['bun_rss_per_session_kb']:.1f}   (handshake only; seqactor / ws "
        f"{r['rss_vs_ws']:.2f}x)",
        f"  Python heap per session KB     {r['python_heap_per_session_kb']:8.1f}   "
        f"({r['blocks_per_session']:.0f} blocks; tracemalloc)",
        f"  RSS - Python heap KB           {r['rss_minus_python_heap_per_session_kb']:8.1f}",
        "",
        "RSS per idle session / connection KB, against sessions",
        f"  {'sessions':>8} {'seqactor':>9} {'Node ws':>8} {'Bun':>8}",
        *(f"  {p['sessions']:>8} {p['seqactor_rss_per_session_kb']:9.1f} "
          f"{p['ws_rss_per_session_kb']:8.1f} {p['bun_rss_per_session_kb']:8.1f}" for p in r["sweep"]),
        "",
        "by component (bytes per session)",
    ]
    out += [f"  {c['component']:<34} {c['bytes_per_session']:8.0f}"
            for c in r["components"] if abs(c["bytes_per_session"]) >= 1]
    out += ["", f"top {len(r['top'])} allocation lines (bytes / blocks per session)"]
    out += [f"  {t['where']:<52} {t['bytes_per_session']:7.0f} {t['blocks_per_session']:6.2f}"
            for t in r["top"]]
    return "\n".join(out)


def plot(r: dict[str, Any], path: Path) -> None:
    sessions = [p["sessions"] for p in r["sweep"]]
    with figure(path, figsize=(7, 4)) as (_, ax):
        for key, label in (("seqactor", "seqactor session (Hello, snapshot, Subscribe)"),
                           ("ws", "Node ws connection"), ("bun", "Bun connection")):
            ax.plot(sessions, [p[f"{key}_rss_per_session_kb"] for p in r["sweep"]], marker="o",
                    label=label)
        ax.axhline(GOAL_RSS_AT_10K_KB, color="grey", linestyle="--", linewidth=1,
                   label=f"goal at 10 000: {GOAL_RSS_AT_10K_KB:g} KB")
        ax.set_xlabel("idle sessions / connections")
        ax.set_ylabel("server RSS per session (KB)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"Server memory per idle session (git {r['machine']['git_head']})",
                     fontsize=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=None,
                    help=f"idle sessions (default {DEFAULT_SESSIONS})")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_SESSIONS} sessions")
    ap.add_argument("--top", type=int, default=DEFAULT_TOP,
                    help="allocation lines listed (default %(default)s)")
    ap.add_argument("--out", default=str(RESULTS), help="results JSON (default %(default)s)")
    args = ap.parse_args()
    sessions = args.sessions or (QUICK_SESSIONS if args.quick else DEFAULT_SESSIONS)
    raise_nofile()
    t0 = time.monotonic()
    result = trio.run(run, sessions, args.top)
    result["quick"] = args.quick
    result["total_s"] = time.monotonic() - t0
    print()
    print(table(result))
    png = plot_path("memory_rss.png", full=sessions == DEFAULT_SESSIONS and not args.quick)
    plot(result, png)
    print(f"wrote {png}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}  ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
