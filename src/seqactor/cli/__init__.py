"""The ``seqactor`` command line (docs/cli.md): ``serve | token | watch | send | members |
readers | demo | store``. Usage errors print one line and exit 2; every other failure prints
one line naming the file, port or URL at fault and exits 1 — never a traceback."""

from seqactor.cli._args import EXIT_FAILURE, EXIT_USAGE, CliError, UsageError
from seqactor.cli._main import build_parser, main

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "CliError", "UsageError", "build_parser", "main"]
