"""Retention of failed operations, and resyncs that follow it."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from replistate import OperationHandle
from replistate.testing import ReplicaCluster

SETTINGS = {
    "retention": 0.2,
    "active_window": timedelta(seconds=30),
    "reap_interval": 0.05,
    "resync_interval": None,
    "write_interval": 0.01,
}


async def test_resync_restores_pruned_failure() -> None:
    cluster = ReplicaCluster(defaults=SETTINGS)
    a = await cluster.add("a")
    b = await cluster.add("b")

    async def work(handle: OperationHandle) -> None:
        raise RuntimeError("download failed")

    try:
        job = await a.operations.start_operation("gallery@m", work, job_id="job-1")
        await asyncio.sleep(0.1)
        await cluster.settle()
        await cluster.flush_writes()
        assert b.operations.get_status(job).state.value == "failed"
        await asyncio.sleep(0.6)  # older than the retention: pruned everywhere
        assert b.operations.get_status(job) is None
        assert b.opcache.get("gallery@m") is None
        await b.resync()  # the periodic resync
        # Pruned failures stay pruned, and history lists each result once.
        assert b.opcache.get("gallery@m") is None
        assert [j for j, _ in b.operations.history] == [job]
        assert job not in b.operations.statuses()
    finally:
        await cluster.stop()
