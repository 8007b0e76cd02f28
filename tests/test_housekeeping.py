"""Leases, orphan reaping, stored cancel intents and retention."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from replistate import (
    CancelOutcome,
    InMemoryBus,
    OperationHandle,
    OpState,
    OpStatus,
    Replica,
    ReplicaConfig,
)

from .conftest import Cluster, eventually

FAST = {"lease": timedelta(seconds=0.3), "reap_interval": 0.1}


async def add(cluster: Cluster, replica_id: str, **settings: object) -> Replica:
    replica = Replica(
        ReplicaConfig(replica_id=replica_id, **{**FAST, **settings}),  # type: ignore[arg-type]
        bus=cluster.broker.connect(),
        store=cluster.store,
    )
    cluster.replicas.append(replica)
    await replica.start()
    return replica


async def block(handle: OperationHandle) -> None:
    await asyncio.Event().wait()


async def kill(replica: Replica) -> None:
    """Make a replica look dead: no lease renewals and no bus traffic."""
    await replica.housekeeper.stop()
    assert isinstance(replica.bus, InMemoryBus)
    replica.bus.disconnect()


async def test_silent_owner_keeps_its_lease(cluster: Cluster) -> None:
    """A job that reports nothing for several lease periods is not reaped."""
    a = await add(cluster, "a")
    await add(cluster, "b")

    async def quiet(handle: OperationHandle) -> None:
        # Four leases long, so the job outlives its first lease many times over.
        await asyncio.sleep(1.2)

    job_id = await a.operations.start_operation("gallery@m", quiet)
    await eventually(
        lambda: (a.operations.get_status(job_id) or OpStatus()).terminal, 5
    )

    assert a.operations.writer is not None
    await a.operations.writer.flush()

    held = a.operations.get_status(job_id)
    assert held is not None
    assert held.state is OpState.COMPLETED
    assert cluster.store.rows[job_id].status is OpState.COMPLETED


async def test_lost_owner_is_reaped(cluster: Cluster) -> None:
    a = await add(cluster, "a")
    b = await add(cluster, "b")
    c = await add(cluster, "c")
    job_id = await a.operations.start_operation("gallery@m", block)
    await eventually(lambda: cluster.store.rows.get(job_id) is not None)
    await eventually(lambda: cluster.store.rows[job_id].lease_expires_at is not None)

    await kill(a)
    await eventually(
        lambda: all(
            (r.operations.get_status(job_id) or OpStatus()).terminal for r in (b, c)
        ),
        5,
    )

    expected = (
        "owner replica a was lost: its lease expired before the operation finished"
    )
    for replica in (b, c):
        held = replica.operations.get_status(job_id)
        assert held is not None
        assert held.state is OpState.FAILED
        assert held.error == expected
    assert cluster.store.rows[job_id].status is OpState.FAILED
    assert b.housekeeper.reaped + c.housekeeper.reaped == 1


async def test_orphan_with_cancel_request_ends_cancelled(cluster: Cluster) -> None:
    a = await add(cluster, "a")
    b = await add(cluster, "b")
    job_id = await a.operations.start_operation("gallery@m", block)
    await eventually(lambda: b.opcache.get("gallery@m") == job_id)
    await eventually(lambda: cluster.store.rows[job_id].lease_expires_at is not None)
    await kill(a)

    outcome = await b.operations.cancel(job_id)
    await eventually(
        lambda: (b.operations.get_status(job_id) or OpStatus()).terminal, 5
    )

    assert outcome is CancelOutcome.ACCEPTED
    held = b.operations.get_status(job_id)
    assert held is not None
    assert held.state is OpState.CANCELLED
    assert b.opcache.get("gallery@m") is None
    assert cluster.store.rows[job_id].status is OpState.CANCELLED


async def test_cancel_found_after_reconnect(cluster: Cluster) -> None:
    """A cancel sent while the owner was disconnected runs when it is back."""
    a = await add(cluster, "a")
    b = await add(cluster, "b")
    job_id = await a.operations.start_operation("gallery@m", block)
    await eventually(lambda: b.opcache.get("gallery@m") == job_id)
    assert isinstance(a.bus, InMemoryBus)

    a.bus.disconnect()
    outcome = await b.operations.cancel(job_id)
    await asyncio.sleep(0.05)
    assert a.operations.owned_jobs == [job_id]
    a.bus.reconnect()
    await eventually(
        lambda: (b.operations.get_status(job_id) or OpStatus()).cancelled, 5
    )

    assert outcome is CancelOutcome.ACCEPTED
    assert cluster.store.rows[job_id].cancel_requested is True
    assert a.operations.owned_jobs == []


async def test_finished_jobs_leave_memory(cluster: Cluster) -> None:
    a = await add(cluster, "a", retention=0.1)

    async def done(handle: OperationHandle) -> None:
        return None

    job_id = await a.operations.start_operation("gallery@m", done)
    await eventually(lambda: (a.operations.get_status(job_id) or OpStatus()).terminal)
    await eventually(lambda: a.operations.get_status(job_id) is None, 5)

    assert [entry[0] for entry in a.operations.history] == [job_id]
    assert a.operations.history[0][1].state is OpState.COMPLETED
    fetched = await a.operations.fetch_status(job_id)
    assert fetched is not None
    assert fetched.state is OpState.COMPLETED


async def test_late_replica_drops_failure_with_peers(cluster: Cluster) -> None:
    """A replica started after a failure lists it only until its peers drop it,
    because retention counts from the failure, not from hydration."""
    a = await add(cluster, "a", retention=1.0)

    async def broken(handle: OperationHandle) -> None:
        raise RuntimeError("disk full")

    job_id = await a.operations.start_operation("gallery@m", broken)
    await eventually(lambda: (a.operations.get_status(job_id) or OpStatus()).terminal)
    await a.operations.writer.flush()
    await asyncio.sleep(0.6)
    c = await add(cluster, "c", retention=1.0)
    listed_by_late_replica = c.opcache.get_by_job(job_id) is not None
    await eventually(lambda: a.opcache.get_by_job(job_id) is None, 5)
    await asyncio.sleep(0.3)
    d = await add(cluster, "d", retention=1.0)

    assert listed_by_late_replica is True
    assert c.opcache.get_by_job(job_id) is None
    assert c.operations.get_status(job_id) is None
    assert d.opcache.get_by_job(job_id) is None
    assert d.operations.get_status(job_id) is None


async def test_history_is_bounded(cluster: Cluster) -> None:
    a = await add(cluster, "a", history_size=3)

    for index in range(5):
        await a.operations.update_status(f"job-{index}", OpStatus(processed=True))

    assert [job_id for job_id, _ in a.operations.history] == [
        "job-2",
        "job-3",
        "job-4",
    ]
