"""`ops list`, `ops show` and `ops cancel`: operations seen from outside a replica.

Rows are read from PostgreSQL. `ops show --follow` then follows the job's progress
subject on NATS. `ops cancel` goes through `OperationsService.cancel`, the code a
replica runs for its own cancel requests: it stores the intent in the row and
publishes the request on the job's cancel subject, where the owner picks it up.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from datetime import timedelta
from typing import Final

from psycopg import sql

from replistate.admin.command import CommandError, ExitCode
from replistate.admin.connections import open_bus, open_connection, open_store
from replistate.admin.render import (
    detail_lines,
    operations_table,
    printable,
    record_document,
    status_document,
    status_line,
    terminal_width,
    to_json,
)
from replistate.bus.base import Channel
from replistate.codec import ProgressMessage
from replistate.models import TERMINAL_STATES, OperationRecord, OpState, OpStatus
from replistate.opcache import OpCache
from replistate.service import CancelOutcome, OperationsService
from replistate.store.base import GalleryStore
from replistate.subjects import Subjects, validate_job_id

__all__ = [
    "FOLLOW_RECHECK_SECONDS",
    "cancel_operation",
    "list_operations",
    "show_operation",
]

FOLLOW_RECHECK_SECONDS: Final = 5.0
"""Seconds without a message after which `--follow` reads the row again, in case
a message was lost while the bus reconnected."""

END_WRITE_SECONDS: Final = 5.0
"""Seconds `--follow` waits for the end it received to reach the store."""

END_WRITE_POLL_SECONDS: Final = 0.1
"""Seconds between two reads of the row while waiting for that end."""

CANCEL_EXIT_CODES: Final = {
    CancelOutcome.ACCEPTED: ExitCode.OK,
    CancelOutcome.TOO_LATE: ExitCode.TOO_LATE,
    CancelOutcome.NOT_CANCELLABLE: ExitCode.NOT_CANCELLABLE,
    CancelOutcome.UNKNOWN: ExitCode.NOT_FOUND,
}

END_EXIT_CODES: Final = {
    OpState.COMPLETED: ExitCode.OK,
    OpState.FAILED: ExitCode.FAILED,
    OpState.CANCELLED: ExitCode.CANCELLED,
}

# The store has no query for ended rows: this one selects the ids, in the order
# `list_active` uses, and the store reads the rows.
_RECENT_IDS = """
SELECT id FROM {table}
WHERE updated_at >= now() - %(window)s
    OR (lease_expires_at > now() AND status <> ALL(%(terminal)s))
