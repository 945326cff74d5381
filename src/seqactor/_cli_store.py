"""``seqactor store init [--force] --store URL``: the operator's store actions.

``init`` creates the store's epoch if it has none (a node does this on its first start, too).
``--force`` starts a new epoch even if one exists — the explicit step after Redis lost its
data (running nodes refuse allocations until then, so seqs never start again from 1 silently).
Clients' sync tokens carry the old epoch, so they get a full snapshot on their next sync.
"""

from __future__ import annotations

import argparse
from typing import Any

import trio


def add_store_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "store",
        help="store maintenance (init a new epoch after data loss)",
        description="Store maintenance.",
    )
    actions = p.add_subparsers(dest="store_command", required=True)
    init = actions.add_parser(
        "init",
        help="create the store's epoch; --force starts a new one",
        description=(
            "Create the store's epoch if it has none. With --force start a new epoch even if "
            "one exists: the explicit operator step after Redis lost its data. Running nodes "
            "switch to it; clients get a full snapshot on their next sync."
        ),
        epilog="example: seqactor store init --force --store redis://127.0.0.1:6379/0",
    )
    init.add_argument("--store", required=True, help="store URL (redis://, redis+cluster://)")
    init.add_argument(
        "--force", action="store_true",
        help="start a new epoch even if one exists (after data loss)",
    )


def cmd_store(args: argparse.Namespace) -> int:
    from seqactor.cli import CliError
    from seqactor.store import StoreError

    if args.store_command != "init":  # pragma: no cover - argparse enforces the choice
        raise CliError(f"unknown store command {args.store_command!r}")
    url: str = args.store
    try:
        if url.startswith(("redis://", "redis+cluster://")):
            from seqactor.store.redis import init_store

            epoch, created = trio.run(init_store, url, bool(args.force))
        else:
            if args.force:
                raise CliError(
                    "--force is for Redis stores; an embedded store keeps its epoch in its file"
                )
            epoch, created = trio.run(_init_embedded, url)
    except StoreError as exc:
        raise CliError(f"store {url}: {exc}") from None
    what = "created new epoch" if created else "epoch already set"
    print(f"{what} {epoch.hex()}", flush=True)
    return 0


async def _init_embedded(url: str) -> tuple[bytes, bool]:
    from seqactor.store import open_store

    store: Any = open_store(url)
    await store.open()
    try:
        return bytes(store.epoch), False
    finally:
        await store.aclose()
