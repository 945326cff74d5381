"""How the client commands (watch, send, members, readers, demo) reach a server: the --url,
--token and --secret-file flags, the token they use, and every client error as one line with a
hint (wrong path, ws/wss mismatch)."""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import trio

from seqactor import protocol as P
from seqactor.cli._args import CliError, UsageError, check_ws_url, id_arg, unwrap

DEFAULT_URL = f"ws://{P.DEFAULT_HOST}:{P.DEFAULT_PORT}{P.WS_PATH}"
CLI_SERVICE_USER = "seqactor-cli"  # sub of the service token minted from --secret-file
CLI_TOKEN_TTL_S = 3600
CLI_CONNECT_TIMEOUT_S = 10.0


def client_args(p: argparse.ArgumentParser, user: bool, minted: str | None = None) -> None:
    """--url, --token, --secret-file (and --user with ``user``); ``minted`` says which token
    --secret-file mints (default: a user token with ``user``, else a service token)."""
    minted = minted or ("a user token" if user else "a service token")
    p.add_argument("--url", type=check_ws_url, default=DEFAULT_URL,
                   help="server URL, ws://host:port/v1 or wss://host:port/v1")
    p.add_argument("--token", default=None,
                   help="a token (see `seqactor token`) (default: mint one from --secret-file)")
    p.add_argument("--secret-file", default=None, metavar="FILE",
                   help=f"the server's secret: mint {minted} instead of --token (default: none)")
    if user:
        p.add_argument("--user", default=None, type=partial(id_arg, what="--user"),
                       help="the user to mint a token for, with --secret-file (default: none)")



def read_secret_file(path_str: str) -> bytes:
    from seqactor.auth import SecretError, read_secret

    try:
        return read_secret(path_str)
    except SecretError as exc:
        raise CliError(str(exc)) from None



def client_token(args: argparse.Namespace, user: bool) -> str:
    from seqactor.auth import issue_token

    if args.token:
        return str(args.token)
    if not args.secret_file:
        need = "--token, or --user with --secret-file" if user else "--token or --secret-file"
        raise UsageError(f"no credentials: give {need}")
    if user and not args.user:
        raise UsageError("--secret-file needs --user (the user to watch)")
    secret = read_secret_file(args.secret_file)
    if user:
        return issue_token(secret, args.user, ttl_s=CLI_TOKEN_TTL_S)
    return issue_token(secret, CLI_SERVICE_USER, role="service", ttl_s=CLI_TOKEN_TTL_S)



def connect_hint(url: str, message: str) -> str:
    """What to do about a connection failure the message alone does not explain: a path other
    than /v1 (HTTP 404), wss:// to a plain server, ws:// to a TLS server."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    reason = message.rsplit(": ", 1)[-1]
    if "HTTP 404" in reason and u.path != P.WS_PATH:
        fixed = f"{u.scheme}://{u.netloc}{P.WS_PATH}"
        return f"{message}; the server's path is {P.WS_PATH}: use --url {fixed}"
    network = ("connection refused", "resolve", "unreachable", "No route")
    if any(n in reason for n in network):
        return message
    if u.scheme == "wss" and "HTTP" not in reason:
        fixed = f"ws://{u.netloc}{u.path}"
        return (f"{message.rsplit(': ', 1)[0]}: the TLS handshake failed ({reason}); if the "
                f"server runs without --tls-cert, use --url {fixed}")
    if u.scheme == "ws" and ("timed out" in reason or "closed" in reason or "handshake" in reason) \
            and "4001" not in reason:
        fixed = f"wss://{u.netloc}{u.path}"
        return f"{message}; if the server runs with --tls-cert, use --url {fixed}"
    return message



def run_client(url: str, fn: Any, *args: Any) -> None:
    """trio.run(fn, *args) with every client error turned into one line."""
    from seqactor.client import ConnectError, SeqactorError, ServerError

    try:
        trio.run(fn, *args)
    except BaseException as exc:  # noqa: BLE001 - unwrapped and re-raised below
        inner = unwrap(exc)
        if isinstance(inner, ServerError):
            name = getattr(inner.code, "name", inner.code)
            raise CliError(f"{inner.message} ({name})") from None
        if isinstance(inner, ConnectError):
            raise CliError(connect_hint(url, str(inner))) from None
        if isinstance(inner, SeqactorError):
            raise CliError(str(inner)) from None
        if inner is not exc:
            raise inner from None
        raise
