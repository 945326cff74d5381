"""The Python SDK: :class:`Client` (a user's sessions: snapshot, incremental sync, pushes,
read marks, subscriptions, read counts) and :class:`ServiceClient` (an IM backend: allocate
seqs, membership). docs/client.md is the guide; every name here is also in :mod:`seqactor`."""

from seqactor.client._backoff import Backoff
from seqactor.client._changes import ChangeStream
from seqactor.client._client import Client
from seqactor.client._connection import (
    AuthenticationError,
    BadRequest,
    ClientClosed,
    ClientStats,
    ConnectError,
    ConnectionLost,
    Forbidden,
    NotFound,
    RateLimited,
    SeqactorError,
    ServerError,
    SessionReplaced,
    TooLarge,
    Unavailable,
)
from seqactor.client._readcounts import ReadCounts, ReadCountsWatch
from seqactor.client._records import Allocation, Change, ChangeBatch, Conversation, SyncInfo
from seqactor.client._service import ServiceClient
from seqactor.protocol import ErrorCode, unread_count

__all__ = [
    "Backoff",
    "Allocation",
    "AuthenticationError",
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
    "unread_count",
]
