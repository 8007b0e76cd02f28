"""The ASGI integration with FastAPI and Starlette, served by uvicorn, on a real
nats-server and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import attrs
import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from replistate import (
    BusError,
    NatsBus,
    NotStartedError,
    OperationHandle,
    OperationRecord,
    OpState,
    OpStatus,
    PostgresGalleryStore,
    Replica,
    ReplicaConfig,
)
from replistate.integrations import asgi as replistate_asgi

from .conftest import UnstartedReplicaFactory, drop_table, eventually

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEOUT = 20.0
FRAMEWORKS = ["fastapi", "starlette"]

Endpoint = Callable[[Request], Any]


class GatedStore(PostgresGalleryStore):
    """A PostgreSQL store whose OpCache write waits until the test opens the gate,
    so a test can act while an operation is being admitted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.admitting = asyncio.Event()
        self.gate = asyncio.Event()

    async def upsert_placeholder(self, record: OperationRecord) -> None:
        self.admitting.set()
        await self.gate.wait()
        await super().upsert_placeholder(record)


@attrs.define
class Served:
    """An app served by uvicorn on a free loopback port."""

    port: int
    client: httpx.AsyncClient


@contextlib.asynccontextmanager
async def served(app: ASGIApp) -> AsyncIterator[Served]:
    """Serve `app` with uvicorn, lifespan included, until the block ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(app, lifespan="on", log_config=None, access_log=False)
    server = uvicorn.Server(config)

    async def serve() -> None:
        try:
            await server.serve(sockets=[listener])
        except SystemExit as exc:
            # uvicorn exits when the lifespan fails; a task must not raise that.
            raise RuntimeError(f"uvicorn exited with status {exc.code}") from exc

    task = asyncio.create_task(serve())
    try:
        await eventually(lambda: server.started or task.done(), TIMEOUT)
        if task.done():
            await task
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT
        ) as client:
            yield Served(port, client)
    finally:
        server.should_exit = True
        try:
            async with asyncio.timeout(TIMEOUT):
                await task
        finally:
            listener.close()


def build_app(
    framework: str,
    replica: Replica | Callable[[], Replica] | None,
    endpoints: Mapping[str, Endpoint] | None = None,
    *,
    prefix: str = "/ops",
) -> Starlette:
    """Return a FastAPI or Starlette app with the replica's lifespan (none when
    `replica` is None), the operations routes under `prefix` and `endpoints`,
    which map ``"METHOD /path"`` to a Starlette endpoint."""
    lifespan = None if replica is None else replistate_asgi.lifespan(replica)
    extra = []
    for key, endpoint in (endpoints or {}).items():
        method, path = key.split(" ")
        extra.append(Route(path, endpoint, methods=[method]))
    if framework == "fastapi":
        app: Starlette = FastAPI(lifespan=lifespan)
        app.router.routes.extend(extra)
    else:
        app = Starlette(routes=extra, lifespan=lifespan)
    app.router.routes.extend(replistate_asgi.routes(prefix=prefix))
    return app


async def block_until_cancelled(handle: OperationHandle) -> None:
    await asyncio.Event().wait()


def install_endpoint(work: Callable[[OperationHandle], Any]) -> Endpoint:
    """Return an endpoint starting `work` on the model named in the path."""

    async def install(request: Request) -> JSONResponse:
        replica = replistate_asgi.get_replica(request)
        model = request.path_params["model"]
        job_id = await replica.operations.start_operation(
            f"gallery@{model}", work, element_name=model
        )
        return JSONResponse({"jobID": job_id}, status_code=202)

    return install


async def wait_for_row(
    replica: Replica, job_id: str, state: OpState
) -> OperationRecord | None:
    """Return the stored row of `job_id` once it has `state`, or the last row read
    after `TIMEOUT`. The owner queues a store write after publishing a status, so
    peers can see a state before the store has it."""
    store = replica.store
    assert store is not None
    row = await store.get(job_id)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(TIMEOUT):
            while row is None or row.status is not state:
                await asyncio.sleep(0.05)
                row = await store.get(job_id)
    return row


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_lifespan_starts_and_stops_replica(
    unstarted_replica: UnstartedReplicaFactory, framework: str
) -> None:
    replica = unstarted_replica("web-1")

    async def replica_id(request: Request) -> JSONResponse:
        return JSONResponse(replistate_asgi.get_replica(request).replica_id)

    app = build_app(framework, lambda: replica, {"GET /replica": replica_id})
    async with served(app) as web:
        assert replica.ready is True
        assert app.state.replistate is replica
        ready = await web.client.get("/ops/ready")
        assert ready.status_code == 200
        assert ready.json() == {"ready": True, "replica": "web-1"}
        found = await web.client.get("/replica")
        assert found.json() == "web-1"

    assert replica.ready is False
    assert not hasattr(app.state, "replistate")
    with pytest.raises(NotStartedError):
        await replica.operations.start_operation("gallery@m", block_until_cancelled)


async def test_fastapi_dependency_returns_replica(
    unstarted_replica: UnstartedReplicaFactory,
) -> None:
    replica = unstarted_replica("web-1")
    app = FastAPI(lifespan=replistate_asgi.lifespan(replica))

    @app.get("/replica")
    async def replica_id(
        found: Annotated[Replica, Depends(replistate_asgi.get_replica)],
    ) -> dict[str, Any]:
        return {"replica": found.replica_id, "same": found is replica}

    async with served(app) as web:
        response = await web.client.get("/replica")

    assert response.status_code == 200
    assert response.json() == {"replica": "web-1", "same": True}


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_get_replica_without_lifespan(framework: str) -> None:
    """A handler of an app whose lifespan started no replica gets a clear error."""

    async def replica_id(request: Request) -> JSONResponse:
        return JSONResponse(replistate_asgi.get_replica(request).replica_id)

    app = build_app(framework, None, {"GET /replica": replica_id})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        for path in ("/replica", "/ops/operations"):
            with pytest.raises(NotStartedError, match="as the app's lifespan"):
                await client.get(path)


async def test_lifespan_wraps_user_lifespan() -> None:
    """A wrapped lifespan runs while the replica is started, and its state is
    merged with the replica's."""
    replica = Replica(ReplicaConfig(replica_id="solo"))
    seen: list[tuple[str, bool]] = []

    @contextlib.asynccontextmanager
    async def own_lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        seen.append(("enter", replica.ready))
        yield {"greeting": "hello"}
        seen.append(("exit", replica.ready))

    async def greet(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "greeting": request.state.greeting,
                "replica": replistate_asgi.get_replica(request).replica_id,
            }
        )

    app = Starlette(
        routes=[Route("/greet", greet)],
        lifespan=replistate_asgi.lifespan(replica, wrapped=own_lifespan),
    )
    async with served(app) as web:
        response = await web.client.get("/greet")

    assert response.json() == {"greeting": "hello", "replica": "solo"}
    assert seen == [("enter", True), ("exit", True)]
    assert replica.ready is False


