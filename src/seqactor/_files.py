"""One check for every file the user names (secret, TLS certificate and key): it exists, is a
regular readable file. Each failure is one message naming the file."""

from __future__ import annotations

import os
import stat


class FileProblem(ValueError):
    """What is wrong with a named file, as one line: ``"<label> <path> is a directory ..."``."""


def check_readable_file(label: str, path: str | os.PathLike[str]) -> os.stat_result:
    """``os.stat`` of ``path`` once it is a regular file this process may read; else
    :class:`FileProblem` (missing, a directory, a FIFO or device, permission denied, or any
    other ``OSError``), its message starting with ``label`` and the path."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise FileProblem(f"{label} {p} does not exist") from None
    except OSError as exc:
        raise FileProblem(f"cannot read {label} {p}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise FileProblem(f"{label} {p} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise FileProblem(f"{label} {p} is not a regular file")
    if not os.access(p, os.R_OK):
        raise FileProblem(f"{label} {p} is not readable (permission denied)")
    return st
