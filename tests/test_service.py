"""Statuses, cancel routing and invalidations across replicas, in memory."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import attrs
import pytest

from replistate import (
    CancelOutcome,
    InMemoryBroker,
    InMemoryBus,
    InMemoryStore,
    NodeProgress,
    NodeState,
    OperationHandle,
    OpState,
    OpStatus,
    OpType,
    Replica,
    ReplicaConfig,
)
from replistate.codec import InvalidationMessage, ProgressMessage, encode

from .conftest import Cluster, eventually, record_reloads, report_half

NODE_A = NodeProgress(node_id="node-a", status=NodeState.DOWNLOADING, percentage=10)
NODE_B = NodeProgress(node_id="node-b", status=NodeState.QUEUED)


async def wait_until_cancelled() -> None:
    await asyncio.Event().wait()


async def test_progress_reaches_peer(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    status = OpStatus(
        progress=42.5,
        message="downloading",
        file_name="m.gguf",
        file_size="2.3 GB",
        downloaded_size="1.0 GB",
        gallery_element_name="model-a",
        cancellable=True,
    )

    await a.operations.update_status("job-1", status)
    await cluster.settle()

    assert b.operations.get_status("job-1") == status
    assert b.operations.version_of("job-1") == 1


async def test_peer_tick_without_nodes_keeps_nodes(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    await a.operations.update_status("job-1", OpStatus(nodes=[NODE_A, NODE_B]))
    await cluster.settle()

    await a.operations.update_status("job-1", OpStatus(progress=50, message="tick"))
    await cluster.settle()

    held = b.operations.get_status("job-1")
    assert held is not None
    assert held.nodes == (NODE_A, NODE_B)
    assert held.progress == 50
    assert held.message == "tick"


async def test_peer_tick_with_nodes_replaces(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    await a.operations.update_status("job-1", OpStatus(nodes=[NODE_A, NODE_B]))
    replacement = NodeProgress(node_id="node-c", status=NodeState.SUCCESS)

    await a.operations.update_status("job-1", OpStatus(nodes=[replacement]))
    await cluster.settle()

    held = b.operations.get_status("job-1")
    assert held is not None
    assert held.nodes == (replacement,)


async def test_node_update_reaches_peer(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    await a.operations.update_node("job-1", NODE_A)
    await a.operations.update_node("job-1", NODE_B)
    running = NodeProgress(
        node_id="node-a",
        status=NodeState.RUNNING_ON_WORKER,
        percentage=70,
        file_name="m.gguf",
        current="1.6 GB",
        total="2.3 GB",
    )

    await a.operations.update_node("job-1", running)
    await cluster.settle()

    held = b.operations.get_status("job-1")
    assert held is not None
    assert held.nodes == (running, NODE_B)
    assert held.progress == 70
    assert held.file_name == "m.gguf"
    assert held.downloaded_size == "1.6 GB"
    assert held.file_size == "2.3 GB"
    assert held.state is OpState.PROCESSING


@pytest.mark.parametrize(
    "error",
    [
        ValueError("checksum mismatch for m.gguf"),
        OSError(28, "No space left on device"),
        KeyError("model-a"),
        TimeoutError(),
    ],
    ids=["value", "oserror", "keyerror", "empty"],
)
async def test_failure_reaches_peer_with_text(
    cluster: Cluster, error: Exception
) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")

    async def fail(handle: OperationHandle) -> None:
        await handle.update(progress=30.0)
        raise error

    job_id = await a.operations.start_operation("gallery@model-a", fail)
    await asyncio.sleep(0)
    await cluster.settle()

    held = b.operations.get_status(job_id)
    expected_text = str(error) or type(error).__name__
    assert held is not None
    assert held.error == expected_text
    assert held.processed is True
    assert held.state is OpState.FAILED
    assert str(held.exception) == expected_text
    assert cluster.store.rows[job_id].error == expected_text


async def test_success_completes_everywhere(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")

    async def work(handle: OperationHandle) -> None:
        await handle.update(progress=50.0, message="half")

    job_id = await a.operations.start_operation(
        "gallery@model-a", work, element_name="model-a"
    )
    await asyncio.sleep(0)
    await cluster.settle()

    for replica in (a, b):
        held = replica.operations.get_status(job_id)
        assert held is not None
        assert held.state is OpState.COMPLETED
        assert held.progress == 100
        assert replica.opcache.get("gallery@model-a") is None
    assert cluster.store.rows[job_id].status is OpState.COMPLETED


async def test_cancel_routes_to_owner(cluster: Cluster) -> None:
    """A cancel requested on A runs the cancel function that only B holds."""
    a = await cluster.add("a")
    b = await cluster.add("b")
    job_id = await b.operations.start_operation(
        "gallery@model-a", lambda handle: wait_until_cancelled()
    )
    await cluster.settle()

    outcome = await a.operations.cancel(job_id)
    await cluster.settle()

    assert outcome is CancelOutcome.ACCEPTED
    for replica in (a, b):
        held = replica.operations.get_status(job_id)
        assert held is not None
        assert held.cancelled is True
        assert held.state is OpState.CANCELLED
        assert replica.opcache.get("gallery@model-a") is None
    assert cluster.store.rows[job_id].status is OpState.CANCELLED
    assert b.operations.owned_jobs == []


async def test_cancel_runs_registered_function(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    calls: list[str] = []
    await b.operations.update_status("job-1", OpStatus(progress=5, cancellable=True))
    b.operations.register_cancel("job-1", lambda: calls.append("job-1"))
    await cluster.settle()

    await a.operations.cancel("job-1")
    await cluster.settle()

    assert calls == ["job-1"]


async def test_cancel_answers_too_late_and_unknown(cluster: Cluster) -> None:
    a = await cluster.add("a")
    await a.operations.update_status("done", OpStatus(processed=True))

    assert await a.operations.cancel("done") is CancelOutcome.TOO_LATE
    assert await a.operations.cancel("never-seen") is CancelOutcome.UNKNOWN


async def test_second_cancel_is_harmless(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    job_id = await b.operations.start_operation(
        "gallery@model-a", lambda handle: wait_until_cancelled()
    )
    await cluster.settle()

    first = await a.operations.cancel(job_id)
    await cluster.settle()
    second = await a.operations.cancel(job_id)
    await cluster.settle()

    assert first is CancelOutcome.ACCEPTED
    assert second is CancelOutcome.TOO_LATE
    assert b.operations.get_status(job_id) == a.operations.get_status(job_id)


async def test_models_invalidation_reaches_hooks(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    seen_a: list[InvalidationMessage] = []
    seen_b: list[InvalidationMessage] = []
    a.on_models_invalidated(seen_a.append)
    b.on_models_invalidated(seen_b.append)

    await a.operations.invalidations.invalidate_models("model-a", OpType.DELETE)
    await cluster.settle()

    assert [(m.element, m.op) for m in seen_b] == [("model-a", OpType.DELETE)]
    assert [(m.element, m.op) for m in seen_a] == [("model-a", OpType.DELETE)]


async def test_backends_invalidation_fires_in_time(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    fired = asyncio.Event()

    async def reload_backends(message: InvalidationMessage) -> None:
        fired.set()

    b.on_backends_invalidated(reload_backends)

    await a.operations.invalidations.invalidate_backends()

    async with asyncio.timeout(2):
        await fired.wait()


async def test_invalidation_without_hooks_succeeds(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")

    await a.operations.invalidations.invalidate_models("model-a", OpType.INSTALL)
    await a.operations.invalidations.invalidate_backends()
    await cluster.settle()

    assert a.channel is not None
    assert b.channel is not None
    assert a.channel.dropped == {}
    assert b.channel.dropped == {}


async def test_failing_hook_does_not_stop_others(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    a = await cluster.add("a")
    seen: list[str | None] = []

    def broken(message: InvalidationMessage) -> None:
        raise RuntimeError("reload failed")

    a.on_models_invalidated(broken)
    a.on_models_invalidated(lambda message: seen.append(message.element))

    await a.operations.invalidations.invalidate_models(
        "model-a", job_id="job-a", version=3
    )
    await a.operations.invalidations.invalidate_models("model-b")
    await cluster.settle()

    assert seen == ["model-a", "model-b"]
    assert "reload failed" in caplog.text
    assert "for element 'model-a' of job 'job-a'" in caplog.text


async def test_success_invalidates_models_everywhere(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    seen: list[tuple[str, str | None, OpType | None]] = []
    a.on_models_invalidated(lambda m: seen.append(("a", m.element, m.op)))
    b.on_models_invalidated(lambda m: seen.append(("b", m.element, m.op)))

    async def work(handle: OperationHandle) -> None:
        return None

    await a.operations.start_operation("gallery@m", work, element_name="m")
    await asyncio.sleep(0)
    await cluster.settle()

    assert sorted(seen) == [("a", "m", OpType.INSTALL), ("b", "m", OpType.INSTALL)]


async def test_hydrates_active_statuses(cluster: Cluster) -> None:
    a = await cluster.add("a")
    retrying = OpStatus(
        progress=35,
        message="retrying download",
        gallery_element_name="model-a",
        error="connection reset by peer",
    )
    await a.operations.update_status("job-active", retrying)
    await a.operations.update_status("job-done", OpStatus(processed=True))
    await a.operations.update_status(
        "job-failed", OpStatus(processed=True, error="gone")
    )
    await cluster.settle()

    c = await cluster.add("c")

    held = c.operations.get_status("job-active")
    assert held is not None
    assert held.progress == 35
    assert held.message == "retrying download"
    assert held.gallery_element_name == "model-a"
    assert held.error == "connection reset by peer"
    assert c.operations.get_status("job-done") is None
    failed = c.operations.get_status("job-failed")
    assert failed is not None
    assert failed.error == "gone"
    assert set(c.operations.statuses()) == {"job-active", "job-failed"}


async def test_own_echo_changes_nothing(cluster: Cluster) -> None:
    a = await cluster.add("a")
    await a.operations.update_status("job-1", OpStatus(progress=10))
    await a.operations.update_status("job-1", OpStatus(progress=20))

    await cluster.settle()

    assert a.operations.get_status("job-1") == OpStatus(progress=20)
    assert a.operations.version_of("job-1") == 2


async def test_stale_version_is_ignored(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    await a.operations.update_status("job-1", OpStatus(progress=60))
    await a.operations.update_status("job-1", OpStatus(progress=70))
    await cluster.settle()
    assert isinstance(a.bus, InMemoryBus)

    stale = ProgressMessage(
        job_id="job-1", status=OpStatus(progress=10), origin="a", version=1
    )
    replayed = attrs.evolve(stale, origin="x")
    await a.bus.publish(a.subjects.progress("job-1"), encode(replayed))
    await cluster.settle()

    held = b.operations.get_status("job-1")
    assert held is not None
    assert held.progress == 70


async def test_late_tick_never_reopens_terminal(cluster: Cluster) -> None:
    """A tick without a version, as a LocalAI peer sends, cannot undo a
    completion."""
    a = await cluster.add("a")
    b = await cluster.add("b")
    await a.operations.update_status("job-1", OpStatus(processed=True))
    await cluster.settle()
    assert isinstance(a.bus, InMemoryBus)

    late = ProgressMessage(job_id="job-1", status=OpStatus(progress=40))
    await a.bus.publish(a.subjects.progress("job-1"), encode(late))
    await cluster.settle()

    held = b.operations.get_status("job-1")
    assert held is not None
    assert held.state is OpState.COMPLETED


async def test_status_on_wrong_subject_dropped(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    assert isinstance(a.bus, InMemoryBus)

    forged = ProgressMessage(job_id="job-2", status=OpStatus(progress=99))
    await a.bus.publish(a.subjects.progress("job-1"), encode(forged))
    await cluster.settle()

    assert b.operations.get_status("job-2") is None
    assert b.operations.get_status("job-1") is None


async def test_read_through_finds_stored_job(cluster: Cluster) -> None:
    a = await cluster.add("a")
    await cluster.store.save_status("job-1", OpStatus(progress=15), version=3)

    status = await a.operations.fetch_status("job-1")

    assert status is not None
    assert status.progress == 15
    assert a.operations.version_of("job-1") == 3
    assert await a.operations.fetch_status("missing") is None


async def test_owner_ignores_ticks_after_terminal(cluster: Cluster) -> None:
    a = await cluster.add("a")
    await a.operations.update_status("job-1", OpStatus(cancelled=True))

    applied = await a.operations.update_status("job-1", OpStatus(progress=80))

    assert applied is False
    held = a.operations.get_status("job-1")
    assert held is not None
    assert held.state is OpState.CANCELLED


async def test_stop_marks_owned_work_failed(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    job_id = await a.operations.start_operation(
        "gallery@model-a", lambda handle: wait_until_cancelled()
    )
    await cluster.settle()

    await a.stop()
    await cluster.settle()

    held = b.operations.get_status(job_id)
    assert held is not None
    assert held.state is OpState.FAILED
    assert held.error == "owner replica a stopped before the operation finished"
    assert cluster.store.rows[job_id].status is OpState.FAILED


async def test_standalone_mode_runs_locally() -> None:
    replica = Replica()
    await replica.start()
    seen: list[str | None] = []
    replica.on_models_invalidated(lambda message: seen.append(message.element))

    async def work(handle: OperationHandle) -> None:
        await handle.update(progress=50.0)

    job_id = await replica.operations.start_operation(
        "gallery@m", work, element_name="m"
    )
    await asyncio.sleep(0.01)
    cancelled_job = await replica.operations.start_operation(
        "gallery@n", lambda handle: wait_until_cancelled()
    )
    outcome = await replica.operations.cancel(cancelled_job)
    await asyncio.sleep(0.01)

    assert replica.ready is True
    assert seen == ["m"]
    status = replica.operations.get_status(job_id)
    assert status is not None
    assert status.state is OpState.COMPLETED
    assert outcome is CancelOutcome.ACCEPTED
    cancelled = replica.operations.get_status(cancelled_job)
    assert cancelled is not None
    assert cancelled.state is OpState.CANCELLED
    await replica.stop()
    assert replica.ready is False


async def test_wire_payloads_carry_origin_and_version(cluster: Cluster) -> None:
    """Every payload a replica publishes names it and carries the job's version."""
    a = await cluster.add("a")
    b = await cluster.add("b")
    wire: list[tuple[str, dict[str, object]]] = []

    async def record(subject: str, data: bytes) -> None:
        wire.append((subject, json.loads(data)))

    listener = cluster.broker.connect()
    await listener.connect()
    await listener.subscribe(">", record)

    async def work(handle: OperationHandle) -> None:
        await handle.update(progress=50.0)

    done_job = await a.operations.start_operation("gallery@m", work, element_name="m")
    await asyncio.sleep(0)
    await cluster.settle()
    held_job = await a.operations.start_operation(
        "gallery@n", lambda handle: wait_until_cancelled()
    )
    await cluster.settle()
    await b.operations.cancel(held_job)
    await cluster.settle()
    await listener.drain()

    by_subject = [(subject.split(".", 1)[1], payload) for subject, payload in wire]
    progress = [p for s, p in by_subject if s == f"{done_job}.progress"]
    assert [p["version"] for p in progress] == [1, 2, 3]
    assert {p["origin"] for p in progress} == {"a"}
    assert all(p["schema"] == 1 for p in progress)
    starts = [p for s, p in by_subject if s == "opcache.start"]
    assert starts[0] == {
        "job_id": done_job,
        "cache_key": "gallery@m",
        "is_backend": False,
        "origin": "a",
        "version": 1,
        "schema": 1,
    }
    invalidations = [p for s, p in wire if s == "cache.invalidate.models"]
    assert invalidations == [
        {
            "element": "m",
            "op": "install",
            "origin": "a",
            "job_id": done_job,
            "version": 3,
            "schema": 1,
        }
    ]
    ends = [p for s, p in by_subject if s == "opcache.end"]
    assert ends[0]["version"] == 3
    assert ends[0]["job_id"] == done_job
    cancels = [p for s, p in by_subject if s == f"{held_job}.cancel"]
    assert cancels == [{"id": held_job, "origin": "b", "version": 1, "schema": 1}]
    await listener.close()


