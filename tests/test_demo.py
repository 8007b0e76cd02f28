"""The demo, end to end: replica processes, real NATS and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import NATS_ENV, POSTGRES_ENV


def demo_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("replistate-demo-*"))


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
    folders_before = demo_folders()

    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=240, check=False
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["replicas"] == 4
    assert summary["polls"] > 10
    assert summary["polls_consistent"] == summary["polls"]
    assert summary["cancel_routed"] is True
    assert summary["late_replica_hydrated"] is True
    assert summary["bus"] == "nats"
    assert summary["store"] == "postgres"
    assert demo_folders() == folders_before
