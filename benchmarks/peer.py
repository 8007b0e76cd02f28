"""A peer process for the benchmarks: the other replica, or a raw client.

Replicas are separate processes in production, so the benchmarks measure from one
process and run the peer here, in another. The peer prints ``ready`` once it
listens, then one line per reported event: ``<label> <time>``, where the time is
`time.perf_counter()`. On Linux that clock is CLOCK_MONOTONIC, the same in every
process, so the measuring process subtracts it from its own readings.

Only events whose text starts with ``report:`` are printed, so a peer flooded with
updates prints nothing until the measuring process requests a report.

Modes:
- ``watch-replistate``: a replica that reports each reported status change, with
  the sum of the versions of every job it holds (see `version_sum`);
- ``watch-nats``: a raw nats-py subscriber that reports each reported payload,
  with the number of messages received so far;
- ``watch-broadcaster`` and ``watch-notify``: a broadcaster subscriber on its
  PostgreSQL backend, and a plain LISTEN connection, each reporting as above;
- ``own-replistate``: a replica that runs, on each ``own JOB`` line read from
  stdin, an operation that waits to be cancelled, and prints ``owned JOB``;
- ``echo-nats``: a raw nats-py responder that answers each request with its
  payload.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time

import nats
import psycopg
from broadcaster import Broadcast
from nats.aio.msg import Msg
from psycopg import sql

from benchmarks.common import Scope, Servers, make_replica
from replistate import OperationHandle, OpStatus, Replica

REPORT = "report:"


def say(*fields: object) -> None:
    """Print one line of space-separated fields and flush it."""
    sys.stdout.write(" ".join(str(field) for field in fields) + "\n")
    sys.stdout.flush()


async def watch_replistate(servers: Servers, scope: Scope, replica_id: str) -> None:
    replica = make_replica(servers, scope, replica_id)

    def changed(job_id: str, status: OpStatus | None) -> None:
        if status is not None and status.message.startswith(REPORT):
            say(status.message, repr(time.perf_counter()), version_sum(replica))

    replica.operations.on_change(changed)
    async with replica:
        say("ready")
        await wait_for_stop()


def version_sum(replica: Replica) -> int:
    """Return the sum of the versions of every job the replica holds.

    Two replicas that hold the same versions of the same jobs give the same sum,
    so a peer that ended up behind or lost an update shows a different one.
    """
    operations = replica.operations
    return sum(operations.version_of(job_id) or 0 for job_id in operations.statuses())


async def watch_nats(servers: Servers, pattern: str) -> None:
    client = await nats.connect(servers.nats_url)
    received = 0

    async def receive(msg: Msg) -> None:
        nonlocal received
        received += 1
        if msg.data.startswith(REPORT.encode()):
            label = msg.data.split(b" ", 1)[0].decode()
            say(label, repr(time.perf_counter()), received)

    await client.subscribe(pattern, cb=receive)
    await client.flush()
    say("ready")
    try:
        await wait_for_stop()
    finally:
        await client.close()


async def watch_broadcaster(servers: Servers, channel: str) -> None:
    broadcast = Broadcast(servers.postgres_url)
    await broadcast.connect()
    try:
        async with broadcast.subscribe(channel) as subscriber:
            say("ready")
            stopping = asyncio.create_task(wait_for_stop())
            while not stopping.done():
                getting = asyncio.create_task(subscriber.get())
                await asyncio.wait(
                    [getting, stopping], return_when=asyncio.FIRST_COMPLETED
                )
                if not getting.done():
                    getting.cancel()
                    break
                event = getting.result()
                if event.message.startswith(REPORT):
                    say(event.message.split(" ", 1)[0], repr(time.perf_counter()))
    finally:
        await broadcast.disconnect()


async def watch_notify(servers: Servers, channel: str) -> None:
    async with await psycopg.AsyncConnection.connect(
        servers.postgres_url, autocommit=True
    ) as conn:
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        say("ready")
        stopping = asyncio.create_task(wait_for_stop())

        async def listen() -> None:
            async for notify in conn.notifies():
                if notify.payload.startswith(REPORT):
                    say(notify.payload.split(" ", 1)[0], repr(time.perf_counter()))

        listening = asyncio.create_task(listen())
        await asyncio.wait([listening, stopping], return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening


async def own_replistate(servers: Servers, scope: Scope, replica_id: str) -> None:
    replica = make_replica(servers, scope, replica_id)

    async def wait_for_cancel(handle: OperationHandle) -> None:
        await asyncio.Event().wait()

    async with replica:
        say("ready")
        reader = await stdin_reader()
        while line := (await reader.readline()).decode().split():
            if line[0] == "own":
                job_id = await replica.operations.start_operation(
                    f"gallery@{line[1]}", wait_for_cancel, job_id=line[1]
                )
                say("owned", job_id)


async def echo_nats(servers: Servers, subject: str) -> None:
    client = await nats.connect(servers.nats_url)

    async def answer(msg: Msg) -> None:
        await msg.respond(msg.data)

    await client.subscribe(subject, cb=answer)
    await client.flush()
    say("ready")
    try:
        await wait_for_stop()
    finally:
        await client.close()


async def stdin_reader() -> asyncio.StreamReader:
    """Return a stream reading this process's stdin."""
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    return reader


async def wait_for_stop() -> None:
    """Wait until SIGTERM, SIGINT or the end of stdin."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reader = await stdin_reader()

    async def read_to_end() -> None:
        await reader.read()
        stop.set()

    watcher = asyncio.create_task(read_to_end())
    await stop.wait()
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "mode",
        choices=[
            "watch-replistate",
            "watch-nats",
            "watch-broadcaster",
            "watch-notify",
            "own-replistate",
            "echo-nats",
        ],
    )
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--postgres-url", required=True)
    parser.add_argument("--prefix", required=True, help="subject prefix")
    parser.add_argument("--table", required=True)
    parser.add_argument("--replica-id", default="bench-peer")
    parser.add_argument(
        "--subject", help="subject, pattern or channel of the raw modes"
    )
    args = parser.parse_args()
    servers = Servers(args.nats_url, args.postgres_url)
    scope = Scope(args.prefix, args.table)
    if args.mode == "watch-replistate":
        run = watch_replistate(servers, scope, args.replica_id)
    elif args.mode == "own-replistate":
        run = own_replistate(servers, scope, args.replica_id)
    elif args.mode == "watch-nats":
        run = watch_nats(servers, args.subject)
    elif args.mode == "watch-broadcaster":
        run = watch_broadcaster(servers, args.subject)
    elif args.mode == "watch-notify":
        run = watch_notify(servers, args.subject)
    else:
        run = echo_nats(servers, args.subject)
    asyncio.run(run)


if __name__ == "__main__":
    main()
