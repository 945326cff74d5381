"""`seqactor store backup | restore | init --force` on SQLite, as an operator runs them:
real `seqactor serve` subprocesses, real sockets, the CLI as a subprocess."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import trio
import trio_websocket as tws

from tests._harness import RawClient, body, update_of
from tests.test_serve_cli import SEQACTOR, run_token, start_serve

STOP_TIMEOUT_S = 20


def store_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SEQACTOR, "store", *args], capture_output=True, text=True, timeout=60)


async def stop(proc: trio.Process) -> None:
    proc.terminate()
    with trio.fail_after(STOP_TIMEOUT_S):
        assert await proc.wait() == 0


async def allocate(url: str, tmp_path: Path, conversation: str, count: int) -> tuple[int, int]:
    async with tws.open_websocket_url(url) as conn:
        svc = RawClient(conn)
        tok = run_token(tmp_path / "secret", "backend", "--role", "service")
        assert body(await svc.request("hello", token=tok)) == "welcome"
        r = await svc.request("allocate_sequences", conversation_id=conversation, count=count)
        return r.allocated.first_sequence, r.allocated.last_sequence


async def add_member(url: str, tmp_path: Path, conversation: str, user: str) -> None:
    async with tws.open_websocket_url(url) as conn:
        svc = RawClient(conn)
        tok = run_token(tmp_path / "secret", "backend", "--role", "service")
        assert body(await svc.request("hello", token=tok)) == "welcome"
        assert body(await svc.request("add_members", conversation_id=conversation,
                                      user_ids=[user])) == "ack"


async def sync(url: str, tmp_path: Path, user: str, since: bytes = b"") -> tuple[dict, bytes, bool]:
    async with tws.open_websocket_url(url) as conn:
        client = RawClient(conn)
        tok = run_token(tmp_path / "secret", user)
        assert body(await client.request("hello", token=tok, device_id="test")) == "welcome"
        convs, token, full, _removed = update_of(await client.request("get_sequences", since=since))
        return convs, token, full


async def _restore_scenario(tmp_path: Path, keep_sequences: bool) -> None:
    """The issue's scenario: 1..3 allocated, backup, 4..7 allocated and token T taken after
    it, restore, start again."""
    db = tmp_path / "seqactor.db"
    url_store = f"sqlite:///{db}"
    backup_file = tmp_path / "backup.db"
    proc, url = await start_serve(tmp_path, url_store)
    await add_member(url, tmp_path, "g", "alice")
    assert await allocate(url, tmp_path, "g", 3) == (1, 3)
    await stop(proc)
    res = store_cli("backup", "--store", url_store, str(backup_file))
    assert res.returncode == 0, res.stderr
    assert f"backed up {db} to {backup_file}" in res.stdout

    proc, url = await start_serve(tmp_path, url_store)
    assert await allocate(url, tmp_path, "g", 4) == (4, 7)
    convs, token_t, full = await sync(url, tmp_path, "alice")
    assert full and convs["g"][0] == 7
    await stop(proc)

    extra = ["--keep-sequences"] if keep_sequences else []
    res = store_cli("restore", str(backup_file), "--store", url_store, *extra)
    assert res.returncode == 0, res.stderr
    assert "new epoch" in res.stdout and "full snapshot" in res.stdout

    proc, url = await start_serve(tmp_path, url_store)
    try:
        convs, _token, full = await sync(url, tmp_path, "alice", since=token_t)
        assert full  # token T names the old epoch: a full snapshot, never an empty delta
        if keep_sequences:
            assert convs["g"][0] == 7  # the highest seq ever handed out is kept
            assert await allocate(url, tmp_path, "g", 2) == (8, 9)
        else:
            assert convs["g"][0] == 3  # the backup's state: what the docs say a restore loses
            assert await allocate(url, tmp_path, "g", 2) == (4, 5)
        convs, _token, full = await sync(url, tmp_path, "alice", since=token_t)
        assert full
    finally:
        await stop(proc)


async def test_restore_gives_tokens_from_after_the_backup_a_full_snapshot(tmp_path):
    await _restore_scenario(tmp_path, keep_sequences=False)


async def test_restore_keep_sequences_never_reissues_a_seq(tmp_path):
    await _restore_scenario(tmp_path, keep_sequences=True)


async def test_backup_while_the_server_allocates_is_one_consistent_state(tmp_path):
    db = tmp_path / "seqactor.db"
    url_store = f"sqlite:///{db}"
    proc, url = await start_serve(tmp_path, url_store)
    backups = [tmp_path / f"backup-{i}.db" for i in range(3)]
    try:
        async with tws.open_websocket_url(url) as conn:
            svc = RawClient(conn)
            tok = run_token(tmp_path / "secret", "backend", "--role", "service")
            assert body(await svc.request("hello", token=tok)) == "welcome"
            done = trio.Event()

            async def writer() -> None:
                # a then b, each acknowledged (durable) before the next: every committed state
                # has max(a) == max(b) or max(a) == max(b) + 1
                while not done.is_set():
                    for cid in ("a", "b"):
                        r = await svc.request("allocate_sequences", conversation_id=cid, count=1)
                        assert body(r) == "allocated"

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                for b in backups:
                    res = await trio.to_thread.run_sync(
                        store_cli, "backup", "--store", url_store, str(b))
                    assert res.returncode == 0, res.stderr
                done.set()
            r = await svc.request("allocate_sequences", conversation_id="a", count=1)
            final_a = r.allocated.last_sequence
    finally:
        await stop(proc)
    for b in backups:
        con = sqlite3.connect(b)
        try:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            maxes = dict(con.execute("SELECT id, max_seq FROM conversations"))
            position = int(con.execute("SELECT value FROM meta WHERE key = 'position'").fetchone()[0])
        finally:
            con.close()
        a, b_ = maxes.get("a", 0), maxes.get("b", 0)
        assert a - b_ in (0, 1), maxes
        assert position == a + b_  # one position per allocation, nothing torn
        assert a < final_a


async def test_restore_and_init_force_refuse_while_the_server_runs(tmp_path):
    db = tmp_path / "seqactor.db"
    url_store = f"sqlite:///{db}"
    proc, url = await start_serve(tmp_path, url_store)
    try:
        res = store_cli("backup", "--store", url_store, str(tmp_path / "b.db"))
        assert res.returncode == 0, res.stderr
        for args in (["restore", str(tmp_path / "b.db"), "--store", url_store],
                     ["init", "--force", "--store", url_store]):
            res = store_cli(*args)
            assert res.returncode == 1
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and "stop the server first" in lines[0], res.stderr
            assert str(db) in lines[0]
    finally:
        await stop(proc)


async def test_init_force_rotates_the_epoch_on_sqlite_and_keeps_the_data(tmp_path):
    db = tmp_path / "seqactor.db"
    url_store = f"sqlite:///{db}"
    res = store_cli("init", "--store", url_store)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("created new epoch ")
    first = res.stdout.split()[3]
    res = store_cli("init", "--store", url_store)
    assert res.stdout.strip() == f"epoch already set {first}"
    proc, url = await start_serve(tmp_path, url_store)
    await add_member(url, tmp_path, "g", "alice")
    assert await allocate(url, tmp_path, "g", 3) == (1, 3)
    _convs, token_t, _full = await sync(url, tmp_path, "alice")
    _convs, _token, full = await sync(url, tmp_path, "alice", since=token_t)
    assert not full  # the same epoch: a delta
    await stop(proc)
    res = store_cli("init", "--force", "--store", url_store)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("created new epoch ") and first not in res.stdout
    proc, url = await start_serve(tmp_path, url_store)
    try:
        convs, _token, full = await sync(url, tmp_path, "alice", since=token_t)
        assert full and convs["g"][0] == 3  # a full snapshot, the data kept
        assert await allocate(url, tmp_path, "g", 1) == (4, 4)
    finally:
        await stop(proc)


def test_init_on_memory_says_nothing_persists():
    res = store_cli("init", "--store", "memory://")
    assert res.returncode == 0, res.stderr
    assert "keeps nothing" in res.stdout and "epoch" in res.stdout
    assert all(len(word) < 32 for word in res.stdout.split())  # no meaningless epoch printed
