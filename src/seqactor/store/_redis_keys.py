"""The Redis store's key layout, cluster hash slots and store URL (pure: no I/O).

Every key starts with the prefix (``?prefix=``, default ``sa``) and a hash tag, so every
atomic step touches one cluster slot::

    sa{<cid>}:c:<cid>     hash   mx mn tm (max, min, time) ps (row position) ac (active
                                 members) lp (position of the last change of the conversation
                                 or of one of its members)
    sa{<cid>}:m:<cid>     hash   user -> "read,pos,frozen,fmax,fmin,ftime"
    sa{<uid>}:v:<uid>     hash   the user's view index: conversation -> position it was indexed
    sa{<uid>}:t:<uid>     zset   tombstones: conversation -> position it left the view
    sa{<uid>}:h:<uid>     string tombstone horizon (tombstones at or below were pruned)
    sa{meta}:epoch :pos :pt      epoch, position counter, time the last position was handed out
    sa{<slot tag>}:e      string (cluster) a copy of the epoch in every one of the 16384 slots

Sequences (``mx mn read fmax fmin``) are decimal strings of uint64 values. ``{``/``}`` in ids
are replaced in the tag only. Changes are PUBLISHed on ``<prefix>:ev:<db>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

import fastcrc

from seqactor.store._base import InvalidArgument

DEFAULT_PREFIX = "sa"
DEFAULT_PORT = 6379
CLUSTER_SLOTS = 16384
MAX_WAIT_REPLICAS = 16  # ``?wait_replicas=N``: at most this many replicas per acknowledgement
DEFAULT_WAIT_TIMEOUT_MS = 1000  # ``?wait_timeout_ms=``: how long a write waits for its replicas


def hash_slot(key: bytes) -> int:
    """The Redis Cluster slot of ``key`` (0..16383): CRC16/XMODEM of the key, or of its hash
    tag — the bytes between the first ``{`` and the next ``}`` when that is not empty — modulo
    16384 (the Redis Cluster specification, "Keys distribution model"; checked against
    ``CLUSTER KEYSLOT`` in tests/test_redis_parts.py)."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return int(fastcrc.crc16.xmodem(key)) % CLUSTER_SLOTS


_slot_tags: list[str] | None = None


def slot_tags() -> list[str]:
    """For every cluster slot (index), a short string whose hash slot it is (computed once)."""
    global _slot_tags
    if _slot_tags is None:
        tags: list[str | None] = [None] * CLUSTER_SLOTS
        left = CLUSTER_SLOTS
        i = 0
        while left:
            s = str(i)
            slot = hash_slot(s.encode())
            if tags[slot] is None:
                tags[slot] = s
                left -= 1
            i += 1
        _slot_tags = [t for t in tags if t is not None]
    return _slot_tags


def _tag(value: str) -> str:
    return value.replace("{", "(").replace("}", ")")


class KeyLayout:
    """The key names for one prefix; ``cluster`` adds the per-slot epoch copies."""

    def __init__(self, prefix: str, cluster: bool, db: int = 0) -> None:
        self.prefix = prefix
        self.cluster = cluster
        self.channel = f"{prefix}:ev:{db}".encode()
        self.epoch = f"{prefix}{{meta}}:epoch"
        self.epoch_init = f"{prefix}{{meta}}:epoch_init"
        self.pos = f"{prefix}{{meta}}:pos"
        self.pos_time = f"{prefix}{{meta}}:pt"

    def conv_key(self, cid: str) -> str:
        return f"{self.prefix}{{{_tag(cid)}}}:c:{cid}"

    def members_key(self, cid: str) -> str:
        return f"{self.prefix}{{{_tag(cid)}}}:m:{cid}"

    def view_key(self, uid: str) -> str:
        return f"{self.prefix}{{{_tag(uid)}}}:v:{uid}"

    def tomb_key(self, uid: str) -> str:
        return f"{self.prefix}{{{_tag(uid)}}}:t:{uid}"

    def horizon_key(self, uid: str) -> str:
        return f"{self.prefix}{{{_tag(uid)}}}:h:{uid}"

    def slot_epoch_key(self, key: str) -> str:
        """The epoch key in ``key``'s slot (cluster) or the one epoch key (standalone)."""
        if not self.cluster:
            return self.epoch
        return f"{self.prefix}{{{slot_tags()[hash_slot(key.encode())]}}}:e"

    def all_slot_epoch_keys(self) -> list[str]:
        return [f"{self.prefix}{{{t}}}:e" for t in slot_tags()]

    def base_keys(self, cid: str) -> list[str]:
        """KEYS of an OP script call on ``cid``: slot epoch, position counter (standalone) or
        the slot epoch again (cluster), conversation hash, members hash."""
        ck = self.conv_key(cid)
        ek = self.slot_epoch_key(ck)
        return [ek, self.pos if not self.cluster else ek, ck, self.members_key(cid)]

    def user_keys(self, uid: str) -> list[str]:
        """The three per-user KEYS of a standalone membership op: view, tombstones, horizon."""
        return [self.view_key(uid), self.tomb_key(uid), self.horizon_key(uid)]


