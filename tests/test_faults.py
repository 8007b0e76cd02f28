"""Faults with real components: replica processes of the example app, a real
nats-server and a real PostgreSQL, one of which is stopped or killed mid-install.

The server a test stops is always a throwaway one it starts itself, never one
named by the environment.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from psycopg import sql

from replistate._servers import ThrowawayNats, ThrowawayPostgres

from .conftest import drop_table

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "aiohttp_app.py"

pytestmark = pytest.mark.timeout(180)


@dataclass
class Process:
    """One replica process of the example app."""

    name: str
    process: asyncio.subprocess.Process
    url: str
    log: Path


class Cluster:
    """Replica processes of the example app on given servers."""

    def __init__(
        self, nats_url: str, postgres_url: str, work_dir: Path, *extra: str
    ) -> None:
        self.nats_url = nats_url
        self.postgres_url = postgres_url
        self.table = f"faults_{uuid.uuid4().hex[:10]}"
        self.work_dir = work_dir
        self.extra = extra
        self.processes: list[Process] = []
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    async def launch(self, name: str) -> Process:
        log = self.work_dir / f"{name}.log"
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(EXAMPLE),
                "--nats-url",
                self.nats_url,
                "--postgres-url",
                self.postgres_url,
                "--table",
                self.table,
                "--replica-id",
                name,
                "--models-dir",
                str(self.work_dir / "models"),
                *self.extra,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        port = json.loads(line)["port"]
        replica = Process(name, process, f"http://127.0.0.1:{port}", log)
        self.processes.append(replica)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                status, _ = await self.get(replica, "/healthz")
            except aiohttp.ClientError:
                status = 0
            if status == 200:
                return replica
            await asyncio.sleep(0.05)
        raise AssertionError(f"{name} not ready: {log.read_text()[-2000:]}")

    async def get(self, replica: Process, path: str) -> tuple[int, Any]:
        async with self.session.get(replica.url + path) as response:
            return response.status, await response.json()

    async def post(self, replica: Process, path: str) -> tuple[int, Any]:
        async with self.session.post(replica.url + path) as response:
            return response.status, await response.json()

    async def job(self, replica: Process, job_id: str) -> dict[str, Any]:
        """Return the job's status on `replica`, or {} when the request fails."""
        try:
            status, body = await self.get(replica, f"/api/models/job/{job_id}")
        except (aiohttp.ClientError, TimeoutError):
            return {}
        return body if status == 200 else {}

    async def wait_all(
        self, replicas: list[Process], job_id: str, state: str, seconds: float
    ) -> float:
        """Wait until every replica shows `state` for the job; return the time."""
        began = time.monotonic()
        while time.monotonic() - began < seconds:
            states = [(await self.job(r, job_id)).get("state") for r in replicas]
            if all(found == state for found in states):
                return time.monotonic() - began
            await asyncio.sleep(0.1)
        logs = "\n".join(r.log.read_text()[-1500:] for r in replicas)
        raise AssertionError(f"job {job_id} never {state} everywhere: {states}\n{logs}")

    async def wait_models(
        self, replicas: list[Process], model: str, seconds: float
    ) -> None:
        """Wait until every replica has reloaded its models and lists `model`."""
        began = time.monotonic()
        while time.monotonic() - began < seconds:
            listed = [(await self.get(r, "/api/models"))[1]["models"] for r in replicas]
            if all(model in models for models in listed):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{model} not loaded everywhere: {listed}")

    async def running_anywhere(self, replicas: list[Process]) -> list[str]:
        """Return the job ids any replica still lists without an end."""
        running = []
        for replica in replicas:
            _, body = await self.get(replica, "/api/operations")
            running += [op["jobID"] for op in body["operations"] if "error" not in op]
        return running

    async def close(self) -> None:
        for replica in self.processes:
            if replica.process.returncode is None:
                replica.process.send_signal(signal.SIGTERM)
        for replica in self.processes:
            try:
                await asyncio.wait_for(replica.process.wait(), 15)
            except TimeoutError:
                replica.process.kill()
                await replica.process.wait()
        await self.session.close()
        await drop_table(self.postgres_url, self.table)


@pytest.fixture
async def own_nats() -> AsyncIterator[ThrowawayNats]:
    with ThrowawayNats() as server:
        yield server


@pytest.fixture
async def own_postgres() -> AsyncIterator[ThrowawayPostgres]:
    with ThrowawayPostgres() as server:
        yield server