async def test_lifespan_rejects_wrapped_state_key() -> None:
    replica = Replica(ReplicaConfig(replica_id="solo"))

    @contextlib.asynccontextmanager
    async def own_lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        yield {"replistate": "mine"}

    app = Starlette()
    lifespan = replistate_asgi.lifespan(replica, wrapped=own_lifespan)

    with pytest.raises(ValueError, match="rename that key"):
        async with lifespan(app):
            pass

    assert replica.ready is False
    assert not hasattr(app.state, "replistate")


async def test_lifespan_start_failure_leaves_no_replica() -> None:
    """A replica that cannot start fails the lifespan, so uvicorn serves nothing."""
    with socket.create_server(("127.0.0.1", 0)) as unused:
        closed_port = unused.getsockname()[1]
    replica = Replica(
        ReplicaConfig(replica_id="solo"),
        bus=NatsBus(f"nats://127.0.0.1:{closed_port}", connect_timeout=0.5),
    )
    app = Starlette()

    with pytest.raises(BusError, match="cannot connect to NATS"):
        async with replistate_asgi.lifespan(replica)(app):
            pass

    assert replica.ready is False
    assert not hasattr(app.state, "replistate")
    served_app = Starlette(lifespan=replistate_asgi.lifespan(replica))
    with pytest.raises(RuntimeError, match="uvicorn exited with status 3"):
        async with served(served_app):
            pass


