"""A model server replica on aiohttp, kept in sync with its peers by replistate.

It simulates what a model server does: installing a model downloads it for a few
seconds, with progress on two worker nodes, then writes the model to a folder the
replicas share. Each replica keeps its list of installed models in memory and
reloads it when a models invalidation arrives.

Run one replica::

    python examples/aiohttp_app.py --nats-url nats://127.0.0.1:4222 \\
        --postgres-url postgresql://127.0.0.1/test --port 8080

It prints one JSON line, ``{"event": "listening", "port": ..., "replica_id": ...}``,
once it serves requests. Routes:

- ``POST /api/models/install/{id}``: start installing a model, owned by this replica;
- ``GET /api/models``: the installed models;
- ``GET /api/models/job/{job_id}``: the status of one job;
- ``GET /api/operations``: every operation, as the web UI polls it;
- ``POST /api/operations/{job_id}/cancel``: cancel a job, whichever replica runs it;
- ``GET /healthz``: 200 when the replica is ready, 503 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import sys
from datetime import timedelta
from pathlib import Path

from aiohttp import web

from replistate import (
    InvalidIdError,
    NatsBus,
    NodeProgress,
    NodeState,
    OperationConflictError,
    OperationHandle,
    PostgresGalleryStore,
    Replica,
    ReplicaConfig,
)
from replistate.codec import InvalidationMessage
from replistate.integrations import aiohttp as replistate_aiohttp
from replistate.integrations.api import health_response, job_response
from replistate.subjects import validate_token

logger = logging.getLogger("replistate.example")


class ModelCatalog:
    """The models this replica has loaded from the shared folder."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self.names: set[str] = set()
        self.reload()

    def reload(self) -> None:
        """Read the installed models from the shared folder again."""
        self.names = {path.stem for path in self.models_dir.glob("*.yaml")}


CATALOG_KEY = web.AppKey("catalog", ModelCatalog)
SETTINGS_KEY = web.AppKey("settings", argparse.Namespace)

TICK_SECONDS = 0.1
MODEL_SIZE_BYTES = 2_300_000_000
NODES = (("node-1", "worker-a"), ("node-2", "worker-b"))


