"""Building ``ServerMessage`` frames, and raw WebSocket framing for pre-encoded pushes."""

from __future__ import annotations

import struct

from seqactor._proto import seqactor_pb2 as pb
from seqactor.protocol import now_ms


def error(request_id: int, code: int, message: str) -> bytes:
    return pb.ServerMessage(
        request_id=request_id, error=pb.Error(code=code, message=message)  # type: ignore[arg-type]
    ).SerializeToString()


def ack(request_id: int, read_sequence: int = 0) -> bytes:
    return pb.ServerMessage(
        request_id=request_id, ack=pb.Ack(read_sequence=read_sequence)
    ).SerializeToString()


def pong(request_id: int, client_time_ms: int) -> bytes:
    return pb.ServerMessage(
        request_id=request_id, pong=pb.Pong(client_time_ms=client_time_ms, server_time_ms=now_ms())
    ).SerializeToString()


def allocated(request_id: int, first: int, last: int, time_ms: int) -> bytes:
    return pb.ServerMessage(
        request_id=request_id,
        allocated=pb.Allocated(first_sequence=first, last_sequence=last, time_ms=time_ms),
    ).SerializeToString()


def go_away(reason: str, reconnect_after_ms: int) -> bytes:
    return pb.ServerMessage(
        go_away=pb.GoAway(reason=reason, reconnect_after_ms=reconnect_after_ms)
    ).SerializeToString()


def welcome(
    request_id: int, user_id: str, session_id: str, heartbeat_interval_ms: int,
    max_frame_bytes: int, role: str,
) -> bytes:
    return pb.ServerMessage(
        request_id=request_id,
        welcome=pb.Welcome(
            user_id=user_id, session_id=session_id, heartbeat_interval_ms=heartbeat_interval_ms,
            max_frame_bytes=max_frame_bytes, server_time_ms=now_ms(), role=role,
        ),
    ).SerializeToString()


def ws_binary_frame(payload: bytes) -> bytes:
    """A complete unmasked server->client WebSocket binary frame (FIN set, opcode 2)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x82, n))
    elif n < 1 << 16:
        header = b"\x82\x7e" + struct.pack(">H", n)
    else:
        header = b"\x82\x7f" + struct.pack(">Q", n)
    return header + payload
