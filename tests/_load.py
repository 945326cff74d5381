"""Helpers shared by the reliability tests and ``bench/reliability.py``.

* server subprocesses: the real ``seqactor serve`` (crash, storm, fd exhaustion) or this module
  as a launcher (``python -m tests._load serve ...``) for settings the CLI has no flag for
  (``write_timeout_s``, limits);
* crowds of SDK clients, a model of the expected views, convergence checks;
* raw sessions that never read (stuck consumers), RSS and metrics of the server process;
* a store invariant check (read <= max, min <= max, views and members agree).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio_websocket as tws

from seqactor import Backoff, Client, SeqactorError, ServiceClient
from seqactor._kernel import decode_update
from seqactor._proto import seqactor_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
SEQACTOR = [sys.executable, "-m", "seqactor.cli"]
LAUNCHER = [sys.executable, "-m", "tests._load"]
START_TIMEOUT_S = 30.0
STUCK_RCVBUF_BYTES = 4096
Row = tuple[int, int, int, int]  # max, read, min, time_ms

# The secret of tests/_harness.py, so its token() works against subprocess servers too.
SECRET = b"test-secret-0123456789abcdef0123456789"


def token(user: str, role: str = "user", ttl: float = 3600) -> str:
    from seqactor.auth import issue_token

    return issue_token(SECRET, user, role=role, ttl_s=ttl)


# ------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile(want: int | None = None) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit (to the hard limit by default)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_status_kb(pid: int, key: str = "VmRSS") -> int:
    """A ``/proc/<pid>/status`` memory figure in kB (VmRSS now, VmHWM peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def write_secret(path: Path) -> Path:
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o600)
    return path


class ServerProcess:
    """A server in a child process; ``url`` once it printed ``listening on ...``."""

    def __init__(self, proc: trio.Process, url: str, log_path: Path) -> None:
        self.proc = proc
        self.url = url
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    @classmethod
    async def start(
        cls, argv: list[str], log_path: Path, preexec_fn: Callable[[], None] | None = None,
    ) -> ServerProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        with open(log_path, "ab") as log:
            proc = await trio.lowlevel.open_process(
                argv, stdout=subprocess.PIPE, stderr=log, env=env, cwd=str(ROOT),
                preexec_fn=preexec_fn,
            )
        buf = b""
        try:
            with trio.fail_after(START_TIMEOUT_S):
                while b"\n" not in buf:
                    assert proc.stdout is not None
                    chunk = await proc.stdout.receive_some(4096)
                    if not chunk:
                        raise RuntimeError(f"server did not start:\n{log_path.read_text()[-3000:]}")
                    buf += chunk
        except BaseException:
            proc.kill()
            raise
        line = buf.split(b"\n")[0].decode()
        assert line.startswith("listening on "), line
        return cls(proc, line.split()[-1], log_path)

    def kill9(self) -> None:
        self.proc.kill()  # SIGKILL

    async def stop(self, timeout: float = 30.0) -> int:
        if self.proc.returncode is None:
            self.proc.terminate()  # SIGTERM: graceful
        with trio.move_on_after(timeout):
            return await self.proc.wait()
        self.proc.kill()
        return await self.proc.wait()

    def rss_kb(self) -> int:
        return proc_status_kb(self.pid, "VmRSS")

    def alive(self) -> bool:
        return self.proc.poll() is None


def serve_argv(port: int, store: str, secret_file: Path, *extra: str) -> list[str]:
    """``seqactor serve`` exactly as a user runs it."""
    return [*SEQACTOR, "serve", "--host", "127.0.0.1", "--port", str(port), "--store", store,
            "--secret-file", str(secret_file), *extra]


def launcher_argv(port: int, store: str, **config: Any) -> list[str]:
    """This module as a server with any ``ServerConfig`` field and store limits (see main)."""
    return [*LAUNCHER, "serve", "--port", str(port), "--store", store,
            "--config", json.dumps(config)]