def mounted_app(framework: str) -> Starlette:
    """Return an app with a standalone replica and the router mounted at /ops."""
    lifespan = replistate_asgi.lifespan(Replica(ReplicaConfig(replica_id="solo")))
    app = (
        FastAPI(lifespan=lifespan)
        if framework == "fastapi"
        else Starlette(lifespan=lifespan)
    )
    app.mount("/ops", replistate_asgi.router())
    return app


def sub_app() -> Starlette:
    """Return a FastAPI app with a standalone replica, and the routes in a
    Starlette app mounted at /ops, whose handlers see the sub-app as
    ``request.app``."""
    app = FastAPI(
        lifespan=replistate_asgi.lifespan(Replica(ReplicaConfig(replica_id="solo")))
    )
    app.mount("/ops", Starlette(routes=replistate_asgi.routes(prefix="")))
    return app


@pytest.mark.parametrize(
    "make_app",
    [
        lambda: build_app("fastapi", Replica(ReplicaConfig(replica_id="solo"))),
        lambda: build_app("starlette", Replica(ReplicaConfig(replica_id="solo"))),
        lambda: mounted_app("fastapi"),
        lambda: mounted_app("starlette"),
        sub_app,
    ],
    ids=[
        "fastapi-routes",
        "starlette-routes",
        "fastapi-mount",
        "starlette-mount",
        "starlette-sub-app",
    ],
)
async def test_routes_work_added_or_mounted(
    make_app: Callable[[], Starlette],
) -> None:
    """The routes respond the same whether added to the app's routes or mounted."""
    async with served(make_app()) as web:
        ready = await web.client.get("/ops/ready")
        listing = await web.client.get("/ops/operations")
        unknown = await web.client.get("/ops/operations/no-such-job")
        cancel = await web.client.post("/ops/operations/no-such-job/cancel")
        invalid = await web.client.post("/ops/operations/bad*id/cancel")
        wrong_method = await web.client.get("/ops/operations/no-such-job/cancel")

    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "replica": "solo"}
    assert listing.status_code == 200
    assert listing.json() == {"operations": []}
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "job 'no-such-job' not found"}
    assert cancel.status_code == 404
    assert cancel.json() == {"jobID": "no-such-job", "outcome": "unknown"}
    assert invalid.status_code == 400
    assert "bad*id" in invalid.json()["error"]
    assert wrong_method.status_code == 405


async def test_routes_cancel_across_apps(
    unstarted_replica: UnstartedReplicaFactory,
) -> None:
    """An install started through a FastAPI app is listed, read and cancelled
    through a Starlette app of another replica."""
    owner, peer = unstarted_replica("web-1"), unstarted_replica("web-2")
    owner_app = build_app(
        "fastapi",
        owner,
        {"POST /install/{model}": install_endpoint(block_until_cancelled)},
    )
    peer_app = build_app("starlette", peer)
    async with served(owner_app) as owner_web, served(peer_app) as peer_web:
        started = await owner_web.client.post("/install/model-a")
        assert started.status_code == 202
        job_id = started.json()["jobID"]

        async def listed_on_peer() -> list[dict[str, Any]]:
            body = (await peer_web.client.get("/ops/operations")).json()
            return [op for op in body["operations"] if op["jobID"] == job_id]

        async with asyncio.timeout(TIMEOUT):
            while not (entries := await listed_on_peer()):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert entries[0]["id"] == "gallery@model-a"
        assert entries[0]["name"] == "model-a"
        assert entries[0]["cancellable"] is True

        job = await peer_web.client.get(f"/ops/operations/{job_id}")
        assert job.status_code == 200
        assert job.json()["jobID"] == job_id
        assert job.json()["gallery_element_name"] == "model-a"

        cancel = await peer_web.client.post(f"/ops/operations/{job_id}/cancel")
        assert cancel.status_code == 202
        assert cancel.json() == {"jobID": job_id, "outcome": "accepted"}

        def cancelled_on_both() -> bool:
            return all(
                (status := replica.operations.get_status(job_id)) is not None
                and status.cancelled
                for replica in (owner, peer)
            )

        await eventually(cancelled_on_both, TIMEOUT)
        for web in (owner_web, peer_web):
            listing = await web.client.get("/ops/operations")
            assert listing.json() == {"operations": []}
        again = await peer_web.client.post(f"/ops/operations/{job_id}/cancel")
        assert again.status_code == 409
        assert again.json() == {"jobID": job_id, "outcome": "too_late"}
        row = await wait_for_row(peer, job_id, OpState.CANCELLED)
        assert row is not None
        assert row.status is OpState.CANCELLED
        assert owner.operations.owned_jobs == []


