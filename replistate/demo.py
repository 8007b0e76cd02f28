"""The demo: replica processes of the aiohttp example, polled as a browser would.

It starts a nats-server and a PostgreSQL on loopback (unless URLs are given), three
replicas of `examples/aiohttp_app.py`, and plays a user whose every request lands on
the next replica in turn, as behind a round-robin load balancer:

1. install a model through replica 1 and poll `GET /api/operations` every 100 ms
   until it finishes, checking that each poll lists the install with progress no
   lower than the poll before;
2. start a fourth replica while the install runs and check that it lists it;
3. check that every replica reloaded its models after the install;
4. install a second model through replica 1, cancel it through replica 2, and
   check that every replica shows it cancelled.

Every process and folder it makes is removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import aiohttp
import psycopg
from psycopg import sql

from replistate._servers import ThrowawayNats, ThrowawayPostgres

__all__ = ["DemoResult", "run_demo"]

EXAMPLE_APP = Path(__file__).resolve().parents[1] / "examples" / "aiohttp_app.py"
POLL_INTERVAL = 0.1
START_TIMEOUT = 30.0
CANCEL_TIMEOUT = 10.0
LATE_REPLICA_AFTER_POLLS = 5
BAR_WIDTH = 30


@dataclass
class DemoResult:
    """Results of the demo's checks; `summary` gives its closing JSON line."""

    replicas: int = 0
    polls: int = 0
    polls_consistent: int = 0
    cancel_routed: bool = False
    late_replica_hydrated: bool = False
    models_reloaded: bool = False
    bus: str = "nats"
    store: str = "postgres"
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether every check held."""
        return (
            self.polls > 0
            and self.polls_consistent == self.polls
            and self.cancel_routed
            and self.late_replica_hydrated
            and self.models_reloaded
            and not self.failures
        )

    def summary(self) -> dict[str, Any]:
        """Return the closing JSON line's fields."""
        return {
            "replicas": self.replicas,
            "polls": self.polls,
            "polls_consistent": self.polls_consistent,
            "cancel_routed": self.cancel_routed,
            "late_replica_hydrated": self.late_replica_hydrated,
            "bus": self.bus,
            "store": self.store,
        }


