"""seqactor: real-time conversation sequences (max / read seqs, unread) over one WebSocket."""

from __future__ import annotations

__version__ = "0.1.0"

from seqactor._backoff import Backoff  # noqa: E402
from seqactor.client import (  # noqa: E402
    Allocation,
    AuthenticationError,
    BadRequest,
    Change,
    ChangeBatch,
    ChangeStream,
    Client,
    ClientClosed,
    ClientStats,
    ConnectError,
    ConnectionLost,
    Conversation,
    ErrorCode,
    Forbidden,
    NotFound,
    RateLimited,
    ReadCounts,
    ReadCountsWatch,
    SeqactorError,
    ServerError,
    ServiceClient,
    SessionReplaced,
    SyncInfo,
    TooLarge,
    Unavailable,
)

__all__ = [
    "Allocation",
    "AuthenticationError",
    "Backoff",
    "BadRequest",
    "Change",
    "ChangeBatch",
    "ChangeStream",
    "Client",
    "ClientClosed",
    "ClientStats",
    "ConnectError",
    "ConnectionLost",
    "Conversation",
    "ErrorCode",
    "Forbidden",
    "NotFound",
    "RateLimited",
    "ReadCounts",
    "ReadCountsWatch",
    "SeqactorError",
    "ServerError",
    "ServiceClient",
    "SessionReplaced",
    "SyncInfo",
    "TooLarge",
    "Unavailable",
    "__version__",
]
