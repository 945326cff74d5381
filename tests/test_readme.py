"""The README's Python example, run as written against a real server."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import trio

from tests._harness import running_server, token

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    return blocks[0]


async def test_readme_example_runs_and_prints_what_the_readme_says(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(readme_python_block())
    async with running_server() as server:
        env = {
            **os.environ,
            "SEQACTOR_URL": server.url,
            "SERVICE_TOKEN": token("backend", "service"),
            "ALICE_TOKEN": token("alice"),
        }
        result = await trio.run_process(
            [sys.executable, str(script)], env=env, capture_stdout=True, capture_stderr=True,
            check=False,
        )
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert out.splitlines() == ["team: max 3, read 0, unread 3", "total unread: 3"]
    assert "`team: max 3, read 0, unread 3`" in README.read_text()


def test_readme_docs_table_lists_every_page():
    text = README.read_text()
    pages = sorted(p.name for p in (README.parent / "docs").glob("*.md"))
    missing = [p for p in pages if f"](docs/{p})" not in text]
    assert not missing, f"README's docs table lacks {missing}"


def test_no_reference_points_outside_the_repository():
    """A reader of a clone can follow every reference: no "SPEC §" or ../shared paths."""
    root = README.parent
    files = [README, *(root / "docs").glob("*.md"), *(root / "src").rglob("*.py"),
             *(root / "src").rglob("*.pyx"), *(root / "tests").rglob("*.py"),
             *(root / "bench").rglob("*.py"), root / "proto" / "seqactor" / "v1" / "seqactor.proto"]
    offenders = []
    for f in files:
        if "_proto" in f.parts or f.name == Path(__file__).name:
            continue
        text = f.read_text(encoding="utf-8")
        for needle in ("SPEC §", "SPEC.md", "../shared"):
            if needle in text:
                offenders.append(f"{f.relative_to(root)}: {needle}")
    assert not offenders, offenders


def test_protocol_reference_covers_the_contract():
    text = (README.parent / "docs" / "protocol.md").read_text()
    for needle in ("I1", "I2", "I3", "I4", "I5", "I6", "max(read_sequence, min_sequence − 1)",
                   "4001", "4002", "4008", "4009", "1002", "1003", "1009", "1011",
                   "never replaced", "survives its conversation leaving the view", "epoch",
                   "allocate_sequences = 20", "set_min_sequence = 23", "INTERNAL = 8",
                   "10 000", "1 000 000", "65 536", "25 s", "10 s"):
        assert needle in text, needle
