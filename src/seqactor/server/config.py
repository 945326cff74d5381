"""Server settings. Every default is a named constant with its unit; the protocol's limits
(docs/protocol.md, "Limits") start from :mod:`seqactor.protocol`'s."""

from __future__ import annotations

from dataclasses import dataclass

from seqactor.protocol import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    HEARTBEAT_INTERVAL_S,
    HELLO_TIMEOUT_S,
    MAX_CONVERSATION_MEMBERS,
    MAX_FRAME_BYTES,
    MAX_IDS_PER_REQUEST,
    MAX_READ_COUNT_RANGE,
    MAX_READ_COUNT_WATCHES,
    MAX_TOKEN_LIFETIME_S,
    MAX_VIEW_CONVERSATIONS,
    READ_COUNTS_INTERVAL_MS,
)

DEFAULT_STORE_URL = "sqlite:///var/seqactor.db"

IDLE_TIMEOUT_FACTOR = 2.5  # a session silent for 2.5 x heartbeat interval is closed
BACKGROUND_IDLE_FACTOR = 4.0  # ... and 4x that while in background
RATE_LIMIT_OPS_PER_S = 200.0  # per user session; service sessions (backends) are not limited
RATE_LIMIT_BURST_OPS = 200  # bucket size
RATE_LIMIT_MAX_REJECTED = 100  # rejected ops in a row before close 4008
SHUTDOWN_GRACE_S = 5.0  # open sessions get this long to take GoAway and close
GOAWAY_RECONNECT_AFTER_MS = 1_000
WRITE_TIMEOUT_S = 30.0  # a session whose socket takes no bytes for this long is closed
MAX_CONNECTIONS = 20_000  # per process; beyond: HTTP 503 at the handshake
REPLY_QUEUE_FRAMES = 32  # replies waiting to be written per session (reader waits beyond)
HANDSHAKE_TIMEOUT_S = 10.0  # TCP connect -> WebSocket upgrade done
# Group read counts (docs/protocol.md "Group read counts")
READ_INDEX_IDLE_S = 300.0  # a read index nobody watched or queried for this long is dropped
READ_INDEX_MAX_MEMBERS = 4_000_000  # members held in read indexes per node (LRU beyond)


@dataclass(slots=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    hello_timeout_s: float = HELLO_TIMEOUT_S
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    max_frame_bytes: int = MAX_FRAME_BYTES
    max_ids_per_request: int = MAX_IDS_PER_REQUEST
    rate_limit_ops_per_s: float = RATE_LIMIT_OPS_PER_S
    rate_limit_burst_ops: int = RATE_LIMIT_BURST_OPS
    rate_limit_max_rejected: int = RATE_LIMIT_MAX_REJECTED
    shutdown_grace_s: float = SHUTDOWN_GRACE_S
    goaway_reconnect_after_ms: int = GOAWAY_RECONNECT_AFTER_MS
    write_timeout_s: float = WRITE_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS
    max_token_lifetime_s: float = MAX_TOKEN_LIFETIME_S
    reply_queue_frames: int = REPLY_QUEUE_FRAMES
    max_view_conversations: int = MAX_VIEW_CONVERSATIONS
    max_conversation_members: int = MAX_CONVERSATION_MEMBERS
    read_counts_interval_ms: int = READ_COUNTS_INTERVAL_MS
    max_read_count_range: int = MAX_READ_COUNT_RANGE
    max_read_count_watches: int = MAX_READ_COUNT_WATCHES
    read_index_idle_s: float = READ_INDEX_IDLE_S
    read_index_max_members: int = READ_INDEX_MAX_MEMBERS
    metrics_port: int | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # Idle user sessions on plain TCP hold no task: their sockets wait in one epoll set
    # (Linux; server/parking.py). False: every connection keeps its task (as elsewhere).
    park_idle_sessions: bool = True
    reuse_port: bool = False  # a worker of `serve --workers N`: share the port (SO_REUSEPORT)

    @property
    def idle_timeout_s(self) -> float:
        return self.heartbeat_interval_s * IDLE_TIMEOUT_FACTOR

    @property
    def background_idle_timeout_s(self) -> float:
        return self.idle_timeout_s * BACKGROUND_IDLE_FACTOR
