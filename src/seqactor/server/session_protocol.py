"""The per-connection protocol, sans I/O: fed frames and time, it answers with actions.

:class:`SessionProtocol` holds one connection's protocol state — waiting for Hello → open →
closed — and makes every decision of docs/protocol.md that needs no store: decoding, the Hello
and its token, which close code ends a session and with which final frame, the rate limit of
user sessions, the idle timeout, and which op a frame asks for and whether this session may run
it. It never awaits, reads a clock or touches a socket: the caller passes ``now`` (seconds, any
monotonic clock) and carries out what comes back. :class:`~seqactor.server.session.Session`
does that over a WebSocket; the fuzzers drive this class alone, thousands of frames a second.

The shape follows h11's ``Connection`` (events in, events out, no I/O).

Actions (what :meth:`SessionProtocol.receive` returns for one frame):

* :class:`Opened` — Hello with a valid token: attach the user's actor, then send
  :meth:`SessionProtocol.welcome`.
* :class:`RunOp` — run ``op`` (an :data:`~seqactor.server.ops.OpHandler`) and send its reply.
* :class:`Reply` — send ``frame``; the session goes on (an op refused without running it).
* :class:`CloseConnection` — send ``final_frame`` if any, then close with ``code``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from google.protobuf.message import DecodeError as ProtoDecodeError

from seqactor._proto import seqactor_pb2 as pb
from seqactor.auth import AuthError, Identity, verify_token
from seqactor.protocol import MAX_ID_BYTES, Close
from seqactor.server import _frames as frames
from seqactor.server.config import ServerConfig
from seqactor.server.ops import HANDLERS, OpHandler, OpRefused
from seqactor.store import StoreError

Code = pb.Error.Code
MAX_CLIENT_FIELD_CHARS = 64  # Hello.platform / client_version kept for the log


class Phase(enum.Enum):
    HELLO = "waiting for Hello"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Opened:
    request_id: int
    identity: Identity
    device_id: str
    platform: str
    client_version: str


@dataclass(frozen=True, slots=True)
class RunOp:
    kind: str  # the ClientMessage body's field name, e.g. "mark_read"
    request_id: int
    body: object  # the op's protobuf message
    op: OpHandler


@dataclass(frozen=True, slots=True)
class Reply:
    frame: bytes
    kind: str  # for the ops metric: the op asked for ("any": rate limited before decoding it)
    result: str  # ... and the error code's name


@dataclass(frozen=True, slots=True)
class CloseConnection:
    code: int
    reason: str
    final_frame: bytes | None = None


Action = Opened | RunOp | Reply | CloseConnection


class RateLimiter:
    """Token bucket: ``rate`` ops/s with a burst of ``burst``; time is passed in (seconds)."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def allow(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def store_error_code(exc: StoreError) -> int:
    """The ``Error.Code`` of a store error (its ``code`` names one)."""
    return int(Code.Value(exc.code))


