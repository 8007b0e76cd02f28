"""Resync of a replica's mirror with the store after missed messages."""

from __future__ import annotations

import asyncio
from typing import Any

import attrs
import pytest

from replistate import (
    InMemoryBroker,
    InMemoryBus,
    InMemoryStore,
    NatsBus,
    OperationHandle,
    OperationRecord,
    OpState,
    OpStatus,
    OpType,
    PostgresGalleryStore,
    Replica,
    ReplicaConfig,
)
from replistate._servers import ThrowawayNats
from replistate.codec import InvalidationMessage, ProgressMessage, encode
from replistate.testing import FaultyBroker, ReplicaCluster

from .conftest import Cluster, drop_table, eventually, record_reloads, report_half

QUICK_PRUNE: dict[str, Any] = {
    "retention": 0.2,
    "reap_interval": 0.05,
    "start_resync_delay": None,
    "resync_interval": None,
}
"""Settings under which an ended job leaves memory within a fraction of a second
and only an explicit request resyncs."""


def bus_of(replica: Replica) -> InMemoryBus:
    assert isinstance(replica.bus, InMemoryBus)
    return replica.bus


async def wait_resynced(replica: Replica) -> None:
    assert replica.resyncer is not None
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await replica.resyncer.wait_idle()


@attrs.frozen
class MissedEnd:
    """An install that A ended while B was disconnected."""

    a: Replica
    b: Replica
    job_id: str
    reloads: list[InvalidationMessage]
    """The invalidations B's models hook received."""


async def end_install_while_away(cluster: Cluster) -> MissedEnd:
    """Start an install on A, disconnect B, then let the install complete."""
    a = await cluster.add("a")
    b = await cluster.add("b")
    reloads: list[InvalidationMessage] = []
    b.on_models_invalidated(reloads.append)
    release = asyncio.Event()

    async def install(handle: OperationHandle) -> None:
        await handle.update(progress=50.0)
        await release.wait()

    job_id = await a.operations.start_operation(
        "gallery@model-a", install, element_name="model-a"
    )
    await asyncio.sleep(0)
    await cluster.settle()
    assert b.opcache.get("gallery@model-a") == job_id

    bus_of(b).disconnect()
    release.set()
    await asyncio.sleep(0)
    await cluster.settle()
    assert a.operations.writer is not None
    await a.operations.writer.flush()
    return MissedEnd(a, b, job_id, reloads)


async def test_reconnect_resync_finishes_missed_install(cluster: Cluster) -> None:
    """An install that completed while B was disconnected ends on B as a live end
    event would: shown completed, removed from the OpCache, models reloaded."""
    missed = await end_install_while_away(cluster)
    b = missed.b
    held = b.operations.get_status(missed.job_id)
    assert held is not None
    assert held.processed is False
    assert missed.reloads == []

    bus_of(b).reconnect()
    await wait_resynced(b)

    held = b.operations.get_status(missed.job_id)
    assert held is not None
    assert held.state is OpState.COMPLETED
    assert b.opcache.get("gallery@model-a") is None
    assert [(m.element, m.op) for m in missed.reloads] == [("model-a", OpType.INSTALL)]
    assert b.ready is True


async def test_resync_runs_hooks_of_found_end(cluster: Cluster) -> None:
    """A resync of its own, with no reconnect, runs the hooks of an end it finds,
    and a reconnect afterwards does not run them again."""
    missed = await end_install_while_away(cluster)
    b = missed.b

    await b.resync()
    found = [(m.element, m.job_id) for m in missed.reloads]
    bus_of(b).reconnect()
    await wait_resynced(b)

    held = b.operations.get_status(missed.job_id)
    assert held is not None
    assert held.state is OpState.COMPLETED
    assert found == [("model-a", missed.job_id)]
    assert [(m.element, m.job_id) for m in missed.reloads] == [
        ("model-a", missed.job_id)
    ]


