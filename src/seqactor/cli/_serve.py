"""``seqactor serve``: one server process (``--workers N`` starts N of these, see
:mod:`seqactor.cli._workers`). Every failure to start is one line naming the flag, file or port."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from collections.abc import Awaitable, Callable

import trio

from seqactor.cli._args import CliError, UsageError, unwrap, warn
from seqactor.server import config as S

# The garbage collector of a `seqactor serve` process. Every open session adds ~25 tracked
# objects that live as long as it does, and with CPython's default thresholds (700, 10, 10)
# each is scanned again and again as the heap grows (full collections of 100 ms and more at
# 10 000 sessions: ~90 us of every session open, bench/connect.py). The young generation is
# collected after this many allocations (objects, less deallocations), the middle one after
# this many young collections, the old one after this many middle ones (and, as always, only
# once it has grown by a quarter); everything alive when the server starts listening is
# frozen (gc.freeze: never scanned). Cycles are still collected, a little later.
GC_GEN0_THRESHOLD_OBJECTS = 2_000
GC_GEN1_THRESHOLD_COLLECTIONS = 20
GC_GEN2_THRESHOLD_COLLECTIONS = 20

# Set to a file path: run the server under cProfile and write its stats (pstats) there when
# it stops (what bench/connect.py --cprofile uses; profiling slows the server several-fold).
CPROFILE_ENV = "SEQACTOR_CPROFILE"


def _check_tls(args: argparse.Namespace) -> None:
    import ssl

    if bool(args.tls_cert) != bool(args.tls_key):
        given, missing = ("--tls-cert", "--tls-key") if args.tls_cert else ("--tls-key", "--tls-cert")
        raise UsageError(f"{given} needs {missing} too (both for wss://, neither for ws://)")
    if not args.tls_cert:
        return
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        _check_readable_file(flag, path)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(args.tls_cert, args.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise CliError(
            f"cannot use --tls-cert {args.tls_cert} with --tls-key {args.tls_key}: "
            f"{getattr(exc, 'reason', None) or exc}"
        ) from None



def _check_readable_file(flag: str, path: str) -> None:
    from seqactor._files import FileProblem, check_readable_file

    try:
        st = check_readable_file(flag, path)
    except FileProblem as exc:
        raise CliError(str(exc)) from None
    if st.st_size == 0:
        raise CliError(f"{flag} {path} is empty")



def server_config(args: argparse.Namespace) -> S.ServerConfig:
    """The server settings ``seqactor serve``'s flags ask for."""
    return S.ServerConfig(
        host=args.host, port=args.port,
        hello_timeout_s=args.hello_timeout, heartbeat_interval_s=args.heartbeat_interval,
        max_frame_bytes=args.max_frame_bytes, metrics_port=args.metrics_port,
        tls_cert=args.tls_cert, tls_key=args.tls_key,
        max_ids_per_request=args.max_ids_per_request,
        max_view_conversations=args.max_view_conversations,
        max_conversation_members=args.max_conversation_members,
        rate_limit_ops_per_s=args.rate_limit, max_connections=args.max_connections,
        write_timeout_s=args.write_timeout,
        park_idle_sessions=getattr(args, "park_idle_sessions", True),
        reuse_port=getattr(args, "reuse_port", False),
    )


def serve_one(args: argparse.Namespace) -> int:
    from seqactor._logging import StartupLog
    from seqactor.auth import SecretError, load_or_create_secret, secret_file_warning
    from seqactor.server.gateway import Server
    from seqactor.server.metrics import MetricsPortError
    from seqactor.store import InvalidArgument, StoreError, open_store

    _check_tls(args)
    try:
        store = open_store(args.store)
    except InvalidArgument as exc:
        raise UsageError(f"--store: {exc}") from None
    try:
        secret, created = load_or_create_secret(args.secret_file)
    except SecretError as exc:
        raise CliError(str(exc)) from None
    if created:
        print(f"created secret file {args.secret_file} (mode 0600)", file=sys.stderr, flush=True)
    elif (warning := secret_file_warning(args.secret_file)) is not None:
        warn("serve", warning)
    log = StartupLog(args.log_level)  # a start that fails is one line, not logs + the error
    server = Server(server_config(args), store, secret)

    gc.set_threshold(
        GC_GEN0_THRESHOLD_OBJECTS, GC_GEN1_THRESHOLD_COLLECTIONS, GC_GEN2_THRESHOLD_COLLECTIONS
    )

    def listening(url: str) -> None:
        gc.freeze()  # what the process holds once started (modules, the store) is never scanned
        log.started()
        opened = getattr(store, "path", None)
        if isinstance(opened, str) and opened != ":memory:":  # which file, whatever the URL said
            print(f"seqactor serve: store sqlite:///{os.path.abspath(opened)}", file=sys.stderr,
                  flush=True)
        print(f"listening on {url}", flush=True)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, server)
            await server.serve(on_listening=listening)
            nursery.cancel_scope.cancel()

    try:
        _run_profiled(main) if os.environ.get(CPROFILE_ENV) else trio.run(main)
    except BaseException as exc:  # noqa: BLE001 - unwrapped and re-raised below
        log.failed()
        inner = unwrap(exc)
        if isinstance(inner, StoreError):
            raise CliError(f"store {args.store}: {inner}") from None
        if isinstance(inner, MetricsPortError):
            raise CliError(str(inner.strerror)) from None
        if isinstance(inner, OSError):
            raise CliError(
                f"cannot serve on {args.host}:{args.port}: {inner.strerror or inner}"
            ) from None
        raise
    return 0



def _run_profiled(main: Callable[[], Awaitable[None]]) -> None:
    """``trio.run(main)`` under cProfile; the stats go to ``$SEQACTOR_CPROFILE`` at the end."""
    import cProfile

    profiler = cProfile.Profile()
    try:
        profiler.runcall(trio.run, main)
    finally:
        profiler.dump_stats(os.environ[CPROFILE_ENV])


async def _stop_on_signal(server: object) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            server.stop()  # type: ignore[attr-defined]
            return
