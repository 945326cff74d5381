"""seqactor: real-time conversation sequences (max / read seqs, unread) over one WebSocket."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
