"""Defects found by trying to break the library, each pinned by a test."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sys
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from psycopg import sql

from replistate import (
    CancelOutcome,
    InMemoryBroker,
    InMemoryStore,
    InvalidIdError,
    NotStartedError,
    OperationConflictError,
    OperationHandle,
    OperationRecord,
    OpState,
    OpStatus,
    PostgresGalleryStore,
    Replica,
    ReplicaConfig,
    StoreError,
)
from replistate.codec import InvalidationMessage
from replistate.integrations import aiohttp as replistate_aiohttp
from replistate.integrations.api import (
    cancel_response,
    job_response,
    operations_response,
)
from replistate.models import MAX_TEXT_LENGTH
from replistate.subjects import validate_token

from .conftest import BusFactory, Cluster, drop_table, eventually

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "aiohttp_app.py"


class Abort(BaseException):
    """A BaseException that is neither CancelledError nor KeyboardInterrupt."""


async def block(handle: OperationHandle) -> None:
    await asyncio.Event().wait()


async def test_huge_error_fails_everywhere(cluster: Cluster) -> None:
    """An error text too long for one bus message is cut, on every replica."""
    a = await cluster.add("a")
    b = await cluster.add("b")

    async def work(handle: OperationHandle) -> None:
        await handle.update(progress=10.0)
        raise RuntimeError("HTTP 500 body: " + "x" * 2_000_000)

    job_id = await a.operations.start_operation("gallery@m", work)
    await asyncio.sleep(0.01)
    await cluster.settle()

    for replica in (a, b):
        held = replica.operations.get_status(job_id)
        assert held is not None
        assert held.state is OpState.FAILED
        assert held.error is not None
        assert len(held.error) == MAX_TEXT_LENGTH
        assert held.error.endswith("[cut from 2000015 characters]")
    assert cluster.store.rows[job_id].status is OpState.FAILED


async def test_base_exception_ends_operation(cluster: Cluster) -> None:
    a = await cluster.add("a")

    async def work(handle: OperationHandle) -> None:
        await handle.update(progress=10.0)
        raise Abort("stop")

    job_id = await a.operations.start_operation("gallery@m", work)
    await asyncio.sleep(0.01)
    await cluster.settle()

    held = a.operations.get_status(job_id)
    assert held is not None
    assert held.error == "stop"
    assert cluster.store.rows[job_id].status is OpState.FAILED
    assert a.operations.owned_jobs == []


async def test_terminal_status_is_final(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    handles: list[OperationHandle] = []

    async def work(handle: OperationHandle) -> None:
        handles.append(handle)

    job_id = await a.operations.start_operation("gallery@m", work)
    await asyncio.sleep(0.01)
    await cluster.settle()

    late = await handles[0].update(processed=True, error="late failure")
    direct = await a.operations.update_status(job_id, OpStatus(cancelled=True))
    await cluster.settle()

    assert late is False
    assert direct is False
    for replica in (a, b):
        held = replica.operations.get_status(job_id)
        assert held is not None
        assert held.state is OpState.COMPLETED


async def test_concurrent_starts_converge(cluster: Cluster) -> None:
    """Two replicas starting a job on one key agree on the job that keeps it,
    and the other job ends as failed."""
    a = await cluster.add("a")
    b = await cluster.add("b")

    jobs = await asyncio.gather(
        a.operations.start_operation("gallery@m", block),
        b.operations.start_operation("gallery@m", block),
    )
    await cluster.settle()
    await cluster.settle()

    winner, loser = max(jobs), min(jobs)
    assert a.opcache.get("gallery@m") == winner
    assert b.opcache.get("gallery@m") == winner
    for replica in (a, b):
        held = replica.operations.get_status(loser)
        assert held is not None
        assert held.state is OpState.FAILED
        assert held.error is not None
        assert winner in held.error


async def test_exclusive_start_refuses_busy_key(cluster: Cluster) -> None:
    a = await cluster.add("a")

    results = await asyncio.gather(
        a.operations.start_operation("gallery@m", block),
        a.operations.start_operation("gallery@m", block),
        return_exceptions=True,
    )

    started = [result for result in results if isinstance(result, str)]
    refused = [r for r in results if isinstance(r, OperationConflictError)]
    assert len(started) == 1
    assert len(refused) == 1
    assert refused[0].job_id == started[0]
    assert refused[0].cache_key == "gallery@m"


async def test_start_rejects_duplicate_job_id(cluster: Cluster) -> None:
    a = await cluster.add("a")

    async def done(handle: OperationHandle) -> None:
        return None

    await a.operations.start_operation("gallery@m", done, job_id="job-1")
    await asyncio.sleep(0.01)

    with pytest.raises(OperationConflictError, match="'job-1' is already in use"):
        await a.operations.start_operation("gallery@n", done, job_id="job-1")


def load_example() -> ModuleType:
    # The example imports its sibling module `model_server`, as it does when run.
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        spec = importlib.util.spec_from_file_location("example_aiohttp_app", EXAMPLE)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    return module


async def test_example_refuses_second_install(cluster: Cluster, tmp_path: Path) -> None:
    example = load_example()
    settings = example.Settings(
        nats_url="unused",
        postgres_url="unused",
        models_dir=tmp_path,
        install_seconds=5.0,
    )
    app = web.Application()
    app[example.SERVER_KEY] = example.ModelServer(settings)
    replistate_aiohttp.setup(app, await cluster.add("a", start=False))
    app.add_routes([web.post("/api/models/install/{model_id}", example.install)])
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        responses = await asyncio.gather(
            client.post("/api/models/install/m"), client.post("/api/models/install/m")
        )

        assert sorted(response.status for response in responses) == [202, 409]
    finally:
        await client.close()


async def test_late_replica_lists_failure(cluster: Cluster) -> None:
    a = await cluster.add("a")
    await cluster.add("b")

    async def work(handle: OperationHandle) -> None:
        raise RuntimeError("checksum mismatch")

    await a.operations.start_operation("gallery@m", work, element_name="m")
    await asyncio.sleep(0.01)
    await cluster.settle()
    c = await cluster.add("c")

    listing = operations_response(c)
    assert listing == operations_response(a)
    assert listing["operations"][0]["error"] == "checksum mismatch"


@pytest.mark.parametrize("error", [None, ""])
async def test_failed_row_without_error_stays_failed(
    error: str | None,
) -> None:
    record = OperationRecord(id="job-1", status=OpState.FAILED, error=error)

    status = record.to_status()

    assert status.state is OpState.FAILED
    assert status.error == "failed without an error message"


async def test_unknown_status_row_read_as_pending(
    postgres_url: str, table_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A row a LocalAI writer left with a status replistate does not write does
    not stop a replica from starting."""
    store = PostgresGalleryStore(postgres_url, table=table_name)
    await store.open()
    await store.ensure_schema()
    async with await psycopg.AsyncConnection.connect(
        postgres_url, autocommit=True
    ) as conn:
        await conn.execute(
            sql.SQL("INSERT INTO {} (id, status) VALUES (%s, %s)").format(
                sql.Identifier(table_name)
            ),
            ("job-1", "queued"),
        )
    await store.close()
    replica = Replica(
        ReplicaConfig(replica_id="a"),
        store=PostgresGalleryStore(postgres_url, table=table_name),
    )
    try:
        await replica.start()

        held = replica.operations.get_status("job-1")
        assert held is not None
        assert held.state is OpState.PENDING
        assert "unknown status 'queued'" in caplog.text
    finally:
        await replica.stop()
        await drop_table(postgres_url, table_name)


