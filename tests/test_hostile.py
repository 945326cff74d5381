"""Hostile input: fuzzing, auth attacks, floods and resource limits (issue #7).

Whatever a client sends, the server never crashes, never corrupts the store (its invariants
hold afterwards, allocations stay gapless, a normal client is still served), and answers with
the documented error or close code (docs/protocol.md, "Errors and close codes"). Cases already in
tests/test_server.py and tests/test_server_faults.py are not repeated here.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import trio
import trio_websocket as tws
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqactor.server.gateway
from seqactor._proto import seqactor_pb2 as pb
from seqactor._synctoken import make_token
from seqactor.protocol import MAX_TOKEN_LIFETIME_S
from seqactor.server.config import ServerConfig
from seqactor.server.gateway import Server
from seqactor.store.memory import MemoryStore
from tests._harness import SECRET, Closed, body, raw_connect, running_server, token, update_of
from tests._load import ServerProcess, free_port, serve_argv, write_secret
from tests.fuzz_session import (
    CLOSE_CODES,
    UINT64_MAX,
    check_outcome,
    check_server,
    client_message,
    drive,
    field_bytes,
    field_varint,
    setup,
    varint,
)

Code = pb.Error.Code
FUZZ_CONFIG = {"rate_limit_ops_per_s": 1e9, "rate_limit_burst_ops": 10**9}

# ---------------------------------------------------------------- fuzzing the session layer

IDS = ["g1", "g2", "g3", "alice", "bob", "", "x" * 128, "é" * 64, "x" * 129, "é" * 65,
       "a\x01b", "a\u0085b", "a\x7fb", " ", "\u202e"]
BIG_IDS = [f"id{i}" for i in range(10_000)]
SEQS = st.one_of(st.sampled_from([0, 1, 2, 3, 5, 2**32 - 1, 2**63, UINT64_MAX]),
                 st.integers(0, UINT64_MAX))
COUNTS = st.one_of(st.sampled_from([0, 1, 2, 3, 10_000, 10_001, 2**32 - 1]),
                   st.integers(0, 2**32 - 1))
ids = st.sampled_from(IDS)
id_lists = st.one_of(st.lists(ids, max_size=6), st.just(BIG_IDS), st.just(BIG_IDS + ["one-more"]))
rids = st.one_of(st.integers(1, 50), st.sampled_from([0, UINT64_MAX]))


def _msg(rid: int, kind: str, **fields) -> bytes:
    msg = pb.ClientMessage(request_id=rid)
    getattr(msg, kind).SetInParent()
    for k, v in fields.items():
        target = getattr(msg, kind)
        if isinstance(v, list):
            getattr(target, k).extend(v)
        else:
            setattr(target, k, v)
    return msg.SerializeToString()


valid_ops = st.one_of(
    st.builds(lambda r, ids_, s: _msg(r, "get_sequences", conversation_ids=ids_, since=s),
              rids, id_lists, st.one_of(st.just(b""), st.binary(max_size=30))),
    st.builds(lambda r, ids_, a: _msg(r, "subscribe", conversation_ids=ids_, all=a), rids, id_lists,
              st.booleans()),
    st.builds(lambda r, ids_, a: _msg(r, "unsubscribe", conversation_ids=ids_, all=a), rids,
              id_lists, st.booleans()),
    st.builds(lambda r, c, s: _msg(r, "mark_read", conversation_id=c, read_sequence=s), rids,
              ids, SEQS),
    st.builds(lambda r, b: _msg(r, "set_background", background=b), rids, st.booleans()),
    st.builds(lambda r, t: _msg(r, "ping", client_time_ms=t), rids,
              st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda r, c, n, s: _msg(r, "allocate_sequences", conversation_id=c, count=n,
                                      sender_user_id=s), rids, ids, COUNTS, ids),
    st.builds(lambda r, c, ids_: _msg(r, "add_members", conversation_id=c, user_ids=ids_), rids, ids,
              id_lists),
    st.builds(lambda r, c, ids_, k: _msg(r, "remove_members", conversation_id=c, user_ids=ids_,
                                      keep_history=k), rids, ids, id_lists, st.booleans()),
    st.builds(lambda r, c, s: _msg(r, "set_min_sequence", conversation_id=c, min_sequence=s),
              rids, ids, SEQS),
    st.builds(lambda r, c, f, t: _msg(r, "get_read_counts", conversation_id=c, from_sequence=f,
                                      to_sequence=t), rids, ids, SEQS, SEQS),
    st.builds(lambda r, c, f, s: _msg(r, "watch_read_counts", conversation_id=c, from_sequence=f,
                                      stop=s), rids, ids, SEQS, st.booleans()),
    st.builds(lambda r, c, s, u, n, a: _msg(r, "get_readers", conversation_id=c, sequence=s,
                                            unread=u, limit=n, after_user_id=a),
              rids, ids, SEQS, st.booleans(), COUNTS, ids),
    st.builds(lambda r, t: _msg(r, "hello", token=t), rids, st.sampled_from(["", "x"])),
    st.builds(lambda r: pb.ClientMessage(request_id=r).SerializeToString(), rids),
)
bad_utf8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"a\x80b", b"\xf8\x88\x80\x80\x80"])
hand_made = st.one_of(
    # invalid UTF-8 inside a string field of each op that has one
    st.builds(lambda r, op, bad: client_message(r, op, field_bytes(1, bad)),
              rids, st.sampled_from([2, 3, 4, 5, 6, 9, 10, 11, 20, 21, 22, 23]), bad_utf8),
    st.builds(lambda r, bad: client_message(r, 21, field_bytes(1, b"g1") + field_bytes(2, bad)),
              rids, bad_utf8),
    # uint32 count beyond 32 bits (protobuf truncates), varints of 10 bytes, unknown fields
    st.builds(lambda r, n: client_message(r, 20, field_bytes(1, b"g1") + field_varint(2, n)),
              rids, st.integers(0, UINT64_MAX)),
    st.builds(lambda r, f, p: field_varint(1, r) + field_bytes(f, p), rids,
              st.integers(12, 19) | st.integers(24, 2**29 - 1), st.binary(max_size=20)),
    # wrong wire types, a length prefix beyond the frame, a group tag
    st.builds(lambda r, f, v: field_varint(1, r) + field_varint(f, v), rids,
              st.sampled_from([2, 3, 6, 8, 20]), st.integers(0, UINT64_MAX)),
    st.builds(lambda r, n: field_varint(1, r) + varint(6 << 3 | 2) + varint(n) + b"ab", rids,
              st.integers(3, UINT64_MAX)),
    st.builds(lambda r: field_varint(1, r) + b"\x13", rids),
)


def _mutate(frame: bytes, cut: int, flip: int) -> bytes:
    if not frame:
        return frame
    if cut % 2:
        return frame[: cut % len(frame)]  # truncated
    i = flip % len(frame)
    return frame[:i] + bytes([frame[i] ^ (1 + cut % 255)]) + frame[i + 1:]


frames_st = st.one_of(
    valid_ops, valid_ops, hand_made,
    st.builds(_mutate, valid_ops, st.integers(0, 1000), st.integers(0, 1000)),
    st.binary(max_size=64),
    st.text(max_size=10),  # a text frame
)
hellos = st.one_of(
    st.builds(lambda u: _msg(1, "hello", token=token(u), device_id="fz"),
              st.sampled_from(["alice", "bob", "mallory"])),
    st.just(b"").map(lambda _: _msg(1, "hello", token=token("backend", "service"))),
    frames_st,
)
sessions_st = st.lists(st.tuples(hellos, st.lists(frames_st, max_size=8)), min_size=1,
                       max_size=3)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sessions=sessions_st)
async def test_fuzzed_sessions_never_crash_never_corrupt(sessions):
    async with running_server(**FUZZ_CONFIG) as server:
        await setup(server)
        outcomes = []
        for hello, frames in sessions:
            out = await drive(server, [hello, *frames])
            check_outcome(out)
            outcomes.append(out)
        await check_server(server, outcomes)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sessions=sessions_st, vanish=st.lists(st.integers(0, 6), min_size=3, max_size=3))
async def test_peer_vanishing_at_any_send_is_not_a_crash(sessions, vanish):
    """The peer disappears just as the server writes its n-th frame (Welcome included)."""
    async with running_server(**FUZZ_CONFIG) as server:
        await setup(server)
        for (hello, frames), at in zip(sessions, vanish, strict=False):
            out = await drive(server, [hello, *frames], vanish_at_send=at)
            assert out.close_code in (None, 1006, *CLOSE_CODES), out.close_code
        assert not server.sessions  # every session ended and was unregistered
        await check_server(server)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(valid_ops, min_size=1, max_size=30))
async def test_fuzzed_service_ops_keep_the_store_consistent(ops):
    """A backend gone mad (service ops are not rate limited and run concurrently)."""
    async with running_server(**FUZZ_CONFIG) as server:
        await setup(server)
        out = await drive(server, [_msg(1, "hello", token=token("backend", "service")), *ops])
        check_outcome(out)
        await check_server(server, [out])


@pytest.mark.parametrize("target, runs", [("session", 4_000), ("protocol", 50_000)])
def test_atheris_short_run(tmp_path, target, runs):
    """A bounded libFuzzer run over the session harness (tests/fuzz_session.py): a whole
    Session with its ops, and the sans-IO SessionProtocol alone (no trio: far more runs)."""
    import atheris  # noqa: F401  (dev extra: the harness below needs it)

    from tests.fuzz_session import seed_corpus

    harness = Path(__file__).with_name("fuzz_session.py")
    corpus = tmp_path / "corpus"
    seed_corpus(corpus)
    out = subprocess.run(
        [sys.executable, str(harness), f"-atheris_runs={runs}", "-max_len=512", "-seed=7",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=240, cwd=harness.parent.parent,
        env={**os.environ, "FUZZ_TARGET": target},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"Done {runs} " in out.stderr, out.stderr[-2000:]


# ---------------------------------------------------------------- each case on the wire

@pytest.mark.parametrize("frame, error, close", [
    (client_message(5, 6, field_bytes(1, b"\xff\xfe") + field_varint(2, 1)),
     Code.BAD_REQUEST, 1002),  # invalid UTF-8 in a string field
    (client_message(5, 8, b"")[:-1], Code.BAD_REQUEST, 1002),  # truncated frame
    (field_varint(1, 5) + varint(3 << 3 | 2) + varint(2**40), Code.BAD_REQUEST, 1002),
    (field_varint(1, 5) + b"\x10" + b"\xff" * 10 + b"\x01", Code.BAD_REQUEST, 1002),  # varint
    (field_varint(1, 5) + field_bytes(19, b""), Code.BAD_REQUEST, None),  # unknown op (no field 19)
    (field_varint(1, 5) + field_varint(8, 1), Code.BAD_REQUEST, None),  # op with wrong type
    (_msg(0, "ping", client_time_ms=1), Code.BAD_REQUEST, None),  # request_id 0
    (_msg(5, "hello", token=token("alice")), Code.BAD_REQUEST, None),  # Hello again
    (_msg(5, "allocate_sequences", conversation_id="g", count=1), Code.FORBIDDEN, None),
    (_msg(5, "get_sequences", conversation_ids=["x"] * 10_001), Code.TOO_LARGE, None),
    (_msg(5, "subscribe", conversation_ids=["x" * 129]), Code.FORBIDDEN, None),
    (_msg(5, "mark_read", conversation_id="", read_sequence=UINT64_MAX), Code.FORBIDDEN, None),
], ids=["bad-utf8", "truncated", "length-beyond-frame", "11-byte-varint", "unknown-op",
        "wrong-wire-type", "request-id-0", "second-hello", "service-op-as-user",
        "10001-ids", "129-byte-id", "empty-id"])
async def test_hostile_frame_gets_the_spec_answer(frame, error, close):
    async with running_server(max_frame_bytes=1 << 20) as server:
        async with raw_connect(server, "alice") as c:
            await c.conn.send_message(frame)
            reply = await c.recv()
            assert body(reply) == "error" and reply.error.code == error, reply
            if close is not None:
                assert (await c.wait_closed()).code == close
            else:
                r = await c.request("ping", client_time_ms=7)
                assert body(r) == "pong"  # the session stays


async def test_hostile_frames_before_hello():
    async with running_server() as server:
        cases = [
            (client_message(1, 2, field_bytes(1, b"\xc3\x28")), Code.BAD_REQUEST, 1002),
            (b"\x0a\xff", Code.BAD_REQUEST, 1002),
            (field_varint(1, 1), Code.UNAUTHENTICATED, 4001),  # a message without an op
            (_msg(1, "get_sequences"), Code.UNAUTHENTICATED, 4001),
        ]
        for frame, error, close in cases:
            async with raw_connect(server, hello=False) as c:
                await c.conn.send_message(frame)
                reply = await c.recv()
                assert reply.error.code == error
                assert (await c.wait_closed()).code == close


async def test_extreme_values_are_clamped_not_wrapped():
    async with running_server(max_frame_bytes=1 << 20) as server:
        async with raw_connect(server, "backend", role="service") as svc:
            await svc.request("add_members", conversation_id="x" * 128, user_ids=["é" * 64])
            r = await svc.request("allocate_sequences", conversation_id="x" * 128, count=10_000)
            assert (r.allocated.first_sequence, r.allocated.last_sequence) == (1, 10_000)
            r = await svc.request("set_min_sequence", conversation_id="x" * 128,
                                  min_sequence=UINT64_MAX)
            assert body(r) == "ack"
            r = await svc.request("add_members", conversation_id="g",
                                  user_ids=[f"u{i}" for i in range(10_000)])
            assert body(r) == "ack"  # exactly the limit
            r = await svc.request("add_members", conversation_id="g", user_ids=["é" * 65])
            assert r.error.code == Code.BAD_REQUEST  # 130 bytes
        async with raw_connect(server, "é" * 64) as c:
            r = await c.request("mark_read", conversation_id="x" * 128, read_sequence=UINT64_MAX)
            assert r.ack.read_sequence == 10_000
            conv, _, _, _ = update_of(await c.request("get_sequences"))
            assert conv["x" * 128][:3] == (10_000, 10_000, 10_000)
            r = await c.request("get_sequences", conversation_ids=BIG_IDS)  # 10 000 ids
            assert update_of(r)[0] == {}
        assert not await server.store.view_contains("u0", "nope")
        from tests._load import check_store_invariants

        check_store_invariants(server.store)


# ---------------------------------------------------------------- auth attacks

def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _forged_tokens() -> dict[str, str]:
    now = int(time.time())
    good = jwt.encode({"sub": "alice", "exp": now + 600}, SECRET, algorithm="HS256")
    h, _p, s = good.split(".")
    escalated = _b64({"sub": "alice", "exp": now + 600, "role": "service"})
    return {
        "role-list": jwt.encode({"sub": "alice", "exp": now + 60, "role": ["service"]}, SECRET,
                                algorithm="HS256"),
        "role-case": jwt.encode({"sub": "alice", "exp": now + 60, "role": "Service"}, SECRET,
                                algorithm="HS256"),
        "payload-swapped": f"{h}.{escalated}.{s}",  # role escalation, old signature
        "signature-stripped": f"{h}.{escalated}.",
        "alg-none-service": jwt.encode({"sub": "alice", "exp": now + 60, "role": "service"},
                                       None, algorithm="none"),
        "hs512": jwt.encode({"sub": "alice", "exp": now + 60}, SECRET, algorithm="HS512"),
        "exp-string": jwt.encode({"sub": "alice", "exp": str(now + 60)}, SECRET,
                                 algorithm="HS256"),
        "nbf-future": jwt.encode({"sub": "alice", "exp": now + 600, "nbf": now + 300}, SECRET,
                                 algorithm="HS256"),
        "lifetime-just-over": jwt.encode({"sub": "alice", "exp": now + MAX_TOKEN_LIFETIME_S + 60},
                                         SECRET, algorithm="HS256"),
        "sub-int": jwt.encode({"sub": 42, "exp": now + 60}, SECRET, algorithm="HS256"),
        "sub-129-bytes": jwt.encode({"sub": "a" * 129, "exp": now + 60}, SECRET,
                                    algorithm="HS256"),
        "sub-control": jwt.encode({"sub": "ali\x00ce", "exp": now + 60}, SECRET,
                                  algorithm="HS256"),
        "huge": "a" * 60_000,
        "three-dots": "...",
    }


# The names only: the tokens hold times, so they are built when each test runs (a token built
# at import time and used minutes later tests a different boundary, or none).
FORGED_NAMES = (
    "alg-none-service", "exp-string", "hs512", "huge", "lifetime-just-over", "nbf-future",
    "payload-swapped", "role-case", "role-list", "signature-stripped", "sub-129-bytes",
    "sub-control", "sub-int", "three-dots",
)


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_forged_token_names_cover_every_forgery():
    assert set(FORGED_NAMES) == set(_forged_tokens())


# The hs512 forgery signs with the 38-byte test secret on purpose (HS512 wants 64 bytes).
@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.parametrize("name", FORGED_NAMES)
async def test_forged_tokens_are_refused(name):
    forged = _forged_tokens()[name]
    async with running_server() as server:
        async with raw_connect(server, tok=forged, hello=False) as c:
            await c.send(pb.ClientMessage(request_id=1, hello=pb.Hello(token=forged)))
            reply = await c.recv()
            assert reply.error.code == Code.UNAUTHENTICATED
            assert (await c.wait_closed()).code == 4001
            assert not server.sessions and not server.hub.actors  # nothing was set up


async def test_unsigned_header_claims_grant_nothing_and_lifetime_boundary():
    now = int(time.time())
    header_role = jwt.encode({"sub": "alice", "exp": now + 600}, SECRET, algorithm="HS256",
                             headers={"role": "service", "sub": "backend"})
    within = jwt.encode({"sub": "alice", "exp": now + MAX_TOKEN_LIFETIME_S - 60}, SECRET,
                        algorithm="HS256")
    async with running_server() as server:
        for tok in (header_role, within):
            async with raw_connect(server, tok=tok) as c:
                assert c.welcome.user_id == "alice" and c.welcome.role == "user"
                r = await c.request("allocate_sequences", conversation_id="g", count=1)
                assert r.error.code == Code.FORBIDDEN


async def test_replayed_token_gives_its_owner_view_only():
    """A token replayed with another device id (or by another person) is still its ``sub``:
    there is no way to choose an identity in Hello, and the view is the token owner's."""
    async with running_server() as server:
        async with raw_connect(server, "backend", role="service") as svc:
            await svc.request("add_members", conversation_id="alice-dm", user_ids=["alice"])
            await svc.request("add_members", conversation_id="bob-secret", user_ids=["bob"])
            await svc.request("allocate_sequences", conversation_id="bob-secret", count=9)
        alice_token = token("alice")
        async with raw_connect(server, tok=alice_token, device_id="bob") as c:
            assert c.welcome.user_id == "alice"
            conv, _, _, _ = update_of(await c.request("get_sequences"))
            assert set(conv) == {"alice-dm"}
        # The service's token is not a user's either: it sees its own (empty) view.
        async with raw_connect(server, "backend", role="service", device_id="bob") as svc:
            conv, _, _, _ = update_of(await svc.request("get_sequences"))
            assert conv == {}


