"""``sqlite:///path``: the shared in-memory model plus a durable write-behind log in SQLite.

* Everything is loaded into memory at :meth:`SQLiteStore.open`; reads never touch the file.
* Writes are computed in memory at once (positions, ranges, effective values) and go to ONE
  dedicated writer thread that owns the only connection. **Group commit**: while a transaction
  commits, newly computed operations collect in the next batch (at most ``max_batch``
  operations); a batch is one transaction, one fsync (WAL, ``synchronous=FULL`` by default).
  Rows are coalesced per key inside a batch, so 64 allocations on one conversation write one
  row. A caller's ``await`` returns only after its batch committed; then its change is applied
  to the visible state and published, in position order.
* A failed commit puts the store in a failed state: that batch's callers and every later
  writer get :class:`Unavailable`. Reads keep serving the last committed state.
* Schema: ``PRAGMA user_version`` plus a ``meta`` table holding the application marker, the
  epoch (16 random bytes, made once) and the position (written in every transaction).
  Migrations are the table :data:`MIGRATIONS`. A file that is not ours, or has a newer schema,
  raises :class:`IncompatibleStore`.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import outcome
import trio

from seqactor.store import _sqlite_lock as lock
from seqactor.store._base import EPOCH_BYTES, IncompatibleStore, InvalidArgument, Unavailable
from seqactor.store._state import Op, Row, Sink, State, StateStore

log = logging.getLogger("seqactor.store.sqlite")

APP_MARKER = "seqactor"
SQLITE_HEADER = b"SQLite format 3\x00"
DEFAULT_MAX_BATCH_OPS = 4096
DEFAULT_SYNCHRONOUS = "FULL"
WRITER_JOIN_TIMEOUT_S = 30.0
_SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")


@dataclass(frozen=True)
class Migration:
    """One schema step: run ``statements`` on a database at ``version - 1``."""

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial schema: meta, conversations, members, tombstones",
        (
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
            "CREATE TABLE conversations ("
            " id TEXT PRIMARY KEY,"
            " max_seq INTEGER NOT NULL,"
            " min_seq INTEGER NOT NULL,"
            " time_ms INTEGER NOT NULL,"
            " pos INTEGER NOT NULL"
            ") WITHOUT ROWID",
            "CREATE TABLE members ("
            " conversation_id TEXT NOT NULL,"
            " user_id TEXT NOT NULL,"
            " read_seq INTEGER NOT NULL,"
            " pos INTEGER NOT NULL,"
            " frozen INTEGER NOT NULL,"
            " frozen_max INTEGER NOT NULL,"
            " frozen_min INTEGER NOT NULL,"
            " frozen_time_ms INTEGER NOT NULL,"
            " PRIMARY KEY (conversation_id, user_id)"
            ") WITHOUT ROWID",
            "CREATE TABLE tombstones ("
            " pos INTEGER NOT NULL,"
            " user_id TEXT NOT NULL,"
            " conversation_id TEXT NOT NULL,"
            " PRIMARY KEY (pos, user_id)"
            ") WITHOUT ROWID",
            f"INSERT INTO meta (key, value) VALUES ('app', '{APP_MARKER}')",
            "INSERT INTO meta (key, value) VALUES ('position', 0)",
            "INSERT INTO meta (key, value) VALUES ('tombstone_horizon', 0)",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version

_UPSERT_CONV = (
    "INSERT INTO conversations (id, max_seq, min_seq, time_ms, pos) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET max_seq = excluded.max_seq, min_seq = excluded.min_seq, "
    "time_ms = excluded.time_ms, pos = excluded.pos"
)
_UPSERT_MEMBER = (
    "INSERT OR REPLACE INTO members (conversation_id, user_id, read_seq, pos, frozen, "
    "frozen_max, frozen_min, frozen_time_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_DELETE_MEMBER = "DELETE FROM members WHERE conversation_id = ? AND user_id = ?"
_INSERT_TOMB = "INSERT OR REPLACE INTO tombstones (pos, user_id, conversation_id) VALUES (?, ?, ?)"
_SET_META = "UPDATE meta SET value = ? WHERE key = ?"


class Batch(Sink):
    """One transaction: the rows of its operations (in order) and the operations."""

    __slots__ = ("ops", "event", "error", "last_pos", "horizon")

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self.event = trio.Event()  # set when the batch is committed (or failed)
        self.error: BaseException | None = None
        self.last_pos = 0
        self.horizon = 0


_current_task = trio.lowlevel.current_task
_wait_task_rescheduled = trio.lowlevel.wait_task_rescheduled
_reschedule = trio.lowlevel.reschedule

_Job = tuple[Callable[[], Any], Callable[[Any], None]]


class SQLiteStore(StateStore):
    """The durable default store (see the module docstring).

    ``synchronous``: SQLite's ``PRAGMA synchronous`` (``FULL`` by default: a commit is fsync'd).
    ``max_batch``: most operations per transaction (1 = commit each operation).
    Limits: ``max_view_conversations``, ``max_conversation_members``, ``max_tombstones``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = DEFAULT_SYNCHRONOUS,
        max_batch: int = DEFAULT_MAX_BATCH_OPS,
        max_view_conversations: int | None = None,
        max_conversation_members: int | None = None,
        max_tombstones: int | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {}
        if max_tombstones is not None:
            kwargs["max_tombstones"] = max_tombstones
        super().__init__(
            max_view_conversations=max_view_conversations,
            max_conversation_members=max_conversation_members,
            **kwargs,
        )
        self.path = os.fspath(path)
        sync = synchronous.upper()
        if sync not in _SYNCHRONOUS_MODES:
            raise InvalidArgument(f"synchronous must be one of {', '.join(_SYNCHRONOUS_MODES)}")
        self.synchronous = sync
        if max_batch < 1:
            raise InvalidArgument("max_batch must be at least 1")
        self.max_batch = max_batch
        self.batches_committed = 0
        self.ops_committed = 0
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._conn: sqlite3.Connection | None = None  # writer thread only
        self._db_horizon = 0  # writer thread only
        self._pending: deque[Batch] = deque()  # computed, not yet handed to the writer
        self._open_batch: Batch | None = None  # the last of _pending while it takes more ops
        self._inflight: Batch | None = None  # being committed by the writer
        self._flush_scheduled = False
        self._failed: BaseException | None = None
        self._lock_fd: int | None = None  # exclusive flock on <path>.lock while open

    # ---------------------------------------------------------- lifecycle

    async def open(self) -> None:
        if self._opened:
            await trio.lowlevel.checkpoint()
            return
        if self._closed:
            raise Unavailable("the store was closed")
        self._token = trio.lowlevel.current_trio_token()
        self._lock_fd = lock.hold_open(self.path)  # one server per file (and no restore meanwhile)
        self._thread = threading.Thread(
            target=self._writer_main, name="seqactor-sqlite-writer", daemon=True
        )
        self._thread.start()
        try:
            self.epoch = await self._call(self._open_db)
        except BaseException:
            await self._stop_writer()
            raise
        self.position = self._state.position
        self._opened = True
        self._writable = True

    async def aclose(self) -> None:
        if self._closed or self._thread is None:
            self._closed = True
            self._writable = False
            await trio.lowlevel.checkpoint()
            return
        self._closed = True  # refuse new writes; drain what is computed
        self._writable = False
        with trio.CancelScope(shield=True):
            while self._pending or self._inflight is not None:
                last = self._pending[-1] if self._pending else self._inflight
                assert last is not None
                await last.event.wait()
            await self._stop_writer()

    async def _stop_writer(self) -> None:
        thread = self._thread
        if thread is None:
            return
        with trio.CancelScope(shield=True):
            try:
                await self._call(self._close_db)
            finally:
                self._jobs.put(None)
                await trio.to_thread.run_sync(thread.join, WRITER_JOIN_TIMEOUT_S)
                self._thread = None
                lock.release(self._lock_fd)
                self._lock_fd = None

    def _unwritable(self) -> Unavailable:
        if self._failed is not None:
            return Unavailable(f"the store failed and takes no more writes: {self._failed!r}")
        return super()._unwritable()

    # ---------------------------------------------------------- group commit (Trio side)

    def _sink(self) -> Sink:
        b = self._open_batch
        if b is None:
            b = self._open_batch = Batch()
        return b

    async def _commit(self, op: Op) -> None:
        b = self._open_batch
        assert b is not None  # _sink() made it and nothing ran in between
        ops = b.ops
        if not ops:
            self._pending.append(b)
        ops.append(op)
        if len(ops) >= self.max_batch:
            self._open_batch = None
        if self._inflight is None and not self._flush_scheduled:
            # Leader: let every task that is runnable now add its op first, then send.
            self._flush_scheduled = True
            await trio.lowlevel.cancel_shielded_checkpoint()
            self._flush_scheduled = False
            self._send_next()
        op.task = _current_task()
        # cancelled while waiting: the operation still commits, nobody is told
        await _wait_task_rescheduled(op.abort)

    async def _settle(self) -> None:
        last = self._pending[-1] if self._pending else self._inflight
        if last is None:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        await last.event.wait()
        if last.error is not None:
            raise Unavailable(f"the commit failed: {last.error!r}") from last.error

    def _send_next(self) -> None:
        if self._inflight is not None or not self._pending or self._failed is not None:
            return
        b = self._pending.popleft()
        if b is self._open_batch:
            self._open_batch = None
        b.last_pos = b.ops[-1].change.position
        b.horizon = self._state.tomb_horizon
        self._inflight = b
        self._jobs.put((partial(self._write_batch, b), partial(self._on_commit, b)))

    def _on_commit(self, b: Batch, result: object) -> None:
        """Trio thread (run_sync_soon): send the next batch, apply and publish this one."""
        self._inflight = None
        if self._failed is not None:  # sent before the failure; its callers were told
            return
        if isinstance(result, BaseException):
            self._fail(b, result)
            return
        self._send_next()  # keep the disk busy while this batch is applied
        self.batches_committed += 1
        self.ops_committed += len(b.ops)
        try:
            self._apply_many(b.ops)
        except Exception as exc:  # a bug in apply: stop taking writes rather than diverge
            self._fail(b, exc)
            return
        b.event.set()
        for op in b.ops:
            if op.task is not None:
                _reschedule(op.task)
                op.task = None

    def _fail(self, b: Batch, exc: BaseException) -> None:
        if self._failed is None:
            log.error("SQLite store %s failed; refusing further writes: %r", self.path, exc)
            self._failed = exc
        self._writable = False
        batches = [b, *self._pending]
        if self._inflight is not None and self._inflight is not b:
            batches.append(self._inflight)
        self._pending.clear()
        self._open_batch = None
        message = f"the commit failed: {exc!r}"
        for x in batches:
            x.error = exc
            x.event.set()
            for op in x.ops:
                if op.task is not None:
                    error = Unavailable(message)
                    error.__cause__ = exc
                    _reschedule(op.task, outcome.Error(error))
                    op.task = None

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the writer thread and return its result."""
        done = trio.Event()
        box: list[object] = []

        def cb(result: object) -> None:
            box.append(result)
            done.set()

        self._jobs.put((fn, cb))
        with trio.CancelScope(shield=True):
            await done.wait()
        result = box[0]
        if isinstance(result, BaseException):
            raise result
        return result

    # ---------------------------------------------------------- writer thread

    def _writer_main(self) -> None:
        token = self._token
        assert token is not None
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, cb = job
            result: object
            try:
                result = fn()
            except Exception as exc:
                result = exc
            try:
                token.run_sync_soon(cb, result)
            except trio.RunFinishedError:
                log.warning("SQLite writer: the Trio run ended before a job finished")

    def _write_batch(self, b: Batch) -> None:
        conn = self._conn
        if conn is None:
            raise Unavailable("the database is closed")
        try:
            conn.execute("BEGIN")
            convs: dict[str, Row] = {}
            members: dict[tuple[str, str], Row | None] = {}
            tombs: list[Row] = []
            for r in b.rows:  # the last row per key wins
                n = len(r)
                if n == 5:
                    convs[r[0]] = r  # type: ignore[index]
                elif n == 8:
                    members[(r[0], r[1])] = r  # type: ignore[index]
                elif n == 2:
                    members[r] = None  # type: ignore[index]
                else:
                    tombs.append(r)
            if convs:
                conn.executemany(_UPSERT_CONV, convs.values())
            if members:
                upserts = [r for r in members.values() if r is not None]
                if len(upserts) != len(members):
                    conn.executemany(_DELETE_MEMBER, [k for k, r in members.items() if r is None])
                if upserts:
                    conn.executemany(_UPSERT_MEMBER, upserts)
            if tombs:
                conn.executemany(_INSERT_TOMB, tombs)
            if b.horizon > self._db_horizon:
                conn.execute("DELETE FROM tombstones WHERE pos <= ?", (b.horizon,))
                conn.execute(_SET_META, (b.horizon, "tombstone_horizon"))
            conn.execute(_SET_META, (b.last_pos, "position"))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        if b.horizon > self._db_horizon:
            self._db_horizon = b.horizon

    def _close_db(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if self._failed is None:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("SQLite checkpoint at close failed: %r", exc)
        finally:
            conn.close()

    def _open_db(self) -> bytes:
        """Writer thread: open, check, migrate and load everything; return the epoch."""
        path = self.path
        if path != ":memory:" and os.path.isfile(path):
            with open(path, "rb") as f:
                head = f.read(len(SQLITE_HEADER))
            if head and head != SQLITE_HEADER:
                raise IncompatibleStore(
                    f"{path} is not a SQLite database, so not a seqactor store; refusing to "
                    "touch it (point the store URL at a new or a seqactor file)"
                )
        if path != ":memory:":
            where = os.path.abspath(path)
            if os.path.isdir(path):
                raise Unavailable(f"{where} is a directory, not a database file")
            if not os.path.isdir(os.path.dirname(where)):
                raise Unavailable(
                    f"cannot create {where}: directory {os.path.dirname(where)} does not exist"
                )
        try:
            conn = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise Unavailable(f"cannot open {os.path.abspath(path)}: {exc}") from None
        try:
            epoch = self._prepare(conn)
            self._load(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise Unavailable(f"cannot use {os.path.abspath(path)}: {exc}") from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return epoch

    def _prepare(self, conn: sqlite3.Connection) -> bytes:
        path = self.path
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
        except sqlite3.DatabaseError as exc:
            raise IncompatibleStore(f"{path} is not a usable SQLite database: {exc}") from exc
        fresh = version == 0 and not tables
        if not fresh:
            marker = None
            if "meta" in tables:
                try:
                    row = conn.execute("SELECT value FROM meta WHERE key = 'app'").fetchone()
                except sqlite3.DatabaseError:
                    row = None
                marker = row[0] if row else None
            if marker != APP_MARKER or version < 1:
                raise IncompatibleStore(
                    f"{path} is a SQLite database but not a seqactor store (no "
                    f"{APP_MARKER!r} marker in its meta table); refusing to use it"
                )
            if version > SCHEMA_VERSION:
                raise IncompatibleStore(
                    f"{path} has seqactor schema version {version}, newer than this seqactor "
                    f"supports ({SCHEMA_VERSION}); upgrade seqactor to open it"
                )
        mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        if mode != "wal":
            log.warning("SQLite store %s: journal_mode is %s, not wal", path, mode)
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        if version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for step in MIGRATIONS:
                    if step.version > version:
                        log.info("SQLite store %s: migrating to v%d (%s)", path, step.version,
                                 step.description)
                        for statement in step.statements:
                            conn.execute(statement)
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?)",
                    (os.urandom(EPOCH_BYTES),),
                )
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        epoch = meta.get("epoch")
        if not isinstance(epoch, bytes) or len(epoch) != EPOCH_BYTES:
            raise IncompatibleStore(f"{path}: the seqactor meta table has no valid epoch")
        return epoch

    def _load(self, conn: sqlite3.Connection) -> None:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        position = int(meta["position"])
        horizon = int(meta.get("tombstone_horizon", 0))
        state = State(self._state.max_tombstones)
        state.load(
            position,
            horizon,
            conn.execute("SELECT id, max_seq, min_seq, time_ms, pos FROM conversations"),
            conn.execute(
                "SELECT conversation_id, user_id, read_seq, pos, frozen, frozen_max, "
                "frozen_min, frozen_time_ms FROM members"
            ),
            conn.execute(
                "SELECT pos, user_id, conversation_id FROM tombstones ORDER BY pos, user_id"
            ),
        )
        self._state = state
        self._db_horizon = horizon
