"""``seqactor serve --workers N``: N server processes on one port, sharing a Redis store.

A Python process uses one core, so a machine's cores are used by several processes. The
supervisor (the process the user started):

1. refuses a store that is not shared between processes (``sqlite://``, ``memory://``) with
   one line on stderr and exit status 2 — each process would have its own state;
2. creates the secret file if needed (once, before any worker starts);
3. reserves the port: a socket bound with ``SO_REUSEPORT`` (``--port 0`` becomes a free port
   this way), kept bound but not listening, so the number stays ours;
4. starts N workers — ``python -m seqactor.cli._workers <serve arguments as JSON>``, each in its
   own session (a terminal's Ctrl-C reaches only the supervisor) — each listening on that
   port with ``SO_REUSEPORT``: the kernel spreads new connections over them;
5. prints ``listening on ws://H:P/v1`` once every worker listens;
6. on SIGINT or SIGTERM sends SIGTERM to every worker (each sends ``GoAway`` to its sessions
   and closes them with 1001) and waits for them; exit status 0.

A worker that exits on its own (its store failed, it crashed) stops the others: exit 1 with
one line naming it. Every worker talks to the same Redis / Redis Cluster, so a change made
through any of them reaches sessions on all of them (docs/deployment.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from typing import Any

import trio

from seqactor.cli._args import EXIT_FAILURE, EXIT_USAGE
from seqactor.server.listen import reuse_port_socket

EXIT_OK = 0
SHARED_STORE_SCHEMES = ("redis://", "redis+cluster://")
WORKER_START_TIMEOUT_S = 60.0  # every worker must listen within this
WORKER_STOP_TIMEOUT_S = 30.0  # after SIGTERM, a worker that has not exited by then is killed
MAX_WORKERS = 256


def check_workers(args: argparse.Namespace) -> str | None:
    """The usage error of ``--workers`` with this store, or ``None`` when it is fine."""
    if not 1 <= args.workers <= MAX_WORKERS:
        return f"--workers must be between 1 and {MAX_WORKERS}, not {args.workers}"
    if not str(args.store).startswith(SHARED_STORE_SCHEMES):
        return (
            f"--workers {args.workers} needs a store the workers share (redis://host:port/db "
            f"or redis+cluster://host:port,...), not {args.store}"
        )
    return None


def run_workers(args: argparse.Namespace) -> int:
    """The supervisor of ``seqactor serve --workers N`` (see the module docstring); returns
    the exit status."""
    problem = check_workers(args)
    if problem is not None:
        print(f"seqactor serve: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    from seqactor.auth import SecretError, load_or_create_secret

    try:
        _, created = load_or_create_secret(args.secret_file)
    except SecretError as exc:
        print(f"seqactor serve: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if created:
        print(f"created secret file {args.secret_file} (mode 0600)", file=sys.stderr, flush=True)
    try:
        reserved = reuse_port_socket(args.host, args.port)
    except OSError as exc:
        print(f"seqactor serve: error: cannot serve on {args.host}:{args.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    with reserved:
        port = int(reserved.getsockname()[1])
        worker_args = {k: v for k, v in vars(args).items() if _jsonable(v)}
        worker_args.update(port=port, workers=1, reuse_port=True)
        try:
            return trio.run(_supervise, args, worker_args, port)
        except KeyboardInterrupt:
            return EXIT_FAILURE


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


async def _supervise(args: argparse.Namespace, worker_args: dict[str, Any], port: int) -> int:
    n = int(args.workers)
    cmd = [sys.executable, "-m", "seqactor.cli._workers", json.dumps(worker_args)]
    procs: list[trio.Process] = []
    failed: list[str] = []
    stopping = False
    all_listening = trio.Event()
    listening = 0

    async def run_one(i: int, nursery: trio.Nursery) -> None:
        nonlocal listening
        proc = await trio.lowlevel.open_process(
            cmd, stdout=subprocess.PIPE, start_new_session=True,
            env={**os.environ, "SEQACTOR_WORKER": f"{i + 1}/{n}"},
        )
        procs.append(proc)
        assert proc.stdout is not None
        buf = b""
        while b"\n" not in buf:
            chunk = await proc.stdout.receive_some(4096)
            if not chunk:
                break
            buf += chunk
        if b"listening on " in buf:
            listening += 1
            if listening == n:
                all_listening.set()
        while await proc.stdout.receive_some(4096):
            pass
        status = await proc.wait()
        if not stopping:
            failed.append(f"worker {i + 1} (pid {proc.pid}) exited with status {status}")
            nursery.cancel_scope.cancel()

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(run_one, i, nursery)

            async def announce() -> None:
                with trio.move_on_after(WORKER_START_TIMEOUT_S) as timeout:
                    await all_listening.wait()
                if timeout.cancelled_caught:
                    failed.append(f"not every worker listened within {WORKER_START_TIMEOUT_S:g} s")
                    nursery.cancel_scope.cancel()
                    return
                scheme = "wss" if args.tls_cert else "ws"
                # stderr first: whoever waits for the listening line finds the pids written
                print(f"{n} workers share port {port} (pids "
                      f"{' '.join(str(p.pid) for p in procs)})", file=sys.stderr, flush=True)
                print(f"listening on {scheme}://{args.host}:{port}/v1", flush=True)

            nursery.start_soon(announce)
            async for _ in signals:
                stopping = True
                nursery.cancel_scope.cancel()
                break
    stopping = True
    await _stop_all(procs)
    if failed:
        print(f"seqactor serve: error: {failed[0]}; stopped the other workers", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


async def _stop_all(procs: list[trio.Process]) -> None:
    """SIGTERM to every worker still running; SIGKILL to those that outlive the timeout."""
    with trio.CancelScope(shield=True):
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(WORKER_STOP_TIMEOUT_S):
            for proc in procs:
                await proc.wait()
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def worker_main(argv: list[str]) -> int:
    """A worker: ``seqactor serve`` with the supervisor's arguments and a shared port."""
    from seqactor.cli._args import CliError
    from seqactor.cli._serve import serve_one

    args = argparse.Namespace(**json.loads(argv[0]))
    try:
        return serve_one(args)
    except CliError as exc:
        print(f"seqactor serve: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