@dataclass
class ReplicaProcess:
    """One running replica of the example app."""

    name: str
    process: asyncio.subprocess.Process
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Demo:
    """One run of the demo; `run` returns its result."""

    def __init__(
        self,
        *,
        nats_url: str,
        postgres_url: str,
        table: str,
        work_dir: Path,
        install_seconds: float,
        out: TextIO,
    ) -> None:
        self.nats_url = nats_url
        self.postgres_url = postgres_url
        self.table = table
        self.work_dir = work_dir
        self.install_seconds = install_seconds
        self.out = out
        self.replicas: list[ReplicaProcess] = []
        # Every process started, ready or not, so an interrupt stops them all.
        self._processes: list[asyncio.subprocess.Process] = []
        self._launches: set[asyncio.Task[ReplicaProcess]] = set()
        self.result = DemoResult()
        self._turn = 0
        self._session: aiohttp.ClientSession | None = None
        self._tty = out.isatty()

    def say(self, text: str) -> None:
        if self._tty:
            self.out.write("\r\x1b[K")
        self.out.write(text + "\n")
        self.out.flush()

    async def run(self) -> DemoResult:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self._session = session
            try:
                for index in range(1, 4):
                    self.replicas.append(await self.launch(f"replica-{index}"))
                self.result.replicas = len(self.replicas)
                await self.install_and_poll()
                await self.check_models_reloaded("demo-model-a")
                await self.cancel_through_peer()
            finally:
                await self.stop_replicas()
        return self.result

    async def launch(self, name: str) -> ReplicaProcess:
        """Start a replica process and wait until it reports ready."""
        log_path = self.work_dir / f"{name}.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(EXAMPLE_APP),
                "--nats-url",
                self.nats_url,
                "--postgres-url",
                self.postgres_url,
                "--replica-id",
                name,
                "--table",
                self.table,
                "--models-dir",
                str(self.work_dir / "models"),
                "--install-seconds",
                str(self.install_seconds),
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        self._processes.append(process)
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT)
            port = int(json.loads(line)["port"])
        except (TimeoutError, ValueError, KeyError) as exc:
            process.kill()
            await process.wait()
            raise RuntimeError(
                f"{name} did not start ({exc!r}); its log is {log_path}:\n"
                + log_path.read_text(errors="replace")[-2000:]
            ) from None
        replica = ReplicaProcess(name, process, port, log_path)
        await self.wait_ready(replica)
        self.say(f"{name} ready on {replica.url} (pid {process.pid})")
        return replica

    async def wait_ready(self, replica: ReplicaProcess) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                status, _ = await self.request("GET", replica, "/healthz")
                if status == 200:
                    return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{replica.name} not ready within {START_TIMEOUT:g} s")

    async def request(
        self, method: str, replica: ReplicaProcess, path: str
    ) -> tuple[int, Any]:
        assert self._session is not None
        async with self._session.request(method, replica.url + path) as response:
            return response.status, await response.json()

    def next_replica(self) -> ReplicaProcess:
        replica = self.replicas[self._turn % len(self.replicas)]
        self._turn += 1
        return replica

    async def install(self, replica: ReplicaProcess, model: str) -> str:
        status, body = await self.request(
            "POST", replica, f"/api/models/install/{model}"
        )
        if status != 202:
            raise RuntimeError(f"install of {model} on {replica.name}: {status} {body}")
        self.say(f"install of {model} started on {replica.name}: job {body['jobID']}")
        return str(body["jobID"])

    async def install_and_poll(self) -> None:
        """Install a model and poll round-robin until it finishes."""
        job_id = await self.install(self.replicas[0], "demo-model-a")
        deadline = time.monotonic() + 3 * self.install_seconds + START_TIMEOUT
        last_progress = -1
        late: asyncio.Task[ReplicaProcess] | None = None
        while time.monotonic() < deadline:
            await asyncio.sleep(POLL_INTERVAL)
            if late is None and self.result.polls == LATE_REPLICA_AFTER_POLLS:
                late = asyncio.create_task(self.launch("replica-4"))
                self._launches.add(late)
            if late is not None and late.done() and len(self.replicas) == 3:
                await self.admit_late_replica(late.result(), job_id)

            replica = self.next_replica()
            _, body = await self.request("GET", replica, "/api/operations")
            entry = next(
                (op for op in body["operations"] if op["jobID"] == job_id), None
            )
            if entry is None:
                _, job = await self.request("GET", replica, f"/api/models/job/{job_id}")
                if job.get("processed"):
                    self.say(f"install finished, seen on {replica.name}")
                    break
            elif "error" in entry:
                self.result.failures.append(f"install failed: {entry['error']}")
                break
            self.result.polls += 1
            progress = entry["progress"] if entry else -1
            if entry is not None and progress >= last_progress:
                self.result.polls_consistent += 1
                last_progress = progress
            else:
                self.result.failures.append(
                    f"poll {self.result.polls} on {replica.name}: "
                    f"{'missing' if entry is None else progress} after {last_progress}"
                )
            self.show_poll(replica, entry)
        else:
            self.result.failures.append("install did not finish in time")
        if late is not None and len(self.replicas) == 3:
            # The late replica was ready only after the install ended.
            await self.admit_late_replica(await late, job_id)

    async def admit_late_replica(self, replica: ReplicaProcess, job_id: str) -> None:
        _, body = await self.request("GET", replica, "/api/operations")
        listed = any(op["jobID"] == job_id for op in body["operations"])
        self.result.late_replica_hydrated = listed
        self.replicas.append(replica)
        self.result.replicas = len(self.replicas)
        if not listed:
            self.result.failures.append(f"{replica.name} did not list the install")
        self.say(
            f"{replica.name} joined mid-install and "
            + ("lists the running install" if listed else "does NOT list the install")
        )

    def show_poll(self, replica: ReplicaProcess, entry: dict[str, Any] | None) -> None:
        if entry is None:
            self.say(f"poll {self.result.polls:3d} {replica.name}: install missing")
            return
        filled = BAR_WIDTH * entry["progress"] // 100
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        line = (
            f"poll {self.result.polls:3d} {replica.name} [{bar}] "
            f"{entry['progress']:3d}% {entry['message']}"
        )
        if self._tty:
            self.out.write("\r\x1b[K" + line)
            self.out.flush()
        else:
            self.say(line)

    async def check_models_reloaded(self, model: str) -> None:
        """Check that every replica lists the model installed on another one."""
        missing = []
        for replica in self.replicas:
            for _ in range(50):
                _, body = await self.request("GET", replica, "/api/models")
                if model in body["models"]:
                    break
                await asyncio.sleep(0.1)
            else:
                missing.append(replica.name)
        self.result.models_reloaded = not missing
        if missing:
            self.result.failures.append(f"{model} not loaded on {', '.join(missing)}")
        self.say(
            f"{model} loaded on every replica"
            if not missing
            else f"{model} missing on {', '.join(missing)}"
        )

    async def cancel_through_peer(self) -> None:
        """Install through replica 1, cancel through replica 2, check every one."""
        owner, peer = self.replicas[0], self.replicas[1]
        job_id = await self.install(owner, "demo-model-b")
        await self.wait_listed(peer, job_id)
        status, body = await self.request(
            "POST", peer, f"/api/operations/{job_id}/cancel"
        )
        self.say(f"cancel sent to {peer.name}: {status} {body['outcome']}")
        if status != 202:
            self.result.failures.append(f"cancel through {peer.name}: {status} {body}")
            return

        pending = {replica.name: replica for replica in self.replicas}
        deadline = time.monotonic() + CANCEL_TIMEOUT
        while pending and time.monotonic() < deadline:
            for name, replica in list(pending.items()):
                _, job = await self.request("GET", replica, f"/api/models/job/{job_id}")
                _, listing = await self.request("GET", replica, "/api/operations")
                listed = any(op["jobID"] == job_id for op in listing["operations"])
                if job.get("cancelled") and not listed:
                    del pending[name]
            await asyncio.sleep(POLL_INTERVAL)
        self.result.cancel_routed = not pending
        if pending:
            self.result.failures.append(
                f"cancel not shown on {', '.join(sorted(pending))}"
            )
        self.say(
            "every replica shows the second install cancelled"
            if not pending
            else f"cancel missing on {', '.join(sorted(pending))}"
        )

    async def wait_listed(self, replica: ReplicaProcess, job_id: str) -> None:
        for _ in range(50):
            _, body = await self.request("GET", replica, "/api/operations")
            if any(op["jobID"] == job_id for op in body["operations"]):
                return
            await asyncio.sleep(POLL_INTERVAL)
        raise RuntimeError(f"job {job_id} never listed on {replica.name}")

    async def stop_replicas(self) -> None:
        """Stop every replica process started, the ones still starting included."""
        for launch in self._launches:
            launch.cancel()
        for launch in self._launches:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await launch
        for process in self._processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self._processes:
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


