"""The simulated model server that the aiohttp, Flask and FastAPI examples share.

Installing a model downloads it for a few seconds, with progress on two worker
nodes, then writes the model to a folder the replicas share. Each replica keeps
its list of installed models in memory and reloads it when a models invalidation
arrives. The framework examples only map routes onto the functions here.

Every example takes the same command line (see `parse_settings`) and prints one
JSON line, ``{"event": "listening", "port": ..., "replica_id": ...}``, once it
serves requests. Under gunicorn or uvicorn, where there is no command line of
ours, `settings_from_env` reads the same settings from environment variables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import sys
import uuid
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs

from replistate import (
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
from replistate.subjects import DEFAULT_CACHE_PREFIX, DEFAULT_PREFIX

logger = logging.getLogger("replistate.example")

PAGE_PATH = Path(__file__).with_name("operations.html")
"""The operations page every example serves at ``/``."""

TICK_SECONDS = 0.1
MODEL_SIZE_BYTES = 2_300_000_000
NODES = (("node-1", "worker-a"), ("node-2", "worker-b"))

MODEL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
"""A valid model id, matched in full. The id names a file in the models folder,
so it has no '/', '.' or other character a path or a subject gives a meaning."""


@attrs.frozen
class Settings:
    """Settings of one replica of an example."""

    nats_url: str
    postgres_url: str
    models_dir: Path
    replica_id: str = attrs.field(factory=lambda: f"replica-{uuid.uuid4().hex[:8]}")
    host: str = "127.0.0.1"
    port: int = 0
    table: str = "gallery_operations"
    subject_prefix: str = DEFAULT_PREFIX
    lease_seconds: float = attrs.field(default=15.0, converter=float)
    reap_seconds: float = attrs.field(default=5.0, converter=float)
    install_seconds: float = attrs.field(default=8.0, converter=float)
    store_timeout: float = attrs.field(default=10.0, converter=float)

    @lease_seconds.validator
    @reap_seconds.validator
    @install_seconds.validator
    @store_timeout.validator
    def _check_seconds(self, attribute: attrs.Attribute[float], value: float) -> None:
        if not MIN_SECONDS <= value <= MAX_SECONDS:
            raise ValueError(
                f"invalid {attribute.name} {value!r}: expected {SECONDS_RANGE}"
            )


MIN_SECONDS = 0.01
MAX_SECONDS = 1_000_000.0
SECONDS_RANGE = f"a number of seconds from {MIN_SECONDS:g} to {MAX_SECONDS:.0f}"
"""The durations the examples accept: a shorter lease or reap interval makes a
loop that only burns CPU, and a much longer one overflows a `timedelta`."""


def seconds(text: str) -> float:
    """Parse a duration in seconds, within `SECONDS_RANGE`.

    Raises:
        argparse.ArgumentTypeError: the text is not such a number.
    """
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    # NaN fails both comparisons, so it is rejected too.
    if not MIN_SECONDS <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: expected {SECONDS_RANGE}"
        )
    return value


def cache_prefix(subject_prefix: str) -> str:
    """Return the invalidation prefix that goes with `subject_prefix`.

    The default prefix keeps LocalAI's invalidation subjects; any other prefix
    gets invalidation subjects of its own, so separate groups never mix.
    """
    if subject_prefix == DEFAULT_PREFIX:
        return DEFAULT_CACHE_PREFIX
    return f"{subject_prefix}.invalidate"


def parse_settings(argv: list[str] | None, description: str) -> Settings:
    """Read the settings from the command line every example takes."""
    defaults = attrs.fields(Settings)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--nats-url", required=True, help="NATS server URL")
    parser.add_argument("--postgres-url", required=True, help="PostgreSQL URL")
    parser.add_argument(
        "--replica-id", help="unique replica id (default: a random one)"
    )
    parser.add_argument(
        "--host",
        default=defaults.host.default,
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
        default=defaults.table.default,
        help="PostgreSQL table of the operations (default: %(default)s)",
    )
    parser.add_argument(
        "--subject-prefix",
        default=defaults.subject_prefix.default,
        help="first token of the operation subjects; replicas that work together "
        "share it (default: %(default)s)",
    )
    parser.add_argument(
        "--lease-seconds",
        type=seconds,
        default=defaults.lease_seconds.default,
        help="lease on an owned install, in seconds; a peer fails the install "
        "when its owner stops renewing it (default: %(default)s)",
    )
    parser.add_argument(
        "--reap-seconds",
        type=seconds,
        default=defaults.reap_seconds.default,
        help="seconds between two searches for installs whose owner was lost "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--install-seconds",
        type=seconds,
        default=defaults.install_seconds.default,
        help="duration of a simulated install, in seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--store-timeout",
        type=seconds,
        default=defaults.store_timeout.default,
        help="seconds to wait for a PostgreSQL connection before a store call "
        "fails; failed status writes are retried (default: %(default)s)",
    )
    values = vars(parser.parse_args(argv))
    if values["replica_id"] is None:
        del values["replica_id"]
    return Settings(**values)


ENV_NAMES = {
    "nats_url": "REPLISTATE_NATS_URL",
    "postgres_url": "REPLISTATE_POSTGRES_URL",
    "models_dir": "EXAMPLE_MODELS_DIR",
    "replica_id": "EXAMPLE_REPLICA_ID",
    "table": "EXAMPLE_TABLE",
    "subject_prefix": "EXAMPLE_SUBJECT_PREFIX",
    "lease_seconds": "EXAMPLE_LEASE_SECONDS",
    "reap_seconds": "EXAMPLE_REAP_SECONDS",
    "install_seconds": "EXAMPLE_INSTALL_SECONDS",
    "store_timeout": "EXAMPLE_STORE_TIMEOUT",
}
"""The environment variable of each setting, for servers that import the app."""


def settings_from_env(environ: Mapping[str, str] = os.environ) -> Settings:
    """Read the settings from environment variables (see `ENV_NAMES`).

    The replica id is random unless set. A server that imports the app once and
    then forks workers, such as gunicorn with ``--preload``, reads the settings
    once for all of them. Each worker must then add something of its own to the
    id, as `flask_app.create_app` adds the process id.

    Raises:
        SystemExit: a required variable is missing.
    """
    values: dict[str, Any] = {}
    for field in attrs.fields(Settings):
        name = ENV_NAMES.get(field.name)
        if name is None or name not in environ:
            continue
        text = environ[name]
        # The annotations are strings here, because of the __future__ import.
        kind = str(field.type)
        if kind == "float":
            try:
                values[field.name] = seconds(text)
            except argparse.ArgumentTypeError as exc:
                raise SystemExit(f"{name}: {exc}") from None
        elif kind == "Path":
            values[field.name] = Path(text)
        else:
            values[field.name] = text
    missing = [
        ENV_NAMES[name]
        for name in ("nats_url", "postgres_url", "models_dir")
        if name not in values
    ]
    if missing:
        raise SystemExit(f"set {', '.join(missing)} to run this example")
    return Settings(**values)


class ModelCatalog:
    """The models this replica has loaded from the shared folder."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self.names: set[str] = set()
        self.reload()

    def reload(self) -> None:
        """Read the installed models from the shared folder again."""
        self.names = {path.stem for path in self.models_dir.glob("*.yaml")}


