"""Terminal states the store decided during outages reach every replica."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from replistate import OperationHandle
from replistate.testing import FaultyBroker, ReplicaCluster
from tests.chaos import OutageStore

SETTINGS = {
    "lease": timedelta(seconds=0.3),
    "reap_interval": 3600.0,  # reaps are run by hand
    "resync_interval": None,
    "write_interval": 0.01,
    "write_retry_max": 0.05,
}


async def wait_for(condition, seconds: float = 2.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - the state has no event to wait on
            await asyncio.sleep(0.01)


async def test_resync_keeps_overruled_terminal_state() -> None:
    """A replica showing `completed` while the store has `failed` is healed."""
    store = OutageStore()
    broker = FaultyBroker(seed=1)
    cluster = ReplicaCluster(broker=broker, store=store, defaults=SETTINGS)
    a = await cluster.add("a")
    b = await cluster.add("b")
    c = await cluster.add("c")
    release = asyncio.Event()

    async def work(handle: OperationHandle) -> None:
        await release.wait()

    try:
        job = await a.operations.start_operation("gallery@m", work, job_id="job-1")
        await cluster.settle()
        await cluster.flush_writes()
        await asyncio.sleep(0.15)
        # The store is away for longer than the lease: a cannot renew it.
        store.down = True
        await asyncio.sleep(0.5)
        store.down = False
        # b reaps first; its failure message is lost on the way to a and c.
        broker.drop("gallery.*.progress")
        assert [row.id for row in await b.housekeeper.reap()] == [job]
        await cluster.settle()
        broker.clear()
        # a's work completes while the store is briefly away again, so its
        # completion reaches c before the store rejects it.
        store.down = True
        release.set()
        await wait_for(lambda: a.operations.get_status(job).terminal)
        await cluster.settle()
        assert c.operations.get_status(job).state.value == "completed"
        # a adopts the stored failure; that message is lost too.
        broker.drop("gallery.*.progress")
        store.down = False
        await cluster.flush_writes()
        await cluster.settle()
        assert a.operations.get_status(job).state.value == "failed"

        await cluster.heal()
        assert store.rows[job].status.value == "failed"
        assert cluster.divergences() == []
    finally:
        release.set()
        await cluster.stop()


async def test_history_keeps_overruled_state() -> None:
    """`history` keeps `completed` after the replica adopts the stored `failed`."""
    store = OutageStore()
    broker = FaultyBroker(seed=1)
    cluster = ReplicaCluster(broker=broker, store=store, defaults=SETTINGS)
    a = await cluster.add("a")
    b = await cluster.add("b")
    release = asyncio.Event()

    async def work(handle: OperationHandle) -> None:
        await release.wait()

    try:
        job = await a.operations.start_operation("gallery@m", work, job_id="job-1")
        await cluster.settle()
        await cluster.flush_writes()
        await asyncio.sleep(0.15)
        store.down = True
        await asyncio.sleep(0.5)
        store.down = False
        broker.drop("gallery.*.progress")
        await b.housekeeper.reap()
        await cluster.settle()
        broker.clear()
        release.set()  # a completes; the store rejects it and a adopts `failed`
        await wait_for(lambda: job not in a.operations.owned_jobs)
        await cluster.flush_writes()
        await cluster.settle()
        assert a.operations.get_status(job).state.value == "failed"
        assert [(j, s.state.value) for j, s in a.operations.history] == [
            (job, "failed")
        ]
    finally:
        release.set()
        await cluster.stop()