@pytest.mark.parametrize(
    "job_id", ["x" * 257, "job\udc80"], ids=["too-long", "lone-surrogate"]
)
def test_unusable_ids_rejected(job_id: str) -> None:
    with pytest.raises(InvalidIdError):
        validate_token(job_id)


async def test_overlong_job_id_never_published(cluster: Cluster) -> None:
    a = await cluster.add("a")

    with pytest.raises(InvalidIdError, match="over the limit of 256"):
        await a.operations.start_operation("gallery@m", block, job_id="x" * 5000)

    assert a.operations.owned_jobs == []
    assert len(a.opcache) == 0


async def test_empty_chosen_job_id_rejected(cluster: Cluster) -> None:
    """An empty job id passed in is an error, not a request for a random one."""
    a = await cluster.add("a")

    with pytest.raises(InvalidIdError) as raised:
        await a.operations.start_operation("gallery@m", block, job_id="")

    assert raised.value.value == ""
    assert a.operations.owned_jobs == []
    assert len(a.opcache) == 0


async def test_cancelled_hook_keeps_subscription(
    bus_factory: BusFactory, prefix: str
) -> None:
    """A hook that raises CancelledError of its own is logged like any error."""
    a = Replica(
        ReplicaConfig(replica_id="a", subject_prefix=prefix, cache_prefix=prefix),
        bus=await bus_factory(),
    )
    b = Replica(
        ReplicaConfig(replica_id="b", subject_prefix=prefix, cache_prefix=prefix),
        bus=await bus_factory(),
    )
    await a.start()
    await b.start()
    seen: list[str | None] = []
    cancelled = asyncio.get_running_loop().create_future()
    cancelled.cancel()
    arrived = asyncio.Event()

    async def hook(message: InvalidationMessage) -> None:
        seen.append(message.element)
        arrived.set()
        if message.element == "first":
            await cancelled

    b.on_models_invalidated(hook)
    try:
        # A new NATS subscription may miss messages for a moment: probe first.
        async with asyncio.timeout(10):
            while "probe" not in seen:
                await a.operations.invalidations.invalidate_models("probe")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await arrived.wait()
        await a.operations.invalidations.invalidate_models("first")
        await a.operations.invalidations.invalidate_models("second")
        async with asyncio.timeout(5):
            while "second" not in seen:
                arrived.clear()
                await arrived.wait()

        assert [element for element in seen if element != "probe"] == [
            "first",
            "second",
        ]
    finally:
        await a.stop()
        await b.stop()


