"""The operations API bodies and the aiohttp routes serving them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from replistate import (
    InMemoryBroker,
    InMemoryStore,
    NodeProgress,
    NodeState,
    OperationHandle,
    OperationRecord,
    OpState,
    OpStatus,
    Replica,
    ReplicaConfig,
    StoreError,
)
from replistate.integrations import aiohttp as replistate_aiohttp
from replistate.integrations.api import (
    cancel_response,
    job_response,
    operation_entry,
    operations_body,
)

from .conftest import Cluster


def test_entry_shape_of_running_install() -> None:
    node = NodeProgress(node_id="n1", status=NodeState.DOWNLOADING, percentage=42.9)
    status = OpStatus(
        progress=42.9,
        message="downloading",
        gallery_element_name="model-a",
        cancellable=True,
        nodes=[node],
    )

    entry = operation_entry("gallery@model-a", "job-1", False, status)

    assert entry == {
        "id": "gallery@model-a",
        "name": "model-a",
        "jobID": "job-1",
        "progress": 42,
        "taskType": "installation",
        "isDeletion": False,
        "isBackend": False,
        "isQueued": False,
        "isCancelled": False,
        "cancellable": True,
        "message": "downloading",
        "nodes": [
            {
                "node_id": "n1",
                "node_name": "",
                "status": "downloading",
                "percentage": 42.9,
            }
        ],
    }


def test_entry_without_status_is_queued() -> None:
    entry = operation_entry("backend@llama", "job-1", True, None)

    assert entry is not None
    assert entry["isQueued"] is True
    assert entry["isBackend"] is True
    assert entry["progress"] == 0
    assert entry["name"] == "backend@llama"
    assert "error" not in entry
    assert "nodes" not in entry


def test_entry_of_failure_shows_error() -> None:
    status = OpStatus(processed=True, error="disk full", deletion=True)

    entry = operation_entry("gallery@m", "job-1", False, status)

    assert entry is not None
    assert entry["error"] == "disk full"
    assert entry["taskType"] == "deletion"
    assert entry["isDeletion"] is True


@pytest.mark.parametrize(
    "status",
    [OpStatus(processed=True), OpStatus(cancelled=True)],
    ids=["completed", "cancelled"],
)
def test_entry_leaves_out_finished(status: OpStatus) -> None:
    assert operation_entry("gallery@m", "job-1", False, status) is None


@pytest.fixture
async def clients(cluster: Cluster) -> AsyncIterator[tuple[TestClient, TestClient]]:
    """Two aiohttp apps serving two replicas of one in-memory cluster."""
    made: list[TestClient] = []
    for replica_id in ("a", "b"):
        replica = await cluster.add(replica_id, start=False)
        app = web.Application()
        replistate_aiohttp.setup(app, replica)
        app.add_routes(replistate_aiohttp.routes(prefix="/api/"))
        client = TestClient(TestServer(app))
        await client.start_server()
        made.append(client)
    yield made[0], made[1]
    for client in made:
        await client.close()


async def wait_forever(handle: OperationHandle) -> None:
    await handle.update(progress=25.0, message="downloading")
    await asyncio.Event().wait()


async def test_routes_list_and_cancel_across_apps(
    clients: tuple[TestClient, TestClient], cluster: Cluster
) -> None:
    client_a, client_b = clients
    owner: Replica = client_a.app[replistate_aiohttp.REPLICA_KEY]
    job_id = await owner.operations.start_operation(
        "gallery@model-a", wait_forever, element_name="model-a"
    )
    await asyncio.sleep(0)
    await cluster.settle()

    listing = await (await client_b.get("/api/operations")).json()
    job = await client_b.get(f"/api/operations/{job_id}")
    cancel = await client_b.post(f"/api/operations/{job_id}/cancel")
    cancel_body = await cancel.json()
    await cluster.settle()
    after = await (await client_a.get("/api/operations")).json()
    again = await client_b.post(f"/api/operations/{job_id}/cancel")

    assert [entry["jobID"] for entry in listing["operations"]] == [job_id]
    assert listing["operations"][0]["progress"] == 25
    assert job.status == 200
    assert (await job.json())["state"] == "downloading"
    assert cancel.status == 202
    assert cancel_body == {"jobID": job_id, "outcome": "accepted"}
    assert after == {"operations": []}
    assert again.status == 409


async def test_routes_unknown_and_invalid_jobs(
    clients: tuple[TestClient, TestClient],
) -> None:
    client_a, _ = clients

    unknown = await client_a.get("/api/operations/no-such-job")
    cancel_unknown = await client_a.post("/api/operations/no-such-job/cancel")
    invalid = await client_a.post("/api/operations/a.b/cancel")

    assert unknown.status == 404
    assert cancel_unknown.status == 404
    assert (await cancel_unknown.json())["outcome"] == "unknown"
    assert invalid.status == 400
    assert "invalid" in (await invalid.json())["error"]


async def test_ready_route_reports_state(
    clients: tuple[TestClient, TestClient],
) -> None:
    client_a, _ = clients
    replica: Replica = client_a.app[replistate_aiohttp.REPLICA_KEY]

    ready = await client_a.get("/api/ready")
    assert ready.status == 200
    assert await ready.json() == {"ready": True, "replica": "a"}

    assert replica.bus is not None
    await replica.bus.close()
    not_ready = await client_a.get("/api/ready")
    assert not_ready.status == 503


async def test_operations_body_follows_changes(cluster: Cluster) -> None:
    a = await cluster.add("a")
    empty = operations_body(a)
    assert orjson.loads(empty) == {"operations": []}
    assert operations_body(a) is empty

    async def wait(handle: OperationHandle) -> None:
        await asyncio.Event().wait()

    job_id = await a.operations.start_operation(
        "gallery@m", wait, element_name="m", job_id="job-1"
    )
    listed = operations_body(a)
    assert [op["jobID"] for op in orjson.loads(listed)["operations"]] == [job_id]
    assert operations_body(a) is listed

    await a.operations.update_status(job_id, OpStatus(progress=30, cancellable=True))
    progressed = orjson.loads(operations_body(a))["operations"]
    assert progressed[0]["progress"] == 30

    a.opcache.discard(job_id)
    assert orjson.loads(operations_body(a)) == {"operations": []}


async def test_change_listener_sees_adopted_end(cluster: Cluster) -> None:
    a = await cluster.add("a")
    seen: list[tuple[str, bool]] = []

    def listener(job_id: str, status: OpStatus | None) -> None:
        assert status is not None
        seen.append((job_id, status.cancelled))

    a.operations.on_change(listener)
    await a.operations.update_status("job-1", OpStatus(progress=10))
    revision = a.operations.revision

    await a.operations.adopt_stored(
        OperationRecord(id="job-1", status=OpState.CANCELLED, version=5)
    )

    assert seen == [("job-1", False), ("job-1", True)]
    assert a.operations.revision == revision + 1


class UnreadableStore(InMemoryStore):
    """A store whose reads of single jobs fail, as during an outage."""

    async def get(self, job_id: str) -> OperationRecord | None:
        raise StoreError(f"get for job {job_id!r} failed: connection refused")


async def test_store_outage_answers_503() -> None:
    replica = Replica(
        ReplicaConfig(replica_id="a"),
        bus=InMemoryBroker().connect(),
        store=UnreadableStore(),
    )
    async with replica:
        status, body = await job_response(replica, "job-1")
        cancel_status, cancel_body = await cancel_response(replica, "job-1")

    assert status == 503
    assert "connection refused" in body["error"]
    assert cancel_status == 503
    assert "connection refused" in cancel_body["error"]
