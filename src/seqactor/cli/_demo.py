"""``seqactor demo``: a server on memory:// plus synthetic IM traffic to watch."""

from __future__ import annotations

import os
import random
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import trio

from seqactor.auth import issue_token, load_or_create_secret
from seqactor.cli import _demo_web
from seqactor.client import Client, ServiceClient
from seqactor.client._watch import plural
from seqactor.server.config import ServerConfig
from seqactor.server.gateway import Server
from seqactor.store import open_store

READ_PROBABILITY = 0.6  # a simulated user reads a conversation when a message arrives


def plan(users: int, groups: int, rng: random.Random) -> dict[str, list[str]]:
    """Conversation -> members: a direct chat between user1 and each other user, and groups."""
    names = [f"user{i}" for i in range(1, users + 1)]
    convs: dict[str, list[str]] = {}
    for other in names[1:]:
        convs[f"dm-user1-{other}"] = ["user1", other]
    for g in range(1, groups + 1):
        size = rng.randint(min(3, users), users)
        members = set(rng.sample(names, size)) | {"user1"}
        convs[f"group-{g}"] = sorted(members)
    return convs


TEMP_DIR_PREFIX = "seqactor-demo-"


def self_command() -> str:
    """How to run this same ``seqactor`` from a shell: ``seqactor`` when that is what PATH
    finds, else the script's path as invoked (``.venv/bin/seqactor``), else ``python -m``."""
    script = sys.argv[0] if sys.argv else ""
    if Path(script).name != "seqactor":
        return f"{shlex.quote(sys.executable)} -m seqactor.cli"
    on_path = shutil.which("seqactor")
    if on_path and os.path.realpath(on_path) == os.path.realpath(script):
        return "seqactor"
    rel = os.path.relpath(script)
    return shlex.quote(script if rel.startswith("..") else rel)


async def run_demo(
    host: str, port: int, users: int, groups: int, rate: float, duration: float | None,
    secret_file: str | None, seed: int | None,
) -> None:
    if secret_file is not None:
        await _run_demo(host, port, users, groups, rate, duration, secret_file, seed)
        return
    # A temporary secret, removed when the demo ends (also on Ctrl-C or an error).
    with tempfile.TemporaryDirectory(prefix=TEMP_DIR_PREFIX) as tmp:
        await _run_demo(host, port, users, groups, rate, duration, str(Path(tmp) / "secret"),
                        seed)


async def _run_demo(
    host: str, port: int, users: int, groups: int, rate: float, duration: float | None,
    secret_file: str, seed: int | None,
) -> None:
    rng = random.Random(seed)
    secret, _created = load_or_create_secret(secret_file)
    cfg = ServerConfig(host=host, port=port)
    server = Server(cfg, open_store("memory://"), secret)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        url = server.url
        convs = plan(users, groups, rng)
        service = issue_token(secret, "demo-backend", role="service")
        async with ServiceClient.connect(url, service) as svc:
            for cid, members in convs.items():
                await svc.add_members(cid, members)
            # Printed once the conversations exist: the commands work the moment they show.
            print(f"seqactor demo: server on {url} (memory://), {users} users, "
                  f"{plural(len(convs), 'conversation')}, {rate:g} messages/s", flush=True)
            me, secret_arg = self_command(), shlex.quote(secret_file)
            print("watch it live, in another terminal:", flush=True)
            print(f"  {me} watch --url {url} --user user1 --secret-file {secret_arg}", flush=True)
            print("send a message yourself:", flush=True)
            print(f"  {me} send --url {url} --secret-file {secret_arg} group-1 --sender user2",
                  flush=True)
            page = _demo_web.start(host, port + 1 if port else 0, url, issue_token(secret, "user1"))
            ends = "" if duration is None else f" (it stops by itself after {duration:g} s)"
            print(f"Ctrl-C stops the demo{ends}.", flush=True)
            async with trio.open_nursery() as traffic:
                for i in range(2, users + 1):
                    user = f"user{i}"
                    tok = issue_token(secret, user)
                    traffic.start_soon(_reader, url, tok, random.Random(rng.random()))
                traffic.start_soon(_sender, svc, convs, rate, rng)
                if duration is not None:
                    await trio.sleep(duration)
                    traffic.cancel_scope.cancel()
        server.stop()
        if page is not None:
            page.close()


async def _sender(
    svc: ServiceClient, convs: dict[str, list[str]], rate: float, rng: random.Random
) -> None:
    ids = sorted(convs)
    while True:
        await trio.sleep(rng.expovariate(rate) if rate > 0 else 3600)
        cid = rng.choice(ids)
        await svc.allocate(cid, 1, sender_user_id=rng.choice(convs[cid]))


async def _reader(url: str, token: str, rng: random.Random) -> None:
    """A simulated user who reads some of what arrives, a little later."""
    async with Client.connect(url, token, device_id="demo") as client:
        async for batch in client.changes():
            for change in batch.changes:
                new = change.new
                if new is not None and new.unread and rng.random() < READ_PROBABILITY:
                    await trio.sleep(rng.uniform(0.2, 2.0))
                    await client.mark_read(new.id, new.max_sequence)