ORDER BY created_at, id
"""


def _write(line: str = "") -> None:
    # The renderers escape what they take from rows and messages already; this
    # covers every other line. It leaves JSON lines unchanged, as `to_json`
    # escapes every control character.
    sys.stdout.write(printable(line) + "\n")
    sys.stdout.flush()


async def list_operations(
    *,
    postgres_url: str,
    table: str,
    window: timedelta,
    include_ended: bool = False,
    json_output: bool = False,
) -> ExitCode:
    """Print the operations of `table`: a table, or one line of JSON.

    Args:
        postgres_url: the PostgreSQL URL.
        table: the operations table.
        window: how recently a row must have been updated to be listed. An
            active row with a running lease is listed whatever its age, as
            replicas hydrate it.
        include_ended: whether to list completed, failed and cancelled rows too.
        json_output: whether to print ``{"table": ..., "operations": [...]}``.
    """
    if include_ended:
        records = await _list_recent(postgres_url, table, window)
    else:
        async with open_store(postgres_url, table) as store:
            records = await store.list_active(window)

    if json_output:
        operations = [record_document(record) for record in records]
        _write(to_json({"table": table, "operations": operations}))
    elif not records:
        kind = "operations" if include_ended else "active operations"
        minutes = window.total_seconds() / 60
        _write(f"no {kind} in table {table!r} updated in the last {minutes:g} min")
    else:
        for line in operations_table(records, terminal_width(sys.stdout)):
            _write(line)
    return ExitCode.OK


async def _list_recent(
    url: str, table: str, window: timedelta
) -> list[OperationRecord]:
    terminal = [state.value for state in TERMINAL_STATES]
    statement = sql.SQL(_RECENT_IDS).format(table=sql.Identifier(*table.split(".")))
    async with open_store(url, table) as store:
        async with await open_connection(url) as connection:
            cursor = await connection.execute(
                statement, {"window": window, "terminal": terminal}
            )
            job_ids = [str(row[0]) for row in await cursor.fetchall()]
        records = await store.get_many(job_ids)
    position = {job_id: index for index, job_id in enumerate(job_ids)}

    return sorted(records, key=lambda record: position[record.id])


async def show_operation(
    *,
    postgres_url: str,
    table: str,
    job_id: str,
    json_output: bool = False,
    follow: bool = False,
    nats_url: str = "",
    prefix: str = "",
) -> ExitCode:
    """Print one operation, and with `follow` each change until it ends.

    Without `follow`, the exit code is `ExitCode.OK` whatever the state. With
    it, the code shows how the operation ended: OK, FAILED or CANCELLED.

    Args:
        postgres_url: the PostgreSQL URL.
        table: the operations table.
        job_id: the job to show.
        json_output: whether to print JSON: ``{"operation": {...}, "status":
            {...}}``, then with `follow` one ``{"job_id", "version", "status"}``
            line per change.
        follow: whether to follow the job on the bus until it is terminal.
        nats_url: the NATS URL, used with `follow`.
        prefix: the subject prefix, used with `follow`.

    Raises:
        CommandError: the job is not in the table (`ExitCode.NOT_FOUND`), or
            a server cannot be reached.
        InvalidIdError: `job_id` or `prefix` cannot be used in a subject.
    """
    validate_job_id(job_id)
    subjects = Subjects(prefix) if follow else None
    async with open_store(postgres_url, table) as store:
        if subjects is None:
            record = await _get(store, job_id, table)
            _print_record(record, json_output)
            return ExitCode.OK
        async with open_bus(nats_url) as bus:
            return await _follow(
                store, Channel(bus), subjects, job_id, table, json_output
            )


async def _get(store: GalleryStore, job_id: str, table: str) -> OperationRecord:
    record = await store.get(job_id)
    if record is None:
        raise CommandError(
            f"job {job_id!r} not found in table {table!r}", ExitCode.NOT_FOUND
        )
    return record


def _print_record(record: OperationRecord, json_output: bool) -> None:
    if json_output:
        document = {
            "operation": record_document(record),
            "status": status_document(record.to_status()),
        }
        _write(to_json(document))
        return
    for line in detail_lines(record, terminal_width(sys.stdout)):
        _write(line)


async def _follow(
    store: GalleryStore,
    channel: Channel,
    subjects: Subjects,
    job_id: str,
    table: str,
    json_output: bool,
) -> ExitCode:
    """Print each change of the job until it is terminal; return how it ended.

    The subscription comes before the read of the row, so no change published
    in between is missed. A change applies when its version is higher than the
    one shown, or when it ends the job.
    """
    received: asyncio.Queue[ProgressMessage] = asyncio.Queue()

    async def receive(subject: str, message: ProgressMessage) -> None:
        received.put_nowait(message)

    subscription = await channel.subscribe(
        subjects.progress(job_id), Channel.decoder(ProgressMessage), receive
    )
    try:
        await channel.bus.flush()
        record = await _get(store, job_id, table)
        _print_record(record, json_output)
        live = _LiveStatus(job_id, json_output)
        status, version = record.to_status(), record.version
        live.show(status, version)
        while not status.terminal:
            try:
                async with asyncio.timeout(FOLLOW_RECHECK_SECONDS):
                    message = await received.get()
                update, update_version = message.status, message.version
            except TimeoutError:
                row = await store.get(job_id)
                if row is None:
                    continue
                update, update_version = row.to_status(), row.version
            if not _supersedes(update, update_version, version):
                continue
            status = status.merged_with(update)
            version = update_version if update_version is not None else version
            live.show(status, version)
        decided = await _decided_end(store, job_id, status.state)
        if decided is not None:
            status, version = status.merged_with(decided.to_status()), decided.version
            live.show(status, version)
        live.end(status)
    finally:
        await subscription.unsubscribe()
    return END_EXIT_CODES.get(status.state, ExitCode.ERROR)


async def _decided_end(
    store: GalleryStore, job_id: str, seen: OpState
) -> OperationRecord | None:
    """Return the row of the job if the store ended it otherwise than `seen`.

    When two ends race, such as a completion and a cancel, the store keeps one
    and replicas converge to it, so the stored end decides the exit code. The
    row is read until it is terminal, for at most `END_WRITE_SECONDS`, because
    the owner writes the end to the store after publishing it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + END_WRITE_SECONDS
    while True:
        row = await store.get(job_id)
        if row is not None and row.status.terminal:
            return row if row.status is not seen else None
        if loop.time() >= deadline:
            return None
        await asyncio.sleep(END_WRITE_POLL_SECONDS)