async def test_versioned_invalidation_runs_once(cluster: Cluster) -> None:
    """The same invalidation from a live event and from a resync reloads once."""
    a = await cluster.add("a")
    seen: list[str | None] = []
    a.on_models_invalidated(lambda message: seen.append(message.element))
    versioned = InvalidationMessage(
        element="m", op=OpType.INSTALL, origin="b", version=7
    )
    plain = InvalidationMessage(element="m")

    for message in (versioned, versioned, plain, plain):
        await a.operations.invalidations.handle_invalidation(
            a.subjects.invalidate_models, message
        )

    assert seen == ["m", "m", "m"]


async def test_second_install_of_element_reloads_again(cluster: Cluster) -> None:
    """Two installs of one model with as many progress reports end with the same
    version; the second still reloads the models on every replica."""
    a = await cluster.add("a")
    b = await cluster.add("b")
    reloads = record_reloads(a, b)

    install = report_half
    first = await a.operations.start_operation(
        "gallery@m", install, element_name="m", job_id="install-1"
    )
    await eventually(lambda: reloads["b"] == [first])
    second = await a.operations.start_operation(
        "gallery@m", install, element_name="m", job_id="install-2"
    )
    await eventually(lambda: len(reloads["b"]) == 2)
    await cluster.settle()

    assert a.operations.version_of(first) == a.operations.version_of(second)
    assert reloads == {"a": [first, second], "b": [first, second]}


