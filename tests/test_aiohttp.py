"""The aiohttp integration on a real nats-server and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from replistate import (
    OperationHandle,
    OperationRecord,
    OpState,
    PostgresGalleryStore,
    Replica,
)
from replistate.integrations import aiohttp as replistate_aiohttp

from .conftest import UnstartedReplicaFactory, eventually

TIMEOUT = 20.0


class SlowPlaceholderStore(PostgresGalleryStore):
    """A PostgreSQL store whose OpCache write waits, so a test can act while an
    operation is being admitted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.admitting = asyncio.Event()

    async def upsert_placeholder(self, record: OperationRecord) -> None:
        self.admitting.set()
        await asyncio.sleep(1.0)
        await super().upsert_placeholder(record)


def operations_app(replica: Replica, prefix: str = "/ops") -> web.Application:
    app = web.Application()
    replistate_aiohttp.setup(app, lambda: replica)
    app.add_routes(replistate_aiohttp.routes(prefix=prefix))
    return app


async def block_until_cancelled(handle: OperationHandle) -> None:
    await asyncio.Event().wait()


async def test_setup_starts_and_stops_replica(
    unstarted_replica: UnstartedReplicaFactory,
) -> None:
    replica = unstarted_replica("web-1")
    client = TestClient(TestServer(operations_app(replica)))
    await client.start_server()
    try:
        assert replica.ready is True
        assert client.app is not None
        assert client.app[replistate_aiohttp.REPLICA_KEY] is replica
        response = await client.get("/ops/ready")
        assert response.status == 200
        assert await response.json() == {"ready": True, "replica": "web-1"}
    finally:
        await client.close()

    assert replica.ready is False


async def test_routes_cancel_across_replicas(
    unstarted_replica: UnstartedReplicaFactory,
) -> None:
    owner, peer = unstarted_replica("web-1"), unstarted_replica("web-2")
    owner_client = TestClient(TestServer(operations_app(owner)))
    peer_client = TestClient(TestServer(operations_app(peer)))
    await owner_client.start_server()
    await peer_client.start_server()
    try:
        job_id = await owner.operations.start_operation(
            "gallery@model-a", block_until_cancelled, element_name="model-a"
        )

        async def listed_on_peer() -> list[dict[str, Any]]:
            response = await peer_client.get("/ops/operations")
            body = await response.json()
            return [op for op in body["operations"] if op["jobID"] == job_id]

        async with asyncio.timeout(TIMEOUT):
            while not (entries := await listed_on_peer()):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert entries[0]["id"] == "gallery@model-a"
        assert entries[0]["name"] == "model-a"
        assert entries[0]["cancellable"] is True

        response = await peer_client.get(f"/ops/operations/{job_id}")
        assert response.status == 200
        assert (await response.json())["jobID"] == job_id

        response = await peer_client.post(f"/ops/operations/{job_id}/cancel")
        assert response.status == 202
        assert await response.json() == {"jobID": job_id, "outcome": "accepted"}

        def cancelled_on_both() -> bool:
            return all(
                (status := replica.operations.get_status(job_id)) is not None
                and status.cancelled
                for replica in (owner, peer)
            )

        await eventually(cancelled_on_both, TIMEOUT)
        response = await peer_client.get("/ops/operations")
        assert await response.json() == {"operations": []}

        unknown = await peer_client.post("/ops/operations/no-such-job/cancel")
        assert unknown.status == 404
        invalid = await peer_client.get("/ops/operations/bad*id")
        assert invalid.status == 400
        assert "bad*id" in (await invalid.json())["error"]
    finally:
        await owner_client.close()
        await peer_client.close()


async def test_install_survives_client_disconnect(
    unstarted_replica: UnstartedReplicaFactory, postgres_url: str, table_name: str
) -> None:
    owner = unstarted_replica("web-1", SlowPlaceholderStore)
    peer = unstarted_replica("web-2")
    await peer.start()
    handler_cancelled = asyncio.Event()

    async def work(handle: OperationHandle) -> None:
        await handle.update(progress=50.0, message="halfway")

    async def install(request: web.Request) -> web.Response:
        replica = request.app[replistate_aiohttp.REPLICA_KEY]
        try:
            job_id = await replica.operations.start_operation(
                "gallery@model-a", work, element_name="model-a", job_id="job-1"
            )
        except asyncio.CancelledError:
            handler_cancelled.set()
            raise
        return web.json_response({"jobID": job_id}, status=202)

    app = web.Application()
    replistate_aiohttp.setup(app, lambda: owner)
    app.add_routes([web.post("/install", install)])
    # With handler cancellation on, aiohttp cancels the handler of a request
    # whose client goes away.
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    listener = socket.create_server(("127.0.0.1", 0))
    site = web.SockSite(runner, listener)
    await site.start()
    port = listener.getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /install HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
        )
        await writer.drain()
        assert isinstance(owner.store, SlowPlaceholderStore)
        async with asyncio.timeout(TIMEOUT):
            await owner.store.admitting.wait()
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(TIMEOUT):
            await handler_cancelled.wait()

        def completed_on_peer() -> bool:
            status = peer.operations.get_status("job-1")
            return status is not None and status.processed

        await eventually(completed_on_peer, TIMEOUT)
        status = peer.operations.get_status("job-1")
        assert status is not None
        assert status.cancelled is False
        assert status.error is None
        store = PostgresGalleryStore(postgres_url, table=table_name)
        await store.open()
        try:
            row = await store.get("job-1")
        finally:
            await store.close()
        assert row is not None
        assert row.status is OpState.COMPLETED
    finally:
        await runner.cleanup()
