"""docs/client.md's group read counts example, run as written against a real server, prints
what the page says it prints."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import trio

from tests._harness import running_server, token

CLIENT_MD = Path(__file__).resolve().parent.parent / "docs" / "client.md"


def section() -> str:
    text = CLIENT_MD.read_text()
    return text[text.index("## Group read counts"):]


async def test_client_md_read_counts_example_prints_what_it_says(tmp_path):
    code = re.search(r"```python\n(.*?)```", section(), flags=re.S)
    shown = re.search(r"It prints .*?\n\n```\n(.*?)```", section(), flags=re.S)
    assert code and shown
    script = tmp_path / "readcounts_example.py"
    script.write_text(code.group(1))
    async with running_server() as server:
        env = {
            **os.environ,
            "SEQACTOR_URL": server.url,
            "SERVICE_TOKEN": token("backend", "service"),
            "BOB_TOKEN": token("bob"),
        }
        result = await trio.run_process(
            [sys.executable, str(script)], env=env, capture_stdout=True, capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert result.stdout.decode().splitlines() == shown.group(1).splitlines()
