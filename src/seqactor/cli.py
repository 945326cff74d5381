"""Command line: ``seqactor serve | token | watch | send | members | demo`` (SPEC §6)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import trio

from seqactor import config as C
from seqactor._cli_store import add_store_parser, cmd_store

EXIT_USAGE = 2
EXIT_FAILURE = 1
DEFAULT_URL = f"ws://{C.DEFAULT_HOST}:{C.DEFAULT_PORT}{C.WS_PATH}"
CLI_SERVICE_USER = "seqactor-cli"  # sub of the service token minted from --secret-file
CLI_TOKEN_TTL_S = 3600
CLI_CONNECT_TIMEOUT_S = 10.0


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
                   help="memory://, sqlite:///path, redis://host:port/db or "
                   "redis+cluster://host:port,... (default %(default)s)")
    p.add_argument("--secret-file", required=True,
                   help="HS256 secret; created (random, mode 0600) when missing")
    p.add_argument("--hello-timeout", type=float, default=C.HELLO_TIMEOUT_S, metavar="S")
    p.add_argument("--heartbeat-interval", type=float, default=C.HEARTBEAT_INTERVAL_S, metavar="S")
    p.add_argument("--max-frame-bytes", type=int, default=C.MAX_FRAME_BYTES, metavar="N")
    p.add_argument("--metrics-port", type=int, default=None, metavar="P")
    p.add_argument("--tls-cert", default=None, metavar="F")
    p.add_argument("--tls-key", default=None, metavar="F")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="server processes sharing the port (SO_REUSEPORT); above 1 needs a "
                        "redis:// or redis+cluster:// store (default %(default)s)")
    limits = p.add_argument_group("limits (SPEC §4 defaults)")
    limits.add_argument("--max-ids-per-request", type=int, default=C.MAX_IDS_PER_REQUEST,
                        metavar="N")
    limits.add_argument("--max-view-conversations", type=int, default=C.MAX_VIEW_CONVERSATIONS,
                        metavar="N")
    limits.add_argument("--max-conversation-members", type=int,
                        default=C.MAX_CONVERSATION_MEMBERS, metavar="N")
    limits.add_argument("--rate-limit", type=float, default=C.RATE_LIMIT_OPS_PER_S,
                        metavar="OPS_PER_S", help="per user session (default %(default)s)")
    limits.add_argument("--max-connections", type=int, default=C.MAX_CONNECTIONS, metavar="N",
                        help="per process; beyond: HTTP 503 (default %(default)s)")
    limits.add_argument("--write-timeout", type=float, default=C.WRITE_TIMEOUT_S, metavar="S",
                        help="close a session whose socket takes nothing this long "
                        "(default %(default)s)")


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


def _client_args(p: argparse.ArgumentParser, user: bool) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help="server URL (default %(default)s)")
    p.add_argument("--token", default=None, help="a token (see `seqactor token`)")
    p.add_argument("--secret-file", default=None,
                   help="the server's secret: mint a " + ("user" if user else "service")
                   + " token instead of --token")
    if user:
        p.add_argument("--user", default=None, help="the user to mint a token for")


def _watch_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "watch", help="live terminal view of a user's conversations",
        description="A live view of one user's conversations: sorted by latest activity, "
        "max / read / unread, total unread, updated in place. Ctrl-C quits.",
        epilog="example: seqactor watch --url ws://127.0.0.1:8765/v1 --user alice "
        "--secret-file var/secret\n"
        "         seqactor watch --url ws://127.0.0.1:8765/v1 --token \"$TOKEN\" --once",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _client_args(p, user=True)
    p.add_argument("--device-id", default="seqactor-watch")
    p.add_argument("--limit", type=int, default=30, metavar="N", help="rows shown")
    p.add_argument("--once", action="store_true", help="print the view once and exit")


def _send_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "send", help="allocate seqs in a conversation (as a message service would)",
        description="Allocate the next COUNT seqs of a conversation (creating it if new), "
        "and print them.",
        epilog="example: seqactor send --url ws://127.0.0.1:8765/v1 --secret-file var/secret "
        "group-1 --count 3 --sender bob",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("conversation")
    p.add_argument("--count", type=int, default=1, metavar="N")
    p.add_argument("--sender", default=None, metavar="USER",
                   help="the sender's read seq moves to the new max (own messages are read)")
    _client_args(p, user=False)


def _members_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "members", help="add or remove members of a conversation",
        description="Add users to a conversation (created if new) or remove them.",
        epilog="example: seqactor members add --url ws://127.0.0.1:8765/v1 "
        "--secret-file var/secret group-1 alice bob\n"
        "         seqactor members remove --secret-file var/secret group-1 bob --keep-history",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=("add", "remove"))
    p.add_argument("conversation")
    p.add_argument("users", nargs="+", metavar="USER")
    p.add_argument("--keep-history", action="store_true",
                   help="remove: keep the conversation in their view, frozen")
    _client_args(p, user=False)


def _demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", help="run a server on memory:// with synthetic traffic",
        description="Start a server on memory:// with users (user1..N), direct chats and "
        "groups, and a steady message rate; prints how to watch it.",
        epilog="example: seqactor demo --port 8765 --users 8 --groups 4 --rate 5\n"
        "         then, in another terminal, the printed `seqactor watch ...` command",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default=C.DEFAULT_HOST)
    p.add_argument("--port", type=int, default=C.DEFAULT_PORT)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--rate", type=float, default=5.0, metavar="MSG_PER_S")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="stop after S seconds (default: until Ctrl-C)")
    p.add_argument("--secret-file", default=None,
                   help="secret to use (created if missing; default: a temporary one)")
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqactor",
        description="Real-time conversation sequence service for IM systems.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _token_parser(sub)
    _watch_parser(sub)
    _send_parser(sub)
    _members_parser(sub)
    _demo_parser(sub)
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

    if getattr(args, "workers", 1) != 1:  # a supervisor of N worker processes
        from seqactor._workers import run_workers

        return run_workers(args)
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
        max_ids_per_request=args.max_ids_per_request,
        max_view_conversations=args.max_view_conversations,
        max_conversation_members=args.max_conversation_members,
        rate_limit_ops_per_s=args.rate_limit, max_connections=args.max_connections,
        write_timeout_s=args.write_timeout,
        reuse_port=getattr(args, "reuse_port", False),
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


def _read_secret(path_str: str) -> bytes:
    from pathlib import Path

    path = Path(path_str)
    try:
        secret = path.read_bytes().strip()
    except FileNotFoundError:
        raise CliError(f"secret file {path} does not exist") from None
    except OSError as exc:
        raise CliError(f"cannot read secret file {path}: {exc.strerror or exc}") from None
    if not secret:
        raise CliError(f"secret file {path} is empty")
    return secret


def _client_token(args: argparse.Namespace, user: bool) -> str:
    from seqactor.auth import issue_token

    if args.token:
        return str(args.token)
    if not args.secret_file:
        need = "--token, or --user with --secret-file" if user else "--token or --secret-file"
        raise CliError(f"no credentials: give {need}")
    secret = _read_secret(args.secret_file)
    if user and not args.user:
        raise CliError("--secret-file needs --user (the user to watch)")
    try:
        if user:
            return issue_token(secret, args.user, ttl_s=CLI_TOKEN_TTL_S)
        return issue_token(secret, CLI_SERVICE_USER, role="service", ttl_s=CLI_TOKEN_TTL_S)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _run_client(fn: Any, *args: Any) -> None:
    """trio.run(fn, *args) with every client error turned into one line."""
    from seqactor.client import SeqactorError, ServerError

    try:
        trio.run(fn, *args)
    except BaseException as exc:  # noqa: BLE001 - unwrapped and re-raised below
        inner = _unwrap(exc)
        if isinstance(inner, ServerError):
            name = getattr(inner.code, "name", inner.code)
            raise CliError(f"{inner.message} ({name})") from None
        if isinstance(inner, SeqactorError):
            raise CliError(str(inner)) from None
        if inner is not exc:
            raise inner from None
        raise


def cmd_watch(args: argparse.Namespace) -> int:
    from seqactor._watch import watch

    tok = _client_token(args, user=True)
    try:
        _run_client(partial(watch, args.url, tok, device_id=args.device_id, once=args.once,
                            limit=args.limit))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one leaves the live view
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from seqactor.client import ServiceClient

    if not 1 <= args.count <= 10_000:
        raise CliError("--count must be between 1 and 10000")
    tok = _client_token(args, user=False)

    async def send() -> None:
        async with ServiceClient.connect(
            args.url, tok, connect_timeout_s=CLI_CONNECT_TIMEOUT_S
        ) as svc:
            a = await svc.allocate(args.conversation, args.count, args.sender)
        seqs = (f"{a.first_sequence}" if a.first_sequence == a.last_sequence
                else f"{a.first_sequence}..{a.last_sequence}")
        print(f"{args.conversation}: allocated {seqs}")

    _run_client(send)
    return 0


def cmd_members(args: argparse.Namespace) -> int:
    from seqactor.client import ServiceClient

    tok = _client_token(args, user=False)

    async def members() -> None:
        async with ServiceClient.connect(
            args.url, tok, connect_timeout_s=CLI_CONNECT_TIMEOUT_S
        ) as svc:
            if args.action == "add":
                await svc.add_members(args.conversation, args.users)
                print(f"{args.conversation}: added {' '.join(args.users)}")
            else:
                await svc.remove_members(args.conversation, args.users, args.keep_history)
                kept = " (history kept)" if args.keep_history else ""
                print(f"{args.conversation}: removed {' '.join(args.users)}{kept}")

    _run_client(members)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from seqactor._demo import run_demo

    if args.users < 2 or args.groups < 0 or args.rate < 0:
        raise CliError("need --users >= 2, --groups >= 0, --rate >= 0")
    try:
        _run_client(run_demo, args.host, args.port, args.users, args.groups, args.rate,
                    args.duration, args.secret_file, args.seed)
    except OSError as exc:
        raise CliError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}") from None
    except KeyboardInterrupt:
        pass
    return 0


COMMANDS = {
    "serve": cmd_serve,
    "token": cmd_token,
    "watch": cmd_watch,
    "send": cmd_send,
    "members": cmd_members,
    "demo": cmd_demo,
    "store": cmd_store,
}


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
