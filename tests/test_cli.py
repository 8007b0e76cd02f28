"""The `replistate` command: ops, watch and schema against real NATS and PostgreSQL.

Commands run in-process through `main` in a worker thread, or as a child process
(`python -m replistate.cli`) where the test needs signals, a real stderr, or a
command that runs while the test acts on the bus.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
import psycopg
import pytest

from replistate import (
    NatsBus,
    OperationHandle,
    OperationRecord,
    OpState,
    OpStatus,
    PostgresGalleryStore,
    Replica,
    ReplicaConfig,
)
from replistate._servers import ThrowawayNats, find_free_port
from replistate.admin import watch as admin_watch
from replistate.admin.command import print_error
from replistate.admin.connections import open_bus, redact_url
from replistate.admin.render import (
    detail_lines,
    operations_table,
    progress_bar,
    status_line,
    to_json,
    utc_text,
)
from replistate.admin.watch import EventKind, decode_event, default_patterns, event_line
from replistate.cli import build_parser, main
from replistate.codec import ProgressMessage, encode
from replistate.subjects import Subjects

from .conftest import drop_table, eventually

pytestmark = pytest.mark.timeout(60)

REPLICA_ID = "replica-cli"
ESCAPES = "\x1b]0;owned\x07\x1b[2J\x9b1m\u202e"
"""Control characters as a hostile message could contain them: a window title set
with OSC, a screen clear, a C1 CSI and a right-to-left override."""
SHOWN_ESCAPES = "\\x1b]0;owned\\x07\\x1b[2J\\x9b1m\\u202e"
"""`ESCAPES` as the text output shows them."""
RAW_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]")
"""Control characters that must not reach a terminal: all but newline and tab."""
COLUMNS = {
    "id",
    "gallery_element_name",
    "cache_key",
    "is_backend_op",
    "op_type",
    "status",
    "progress",
    "message",
    "error",
    "file_name",
    "total_file_size",
    "downloaded_file_size",
    "frontend_id",
    "cancellable",
    "created_at",
    "updated_at",
    "version",
    "lease_expires_at",
    "cancel_requested",
}
CHILD_TIMEOUT = 30.0


@attrs.define
class Result:
    """Exit code and output of one command."""

    code: int
    out: str
    err: str


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    """Run the command in-process, in a thread with an event loop of its own."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


async def spawn(*argv: str, env: Mapping[str, str] | None = None) -> Child:
    """Start the command as a child process."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "replistate.cli",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env) if env is not None else None,
    )
    return Child(process)


@attrs.define
class Child:
    """A command running as a child process."""

    process: asyncio.subprocess.Process

    async def read_line(self, stream: str = "stdout") -> str:
        """Return the next line of stdout or stderr, failing on end of file."""
        reader = self.process.stdout if stream == "stdout" else self.process.stderr
        assert reader is not None
        async with asyncio.timeout(CHILD_TIMEOUT):
            line = await reader.readline()
        assert line, f"the command closed its {stream}"
        return line.decode()

    async def wait_watching(self) -> None:
        """Wait for the line `watch` prints on stderr once it is subscribed."""
        line = await self.read_line("stderr")
        assert line.startswith("watching "), line

    async def finish(self) -> Result:
        """Wait for the exit; return the code and the rest of the output."""
        async with asyncio.timeout(CHILD_TIMEOUT):
            out, err = await self.process.communicate()
        assert self.process.returncode is not None
        return Result(self.process.returncode, out.decode(), err.decode())

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


@pytest.fixture
async def children() -> AsyncIterator[list[Child]]:
    """Child processes of the test, killed at the end if still running."""
    started: list[Child] = []
    yield started
    for child in started:
        child.kill()
        await child.process.wait()


class Gate:
    """Work for an operation that reports 40 %, then waits to be released.

    Once released it reports 80 % and returns, or raises `failure` if set.
    """

    def __init__(self, failure: str | None = None) -> None:
        self.released = asyncio.Event()
        self.failure = failure

    async def work(self, handle: OperationHandle) -> None:
        await handle.update(
            progress=40.0,
            message="downloading model-a.gguf",
            file_name="model-a.gguf",
            file_size="2.3 GB",
            downloaded_size="0.9 GB",
        )
        await self.released.wait()
        await handle.update(progress=80.0, message="unpacking")
        if self.failure is not None:
            raise RuntimeError(self.failure)


async def finish_at_once(handle: OperationHandle) -> None:
    await handle.update(progress=50.0, message="halfway")


@attrs.define
class Cluster:
    """One replica on this test's prefix and table, with the command's options."""

    replica: Replica
    nats_url: str
    postgres_url: str
    table: str
    prefix: str

    @property
    def store(self) -> PostgresGalleryStore:
        assert isinstance(self.replica.store, PostgresGalleryStore)
        return self.replica.store

    def postgres_options(self) -> list[str]:
        return ["--postgres-url", self.postgres_url, "--table", self.table]

    def nats_options(self) -> list[str]:
        return ["--nats-url", self.nats_url, "--prefix", self.prefix]

    def options(self) -> list[str]:
        return [*self.postgres_options(), *self.nats_options()]

    async def start(
        self, work: Any, model: str = "model-a", *, cancellable: bool = True
    ) -> str:
        return await self.replica.operations.start_operation(
            f"gallery@{model}", work, element_name=model, cancellable=cancellable
        )

    async def stored(self) -> None:
        """Wait until every status written so far is in the table."""
        writer = self.replica.operations.writer
        assert writer is not None
        async with asyncio.timeout(10):
            await writer.flush()

    async def row(self, job_id: str) -> OperationRecord:
        record = await self.store.get(job_id)
        assert record is not None
        return record

    def status(self, job_id: str) -> OpStatus:
        status = self.replica.operations.get_status(job_id)
        assert status is not None
        return status


@pytest.fixture
async def cluster(
    nats_url: str, postgres_url: str, prefix: str, table_name: str
) -> AsyncIterator[Cluster]:
    """A started replica on this test's prefix and table; the table is dropped at
    the end."""
    replica = Replica(
        ReplicaConfig(
            replica_id=REPLICA_ID,
            subject_prefix=prefix,
            cache_prefix=f"{prefix}.invalidate",
        ),
        bus=NatsBus(nats_url, name=REPLICA_ID),
        store=PostgresGalleryStore(postgres_url, table=table_name),
    )
    await replica.start()
    yield Cluster(replica, nats_url, postgres_url, table_name, prefix)
    await replica.stop()
    await drop_table(postgres_url, table_name)


async def running(cluster: Cluster, gate: Gate) -> str:
    """Start an operation on `gate` and wait until its 40 % is stored."""
    job_id = await cluster.start(gate.work)
    await eventually(lambda: cluster.status(job_id).progress == 40.0)
    await cluster.stored()
    return job_id


def parse_details(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Split `ops show` output into its stored fields and its decoded status."""
    stored_text, _, status_text = text.partition("status as replicas decode it:")
    sections = []
    for section in (stored_text, status_text):
        fields = {}
        for line in section.splitlines():
            key, _, value = line.strip().partition(" ")
            if key:
                fields[key] = value.strip()
        sections.append(fields)
    return sections[0], sections[1]


