"""The command line as a user runs it: subprocesses against a real `seqactor serve`."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from seqactor.protocol import MAX_TOKEN_LIFETIME_S

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
        m = re.search(r"(wss?://\S+/v1)", line)
        if m:
            return m.group(1)
    proc.kill()
    raise AssertionError(f"no URL printed; stderr: {proc.stderr.read() if proc.stderr else ''}")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, str]]:
    secret = str(tmp_path_factory.mktemp("cli") / "secret")
    with serving("--secret-file", secret) as url:
        yield url, secret


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory) -> Iterator[tuple[str, str, str]]:
    """(url, cert file, key file) of a server on wss://."""
    d = tmp_path_factory.mktemp("tls")
    cert = trustme.CA().issue_cert("127.0.0.1")
    cert_file, key_file = d / "cert.pem", d / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    with serving("--secret-file", str(d / "secret"), "--tls-cert", str(cert_file),
                 "--tls-key", str(key_file)) as url:
        yield url, str(cert_file), str(key_file)


class serving:
    """`seqactor serve --port 0 --store memory:// ARGS` for the duration of a with block."""

    def __init__(self, *args: str) -> None:
        self.stderr = ""
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--port", "0", "--store", "memory://", "--log-level", "WARNING", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def __enter__(self) -> str:
        try:
            return _read_url(self.proc)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            _out, self.stderr = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, self.stderr = self.proc.communicate()


