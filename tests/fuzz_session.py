"""Session fuzzing: hostile frames into the sans-IO
:class:`~seqactor.server.session_protocol.SessionProtocol` alone (:func:`check_protocol`, no
trio, no sockets: thousands of frames a second), and through a whole
:class:`seqactor.server.session.Session` with its ops.

The session talks to the network through a small ``Transport``; here that is
:class:`FakeTransport`, which feeds the frames under test and records what the server sends
and how it closes. :func:`drive` runs one session over it against a real in-process server
(hub, actors, memory store), :func:`check_outcome` asserts the documented answer for every frame,
and :func:`check_server` that the store's invariants hold and a normal client still works.

``tests/test_hostile.py`` drives this with Hypothesis. Run as a script, it is an atheris
(libFuzzer) harness over the same code::

    .venv/bin/python tests/fuzz_session.py -atheris_runs=20000   # or -max_total_time=60
    FUZZ_TARGET=protocol .venv/bin/python tests/fuzz_session.py -atheris_runs=200000
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio
import trio.testing

if __name__ == "__main__":  # run as a script: make ``tests`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seqactor._proto import seqactor_pb2 as pb
from seqactor.server.config import ServerConfig
from seqactor.server.ops import HANDLERS
from seqactor.server.session import Session, TransportClosed
from seqactor.server.session_protocol import (
    CloseConnection,
    Opened,
    Phase,
    Reply,
    RunOp,
    SessionProtocol,
)
from tests._harness import SECRET
from tests._load import check_store_invariants, token

Code = pb.Error.Code
CLOSE_CODES = {1000, 1002, 1003, 1009, 4001, 4002, 4008}
USER_OPS = {"get_sequences", "subscribe", "unsubscribe", "mark_read", "set_background", "ping",
            "get_read_counts", "watch_read_counts", "get_readers"}
READ_COUNT_REPLIES = {"get_read_counts": "read_counts", "watch_read_counts": "ack",
                      "get_readers": "readers"}  # v1.1 (docs/protocol.md "Group read counts")
SERVICE_OPS = {"allocate_sequences", "add_members", "remove_members", "set_min_sequence"}
FUZZ_USERS = ("alice", "bob")
FUZZ_CONVERSATIONS = ("g1", "g2")
CANARY_USER = "canary-user-7f3a"  # never in the fuzzed alphabet: the well-behaved client
CANARY_CONVERSATION = "canary-conversation-7f3a"
UINT64_MAX = 2**64 - 1


# ------------------------------------------------------------------ hand-made protobuf


def varint(n: int) -> bytes:
    n &= UINT64_MAX
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited field: strings (any bytes, invalid UTF-8 included), sub-messages."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def client_message(request_id: int, op_field: int, body: bytes) -> bytes:
    return field_varint(1, request_id) + field_bytes(op_field, body)


OP_FIELDS = {
    "hello": 2, "get_sequences": 3, "subscribe": 4, "unsubscribe": 5, "mark_read": 6,
    "set_background": 7, "ping": 8, "allocate_sequences": 20, "add_members": 21,
    "remove_members": 22, "set_min_sequence": 23,
}


# ------------------------------------------------------------------ the sans-IO protocol alone

REFUSALS = {Code.BAD_REQUEST, Code.FORBIDDEN, Code.RATE_LIMITED}  # answered without running an op


def check_protocol(frames: Sequence[bytes | str], config: ServerConfig | None = None,
                   step_s: float = 0.0) -> list[object]:
    """Feed ``frames`` to a fresh :class:`SessionProtocol` (``step_s`` seconds apart) and
    assert the documented decision for each (docs/protocol.md, errors and close codes);
    returns the actions."""
    proto = SessionProtocol(config or ServerConfig(), SECRET, now=0.0)
    actions: list[object] = []
    now = 0.0
    for i, frame in enumerate(frames):
        action = proto.receive(frame, now)
        now += step_s
        actions.append(action)
        msg = _decode(frame)
        if isinstance(action, CloseConnection):
            assert action.code in CLOSE_CODES, action
            if action.final_frame is not None:
                err = pb.ServerMessage.FromString(action.final_frame).error
                assert err.code != Code.INTERNAL, err
            if isinstance(frame, str):
                assert action.code == 1003
            elif msg is None:
                assert action.code == 1002
            elif i == 0:
                assert action.code == 4001
            # once closed, every later frame gets the same decision
            assert all(proto.receive(f, now) is action for f in frames[i + 1:])
            assert proto.phase is Phase.CLOSED
            break
        assert msg is not None, (frame, action)
        if i == 0:
            assert isinstance(action, Opened) and msg.WhichOneof("body") == "hello", action
            pb.ServerMessage.FromString(proto.welcome(msg.request_id, "s"))
            continue
        kind = msg.WhichOneof("body")
        if isinstance(action, RunOp):
            assert action.kind == kind and action.request_id == msg.request_id != 0
            op, service_only = HANDLERS[kind]
            assert action.op is op
            assert proto.identity is not None and (proto.identity.is_service or not service_only)
        else:
            assert isinstance(action, Reply), action
            err = pb.ServerMessage.FromString(action.frame).error
            assert err.code in REFUSALS, err
            assert action.result == Code.Name(err.code)
    return actions


# ------------------------------------------------------------------ the fake transport


class FakeTransport:
    """Feeds ``frames``; once they are consumed and the server is idle, the peer leaves."""

    def __init__(self, frames: Sequence[bytes | str], vanish_at_send: int | None = None) -> None:
        self.vanish_at_send = vanish_at_send  # the peer is gone when the server sends this frame
        self.inbox = list(frames)
        self.consumed = 0
        self.sent: list[bytes] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self.last_rx = trio.current_time()

    async def receive(self) -> bytes | str:
        if self.close_code is not None:
            raise TransportClosed(self.close_code, self.close_reason)
        if self.consumed < len(self.inbox):
            await trio.lowlevel.checkpoint()
            frame = self.inbox[self.consumed]
            self.consumed += 1
            self.last_rx = trio.current_time()
            return frame
        # Nothing more to say: let the server finish answering, then go away.
        await trio.testing.wait_all_tasks_blocked()
        raise TransportClosed(1000, "peer done")

    async def send(self, frame: bytes) -> None:
        if self.close_code is not None:
            raise TransportClosed(self.close_code, self.close_reason)
        await trio.lowlevel.checkpoint()
        if self.vanish_at_send is not None and len(self.sent) >= self.vanish_at_send:
            self.close_code, self.close_reason = 1006, "peer vanished"
            raise TransportClosed(1006, "peer vanished")
        self.sent.append(frame)

    async def flush(self) -> None:  # only after write_nowait, which we lack
        raise AssertionError("flush without write_nowait")

    async def close(self, code: int, reason: str) -> None:
        await trio.lowlevel.checkpoint()
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason


@dataclass
class Outcome:
    frames: list[bytes | str]
    replies: list[pb.ServerMessage] = field(default_factory=list)
    close_code: int | None = None
    welcomed: bool = False
    role: str = ""


async def drive(server, frames: Sequence[bytes | str],
                vanish_at_send: int | None = None) -> Outcome:
    """One session over :class:`FakeTransport`; an exception out of it would have crashed
    the connection's task in the real gateway (and with it the server)."""
    transport = FakeTransport(frames, vanish_at_send)
    session = Session(server, transport, "fuzz")
    with trio.fail_after(30):
        await session.run()
    out = Outcome(list(frames), close_code=transport.close_code)
    for raw in transport.sent:
        msg = pb.ServerMessage.FromString(raw)  # everything the server sends must decode
        out.replies.append(msg)
        if msg.WhichOneof("body") == "welcome":
            out.welcomed = True
            out.role = msg.welcome.role
    out.frames = frames[:transport.consumed]  # the server stops reading once it closes
    return out


