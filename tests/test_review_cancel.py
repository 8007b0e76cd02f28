"""Stored cancel intents reach an owner whose cancel message was lost."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from replistate import OperationHandle
from replistate.service import CancelOutcome
from replistate.testing import FaultyBroker, ReplicaCluster


async def test_dropped_cancel_never_recovered() -> None:
    """A cancel whose message is dropped (no disconnect) leaves the job running."""
    broker = FaultyBroker(seed=3)
    cluster = ReplicaCluster(
        broker=broker,
        defaults={
            "lease": timedelta(seconds=0.3),
            "reap_interval": 0.05,
            "resync_interval": 0.2,
            "write_interval": 0.01,
        },
    )
    a = await cluster.add("a")
    b = await cluster.add("b")

    async def work(handle: OperationHandle) -> None:
        await asyncio.Event().wait()  # runs until cancelled

    try:
        job = await a.operations.start_operation("gallery@m", work, job_id="job-1")
        await cluster.settle()
        await cluster.flush_writes()
        # NATS core drops messages to a slow consumer without disconnecting it.
        broker.drop("gallery.*.cancel")
        assert await b.operations.cancel(job) is CancelOutcome.ACCEPTED
        assert cluster.store.rows[job].cancel_requested
        await cluster.settle()
        await cluster.heal()
        await asyncio.sleep(1.0)  # several periodic resyncs, renewals and reaps
        status = a.operations.get_status(job)
        assert status is not None
        assert status.state.value == "cancelled", status
    finally:
        await cluster.stop()
