"""The server: the accept loop and WebSocket layer (``gateway``, ``handshake``, ``ws``,
``stream``), one session per connection (``session``), the actors that own each online user's
view (``actor``, ``_view``), the hub that fans store changes out to them (``hub``), read counts
(``readcounts``), settings (``config``) and metrics (docs/architecture.md has the map)."""

from seqactor.server.config import ServerConfig
from seqactor.server.gateway import Server

__all__ = ["Server", "ServerConfig"]