def _decode(frame: bytes | str) -> pb.ClientMessage | None:
    if isinstance(frame, str):
        return None
    try:
        return pb.ClientMessage.FromString(frame)
    except Exception:  # noqa: BLE001 - any decode failure is what we look for
        return None


def check_outcome(out: Outcome) -> None:
    """The documented answer (docs/protocol.md, errors and close codes) for every frame sent."""
    replies = out.replies
    errors = [r.error for r in replies if r.WhichOneof("body") == "error"]
    assert all(e.code != Code.INTERNAL for e in errors), errors
    assert out.close_code is None or out.close_code in CLOSE_CODES, out.close_code
    frames = out.frames
    if not frames:
        return
    first = frames[0]
    if isinstance(first, str):
        assert out.close_code == 1003 and not out.welcomed
        return
    msg = _decode(first)
    if msg is None:
        assert out.close_code == 1002 and not out.welcomed
        assert [e.code for e in errors] == [Code.BAD_REQUEST]
        return
    if not out.welcomed:
        assert out.close_code == 4001, out.close_code
        assert [e.code for e in errors] == [Code.UNAUTHENTICATED]
        return
    assert msg.WhichOneof("body") == "hello"
    service = out.role == "service"
    expected: Counter[int] = Counter()
    end = None
    for frame in frames[1:]:
        m = _decode(frame)
        if m is None:
            end = 1003 if isinstance(frame, str) else 1002
            break
        expected[m.request_id] += 1
    if end is not None:
        assert out.close_code == end, (out.close_code, end)
        if end == 1002:
            assert errors and errors[-1].code == Code.BAD_REQUEST
    else:
        assert out.close_code is None, out.close_code  # the session stays
    if end is None:
        # Every op is answered exactly once, with its request id (0 only for the error
        # answering an op that came with request_id 0).
        got = Counter(r.request_id for r in replies[1:]
                      if r.request_id or r.WhichOneof("body") == "error")
        assert got == expected, (got, expected)
    by_id: dict[int, list[pb.ServerMessage]] = {}
    for r in replies[1:]:
        by_id.setdefault(r.request_id, []).append(r)
    for frame in frames[1:]:
        m = _decode(frame)
        if m is None:
            break
        kind = m.WhichOneof("body")
        answers = by_id.get(m.request_id, [])
        if len(answers) != 1 or expected[m.request_id] != 1:
            continue  # repeated request ids: not attributable
        a = answers[0]
        if kind is None or kind == "hello" or m.request_id == 0:
            assert a.error.code == Code.BAD_REQUEST, (kind, a)
        elif kind in SERVICE_OPS and not service:
            assert a.error.code == Code.FORBIDDEN, (kind, a)
        elif kind == "ping":
            assert a.WhichOneof("body") == "pong" and a.pong.client_time_ms == m.ping.client_time_ms
        elif kind == "allocate_sequences":
            if a.WhichOneof("body") == "allocated":
                count = m.allocate_sequences.count or 1
                assert a.allocated.last_sequence - a.allocated.first_sequence + 1 == count
            else:
                assert a.error.code in (Code.BAD_REQUEST, Code.TOO_LARGE), a
        elif kind == "mark_read" and a.WhichOneof("body") == "ack":
            pass  # checked against the store in check_server (I2)
        elif kind in READ_COUNT_REPLIES:
            assert a.WhichOneof("body") in (READ_COUNT_REPLIES[kind], "error"), (kind, a)
            if a.WhichOneof("body") == "error":
                assert a.error.code in (Code.BAD_REQUEST, Code.TOO_LARGE, Code.FORBIDDEN,
                                        Code.NOT_FOUND), a
        else:
            assert a.WhichOneof("body") in ("ack", "update", "error"), (kind, a)
            if a.WhichOneof("body") == "error":
                assert a.error.code in (Code.BAD_REQUEST, Code.TOO_LARGE, Code.FORBIDDEN,
                                        Code.NOT_FOUND), a


