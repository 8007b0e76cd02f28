"""A model server replica on Flask, kept in sync with its peers by replistate.

Run one replica on Werkzeug's threaded server::

    python examples/flask_app.py --nats-url nats://127.0.0.1:4222 \\
        --postgres-url postgresql://127.0.0.1/test --models-dir /tmp/models

It prints one JSON line, ``{"event": "listening", "port": ..., "replica_id": ...}``,
once it serves requests. Or run worker processes under gunicorn, each a replica of
its own, with the settings in environment variables (see
``model_server.ENV_NAMES``)::

    cd examples
    REPLISTATE_NATS_URL=nats://127.0.0.1:4222 \\
    REPLISTATE_POSTGRES_URL=postgresql://127.0.0.1/test \\
    EXAMPLE_MODELS_DIR=/tmp/models \\
        gunicorn --preload -w 3 -b 127.0.0.1:8000 'flask_app:create_app()'

Routes:

- ``GET /``: the operations page;
- ``POST /api/models/install/<id>``: start installing a model, owned by this replica;
- ``GET /api/models``: the installed models;
- ``GET /api/models/job/<job_id>``: the status of one job;
- ``GET /api/operations``: every operation, as the web UI polls it;
- ``GET /api/operations/<job_id>``: the status of one job;
- ``POST /api/operations/<job_id>/cancel``: cancel a job, whichever replica runs it;
- ``GET /api/ready`` and ``GET /healthz``: 200 when the replica is ready, else 503.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import attrs
from flask import Flask
from model_server import (
    ModelServer,
    Settings,
    announce,
    configure_logging,
    parse_settings,
    read_page,
    settings_from_env,
)
from werkzeug.serving import make_server

from replistate import Replica
from replistate.integrations.flask import Replistate, operations_blueprint

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def make_app(
    settings: Settings, *, replica_id_per_process: bool = False
) -> tuple[Flask, Replistate]:
    """Build the application for the given settings; return it and its extension.

    Args:
        settings: the settings of this replica.
        replica_id_per_process: whether each process appends its pid to the
            replica id. A pre-fork server reads the settings once, before it
            forks, and two workers with one replica id would ignore each other's
            messages as their own.
    """
    server = ModelServer(settings)

    def make_replica() -> Replica:
        if replica_id_per_process:
            server.settings = attrs.evolve(
                settings, replica_id=f"{settings.replica_id}-{os.getpid()}"
            )
        return server.make_replica()

    app = Flask(__name__)
    replistate = Replistate(app, make_replica)
    app.register_blueprint(operations_blueprint(prefix="/api"))

    @app.get("/")
    def page() -> tuple[str, int, dict[str, str]]:
        return read_page(), 200, {"Content-Type": "text/html; charset=utf-8"}

    @app.post("/api/models/install/<model_id>")
    def install(model_id: str) -> tuple[dict[str, Any], int]:
        status, body = replistate.call(server.install, replistate.replica, model_id)
        return body, status

    @app.get("/api/models")
    def list_models() -> dict[str, Any]:
        return server.models()

    @app.get("/api/models/job/<job_id>")
    def job_status(job_id: str) -> tuple[dict[str, Any], int]:
        status, body = replistate.job(job_id)
        return body, status

    @app.get("/healthz")
    def healthz() -> tuple[dict[str, Any], int]:
        status, body = replistate.health()
        return body, status

    return app, replistate


def create_app() -> Flask:
    """Build the application with the settings of the environment, for gunicorn
    and other servers that import the app."""
    settings = settings_from_env()
    configure_logging(settings.replica_id)
    app, _ = make_app(settings, replica_id_per_process=True)
    return app


def main(argv: list[str] | None = None) -> None:
    """Run one replica until SIGTERM or SIGINT."""
    settings = parse_settings(argv, __doc__.splitlines()[0])
    configure_logging(settings.replica_id)
    # One line per request would bury the replication events.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # Blocked before any thread starts, so every thread inherits the mask and the
    # signals wait for sigwait below instead of interrupting a thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    app, replistate = make_app(settings)
    replistate.start()
    server = make_server(settings.host, settings.port, app, threaded=True)
    serving = threading.Thread(target=server.serve_forever, name="http-server")
    serving.start()
    announce(server.port, settings.replica_id)
    try:
        signal.sigwait(STOP_SIGNALS)
    finally:
        server.shutdown()
        serving.join()
        replistate.stop()


if __name__ == "__main__":
    main()
