"""Read-count watches under a stuck reader: the pushes of a session that does not read wait in
its bounded reply queue, and a watch's changes meanwhile coalesce into one flag (latest wins) —
memory does not grow with the MarkRead rate, and the next push carries the newest counts."""

from __future__ import annotations

import trio
import trio.testing

from seqactor._proto import seqactor_pb2 as pb
from seqactor.server.config import ServerConfig
from seqactor.server.readcounts import ReadIndexes
from seqactor.store.memory import MemoryStore

MEMBERS = [f"u{i:03d}" for i in range(100)]


class StuckState:
    """A session whose socket takes one frame, then nothing until ``release`` is set."""

    def __init__(self) -> None:
        self.user_id = "u000"
        self.background = False
        self.sent: list[bytes] = []
        self.release = trio.Event()

    async def put_reply(self, frame: bytes) -> None:
        self.sent.append(frame)
        if len(self.sent) > 1:
            return
        await self.release.wait()


def starter(nursery: trio.Nursery):
    """The session's ``start_soon`` (ops.OpContext): start in ``nursery``."""
    def start_soon(fn) -> bool:
        nursery.start_soon(fn)
        return True
    return start_soon


def counts(frame: bytes) -> list[int]:
    return list(pb.ServerMessage.FromString(frame).read_counts.counts)


async def test_stuck_reader_keeps_one_frame_and_gets_the_latest_counts():
    store = MemoryStore()
    await store.open()
    await store.add_members("g", MEMBERS)
    await store.allocate("g", 50)
    reg = ReadIndexes(store, ServerConfig(read_counts_interval_ms=0))
    state = StuckState()
    async with trio.open_nursery() as nursery:
        sw = reg.session_watches(state, False, starter(nursery))  # type: ignore[arg-type]
        await reg.get("g")
        reg.add_watch(sw, "g", 0)
        await trio.testing.wait_all_tasks_blocked()
        assert len(state.sent) == 1 and counts(state.sent[0]) == [0] * 50  # now stuck
        for seq in range(1, 51):  # 5 000 MarkReads while the reader is stuck
            for uid in MEMBERS:
                await store.mark_read("g", uid, seq)
        await trio.testing.wait_all_tasks_blocked()
        assert len(state.sent) == 1  # nothing queued behind the stuck frame
        (watch,) = sw.watches.values()
        assert watch.dirty  # all 5 000 changes are this one flag
        state.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert len(state.sent) == 2  # one push, with the newest counts
        assert counts(state.sent[1]) == [100] * 50
        await store.mark_read("g", "u001", 50)  # no change: no push
        await trio.testing.wait_all_tasks_blocked()
        assert len(state.sent) == 2
        nursery.cancel_scope.cancel()
    assert not reg.watches and not reg.sessions  # the session's end ends its watches
    await store.aclose()


async def test_watch_range_is_the_newest_range_limit_seqs():
    store = MemoryStore()
    await store.open()
    await store.add_members("g", MEMBERS[:3])
    await store.allocate("g", 30)
    reg = ReadIndexes(store, ServerConfig(read_counts_interval_ms=0, max_read_count_range=10))
    state = StuckState()
    state.sent.append(b"")  # never blocks
    async with trio.open_nursery() as nursery:
        sw = reg.session_watches(state, False, starter(nursery))  # type: ignore[arg-type]
        await reg.get("g")
        reg.add_watch(sw, "g", 5)
        await trio.testing.wait_all_tasks_blocked()
        msg = pb.ServerMessage.FromString(state.sent[-1])
        assert msg.request_id == 0
        assert msg.read_counts.from_sequence == 21 and len(msg.read_counts.counts) == 10
        # a read below the pushed range changes nothing the watch shows: no push
        await store.mark_read("g", "u001", 7)
        await trio.testing.wait_all_tasks_blocked()
        assert len(state.sent) == 2
        await store.mark_read("g", "u001", 25)
        await trio.testing.wait_all_tasks_blocked()
        assert len(state.sent) == 3
        assert list(pb.ServerMessage.FromString(state.sent[-1]).read_counts.counts) == [1] * 5 + [0] * 5
        nursery.cancel_scope.cancel()
    await store.aclose()
