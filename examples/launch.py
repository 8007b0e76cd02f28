"""Run replicas of an example app behind a round-robin proxy on loopback.

    python examples/launch.py --app aiohttp --replicas 3 --port 8080

It starts a throwaway nats-server and PostgreSQL on 127.0.0.1 unless URLs are
given, then N replica processes of ``examples/{app}_app.py`` sharing one models
folder, and waits until each one's ``/healthz`` returns 200. Then it serves a
round-robin proxy on 127.0.0.1 that sends each request to the next replica in
turn (see `rrproxy` for its ``/_proxy/`` control endpoints) and prints one JSON
line: ``{"event": "ready", "url": ..., "replicas": [{"name", "url", "pid"}], ...}``.

With a given NATS server the replicas work under a subject prefix of their own,
and with a given PostgreSQL in a table of their own, dropped at exit. So several
launchers and other apps can share the servers.
On exit, Ctrl-C or SIGTERM, it stops every process and removes every folder it
made.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
from model_server import seconds
from rrproxy import RoundRobinProxy, Upstream

from replistate.demo import ReplicaProcess, drop_table, show_logs
from replistate.testing import ThrowawayNats, ThrowawayPostgres

EXAMPLES_DIR = Path(__file__).resolve().parent
APPS = ("aiohttp", "flask", "fastapi")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
HEALTH_POLL_INTERVAL = 0.1
NATS_ENV = "REPLISTATE_NATS_URL"
POSTGRES_ENV = "REPLISTATE_POSTGRES_URL"


class LaunchError(RuntimeError):
    """Raised when a replica does not start or does not become ready."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Read the launcher's command line."""
    parser = argparse.ArgumentParser(
        description="Run replicas of an example app behind a round-robin proxy "
        "on 127.0.0.1."
    )
    parser.add_argument(
        "--app", choices=APPS, default="aiohttp", help="example app to run"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=3,
        help="number of replica processes (default: %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=8080,
        help="proxy port on 127.0.0.1; 0 picks a free one (default: %(default)s)",
    )
    parser.add_argument(
        "--nats-url",
        default=os.environ.get(NATS_ENV),
        help=f"running NATS server to use (default: ${NATS_ENV}, else a throwaway one)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(POSTGRES_ENV),
        help=f"running PostgreSQL to use (default: ${POSTGRES_ENV}, "
        "else a throwaway one)",
    )
    parser.add_argument(
        "--install-seconds",
        type=seconds,
        help="duration of a simulated install, in seconds (default: the app's)",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        help="folder for the replicas' logs, kept at exit "
        "(default: a temporary folder removed at exit)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print only JSON lines on stdout; progress messages go to stderr",
    )

    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error(f"invalid --replicas {args.replicas}: give 1 or more")
    return args


