"""Tokens: JWT HS256 signed with the server's secret (docs/protocol.md, "Authentication").

Claims: ``sub`` = user id (required), ``exp`` (required), ``role`` = ``"user"`` (default) or
``"service"``. Only HS256 is accepted (``alg: none`` and every other algorithm are refused).

The secret is at least :data:`MIN_SECRET_BYTES` long (RFC 7518 §3.2 asks for a key as long as
the hash): shorter ones are refused here with one clear message rather than signed with a
warning.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from seqactor._files import FileProblem, check_readable_file
from seqactor.protocol import MAX_TOKEN_LIFETIME_S
from seqactor.store._base import InvalidArgument, validate_id

ALGORITHM = "HS256"
ROLES = ("user", "service")
DEFAULT_TOKEN_TTL_S = 24 * 3600
SECRET_BYTES = 32  # random bytes in a generated secret (written hex-encoded: 64 characters)
MIN_SECRET_BYTES = 32  # HS256 needs a key at least as long as its 256-bit hash


class SecretError(ValueError):
    """The secret (or its file) cannot be used; the message names the file and the fault."""


class AuthError(Exception):
    """The token is not acceptable; the message says why (sent to the client)."""


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    role: str  # "user" | "service"

    @property
    def is_service(self) -> bool:
        return self.role == "service"


def issue_token(
    secret: bytes, user_id: str, role: str = "user", ttl_s: float = DEFAULT_TOKEN_TTL_S,
    now: float | None = None,
) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    check_secret(secret)
    if ttl_s <= 0:
        raise ValueError(f"the token lifetime must be positive, not {ttl_s:g} s")
    validate_id(user_id, "user id")
    issued = time.time() if now is None else now
    claims: dict[str, object] = {"sub": user_id, "exp": int(issued + ttl_s), "iat": int(issued)}
    if role != "user":
        claims["role"] = role
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(
    secret: bytes, token: str, max_lifetime_s: float = MAX_TOKEN_LIFETIME_S,
    now: float | None = None,
) -> Identity:
    if not token:
        raise AuthError("missing token")
    if len(secret) < MIN_SECRET_BYTES:
        raise AuthError(f"the server's secret is shorter than {MIN_SECRET_BYTES} bytes")
    try:
        claims = _decode(token, secret)
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError(f"token lacks the {exc.claim!r} claim") from None
    except jwt.InvalidSignatureError:
        raise AuthError("invalid token: its signature does not match this server's secret") from None
    except jwt.DecodeError:
        raise AuthError(
            "invalid token: not a JWT (three base64url parts, header.claims.signature)"
        ) from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    current = time.time() if now is None else now
    exp = claims["exp"]
    if not isinstance(exp, int | float) or exp - current > max_lifetime_s:
        raise AuthError("token lifetime exceeds the server's maximum")
    sub = claims["sub"]
    try:
        user_id = validate_id(sub, "sub")
    except InvalidArgument as exc:
        raise AuthError(f"invalid sub claim: {exc}") from None
    role = claims.get("role", "user")
    if role not in ROLES:
        raise AuthError(f"unknown role {role!r}")
    return Identity(user_id=user_id, role=role)


# Three segments of unpadded base64url, as a JWT's are.
_SEGMENTS = re.compile(r"[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
_PLAIN_HEADER_KEYS = frozenset({"alg", "typ"})
_PLAIN_CLAIMS = frozenset({"sub", "exp", "iat", "role"})


def _decode(token: str, secret: bytes) -> dict[str, Any]:
    """The claims of a token PyJWT accepts (HS256 only, ``sub`` and ``exp`` required, no
    leeway); raises what ``jwt.decode`` raises.

    A session open pays for this (PyJWT: ~33 µs a token on the development machine). The
    common case — a header of ``alg`` (and ``typ: JWT``), a valid signature, claims among
    ``sub`` (a string), ``exp`` (an integer, in the future), ``iat`` (an integer, not in the
    future), ``role`` — is checked with the standard library (~9 µs); every other token goes
    to PyJWT, which accepts or refuses it and says why. So what is accepted is exactly what
    PyJWT accepts (tests/test_auth.py compares the two).
    """
    claims = _decode_plain(token, secret, time.time())
    if claims is not None:
        return claims
    decoded: dict[str, Any] = jwt.decode(
        token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]}, leeway=0,
    )
    return decoded


# Header segments already found plain (a function of the segment alone: every token of one
# issuer has the same header, so its base64 and JSON are decoded once), at most this many.
MAX_PLAIN_HEADERS = 16
_plain_headers: set[str] = set()
_hmac_key: tuple[bytes, hmac.HMAC] | None = None  # the last secret's keyed HMAC-SHA256


def _hmac_for(secret: bytes) -> hmac.HMAC:
    """HMAC-SHA256 keyed with ``secret``, before any message (copied per token: the key's
    padding is hashed once, not per token)."""
    global _hmac_key
    if _hmac_key is None or _hmac_key[0] != secret:
        _hmac_key = (secret, hmac.new(secret, digestmod=hashlib.sha256))
    return _hmac_key[1]


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


_raw_decode = json.JSONDecoder().raw_decode


def _json_text(data: bytes) -> Any:
    """The JSON value ``data`` (UTF-8) holds and nothing else; ValueError otherwise (also for
    what ``json.loads`` would take but a plain token never has: other encodings, a BOM,
    surrounding whitespace). ~1.5 µs less than ``json.loads`` on bytes."""
    text = data.decode()
    value, end = _raw_decode(text)
    if end != len(text):
        raise ValueError("data after the JSON value")
    return value


def _decode_plain(token: str, secret: bytes, now: float) -> dict[str, Any] | None:
    """The claims of a plain valid token, or None: anything else (left to PyJWT)."""
    if b"-----BEGIN" in secret or secret.startswith(b"ssh-"):
        return None  # PyJWT refuses asymmetric-looking keys as HMAC secrets: let it say so
    if _SEGMENTS.fullmatch(token) is None:
        return None
    head, body, sig = token.split(".")
    if head not in _plain_headers:
        try:
            header = json.loads(_b64decode(head))
        except (ValueError, binascii.Error):  # (JSON and UTF-8 errors are ValueErrors)
            return None
        if (
            type(header) is not dict or header.get("alg") != ALGORITHM
            or header.get("typ", "JWT") != "JWT" or not header.keys() <= _PLAIN_HEADER_KEYS
        ):
            return None
        if len(_plain_headers) < MAX_PLAIN_HEADERS:
            _plain_headers.add(head)
    try:
        claims = _json_text(_b64decode(body))
        signature = _b64decode(sig)
    except (ValueError, binascii.Error):
        return None
    mac = _hmac_for(secret).copy()
    mac.update(f"{head}.{body}".encode("ascii"))
    if not hmac.compare_digest(mac.digest(), signature):
        return None
    if type(claims) is not dict or not claims.keys() <= _PLAIN_CLAIMS:
        return None
    sub, exp, iat = claims.get("sub"), claims.get("exp"), claims.get("iat", 0)
    if type(sub) is not str or type(exp) is not int or type(iat) is not int:
        return None
    if exp <= now or iat > now:
        return None
    return claims


def check_secret(secret: bytes, where: str = "the secret") -> bytes:
    """``secret`` if it is long enough to sign with, else :class:`SecretError`."""
    if not secret:
        raise SecretError(f"{where} is empty")
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretError(
            f"{where} is {len(secret)} bytes; at least {MIN_SECRET_BYTES} are needed "
            "(delete it and let `seqactor serve` create one, or write 64 random hex characters)"
        )
    return secret


def read_secret(path: str | os.PathLike[str]) -> bytes:
    """The secret in ``path`` (surrounding whitespace stripped), or one clear
    :class:`SecretError` naming the file: missing, a directory, not a regular file (a FIFO, a
    device), unreadable, empty or too short."""
    p = Path(path)
    try:
        check_readable_file("secret file", p)
    except FileProblem as exc:
        raise SecretError(str(exc)) from None
    try:
        secret = p.read_bytes().strip()
    except OSError as exc:
        raise SecretError(f"cannot read secret file {p}: {exc.strerror or exc}") from None
    return check_secret(secret, f"secret file {p}")


def secret_file_warning(path: str | os.PathLike[str]) -> str | None:
    """A one-line warning when group or others may read the secret file, else None."""
    p = Path(path)
    try:
        mode = stat.S_IMODE(p.stat().st_mode)
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (f"secret file {p} is readable by group or others (mode {mode:04o}); "
                f"anyone who reads it can sign tokens: chmod 600 {p}")
    return None


def load_or_create_secret(path: str | os.PathLike[str]) -> tuple[bytes, bool]:
    """Read the secret file (see :func:`read_secret`); create it (random, mode 0600) when
    missing. Returns (secret, created)."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        return read_secret(p), False
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_hex(SECRET_BYTES).encode("ascii")
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secret + b"\n")
    except OSError as exc:
        raise SecretError(f"cannot create secret file {p}: {exc.strerror or exc}") from None
    return secret, True
