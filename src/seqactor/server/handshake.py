"""The server's WebSocket upgrade handshake (RFC 6455 §4.2), as sans-IO functions over
bytes: read the request head, parse it, answer 101 or an HTTP refusal.

Why not wsproto's ``H11Handshake`` (or ``WSConnection``): measured on this machine, a full
``H11Handshake`` (request parse, accept, the ``Connection`` it hands over) costs ~86 µs and
holds ~1.7 KB until dropped, h11's request parse alone ~24 µs, and this parser plus wsproto's
``generate_accept_token`` ~2 µs. The server accepts only what it serves (``GET``, HTTP/1.1,
``Upgrade: websocket``, version 13, a 16-byte key; no extensions, no subprotocol), so the
parser is small and strict; anything else gets a plain HTTP error and the connection ends.
hypercorn (``protocol/ws_stream.py``) likewise does its own handshake and then uses a public
``wsproto.connection.Connection``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from http import HTTPStatus

import trio
from wsproto.utilities import generate_accept_token

MAX_REQUEST_HEAD_BYTES = 8_192  # request line + headers; beyond: 431
TLS_HANDSHAKE_RECORD = b"\x16"  # first byte of a TLS record carrying a ClientHello (RFC 8446 §5.1)
WEBSOCKET_VERSION = b"13"  # RFC 6455; other versions get 426 naming this one
WEBSOCKET_KEY_BYTES = 16  # Sec-WebSocket-Key decodes to this many bytes
_SPACE_OR_TAB = frozenset(b" \t")  # (byte values: comparing ints allocates nothing)


class HandshakeRefused(Exception):
    """The upgrade request is refused with HTTP ``status`` (None: the peer went away first);
    ``message`` is the plain-text body, ``headers`` extra response headers."""

    def __init__(
        self, status: int | None, message: str = "", headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(f"{status} {message}".strip())
        self.status = status
        self.message = message
        self.headers = headers


@dataclass(slots=True)
class UpgradeRequest:
    """A valid WebSocket upgrade request: its target (path and query, as sent) and key."""

    target: str
    key: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip(b" \t").lower() for t in value.split(b",")}


def parse_upgrade_request(head: bytes) -> UpgradeRequest:
    """Parse an HTTP/1.1 request head (without the final blank line) as a WebSocket upgrade.

    Raises :class:`HandshakeRefused`: 400 for a malformed request or a missing/invalid
    ``Upgrade``, ``Connection`` or ``Sec-WebSocket-Key``; 405 for a method other than GET;
    426 (with ``Sec-WebSocket-Version: 13``) for another WebSocket version.
    """
    lines = head.split(b"\r\n")
    request_line = lines[0].split(b" ")
    if len(request_line) != 3 or not request_line[1]:
        raise HandshakeRefused(400, "malformed request line")
    method, target, version = request_line
    if version != b"HTTP/1.1":
        raise HandshakeRefused(400, "a WebSocket upgrade needs HTTP/1.1")
    if method != b"GET":
        raise HandshakeRefused(405, "only GET upgrades to WebSocket", (("Allow", "GET"),))
    connection: set[bytes] = set()
    upgrade: set[bytes] = set()
    key: bytes | None = None
    ws_version: bytes | None = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name[-1] in _SPACE_OR_TAB or line[0] in _SPACE_OR_TAB:
            raise HandshakeRefused(400, "malformed header line")
        name = name.lower()
        if name == b"connection":
            connection |= _tokens(value)
        elif name == b"upgrade":
            upgrade |= _tokens(value)
        elif name == b"sec-websocket-key":
            key = value.strip(b" \t")
        elif name == b"sec-websocket-version":
            ws_version = value.strip(b" \t")
    if b"upgrade" not in connection or b"websocket" not in upgrade:
        raise HandshakeRefused(400, "not a WebSocket upgrade request")
    if ws_version != WEBSOCKET_VERSION:
        raise HandshakeRefused(
            426, "WebSocket version 13 required",
            (("Sec-WebSocket-Version", WEBSOCKET_VERSION.decode()),),
        )
    try:
        if key is None or len(base64.b64decode(key, validate=True)) != WEBSOCKET_KEY_BYTES:
            raise ValueError("key")
    except (ValueError, binascii.Error):
        raise HandshakeRefused(400, "missing or invalid Sec-WebSocket-Key") from None
    return UpgradeRequest(target.decode("latin-1"), key)


def accept_response(key: bytes) -> bytes:
    """The 101 response accepting an upgrade with ``key`` (no extension, no subprotocol)."""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + generate_accept_token(key) + b"\r\n\r\n"
    )


def refusal_response(
    status: int, message: str, headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """A complete HTTP response refusing the upgrade: ``status``, a plain-text body
    (``message`` and a newline), ``Connection: close``."""
    body = (message + "\n").encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
    return (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\n{extra}\r\n"
    ).encode() + body


async def read_request_head(stream: trio.abc.ReceiveStream) -> tuple[bytes, bytes]:
    """Read until the blank line ending the request head; returns (head without it, the bytes
    after it). Raises :class:`HandshakeRefused` (431 beyond ``MAX_REQUEST_HEAD_BYTES``, None
    when the peer closes first)."""
    buf = b""
    while True:
        data = await stream.receive_some(MAX_REQUEST_HEAD_BYTES)
        if not data:
            raise HandshakeRefused(None, "peer closed during the handshake")
        buf += data
        if buf[:1] == TLS_HANDSHAKE_RECORD:
            # A TLS ClientHello (wss:// to a plain server) never ends in a blank line: refuse
            # at once, so the client fails now instead of after the handshake timeout.
            raise HandshakeRefused(400, "TLS handshake on a plain ws:// port")
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return buf[:end], buf[end + 4:]
        if len(buf) > MAX_REQUEST_HEAD_BYTES:
            raise HandshakeRefused(431, "request head too large")
