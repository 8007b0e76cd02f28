"""Jobs admitted while a resync runs are kept."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from replistate import OperationConflictError, OperationHandle
from replistate.models import OperationRecord
from replistate.store.memory import InMemoryStore
from replistate.testing import ReplicaCluster


class SlowListStore(InMemoryStore):
    """An in-memory store whose `list_active` result arrives after a delay."""

    async def list_active(
        self, window: timedelta = timedelta(hours=1), *, include_failed: bool = False
    ) -> list[OperationRecord]:
        rows = await super().list_active(window, include_failed=include_failed)
        await asyncio.sleep(0.05)  # the query's round trip, as on PostgreSQL
        return rows


SETTINGS = {"resync_interval": None, "write_interval": 0.01}


async def test_peer_resync_forgets_new_job() -> None:
    cluster = ReplicaCluster(store=SlowListStore(), defaults=SETTINGS)
    a = await cluster.add("a")
    b = await cluster.add("b")
    finish = asyncio.Event()

    async def work(handle: OperationHandle) -> None:
        await finish.wait()

    try:
        resync = asyncio.create_task(b.resync())
        await asyncio.sleep(0.01)  # b's query is under way
        job = await a.operations.start_operation("gallery@m", work, job_id="job-1")
        await cluster.settle()
        await cluster.flush_writes()
        await resync
        status = b.operations.get_status(job)
        assert status is not None
        assert not status.terminal
        with pytest.raises(OperationConflictError):
            await b.operations.start_operation("gallery@m", work, job_id="job-2")
    finally:
        finish.set()
        await cluster.stop()


async def test_owner_resync_forgets_new_job() -> None:
    cluster = ReplicaCluster(store=SlowListStore(), defaults=SETTINGS)
    a = await cluster.add("a")
    finish = asyncio.Event()

    async def work(handle: OperationHandle) -> None:
        await finish.wait()

    try:
        resync = asyncio.create_task(a.resync())
        await asyncio.sleep(0.01)
        job = await a.operations.start_operation("gallery@m", work, job_id="job-1")
        await cluster.flush_writes()
        await resync
        assert job in a.operations.owned_jobs
        assert a.operations.get_status(job) is not None
        assert a.opcache.get("gallery@m") == job
    finally:
        finish.set()
        await cluster.stop()


async def test_forgotten_new_job_ends_failed() -> None:
    store = SlowListStore()
    cluster = ReplicaCluster(
        store=store,
        defaults={
            **SETTINGS,
            "lease": timedelta(seconds=0.3),
            "reap_interval": 0.05,
        },
    )
    a = await cluster.add("a")
    finish = asyncio.Event()

    async def work(handle: OperationHandle) -> None:
        await finish.wait()

    try:
        resync = asyncio.create_task(a.resync())
        await asyncio.sleep(0.01)
        job = await a.operations.start_operation("gallery@m", work, job_id="job-1")
        await cluster.flush_writes()
        await resync
        finish.set()  # the work returns normally
        await asyncio.sleep(0.8)
        await cluster.flush_writes()
        row = store.rows[job]
        assert row.status.value == "completed", (row.status.value, row.error)
    finally:
        finish.set()
        await cluster.stop()