async def test_probing_by_id_and_by_crafted_positions_leaks_nothing():
    async with running_server() as server:
        async with raw_connect(server, "backend", role="service") as svc:
            await svc.request("add_members", conversation_id="mine", user_ids=["eve", "bob"])
            await svc.request("add_members", conversation_id="theirs", user_ids=["bob", "eve"])
            await svc.request("allocate_sequences", conversation_id="theirs", count=3)
            await svc.request("remove_members", conversation_id="theirs", user_ids=["eve"])
            await svc.request("allocate_sequences", conversation_id="theirs", count=4)
            await svc.request("add_members", conversation_id="other", user_ids=["bob"])
        async with raw_connect(server, "eve") as c:
            await c.request("subscribe", all=True)
            # Delta from position 0 and from the future: eve's rows only; "theirs" appears
            # as removed (it was in her view), "other" never.
            for pos in (0, 1, 2**63):
                since = make_token(server.hub.epoch, pos)
                conv, _, _, removed = update_of(await c.request("get_sequences", since=since))
                assert set(conv) <= {"mine"} and set(removed) <= {"theirs"}
            r = await c.request("get_sequences", conversation_ids=["theirs", "other", "mine"])
            assert set(update_of(r)[0]) == {"mine"}
            for cid in ("theirs", "other"):
                r = await c.request("mark_read", conversation_id=cid, read_sequence=1)
                assert r.error.code == Code.FORBIDDEN and "7" not in r.error.message
                r = await c.request("subscribe", conversation_ids=[cid])
                assert r.error.code == Code.FORBIDDEN
            async with raw_connect(server, "backend", role="service") as svc:
                await svc.request("allocate_sequences", conversation_id="theirs", count=1)
                await svc.request("allocate_sequences", conversation_id="other", count=1)
                await svc.request("set_min_sequence", conversation_id="theirs", min_sequence=2)
            await c.no_push(0.3)  # no change of a foreign conversation reaches her


