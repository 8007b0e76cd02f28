"""How long a starting replica takes to load the active operations from the store.

The table is filled with active operations, then `Replica.hydrate` is timed: the
query, the decoding of every row and the mirror and OpCache updates. The baseline
runs the same query with raw psycopg and fetches every row as tuples.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import psycopg
from psycopg import sql

from benchmarks.common import Scope, Servers, make_replica, table_dropped

ROUNDS = 5

_BASELINE_QUERY = """
SELECT id, gallery_element_name, cache_key, is_backend_op, op_type, status,
    progress, message, error, file_name, total_file_size, downloaded_file_size,
    frontend_id, cancellable, created_at, updated_at, version, lease_expires_at,
    cancel_requested
FROM {table}
WHERE (status <> ALL(%(terminal)s) OR status = 'failed')
    AND (updated_at >= now() - interval '1 hour' OR lease_expires_at > now())
ORDER BY created_at, id
"""


async def fill(servers: Servers, scope: Scope, operations: int) -> None:
    """Create the table and store `operations` active operations in it."""
    replica = make_replica(servers, scope, "bench-fill", bus=False)
    assert replica.store is not None
    await replica.store.open()
    await replica.store.ensure_schema()
    await replica.store.close()
    now = datetime.now(UTC)
    rows = [
        (
            f"job-{index:05d}",
            f"model-{index}",
            f"gallery@model-{index}",
            "downloading",
            float(index % 100),
            f"model-{index}.gguf",
            "2.3 GB",
            "1.1 GB",
            "bench-owner",
            now,
            index,
        )
        for index in range(operations)
    ]
    async with await psycopg.AsyncConnection.connect(servers.postgres_url) as conn:
        async with conn.cursor() as cursor:
            copy = sql.SQL(
                "COPY {} (id, gallery_element_name, cache_key, status, progress, "
                "file_name, total_file_size, downloaded_file_size, frontend_id, "
                "updated_at, version) FROM STDIN"
            ).format(sql.Identifier(scope.table))
            async with cursor.copy(copy) as writer:
                for row in rows:
                    await writer.write_row(row)
        await conn.commit()


async def replistate_seconds(servers: Servers, scope: Scope, expected: int) -> float:
    """Return the seconds one `hydrate` of a fresh replica takes."""
    replica = make_replica(servers, scope, "bench-hydrate", bus=False)
    assert replica.store is not None
    await replica.store.open()
    try:
        began = time.perf_counter()
        count = await replica.hydrate()
        elapsed = time.perf_counter() - began
    finally:
        await replica.store.close()
    if count != expected or len(replica.opcache.entries()) != expected:
        raise RuntimeError(f"hydrated {count} operations, expected {expected}")
    return elapsed


async def baseline_seconds(servers: Servers, scope: Scope, expected: int) -> float:
    """Return the seconds the same query takes with raw psycopg."""
    query = sql.SQL(_BASELINE_QUERY).format(table=sql.Identifier(scope.table))
    async with await psycopg.AsyncConnection.connect(
        servers.postgres_url, autocommit=True
    ) as conn:
        began = time.perf_counter()
        cursor = await conn.execute(
            query, {"terminal": ["completed", "failed", "cancelled"]}
        )
        rows = await cursor.fetchall()
        elapsed = time.perf_counter() - began
    if len(rows) != expected:
        raise RuntimeError(f"read {len(rows)} rows, expected {expected}")
    return elapsed


async def measure(servers: Servers, operations: int) -> tuple[list[float], list[float]]:
    """Return the hydrate times and the baseline times, `ROUNDS` of each,
    interleaved so both see the same server state."""
    scope = Scope.new()
    async with table_dropped(servers, scope):
        await fill(servers, scope, operations)
        ours: list[float] = []
        raw: list[float] = []
        # One untimed round of each warms the server's caches and the pools.
        await replistate_seconds(servers, scope, operations)
        await baseline_seconds(servers, scope, operations)
        for _ in range(ROUNDS):
            ours.append(await replistate_seconds(servers, scope, operations))
            raw.append(await baseline_seconds(servers, scope, operations))
        return ours, raw


def run(servers: Servers, operations: int) -> tuple[list[float], list[float]]:
    """Run `measure` in a new event loop."""
    return asyncio.run(measure(servers, operations))