def metric(port: int, name: str, labels: str = "") -> float:
    """One sample of the Prometheus text at ``http://127.0.0.1:port/metrics`` (0 if absent);
    ``labels`` as printed, e.g. ``{code="1001"}``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    prefix = f"{name}{labels} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


async def metric_async(port: int, name: str, labels: str = "") -> float:
    return await trio.to_thread.run_sync(metric, port, name, labels)


# ------------------------------------------------------------------ the expected views


@dataclass
class Model:
    """What the backend did, enough to know every user's exact view when nobody marks read
    and nobody is removed: members join before anything is allocated (read stays 0)."""

    members: dict[str, set[str]] = field(default_factory=dict)  # conversation -> users
    max: dict[str, int] = field(default_factory=dict)
    time_ms: dict[str, int] = field(default_factory=dict)

    def joined(self, cid: str, users: Iterable[str]) -> None:
        self.members.setdefault(cid, set()).update(users)

    def allocated(self, cid: str, last: int, time_ms: int) -> None:
        if last > self.max.get(cid, 0):
            self.max[cid] = last
            self.time_ms[cid] = time_ms

    def views(self) -> dict[str, dict[str, Row]]:
        out: dict[str, dict[str, Row]] = {}
        for cid, users in self.members.items():
            row = (self.max.get(cid, 0), 0, 0, self.time_ms.get(cid, 0))
            for uid in users:
                out.setdefault(uid, {})[cid] = row
        return out


def view_rows(view: Any) -> dict[str, Row]:
    """A store ``ViewData`` as ``{conversation: (max, read, min, time_ms)}``."""
    return {
        cid: (view.max_seq[i], view.read_seq[i], view.min_seq[i], view.time_ms[i])
        for i, cid in enumerate(view.conversation_ids)
    }


async def snapshot(url: str, user: str) -> dict[str, Row]:
    """A fresh full snapshot of ``user``'s view (a new session without a device id)."""
    async with tws.open_websocket_url(url) as conn:
        hello = pb.ClientMessage(request_id=1, hello=pb.Hello(token=token(user)))
        await conn.send_message(hello.SerializeToString())
        reply = pb.ServerMessage.FromString(await conn.get_message())
        assert reply.WhichOneof("body") == "welcome", reply
        get = pb.ClientMessage(request_id=2, get_sequences=pb.GetSequences())
        await conn.send_message(get.SerializeToString())
        while True:
            msg = pb.ServerMessage.FromString(await conn.get_message())
            if msg.request_id == 2:
                convs, _tok, full, _removed = decode_update(msg.update.SerializeToString())
                assert full
                return {cid: seqs[:4] for cid, seqs in convs.items()}  # as Client.rows()


def check_store_invariants(store: Any) -> dict[str, int]:
    """Walk a memory/SQLite store's visible state: every read <= max (the frozen max for
    kept-history rows), min <= max, every member row in its user's view and back, active
    counts right. Returns {conversation: max} for callers that check allocations."""
    state = store._state
    for cid, conv in state.convs.items():
        assert 0 <= conv.min <= conv.max, (cid, conv.min, conv.max)
        active = 0
        for uid, m in conv.members.items():
            assert state.views[uid][cid] is m, (cid, uid)
            top = m.fmax if m.frozen else conv.max
            assert m.read <= top, (cid, uid, m.read, top)
            if m.frozen:
                assert m.fmin <= m.fmax <= conv.max, (cid, uid)
            else:
                active += 1
        assert conv.active == active, (cid, conv.active, active)
        assert len(conv.members) <= store.max_conversation_members
    for uid, view in state.views.items():
        assert len(view) <= store.max_view_conversations, uid
        for cid, m in view.items():
            assert state.convs[cid].members[uid] is m, (uid, cid)
    return {cid: conv.max for cid, conv in state.convs.items()}


# ------------------------------------------------------------------ crowds of clients


def drop_link(client: Client) -> bool:
    """Cut a client's connection abruptly, as a network failure would (both ends see the TCP
    connection end); the client then reconnects on its own. False if it was not connected."""
    link = client._link
    if link is None:
        return False
    sock = getattr(getattr(link.stream, "inner", None), "socket", None)
    if sock is None:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    return True