async def test_cancel_of_non_cancellable(cluster: Cluster) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    job_id = await a.operations.start_operation("gallery@m", block, cancellable=False)
    await cluster.settle()

    outcome_owner = await a.operations.cancel(job_id)
    outcome_peer = await b.operations.cancel(job_id)

    assert outcome_owner is CancelOutcome.NOT_CANCELLABLE
    assert outcome_peer is CancelOutcome.NOT_CANCELLABLE
    status, body = await cancel_response(b, job_id)
    assert status == 409
    assert body["outcome"] == "not_cancellable"


async def test_cancel_on_closed_bus_answers(cluster: Cluster) -> None:
    """With the bus closed and the intent not stored either, the request gets
    a 503 response."""
    a = await cluster.add("a")
    b = await cluster.add("b")
    job_id = await a.operations.start_operation("gallery@m", block)
    await cluster.settle()
    assert b.bus is not None
    await b.bus.close()

    async def store_down(job_id: str) -> None:
        raise StoreError(f"request_cancel for job {job_id!r} failed: store is down")

    cluster.store.request_cancel = store_down  # type: ignore[method-assign]
    status, body = await cancel_response(b, job_id)

    assert status == 503
    assert "not connected" in body["error"]


def test_nan_progress_rejected() -> None:
    with pytest.raises(ValueError, match="finite"):
        OpStatus(progress=float("nan"))


async def test_nan_progress_fails_operation(cluster: Cluster) -> None:
    a = await cluster.add("a")

    async def work(handle: OperationHandle) -> None:
        await handle.update(progress=float("inf"))

    job_id = await a.operations.start_operation("gallery@m", work)
    await asyncio.sleep(0.01)
    await cluster.settle()

    held = a.operations.get_status(job_id)
    assert held is not None
    assert held.state is OpState.FAILED
    assert operations_response(a)["operations"][0]["progress"] == 0


class FailingListStore(InMemoryStore):
    """A store whose list_active fails until `fail` is cleared."""

    fail = True

    async def list_active(
        self, window: timedelta = timedelta(hours=1), *, include_failed: bool = False
    ) -> list[OperationRecord]:
        if self.fail:
            raise StoreError("list_active failed: connection reset")
        return await super().list_active(window, include_failed=include_failed)