async def test_install_survives_client_disconnect(
    unstarted_replica: UnstartedReplicaFactory,
) -> None:
    """A client that goes away while the install handler runs leaves the install
    running on the server's replica until it completes."""
    owner, peer = unstarted_replica("web-1"), unstarted_replica("web-2")
    await peer.start()
    job_ids: list[str] = []
    handler_started = asyncio.Event()
    disconnect_seen = asyncio.Event()
    finish = asyncio.Event()

    async def work(handle: OperationHandle) -> None:
        await handle.update(progress=50.0, message="halfway")
        await finish.wait()

    async def install(request: Request) -> JSONResponse:
        replica = replistate_asgi.get_replica(request)
        job_id = await replica.operations.start_operation(
            "gallery@model-a", work, element_name="model-a"
        )
        job_ids.append(job_id)
        handler_started.set()
        # uvicorn returns the disconnect once the client closed the connection.
        await request.body()
        message = await request.receive()
        if message["type"] == "http.disconnect":
            disconnect_seen.set()
        return JSONResponse({"jobID": job_id}, status_code=202)

    app = build_app("fastapi", owner, {"POST /install": install})
    async with served(app) as web:
        _, writer = await asyncio.open_connection("127.0.0.1", web.port)
        writer.write(
            b"POST /install HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
        )
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            await handler_started.wait()
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(TIMEOUT):
            await disconnect_seen.wait()
        (job_id,) = job_ids
        await eventually(
            lambda: (owner.operations.get_status(job_id) or OpStatus()).progress == 50
        )
        assert owner.operations.owned_jobs == [job_id]

        finish.set()

        def completed_on_peer() -> bool:
            status = peer.operations.get_status(job_id)
            return status is not None and status.processed

        await eventually(completed_on_peer, TIMEOUT)
        final = peer.operations.get_status(job_id)
        assert final is not None
        assert final.state is OpState.COMPLETED
        assert final.error is None
        row = await wait_for_row(peer, job_id, OpState.COMPLETED)
        assert row is not None
        assert row.status is OpState.COMPLETED


