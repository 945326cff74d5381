"""seqactor: real-time conversation sequences (max / read seqs, unread) over one WebSocket.

The Python SDK's names (:mod:`seqactor.client`) are importable from here: ``from seqactor
import Client, ServiceClient``.
"""


__version__ = "0.1.0"

from seqactor.client import *  # noqa: E402, F403 - the SDK is the package's public API
from seqactor.client import __all__ as _client_names  # noqa: E402

__all__ = [*_client_names, "__version__"]