# ---------------------------------------------------------------- floods

async def test_pipelined_flood_without_reading_is_throttled_others_served():
    async with running_server() as server:
        async with raw_connect(server, "flooder") as bad, raw_connect(server, "calm") as calm:
            frame = _msg(9, "ping", client_time_ms=1)
            with trio.move_on_after(3):  # the server stops reading it: sends block
                for _ in range(5_000):
                    await bad.conn.send_message(frame)
            for _ in range(20):
                r = await calm.request("ping", client_time_ms=2)
                assert body(r) == "pong"
            state = server.hub.actors["flooder"].sessions[0] if "flooder" in server.hub.actors \
                else None
            if state is not None:
                assert len(state.replies) <= server.config.reply_queue_frames
            codes = []
            with pytest.raises(Closed) as info:
                while True:
                    msg = await bad.recv()
                    codes.append(msg.error.code if body(msg) == "error" else body(msg))
            assert info.value.code == 4008
            assert Code.RATE_LIMITED in codes and len(codes) < 1_000


async def test_backend_flood_is_back_pressured_and_gapless():
    n = 3_000
    async with running_server() as server:
        async with raw_connect(server, "backend", role="service") as svc:
            async with trio.open_nursery() as nursery:
                async def blast():
                    for i in range(n):
                        await svc.send(pb.ClientMessage(
                            request_id=100 + i,
                            allocate_sequences=pb.AllocateSequences(conversation_id="g")))

                nursery.start_soon(blast)
                await trio.sleep(0.5)  # not reading: the server must not buffer without bound
                state = server.hub.actors["backend"].sessions[0]
                assert len(state.replies) <= server.config.reply_queue_frames
                seqs = []
                while len(seqs) < n:
                    msg = await svc.recv()
                    seqs.append(msg.allocated.first_sequence)
            assert sorted(seqs) == list(range(1, n + 1))


