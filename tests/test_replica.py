"""Replica lifecycle: start order, readiness, stop, configuration."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from replistate import (
    BusState,
    InMemoryBroker,
    InMemoryStore,
    NotStartedError,
    OperationHandle,
    OperationRecord,
    OpStatus,
    Replica,
    ReplicaConfig,
)
from replistate.testing import FaultyBroker

from .conftest import Cluster, eventually


class ChangingStore(InMemoryStore):
    """A store in which a peer writes a newer status right after each read of
    the active rows, as happens when a replica starts mid-operation."""

    def __init__(self) -> None:
        super().__init__()
        self.writer: Replica | None = None

    async def list_active(
        self, window: timedelta = timedelta(hours=1), *, include_failed: bool = False
    ) -> list[OperationRecord]:
        rows = await super().list_active(window, include_failed=include_failed)
        if self.writer is not None:
            await self.writer.operations.update_status(
                "job-1", OpStatus(processed=True, message="finished during start")
            )
        return rows


async def test_start_subscribes_before_hydrate() -> None:
    broker, store = InMemoryBroker(), ChangingStore()
    a = Replica(ReplicaConfig(replica_id="a"), bus=broker.connect(), store=store)
    await a.start()
    await a.operations.update_status("job-1", OpStatus(progress=40))
    b = Replica(ReplicaConfig(replica_id="b"), bus=broker.connect(), store=store)
    store.writer = a

    await b.start()
    assert b.bus is not None
    await b.bus.drain()  # type: ignore[attr-defined]

    held = b.operations.get_status("job-1")
    assert held is not None
    assert held.processed is True
    assert held.message == "finished during start"
    await a.stop()
    await b.stop()


async def test_ready_follows_hydrate_and_bus(cluster: Cluster) -> None:
    replica = await cluster.add("a", start=False)
    assert replica.ready is False

    await replica.start()
    assert replica.ready is True

    assert replica.bus is not None
    replica.bus._set_state(BusState.DISCONNECTED)  # type: ignore[attr-defined]
    assert replica.ready is False

    replica.bus._set_state(BusState.CONNECTED)  # type: ignore[attr-defined]
    assert replica.ready is True

    await replica.stop()
    assert replica.ready is False


async def test_not_ready_while_hydrating(cluster: Cluster) -> None:
    """A connected bus alone does not make a replica ready: it must have read
    the store first."""
    replica = await cluster.add("a", start=False)
    store = cluster.store
    original_list = store.list_active
    reading = asyncio.Event()
    release = asyncio.Event()

    async def slow_list(*args: Any, **kwargs: Any) -> list[OperationRecord]:
        reading.set()
        await release.wait()
        return await original_list(*args, **kwargs)

    store.list_active = slow_list  # type: ignore[method-assign]
    starting = asyncio.create_task(replica.start())
    await reading.wait()
    bus_connected = replica.bus is not None and replica.bus.connected
    ready_while_reading = replica.ready
    release.set()
    async with asyncio.timeout(5):
        await starting

    assert bus_connected is True
    assert ready_while_reading is False
    assert replica.ready is True
    await replica.stop()


async def test_start_and_stop_are_idempotent(cluster: Cluster) -> None:
    replica = await cluster.add("a")

    await replica.start()
    await replica.stop()
    await replica.stop()

    assert replica.ready is False
    assert replica.bus is not None
    assert replica.bus.connected is False


async def test_require_started_raises() -> None:
    replica = Replica(ReplicaConfig(replica_id="idle"))

    with pytest.raises(NotStartedError, match="'idle' is not started"):
        replica.require_started()


async def test_hydrate_skips_rows_outside_window() -> None:
    store = InMemoryStore()
    await store.save_status("recent", OpStatus(progress=10), version=1)
    await store.save_status("stale", OpStatus(progress=10), version=1)
    stale = store.rows["stale"]
    assert stale.updated_at is not None
    store.rows["stale"] = OperationRecord(
        id="stale", updated_at=stale.updated_at - timedelta(hours=3)
    )
    replica = Replica(ReplicaConfig(active_window=timedelta(hours=2)), store=store)

    await replica.start()

    assert set(replica.operations.statuses()) == {"recent"}
    await replica.stop()


def test_config_rejects_empty_replica_id() -> None:
    with pytest.raises(ValueError, match="replica_id"):
        ReplicaConfig(replica_id="")


def test_config_rejects_bad_prefix() -> None:
    with pytest.raises(
        ValueError, match=r"invalid prefix 'gallery\.\*': token contains '\*'"
    ):
        Replica(ReplicaConfig(subject_prefix="gallery.*"))


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("lease", timedelta(0)),
        ("lease", timedelta(microseconds=1)),
        ("reap_interval", float("nan")),
        ("reap_interval", 0.001),
        ("resync_interval", 0.0),
        ("write_interval", -1.0),
        ("retention", float("inf")),
        ("sync_wait", True),
        ("lease", 15),
        ("lease", timedelta(days=999_999_999)),
        ("reap_interval", timedelta(seconds=5)),
        ("retention", 1e300),
    ],
)
def test_config_rejects_bad_durations(setting: str, value: object) -> None:
    """A zero lease or reap interval would make a loop that spins the CPU."""
    with pytest.raises(ValueError, match=f"invalid {setting} "):
        ReplicaConfig(**{setting: value})  # type: ignore[arg-type]


def test_config_accepts_optional_durations_off() -> None:
    config = ReplicaConfig(
        resync_interval=None, start_resync_delay=None, sync_wait=None
    )

    assert config.resync_interval is None
    assert config.sync_wait is None


def test_replica_ids_are_unique_by_default() -> None:
    assert ReplicaConfig().replica_id != ReplicaConfig().replica_id


async def test_context_manager_starts_and_stops() -> None:
    async with Replica() as replica:
        assert replica.ready is True
    assert replica.ready is False


async def test_resync_after_start_finds_end_the_bus_lost() -> None:
    broker, store = FaultyBroker(seed=1), ChangingStore()
    a = Replica(ReplicaConfig(replica_id="a"), bus=broker.connect(), store=store)
    await a.start()
    await a.operations.update_status("job-1", OpStatus(progress=40))
    # The end is written while b hydrates, and its message never reaches b, as
    # when a new NATS subscription is not yet in effect.
    broker.drop("gallery.job-1.>")
    store.writer = a
    b = Replica(
        ReplicaConfig(replica_id="b", resync_interval=None, start_resync_delay=0.1),
        bus=broker.connect(),
        store=store,
    )

    await b.start()
    store.writer = None
    broker.clear()

    def ended() -> bool:
        held = b.operations.get_status("job-1")
        return held is not None and held.processed

    await eventually(ended)
    held = b.operations.get_status("job-1")
    assert held is not None
    assert held.message == "finished during start"
    await a.stop()
    await b.stop()


async def test_late_replica_shows_current_progress() -> None:
    """A replica that starts mid-operation shows the owner's latest progress,
    not the older one the coalescing store holds."""
    broker, store = InMemoryBroker(), InMemoryStore()
    config = {"write_interval": 3600.0, "start_resync_delay": None}
    a = Replica(
        ReplicaConfig(replica_id="a", **config), bus=broker.connect(), store=store
    )
    await a.start()
    release = asyncio.Event()

    async def install(handle: OperationHandle) -> None:
        for progress in (10.0, 20.0, 30.0):
            await handle.update(progress=progress)
        await release.wait()

    job_id = await a.operations.start_operation("gallery@m", install)
    await eventually(
        lambda: (a.operations.get_status(job_id) or OpStatus()).progress == 30.0
    )
    stored_progress = store.rows[job_id].progress

    b = Replica(
        ReplicaConfig(replica_id="b", **config), bus=broker.connect(), store=store
    )
    await b.start()
    shown = b.operations.get_status(job_id)
    release.set()
    await a.stop()
    await b.stop()

    assert stored_progress == 0.0
    assert shown is not None
    assert shown.progress == 30.0
    assert b.operations.version_of(job_id) == a.operations.version_of(job_id)


async def test_stop_ends_wait_for_owners() -> None:
    """A stop during start does not wait for owners that do not respond."""
    broker, store = InMemoryBroker(), InMemoryStore()
    a = Replica(ReplicaConfig(replica_id="a"), bus=broker.connect(), store=store)
    await a.start()
    job_id = await a.operations.start_operation("gallery@m", block_forever)
    assert a.operations.writer is not None
    await a.operations.writer.flush()
    assert a.bus is not None
    a.bus.disconnect()  # type: ignore[attr-defined]
    b = Replica(
        ReplicaConfig(replica_id="b", sync_wait=60.0),
        bus=broker.connect(),
        store=store,
    )

    starting = asyncio.create_task(b.start())
    await eventually(lambda: b.operations.get_status(job_id) is not None)
    await b.stop()
    async with asyncio.timeout(10):
        await starting

    assert b.ready is False
    assert b.bus is not None
    assert b.bus.connected is False
    await a.stop()


async def block_forever(handle: OperationHandle) -> None:
    await asyncio.Event().wait()


async def test_stop_while_hydrating_skips_wait() -> None:
    """A stop that arrives while the store is read does not wait for owners."""
    broker, store = InMemoryBroker(), InMemoryStore()
    a = Replica(ReplicaConfig(replica_id="a"), bus=broker.connect(), store=store)
    await a.start()
    await a.operations.start_operation("gallery@m", block_forever)
    assert a.operations.writer is not None
    await a.operations.writer.flush()
    assert a.bus is not None
    a.bus.disconnect()  # type: ignore[attr-defined]
    reading = asyncio.Event()
    release = asyncio.Event()
    original_list = store.list_active

    async def slow_list(*args: Any, **kwargs: Any) -> list[OperationRecord]:
        reading.set()
        await release.wait()
        return await original_list(*args, **kwargs)

    store.list_active = slow_list  # type: ignore[method-assign]
    b = Replica(
        ReplicaConfig(replica_id="b", sync_wait=60.0),
        bus=broker.connect(),
        store=store,
    )

    starting = asyncio.create_task(b.start())
    await reading.wait()
    await b.stop()
    release.set()
    async with asyncio.timeout(10):
        await starting

    assert b.ready is False
    store.list_active = original_list  # type: ignore[method-assign]
    await a.stop()