async def test_start_retried_after_failure() -> None:
    store = FailingListStore()
    replica = Replica(
        ReplicaConfig(replica_id="a"), bus=InMemoryBroker().connect(), store=store
    )
    with pytest.raises(StoreError):
        await replica.start()
    assert replica.ready is False

    store.fail = False
    await replica.start()

    assert replica.ready is True
    await replica.stop()


async def test_stopped_replica_refuses_operations() -> None:
    replica = Replica(
        ReplicaConfig(replica_id="a"),
        bus=InMemoryBroker().connect(),
        store=InMemoryStore(),
    )
    await replica.start()
    await replica.stop()

    with pytest.raises(NotStartedError, match="'a' is not running"):
        await replica.operations.start_operation("gallery@m", block)


async def test_stop_ends_despite_ignored_cancel() -> None:
    store = InMemoryStore()
    replica = Replica(
        ReplicaConfig(replica_id="a", stop_grace_period=0.2),
        bus=InMemoryBroker().connect(),
        store=store,
    )
    await replica.start()
    released = False

    async def stubborn(handle: OperationHandle) -> None:
        while not released:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.01)

    job_id = await replica.operations.start_operation("gallery@m", stubborn)
    await asyncio.sleep(0.02)
    try:
        async with asyncio.timeout(5):
            await replica.stop()

        assert store.rows[job_id].status is OpState.FAILED
    finally:
        released = True
        await asyncio.sleep(0.05)


def test_long_table_name_rejected() -> None:
    with pytest.raises(ValueError, match="1 to 63 bytes"):
        PostgresGalleryStore("postgresql://127.0.0.1/x", table="t" * 64)


async def test_longest_table_name_works(postgres_url: str) -> None:
    table = "t" * 63
    store = PostgresGalleryStore(postgres_url, table=table)
    await store.open()
    try:
        await store.ensure_schema()
        await store.save_status("job-1", OpStatus(progress=3), version=1)

        row = await store.get("job-1")

        assert row is not None
        assert row.progress == 3
    finally:
        await store.close()
        await drop_table(postgres_url, table)


async def test_job_route_rejects_invalid_id(cluster: Cluster) -> None:
    a = await cluster.add("a")

    status, body = await job_response(a, "a.b")

    assert status == 400
    assert "invalid id 'a.b': job id contains '.'" in body["error"]


async def test_empty_cache_key_rejected(cluster: Cluster) -> None:
    a = await cluster.add("a")

    with pytest.raises(ValueError, match="missing cache key"):
        await a.operations.start_operation("", block)

    assert a.operations.owned_jobs == []
    assert len(a.opcache) == 0


async def test_success_clears_recoverable_error(cluster: Cluster) -> None:
    a = await cluster.add("a")

    async def work(handle: OperationHandle) -> None:
        await handle.update(progress=10.0, error="mirror 1 timed out, retrying")
        await handle.update(progress=60.0, message="downloading from mirror 2")

    job_id = await a.operations.start_operation("gallery@m", work)

    def ended() -> bool:
        status = a.operations.get_status(job_id)
        return status is not None and status.terminal

    await eventually(ended)
    status = a.operations.get_status(job_id)
    assert status is not None
    assert status.state is OpState.COMPLETED
    assert status.error is None


async def test_start_rejects_job_id_in_store(cluster: Cluster) -> None:
    a = await cluster.add("a")

    async def done(handle: OperationHandle) -> None:
        return None

    await a.operations.start_operation("gallery@m", done, job_id="job-1")
    await eventually(lambda: (a.operations.get_status("job-1") or OpStatus()).terminal)
    assert a.operations.writer is not None
    await a.operations.writer.flush()
    a.operations.forget("job-1")

    with pytest.raises(OperationConflictError, match="'job-1' is already in use"):
        await a.operations.start_operation("gallery@n", done, job_id="job-1")


async def test_start_rejects_nul_cache_key(cluster: Cluster) -> None:
    a = await cluster.add("a")

    async def done(handle: OperationHandle) -> None:
        return None

    with pytest.raises(ValueError, match="contains NUL"):
        await a.operations.start_operation("gallery@m\x00", done)
    assert a.opcache.entries() == []