async def test_owner_finishes_work_while_bus_down(cluster: Cluster) -> None:
    """Work goes on while its owner's bus is down; the end reaches the store at
    once and the peers after the reconnect."""
    a = await cluster.add("a")
    b = await cluster.add("b")
    release = asyncio.Event()

    async def install(handle: OperationHandle) -> None:
        await handle.update(progress=10.0)
        await release.wait()
        await handle.update(progress=90.0)

    job_id = await a.operations.start_operation(
        "gallery@model-a", install, element_name="model-a"
    )
    await asyncio.sleep(0)
    await cluster.settle()
    bus_of(a).disconnect()
    release.set()
    await eventually(
        lambda: (a.operations.get_status(job_id) or OpStatus()).terminal, 5
    )
    assert a.operations.writer is not None
    await a.operations.writer.flush()
    stored = cluster.store.rows[job_id].status
    peer_before = b.operations.get_status(job_id)

    bus_of(a).reconnect()
    await wait_resynced(a)
    await eventually(
        lambda: (b.operations.get_status(job_id) or OpStatus()).terminal, 5
    )

    owner = a.operations.get_status(job_id)
    assert owner is not None
    assert owner.state is OpState.COMPLETED
    assert stored is OpState.COMPLETED
    assert peer_before is not None
    assert peer_before.terminal is False
    peer = b.operations.get_status(job_id)
    assert peer is not None
    assert peer.state is OpState.COMPLETED


