"""Contract of every `GalleryStore`, run in memory and on real PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from replistate import OperationRecord, OpState, OpStatus, OpType, StoreError
from replistate.store.postgres import PostgresGalleryStore

from .conftest import StoreUnderTest, drop_table


def placeholder(job_id: str, **fields: object) -> OperationRecord:
    return OperationRecord(id=job_id, frontend_id="replica-a", **fields)  # type: ignore[arg-type]


async def test_placeholder_insert_then_get(store_case: StoreUnderTest) -> None:
    store = store_case.store

    await store.upsert_placeholder(
        placeholder(
            "job-1",
            gallery_element_name="model-a",
            cache_key="gallery@model-a",
            is_backend_op=True,
            op_type=OpType.DELETE,
        )
    )
    row = await store.get("job-1")

    assert row is not None
    assert row.id == "job-1"
    assert row.gallery_element_name == "model-a"
    assert row.cache_key == "gallery@model-a"
    assert row.is_backend_op is True
    assert row.op_type is OpType.DELETE
    assert row.status is OpState.PENDING
    assert row.frontend_id == "replica-a"
    assert row.created_at is not None
    assert row.created_at.utcoffset() is not None
    assert row.version == 0


async def test_placeholder_never_clobbers_cache_key(
    store_case: StoreUnderTest,
) -> None:
    store = store_case.store
    await store.upsert_placeholder(
        placeholder("job-1", cache_key="gallery@model-a", is_backend_op=True)
    )

    await store.upsert_placeholder(
        placeholder("job-1", gallery_element_name="model-a", cache_key="")
    )
    await store.upsert_placeholder(
        placeholder("job-1", cache_key="gallery@other", is_backend_op=False)
    )
    row = await store.get("job-1")

    assert row is not None
    assert row.cache_key == "gallery@model-a"
    assert row.is_backend_op is True
    assert row.gallery_element_name == "model-a"


async def test_placeholder_fills_missing_cache_key(
    store_case: StoreUnderTest,
) -> None:
    """A row first created by a status write gets its cache key from the
    placeholder."""
    store = store_case.store
    await store.save_status("job-1", OpStatus(progress=5), version=1)

    await store.upsert_placeholder(placeholder("job-1", cache_key="gallery@model-a"))
    row = await store.get("job-1")

    assert row is not None
    assert row.cache_key == "gallery@model-a"
    assert row.progress == 5
    assert row.version == 1


async def test_placeholder_keeps_status_and_version(
    store_case: StoreUnderTest,
) -> None:
    store = store_case.store
    await store.upsert_placeholder(placeholder("job-1", cache_key="k"))
    await store.save_status("job-1", OpStatus(progress=40, message="half"), version=4)

    await store.upsert_placeholder(placeholder("job-1", cache_key="k"))
    row = await store.get("job-1")

    assert row is not None
    assert row.status is OpState.DOWNLOADING
    assert row.progress == 40
    assert row.version == 4


async def test_save_status_stores_every_field(store_case: StoreUnderTest) -> None:
    store = store_case.store
    await store.upsert_placeholder(placeholder("job-1", cache_key="gallery@m"))
    status = OpStatus(
        progress=42.5,
        message="downloading",
        file_name="m.gguf",
        file_size="2.3 GB",
        downloaded_size="1.0 GB",
        gallery_element_name="m",
        cancellable=True,
    )

    applied = await store.save_status(
        "job-1", status, version=1, frontend_id="replica-b"
    )
    row = await store.get("job-1")

    assert applied is True
    assert row is not None
    assert row.progress == 42.5
    assert row.message == "downloading"
    assert row.file_name == "m.gguf"
    assert row.total_file_size == "2.3 GB"
    assert row.downloaded_file_size == "1.0 GB"
    assert row.gallery_element_name == "m"
    assert row.cancellable is True
    assert row.frontend_id == "replica-b"
    assert row.cache_key == "gallery@m"
    assert row.error is None


async def test_save_status_keeps_error_text(store_case: StoreUnderTest) -> None:
    store = store_case.store
    failure = OpStatus(processed=True, error=KeyError("no such file 'x'"))

    await store.save_status("job-1", failure, version=2)
    row = await store.get("job-1")

    assert row is not None
    assert row.status is OpState.FAILED
    assert row.error == str(KeyError("no such file 'x'"))
    assert row.to_status().error == str(KeyError("no such file 'x'"))
    assert row.to_status().processed is True


async def test_save_status_ignores_older_version(store_case: StoreUnderTest) -> None:
    store = store_case.store
    await store.save_status("job-1", OpStatus(progress=50), version=5)

    older = await store.save_status("job-1", OpStatus(progress=10), version=4)
    same = await store.save_status("job-1", OpStatus(progress=20), version=5)
    row = await store.get("job-1")

    assert older is False
    assert same is False
    assert row is not None
    assert row.progress == 50
    assert row.version == 5


@pytest.mark.parametrize(
    "terminal",
    [
        OpStatus(processed=True, progress=100),
        OpStatus(processed=True, error="boom"),
        OpStatus(cancelled=True),
    ],
    ids=["completed", "failed", "cancelled"],
)
async def test_save_status_terminal_sticks(
    store_case: StoreUnderTest, terminal: OpStatus
) -> None:
    store = store_case.store
    await store.save_status("job-1", terminal, version=3)

    applied = await store.save_status("job-1", OpStatus(progress=60), version=9)
    row = await store.get("job-1")

    assert applied is False
    assert row is not None
    assert row.status is terminal.state
    assert row.version == 3


async def test_get_unknown_returns_none(store_case: StoreUnderTest) -> None:
    assert await store_case.store.get("missing") is None


async def test_list_active_skips_terminal(store_case: StoreUnderTest) -> None:
    store = store_case.store
    await store.upsert_placeholder(placeholder("pending", cache_key="k1"))
    await store.save_status("running", OpStatus(progress=30), version=1)
    await store.save_status("done", OpStatus(processed=True), version=1)
    await store.save_status("failed", OpStatus(processed=True, error="x"), version=1)
    await store.save_status("cancelled", OpStatus(cancelled=True), version=1)

    active = await store.list_active()
    with_failed = await store.list_active(include_failed=True)

    assert sorted(row.id for row in active) == ["pending", "running"]
    assert sorted(row.id for row in with_failed) == ["failed", "pending", "running"]


async def test_list_active_window_excludes_stale(store_case: StoreUnderTest) -> None:
    store = store_case.store
    await store.save_status("fresh", OpStatus(progress=30), version=1)
    await store.save_status("stale", OpStatus(progress=30), version=1)
    await store_case.age("stale", timedelta(hours=2))

    within_hour = await store.list_active(timedelta(hours=1))
    within_day = await store.list_active(timedelta(days=1))

    assert [row.id for row in within_hour] == ["fresh"]
    assert sorted(row.id for row in within_day) == ["fresh", "stale"]


async def test_cleanup_deletes_old_terminal_rows(store_case: StoreUnderTest) -> None:
    store = store_case.store
    await store.save_status("old-done", OpStatus(processed=True), version=1)
    await store.save_status("new-done", OpStatus(processed=True), version=1)
    await store.save_status("old-running", OpStatus(progress=5), version=1)
    await store_case.age("old-done", timedelta(days=2))
    await store_case.age("old-running", timedelta(days=2))

    deleted = await store.cleanup(timedelta(days=1))

    assert deleted == 1
    assert await store.get("old-done") is None
    assert await store.get("new-done") is not None
    assert await store.get("old-running") is not None


async def test_values_are_parameterized(store_case: StoreUnderTest) -> None:
    """Quotes and SQL in values are stored verbatim, never executed."""
    store = store_case.store
    hostile = "x'); DROP TABLE gallery_operations; --"
    await store.upsert_placeholder(
        placeholder("job-'1", gallery_element_name=hostile, cache_key=hostile)
    )
    await store.save_status(
        "job-'1", OpStatus(message=hostile, gallery_element_name=hostile), version=1
    )

    row = await store.get("job-'1")

    assert row is not None
    assert row.cache_key == hostile
    assert row.message == hostile
    assert row.gallery_element_name == hostile


async def test_ensure_schema_concurrent_and_idempotent(
    postgres_url: str, table_name: str
) -> None:
    stores = [PostgresGalleryStore(postgres_url, table=table_name) for _ in range(3)]
    for store in stores:
        await store.open()
    try:
        await asyncio.gather(*(store.ensure_schema() for store in stores))
        await stores[0].ensure_schema()
        await stores[0].save_status("job-1", OpStatus(progress=1), version=1)

        row = await stores[1].get("job-1")

        assert row is not None
        assert row.progress == 1
    finally:
        for store in stores:
            await store.close()
        await drop_table(postgres_url, table_name)


async def test_ensure_schema_upgrades_plain_table(
    postgres_url: str, table_name: str
) -> None:
    """A table with only the LocalAI columns gets replistate's columns added."""
    import psycopg
    from psycopg import sql

    async with await psycopg.AsyncConnection.connect(
        postgres_url, autocommit=True
    ) as conn:
        await conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id text PRIMARY KEY, gallery_element_name text "
                "NOT NULL DEFAULT '', cache_key text NOT NULL DEFAULT '', "
                "is_backend_op boolean NOT NULL DEFAULT false, op_type text NOT NULL "
                "DEFAULT 'install', status text NOT NULL DEFAULT 'pending', "
                "progress double precision NOT NULL DEFAULT 0, message text NOT NULL "
                "DEFAULT '', error text, file_name text NOT NULL DEFAULT '', "
                "total_file_size text NOT NULL DEFAULT '', downloaded_file_size text "
                "NOT NULL DEFAULT '', frontend_id text NOT NULL DEFAULT '', "
                "cancellable boolean NOT NULL DEFAULT false, created_at timestamptz "
                "NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(sql.Identifier(table_name))
        )
        await conn.execute(
            sql.SQL("INSERT INTO {} (id, status, progress) VALUES (%s, %s, %s)").format(
                sql.Identifier(table_name)
            ),
            ("go-job", "downloading", 12.0),
        )
    store = PostgresGalleryStore(postgres_url, table=table_name)
    await store.open()
    try:
        await store.ensure_schema()
        row = await store.get("go-job")

        assert row is not None
        assert row.version == 0
        assert row.progress == 12.0
        assert row.cancel_requested is False
    finally:
        await store.close()
        await drop_table(postgres_url, table_name)