# Rendering -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("percent", "width", "bar"),
    [
        (0.0, 12, "[..........]"),
        (40.0, 12, "[####......]"),
        (99.9, 12, "[#########.]"),
        (100.0, 12, "[##########]"),
        (150.0, 7, "[#####]"),
        (-5.0, 7, "[.....]"),
        (50.0, 1, "[.]"),
    ],
)
def test_progress_bar_width(percent: float, width: int, bar: str) -> None:
    assert progress_bar(percent, width) == bar
    assert len(bar) == max(width, 3)


def table_records() -> list[OperationRecord]:
    updated = datetime(2025, 1, 31, 12, 0, 3, tzinfo=UTC)
    return [
        OperationRecord(
            id="job-1",
            gallery_element_name="model-a",
            status=OpState.DOWNLOADING,
            progress=42.5,
            frontend_id="replica-a",
            updated_at=updated,
        ),
        OperationRecord(
            id="job-22",
            cache_key="gallery@model-b",
            status=OpState.PENDING,
            updated_at=updated,
        ),
    ]


def test_operations_table_without_bars() -> None:
    assert operations_table(table_records()) == [
        "JOB     NAME             STATE        PROGRESS  OWNER      UPDATED",
        "job-1   model-a          downloading   42%      replica-a  "
        "2025-01-31T12:00:03Z",
        "job-22  gallery@model-b  pending        0%      -          "
        "2025-01-31T12:00:03Z",
    ]


def test_operations_table_bars_fill_width() -> None:
    """The bar takes the room the other columns leave on a 100-column terminal."""
    lines = operations_table(table_records(), width=100)

    assert lines == [
        "JOB     NAME             STATE        PROGRESS                      "
        "OWNER      UPDATED",
        "job-1   model-a          downloading  [########.............]  42%  "
        "replica-a  2025-01-31T12:00:03Z",
        "job-22  gallery@model-b  pending      [.....................]   0%  "
        "-          2025-01-31T12:00:03Z",
    ]
    assert max(len(line) for line in lines) == 99


def test_operations_table_bar_limits() -> None:
    """No bar where the rows would wrap; at most 32 columns of bar."""
    narrow = operations_table(table_records(), width=88)
    just_enough = operations_table(table_records(), width=89)
    wide = operations_table(table_records(), width=400)

    assert narrow == operations_table(table_records())
    assert f" [{'.' * 10}]   0% " in just_enough[2]
    assert max(len(line) for line in just_enough) == 88
    assert f" [{'.' * 30}]   0% " in wide[2]


def test_status_line_fits_terminal() -> None:
    status = OpStatus(progress=40.0, message="downloading " + "x" * 200)

    assert status_line(status) == f" 40% downloading downloading {'x' * 200}"
    line = status_line(status, 60)
    assert len(line) == 59
    assert line.startswith("[#######...........]  40% downloading downloading x")


def test_status_line_shows_error() -> None:
    status = OpStatus(processed=True, error="disk full", progress=80.0)

    assert status_line(status) == " 80% failed (error: disk full)"


def test_status_line_escapes_controls() -> None:
    status = OpStatus(progress=40.0, message=f"get {ESCAPES}", error=f"x{ESCAPES}\ny")

    line = status_line(status)
    cut = status_line(status, 60)

    assert line == (
        f" 40% downloading get {SHOWN_ESCAPES} (error: x{SHOWN_ESCAPES}\\ny)"
    )
    assert RAW_CONTROLS.search(cut) is None
    assert len(cut) == 59


def test_operations_table_escapes_controls() -> None:
    record = OperationRecord(
        id="job-1",
        gallery_element_name=f"model{ESCAPES}",
        frontend_id=f"replica{ESCAPES}",
        updated_at=datetime(2025, 1, 31, 12, 0, 3, tzinfo=UTC),
    )

    header, row = operations_table([record], width=400)

    assert row.split() == [
        "job-1",
        f"model{SHOWN_ESCAPES}",
        "pending",
        f"[{'.' * 30}]",
        "0%",
        f"replica{SHOWN_ESCAPES}",
        "2025-01-31T12:00:03Z",
    ]
    assert header.index("OWNER") == row.index("replica")


def test_detail_lines_escape_controls() -> None:
    record = OperationRecord(
        id="job-1", message=f"get {ESCAPES}", error=f"x{ESCAPES}", frontend_id="r"
    )

    lines = detail_lines(record, width=100)

    assert RAW_CONTROLS.search("\n".join(lines)) is None
    stored, decoded = parse_details("\n".join(lines))
    assert stored["message"] == f"get {SHOWN_ESCAPES}"
    assert stored["error"] == f"x{SHOWN_ESCAPES}"
    assert decoded["message"] == f"get {SHOWN_ESCAPES}"
    assert decoded["error"] == f"x{SHOWN_ESCAPES}"


def test_json_escapes_every_control() -> None:
    """JSON lines contain no raw control character and decode to the exact text."""
    document = {"message": f"a{ESCAPES}\u0085\x7f\u2066z"}

    line = to_json(document)

    assert RAW_CONTROLS.search(line) is None
    assert "\u2066" not in line
    assert json.loads(line) == document


def test_print_error_escapes_controls(capsys: pytest.CaptureFixture[str]) -> None:
    print_error(f"table {ESCAPES} failed")

    assert capsys.readouterr().err == f"replistate: table {SHOWN_ESCAPES} failed\n"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://postgres@127.0.0.1:5432/test", None),
        (
            "postgresql://postgres:hunter2@127.0.0.1:5432/test",
            "postgresql://postgres:***@127.0.0.1:5432/test",
        ),
        (
            "postgresql://127.0.0.1/test?password=hunter2&sslmode=off",
            "postgresql://127.0.0.1/test?password=***&sslmode=off",
        ),
        (
            "host=127.0.0.1 password=hunter2 dbname=test",
            "host=127.0.0.1 password=*** dbname=test",
        ),
        ("nats://tok3n@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),
        (
            "nats://a:hunter2@127.0.0.1:4222,nats://127.0.0.1:4223",
            "nats://a:***@127.0.0.1:4222,nats://127.0.0.1:4223",
        ),
        ("nats://127.0.0.1:4222", None),
        # libpq ends a password at the first "@" before a "/", not at "?" or "#".
        (
            "postgresql://postgres:hun?ter2@127.0.0.1:5432/test",
            "postgresql://postgres:***@127.0.0.1:5432/test",
        ),
        (
            "postgresql://postgres:hun#ter2@127.0.0.1/test",
            "postgresql://postgres:***@127.0.0.1/test",
        ),
        (
            "postgresql://postgres:hun@ter2@127.0.0.1/test",
            "postgresql://postgres:***@127.0.0.1/test",
        ),
        (
            "postgresql://postgres:hun/ter2@127.0.0.1/test",
            "postgresql://postgres:***@127.0.0.1/test",
        ),
        (
            "postgresql://postgres:hun,ter2@127.0.0.1:5432,127.0.0.2:5433/test",
            "postgresql://postgres:***@127.0.0.1:5432,127.0.0.2:5433/test",
        ),
        (
            "postgresql://:hunter2@127.0.0.1/test?sslmode=off",
            "postgresql://:***@127.0.0.1/test?sslmode=off",
        ),
        (
            "postgresql://127.0.0.1/test?%70assword=hunter2",
            "postgresql://127.0.0.1/test?%70assword=***",
        ),
        (
            "postgresql://127.0.0.1/test?sslpassword=hunter2&password=hun%26ter2",
            "postgresql://127.0.0.1/test?sslpassword=***&password=***",
        ),
        (
            "postgresql://127.0.0.1?user=me@corp&password=hunter2",
            "postgresql://127.0.0.1?user=me@corp&password=***",
        ),
        (
            "host=127.0.0.1 password='hun\\'ter 2' dbname=test",
            "host=127.0.0.1 password='***' dbname=test",
        ),
        (
            "host=127.0.0.1 password = 'hunter 2'dbname=test",
            "host=127.0.0.1 password = '***'dbname=test",
        ),
        (
            "host=127.0.0.1\tpassword=hun\\ ter2\nuser=me",
            "host=127.0.0.1\tpassword=***\nuser=me",
        ),
        # libpq rejects an upper-case scheme, so the password cannot be located.
        ("POSTGRESQL://postgres:hunter2@127.0.0.1/test", "***"),
        ("nats://a:hun?ter2@127.0.0.1:4222", "nats://a:***@127.0.0.1:4222"),
        ("nats://a:hun#ter2@127.0.0.1:4222", "nats://a:***@127.0.0.1:4222"),
        ("nats://a:hun/ter2@127.0.0.1:4222", "nats://a:***@127.0.0.1:4222"),
        ("nats://a:hun,ter2@127.0.0.1:4222", "nats://a:***@127.0.0.1:4222"),
        ("nats://hun?ter2@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),
        ("a:hunter2@127.0.0.1:4222", "a:***@127.0.0.1:4222"),
        (
            "tls://a:hunter2@127.0.0.1:4222, nats://tok3n@127.0.0.2:4222",
            "tls://a:***@127.0.0.1:4222, nats://***@127.0.0.2:4222",
        ),
    ],
)
def test_redact_url(url: str, shown: str | None) -> None:
    assert redact_url(url) == (shown or url)