async def test_versionless_status_keeps_ordering(cluster: Cluster) -> None:
    """A LocalAI peer's status without a version does not reset the version, so
    a stale versioned message that follows it is still ignored."""
    a = await cluster.add("a")
    b = await cluster.add("b")
    for progress in (10, 20, 30):
        await a.operations.update_status("job-1", OpStatus(progress=progress))
    await cluster.settle()
    bus = a.bus
    assert isinstance(bus, InMemoryBus)

    plain = ProgressMessage(job_id="job-1", status=OpStatus(progress=35))
    stale = ProgressMessage(
        job_id="job-1", status=OpStatus(progress=5), origin="x", version=2
    )
    await bus.publish(a.subjects.progress("job-1"), encode(plain))
    await bus.publish(a.subjects.progress("job-1"), encode(stale))
    await cluster.settle()

    held = b.operations.get_status("job-1")
    assert held is not None
    assert held.progress == 35
    assert b.operations.version_of("job-1") == 3


async def test_change_listener_sees_local_and_peer(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    seen: list[tuple[str, float | None]] = []

    def failing(job_id: str, status: OpStatus | None) -> None:
        raise RuntimeError("listener bug")

    def listener(job_id: str, status: OpStatus | None) -> None:
        seen.append((job_id, status.progress if status else None))

    b.operations.on_change(failing)
    remove = b.operations.on_change(listener)
    await b.operations.update_status("job-b", OpStatus(progress=10))
    await a.operations.update_status("job-a", OpStatus(progress=20))
    await cluster.settle()
    await a.operations.update_status("job-a", OpStatus(progress=20))
    await cluster.settle()

    assert seen == [("job-b", 10.0), ("job-a", 20.0), ("job-a", 20.0)]
    assert "change listener failed for job 'job-b'" in caplog.text

    remove()
    await a.operations.update_status("job-a", OpStatus(progress=30))
    await cluster.settle()
    assert len(seen) == 3


async def test_progress_reaches_peer_with_prefix_id(cluster: Cluster) -> None:
    a = await cluster.add("a")
    ab = await cluster.add("ab")

    await ab.operations.update_status("job-1", OpStatus(progress=30))
    await a.operations.update_status("job-2", OpStatus(progress=60))
    await cluster.settle()

    from_ab = a.operations.get_status("job-1")
    from_a = ab.operations.get_status("job-2")
    assert from_ab is not None
    assert from_ab.progress == 30
    assert from_a is not None
    assert from_a.progress == 60


async def test_owner_honours_current_cancellable(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    locked, unlocked = asyncio.Event(), asyncio.Event()

    async def locks_itself(handle: OperationHandle) -> None:
        await handle.update(progress=50.0, cancellable=False)
        locked.set()
        await asyncio.Event().wait()

    async def unlocks_itself(handle: OperationHandle) -> None:
        await handle.update(progress=10.0, cancellable=True)
        unlocked.set()
        await asyncio.Event().wait()

    first = await a.operations.start_operation("gallery@m", locks_itself)
    second = await a.operations.start_operation(
        "gallery@n", unlocks_itself, cancellable=False
    )
    await locked.wait()
    await unlocked.wait()
    await cluster.settle()

    assert await a.operations.cancel(first) is CancelOutcome.NOT_CANCELLABLE
    assert await b.operations.cancel(first) is CancelOutcome.NOT_CANCELLABLE
    assert await b.operations.cancel(second) is CancelOutcome.ACCEPTED
    await cluster.settle()

    locked_status = a.operations.get_status(first)
    unlocked_status = a.operations.get_status(second)
    assert locked_status is not None
    assert locked_status.cancelled is False
    assert unlocked_status is not None
    assert unlocked_status.cancelled is True


async def test_change_listener_sees_removals(cluster: Cluster) -> None:
    a = await cluster.add("a")
    seen: list[tuple[str, bool | None]] = []

    def listener(job_id: str, status: OpStatus | None) -> None:
        seen.append((job_id, None if status is None else status.terminal))

    a.operations.on_change(listener)
    await a.operations.update_status("job-1", OpStatus(progress=10))
    await a.operations.update_status("job-2", OpStatus(processed=True))
    a.operations.forget("job-1")
    a.operations.prune(retention=-1.0)
    a.operations.forget("job-1")

    assert seen == [
        ("job-1", False),
        ("job-2", True),
        ("job-1", None),
        ("job-2", None),
    ]


class GatedBus(InMemoryBus):
    """An in-memory bus whose publishes on subjects containing `held` wait."""

    held = ".job-slow."
    gate: asyncio.Event
    published: list[str]

    async def publish(self, subject: str, data: bytes) -> None:
        self.published.append(subject)
        if self.held in subject:
            await self.gate.wait()
        await super().publish(subject, data)


class GatedStore(InMemoryStore):
    """An in-memory store whose status writes of `held` wait."""

    held = "job-slow"
    gate: asyncio.Event
    written: list[str]

    async def save_status(self, job_id: str, status: OpStatus, **fields: Any) -> bool:
        self.written.append(job_id)
        if job_id == self.held:
            await self.gate.wait()
        return await super().save_status(job_id, status, **fields)


async def test_no_lock_held_during_io() -> None:
    """A publish or store write that hangs for one job delays no read and no
    other job's update."""
    bus = GatedBus(InMemoryBroker())
    bus.gate, bus.published = asyncio.Event(), []
    store = GatedStore()
    store.gate, store.written = asyncio.Event(), []
    a = Replica(ReplicaConfig(replica_id="a"), bus=bus, store=store)
    await a.start()
    slow_status = OpStatus(progress=10.0, message="slow")

    slow = asyncio.create_task(a.operations.update_status("job-slow", slow_status))
    await asyncio.sleep(0.05)
    held_while_publishing = a.operations.get_status("job-slow")
    async with asyncio.timeout(5):
        await a.operations.update_status("job-fast", OpStatus(progress=20.0))
        await a.operations.writer.flush()
    publishing = not slow.done()
    bus.gate.set()
    async with asyncio.timeout(5):
        applied = await slow
    await asyncio.sleep(0.05)
    store_pending = "job-slow" not in store.rows
    store.gate.set()
    await a.operations.writer.flush()
    await a.stop()

    assert held_while_publishing is not None
    assert held_while_publishing.progress == 10.0
    assert publishing is True
    assert applied is True
    assert store.rows["job-fast"].progress == 20.0
    assert store_pending is True
    assert store.rows["job-slow"].progress == 10.0
    assert store.written.index("job-fast") < store.written.index("job-slow")


async def publish_as_peer(
    replica: Replica, job_id: str, status: OpStatus, version: int
) -> None:
    """Publish a status of `job_id` on `replica`'s bus, as a peer "x" would."""
    bus = replica.bus
    assert isinstance(bus, InMemoryBus)
    message = ProgressMessage(job_id=job_id, status=status, origin="x", version=version)
    await bus.publish(replica.subjects.progress(job_id), encode(message))


async def test_equal_version_is_ignored(cluster: Cluster) -> None:
    """A status with the version already held is a duplicate, whatever it contains."""
    a = await cluster.add("a")
    b = await cluster.add("b")
    await a.operations.update_status("job-1", OpStatus(progress=60))
    await a.operations.update_status("job-1", OpStatus(progress=70))
    await cluster.settle()

    await publish_as_peer(a, "job-1", OpStatus(progress=10), version=2)
    await cluster.settle()

    held = b.operations.get_status("job-1")
    assert held is not None
    assert held.progress == 70
    assert b.operations.version_of("job-1") == 2


async def test_newer_tick_never_reopens_terminal(cluster: Cluster) -> None:
    """A progress tick with a higher version than the held end still loses."""
    a = await cluster.add("a")
    b = await cluster.add("b")
    await a.operations.update_status("job-1", OpStatus(processed=True))
    await cluster.settle()
    version = b.operations.version_of("job-1")
    assert version is not None

    await publish_as_peer(a, "job-1", OpStatus(progress=40), version=version + 1)
    await cluster.settle()

    held = b.operations.get_status("job-1")
    assert held is not None
    assert held.state is OpState.COMPLETED
    assert b.operations.version_of("job-1") == version


async def test_read_through_keeps_newer_bus_status(cluster: Cluster) -> None:
    """A row read on a miss does not replace a newer status that arrived on the
    bus while the store was being read."""
    a = await cluster.add("a")
    b = await cluster.add("b")
    store = cluster.store
    await store.save_status("job-1", OpStatus(progress=10), version=1)
    release = asyncio.Event()
    reading = asyncio.Event()
    original_get = store.get

    async def slow_get(job_id: str) -> Any:
        row = await original_get(job_id)
        reading.set()
        await release.wait()
        return row

    store.get = slow_get  # type: ignore[method-assign]
    fetch = asyncio.create_task(b.operations.fetch_status("job-1"))
    await reading.wait()
    await publish_as_peer(a, "job-1", OpStatus(progress=30), version=3)
    await cluster.settle()
    release.set()
    async with asyncio.timeout(5):
        fetched = await fetch

    assert fetched is not None
    assert fetched.progress == 30
    assert b.operations.version_of("job-1") == 3


async def test_reused_job_id_reloads_again() -> None:
    """A job id used again after its first run left memory runs the hooks
    again, although the second run ends with the same version."""
    replica = Replica(ReplicaConfig(replica_id="a", retention=0.1, reap_interval=0.05))
    await replica.start()
    runs: list[str | None] = []
    replica.on_models_invalidated(lambda message: runs.append(message.job_id))

    install = report_half
    for _ in range(2):
        await replica.operations.start_operation(
            "gallery@m", install, element_name="m", job_id="install-1"
        )
        await eventually(lambda: replica.operations.get_status("install-1") is None)
    await replica.stop()

    assert runs == ["install-1", "install-1"]