def allocations(outcomes: Sequence[Outcome]) -> dict[str, list[tuple[int, int]]]:
    """Allocated ranges per conversation, from the frames and their replies."""
    out: dict[str, list[tuple[int, int]]] = {}
    for o in outcomes:
        asks = {}
        for f in o.frames:
            m = _decode(f)
            if m is not None and m.WhichOneof("body") == "allocate_sequences":
                asks.setdefault(m.request_id, []).append(m.allocate_sequences.conversation_id)
        for r in o.replies:
            if r.WhichOneof("body") == "allocated" and len(asks.get(r.request_id, [])) == 1:
                cid = asks[r.request_id][0]
                out.setdefault(cid, []).append((r.allocated.first_sequence,
                                                r.allocated.last_sequence))
    return out


async def check_server(server, outcomes: Sequence[Outcome] = ()) -> None:
    """Store invariants hold, no seq was handed out twice, and a normal client still works."""
    maxes = check_store_invariants(server.store)
    for cid, ranges in allocations(outcomes).items():
        ranges.sort()
        for (_a, l1), (f2, _b) in zip(ranges, ranges[1:], strict=False):
            assert f2 > l1, f"{cid}: a seq was handed out twice"
        assert ranges[-1][1] <= maxes[cid]
    # The store agrees with the server's own actors: nothing half-applied.
    for uid in (*FUZZ_USERS, CANARY_USER):
        view = await server.store.load_view(uid)
        for i, cid in enumerate(view.conversation_ids):
            assert view.read_seq[i] <= view.max_seq[i]
            assert cid in maxes
    # A well-behaved user and backend are still served.
    svc = await drive(server, [
        client_message(1, 2, field_bytes(1, token("backend", "service").encode())),
        pb.ClientMessage(request_id=2, allocate_sequences=pb.AllocateSequences(
            conversation_id=CANARY_CONVERSATION, count=1)).SerializeToString(),
    ])
    assert svc.replies[-1].WhichOneof("body") == "allocated", svc.replies
    assert svc.replies[-1].allocated.first_sequence == maxes[CANARY_CONVERSATION] + 1  # gapless
    ok = await drive(server, [
        pb.ClientMessage(request_id=1, hello=pb.Hello(token=token(CANARY_USER))).SerializeToString(),
        pb.ClientMessage(request_id=2, get_sequences=pb.GetSequences()).SerializeToString(),
        pb.ClientMessage(request_id=3, mark_read=pb.MarkRead(
            conversation_id=CANARY_CONVERSATION, read_sequence=UINT64_MAX)).SerializeToString(),
    ])
    assert [r.WhichOneof("body") for r in ok.replies] == ["welcome", "update", "ack"], ok.replies
    assert ok.close_code is None
    assert ok.replies[2].ack.read_sequence == maxes[CANARY_CONVERSATION] + 1  # clamped (I2)


