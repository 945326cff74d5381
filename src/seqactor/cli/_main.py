"""Command line: ``seqactor serve | token | watch | send | members | demo | store``
(docs/cli.md; the contract for each command is in docs/protocol.md, "Command line").

Errors: a usage error (a bad flag value, a missing argument) prints one line and exits 2;
any other failure (a file, a port, a URL that does not work) prints one line naming it and
exits 1. Never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

from seqactor import protocol as P
from seqactor.cli._args import (
    EXIT_FAILURE,
    EXIT_USAGE,
    LOG_LEVELS,
    CliError,
    HelpFormatter,
    OneLineParser,
    UsageError,
    count_arg,
    id_arg,
    log_level,
    nonnegative_float,
    port_arg,
    positive_float,
    positive_int,
    ttl_arg,
)
from seqactor.cli._connect import (
    CLI_CONNECT_TIMEOUT_S,
    CLI_TOKEN_TTL_S,
    client_args,
    client_token,
    read_secret_file,
    run_client,
)
from seqactor.cli._readers import add_readers_parser, cmd_readers
from seqactor.cli._store import add_store_parser, cmd_store
from seqactor.server import config as S

WATCH_DEVICE_PREFIX = "seqactor-watch-"  # + a random suffix per process (item: two watches)
DEMO_USERS = 8
DEMO_GROUPS = 4
DEMO_RATE_MSG_PER_S = 5.0

SubParsers = Any  # what add_subparsers() returns (argparse does not name its type publicly)


def _add(sub: SubParsers, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)
    return p


def _listen_args(p: argparse.ArgumentParser) -> None:
    """--host and --port of the commands that run a server (serve, demo)."""
    p.add_argument("--host", default=P.DEFAULT_HOST, help="interface to listen on")
    p.add_argument("--port", type=port_arg, default=P.DEFAULT_PORT,
                   help="TCP port, 0-65535 (0: any free port, printed)")


def _serve_parser(sub: SubParsers) -> None:
    p = _add(
        sub, "serve", help="run a seqactor server",
        description="Run a seqactor server. Prints `listening on ws://HOST:PORT/v1` once it "
        "accepts connections; SIGINT/SIGTERM stop it gracefully.",
        epilog="example: seqactor serve --port 8765 --store sqlite:///var/seqactor.db "
        "--secret-file var/secret",
    )
    _listen_args(p)
    p.add_argument("--store", default=S.DEFAULT_STORE_URL, metavar="URL",
                   help="memory://, sqlite:///relative/path, sqlite:////absolute/path, "
                   "redis://host:port/db or redis+cluster://host:port,...")
    p.add_argument("--secret-file", required=True, metavar="FILE",
                   help="HS256 secret, at least 32 bytes; created (random, mode 0600) when "
                   "missing (required)")
    p.add_argument("--hello-timeout", type=positive_float, default=P.HELLO_TIMEOUT_S, metavar="S",
                   help="close a connection that sends no Hello within S seconds")
    p.add_argument("--heartbeat-interval", type=positive_float, default=P.HEARTBEAT_INTERVAL_S,
                   metavar="S", help="told to clients; a session silent for 2.5 x S is closed")
    p.add_argument("--max-frame-bytes", type=positive_int, default=P.MAX_FRAME_BYTES,
                   metavar="N", help="larger frames close the connection (1009)")
    p.add_argument("--metrics-port", type=partial(port_arg, allow_zero=False), default=None,
                   metavar="P", help="serve Prometheus /metrics on this port "
                   "(default: no metrics endpoint)")
    p.add_argument("--tls-cert", default=None, metavar="FILE",
                   help="PEM certificate chain; with --tls-key serves wss:// (default: plain ws://)")
    p.add_argument("--tls-key", default=None, metavar="FILE",
                   help="PEM private key for --tls-cert (default: none)")
    p.add_argument("--log-level", type=log_level, default="INFO", metavar="LEVEL",
                   help=f"one of {', '.join(LOG_LEVELS)} (any case)")
    p.add_argument("--no-parking", dest="park_idle_sessions", action="store_false",
                   help="every connection keeps its own task (default: an idle session on "
                   "plain TCP holds none, its socket waits in one epoll set: ~4 KB less each)")
    p.add_argument("--workers", type=positive_int, default=1, metavar="N",
                   help="server processes sharing the port (SO_REUSEPORT, one per core); above 1 "
                   "needs a redis:// or redis+cluster:// store")
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-ids-per-request", type=positive_int, default=P.MAX_IDS_PER_REQUEST,
                        metavar="N", help="conversation or user ids in one request")
    limits.add_argument("--max-view-conversations", type=positive_int,
                        default=P.MAX_VIEW_CONVERSATIONS, metavar="N",
                        help="conversations in one user's view")
    limits.add_argument("--max-conversation-members", type=positive_int,
                        default=P.MAX_CONVERSATION_MEMBERS, metavar="N",
                        help="members of one conversation")
    limits.add_argument("--rate-limit", type=positive_float, default=S.RATE_LIMIT_OPS_PER_S,
                        metavar="OPS_PER_S", help="ops per second per user session")
    limits.add_argument("--max-connections", type=positive_int, default=S.MAX_CONNECTIONS,
                        metavar="N", help="per process; beyond: HTTP 503")
    limits.add_argument("--write-timeout", type=positive_float, default=S.WRITE_TIMEOUT_S,
                        metavar="S", help="close a session whose socket takes nothing this long")


def _token_parser(sub: SubParsers) -> None:
    from seqactor.auth import DEFAULT_TOKEN_TTL_S

    p = _add(
        sub, "token", help="print a signed token",
        description="Print a JWT (HS256) for a user or a service, alone on stdout. The server "
        f"refuses tokens that live longer than {P.MAX_TOKEN_LIFETIME_S} s (30 days).",
        epilog="example: seqactor token --secret-file var/secret --user alice --ttl 3600",
    )
    p.add_argument("--secret-file", required=True, metavar="FILE",
                   help="the server's secret (required)")
    p.add_argument("--user", required=True, type=partial(id_arg, what="--user"),
                   help="the token's subject: a user id, or a backend's name (required)")
    p.add_argument("--role", choices=("user", "service"), default="user",
                   help="service: may allocate seqs and manage members")
    p.add_argument("--ttl", type=ttl_arg, default=DEFAULT_TOKEN_TTL_S, metavar="SECONDS",
                   help=f"lifetime, above 0 and at most {P.MAX_TOKEN_LIFETIME_S}")


def _watch_parser(sub: SubParsers) -> None:
    from seqactor.client._watch import DEFAULT_LIMIT

    p = _add(
        sub, "watch", help="live terminal view of a user's conversations",
        description="A live view of one user's conversations: sorted by latest activity, "
        "max / read / unread, total unread, updated in place. Ctrl-C quits.",
        epilog="example: seqactor watch --url ws://127.0.0.1:8765/v1 --user alice "
        "--secret-file var/secret\n"
        "         seqactor watch --url ws://127.0.0.1:8765/v1 --token \"$TOKEN\" --once",
    )
    client_args(p, user=True)
    p.add_argument("--device-id", default=None,
                   help="device id of this session; a second session with the same id replaces "
                   f"this one (default: {WATCH_DEVICE_PREFIX}<random>, unique per process)")
    p.add_argument("--limit", type=positive_int, default=DEFAULT_LIMIT, metavar="N",
                   help="rows shown, at least 1")
    p.add_argument("--once", action="store_true", help="print the view once and exit")


def _send_parser(sub: SubParsers) -> None:
    from seqactor.protocol import MAX_ALLOCATE_COUNT

    p = _add(
        sub, "send", help="allocate seqs in a conversation (as a message service would)",
        description="Allocate the next COUNT seqs of a conversation (creating it if new), "
        "and print them.",
        epilog="example: seqactor send --url ws://127.0.0.1:8765/v1 --secret-file var/secret "
        "group-1 --count 3 --sender bob",
    )
    p.add_argument("conversation", type=partial(id_arg, what="conversation"),
                   help="conversation id (1-128 bytes)")
    p.add_argument("--count", type=count_arg, default=1, metavar="N",
                   help=f"seqs to allocate, 1-{MAX_ALLOCATE_COUNT}")
    p.add_argument("--sender", default=None, metavar="USER", type=partial(id_arg, what="--sender"),
                   help="the sender's read seq moves to the new max (own messages are read) "
                   "(default: no sender)")
    client_args(p, user=False)


def _members_parser(sub: SubParsers) -> None:
    p = _add(
        sub, "members", help="add or remove members of a conversation",
        description="Add users to a conversation (created if new) or remove them. With "
        "--secret-file, users who were already members (add) or were not members (remove) "
        "are named.",
        epilog="example: seqactor members add --url ws://127.0.0.1:8765/v1 "
        "--secret-file var/secret group-1 alice bob\n"
        "         seqactor members remove --secret-file var/secret group-1 bob --keep-history",
    )
    p.add_argument("action", choices=("add", "remove"), help="add or remove")
    p.add_argument("conversation", type=partial(id_arg, what="conversation"),
                   help="conversation id (1-128 bytes)")
    p.add_argument("users", nargs="+", metavar="USER", type=partial(id_arg, what="user"),
                   help="user ids")
    p.add_argument("--keep-history", action="store_true",
                   help="remove: keep the conversation in their view, frozen")
    client_args(p, user=False)


def _demo_parser(sub: SubParsers) -> None:
    p = _add(
        sub, "demo", help="run a server on memory:// with synthetic traffic",
        description="Start a server on memory:// with users (user1..N), direct chats and "
        "groups, and a steady message rate; prints how to watch it.",
        epilog="example: seqactor demo --port 8765 --users 8 --groups 4 --rate 5\n"
        "         then, in another terminal, the printed `seqactor watch ...` command",
    )
    _listen_args(p)
    p.add_argument("--users", type=partial(positive_int, minimum=2), default=DEMO_USERS,
                   help="simulated users, at least 2")
    p.add_argument("--groups", type=partial(positive_int, minimum=0), default=DEMO_GROUPS,
                   help="group conversations (besides user1's direct chats)")
    p.add_argument("--rate", type=nonnegative_float, default=DEMO_RATE_MSG_PER_S,
                   metavar="MSG_PER_S", help="messages per second, all conversations together")
    p.add_argument("--duration", type=positive_float, default=None, metavar="S",
                   help="stop after S seconds (default: until Ctrl-C)")
    p.add_argument("--secret-file", default=None, metavar="FILE",
                   help="secret to use, created if missing (default: a temporary one, removed "
                   "when the demo ends)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed, for the same conversations each run (default: random)")


def build_parser() -> argparse.ArgumentParser:
    from seqactor import __version__

    parser = OneLineParser(
        prog="seqactor",
        description="Real-time conversation sequence service for IM systems.",
        epilog="example: seqactor serve --secret-file var/secret   (then: seqactor COMMAND --help)",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"seqactor {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    _serve_parser(sub)
    _token_parser(sub)
    _watch_parser(sub)
    _send_parser(sub)
    _members_parser(sub)
    _demo_parser(sub)
    add_store_parser(sub)
    add_readers_parser(sub)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    """``seqactor serve``: one process, or with ``--workers N`` a supervisor of N."""
    if getattr(args, "workers", 1) != 1:
        from seqactor.cli._workers import run_workers

        return run_workers(args)
    from seqactor.cli._serve import serve_one

    return serve_one(args)


def cmd_token(args: argparse.Namespace) -> int:
    from seqactor.auth import SecretError, issue_token, read_secret

    try:
        secret = read_secret(args.secret_file)
        print(issue_token(secret, args.user, role=args.role, ttl_s=args.ttl))
    except SecretError as exc:
        raise CliError(str(exc)) from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    import secrets

    from seqactor.client._watch import watch

    tok = client_token(args, user=True)
    device_id = args.device_id or WATCH_DEVICE_PREFIX + secrets.token_hex(4)
    try:
        run_client(args.url, partial(watch, args.url, tok, device_id=device_id, once=args.once,
                                      limit=args.limit))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one leaves the live view
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from seqactor.client import ServiceClient

    tok = client_token(args, user=False)

    async def send() -> None:
        async with ServiceClient.connect(
            args.url, tok, connect_timeout_s=CLI_CONNECT_TIMEOUT_S
        ) as svc:
            a = await svc.allocate(args.conversation, args.count, args.sender)
        seqs = (f"{a.first_sequence}" if a.first_sequence == a.last_sequence
                else f"{a.first_sequence}..{a.last_sequence}")
        print(f"{args.conversation}: allocated {seqs}")

    run_client(args.url, send)
    return 0


ROW_MEMBER, ROW_FROZEN, ROW_NONE = "member", "frozen", "none"  # a user's row of a conversation


async def _row_of(url: str, secret: bytes, user: str, conversation: str) -> str:
    """``user``'s row of ``conversation``: a member's, a frozen one (left with keep_history:
    still in the view, no longer a member) or none (a short user session, no device id)."""
    from seqactor.auth import issue_token
    from seqactor.client import Client

    tok = issue_token(secret, user, ttl_s=CLI_TOKEN_TTL_S)
    async with Client.connect(url, tok, subscribe_all=False,
                              connect_timeout_s=CLI_CONNECT_TIMEOUT_S) as client:
        row = (await client.fetch([conversation])).get(conversation)
    if row is None:
        return ROW_NONE
    return ROW_FROZEN if row.frozen else ROW_MEMBER


def cmd_members(args: argparse.Namespace) -> int:
    from seqactor.client import ServiceClient

    tok = client_token(args, user=False)
    secret = read_secret_file(args.secret_file) if args.secret_file and not args.token else None
    users: list[str] = list(dict.fromkeys(args.users))

    async def members() -> None:
        before: dict[str, str] = {}
        if secret is not None:
            for u in users:
                before[u] = await _row_of(args.url, secret, u, args.conversation)
        async with ServiceClient.connect(
            args.url, tok, connect_timeout_s=CLI_CONNECT_TIMEOUT_S
        ) as svc:
            if args.action == "add":
                await svc.add_members(args.conversation, users)
            else:
                await svc.remove_members(args.conversation, users, args.keep_history)
        print(_members_report(args.action, args.conversation, users, before, args.keep_history))

    run_client(args.url, members)
    return 0


def _members_report(
    action: str, conversation: str, users: list[str], before: dict[str, str], keep: bool
) -> str:
    """``group-1: added alice bob`` / ``... removed bob (history kept); carol was not a
    member``; without knowing who was a member before (no --secret-file), it says so. A
    frozen row (left with keep_history) is not a member's: adding makes it one again;
    removing it without --keep-history ends it (with it, nothing changes)."""
    if not before:
        verb = "added" if action == "add" else "removed"
        kept = " (history kept)" if keep and action == "remove" else ""
        unchanged = "already members" if action == "add" else "not members"
        return f"{conversation}: {verb} {' '.join(users)}{kept} (any who were {unchanged}: unchanged)"
    if action == "add":
        done = [u for u in users if before[u] != ROW_MEMBER]
        skipped = [u for u in users if before[u] == ROW_MEMBER]
        text = f"{conversation}: added {' '.join(done)}" if done else f"{conversation}: added nobody"
        if skipped:
            text += f"; already {_members_word(skipped)}: {' '.join(skipped)}"
        return text
    done = [u for u in users
            if before[u] == ROW_MEMBER or (before[u] == ROW_FROZEN and not keep)]
    skipped = [u for u in users if u not in done]
    kept = " (history kept)" if keep and done else ""
    text = (f"{conversation}: removed {' '.join(done)}{kept}" if done
            else f"{conversation}: removed nobody")
    if skipped:
        text += f"; not {_members_word(skipped)}: {' '.join(skipped)}"
    return text


def _members_word(users: list[str]) -> str:
    return "a member" if len(users) == 1 else "members"


def cmd_demo(args: argparse.Namespace) -> int:
    from seqactor.auth import SecretError
    from seqactor.cli._demo import run_demo

    try:
        run_client(f"ws://{args.host}:{args.port}{P.WS_PATH}", run_demo, args.host, args.port,
                    args.users, args.groups, args.rate, args.duration, args.secret_file,
                    args.seed)
    except SecretError as exc:
        raise CliError(str(exc)) from None
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
    "readers": cmd_readers,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        print("seqactor: error: give a command: " + ", ".join(COMMANDS)
              + " (see seqactor --help)", file=sys.stderr)
        return EXIT_USAGE
    prog = f"seqactor {args.command}"
    if args.command == "store" and getattr(args, "store_command", None):
        prog += f" {args.store_command}"
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"{prog}: error: {exc} (see {prog} --help)", file=sys.stderr)
        return EXIT_USAGE
    except CliError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE

