"""The Flask integration: blocking calls from Flask code, the operations blueprint,
a client that goes away mid-request, forked processes and gunicorn workers forked
from a master that started the extension, on a real nats-server and PostgreSQL."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from psycopg import sql

from replistate import (
    CallTimeoutError,
    NatsBus,
    NodeProgress,
    NodeState,
    OperationHandle,
    OpState,
    OpStatus,
    PostgresGalleryStore,
    Replica,
    ReplicaConfig,
    ReplistateError,
)
from replistate._servers import find_free_port
from replistate.integrations._thread_work import in_thread
from replistate.integrations.flask import (
    BlockingOperationHandle,
    Replistate,
    operations_blueprint,
)

from .conftest import drop_table

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

AppFactory = Callable[..., tuple[Flask, Replistate]]


def wait_until(
    check: Callable[[], bool], description: str, seconds: float = 20.0
) -> None:
    """Poll `check` until it holds, failing the test after `seconds`."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {seconds:g} s: {description}")
        time.sleep(0.02)


def job_body(client: FlaskClient, job_id: str) -> dict[str, Any]:
    body = client.get(f"/api/operations/{job_id}").get_json()
    assert isinstance(body, dict)
    return body


def has_state(client: FlaskClient, job_id: str, state: str) -> bool:
    return job_body(client, job_id).get("state") == state


def listed(client: FlaskClient) -> dict[str, dict[str, Any]]:
    """Return the entries of ``GET /api/operations`` by job id."""
    body = client.get("/api/operations").get_json()
    return {entry["jobID"]: entry for entry in body["operations"]}


