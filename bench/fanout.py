"""Group fan-out benchmark (issue #4): one group of N online members, a backend allocating.

Usage (from the repo root)::

    .venv/bin/python bench/fanout.py [--quick] [--profile OUT.svg|OUT.txt] [--out FILE]

One ``seqactor serve`` subprocess (``memory://`` store) and two client processes
(``bench/_fanout_client.py``: trio + trio-websocket, many sessions each). N users are added to
one group by a service connection (``AddMembers``, 2 000 ids a request), each opens a session
(Hello, GetSequences snapshot, Subscribe{all}), then a backend service connection allocates in
the group (count=1) at a fixed rate, open loop (paced by ``trio.sleep_until``; replies are
matched by request id). After a warm-up, for a fixed window:

* staleness: for each allocated seq, the time from the backend receiving ``Allocated`` until a
  (sampled) member's session holds a max >= that seq. ``time.monotonic()`` is system-wide on
  Linux, so the backend's and the clients' timestamps compare directly. A push that arrived
  before ``Allocated`` counts as 0.
* frames/s: push frames received per second across all clients (= deliveries/s: seqactor
  coalesces, latest max wins, so at saturation it sends fewer frames than allocs x members).
* server CPU (utime+stime, /proc/<pid>/stat) over the window, RSS, and RSS per idle session
  ((RSS with N sessions connected - RSS before) / N).

Then, with the same client processes on the same machine, two baselines from
``bench/_fanout_servers.py``, each blasting a typical push frame to N connections:

* ``raw_socket_frames_per_s``: the ceiling — ready frames written with plain non-blocking
  ``socket.send``; nothing else per frame.
* ``naive_frames_per_s``: a trio-websocket server calling ``await conn.send_message(frame)``
  per message per member.

Prints a table and writes ``bench/results/fanout.json`` (latest run flat at the top level; the
latest quick and full runs under ``runs``).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import pickle
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio
import trio_websocket as tws
from _common import (
    Child,
    call_all,
    cpu_s,
    git_head,
    own_cpu_s,
    percentile,
    raise_nofile,
    rss_kb,
    stop_process,
    system_busy_s,
)
from _common import client_processes as _common_client_processes  # noqa: E402

from seqactor._kernel import COMPILED
from seqactor._proto import seqactor_pb2 as pb
from seqactor._synctoken import make_token
from seqactor.auth import issue_token

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "fanout.json"
CLIENT = HERE / "_fanout_client.py"
SERVERS = HERE / "_fanout_servers.py"
GROUP = "g:fanout"

GOAL_STALENESS_P99_MS = 500.0  # at 10 000 members, 100 allocations/s
GOAL_FRAMES_VS_NAIVE = 3.0
GOAL_RSS_PER_SESSION_KB = 20.0

ADD_MEMBERS_CHUNK = 2_000  # ids per AddMembers (max_frame_bytes 65 536)
CLIENT_PROCESSES = 2
CONNECT_CONCURRENCY = 200  # handshakes in flight, all client processes together
SAMPLED_SESSIONS = 1_000  # sessions recording every push, all client processes together
HEARTBEAT_INTERVAL_S = 600  # the bench's sessions send nothing; keep them from idling out
SERVER_START_TIMEOUT_S = 30.0
SETTLE_S = 2.0  # before reading RSS
DRAIN_S = 2.0  # after the window: late pushes still count toward staleness


@dataclass
class Config:
    mode: str
    members: int
    rate_per_s: float
    warmup_s: float
    duration_s: float
    baseline_s: float
    client_transport: str = "raw"


QUICK = Config("quick", members=2_000, rate_per_s=100.0, warmup_s=2.0, duration_s=8.0, baseline_s=4.0)
FULL = Config("full", members=10_000, rate_per_s=100.0, warmup_s=3.0, duration_s=20.0, baseline_s=6.0)


# --------------------------------------------------------------------------- processes


def rate_between(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> float:
    """Frames per second summed over clients, each over its own clock readings."""
    return sum((a["frames"] - b["frames"]) / (a["t"] - b["t"]) for b, a in zip(before, after, strict=True))


def user_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    step = -(-n // parts)
    return [(i * step, min(n, (i + 1) * step)) for i in range(parts)]


# --------------------------------------------------------------------------- backend


class Backend:
    """A service connection: AddMembers, and paced open-loop AllocateSequences."""

    def __init__(self, conn: tws.WebSocketConnection) -> None:
        self.conn = conn
        self.next_id = 1
        self.waiting: dict[int, trio.Event | None] = {}
        self.replies: dict[int, pb.ServerMessage] = {}
        self.allocs: list[tuple[int, float]] = []  # (last seq, monotonic time Allocated received)
        self.sent = 0
        self.errors: list[str] = []
        self.closed_at: float | None = None
        self.sent_at: dict[int, float] = {}
        self.sent_by_seq: dict[int, float] = {}  # seq -> when its AllocateSequences was sent
        self.latency: list[tuple[float, float]] = []  # (t, Allocated reply latency s)

    async def reader(self) -> None:
        while True:
            try:
                data = await self.conn.get_message()
            except tws.ConnectionClosed as exc:
                self.errors.append(f"backend connection closed: {exc.reason}")
                self.closed_at = time.monotonic()
                return
            t = time.monotonic()
            msg = pb.ServerMessage.FromString(data)
            if msg.WhichOneof("body") == "allocated":
                self.allocs.append((msg.allocated.last_sequence, t))
                self.waiting.pop(msg.request_id, None)
                sent_at = self.sent_at.pop(msg.request_id, None)
                if sent_at is not None:
                    self.latency.append((t, t - sent_at))
                    self.sent_by_seq[msg.allocated.last_sequence] = sent_at
                continue
            if msg.WhichOneof("body") == "error":
                self.errors.append(str(msg.error))
            event = self.waiting.pop(msg.request_id, None)
            self.replies[msg.request_id] = msg
            if event is not None:
                event.set()

    async def request(self, msg: pb.ClientMessage) -> pb.ServerMessage:
        rid = msg.request_id = self.next_id
        self.next_id += 1
        event = self.waiting[rid] = trio.Event()
        await self.conn.send_message(msg.SerializeToString())
        with trio.fail_after(60):
            await event.wait()
        return self.replies.pop(rid)

    async def allocate_paced(self, rate: float) -> None:
        """count=1 allocations at ``rate`` per second until cancelled (open loop)."""
        interval = 1.0 / rate
        next_t = trio.current_time()
        while True:
            rid = self.next_id
            self.next_id += 1
            self.waiting[rid] = None
            msg = pb.ClientMessage(
                request_id=rid,
                allocate_sequences=pb.AllocateSequences(conversation_id=GROUP, count=1),
            )
            self.sent_at[rid] = time.monotonic()
            await self.conn.send_message(msg.SerializeToString())
            self.sent += 1
            next_t += interval
            await trio.sleep_until(next_t)


# --------------------------------------------------------------------------- staleness


def staleness_ms(
    allocs: list[tuple[int, float]], dumps: list[Path], horizon: float,
) -> tuple[list[float], int, int]:
    """Per (sampled member, seq): first push time with max >= seq, minus the alloc time.

    Returns (sorted staleness in ms, sessions, points never reached by ``horizon``; those are
    counted at ``horizon - t_alloc``, a lower bound).
    """
    values: list[float] = []
    missing = 0
    sessions = 0
    for path in dumps:
        with open(path, "rb") as f:
            records = pickle.load(f)
        for raw_maxes, raw_times in records:
            sessions += 1
            maxes = array("Q")
            maxes.frombytes(raw_maxes)
            times = array("d")
            times.frombytes(raw_times)
            running: list[int] = []
            top = 0
            for m in maxes:
                top = max(top, m)
                running.append(top)
            n = len(running)
            for seq, t_alloc in allocs:
                i = bisect.bisect_left(running, seq)
                if i < n:
                    values.append(max(0.0, times[i] - t_alloc) * 1000.0)
                else:
                    missing += 1
                    values.append((horizon - t_alloc) * 1000.0)
    values.sort()
    return values, sessions, missing


# --------------------------------------------------------------------------- phases


def typical_push() -> bytes:
    """What a member receives for a new max in the group (subscribed to all: with a token)."""
    return pb.ServerMessage(
        request_id=0,
        update=pb.SequenceUpdate(
            conversations={GROUP: pb.ConversationSequence(
                max_sequence=123_456, max_sequence_time_ms=int(time.time() * 1000),
            )},
            sync_token=make_token(secrets.token_bytes(16), 1_234_567),
        ),
    ).SerializeToString()


async def start_backend(
    nursery: trio.Nursery, port: int, secret: bytes, members: int,
) -> Backend:
    """A service connection (its reader in ``nursery``) that added users ``u000000``... up to
    ``members`` to the group."""
    conn = await tws.connect_websocket(
        nursery, "127.0.0.1", port, "/v1", use_ssl=False, message_queue_size=4096,
    )
    backend = Backend(conn)
    nursery.start_soon(backend.reader)
    tok = issue_token(secret, "backend", role="service", ttl_s=3600)
    r = await backend.request(pb.ClientMessage(hello=pb.Hello(token=tok)))
    assert r.WhichOneof("body") == "welcome", r
    for first in range(0, members, ADD_MEMBERS_CHUNK):
        ids = [f"u{i:06d}" for i in range(first, min(members, first + ADD_MEMBERS_CHUNK))]
        r = await backend.request(pb.ClientMessage(
            add_members=pb.AddMembers(conversation_id=GROUP, user_ids=ids)))
        assert r.WhichOneof("body") == "ack", r
    return backend


def client_processes(n: int = CLIENT_PROCESSES) -> AbstractAsyncContextManager[list[Child]]:
    """``n`` processes of this benchmark's load client (see ``_common.client_processes``)."""
    return _common_client_processes(CLIENT, n)