class Launcher:
    """Start, watch and stop the replica processes of one example app."""

    def __init__(
        self,
        *,
        app: str,
        count: int,
        replica_args: list[str],
        log_dir: Path,
        say: Callable[[str], None],
    ) -> None:
        self.app_path = EXAMPLES_DIR / f"{app}_app.py"
        self.count = count
        self.replica_args = replica_args
        self.log_dir = log_dir
        self.say = say
        self.replicas: list[ReplicaProcess] = []
        self._processes: list[asyncio.subprocess.Process] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def start(self) -> None:
        """Start every replica and wait until each is ready."""
        if not self.app_path.exists():
            raise LaunchError(
                f"example app {self.app_path} not found: pick one of "
                f"{', '.join(APPS)} that exists in {EXAMPLES_DIR}"
            )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        async with aiohttp.ClientSession() as session:
            try:
                async with asyncio.TaskGroup() as group:
                    starts = [
                        group.create_task(self._start_one(f"replica-{i}", session))
                        for i in range(1, self.count + 1)
                    ]
            except ExceptionGroup as failures:
                # The group cancelled the other starts; report the first cause.
                raise failures.exceptions[0] from None
        self.replicas = [task.result() for task in starts]

    async def _start_one(
        self, name: str, session: aiohttp.ClientSession
    ) -> ReplicaProcess:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(self.app_path),
                "--replica-id",
                name,
                *self.replica_args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                # A Ctrl-C in the terminal reaches only the launcher, which
                # then stops the replicas itself.
                start_new_session=True,
            )
        self._processes.append(process)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                port = await self._read_port(process, log_path)
        except TimeoutError:
            raise LaunchError(
                f"{name} did not print its listening line within "
                f"{START_TIMEOUT:g} s; read its log {log_path}"
            ) from None
        self._watch(name, process, log_path)
        replica = ReplicaProcess(name, process, port, log_path)
        await self._wait_healthy(replica, session)
        self.say(f"{name} ready on {replica.url} (pid {process.pid})")
        return replica

    async def _read_port(
        self, process: asyncio.subprocess.Process, log_path: Path
    ) -> int:
        """Return the port of the replica's listening line; copy other lines to
        its log."""
        assert process.stdout is not None
        while True:
            line = await process.stdout.readline()
            if not line:
                code = await process.wait()
                raise LaunchError(
                    f"{log_path.stem} exited with code {code} before listening; "
                    f"read its log {log_path}"
                )
            with contextlib.suppress(ValueError, TypeError):
                event = json.loads(line)
                if event.get("event") == "listening":
                    return int(event["port"])
            with log_path.open("ab") as log:
                log.write(line)

    def _watch(
        self, name: str, process: asyncio.subprocess.Process, log_path: Path
    ) -> None:
        """Copy the replica's later stdout to its log and report an early exit."""

        async def copy_stdout() -> None:
            assert process.stdout is not None
            while line := await process.stdout.readline():
                with log_path.open("ab") as log:
                    log.write(line)

        async def report_exit() -> None:
            code = await process.wait()
            if not self._stopping:
                self.say(
                    f"{name} exited with code {code}; the proxy returns 502 on "
                    f"its turns. Read its log {log_path}"
                )

        for work in (copy_stdout(), report_exit()):
            task = asyncio.create_task(work)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _wait_healthy(
        self, replica: ReplicaProcess, session: aiohttp.ClientSession
    ) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if replica.process.returncode is not None:
                raise LaunchError(
                    f"{replica.name} exited with code {replica.process.returncode} "
                    f"before it was ready; read its log {replica.log_path}"
                )
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(replica.url + "/healthz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(HEALTH_POLL_INTERVAL)
        raise LaunchError(
            f"{replica.name} not ready within {START_TIMEOUT:g} s: /healthz never "
            f"returned 200; read its log {replica.log_path}"
        )

    async def stop(self) -> None:
        """Send SIGTERM to every replica, and SIGKILL to one that does not stop
        within 10 s."""
        self._stopping = True
        for process in self._processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self._processes:
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                self.say(f"replica pid {process.pid} ignored SIGTERM; killing it")
                process.kill()
                await process.wait()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def serve(
    args: argparse.Namespace,
    replica_args: list[str],
    table: str,
    work_dir: Path,
    log_dir: Path,
    say: Callable[[str], None],
) -> int:
    """Start the replicas and the proxy, then serve until SIGINT or SIGTERM.

    Returns the exit code: 0 after a stop requested while serving, 130 when the
    request came during start-up.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    launcher = Launcher(
        app=args.app,
        count=args.replicas,
        replica_args=replica_args,
        log_dir=log_dir,
        say=say,
    )
    proxy: RoundRobinProxy | None = None
    try:
        starting = asyncio.create_task(launcher.start())
        stop_requested = asyncio.create_task(stop.wait())
        await asyncio.wait(
            {starting, stop_requested}, return_when=asyncio.FIRST_COMPLETED
        )
        if not starting.done():
            say("stop requested during start-up")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, LaunchError):
                await starting
            return 130
        stop_requested.cancel()
        starting.result()

        proxy = RoundRobinProxy(
            [Upstream(replica.name, replica.url) for replica in launcher.replicas]
        )
        port = await proxy.start("127.0.0.1", args.port)
        url = f"http://127.0.0.1:{port}/"
        say(f"{args.app} replicas behind {url}: open it in a browser; Ctrl-C stops")
        event = ready_event(args.app, url, table, work_dir, launcher)
        print(json.dumps(event), flush=True)
        await stop.wait()
        say("stopping the proxy and the replicas")
        return 0
    finally:
        if proxy is not None:
            await proxy.close()
        await launcher.stop()


def ready_event(
    app: str, url: str, table: str, work_dir: Path, launcher: Launcher
) -> dict[str, Any]:
    """Return the JSON line printed once the proxy serves."""
    return {
        "event": "ready",
        "app": app,
        "url": url,
        "table": table,
        "work_dir": str(work_dir),
        "replicas": [
            {"name": replica.name, "url": replica.url, "pid": replica.process.pid}
            for replica in launcher.replicas
        ],
    }


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the launcher; return the process exit code."""
    args = parse_args(argv)
    out = sys.stderr if args.json else sys.stdout

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    # Outside the event loop, SIGTERM interrupts like Ctrl-C, so a signal that
    # arrives while a throwaway server starts still leads to the cleanup below.
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    work_dir = Path(tempfile.mkdtemp(prefix="replistate-launch-"))
    servers: list[ThrowawayNats | ThrowawayPostgres] = []
    postgres_url: str | None = args.postgres_url
    # Given servers may be shared, so this group gets a table and subjects of its
    # own on them, named alike so that a leftover table shows whose it was.
    group_name = f"replistate_launch_{uuid.uuid4().hex[:12]}"
    own_table = postgres_url is not None
    own_subjects = args.nats_url is not None
    table = group_name if own_table else "gallery_operations"
    log_dir = args.log_dir if args.log_dir is not None else work_dir / "logs"
    code = 1
    try:
        nats_url: str | None = args.nats_url
        if nats_url is None:
            nats = ThrowawayNats()
            servers.append(nats)
            nats.start()
            nats_url = nats.url
            say(f"started nats-server on {nats_url}")
        if postgres_url is None:
            postgres = ThrowawayPostgres()
            servers.append(postgres)
            postgres.start()
            postgres_url = postgres.url
            say(f"started PostgreSQL on {postgres_url}")
        replica_args = ["--nats-url", nats_url, "--postgres-url", postgres_url]
        replica_args += ["--models-dir", str(work_dir / "models"), "--table", table]
        if own_subjects:
            replica_args += ["--subject-prefix", group_name]
        if args.install_seconds is not None:
            replica_args += ["--install-seconds", str(args.install_seconds)]
        code = asyncio.run(serve(args, replica_args, table, work_dir, log_dir, say))
    except KeyboardInterrupt:
        say("interrupted: stopping the replicas and servers")
        code = 130
    except (RuntimeError, OSError) as exc:
        # LaunchError and the throwaway servers' ServerStartError are RuntimeErrors.
        print(f"launch failed: {exc}", file=sys.stderr)
        if log_dir.exists():
            show_logs(log_dir, sys.stderr)
        code = 1
    finally:
        # Each server gets at most 10 s to stop, so the cleanup ends. A second
        # signal must not cut it short and leave servers or a table behind.
        previous_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if own_table and postgres_url is not None:
            drop_table(postgres_url, table, sys.stderr)
        for server in reversed(servers):
            server.close()
        shutil.rmtree(work_dir, ignore_errors=True)
        signal.signal(signal.SIGINT, previous_sigint)
        signal.signal(signal.SIGTERM, previous_sigterm)
    return code


if __name__ == "__main__":
    sys.exit(main())
