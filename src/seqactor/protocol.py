"""What the server and every client share: the WebSocket path, close codes, error codes, the
protocol's limits and their defaults, and the clock of message times.

Each value is the one docs/protocol.md names (sections "Connection", "Close codes", "Errors",
"Limits"); the server's settings (:class:`seqactor.server.config.ServerConfig`) start from
these defaults, and the SDKs read them from here.
"""

from __future__ import annotations

import enum
import time

WS_PATH = "/v1"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765

MAX_SEQ = 2**64 - 1  # seqs are uint64 (docs/protocol.md "Sequences")
MAX_ID_BYTES = 128  # user and conversation ids, UTF-8
MAX_ALLOCATE_COUNT = 10_000  # seqs per Allocate

# Limits (docs/protocol.md "Limits"): defaults of the server's settings
HELLO_TIMEOUT_S = 10.0  # a connection that sends no Hello this long is closed 4002
HEARTBEAT_INTERVAL_S = 25.0  # Welcome.heartbeat_interval_ms, until the server says otherwise
MAX_FRAME_BYTES = 65_536  # inbound frames; beyond: close 1009
MAX_IDS_PER_REQUEST = 10_000
MAX_VIEW_CONVERSATIONS = 1_000_000  # conversations in one user's view
MAX_CONVERSATION_MEMBERS = 1_000_000
MAX_TOKEN_LIFETIME_S = 30 * 24 * 3600  # tokens whose exp is further out are refused
READ_COUNTS_INTERVAL_MS = 250  # a read-count watch pushes at most once per this interval
MAX_READ_COUNT_RANGE = 1_000  # seqs per GetReadCounts / per watch push
MAX_READ_COUNT_WATCHES = 16  # WatchReadCounts per session
READERS_DEFAULT_LIMIT = 100  # GetReaders.limit = 0 means this many user ids
MAX_READERS_LIMIT = 1_000  # GetReaders.limit above this: TOO_LARGE


class Close(enum.IntEnum):
    """WebSocket close codes (docs/protocol.md "Close codes"): RFC 6455's and seqactor's 4xxx."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutdown (after GoAway)
    PROTOCOL_ERROR = 1002  # an undecodable frame, a text frame
    UNSUPPORTED_DATA = 1003
    ABNORMAL = 1006  # never sent: the connection ended without a Close frame
    TOO_BIG = 1009  # a frame above max_frame_bytes
    INTERNAL = 1011
    AUTH_FAILED = 4001  # bad or expired token (not retried)
    HELLO_TIMEOUT = 4002
    RATE_LIMITED = 4008
    REPLACED = 4009  # another user session on the same device id took over (not retried)


class ErrorCode(enum.IntEnum):
    """``seqactor.v1.Error.Code`` (docs/protocol.md "Errors")."""

    UNSPECIFIED = 0
    BAD_REQUEST = 1
    UNAUTHENTICATED = 2
    FORBIDDEN = 3
    NOT_FOUND = 4
    TOO_LARGE = 5
    RATE_LIMITED = 6
    UNAVAILABLE = 7
    INTERNAL = 8


def now_ms() -> int:
    """The wall clock in ms since the Unix epoch (``Pong.server_time_ms``, message times)."""
    return time.time_ns() // 1_000_000


def unread_count(max_sequence: int, read_sequence: int, min_sequence: int = 0) -> int:
    """Unread messages of a conversation: ``max − max(read, min − 1)``, never below 0
    (docs/protocol.md "Unread"): seqs below ``min_sequence`` were cleared and are not unread."""
    floor = read_sequence if min_sequence <= read_sequence + 1 else min_sequence - 1
    return max(0, max_sequence - floor)