async def test_unauthenticated_and_handshake_slowloris_are_cut(monkeypatch):
    monkeypatch.setattr(seqactor.server.gateway, "HANDSHAKE_TIMEOUT_S", 0.5)
    async with running_server(hello_timeout_s=0.5) as server:
        async with trio.open_nursery() as nursery:
            idle_tcp = []
            for _ in range(30):
                s = trio.socket.socket()
                await s.connect(("127.0.0.1", server.port))
                idle_tcp.append(s)  # never upgrades to WebSocket
            silent = []
            for _ in range(30):
                conn = await tws.connect_websocket_url(nursery, f"ws://127.0.0.1:{server.port}/v1")
                silent.append(conn)  # upgrades, never says Hello
            async with raw_connect(server, "calm") as calm:
                r = await calm.request("ping", client_time_ms=1)
                assert body(r) == "pong"
            with trio.fail_after(5):
                for conn in silent:
                    with pytest.raises(tws.ConnectionClosed) as info:
                        await conn.get_message()
                    assert info.value.reason.code == 4002
                for s in idle_tcp:
                    while await s.recv(4096):
                        pass  # EOF: the server hung up
                    s.close()
            assert server.connections == 0
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- resource limits

async def test_connection_limit_counts_connections_not_yet_authenticated():
    async with running_server(max_connections=3) as server:
        async with trio.open_nursery() as nursery:
            pending = [await tws.connect_websocket_url(nursery, f"ws://127.0.0.1:{server.port}/v1")
                       for _ in range(3)]
            with pytest.raises(tws.HandshakeError):
                async with tws.open_websocket_url(f"ws://127.0.0.1:{server.port}/v1"):
                    pass
            for conn in pending:
                await conn.aclose()
            async with raw_connect(server, "late") as c:
                assert c.welcome is not None
            nursery.cancel_scope.cancel()