def _supersedes(update: OpStatus, version: int | None, current_version: int) -> bool:
    # A message from a LocalAI peer has no version, and an end always applies.
    return update.terminal or version is None or version > current_version


class _LiveStatus:
    """The changes `--follow` prints: one redrawn line on a terminal, one line
    per change otherwise."""

    def __init__(self, job_id: str, json_output: bool) -> None:
        self.job_id = job_id
        self.json_output = json_output
        self.width = None if json_output else terminal_width(sys.stdout)

    def show(self, status: OpStatus, version: int) -> None:
        if self.json_output:
            document = {
                "job_id": self.job_id,
                "version": version,
                "status": status_document(status),
            }
            _write(to_json(document))
        elif self.width is not None:
            sys.stdout.write("\r\x1b[K" + status_line(status, self.width))
            sys.stdout.flush()
        else:
            _write(status_line(status))

    def end(self, status: OpStatus) -> None:
        if self.json_output:
            return
        if self.width is not None:
            _write()
        ending = f"job {self.job_id} {status.state.value}"
        if status.error is not None:
            ending += f": {status.error}"
        _write(ending)


async def cancel_operation(
    *,
    postgres_url: str,
    nats_url: str,
    table: str,
    prefix: str,
    job_id: str,
    json_output: bool = False,
) -> ExitCode:
    """Request the cancel of `job_id` as a replica would, and print the outcome.

    The intent is stored in the row and the request is published on the job's
    cancel subject, so the owner stops the work and marks it cancelled. A
    request for a job that already ended changes nothing, so a repeated cancel
    is harmless.

    Args:
        postgres_url: the PostgreSQL URL.
        nats_url: the NATS URL.
        table: the operations table.
        prefix: the subject prefix of the replicas.
        job_id: the job to cancel.
        json_output: whether to print ``{"job_id", "outcome", "state", "owner"}``.

    Returns:
        OK when the cancel was accepted, TOO_LATE when the job already ended,
        NOT_CANCELLABLE when it is marked so, NOT_FOUND when the table lacks it.
    """
    validate_job_id(job_id)
    subjects = Subjects(prefix)
    origin = f"replistate-cli-{uuid.uuid4().hex[:8]}"
    async with open_store(postgres_url, table) as store, open_bus(nats_url) as bus:
        service = OperationsService(
            replica_id=origin,
            subjects=subjects,
            opcache=OpCache(replica_id=origin, subjects=subjects),
            channel=Channel(bus),
            store=store,
        )
        outcome = await service.cancel(job_id)
        record = await store.get(job_id)

    state = record.status.value if record is not None else None
    owner = record.frontend_id if record is not None else None
    if json_output:
        document = {
            "job_id": job_id,
            "outcome": outcome.value,
            "state": state,
            "owner": owner,
        }
        _write(to_json(document))
    elif outcome is CancelOutcome.ACCEPTED:
        _write(
            f"cancel of job {job_id} accepted: stored, and sent to its owner "
            f"{owner or '(unknown)'}"
        )
    elif outcome is CancelOutcome.TOO_LATE:
        _write(f"cancel of job {job_id} too late: the job is already {state}")
    elif outcome is CancelOutcome.NOT_CANCELLABLE:
        _write(f"job {job_id} is marked as not cancellable: cancel not sent")
    else:
        _write(f"job {job_id} not found in table {table!r}: cancel not sent")
    return CANCEL_EXIT_CODES[outcome]
