"""A running job that reports nothing for longer than the active window."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from replistate import OperationConflictError, OperationHandle
from replistate.store.memory import InMemoryStore
from replistate.testing import ReplicaCluster

SETTINGS = {
    "active_window": timedelta(seconds=0.5),
    "lease": timedelta(seconds=0.3),
    "reap_interval": 0.05,
    "resync_interval": None,
    "write_interval": 0.01,
    "write_retry_max": 0.05,
}


async def test_resync_forgets_silent_owned_job() -> None:
    """The owner's own resync drops a running job; its completion is then lost."""
    store = InMemoryStore()
    cluster = ReplicaCluster(store=store, defaults=SETTINGS)
    a = await cluster.add("a")
    b = await cluster.add("b")
    silent = asyncio.Event()
    finish = asyncio.Event()

    async def work(handle: OperationHandle) -> None:
        for percent in (10.0, 20.0, 30.0):
            await handle.update(progress=percent)
        silent.set()
        await finish.wait()  # a long phase without progress; the lease is renewed
        await handle.update(progress=90.0)

    try:
        job = await a.operations.start_operation("gallery@m", work, job_id="job-1")
        await silent.wait()
        await cluster.flush_writes()
        await asyncio.sleep(1.0)  # longer than the active window
        assert job in a.operations.owned_jobs
        await a.resync()  # e.g. after a bus reconnect, or the periodic one
        await b.resync()
        # The job still runs on a, so no replica may start another job on its key.
        with pytest.raises(OperationConflictError):
            await b.operations.start_operation("gallery@m", work, job_id="job-2")
    finally:
        finish.set()
        await asyncio.sleep(0.3)
        await cluster.flush_writes()
        row = store.rows.get("job-1")
        await cluster.stop()
    assert row is not None
    assert row.status.value == "completed", row


async def test_silent_job_completion_ends_failed() -> None:
    """After its owner forgot it, a silent job's completion is rejected by the store."""
    store = InMemoryStore()
    cluster = ReplicaCluster(store=store, defaults=SETTINGS)
    a = await cluster.add("a")
    silent = asyncio.Event()
    finish = asyncio.Event()

    async def work(handle: OperationHandle) -> None:
        for percent in (10.0, 20.0, 30.0):
            await handle.update(progress=percent)
        silent.set()
        await finish.wait()

    try:
        job = await a.operations.start_operation("gallery@m", work, job_id="job-1")
        await silent.wait()
        await cluster.flush_writes()
        await asyncio.sleep(1.0)  # silent for longer than the active window
        await a.resync()
        finish.set()
        await asyncio.sleep(0.5)  # the work completed; let reapers run
        await cluster.flush_writes()
        # The work returned normally, so the operation completed.
        assert store.rows[job].status.value == "completed", (
            store.rows[job].status.value,
            store.rows[job].version,
            store.rows[job].error,
        )
    finally:
        finish.set()
        await cluster.stop()