def test_redact_url_falls_back_to_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    """When libpq still reads a password in the redacted string, only the user,
    host, port and database are shown."""
    monkeypatch.setattr("replistate.admin.redact._redact_pairs", lambda text: text)

    redacted = redact_url(
        "host=127.0.0.1 port=5432 user=me password=hunter2 dbname=test sslmode=off"
    )

    assert redacted == "host=127.0.0.1 port=5432 dbname=test user=me password=***"


# Watch decoding --------------------------------------------------------------

SUBJECTS = Subjects("gallery", "cache.invalidate")
RECEIVED = datetime(2025, 1, 31, 12, 0, 3, 250000, tzinfo=UTC)


def local_time() -> str:
    return RECEIVED.astimezone().strftime("%H:%M:%S.") + "250"


def test_decode_progress_event() -> None:
    message = ProgressMessage(
        job_id="job-1",
        status=OpStatus(progress=40.0, message="downloading", cancellable=True),
        origin="replica-a",
        version=3,
    )

    event = decode_event(
        "gallery.job-1.progress", encode(message), SUBJECTS, received=RECEIVED
    )

    assert event.kind is EventKind.PROGRESS
    assert event.job_id == "job-1"
    assert event.decoded == message
    assert event.invalid is None
    document = event.document()
    assert document["time"] == "2025-01-31T12:00:03.250+00:00"
    assert document["state"] == "downloading"
    assert document["progress"] == 40.0
    assert document["message"] == "downloading"
    assert document["error"] is None
    assert document["origin"] == "replica-a"
    assert document["version"] == 3
    assert document["payload"]["status"]["cancellable"] is True
    assert event_line(event) == (
        f"{local_time()} progress            job-1 downloading 40% downloading "
        "(from replica-a version 3)"
    )
    assert event_line(event, 12) == (
        f"{local_time()} progress            job-1 downloading [####......] 40% "
        "downloading (from replica-a version 3)"
    )


def test_decode_malformed_payload() -> None:
    event = decode_event(
        "gallery.job-1.progress", b"{not json", SUBJECTS, received=RECEIVED
    )

    assert event.kind is EventKind.PROGRESS
    assert event.job_id == "job-1"
    assert event.decoded is None
    assert event.invalid is not None
    assert event.invalid.startswith("payload is not JSON")
    assert event.raw == "{not json"
    assert event_line(event).endswith(
        f"job-1 INVALID: {event.invalid} payload: {{not json"
    )


def test_decode_wrongly_typed_field() -> None:
    event = decode_event(
        "gallery.job-1.cancel", b'{"id": 7}', SUBJECTS, received=RECEIVED
    )

    assert event.kind is EventKind.CANCEL
    assert event.job_id == "job-1"
    assert event.invalid is not None
    assert "invalid CancelMessage" in event.invalid
    assert event.raw == '{"id": 7}'


def test_decode_job_mismatch_is_flagged() -> None:
    message = ProgressMessage(job_id="job-2", status=OpStatus())

    event = decode_event(
        "gallery.job-1.progress", encode(message), SUBJECTS, received=RECEIVED
    )

    assert event.job_id == "job-1"
    assert event.decoded == message
    assert event.invalid == (
        "job id 'job-2' in the payload differs from 'job-1' in the subject, so "
        "replicas drop it"
    )


def test_decode_opcache_and_invalidation() -> None:
    start = decode_event(
        "gallery.opcache.start",
        b'{"job_id": "job-1", "cache_key": "gallery@m", "is_backend": true}',
        SUBJECTS,
        received=RECEIVED,
    )
    reload = decode_event(
        "cache.invalidate.backends",
        b'{"element": "m", "op": "delete", "origin": "replica-b"}',
        SUBJECTS,
        received=RECEIVED,
    )

    assert start.kind is EventKind.OPCACHE_START
    assert start.job_id == "job-1"
    assert event_line(start) == (
        f"{local_time()} opcache.start       job-1 cache key gallery@m (backend)"
    )
    assert reload.kind is EventKind.INVALIDATE_BACKENDS
    assert reload.job_id is None
    assert event_line(reload) == (
        f"{local_time()} invalidate.backends - element m op delete (from replica-b)"
    )


def test_decode_other_subject() -> None:
    event = decode_event("gallery.misc", b"\xffhello", SUBJECTS, received=RECEIVED)

    assert event.kind is EventKind.OTHER
    assert event.job_id is None
    assert event.decoded is None
    assert event.invalid is None
    assert event.raw == "\ufffdhello"


def test_default_patterns_do_not_overlap() -> None:
    assert default_patterns(Subjects("gallery", "cache.invalidate")) == [
        "gallery.>",
        "cache.invalidate.>",
    ]
    assert default_patterns(Subjects("ops", "ops.invalidate")) == ["ops.>"]
    assert default_patterns(SUBJECTS, "job-1") == [
        "gallery.job-1.*",
        "gallery.opcache.*",
    ]


# Options ---------------------------------------------------------------------


def test_url_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REPLISTATE_NATS_URL", raising=False)
    monkeypatch.delenv("REPLISTATE_POSTGRES_URL", raising=False)

    args = build_parser().parse_args(["ops", "cancel", "job-1"])

    assert args.nats_url == "nats://127.0.0.1:4222"
    assert args.postgres_url == "postgresql://postgres@127.0.0.1:5432/postgres"
    assert args.table == "gallery_operations"
    assert args.prefix == "gallery"