def _low_nofile(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return apply


async def test_fd_exhaustion_is_survived_and_accept_resumes(tmp_path):
    limit = 64
    secret = write_secret(tmp_path / "secret")
    log = tmp_path / "server.log"
    server = await ServerProcess.start(
        serve_argv(free_port(), f"sqlite:///{tmp_path}/db.sqlite", secret),
        log, preexec_fn=_low_nofile(limit))
    url = server.url
    try:
        async with trio.open_nursery() as nursery:
            sessions = []
            stuck = None
            with trio.fail_after(60):
                while True:
                    attempt = trio.CancelScope(deadline=trio.current_time() + 1.5)
                    with attempt:
                        conn = await tws.connect_websocket_url(nursery, url)
                        await conn.send_message(_msg(1, "hello", token=token(f"u{len(sessions)}")))
                        reply = pb.ServerMessage.FromString(await conn.get_message())
                        assert body(reply) == "welcome"
                        sessions.append(conn)
                    if attempt.cancelled_caught:
                        break  # the server can no longer accept: out of descriptors
                    assert len(sessions) < limit, "the fd limit was never reached"
            assert len(sessions) > limit // 2
            assert server.alive()
            # The established sessions are still served meanwhile.
            await sessions[0].send_message(_msg(2, "ping", client_time_ms=3))
            assert body(pb.ServerMessage.FromString(await sessions[0].get_message())) == "pong"
            for conn in sessions[:10]:
                await conn.aclose()
            # Accept works again: a new session is welcomed (the queued ones drain too).
            with trio.fail_after(10):
                conn = await tws.connect_websocket_url(nursery, url)
                await conn.send_message(_msg(1, "hello", token=token("after")))
                reply = pb.ServerMessage.FromString(await conn.get_message())
                assert body(reply) == "welcome"
                svc_conn = sessions[-1]
                await svc_conn.send_message(_msg(3, "ping", client_time_ms=4))
                assert body(pb.ServerMessage.FromString(await svc_conn.get_message())) == "pong"
            stuck = conn
            await stuck.aclose()
            nursery.cancel_scope.cancel()
        assert server.alive()
    finally:
        code = await server.stop()
    assert code == 0
    text = log.read_text()
    assert "Too many open files" in text or "EMFILE" in text, text[-2000:]


async def test_view_and_group_size_limits_are_enforced():
    store = MemoryStore()
    cfg = ServerConfig(host="127.0.0.1", port=0, max_view_conversations=3, max_conversation_members=4)
    server = Server(cfg, store, SECRET)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        async with raw_connect(server, "backend", role="service") as svc:
            for i in range(3):
                r = await svc.request("add_members", conversation_id=f"c{i}", user_ids=["alice"])
                assert body(r) == "ack"
            r = await svc.request("add_members", conversation_id="c3", user_ids=["bob", "alice"])
            assert r.error.code == Code.TOO_LARGE
            assert not await store.view_contains("bob", "c3")  # nothing half-written
            r = await svc.request("add_members", conversation_id="big",
                                  user_ids=["m1", "m2", "m3", "m4", "m5"])
            assert r.error.code == Code.TOO_LARGE
            r = await svc.request("add_members", conversation_id="big",
                                  user_ids=["m1", "m2", "m3", "m4"])
            assert body(r) == "ack"
            r = await svc.request("add_members", conversation_id="big", user_ids=["m5"])
            assert r.error.code == Code.TOO_LARGE
            async with raw_connect(server, "alice") as c:
                conv, _, _, _ = update_of(await c.request("get_sequences"))
                assert set(conv) == {"c0", "c1", "c2"}
            await svc.request("remove_members", conversation_id="c0", user_ids=["alice"])
            r = await svc.request("add_members", conversation_id="c3", user_ids=["alice"])
            assert body(r) == "ack"  # room again once she left one
        server.stop()