class CancelOnDisconnect:
    """ASGI middleware that cancels the handler when its client goes away, as some
    middlewares do, whereas uvicorn lets the handler run on.

    It reads the request message itself, so it suits requests without a body.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.cancelled = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_message = await receive()
        disconnect = asyncio.ensure_future(receive())
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return request_message
            return await asyncio.shield(disconnect)

        handler = asyncio.ensure_future(self.app(scope, replay, send))
        await asyncio.wait({handler, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        if handler.done():
            disconnect.cancel()
            await handler
            return
        handler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await handler
        self.cancelled.set()


async def test_admission_survives_handler_cancel(
    unstarted_replica: UnstartedReplicaFactory,
) -> None:
    """A handler cancelled while its operation is being admitted, because the
    client went away, stops neither the admission nor the work."""
    owner = unstarted_replica("web-1", GatedStore)
    peer = unstarted_replica("web-2")
    await peer.start()
    handler_outcome: list[str] = []

    async def work(handle: OperationHandle) -> None:
        await handle.update(progress=50.0, message="halfway")

    async def install(request: Request) -> JSONResponse:
        replica = replistate_asgi.get_replica(request)
        try:
            await replica.operations.start_operation(
                "gallery@model-a", work, element_name="model-a", job_id="job-1"
            )
        except asyncio.CancelledError:
            handler_outcome.append("cancelled while admitting")
            raise
        handler_outcome.append("admitted")
        return JSONResponse({"jobID": "job-1"}, status_code=202)

    middleware = CancelOnDisconnect(
        build_app("fastapi", owner, {"POST /install": install})
    )
    store = owner.store
    assert isinstance(store, GatedStore)
    async with served(middleware) as web:
        _, writer = await asyncio.open_connection("127.0.0.1", web.port)
        writer.write(
            b"POST /install HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
        )
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            await store.admitting.wait()
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(TIMEOUT):
            await middleware.cancelled.wait()
        store.gate.set()

        def completed_on_peer() -> bool:
            status = peer.operations.get_status("job-1")
            return status is not None and (status.processed or status.cancelled)

        await eventually(completed_on_peer, TIMEOUT)
        row = await wait_for_row(peer, "job-1", OpState.COMPLETED)

    assert handler_outcome == ["cancelled while admitting"]
    final = peer.operations.get_status("job-1")
    assert final is not None
    assert final.state is OpState.COMPLETED
    assert final.cancelled is False
    assert row is not None
    assert row.status is OpState.COMPLETED


async def test_shutdown_fails_owned_operations(
    unstarted_replica: UnstartedReplicaFactory,
) -> None:
    """Stopping the server of the owner marks its running operation failed, and
    the peer lists it with the reason."""
    owner, peer = unstarted_replica("web-1"), unstarted_replica("web-2")
    owner_app = build_app(
        "fastapi",
        owner,
        {"POST /install/{model}": install_endpoint(block_until_cancelled)},
    )
    peer_app = build_app("starlette", peer)
    async with served(peer_app) as peer_web:
        async with served(owner_app) as owner_web:
            started = await owner_web.client.post("/install/model-a")
            job_id = started.json()["jobID"]
            await eventually(lambda: peer.operations.get_status(job_id) is not None)

        def failed_on_peer() -> bool:
            status = peer.operations.get_status(job_id)
            return status is not None and status.state is OpState.FAILED

        await eventually(failed_on_peer, TIMEOUT)
        listing = (await peer_web.client.get("/ops/operations")).json()
        row = await wait_for_row(peer, job_id, OpState.FAILED)

    reason = "owner replica web-1 stopped before the operation finished"
    assert [op["jobID"] for op in listing["operations"]] == [job_id]
    assert listing["operations"][0]["error"] == reason
    assert row is not None
    assert row.status is OpState.FAILED
    assert row.error == reason
    assert owner.ready is False


@attrs.define
class ExampleProcess:
    """One replica process of examples/fastapi_app.py."""

    process: asyncio.subprocess.Process
    client: httpx.AsyncClient
    log: Path


@pytest.fixture
async def launch_example(
    nats_url: str, postgres_url: str, table_name: str, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    """Start replica processes of the FastAPI example on this test's table."""
    launched: list[ExampleProcess] = []

    async def launch(replica_id: str, *extra: str) -> ExampleProcess:
        log = tmp_path / f"{replica_id}.log"
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(EXAMPLES / "fastapi_app.py"),
                "--nats-url",
                nats_url,
                "--postgres-url",
                postgres_url,
                "--table",
                table_name,
                "--replica-id",
                replica_id,
                "--models-dir",
                str(tmp_path / "models"),
                *extra,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), TIMEOUT)
        announced = json.loads(line)
        assert announced["event"] == "listening"
        assert announced["replica_id"] == replica_id
        client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{announced['port']}", timeout=TIMEOUT
        )
        launched.append(ExampleProcess(process, client, log))
        return launched[-1]

    yield launch
    for example in launched:
        await example.client.aclose()
        if example.process.returncode is None:
            example.process.kill()
            await example.process.wait()
        # Shown by pytest when the test failed.
        print(f"--- {example.log.name}\n{example.log.read_text()}")
    await drop_table(postgres_url, table_name)


