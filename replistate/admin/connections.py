"""Server URLs of the administration commands, and connecting to them.

Each command first opens one plain connection to each server it needs, so that an
unreachable server fails the command at once with the driver's own reason, such as
"Connection refused". The library clients retry until their timeout and log each
attempt, which suits a replica riding out an outage but not a command a person
waits on. URLs are shown with their password replaced by ``***``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from typing import Final

import nats
import nats.errors
import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from replistate.admin.command import CommandError, ExitCode
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

_PASSWORD_PARAMETER = re.compile(r"(password\s*=\s*)('[^']*'|[^\s&]+)")


def url_from_env(name: str, default: str) -> str:
    """Return the URL in environment variable `name`, or `default` if unset or
    empty."""
    return os.environ.get(name) or default


def redact_url(url: str) -> str:
    """Return `url` with its password, or its NATS token, replaced by ``***``.

    Handles comma-separated NATS server lists, URLs, and libpq ``key=value``
    strings.
    """
    parts = []
    for part in url.split(","):
        scheme, separator, rest = part.partition("://")
        if separator:
            end = min((rest.find(c) for c in "/?#" if c in rest), default=len(rest))
            userinfo, at, host = rest[:end].rpartition("@")
            if at:
                user, colon, _ = userinfo.partition(":")
                if colon:
                    userinfo = f"{user}:***"
                elif not scheme.startswith("postgres"):
                    # nats://TOKEN@host carries a secret token as the user name.
                    userinfo = "***"
                part = f"{scheme}://{userinfo}@{host}{rest[end:]}"
        parts.append(_PASSWORD_PARAMETER.sub(r"\1***", part))
    return ",".join(parts)


def _reason(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    text = " ".join(str(error).split()) or type(error).__name__
    return text.removeprefix("connection failed: ")


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
        raise CommandError(
            f"invalid PostgreSQL URL {redact_url(url)!r}: {_reason(exc)}",
            ExitCode.USAGE,
        ) from None
    except (psycopg.OperationalError, TimeoutError, OSError) as exc:
        raise CommandError(
            f"cannot connect to PostgreSQL at {redact_url(url)}: {_reason(exc)}",
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
            f"cannot look up table {table!r}: {_reason(exc)}", ExitCode.ERROR
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
            f"cannot connect to NATS at {redact_url(url)}: {_reason(cause)}",
            ExitCode.UNREACHABLE,
        ) from None
    await client.close()


@contextlib.asynccontextmanager
async def open_bus(url: str) -> AsyncIterator[NatsBus]:
    """Connect to NATS and yield the connected bus; close it on exit.

    Once connected, the bus reconnects after an outage as a replica's does.

    Raises:
        CommandError: see `check_nats`.
    """
    await check_nats(url)
    bus = NatsBus(url, name=CLIENT_NAME, connect_timeout=CONNECT_TIMEOUT)
    try:
        await bus.connect()
    except BusError as exc:
        message = str(exc).replace(url, redact_url(url))
        raise CommandError(message, ExitCode.UNREACHABLE) from None
    try:
        yield bus
    finally:
        await bus.close()
