"""A placeholder write lost in a store outage is made good by status writes."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from replistate import OperationConflictError, OperationHandle
from replistate.codec import InvalidationMessage
from replistate.testing import FaultyBroker, ReplicaCluster
from tests.chaos import OutageStore

SETTINGS = {
    "lease": timedelta(seconds=0.3),
    "reap_interval": 0.05,
    "resync_interval": None,
    "write_interval": 0.01,
    "write_retry_max": 0.05,
}


async def test_outage_placeholder_loses_cache_key() -> None:
    """The cache key of a job admitted during a short outage never reaches the store."""
    store = OutageStore()
    cluster = ReplicaCluster(store=store, defaults=SETTINGS)
    a = await cluster.add("a")
    finish = asyncio.Event()

    async def work(handle: OperationHandle) -> None:
        await finish.wait()

    try:
        store.down = True
        await a.operations.start_operation("gallery@m", work, job_id="job-1")
        await asyncio.sleep(0.1)
        store.down = False
        await cluster.flush_writes()
        await asyncio.sleep(0.3)  # the store is healthy again
        c = await cluster.add("c")  # e.g. a new replica behind the balancer
        await c.resync()
        with pytest.raises(OperationConflictError):
            await c.operations.start_operation("gallery@m", work, job_id="job-2")
    finally:
        finish.set()
        await cluster.stop()


async def test_outage_backend_job_reloads_models() -> None:
    """A backend job whose row lacks its flags reloads models, not backends."""
    store = OutageStore()
    broker = FaultyBroker(seed=5)
    cluster = ReplicaCluster(broker=broker, store=store, defaults=SETTINGS)
    a = await cluster.add("a")
    c = await cluster.add("c")
    models: list[InvalidationMessage] = []
    backends: list[InvalidationMessage] = []
    c.on_models_invalidated(models.append)
    c.on_backends_invalidated(backends.append)
    finish = asyncio.Event()

    async def work(handle: OperationHandle) -> None:
        await finish.wait()

    try:
        store.down = True
        job = await a.operations.start_operation(
            "backend@cuda", work, job_id="job-1", is_backend=True, element_name="cuda"
        )
        await asyncio.sleep(0.1)
        store.down = False
        await cluster.flush_writes()
        await cluster.settle()
        cluster.bus_of(c).disconnect()  # c misses the end of the job
        finish.set()
        await asyncio.sleep(0.1)
        await cluster.flush_writes()
        cluster.bus_of(c).reconnect()  # c resyncs and replays the end
        await asyncio.sleep(0.2)
        await c.resyncer.wait_idle()
        assert c.operations.get_status(job).state.value == "completed"
        assert (len(models), len(backends)) == (0, 1)
    finally:
        finish.set()
        await cluster.stop()


async def test_outage_upgrade_runs_hook_twice() -> None:
    """The live invalidation and the resync replay differ in `op`, so both run."""
    from replistate.models import OpType

    store = OutageStore()
    broker = FaultyBroker(seed=5)
    cluster = ReplicaCluster(broker=broker, store=store, defaults=SETTINGS)
    a = await cluster.add("a")
    c = await cluster.add("c")
    models: list[InvalidationMessage] = []
    c.on_models_invalidated(models.append)
    finish = asyncio.Event()

    async def work(handle: OperationHandle) -> None:
        await finish.wait()

    try:
        store.down = True
        job = await a.operations.start_operation(
            "gallery@m", work, job_id="job-1", op_type=OpType.UPGRADE, element_name="m"
        )
        await asyncio.sleep(0.1)
        store.down = False
        await cluster.flush_writes()
        await cluster.settle()
        broker.drop("gallery.*.progress")  # c misses only the completed status
        finish.set()
        await asyncio.sleep(0.1)
        await cluster.flush_writes()
        await cluster.settle()
        broker.clear()
        assert len(models) == 1  # the live invalidation
        await c.resync()
        assert c.operations.get_status(job).state.value == "completed"
        assert [(m.element, m.op) for m in models] == [("m", OpType.UPGRADE)]
    finally:
        finish.set()
        await cluster.stop()
