"""Crash-test child: allocate and mark read on a SQLite store until killed (``kill -9``).

Usage: ``python _crash_child.py DB_PATH SEED``. Prints ``READY`` once open, then one line per
acknowledged (committed) operation, flushed at once:

* ``A <conversation> <first> <last> <sender|-> <sender_read> <position>``
* ``R <conversation> <user> <read> <position> <changed 0|1>``
"""

from __future__ import annotations

import random
import sys

import trio

from seqactor.store.sqlite import SQLiteStore

CONVERSATIONS = [f"c{i}" for i in range(4)]
USERS = [f"u{i}" for i in range(4)]
TASKS = 12


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def worker(store: SQLiteStore, rng: random.Random) -> None:
    while True:
        cid = rng.choice(CONVERSATIONS)
        if rng.random() < 0.6:
            sender = rng.choice(USERS + ["outsider", None])
            a = await store.allocate(cid, rng.randint(1, 20), sender_user_id=sender)
            emit(f"A {cid} {a.first} {a.last} {a.sender_user_id or '-'} {a.sender_read} "
                 f"{a.position}")
        else:
            uid = rng.choice(USERS)
            state = await store.conversation(cid)
            target = rng.randint(0, (state.max_sequence if state else 0) + 5)
            r = await store.mark_read(cid, uid, target)
            emit(f"R {cid} {uid} {r.read_sequence} {r.position} {int(r.changed)}")


async def main(path: str, seed: int) -> None:
    store = SQLiteStore(path)
    await store.open()
    for cid in CONVERSATIONS:
        await store.add_members(cid, USERS)
    emit("READY")
    async with trio.open_nursery() as nursery:
        for i in range(TASKS):
            nursery.start_soon(worker, store, random.Random(seed * 1000 + i))


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]))
