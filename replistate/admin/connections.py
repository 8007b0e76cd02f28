"""Server URLs of the administration commands, and connecting to them.

Each command first opens one plain connection to each server it needs, so that an
unreachable server fails the command at once with the driver's own reason, such as
"Connection refused". The library clients retry until their timeout and log each
attempt, which suits a replica riding out an outage but not a command a person
waits on. URLs are shown with their passwords and tokens replaced by ``***``, and
so are the secrets, or quoted pieces of them, that a server's error repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Final

import nats
import nats.errors
import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from replistate.admin.command import CommandError, ExitCode
from replistate.admin.redact import redact_text, redact_url
from replistate.bus import nats as nats_bus
from replistate.bus.nats import NatsBus
from replistate.errors import BusError, StoreError
from replistate.store.postgres import PostgresGalleryStore

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_NATS_URL",
    "DEFAULT_POSTGRES_URL",
    "NATS_URL_ENV",
    "POSTGRES_URL_ENV",
    "check_nats",
    "make_store",
    "open_bus",
    "open_connection",
    "open_store",
    "redact_url",
    "url_from_env",
]

NATS_URL_ENV: Final = "REPLISTATE_NATS_URL"
POSTGRES_URL_ENV: Final = "REPLISTATE_POSTGRES_URL"
DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"
DEFAULT_POSTGRES_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
"""The `postgres` superuser and database that every PostgreSQL install creates."""

CONNECT_TIMEOUT: Final = 5.0
"""Seconds a first connection to NATS or PostgreSQL may take."""

CLIENT_NAME: Final = "replistate-cli"
"""The client name NATS monitoring shows for the commands' connections."""


def url_from_env(name: str, default: str) -> str:
    """Return the URL in environment variable `name`, or `default` if unset or
    empty."""
    return os.environ.get(name) or default


def _reason(error: BaseException, url: str) -> str:
    if isinstance(error, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    text = " ".join(str(error).split()) or type(error).__name__
    return redact_text(text.removeprefix("connection failed: "), url)


async def open_connection(url: str) -> psycopg.AsyncConnection[TupleRow]:
    """Open one autocommit connection to PostgreSQL.

    Raises:
        CommandError: the URL is invalid (`ExitCode.USAGE`), or the server cannot
            be connected to within `CONNECT_TIMEOUT` (`ExitCode.UNREACHABLE`).
    """
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT + 1):
            return await psycopg.AsyncConnection.connect(
                url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT)
            )
    except psycopg.ProgrammingError as exc:
        # libpq could not parse the URL, so the position of its password is
        # unknown and the URL is not shown.
        raise CommandError(
            f"invalid PostgreSQL URL: {_reason(exc, url)}; use a URL such as "
            "postgresql://USER:PASSWORD@HOST:PORT/DBNAME or key=value pairs",
            ExitCode.USAGE,
        ) from None
    except (psycopg.OperationalError, TimeoutError, OSError) as exc:
        raise CommandError(
            f"cannot connect to PostgreSQL at {redact_url(url)}: {_reason(exc, url)}",
            ExitCode.UNREACHABLE,
        ) from None


def make_store(url: str, table: str) -> PostgresGalleryStore:
    """Return an unopened store on `table`.

    Raises:
        CommandError: the table name is invalid (`ExitCode.USAGE`).
    """
    try:
        return PostgresGalleryStore(
            url, table=table, min_size=1, max_size=2, timeout=CONNECT_TIMEOUT
        )
    except ValueError as exc:
        raise CommandError(str(exc), ExitCode.USAGE) from None


@contextlib.asynccontextmanager
async def open_store(
    url: str, table: str, *, table_needed: bool = True
) -> AsyncIterator[PostgresGalleryStore]:
    """Connect to PostgreSQL and yield an open store on `table`.

    Args:
        url: the PostgreSQL URL.
        table: the operations table, optionally as ``schema.table``.
        table_needed: whether a missing table is an error (`ExitCode.ERROR`).

    Raises:
        CommandError: see `open_connection` and `make_store`.
    """
    store = make_store(url, table)
    connection = await open_connection(url)
    try:
        if table_needed:
            await _check_table(connection, url, table)
    finally:
        await connection.close()
    try:
        await store.open()
    except StoreError as exc:
        raise CommandError(str(exc), ExitCode.UNREACHABLE) from None
    try:
        yield store
    finally:
        await store.close()


async def _check_table(
    connection: psycopg.AsyncConnection[TupleRow], url: str, table: str
) -> None:
    name = sql.Identifier(*table.split(".")).as_string(connection)
    try:
        cursor = await connection.execute("SELECT to_regclass(%s)", (name,))
        row = await cursor.fetchone()
    except psycopg.Error as exc:
        raise CommandError(
            f"cannot look up table {table!r}: {_reason(exc, url)}", ExitCode.ERROR
        ) from None
    if row is None or row[0] is None:
        raise CommandError(
            f"table {table!r} not found in PostgreSQL at {redact_url(url)}: pass "
            f"the --table your replicas use, or create it with "
            f"'replistate schema --apply --table {table}'",
            ExitCode.ERROR,
        )


async def check_nats(url: str) -> None:
    """Connect to NATS once, without retrying, and disconnect.

    Raises:
        CommandError: the server cannot be connected to within
            `CONNECT_TIMEOUT` (`ExitCode.UNREACHABLE`).
    """
    errors: list[BaseException] = []

    async def record(error: Exception) -> None:
        errors.append(error)

    servers = [server.strip() for server in url.split(",")]
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            # One retry per server at most: nats-py retries forever otherwise.
            client = await nats.connect(
                servers,
                name=CLIENT_NAME,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                connect_timeout=int(CONNECT_TIMEOUT),
                error_cb=record,
            )
    except (TimeoutError, OSError, ValueError, nats.errors.Error) as exc:
        cause = errors[-1] if errors else exc
        raise CommandError(
            f"cannot connect to NATS at {redact_url(url)}: {_reason(cause, url)}",
            ExitCode.UNREACHABLE,
        ) from None
    await client.close()


@contextlib.asynccontextmanager
async def open_bus(url: str) -> AsyncIterator[NatsBus]:
    """Connect to NATS and yield the connected bus; close it on exit.

    Once connected, the bus reconnects after an outage as a replica's does. Its
    log lines, such as the warning on a disconnect, show the URL redacted.

    Raises:
        CommandError: see `check_nats`.
    """
    await check_nats(url)
    bus = NatsBus(url, name=CLIENT_NAME, connect_timeout=CONNECT_TIMEOUT)
    log_filter = _RedactingFilter(url)
    nats_bus.logger.addFilter(log_filter)
    try:
        try:
            await bus.connect()
        except BusError as exc:
            raise CommandError(
                redact_text(str(exc), url), ExitCode.UNREACHABLE
            ) from None
        try:
            yield bus
        finally:
            await bus.close()
    finally:
        nats_bus.logger.removeFilter(log_filter)


class _RedactingFilter(logging.Filter):
    """Replaces the secrets of a URL in the log records that pass through it."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message, self.url)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True
