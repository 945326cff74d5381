"""The one place that picks the kernels: compiled ``_delta`` / ``_readindex`` or their pure-Python
twins ``_delta_py`` / ``_readindex_py``.

``SEQACTOR_NO_EXTENSIONS=1`` forces the pure-Python twin. A failed import of the compiled
module falls back with a warning. Everything else imports the kernel from here.
"""

from __future__ import annotations

import os
import warnings

NO_EXTENSIONS_ENV = "SEQACTOR_NO_EXTENSIONS"

# The compiled modules are imported first, so mypy types every name below from their stubs
# (_delta.pyi, _readindex.pyi; `make lint` checks those against the built modules). The twins
# are held to the same API and bytes by tests/test_kernel.py and tests/test_readindex.py.
COMPILED = READINDEX_COMPILED = False
if os.environ.get(NO_EXTENSIONS_ENV) != "1":
    try:
        from seqactor import _delta as _impl

        COMPILED = True
    except ImportError as exc:  # pragma: no cover - depends on the build
        warnings.warn(
            f"seqactor: compiled kernel unavailable ({exc}); using the pure-Python fallback",
            RuntimeWarning,
            stacklevel=2,
        )
# The read-count kernel (group read counts, docs/protocol.md "Group read counts"): same switch, same fallback.
if COMPILED:
    try:
        from seqactor import _readindex as _ri

        READINDEX_COMPILED = True
    except ImportError as exc:  # pragma: no cover - depends on the build
        warnings.warn(
            f"seqactor: compiled read index unavailable ({exc}); using the pure-Python fallback",
            RuntimeWarning,
            stacklevel=2,
        )
if not COMPILED:
    from seqactor import _delta_py as _impl  # type: ignore[no-redef]
if not READINDEX_COMPILED:
    from seqactor import _readindex_py as _ri  # type: ignore[no-redef]

ReadCounter = _ri.ReadCounter

KeyTable = _impl.KeyTable
ConversationSeqs = _impl.ConversationSeqs
DecodeError = _impl.DecodeError
encode_snapshot = _impl.encode_snapshot
encode_delta = _impl.encode_delta
encode_rows = _impl.encode_rows
encode_single = _impl.encode_single
frame_update = _impl.frame_update
decode_update = _impl.decode_update
split_server_message = _impl.split_server_message
write_many = _impl.write_many
FanoutSession = _impl.FanoutSession
FanoutActor = _impl.FanoutActor
fan_slice = _impl.fan_slice
route = _impl.route
settle = _impl.settle

__all__ = [
    "COMPILED",
    "ConversationSeqs",
    "DecodeError",
    "FanoutActor",
    "FanoutSession",
    "KeyTable",
    "READINDEX_COMPILED",
    "ReadCounter",
    "decode_update",
    "encode_delta",
    "encode_rows",
    "encode_single",
    "encode_snapshot",
    "fan_slice",
    "route",
    "settle",
    "frame_update",
    "split_server_message",
    "write_many",
]
