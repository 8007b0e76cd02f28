"""A model server replica on FastAPI, kept in sync with its peers by replistate.

Run one replica::

    python examples/fastapi_app.py --nats-url nats://127.0.0.1:4222 \\
        --postgres-url postgresql://127.0.0.1/test --models-dir /tmp/models

It prints one JSON line, ``{"event": "listening", "port": ..., "replica_id": ...}``,
once it serves requests. Under the uvicorn command, the settings come from
environment variables (see `model_server.ENV_NAMES`)::

    REPLISTATE_NATS_URL=nats://127.0.0.1:4222 \\
    REPLISTATE_POSTGRES_URL=postgresql://127.0.0.1/test \\
    EXAMPLE_MODELS_DIR=/tmp/models \\
        uvicorn --app-dir examples --factory fastapi_app:create_app

Routes:

- ``GET /``: the operations page;
- ``POST /api/models/install/{model_id}``: start installing a model, owned by this
  replica;
- ``GET /api/models``: the installed models;
- ``GET /api/models/job/{job_id}``: the status of one job;
- ``GET /api/operations``: every operation, as the web UI polls it;
- ``GET /api/operations/{job_id}``: the status of one job;
- ``POST /api/operations/{job_id}/cancel``: cancel a job, whichever replica runs it;
- ``GET /api/ready`` and ``GET /healthz``: 200 when the replica is ready, else 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Iterator
from typing import Annotated, Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from model_server import (
    ModelServer,
    Settings,
    announce,
    configure_logging,
    parse_settings,
    read_page,
    settings_from_env,
)

from replistate import Replica
from replistate.integrations import asgi as replistate_asgi
from replistate.integrations.api import health_response, job_response

api = APIRouter()


def get_model_server(request: Request) -> ModelServer:
    """Return the app's model server."""
    server: ModelServer = request.app.state.model_server
    return server


ReplicaDependency = Annotated[Replica, Depends(replistate_asgi.get_replica)]
ServerDependency = Annotated[ModelServer, Depends(get_model_server)]


@api.get("/", response_class=HTMLResponse)
async def page() -> str:
    """Return the operations page."""
    return read_page()


@api.post("/api/models/install/{model_id}")
async def install(
    model_id: str, server: ServerDependency, replica: ReplicaDependency
) -> JSONResponse:
    """Start installing the model named in the path."""
    status, body = await server.install(replica, model_id)
    return JSONResponse(body, status_code=status)


@api.get("/api/models")
async def list_models(server: ServerDependency) -> dict[str, Any]:
    """Return the models this replica has loaded."""
    return server.models()


@api.get("/api/models/job/{job_id}")
async def job_status(job_id: str, replica: ReplicaDependency) -> JSONResponse:
    """Return the status of one job."""
    status, body = await job_response(replica, job_id)
    return JSONResponse(body, status_code=status)


@api.get("/healthz")
async def healthz(replica: ReplicaDependency) -> JSONResponse:
    """Return 200 when the replica is ready, 503 otherwise."""
    status, body = health_response(replica)
    return JSONResponse(body, status_code=status)


def make_app(settings: Settings) -> FastAPI:
    """Build the application for the given settings."""
    server = ModelServer(settings)
    app = FastAPI(
        title="replistate model server",
        lifespan=replistate_asgi.lifespan(server.make_replica),
    )
    app.state.model_server = server
    app.include_router(api)
    app.router.routes.extend(replistate_asgi.routes(prefix="/api"))
    return app


def create_app() -> FastAPI:
    """Build the application from environment variables, for
    ``uvicorn --factory``."""
    settings = settings_from_env()
    configure_logging(settings.replica_id)
    return make_app(settings)


class ExampleServer(uvicorn.Server):
    """A uvicorn server that prints the listening line once it serves.

    After a graceful shutdown, uvicorn raises the SIGTERM or SIGINT that caused it
    once more (`Server.capture_signals` in uvicorn 0.55), so the process would end
    by that signal. This server handles both signals in the event loop instead, so
    the process exits 0 once the replica stopped, as the aiohttp example does.
    """

    def __init__(
        self, config: uvicorn.Config, listener: socket.socket, replica_id: str
    ) -> None:
        super().__init__(config)
        self.listener = listener
        self.replica_id = replica_id

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # The lifespan, which starts the replica, has finished when this returns.
        await super().startup(sockets)
        if self.started:
            announce(self.listener.getsockname()[1], self.replica_id)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.handle_exit, signum, None)
        try:
            yield
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)


async def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then stop the replica."""
    listener = socket.create_server((settings.host, settings.port))
    config = uvicorn.Config(
        make_app(settings),
        lifespan="on",
        # configure_logging already set up logging, and one line per request
        # would bury the replication events.
        log_config=None,
        access_log=False,
    )
    server = ExampleServer(config, listener, settings.replica_id)
    await server.serve(sockets=[listener])


def main(argv: list[str] | None = None) -> None:
    """Run one replica."""
    settings = parse_settings(argv, __doc__.splitlines()[0])
    configure_logging(settings.replica_id)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