async def test_postgres_unreachable_raises() -> None:
    from replistate._servers import find_free_port

    store = PostgresGalleryStore(
        f"postgresql://postgres@127.0.0.1:{find_free_port()}/x", timeout=1
    )

    with pytest.raises(StoreError, match="cannot connect to PostgreSQL"):
        await store.open()


ORPHAN = "owner {owner} lost"


async def test_renew_leases_only_own_running_rows(store_case: StoreUnderTest) -> None:
    store = store_case.store
    await store.save_status("mine", OpStatus(progress=5), version=1, frontend_id="a")
    await store.save_status("theirs", OpStatus(progress=5), version=1, frontend_id="b")
    await store.save_status(
        "done", OpStatus(processed=True), version=1, frontend_id="a"
    )

    renewed = await store.renew_leases(
        "a", ["mine", "theirs", "done", "missing"], timedelta(seconds=30)
    )

    assert renewed == 1
    leases = {}
    for job_id in ("mine", "theirs", "done"):
        row = await store.get(job_id)
        assert row is not None
        leases[job_id] = row.lease_expires_at
    assert leases["mine"] is not None
    assert leases["theirs"] is None
    assert leases["done"] is None


async def test_reap_orphans_ends_expired_leases(store_case: StoreUnderTest) -> None:
    store = store_case.store
    for job_id in ("expired", "cancel-me", "alive", "no-lease"):
        await store.save_status(
            job_id, OpStatus(progress=5), version=3, frontend_id="a"
        )
    await store.renew_leases("a", ["expired", "cancel-me"], timedelta(seconds=-1))
    await store.renew_leases("a", ["alive"], timedelta(hours=1))
    await store.request_cancel("cancel-me")

    reaped = await store.reap_orphans(ORPHAN)
    again = await store.reap_orphans(ORPHAN)

    by_id = {row.id: row for row in reaped}
    assert sorted(by_id) == ["cancel-me", "expired"]
    assert by_id["expired"].status is OpState.FAILED
    assert by_id["expired"].error == "owner a lost"
    assert by_id["expired"].version == 4
    assert by_id["cancel-me"].status is OpState.CANCELLED
    assert again == []
    alive = await store.get("alive")
    assert alive is not None
    assert alive.status is OpState.DOWNLOADING