async def setup(server) -> None:
    for cid in FUZZ_CONVERSATIONS:
        await server.store.add_members(cid, list(FUZZ_USERS))
        await server.store.allocate(cid, 3)
    await server.store.add_members(CANARY_CONVERSATION, [CANARY_USER])
    await server.store.allocate(CANARY_CONVERSATION, 2)


# ------------------------------------------------------------------ atheris


def _frames_from_bytes(data: bytes) -> list[bytes | str]:
    """Split fuzzer bytes into a Hello (user or service, by the first byte) + frames."""
    if not data:
        return []
    role = "service" if data[0] & 1 else "user"
    who = "backend" if role == "service" else "alice"
    frames: list[bytes | str] = [
        pb.ClientMessage(request_id=1, hello=pb.Hello(token=token(who, role))).SerializeToString()
    ]
    if data[0] & 2:
        frames = []  # the raw bytes are the first frame: the Hello path itself
    rest = data[1:]
    while rest:
        n = rest[0]
        chunk, rest = rest[1:1 + n], rest[1 + n:]
        frames.append(chunk.decode("latin-1") if n == 255 else chunk)
    return frames[:16]


def seed_corpus(directory: Path) -> None:
    """Starting inputs for libFuzzer in :func:`_frames_from_bytes`'s format: a role byte,
    then length-prefixed frames of every op (the mutator takes it from there)."""
    ops = [
        pb.ClientMessage(request_id=2, get_sequences=pb.GetSequences(since=b"x")),
        pb.ClientMessage(request_id=3, subscribe=pb.Subscribe(conversation_ids=["g1"])),
        pb.ClientMessage(request_id=4, unsubscribe=pb.Unsubscribe(all=True)),
        pb.ClientMessage(request_id=5, mark_read=pb.MarkRead(conversation_id="g1",
                                                             read_sequence=2)),
        pb.ClientMessage(request_id=6, set_background=pb.SetBackground(background=True)),
        pb.ClientMessage(request_id=7, ping=pb.Ping(client_time_ms=-1)),
        pb.ClientMessage(request_id=8, allocate_sequences=pb.AllocateSequences(
            conversation_id="g2", count=3, sender_user_id="bob")),
        pb.ClientMessage(request_id=9, add_members=pb.AddMembers(conversation_id="g3",
                                                                 user_ids=["alice"])),
        pb.ClientMessage(request_id=10, remove_members=pb.RemoveMembers(
            conversation_id="g1", user_ids=["bob"], keep_history=True)),
        pb.ClientMessage(request_id=11, set_min_sequence=pb.SetMinSequence(
            conversation_id="g2", min_sequence=2)),
    ]
    directory.mkdir(parents=True, exist_ok=True)
    for role in (0, 1):
        for i, op in enumerate(ops):
            raw = op.SerializeToString()
            (directory / f"seed-{role}-{i}").write_bytes(bytes([role, len(raw)]) + raw)


