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

Then, with the same client processes on the same machine, four baselines, each blasting a
typical push frame (the same bytes) to N connections round after round, as fast as the
receivers take them, for a fixed time; the clients count binary frames exactly as from
seqactor:

* ``raw_socket_frames_per_s``: the ceiling (``bench/_fanout_servers.py raw``) — ready frames
  written with plain non-blocking ``socket.send``; nothing else per frame.
* ``naive_frames_per_s``: a trio-websocket server calling ``await conn.send_message(frame)``
  per message per member (``bench/_fanout_servers.py naive``).
* ``bun_frames_per_s``: Bun's ``server.publish(topic, frame)``, every connection subscribed
  to the topic (``bench/peers/bun_server.js``).
* ``ws_frames_per_s``: Node + ``ws``, its broadcast idiom: ``client.send(frame)`` for each
  open client (``bench/peers/ws_server.js``).

The peers skip a connection with more than 64 KiB unsent, as the raw ceiling skips a full
socket. Each baseline's server CPU over its blast gives its frames per server CPU-second (the
clients share the two cores, so this is the figure least moved by them). The raw sweep time
(members / raw frames/s) is what one push to every member takes at the ceiling; p99
staleness is compared with it.

Then a member sweep (full: 1 000 ... 16 000; ``--quick``: 1 000 and 4 000): at each size,
fresh servers, seqactor at an allocation rate high enough to saturate it (at least
``SWEEP_DEMAND_FRAMES_PER_S`` wanted deliveries), then raw, Bun and ws, shorter windows.

