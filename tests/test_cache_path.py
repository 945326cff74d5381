"""`Client.connect(cache_path="~/...")` as docs/client.md shows it: ``~`` is the home
directory, not a directory named ``~`` in the current one."""

from __future__ import annotations

import pytest

from seqactor import Client, ServiceClient
from tests._harness import running_server, token


async def test_cache_path_with_tilde_is_in_the_home_directory(tmp_path, monkeypatch):
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    async with running_server() as server:
        async with ServiceClient.connect(server.url, token("backend", "service")) as svc:
            await svc.add_members("c", ["alice"])
            await svc.allocate("c", 2)
        async with Client.connect(server.url, token("alice"), cache_path="~/.cache/im/seq") as c:
            assert c.view["c"].max_sequence == 2
        assert (home / ".cache" / "im" / "seq").is_file()
        assert not (work / "~").exists()
        # a restart resumes from the cache with a delta, not a snapshot
        async with Client.connect(server.url, token("alice"), cache_path="~/.cache/im/seq") as c:
            assert c.view["c"].max_sequence == 2
            assert c.last_sync is not None and c.last_sync.since_token


@pytest.mark.parametrize("path", ["~/seq", "~/deeper/dir/seq"])
def test_cache_module_expands_tilde(tmp_path, monkeypatch, path):
    from seqactor.client import _cache

    monkeypatch.setenv("HOME", str(tmp_path))
    data = _cache.CacheData(user="u", url="ws://x/v1", token=b"t",
                            view={"c": (1, 0, 0, 5, False), "f": (7, 3, 0, 9, True)})
    _cache.write_atomic(path, _cache.encode(data))
    assert (tmp_path / path.removeprefix("~/")).is_file()
    assert _cache.load(path) == data
