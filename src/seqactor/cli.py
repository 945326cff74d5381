"""Command line: ``seqactor serve | token`` (SPEC §6)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

import trio

from seqactor import config as C
from seqactor._cli_store import add_store_parser, cmd_store

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CliError(Exception):
    """A failure reported as one line on stderr and a non-zero exit."""


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve", help="run a seqactor server",
        description="Run a seqactor server.",
        epilog="example: seqactor serve --port 8765 --store sqlite:///var/seqactor.db "
        "--secret-file var/secret",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default=C.DEFAULT_HOST)
    p.add_argument("--port", type=int, default=C.DEFAULT_PORT)
    p.add_argument("--store", default=C.DEFAULT_STORE_URL,
                   help="memory://, sqlite:///path (default %(default)s)")
    p.add_argument("--secret-file", required=True,
                   help="HS256 secret; created (random, mode 0600) when missing")
    p.add_argument("--hello-timeout", type=float, default=C.HELLO_TIMEOUT_S, metavar="S")
    p.add_argument("--heartbeat-interval", type=float, default=C.HEARTBEAT_INTERVAL_S, metavar="S")
    p.add_argument("--max-frame-bytes", type=int, default=C.MAX_FRAME_BYTES, metavar="N")
    p.add_argument("--metrics-port", type=int, default=None, metavar="P")
    p.add_argument("--tls-cert", default=None, metavar="F")
    p.add_argument("--tls-key", default=None, metavar="F")
    p.add_argument("--log-level", default="INFO")


def _token_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from seqactor.auth import DEFAULT_TOKEN_TTL_S

    p = sub.add_parser(
        "token", help="print a signed token",
        description="Print a JWT (HS256) for a user or a service, alone on stdout.",
        epilog="example: seqactor token --secret-file var/secret --user alice --ttl 3600",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--secret-file", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--role", choices=("user", "service"), default="user")
    p.add_argument("--ttl", type=float, default=DEFAULT_TOKEN_TTL_S, metavar="SECONDS")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqactor",
        description="Real-time conversation sequence service for IM systems.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _token_parser(sub)
    add_store_parser(sub)
    return parser


def cmd_token(args: argparse.Namespace) -> int:
    from pathlib import Path

    from seqactor.auth import issue_token
    from seqactor.store import StoreError

    path = Path(args.secret_file)
    if not path.exists():
        raise CliError(f"secret file {path} does not exist (seqactor serve creates it)")
    secret = path.read_bytes().strip()
    try:
        print(issue_token(secret, args.user, role=args.role, ttl_s=args.ttl))
    except (ValueError, StoreError) as exc:
        raise CliError(str(exc)) from None
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from seqactor._logging import setup_logging
    from seqactor.auth import load_or_create_secret
    from seqactor.gateway import Server
    from seqactor.store import StoreError, open_store

    setup_logging(args.log_level)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise CliError("--tls-cert and --tls-key go together")
    secret, created = load_or_create_secret(args.secret_file)
    if created:
        print(f"created secret file {args.secret_file} (mode 0600)", file=sys.stderr, flush=True)
    cfg = C.ServerConfig(
        host=args.host, port=args.port, store_url=args.store, secret=secret,
        hello_timeout_s=args.hello_timeout, heartbeat_interval_s=args.heartbeat_interval,
        max_frame_bytes=args.max_frame_bytes, metrics_port=args.metrics_port,
        tls_cert=args.tls_cert, tls_key=args.tls_key,
    )
    try:
        store = open_store(args.store)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    server = Server(cfg, store, secret)

    def listening(url: str) -> None:
        print(f"listening on {url}", flush=True)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, server)
            await server.serve(on_listening=listening)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseException as exc:  # noqa: BLE001 - unwrapped and re-raised below
        inner = _unwrap(exc)
        if isinstance(inner, StoreError):
            raise CliError(f"store {args.store}: {inner}") from None
        if isinstance(inner, OSError):
            raise CliError(
                f"cannot serve on {args.host}:{args.port}: {inner.strerror or inner}"
            ) from None
        raise
    return 0


def _unwrap(exc: BaseException) -> BaseException:
    """The single exception inside (nested) one-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _stop_on_signal(server: object) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            server.stop()  # type: ignore[attr-defined]
            return


COMMANDS = {"serve": cmd_serve, "token": cmd_token, "store": cmd_store}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CliError as exc:
        print(f"seqactor {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
