"""The `GalleryStore` on PostgreSQL, through psycopg 3 and a connection pool.

The table is LocalAI's `gallery_operations` with replistate's columns added
(`version`, `lease_expires_at`, `cancel_requested`); `ensure_schema` adds them to an
existing LocalAI table too. Every statement is parameterized, and the table name is
quoted as an identifier.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import psycopg
import psycopg_pool
from psycopg import sql

from replistate.errors import StoreError
from replistate.models import (
    TERMINAL_STATES,
    OperationRecord,
    OpState,
    OpStatus,
    OpType,
)
from replistate.store.base import ACTIVE_WINDOW

__all__ = ["DEFAULT_TABLE", "PostgresGalleryStore"]

logger = logging.getLogger(__name__)

DEFAULT_TABLE = "gallery_operations"

_TERMINAL = [state.value for state in TERMINAL_STATES]

_CREATE = """
CREATE TABLE IF NOT EXISTS {table} (
    id text PRIMARY KEY,
    gallery_element_name text NOT NULL DEFAULT '',
    cache_key text NOT NULL DEFAULT '',
    is_backend_op boolean NOT NULL DEFAULT false,
    op_type text NOT NULL DEFAULT 'install',
    status text NOT NULL DEFAULT 'pending',
    progress double precision NOT NULL DEFAULT 0,
    message text NOT NULL DEFAULT '',
    error text,
    file_name text NOT NULL DEFAULT '',
    total_file_size text NOT NULL DEFAULT '',
    downloaded_file_size text NOT NULL DEFAULT '',
    frontend_id text NOT NULL DEFAULT '',
    cancellable boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE {table}
    ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS lease_expires_at timestamptz,
    ADD COLUMN IF NOT EXISTS cancel_requested boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS {active_index} ON {table} (updated_at)
    WHERE status NOT IN ('completed', 'failed', 'cancelled');
"""

_UPSERT_PLACEHOLDER = """
INSERT INTO {table} AS held (
    id, gallery_element_name, cache_key, is_backend_op, op_type, status,
    frontend_id, cancellable
) VALUES (
    %(id)s, %(gallery_element_name)s, %(cache_key)s, %(is_backend_op)s,
    %(op_type)s, %(status)s, %(frontend_id)s, %(cancellable)s
)
ON CONFLICT (id) DO UPDATE SET
    gallery_element_name = COALESCE(
        NULLIF(EXCLUDED.gallery_element_name, ''), held.gallery_element_name),
    cache_key = COALESCE(NULLIF(held.cache_key, ''), EXCLUDED.cache_key),
    is_backend_op = held.is_backend_op OR EXCLUDED.is_backend_op,
    op_type = EXCLUDED.op_type,
    frontend_id = COALESCE(NULLIF(EXCLUDED.frontend_id, ''), held.frontend_id),
    updated_at = now()
"""

_SAVE_STATUS = """
INSERT INTO {table} AS held (
    id, gallery_element_name, op_type, status, progress, message, error,
    file_name, total_file_size, downloaded_file_size, frontend_id, cancellable,
    version, cache_key, is_backend_op
) VALUES (
    %(id)s, %(gallery_element_name)s, COALESCE(%(op_type)s, %(derived_op_type)s),
    %(status)s, %(progress)s, %(message)s, %(error)s, %(file_name)s,
    %(total_file_size)s, %(downloaded_file_size)s, %(frontend_id)s,
    %(cancellable)s, %(version)s, %(cache_key)s, %(is_backend_op)s
)
ON CONFLICT (id) DO UPDATE SET
    gallery_element_name = COALESCE(
        NULLIF(EXCLUDED.gallery_element_name, ''), held.gallery_element_name),
    cache_key = COALESCE(NULLIF(held.cache_key, ''), EXCLUDED.cache_key),
    is_backend_op = held.is_backend_op OR EXCLUDED.is_backend_op,
    op_type = COALESCE(%(op_type)s, held.op_type),
    status = EXCLUDED.status,
    progress = EXCLUDED.progress,
    message = EXCLUDED.message,
    error = EXCLUDED.error,
    file_name = EXCLUDED.file_name,
    total_file_size = EXCLUDED.total_file_size,
    downloaded_file_size = EXCLUDED.downloaded_file_size,
    frontend_id = COALESCE(NULLIF(EXCLUDED.frontend_id, ''), held.frontend_id),
    cancellable = EXCLUDED.cancellable,
    version = EXCLUDED.version,
    updated_at = now()
WHERE held.version < EXCLUDED.version
    AND held.status <> ALL(%(terminal)s)
"""

# `_record` reads the columns by position, in this order.
_COLUMNS = """
    id, gallery_element_name, cache_key, is_backend_op, op_type, status, progress,
    message, error, file_name, total_file_size, downloaded_file_size, frontend_id,
    cancellable, created_at, updated_at, version, lease_expires_at,
    cancel_requested
"""

_GET = "SELECT" + _COLUMNS + "FROM {table} WHERE id = %(id)s"

_GET_MANY = "SELECT" + _COLUMNS + "FROM {table} WHERE id = ANY(%(ids)s)"

_LIST_ACTIVE = (
    "SELECT"
    + _COLUMNS
    + """FROM {table}
WHERE (status <> ALL(%(terminal)s) OR (%(include_failed)s AND status = 'failed'))
    AND (updated_at >= now() - %(window)s OR lease_expires_at > now())
ORDER BY created_at, id"""
)

_CLEANUP = """
DELETE FROM {table}
WHERE status = ANY(%(terminal)s) AND updated_at < now() - %(older_than)s
"""


_RENEW_LEASES = """
UPDATE {table} SET lease_expires_at = now() + %(lease)s
WHERE id = ANY(%(ids)s) AND frontend_id = %(frontend_id)s
    AND status <> ALL(%(terminal)s)
"""

# PostgreSQL evaluates the WHERE clause again on the locked row. So when several
# reapers run at once, only the first ends each job and the others match nothing.
_REAP_ORPHANS = (
    """
UPDATE {table} SET
    status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'failed' END,
    error = CASE WHEN cancel_requested THEN error
        ELSE replace(%(error)s, '{{owner}}', frontend_id) END,
    cancellable = false,
    version = version + 1,
    updated_at = now()
WHERE status <> ALL(%(terminal)s) AND lease_expires_at < now()
RETURNING"""
    + _COLUMNS
)

_REQUEST_CANCEL = (
    "UPDATE {table} SET cancel_requested = true WHERE id = %(id)s RETURNING" + _COLUMNS
)


_OP_TYPES = {op_type.value: op_type for op_type in OpType}
_OP_STATES = {state.value: state for state in OpState}


def _record(row: Sequence[Any]) -> OperationRecord:
    """Build a record from a row of `_COLUMNS`, reading values other writers may
    leave.

    An unknown op type is read as an install. A status this module does not
    write, such as ``queued``, is read as pending and logged, so one odd row never
    stops a replica from starting. Columns are read by position and enums through
    dictionaries, because a starting replica builds a record for every active row.
    """
    status = _OP_STATES.get(row[5])
    if status is None:
        logger.warning(
            "job %r has unknown status %r in the store: read as pending",
            row[0],
            row[5],
        )
        status = OpState.PENDING
    return OperationRecord(
        id=row[0],
        gallery_element_name=row[1],
        cache_key=row[2],
        is_backend_op=row[3],
        op_type=_OP_TYPES.get(row[4], OpType.INSTALL),
        status=status,
        progress=row[6],
        message=row[7],
        error=row[8],
        file_name=row[9],
        total_file_size=row[10],
        downloaded_file_size=row[11],
        frontend_id=row[12],
        cancellable=row[13],
        created_at=row[14],
        updated_at=row[15],
        version=row[16],
        lease_expires_at=row[17],
        cancel_requested=row[18],
    )


MAX_IDENTIFIER_BYTES = 63
"""Maximum identifier length PostgreSQL keeps, in bytes; it cuts longer ones."""


class PostgresGalleryStore:
    """A `GalleryStore` in a PostgreSQL table.

    Args:
        conninfo: a libpq connection string or URL.
        table: the table name, optionally schema-qualified as ``schema.table``.
        min_size: connections the pool keeps open.
        max_size: connections the pool opens at most.
        timeout: seconds to wait for a connection before raising `StoreError`.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        table: str = DEFAULT_TABLE,
        min_size: int = 1,
        max_size: int = 4,
        timeout: float = 10.0,
    ) -> None:
        self.conninfo = conninfo
        self.table = table
        self.timeout = timeout
        names = table.split(".")
        for name in names:
            if not name or len(name.encode()) > MAX_IDENTIFIER_BYTES:
                raise ValueError(
                    f"invalid table name {table!r}: each part must be 1 to "
                    f"{MAX_IDENTIFIER_BYTES} bytes, as PostgreSQL cuts longer names"
                )
        self._table = sql.Identifier(*names)
        # A digest keeps the index name unique and short, whatever the table name.
        digest = hashlib.sha1(table.encode()).hexdigest()[:12]
        self._index = sql.Identifier(f"replistate_active_{digest}")
        self._pool = psycopg_pool.AsyncConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            open=False,
            kwargs={"autocommit": True},
            name="replistate",
        )
        self._statements: dict[str, sql.Composed] = {}

    async def open(self) -> None:
        try:
            await self._pool.open(wait=True, timeout=self.timeout)
        except psycopg_pool.PoolTimeout as exc:
            await self._pool.close()
            raise StoreError(
                f"cannot connect to PostgreSQL at {self._safe_target()} within "
                f"{self.timeout:g} s; check that the server runs and the URL is "
                f"right ({exc})"
            ) from None
        logger.info("connected to PostgreSQL at %s", self._safe_target())

    async def close(self) -> None:
        await self._pool.close()

    def schema_statement(self) -> sql.Composed:
        """Return the statements that create the table and its index, each
        ``IF NOT EXISTS``, as `ensure_schema` runs them."""
        return sql.SQL(_CREATE).format(table=self._table, active_index=self._index)

    def schema_lock_key(self) -> str:
        """Return the text whose hash names the advisory lock `ensure_schema`
        takes, so concurrent creators of the table wait for each other."""
        return f"replistate schema {self.table}"

    async def ensure_schema(self) -> None:
        statement = self.schema_statement()
        async with self._pool.connection() as conn, conn.transaction():
            # Replicas starting together would race on CREATE TABLE otherwise.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))",
                (self.schema_lock_key(),),
            )
            await conn.execute(statement)

    async def upsert_placeholder(self, record: OperationRecord) -> None:
        await self._execute(
            "upsert_placeholder",
            _UPSERT_PLACEHOLDER,
            {
                "id": record.id,
                "gallery_element_name": record.gallery_element_name,
                "cache_key": record.cache_key,
                "is_backend_op": record.is_backend_op,
                "op_type": record.op_type.value,
                "status": record.status.value,
                "frontend_id": record.frontend_id,
                "cancellable": record.cancellable,
            },
        )

    async def save_status(
        self,
        job_id: str,
        status: OpStatus,
        *,
        version: int,
        frontend_id: str = "",
        cache_key: str = "",
        is_backend_op: bool = False,
        op_type: OpType | None = None,
    ) -> bool:
        record = OperationRecord.from_status(
            job_id, status, version=version, frontend_id=frontend_id
        )
        rowcount = await self._execute(
            "save_status",
            _SAVE_STATUS,
            {
                "id": job_id,
                "gallery_element_name": record.gallery_element_name,
                "op_type": op_type.value if op_type is not None else None,
                "derived_op_type": record.op_type.value,
                "cache_key": cache_key,
                "is_backend_op": is_backend_op,
                "status": record.status.value,
                "progress": record.progress,
                "message": record.message,
                "error": record.error,
                "file_name": record.file_name,
                "total_file_size": record.total_file_size,
                "downloaded_file_size": record.downloaded_file_size,
                "frontend_id": frontend_id,
                "cancellable": record.cancellable,
                "version": version,
                "terminal": _TERMINAL,
            },
        )
        return rowcount == 1

    async def get(self, job_id: str) -> OperationRecord | None:
        rows = await self._fetch("get", _GET, {"id": job_id})
        return _record(rows[0]) if rows else None

    async def get_many(self, job_ids: list[str]) -> list[OperationRecord]:
        if not job_ids:
            return []
        rows = await self._fetch("get_many", _GET_MANY, {"ids": job_ids})
        return [_record(row) for row in rows]

    async def list_active(
        self, window: timedelta = ACTIVE_WINDOW, *, include_failed: bool = False
    ) -> list[OperationRecord]:
        params = {
            "terminal": _TERMINAL,
            "window": window,
            "include_failed": include_failed,
        }
        rows = await self._fetch("list_active", _LIST_ACTIVE, params)
        return [_record(row) for row in rows]

    async def cleanup(self, older_than: timedelta) -> int:
        return await self._execute(
            "cleanup", _CLEANUP, {"terminal": _TERMINAL, "older_than": older_than}
        )

    async def renew_leases(
        self, frontend_id: str, job_ids: list[str], lease: timedelta
    ) -> int:
        if not job_ids:
            return 0
        params = {
            "ids": job_ids,
            "frontend_id": frontend_id,
            "lease": lease,
            "terminal": _TERMINAL,
        }
        return await self._execute("renew_leases", _RENEW_LEASES, params)

    async def reap_orphans(self, error: str) -> list[OperationRecord]:
        params = {"error": error, "terminal": _TERMINAL}
        rows = await self._fetch("reap_orphans", _REAP_ORPHANS, params)
        return [_record(row) for row in rows]

    async def request_cancel(self, job_id: str) -> OperationRecord | None:
        rows = await self._fetch("request_cancel", _REQUEST_CANCEL, {"id": job_id})
        return _record(rows[0]) if rows else None

    def _statement(self, name: str, template: str) -> sql.Composed:
        statement = self._statements.get(name)
        if statement is None:
            statement = sql.SQL(template).format(table=self._table)
            self._statements[name] = statement
        return statement

    async def _execute(self, name: str, template: str, params: dict[str, Any]) -> int:
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(self._statement(name, template), params)
                return int(cursor.rowcount)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise self._error(name, params, exc) from exc

    async def _fetch(
        self, name: str, template: str, params: dict[str, Any]
    ) -> list[tuple[Any, ...]]:
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(self._statement(name, template), params)
                return await cursor.fetchall()
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise self._error(name, params, exc) from exc

    def _error(self, name: str, params: dict[str, Any], exc: Exception) -> StoreError:
        job = params.get("id")
        where = f" for job {job!r}" if job else ""
        return StoreError(f"{name}{where} failed on table {self.table!r}: {exc}")

    def _safe_target(self) -> str:
        """Return host, port and database of the conninfo, never the password."""
        try:
            info = psycopg.conninfo.conninfo_to_dict(self.conninfo)
        except psycopg.ProgrammingError:
            return "the configured server"
        host = info.get("host", "localhost")
        port = info.get("port", 5432)
        return f"{host}:{port}/{info.get('dbname', '')}"
