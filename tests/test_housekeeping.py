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
    """Resyncs are off, so the survivors learn of the failure only from the
    message of the replica that reaped the job."""
    quiet = {"resync_interval": None, "start_resync_delay": None}
    a = await add(cluster, "a", **quiet)
    b = await add(cluster, "b", **quiet)
    c = await add(cluster, "c", **quiet)
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


async def test_owner_lost_right_after_admission(cluster: Cluster) -> None:
    """The first lease is written at admission, so an owner lost before its
    first renewal is reaped too."""
    a = await add(cluster, "a")
    b = await add(cluster, "b")
    job_id = await a.operations.start_operation("gallery@m", block)

    await kill(a)
    await eventually(
        lambda: (b.operations.get_status(job_id) or OpStatus()).terminal, 5
    )

    held = b.operations.get_status(job_id)
    assert held is not None
    assert held.state is OpState.FAILED
    assert cluster.store.rows[job_id].status is OpState.FAILED


async def test_stored_cancel_found_before_work_starts(cluster: Cluster) -> None:
    """A cancel stored while the job is queued stops it before its work runs."""
    a = await add(cluster, "a")
    store = cluster.store
    original_renew = store.renew_leases

    async def renew_after_cancel(
        frontend_id: str, job_ids: list[str], lease: timedelta
    ) -> list[str]:
        # A peer's cancel whose message this replica missed, stored meanwhile.
        for job_id in job_ids:
            await store.request_cancel(job_id)
        return await original_renew(frontend_id, job_ids, lease)

    store.renew_leases = renew_after_cancel  # type: ignore[method-assign]
    ran: list[str] = []

    async def work(handle: OperationHandle) -> None:
        ran.append(handle.job_id)

    job_id = await a.operations.start_operation("gallery@m", work)
    await eventually(
        lambda: (a.operations.get_status(job_id) or OpStatus()).terminal, 5
    )

    assert ran == []
    held = a.operations.get_status(job_id)
    assert held is not None
    assert held.state is OpState.CANCELLED


async def test_cancel_while_queued_skips_work(cluster: Cluster) -> None:
    """A cancel on the owner while the job is still queued keeps its work from
    starting."""
    a = await add(cluster, "a")
    store = cluster.store
    original_renew = store.renew_leases
    admitting = asyncio.Event()
    release = asyncio.Event()

    async def slow_renew(
        frontend_id: str, job_ids: list[str], lease: timedelta
    ) -> list[str]:
        admitting.set()
        await release.wait()
        return await original_renew(frontend_id, job_ids, lease)

    store.renew_leases = slow_renew  # type: ignore[method-assign]
    ran: list[str] = []

    async def work(handle: OperationHandle) -> None:
        ran.append(handle.job_id)

    starting = asyncio.create_task(
        a.operations.start_operation("gallery@m", work, job_id="queued-1")
    )
    await admitting.wait()
    outcome = await a.operations.cancel("queued-1")
    release.set()
    async with asyncio.timeout(5):
        await starting
    await eventually(
        lambda: (a.operations.get_status("queued-1") or OpStatus()).terminal, 5
    )

    assert outcome is CancelOutcome.ACCEPTED
    assert ran == []
    held = a.operations.get_status("queued-1")
    assert held is not None
    assert held.state is OpState.CANCELLED


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
    """A cancel sent while the owner was disconnected runs when it is back.

    The reap period is an hour, so only the check on reconnect can find it.
    """
    a = await add(cluster, "a", reap_interval=3600)
    b = await add(cluster, "b", reap_interval=3600)
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


async def test_cancel_with_bus_down_is_stored(cluster: Cluster) -> None:
    """A cancel requested on a replica whose bus is down is accepted once its
    intent is stored, and the owner carries it out."""
    a = await add(cluster, "a")
    b = await add(cluster, "b")
    job_id = await a.operations.start_operation("gallery@m", block)
    await eventually(lambda: b.opcache.get("gallery@m") == job_id)
    assert isinstance(b.bus, InMemoryBus)

    b.bus.disconnect()
    outcome = await b.operations.cancel(job_id)
    await eventually(
        lambda: (a.operations.get_status(job_id) or OpStatus()).cancelled, 5
    )

    assert outcome is CancelOutcome.ACCEPTED
    assert cluster.store.rows[job_id].cancel_requested is True


async def test_bus_down_cancel_after_end_too_late(cluster: Cluster) -> None:
    """With its bus down, a replica still shows a job as running after it ended.
    The stored row shows that the cancel comes too late."""
    a = await add(cluster, "a")
    b = await add(cluster, "b")
    release = asyncio.Event()

    async def install(handle: OperationHandle) -> None:
        await release.wait()

    job_id = await a.operations.start_operation("gallery@m", install)
    await eventually(lambda: b.opcache.get("gallery@m") == job_id)
    assert isinstance(b.bus, InMemoryBus)
    b.bus.disconnect()
    release.set()
    await eventually(lambda: cluster.store.rows[job_id].status is OpState.COMPLETED)
    held = b.operations.get_status(job_id)

    outcome = await b.operations.cancel(job_id)

    assert held is not None
    assert held.terminal is False
    assert outcome is CancelOutcome.TOO_LATE


async def test_bus_down_cancel_waits_for_cancellable(cluster: Cluster) -> None:
    """A cancel stored while the job is briefly not cancellable is accepted, and
    the owner carries it out once the job allows it again."""
    a = await add(cluster, "a")
    b = await add(cluster, "b")
    critical = asyncio.Event()
    release = asyncio.Event()

    async def install(handle: OperationHandle) -> None:
        await handle.update(progress=10.0)
        await eventually(lambda: b.opcache.get("gallery@m") == handle.job_id)
        assert isinstance(b.bus, InMemoryBus)
        b.bus.disconnect()
        await handle.update(progress=20.0, cancellable=False)
        critical.set()
        await release.wait()
        await handle.update(progress=30.0, cancellable=True)
        await asyncio.Event().wait()

    job_id = await a.operations.start_operation("gallery@m", install)
    await critical.wait()
    assert a.operations.writer is not None
    await a.operations.writer.flush()
    outcome = await b.operations.cancel(job_id)
    release.set()
    await eventually(
        lambda: (a.operations.get_status(job_id) or OpStatus()).cancelled, 5
    )

    assert outcome is CancelOutcome.ACCEPTED
