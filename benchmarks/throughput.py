"""How many status updates per second one owner sustains with every peer keeping up.

The owner, in the measuring process, sends updates spread over 100 jobs as fast as
it can. Two peers in their own processes receive every update. The time runs from
the first send until both peers have the last update, which each peer handles in
order after all earlier ones. Each peer must then have the same version of every
job as the owner, or the run is reported incomplete. The baseline sends as many raw
nats-py messages of the same size to two wildcard subscribers in peer processes,
which count what they receive, so a subscriber that fell behind and lost messages
shows.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable

import attrs
import nats

from benchmarks.common import Peer, Scope, Servers, peer, replicas, table_dropped
from benchmarks.peer import version_sum
from benchmarks.propagation import padded, sample_status

JOBS = 100
PEERS = 2
FINAL_TIMEOUT = 60.0
WARMUP_ATTEMPTS = 20
WARMUP_TIMEOUT = 0.5


@attrs.frozen
class Throughput:
    """Updates per second of one run, and whether every peer got them all."""

    per_second: float
    complete: bool


async def final_times(receivers: list[Peer], label: str) -> list[list[str]]:
    """Return the report line of each receiver for `label`."""
    lines = []
    for receiver in receivers:
        while (fields := await receiver.read(FINAL_TIMEOUT))[0] != label:
            pass
        lines.append(fields)
    return lines


async def wait_for_routes(
    send: Callable[[str], Awaitable[None]], receivers: list[Peer]
) -> list[list[str]]:
    """Send labelled events until every receiver reports one; return the report
    line of each receiver.

    A new subscription may miss messages for a moment, and a message missed by
    a peer would count against the run.
    """
    for attempt in range(WARMUP_ATTEMPTS):
        label = f"report:warm-{attempt}"
        await send(label)
        try:
            lines = []
            for receiver in receivers:
                while (fields := await receiver.read(WARMUP_TIMEOUT))[0] != label:
                    pass
                lines.append(fields)
        except TimeoutError:
            continue
        return lines
    raise RuntimeError(f"peers did not receive within {WARMUP_ATTEMPTS} attempts")


async def replistate_throughput(servers: Servers, updates: int) -> Throughput:
    """Measure updates per second from one owner replica to two peer replicas."""
    scope = Scope.new()
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(table_dropped(servers, scope))
        receivers = [
            await stack.enter_async_context(
                peer("watch-replistate", servers, scope, replica_id=f"bench-{index}")
            )
            for index in range(PEERS)
        ]
        (owner,) = await stack.enter_async_context(
            replicas(servers, scope, "bench-owner")
        )
        statuses = [sample_status(f"downloading {index}") for index in range(updates)]

        async def warm(label: str) -> None:
            await owner.operations.update_status("job-warm", sample_status(label))

        await wait_for_routes(warm, receivers)
        began = time.perf_counter()
        for index, status in enumerate(statuses):
            await owner.operations.update_status(f"job-{index % JOBS}", status)
        await owner.operations.update_status("job-final", sample_status("report:end"))
        lines = await final_times(receivers, "report:end")
        elapsed = max(float(fields[1]) for fields in lines) - began
        expected = version_sum(owner)
        complete = all(int(fields[2]) == expected for fields in lines)
        return Throughput(updates / elapsed, complete=complete)


async def nats_throughput(servers: Servers, updates: int) -> Throughput:
    """Measure raw nats-py messages per second to two wildcard subscribers."""
    scope = Scope.new()
    async with contextlib.AsyncExitStack() as stack:
        receivers = [
            await stack.enter_async_context(
                peer("watch-nats", servers, scope, subject=f"{scope.prefix}.*.progress")
            )
            for _ in range(PEERS)
        ]
        client = await nats.connect(servers.nats_url)
        stack.push_async_callback(client.close)
        payloads = [padded(f"downloading-{index}").encode() for index in range(updates)]

        async def warm(label: str) -> None:
            await client.publish(
                f"{scope.prefix}.job-warm.progress", padded(label).encode()
            )

        warmed = await wait_for_routes(warm, receivers)
        subjects = [f"{scope.prefix}.job-{index}.progress" for index in range(JOBS)]
        began = time.perf_counter()
        for index, payload in enumerate(payloads):
            await client.publish(subjects[index % JOBS], payload)
        await client.publish(
            f"{scope.prefix}.job-final.progress", padded("report:end").encode()
        )
        lines = await final_times(receivers, "report:end")
        elapsed = max(float(fields[1]) for fields in lines) - began
        # Each subscriber counts every message, the warm-up ones included.
        complete = all(
            int(final[2]) - int(warm[2]) == updates + 1
            for warm, final in zip(warmed, lines, strict=True)
        )
        return Throughput(updates / elapsed, complete=complete)
