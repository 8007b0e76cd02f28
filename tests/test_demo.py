"""The demo, end to end: replica processes, real NATS and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import NATS_ENV, POSTGRES_ENV


@pytest.mark.demo
@pytest.mark.timeout(300)
def test_demo_reports_every_check() -> None:
    """Uses the servers named by the environment, or lets the demo start its own."""
    command = [sys.executable, "-m", "replistate.cli", "demo", "--json"]
    command += ["--install-seconds", "4"]
    if os.environ.get(NATS_ENV):
        command += ["--nats-url", os.environ[NATS_ENV]]
    if os.environ.get(POSTGRES_ENV):
        command += ["--postgres-url", os.environ[POSTGRES_ENV]]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=240, check=False
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert set(summary) == {
        "replicas",
        "polls",
        "polls_consistent",
        "cancel_routed",
        "late_replica_hydrated",
        "bus",
        "store",
    }
    assert summary["replicas"] == 4
    assert summary["polls"] > 10
    assert summary["polls_consistent"] == summary["polls"]
    assert summary["cancel_routed"] is True
    assert summary["late_replica_hydrated"] is True
    assert summary["bus"] == "nats"
    assert summary["store"] == "postgres"
    # The demo removed the folder it worked in.
    removed = [line for line in lines if line.startswith("removed the work folder ")]
    assert len(removed) == 1
    work_dir = Path(removed[0].removeprefix("removed the work folder "))
    assert str(work_dir).startswith(tempfile.gettempdir())
    assert not work_dir.exists()


def child_pids(parent: int) -> set[int]:
    """Return the ids of the live processes whose parent is `parent`."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.add(int(stat.parent.name))
    return children


def replica_log(pids: set[int], name: str) -> Path:
    """Return the log file of the demo replica `name`, one of `pids`."""
    for pid in pids:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if arguments[arguments.index(b"--replica-id") + 1].decode() == name:
            models_dir = arguments[arguments.index(b"--models-dir") + 1].decode()
            return Path(models_dir).parent / f"{name}.log"
    raise AssertionError(f"no process of {name} among {sorted(pids)}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.demo
@pytest.mark.timeout(120)
def test_interrupt_during_late_start_stops_all(
    nats_url: str, postgres_url: str
) -> None:
    command = [sys.executable, "-m", "replistate.cli", "demo"]
    command += ["--nats-url", nats_url, "--postgres-url", postgres_url]
    demo = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    seen: set[int] = set()
    try:
        # Three replicas start first; the fourth starts mid-install.
        deadline = time.monotonic() + 90
        while len(seen) < 4 and time.monotonic() < deadline:
            seen |= child_pids(demo.pid)
            time.sleep(0.01)
        assert len(seen) == 4
        # Interrupt once the fourth is connected but not yet ready.
        log = replica_log(seen, "replica-4")
        while "connected to NATS" not in log.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 130
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()

    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in seen if alive(pid)] == []
