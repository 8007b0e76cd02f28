"""How long a cancel requested on replica B takes to show on B, the owner on A.

Replica A, in a peer process, owns one operation per sample that waits to be
cancelled. Replica B, in the measuring process, requests the cancel and the time
runs until B's mirror has the cancelled status that A publishes once its work
stopped. The baseline is one raw nats-py request and reply between the same two
processes.
"""

from __future__ import annotations

import asyncio
import time

import nats
import nats.errors

from benchmarks.common import Scope, Servers, peer, replicas, table_dropped
from replistate import CancelOutcome, OpStatus

WARMUP = 10
TIMEOUT = 10.0


async def replistate_round_trips(servers: Servers, samples: int) -> list[float]:
    """Time `samples` cancels from request on B to the cancelled status on B."""
    scope = Scope.new()
    async with (
        table_dropped(servers, scope),
        replicas(servers, scope, "bench-b") as (b,),
        peer("own-replistate", servers, scope, replica_id="bench-a") as owner,
    ):
        loop = asyncio.get_running_loop()
        seen: dict[str, asyncio.Future[None]] = {}
        cancelled: dict[str, asyncio.Future[float]] = {}

        def changed(job_id: str, status: OpStatus | None) -> None:
            if status is None:
                return
            if job_id in seen and not seen[job_id].done():
                seen[job_id].set_result(None)
            if status.cancelled and job_id in cancelled:
                cancelled.pop(job_id).set_result(time.perf_counter())

        b.operations.on_change(changed)
        latencies: list[float] = []
        for index in range(WARMUP + samples):
            job_id = f"job-{index:04d}"
            seen[job_id] = loop.create_future()
            cancelled[job_id] = loop.create_future()
            await owner.send(f"own {job_id}")
            await owner.read(TIMEOUT)
            await asyncio.wait_for(seen.pop(job_id), TIMEOUT)
            done = cancelled[job_id]
            began = time.perf_counter()
            outcome = await b.operations.cancel(job_id)
            if outcome is not CancelOutcome.ACCEPTED:
                raise RuntimeError(f"cancel of {job_id}: {outcome.value}")
            ended = await asyncio.wait_for(done, TIMEOUT)
            if index >= WARMUP:
                latencies.append(ended - began)
        return latencies


async def nats_round_trips(servers: Servers, samples: int) -> list[float]:
    """Time `samples` raw nats-py requests, each replied to by a peer process."""
    scope = Scope.new()
    subject = f"{scope.prefix}.echo"
    async with peer("echo-nats", servers, scope, subject=subject):
        client = await nats.connect(servers.nats_url)
        try:
            latencies: list[float] = []
            for index in range(WARMUP + samples):
                began = time.perf_counter()
                try:
                    await client.request(subject, b"cancel", timeout=TIMEOUT)
                except nats.errors.NoRespondersError:
                    # A new subscription may take a moment to be in effect.
                    if index < WARMUP:
                        continue
                    raise
                if index >= WARMUP:
                    latencies.append(time.perf_counter() - began)
            return latencies
        finally:
            await client.close()
