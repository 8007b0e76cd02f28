"""Profile the hot paths: publish, decode, merge, and read of the operations list.

    python -m benchmarks.profile [--nats-url URL] [--postgres-url URL]

Each path runs many times, first timed without the profiler, then under cProfile,
and the functions with the most own time are printed. docs/benchmarks.md lists what
these profiles showed and what changed because of them.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import time
from collections.abc import Awaitable, Callable

from benchmarks.common import Scope, Servers, replicas, servers, table_dropped
from benchmarks.memory import sample_status
from replistate import Replica, ReplicaConfig
from replistate.bus.base import Channel
from replistate.codec import ProgressMessage, encode
from replistate.integrations.api import operations_body, operations_response
from replistate.opcache import OpCacheEntry

ROUNDS = 20_000
TOP = 8

Step = Callable[[int], Awaitable[None]]


async def report(name: str, step: Step, rounds: int = ROUNDS) -> None:
    """Time `rounds` calls of `step`, then profile as many and print the top."""
    began = time.perf_counter()
    for index in range(rounds):
        await step(index)
    per_call = (time.perf_counter() - began) / rounds * 1e6
    profiler = cProfile.Profile()
    profiler.enable()
    for index in range(rounds):
        await step(rounds + index)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(TOP)
    lines = [line for line in text.getvalue().splitlines() if line.strip()]
    table = lines[lines.index(next(line for line in lines if "ncalls" in line)) :]
    print(f"== {name}: {per_call:.1f} us per call without the profiler")
    print("\n".join(table))


def progress_payloads(count: int) -> list[tuple[str, bytes]]:
    """Return `count` encoded progress messages over 100 jobs, as a peer sends."""
    payloads = []
    for index in range(count):
        job_id = f"job-{index % 100}"
        message = ProgressMessage(
            job_id=job_id,
            status=sample_status(index),
            origin="peer",
            version=index // 100 + 1,
        )
        payloads.append((f"gallery.{job_id}.progress", encode(message)))
    return payloads


async def main(found: Servers) -> None:
    scope = Scope.new()
    async with (
        table_dropped(found, scope),
        replicas(found, scope, "profile-publisher") as (publisher,),
    ):

        async def publish(index: int) -> None:
            await publisher.operations.update_status(
                f"job-{index % 100}", sample_status(index)
            )

        await report("publish: update_status on NATS", publish)

    payloads = progress_payloads(2 * ROUNDS)
    decoder = Channel.decoder(ProgressMessage)

    async def decode(index: int) -> None:
        subject, data = payloads[index]
        decoder(subject, data, 1 << 20)

    await report("decode: a progress message", decode)

    merger = Replica(ReplicaConfig(replica_id="profile-merger"))
    await merger.start()
    messages = [
        (subject, decoder(subject, data, 1 << 20)) for subject, data in payloads
    ]

    async def merge(index: int) -> None:
        subject, message = messages[index]
        await merger.operations.handle_progress(subject, message)

    await report("merge: a received status into the mirror", merge)
    await merger.stop()

    reader = Replica(ReplicaConfig(replica_id="profile-reader"))
    await reader.start()
    for index in range(1000):
        job_id = f"job-{index:04d}"
        reader.operations.restore(job_id, sample_status(index), 1)
        reader.opcache.restore(OpCacheEntry(f"gallery@model-{index}", job_id))

    async def build(index: int) -> None:
        operations_response(reader)

    async def read(index: int) -> None:
        operations_body(reader)

    await report("read: build the list of 1,000 operations", build, rounds=200)
    await report("read: the cached list of 1,000 operations", read)
    await reader.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats-url", default=os.environ.get("REPLISTATE_NATS_URL"))
    parser.add_argument(
        "--postgres-url", default=os.environ.get("REPLISTATE_POSTGRES_URL")
    )
    args = parser.parse_args()
    with servers(args.nats_url, args.postgres_url) as found:
        asyncio.run(main(found))
