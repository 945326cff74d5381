"""The client's on-disk cache: view + sync token in one msgpack file, written atomically.

Layout (msgpack map): ``{"format": "seqactor-client-cache", "version": 2, "user": str,
"url": str, "token": bytes, "view": {conversation_id: [max, read, min, time_ms, frozen]}}``
(``frozen``: 1 for a row left with keep_history, else 0; version 1 had no ``frozen`` and is
ignored like any other version).
A write goes to a temporary file in the same directory, is fsync'd, then renamed over the
old file, so a crash leaves either the old or the new cache, never a torn one. A file that is
missing, unreadable, corrupt or not ours loads as ``None`` (with a warning for the last two):
the client then asks for a full snapshot.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import msgpack  # type: ignore[import-untyped, unused-ignore]

log = logging.getLogger("seqactor.client")

CACHE_FORMAT = "seqactor-client-cache"
CACHE_VERSION = 2

Row = tuple[int, int, int, int, bool]  # max, read, min, time_ms, frozen


@dataclass(slots=True)
class CacheData:
    user: str
    url: str
    token: bytes
    view: dict[str, Row] = field(default_factory=dict)


def encode(data: CacheData) -> bytes:
    raw: bytes = msgpack.packb(
        {
            "format": CACHE_FORMAT, "version": CACHE_VERSION, "user": data.user,
            "url": data.url, "token": data.token,
            "view": {cid: [*row[:4], 1 if row[4] else 0] for cid, row in data.view.items()},
        },
        use_bin_type=True,
    )
    return raw


def decode(raw: bytes) -> CacheData:
    """Parse cache bytes; ``ValueError`` when they are not a valid cache of this format."""
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ValueError(f"not msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != CACHE_FORMAT:
        raise ValueError("not a seqactor client cache")
    if obj.get("version") != CACHE_VERSION:
        raise ValueError(f"cache version {obj.get('version')!r} is not {CACHE_VERSION}")
    user, url, token, view = obj.get("user"), obj.get("url"), obj.get("token"), obj.get("view")
    if not isinstance(user, str) or not isinstance(url, str) or not isinstance(token, bytes):
        raise ValueError("malformed cache header")
    if not isinstance(view, dict):
        raise ValueError("malformed cache view")
    rows: dict[str, Row] = {}
    for cid, row in view.items():
        if (
            not isinstance(cid, str) or not isinstance(row, list) or len(row) != 5
            or not all(isinstance(v, int) and v >= 0 for v in row) or row[4] not in (0, 1)
        ):
            raise ValueError("malformed cache row")
        rows[cid] = (row[0], row[1], row[2], row[3], row[4] == 1)
    return CacheData(user=user, url=url, token=token, view=rows)


def load(path: str | os.PathLike[str]) -> CacheData | None:
    p = Path(path).expanduser()  # cache_path="~/..." means the home directory
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("seqactor cache %s unreadable (%s); doing a full sync", p, exc)
        return None
    try:
        return decode(raw)
    except ValueError as exc:
        log.warning("seqactor cache %s ignored: %s; doing a full sync", p, exc)
        return None


def write_atomic(path: str | os.PathLike[str], raw: bytes) -> None:
    """Write ``raw`` to ``path`` so that readers see the old or the new file, never a mix."""
    p = Path(path).expanduser()  # cache_path="~/..." means the home directory
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
