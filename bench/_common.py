"""What every benchmark shares: percentiles, the commit measured, the open-file limit, JSON
results, and child processes driven by JSON lines (with their CPU and memory from /proc).

Import from a bench script (``bench/`` is the script's directory, so it is on ``sys.path``)::

    from _common import percentile, git_head, raise_nofile, write_json

Also the peer servers (``bench/peers/``: Bun and Node + ws, ``make bench-peers``) and the
one plot helper (:func:`figure`: matplotlib, PNG in ``docs/img/``).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IMG = ROOT / "docs" / "img"  # the benchmarks' plots
PEERS = HERE / "peers"  # the peer servers: Bun and Node + ws (make bench-peers)
BUN = PEERS / "node_modules" / "@oven" / "bun-linux-x64" / "bin" / "bun"
WS_MODULE = PEERS / "node_modules" / "ws"
PEER_START_TIMEOUT_S = 30.0
QUANTILE_CUTS = 1000  # percentiles are read from 999 cut points: p0.1 ... p99.9
STOP_TIMEOUT_S = 10.0  # a child asked to stop gets this long before it is killed
CHILD_REPLY_TIMEOUT_S = 600.0  # default wait for one answer line from a child
CHILD_EXIT_TIMEOUT_S = 10.0  # a load client asked to exit gets this long before it is killed


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0 < q < 1, e.g. 0.99) of ``values`` (any order), by
    ``statistics.quantiles`` (inclusive method: interpolated between the two nearest
    samples); rounded to the nearest 0.1 percentile. NaN for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return float(values[0])
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be within (0, 1), got {q}")
    cuts = statistics.quantiles(values, n=QUANTILE_CUTS, method="inclusive")
    index = min(len(cuts) - 1, max(0, round(q * QUANTILE_CUTS) - 1))
    return cuts[index]


def git_head() -> str:
    """The commit measured (short hash, ``+dirty`` when ``src/`` has uncommitted changes:
    the server runs from the working tree); ``?`` outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../src"], cwd=HERE,
                               text=True, capture_output=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def raise_nofile() -> int:
    """Raise this process's open-file limit (RLIMIT_NOFILE) to the hard limit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def write_json(path: Path | str, result: dict[str, Any]) -> Path:
    """Write ``result`` as indented JSON (parent folders made); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------- /proc


def cpu_user_system_s(pid: int) -> tuple[float, float]:
    """CPU seconds (user, system) process ``pid`` has used, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick  # utime, stime


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used, from /proc/<pid>/stat."""
    return sum(cpu_user_system_s(pid))


def _sum_over_threads(pid: int, name: str, value: Callable[[str], int]) -> int:
    """``value`` of each thread's ``/proc/<pid>/task/<tid>/<name>`` text, summed (0 when the
    process is gone; a thread that ended meanwhile, or a file that does not parse, adds 0)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/{name}") as f:
                total += value(f.read())
        except (OSError, ValueError, IndexError):
            continue
    return total


def runqueue_wait_s(pid: int) -> float:
    """Seconds the threads of process ``pid`` have spent runnable but waiting for a CPU (the
    run queue), summed over its threads: the second field of Linux's
    ``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds; ``Documentation/scheduler/sched-stats``).
    0.0 when the kernel does not keep it. Sampled at both ends of a window, it says how long
    a process that had work could not get a core: on this 2-core machine that wait is in a
    push's staleness, not in the sweep time."""
    return _sum_over_threads(pid, "schedstat", lambda text: int(text.split()[1])) / 1e9


