"""Failover without reuse: a master dies (kill -9) under load while replication stalls;
Sentinel promotes the replica; the nodes follow it. With ``?wait_replicas=1`` no acknowledged
seq is handed out again (the stalled allocations are refused instead); bench/reliability.py
measures the same scenario without the option."""

from __future__ import annotations

from pathlib import Path

from tests._failover import WRITERS, run_failover


async def test_wait_replicas_no_acknowledged_seq_is_reissued_after_failover(
    tmp_path: Path,
) -> None:
    during = 20
    r = await run_failover(tmp_path, wait_replicas=1, during=during)
    assert r.reissued == 0
    # allocations sent after replication stalled were refused (WAIT timed out), not lost;
    # only those in flight at the stall (at most one per writer) could still be acknowledged
    assert r.refused >= during - WRITERS
    assert r.acknowledged >= 400  # the nodes followed the promoted replica and kept going