def test_url_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLISTATE_NATS_URL", "nats://127.0.0.1:14222")
    monkeypatch.setenv("REPLISTATE_POSTGRES_URL", "postgresql://127.0.0.1:15432/x")

    watch_args = build_parser().parse_args(["watch"])
    schema_args = build_parser().parse_args(["schema"])
    flag_args = build_parser().parse_args(["watch", "--nats-url", "nats://a:1"])

    assert watch_args.nats_url == "nats://127.0.0.1:14222"
    assert schema_args.postgres_url == "postgresql://127.0.0.1:15432/x"
    assert flag_args.nats_url == "nats://a:1"


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["ops", "list", "--window-seconds", "inf"],
            "replistate ops list: error: argument --window-seconds: invalid number "
            "'inf': use a finite number of seconds",
        ),
        (
            ["ops", "list", "--window-seconds", "1e309"],
            "replistate ops list: error: argument --window-seconds: invalid number "
            "'1e309': use a finite number of seconds",
        ),
        (
            ["ops", "list", "--window-seconds", "nan"],
            "replistate ops list: error: argument --window-seconds: invalid number "
            "'nan': use a finite number of seconds",
        ),
        (
            ["ops", "list", "--all", "--window-seconds", "1e14"],
            "replistate ops list: error: argument --window-seconds: 1e+14 s is too "
            "long: use at most 1e+09 s (about 31 years)",
        ),
        (
            ["ops", "list", "--window-seconds=-5"],
            "replistate ops list: error: argument --window-seconds: -5 is not "
            "greater than zero",
        ),
        (
            ["watch", "--count", "inf"],
            "replistate watch: error: argument --count: invalid whole number 'inf'",
        ),
        (
            ["watch", "--count", "0"],
            "replistate watch: error: argument --count: 0 is not greater than zero",
        ),
        (
            ["demo", "--install-seconds", "nan"],
            "replistate demo: error: argument --install-seconds: invalid number "
            "'nan': use a finite number of seconds",
        ),
        (
            ["demo", "--install-seconds", "inf"],
            "replistate demo: error: argument --install-seconds: invalid number "
            "'inf': use a finite number of seconds",
        ),
        (
            ["demo", "--install-seconds", "86400"],
            "replistate demo: error: argument --install-seconds: 86400 s is too "
            "long: use at most 3600 s",
        ),
    ],
)
def test_numeric_option_rejected(
    capsys: pytest.CaptureFixture[str], argv: list[str], error: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)

    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == error


def test_numeric_option_limits() -> None:
    parser = build_parser()

    window = parser.parse_args(["ops", "list", "--window-seconds", "1e9"])
    install = parser.parse_args(["demo", "--install-seconds", "3600"])
    count = parser.parse_args(["watch", "--count", str(10**30)])

    assert window.window_seconds == 1e9
    assert install.install_seconds == 3600.0
    assert count.count == 10**30


async def test_infinite_window_is_usage_error(children: list[Child]) -> None:
    """The value is rejected with exit code 2 before the command runs."""
    port = find_free_port()
    url = f"postgresql://postgres@127.0.0.1:{port}/test"
    child = await spawn("ops", "list", "--window-seconds", "inf", "--postgres-url", url)
    children.append(child)

    result = await child.finish()

    assert result.code == 2
    assert result.out == ""
    assert "Traceback" not in result.err
    assert result.err.splitlines()[-1] == (
        "replistate ops list: error: argument --window-seconds: invalid number "
        "'inf': use a finite number of seconds"
    )


async def test_invalid_job_id_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """The id is rejected before any server is contacted."""
    result = await cli(
        capsys, "ops", "show", "a.b", "--postgres-url", "postgresql://127.0.0.1:1/x"
    )

    assert result.code == 2
    assert result.out == ""
    assert result.err == (
        "replistate: invalid id 'a.b': job id contains '.' at index 1, which would "
        "change the meaning of a subject; use an id without '.', '*', '>', "
        "whitespace or control characters\n"
    )


async def test_invalid_subject_pattern(capsys: pytest.CaptureFixture[str]) -> None:
    result = await cli(
        capsys, "watch", "--subject", "gallery.>.progress", "--nats-url", "nats://x:1"
    )

    assert result.code == 2
    assert result.err == (
        "replistate: invalid subject 'gallery.>.progress': '>' must be last\n"
    )


async def test_invalid_table_name(capsys: pytest.CaptureFixture[str]) -> None:
    result = await cli(capsys, "schema", "--table", "a..b")

    assert result.code == 2
    assert result.err.startswith("replistate: invalid table name 'a..b': ")
    assert result.err.count("\n") == 1


# Unreachable servers -----------------------------------------------------------


async def test_unreachable_postgres(children: list[Child]) -> None:
    port = find_free_port()
    url = f"postgresql://postgres:hunter2@127.0.0.1:{port}/test"
    child = await spawn("ops", "list", "--postgres-url", url)
    children.append(child)

    result = await child.finish()

    assert result.code == 3
    assert result.out == ""
    assert result.err.count("\n") == 1
    assert result.err.startswith(
        "replistate: cannot connect to PostgreSQL at "
        f"postgresql://postgres:***@127.0.0.1:{port}/test: "
    )
    assert "Connection refused" in result.err
    assert "hunter2" not in result.err


async def test_unreachable_nats_from_environment(children: list[Child]) -> None:
    port = find_free_port()
    env = {**os.environ, "REPLISTATE_NATS_URL": f"nats://127.0.0.1:{port}"}
    child = await spawn("watch", env=env)
    children.append(child)

    result = await child.finish()

    assert result.code == 3
    assert result.out == ""
    assert result.err.count("\n") == 1
    assert result.err.startswith(
        f"replistate: cannot connect to NATS at nats://127.0.0.1:{port}: "
    )
    assert "Connect call failed" in result.err


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (
            "postgresql://postgres:hun?ter2@127.0.0.1:{port}/test",
            "postgresql://postgres:***@127.0.0.1:{port}/test",
        ),
        (
            "postgresql://postgres:hun#ter2@127.0.0.1:{port}/test",
            "postgresql://postgres:***@127.0.0.1:{port}/test",
        ),
        (
            "host=127.0.0.1 port={port} user=postgres password='hun\\'s ter2'",
            "host=127.0.0.1 port={port} user=postgres password='***'",
        ),
    ],
)
async def test_unreachable_postgres_hides_password(
    capsys: pytest.CaptureFixture[str], url: str, redacted: str
) -> None:
    port = find_free_port()

    result = await cli(capsys, "ops", "list", "--postgres-url", url.format(port=port))

    assert result.code == 3
    assert result.err.startswith(
        f"replistate: cannot connect to PostgreSQL at {redacted.format(port=port)}: "
    )
    assert "hun" not in result.err
    assert "ter2" not in result.err


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (
            "POSTGRESQL://postgres:hunter2@127.0.0.1:1/test",
            'missing "=" after "***" in connection info string',
        ),
        (
            "postgresql://postgres:hun%zzter2@127.0.0.1:1/test",
            'invalid percent-encoded token: "***"',
        ),
        ("host=127.0.0.1 password=hun ter2", 'missing "=" after "***" in connection'),
    ],
)
async def test_invalid_postgres_url_hides_password(
    capsys: pytest.CaptureFixture[str], url: str, reason: str
) -> None:
    """libpq quotes the part of the URL it cannot parse, password included."""
    result = await cli(capsys, "ops", "list", "--postgres-url", url)

    assert result.code == 2
    assert result.err.startswith(f"replistate: invalid PostgreSQL URL: {reason}")
    assert result.err.endswith(
        "; use a URL such as postgresql://USER:PASSWORD@HOST:PORT/DBNAME or "
        "key=value pairs\n"
    )
    assert "hun" not in result.err
    assert "ter2" not in result.err


