"""I1 across crashes: ``kill -9`` a process mid-write, reopen, nothing acknowledged is lost.

The child (``_crash_child.py``) prints a line per acknowledged write; the parent kills it
after a random number of acknowledgements and checks the reopened database against every
acknowledgement seen so far (over several crash/recover rounds on the same file).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import trio

from seqactor.store.sqlite import SQLiteStore

CHILD = Path(__file__).with_name("_crash_child.py")
ROUNDS = 5
READY_TIMEOUT_S = 20.0


class Acks:
    def __init__(self) -> None:
        self.max_last: dict[str, int] = {}
        self.read: dict[tuple[str, str], int] = {}
        self.position = 0
        self.positions: set[int] = set()
        self.count = 0

    def add(self, line: str) -> None:
        parts = line.split()
        if parts[0] == "A":
            cid, first, last, sender, sender_read, pos = (
                parts[1], int(parts[2]), int(parts[3]), parts[4], int(parts[5]), int(parts[6]),
            )
            assert 1 <= first <= last
            self.max_last[cid] = max(self.max_last.get(cid, 0), last)
            if sender != "-":
                assert sender_read == last
                key = (cid, sender)
                self.read[key] = max(self.read.get(key, 0), sender_read)
            changed = True
        else:
            cid, uid, read, pos, changed = (
                parts[1], parts[2], int(parts[3]), int(parts[4]), parts[5] == "1",
            )
            self.read[(cid, uid)] = max(self.read.get((cid, uid), 0), read)
        if changed:
            assert pos not in self.positions, f"position {pos} acknowledged twice"
            self.positions.add(pos)
        self.position = max(self.position, pos)
        self.count += 1


def run_child_and_kill(db: Path, seed: int, kill_after: int, acks: Acks) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(db), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", (line, proc.stderr.read() if proc.stderr else "")
        seen = 0
        while seen < kill_after:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else "child exited"
            acks.add(line)
            seen += 1
        os.kill(proc.pid, signal.SIGKILL)
        # acknowledgements already written before the kill landed count too
        for line in proc.stdout:
            if line.endswith("\n"):
                acks.add(line)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    assert proc.returncode == -signal.SIGKILL


async def check_recovered(db: Path, acks: Acks) -> None:
    store = SQLiteStore(db)
    await store.open()
    try:
        assert store.position >= acks.position
        for cid, last in acks.max_last.items():
            st = await store.conversation(cid)
            assert st is not None and st.max_sequence >= last, (cid, st, last)
        for (cid, uid), read in acks.read.items():
            view = await store.load_view(uid)
            i = view.conversation_ids.index(cid)
            assert view.read_seq[i] >= read, (cid, uid, view.read_seq[i], read)
            assert view.read_seq[i] <= view.max_seq[i]
        for cid in acks.max_last:
            st = await store.conversation(cid)
            assert st is not None
            nxt = await store.allocate(cid, 1)
            assert nxt.first == st.max_sequence + 1 > acks.max_last[cid]  # no reuse, no gap
            acks.max_last[cid] = nxt.last
            assert nxt.position > acks.position
            acks.position = nxt.position
            acks.positions.add(nxt.position)
    finally:
        await store.aclose()


def test_kill_9_loses_nothing_acknowledged(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    rng = random.Random(20240601)
    acks = Acks()
    epoch = None
    for round_no in range(ROUNDS):
        before = acks.count
        run_child_and_kill(db, round_no, rng.randint(200, 2000), acks)
        assert acks.count > before
        trio.run(check_recovered, db, acks)

        async def read_epoch() -> bytes:
            s = SQLiteStore(db)
            await s.open()
            await s.aclose()
            return s.epoch

        current = trio.run(read_epoch)
        assert epoch is None or current == epoch  # the epoch never changes
        epoch = current