@dataclass(frozen=True, slots=True)
class RedisURL:
    """A parsed store URL (see :func:`parse_url`)."""

    cluster: bool
    nodes: list[tuple[str, int]]
    db: int
    prefix: str
    username: str | None
    password: str | None
    op_deadline_s: float | None = None
    gap_timeout_s: float | None = None
    wait_replicas: int = 0
    wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS

    def __getitem__(self, name: str) -> Any:  # cfg["nodes"]: the older dict interface
        return getattr(self, name)


def _query_number(q: dict[str, str], name: str, lo: float, hi: float) -> float | None:
    if name not in q:
        return None
    try:
        value = float(q[name])
    except ValueError:
        raise InvalidArgument(f"{name} must be a number, not {q[name]!r}") from None
    if not lo <= value <= hi:
        raise InvalidArgument(f"{name} must be between {lo:g} and {hi:g}, not {q[name]}")
    return value


def parse_url(url: str) -> RedisURL:
    """``redis://[user:pass@]host:port/db?prefix=P`` or ``redis+cluster://h:p,h:p?prefix=P``.

    Query options: ``prefix`` (default ``sa``), ``op_deadline_ms``, ``gap_timeout_ms``,
    ``wait_replicas`` (0..16: acknowledge a write only after that many replicas have it),
    ``wait_timeout_ms`` (how long to wait for them; default 1000). Raises InvalidArgument
    naming the bad part.
    """
    cluster = url.startswith("redis+cluster://")
    if not cluster and not url.startswith("redis://"):
        raise InvalidArgument(f"not a redis store URL: {url!r}")
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        cred, netloc = netloc.rsplit("@", 1)
        user, sep, pw = cred.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if sep else unquote(user)
        if not sep:
            username = None
    nodes: list[tuple[str, int]] = []
    for part in netloc.split(","):
        if not part:
            continue
        host, _, port = part.rpartition(":")
        if not host:
            host, port = port, str(DEFAULT_PORT)
        try:
            nodes.append((host.strip("[]"), int(port)))
        except ValueError:
            raise InvalidArgument(f"bad host:port {part!r} in store URL") from None
    if not nodes:
        nodes = [("127.0.0.1", DEFAULT_PORT)]
    db = 0
    if path.strip("/"):
        try:
            db = int(path.strip("/"))
        except ValueError:
            raise InvalidArgument(f"bad database number {path!r} in store URL") from None
    if cluster and db:
        raise InvalidArgument("Redis Cluster has only database 0")
    if not cluster and len(nodes) > 1:
        raise InvalidArgument("several hosts: use redis+cluster://")
    q = {k: v[-1] for k, v in parse_qs(query).items()}
    prefix = q.get("prefix", DEFAULT_PREFIX)
    if not prefix or "{" in prefix or "}" in prefix or not prefix.isprintable():
        raise InvalidArgument(
            "the key prefix must be non-empty, without braces or control characters")
    op_deadline_ms = _query_number(q, "op_deadline_ms", 1, 60_000)
    gap_timeout_ms = _query_number(q, "gap_timeout_ms", 1, 600_000)
    wait_replicas = _query_number(q, "wait_replicas", 0, MAX_WAIT_REPLICAS)
    wait_timeout_ms = _query_number(q, "wait_timeout_ms", 1, 60_000)
    if wait_replicas is not None and wait_replicas != int(wait_replicas):
        raise InvalidArgument("wait_replicas must be a whole number")
    return RedisURL(
        cluster=cluster, nodes=nodes, db=db, prefix=prefix,
        username=username, password=password,
        op_deadline_s=None if op_deadline_ms is None else op_deadline_ms / 1000,
        gap_timeout_s=None if gap_timeout_ms is None else gap_timeout_ms / 1000,
        wait_replicas=int(wait_replicas or 0),
        wait_timeout_ms=int(wait_timeout_ms or DEFAULT_WAIT_TIMEOUT_MS),
    )
