"""`schema`: the SQL that creates the operations table, printed or applied.

The printed script is what `PostgresGalleryStore.ensure_schema` runs, in the same
transaction behind the same advisory lock, so running it with ``psql`` while
replicas start is as safe as a replica creating the table itself. Every
statement is ``IF NOT EXISTS``, so applying it again changes nothing, and it adds
replistate's columns to an existing LocalAI table.
"""

from __future__ import annotations

import sys

from psycopg import sql

from replistate.admin.command import ExitCode
from replistate.admin.connections import make_store, open_store, redact_url

__all__ = ["apply_schema", "print_schema", "schema_script"]

_SCRIPT = """BEGIN;
-- Keeps replicas that start at the same time from racing on CREATE TABLE.
SELECT pg_advisory_xact_lock(hashtext({lock}));
{create}COMMIT;
"""


def schema_script(table: str) -> str:
    """Return the SQL script that creates `table` and its index.

    Raises:
        CommandError: the table name is invalid (`ExitCode.USAGE`).
    """
    store = make_store("", table)
    script = sql.SQL(_SCRIPT).format(
        lock=sql.Literal(store.schema_lock_key()), create=store.schema_statement()
    )
    return script.as_string(None)


async def print_schema(*, table: str) -> ExitCode:
    """Print the SQL script of `table`, without connecting to any server."""
    sys.stdout.write(schema_script(table))
    sys.stdout.flush()
    return ExitCode.OK


async def apply_schema(*, postgres_url: str, table: str) -> ExitCode:
    """Create `table` and its index in PostgreSQL unless they exist.

    Raises:
        CommandError: the server cannot be reached or the table name is invalid.
        StoreError: PostgreSQL rejected the statements.
    """
    async with open_store(postgres_url, table, table_needed=False) as store:
        await store.ensure_schema()
    print(f"table {table!r} is ready in PostgreSQL at {redact_url(postgres_url)}")
    return ExitCode.OK
