"""The Redis store's Lua scripts, loaded from ``store/lua/*.lua`` (package data).

``OP`` (``lua/op.lua`` + ``op_main.lua``) is every write on a conversation; ``OPX``
(``op.lua`` + ``xbatch.lua``) runs a cluster batch's ops of one master in one call; ``ROW``
reads one view row;
``USER`` is a cluster user-slot step of a membership change; ``SEQUENCE`` reserves positions
(cluster); ``FLOOR`` raises the position counter; ``POSINFO`` reads it with the server time;
``SLOT_EPOCHS`` writes the per-slot epoch copies of one master. Each file's header gives its
KEYS, ARGV and replies. Scripts that use the shared helpers are prefixed with ``common.lua``
(separators, exact uint64 sequence arithmetic on decimal strings, the epoch check, the member
row codec, tombstone pruning).
"""

from __future__ import annotations

from importlib.resources import files

LUA_DIR = files("seqactor.store") / "lua"


def load(name: str, common: bool = False) -> str:
    """The text of ``lua/<name>.lua`` (prefixed with ``lua/common.lua`` when ``common``).
    Raises FileNotFoundError when the package was installed without its Lua files."""
    text = (LUA_DIR / f"{name}.lua").read_text(encoding="utf-8")
    if common:
        return (LUA_DIR / "common.lua").read_text(encoding="utf-8") + "\n" + text
    return text


OP = load("op", common=True) + "\n" + load("op_main")
# Cluster: one master's share of a batch in one call (keys in ARGV, cross-slot on one master)
OPX = ("#!lua flags=allow-cross-slot-keys\n" + load("common") + "\n" + load("op") + "\n"
       + load("xbatch"))
ROW = load("row")
USER = load("user", common=True)
SEQUENCE = load("sequence", common=True)
FLOOR = load("floor")
POSINFO = load("posinfo", common=True)
SLOT_EPOCHS = load("slot_epochs")
