"""Run every benchmark and print each figure as a ratio to its baseline.

    python -m benchmarks [--quick] [--json] [--runs N]
        [--nats-url URL] [--postgres-url URL]

Without URLs it starts a throwaway nats-server and PostgreSQL on loopback, as the
tests do. Each figure is measured `--runs` times and the median is reported; with
``--json`` the output ends with one line of JSON holding every figure.

Ctrl-C or SIGTERM stops the run with exit code 130, after the peers and the
throwaway servers stop and each benchmark drops its table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import attrs

from benchmarks import cancel, hydration, memory, propagation, reads, throughput, writes
from benchmarks.common import Servers, median, percentile, servers


@attrs.frozen
class Sizes:
    """How much work each benchmark does in one run."""

    propagation_samples: int
    throughput_updates: int
    hydration_operations: int
    write_ticks: int
    write_seconds: float
    read_operations: int
    read_requests: int
    cancel_samples: int
    memory_operations: int


FULL = Sizes(2000, 50_000, 10_000, 1000, 10.0, 1000, 500, 200, 10_000)
QUICK = Sizes(300, 10_000, 10_000, 1000, 2.0, 1000, 100, 30, 10_000)

TARGETS = {
    "propagation_p50_ratio": ("<=", 1.3),
    "propagation_p99_ratio": ("<=", 2.0),
    "throughput_ratio": (">=", 0.5),
    "hydration_ratio": ("<=", 1.3),
    "store_writes_reduction": (">=", 20.0),
    "read_speedup": (">=", 50.0),
    "cancel_rtt_ratio": ("<=", 3.0),
    "bytes_per_operation": ("<=", 2048.0),
}


def met(key: str, value: float) -> bool:
    """Return whether `value` meets the target of figure `key`."""
    direction, target = TARGETS[key]
    return value <= target if direction == "<=" else value >= target


def one_run(found: Servers, sizes: Sizes, say: Callable[[str], None]) -> dict[str, Any]:
    """Measure every figure once; return the figures and the raw values."""
    figures: dict[str, Any] = {}

    ours = asyncio.run(
        propagation.replistate_latencies(found, sizes.propagation_samples)
    )
    raw = asyncio.run(propagation.nats_latencies(found, sizes.propagation_samples))
    via_broadcaster = asyncio.run(
        propagation.broadcaster_latencies(found, sizes.propagation_samples)
    )
    via_notify = asyncio.run(
        propagation.notify_latencies(found, sizes.propagation_samples)
    )
    for name, samples in (
        ("replistate", ours),
        ("nats", raw),
        ("broadcaster", via_broadcaster),
        ("notify", via_notify),
    ):
        figures[f"propagation_p50_us_{name}"] = percentile(samples, 0.5) * 1e6
        figures[f"propagation_p99_us_{name}"] = percentile(samples, 0.99) * 1e6
    for quantile in ("p50", "p99"):
        raw_value = figures[f"propagation_{quantile}_us_nats"]
        figures[f"propagation_{quantile}_ratio"] = (
            figures[f"propagation_{quantile}_us_replistate"] / raw_value
        )
        for name in ("broadcaster", "notify"):
            figures[f"propagation_{quantile}_ratio_{name}"] = (
                figures[f"propagation_{quantile}_us_{name}"] / raw_value
            )
    say(
        f"propagation A->B: p50 {figures['propagation_p50_us_replistate']:.0f} us "
        f"({figures['propagation_p50_ratio']:.2f}x raw nats-py), p99 "
        f"{figures['propagation_p99_us_replistate']:.0f} us "
        f"({figures['propagation_p99_ratio']:.2f}x); broadcaster p50 "
        f"{figures['propagation_p50_ratio_broadcaster']:.2f}x, LISTEN/NOTIFY p50 "
        f"{figures['propagation_p50_ratio_notify']:.2f}x"
    )

    ours_rate = asyncio.run(
        throughput.replistate_throughput(found, sizes.throughput_updates)
    )
    raw_rate = asyncio.run(throughput.nats_throughput(found, sizes.throughput_updates))
    figures["throughput_per_second_replistate"] = ours_rate.per_second
    figures["throughput_per_second_nats"] = raw_rate.per_second
    figures["throughput_complete_replistate"] = ours_rate.complete
    figures["throughput_complete_nats"] = raw_rate.complete
    figures["throughput_ratio"] = ours_rate.per_second / raw_rate.per_second
    say(
        f"throughput: {ours_rate.per_second:,.0f} updates/s to 2 peers "
        f"({figures['throughput_ratio']:.2f}x raw nats-py "
        f"{raw_rate.per_second:,.0f}/s); peers caught up: {ours_rate.complete}, "
        f"raw subscribers got every message: {raw_rate.complete}"
    )

    ours_hydrate, raw_select = hydration.run(found, sizes.hydration_operations)
    figures["hydration_ms_replistate"] = median(ours_hydrate) * 1e3
    figures["hydration_ms_psycopg"] = median(raw_select) * 1e3
    figures["hydration_ratio"] = median(ours_hydrate) / median(raw_select)
    say(
        f"hydration of {sizes.hydration_operations:,} operations: "
        f"{figures['hydration_ms_replistate']:.0f} ms "
        f"({figures['hydration_ratio']:.2f}x raw psycopg)"
    )

    counted = asyncio.run(writes.measure(found, sizes.write_ticks, sizes.write_seconds))
    figures["store_writes_replistate"] = counted.replistate
    figures["store_writes_per_tick"] = counted.baseline
    figures["store_writes_reduction"] = counted.reduction
    say(
        f"store writes for {counted.ticks} ticks over {counted.seconds:g} s: "
        f"{counted.replistate} instead of {counted.baseline} "
        f"({counted.reduction:.0f}x fewer)"
    )

    mirror, table = asyncio.run(
        reads.measure(found, sizes.read_operations, sizes.read_requests)
    )
    figures["read_ms_replistate"] = median(mirror) * 1e3
    figures["read_ms_table"] = median(table) * 1e3
    figures["read_speedup"] = median(table) / median(mirror)
    say(
        f"GET /api/operations with {sizes.read_operations:,} operations: "
        f"{figures['read_ms_replistate']:.2f} ms "
        f"({figures['read_speedup']:.0f}x faster than reading the table)"
    )

    ours_cancel = asyncio.run(
        cancel.replistate_round_trips(found, sizes.cancel_samples)
    )
    raw_request = asyncio.run(cancel.nats_round_trips(found, sizes.cancel_samples))
    figures["cancel_ms_replistate"] = median(ours_cancel) * 1e3
    figures["cancel_ms_nats_request"] = median(raw_request) * 1e3
    figures["cancel_rtt_ratio"] = median(ours_cancel) / median(raw_request)
    say(
        f"cancel on B until B shows it, owner on A: "
        f"{figures['cancel_ms_replistate']:.2f} ms "
        f"({figures['cancel_rtt_ratio']:.2f}x one raw NATS round trip)"
    )

    figures["bytes_per_operation"] = memory.run(sizes.memory_operations)
    say(f"memory per active operation: {figures['bytes_per_operation']:.0f} bytes")
    return figures


def run_count(text: str) -> int:
    """Parse the value of ``--runs``: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid run count {text!r}: give a whole number of 1 or more"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"invalid run count {value}: give a whole number of 1 or more"
        )
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="a short run, for CI")
    parser.add_argument("--json", action="store_true", help="end with one line of JSON")
    parser.add_argument(
        "--runs",
        type=run_count,
        help="runs of every figure, 1 or more; the median is reported "
        "(default: 3, 1 with --quick)",
    )
    parser.add_argument(
        "--nats-url",
        default=os.environ.get("REPLISTATE_NATS_URL"),
        help="use this NATS server (default: $REPLISTATE_NATS_URL, else a "
        "throwaway one)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("REPLISTATE_POSTGRES_URL"),
        help="use this PostgreSQL (default: $REPLISTATE_POSTGRES_URL, else a "
        "throwaway one)",
    )
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """Handle SIGTERM as Ctrl-C, by running the current SIGINT handler.

    Inside `asyncio.run` that handler cancels the main task on the first signal,
    so the benchmark's `finally` clauses run while the event loop and the
    replicas' background tasks still work, and `asyncio.run` then raises
    KeyboardInterrupt. A second signal raises KeyboardInterrupt at once. Outside
    `asyncio.run` it is Python's default handler, which raises KeyboardInterrupt.
    """
    on_sigint = signal.getsignal(signal.SIGINT)
    if callable(on_sigint):
        on_sigint(signal.SIGINT, frame)
        return
    # SIGINT is ignored, as in a job that a non-interactive shell starts with '&'.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    default_runs = 1 if args.quick else 3
    runs = args.runs if args.runs is not None else default_runs
    began = time.monotonic()

    def say(text: str) -> None:
        print(text, flush=True)

    # SIGTERM unwinds like Ctrl-C, so the `with` blocks and `finally` clauses
    # stop the peers and the servers and drop the tables on either signal.
    # NOTE: a SIGTERM that arrives before this line, while Python imports the
    # modules, still ends the process at once, but no server has started then.
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with servers(args.nats_url, args.postgres_url) as found:
            results = []
            for run in range(1, runs + 1):
                say(f"== run {run} of {runs}")
                results.append(one_run(found, sizes, say))
    except KeyboardInterrupt:
        print("interrupted: the benchmarks stopped", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)

    summary: dict[str, Any] = {}
    for key in results[0]:
        values = [result[key] for result in results]
        summary[key] = all(values) if isinstance(values[0], bool) else median(values)
    say(f"== medians of {runs} run(s)")
    for key in TARGETS:
        direction, target = TARGETS[key]
        verdict = "met" if met(key, summary[key]) else "MISSED"
        say(f"{key}: {summary[key]:.2f} (target {direction} {target:g}: {verdict})")
    if args.json:
        line = {key: round(summary[key], 3) for key in TARGETS}
        line["details"] = {
            key: round(value, 3) if isinstance(value, float) else value
            for key, value in summary.items()
            if key not in TARGETS
        }
        line["targets_missed"] = [key for key in TARGETS if not met(key, summary[key])]
        line["runs"] = runs
        line["quick"] = args.quick
        line["seconds"] = round(time.monotonic() - began, 1)
        line["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
