"""The example apps, their launcher and their operations page."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from replistate import OpStatus, Replica
from replistate.integrations.api import operation_entry, operations_response
from replistate.subjects import Subjects

from .conftest import Cluster, eventually

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def import_example(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import the module `name` from the examples folder, as the examples run."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module(name)


@pytest.fixture
def model_server(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return import_example("model_server", monkeypatch)


def make_settings(model_server: ModuleType, models_dir: Path) -> Any:
    return model_server.Settings(
        nats_url="unused",
        postgres_url="unused",
        models_dir=models_dir,
        install_seconds=0.1,
    )


INVALID_MODEL_IDS = [
    "",
    "/tmp/escape",
    "../escape",
    "a/b",
    "a\\b",
    ".hidden",
    "a.b",
    "-leading-dash",
    "_leading_underscore",
    "with space",
    "new\nline",
    "trailing-newline\n",
    "a:b",
    "a%2Fb",
    "modèle",
    "x" * 129,
]


@pytest.mark.parametrize("model_id", INVALID_MODEL_IDS)
async def test_install_rejects_invalid_model_id(
    model_id: str, model_server: ModuleType, cluster: Cluster, tmp_path: Path
) -> None:
    models_dir = tmp_path / "models"
    server = model_server.ModelServer(make_settings(model_server, models_dir))
    replica = await cluster.add("a")

    status, body = await server.install(replica, model_id)

    assert status == 400
    assert body == {
        "error": f"invalid model id {model_id!r}: use 1 to 128 letters, digits, "
        "'-' or '_', starting with a letter or a digit"
    }
    assert operations_response(replica) == {"operations": []}
    assert list(models_dir.iterdir()) == []


@pytest.mark.parametrize("model_id", ["a", "7", "llama-3_8B", "x" * 128])
async def test_install_writes_valid_model_id(
    model_id: str, model_server: ModuleType, cluster: Cluster, tmp_path: Path
) -> None:
    models_dir = tmp_path / "models"
    server = model_server.ModelServer(make_settings(model_server, models_dir))
    replica = await cluster.add("a")

    status, body = await server.install(replica, model_id)

    assert status == 202
    assert body["replica"] == "a"
    model_file = models_dir / f"{model_id}.yaml"
    await eventually(model_file.exists)
    assert model_file.read_text() == f"name: {model_id}\n"
    assert [path.name for path in models_dir.iterdir()] == [model_file.name]


async def test_install_model_rejects_invalid_id(
    model_server: ModuleType, tmp_path: Path
) -> None:
    """The install work checks the id too, as it builds the file path from it."""
    with pytest.raises(ValueError, match=re.escape("invalid model id '../escape'")):
        await model_server.install_model(None, "../escape", tmp_path, 0.1)


async def test_aiohttp_example_rejects_encoded_slash(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp decodes %2F in a path parameter, which must not make the model
    file land outside the models folder."""
    example = import_example("aiohttp_app", monkeypatch)
    replica = await cluster.add("a", start=False)

    def make_replica(self: Any) -> Replica:
        return replica

    monkeypatch.setattr(example.ModelServer, "make_replica", make_replica)
    models_dir = tmp_path / "models"
    outside = tmp_path / "outside"
    encoded = str(outside).replace("/", "%2F")
    client = TestClient(
        TestServer(example.make_app(make_settings(example, models_dir)))
    )
    await client.start_server()
    try:
        response = await client.post(f"/api/models/install/{encoded}")
        body = await response.json()
        listing = await (await client.get("/api/operations")).json()
    finally:
        await client.close()

    assert response.status == 400
    assert body["error"].startswith(f"invalid model id {str(outside)!r}")
    assert listing == {"operations": []}
    assert not outside.with_suffix(".yaml").exists()


