"""``seqactor store init | backup | restore``: the operator's store actions.

``init`` creates the store's epoch if it has none (a node does this on its first start, too).
``--force`` starts a new epoch even if one exists, on every persistent store kind: on Redis the
explicit step after Redis lost its data (running nodes refuse allocations until then, so seqs
never start again from 1 silently); on SQLite with the server stopped. Clients' sync tokens
carry the old epoch, so they get a full snapshot on their next sync.

``backup`` copies a SQLite store while the server runs; ``restore`` installs such a copy with a
new epoch (the server stopped). What a restore loses, and ``--keep-sequences``, are described
in :mod:`seqactor.store._sqlite_admin` and docs/store.md ("Backup and restore").
"""

from __future__ import annotations

import argparse
from typing import Any

import trio

STORE_ACTIONS = ("init", "backup", "restore")


def add_store_parser(sub: Any) -> None:
    from seqactor.cli._args import HelpFormatter

    p = sub.add_parser(
        "store",
        help="store maintenance: init or rotate the epoch, backup, restore",
        description="Store maintenance. Actions: init, backup, restore "
        "(`seqactor store ACTION --help` for each).",
        epilog="example: seqactor store backup --store sqlite:///var/seqactor.db var/backup.db",
        formatter_class=HelpFormatter,
    )
    actions = p.add_subparsers(dest="store_command", metavar="ACTION", title="actions")
    init: argparse.ArgumentParser = actions.add_parser(
        "init",
        help="create the store's epoch; --force starts a new one",
        description=(
            "Create the store's epoch if it has none. With --force start a new epoch even if "
            "one exists, keeping the data: the explicit operator step after Redis lost its "
            "data. Running Redis nodes switch to it; a SQLite store must not be in use by a "
            "server (stop it first). Clients get a full snapshot on their next sync."
        ),
        epilog="example: seqactor store init --force --store redis://127.0.0.1:6379/0\n"
        "         seqactor store init --force --store sqlite:///var/seqactor.db",
        formatter_class=HelpFormatter,
    )
    init.add_argument("--store", required=True, metavar="URL",
                      help="store URL: sqlite:///path, redis://host:port/db, "
                      "redis+cluster://host:port,... or memory:// (required, no default)")
    init.add_argument(
        "--force", action="store_true",
        help="start a new epoch even if one exists (default: off)",
    )
    backup = actions.add_parser(
        "backup",
        help="copy a SQLite store to FILE (safe while the server runs)",
        description=(
            "Copy a SQLite store into a new file with SQLite's online backup API: the copy is "
            "one committed state even while the server keeps writing."
        ),
        epilog="example: seqactor store backup --store sqlite:///var/seqactor.db "
        "var/backup-$(date +%F).db",
        formatter_class=HelpFormatter,
    )
    backup.add_argument("--store", required=True, metavar="URL",
                        help="the SQLite store to copy, sqlite:///path (required, no default)")
    backup.add_argument("file", metavar="FILE", help="the backup file to create (must not exist)")
    restore = actions.add_parser(
        "restore",
        help="install a backup FILE as the store, with a new epoch (server stopped)",
        description=(
            "Install a backup as the SQLite store, with a new epoch: every client gets a full "
            "snapshot on its next sync, so no sync token from after the backup gets a delta "
            "from the older state. Stop the server first. Everything committed after the "
            "backup is lost, and by default the seqs allocated after it are handed out again; "
            "--keep-sequences prevents that while the current store file is readable."
        ),
        epilog="example: seqactor store restore var/backup.db --store sqlite:///var/seqactor.db "
        "--keep-sequences",
        formatter_class=HelpFormatter,
    )
    restore.add_argument("file", metavar="FILE", help="a file written by `seqactor store backup`")
    restore.add_argument("--store", required=True, metavar="URL",
                         help="the SQLite store to replace, sqlite:///path (required, no default)")
    restore.add_argument(
        "--keep-sequences", action="store_true",
        help="keep each conversation's max seq at the higher of the backup's and the current "
        "store's, so no seq is handed out twice (default: off; needs the current file)",
    )


def _sqlite_path(url: str, action: str) -> str:
    from seqactor.cli._args import UsageError
    from seqactor.store import InvalidArgument, open_store
    from seqactor.store.sqlite import SQLiteStore

    try:
        store = open_store(url)
    except InvalidArgument as exc:
        raise UsageError(f"--store: {exc}") from None
    if not isinstance(store, SQLiteStore):
        raise UsageError(
            f"--store {url}: `store {action}` is for SQLite stores (sqlite:///path); for Redis "
            "use Redis' own persistence (RDB/AOF)"
        )
    return store.path


def cmd_store(args: argparse.Namespace) -> int:
    from seqactor.cli._args import CliError, UsageError
    from seqactor.store import StoreError

    action = args.store_command
    if action is None:
        raise UsageError(
            f"give an action: {', '.join(STORE_ACTIONS)}"
        )
    try:
        if action == "backup":
            return _backup(args)
        if action == "restore":
            return _restore(args)
        return _init(args)
    except StoreError as exc:
        raise CliError(f"store {args.store}: {exc}") from None


def _backup(args: argparse.Namespace) -> int:
    from seqactor.store._sqlite_admin import backup

    path = _sqlite_path(args.store, "backup")
    position, epoch = backup(path, args.file)
    print(f"backed up {path} to {args.file} (position {position}, epoch {epoch.hex()})",
          flush=True)
    return 0


def _restore(args: argparse.Namespace) -> int:
    from seqactor.store._sqlite_admin import restore

    path = _sqlite_path(args.store, "restore")
    position, epoch = restore(args.file, path, keep_sequences=bool(args.keep_sequences))
    kept = "; max seqs kept from the current store" if args.keep_sequences else ""
    print(f"restored {args.file} into {path} (position {position}, new epoch {epoch.hex()}{kept}); "
          "clients get a full snapshot on their next sync", flush=True)
    return 0


def _init(args: argparse.Namespace) -> int:
    from seqactor.cli._args import UsageError
    from seqactor.store import InvalidArgument, open_store
    from seqactor.store.memory import MemoryStore
    from seqactor.store.sqlite import SQLiteStore

    url: str = args.store
    if url.startswith(("redis://", "redis+cluster://")):
        from seqactor.store.redis import init_store

        epoch, created = trio.run(init_store, url, bool(args.force))
    else:
        try:
            store = open_store(url)
        except InvalidArgument as exc:
            raise UsageError(f"--store: {exc}") from None
        if isinstance(store, MemoryStore):
            print("memory:// keeps nothing: each server starts empty with a new epoch; "
                  "there is nothing to initialise", flush=True)
            return 0
        assert isinstance(store, SQLiteStore)
        epoch, created = _init_sqlite(store.path, bool(args.force))
    if created:
        print(f"created new epoch {epoch.hex()} (clients get a full snapshot on their next sync)",
              flush=True)
    else:
        print(f"epoch already set {epoch.hex()}", flush=True)
    return 0


def _init_sqlite(path: str, force: bool) -> tuple[bytes, bool]:
    import os

    from seqactor.store._sqlite_admin import read_epoch, rotate_epoch

    if not os.path.exists(path):
        epoch: bytes = trio.run(_create, path)  # a new file with its first epoch
        return epoch, True
    if force:
        return rotate_epoch(path), True
    return read_epoch(path), False


async def _create(path: str) -> bytes:
    from seqactor.store.sqlite import SQLiteStore

    store: Any = SQLiteStore(path)
    await store.open()
    try:
        return bytes(store.epoch)
    finally:
        await store.aclose()