async def test_concurrent_reapers_end_each_once(
    postgres_url: str, table_name: str
) -> None:
    """Of several replicas reaping at once, each orphan is ended by one."""
    stores = [PostgresGalleryStore(postgres_url, table=table_name) for _ in range(3)]
    for store in stores:
        await store.open()
    try:
        await stores[0].ensure_schema()
        jobs = [f"job-{index}" for index in range(30)]
        for job_id in jobs:
            await stores[0].save_status(
                job_id, OpStatus(progress=1), version=1, frontend_id="dead"
            )
        await stores[0].renew_leases("dead", jobs, timedelta(seconds=-1))

        results = await asyncio.gather(
            *(store.reap_orphans(ORPHAN) for store in stores)
        )

        reaped = [row.id for rows in results for row in rows]
        assert sorted(reaped) == sorted(jobs)
    finally:
        for store in stores:
            await store.close()
        await drop_table(postgres_url, table_name)


async def test_request_cancel_stores_intent(store_case: StoreUnderTest) -> None:
    store = store_case.store
    await store.save_status("job-1", OpStatus(progress=5), version=1)

    row = await store.request_cancel("job-1")
    missing = await store.request_cancel("missing")

    assert row is not None
    assert row.cancel_requested is True
    assert missing is None
    stored = await store.get("job-1")
    assert stored is not None
    assert stored.cancel_requested is True