async def test_unreachable_nats_hides_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = find_free_port()
    url = f"nats://cli:hun?ter2@127.0.0.1:{port}"

    result = await cli(capsys, "watch", "--nats-url", url)

    assert result.code == 3
    assert result.err.startswith(
        f"replistate: cannot connect to NATS at nats://cli:***@127.0.0.1:{port}: "
    )
    assert "hun" not in result.err
    assert "ter2" not in result.err


async def test_bus_log_lines_hide_password(
    caplog: pytest.LogCaptureFixture, nats_url: str
) -> None:
    """The bus logs its URL, such as on a disconnect; the commands print those
    lines on stderr."""
    caplog.set_level(logging.INFO, logger="replistate.bus.nats")
    url = nats_url.replace("nats://", "nats://cli:hunter2@", 1)
    redacted = nats_url.replace("nats://", "nats://cli:***@", 1)

    async with open_bus(url):
        logging.getLogger("replistate.bus.nats").warning(
            "disconnected from NATS at %s, reconnecting", url
        )

    assert caplog.messages[:2] == [
        f"connected to NATS at {redacted}",
        f"disconnected from NATS at {redacted}, reconnecting",
    ]
    assert not any("hunter2" in message for message in caplog.messages)


async def test_missing_table(
    capsys: pytest.CaptureFixture[str], postgres_url: str, table_name: str
) -> None:
    result = await cli(
        capsys, "ops", "list", "--postgres-url", postgres_url, "--table", table_name
    )

    assert result.code == 1
    assert result.err.startswith(f"replistate: table '{table_name}' not found in ")
    assert result.err.endswith(
        f"create it with 'replistate schema --apply --table {table_name}'\n"
    )


async def test_cancel_without_nats_stores_nothing(
    capsys: pytest.CaptureFixture[str], postgres_url: str, table_name: str
) -> None:
    store = PostgresGalleryStore(postgres_url, table=table_name)
    await store.open()
    try:
        await store.ensure_schema()
        await store.upsert_placeholder(OperationRecord(id="job-1", cancellable=True))
        port = find_free_port()

        result = await cli(
            capsys,
            "ops",
            "cancel",
            "job-1",
            "--postgres-url",
            postgres_url,
            "--table",
            table_name,
            "--nats-url",
            f"nats://127.0.0.1:{port}",
        )

        assert result.code == 3
        assert result.out == ""
        assert result.err.startswith("replistate: cannot connect to NATS at ")
        row = await store.get("job-1")
        assert row is not None
        assert row.cancel_requested is False
    finally:
        await store.close()
        await drop_table(postgres_url, table_name)


# ops list and ops show -----------------------------------------------------------


async def test_ops_list_text(
    capsys: pytest.CaptureFixture[str], cluster: Cluster
) -> None:
    gate = Gate()
    job_id = await running(cluster, gate)
    row = await cluster.row(job_id)

    result = await cli(capsys, "ops", "list", *cluster.postgres_options())

    assert result.code == 0
    assert result.err == ""
    header, *rows = result.out.splitlines()
    assert header.split() == ["JOB", "NAME", "STATE", "PROGRESS", "OWNER", "UPDATED"]
    assert [line.split() for line in rows] == [
        [
            job_id,
            "model-a",
            "downloading",
            "40%",
            REPLICA_ID,
            utc_text(row.updated_at),
        ]
    ]
    gate.released.set()


async def test_ops_list_json(
    capsys: pytest.CaptureFixture[str], cluster: Cluster
) -> None:
    gate = Gate()
    job_id = await running(cluster, gate)
    row = await cluster.row(job_id)

    result = await cli(capsys, "ops", "list", "--json", *cluster.postgres_options())

    assert result.code == 0
    assert result.out.count("\n") == 1
    document = json.loads(result.out)
    assert document["table"] == cluster.table
    [operation] = document["operations"]
    assert set(operation) == COLUMNS
    assert operation["id"] == job_id
    assert operation["gallery_element_name"] == "model-a"
    assert operation["cache_key"] == "gallery@model-a"
    assert operation["is_backend_op"] is False
    assert operation["op_type"] == "install"
    assert operation["status"] == "downloading"
    assert operation["progress"] == 40.0
    assert operation["message"] == "downloading model-a.gguf"
    assert operation["error"] is None
    assert operation["file_name"] == "model-a.gguf"
    assert operation["total_file_size"] == "2.3 GB"
    assert operation["downloaded_file_size"] == "0.9 GB"
    assert operation["frontend_id"] == REPLICA_ID
    assert operation["cancellable"] is True
    assert operation["cancel_requested"] is False
    assert operation["version"] == row.version
    assert row.updated_at is not None
    assert datetime.fromisoformat(operation["updated_at"]) == row.updated_at
    gate.released.set()


async def test_ops_list_all_adds_ended(
    capsys: pytest.CaptureFixture[str], cluster: Cluster
) -> None:
    gate = Gate()
    running_job = await running(cluster, gate)
    done_job = await cluster.start(finish_at_once, "model-b")
    await eventually(lambda: cluster.status(done_job).state is OpState.COMPLETED)
    await cluster.stored()

    active = await cli(capsys, "ops", "list", "--json", *cluster.postgres_options())
    every = await cli(
        capsys, "ops", "list", "--all", "--json", *cluster.postgres_options()
    )

    active_states = {
        op["id"]: op["status"] for op in json.loads(active.out)["operations"]
    }
    all_states = {op["id"]: op["status"] for op in json.loads(every.out)["operations"]}
    assert active_states == {running_job: "downloading"}
    assert all_states == {running_job: "downloading", done_job: "completed"}
    gate.released.set()


async def test_ops_list_empty(
    capsys: pytest.CaptureFixture[str], cluster: Cluster
) -> None:
    result = await cli(
        capsys, "ops", "list", "--window-seconds", "600", *cluster.postgres_options()
    )

    assert result.code == 0
    assert result.out == (
        f"no active operations in table '{cluster.table}' updated in the last 10 min\n"
    )


async def test_ops_show_text(
    capsys: pytest.CaptureFixture[str], cluster: Cluster
) -> None:
    gate = Gate()
    job_id = await running(cluster, gate)
    row = await cluster.row(job_id)

    result = await cli(capsys, "ops", "show", job_id, *cluster.postgres_options())

    assert result.code == 0
    stored, decoded = parse_details(result.out)
    assert stored == {
        "id": job_id,
        "gallery_element_name": "model-a",
        "cache_key": "gallery@model-a",
        "is_backend_op": "false",
        "op_type": "install",
        "status": "downloading",
        "progress": "40%",
        "message": "downloading model-a.gguf",
        "error": "-",
        "file_name": "model-a.gguf",
        "total_file_size": "2.3 GB",
        "downloaded_file_size": "0.9 GB",
        "frontend_id": REPLICA_ID,
        "cancellable": "true",
        "created_at": utc_text(row.created_at),
        "updated_at": utc_text(row.updated_at),
        "version": str(row.version),
        "lease_expires_at": utc_text(row.lease_expires_at),
        "cancel_requested": "false",
    }
    assert decoded == {
        "deletion": "false",
        "file_name": "model-a.gguf",
        "processed": "false",
        "message": "downloading model-a.gguf",
        "progress": "40",
        "file_size": "2.3 GB",
        "downloaded_size": "0.9 GB",
        "gallery_element_name": "model-a",
        "cancelled": "false",
        "cancellable": "true",
        "state": "downloading",
        "terminal": "false",
    }
    gate.released.set()


