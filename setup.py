"""Build steps that pyproject.toml cannot express: protobuf generation and the Cython kernel.

* ``proto/seqactor/v1/seqactor.proto`` is compiled with grpcio-tools' bundled protoc into
  ``src/seqactor/_proto/seqactor_pb2.py`` (+ ``.pyi``) on every build when the proto is newer.
  The generated file is never edited or committed.
* ``src/seqactor/_delta.pyx`` is cythonized into ``seqactor._delta`` (and ``_readindex.pyx``, the
  read-count kernel, into ``seqactor._readindex``). If Cython or a C compiler is
  missing the build goes on without it and ``seqactor._kernel`` falls back to ``_delta_py``.
  ``SEQACTOR_DEBUG_BUILD=1`` turns on bounds checks and line tracing for debugging.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
PROTO_DIR = ROOT / "proto"
PROTO_FILE = PROTO_DIR / "seqactor" / "v1" / "seqactor.proto"
OUT_DIR = ROOT / "src" / "seqactor" / "_proto"


def generate_proto() -> None:
    target = OUT_DIR / "seqactor_pb2.py"
    if target.exists() and target.stat().st_mtime >= PROTO_FILE.stat().st_mtime:
        return
    from grpc_tools import protoc  # build requirement

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(
            ["protoc", f"-I{PROTO_DIR}", f"--python_out={tmp}", f"--pyi_out={tmp}", str(PROTO_FILE)]
        )
        if rc != 0:
            sys.exit(f"protoc failed on {PROTO_FILE} (exit {rc})")
        for suffix in (".py", ".pyi"):
            src = Path(tmp) / "seqactor" / "v1" / f"seqactor_pb2{suffix}"
            shutil.copyfile(src, OUT_DIR / f"seqactor_pb2{suffix}")
    init = OUT_DIR / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated protobuf modules (built from proto/, never edited)."""\n')


def extensions() -> list[object]:
    if os.environ.get("SEQACTOR_NO_EXTENSIONS") == "1" and os.environ.get("SEQACTOR_BUILD_EXT") != "1":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("warning: Cython not available; building without the compiled kernel", file=sys.stderr)
        return []
    from setuptools import Extension

    debug = os.environ.get("SEQACTOR_DEBUG_BUILD") == "1"
    directives = {
        "language_level": "3",
        "boundscheck": debug,
        "wraparound": False,
        "initializedcheck": debug,
        "cdivision": True,
        "linetrace": debug,
    }
    exts = [
        Extension(
            f"seqactor.{name}",
            [f"src/seqactor/{name}.pyx"],
            extra_compile_args=["-O2"] if not debug else ["-O0", "-g"],
            define_macros=[("CYTHON_TRACE", "1")] if debug else [],
        )
        for name in ("_delta", "_readindex")
    ]
    return list(cythonize(exts, compiler_directives=directives, quiet=True))


generate_proto()
setup(ext_modules=extensions())