def show_logs(work_dir: Path, out: TextIO, lines: int = 15) -> None:
    """Print the last lines of each replica's log, to explain a failed check."""
    for log_path in sorted(work_dir.glob("replica-*.log")):
        tail = log_path.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- last lines of {log_path.name}", file=out)
        for line in tail:
            print(line, file=out)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def drop_table(postgres_url: str, table: str, out: TextIO) -> None:
    """Drop the demo's table, so a shared database keeps nothing of the run."""
    try:
        with psycopg.connect(postgres_url, autocommit=True, connect_timeout=3) as conn:
            conn.execute(
                sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table))
            )
    except psycopg.Error as exc:
        print(f"table {table} not dropped: {exc}", file=out)


def run_demo(
    *,
    nats_url: str | None = None,
    postgres_url: str | None = None,
    install_seconds: float = 6.0,
    json_output: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """Run the demo; return the process exit code, 0 when every check held.

    SIGTERM is handled as Ctrl-C: the replicas and servers are stopped and the
    temporary folder removed before the demo exits with code 130.
    """
    if not EXAMPLE_APP.exists():
        print(
            f"the demo needs the example app at {EXAMPLE_APP}: run it from a clone "
            "of the repository installed with pip install -e '.[demo]'",
            file=sys.stderr,
        )
        return 2
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    work_dir = Path(tempfile.mkdtemp(prefix="replistate-demo-"))
    table = f"replistate_demo_{uuid.uuid4().hex[:12]}"
    servers: list[ThrowawayNats | ThrowawayPostgres] = []
    result = DemoResult()
    try:
        if nats_url is None:
            nats = ThrowawayNats()
            servers.append(nats)
            nats.start()
            nats_url = nats.url
            print(f"started nats-server on {nats_url}", file=out)
        if postgres_url is None:
            postgres = ThrowawayPostgres()
            servers.append(postgres)
            postgres.start()
            postgres_url = postgres.url
            print(f"started PostgreSQL on {postgres_url}", file=out)
        demo = Demo(
            nats_url=nats_url,
            postgres_url=postgres_url,
            table=table,
            work_dir=work_dir,
            install_seconds=install_seconds,
            out=out,
        )
        try:
            result = asyncio.run(demo.run())
        except (RuntimeError, aiohttp.ClientError, OSError) as exc:
            result = demo.result
            result.failures.append(str(exc))
        if not result.passed:
            show_logs(work_dir, out)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the replicas and servers", file=out)
        return 130
    finally:
        if postgres_url is not None:
            drop_table(postgres_url, table, out)
        for server in reversed(servers):
            server.close()
        shutil.rmtree(work_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous_handler)

    print(f"removed the work folder {work_dir}", file=out)
    for failure in result.failures:
        print(f"check failed: {failure}", file=out)
    print(
        f"{result.polls_consistent}/{result.polls} polls consistent, "
        f"cancel routed: {result.cancel_routed}, "
        f"late replica hydrated: {result.late_replica_hydrated}, "
        f"models reloaded: {result.models_reloaded}: "
        + ("PASS" if result.passed else "FAIL"),
        file=out,
    )
    if json_output:
        print(json.dumps(result.summary()), file=out)
    out.flush()
    return 0 if result.passed else 1
