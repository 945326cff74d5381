"""Real redis-server processes for the tests: a standalone server and a local 3-master cluster.

Each server runs on a free port with its own temporary directory. ``shared_redis()`` and
``shared_cluster()`` start one server / cluster per test session on first use (stopped at
exit); tests isolate themselves with a key prefix (``unique_prefix()``), so they can share it.
Tests that stop, restart or wipe a server start their own with :class:`RedisServer`.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from seqactor.store import Store

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
START_TIMEOUT_S = 10.0
CLUSTER_BUS_PORT_OFFSET = 10_000  # Redis Cluster's bus listens on port + 10000


def require_redis() -> None:
    """redis-server is a test dependency (``make test`` installs it): missing is a failure."""
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.fail("redis-server / redis-cli not installed: run `make system-deps`")

_prefixes = itertools.count(1)


def unique_prefix() -> str:
    """A key prefix no other test in this session uses."""
    return f"t{os.getpid()}x{next(_prefixes)}"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster: bool = False) -> int:
    """A free TCP port (and, for cluster nodes, a free bus port at +10000)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if cluster and (port + CLUSTER_BUS_PORT_OFFSET > 65535
                        or not _port_free(port + CLUSTER_BUS_PORT_OFFSET)):
            continue
        return port
    raise RuntimeError("no free port found")


def cli(port: int, *args: str, check: bool = True) -> str:
    assert REDIS_CLI is not None
    out = subprocess.run(
        [REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True, text=True, timeout=30, check=check,
    )
    return out.stdout


class RedisServer:
    """One redis-server process on a fixed port and data directory (restartable)."""

    def __init__(
        self,
        port: int | None = None,
        data_dir: Path | None = None,
        *,
        appendonly: bool = True,
        appendfsync: str = "always",
        cluster: bool = False,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.cluster = cluster
        self.extra_args = extra_args
        self.port = port or free_port(cluster)
        self._tmp = None
        if data_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="seqactor-redis-")
            data_dir = Path(self._tmp)
        self.data_dir = data_dir
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        require_redis()
        assert REDIS_SERVER is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.data_dir), "--save", "", "--protected-mode", "no",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync, "--loglevel", "warning",
        ]
        args += list(self.extra_args)
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "5000"]
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.data_dir / 'redis.log').read_text()}")
            try:
                if cli(self.port, "PING", check=False).strip() == "PONG":
                    return self
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the process (SIGTERM: with AOF, everything acknowledged is on disk)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown work (AOF with appendfsync always still has every write)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def wipe(self) -> None:
        """Stop and delete the data directory's contents (a fresh, empty Redis on restart)."""
        self.stop()
        for p in self.data_dir.iterdir():
            if p.is_dir():
                shutil.rmtree(p)
            elif p.name != "redis.log":
                p.unlink()

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


class RedisSentinel:
    """One Sentinel process watching the master ``name`` at ``master_port`` (quorum 1, fast
    timeouts: a dead master is failed over in about a second)."""

    DOWN_AFTER_MS = 300  # no reply from the master this long: down
    FAILOVER_TIMEOUT_MS = 3000

    def __init__(self, master_port: int, name: str = "seqactor") -> None:
        self.name = name
        self.master_port = master_port
        self.port = free_port()
        self._tmp = tempfile.mkdtemp(prefix="seqactor-sentinel-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisSentinel:
        require_redis()
        assert REDIS_SERVER is not None
        conf = Path(self._tmp) / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {self._tmp}\n"
            f"sentinel monitor {self.name} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {self.name} {self.DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {self.name} {self.FAILOVER_TIMEOUT_MS}\n"
        )
        log = open(Path(self._tmp) / "sentinel.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"], stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while cli(self.port, "PING", check=False).strip() != "PONG":
            if time.monotonic() > deadline:
                raise RuntimeError("sentinel did not start")
            time.sleep(0.02)
        return self

    def master_port_now(self) -> int:
        """The port of the master Sentinel currently names."""
        out = cli(self.port, "SENTINEL", "get-master-addr-by-name", self.name).split()
        return int(out[1])

    def replicas_known(self) -> int:
        out = cli(self.port, "SENTINEL", "replicas", self.name)
        return out.count("\nname\n") + out.startswith("name\n")

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self._tmp, ignore_errors=True)


class RedisCluster:
    """A local Redis Cluster: ``masters`` nodes with ``replicas`` replicas each (default none),
    slots spread evenly."""

    def __init__(self, masters: int = 3, replicas: int = 0) -> None:
        self.replicas = replicas
        self.nodes = [RedisServer(cluster=True, appendfsync="everysec")
                      for _ in range(masters * (1 + replicas))]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisCluster:
        for n in self.nodes:
            n.start()
        cli(self.nodes[0].port, "--cluster", "create",
            *[f"127.0.0.1:{n.port}" for n in self.nodes],
            "--cluster-replicas", str(self.replicas), "--cluster-yes")
        deadline = time.monotonic() + START_TIMEOUT_S * 3
        while True:
            states = [cli(n.port, "CLUSTER", "INFO", check=False) for n in self.nodes]
            repl = [cli(n.port, "INFO", "replication", check=False) for n in self.nodes]
            synced = all("role:master" in r or "master_link_status:up" in r for r in repl)
            if all("cluster_state:ok" in s for s in states) and synced:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster did not converge: {states}")
            time.sleep(0.05)

    def cleanup(self) -> None:
        for n in self.nodes:
            n.cleanup()


_shared: dict[str, RedisServer | RedisCluster] = {}


def shared_redis() -> RedisServer:
    """The session's standalone server (AOF, appendfsync always), started on first use."""
    srv = _shared.get("redis")
    if srv is None:
        srv = _shared["redis"] = RedisServer().start()
        atexit.register(srv.cleanup)
    assert isinstance(srv, RedisServer)
    return srv


def shared_cluster() -> RedisCluster:
    """The session's local 3-master cluster, started on first use."""
    cl = _shared.get("cluster")
    if cl is None:
        cl = RedisCluster()
        _shared["cluster"] = cl
        atexit.register(cl.cleanup)
        cl.start()
    assert isinstance(cl, RedisCluster)
    return cl


def redis_url(prefix: str, *, cluster: bool = False) -> str:
    """The store URL for a prefix on the shared server or cluster."""
    base = shared_cluster().url if cluster else shared_redis().url
    return f"{base}?prefix={prefix}"


def redis_store_factory(cluster: bool) -> Callable[[Path], Callable[..., Store]]:
    """A ``STORE_FACTORIES`` entry (tests/test_store.py): the stores made for one test share a
    fresh key prefix on the session's server / cluster. Skips when redis-server is missing."""

    def per_test(tmp: Path) -> Callable[..., Store]:
        require_redis()
        from seqactor.store.redis import RedisStore

        url = redis_url(unique_prefix(), cluster=cluster)
        return lambda **kw: RedisStore(url, **kw)

    return per_test
