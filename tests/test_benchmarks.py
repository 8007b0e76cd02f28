"""The command line of ``python -m benchmarks``, without running a benchmark."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

from benchmarks import __main__ as bench
from benchmarks.common import Servers


@pytest.mark.parametrize(
    ("text", "shown"),
    [("0", "0"), ("-1", "-1"), ("x", "'x'"), ("1.5", "'1.5'"), ("", "''")],
)
def test_runs_rejects_invalid_count(
    text: str, shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        bench.parse_args(["--runs", text])

    assert exited.value.code == 2
    error = f"argument --runs: invalid run count {shown}: give a whole number of 1 "
    assert error + "or more" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "runs"), [([], None), (["--runs", "1"], 1), (["--runs", "7"], 7)]
)
def test_runs_accepts_positive_count(argv: list[str], runs: int | None) -> None:
    assert bench.parse_args(argv).runs == runs


@pytest.fixture
def fake_servers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Replace the servers and the SIGTERM handler of the test process.

    The handler only records the signal, so without the benchmarks' own handler
    a SIGTERM does not end the test run.
    """
    events: list[str] = []

    @contextlib.contextmanager
    def servers(nats_url: str | None, postgres_url: str | None) -> Iterator[Servers]:
        events.append("servers started")
        try:
            yield Servers("nats://127.0.0.1:1", "postgresql://127.0.0.1:2/none")
        finally:
            events.append("servers stopped")

    def record(signum: int, frame: FrameType | None) -> None:
        events.append("SIGTERM recorded")

    monkeypatch.setattr(bench, "servers", servers)
    previous = signal.signal(signal.SIGTERM, record)
    yield events
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_in_event_loop_runs_cleanup(
    fake_servers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM during a benchmark's event loop runs its `finally` clauses and
    stops the servers, as Ctrl-C does."""

    def one_run(found: Servers, sizes: Any, say: Any) -> dict[str, Any]:
        async def measure() -> None:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.sleep(30)
                fake_servers.append("benchmark finished")
            finally:
                fake_servers.append("table dropped")

        asyncio.run(measure())
        return {}

    monkeypatch.setattr(bench, "one_run", one_run)

    code = bench.main(["--quick"])

    assert code == 130
    assert fake_servers == ["servers started", "table dropped", "servers stopped"]


def test_sigterm_outside_event_loop_stops_servers(
    fake_servers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def one_run(found: Servers, sizes: Any, say: Any) -> dict[str, Any]:
        os.kill(os.getpid(), signal.SIGTERM)
        # The handler interrupts the sleep. Without a handler that raises, the
        # sleep goes on to its end.
        time.sleep(1)
        fake_servers.append("benchmark finished")
        return {}

    monkeypatch.setattr(bench, "one_run", one_run)

    code = bench.main(["--quick"])

    assert code == 130
    assert fake_servers == ["servers started", "servers stopped"]
