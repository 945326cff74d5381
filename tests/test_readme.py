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