async def test_version_gap_triggers_resync(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    await a.operations.update_status("job-1", OpStatus(progress=10))
    await cluster.settle()
    assert b.resyncer is not None
    runs_before = b.resyncer.runs

    skipped = ProgressMessage(
        job_id="job-1", status=OpStatus(progress=40), origin="a", version=4
    )
    await bus_of(a).publish(a.subjects.progress("job-1"), encode(skipped))
    await cluster.settle()
    await wait_resynced(b)

    assert b.resyncer.runs == runs_before + 1
    held = b.operations.get_status("job-1")
    assert held is not None
    assert held.progress == 40


async def test_resync_drops_jobs_gone_from_store(cluster: Cluster) -> None:
    a = await cluster.add("a")
    assert a.resyncer is not None
    a.resyncer.forget_grace = 0.0
    await a.opcache.set("gallery@model-a", "job-1")
    await a.operations.update_status("job-1", OpStatus(progress=10))
    await cluster.settle()
    del cluster.store.rows["job-1"]

    changed = await a.resync()

    assert changed == 1
    assert a.operations.get_status("job-1") is None
    assert a.opcache.get("gallery@model-a") is None


async def test_resync_keeps_failure_listed(cluster: Cluster) -> None:
    """A failure found by resync keeps its OpCache entry, so the error shows."""
    a = await cluster.add("a")
    await a.opcache.set("gallery@model-a", "job-1")
    await a.operations.update_status("job-1", OpStatus(progress=10))
    await cluster.settle()
    row = cluster.store.rows["job-1"]
    cluster.store.rows["job-1"] = attrs.evolve(
        row, status=OpState.FAILED, error="owner lost", version=row.version + 1
    )

    await a.resync()

    held = a.operations.get_status("job-1")
    assert held is not None
    assert held.error == "owner lost"
    assert held.state is OpState.FAILED
    assert a.opcache.get("gallery@model-a") == "job-1"


@pytest.mark.parametrize("stored_state", [OpState.CANCELLED, OpState.FAILED])
async def test_stored_terminal_wins_over_newer_tick(
    cluster: Cluster, stored_state: OpState
) -> None:
    """The store decides the terminal state even when the mirror saw a higher
    version of a running status."""
    a = await cluster.add("a")
    await a.operations.update_status("job-1", OpStatus(progress=10))
    await cluster.settle()
    for _ in range(5):
        await a.operations.update_status("job-1", OpStatus(progress=20))
    row = cluster.store.rows["job-1"]
    cluster.store.rows["job-1"] = attrs.evolve(
        row, status=stored_state, error="lost", version=2
    )
    assert a.operations.writer is not None
    await a.operations.writer.stop(grace_period=0)

    await a.resync()

    held = a.operations.get_status("job-1")
    assert held is not None
    assert held.state is stored_state


async def test_periodic_resync_runs() -> None:
    cluster = Cluster()
    replica = Replica(
        ReplicaConfig(replica_id="a", resync_interval=0.05),
        bus=cluster.broker.connect(),
        store=cluster.store,
    )
    await replica.start()
    assert replica.resyncer is not None

    await asyncio.sleep(0.3)

    assert replica.resyncer.runs >= 2
    await replica.stop()


async def test_nats_restart_resyncs_peer(postgres_url: str, table_name: str) -> None:
    """With real servers: a completion published while NATS was down reaches the
    peer through the store once NATS is back.

    The owner retries its connection every 0.1 s and the peer every 2 s, so the
    owner is almost always back first. It then sends what nats-py kept for it
    while the peer is still away, and only the resync brings the end to the peer.
    """
    with ThrowawayNats() as nats_server:
        replicas = [
            Replica(
                ReplicaConfig(
                    replica_id=name, resync_interval=None, start_resync_delay=None
                ),
                bus=NatsBus(nats_server.url, reconnect_wait=wait),
                store=PostgresGalleryStore(postgres_url, table=table_name),
            )
            for name, wait in (("a", 0.1), ("b", 2.0))
        ]
        a, b = replicas
        for replica in replicas:
            await replica.start()
        reloads: list[InvalidationMessage] = []
        b.on_models_invalidated(reloads.append)
        release = asyncio.Event()

        async def install(handle: OperationHandle) -> None:
            await handle.update(progress=30.0)
            await release.wait()

        try:
            job_id = await a.operations.start_operation(
                "gallery@model-a", install, element_name="model-a"
            )
            await eventually(lambda: b.opcache.get("gallery@model-a") == job_id)

            await asyncio.to_thread(nats_server.stop)
            release.set()
            await eventually(
                lambda: (
                    (a.operations.get_status(job_id) or OpStatus()).state
                    is OpState.COMPLETED
                )
            )
            assert a.operations.writer is not None
            async with asyncio.timeout(10):
                await a.operations.writer.flush()
            await asyncio.to_thread(nats_server.start)

            await eventually(lambda: b.opcache.get("gallery@model-a") is None, 20)
            # The hook may run after the entry left: they arrive on two subjects.
            await eventually(lambda: len(reloads) > 0)
            # Long enough for a replayed duplicate to arrive, were it not dropped.
            await asyncio.sleep(0.3)
            held = b.operations.get_status(job_id)
            assert held is not None
            assert held.state is OpState.COMPLETED
            assert [m.element for m in reloads] == ["model-a"]
        finally:
            for replica in replicas:
                await replica.stop()
            await drop_table(postgres_url, table_name)


async def test_resync_writes_end_the_store_missed(cluster: Cluster) -> None:
    """A replica that has seen a job end writes it to a store that still lists
    it running, and peers that missed the end receive it."""
    a = await cluster.add("a")
    b = await cluster.add("b")
    await a.operations.update_status("job-1", OpStatus(progress=10))
    await cluster.settle()
    stale = cluster.store.rows["job-1"]
    bus_of(b).disconnect()
    await a.operations.update_status("job-1", OpStatus(processed=True))
    await cluster.settle()
    cluster.store.rows["job-1"] = stale
    bus_of(b).reconnect()
    await wait_resynced(b)
    assert (b.operations.get_status("job-1") or OpStatus()).processed is False

    await a.resync()
    await cluster.settle()

    assert cluster.store.rows["job-1"].status is OpState.COMPLETED
    held = b.operations.get_status("job-1")
    assert held is not None
    assert held.state is OpState.COMPLETED


async def test_reconnect_replays_lost_invalidation() -> None:
    """Around a reconnect a peer may get a job's end but not its invalidation,
    since they travel on two subscriptions. The reconnect resync runs the hook,
    once."""
    cluster = ReplicaCluster(broker=FaultyBroker(seed=1))
    a = await cluster.add("a")
    b = await cluster.add("b")
    reloads: list[str | None] = []
    b.on_models_invalidated(lambda message: reloads.append(message.element))
    release = asyncio.Event()

    async def install(handle: OperationHandle) -> None:
        await release.wait()

    job_id = await a.operations.start_operation(
        "gallery@model-a", install, element_name="model-a"
    )
    await cluster.settle()
    assert isinstance(cluster.broker, FaultyBroker)
    cluster.broker.drop("cache.invalidate.>")
    release.set()
    await asyncio.sleep(0)
    await cluster.settle()
    await cluster.flush_writes()
    assert (b.operations.get_status(job_id) or OpStatus()).processed is True
    assert reloads == []
    cluster.broker.clear()

    for _ in range(2):
        bus_of(b).disconnect()
        bus_of(b).reconnect()
        await wait_resynced(b)

    assert reloads == ["model-a"]
    await cluster.stop()


class LateRowStore(InMemoryStore):
    """A store whose status writes wait until released, and whose `list_active`
    can be made to run before a write that `get` then returns."""

    def __init__(self) -> None:
        super().__init__()
        self.writes_open = asyncio.Event()
        self.writes_open.set()

    async def save_status(self, *args: Any, **kwargs: Any) -> bool:
        await self.writes_open.wait()
        return await super().save_status(*args, **kwargs)


async def test_resync_keeps_local_job_not_yet_stored() -> None:
    broker, store = InMemoryBroker(), LateRowStore()
    a = Replica(ReplicaConfig(replica_id="a"), bus=broker.connect(), store=store)
    b = Replica(ReplicaConfig(replica_id="b"), bus=broker.connect(), store=store)
    await a.start()
    await b.start()
    store.writes_open.clear()

    await a.operations.update_status("job-1", OpStatus(progress=10))
    await a.resync()
    store.writes_open.set()
    await a.operations.update_status("job-1", OpStatus(progress=20))
    await broker_settled(b)

    held_on_a = a.operations.get_status("job-1")
    held_on_b = b.operations.get_status("job-1")
    assert a.operations.version_of("job-1") == 2
    assert held_on_a is not None
    assert held_on_a.progress == 20
    assert held_on_b is not None
    assert held_on_b.progress == 20
    await a.stop()
    await b.stop()


async def test_resync_keeps_job_stored_after_list() -> None:
    broker, store = InMemoryBroker(), InMemoryStore()
    a = Replica(ReplicaConfig(replica_id="a"), bus=broker.connect(), store=store)
    await a.start()
    await a.operations.update_status("job-1", OpStatus(progress=10))
    assert a.operations.writer is not None
    await a.operations.writer.flush()
    listed = store.list_active

    async def list_before_write(*args: Any, **kwargs: Any) -> list[OperationRecord]:
        # The row of job-1 is written after the list was read, as when the
        # writer's first write races the resync's query.
        rows = await listed(*args, **kwargs)
        return [row for row in rows if row.id != "job-1"]

    store.list_active = list_before_write  # type: ignore[method-assign]

    await a.resync()

    assert a.operations.version_of("job-1") == 1
    held = a.operations.get_status("job-1")
    assert held is not None
    assert held.progress == 10
    await a.stop()


async def broker_settled(replica: Replica) -> None:
    assert isinstance(replica.bus, InMemoryBus)
    await asyncio.sleep(0)
    await replica.bus.drain()


class SlowOwnerStore:
    """The shared store as an owner sees it through writes that take a while."""

    def __init__(self, store: InMemoryStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def upsert_placeholder(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.3)
        return await self._store.upsert_placeholder(*args, **kwargs)

    async def save_status(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.3)
        return await self._store.save_status(*args, **kwargs)


async def test_resync_before_first_row_keeps_peer_job() -> None:
    broker, store = InMemoryBroker(), InMemoryStore()
    owner = Replica(
        ReplicaConfig(replica_id="owner", start_resync_delay=None),
        bus=broker.connect(),
        store=SlowOwnerStore(store),  # type: ignore[arg-type]
    )
    peer = Replica(
        ReplicaConfig(replica_id="peer", start_resync_delay=None),
        bus=broker.connect(),
        store=store,
    )
    await owner.start()
    await peer.start()
    step = asyncio.Event()

    async def work(handle: OperationHandle) -> None:
        await handle.update(progress=20.0)
        await step.wait()

    admission = asyncio.create_task(
        owner.operations.start_operation("gallery@m", work, job_id="job-1")
    )
    await eventually(lambda: peer.operations.get_status("job-1") is not None)

    await peer.resync()
    await admission

    # The owner's rows land later; the peer must go on listing the running job.
    await eventually(lambda: peer.opcache.get("gallery@m") == "job-1")
    await peer.resync()
    assert peer.opcache.get("gallery@m") == "job-1"
    held = peer.operations.get_status("job-1")
    assert held is not None
    assert held.progress == 20
    step.set()
    await owner.stop()
    await peer.stop()


@pytest.mark.parametrize(
    ("element_name", "renamed"),
    [("m", "m-renamed"), ("m", ""), ("x" * 9000, None), ("m\x00n", None)],
    ids=["renamed-by-work", "cleared-by-work", "cut-to-limit", "with-nul"],
)
async def test_reconnect_replay_runs_hook_once(
    element_name: str, renamed: str | None
) -> None:
    """The replayed invalidation of a job names the element as the store has
    it, which may differ from the live one. The hook still runs once."""
    cluster = ReplicaCluster(
        defaults={"start_resync_delay": None, "resync_interval": None}
    )
    a = await cluster.add("a")
    b = await cluster.add("b")
    runs = record_reloads(a, b)

    async def work(handle: OperationHandle) -> None:
        if renamed is not None:
            await handle.update(gallery_element_name=renamed)
        await handle.update(progress=50.0)

    job_id = await a.operations.start_operation(
        "gallery@m", work, element_name=element_name
    )
    await eventually(lambda: runs == {"a": [job_id], "b": [job_id]})
    await cluster.flush_writes()
    for replica in (a, b):
        bus_of(replica).disconnect()
    for replica in (a, b):
        bus_of(replica).reconnect()
    for replica in (a, b):
        await wait_resynced(replica)
    await cluster.settle()
    await cluster.stop()

    assert runs == {"a": [job_id], "b": [job_id]}


async def test_late_tick_after_prune_is_repaired() -> None:
    """A tick delivered after retention dropped its ended job brings it back as
    running only until the next resync restores the stored end."""
    broker = FaultyBroker(seed=1)
    cluster = ReplicaCluster(
        broker=broker,
        defaults=QUICK_PRUNE,
    )
    a = await cluster.add("a")
    b = await cluster.add("b")

    async def install(handle: OperationHandle) -> None:
        # Only this tick is late: it reaches B after B pruned the ended job.
        broker.delay(a.subjects.progress(handle.job_id), seconds=1.5)
        await handle.update(progress=50.0)
        broker.clear()

    job_id = await a.operations.start_operation("gallery@m", install)
    await eventually(lambda: (b.operations.get_status(job_id) or OpStatus()).terminal)
    await eventually(lambda: b.operations.get_status(job_id) is None, 5)
    await broker.wait_delays()
    await cluster.settle()
    ghost = b.operations.get_status(job_id)
    await cluster.flush_writes()
    await b.resync()
    repaired = b.operations.get_status(job_id)
    await cluster.stop()

    assert ghost is not None
    assert ghost.terminal is False
    assert repaired is not None
    assert repaired.state is OpState.COMPLETED


async def test_periodic_resync_replays_lost_invalidation() -> None:
    """An invalidation lost while every bus stayed connected still reloads the
    models on every replica, at a later periodic resync."""
    broker = FaultyBroker(seed=1)
    cluster = ReplicaCluster(
        broker=broker,
        defaults={"resync_interval": 0.2, "start_resync_delay": None},
    )
    a = await cluster.add("a")
    b = await cluster.add("b")
    runs = record_reloads(a, b)
    broker.drop(a.subjects.invalidate_models)

    install = report_half
    job_id = await a.operations.start_operation("gallery@m", install, element_name="m")
    await eventually(lambda: (b.operations.get_status(job_id) or OpStatus()).terminal)
    lost = {name: list(seen) for name, seen in runs.items()}
    await eventually(lambda: runs == {"a": [job_id], "b": [job_id]}, 5)
    await asyncio.sleep(0.5)
    await cluster.stop()

    assert lost == {"a": [], "b": []}
    assert runs == {"a": [job_id], "b": [job_id]}
    assert broker.counts["drop"] == 2


async def test_periodic_resync_runs_live_hooks_once() -> None:
    """Hooks that ran on the live invalidation do not run again when later
    resyncs replay recent completions."""
    cluster = ReplicaCluster(
        defaults={"resync_interval": 0.1, "start_resync_delay": None}
    )
    a = await cluster.add("a")
    b = await cluster.add("b")
    runs: list[str | None] = []
    b.on_models_invalidated(lambda message: runs.append(message.element))

    install = report_half
    for element in ("m1", "m2", "m3"):
        await a.operations.start_operation(
            f"gallery@{element}", install, element_name=element
        )
    await eventually(lambda: len(runs) == 3)
    assert b.resyncer is not None
    resyncs_before = b.resyncer.runs
    await eventually(
        lambda: b.resyncer is not None and b.resyncer.runs >= resyncs_before + 3
    )
    await cluster.stop()

    assert sorted(runs) == ["m1", "m2", "m3"]


async def test_reused_job_id_reloads_peers_again() -> None:
    """A job id used again after its first run was pruned and its row cleaned
    up reloads the models on peers again."""
    cluster = ReplicaCluster(
        defaults={"retention": 0.1, "reap_interval": 0.05, "start_resync_delay": None}
    )
    a = await cluster.add("a")
    b = await cluster.add("b")
    runs: list[str | None] = []
    b.on_models_invalidated(lambda message: runs.append(message.job_id))

    install = report_half
    for _ in range(2):
        await a.operations.start_operation(
            "gallery@m", install, element_name="m", job_id="install-1"
        )
        await eventually(lambda: len(runs) >= 1)
        await eventually(lambda: b.operations.get_status("install-1") is None)
        await eventually(lambda: a.operations.get_status("install-1") is None)
        await cluster.flush_writes()
        assert isinstance(cluster.store, InMemoryStore)
        cluster.store.rows.pop("install-1")
    await eventually(lambda: len(runs) == 2)
    await cluster.stop()

    assert runs == ["install-1", "install-1"]


async def test_prune_during_replay_runs_no_hook_again() -> None:
    """A job pruned while a resync reads its row is not replayed, because its
    seen invalidations went with it."""
    cluster = ReplicaCluster(defaults=QUICK_PRUNE)
    a = await cluster.add("a")
    b = await cluster.add("b")
    runs: list[str | None] = []
    b.on_models_invalidated(lambda message: runs.append(message.element))

    install = report_half
    job_id = await a.operations.start_operation("gallery@m", install, element_name="m")
    await eventually(lambda: runs == ["m"])
    await cluster.flush_writes()
    store = cluster.store
    original_get_many = store.get_many
    reads = 0

    async def slow_get_many(job_ids: list[str]) -> list[OperationRecord]:
        # The resync reads ended jobs twice: to check their ends, then to
        # replay their hooks. The prune lands in the second read.
        nonlocal reads
        reads += 1
        rows = await original_get_many(job_ids)
        if reads == 2:
            await eventually(lambda: b.operations.get_status(job_id) is None, 5)
        return rows

    store.get_many = slow_get_many  # type: ignore[method-assign]
    assert b.resyncer is not None
    await b.resyncer.resync("test", ended_since=0.0)
    await cluster.stop()

    assert reads == 2
    assert runs == ["m"]