def _instrument_seqactor(atheris) -> int:
    """Coverage feedback from seqactor's own functions (``instrument_all`` would take
    minutes: it rewrites every loaded function, trio and protobuf included)."""
    import inspect

    count = 0
    for name, mod in list(sys.modules.items()):
        if not name.startswith("seqactor") or mod is None:
            continue
        for obj in list(vars(mod).values()):
            if getattr(obj, "__module__", None) != name:
                continue
            funcs = [obj] if inspect.isfunction(obj) else (
                [f for f in vars(obj).values() if inspect.isfunction(f)]
                if inspect.isclass(obj) else [])
            for f in funcs:
                atheris.instrument_func(f)
                count += 1
    return count


def main() -> None:  # pragma: no cover - run by hand or by test_hostile in a subprocess
    import os
    import threading

    import atheris

    if os.environ.get("FUZZ_TARGET") == "protocol":  # the sans-IO class alone: no trio
        def test_protocol(data: bytes) -> None:
            check_protocol(_frames_from_bytes(data))

        _instrument_seqactor(atheris)
        atheris.Setup(sys.argv, test_protocol)
        atheris.Fuzz()
        return

    from tests._harness import running_server

    ready = threading.Event()
    box: dict[str, object] = {}

    async def host() -> None:
        async with running_server(rate_limit_ops_per_s=1e9, rate_limit_burst_ops=10**9) as server:
            await setup(server)
            box["server"] = server
            box["token"] = trio.lowlevel.current_trio_token()
            ready.set()
            await trio.sleep(math.inf)

    threading.Thread(target=trio.run, args=(host,), daemon=True).start()
    ready.wait()
    server, trio_token = box["server"], box["token"]
    runs = [0]

    async def one(data: bytes) -> None:
        out = await drive(server, _frames_from_bytes(data))
        check_outcome(out)
        runs[0] += 1
        if runs[0] % 500 == 0:
            await check_server(server, [out])

    def test_one_input(data: bytes) -> None:
        trio.from_thread.run(one, data, trio_token=trio_token)

    _instrument_seqactor(atheris)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