async def wait_for_state(
    client: httpx.AsyncClient, job_id: str, state: str
) -> dict[str, Any]:
    """Poll the example's job route until the job has `state`."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            body: dict[str, Any] = (
                await client.get(f"/api/models/job/{job_id}")
            ).json()
            if body.get("state") == state:
                return body
            await asyncio.sleep(0.05)


async def listed_jobs(client: httpx.AsyncClient) -> list[str]:
    """Return the job ids of ``GET /api/operations``."""
    body = (await client.get("/api/operations")).json()
    return [operation["jobID"] for operation in body["operations"]]


async def test_example_app_across_processes(
    launch_example: Callable[..., Any],
) -> None:
    """Two processes of the FastAPI example: an install on one is cancelled
    through the other, and an install on the other reloads the models on both."""
    slow = await launch_example("fast-1", "--install-seconds", "60")
    quick = await launch_example("fast-2", "--install-seconds", "0.3")

    page = await slow.client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    health = await quick.client.get("/healthz")
    assert health.json() == {"ready": True, "replica": "fast-2"}
    invalid = await slow.client.post("/api/models/install/bad.id")
    assert invalid.status_code == 400

    # The example has no subject prefix option, so on a shared nats-server other
    # apps' operations may appear: the model names are this test's own.
    model_a, model_b = (f"model-{uuid.uuid4().hex[:8]}" for _ in range(2))
    started = await slow.client.post(f"/api/models/install/{model_a}")
    assert started.status_code == 202
    assert started.json()["replica"] == "fast-1"
    job_a = started.json()["jobID"]
    await wait_for_state(quick.client, job_a, "downloading")
    # The peer rejects a second install of the model once it lists the first.
    async with asyncio.timeout(TIMEOUT):
        while job_a not in await listed_jobs(quick.client):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    conflict = await quick.client.post(f"/api/models/install/{model_a}")
    assert conflict.status_code == 409
    assert conflict.json()["jobID"] == job_a
    cancel = await quick.client.post(f"/api/operations/{job_a}/cancel")
    assert cancel.status_code == 202
    await wait_for_state(slow.client, job_a, "cancelled")
    assert job_a not in await listed_jobs(slow.client)

    started = await quick.client.post(f"/api/models/install/{model_b}")
    assert started.status_code == 202
    job_b = started.json()["jobID"]
    await wait_for_state(slow.client, job_b, "completed")

    async def models_on(example: ExampleProcess) -> list[str]:
        body: dict[str, list[str]] = (await example.client.get("/api/models")).json()
        return body["models"]

    async with asyncio.timeout(TIMEOUT):
        while await models_on(slow) != [model_b]:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    assert await models_on(quick) == [model_b]

    for example, signum in ((slow, signal.SIGTERM), (quick, signal.SIGINT)):
        example.process.send_signal(signum)
        assert await asyncio.wait_for(example.process.wait(), TIMEOUT) == 0
    for example, name in ((slow, "fast-1"), (quick, "fast-2")):
        assert f"replica '{name}' stopped" in example.log.read_text()


async def test_example_factory_reads_environment(
    nats_url: str,
    postgres_url: str,
    table_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`create_app`, the factory for ``uvicorn --factory``, takes its settings
    from the environment."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import fastapi_app

    replica_id = f"env-{uuid.uuid4().hex[:6]}"
    for name, value in {
        "REPLISTATE_NATS_URL": nats_url,
        "REPLISTATE_POSTGRES_URL": postgres_url,
        "EXAMPLE_MODELS_DIR": str(tmp_path / "models"),
        "EXAMPLE_TABLE": table_name,
        "EXAMPLE_REPLICA_ID": replica_id,
    }.items():
        monkeypatch.setenv(name, value)

    try:
        async with served(fastapi_app.create_app()) as web:
            health = await web.client.get("/healthz")
            ready = await web.client.get("/api/ready")
            models = await web.client.get("/api/models")
    finally:
        await drop_table(postgres_url, table_name)

    assert health.status_code == 200
    assert health.json() == {"ready": True, "replica": replica_id}
    assert ready.json() == health.json()
    assert models.json() == {"models": []}
