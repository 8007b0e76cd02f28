"""Shared parts of the benchmarks: servers, names, peers and statistics."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import attrs
import psycopg
from psycopg import sql

from replistate import NatsBus, PostgresGalleryStore, Replica, ReplicaConfig
from replistate.testing import ThrowawayNats, ThrowawayPostgres

PEER_START_TIMEOUT = 30.0
PEER_STOP_TIMEOUT = 15.0


@attrs.frozen
class Servers:
    """URLs of the NATS server and PostgreSQL one run measures against."""

    nats_url: str
    postgres_url: str


@contextlib.contextmanager
def servers(nats_url: str | None, postgres_url: str | None) -> Iterator[Servers]:
    """Yield the given servers, starting a throwaway one for each URL missing."""
    with contextlib.ExitStack() as stack:
        if nats_url is None:
            nats_url = stack.enter_context(ThrowawayNats()).url
        if postgres_url is None:
            postgres_url = stack.enter_context(ThrowawayPostgres()).url
        yield Servers(nats_url, postgres_url)


@attrs.frozen
class Scope:
    """A subject prefix and a table of one benchmark, so runs never collide."""

    prefix: str
    table: str

    @classmethod
    def new(cls) -> Scope:
        """Return a scope with fresh random names."""
        token = uuid.uuid4().hex[:10]
        return cls(prefix=f"bench_{token}", table=f"bench_operations_{token}")


async def drop_table(postgres_url: str, table: str) -> None:
    """Drop a table a benchmark created."""
    async with await psycopg.AsyncConnection.connect(
        postgres_url, autocommit=True
    ) as conn:
        await conn.execute(
            sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table))
        )


def make_replica(
    servers: Servers,
    scope: Scope,
    replica_id: str,
    *,
    bus: bool = True,
    store: PostgresGalleryStore | None = None,
    **config: Any,
) -> Replica:
    """Return an unstarted replica on the scope's subjects and table, with
    `store` when given."""
    return Replica(
        ReplicaConfig(
            replica_id=replica_id,
            subject_prefix=scope.prefix,
            cache_prefix=f"{scope.prefix}.invalidate",
            lease=timedelta(minutes=5),
            **config,
        ),
        bus=NatsBus(servers.nats_url, name=replica_id) if bus else None,
        store=store or PostgresGalleryStore(servers.postgres_url, table=scope.table),
    )


@contextlib.asynccontextmanager
async def table_dropped(servers: Servers, scope: Scope) -> AsyncIterator[None]:
    """Drop the scope's table when the block ends.

    Enter it before the replicas and peers of the scope, so they have all
    stopped, and no resync reads the table, when it goes.
    """
    try:
        yield
    finally:
        await drop_table(servers.postgres_url, scope.table)


@contextlib.asynccontextmanager
async def replicas(
    servers: Servers, scope: Scope, *replica_ids: str, **config: Any
) -> AsyncIterator[list[Replica]]:
    """Start replicas on one scope, and stop them when the block ends."""
    started: list[Replica] = []
    try:
        for replica_id in replica_ids:
            replica = make_replica(servers, scope, replica_id, **config)
            await replica.start()
            started.append(replica)
        yield started
    finally:
        for replica in started:
            await replica.stop()


def percentile(samples: list[float], fraction: float) -> float:
    """Return the `fraction` percentile of `samples` (nearest rank)."""
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered)) - 1))
    return ordered[rank]


def median(samples: list[float]) -> float:
    """Return the median of `samples`."""
    return statistics.median(samples)


class Peer:
    """A peer process of `benchmarks.peer`, read line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(
        cls, mode: str, servers: Servers, scope: Scope, **options: str
    ) -> Peer:
        """Start a peer in `mode` and wait until it reports ``ready``."""
        arguments = [
            "--nats-url",
            servers.nats_url,
            "--postgres-url",
            servers.postgres_url,
            "--prefix",
            scope.prefix,
            "--table",
            scope.table,
        ]
        for name, value in options.items():
            arguments += [f"--{name.replace('_', '-')}", value]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.peer",
            mode,
            *arguments,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        peer = cls(process)
        try:
            fields = await peer.read(PEER_START_TIMEOUT)
        except BaseException:
            await peer.stop()
            raise
        if fields != ["ready"]:
            await peer.stop()
            raise RuntimeError(f"peer {mode} did not start: {fields}")
        return peer

    async def read(self, seconds: float) -> list[str]:
        """Return the fields of the next line, raising TimeoutError after
        `seconds`."""
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), seconds)
        if not line:
            raise RuntimeError(f"peer exited with code {await self.process.wait()}")
        return line.decode().split()

    async def send(self, text: str) -> None:
        """Write one line to the peer's stdin."""
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")
        await self.process.stdin.drain()

    async def stop(self) -> None:
        """Close the peer's stdin, which ends it, and wait for it."""
        if self.process.returncode is not None:
            return
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), PEER_STOP_TIMEOUT)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


@contextlib.asynccontextmanager
async def peer(
    mode: str, servers: Servers, scope: Scope, **options: str
) -> AsyncIterator[Peer]:
    """Run a peer process for the length of the block."""
    started = await Peer.start(mode, servers, scope, **options)
    try:
        yield started
    finally:
        await started.stop()
