"""``seqactor readers`` as a user runs it: a subprocess against a real `seqactor serve`."""

from __future__ import annotations

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
