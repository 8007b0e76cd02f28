"""The write-behind of statuses: coalescing, retries and terminal races."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from replistate import InMemoryStore, OperationRecord, OpState, OpStatus, StoreError
from replistate.store.writer import StoreWriter

from .conftest import Cluster, eventually


class FlakyStore(InMemoryStore):
    """An in-memory store that counts writes and fails while `down` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.saves: list[tuple[str, int]] = []

    async def save_status(
        self, job_id: str, status: OpStatus, *, version: int, **identity: Any
    ) -> bool:
        if self.down:
            raise StoreError(f"save_status for job {job_id!r} failed: store is down")
        self.saves.append((job_id, version))
        return await super().save_status(job_id, status, version=version, **identity)


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[FlakyStore, StoreWriter]]:
    store = FlakyStore()
    writer = StoreWriter(store, interval=0.2, max_backoff=0.05)
    writer.start()
    yield store, writer
    await writer.stop(grace_period=1)


async def test_progress_writes_are_coalesced() -> None:
    """With an interval no test waits for, only the start and the end are
    written, and the end carries the latest progress."""
    store = FlakyStore()
    writer = StoreWriter(store, interval=3600, max_backoff=0.05)
    writer.start()

    writer.submit("job-1", OpStatus(progress=0), version=1, urgent=True)
    async with asyncio.timeout(5):
        await writer.flush()
    for version in range(2, 102):
        writer.submit("job-1", OpStatus(progress=version - 1), version=version)
        await asyncio.sleep(0)
    pending = writer.pending
    writer.submit("job-1", OpStatus(processed=True, progress=100), version=102)
    async with asyncio.timeout(5):
        await writer.flush()

    assert list(pending) == ["job-1"]
    assert pending["job-1"].version == 101
    assert store.saves == [("job-1", 1), ("job-1", 102)]
    assert store.rows["job-1"].status is OpState.COMPLETED
    await writer.stop(grace_period=1)


async def test_progress_written_after_interval(
    flaky: tuple[FlakyStore, StoreWriter],
) -> None:
    store, writer = flaky
    writer.submit("job-1", OpStatus(progress=10), version=1, urgent=True)
    async with asyncio.timeout(5):
        await writer.flush()

    writer.submit("job-1", OpStatus(progress=20), version=2)
    async with asyncio.timeout(5):
        await writer.flush()

    assert store.saves == [("job-1", 1), ("job-1", 2)]
    assert store.rows["job-1"].progress == 20


async def test_failed_writes_are_retried(
    flaky: tuple[FlakyStore, StoreWriter], caplog: pytest.LogCaptureFixture
) -> None:
    """A terminal status written while the store is down reaches it later."""
    store, writer = flaky
    store.down = True

    writer.submit("job-1", OpStatus(progress=40), version=1, urgent=True)
    writer.submit("job-1", OpStatus(processed=True, error="disk full"), version=2)
    await asyncio.sleep(0.2)
    assert "job-1" not in store.rows
    assert writer.failures >= 2
    store.down = False
    async with asyncio.timeout(5):
        await writer.flush()

    assert store.rows["job-1"].status is OpState.FAILED
    assert store.rows["job-1"].error == "disk full"
    assert "'job-1' not stored, will retry" in caplog.text
    assert writer.pending == {}


async def test_older_submit_never_replaces_newer(
    flaky: tuple[FlakyStore, StoreWriter],
) -> None:
    store, writer = flaky
    store.down = True

    writer.submit("job-1", OpStatus(progress=70), version=7)
    writer.submit("job-1", OpStatus(progress=30), version=3)

    assert writer.pending["job-1"].version == 7
    store.down = False


async def test_lost_terminal_race_adopts_winner(cluster: Cluster) -> None:
    """When the store already has another terminal state, every replica ends
    up showing the stored one."""
    a = await cluster.add("a")
    b = await cluster.add("b")
    await a.operations.update_status("job-1", OpStatus(progress=50))
    await cluster.settle()
    cluster.store.rows["job-1"] = OperationRecord(
        id="job-1", status=OpState.CANCELLED, version=2
    )

    await a.operations.update_status("job-1", OpStatus(processed=True))
    await cluster.settle()

    for replica in (a, b):
        held = replica.operations.get_status("job-1")
        assert held is not None
        assert held.state is OpState.CANCELLED
    assert cluster.store.rows["job-1"].status is OpState.CANCELLED


async def test_replica_status_reaches_store_through_writer(cluster: Cluster) -> None:
    a = await cluster.add("a")

    await a.operations.update_status("job-1", OpStatus(progress=5))
    await a.operations.update_status("job-1", OpStatus(processed=True))
    await cluster.settle()

    row = cluster.store.rows["job-1"]
    assert row.status is OpState.COMPLETED
    assert row.version == 2
    assert row.frontend_id == "a"


async def test_retry_wait_is_capped(
    flaky: tuple[FlakyStore, StoreWriter],
) -> None:
    """The wait between retries doubles up to `max_backoff`, and resets once the
    store takes a write."""
    store, writer = flaky
    store.down = True
    writer.max_backoff = 0.2

    writer.submit("job-1", OpStatus(processed=True), version=1)
    await eventually(lambda: writer.failures >= 6, 10)
    capped = writer.retry_wait
    store.down = False
    async with asyncio.timeout(5):
        await writer.flush()

    assert capped == 0.2
    assert writer.retry_wait == 0.0
    assert store.saves == [("job-1", 1)]
