"""How long a change made on replica A takes to be visible on replica B.

Replica A runs in the measuring process and replica B in a peer process. Each
sample times one status change from the call on A to the moment B's mirror holds
it. The baseline times a raw nats-py publish of a payload of the same size to a
subscriber in a peer process. For reference, the same hop is timed with
encode/broadcaster on its PostgreSQL backend and with plain LISTEN/NOTIFY through
psycopg, two designs users pick instead.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import nats
import psycopg
from broadcaster import Broadcast

from benchmarks.common import Peer, Scope, Servers, peer, replicas, table_dropped
from replistate.codec import ProgressMessage, encode
from replistate.models import OpStatus

WARMUP = 50
WARMUP_TIMEOUT = 1.0
SAMPLE_TIMEOUT = 10.0

Send = Callable[[str], Awaitable[None]]


def sample_status(label: str) -> OpStatus:
    """Return a status as a download reports it, with `label` as its message."""
    return OpStatus(
        progress=42.0,
        message=label,
        file_name="model-a.gguf",
        file_size="2.3 GB",
        downloaded_size="1.1 GB",
        gallery_element_name="model-a",
        cancellable=True,
    )


def padded(label: str) -> str:
    """Return `label` padded to the size of one encoded status message."""
    message = ProgressMessage(
        job_id="job-propagation",
        status=sample_status("report:0000"),
        origin="bench-a",
        version=1,
    )
    size = len(encode(message))
    return (label + " ").ljust(size, "x")


async def time_samples(send: Send, receiver: Peer, samples: int) -> list[float]:
    """Send labelled events and return the seconds each took to reach `receiver`.

    Warm-up events that are lost, as on a route still being set up, are skipped;
    a measured one that is lost raises TimeoutError.
    """
    latencies: list[float] = []
    for index in range(WARMUP + samples):
        label = f"report:{index:04d}"
        began = time.perf_counter()
        await send(label)
        timeout = WARMUP_TIMEOUT if index < WARMUP else SAMPLE_TIMEOUT
        try:
            while True:
                fields = await receiver.read(timeout)
                if fields[0] == label:
                    break
        except TimeoutError:
            if index < WARMUP:
                continue
            raise
        if index >= WARMUP:
            latencies.append(float(fields[1]) - began)
    return latencies


async def replistate_latencies(servers: Servers, samples: int) -> list[float]:
    """Time status changes from replica A until replica B has them."""
    scope = Scope.new()
    async with (
        table_dropped(servers, scope),
        peer("watch-replistate", servers, scope, replica_id="bench-b") as receiver,
        replicas(servers, scope, "bench-a") as (a,),
    ):

        async def send(label: str) -> None:
            await a.operations.update_status("job-propagation", sample_status(label))

        return await time_samples(send, receiver, samples)


async def nats_latencies(servers: Servers, samples: int) -> list[float]:
    """Time raw nats-py publishes until a subscriber in a peer process gets them."""
    scope = Scope.new()
    subject = f"{scope.prefix}.job-propagation.progress"
    async with peer(
        "watch-nats", servers, scope, subject=f"{scope.prefix}.*.progress"
    ) as receiver:
        client = await nats.connect(servers.nats_url)
        try:

            async def send(label: str) -> None:
                await client.publish(subject, padded(label).encode())

            return await time_samples(send, receiver, samples)
        finally:
            await client.close()


async def broadcaster_latencies(servers: Servers, samples: int) -> list[float]:
    """Time broadcaster publishes on PostgreSQL until a peer process gets them."""
    scope = Scope.new()
    async with peer(
        "watch-broadcaster", servers, scope, subject=scope.prefix
    ) as receiver:
        broadcast = Broadcast(servers.postgres_url)
        await broadcast.connect()
        try:

            async def send(label: str) -> None:
                await broadcast.publish(scope.prefix, padded(label))

            return await time_samples(send, receiver, samples)
        finally:
            await broadcast.disconnect()


async def notify_latencies(servers: Servers, samples: int) -> list[float]:
    """Time NOTIFY statements until a LISTEN connection in a peer process gets
    them."""
    scope = Scope.new()
    async with (
        peer("watch-notify", servers, scope, subject=scope.prefix) as receiver,
        await psycopg.AsyncConnection.connect(
            servers.postgres_url, autocommit=True
        ) as conn,
    ):

        async def send(label: str) -> None:
            await conn.execute(
                "SELECT pg_notify(%s, %s)", (scope.prefix, padded(label))
            )

        return await time_samples(send, receiver, samples)