async def test_ops_show_json(
    capsys: pytest.CaptureFixture[str], cluster: Cluster
) -> None:
    gate = Gate(failure="disk full")
    job_id = await running(cluster, gate)
    gate.released.set()
    await eventually(lambda: cluster.status(job_id).state is OpState.FAILED)
    await cluster.stored()

    result = await cli(
        capsys, "ops", "show", job_id, "--json", *cluster.postgres_options()
    )

    assert result.code == 0
    document = json.loads(result.out)
    assert set(document["operation"]) == COLUMNS
    assert document["operation"]["status"] == "failed"
    assert document["operation"]["error"] == "disk full"
    assert document["status"] == {
        "deletion": False,
        "file_name": "model-a.gguf",
        "error": "disk full",
        "processed": True,
        "message": "unpacking",
        "progress": 80.0,
        "file_size": "2.3 GB",
        "downloaded_size": "0.9 GB",
        "gallery_element_name": "model-a",
        "cancelled": False,
        "cancellable": False,
        "state": "failed",
        "terminal": True,
    }


async def test_ops_show_unknown_job(
    capsys: pytest.CaptureFixture[str], cluster: Cluster
) -> None:
    result = await cli(
        capsys, "ops", "show", "no-such-job", *cluster.postgres_options()
    )

    assert result.code == 4
    assert result.out == ""
    assert result.err == (
        f"replistate: job 'no-such-job' not found in table '{cluster.table}'\n"
    )


def follow_states(lines: list[str]) -> list[tuple[int, str, float]]:
    """Return version, state and progress of each `--follow --json` change."""
    states = []
    for line in lines:
        document = json.loads(line)
        states.append(
            (
                document["version"],
                document["status"]["state"],
                document["status"]["progress"],
            )
        )
    return states


async def test_ops_show_follow_until_completed(
    cluster: Cluster, children: list[Child]
) -> None:
    gate = Gate()
    job_id = await running(cluster, gate)
    stored_version = (await cluster.row(job_id)).version
    child = await spawn("ops", "show", job_id, "--follow", "--json", *cluster.options())
    children.append(child)
    first = json.loads(await child.read_line())
    assert first["operation"]["id"] == job_id
    assert first["status"]["progress"] == 40.0

    gate.released.set()
    result = await child.finish()

    assert result.code == 0, result.err
    assert result.err == ""
    latest = cluster.replica.operations.version_of(job_id)
    assert latest is not None
    assert follow_states(result.out.splitlines()) == [
        (stored_version, "downloading", 40.0),
        (latest - 1, "downloading", 80.0),
        (latest, "completed", 100.0),
    ]


async def test_ops_show_follow_failed(cluster: Cluster, children: list[Child]) -> None:
    gate = Gate(failure="disk full")
    job_id = await running(cluster, gate)
    child = await spawn("ops", "show", job_id, "--follow", *cluster.options())
    children.append(child)
    while not (await child.read_line()).startswith(" 40% downloading"):
        pass

    gate.released.set()
    result = await child.finish()

    assert result.code == 7
    assert result.out.splitlines() == [
        " 80% downloading unpacking",
        " 80% failed unpacking (error: disk full)",
        f"job {job_id} failed: disk full",
    ]


@pytest.mark.integration
async def test_ops_show_follow_store_decides(
    nats_url: str,
    postgres_url: str,
    prefix: str,
    table_name: str,
    children: list[Child],
) -> None:
    """An end received on the bus that lost the race in the store is replaced by
    the stored end, which sets the exit code."""
    store = PostgresGalleryStore(postgres_url, table=table_name)
    bus = NatsBus(nats_url)
    await store.open()
    await bus.connect()
    try:
        await store.ensure_schema()
        await store.save_status("job-1", OpStatus(progress=40.0), version=1)
        child = await spawn(
            "ops",
            "show",
            "job-1",
            "--follow",
            "--json",
            "--postgres-url",
            postgres_url,
            "--table",
            table_name,
            "--nats-url",
            nats_url,
            "--prefix",
            prefix,
        )
        children.append(child)
        await child.read_line()
        cancelled = OpStatus(progress=40.0, cancelled=True, message="cancelled")
        await store.save_status("job-1", cancelled, version=3)

        completed = OpStatus(progress=100.0, processed=True, message="completed")
        message = ProgressMessage(job_id="job-1", status=completed, version=2)
        await bus.publish(f"{prefix}.job-1.progress", encode(message))
        result = await child.finish()

        assert result.code == 8, result.err
        assert follow_states(result.out.splitlines()) == [
            (1, "downloading", 40.0),
            (2, "completed", 100.0),
            (3, "cancelled", 40.0),
        ]
    finally:
        await bus.close()
        await store.close()
        await drop_table(postgres_url, table_name)


async def test_ops_show_follow_already_ended(
    capsys: pytest.CaptureFixture[str], cluster: Cluster
) -> None:
    job_id = await cluster.start(finish_at_once)
    await eventually(lambda: cluster.status(job_id).state is OpState.COMPLETED)
    await cluster.stored()

    result = await cli(capsys, "ops", "show", job_id, "--follow", *cluster.options())

    assert result.code == 0
    assert result.out.splitlines()[-2:] == [
        "100% completed completed",
        f"job {job_id} completed",
    ]


async def test_ops_output_escapes_controls(
    capsys: pytest.CaptureFixture[str],
    nats_url: str,
    postgres_url: str,
    prefix: str,
    table_name: str,
) -> None:
    """Row text reaches the terminal escaped, and the JSON output exact."""
    store = PostgresGalleryStore(postgres_url, table=table_name)
    await store.open()
    try:
        await store.ensure_schema()
        status = OpStatus(
            progress=40.0,
            message=f"get {ESCAPES}",
            error=f"x{ESCAPES}",
            processed=True,
            gallery_element_name=f"model{ESCAPES}",
        )
        await store.save_status(
            "job-1", status, version=1, frontend_id=f"replica{ESCAPES}"
        )
        options = ["--postgres-url", postgres_url, "--table", table_name]

        listing = await cli(capsys, "ops", "list", "--all", *options)
        details = await cli(capsys, "ops", "show", "job-1", *options)
        followed = await cli(
            capsys,
            "ops",
            "show",
            "job-1",
            "--follow",
            *options,
            "--nats-url",
            nats_url,
            "--prefix",
            prefix,
        )
        document = await cli(capsys, "ops", "show", "job-1", "--json", *options)

        assert listing.code == 0
        assert RAW_CONTROLS.search(listing.out) is None
        assert listing.out.splitlines()[1].split()[:2] == [
            "job-1",
            f"model{SHOWN_ESCAPES}",
        ]
        assert details.code == 0
        assert RAW_CONTROLS.search(details.out) is None
        stored, _ = parse_details(details.out)
        assert stored["message"] == f"get {SHOWN_ESCAPES}"
        assert stored["frontend_id"] == f"replica{SHOWN_ESCAPES}"
        assert followed.code == 7, followed.err
        assert RAW_CONTROLS.search(followed.out) is None
        assert followed.out.splitlines()[-1] == f"job job-1 failed: x{SHOWN_ESCAPES}"
        assert document.code == 0
        assert RAW_CONTROLS.search(document.out) is None
        operation = json.loads(document.out)["operation"]
        assert operation["message"] == f"get {ESCAPES}"
        assert operation["error"] == f"x{ESCAPES}"
        assert operation["frontend_id"] == f"replica{ESCAPES}"
    finally:
        await store.close()
        await drop_table(postgres_url, table_name)