def human_size(size: float) -> str:
    """Format a byte count as a short human-readable string, such as "2.1 GB"."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    raise AssertionError("unreachable")


async def install_model(
    handle: OperationHandle, model_id: str, models_dir: Path, seconds: float
) -> None:
    """Simulate the download of `model_id` on two nodes, then install it."""
    ticks = max(1, round(seconds / TICK_SECONDS))
    file_name = f"{model_id}.gguf"
    for tick in range(1, ticks + 1):
        percentage = round(100 * tick / ticks, 1)
        done = MODEL_SIZE_BYTES * tick / ticks
        # Both nodes advance together, so the aggregate never moves backwards.
        for node_id, node_name in NODES:
            await handle.node(
                NodeProgress(
                    node_id=node_id,
                    node_name=node_name,
                    status=NodeState.DOWNLOADING,
                    percentage=percentage,
                    file_name=file_name,
                    current=human_size(done),
                    total=human_size(MODEL_SIZE_BYTES),
                )
            )
        await handle.update(message=f"downloading {file_name}")
        await asyncio.sleep(TICK_SECONDS)
    for node_id, node_name in NODES:
        await handle.node(
            NodeProgress(
                node_id=node_id,
                node_name=node_name,
                status=NodeState.SUCCESS,
                percentage=100.0,
            )
        )
    (models_dir / f"{model_id}.yaml").write_text(f"name: {model_id}\n")


async def install(request: web.Request) -> web.Response:
    """Start installing the model named in the path."""
    replica = request.app[replistate_aiohttp.REPLICA_KEY]
    settings = request.app[SETTINGS_KEY]
    model_id = request.match_info["model_id"]
    try:
        validate_token(model_id, label="model id")
    except InvalidIdError as exc:
        return web.json_response({"error": str(exc)}, status=400)

    async def work(handle: OperationHandle) -> None:
        await install_model(
            handle, model_id, settings.models_dir, settings.install_seconds
        )

    try:
        job_id = await replica.operations.start_operation(
            f"gallery@{model_id}", work, element_name=model_id
        )
    except OperationConflictError as exc:
        return web.json_response(
            {
                "error": f"model {model_id!r} is already being installed",
                "jobID": exc.job_id,
            },
            status=409,
        )
    return web.json_response(
        {"jobID": job_id, "replica": replica.replica_id}, status=202
    )


async def list_models(request: web.Request) -> web.Response:
    """Return the models this replica has loaded."""
    return web.json_response({"models": sorted(request.app[CATALOG_KEY].names)})


async def job_status(request: web.Request) -> web.Response:
    """Return the status of one job."""
    status, body = await job_response(
        request.app[replistate_aiohttp.REPLICA_KEY], request.match_info["job_id"]
    )
    return web.json_response(body, status=status)


async def healthz(request: web.Request) -> web.Response:
    """Return 200 when the replica is ready, 503 otherwise."""
    status, body = health_response(request.app[replistate_aiohttp.REPLICA_KEY])
    return web.json_response(body, status=status)


def make_app(settings: argparse.Namespace) -> web.Application:
    """Build the application for the given command-line settings."""
    app = web.Application()
    app[SETTINGS_KEY] = settings
    catalog = ModelCatalog(settings.models_dir)
    app[CATALOG_KEY] = catalog

    def make_replica() -> Replica:
        replica = Replica(
            ReplicaConfig(
                replica_id=settings.replica_id,
                lease=timedelta(seconds=settings.lease_seconds),
                reap_interval=settings.reap_seconds,
            ),
            bus=NatsBus(settings.nats_url, name=settings.replica_id),
            store=PostgresGalleryStore(settings.postgres_url, table=settings.table),
        )

        def reload_models(message: InvalidationMessage) -> None:
            catalog.reload()
            logger.info(
                "models reloaded after %s of %r: %d installed",
                message.op,
                message.element,
                len(catalog.names),
            )

        replica.on_models_invalidated(reload_models)
        return replica

    replistate_aiohttp.setup(app, make_replica)
    app.add_routes(
        [
            web.post("/api/models/install/{model_id}", install),
            web.get("/api/models", list_models),
            web.get("/api/models/job/{job_id}", job_status),
            web.get("/healthz", healthz),
        ]
    )
    app.add_routes(replistate_aiohttp.routes(prefix="/api"))
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats-url", required=True, help="NATS server URL")
    parser.add_argument("--postgres-url", required=True, help="PostgreSQL URL")
    parser.add_argument("--replica-id", required=True, help="unique replica id")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s)",
    )
    parser.add_argument(
        "--port", type=int, default=0, help="port to listen on; 0 picks a free one"
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        required=True,
        help="folder shared by the replicas where installed models are written",
    )
    parser.add_argument(
        "--table",
        default="gallery_operations",
        help="PostgreSQL table of the operations (default: %(default)s)",
    )
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=15.0,
        help="lease on an owned install, in seconds; a peer fails the install "
        "when its owner stops renewing it (default: %(default)s)",
    )
    parser.add_argument(
        "--reap-seconds",
        type=float,
        default=5.0,
        help="seconds between two searches for installs whose owner was lost "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--install-seconds",
        type=float,
        default=8.0,
        help="duration of a simulated install, in seconds (default: %(default)s)",
    )
    return parser.parse_args(argv)


async def serve(settings: argparse.Namespace) -> None:
    """Serve until SIGTERM or SIGINT, then stop the replica."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    app = make_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    listener = socket.create_server((settings.host, settings.port))
    site = web.SockSite(runner, listener)
    await site.start()
    port = listener.getsockname()[1]
    print(
        json.dumps(
            {"event": "listening", "port": port, "replica_id": settings.replica_id}
        ),
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Run one replica."""
    settings = parse_args(argv)
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {settings.replica_id} %(name)s %(levelname)s %(message)s",
    )
    # One line per request would bury the replication events.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
