"""Operator actions on a SQLite store file: backup, restore, epoch rotation, and the lock that
keeps them away from a running server.

* **The lock** (:mod:`seqactor.store._sqlite_lock`). A server holds an *exclusive* ``flock``
  on ``<db>.lock`` (beside the database) for as long as its store is open: one server per
  file. The store serves reads from memory and numbers allocations in memory before
  committing them, so a second process on the same file would hand out the same seqs again
  (I1); it is refused with one line instead (several nodes share a ``redis://`` store).
  ``restore`` and ``init --force`` take the same lock, so they refuse to run while a server
  uses the file (they rewrite what the server holds in memory). ``backup`` needs no lock: it
  reads through SQLite's online backup API.
* **Backup** (:func:`backup`): ``sqlite3.Connection.backup`` copies every page in one step,
  inside one read transaction, so the copy is one committed state even while the server keeps
  committing (WAL mode: readers never block the writer).
* **Restore** (:func:`restore`): the copy is checked (a seqactor store, a schema this version
  reads), given a **new epoch**, fsync'd, and renamed over the store file (its old ``-wal`` and
  ``-shm`` files are removed first, so none of their frames can be replayed onto the copy).
  Every sync token names the old epoch, so every client gets a full snapshot on its next sync
  and no token can be answered with a delta from the older state.
* **What a restore loses.** Everything committed after the backup was taken: allocations,
  reads, membership and min changes. In particular the seqs allocated after the backup would be
  handed out again (they were already given to the message service). ``keep_sequences=True``
  prevents that when the current store file is still readable: every conversation keeps the
  higher of its backed-up and current ``max_sequence`` (and ``max_sequence_time_ms``), so the
  next allocation follows the last seq ever handed out. Membership and read seqs stay the
  backup's either way.
* **Epoch rotation** (:func:`rotate_epoch`): a new epoch, data kept (``store init --force``).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from seqactor.store._base import EPOCH_BYTES, IncompatibleStore, Unavailable
from seqactor.store._sqlite_lock import exclusive

APP_MARKER = "seqactor"
RESTORE_TMP_SUFFIX = ".restore-tmp"
SIDE_FILE_SUFFIXES = ("-wal", "-shm", "-journal")


def _connect_existing(path: str, what: str) -> sqlite3.Connection:
    """Open an existing seqactor store file (never creates one)."""
    p = Path(path)
    if p.is_dir():
        raise Unavailable(f"{what} {path} is a directory, not a database file")
    if not p.exists():
        raise Unavailable(f"{what} {path} does not exist")
    try:
        conn = sqlite3.connect(f"file:{p.resolve()}?mode=rw", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise Unavailable(f"cannot open {what} {path}: {exc}") from None
    try:
        _check_seqactor(conn, path, what)
    except BaseException:
        conn.close()
        raise
    return conn


def _check_seqactor(conn: sqlite3.Connection, path: str, what: str) -> None:
    from seqactor.store.sqlite import SCHEMA_VERSION

    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        row = conn.execute("SELECT value FROM meta WHERE key = 'app'").fetchone()
    except sqlite3.DatabaseError:
        raise IncompatibleStore(f"{what} {path} is not a seqactor store") from None
    if row is None or row[0] != APP_MARKER or version < 1:
        raise IncompatibleStore(f"{what} {path} is not a seqactor store")
    if version > SCHEMA_VERSION:
        raise IncompatibleStore(
            f"{what} {path} has schema version {version}, newer than this seqactor reads "
            f"({SCHEMA_VERSION})"
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup(db_path: str, dest: str) -> tuple[int, bytes]:
    """Copy the store at ``db_path`` to the new file ``dest`` (consistent while a server
    runs). Returns (position, epoch) of the copy."""
    target = Path(dest)
    if target.exists() or target.is_symlink():
        raise Unavailable(f"backup file {dest} already exists; remove it or choose another name")
    if not target.parent.is_dir():
        raise Unavailable(f"cannot write backup file {dest}: directory {target.parent} does not exist")
    src = _connect_existing(db_path, "store")
    try:
        try:
            dst = sqlite3.connect(target, isolation_level=None)
        except sqlite3.Error as exc:
            raise Unavailable(f"cannot write backup file {dest}: {exc}") from None
        try:
            src.backup(dst)  # every page in one step: one read transaction, one state
            dst.execute("PRAGMA journal_mode = DELETE")  # a single self-contained file
            meta = dict(dst.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.Error as exc:
            dst.close()
            target.unlink(missing_ok=True)
            raise Unavailable(f"backup to {dest} failed: {exc}") from None
        dst.close()
    finally:
        src.close()
    with open(target, "rb") as fh:
        os.fsync(fh.fileno())
    _fsync_dir(target.parent)
    return int(meta["position"]), bytes(meta["epoch"])


def _current_sequences(db_path: str) -> dict[str, tuple[int, int]]:
    """conversation -> (max_seq, time_ms) of the store file as it is now."""
    conn = _connect_existing(db_path, "store")
    try:
        return {
            cid: (int(mx), int(t))
            for cid, mx, t in conn.execute("SELECT id, max_seq, time_ms FROM conversations")
        }
    finally:
        conn.close()


def restore(backup_path: str, db_path: str, keep_sequences: bool = False) -> tuple[int, bytes]:
    """Install the backup at ``backup_path`` as the store ``db_path`` with a new epoch.
    No server may have the store open. Returns (position, new epoch)."""
    target = Path(db_path)
    if not target.parent.is_dir():
        raise Unavailable(f"cannot restore to {db_path}: directory {target.parent} does not exist")
    if target.is_dir():
        raise Unavailable(f"store {db_path} is a directory, not a database file")
    with exclusive(db_path):
        current: dict[str, tuple[int, int]] = {}
        if keep_sequences:
            if not target.exists():
                raise Unavailable(
                    f"--keep-sequences reads the current store {db_path}, which does not exist"
                )
            current = _current_sequences(db_path)
        src = _connect_existing(backup_path, "backup file")
        tmp = Path(db_path + RESTORE_TMP_SUFFIX)
        tmp.unlink(missing_ok=True)
        try:
            dst = sqlite3.connect(tmp, isolation_level=None)
            try:
                src.backup(dst)
                epoch = os.urandom(EPOCH_BYTES)
                dst.execute("BEGIN IMMEDIATE")
                position = int(
                    dst.execute("SELECT value FROM meta WHERE key = 'position'").fetchone()[0]
                )
                dst.execute("UPDATE meta SET value = ? WHERE key = 'epoch'", (epoch,))
                if current:
                    _raise_sequences(dst, current, position)
                dst.execute("COMMIT")
                dst.execute("PRAGMA journal_mode = DELETE")
            finally:
                dst.close()
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            for suffix in SIDE_FILE_SUFFIXES:  # never replay the old file's log onto the copy
                Path(db_path + suffix).unlink(missing_ok=True)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except sqlite3.Error as exc:
            raise Unavailable(f"restore of {backup_path} into {db_path} failed: {exc}") from None
        finally:
            src.close()
            tmp.unlink(missing_ok=True)
    return position, epoch


def _raise_sequences(
    conn: sqlite3.Connection, current: dict[str, tuple[int, int]], position: int
) -> None:
    """Give every conversation the higher of its restored and current max (and time), so no
    seq handed out after the backup is handed out again. Conversations created after the
    backup come back with no members, only their max."""
    restored = {
        cid: (int(mx), int(mn), int(t))
        for cid, mx, mn, t in conn.execute("SELECT id, max_seq, min_seq, time_ms FROM conversations")
    }
    for cid, (cur_max, cur_time) in current.items():
        old = restored.get(cid)
        if old is None:
            conn.execute(
                "INSERT INTO conversations (id, max_seq, min_seq, time_ms, pos) "
                "VALUES (?, ?, 0, ?, ?)",
                (cid, cur_max, cur_time, position),
            )
        elif cur_max > old[0] or cur_time > old[2]:
            conn.execute(
                "UPDATE conversations SET max_seq = ?, time_ms = ?, pos = ? WHERE id = ?",
                (max(cur_max, old[0]), max(cur_time, old[2]), position, cid),
            )


def read_epoch(db_path: str) -> bytes:
    """The epoch of an existing store file (read only; a server may be running)."""
    conn = _connect_existing(db_path, "store")
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
    except sqlite3.Error as exc:
        raise Unavailable(f"cannot read the epoch of {db_path}: {exc}") from None
    finally:
        conn.close()
    if row is None or not isinstance(row[0], bytes):
        raise IncompatibleStore(f"store {db_path} has no valid epoch")
    return bytes(row[0])


def rotate_epoch(db_path: str) -> bytes:
    """A new epoch for an existing store file, data kept. No server may have it open."""
    with exclusive(db_path):
        conn = _connect_existing(db_path, "store")
        try:
            epoch = os.urandom(EPOCH_BYTES)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'epoch'", (epoch,))
        except sqlite3.Error as exc:
            raise Unavailable(f"cannot write a new epoch into {db_path}: {exc}") from None
        finally:
            conn.close()
    return epoch