@dataclass
class Served:
    """A ``seqactor serve`` child on the memory store (see :func:`serve_memory`)."""

    child: Child
    port: int
    secret: bytes
    secret_file: Path


@asynccontextmanager
async def serve_memory(tmp: Path) -> AsyncIterator[Served]:
    """Start ``seqactor serve --store memory://`` as a child process, wait until it listens,
    and stop it on exit (its log tail is printed if the body fails)."""
    secret_file = tmp / "secret"
    secret_file.write_text(secrets.token_hex(32))
    secret_file.chmod(0o600)  # serve warns about group/world-readable secrets
    secret = secret_file.read_bytes().strip()
    server_log = open(tmp / "server.log", "wb")
    server = await Child.start(
        [str(Path(sys.executable).with_name("seqactor")), "serve", "--host", "127.0.0.1",
         "--port", "0", "--store", "memory://", "--secret-file", str(secret_file),
         "--heartbeat-interval", str(HEARTBEAT_INTERVAL_S), "--log-level", "WARNING"],
        "server", stderr=server_log,
    )
    try:
        line = await server.readline(SERVER_START_TIMEOUT_S)
        if not line.startswith("listening on ws://"):
            raise RuntimeError(f"server said {line!r}")
        port = int(line.rsplit(":", 1)[1].split("/", 1)[0])
        yield Served(server, port, secret, secret_file)
    except BaseException:
        server_log.flush()
        tail = (tmp / "server.log").read_bytes()[-3000:].decode(errors="replace")
        print(f"server log (tail):\n{tail}", file=sys.stderr)
        raise
    finally:
        await stop_process(server.proc)
        server_log.close()


