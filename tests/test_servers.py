"""Tests for the throwaway NATS and PostgreSQL servers in replistate._servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest

from replistate._servers import (
    ServerStartError,
    ThrowawayNats,
    ThrowawayPostgres,
    find_free_port,
    nats_server_binary,
)


def _read_nats_info(port: int) -> bytes:
    """Connect to a NATS server and return the first line it sends."""
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
        received = b""
        while not received.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    return received


def _connection_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0):
            return False
    except ConnectionRefusedError:
        return True


def test_find_free_port_is_bindable() -> None:
    port = find_free_port()

    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_nats_server_binary_is_executable() -> None:
    binary = nats_server_binary()

    assert binary.name == "nats-server"
    assert binary.is_file()


@pytest.mark.timeout(120)
def test_nats_stop_and_restart_same_port() -> None:
    server = ThrowawayNats()
    port = server.port
    temp_dir = server.temp_dir
    try:
        assert server.url == f"nats://127.0.0.1:{port}"
        assert server.running is False

        server.start()
        assert server.running is True
        info = _read_nats_info(port)
        assert info.startswith(b"INFO ")
        assert b'"port":' + str(port).encode() in info

        server.stop()
        assert server.running is False
        assert _connection_refused(port)
        assert temp_dir.is_dir()

        server.start()
        assert server.port == port
        assert _read_nats_info(port).startswith(b"INFO ")
    finally:
        server.close()

    assert server.running is False
    assert not temp_dir.exists()
    assert _connection_refused(port)
    server.close()


@pytest.mark.timeout(120)
def test_nats_kill_then_restart_with_jetstream() -> None:
    with ThrowawayNats(jetstream=True) as server:
        info = _read_nats_info(server.port)
        assert b'"jetstream":true' in info

        server.kill()
        assert server.running is False
        assert _connection_refused(server.port)

        server.start()
        assert _read_nats_info(server.port).startswith(b"INFO ")
        assert (server.temp_dir / "jetstream").is_dir()

    assert not server.temp_dir.exists()


@pytest.mark.timeout(120)
def test_nats_start_fails_on_taken_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken_port = blocker.getsockname()[1]
        server = ThrowawayNats(port=taken_port)
        try:
            with pytest.raises(ServerStartError) as caught:
                server.start()
        finally:
            server.close()

    message = str(caught.value)
    assert "nats-server" in message
    assert f"port {taken_port}" in message
    assert server.running is False


@pytest.mark.timeout(120)
def test_closed_server_rejects_start() -> None:
    server = ThrowawayNats()
    server.close()

    with pytest.raises(ServerStartError, match="create a new instance"):
        server.start()


@pytest.mark.timeout(120)
def test_postgres_data_survives_restart() -> None:
    server = ThrowawayPostgres(database="replistate_test")
    port = server.port
    temp_dir = server.temp_dir
    try:
        assert server.url == f"postgresql://postgres@127.0.0.1:{port}/replistate_test"

        server.start()
        assert server.running is True
        with psycopg.connect(server.url) as conn:
            row = conn.execute("SELECT 1").fetchone()
            assert row == (1,)
            database = conn.execute("SELECT current_database()").fetchone()
            assert database == ("replistate_test",)
            conn.execute("CREATE TABLE survivor (id integer PRIMARY KEY)")
            conn.execute("INSERT INTO survivor VALUES (42)")

        # A connection left open checks that stop() does not wait for clients.
        idle = psycopg.connect(server.url)
        server.stop()
        idle.close()
        assert server.running is False
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.url, connect_timeout=2)

        server.start()
        assert server.port == port
        with psycopg.connect(server.url) as conn:
            rows = conn.execute("SELECT id FROM survivor").fetchall()
            assert rows == [(42,)]
    finally:
        server.close()

    assert server.running is False
    assert not temp_dir.exists()
    assert _connection_refused(port)


@pytest.mark.timeout(120)
def test_postgres_restarts_after_kill() -> None:
    with ThrowawayPostgres() as server:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (name text)")
            # With synchronous_commit=off a commit may still sit in WAL buffers
            # when SIGKILL arrives. CHECKPOINT writes it out to the OS first.
            conn.execute("CHECKPOINT")
        busy = psycopg.connect(server.url)

        server.kill()
        assert server.running is False
        with pytest.raises(psycopg.OperationalError):
            busy.execute("SELECT 1")
        busy.close()
        assert _connection_refused(server.port)

        server.start()
        with psycopg.connect(server.url) as conn:
            count = conn.execute("SELECT count(*) FROM kept").fetchone()
            assert count == (0,)

    assert not server.temp_dir.exists()


@pytest.mark.timeout(120)
def test_postgres_start_fails_on_taken_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken_port = blocker.getsockname()[1]
        server = ThrowawayPostgres(port=taken_port)
        try:
            with pytest.raises(ServerStartError) as caught:
                server.start()
        finally:
            server.close()

    message = str(caught.value)
    assert "pginstall/bin/postgres" in message
    assert f"port {taken_port}" in message
    assert "could not bind" in message
    assert server.running is False
    assert server.pid is None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(120)
def test_atexit_closes_servers_after_crash() -> None:
    script = textwrap.dedent(
        """
        from replistate._servers import ThrowawayNats, ThrowawayPostgres

        nats = ThrowawayNats()
        nats.start()
        postgres = ThrowawayPostgres()
        postgres.start()
        for server in (nats, postgres):
            print(server.pid, server.temp_dir, flush=True)
        raise RuntimeError("simulated crash")
        """
    )
    # The child imports replistate from this checkout even when it is not installed.
    repo_root = str(Path(__file__).resolve().parents[1])
    python_path = os.environ.get("PYTHONPATH")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, python_path]))
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )

    assert result.returncode == 1
    assert "simulated crash" in result.stderr
    lines = result.stdout.split("\n")[:2]
    assert len(lines) == 2
    for line in lines:
        pid_text, temp_dir = line.split(" ", 1)
        assert not _process_exists(int(pid_text))
        assert not Path(temp_dir).exists()
