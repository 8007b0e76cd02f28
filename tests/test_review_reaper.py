"""A store outage longer than a lease does not get live owners reaped."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from replistate import OperationHandle
from replistate.testing import ReplicaCluster
from tests.chaos import OutageStore


async def test_outage_reaps_live_owner() -> None:
    """After the store comes back, a peer reaps the job of a healthy owner."""
    store = OutageStore()
    cluster = ReplicaCluster(
        store=store,
        defaults={
            "lease": timedelta(seconds=0.3),
            "reap_interval": 0.05,
            "resync_interval": None,
            "write_interval": 0.01,
            "write_retry_max": 0.05,
        },
    )
    a = await cluster.add("a")
    await cluster.add("b")
    release = asyncio.Event()
    progress_accepted: list[bool] = []

    async def work(handle: OperationHandle) -> None:
        while not release.is_set():
            progress_accepted.append(await handle.update(progress=10.0))
            await asyncio.sleep(0.02)

    try:
        job = await a.operations.start_operation("gallery@m", work, job_id="job-1")
        await asyncio.sleep(0.2)
        store.down = True  # a short outage: a little longer than the lease
        await asyncio.sleep(0.4)
        store.down = False
        # Owner a is alive, its work reports progress, the store is up.
        await asyncio.sleep(0.5)
        await cluster.settle()
        assert store.rows[job].status.value not in ("failed", "cancelled"), (
            f"store: {store.rows[job].status.value} {store.rows[job].error!r}; "
            f"owner still runs the work: {job in a.operations.owned_jobs}"
        )
    finally:
        release.set()
        await cluster.stop()


async def test_owner_reaps_own_job() -> None:
    """With one replica, the owner itself ends its own healthy job as orphaned."""
    store = OutageStore()
    cluster = ReplicaCluster(
        store=store,
        defaults={
            "lease": timedelta(seconds=0.3),
            "reap_interval": 0.05,
            "resync_interval": None,
            "write_interval": 0.01,
            "write_retry_max": 0.05,
        },
    )
    a = await cluster.add("a")
    release = asyncio.Event()

    async def work(handle: OperationHandle) -> None:
        await release.wait()

    try:
        job = await a.operations.start_operation("gallery@m", work, job_id="job-1")
        await asyncio.sleep(0.2)
        store.down = True
        await asyncio.sleep(0.4)
        store.down = False
        await asyncio.sleep(0.3)
        assert job in a.operations.owned_jobs  # the work still runs on a
        status = a.operations.get_status(job)
        assert status is not None
        assert not status.terminal, status
    finally:
        release.set()
        await cluster.stop()