async def seqactor_phase(
    cfg: Config, clients: list[Child], tmp: Path, profile: str | None,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with serve_memory(tmp) as served:
        port, pid = served.port, served.child.pid
        secret, secret_file = served.secret, served.secret_file
        async with trio.open_nursery() as nursery:
            t0 = time.monotonic()
            backend = await start_backend(nursery, port, secret, cfg.members)
            out["add_members_s"] = time.monotonic() - t0
            await trio.sleep(SETTLE_S)
            rss_before = rss_kb(pid)

            print(f"  connecting {cfg.members} sessions ...", flush=True)
            per_client = -(-cfg.members // len(clients))
            sample_every = max(1, per_client * len(clients) // SAMPLED_SESSIONS)
            cpu0 = cpu_s(pid)
            t0 = time.monotonic()
            answers = await call_all(clients, [
                {"cmd": "connect", "mode": "seqactor", "port": port, "users": list(r_),
                 "transport": cfg.client_transport,
                 "concurrency": CONNECT_CONCURRENCY // len(clients), "sample_every": sample_every,
                 "group": GROUP, "secret_file": str(secret_file)}
                for r_ in user_ranges(cfg.members, len(clients))
            ])
            connect_s = time.monotonic() - t0
            connected = sum(a["connected"] for a in answers)
            if connected != cfg.members:
                raise RuntimeError(f"only {connected}/{cfg.members} sessions: {answers}")
            out["connect_s"] = connect_s
            out["sessions_per_s_connect"] = cfg.members / connect_s
            out["server_cpu_s_connect"] = cpu_s(pid) - cpu0
            await trio.sleep(SETTLE_S)
            rss_idle = rss_kb(pid)
            out["server_rss_before_sessions_mb"] = rss_before / 1024
            out["server_rss_idle_mb"] = rss_idle / 1024
            out["rss_per_session_kb"] = (rss_idle - rss_before) / cfg.members

            print(f"  allocating at {cfg.rate_per_s:g}/s: warm-up {cfg.warmup_s:g} s, "
                  f"window {cfg.duration_s:g} s ...", flush=True)
            async with trio.open_nursery() as load:
                load.start_soon(backend.allocate_paced, cfg.rate_per_s)
                await trio.sleep(cfg.warmup_s)
                marks0 = await call_all(clients, [{"cmd": "reset"}] * len(clients))
                cpu_start, t_start, sent_start = cpu_s(pid), time.monotonic(), backend.sent
                ccpu_start = [cpu_s(c.pid) for c in clients]
                busy_start, own_start = system_busy_s(), own_cpu_s()
                spy = None
                if profile:
                    spy = await start_profiler(profile, pid, cfg.duration_s)
                await trio.sleep(cfg.duration_s)
                cpu_end, t_end, sent_end = cpu_s(pid), time.monotonic(), backend.sent
                ccpu_end = [cpu_s(c.pid) for c in clients]
                busy_end, own_end = system_busy_s(), own_cpu_s()
                marks1 = await call_all(clients, [{"cmd": "mark"}] * len(clients))
                rss_load = rss_kb(pid)
                load.cancel_scope.cancel()
            await trio.sleep(DRAIN_S)
            horizon = time.monotonic()
            dumps = [tmp / f"records{i}.pkl" for i in range(len(clients))]
            dumped = await call_all(clients, [{"cmd": "dump", "path": str(p)} for p in dumps])
            if spy is not None:
                await finish_profiler(spy)
            window = t_end - t_start
            start_after = max(m["t"] for m in marks0) + 0.05
            allocs = [(s, t) for s, t in backend.allocs if start_after <= t <= t_end]
            values, sessions, missing = staleness_ms(allocs, dumps, horizon)
            e2e, _, _ = staleness_ms(
                [(seq, backend.sent_by_seq[seq]) for seq, _ in allocs if seq in backend.sent_by_seq],
                dumps, horizon,
            )
            frames_per_s = rate_between(marks0, marks1)
            lat = sorted(x * 1000 for t, x in backend.latency if t_start <= t <= t_end)
            out.update({
                "allocs_sent_per_s": (sent_end - sent_start) / window,
                "allocs_per_s_achieved": sum(t_start <= t <= t_end for _, t in backend.allocs) / window,
                "frames_per_s": frames_per_s,
                "deliveries_per_s": frames_per_s,
                "deliveries_wanted_per_s": cfg.rate_per_s * cfg.members,
                "server_cpu_s": cpu_end - cpu_start,
                "server_cpu_util": (cpu_end - cpu_start) / window,
                "client_cpu_util": [(b - a) / window for a, b in zip(ccpu_start, ccpu_end, strict=True)],
                "driver_cpu_util": (own_end - own_start) / window,
                "other_processes_cpu_util": (
                    (busy_end - busy_start) - (cpu_end - cpu_start) - (own_end - own_start)
                    - sum(b - a for a, b in zip(ccpu_start, ccpu_end, strict=True))
                ) / window,
                "frames_per_server_cpu_s": frames_per_s * window / max(1e-9, cpu_end - cpu_start),
                "server_rss_mb": rss_load / 1024,
                "staleness_p50_ms": percentile(values, 0.50),
                "staleness_p90_ms": percentile(values, 0.90),
                "staleness_p99_ms": percentile(values, 0.99),
                "staleness_max_ms": values[-1] if values else float("nan"),
                "staleness_points": len(values),
                "from_request_p50_ms": percentile(e2e, 0.50),
                "from_request_p99_ms": percentile(e2e, 0.99),
                "staleness_sampled_sessions": sessions,
                "staleness_missing": missing,
                "alloc_reply_p50_ms": percentile(lat, 0.5),
                "alloc_reply_p99_ms": percentile(lat, 0.99),
                "allocs_unanswered_at_end": len(backend.sent_at),
                "window_s": window,
                "sessions_closed_during_run": sum(d["closed"] for d in dumped),
                "backend_errors": backend.errors[:3],
            })
            await call_all(clients, [{"cmd": "close"}] * len(clients))
            nursery.cancel_scope.cancel()
    return out


async def baseline_phase(kind: str, cfg: Config, clients: list[Child], payload: bytes) -> dict[str, Any]:
    server = await Child.start(
        [sys.executable, str(SERVERS), kind, "--payload", payload.hex()], f"{kind} server",
    )
    try:
        port = (await server.recv(SERVER_START_TIMEOUT_S))["port"]
        t0 = time.monotonic()
        await call_all(clients, [
            {"cmd": "connect", "mode": "plain", "port": port, "users": list(r_),
             "transport": cfg.client_transport,
             "concurrency": CONNECT_CONCURRENCY // len(clients)}
            for r_ in user_ranges(cfg.members, len(clients))
        ])
        with trio.fail_after(60):
            while (await server.call({"cmd": "count"}))["connected"] < cfg.members:
                await trio.sleep(0.1)
        connect_s = time.monotonic() - t0
        await trio.sleep(0.5)
        cpu0 = cpu_s(server.pid)
        ccpu0 = [cpu_s(c.pid) for c in clients]
        busy0, own0 = system_busy_s(), own_cpu_s()
        t0 = time.monotonic()
        await server.send({"cmd": "blast", "seconds": cfg.baseline_s})
        await trio.sleep(1.0)  # measure the steady state, not the ramp
        marks0 = await call_all(clients, [{"cmd": "mark"}] * len(clients))
        await trio.sleep(cfg.baseline_s - 1.5)
        marks1 = await call_all(clients, [{"cmd": "mark"}] * len(clients))
        blast = await server.recv(cfg.baseline_s + 60)
        cpu1 = cpu_s(server.pid)
        elapsed = time.monotonic() - t0
        ccpu = [(cpu_s(c.pid) - a) / elapsed for c, a in zip(clients, ccpu0, strict=True)]
        busy1, own1 = system_busy_s(), own_cpu_s()
        other = (busy1 - busy0 - (own1 - own0)) / elapsed - sum(ccpu) - (cpu1 - cpu0) / elapsed
        await call_all(clients, [{"cmd": "close"}] * len(clients))
        await server.send({"cmd": "exit"})
    finally:
        await stop_process(server.proc)
    return {
        "frames_per_s": rate_between(marks0, marks1),
        "server_sent_per_s": blast["sent"] / blast["secs"],
        "server_cpu_util": (cpu1 - cpu0) / blast["secs"],
        "client_cpu_util": ccpu,
        "other_processes_cpu_util": other,
        "frames_per_server_cpu_s": rate_between(marks0, marks1) / max(1e-9, (cpu1 - cpu0) / blast["secs"]),
        "connect_s": connect_s,
    }


# --------------------------------------------------------------------------- profiler


PROFILE_RATE_HZ = 100  # py-spy samples per second


async def start_profiler(
    path: str, pid: int, seconds: float, rate_hz: int = PROFILE_RATE_HZ,
) -> trio.Process:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise RuntimeError("py-spy not found: pip install py-spy")
    fmt = "raw" if path.endswith(".txt") else "speedscope" if path.endswith(".json") else "flamegraph"
    return await trio.lowlevel.open_process(
        [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate_hz),
         "--format", fmt, "--output", path, "--nonblocking"],
        stdout=subprocess.DEVNULL,
    )


async def finish_profiler(spy: trio.Process) -> None:
    with trio.move_on_after(30):
        await spy.wait()
    if spy.returncode is None:
        spy.kill()


# --------------------------------------------------------------------------- main


async def run(cfg: Config, profile: str | None) -> dict[str, Any]:
    load_at_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="seqactor-fanout-"))
    try:
        async with client_processes() as clients:
            print(f"seqactor: {cfg.members} members, {cfg.rate_per_s:g} allocations/s", flush=True)
            seq = await seqactor_phase(cfg, clients, tmp, profile)
            payload = typical_push()
            print(f"naive baseline: trio-websocket send_message, {cfg.members} connections",
                  flush=True)
            naive = await baseline_phase("naive", cfg, clients, payload)
            print(f"raw-socket ceiling: socket.send of ready frames, {cfg.members} connections",
                  flush=True)
            raw = await baseline_phase("raw", cfg, clients, payload)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result: dict[str, Any] = {
        "mode": cfg.mode,
        "members": cfg.members,
        "rate_per_s": cfg.rate_per_s,
        **{k: seq[k] for k in (
            "allocs_per_s_achieved", "staleness_p50_ms", "staleness_p99_ms", "frames_per_s",
            "deliveries_per_s", "server_cpu_s", "server_rss_mb", "rss_per_session_kb",
        )},
        "raw_socket_frames_per_s": raw["frames_per_s"],
        "naive_frames_per_s": naive["frames_per_s"],
        "frames_vs_naive": seq["frames_per_s"] / naive["frames_per_s"],
        "frames_vs_raw_socket": seq["frames_per_s"] / raw["frames_per_s"],
        "frames_per_cpu_vs_naive": seq["frames_per_server_cpu_s"] / naive["frames_per_server_cpu_s"],
        "load_average_at_start": load_at_start,
        "goal_staleness_p99_ms": GOAL_STALENESS_P99_MS,
        "goal_staleness_met": seq["staleness_p99_ms"] <= GOAL_STALENESS_P99_MS,
        "goal_frames_vs_naive": GOAL_FRAMES_VS_NAIVE,
        "goal_frames_vs_naive_met": seq["frames_per_s"] / naive["frames_per_s"] >= GOAL_FRAMES_VS_NAIVE,
        "goal_rss_per_session_kb": GOAL_RSS_PER_SESSION_KB,
        "goal_rss_per_session_met": seq["rss_per_session_kb"] <= GOAL_RSS_PER_SESSION_KB,
        "seqactor": seq,
        "naive": naive,
        "raw_socket": raw,
        "config": asdict(cfg),
        "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "compiled_kernel": COMPILED,
            "client_processes": CLIENT_PROCESSES,
            "git_head": git_head(),
        },
        "profiled": bool(profile),
    }
    return result