def _nonvoluntary_switches(status: str) -> int:
    for line in status.splitlines():
        if line.startswith("nonvoluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def preemptions(pid: int) -> int:
    """Times the threads of process ``pid`` were switched out while still runnable (taken off
    a core by the scheduler, not waiting for anything), summed over its threads:
    ``nonvoluntary_ctxt_switches`` of Linux's ``/proc/<pid>/task/<tid>/status``. Sampled at
    both ends of a window; 0 when unreadable."""
    return _sum_over_threads(pid, "status", _nonvoluntary_switches)


def system_busy_s() -> float:
    """CPU seconds all CPUs spent busy (not idle/iowait) since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    """Resident memory of process ``pid`` in KiB (VmRSS, /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def own_cpu_s() -> float:
    """CPU seconds (user + system) this process has used."""
    t = os.times()
    return t.user + t.system


# --------------------------------------------------------------------------- child processes


def child_setup() -> None:
    """preexec_fn: the hard fd limit.

    (No PR_SET_PDEATHSIG: trio spawns from a worker thread, and the signal fires when that
    thread exits. Children exit on stdin EOF or are stopped in a ``finally``.)
    """
    raise_nofile()


class Child:
    """A subprocess driven by JSON lines (stdin) with JSON-line answers (stdout)."""

    def __init__(self, proc: trio.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self._buf = b""

    @classmethod
    async def start(cls, args: list[str], name: str, stderr: Any = None) -> Child:
        proc = await trio.lowlevel.open_process(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
            preexec_fn=child_setup,
        )
        return cls(proc, name)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def readline(self, timeout: float = CHILD_REPLY_TIMEOUT_S) -> str:
        assert self.proc.stdout is not None
        with trio.fail_after(timeout):
            while b"\n" not in self._buf:
                chunk = await self.proc.stdout.receive_some(65536)
                if not chunk:
                    raise RuntimeError(f"{self.name} exited (rc={self.proc.poll()})")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    async def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all((json.dumps(obj) + "\n").encode())

    async def recv(self, timeout: float = CHILD_REPLY_TIMEOUT_S) -> dict[str, Any]:
        answer: dict[str, Any] = json.loads(await self.readline(timeout))
        if "error" in answer:
            raise RuntimeError(f"{self.name}: {answer}")
        return answer

    async def call(self, obj: dict[str, Any], timeout: float = CHILD_REPLY_TIMEOUT_S) -> dict[str, Any]:
        await self.send(obj)
        return await self.recv(timeout)

    def kill(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass


@asynccontextmanager
async def client_processes(script: Path, n: int) -> AsyncIterator[list[Child]]:
    """``n`` load-client processes running ``script`` (JSON lines on stdin/stdout, see
    :class:`Child`); asked to exit at the end, killed if they do not (or if the body fails)."""
    clients: list[Child] = []
    try:
        for i in range(n):
            clients.append(await Child.start([sys.executable, str(script)], f"client {i}"))
        yield clients
        for c in clients:
            await c.send({"cmd": "exit"})
        for c in clients:
            with trio.move_on_after(CHILD_EXIT_TIMEOUT_S):
                await c.proc.wait()
    finally:
        for c in clients:
            c.kill()


async def stop_process(proc: trio.Process, sig: int = signal.SIGTERM) -> None:
    """Signal ``proc`` (SIGTERM), wait up to ``STOP_TIMEOUT_S``, then kill it."""
    if proc.returncode is not None:
        return
    try:
        proc.send_signal(sig)
        with trio.move_on_after(STOP_TIMEOUT_S):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def peer_argv(name: str, *args: str) -> list[str]:
    """The command line of peer server ``name`` (``"bun"`` or ``"ws"``: ``bench/peers/
    bun_server.js`` under Bun, ``ws_server.js`` under Node) with ``args``; exits with a hint
    when the peers are not installed."""
    for path, what in ((BUN, "Bun"), (WS_MODULE, "ws")):
        if not path.exists():
            raise SystemExit(f"error: {what} is not installed under {PEERS}: run `make bench-peers`")
    if name == "bun":
        return [str(BUN), str(PEERS / "bun_server.js"), *args]
    node = shutil.which("node")
    if node is None:
        raise SystemExit("error: node not found (Node.js runs the ws peer)")
    return [node, str(PEERS / "ws_server.js"), *args]


@asynccontextmanager
async def listening_server(argv: list[str], name: str) -> AsyncIterator[tuple[Child, int]]:
    """A server child that prints ``listening on PORT`` once it accepts (the peers in
    ``bench/peers/``, ``bench/_fanout_servers.py``); yields it and the port; stopped on exit."""
    child = await Child.start(argv, name)
    try:
        line = await child.readline(PEER_START_TIMEOUT_S)
        if not line.startswith("listening on "):
            raise RuntimeError(f"{name} said {line!r}")
        yield child, int(line.split()[-1])
    finally:
        await stop_process(child.proc)


async def call_all(
    children: list[Child], objs: list[dict[str, Any]], timeout: float = CHILD_REPLY_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Send ``objs[i]`` to ``children[i]``, all at once; their answers, in order."""
    answers: list[dict[str, Any]] = [{} for _ in children]

    async def one(i: int) -> None:
        answers[i] = await children[i].call(objs[i], timeout)

    async with trio.open_nursery() as n:
        for i in range(len(children)):
            n.start_soon(one, i)
    return answers


# --------------------------------------------------------------------------- plots


def plot_path(name: str, full: bool) -> Path:
    """Where a benchmark's plot ``name`` goes: ``docs/img/`` for a full run (what the docs
    show), ``bench/results/`` (not committed) for a quick or custom one."""
    return (IMG if full else HERE / "results") / name


@contextmanager
def figure(path: Path, *args: Any, dpi: int = 110, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """``plt.subplots(*args, **kwargs)`` on the Agg backend: yields ``(figure, axes)``; on
    exit the figure is laid out, saved as PNG to ``path`` (folders made) and closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*args, **kwargs)
    try:
        yield fig, axes
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