class SessionProtocol:
    """One connection's protocol state and decisions (see the module docstring).

    ``config`` gives the limits (hello timeout, heartbeat, rate limit, ids per request, token
    lifetime); ``secret`` verifies Hello tokens; ``now`` is when the connection opened.
    """

    __slots__ = ("config", "secret", "phase", "identity", "hello_deadline", "closing",
                 "_limiter", "_rejected")

    def __init__(self, config: ServerConfig, secret: bytes, now: float) -> None:
        self.config = config
        self.secret = secret
        self.phase = Phase.HELLO
        self.identity: Identity | None = None
        self.hello_deadline = now + config.hello_timeout_s
        self.closing: CloseConnection | None = None  # the first close decided wins
        self._limiter = RateLimiter(config.rate_limit_ops_per_s, config.rate_limit_burst_ops, now)
        self._rejected = 0  # rate-limited ops, less one for each allowed op

    # ------------------------------------------------------------------ frames in
    def receive(self, data: bytes | str, now: float) -> Action:
        """The action for one inbound frame (binary: ``bytes``, text: ``str``)."""
        if self.phase is Phase.CLOSED:
            assert self.closing is not None
            return self.closing
        if isinstance(data, str):
            return self.close(Close.UNSUPPORTED_DATA, "text frames are not supported")
        try:
            msg = pb.ClientMessage.FromString(data)
        except (ProtoDecodeError, ValueError) as exc:
            return self.fail(0, Code.BAD_REQUEST, f"undecodable frame: {exc}", Close.PROTOCOL_ERROR)
        if self.phase is Phase.HELLO:
            return self._hello(msg)
        return self._op(msg, now)

    def _hello(self, msg: pb.ClientMessage) -> Action:
        if msg.WhichOneof("body") != "hello":
            return self.fail(msg.request_id, Code.UNAUTHENTICATED,
                             "the first message must be Hello", Close.AUTH_FAILED)
        hello = msg.hello
        try:
            identity = verify_token(self.secret, hello.token, self.config.max_token_lifetime_s)
        except AuthError as exc:
            return self.fail(msg.request_id, Code.UNAUTHENTICATED, str(exc), Close.AUTH_FAILED)
        self.identity = identity
        return Opened(msg.request_id, identity, hello.device_id[:MAX_ID_BYTES],
                      hello.platform[:MAX_CLIENT_FIELD_CHARS],
                      hello.client_version[:MAX_CLIENT_FIELD_CHARS])

    def welcome(self, request_id: int, session_id: str) -> bytes:
        """The Welcome frame, once the caller attached the session (the session is open)."""
        identity = self.identity
        assert identity is not None and self.phase is Phase.HELLO
        self.phase = Phase.OPEN
        cfg = self.config
        return frames.welcome(request_id, identity.user_id, session_id,
                              int(cfg.heartbeat_interval_s * 1000), cfg.max_frame_bytes,
                              identity.role)

    def _op(self, msg: pb.ClientMessage, now: float) -> Action:
        identity = self.identity
        assert identity is not None
        rid = msg.request_id
        if not identity.is_service:
            if not self._limiter.allow(now):
                self._rejected += 1
                if self._rejected >= self.config.rate_limit_max_rejected:
                    return self.fail(rid, Code.RATE_LIMITED, "rate limit exceeded persistently",
                                     Close.RATE_LIMITED)
                return _refuse(rid, Code.RATE_LIMITED, "rate limit exceeded", "any")
            # An allowed op pays back one rejection (not all of them): a flood far above the
            # rate gets a token now and then, and must still reach the limit and be closed.
            if self._rejected:
                self._rejected -= 1
        kind = msg.WhichOneof("body")
        if kind is None:
            return _refuse(rid, Code.BAD_REQUEST, "message has no operation", "none")
        if kind == "hello":
            return _refuse(rid, Code.BAD_REQUEST,
                           "already authenticated: Hello is only valid first", kind)
        if rid == 0:
            return _refuse(rid, Code.BAD_REQUEST, "request_id must be non-zero", kind)
        handler = HANDLERS.get(kind)
        if handler is None:
            return _refuse(rid, Code.BAD_REQUEST, f"unknown operation {kind!r}", kind)
        op, service_only = handler
        if service_only and not identity.is_service:
            return _refuse(rid, Code.FORBIDDEN, f"{kind} requires a service token", kind)
        return RunOp(kind, rid, getattr(msg, kind), op)

    # ------------------------------------------------------------------ time
    def check_hello_timeout(self, now: float) -> CloseConnection | None:
        """Close 4002 when no Hello came by :attr:`hello_deadline`."""
        if self.phase is Phase.HELLO and now >= self.hello_deadline:
            return self.close(Close.HELLO_TIMEOUT, "no Hello within the hello timeout")
        return None

    def check_idle(self, now: float, last_rx: float, background: bool) -> CloseConnection | None:
        """Close 1000 when nothing arrived since ``last_rx`` for the idle timeout (2.5
        heartbeats; 4× that in background). WebSocket pings count as traffic."""
        cfg = self.config
        timeout = cfg.background_idle_timeout_s if background else cfg.idle_timeout_s
        if now - last_rx >= timeout:
            return self.close(Close.NORMAL, "idle timeout")
        return None

    # ------------------------------------------------------------------ closing
    def close(self, code: int, reason: str, final_frame: bytes | None = None) -> CloseConnection:
        """Decide to close (the first decision wins; later ones return it)."""
        if self.closing is None:
            self.closing = CloseConnection(code, reason, final_frame)
        self.phase = Phase.CLOSED
        return self.closing

    def fail(self, request_id: int, code: int, message: str, close_code: int) -> CloseConnection:
        """Close with ``close_code`` after an ``Error`` (``code``, ``message``) frame."""
        return self.close(close_code, message, frames.error(request_id, code, message))

    def op_error(self, op: RunOp, exc: Exception) -> Reply:
        """The reply to ``op`` that raised ``exc``: a store error or a refused request keeps its
        code; anything else is INTERNAL (and the caller logs it)."""
        if isinstance(exc, StoreError):
            return _refuse(op.request_id, store_error_code(exc), str(exc), op.kind)
        if isinstance(exc, OpRefused):
            return _refuse(op.request_id, exc.code, exc.message, op.kind)
        return _refuse(op.request_id, Code.INTERNAL, "internal error", op.kind)


def _refuse(request_id: int, code: int, message: str, kind: str) -> Reply:
    return Reply(frames.error(request_id, code, message), kind, Code.Name(code))
