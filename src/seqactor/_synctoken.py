"""Sync tokens: opaque to clients; here (version, store epoch, position).

Layout: ``01`` | 16-byte epoch | position as 8-byte big-endian. A token from another epoch,
of another length or version, or from the future is not usable: the caller sends a full
snapshot instead (never an error, never a wrong delta).
"""

from __future__ import annotations

import struct

TOKEN_VERSION = 1
_LAYOUT = struct.Struct(">B16sQ")


def make_token(epoch: bytes, position: int) -> bytes:
    return _LAYOUT.pack(TOKEN_VERSION, epoch, position)


def token_position(token: bytes, epoch: bytes, current_position: int) -> int | None:
    """The position in ``token`` if it is usable against this store, else None."""
    if len(token) != _LAYOUT.size:
        return None
    version, tok_epoch, position = _LAYOUT.unpack(token)
    if version != TOKEN_VERSION or tok_epoch != epoch or position > current_position:
        return None
    return int(position)
