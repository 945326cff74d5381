"""`seqactor serve --workers N` as a user runs it: real processes on one port, a real Redis."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio_websocket as tws

from tests._harness import RawClient, body, update_of
from tests._redis import redis_url, unique_prefix
from tests.test_serve_cli import run_token

SEQACTOR = [sys.executable, "-m", "seqactor.cli"]
START_TIMEOUT_S = 60
MAX_CONNECTIONS_TO_REACH_EVERY_WORKER = 200  # the kernel spreads by a hash of the 4-tuple


@pytest.mark.parametrize("store", ["sqlite:///{tmp}/db.sqlite", "memory://"])
def test_workers_refuse_a_store_they_cannot_share(tmp_path: Path, store: str) -> None:
    url = store.format(tmp=tmp_path)
    out = subprocess.run(
        [*SEQACTOR, "serve", "--workers", "2", "--port", "0", "--store", url,
         "--secret-file", str(tmp_path / "secret")],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and "--workers 2" in lines[0] and "redis://" in lines[0]
    assert url in lines[0]
    assert not (tmp_path / "secret").exists()  # refused before anything was made


async def start_workers(tmp_path: Path, n: int) -> tuple[trio.Process, str, list[int]]:
    store = redis_url(unique_prefix())
    stderr = open(tmp_path / "stderr.log", "wb")  # noqa: SIM115 - owned by the process
    proc = await trio.lowlevel.open_process(
        [*SEQACTOR, "serve", "--workers", str(n), "--port", "0", "--store", store,
         "--secret-file", str(tmp_path / "secret"), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=stderr, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    stderr.close()
    assert proc.stdout is not None
    buf = b""
    with trio.fail_after(START_TIMEOUT_S):
        while b"\n" not in buf:
            chunk = await proc.stdout.receive_some(4096)
            assert chunk, (tmp_path / "stderr.log").read_text()
            buf += chunk
    line = buf.split(b"\n")[0].decode()
    assert re.fullmatch(r"listening on ws://127\.0\.0\.1:\d+/v1", line), line
    m = re.search(r"(\d+) workers share port (\d+) \(pids ([\d ]+)\)",
                  (tmp_path / "stderr.log").read_text())
    assert m is not None and int(m.group(1)) == n
    pids = [int(p) for p in m.group(3).split()]
    assert len(set(pids)) == n
    return proc, line.split()[-1], pids


def connection_owners(port: int) -> set[int]:
    """The pids holding established server-side connections on ``port`` (``ss``)."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    return {int(p) for p in re.findall(r"pid=(\d+)", out)}


async def test_workers_share_one_port_one_state_and_stop_with_goaway(tmp_path: Path) -> None:
    proc, url, pids = await start_workers(tmp_path, 2)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    conns: list[tws.WebSocketConnection] = []
    try:
        secret = tmp_path / "secret"
        svc_token = run_token(secret, "backend", "--role", "service")
        async with trio.open_nursery() as nursery:
            users: list[RawClient] = []
            # connect until both workers hold sessions (the kernel picks the worker)
            while connection_owners(port) != set(pids):
                assert len(users) < MAX_CONNECTIONS_TO_REACH_EVERY_WORKER
                conn = await tws.connect_websocket_url(nursery, url)
                conns.append(conn)
                client = RawClient(conn)
                uid = f"u{len(users)}"
                reply = await client.request("hello", token=run_token(secret, uid),
                                             device_id="d")
                assert body(reply) == "welcome"
                users.append(client)
            svc_conn = await tws.connect_websocket_url(nursery, url)
            conns.append(svc_conn)
            svc = RawClient(svc_conn)
            assert body(await svc.request("hello", token=svc_token)) == "welcome"
            uids = [f"u{i}" for i in range(len(users))]
            await svc.request("add_members", conversation_id="g", user_ids=uids)
            for client in users:
                assert body(await client.request("subscribe", all=True)) == "ack"
                # the join happened (on whichever worker): the view already holds "g"
                conv, _, full, _ = update_of(await client.request("get_sequences"))
                assert full and "g" in conv
            r = await svc.request("allocate_sequences", conversation_id="g", count=2)
            assert r.allocated.last_sequence == 2
            for client in users:  # pushed on every worker
                while True:
                    push = await client.next_push()
                    conv, _, _, _ = update_of(push)
                    if conv.get("g", (0,))[0] == 2:
                        break
            proc.send_signal(signal.SIGTERM)
            for client in [*users, svc]:
                while body(msg := await client.next_push()) != "go_away":
                    assert body(msg) == "update"
                assert (await client.wait_closed()).code == 1001
            with trio.fail_after(START_TIMEOUT_S):
                assert await proc.wait() == 0
            for pid in pids:  # the supervisor reaped its workers
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)
            nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


async def test_a_dead_worker_stops_the_others(tmp_path: Path) -> None:
    proc, _, pids = await start_workers(tmp_path, 2)
    try:
        os.kill(pids[0], signal.SIGKILL)
        with trio.fail_after(START_TIMEOUT_S):
            assert await proc.wait() == 1
        last = (tmp_path / "stderr.log").read_text().splitlines()[-1]
        assert last.startswith("seqactor serve: error: worker ") and str(pids[0]) in last
        with pytest.raises(ProcessLookupError):
            os.kill(pids[1], 0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
