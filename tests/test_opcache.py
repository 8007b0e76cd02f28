"""OpCache across replicas on the in-memory bus and store."""

from __future__ import annotations

from datetime import timedelta

import pytest

from replistate import (
    InMemoryBroker,
    InMemoryBus,
    InMemoryStore,
    InvalidIdError,
    OpCacheEntry,
    OperationRecord,
    OpStatus,
    Replica,
    ReplicaConfig,
    codec,
)
from replistate.codec import OpCacheEndMessage, OpCacheStartMessage
from replistate.store.base import ACTIVE_WINDOW

from .conftest import Cluster


async def test_set_maps_key_on_peer(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")

    await a.opcache.set("gallery@model-a", "job-1")
    await cluster.settle()

    assert b.opcache.get("gallery@model-a") == "job-1"
    assert b.opcache.is_backend("gallery@model-a") is False
    assert b.opcache.get_by_job("job-1") == OpCacheEntry("gallery@model-a", "job-1")


async def test_set_backend_flags_peer(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")

    await a.opcache.set_backend("backend@llama", "job-1")
    await cluster.settle()

    assert b.opcache.get("backend@llama") == "job-1"
    assert b.opcache.is_backend("backend@llama") is True


async def test_delete_job_removes_key_everywhere(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    await a.opcache.set("gallery@model-a", "job-1")
    await cluster.settle()

    held = await a.opcache.delete_job("job-1")
    await cluster.settle()

    assert held is True
    assert "gallery@model-a" not in a.opcache
    assert "gallery@model-a" not in b.opcache
    assert b.opcache.get_by_job("job-1") is None


async def test_own_echo_leaves_one_entry(cluster: Cluster) -> None:
    a = await cluster.add("a")

    await a.opcache.set("gallery@model-a", "job-1")
    await cluster.settle()

    assert a.opcache.entries() == [OpCacheEntry("gallery@model-a", "job-1")]
    assert len(a.opcache) == 1


async def test_new_job_on_same_key_replaces(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")

    await a.opcache.set("gallery@model-a", "job-1")
    await a.opcache.set("gallery@model-a", "job-2")
    await cluster.settle()

    for replica in (a, b):
        assert replica.opcache.entries() == [OpCacheEntry("gallery@model-a", "job-2")]
        assert replica.opcache.get_by_job("job-1") is None


async def test_set_writes_placeholder(cluster: Cluster) -> None:
    a = await cluster.add("a")

    await a.opcache.set_backend("backend@llama", "job-1", element_name="llama")

    row = cluster.store.rows["job-1"]
    assert row.cache_key == "backend@llama"
    assert row.is_backend_op is True
    assert row.gallery_element_name == "llama"
    assert row.frontend_id == "a"


async def test_hydrates_active_entries_only(cluster: Cluster) -> None:
    """A new replica restores entries of active rows, backend flag included,
    and none of completed ones."""
    a = await cluster.add("a")
    await a.opcache.set("gallery@model-a", "job-active")
    await a.opcache.set_backend("backend@llama", "job-backend")
    await a.opcache.set("gallery@model-done", "job-done")
    await a.operations.update_status("job-done", OpStatus(processed=True))
    await cluster.settle()

    c = await cluster.add("c")

    assert sorted(entry.job_id for entry in c.opcache.entries()) == [
        "job-active",
        "job-backend",
    ]
    assert c.opcache.is_backend("backend@llama") is True
    assert c.opcache.is_backend("gallery@model-a") is False
    assert c.opcache.get("gallery@model-done") is None


@pytest.mark.parametrize("job_id", ["a.b", "*", ">", "with space", "", "opcache"])
async def test_set_rejects_subject_breaking_id(cluster: Cluster, job_id: str) -> None:
    a = await cluster.add("a")

    with pytest.raises(InvalidIdError) as raised:
        await a.opcache.set("gallery@model-a", job_id)

    assert raised.value.value == job_id
    assert len(a.opcache) == 0


@pytest.mark.parametrize("job_id", ["a.b", "*", ">", "with space", ""])
async def test_delete_rejects_subject_breaking_id(
    cluster: Cluster, job_id: str
) -> None:
    """No end event goes out for an id that cannot name a job."""
    a = await cluster.add("a")
    ends: list[bytes] = []

    async def record(subject: str, data: bytes) -> None:
        ends.append(data)

    listener = cluster.broker.connect()
    await listener.connect()
    await listener.subscribe(a.subjects.opcache_end, record)

    with pytest.raises(InvalidIdError) as raised:
        await a.opcache.delete_job(job_id)
    await a.opcache.delete_job("job-ok")
    await cluster.settle()
    await listener.close()

    assert raised.value.value == job_id
    assert [codec.decode(data, OpCacheEndMessage).job_id for data in ends] == ["job-ok"]


async def test_start_after_end_is_ignored(cluster: Cluster) -> None:
    """A start event delivered after the end of its job does not revive it."""
    a = await cluster.add("a")
    b = await cluster.add("b")
    await a.opcache.set("gallery@model-a", "job-1")
    await a.opcache.delete_job("job-1")
    await cluster.settle()
    late_start = OpCacheStartMessage(
        job_id="job-1", cache_key="gallery@model-a", is_backend=False, origin="x"
    )

    await b.opcache.handle_start(b.subjects.opcache_start, late_start)
    b.opcache.restore(OpCacheEntry("gallery@model-a", "job-1"))

    assert b.opcache.get("gallery@model-a") is None
    assert len(b.opcache) == 0


async def test_end_during_hydration_not_lost() -> None:
    """An end event published between the store read and the end of hydration
    removes the entry that the rows listed."""
    store = EndingStore()
    broker = InMemoryBroker()
    a = Replica(ReplicaConfig(replica_id="a"), bus=broker.connect(), store=store)
    await a.start()
    await a.opcache.set("gallery@model-a", "job-1")
    await a.operations.update_status("job-1", OpStatus(progress=10))
    assert a.operations.writer is not None
    await a.operations.writer.flush()
    store.peer = a
    b = Replica(ReplicaConfig(replica_id="b"), bus=broker.connect(), store=store)

    await b.start()
    assert isinstance(b.bus, InMemoryBus)
    await b.bus.drain()

    assert b.opcache.get("gallery@model-a") is None
    assert b.opcache.get_by_job("job-1") is None
    await a.stop()
    await b.stop()


class EndingStore(InMemoryStore):
    """A store in which a peer ends job-1 right after the active rows are read."""

    peer: Replica | None = None

    async def list_active(
        self, window: timedelta = ACTIVE_WINDOW, *, include_failed: bool = False
    ) -> list[OperationRecord]:
        rows = await super().list_active(window, include_failed=include_failed)
        if self.peer is not None:
            await self.peer.opcache.delete_job("job-1")
            assert isinstance(self.peer.bus, InMemoryBus)
            await self.peer.bus.flush()
        return rows


@pytest.mark.parametrize("job_id", ["a.b", "*", "", "x" * 5001])
async def test_peer_start_with_bad_id_dropped(
    cluster: Cluster, caplog: pytest.LogCaptureFixture, job_id: str
) -> None:
    """A start event whose job id cannot name a job neither displaces the job
    running on its cache key nor gets listed."""
    a = await cluster.add("a")
    b = await cluster.add("b")
    await a.opcache.set("gallery@m", "job-1")
    await cluster.settle()
    bus = a.bus
    assert isinstance(bus, InMemoryBus)

    hostile = OpCacheStartMessage(
        job_id=job_id, cache_key="gallery@m", is_backend=False, origin="x"
    )
    await bus.publish(a.subjects.opcache_start, codec.encode(hostile))
    await cluster.settle()

    for replica in (a, b):
        assert replica.opcache.get("gallery@m") == "job-1"
        assert replica.channel is not None
        assert replica.channel.dropped["invalid"] == 1
    assert "dropped message on subject 'gallery.opcache.start'" in caplog.text
    assert max(len(line) for line in caplog.text.splitlines()) < 1000
