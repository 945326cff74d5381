"""``seqactor readers CONVERSATION SEQ [--unread]``: who has (or has not) read a message of a
group (``GetReaders``, docs/protocol.md "Group read counts"), with the group's read count of that message.

With ``--user U --secret-file F`` (or a user ``--token``) it asks as that member; with only
``--secret-file`` it asks with a service token (any conversation).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from seqactor.client._readcounts import READERS_PAGE_SIZE

EXAMPLE = (
    "example: seqactor readers --url ws://127.0.0.1:8765/v1 --secret-file var/secret group-1 42\n"
    "         seqactor readers --secret-file var/secret --user alice group-1 42 --unread"
)


def add_readers_parser(sub: Any) -> None:
    """Add ``readers`` to the subcommands ``sub`` (what ``add_subparsers()`` returns)."""
    from functools import partial

    from seqactor.cli._args import HelpFormatter, id_arg, positive_int, seq_arg
    from seqactor.cli._connect import client_args

    p = sub.add_parser(
        "readers", help="who has (or has not) read a message of a group",
        description="List the current members of CONVERSATION who have read SEQ (with "
        "--unread: who have not), ordered by user id, then the count: "
        "'N of M have read SEQ'. With --user (and --secret-file) it asks as that member; "
        "with --secret-file alone, as the service (any conversation).",
        epilog=EXAMPLE, formatter_class=HelpFormatter,
    )
    p.add_argument("conversation", type=partial(id_arg, what="conversation"),
                   help="conversation id (1-128 bytes)")
    p.add_argument("seq", type=partial(seq_arg, what="SEQ"), help="the message's seq (1 or more)")
    p.add_argument("--unread", action="store_true", help="list who has NOT read SEQ")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="list at most N users (default: all)")
    client_args(p, user=True, minted="a service token, or with --user that user's token")


def _role(tok: str) -> str:
    """The ``role`` claim of a token (unverified: the server checks it; this only picks the
    client kind). Unreadable: "user" (the server then refuses it with one clear line)."""
    import jwt

    try:
        claims = jwt.decode(tok, options={"verify_signature": False})
    except jwt.PyJWTError:
        return "user"
    return str(claims.get("role", "user"))


def cmd_readers(args: argparse.Namespace) -> int:
    """Run the command; a failure is one line on stderr and exit status 1 (reported here, so
    one copy of its classes whichever way the CLI was started)."""
    from seqactor.cli._args import EXIT_FAILURE, CliError

    try:
        return _readers(args)
    except CliError as exc:
        print(f"seqactor readers: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _readers(args: argparse.Namespace) -> int:
    from seqactor.cli._args import CliError
    from seqactor.cli._connect import CLI_CONNECT_TIMEOUT_S, client_token, run_client
    from seqactor.client import Client, ServiceClient

    tok = client_token(args, user=bool(args.user))
    as_user = _role(tok) != "service"
    lines: list[str] = []

    async def collect(client: Client | ServiceClient) -> None:
        rc = await client.read_counts(args.conversation, args.seq, args.seq)
        read = rc.count(args.seq)
        if read is None:  # the reply's range was clamped away from SEQ
            where = (f"its history starts at seq {rc.from_sequence} (cleared below)"
                     if rc.from_sequence > args.seq else "it has no message with that seq yet")
            raise CliError(f"seq {args.seq} of {args.conversation} is not readable: {where}")
        shown = 0
        async for page in client.readers(args.conversation, args.seq, unread=args.unread,
                                         page_size=READERS_PAGE_SIZE):
            for uid in page:
                if args.limit is not None and shown >= args.limit:
                    lines.append("...")
                    break
                lines.append(uid)
                shown += 1
            else:
                continue
            break
        lines.append(f"{read} of {rc.member_count} have read {args.seq}")

    async def run() -> None:
        if as_user:
            async with Client.connect(args.url, tok, subscribe_all=False,
                                      connect_timeout_s=CLI_CONNECT_TIMEOUT_S) as c:
                await collect(c)
        else:
            async with ServiceClient.connect(args.url, tok,
                                             connect_timeout_s=CLI_CONNECT_TIMEOUT_S) as s:
                await collect(s)

    run_client(args.url, run)
    print("\n".join(lines))
    return 0