async def test_nats_restart_mid_install(
    own_nats: ThrowawayNats, postgres_url: str, tmp_path: Path
) -> None:
    """An install that ends while NATS is down shows completed on every replica,
    with the models reloaded, soon after NATS returns."""
    cluster = Cluster(own_nats.url, postgres_url, tmp_path, "--install-seconds", "3")
    try:
        replicas = [await cluster.launch(f"replica-{n}") for n in (1, 2, 3)]
        _, body = await cluster.post(replicas[0], "/api/models/install/model-a")
        job_id = body["jobID"]
        await cluster.wait_all(replicas, job_id, "downloading", 10)

        await asyncio.to_thread(own_nats.stop)
        # The install ends during the outage, so only its owner has the end.
        await cluster.wait_all(replicas[:1], job_id, "completed", 15)
        await asyncio.sleep(1)
        peers_during_outage = [
            (await cluster.job(replica, job_id)).get("state")
            for replica in replicas[1:]
        ]
        await asyncio.to_thread(own_nats.start)
        converged = await cluster.wait_all(replicas, job_id, "completed", 10)
        await cluster.wait_models(replicas, "model-a", 10)

        print(f"converged {converged:.2f} s after the NATS restart")
        assert peers_during_outage == ["downloading", "downloading"]
        assert await cluster.running_anywhere(replicas) == []
    finally:
        await cluster.close()


async def test_postgres_outage_mid_install(
    nats_url: str, own_postgres: ThrowawayPostgres, tmp_path: Path
) -> None:
    """The install completes during an outage and its end reaches the table.

    Store calls time out after 1 s, well within the outage, so the owner's
    terminal write fails and is retried until PostgreSQL is back.
    """
    cluster = Cluster(
        nats_url,
        own_postgres.url,
        tmp_path,
        "--install-seconds",
        "3",
        "--store-timeout",
        "1",
    )
    try:
        replicas = [await cluster.launch(f"replica-{n}") for n in (1, 2, 3)]
        _, body = await cluster.post(replicas[0], "/api/models/install/model-a")
        job_id = body["jobID"]
        await cluster.wait_all(replicas, job_id, "downloading", 10)

        await asyncio.to_thread(own_postgres.stop)
        await cluster.wait_all(replicas, job_id, "completed", 15)
        await asyncio.sleep(2)
        await asyncio.to_thread(own_postgres.start)

        deadline = time.monotonic() + 30
        stored = None
        while time.monotonic() < deadline:
            async with await psycopg.AsyncConnection.connect(own_postgres.url) as conn:
                cursor = await conn.execute(
                    sql.SQL("SELECT status FROM {} WHERE id = %s").format(
                        sql.Identifier(cluster.table)
                    ),
                    (job_id,),
                )
                row = await cursor.fetchone()
            stored = row[0] if row else None
            if stored == "completed":
                break
            await asyncio.sleep(0.2)
        assert stored == "completed"
        await cluster.wait_all(replicas, job_id, "completed", 5)
        owner_log = replicas[0].log.read_text()
        assert f"of job '{job_id}' not stored, will retry" in owner_log
    finally:
        await cluster.close()


async def test_owner_killed_mid_install(
    nats_url: str, postgres_url: str, tmp_path: Path
) -> None:
    """Survivors show the install failed because its owner was lost."""
    cluster = Cluster(
        nats_url,
        postgres_url,
        tmp_path,
        "--install-seconds",
        "30",
        "--lease-seconds",
        "2",
        "--reap-seconds",
        "0.5",
    )
    try:
        replicas = [await cluster.launch(f"replica-{n}") for n in (1, 2, 3)]
        _, body = await cluster.post(replicas[0], "/api/models/install/model-a")
        job_id = body["jobID"]
        await cluster.wait_all(replicas, job_id, "downloading", 10)

        replicas[0].process.kill()
        await replicas[0].process.wait()
        survivors = replicas[1:]
        elapsed = await cluster.wait_all(survivors, job_id, "failed", 2 + 0.5 + 10)

        print(f"failed on every survivor {elapsed:.2f} s after the kill")
        for replica in survivors:
            job = await cluster.job(replica, job_id)
            assert job["error"] == (
                "owner replica replica-1 was lost: its lease expired before the "
                "operation finished"
            )
    finally:
        await cluster.close()
