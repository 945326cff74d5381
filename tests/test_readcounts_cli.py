"""``seqactor readers`` as a user runs it: a subprocess against a real `seqactor serve`."""

from __future__ import annotations

import trio

from seqactor import ServiceClient
from seqactor.auth import issue_token
from tests.test_cli import assert_one_line_error, run, server  # noqa: F401 - the fixture


def test_readers_lists_who_read_and_who_did_not(server):  # noqa: F811
    url, secret = server
    assert run("members", "add", "--url", url, "--secret-file", secret, "rc-team",
               "alice", "bob", "carol").returncode == 0
    assert run("send", "--url", url, "--secret-file", secret, "rc-team", "--count", "3",
               "--sender", "bob").returncode == 0
    res = run("readers", "--url", url, "--secret-file", secret, "rc-team", "2")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["bob", "1 of 3 have read 2"]
    res = run("readers", "--url", url, "--secret-file", secret, "--user", "alice", "rc-team",
              "2", "--unread")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["alice", "carol", "1 of 3 have read 2"]
    res = run("readers", "--url", url, "--secret-file", secret, "rc-team", "2", "--unread",
              "--limit", "1")
    assert res.stdout.splitlines() == ["alice", "...", "1 of 3 have read 2"]


def test_readers_errors_are_one_line(server):  # noqa: F811
    url, secret = server
    run("members", "add", "--url", url, "--secret-file", secret, "rc-other", "bob")
    res = run("readers", "--url", url, "--secret-file", secret, "--user", "mallory",
              "rc-other", "1")
    assert_one_line_error(res, "not in your view", "FORBIDDEN")
    res = run("readers", "--url", url, "--secret-file", secret, "rc-missing", "1")
    assert_one_line_error(res, "NOT_FOUND")
    res = run("readers", "--url", url, "--secret-file", secret, "rc-other", "0")
    assert_one_line_error(res, "SEQ 0 is outside 1-")
    assert res.returncode == 2  # a usage error
    res = run("readers", "--url", url, "rc-other", "1")
    assert_one_line_error(res, "no credentials")
    res = run("readers", "--url", url, "--secret-file", secret)
    assert res.returncode == 2  # usage error


def test_readers_help_has_an_example():
    res = run("readers", "--help")
    assert res.returncode == 0 and "example: seqactor readers" in res.stdout


def test_readers_of_a_seq_that_is_not_readable_is_one_line_naming_why(server):  # noqa: F811
    """Beyond the newest message, below the min seq (cleared history), or in a conversation
    with no messages: one line saying which, exit 1, no reader list."""
    url, secret = server
    run("members", "add", "--url", url, "--secret-file", secret, "rc-range", "u1", "u2")
    run("send", "--url", url, "--secret-file", secret, "rc-range", "--count", "5",
        "--sender", "u1")
    res = run("readers", "--url", url, "--secret-file", secret, "rc-range", "100")
    assert_one_line_error(res, "seq 100 of rc-range is not readable",
                          "no message with that seq yet")
    assert res.returncode == 1 and res.stdout == ""
    run("members", "add", "--url", url, "--secret-file", secret, "rc-empty", "u1")
    res = run("readers", "--url", url, "--secret-file", secret, "rc-empty", "1")
    assert_one_line_error(res, "no message with that seq yet")
    async def set_min() -> None:
        with open(secret, "rb") as f:
            key = f.read().strip()
        async with ServiceClient.connect(url, issue_token(key, "svc", role="service")) as svc:
            await svc.set_min_sequence("rc-range", 4)

    trio.run(set_min)
    res = run("readers", "--url", url, "--secret-file", secret, "rc-range", "1")
    assert_one_line_error(res, "seq 1 of rc-range is not readable",
                          "history starts at seq 4")
    res = run("readers", "--url", url, "--secret-file", secret, "rc-range", "4")
    assert res.returncode == 0 and res.stdout.splitlines() == ["u1", "1 of 2 have read 4"]
