"""Fixtures: real servers, and every bus and store through one contract fixture.

Integration tests reach a real nats-server and a real PostgreSQL. When
`REPLISTATE_TEST_NATS_URL` or `REPLISTATE_TEST_POSTGRES_URL` is set, that server is
used; otherwise a throwaway one is started on loopback for the session. Each test
works under its own subject prefix and table, so tests sharing a server never see
each other's messages or rows.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Protocol

import attrs
import psycopg
import pytest
from psycopg import sql

from replistate import (
    InMemoryBroker,
    InMemoryBus,
    InMemoryStore,
    MessageBus,
    NatsBus,
    OperationHandle,
    PostgresGalleryStore,
    Replica,
    ReplicaConfig,
)
from replistate._servers import ThrowawayNats, ThrowawayPostgres
from replistate.store.base import GalleryStore

NATS_ENV = "REPLISTATE_TEST_NATS_URL"
POSTGRES_ENV = "REPLISTATE_TEST_POSTGRES_URL"


REAL_SERVER_PARAMS = {"bus_factory": "nats", "store_case": "postgres"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that reaches a real server as `integration`."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        real = bool(fixtures & {"nats_url", "postgres_url"}) or any(
            params.get(name) == value for name, value in REAL_SERVER_PARAMS.items()
        )
        if real or item.get_closest_marker("demo") is not None:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """URL of a real nats-server: the configured one, or a throwaway one."""
    configured = os.environ.get(NATS_ENV)
    if configured:
        yield configured
        return
    with ThrowawayNats() as server:
        yield server.url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a real PostgreSQL: the configured one, or a throwaway one."""
    configured = os.environ.get(POSTGRES_ENV)
    if configured:
        yield configured
        return
    with ThrowawayPostgres() as server:
        yield server.url


@pytest.fixture
def prefix() -> str:
    """A subject prefix of this test alone."""
    return f"gallery_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def table_name() -> str:
    """A table name of this test alone."""
    return f"gallery_operations_{uuid.uuid4().hex[:10]}"


class BusFactory(Protocol):
    """Makes a connected bus; see the `bus_factory` fixture."""

    def __call__(self, *, echo: bool = True) -> Awaitable[MessageBus]: ...


@pytest.fixture(params=["memory", "nats"])
async def bus_factory(
    request: pytest.FixtureRequest,
) -> AsyncIterator[BusFactory]:
    """Make connected buses that reach each other: in memory, or on real NATS."""
    made: list[MessageBus] = []
    broker = InMemoryBroker()

    async def make(*, echo: bool = True) -> MessageBus:
        bus: MessageBus
        if request.param == "memory":
            bus = broker.connect(echo=echo)
        else:
            bus = NatsBus(
                request.getfixturevalue("nats_url"), connect_timeout=5, echo=echo
            )
        await bus.connect()
        made.append(bus)
        return bus

    yield make
    for bus in made:
        await bus.close()


@attrs.define
class StoreUnderTest:
    """A store and a way to make its rows look older, for window tests."""

    store: GalleryStore
    age: Callable[[str, timedelta], Awaitable[None]]


@pytest.fixture(params=["memory", "postgres"])
async def store_case(
    request: pytest.FixtureRequest, table_name: str
) -> AsyncIterator[StoreUnderTest]:
    """A fresh store, in memory or in a table of its own on real PostgreSQL."""
    if request.param == "memory":
        memory = InMemoryStore()

        async def age_memory(job_id: str, delta: timedelta) -> None:
            row = memory.rows[job_id]
            assert row.updated_at is not None
            memory.rows[job_id] = attrs.evolve(row, updated_at=row.updated_at - delta)

        yield StoreUnderTest(memory, age_memory)
        return

    url = request.getfixturevalue("postgres_url")
    store = PostgresGalleryStore(url, table=table_name)
    await store.open()
    await store.ensure_schema()

    async def age_postgres(job_id: str, delta: timedelta) -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(
                sql.SQL(
                    "UPDATE {} SET updated_at = updated_at - %s WHERE id = %s"
                ).format(sql.Identifier(table_name)),
                (delta, job_id),
            )

    yield StoreUnderTest(store, age_postgres)
    await store.close()
    await drop_table(url, table_name)


async def drop_table(url: str, table: str) -> None:
    """Drop a table a test created."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table))
        )


async def eventually(check: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait until `check` holds, failing the test after `seconds`."""
    async with asyncio.timeout(seconds):
        while not check():  # noqa: ASYNC110 - the state has no event to wait on
            await asyncio.sleep(0.01)


@attrs.define
class Cluster:
    """Replicas of one test on an in-memory broker and store."""

    broker: InMemoryBroker = attrs.field(factory=InMemoryBroker)
    store: InMemoryStore = attrs.field(factory=InMemoryStore)
    replicas: list[Replica] = attrs.field(factory=list)

    async def add(self, replica_id: str, *, start: bool = True) -> Replica:
        """Create a replica on the shared broker and store, started by default."""
        replica = Replica(
            ReplicaConfig(replica_id=replica_id),
            bus=self.broker.connect(),
            store=self.store,
        )
        self.replicas.append(replica)
        if start:
            await replica.start()
        return replica

    async def settle(self) -> None:
        """Wait until every replica has handled every message published so far."""
        for _ in range(5):
            for replica in self.replicas:
                if isinstance(replica.bus, InMemoryBus) and replica.bus.connected:
                    await replica.bus.drain()
            # Let tasks woken by the handlers, such as a cancelled operation, run.
            await asyncio.sleep(0)
        for replica in self.replicas:
            writer = replica.operations.writer
            if writer is not None and replica.ready:
                async with asyncio.timeout(5):
                    await writer.flush()


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    """An empty in-memory cluster; replicas added to it are stopped at the end."""
    made = Cluster()
    yield made
    for replica in made.replicas:
        await replica.stop()


UnstartedReplicaFactory = Callable[..., Replica]
"""Makes a replica on real servers: `make(replica_id, store_class=...)`."""


@pytest.fixture
async def unstarted_replica(
    nats_url: str, postgres_url: str, prefix: str, table_name: str
) -> AsyncIterator[UnstartedReplicaFactory]:
    """Make unstarted replicas on this test's subject prefix and table.

    Every replica made is stopped, and the table dropped, after the test.
    """
    replicas: list[Replica] = []

    def make(replica_id: str, store_class: type = PostgresGalleryStore) -> Replica:
        replica = Replica(
            ReplicaConfig(
                replica_id=replica_id,
                subject_prefix=prefix,
                cache_prefix=f"{prefix}.invalidate",
            ),
            bus=NatsBus(nats_url, name=replica_id),
            store=store_class(postgres_url, table=table_name),
        )
        replicas.append(replica)
        return replica

    yield make
    for replica in replicas:
        await replica.stop()
    await drop_table(postgres_url, table_name)


def record_reloads(*replicas: Replica) -> dict[str, list[str | None]]:
    """Record, per replica id, the job id of each models invalidation its hooks
    receive."""
    runs: dict[str, list[str | None]] = {}
    for replica in replicas:
        seen = runs.setdefault(replica.replica_id, [])
        replica.on_models_invalidated(
            lambda message, seen=seen: seen.append(message.job_id)
        )
    return runs


async def report_half(handle: OperationHandle) -> None:
    """Work that reports 50 % once, then completes."""
    await handle.update(progress=50.0)
