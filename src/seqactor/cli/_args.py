"""The command line's argument parsing: one-line errors, help with defaults, value checks.

Each ``*_arg`` function is an argparse ``type=``: it returns the parsed value or raises
``argparse.ArgumentTypeError`` with a message that says what is accepted. The parser turns
that into ``seqactor CMD: error: argument --flag: MESSAGE`` on one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn
from urllib.parse import urlsplit

from seqactor import protocol as P
from seqactor.protocol import MAX_SEQ

EXIT_USAGE = 2
EXIT_FAILURE = 1
MAX_PORT = 65_535
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class CliError(Exception):
    """A failure reported as one line on stderr and exit 1 (a file, port or URL that does
    not work)."""


class UsageError(CliError):
    """A usage error (a flag value that cannot work) reported as one line and exit 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line on stderr (exit 2), pointing at ``--help``."""

    def error(self, message: str) -> NoReturn:
        message = message.replace("\n", " ")
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's examples as written and appends each option's default to its help
    (``(default: off)`` for switches). Options without a default say so in their help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.required or action.default is argparse.SUPPRESS:
            return text
        if not action.option_strings and action.nargs in (None, "+"):
            return text  # positional: required by its nature
        if action.nargs == 0 and action.const is True:  # a store_true switch
            return f"{text} (default: off)"
        if action.default is None:
            return text
        return f"{text} (default: %(default)s)"





def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def port_arg(text: str, allow_zero: bool = True) -> int:
    value = _int(text)
    low = 0 if allow_zero else 1
    if not low <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"port {value} is outside {low}-{MAX_PORT}")
    return value


def positive_int(text: str, minimum: int = 1) -> int:
    value = _int(text)
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} is below the minimum of {minimum}")
    return value


def seq_arg(text: str, what: str = "seq") -> int:
    """A message seq: 1 to 2^64 - 1."""
    value = _int(text)
    if not 1 <= value <= MAX_SEQ:
        raise argparse.ArgumentTypeError(f"{what} {value} is outside 1-{MAX_SEQ}")
    return value


def count_arg(text: str) -> int:
    from seqactor.protocol import MAX_ALLOCATE_COUNT

    value = positive_int(text)
    if value > MAX_ALLOCATE_COUNT:
        raise argparse.ArgumentTypeError(
            f"{value} is above the limit of {MAX_ALLOCATE_COUNT} seqs per allocation"
        )
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be above 0")
    return value


def nonnegative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return value


def ttl_arg(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(
            f"{text} s: a token's lifetime must be above 0 (it would be expired when printed)"
        )
    if value > P.MAX_TOKEN_LIFETIME_S:
        raise argparse.ArgumentTypeError(
            f"{text} s is above the server's maximum token lifetime of "
            f"{P.MAX_TOKEN_LIFETIME_S} s (30 days): the server would refuse the token"
        )
    return value


def id_arg(text: str, what: str = "id") -> str:
    from seqactor.store._base import InvalidArgument, validate_id

    try:
        return validate_id(text, what)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def check_ws_url(text: str) -> str:
    """A URL the client can connect to: ws:// or wss://, with a host (and a valid port)."""
    try:
        u = urlsplit(text)
        u.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad URL {text!r}: {exc}") from None
    if u.scheme not in ("ws", "wss"):
        raise argparse.ArgumentTypeError(
            f"bad URL {text!r}: use ws://host:port/v1 (or wss://host:port/v1 for a TLS server)"
        )
    if not u.hostname:
        raise argparse.ArgumentTypeError(f"bad URL {text!r}: no host (ws://host:port/v1)")
    return text


def warn(command: str, message: str) -> None:
    """One warning line on stderr."""
    print(f"seqactor {command}: warning: {message}", file=sys.stderr, flush=True)


def unwrap(exc: BaseException) -> BaseException:
    """The single exception inside (nested) one-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