def subprocess_env(**variables: str) -> dict[str, str]:
    """Return the environment of a child process that imports replistate."""
    env = dict(os.environ)
    paths = [str(ROOT), str(EXAMPLES), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
    env.update(variables)
    return env


def stored_states(
    postgres_url: str, table: str, cache_key: str
) -> list[tuple[str, str]]:
    """Return (job id, status) of the rows of `cache_key` in `table`."""
    query = sql.SQL("SELECT id, status FROM {} WHERE cache_key = %s").format(
        sql.Identifier(table)
    )
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        try:
            rows = conn.execute(query, (cache_key,)).fetchall()
        except psycopg.errors.UndefinedTable:
            return []
    return [(str(job_id), str(status)) for job_id, status in rows]


@pytest.fixture
def make_app(
    nats_url: str, postgres_url: str, prefix: str, table_name: str
) -> Iterator[AppFactory]:
    """Make Flask apps whose replicas share this test's subject prefix and table."""
    extensions: list[Replistate] = []

    def make(
        replica_id: str, *, subject_prefix: str = prefix, table: str = table_name
    ) -> tuple[Flask, Replistate]:
        def make_replica() -> Replica:
            return Replica(
                ReplicaConfig(
                    replica_id=replica_id,
                    subject_prefix=subject_prefix,
                    cache_prefix=f"{subject_prefix}.invalidate",
                ),
                bus=NatsBus(nats_url, name=replica_id),
                store=PostgresGalleryStore(postgres_url, table=table),
            )

        app = Flask(replica_id)
        extension = Replistate(app, make_replica, timeout=10)
        app.register_blueprint(operations_blueprint(prefix="/api"))
        extensions.append(extension)
        return app, extension

    yield make
    for extension in extensions:
        extension.stop()
    asyncio.run(drop_table(postgres_url, table_name))


async def block_until_cancelled(handle: OperationHandle) -> None:
    await asyncio.Event().wait()


async def finish_at_once(handle: OperationHandle) -> None:
    await handle.update(progress=50.0, message="halfway")


def test_install_and_cancel_across_replicas(make_app: AppFactory) -> None:
    """An install started through one app is listed and cancelled through another."""
    app_a, ext_a = make_app("a")
    app_b, ext_b = make_app("b")
    client_a, client_b = app_a.test_client(), app_b.test_client()
    ext_b.start()

    job_id = ext_a.start_operation(
        "gallery@model-a", block_until_cancelled, element_name="model-a"
    )
    wait_until(lambda: job_id in listed(client_b), "job listed on b")
    entry = listed(client_b)[job_id]
    assert entry["id"] == "gallery@model-a"
    assert entry["name"] == "model-a"
    assert entry["cancellable"] is True
    cancel = client_b.post(f"/api/operations/{job_id}/cancel")

    assert cancel.status_code == 202
    assert cancel.get_json() == {"jobID": job_id, "outcome": "accepted"}
    for client in (client_a, client_b):
        wait_until(
            functools.partial(has_state, client, job_id, "cancelled"),
            "job cancelled on both replicas",
        )
        assert job_id not in listed(client)
    store = ext_a.replica.store
    assert store is not None
    # The end reaches the store in the background, maybe after the bus message.
    wait_until(
        lambda: (
            getattr(ext_a.call(store.get, job_id), "status", None) is OpState.CANCELLED
        ),
        "cancel stored",
    )
    row = ext_a.call(store.get, job_id)
    assert row is not None
    assert row.frontend_id == "a"


def test_thread_work_reports_progress(make_app: AppFactory) -> None:
    """A plain work function runs in a thread and writes through a blocking handle."""
    app_a, ext_a = make_app("a")
    app_b, ext_b = make_app("b")
    client_b = app_b.test_client()
    ext_b.start()
    proceed = threading.Event()
    seen: dict[str, Any] = {}

    def download(handle: BlockingOperationHandle) -> None:
        seen["thread"] = threading.current_thread().name
        seen["applied"] = handle.update(progress=50.0, message="halfway")
        node = NodeProgress(
            node_id="n1", status=NodeState.DOWNLOADING, percentage=50, total="2 GB"
        )
        seen["nodes"] = len(handle.node(node).nodes)
        proceed.wait(30)

    job_id = ext_a.start_operation("gallery@model-a", download, element_name="model-a")
    wait_until(
        lambda: bool(job_body(client_b, job_id).get("nodes")), "node progress on b"
    )
    halfway = job_body(client_b, job_id)
    proceed.set()
    wait_until(functools.partial(has_state, client_b, job_id, "completed"), "done")

    assert halfway["state"] == "downloading"
    assert halfway["progress"] == 50.0
    assert halfway["message"] == "halfway"
    assert halfway["nodes"][0]["node_id"] == "n1"
    assert halfway["file_size"] == "2 GB"
    assert has_state(app_a.test_client(), job_id, "completed")
    assert seen["thread"] == f"replistate-job-{job_id}"
    assert seen["applied"] is True
    assert seen["nodes"] == 1


def test_thread_work_sees_cancel(make_app: AppFactory) -> None:
    """A cancel through a peer reaches thread work, which ends it as cancelled."""
    app_a, ext_a = make_app("a")
    app_b, ext_b = make_app("b")
    client_b = app_b.test_client()
    ext_b.start()
    seen: dict[str, Any] = {}

    def wait_for_cancel(handle: BlockingOperationHandle) -> None:
        seen["before"] = handle.cancel_requested
        while not handle.wait_for_cancel(0.05):
            pass
        seen["after"] = handle.cancel_requested

    job_id = ext_a.start_operation("gallery@model-a", wait_for_cancel)
    wait_until(lambda: job_id in listed(client_b), "job listed on b")
    # A cancel that arrives while the job is still queued skips the work, so the
    # work must have started for it to see the cancel.
    wait_until(lambda: "before" in seen, "work started")
    status, body = ext_b.cancel(job_id)

    assert status == 202
    assert body == {"jobID": job_id, "outcome": "accepted"}
    for client in (app_a.test_client(), client_b):
        wait_until(
            functools.partial(has_state, client, job_id, "cancelled"),
            "job cancelled on both replicas",
        )
    assert seen == {"before": False, "after": True}


def test_blueprint_bodies_and_status_codes(make_app: AppFactory) -> None:
    app, ext = make_app("a")
    client = app.test_client()
    unknown = str(uuid.uuid4())

    ready = client.get("/api/ready")
    assert ready.status_code == 200
    assert ready.get_json() == {"ready": True, "replica": "a"}
    assert client.get("/api/operations").get_json() == {"operations": []}

    done = ext.start_operation("gallery@model-a", finish_at_once, element_name="m")
    wait_until(lambda: job_body(client, done)["state"] == "completed", "completed")
    body = job_body(client, done)
    assert body["jobID"] == done
    assert body["processed"] is True
    assert body["progress"] == 100.0
    assert body["gallery_element_name"] == "m"
    assert "error" not in body

    async def fail(handle: OperationHandle) -> None:
        raise RuntimeError("disk full")

    failed = ext.start_operation("gallery@model-b", fail)
    wait_until(lambda: job_body(client, failed)["state"] == "failed", "failed")
    assert job_body(client, failed)["error"] == "disk full"
    assert listed(client)[failed]["error"] == "disk full"
    assert done not in listed(client)

    missing = client.get(f"/api/operations/{unknown}")
    assert missing.status_code == 404
    assert missing.get_json() == {"error": f"job {unknown!r} not found"}
    invalid = client.get("/api/operations/not.valid")
    assert invalid.status_code == 400
    assert "not.valid" in invalid.get_json()["error"]
    cancel_unknown = client.post(f"/api/operations/{unknown}/cancel")
    assert cancel_unknown.status_code == 404
    assert cancel_unknown.get_json() == {"jobID": unknown, "outcome": "unknown"}
    cancel_done = client.post(f"/api/operations/{done}/cancel")
    assert cancel_done.status_code == 409
    assert cancel_done.get_json() == {"jobID": done, "outcome": "too_late"}


def test_stop_fails_owned_operations(make_app: AppFactory) -> None:
    _, ext_a = make_app("a")
    app_b, ext_b = make_app("b")
    client_b = app_b.test_client()
    ext_b.start()
    job_id = ext_a.start_operation("gallery@model-a", block_until_cancelled)
    wait_until(lambda: job_id in listed(client_b), "job listed on b")

    ext_a.stop()

    assert ext_a.ready is False
    wait_until(lambda: job_body(client_b, job_id)["state"] == "failed", "failed on b")
    assert job_body(client_b, job_id)["error"] == (
        "owner replica a stopped before the operation finished"
    )


def test_call_timeout_raises_call_timeout_error() -> None:
    app = Flask("timeouts")
    ext = Replistate(app, Replica)
    cancelled = threading.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def raise_own_timeout() -> None:
        raise TimeoutError("from the coroutine")

    with pytest.raises(CallTimeoutError) as caught:
        ext.call(slow, timeout=0.2)

    assert isinstance(caught.value, TimeoutError)
    assert isinstance(caught.value, ReplistateError)
    assert caught.value.timeout == 0.2
    assert "test_call_timeout_raises_call_timeout_error.<locals>.slow" in (
        caught.value.call
    )
    assert "timed out after 0.2 s" in str(caught.value)
    assert cancelled.wait(10)
    with pytest.raises(TimeoutError, match="from the coroutine") as own:
        ext.call(raise_own_timeout)
    assert not isinstance(own.value, CallTimeoutError)
    assert ext.call(asyncio.sleep, 0, "result") == "result"


def test_start_timeout_leaves_extension_unstarted() -> None:
    """A start that outlasts its timeout is cancelled, and the next call makes a
    new replica and starts it again."""
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    replicas = iter(
        [
            Replica(bus=NatsBus(f"nats://127.0.0.1:{port}", connect_timeout=30)),
            Replica(bus=NatsBus(f"nats://127.0.0.1:{port}", connect_timeout=30)),
            Replica(ReplicaConfig(replica_id="standalone")),
        ]
    )
    ext = Replistate(Flask("silent"), lambda: next(replicas))
    try:
        with pytest.raises(CallTimeoutError) as caught:
            ext.start(timeout=0.5)
        assert caught.value.call == "start of the replica of app 'silent'"
        assert caught.value.timeout == 0.5
        assert ext.ready is False

        status, body = ext.health(timeout=0.5)
        assert status == 503
        assert body["ready"] is False
        assert "timed out after 0.5 s" in body["error"]

        assert ext.health() == (200, {"ready": True, "replica": "standalone"})
        assert ext.ready is True
    finally:
        ext.stop()
        silent.close()


def test_call_on_loop_thread_raises() -> None:
    """A blocking call made on the event loop thread fails instead of deadlocking."""
    ext = Replistate(Flask("nested"), Replica)

    async def nested() -> None:
        ext.call(asyncio.sleep, 0)

    with pytest.raises(RuntimeError, match="cannot run on the replistate event loop"):
        ext.call(nested)


def test_one_extension_on_two_apps() -> None:
    """Each app set up by one extension has a replica of its own."""
    ext = Replistate(timeout=5)
    first, second = Flask("first"), Flask("second")
    ext.init_app(first, lambda: Replica(ReplicaConfig(replica_id="first")))
    ext.init_app(second, lambda: Replica(ReplicaConfig(replica_id="second")))
    try:
        with first.app_context():
            assert ext.replica.replica_id == "first"
            assert ext.ready is True
        with second.app_context():
            assert ext.ready is False
            assert ext.replica.replica_id == "second"
    finally:
        for app in (first, second):
            with app.app_context():
                ext.stop()


def test_setup_errors() -> None:
    with pytest.raises(TypeError, match="missing replica factory"):
        Replistate(Flask("no_factory"))
    with pytest.raises(TypeError, match="must be callable"):
        Replistate(Flask("instance"), Replica())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout must be a positive"):
        Replistate(Flask("zero"), Replica, timeout=0)
    app = Flask("twice")
    Replistate(app, Replica)
    with pytest.raises(RuntimeError, match="already set up on app 'twice'"):
        Replistate(app, Replica)
    with pytest.raises(RuntimeError, match="no Flask app"):
        Replistate(replica=Replica).start()
    other = Replistate(replica=Replica)
    with app.app_context(), pytest.raises(RuntimeError, match="not set up on app"):
        other.start()


ATEXIT_SCRIPT = """
import asyncio, os
from flask import Flask
from replistate import NatsBus, PostgresGalleryStore, Replica, ReplicaConfig
from replistate.integrations.flask import Replistate

def make_replica():
    prefix = os.environ["TEST_PREFIX"]
    return Replica(
        ReplicaConfig(replica_id="exiting", subject_prefix=prefix,
                      cache_prefix=prefix + ".invalidate"),
        bus=NatsBus(os.environ["TEST_NATS_URL"]),
        store=PostgresGalleryStore(os.environ["TEST_POSTGRES_URL"],
                                   table=os.environ["TEST_TABLE"]),
    )

async def forever(handle):
    await asyncio.Event().wait()

ext = Replistate(Flask("exiting"), make_replica)
print(ext.start_operation("gallery@model-a", forever), flush=True)
"""


def test_interpreter_exit_stops_replica(
    make_app: AppFactory,
    nats_url: str,
    postgres_url: str,
    prefix: str,
    table_name: str,
) -> None:
    """A process that ends without stop() stops its replica: its work fails."""
    app_b, ext_b = make_app("b")
    ext_b.start()
    env = subprocess_env(
        TEST_PREFIX=prefix,
        TEST_NATS_URL=nats_url,
        TEST_POSTGRES_URL=postgres_url,
        TEST_TABLE=table_name,
    )

    finished = subprocess.run(
        [sys.executable, "-c", ATEXIT_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert finished.returncode == 0, finished.stderr
    job_id = finished.stdout.strip()
    client_b = app_b.test_client()
    wait_until(lambda: job_body(client_b, job_id)["state"] == "failed", "failed")
    assert job_body(client_b, job_id)["error"] == (
        "owner replica exiting stopped before the operation finished"
    )


FORK_SCRIPT = """
import asyncio, json, os, sys, threading, time
from flask import Flask
from replistate import NatsBus, PostgresGalleryStore, Replica, ReplicaConfig
from replistate.integrations.flask import Replistate

reloaded = threading.Event()

def make_replica():
    prefix = os.environ["TEST_PREFIX"]
    replica_id = f"pid-{os.getpid()}"
    replica = Replica(
        ReplicaConfig(replica_id=replica_id, subject_prefix=prefix,
                      cache_prefix=prefix + ".invalidate"),
        bus=NatsBus(os.environ["TEST_NATS_URL"], name=replica_id),
        store=PostgresGalleryStore(os.environ["TEST_POSTGRES_URL"],
                                   table=os.environ["TEST_TABLE"]),
    )
    # The owner runs this hook when its own invalidation comes back from NATS.
    replica.on_models_invalidated(lambda message: reloaded.set())
    return replica

async def finish(handle):
    await handle.update(progress=50.0)

ext = Replistate(Flask("forking"), make_replica, timeout=5)
ext.start()
parent = ext.replica.replica_id
pid = os.fork()
if pid == 0:
    status, body = ext.health()
    print(json.dumps({"child_status": status, "child_replica": body.get("replica")}),
          flush=True)
    sys.exit(0)
os.waitpid(pid, 0)

# The child has exited, its finalizers included: the parent's replica must still
# read and write NATS and PostgreSQL.
job_id = ext.start_operation("gallery@after-fork", finish, element_name="after-fork")
status, body = ext.health()
reloaded.wait(20)
# The end is written to the store in the background, so it may come after the echo.
stored = None
for attempt in range(400):
    row = ext.call(ext.replica.store.get, job_id)
    stored = row.status.value if row else None
    if stored == "completed":
        break
    time.sleep(0.05)
print(json.dumps({
    "parent_status": status,
    "parent_replica": parent,
    "echo_received": reloaded.is_set(),
    "stored": stored,
}), flush=True)
"""


def test_forked_child_gets_own_replica(
    nats_url: str, postgres_url: str, prefix: str, table_name: str
) -> None:
    """A child forked after the start makes its own replica, and the parent's
    keeps working once the child has exited."""
    env = subprocess_env(
        TEST_PREFIX=prefix,
        TEST_NATS_URL=nats_url,
        TEST_POSTGRES_URL=postgres_url,
        TEST_TABLE=table_name,
    )
    try:
        finished = subprocess.run(
            [sys.executable, "-c", FORK_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
    finally:
        asyncio.run(drop_table(postgres_url, table_name))

    assert finished.returncode == 0, finished.stderr
    lines = [json.loads(line) for line in finished.stdout.splitlines()]
    child, parent = lines
    assert child["child_status"] == 200, finished.stderr
    assert child["child_replica"].startswith("pid-")
    assert child["child_replica"] != parent["parent_replica"]
    assert parent["parent_status"] == 200
    assert parent["echo_received"] is True
    assert parent["stored"] == "completed"


def launch_example(
    nats_url: str, postgres_url: str, table: str, work_dir: Path
) -> tuple[subprocess.Popen[str], int, str]:
    """Start `examples/flask_app.py`; return the process, its port and replica id."""
    stderr = (work_dir / "example.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            str(EXAMPLES / "flask_app.py"),
            "--nats-url",
            nats_url,
            "--postgres-url",
            postgres_url,
            "--table",
            table,
            "--models-dir",
            str(work_dir / "models"),
            "--install-seconds",
            "1",
        ],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    stderr.close()
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, (work_dir / "example.log").read_text()
    announced = json.loads(line)
    return process, announced["port"], announced["replica_id"]


def stop_process(process: subprocess.Popen[str]) -> int:
    """Send SIGTERM to a process this test started; return its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    finally:
        if process.stdout is not None:
            process.stdout.close()


def test_client_disconnect_mid_install(
    make_app: AppFactory, nats_url: str, postgres_url: str, tmp_path: Path
) -> None:
    """A client that closes its connection before the reply still gets its install."""
    table = f"flask_disconnect_{uuid.uuid4().hex[:10]}"
    model = f"model-{uuid.uuid4().hex[:8]}"
    process, port, replica_id = launch_example(nats_url, postgres_url, table, tmp_path)
    try:
        app_b, ext_b = make_app("b", subject_prefix="gallery", table=table)
        client_b = app_b.test_client()
        ext_b.start()

        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            request = (
                f"POST /api/models/install/{model} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\r\n"
            )
            client.sendall(request.encode())
        # Closed before reading a byte of the reply.

        wait_until(
            lambda: (
                [s for _, s in stored_states(postgres_url, table, f"gallery@{model}")]
                == ["completed"]
            ),
            "install completed in the store",
        )
        [(job_id, _)] = stored_states(postgres_url, table, f"gallery@{model}")
        wait_until(
            lambda: job_body(client_b, job_id)["state"] == "completed",
            "install completed on the other replica",
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/models") as reply:
            assert json.load(reply) == {"models": [model]}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as reply:
            assert json.load(reply) == {"ready": True, "replica": replica_id}
    finally:
        assert stop_process(process) == 0
        asyncio.run(drop_table(postgres_url, table))
    assert "Traceback" not in (tmp_path / "example.log").read_text()


GUNICORN_APP = """
import asyncio
import logging
import os

from flask import Flask

from replistate import NatsBus, PostgresGalleryStore, Replica, ReplicaConfig
from replistate.integrations.flask import Replistate, operations_blueprint

logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s %(message)s")
PREFIX = os.environ["TEST_PREFIX"]


def make_replica():
    replica_id = f"replica-{os.getpid()}"
    return Replica(
        ReplicaConfig(
            replica_id=replica_id, subject_prefix=PREFIX,
            cache_prefix=PREFIX + ".invalidate",
        ),
        bus=NatsBus(os.environ["TEST_NATS_URL"], name=replica_id),
        store=PostgresGalleryStore(
            os.environ["TEST_POSTGRES_URL"], table=os.environ["TEST_TABLE"]
        ),
    )


app = Flask(__name__)
replistate = Replistate(app, make_replica)
app.register_blueprint(operations_blueprint(prefix="/api"))


@app.get("/healthz")
def healthz():
    status, body = replistate.health(timeout=5)
    return body, status


@app.post("/install/<name>")
def install(name):
    async def work(handle):
        for step in range(1, 11):
            await handle.update(progress=step * 10.0)
            await asyncio.sleep(0.1)

    job_id = replistate.start_operation(f"gallery@{name}", work, element_name=name)
    return {"jobID": job_id}, 202


@app.get("/job/<job_id>")
def job(job_id):
    status, body = replistate.job(job_id, timeout=5)
    return {**body, "replica": replistate.replica.replica_id}, status


# Started in the gunicorn master, before it forks the workers.
replistate.start()
"""


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    """GET `url`; return status and JSON body, or (0, {}) when it fails."""
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)
    except (OSError, ValueError):
        return 0, {}


def gather_replicas(
    urls: list[str], accept: Callable[[int, dict[str, Any]], bool], seconds: float
) -> set[str]:
    """GET `urls` six at a time, so every worker gets some, until three replica
    ids gave an accepted reply or `seconds` passed; return those ids."""
    found: set[str] = set()
    deadline = time.monotonic() + seconds
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        while len(found) < 3 and time.monotonic() < deadline:
            for status, body in pool.map(get_json, urls * 6):
                if accept(status, body):
                    found.add(body["replica"])
    return found


@pytest.mark.timeout(180)
def test_gunicorn_preload_workers(
    nats_url: str, postgres_url: str, prefix: str, table_name: str, tmp_path: Path
) -> None:
    """Under gunicorn --preload, each sync worker forked from a master that started
    the extension serves a replica of its own, and all of them see an install."""
    (tmp_path / "gunicorn_app.py").write_text(GUNICORN_APP)
    log = tmp_path / "gunicorn.log"
    command = [sys.executable, "-m", "gunicorn", "--preload", "--workers", "3"]
    command += ["--worker-class", "sync", "--bind", "127.0.0.1:0"]
    command += ["--no-control-socket", "--chdir", str(tmp_path), "gunicorn_app:app"]
    env = subprocess_env(
        TEST_PREFIX=prefix,
        TEST_NATS_URL=nats_url,
        TEST_POSTGRES_URL=postgres_url,
        TEST_TABLE=table_name,
    )
    with log.open("w") as stderr:
        gunicorn = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True
        )
    try:
        wait_until(lambda: "Listening at: " in log.read_text(), "gunicorn listens")
        listening = log.read_text().split("Listening at: ")[1].split()[0]
        base = listening.rstrip("/")
        master = f"replica-{gunicorn.pid}"

        ready = gather_replicas(
            [f"{base}/healthz"], lambda status, body: status == 200, 60
        )
        assert len(ready) == 3, log.read_text()[-3000:]
        assert master not in ready

        with urllib.request.urlopen(
            urllib.request.Request(f"{base}/install/model-a", method="POST"),
            timeout=10,
        ) as reply:
            assert reply.status == 202
            job_id = json.load(reply)["jobID"]
        completed = gather_replicas(
            [f"{base}/job/{job_id}"],
            lambda status, body: status == 200 and body.get("state") == "completed",
            60,
        )
        assert completed == ready
    finally:
        assert stop_process(gunicorn) == 0
        asyncio.run(drop_table(postgres_url, table_name))
    text = log.read_text()
    assert "Traceback" not in text
    for replica_id in ready | {master}:
        assert f"replica {replica_id!r} stopped" in text


async def test_thread_work_outlives_second_cancel() -> None:
    finished = threading.Event()

    def work(handle: BlockingOperationHandle) -> None:
        handle.wait_for_cancel(30)
        # Clean-up after the cancel, such as removing a partial download.
        time.sleep(0.5)
        finished.set()

    async with Replica() as replica:
        job_id = await replica.operations.start_operation(
            "gallery@m", in_thread(work, 10.0)
        )
        await asyncio.sleep(0.1)
        await replica.operations.cancel(job_id)
        await asyncio.sleep(0.05)
        await replica.operations.cancel(job_id)

        async with asyncio.timeout(10):
            while not (replica.operations.get_status(job_id) or OpStatus()).terminal:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert finished.is_set() is True
        status = replica.operations.get_status(job_id)
        assert status is not None
        assert status.cancelled is True


def test_error_bodies_hide_nats_password() -> None:
    secret = "hunter2"
    closed_port = find_free_port()
    app = Flask("password")
    extension = Replistate(
        app,
        lambda: Replica(
            bus=NatsBus(
                f"nats://admin:{secret}@127.0.0.1:{closed_port}", connect_timeout=1
            )
        ),
        start_timeout=5,
    )
    app.register_blueprint(operations_blueprint(prefix="/api"))
    client = app.test_client()
    try:
        for path in ("/api/ready", "/api/operations"):
            response = client.get(path)
            body = response.get_data(as_text=True)
            assert response.status_code == 503
            assert secret not in body
            assert f"nats://admin:***@127.0.0.1:{closed_port}" in body
    finally:
        with app.app_context():
            extension.stop()