class Crowd:
    """Many SDK clients, one per user, each in its own task until the crowd is closed."""

    def __init__(self, url: str, users: list[str], backoff: Callable[[int], Backoff],
                 device: str = "phone") -> None:
        self.url = url
        self.users = users
        self.backoff = backoff
        self.device = device
        self.clients: dict[str, Client] = {}
        self.errors: list[BaseException] = []

    async def run(self, concurrency: int = 100,
                  task_status: trio.TaskStatus[Crowd] = trio.TASK_STATUS_IGNORED) -> None:
        limiter = trio.CapacityLimiter(concurrency)
        all_in = trio.Event()

        async def one(i: int, user: str) -> None:
            await limiter.acquire()
            held = True
            try:
                async with Client.connect(self.url, token(user, ttl=86_400),
                                          device_id=self.device,
                                          backoff=self.backoff(i)) as client:
                    limiter.release()
                    held = False
                    self.clients[user] = client
                    if len(self.clients) == len(self.users):
                        all_in.set()
                    await trio.sleep_forever()
            except SeqactorError as exc:
                self.errors.append(exc)
                all_in.set()
            finally:
                if held:
                    limiter.release()

        async with trio.open_nursery() as nursery:
            for i, user in enumerate(self.users):
                nursery.start_soon(one, i, user)
            await all_in.wait()
            if self.errors:
                raise self.errors[0]
            task_status.started(self)

    def drop_all(self) -> int:
        """Cut every connection in one synchronous sweep (no checkpoint in between)."""
        return sum(drop_link(c) for c in self.clients.values())

    def diverged(self, expected: dict[str, dict[str, Row]]) -> list[str]:
        return [u for u, c in self.clients.items()
                if not c.connected or c.rows() != expected.get(u, {})]


async def wait_reconnected(crowd: Crowd, connects_before: dict[str, int], timeout: float) -> float:
    """Seconds until every client made a new connection (after a drop) and is synced."""
    start = trio.current_time()
    with trio.fail_after(timeout):
        while not all(c.connected and c.stats.connects > connects_before[u]
                      for u, c in crowd.clients.items()):
            await trio.sleep(0.02)
    return trio.current_time() - start


def jittered(base_s: float, cap_s: float, seed: int = 0) -> Callable[[int], Backoff]:
    return lambda i: Backoff(base_s, cap_s, rng=random.Random(seed * 1_000_003 + i))


async def wait_converged(crowd: Crowd, expected: Callable[[], dict[str, dict[str, Row]]],
                         timeout: float, poll_s: float = 0.05) -> float:
    """Seconds until every client holds exactly its expected view; raises on timeout."""
    start = trio.current_time()
    with trio.move_on_after(timeout):
        while True:
            if not crowd.diverged(expected()):
                return trio.current_time() - start
            await trio.sleep(poll_s)
    bad = crowd.diverged(expected())
    want = expected()
    sample = [(u, crowd.clients[u].connected, crowd.clients[u].rows(), want.get(u))
              for u in bad[:3]]
    raise AssertionError(f"{len(bad)} clients did not converge in {timeout}s: {sample}")


# ------------------------------------------------------------------ stuck consumers


async def stuck_session(nursery: trio.Nursery, port: int, user: str,
                        rcvbuf: int = STUCK_RCVBUF_BYTES) -> tws.WebSocketConnection:
    """A session that says Hello, subscribes to everything, then never reads again (a small
    receive buffer, and trio-websocket's reader blocks after one queued frame)."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    conn = await tws.wrap_client_stream(
        nursery, trio.SocketStream(sock), "127.0.0.1", "/v1", message_queue_size=0,
    )
    for rid, msg in ((1, pb.ClientMessage(request_id=1, hello=pb.Hello(token=token(user)))),
                     (2, pb.ClientMessage(request_id=2, subscribe=pb.Subscribe(all=True)))):
        await conn.send_message(msg.SerializeToString())
        while pb.ServerMessage.FromString(await conn.get_message()).request_id != rid:
            pass
    return conn


async def setup_members(svc: ServiceClient, model: Model, groups: dict[str, list[str]],
                        chunk: int = 2_000) -> None:
    for cid, users in groups.items():
        for i in range(0, len(users), chunk):
            await svc.add_members(cid, users[i:i + chunk])
        model.joined(cid, users)


# ------------------------------------------------------------------ launcher


async def _serve_main(args: argparse.Namespace) -> None:
    import signal

    from seqactor.server.config import ServerConfig
    from seqactor.server.gateway import Server
    from seqactor.store import open_store

    config = json.loads(args.config)
    store = open_store(args.store)
    cfg = ServerConfig(host="127.0.0.1", port=args.port, **config)
    server = Server(cfg, store, SECRET)

    async def on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                server.stop()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signal)
        await server.serve(on_listening=lambda url: print(f"listening on {url}", flush=True))
        nursery.cancel_scope.cancel()


def main() -> None:
    ap = argparse.ArgumentParser(description="test server launcher")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--store", default="memory://")
    s.add_argument("--config", default="{}", help="ServerConfig fields (JSON)")
    args = ap.parse_args()
    from seqactor._logging import setup_logging

    setup_logging("WARNING")
    trio.run(_serve_main, args)


if __name__ == "__main__":
    main()