def table(r: dict[str, Any]) -> str:
    s, n, w = r["seqactor"], r["naive"], r["raw_socket"]

    def ok(flag: bool) -> str:
        return "yes" if flag else "NO"

    rows = [
        ("members / target allocs/s", f"{r['members']} / {r['rate_per_s']:g}", ""),
        ("allocs/s achieved", f"{r['allocs_per_s_achieved']:.1f}", ""),
        ("staleness p50 / p90 / p99 ms",
         f"{s['staleness_p50_ms']:.1f} / {s['staleness_p90_ms']:.1f} / {s['staleness_p99_ms']:.1f}",
         f"p99 <= {GOAL_STALENESS_P99_MS:g}: {ok(r['goal_staleness_met'])}"),
        ("from AllocateSequences sent: p50 / p99 ms",
         f"{s['from_request_p50_ms']:.1f} / {s['from_request_p99_ms']:.1f}", "includes the op's queueing"),
        ("staleness max ms / points / missing",
         f"{s['staleness_max_ms']:.1f} / {s['staleness_points']} / {s['staleness_missing']}", ""),
        ("seqactor push frames/s", f"{r['frames_per_s']:,.0f}",
         f"wanted {s['deliveries_wanted_per_s']:,.0f} uncoalesced"),
        ("naive trio-websocket frames/s", f"{r['naive_frames_per_s']:,.0f}",
         f"server cpu {n['server_cpu_util']:.2f}"),
        ("raw socket.send frames/s (ceiling)", f"{r['raw_socket_frames_per_s']:,.0f}",
         f"server sent {w['server_sent_per_s']:,.0f}/s, cpu {w['server_cpu_util']:.2f}"),
        ("seqactor / naive", f"{r['frames_vs_naive']:.2f}x",
         f">= {GOAL_FRAMES_VS_NAIVE:g}x: {ok(r['goal_frames_vs_naive_met'])}"),
        ("seqactor / raw ceiling", f"{r['frames_vs_raw_socket']:.2f}x", ""),
        ("frames per server cpu-s: seqactor / naive / raw",
         f"{s['frames_per_server_cpu_s']:,.0f} / {n['frames_per_server_cpu_s']:,.0f} / "
         f"{w['frames_per_server_cpu_s']:,.0f}", f"seqactor/naive {r['frames_per_cpu_vs_naive']:.2f}x"),
        ("cpu util: server / clients / others",
         f"{s['server_cpu_util']:.2f} / {sum(s['client_cpu_util']):.2f} / "
         f"{s['other_processes_cpu_util']:.2f}", "others: processes outside the bench"),
        ("server cpu s (window)", f"{s['server_cpu_s']:.1f}", ""),
        ("Allocated reply p50 / p99 ms", f"{s['alloc_reply_p50_ms']:.0f} / {s['alloc_reply_p99_ms']:.0f}",
         f"{s['allocs_unanswered_at_end']} unanswered at the window's end"),
        ("server RSS MB (idle / under load)",
         f"{s['server_rss_idle_mb']:.1f} / {s['server_rss_mb']:.1f}", ""),
        ("RSS per idle session KB", f"{r['rss_per_session_kb']:.1f}",
         f"<= {GOAL_RSS_PER_SESSION_KB:g}: {ok(r['goal_rss_per_session_met'])}"),
        ("connect: sessions/s", f"{s['sessions_per_s_connect']:,.0f}",
         f"{s['connect_s']:.1f} s, server cpu {s['server_cpu_s_connect']:.1f} s"),
    ]
    w1 = max(len(a) for a, _, _ in rows)
    w2 = max(len(b) for _, b, _ in rows)
    lines = [f"fan-out ({r['mode']}): {'metric':<{w1 - 8}}", "-" * (w1 + w2 + 30)]
    lines[0] = f"{'fan-out (' + r['mode'] + ')':<{w1}}  {'value':>{w2}}  goal / note"
    lines += [f"{a:<{w1}}  {b:>{w2}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 000 members, ~8 s window (< 60 s)")
    ap.add_argument("--members", type=int, help="override the member count")
    ap.add_argument("--rate", type=float, help="override allocations per second")
    ap.add_argument("--duration", type=float, help="override the measured window, seconds")
    ap.add_argument("--client-transport", choices=("raw", "tws"), default="raw",
                    help="clients read with a minimal frame parser (raw, default) or "
                    "trio-websocket get_message (tws)")
    ap.add_argument("--profile", help="py-spy the server over the window: OUT.svg (flamegraph), "
                    "OUT.txt (collapsed stacks) or OUT.json (speedscope); results not saved")
    ap.add_argument("--out", default=str(RESULTS), help="results JSON (default %(default)s)")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    overridden = (args.members is not None or args.rate is not None or args.duration is not None
                  or args.client_transport != "raw")
    cfg.client_transport = args.client_transport
    if args.members is not None:
        cfg.members = args.members
    if args.rate is not None:
        cfg.rate_per_s = args.rate
    if args.duration is not None:
        cfg.duration_s = args.duration
    raise_nofile()
    t0 = time.monotonic()
    result = trio.run(run, cfg, args.profile)
    result["total_s"] = time.monotonic() - t0
    print()
    print(table(result))
    print(f"total {result['total_s']:.0f} s")
    if args.profile:
        print(f"profile written to {args.profile} (results not saved: the profiler perturbs them)")
        return
    if overridden:
        cfg.mode = "custom"
        result["mode"] = "custom"
    out = Path(args.out)
    previous: dict[str, Any] = {}
    if out.exists():
        try:
            previous = json.loads(out.read_text()).get("runs", {})
        except (ValueError, AttributeError):
            previous = {}
    flat = {k: v for k, v in result.items()}
    runs = dict(previous)
    runs[result["mode"]] = flat
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**flat, "runs": runs}, indent=2, sort_keys=False) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
