"""Tokens: JWT HS256 signed with the server's secret (SPEC §4.1).

Claims: ``sub`` = user id (required), ``exp`` (required), ``role`` = ``"user"`` (default) or
``"service"``. Only HS256 is accepted (``alg: none`` and every other algorithm are refused).
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

from seqactor.config import MAX_TOKEN_LIFETIME_S
from seqactor.store._base import InvalidArgument, validate_id

ALGORITHM = "HS256"
ROLES = ("user", "service")
DEFAULT_TOKEN_TTL_S = 24 * 3600
SECRET_BYTES = 32


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
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]},
            leeway=0,
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError(f"token lacks the {exc.claim!r} claim") from None
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


def load_or_create_secret(path: str | os.PathLike[str]) -> tuple[bytes, bool]:
    """Read the secret file; create it (random, mode 0600) when missing. Returns (secret, created)."""
    p = Path(path)
    if p.exists():
        secret = p.read_bytes().strip()
        if not secret:
            raise ValueError(f"secret file {p} is empty")
        return secret, False
    p.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(SECRET_BYTES).encode("ascii")
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret + b"\n")
    return secret, True
