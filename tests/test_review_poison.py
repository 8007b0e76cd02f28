"""A write PostgreSQL always rejects does not hold back other writes."""

from __future__ import annotations

import asyncio
import uuid

from replistate import OperationHandle, PostgresGalleryStore
from replistate.testing import ReplicaCluster
from tests.conftest import drop_table


async def test_nul_error_blocks_later_writes(
    postgres_url: str,
) -> None:
    table = f"brk2_{uuid.uuid4().hex[:10]}"
    store = PostgresGalleryStore(postgres_url, table=table)
    cluster = ReplicaCluster(
        store=store,
        defaults={
            "resync_interval": None,
            "write_interval": 0.01,
            "write_retry_max": 0.1,
        },
    )
    try:
        a = await cluster.add("a")

        async def broken(handle: OperationHandle) -> None:
            raise RuntimeError("bad response: \x00\x01")  # e.g. a binary body

        async def fine(handle: OperationHandle) -> None:
            await handle.update(progress=50.0)

        bad = await a.operations.start_operation(
            "gallery@bad", broken, job_id="job-bad"
        )
        await asyncio.sleep(0.3)
        good = await a.operations.start_operation(
            "gallery@good", fine, job_id="job-good"
        )
        await asyncio.sleep(1.0)
        assert a.operations.get_status(good).state.value == "completed"
        row = await store.get(good)
        # The completed job reaches the store even though another job's write
        # can never be stored.
        assert row is not None
        assert row.status.value == "completed", row
        assert a.operations.get_status(bad).state.value == "failed"
    finally:
        await cluster.stop()
        await drop_table(postgres_url, table)