# ops cancel ------------------------------------------------------------------


async def test_ops_cancel_running_job(
    capsys: pytest.CaptureFixture[str], cluster: Cluster, children: list[Child]
) -> None:
    """The owner stops the work; a follower exits with the cancelled code."""
    gate = Gate()
    job_id = await running(cluster, gate)
    follower = await spawn(
        "ops", "show", job_id, "--follow", "--json", *cluster.options()
    )
    children.append(follower)
    await follower.read_line()

    result = await cli(capsys, "ops", "cancel", job_id, *cluster.options())

    assert result.code == 0
    assert result.err == ""
    assert result.out == (
        f"cancel of job {job_id} accepted: stored, and sent to its owner {REPLICA_ID}\n"
    )
    await eventually(lambda: cluster.status(job_id).cancelled)
    await cluster.stored()
    row = await cluster.row(job_id)
    assert row.status is OpState.CANCELLED
    assert row.cancel_requested is True
    await eventually(lambda: cluster.replica.operations.owned_jobs == [])
    followed = await follower.finish()
    assert followed.code == 8
    assert follow_states(followed.out.splitlines())[-1][1:] == ("cancelled", 40.0)

    again = await cli(capsys, "ops", "cancel", job_id, "--json", *cluster.options())

    assert again.code == 5
    assert json.loads(again.out) == {
        "job_id": job_id,
        "outcome": "too_late",
        "state": "cancelled",
        "owner": REPLICA_ID,
    }
    assert (await cluster.row(job_id)).status is OpState.CANCELLED


async def test_ops_cancel_completed_job(
    capsys: pytest.CaptureFixture[str], cluster: Cluster
) -> None:
    job_id = await cluster.start(finish_at_once)
    await eventually(lambda: cluster.status(job_id).state is OpState.COMPLETED)
    await cluster.stored()

    result = await cli(capsys, "ops", "cancel", job_id, *cluster.options())

    assert result.code == 5
    assert result.out == (
        f"cancel of job {job_id} too late: the job is already completed\n"
    )
    assert (await cluster.row(job_id)).status is OpState.COMPLETED


async def test_ops_cancel_unknown_job(
    capsys: pytest.CaptureFixture[str], cluster: Cluster
) -> None:
    result = await cli(
        capsys, "ops", "cancel", "no-such-job", "--json", *cluster.options()
    )

    assert result.code == 4
    assert json.loads(result.out) == {
        "job_id": "no-such-job",
        "outcome": "unknown",
        "state": None,
        "owner": None,
    }


async def test_ops_cancel_not_cancellable(
    capsys: pytest.CaptureFixture[str], cluster: Cluster
) -> None:
    gate = Gate()
    job_id = await cluster.start(gate.work, cancellable=False)
    await eventually(lambda: cluster.status(job_id).progress == 40.0)
    await cluster.stored()

    result = await cli(capsys, "ops", "cancel", job_id, *cluster.options())

    assert result.code == 6
    assert result.out == f"job {job_id} is marked as not cancellable: cancel not sent\n"
    assert cluster.status(job_id).state is OpState.DOWNLOADING
    gate.released.set()


# watch -----------------------------------------------------------------------


async def test_watch_count_json(cluster: Cluster, children: list[Child]) -> None:
    """Every message of a completing operation, and a malformed one, in order."""
    child = await spawn(
        "watch",
        "--count",
        "7",
        "--json",
        "--cache-prefix",
        f"{cluster.prefix}.invalidate",
        *cluster.nats_options(),
    )
    children.append(child)
    await child.wait_watching()
    bus = cluster.replica.bus
    assert bus is not None
    await bus.publish(f"{cluster.prefix}.bad-job.progress", b"{not json")
    await bus.flush()

    job_id = await cluster.start(finish_at_once)
    result = await child.finish()

    assert result.code == 0, result.err
    events = [json.loads(line) for line in result.out.splitlines()]
    assert [(event["kind"], event["job_id"]) for event in events] == [
        ("progress", "bad-job"),
        ("progress", job_id),
        ("opcache.start", job_id),
        ("progress", job_id),
        ("progress", job_id),
        ("invalidate.models", None),
        ("opcache.end", job_id),
    ]
    bad, queued, start, halfway, done, reload, end = events
    assert bad["subject"] == f"{cluster.prefix}.bad-job.progress"
    assert bad["invalid"].startswith("payload is not JSON")
    assert bad["raw"] == "{not json"
    assert bad["payload"] is None
    assert [
        (e["state"], e["progress"], e["message"], e["version"])
        for e in (queued, halfway, done)
    ] == [
        ("pending", 0.0, "queued", 1),
        ("downloading", 50.0, "halfway", 2),
        ("completed", 100.0, "completed", 3),
    ]
    assert {e["origin"] for e in events[1:]} == {REPLICA_ID}
    assert start["payload"]["cache_key"] == "gallery@model-a"
    assert reload["subject"] == f"{cluster.prefix}.invalidate.models"
    assert reload["payload"]["element"] == "model-a"
    assert reload["payload"]["op"] == "install"
    assert end["invalid"] is None


async def test_watch_job_filter(cluster: Cluster, children: list[Child]) -> None:
    child = await spawn(
        "watch", "--count", "3", "--json", "--job", "job-2", *cluster.nats_options()
    )
    children.append(child)
    await child.wait_watching()
    gates = [Gate(), Gate()]

    await cluster.replica.operations.start_operation(
        "gallery@model-a", gates[0].work, job_id="job-1"
    )
    await cluster.replica.operations.start_operation(
        "gallery@model-b", gates[1].work, job_id="job-2"
    )
    result = await child.finish()

    assert result.code == 0, result.err
    events = [json.loads(line) for line in result.out.splitlines()]
    assert {event["job_id"] for event in events} == {"job-2"}
    assert sorted((event["kind"], event["version"]) for event in events) == [
        ("opcache.start", 1),
        ("progress", 1),
        ("progress", 2),
    ]
    for gate in gates:
        gate.released.set()


async def test_watch_subject_pattern(cluster: Cluster, children: list[Child]) -> None:
    child = await spawn(
        "watch",
        "--count",
        "1",
        "--subject",
        f"{cluster.prefix}.*.cancel",
        *cluster.nats_options(),
    )
    children.append(child)
    await child.wait_watching()
    bus = cluster.replica.bus
    assert bus is not None

    await bus.publish(f"{cluster.prefix}.job-1.progress", b"{}")
    await bus.publish(f"{cluster.prefix}.job-1.cancel", b'{"id": "job-1"}')
    result = await child.finish()

    assert result.code == 0
    line = result.out.rstrip("\n")
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} cancel +job-1", line), line


