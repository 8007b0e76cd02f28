"""Replicas on a real nats-server and a real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from replistate import (
    CancelOutcome,
    NatsBus,
    NodeProgress,
    NodeState,
    OperationHandle,
    OpState,
    OpStatus,
    OpType,
    PostgresGalleryStore,
    Replica,
    ReplicaConfig,
)
from replistate.codec import InvalidationMessage

from .conftest import drop_table, eventually

ReplicaFactory = Callable[[str], Awaitable[Replica]]


@pytest.fixture
async def make_replica(
    nats_url: str, postgres_url: str, prefix: str, table_name: str
) -> AsyncIterator[ReplicaFactory]:
    """Start replicas that share this test's subject prefix and table."""
    made: list[Replica] = []

    async def make(replica_id: str) -> Replica:
        replica = Replica(
            ReplicaConfig(
                replica_id=replica_id,
                subject_prefix=prefix,
                cache_prefix=f"{prefix}.invalidate",
            ),
            bus=NatsBus(nats_url, name=replica_id),
            store=PostgresGalleryStore(postgres_url, table=table_name),
        )
        await replica.start()
        made.append(replica)
        return replica

    yield make
    for replica in made:
        await replica.stop()
    await drop_table(postgres_url, table_name)


async def block_forever(handle: OperationHandle) -> None:
    await asyncio.Event().wait()


async def test_install_progress_and_completion(make_replica: ReplicaFactory) -> None:
    a = await make_replica("a")
    b = await make_replica("b")
    step = asyncio.Event()

    async def install(handle: OperationHandle) -> None:
        await handle.node(
            NodeProgress(
                node_id="n1", status=NodeState.DOWNLOADING, percentage=40, total="2 GB"
            )
        )
        await step.wait()

    job_id = await a.operations.start_operation(
        "gallery@model-a", install, element_name="model-a"
    )
    await eventually(
        lambda: (b.operations.get_status(job_id) or OpStatus()).progress == 40
    )

    held = b.operations.get_status(job_id)
    assert held is not None
    assert held.nodes[0].node_id == "n1"
    assert held.file_size == "2 GB"
    assert b.opcache.get("gallery@model-a") == job_id

    step.set()
    await eventually(lambda: b.opcache.get("gallery@model-a") is None)
    final = b.operations.get_status(job_id)
    assert final is not None
    assert final.state is OpState.COMPLETED
    assert a.store is not None
    row = await a.store.get(job_id)
    assert row is not None
    assert row.status is OpState.COMPLETED
    assert row.frontend_id == "a"


async def test_cancel_through_peer(make_replica: ReplicaFactory) -> None:
    a = await make_replica("a")
    b = await make_replica("b")
    job_id = await a.operations.start_operation("gallery@model-a", block_forever)
    await eventually(lambda: b.operations.get_status(job_id) is not None)

    outcome = await b.operations.cancel(job_id)

    assert outcome is CancelOutcome.ACCEPTED
    await eventually(lambda: (b.operations.get_status(job_id) or OpStatus()).cancelled)
    assert a.operations.owned_jobs == []
    assert a.store is not None
    row = await a.store.get(job_id)
    assert row is not None
    assert row.status is OpState.CANCELLED
    assert await b.operations.cancel(job_id) is CancelOutcome.TOO_LATE


async def test_late_replica_hydrates(make_replica: ReplicaFactory) -> None:
    a = await make_replica("a")

    async def stuck_at_half(handle: OperationHandle) -> None:
        await handle.update(progress=50.0, message="half", error="retrying")
        await asyncio.Event().wait()

    job_id = await a.operations.start_operation(
        "backend@llama", stuck_at_half, element_name="llama", is_backend=True
    )
    await eventually(
        lambda: (a.operations.get_status(job_id) or OpStatus()).progress == 50
    )
    assert a.operations.writer is not None
    await a.operations.writer.flush()

    c = await make_replica("c")

    held = c.operations.get_status(job_id)
    assert held is not None
    assert held.progress == 50
    assert held.message == "half"
    assert held.error == "retrying"
    assert held.gallery_element_name == "llama"
    assert c.opcache.get("backend@llama") == job_id
    assert c.opcache.is_backend("backend@llama") is True


async def test_failure_text_crosses_nats(make_replica: ReplicaFactory) -> None:
    a = await make_replica("a")
    b = await make_replica("b")

    async def fail(handle: OperationHandle) -> None:
        raise PermissionError(13, "Permission denied", "/models/m.gguf")

    job_id = await a.operations.start_operation("gallery@m", fail)

    await eventually(lambda: (b.operations.get_status(job_id) or OpStatus()).processed)
    held = b.operations.get_status(job_id)
    assert held is not None
    assert held.error == "[Errno 13] Permission denied: '/models/m.gguf'"


async def test_invalidation_crosses_nats(make_replica: ReplicaFactory) -> None:
    a = await make_replica("a")
    b = await make_replica("b")
    seen: list[InvalidationMessage] = []
    b.on_models_invalidated(seen.append)

    await a.invalidate_models("model-a", OpType.UPGRADE)

    await eventually(lambda: len(seen) == 1)
    assert seen[0].element == "model-a"
    assert seen[0].op is OpType.UPGRADE
    assert seen[0].origin == "a"
