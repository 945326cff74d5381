"""The command line as a user runs it: subprocesses against a real `seqactor serve`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

CLI = [sys.executable, "-m", "seqactor.cli"]
TIMEOUT_S = 20


def run(*args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "COLUMNS": "120"},
    )


def _read_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"(ws://\S+/v1)", line)
        if m:
            return m.group(1)
    proc.kill()
    raise AssertionError(f"no URL printed; stderr: {proc.stderr.read() if proc.stderr else ''}")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, str]]:
    secret = str(tmp_path_factory.mktemp("cli") / "secret")
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", "0", "--store", "memory://", "--secret-file", secret,
         "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        url = _read_url(proc)
        yield url, secret
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def assert_one_line_error(res: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("command", ["serve", "token", "watch", "send", "members", "demo"])
def test_every_command_has_help_with_an_example(command):
    res = run(command, "--help")
    assert res.returncode == 0
    assert "example: seqactor " + command in res.stdout


def test_members_send_and_watch(server):
    url, secret = server
    res = run("members", "add", "--url", url, "--secret-file", secret, "team", "alice", "bob")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "team: added alice bob"
    res = run("send", "--url", url, "--secret-file", secret, "team", "--count", "3",
              "--sender", "bob")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "team: allocated 1..3"
    res = run("send", "--url", url, "--secret-file", secret, "team")
    assert res.stdout.strip() == "team: allocated 4"
    res = run("watch", "--url", url, "--user", "alice", "--secret-file", secret, "--once")
    assert res.returncode == 0, res.stderr
    assert "total unread 4" in res.stdout
    row = next(line for line in res.stdout.splitlines() if "team" in line)
    assert re.search(r"team\s*\S\s*4\s*\S\s*0\s*\S\s*4\s", row), row  # max 4, read 0, unread 4
    res = run("watch", "--url", url, "--user", "bob", "--secret-file", secret, "--once")
    assert "total unread 1" in res.stdout  # bob sent 1..3 (I6), not the 4th
    # a token from `seqactor token` works too
    tok = run("token", "--secret-file", secret, "--user", "alice").stdout.strip()
    res = run("watch", "--url", url, "--token", tok, "--once")
    assert res.returncode == 0 and "team" in res.stdout
    res = run("members", "remove", "--url", url, "--secret-file", secret, "team", "bob",
              "--keep-history")
    assert res.stdout.strip() == "team: removed bob (history kept)"


def test_watch_live_updates_and_quits_on_ctrl_c(server):
    url, secret = server
    run("members", "add", "--url", url, "--secret-file", secret, "live", "carol")
    proc = subprocess.Popen(
        [*CLI, "watch", "--url", url, "--user", "carol", "--secret-file", secret],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "120"},
    )
    time.sleep(1.5)
    run("send", "--url", url, "--secret-file", secret, "live", "--count", "7")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "live" in out and "total unread 7" in out


@pytest.mark.parametrize("case", ["refused", "bad-url", "bad-token", "no-credentials",
                                  "unknown-conversation", "user-token", "missing-secret"])
def test_errors_are_one_line(server, case):
    url, secret = server
    if case == "refused":
        res = run("send", "--url", "ws://127.0.0.1:1/v1", "--secret-file", secret, "c")
        assert_one_line_error(res, "seqactor send: error:", "connection refused")
    elif case == "bad-url":
        res = run("watch", "--url", "localhost:8765", "--token", "x")
        assert_one_line_error(res, "bad URL")
    elif case == "bad-token":
        res = run("members", "add", "--url", url, "--token", "garbage", "c", "u")
        assert_one_line_error(res, "authentication failed")
        res = run("watch", "--url", url, "--token", "garbage")
        assert_one_line_error(res, "authentication failed")
    elif case == "no-credentials":
        res = run("send", "--url", url, "c")
        assert_one_line_error(res, "--token or --secret-file")
    elif case == "unknown-conversation":
        res = run("members", "remove", "--url", url, "--secret-file", secret, "nowhere", "u")
        assert_one_line_error(res, "not found", "NOT_FOUND")
    elif case == "user-token":
        tok = run("token", "--secret-file", secret, "--user", "alice").stdout.strip()
        res = run("send", "--url", url, "--token", tok, "c")
        assert_one_line_error(res, "service token", "FORBIDDEN")
    elif case == "missing-secret":
        res = run("send", "--url", url, "--secret-file", "/nonexistent/secret", "c")
        assert_one_line_error(res, "does not exist")


def test_demo_runs_and_can_be_watched(tmp_path):
    proc = subprocess.Popen(
        [*CLI, "demo", "--port", "0", "--duration", "4", "--rate", "30", "--users", "4",
         "--groups", "2", "--seed", "1", "--secret-file", str(tmp_path / "s")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    lines = []
    while True:
        line = proc.stdout.readline()
        assert line, f"demo ended early: {proc.stderr.read() if proc.stderr else ''}"
        lines.append(line)
        if "Ctrl-C" in line:
            break
    watch_cmd = next(line for line in lines if "seqactor watch" in line).split()
    assert watch_cmd[:2] == ["seqactor", "watch"]
    time.sleep(1.0)
    res = run(*watch_cmd[1:], "--once")
    assert res.returncode == 0, res.stderr
    assert "user1" in res.stdout and "group-1" in res.stdout and "dm-user1-user2" in res.stdout
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_demo_port_in_use_is_one_line(server):
    url, _secret = server
    port = url.rsplit(":", 1)[1].split("/")[0]
    res = run("demo", "--port", port, "--duration", "1")
    assert_one_line_error(res, "cannot serve")