async def test_watch_escapes_controls(cluster: Cluster, children: list[Child]) -> None:
    """A message that would retitle the window and clear the screen is printed
    escaped, and exact in JSON."""
    options = ["--count", "2", *cluster.nats_options()]
    text_child = await spawn("watch", *options)
    json_child = await spawn("watch", "--json", *options)
    children += [text_child, json_child]
    await text_child.wait_watching()
    await json_child.wait_watching()
    bus = cluster.replica.bus
    assert bus is not None
    status = OpStatus(message=f"get {ESCAPES}", error=f"x{ESCAPES}")
    message = ProgressMessage(job_id="job-1", status=status, origin=f"r{ESCAPES}")

    await bus.publish(f"{cluster.prefix}.job-1.progress", encode(message))
    await bus.publish(f"{cluster.prefix}.misc", f"raw {ESCAPES}".encode())
    text = await text_child.finish()
    documents = await json_child.finish()

    assert text.code == 0, text.err
    assert RAW_CONTROLS.search(text.out) is None
    progress, other = text.out.splitlines()
    assert progress.endswith(
        f"job-1 pending 0% get {SHOWN_ESCAPES} error: x{SHOWN_ESCAPES} "
        f"(from r{SHOWN_ESCAPES})"
    )
    assert other.endswith(f"other               - payload: raw {SHOWN_ESCAPES}")
    assert documents.code == 0, documents.err
    assert RAW_CONTROLS.search(documents.out) is None
    first, second = (json.loads(line) for line in documents.out.splitlines())
    assert first["message"] == f"get {ESCAPES}"
    assert first["error"] == f"x{ESCAPES}"
    assert first["origin"] == f"r{ESCAPES}"
    assert second["raw"] == f"raw {ESCAPES}"


@pytest.mark.integration
async def test_watch_survives_nats_restart(children: list[Child]) -> None:
    """The watch reconnects to a restarted server and prints what follows."""
    with ThrowawayNats() as server:
        child = await spawn(
            "watch", "--count", "2", "--nats-url", server.url, "--prefix", "p"
        )
        children.append(child)
        await child.wait_watching()
        publisher = NatsBus(server.url)
        await publisher.connect()
        await publisher.publish("p.job-1.cancel", b'{"id": "job-1"}')
        await publisher.close()
        assert (await child.read_line()).split()[1:] == ["cancel", "job-1"]

        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.start)
        publisher = NatsBus(server.url)
        await publisher.connect()
        try:
            # Published until the watch, reconnecting in the background, gets one.
            async with asyncio.timeout(CHILD_TIMEOUT):
                while child.process.returncode is None:
                    await publisher.publish("p.job-2.cancel", b'{"id": "job-2"}')
                    await asyncio.sleep(0.2)
        finally:
            await publisher.close()
        result = await child.finish()

    assert result.code == 0
    assert result.out.split()[1:] == ["cancel", "job-2"]
    assert f"disconnected from NATS at {server.url}, reconnecting" in result.err


async def test_watch_counts_dropped_messages(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    nats_url: str,
    prefix: str,
) -> None:
    """Messages beyond the pending limit are dropped and counted on stderr."""
    monkeypatch.setattr(admin_watch, "MAX_PENDING_EVENTS", 1)
    publisher = NatsBus(nats_url)
    await publisher.connect()
    watcher = asyncio.create_task(
        admin_watch.watch(
            nats_url=nats_url,
            prefix=prefix,
            cache_prefix=f"{prefix}.invalidate",
            count=2,
        )
    )
    output, errors = "", ""

    def read() -> str:
        nonlocal output, errors
        captured = capsys.readouterr()
        output += captured.out
        errors += captured.err
        return errors

    try:
        await eventually(lambda: "watching" in read())

        # The burst arrives faster than the watch prints.
        for index in range(50):
            await publisher.publish(
                f"{prefix}.job-{index}.cancel", f'{{"id": "job-{index}"}}'.encode()
            )
        await publisher.flush()
        await eventually(lambda: "dropped" in read())
        await publisher.publish(f"{prefix}.job-last.cancel", b'{"id": "job-last"}')
        async with asyncio.timeout(CHILD_TIMEOUT):
            code = await watcher
    finally:
        watcher.cancel()
        await publisher.close()
    read()

    assert code == 0
    counts = re.findall(r"replistate: (\d+) messages dropped because", errors)
    assert counts, errors
    jobs = [line.split()[2] for line in output.splitlines()]
    assert len(jobs) == 2
    assert jobs[0] == "job-0"
    # The burst may arrive in more than one read, so the second message printed
    # is from the burst or the last one. Messages that arrive after the second
    # is printed are neither printed nor counted.
    published = 50 + (1 if jobs[1] == "job-last" else 0)
    assert len(jobs) + sum(int(count) for count in counts) <= published


async def test_watch_stops_on_sigterm(cluster: Cluster, children: list[Child]) -> None:
    child = await spawn("watch", *cluster.nats_options())
    children.append(child)
    await child.wait_watching()

    child.process.send_signal(signal.SIGTERM)
    result = await child.finish()

    assert result.code == 0
    assert result.out == ""
    assert result.err == ""


async def test_follow_interrupted(cluster: Cluster, children: list[Child]) -> None:
    gate = Gate()
    job_id = await running(cluster, gate)
    child = await spawn("ops", "show", job_id, "--follow", *cluster.options())
    children.append(child)
    while not (await child.read_line()).startswith(" 40% downloading"):
        pass

    child.process.send_signal(signal.SIGINT)
    result = await child.finish()

    assert result.code == 130
    assert result.err == ""
    gate.released.set()


# schema ----------------------------------------------------------------------


async def table_shape(url: str, table: str) -> tuple[list[tuple[Any, ...]], list[str]]:
    """Return the columns and the index definitions of `table`, with the table
    and index names replaced by placeholders."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT column_name, data_type, is_nullable, column_default "
            "FROM information_schema.columns WHERE table_name = %s "
            "ORDER BY ordinal_position",
            (table,),
        )
        columns = await cursor.fetchall()
        cursor = await conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = %s ORDER BY indexname",
            (table,),
        )
        indexes = [row[0] for row in await cursor.fetchall()]
    shapes = [
        re.sub(r"replistate_active_[0-9a-f]{12}", "ACTIVE", index).replace(table, "T")
        for index in indexes
    ]
    return columns, sorted(shapes)


async def test_schema_print_matches_store(
    capsys: pytest.CaptureFixture[str], postgres_url: str, table_name: str
) -> None:
    printed_table = f"{table_name}_printed"
    stored_table = f"{table_name}_stored"
    store = PostgresGalleryStore(postgres_url, table=stored_table)
    try:
        result = await cli(capsys, "schema", "--table", printed_table)
        assert result.code == 0
        assert result.out.startswith("BEGIN;\n")
        assert result.out.endswith("COMMIT;\n")
        async with await psycopg.AsyncConnection.connect(
            postgres_url, autocommit=True
        ) as conn:
            await conn.execute(result.out.encode())
        await store.open()
        await store.ensure_schema()

        printed = await table_shape(postgres_url, printed_table)
        stored = await table_shape(postgres_url, stored_table)

        assert len(printed[0]) == len(COLUMNS)
        assert len(printed[1]) == 2
        assert printed == stored
    finally:
        await store.close()
        await drop_table(postgres_url, printed_table)
        await drop_table(postgres_url, stored_table)


async def test_schema_apply_twice(
    capsys: pytest.CaptureFixture[str], postgres_url: str, table_name: str
) -> None:
    options = ["--postgres-url", postgres_url, "--table", table_name]
    try:
        first = await cli(capsys, "schema", "--apply", *options)
        second = await cli(capsys, "schema", "--apply", *options)
        listing = await cli(capsys, "ops", "list", "--json", *options)

        assert first.code == 0
        assert first.out.startswith(f"table '{table_name}' is ready in PostgreSQL at ")
        assert second.code == 0
        assert second.out == first.out
        assert listing.code == 0
        assert json.loads(listing.out) == {"table": table_name, "operations": []}
    finally:
        await drop_table(postgres_url, table_name)
