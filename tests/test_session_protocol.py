"""The sans-IO session protocol (seqactor.server.session_protocol): frames and time in, actions
out — no trio, no sockets. Each decision docs/protocol.md names, then the fuzzer over it."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqactor._proto import seqactor_pb2 as pb
from seqactor.server import ops
from seqactor.server.config import ServerConfig
from seqactor.server.ops import OpRefused
from seqactor.server.session_protocol import (
    CloseConnection,
    Opened,
    Phase,
    Reply,
    RunOp,
    SessionProtocol,
)
from seqactor.store import NotFound
from tests._harness import SECRET, token
from tests.fuzz_session import _frames_from_bytes, check_protocol
from tests.test_hostile import _msg, frames_st, hellos

Code = pb.Error.Code


def hello(user: str = "alice", role: str = "user", device: str = "phone") -> bytes:
    return _msg(1, "hello", token=token(user, role), device_id=device, platform="ios",
                client_version="1.2")


def error_of(frame: bytes | None) -> pb.Error:
    assert frame is not None
    return pb.ServerMessage.FromString(frame).error


def opened(role: str = "user", config: ServerConfig | None = None,
           now: float = 0.0) -> SessionProtocol:
    proto = SessionProtocol(config or ServerConfig(), SECRET, now)
    action = proto.receive(hello(role=role), now)
    assert isinstance(action, Opened)
    proto.welcome(action.request_id, "s1")
    return proto


# ------------------------------------------------------------------ Hello


def test_hello_opens_and_welcome_carries_the_settings():
    cfg = ServerConfig(heartbeat_interval_s=7.5, max_frame_bytes=4096)
    proto = SessionProtocol(cfg, SECRET, now=0.0)
    action = proto.receive(hello(device="d" * 300), 0.0)
    assert isinstance(action, Opened)
    assert action.identity.user_id == "alice" and len(action.device_id) == 128
    assert (action.platform, action.client_version) == ("ios", "1.2")
    assert proto.phase is Phase.HELLO  # open once the caller attached and sent Welcome
    welcome = pb.ServerMessage.FromString(proto.welcome(action.request_id, "s1"))
    assert welcome.request_id == 1 and welcome.welcome.user_id == "alice"
    assert welcome.welcome.heartbeat_interval_ms == 7500
    assert welcome.welcome.max_frame_bytes == 4096 and welcome.welcome.session_id == "s1"
    assert proto.phase is Phase.OPEN


@pytest.mark.parametrize("first, code, error", [
    ("text", 1003, None),
    (b"\xff\xff\xff", 1002, Code.BAD_REQUEST),
    (_msg(3, "ping", client_time_ms=1), 4001, Code.UNAUTHENTICATED),
    (_msg(3, "hello", token="not-a-token"), 4001, Code.UNAUTHENTICATED),
], ids=["text-frame", "undecodable", "op-before-hello", "bad-token"])
def test_a_bad_first_frame_closes_with_the_documented_code(first, code, error):
    proto = SessionProtocol(ServerConfig(), SECRET, now=0.0)
    action = proto.receive(first, 0.0)
    assert isinstance(action, CloseConnection) and action.code == code
    if error is None:
        assert action.final_frame is None
    else:
        assert error_of(action.final_frame).code == error
    assert proto.phase is Phase.CLOSED
    assert proto.receive(hello(), 0.0) is action  # closed stays closed


def test_hello_timeout_is_decided_from_the_time_passed_in():
    cfg = ServerConfig(hello_timeout_s=3.0)
    proto = SessionProtocol(cfg, SECRET, now=100.0)
    assert proto.hello_deadline == 100.0 + cfg.hello_timeout_s
    assert proto.check_hello_timeout(100.0 + cfg.hello_timeout_s - 0.001) is None
    action = proto.check_hello_timeout(100.0 + cfg.hello_timeout_s)
    assert action is not None and action.code == 4002


# ------------------------------------------------------------------ ops


def test_ops_are_handed_to_their_handler_with_the_body():
    proto = opened()
    action = proto.receive(_msg(9, "mark_read", conversation_id="g", read_sequence=4), 0.0)
    assert isinstance(action, RunOp)
    assert (action.kind, action.request_id, action.op) == ("mark_read", 9, ops.mark_read)
    assert action.body.conversation_id == "g" and action.body.read_sequence == 4


@pytest.mark.parametrize("frame, code, text", [
    (_msg(0, "ping", client_time_ms=1), Code.BAD_REQUEST, "request_id"),
    (_msg(4, "hello", token="x"), Code.BAD_REQUEST, "Hello is only valid first"),
    (pb.ClientMessage(request_id=4).SerializeToString(), Code.BAD_REQUEST, "no operation"),
    (_msg(4, "allocate_sequences", conversation_id="g", count=1), Code.FORBIDDEN, "service"),
], ids=["request-id-0", "second-hello", "no-op", "service-op-as-user"])
def test_refused_ops_are_answered_without_running(frame, code, text):
    action = opened().receive(frame, 0.0)
    assert isinstance(action, Reply)
    err = error_of(action.frame)
    assert err.code == code and text in err.message and action.result == Code.Name(code)


def test_service_sessions_may_run_service_ops_and_are_never_rate_limited():
    cfg = ServerConfig(rate_limit_burst_ops=2, rate_limit_ops_per_s=1.0)
    proto = opened("service", cfg)
    for rid in range(1, 10 * cfg.rate_limit_burst_ops):
        action = proto.receive(_msg(rid, "allocate_sequences", conversation_id="g", count=1), 0.0)
        assert isinstance(action, RunOp) and action.op is ops.allocate


def test_rate_limit_refuses_then_closes_4008_and_refills_with_time():
    cfg = ServerConfig(rate_limit_burst_ops=5, rate_limit_ops_per_s=10.0,
                       rate_limit_max_rejected=3)
    proto = opened(config=cfg)
    ping = _msg(1, "ping", client_time_ms=1)
    assert all(isinstance(proto.receive(ping, 0.0), RunOp) for _ in range(cfg.rate_limit_burst_ops))
    refused = proto.receive(ping, 0.0)
    assert isinstance(refused, Reply) and error_of(refused.frame).code == Code.RATE_LIMITED
    # one token comes back after 1 / rate seconds
    assert isinstance(proto.receive(ping, 1.0 / cfg.rate_limit_ops_per_s), RunOp)
    later = 1.0 / cfg.rate_limit_ops_per_s
    actions = [proto.receive(ping, later) for _ in range(cfg.rate_limit_max_rejected + 1)]
    assert isinstance(actions[-1], CloseConnection) and actions[-1].code == 4008
    assert error_of(actions[-1].final_frame).code == Code.RATE_LIMITED


def test_idle_timeout_counts_from_the_last_bytes_and_is_longer_in_background():
    cfg = ServerConfig(heartbeat_interval_s=10.0)
    proto = opened(config=cfg)
    assert proto.check_idle(cfg.idle_timeout_s - 0.01, 0.0, background=False) is None
    assert proto.check_idle(cfg.idle_timeout_s, 0.0, background=True) is None
    action = proto.check_idle(cfg.background_idle_timeout_s, 0.0, background=True)
    assert action is not None and action.code == 1000 and action.reason == "idle timeout"


def test_the_first_close_decided_wins():
    proto = opened()
    first = proto.close(4009, "session replaced by a newer one")
    assert proto.close(1001, "server shutting down") is first
    assert proto.check_idle(1e9, 0.0, False) is first
    assert proto.receive(_msg(2, "ping", client_time_ms=1), 0.0) is first


@pytest.mark.parametrize("exc, code", [
    (NotFound("conversation 'g' does not exist"), Code.NOT_FOUND),
    (OpRefused(Code.FORBIDDEN, "conversation is not in your view"), Code.FORBIDDEN),
    (RuntimeError("boom"), Code.INTERNAL),
])
def test_a_failed_op_gets_its_error_and_internal_details_stay_inside(exc, code):
    proto = opened()
    op = proto.receive(_msg(7, "ping", client_time_ms=1), 0.0)
    assert isinstance(op, RunOp)
    reply = proto.op_error(op, exc)
    err = error_of(reply.frame)
    assert err.code == code and pb.ServerMessage.FromString(reply.frame).request_id == 7
    assert ("boom" not in err.message) and reply.kind == "ping"


# ------------------------------------------------------------------ fuzzing


@settings(max_examples=2_000, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(first=hellos, frames=st.lists(frames_st, max_size=12),
       step=st.sampled_from([0.0, 0.001, 1.0]))
def test_fuzzed_frames_get_the_documented_decision(first, frames, step):
    check_protocol([first, *frames], step_s=step)


def test_libfuzzer_format_inputs_from_random_bytes_get_the_documented_decision():
    """The atheris harness's input format over random bytes (seeded by the clock, printed):
    thousands of sessions, without sockets or trio."""
    seed = time.time_ns()
    rng = random.Random(seed)
    for _ in range(3_000):
        data = rng.randbytes(rng.randrange(1, 200))
        try:
            check_protocol(_frames_from_bytes(data))
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}, input {data!r}") from exc
