"""The cross-language scenarios (``tests/scenarios/*.json``) run with the Python SDK against a
real ``seqactor serve`` subprocess. The TypeScript SDK runs the same files
(``clients/js/test/node/scenarios.test.mjs``), so the two SDKs cannot drift.
The step vocabulary is in ``tests/scenarios/README.md``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from seqactor import Backoff, Client, ServerError, ServiceClient
from seqactor.auth import issue_token
from seqactor.client._connection import _Closed
from seqactor.protocol import ErrorCode

SCENARIOS = Path(__file__).parent / "scenarios"
SEQACTOR = [str(Path(sys.executable).with_name("seqactor"))]  # the console script of this venv
GUARD_S = 20.0  # a guard against hangs, not a timing expectation
SECRET = b"py-scenario-secret-0123456789abcdef0123456789"


def fast_backoff() -> Backoff:
    return Backoff(base_s=0.005, cap_s=0.05)


class ServeProcess:
    """``seqactor serve`` as a child process on 127.0.0.1 (port 0 first, then the same port)."""

    def __init__(self, store: str, tmp: Path) -> None:
        self.store = store
        self.secret_file = tmp / "secret"
        self.secret_file.write_bytes(SECRET + b"\n")
        self.secret_file.chmod(0o600)
        self.stderr = open(tmp / "server.stderr", "ab")  # noqa: SIM115 (closed in stop())
        self.port = 0
        self.proc: trio.Process | None = None
        self.url = ""

    async def start(self) -> None:
        self.proc = await trio.lowlevel.open_process(
            [*SEQACTOR, "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--store", self.store, "--secret-file", str(self.secret_file)],
            stdout=subprocess.PIPE, stderr=self.stderr,
        )
        assert self.proc.stdout is not None
        out = b""
        with trio.fail_after(GUARD_S):
            while (m := re.search(rb"listening on (ws://\S+)", out)) is None:
                chunk = await self.proc.stdout.receive_some()
                assert chunk, f"server exited: {self.stderr.name}"
                out += chunk
        self.url = m.group(1).decode()
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(GUARD_S):
            await self.proc.wait()
        self.proc = None

    def token(self, user: str, role: str = "user") -> str:
        return issue_token(SECRET, user, role=role)


def plain_view(client: Client) -> dict[str, dict[str, int | bool]]:
    """As a scenario writes a view: ``frozen: true`` only on frozen rows."""
    return {
        cid: {"max": c.max_sequence, "read": c.read_sequence, "min": c.min_sequence,
              "unread": c.unread, **({"frozen": True} if c.frozen else {})}
        for cid, c in client.view.items()
    }


async def wait_until(client: Client, check: Any) -> None:
    """Wait until ``check()`` holds, re-checking on every change batch and link change."""
    stream = client.changes()
    while not check():
        async with trio.open_nursery() as nursery:
            async def on_batch() -> None:
                await stream.__anext__()
                nursery.cancel_scope.cancel()

            async def on_link() -> None:
                await client._changed.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_batch)
            nursery.start_soon(on_link)
    stream.close()


class Runner:
    def __init__(self, scenario: dict[str, Any], tmp: Path) -> None:
        self.scenario = scenario
        self.tmp = tmp
        store = (f"sqlite:///{tmp / 'db.sqlite'}" if scenario.get("store") == "sqlite"
                 else "memory://")
        self.server = ServeProcess(store, tmp)
        self.clients: dict[str, dict[str, Any]] = {}

    async def open(self, name: str, nursery: trio.Nursery) -> None:
        spec = self.clients[name]
        done = trio.Event()
        stop = trio.Event()

        async def hold() -> None:
            async with Client.connect(
                self.server.url, self.server.token(spec["user"]), device_id=spec["device"],
                subscribe_all=spec["subscribe_all"], cache_path=spec["cache"],
                backoff=fast_backoff(),
            ) as client:
                spec["client"] = client
                done.set()
                await stop.wait()
            spec["client"] = None
            spec["closed"].set()

        spec["stop"] = stop
        spec["closed"] = trio.Event()
        nursery.start_soon(hold)
        await done.wait()

    async def close(self, name: str) -> None:
        spec = self.clients[name]
        spec["stop"].set()
        await spec["closed"].wait()

    async def run(self) -> None:
        await self.server.start()
        try:
            async with trio.open_nursery() as nursery:
                async with ServiceClient.connect(
                    self.server.url, self.server.token("backend", "service"),
                    backoff=fast_backoff(),
                ) as svc:
                    for i, step in enumerate(self.scenario["steps"], 1):
                        where = f"{self.scenario['name']} step {i} ({step['do']})"
                        with trio.fail_after(GUARD_S):
                            await self.step(step, svc, nursery, where)
                    for name, spec in self.clients.items():
                        if spec.get("client") is not None:
                            await self.close(name)
        finally:
            await self.server.stop()
            self.server.stderr.close()

    async def step(
        self, step: dict[str, Any], svc: ServiceClient, nursery: trio.Nursery, where: str
    ) -> None:
        do = step["do"]
        c: Client | None = None
        if "client" in step and step["client"] in self.clients:
            c = self.clients[step["client"]].get("client")
        if do == "add_members":
            await svc.add_members(step["conversation"], step["users"])
        elif do == "remove_members":
            await svc.remove_members(step["conversation"], step["users"],
                                     keep_history=step.get("keep_history", False))
        elif do == "allocate":
            a = await svc.allocate(step["conversation"], step.get("count", 1),
                                   sender_user_id=step.get("sender") or None)
            if "expect" in step:
                got = {"first": a.first_sequence, "last": a.last_sequence}
                assert got == step["expect"], where
        elif do == "set_min":
            await svc.set_min_sequence(step["conversation"], step["min"])
        elif do == "connect":
            self.clients[step["client"]] = {
                "user": step["user"], "device": step.get("device", ""),
                "subscribe_all": step.get("subscribe_all", True),
                "cache": str(self.tmp / f"cache-{step['client']}"),
            }
            await self.open(step["client"], nursery)
        elif do == "mark_read":
            assert c is not None
            assert await c.mark_read(step["conversation"], step["seq"]) == step["expect"], where
        elif do == "background":
            assert c is not None
            await c.set_background(step["on"])
        elif do == "fetch":
            assert c is not None
            got = await c.fetch(step["conversations"])
            assert sorted(got) == sorted(step["expect"]), where
        elif do == "subscribe":
            assert c is not None
            await c.subscribe(step["conversations"])
        elif do in ("read_counts", "readers"):
            who: Any = svc if step["client"] == "service" else c
            assert who is not None
            if do == "read_counts":
                rc = await who.read_counts(step["conversation"], step.get("from", 0),
                                           step.get("to", 0))
                got_rc = {"from": rc.from_sequence, "members": rc.member_count,
                          "counts": list(rc.counts)}
                assert got_rc == step["expect"], where
            else:
                pages = [page async for page in who.readers(
                    step["conversation"], step["sequence"], unread=step.get("unread", False),
                    page_size=step.get("page_size", 100))]
                assert pages == step["expect"], where
        elif do == "go_offline":
            await self.close(step["client"])
        elif do == "come_online":
            await self.open(step["client"], nursery)
        elif do == "drop":
            assert c is not None
            connects = c.stats.connects
            link = c._link
            assert link is not None
            link.fail(_Closed(1006, "dropped by the test"))
            await wait_until(c, lambda: c.stats.connects > connects and c.connected)
        elif do == "restart_server":
            await self.server.stop()
            await self.server.start()
        elif do == "expect_view":
            assert c is not None
            total = step.get("total_unread")

            def matches() -> bool:
                return c.connected and plain_view(c) == step["view"] and (
                    total is None or c.total_unread == total)

            with trio.move_on_after(GUARD_S / 2):
                await wait_until(c, matches)
            assert plain_view(c) == step["view"], where
            if total is not None:
                assert c.total_unread == total, where
        elif do == "expect_sync":
            assert c is not None
            await wait_until(c, lambda: c.connected)
            s = c.last_sync
            assert s is not None and s.full == step["full"], f"{where}: {s}"
            if "conversations" in step:
                assert s.conversations == step["conversations"], f"{where}: {s}"
            if "removed" in step:
                assert s.removed == step["removed"], f"{where}: {s}"
        elif do == "expect_error":
            assert c is not None
            with pytest.raises(ServerError) as info:
                if step["op"] == "mark_read":
                    await c.mark_read(step["conversation"], 1)
                else:
                    await c.subscribe([step["conversation"]])
            assert info.value.code == ErrorCode[step["error"]], where
        else:
            raise AssertionError(f"{where}: unknown step")


FILES = sorted(SCENARIOS.glob("*.json"))


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
async def test_scenario(path: Path, tmp_path: Path) -> None:
    scenario = json.loads(path.read_text())
    await Runner(scenario, tmp_path).run()


def test_scenarios_exist() -> None:
    assert len(FILES) >= 4, os.listdir(SCENARIOS)
