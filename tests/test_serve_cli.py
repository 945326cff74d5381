"""`seqactor serve` and `seqactor token` as a user runs them: subprocesses, real sockets."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import trio
import trio_websocket as tws

from seqactor._proto import seqactor_pb2 as pb
from tests._harness import RawClient, body, update_of

SEQACTOR = [sys.executable, "-m", "seqactor.cli"]
START_TIMEOUT_S = 20


def run_token(secret_file: Path, user: str, *extra: str) -> str:
    out = subprocess.run(
        [*SEQACTOR, "token", "--secret-file", str(secret_file), "--user", user, *extra],
        capture_output=True, text=True, check=True, timeout=30,
    )
    lines = out.stdout.splitlines()
    assert len(lines) == 1  # the token alone on stdout
    return lines[0]


async def start_serve(tmp_path: Path, store: str, *extra: str) -> tuple[trio.Process, str]:
    proc = await trio.lowlevel.open_process(
        [*SEQACTOR, "serve", "--port", "0", "--store", store,
         "--secret-file", str(tmp_path / "secret"), "--heartbeat-interval", "5", *extra],
        stdout=subprocess.PIPE, stderr=open(tmp_path / "stderr.log", "wb"),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    buf = b""
    with trio.fail_after(START_TIMEOUT_S):
        while b"\n" not in buf:
            chunk = await proc.stdout.receive_some(4096)
            assert chunk, (tmp_path / "stderr.log").read_text()
            buf += chunk
    line = buf.split(b"\n")[0].decode()
    assert line.startswith("listening on ws://127.0.0.1:") and line.endswith("/v1")
    return proc, line.split()[-1]


async def test_serve_creates_secret_serves_and_stops_gracefully(tmp_path):
    secret = tmp_path / "secret"
    proc, url = await start_serve(tmp_path, f"sqlite:///{tmp_path}/db.sqlite")
    try:
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        stderr = (tmp_path / "stderr.log").read_text()
        assert f"created secret file {secret}" in stderr
        svc_token = run_token(secret, "backend", "--role", "service")
        user_token = run_token(secret, "alice", "--ttl", "600")
        async with tws.open_websocket_url(url) as conn:
            svc = RawClient(conn)
            assert body(await svc.request("hello", token=svc_token)) == "welcome"
            await svc.request("add_members", conversation_id="g", user_ids=["alice"])
            r = await svc.request("allocate_sequences", conversation_id="g", count=3)
            assert r.allocated.last_sequence == 3
        async with tws.open_websocket_url(url) as conn:
            alice = RawClient(conn)
            r = await alice.request("hello", token=user_token, device_id="cli-test")
            assert r.welcome.user_id == "alice" and r.welcome.heartbeat_interval_ms == 5000
            conv, _, full, _ = update_of(await alice.request("get_sequences"))
            assert full and conv["g"][0] == 3
            proc.send_signal(signal.SIGTERM)
            msg = await alice.next_push()
            assert body(msg) == "go_away"
            assert (await alice.wait_closed()).code == 1001
        with trio.fail_after(START_TIMEOUT_S):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # One structured line per session open and close, with user, device, duration, reason.
    records = [json.loads(x) for x in (tmp_path / "stderr.log").read_text().splitlines()
               if x.startswith("{")]
    closes = [r for r in records if r.get("event") == "session_close" and r.get("user") == "alice"]
    assert len(closes) == 1
    assert closes[0]["device"] == "cli-test" and closes[0]["code"] == 1001
    assert closes[0]["duration_s"] >= 0 and closes[0]["reason"]
    opens = [r for r in records if r.get("event") == "session_open"]
    assert {r["user"] for r in opens} == {"alice", "backend"}


async def test_serve_refuses_foreign_database(tmp_path):
    bad = tmp_path / "not-a-db.sqlite"
    bad.write_bytes(os.urandom(4096))
    out = await trio.run_process(
        [*SEQACTOR, "serve", "--port", "0", "--store", f"sqlite:///{bad}",
         "--secret-file", str(tmp_path / "secret")],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    err = out.stderr.decode()
    assert out.returncode != 0
    assert "Traceback" not in err
    assert "error" in err.splitlines()[-1]


def test_token_errors_are_one_line(tmp_path):
    out = subprocess.run(
        [*SEQACTOR, "token", "--secret-file", str(tmp_path / "missing"), "--user", "a"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode != 0 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "does not exist" in out.stderr
    (tmp_path / "s").write_text("x" * 40)
    out = subprocess.run(
        [*SEQACTOR, "token", "--secret-file", str(tmp_path / "s"), "--user", "bad\x01id"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr


async def test_serve_limit_flags_are_enforced(tmp_path):
    proc, url = await start_serve(
        tmp_path, "memory://", "--max-view-conversations", "2", "--max-ids-per-request", "3",
    )
    try:
        svc_token = run_token(tmp_path / "secret", "backend", "--role", "service")
        async with tws.open_websocket_url(url) as conn:
            svc = RawClient(conn)
            assert body(await svc.request("hello", token=svc_token)) == "welcome"
            for cid in ("a", "b"):
                r = await svc.request("add_members", conversation_id=cid, user_ids=["alice"])
                assert body(r) == "ack"
            r = await svc.request("add_members", conversation_id="c", user_ids=["alice"])
            assert r.error.code == pb.Error.Code.TOO_LARGE  # her view is full
            r = await svc.request("add_members", conversation_id="d", user_ids=["x", "y", "z", "w"])
            assert r.error.code == pb.Error.Code.TOO_LARGE  # more ids than one request may hold
    finally:
        proc.kill()
        await proc.wait()


async def test_one_server_per_sqlite_file_and_the_absolute_path_is_printed(tmp_path):
    """A second `serve` on the file a running server has open would hand out the same seqs
    again (each numbers allocations in its own memory): it is refused with one line. The
    running server names the absolute path of the file it opened."""
    db = tmp_path / "db.sqlite"
    proc, _url = await start_serve(tmp_path, f"sqlite:///{db}")
    try:
        stderr = (tmp_path / "stderr.log").read_text()
        assert f"seqactor serve: store sqlite:///{db}" in stderr  # absolute, as opened
        out = await trio.run_process(
            [*SEQACTOR, "serve", "--port", "0", "--store", f"sqlite:///{db}",
             "--secret-file", str(tmp_path / "secret")],
            capture_stdout=True, capture_stderr=True, check=False,
        )
        err = out.stderr.decode().strip().splitlines()
        assert out.returncode == 1 and out.stdout == b""
        assert len(err) == 1 and str(db) in err[0] and "one server per SQLite file" in err[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(START_TIMEOUT_S):
            await proc.wait()
    # stopped: the file can be served again
    again, _ = await start_serve(tmp_path, f"sqlite:///{db}")
    again.send_signal(signal.SIGTERM)
    with trio.fail_after(START_TIMEOUT_S):
        assert await again.wait() == 0