class FakeServer:
    """Stands in for a throwaway server the launcher would start."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.closed = False

    def start(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


THROWAWAY_NATS_URL = "nats://127.0.0.1:1"
THROWAWAY_POSTGRES_URL = "postgresql://postgres@127.0.0.1:2/throwaway"
GIVEN_NATS_URL = "nats://127.0.0.1:4222"
GIVEN_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.mark.parametrize("text", ["inf", "nan", "-1", "0", "1e-7", "1e300", "soon"])
@pytest.mark.parametrize(
    "name", ["--install-seconds", "--lease-seconds", "--reap-seconds"]
)
def test_example_rejects_invalid_seconds(
    model_server: ModuleType,
    capsys: pytest.CaptureFixture[str],
    name: str,
    text: str,
) -> None:
    arguments = ["--nats-url", "n", "--postgres-url", "p", "--models-dir", "m"]

    with pytest.raises(SystemExit) as raised:
        model_server.parse_settings([*arguments, name, text], "test")

    assert raised.value.code == 2
    assert f"argument {name}: invalid duration {text!r}" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["inf", "nan", "0", "1e-7", "1e300"])
def test_example_env_rejects_invalid_seconds(
    model_server: ModuleType, text: str
) -> None:
    environ = {
        "REPLISTATE_NATS_URL": "n",
        "REPLISTATE_POSTGRES_URL": "p",
        "EXAMPLE_MODELS_DIR": "m",
        "EXAMPLE_INSTALL_SECONDS": text,
    }

    with pytest.raises(SystemExit) as raised:
        model_server.settings_from_env(environ)

    assert str(raised.value) == (
        f"EXAMPLE_INSTALL_SECONDS: invalid duration {text!r}: expected a number "
        "of seconds from 0.01 to 1000000"
    )


def test_settings_reject_infinite_seconds(model_server: ModuleType) -> None:
    with pytest.raises(ValueError, match="invalid install_seconds inf"):
        model_server.Settings(
            nats_url="n",
            postgres_url="p",
            models_dir=Path("m"),
            install_seconds=float("inf"),
        )


def option(arguments: list[str], name: str) -> str | None:
    """Return the value after `name` in `arguments`, or None without it."""
    if name not in arguments:
        return None
    return arguments[arguments.index(name) + 1]


@pytest.mark.parametrize("nats_given", [False, True])
@pytest.mark.parametrize("postgres_given", [False, True])
def test_launcher_isolates_given_servers(
    nats_given: bool, postgres_given: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A given NATS server gets a subject prefix of the replicas' own, and a given
    PostgreSQL a table of their own, dropped at exit."""
    launch = import_example("launch", monkeypatch)
    for name in (launch.NATS_ENV, launch.POSTGRES_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(launch, "ThrowawayNats", lambda: FakeServer(THROWAWAY_NATS_URL))
    monkeypatch.setattr(
        launch, "ThrowawayPostgres", lambda: FakeServer(THROWAWAY_POSTGRES_URL)
    )
    replica_args: list[list[str]] = []
    dropped: list[tuple[str, str]] = []

    async def serve(
        args: argparse.Namespace, arguments: list[str], *rest: object
    ) -> int:
        replica_args.append(arguments)
        return 0

    def drop_table(url: str, table: str, out: object) -> None:
        dropped.append((url, table))

    monkeypatch.setattr(launch, "serve", serve)
    monkeypatch.setattr(launch, "drop_table", drop_table)
    argv = ["--json"]
    if nats_given:
        argv += ["--nats-url", GIVEN_NATS_URL]
    if postgres_given:
        argv += ["--postgres-url", GIVEN_POSTGRES_URL]

    assert launch.main(argv) == 0

    [arguments] = replica_args
    nats_url = GIVEN_NATS_URL if nats_given else THROWAWAY_NATS_URL
    postgres_url = GIVEN_POSTGRES_URL if postgres_given else THROWAWAY_POSTGRES_URL
    assert option(arguments, "--nats-url") == nats_url
    assert option(arguments, "--postgres-url") == postgres_url
    prefix = option(arguments, "--subject-prefix")
    table = option(arguments, "--table")
    assert table is not None
    if nats_given:
        assert prefix is not None
        assert prefix.startswith("replistate_launch_")
        # The replicas fail to start on a prefix that is not valid in subjects.
        Subjects(prefix=prefix, cache_prefix=f"{prefix}.invalidate")
    else:
        assert prefix is None
    if postgres_given:
        assert table.startswith("replistate_launch_")
        assert dropped == [(GIVEN_POSTGRES_URL, table)]
    else:
        assert table == "gallery_operations"
        assert dropped == []
    if nats_given and postgres_given:
        assert prefix == table


# The page as it lists what `operation_entry` returns for operations in each state.
PAGE_OPERATIONS = [
    operation_entry(
        "gallery@retrying",
        "job-retrying",
        False,
        OpStatus(
            progress=40.0,
            message="retrying mirror 2",
            error="mirror 1 timed out",
            gallery_element_name="retrying",
            cancellable=True,
        ),
    ),
    operation_entry(
        "gallery@failed",
        "job-failed",
        False,
        OpStatus(
            progress=70.0,
            processed=True,
            error="checksum mismatch",
            gallery_element_name="failed",
            cancellable=False,
        ),
    ),
    operation_entry(
        "gallery@running",
        "job-running",
        False,
        OpStatus(
            progress=10.0,
            message="downloading",
            gallery_element_name="running",
            cancellable=True,
        ),
    ),
    operation_entry("gallery@queued", "job-queued", False, None),
]

READ_CARDS = """
const cards = {};
for (const card of document.querySelectorAll("#operations .card")) {
  const error = card.querySelector(".card-error");
  cards[card.dataset.jobId] = {
    state: card.dataset.state,
    cancellable: card.dataset.cancellable,
    cancelShown: !card.querySelector("[data-action=cancel]").hidden,
    errorShown: !error.hidden,
    errorText: error.textContent,
    severity: error.dataset.severity || null,
  };
}
return cards;
"""


@contextlib.contextmanager
def serve_page(operations: list[dict[str, Any] | None]) -> Iterator[str]:
    """Serve the operations page and a fixed operations listing on loopback."""
    page = (EXAMPLES / "operations.html").read_bytes()
    listing = json.dumps({"operations": operations}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/":
                body, content_type = page, "text/html; charset=utf-8"
            elif self.path == "/api/operations":
                body, content_type = listing, "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_page_tells_warning_from_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running operation that reported a recoverable error stays running, with
    the error as a warning and its Cancel button. Only an operation that can no
    longer be cancelled shows as failed."""
    browser = importlib.import_module("tests.test_browser")
    if browser.MISSING_BROWSER is not None:
        if os.environ.get(browser.REQUIRE_ENV) == "1":
            pytest.fail(browser.MISSING_BROWSER)
        pytest.skip(browser.MISSING_BROWSER)

    with (
        serve_page(PAGE_OPERATIONS) as url,
        browser.open_browser(tmp_path, monkeypatch) as driver,
    ):
        driver.get(url)
        browser.wait_until(
            lambda: driver.execute_script("return document.body.dataset.refreshes"),
            "the page never refreshed",
        )
        cards = driver.execute_script(READ_CARDS)

    assert cards["job-retrying"] == {
        "state": "running",
        "cancellable": "true",
        "cancelShown": True,
        "errorShown": True,
        "errorText": "Warning: mirror 1 timed out",
        "severity": "warning",
    }
    assert cards["job-failed"] == {
        "state": "failed",
        "cancellable": "false",
        "cancelShown": False,
        "errorShown": True,
        "errorText": "Error: checksum mismatch",
        "severity": "error",
    }
    assert cards["job-running"]["state"] == "running"
    assert cards["job-running"]["cancelShown"] is True
    assert cards["job-running"]["errorShown"] is False
    assert cards["job-running"]["severity"] is None
    assert cards["job-queued"]["state"] == "queued"
    assert cards["job-queued"]["cancelShown"] is False
    assert cards["job-queued"]["errorShown"] is False
    assert browser.non_loopback_traffic(tmp_path / "netlog.json") == []