def assert_one_line_error(res: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


HELP_COMMANDS = ["serve", "token", "watch", "send", "members", "readers", "demo", "store",
                 "store init", "store backup", "store restore"]


@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_every_command_has_help_with_an_example_and_every_flag_a_default(command):
    res = run(*command.split(), "--help")
    assert res.returncode == 0, res.stderr
    assert "example: seqactor " + command.split()[0] in res.stdout
    # every option's help line says its default (or that it is required / has none)
    text = re.sub(r"\s+", " ", res.stdout.split("options:", 1)[1].split("example:", 1)[0])
    entries = re.split(r" (?=--[a-z][a-z-]+(?: [A-Z_]+| \{)|-h, --help)", text)
    options = [e for e in entries if e.startswith("--")]
    assert options or command == "store", res.stdout  # `store` itself only has actions
    for entry in options:
        assert "default" in entry or "required" in entry, f"{command}: {entry!r}"


def test_version():
    res = run("--version")
    assert res.returncode == 0 and re.fullmatch(r"seqactor \d+\.\d+\.\d+\n", res.stdout)


@pytest.mark.parametrize("argv", [[], ["store"]], ids=["seqactor", "seqactor-store"])
def test_no_command_is_one_clean_usage_line(argv):
    res = run(*argv)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "_command" not in lines[0] and "give " in lines[0], res.stderr
    assert "--help" in lines[0]


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


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LIVE_TIMEOUT_S = 30.0  # a bound for what a live view must show; the waits end on the text


class LiveView:
    """A running ``seqactor watch``: its live output (rich redraws as on a terminal, with
    TTY_COMPATIBLE=1) is read by a thread; :meth:`wait_for` returns once a text shows up."""

    def __init__(self, *argv: str) -> None:
        self.proc = subprocess.Popen(
            [*CLI, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "COLUMNS": "120", "TTY_COMPATIBLE": "1"},
            # Ctrl-C as in a terminal: a test run started in the background (`cmd &` in a
            # script) hands its children SIGINT ignored, and Python keeps it ignored.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self._out: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for chunk in iter(lambda: self.proc.stdout.read(1), ""):  # type: ignore[union-attr]
            with self._lock:
                self._out.append(chunk)

    @property
    def text(self) -> str:
        with self._lock:
            return ANSI.sub("", "".join(self._out))

    def wait_for(self, needle: str) -> None:
        deadline = time.monotonic() + LIVE_TIMEOUT_S
        while needle not in self.text:
            assert self.proc.poll() is None, f"watch ended: {self.proc.stderr.read()}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"{needle!r} never shown:\n{self.text[-2000:]}"
            time.sleep(0.01)

    def quit(self) -> tuple[int, str]:
        """Ctrl-C; returns (exit status, stderr)."""
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=LIVE_TIMEOUT_S)
        self._reader.join(LIVE_TIMEOUT_S)
        return self.proc.returncode, err


def test_watch_live_updates_and_quits_on_ctrl_c(server):
    url, secret = server
    run("members", "add", "--url", url, "--secret-file", secret, "live", "carol")
    view = LiveView("watch", "--url", url, "--user", "carol", "--secret-file", secret)
    view.wait_for("total unread 0 · connected")
    run("send", "--url", url, "--secret-file", secret, "live", "--count", "7")
    view.wait_for("total unread 7")
    code, err = view.quit()
    assert code == 0, err
    assert "Traceback" not in err
    assert "live" in view.text


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


@pytest.mark.parametrize("own_secret", [True, False], ids=["secret-file", "temporary-secret"])
def test_demo_runs_can_be_watched_as_printed_and_leaves_nothing_behind(tmp_path, own_secret):
    extra = ["--secret-file", str(tmp_path / "s")] if own_secret else []
    proc = subprocess.Popen(
        [*CLI, "demo", "--port", "0", "--duration", "4", "--rate", "30", "--users", "4",
         "--groups", "2", "--seed", "1", *extra],
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
    assert "1 conversations" not in "".join(lines)
    watch_line = next(line for line in lines if " watch --url " in line)
    send_line = next(line for line in lines if " send --url " in line)
    secret_used = Path(shlex.split(watch_line)[shlex.split(watch_line).index("--secret-file") + 1])
    if own_secret:
        assert secret_used == tmp_path / "s"
    else:
        assert secret_used.parent.name.startswith("seqactor-demo-") and secret_used.exists()
    # the printed commands work as printed (run by a shell, --once added to leave)
    res = subprocess.run(watch_line.strip() + " --once", shell=True, capture_output=True,
                         text=True, timeout=TIMEOUT_S, env={**os.environ, "COLUMNS": "120"})
    assert res.returncode == 0, res.stderr
    assert "user1" in res.stdout and "group-1" in res.stdout and "dm-user1-user2" in res.stdout
    res = subprocess.run(send_line.strip(), shell=True, capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    assert res.returncode == 0 and "group-1: allocated" in res.stdout, res.stderr
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    if not own_secret:
        assert not secret_used.parent.exists()  # its temporary directory is gone


def test_demo_prints_the_program_it_was_started_as(tmp_path):
    exe = Path(sys.executable).parent / "seqactor"
    proc = subprocess.Popen(
        [str(exe), "demo", "--port", "0", "--duration", "1", "--secret-file",
         str(tmp_path / "s")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PATH": "/usr/bin:/bin"},  # `seqactor` alone would not be found
    )
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err
    watch = next(line for line in out.splitlines() if " watch --url " in line).split()
    assert watch[0] != "seqactor" and Path(watch[0]).resolve() == exe.resolve()


def test_demo_port_in_use_is_one_line(server):
    url, _secret = server
    port = url.rsplit(":", 1)[1].split("/")[0]
    res = run("demo", "--port", port, "--duration", "1")
    assert_one_line_error(res, "cannot serve")


# ------------------------------------------------------------------ every command x bad input
# Each row: (id, argv with {placeholders}, exit code, what the one stderr line must name).
# Placeholders: {secret} a good secret (0600), {missing} a path that does not exist, {dir} a
# directory, {empty} an empty file, {fifo} a file that cannot be read as one (a FIFO: tests
# run as root, which reads any mode), {short} a 12-byte secret, {url} the running server,
# {port} its (busy) port, {tls_url}/{cert}/{key} a wss:// server and its files.
USAGE, FAILURE = 2, 1
SECRET_KINDS = [("missing", FAILURE), ("dir", FAILURE), ("empty", FAILURE), ("fifo", FAILURE),
                ("short", FAILURE)]
CLIENT_COMMANDS = {
    "watch": ["watch", "--user", "alice", "--once"],
    "send": ["send", "c"],
    "members": ["members", "add", "c", "alice"],
    "readers": ["readers", "c", "1"],
}
BAD_URLS = [
    ("scheme", "http://127.0.0.1:{port}/v1", USAGE, "http://127.0.0.1:{port}/v1"),
    ("no-host", "ws:///v1", USAGE, "ws:///v1"),
    ("bad-port", "ws://127.0.0.1:99999/v1", USAGE, "ws://127.0.0.1:99999/v1"),
    ("trailing-slash", "ws://127.0.0.1:{port}/", FAILURE, "use --url ws://127.0.0.1:{port}/v1"),
    ("wrong-path", "ws://127.0.0.1:{port}/ws", FAILURE, "use --url ws://127.0.0.1:{port}/v1"),
    ("unreachable-port", "ws://127.0.0.1:1/v1", FAILURE, "ws://127.0.0.1:1/v1"),
    ("wss-to-plain", "wss://127.0.0.1:{port}/v1", FAILURE, "use --url ws://127.0.0.1:{port}/v1"),
    ("ws-to-tls", "{tls_plain_url}", FAILURE, "use --url {tls_url}"),
]

CASES: list[tuple[str, list[str], int, str]] = []
for cmd in ("serve", "token", "demo", *CLIENT_COMMANDS):
    for kind, code in SECRET_KINDS:
        if cmd in ("serve", "demo") and kind == "missing":
            kind = "missing-parent"  # a missing file is created; a missing directory is not
            path = "{empty}/secret"
        else:
            path = "{" + kind + "}"
        base = {
            "serve": ["serve", "--port", "0", "--store", "memory://"],
            "token": ["token", "--user", "alice"],
            "demo": ["demo", "--port", "0", "--duration", "1"],
        }.get(cmd, [*CLIENT_COMMANDS.get(cmd, []), "--url", "{url}"])
        CASES.append((f"{cmd}-secret-{kind}", [*base, "--secret-file", path], code, path))
for cmd, argv in CLIENT_COMMANDS.items():
    for kind, url, code, names in BAD_URLS:
        if kind == "ws-to-tls" and cmd != "send":
            continue  # the same client code; this row waits out the connect timeout (10 s)
        CASES.append((f"{cmd}-url-{kind}", [*argv, "--url", url, "--secret-file", "{secret}"],
                      code, names))
SERVE = ["serve", "--secret-file", "{secret}", "--store", "memory://"]
CASES += [
    ("serve-store-scheme", [*SERVE[:3], "--port", "0", "--store", "mysql://db"], USAGE, "mysql://db"),
    ("serve-store-missing-dir", [*SERVE[:3], "--port", "0", "--store", "sqlite:///{missing}/x.db"],
     FAILURE, "{missing}"),
    ("serve-store-dir", [*SERVE[:3], "--port", "0", "--store", "sqlite:///{dir}"], FAILURE, "{dir}"),
    ("serve-store-unreachable-port", [*SERVE[:3], "--port", "0", "--store", "redis://127.0.0.1:1/0"],
     FAILURE, "redis://127.0.0.1:1/0"),
    ("serve-port-bad-number", [*SERVE, "--port", "eighty"], USAGE, "--port"),
    ("serve-port-negative", [*SERVE, "--port", "-1"], USAGE, "--port"),
    ("serve-port-out-of-range", [*SERVE, "--port", "99999"], USAGE, "99999"),
    ("serve-port-in-use", [*SERVE, "--port", "{port}"], FAILURE, "127.0.0.1:{port}"),
    ("serve-metrics-port-in-use", [*SERVE, "--port", "0", "--metrics-port", "{port}"], FAILURE,
     "--metrics-port"),
    ("serve-metrics-port-out-of-range", [*SERVE, "--metrics-port", "70000"], USAGE, "70000"),
    ("serve-log-level", [*SERVE, "--log-level", "LOUD"], USAGE, "LOUD"),
    ("serve-hello-timeout-negative", [*SERVE, "--hello-timeout", "-1"], USAGE, "--hello-timeout"),
    ("serve-max-frame-bytes-zero", [*SERVE, "--max-frame-bytes", "0"], USAGE, "--max-frame-bytes"),
    ("serve-tls-cert-alone", [*SERVE, "--tls-cert", "{cert}"], USAGE, "--tls-key"),
    ("serve-tls-key-alone", [*SERVE, "--tls-key", "{key}"], USAGE, "--tls-cert"),
    ("serve-tls-cert-missing", [*SERVE, "--tls-cert", "{missing}", "--tls-key", "{key}"],
     FAILURE, "{missing}"),
    ("serve-tls-cert-dir", [*SERVE, "--tls-cert", "{dir}", "--tls-key", "{key}"], FAILURE, "{dir}"),
    ("serve-tls-key-empty", [*SERVE, "--tls-cert", "{cert}", "--tls-key", "{empty}"], FAILURE,
     "{empty}"),
    ("serve-tls-cert-fifo", [*SERVE, "--tls-cert", "{fifo}", "--tls-key", "{key}"], FAILURE,
     "{fifo}"),
    ("serve-tls-cert-not-pem", [*SERVE, "--tls-cert", "{secret}", "--tls-key", "{key}"], FAILURE,
     "{secret}"),
    ("token-ttl-bad-number", ["token", "--secret-file", "{secret}", "--user", "a", "--ttl", "1h"],
     USAGE, "--ttl"),
    ("token-ttl-negative", ["token", "--secret-file", "{secret}", "--user", "a", "--ttl", "-5"],
     USAGE, "--ttl"),
    ("token-ttl-zero", ["token", "--secret-file", "{secret}", "--user", "a", "--ttl", "0"],
     USAGE, "--ttl"),
    ("token-ttl-above-max", ["token", "--secret-file", "{secret}", "--user", "a", "--ttl",
                             str(MAX_TOKEN_LIFETIME_S + 1)], USAGE, str(MAX_TOKEN_LIFETIME_S)),
    ("token-user-control-char", ["token", "--secret-file", "{secret}", "--user", "a\x01b"],
     USAGE, "--user"),
    ("watch-limit-bad-number", ["watch", "--url", "{url}", "--token", "t", "--limit", "x"],
     USAGE, "--limit"),
    ("watch-limit-negative", ["watch", "--url", "{url}", "--token", "t", "--limit", "-1"],
     USAGE, "--limit"),
    ("watch-limit-zero", ["watch", "--url", "{url}", "--token", "t", "--limit", "0"],
     USAGE, "--limit"),
    ("send-count-bad-number", ["send", "c", "--url", "{url}", "--token", "t", "--count", "x"],
     USAGE, "--count"),
    ("send-count-negative", ["send", "c", "--url", "{url}", "--token", "t", "--count", "-1"],
     USAGE, "--count"),
    ("send-count-out-of-range", ["send", "c", "--url", "{url}", "--token", "t", "--count",
                                 "10001"], USAGE, "10000"),
    ("members-bad-user", ["members", "add", "c", "a\x01b", "--url", "{url}", "--token", "t"],
     USAGE, "user"),
    ("readers-seq-bad-number", ["readers", "c", "x", "--url", "{url}", "--token", "t"],
     USAGE, "seq"),
    ("readers-seq-zero", ["readers", "c", "0", "--url", "{url}", "--token", "t"], USAGE, "SEQ 0"),
    ("readers-seq-out-of-range", ["readers", "c", str(2**64), "--url", "{url}", "--token", "t"],
     USAGE, str(2**64)),
    ("readers-limit-negative", ["readers", "c", "1", "--url", "{url}", "--token", "t",
                                "--limit", "-1"], USAGE, "--limit"),
    ("demo-port-in-use", ["demo", "--port", "{port}", "--duration", "1"], FAILURE,
     "127.0.0.1:{port}"),
    ("demo-port-out-of-range", ["demo", "--port", "99999"], USAGE, "99999"),
    ("demo-users-too-few", ["demo", "--users", "1"], USAGE, "--users"),
    ("demo-rate-negative", ["demo", "--rate", "-1"], USAGE, "--rate"),
    ("demo-duration-bad-number", ["demo", "--duration", "soon"], USAGE, "--duration"),
    ("store-init-scheme", ["store", "init", "--store", "mysql://db"], USAGE, "mysql://db"),
    ("store-init-unreachable-port", ["store", "init", "--store", "redis://127.0.0.1:1/0"], FAILURE,
     "redis://127.0.0.1:1/0"),
    ("store-init-missing-dir", ["store", "init", "--store", "sqlite:///{missing}/x.db"],
     FAILURE, "{missing}"),
    ("store-backup-missing-store", ["store", "backup", "--store", "sqlite:///{missing}",
                                    "{tmp}/b.db"], FAILURE, "{missing}"),
    ("store-backup-store-dir", ["store", "backup", "--store", "sqlite:///{dir}", "{tmp}/b.db"],
     FAILURE, "{dir}"),
    ("store-backup-store-empty", ["store", "backup", "--store", "sqlite:///{empty}", "{tmp}/b.db"],
     FAILURE, "{empty}"),
    ("store-backup-not-sqlite", ["store", "backup", "--store", "memory://", "{tmp}/b.db"], USAGE,
     "memory://"),
    ("store-backup-file-exists", ["store", "backup", "--store", "sqlite:///{db}", "{empty}"],
     FAILURE, "{empty}"),
    ("store-backup-file-missing-dir", ["store", "backup", "--store", "sqlite:///{db}",
                                       "{missing}/b.db"], FAILURE, "{missing}"),
    ("store-restore-file-missing", ["store", "restore", "{missing}", "--store",
                                    "sqlite:///{tmp}/r.db"], FAILURE, "{missing}"),
    ("store-restore-file-dir", ["store", "restore", "{dir}", "--store", "sqlite:///{tmp}/r.db"],
     FAILURE, "{dir}"),
    ("store-restore-file-empty", ["store", "restore", "{empty}", "--store",
                                  "sqlite:///{tmp}/r.db"], FAILURE, "{empty}"),
    ("store-restore-file-fifo", ["store", "restore", "{fifo}", "--store",
                                 "sqlite:///{tmp}/r.db"], FAILURE, "{fifo}"),
    ("store-restore-not-sqlite", ["store", "restore", "{db}", "--store", "redis://127.0.0.1:1/0"],
     USAGE, "redis://127.0.0.1:1/0"),
]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, server, tls_server) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad")
    url, secret = server
    tls_url, cert, key = tls_server
    port = url.rsplit(":", 1)[1].split("/")[0]
    (d / "dir").mkdir()
    (d / "empty").write_bytes(b"")
    os.mkfifo(d / "fifo")
    (d / "short").write_bytes(b"short-secret")
    (d / "short").chmod(0o600)
    db = d / "store.db"
    res = run("store", "init", "--store", f"sqlite:///{db}")
    assert res.returncode == 0, res.stderr
    return {
        "secret": secret, "missing": str(d / "missing"), "dir": str(d / "dir"),
        "empty": str(d / "empty"), "fifo": str(d / "fifo"), "short": str(d / "short"),
        "url": url, "port": port, "tls_url": tls_url, "cert": cert, "key": key,
        "tls_plain_url": "ws://" + tls_url.split("://", 1)[1], "db": str(db),
        "tmp": str(d),
    }


@pytest.mark.parametrize(("argv", "code", "names"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_culprit(bad_inputs, argv, code, names):
    args = [a.format(**bad_inputs) for a in argv]
    res = run(*args)
    assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    assert "Warning" not in res.stderr  # no library warning reaches the user
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"seqactor {args[0]}"), lines[0]
    assert names.format(**bad_inputs) in lines[0], lines[0]
    assert res.stdout == ""


def test_the_table_covers_every_command_and_kind():
    ids = " ".join(c[0] for c in CASES)
    for cmd in ("serve", "token", "watch", "send", "members", "readers", "demo", "store-init",
                "store-backup", "store-restore"):
        assert f"{cmd}-" in ids, cmd
    for kind in ("missing", "dir", "empty", "fifo", "scheme", "wrong-path", "trailing-slash",
                 "unreachable-port", "bad-number", "negative", "out-of-range", "tls", "wss"):
        assert kind in ids, kind


def test_url_without_a_path_works(server):
    url, secret = server
    bare = url.removesuffix("/v1")
    res = run("send", "--url", bare, "--secret-file", secret, "no-path")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "no-path: allocated 1"


def test_short_secret_is_refused_and_no_jwt_warning(tmp_path):
    short = tmp_path / "s"
    short.write_bytes(b"x" * 31)
    short.chmod(0o600)
    res = run("token", "--secret-file", str(short), "--user", "a")
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        f"seqactor token: error: secret file {short} is 31 bytes; at least 32 are needed "
        "(delete it and let `seqactor serve` create one, or write 64 random hex characters)"
    ]
    short.write_bytes(b"x" * 32)
    res = run("token", "--secret-file", str(short), "--user", "a")
    assert res.returncode == 0 and res.stderr == ""  # 32 bytes: no InsecureKeyLengthWarning


def test_world_readable_secret_warns_in_one_line(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("k" * 64 + "\n")
    secret.chmod(0o644)
    server = serving("--secret-file", str(secret))
    with server:
        pass
    warnings = [line for line in server.stderr.splitlines() if "warning" in line]
    assert warnings == [
        f"seqactor serve: warning: secret file {secret} is readable by group or others "
        f"(mode 0644); anyone who reads it can sign tokens: chmod 600 {secret}"
    ]
    secret.chmod(0o600)
    server = serving("--secret-file", str(secret))
    with server:
        pass
    assert "warning" not in server.stderr


def test_two_watches_of_one_user_do_not_replace_each_other(server):
    url, secret = server
    run("members", "add", "--url", url, "--secret-file", secret, "pair", "dora")
    views = [LiveView("watch", "--url", url, "--user", "dora", "--secret-file", secret)
             for _ in range(2)]
    for view in views:
        view.wait_for("total unread 0 · connected")
    run("send", "--url", url, "--secret-file", secret, "pair", "--count", "2")
    for view in views:
        view.wait_for("total unread 2")
        assert view.proc.poll() is None  # neither was ended by 4009
    for view in views:
        code, err = view.quit()
        assert code == 0, err
        assert "replaced" not in err


def test_members_names_users_who_were_not_or_already_members(server):
    url, secret = server
    base = ["--url", url, "--secret-file", secret, "club"]
    assert run("members", "add", *base, "ann", "ben").stdout.strip() == "club: added ann ben"
    res = run("members", "add", *base, "ben", "cat")
    assert res.stdout.strip() == "club: added cat; already a member: ben"
    res = run("members", "remove", *base, "cat", "zed")
    assert res.stdout.strip() == "club: removed cat; not a member: zed"
    res = run("members", "remove", *base, "zed", "yul")
    assert res.stdout.strip() == "club: removed nobody; not members: zed yul"


def test_members_counts_a_frozen_row_as_not_a_member(server):
    """A user who left with --keep-history keeps the row, frozen, but is no longer a member:
    adding them again is an addition, removing them with --keep-history again changes nothing,
    and removing them without it ends the row."""
    url, secret = server
    base = ["--url", url, "--secret-file", secret, "attic"]
    run("members", "add", *base, "ida", "jon")
    res = run("members", "remove", *base, "ida", "jon", "--keep-history")
    assert res.stdout.strip() == "attic: removed ida jon (history kept)"
    res = run("members", "remove", *base, "ida", "--keep-history")
    assert res.stdout.strip() == "attic: removed nobody; not a member: ida"
    assert run("members", "add", *base, "ida").stdout.strip() == "attic: added ida"
    res = run("members", "remove", *base, "jon")
    assert res.stdout.strip() == "attic: removed jon"
    res = run("members", "remove", *base, "jon")
    assert res.stdout.strip() == "attic: removed nobody; not a member: jon"


def test_demo_counts_one_conversation_in_the_singular():
    res = run("demo", "--port", "0", "--users", "2", "--groups", "0", "--duration", "0.5")
    assert res.returncode == 0, res.stderr
    assert "2 users, 1 conversation, " in res.stdout
    assert "Ctrl-C stops the demo (it stops by itself after 0.5 s)." in res.stdout


def test_watch_title_counts_one_conversation_in_the_singular(server):
    url, secret = server
    run("members", "add", "--url", url, "--secret-file", secret, "solo", "eve")
    res = run("watch", "--url", url, "--user", "eve", "--secret-file", secret, "--once")
    assert res.returncode == 0, res.stderr
    assert "· 1 conversation ·" in res.stdout


def test_watch_marks_a_frozen_row(server):
    """A user removed with --keep-history keeps the row, frozen: watch marks it (live, as the
    freeze is pushed, and in a fresh `--once`), and its max stays at the moment of leaving."""
    url, secret = server
    base = ["--url", url, "--secret-file", secret]
    run("members", "add", *base, "past", "fred", "gus")
    run("members", "add", *base, "now", "fred")
    run("send", *base, "past", "--count", "2")
    view = LiveView("watch", *base, "--user", "fred")
    view.wait_for("total unread 2 · connected")
    assert "❄" not in view.text
    res = run("members", "remove", *base, "past", "fred", "--keep-history")
    assert res.stdout.strip() == "past: removed fred (history kept)"
    view.wait_for("❄ left")
    code, err = view.quit()
    assert code == 0, err
    run("send", *base, "past", "--count", "3")  # does not reach fred's frozen row
    res = run("watch", *base, "--user", "fred", "--once")
    assert res.returncode == 0, res.stderr
    row = next(line for line in res.stdout.splitlines() if "past" in line)
    assert "❄ left" in row
    assert re.search(r"past ❄ left\s*\S\s*2\s*\S\s*0\s*\S\s*2\s", row), row  # max 2, unread 2
    assert "❄" not in next(line for line in res.stdout.splitlines() if " now " in line)


def test_demo_finds_the_web_page_of_the_checkout():
    """`seqactor demo` serves clients/js/demo of this checkout (it looked one level too high
    once the CLI moved into the cli/ package, and said "web page: not built")."""
    from seqactor.cli import _demo_web

    repo = Path(__file__).resolve().parents[1]
    assert _demo_web.DEMO_DIR == repo / "clients" / "js" / "demo"
    assert (_demo_web.DEMO_DIR / "index.html").is_file()


def test_serve_no_parking_keeps_a_task_per_connection(tmp_path: Path) -> None:
    """`serve --no-parking` turns the idle sessions' parking off (an operator's way around
    it); by default it is on."""
    from seqactor.cli._main import build_parser
    from seqactor.cli._serve import server_config

    argv = ["serve", "--port", "0", "--secret-file", str(tmp_path / "s")]
    assert server_config(build_parser().parse_args(argv)).park_idle_sessions is True
    off = server_config(build_parser().parse_args([*argv, "--no-parking"]))
    assert off.park_idle_sessions is False
    assert "--no-parking" in run("serve", "--help").stdout