def check_model_id(model_id: str) -> str | None:
    """Return why `model_id` is invalid, or None when it is valid."""
    if MODEL_ID_PATTERN.fullmatch(model_id) is not None:
        return None
    return (
        f"invalid model id {model_id!r}: use 1 to 128 letters, digits, '-' or '_', "
        "starting with a letter or a digit"
    )


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
    """Simulate the download of `model_id` on two nodes, then install it.

    Raises:
        ValueError: `model_id` is invalid (see `check_model_id`), so its file
            could land outside `models_dir`.
    """
    problem = check_model_id(model_id)
    if problem is not None:
        raise ValueError(problem)
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


class ModelServer:
    """The replica and the installed models of one example process."""

    def __init__(self, settings: Settings) -> None:
        settings.models_dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.catalog = ModelCatalog(settings.models_dir)

    def make_replica(self) -> Replica:
        """Return a new replica on the settings' servers, reloading the models
        on each models invalidation."""
        settings = self.settings
        replica = Replica(
            ReplicaConfig(
                replica_id=settings.replica_id,
                subject_prefix=settings.subject_prefix,
                cache_prefix=cache_prefix(settings.subject_prefix),
                lease=timedelta(seconds=settings.lease_seconds),
                reap_interval=settings.reap_seconds,
            ),
            bus=NatsBus(settings.nats_url, name=settings.replica_id),
            store=PostgresGalleryStore(
                settings.postgres_url,
                table=settings.table,
                timeout=settings.store_timeout,
            ),
        )
        replica.on_models_invalidated(self._reload_models)
        return replica

    def _reload_models(self, message: InvalidationMessage) -> None:
        self.catalog.reload()
        logger.info(
            "models reloaded after %s of %r: %d installed",
            message.op,
            message.element,
            len(self.catalog.names),
        )

    async def install(
        self, replica: Replica, model_id: str
    ) -> tuple[int, dict[str, Any]]:
        """Start installing `model_id`, owned by `replica`; return HTTP status
        and body, 400 when `model_id` is invalid (see `check_model_id`)."""
        problem = check_model_id(model_id)
        if problem is not None:
            return 400, {"error": problem}
        settings = self.settings

        async def work(handle: OperationHandle) -> None:
            await install_model(
                handle, model_id, settings.models_dir, settings.install_seconds
            )

        try:
            job_id = await replica.operations.start_operation(
                f"gallery@{model_id}", work, element_name=model_id
            )
        except OperationConflictError as exc:
            return 409, {
                "error": f"model {model_id!r} is already being installed",
                "jobID": exc.job_id,
            }
        return 202, {"jobID": job_id, "replica": replica.replica_id}

    def models(self) -> dict[str, Any]:
        """Return the body of ``GET /api/models``."""
        return {"models": sorted(self.catalog.names)}


def read_page() -> str:
    """Return the HTML of the operations page."""
    return PAGE_PATH.read_text(encoding="utf-8")


def announce(port: int, replica_id: str) -> None:
    """Print the line launchers wait for: this replica serves on `port`."""
    print(
        json.dumps({"event": "listening", "port": port, "replica_id": replica_id}),
        flush=True,
    )


def configure_logging(replica_id: str) -> None:
    """Log to stderr, each line naming the replica."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {replica_id} %(name)s %(levelname)s %(message)s",
    )