Prints tables, writes ``bench/results/fanout.json`` (latest run flat at the top level; the
latest quick and full runs under ``runs``) and two plots (full run: ``docs/img/``; else
``bench/results/``): ``fanout_staleness_cdf.png`` (seqactor's staleness CDF at N) and
``fanout_members.png`` (frames/s and frames per server CPU-second against members).
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import trio
import trio_websocket as tws
from _common import (
    Child,
    call_all,
    cpu_s,
    figure,
    git_head,
    listening_server,
    own_cpu_s,
    peer_argv,
    percentile,
    plot_path,
    preemptions,
    raise_nofile,
    rss_kb,
    runqueue_wait_s,
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
GOAL_FRAMES_VS_RAW = 0.9  # issue #12
GOAL_STALENESS_VS_SWEEP = 1.2  # p99 staleness / raw sweep time (members / raw frames/s)

ADD_MEMBERS_CHUNK = 2_000  # ids per AddMembers (max_frame_bytes 65 536)
CLIENT_PROCESSES = 2  # load processes (counting frames), besides the one probe process
CONNECT_CONCURRENCY = 200  # handshakes in flight, all client processes together
# The load processes' nice value (the probe's and every server's: 0). On 2 cores the server
# under test shares the cores with its load; a load process that catches up sleeps, and each
# wake-up may preempt the server (the scheduler favours waking tasks): in one run seqactor's
# server was preempted 5 000-9 000 times/s, raw's 800-2 300. At nice 5 every server is
# preempted ~100-300 times/s, as it would be with cores of its own; raw, Bun, ws and naive
# run against the same load processes.
LOAD_NICE = 5
# The probe process polls its sessions every this many seconds instead of waking for each push
# (its wake-ups would preempt the server too); staleness is judged at the socket (the kernel's
# receive time), so the pause only delays the reads (by about this much).
PROBE_POLL_S = 0.005
# The probe holds at most every 10th user: below 10 000 members it would otherwise hold up to
# half of them, and a probe that takes longer to read its sessions than a round takes reads
# two pushes at once (both timed at the later: an overstatement at the small sweep points).
PROBE_EVERY_MIN = 10
SAMPLED_SESSIONS = 1_000  # sessions recording every push (the probe process's)
HEARTBEAT_INTERVAL_S = 600  # the bench's sessions send nothing; keep them from idling out
SERVER_START_TIMEOUT_S = 30.0
BASELINE_RAMP_S = 1.0  # a baseline's blast is measured after this (at most a quarter of it) ...
BASELINE_TAIL_S = 0.5  # ... until this before its end
SWEEP_DEMAND_FRAMES_PER_S = 400_000.0  # sweep: allocs/s x members at least this (saturated)
STALENESS_CDF_POINTS = 200  # quantiles kept in the JSON for the CDF plot


@dataclass
class Config:
    mode: str
    members: int
    rate_per_s: float
    warmup_s: float
    duration_s: float
    baseline_s: float
    client_transport: str = "raw"
    settle_s: float = 2.0  # before reading RSS
    drain_s: float = 2.0  # after the window: late pushes still count toward staleness
    sweep: tuple[int, ...] = ()  # member counts of the sweep
    sweep_warmup_s: float = 2.0
    sweep_duration_s: float = 5.0
    sweep_baseline_s: float = 4.0


QUICK = Config("quick", members=2_000, rate_per_s=100.0, warmup_s=2.0, duration_s=5.0, baseline_s=3.0,
               settle_s=1.0, drain_s=1.0,
               sweep=(1_000, 4_000), sweep_warmup_s=1.0, sweep_duration_s=2.0, sweep_baseline_s=2.5)
FULL = Config("full", members=10_000, rate_per_s=100.0, warmup_s=3.0, duration_s=20.0, baseline_s=6.0,
              sweep=(1_000, 2_000, 4_000, 8_000, 16_000))


def sweep_config(cfg: Config, members: int) -> Config:
    """One sweep point: ``members``, an allocation rate that saturates seqactor, short windows."""
    return replace(
        cfg, mode=f"sweep {members}", members=members,
        rate_per_s=max(cfg.rate_per_s, SWEEP_DEMAND_FRAMES_PER_S / members),
        warmup_s=cfg.sweep_warmup_s, duration_s=cfg.sweep_duration_s,
        baseline_s=cfg.sweep_baseline_s, settle_s=0.5, drain_s=0.5, sweep=(),
    )


# --------------------------------------------------------------------------- processes


def rate_between(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> float:
    """Frames per second summed over clients, each over its own clock readings."""
    return sum((a["frames"] - b["frames"]) / (a["t"] - b["t"]) for b, a in zip(before, after, strict=True))


def connect_commands(cfg: Config, clients: list[Any], **common: Any) -> list[dict[str, Any]]:
    """One ``connect`` per client process for ``cfg.members`` users: the last process is the
    probe (every K-th user, about ``SAMPLED_SESSIONS``, each recording its pushes), the others
    share the rest in ranges and only count frames. The probe reads few sessions, so a push
    it records was read soon after it reached the socket; a load process, 4 500 sessions on a
    shared core, may read it tens of milliseconds later (its run-queue wait is printed)."""
    every = max(PROBE_EVERY_MIN, cfg.members // SAMPLED_SESSIONS)
    load = clients[:-1]
    base = {"cmd": "connect", "transport": cfg.client_transport, "group": GROUP,
            "probe_every": every, **common}
    return [
        {**base, "users": list(r_), "probe": False, "nice": LOAD_NICE,
         "concurrency": CONNECT_CONCURRENCY // len(clients)}
        for r_ in user_ranges(cfg.members, len(load))
    ] + [{**base, "users": [0, cfg.members], "probe": True, "poll_interval_s": PROBE_POLL_S,
          "concurrency": CONNECT_CONCURRENCY // len(clients)}]


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


Record = tuple[list[int], array, array]  # (running max, read times, socket times) of a session


def load_records(dumps: list[Path]) -> list[Record]:
    """The sampled sessions' records from the client processes' dumps (``dump`` command):
    per session the running max of its pushes (non-decreasing), with the read time and the
    socket time of each."""
    out: list[Record] = []
    for path in dumps:
        with open(path, "rb") as f:
            raw = pickle.load(f)
        for record in raw:
            maxes = array("Q")
            maxes.frombytes(record[0])
            columns = []
            for column in record[1:3]:
                times = array("d")
                times.frombytes(column)
                columns.append(times)
            running: list[int] = []
            top = 0
            for m in maxes:
                top = max(top, m)
                running.append(top)
            out.append((running, columns[0], columns[1]))
    return out


def staleness_ms(
    allocs: list[tuple[int, float]], records: list[Record], horizon: float,
    at_socket: bool = False,
) -> tuple[list[float], int]:
    """Per (sampled member, seq): first push time with max >= seq, minus the alloc time.

    ``records``: :func:`load_records`. The push time is when the client process read it, or
    with ``at_socket`` when it reached the member's socket (the kernel's receive timestamp,
    see ``_fanout_client.py``). Returns (sorted staleness in ms, points never reached by
    ``horizon``; those are counted at ``horizon - t_alloc``, a lower bound).
    """
    values: list[float] = []
    missing = 0
    for running, read, socket_times in records:
        times = socket_times if at_socket else read
        n = len(running)
        for seq, t_alloc in allocs:
            i = bisect.bisect_left(running, seq)
            if i < n:
                values.append(max(0.0, times[i] - t_alloc) * 1000.0)
            else:
                missing += 1
                values.append((horizon - t_alloc) * 1000.0)
    values.sort()
    return values, missing


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
            await trio.sleep(cfg.settle_s)
            rss_before = rss_kb(pid)

            print(f"  connecting {cfg.members} sessions ...", flush=True)
            cpu0 = cpu_s(pid)
            t0 = time.monotonic()
            answers = await call_all(clients, connect_commands(
                cfg, clients, mode="seqactor", port=port, secret_file=str(secret_file)))
            connect_s = time.monotonic() - t0
            connected = sum(a["connected"] for a in answers)
            if connected != cfg.members:
                raise RuntimeError(f"only {connected}/{cfg.members} sessions: {answers}")
            out["connect_s"] = connect_s
            out["sessions_per_s_connect"] = cfg.members / connect_s
            out["server_cpu_s_connect"] = cpu_s(pid) - cpu0
            await trio.sleep(cfg.settle_s)
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
                wait_start = [runqueue_wait_s(p) for p in [pid, *(c.pid for c in clients)]]
                preempted_start = preemptions(pid)
                busy_start, own_start = system_busy_s(), own_cpu_s()
                spy = None
                if profile:
                    spy = await start_profiler(profile, pid, cfg.duration_s)
                await trio.sleep(cfg.duration_s)
                cpu_end, t_end, sent_end = cpu_s(pid), time.monotonic(), backend.sent
                ccpu_end = [cpu_s(c.pid) for c in clients]
                wait_end = [runqueue_wait_s(p) for p in [pid, *(c.pid for c in clients)]]
                preempted_end = preemptions(pid)
                busy_end, own_end = system_busy_s(), own_cpu_s()
                marks1 = await call_all(clients, [{"cmd": "mark"}] * len(clients))
                rss_load = rss_kb(pid)
                load.cancel_scope.cancel()
            await trio.sleep(cfg.drain_s)
            horizon = time.monotonic()
            dumps = [tmp / f"records{i}.pkl" for i in range(len(clients))]
            dumped = await call_all(clients, [{"cmd": "dump", "path": str(p)} for p in dumps])
            if spy is not None:
                await finish_profiler(spy)
            window = t_end - t_start
            start_after = max(m["t"] for m in marks0) + 0.05
            allocs = [(s, t) for s, t in backend.allocs if start_after <= t <= t_end]
            records = load_records(dumps)
            sessions = len(records)
            values, missing = staleness_ms(allocs, records, horizon)
            at_socket, _ = staleness_ms(allocs, records, horizon, at_socket=True)
            e2e, _ = staleness_ms(
                [(seq, backend.sent_by_seq[seq]) for seq, _ in allocs if seq in backend.sent_by_seq],
                records, horizon,
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
                # run-queue wait per second of the window: the server, then each client process
                "server_runqueue_wait_s_per_s": (wait_end[0] - wait_start[0]) / window,
                "server_preemptions_per_s": (preempted_end - preempted_start) / window,
                "client_runqueue_wait_s_per_s": [
                    (b - a) / window for a, b in zip(wait_start[1:], wait_end[1:], strict=True)],
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
                "staleness_cdf_ms": [  # the quantiles 0, 1/K ... 1 (K = STALENESS_CDF_POINTS)
                    round(values[round(i * (len(values) - 1) / STALENESS_CDF_POINTS)], 3)
                    for i in range(STALENESS_CDF_POINTS + 1)
                ] if values else [],
                "staleness_points": len(values),
                "socket_staleness_p50_ms": percentile(at_socket, 0.50),
                "socket_staleness_p90_ms": percentile(at_socket, 0.90),
                "socket_staleness_p99_ms": percentile(at_socket, 0.99),
                "socket_staleness_max_ms": at_socket[-1] if at_socket else float("nan"),
                "socket_staleness_cdf_ms": [
                    round(at_socket[round(i * (len(at_socket) - 1) / STALENESS_CDF_POINTS)], 3)
                    for i in range(STALENESS_CDF_POINTS + 1)
                ] if at_socket else [],
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


BASELINES = {  # name -> (what it is, its command line for a payload)
    "naive": ("naive trio-websocket send_message",
              lambda payload: [sys.executable, str(SERVERS), "naive", "--payload", payload.hex()]),
    "raw": ("raw-socket ceiling: socket.send of ready frames",
            lambda payload: [sys.executable, str(SERVERS), "raw", "--payload", payload.hex()]),
    "bun": ("Bun server.publish to one topic", lambda payload: peer_argv("bun", "0", payload.hex())),
    "ws": ("Node ws: client.send per client", lambda payload: peer_argv("ws", "0", payload.hex())),
}


async def baseline_phase(kind: str, cfg: Config, clients: list[Child], payload: bytes) -> dict[str, Any]:
    """Server ``kind`` of :data:`BASELINES` with ``cfg.members`` plain connections, blasting
    ``payload`` for ``cfg.baseline_s``: frames/s counted by the clients over the blast's steady
    part, the server's CPU over the whole blast."""
    argv = BASELINES[kind][1](payload)
    async with listening_server(argv, f"{kind} server") as (server, port):
        t0 = time.monotonic()
        # the same processes hold the same users as in seqactor's phase; the probe decodes
        await call_all(clients, connect_commands(cfg, clients, mode="plain", port=port))
        with trio.fail_after(60):
            while (await server.call({"cmd": "count"}))["connected"] < cfg.members:
                await trio.sleep(0.1)
        connect_s = time.monotonic() - t0
        await trio.sleep(0.5)
        ramp = min(BASELINE_RAMP_S, cfg.baseline_s / 4)
        cpu0 = cpu_s(server.pid)
        preempted0 = preemptions(server.pid)
        ccpu0 = [cpu_s(c.pid) for c in clients]
        busy0, own0 = system_busy_s(), own_cpu_s()
        t0 = time.monotonic()
        await server.send({"cmd": "blast", "seconds": cfg.baseline_s})
        await trio.sleep(ramp)  # measure the steady state, not the ramp
        marks0 = await call_all(clients, [{"cmd": "mark"}] * len(clients))
        await trio.sleep(cfg.baseline_s - ramp - BASELINE_TAIL_S)
        marks1 = await call_all(clients, [{"cmd": "mark"}] * len(clients))
        blast = await server.recv(cfg.baseline_s + 60)
        cpu1 = cpu_s(server.pid)
        preempted1 = preemptions(server.pid)
        elapsed = time.monotonic() - t0
        ccpu = [(cpu_s(c.pid) - a) / elapsed for c, a in zip(clients, ccpu0, strict=True)]
        busy1, own1 = system_busy_s(), own_cpu_s()
        other = (busy1 - busy0 - (own1 - own0)) / elapsed - sum(ccpu) - (cpu1 - cpu0) / elapsed
        await call_all(clients, [{"cmd": "close"}] * len(clients))
        await server.send({"cmd": "exit"})
    frames_per_s = rate_between(marks0, marks1)
    return {
        "frames_per_s": frames_per_s,
        "server_sent_per_s": blast["sent"] / blast["secs"],
        "server_cpu_s": cpu1 - cpu0,
        "server_cpu_util": (cpu1 - cpu0) / blast["secs"],
        "client_cpu_util": ccpu,
        "server_preemptions_per_s": (preempted1 - preempted0) / elapsed,
        "other_processes_cpu_util": other,
        "frames_per_server_cpu_s": frames_per_s / max(1e-9, (cpu1 - cpu0) / blast["secs"]),
        "connect_s": connect_s,
    }


async def sweep_point(
    cfg: Config, clients: list[Child], tmp: Path, payload: bytes,
) -> dict[str, Any]:
    """seqactor (saturated), raw, Bun and ws at one member count (``cfg`` from
    :func:`sweep_config`)."""
    print(f"sweep: {cfg.members} members (seqactor at {cfg.rate_per_s:g} allocations/s, "
          "raw, Bun, ws) ...", flush=True)
    seq = await seqactor_phase(cfg, clients, tmp, None)
    point: dict[str, Any] = {
        "members": cfg.members, "rate_per_s": cfg.rate_per_s,
        "seqactor_frames_per_s": seq["frames_per_s"],
        "seqactor_frames_per_server_cpu_s": seq["frames_per_server_cpu_s"],
        "seqactor_staleness_p99_ms": seq["staleness_p99_ms"],  # as read by the probe
        "seqactor_socket_staleness_p99_ms": seq["socket_staleness_p99_ms"],
    }
    for kind in ("raw", "bun", "ws"):
        b = await baseline_phase(kind, cfg, clients, payload)
        point[f"{kind}_frames_per_s"] = b["frames_per_s"]
        point[f"{kind}_frames_per_server_cpu_s"] = b["frames_per_server_cpu_s"]
    point["frames_vs_raw_socket"] = point["seqactor_frames_per_s"] / point["raw_frames_per_s"]
    point["raw_sweep_ms"] = cfg.members / point["raw_frames_per_s"] * 1000
    point["staleness_p99_vs_raw_sweep"] = point["seqactor_staleness_p99_ms"] / point["raw_sweep_ms"]
    point["socket_staleness_p99_vs_raw_sweep"] = (
        point["seqactor_socket_staleness_p99_ms"] / point["raw_sweep_ms"])
    return point


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
        async with client_processes(CLIENT_PROCESSES + 1) as clients:  # the last: the probe
            print(f"seqactor: {cfg.members} members, {cfg.rate_per_s:g} allocations/s", flush=True)
            seq = await seqactor_phase(cfg, clients, tmp, profile)
            payload = typical_push()
            base: dict[str, dict[str, Any]] = {}
            for kind in ("naive", "raw", "bun", "ws"):
                print(f"{BASELINES[kind][0]}: {cfg.members} connections", flush=True)
                base[kind] = await baseline_phase(kind, cfg, clients, payload)
            sweep = [await sweep_point(sweep_config(cfg, m), clients, tmp, payload)
                     for m in ([] if profile else cfg.sweep)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    naive, raw, bun, ws = base["naive"], base["raw"], base["bun"], base["ws"]
    raw_sweep_ms = cfg.members / raw["frames_per_s"] * 1000
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
        "bun_frames_per_s": bun["frames_per_s"],
        "ws_frames_per_s": ws["frames_per_s"],
        "frames_vs_bun": seq["frames_per_s"] / bun["frames_per_s"],
        "frames_vs_ws": seq["frames_per_s"] / ws["frames_per_s"],
        "seqactor_frames_per_server_cpu_s": seq["frames_per_server_cpu_s"],
        "raw_frames_per_server_cpu_s": raw["frames_per_server_cpu_s"],
        "bun_frames_per_server_cpu_s": bun["frames_per_server_cpu_s"],
        "ws_frames_per_server_cpu_s": ws["frames_per_server_cpu_s"],
        "naive_frames_per_server_cpu_s": naive["frames_per_server_cpu_s"],
        "raw_server_cpu_s": raw["server_cpu_s"],
        "bun_server_cpu_s": bun["server_cpu_s"],
        "ws_server_cpu_s": ws["server_cpu_s"],
        "raw_sweep_ms": raw_sweep_ms,
        # the goal's ratio is at the member's socket (the probe's read adds its own delay, up
        # to PROBE_POLL_S); the ratio as read is kept beside it
        "socket_staleness_p99_vs_raw_sweep": seq["socket_staleness_p99_ms"] / raw_sweep_ms,
        "staleness_p99_vs_raw_sweep": seq["staleness_p99_ms"] / raw_sweep_ms,
        "load_average_at_start": load_at_start,
        "goal_staleness_p99_ms": GOAL_STALENESS_P99_MS,
        "goal_staleness_met": seq["staleness_p99_ms"] <= GOAL_STALENESS_P99_MS,
        "goal_frames_vs_naive": GOAL_FRAMES_VS_NAIVE,
        "goal_frames_vs_naive_met": seq["frames_per_s"] / naive["frames_per_s"] >= GOAL_FRAMES_VS_NAIVE,
        "goal_rss_per_session_kb": GOAL_RSS_PER_SESSION_KB,
        "goal_rss_per_session_met": seq["rss_per_session_kb"] <= GOAL_RSS_PER_SESSION_KB,
        "goal_frames_vs_raw_socket": GOAL_FRAMES_VS_RAW,
        "goal_frames_vs_raw_socket_met": seq["frames_per_s"] / raw["frames_per_s"] >= GOAL_FRAMES_VS_RAW,
        "goal_staleness_vs_raw_sweep": GOAL_STALENESS_VS_SWEEP,
        "goal_staleness_vs_raw_sweep_met":
            seq["socket_staleness_p99_ms"] / raw_sweep_ms <= GOAL_STALENESS_VS_SWEEP,
        "sweep": sweep,
        "seqactor": seq,
        "naive": naive,
        "raw_socket": raw,
        "bun": bun,
        "ws": ws,
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
    s, n, w, b, ws = r["seqactor"], r["naive"], r["raw_socket"], r["bun"], r["ws"]

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
        ("Bun server.publish frames/s", f"{r['bun_frames_per_s']:,.0f}",
         f"server cpu {b['server_cpu_util']:.2f} ({b['server_cpu_s']:.1f} s)"),
        ("Node ws client.send frames/s", f"{r['ws_frames_per_s']:,.0f}",
         f"server cpu {ws['server_cpu_util']:.2f} ({ws['server_cpu_s']:.1f} s)"),
        ("seqactor / naive", f"{r['frames_vs_naive']:.2f}x",
         f">= {GOAL_FRAMES_VS_NAIVE:g}x: {ok(r['goal_frames_vs_naive_met'])}"),
        ("seqactor / raw ceiling", f"{r['frames_vs_raw_socket']:.2f}x",
         f">= {GOAL_FRAMES_VS_RAW:g}x: {ok(r['goal_frames_vs_raw_socket_met'])}"),
        ("seqactor / Bun / ws", f"{r['frames_vs_bun']:.2f}x / {r['frames_vs_ws']:.2f}x", ""),
        ("frames per server cpu-s: seqactor / raw",
         f"{s['frames_per_server_cpu_s']:,.0f} / {w['frames_per_server_cpu_s']:,.0f}",
         f"seqactor/raw {s['frames_per_server_cpu_s'] / w['frames_per_server_cpu_s']:.2f}x"),
        ("frames per server cpu-s: Bun / ws / naive",
         f"{b['frames_per_server_cpu_s']:,.0f} / {ws['frames_per_server_cpu_s']:,.0f} / "
         f"{n['frames_per_server_cpu_s']:,.0f}", f"seqactor/naive {r['frames_per_cpu_vs_naive']:.2f}x"),
        ("at the socket: p50 / p90 / p99 ms",
         f"{s['socket_staleness_p50_ms']:.1f} / {s['socket_staleness_p90_ms']:.1f} / "
         f"{s['socket_staleness_p99_ms']:.1f}",
         "kernel receive time (SO_TIMESTAMPNS)" if r["config"]["client_transport"] == "raw"
         else "tws transport: no socket times, as read"),
        ("p99 staleness at the socket / raw sweep",
         f"{r['socket_staleness_p99_vs_raw_sweep']:.2f}x",
         f"sweep {r['raw_sweep_ms']:.1f} ms = members / raw frames/s; <= "
         f"{GOAL_STALENESS_VS_SWEEP:g}x: {ok(r['goal_staleness_vs_raw_sweep_met'])}"),
        ("p99 staleness as read / raw sweep", f"{r['staleness_p99_vs_raw_sweep']:.2f}x",
         f"the probe polls every {PROBE_POLL_S * 1000:g} ms"),
        ("cpu util: server / clients / others",
         f"{s['server_cpu_util']:.2f} / {sum(s['client_cpu_util']):.2f} / "
         f"{s['other_processes_cpu_util']:.2f}", "others: processes outside the bench"),
        ("run-queue wait s/s: server / load / probe",
         f"{s.get('server_runqueue_wait_s_per_s', 0.0):.2f} / "
         + " ".join(f"{w:.2f}" for w in s.get("client_runqueue_wait_s_per_s", [])),
         "runnable, waiting for a core (schedstat)"),
        ("server preempted /s: seqactor / raw",
         f"{s.get('server_preemptions_per_s', 0.0):,.0f} / "
         f"{r['raw_socket'].get('server_preemptions_per_s', 0.0):,.0f}",
         f"switched out while runnable; load processes at nice {LOAD_NICE}"),
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
    if r["sweep"]:
        lines += ["", sweep_table(r["sweep"])]
    lines.append(f"load average at start {' / '.join(f'{x:.2f}' for x in r['load_average_at_start'])}")
    return "\n".join(lines)


SWEEP_SERIES = (("seqactor", "seqactor"), ("raw", "raw socket"), ("bun", "Bun publish"),
                ("ws", "Node ws"))


def sweep_table(sweep: list[dict[str, Any]]) -> str:
    """frames/s (k) and frames per server CPU-second (k) per member count."""
    names = " ".join(f"{k:>8}" for k, _ in SWEEP_SERIES)
    lines = [
        "member sweep: push frames/s (k) | frames per server cpu-s (k) | staleness at the socket",
        f"{'members':>7} {'allocs/s':>8} {names} | {names} | {'seq/raw':>7} {'p99 ms':>7} "
        f"{'p99/sweep':>9}",
    ]
    for p in sweep:
        rates = " ".join(f"{p[f'{k}_frames_per_s'] / 1000:8.1f}" for k, _ in SWEEP_SERIES)
        per_cpu = " ".join(f"{p[f'{k}_frames_per_server_cpu_s'] / 1000:8.1f}" for k, _ in SWEEP_SERIES)
        lines.append(
            f"{p['members']:>7} {p['rate_per_s']:>8.0f} {rates} | {per_cpu} | "
            f"{p['frames_vs_raw_socket']:6.2f}x {p['seqactor_socket_staleness_p99_ms']:7.1f} "
            f"{p['socket_staleness_p99_vs_raw_sweep']:8.2f}x"
        )
    return "\n".join(lines)


def plot(r: dict[str, Any], full: bool) -> list[Path]:
    """The staleness CDF at N and, with a sweep, frames/s against members; returns the paths."""
    s = r["seqactor"]
    cdf = plot_path("fanout_staleness_cdf.png", full)
    with figure(cdf, figsize=(7, 4)) as (_, ax):
        qs = s["socket_staleness_cdf_ms"]
        ax.plot(qs, [i / (len(qs) - 1) for i in range(len(qs))], color="#1f77b4",
                label=f"at the socket: p50 {s['socket_staleness_p50_ms']:.0f} ms, "
                      f"p99 {s['socket_staleness_p99_ms']:.0f} ms")
        qs = s["staleness_cdf_ms"]
        ax.plot(qs, [i / (len(qs) - 1) for i in range(len(qs))], color="#9ecae1",
                linestyle="--", label=f"as read by the probe: p50 {s['staleness_p50_ms']:.0f} ms, "
                                      f"p99 {s['staleness_p99_ms']:.0f} ms")
        ax.axvline(r["raw_sweep_ms"], color="grey", linestyle="--", linewidth=1,
                   label=f"raw sweep time {r['raw_sweep_ms']:.0f} ms (members / raw frames/s)")
        ax.axvline(r["raw_sweep_ms"] * GOAL_STALENESS_VS_SWEEP, color="#d62728", linestyle=":",
                   linewidth=1, label=f"goal: p99 <= {GOAL_STALENESS_VS_SWEEP:g}x sweep")
        ax.set_xlabel("staleness (ms): Allocated at the backend -> member holds the seq")
        ax.set_ylabel("fraction of (member, seq) points")
        ax.set_ylim(0, 1.0)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title(f"Fan-out staleness, {r['members']:,} members, {r['rate_per_s']:g} allocations/s "
                     f"(git {r['machine']['git_head']})", fontsize=10)
    paths = [cdf]
    if r["sweep"]:
        members_png = plot_path("fanout_members.png", full)
        members = [p["members"] for p in r["sweep"]]
        with figure(members_png, 1, 2, figsize=(11, 4)) as (fig, (left, right)):
            for key, label in SWEEP_SERIES:
                left.plot(members, [p[f"{key}_frames_per_s"] / 1000 for p in r["sweep"]],
                          marker="o", label=label)
                right.plot(members, [p[f"{key}_frames_per_server_cpu_s"] / 1000 for p in r["sweep"]],
                           marker="o", label=label)
            for ax, what in ((left, "push frames/s (thousands)"),
                             (right, "frames per server CPU-second (thousands)")):
                ax.set_xscale("log", base=2)
                ax.set_xticks(members, [f"{m / 1000:g}k" for m in members])
                ax.set_xlabel("members (connections)")
                ax.set_ylabel(what)
                ax.set_ylim(bottom=0)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
            fig.suptitle("Fan-out of one push frame to every member: seqactor (saturated) vs the "
                         f"peers, same clients (git {r['machine']['git_head']})", fontsize=10)
        paths.append(members_png)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="2 000 members, 5 s window, sweep of 1 000 and 4 000 (< 90 s)")
    ap.add_argument("--members", type=int, help="override the member count")
    ap.add_argument("--rate", type=float, help="override allocations per second")
    ap.add_argument("--duration", type=float, help="override the measured window, seconds")
    ap.add_argument("--sweep", help="member counts of the sweep, comma-separated (0: none)")
    ap.add_argument("--client-transport", choices=("raw", "tws"), default="raw",
                    help="clients read with a minimal frame parser (raw, default) or "
                    "trio-websocket get_message (tws)")
    ap.add_argument("--profile", help="py-spy the server over the window: OUT.svg (flamegraph), "
                    "OUT.txt (collapsed stacks) or OUT.json (speedscope); results not saved")
    ap.add_argument("--out", default=str(RESULTS), help="results JSON (default %(default)s)")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    overridden = (args.members is not None or args.rate is not None or args.duration is not None
                  or args.sweep is not None or args.client_transport != "raw")
    cfg.client_transport = args.client_transport
    if args.members is not None:
        cfg.members = args.members
    if args.rate is not None:
        cfg.rate_per_s = args.rate
    if args.duration is not None:
        cfg.duration_s = args.duration
    if args.sweep is not None:
        cfg.sweep = tuple(int(m) for m in args.sweep.split(",") if int(m) > 0)
    raise_nofile()
    t0 = time.monotonic()
    result = trio.run(run, cfg, args.profile)
    result["total_s"] = time.monotonic() - t0
    print()
    print(table(result))
    print(f"total {result['total_s']:.0f} s")
    if not args.profile:
        for path in plot(result, full=cfg.mode == "full" and not overridden):
            print(f"wrote {path}")
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
