"""Run every benchmark and print each figure as a ratio to its baseline.

    python -m benchmarks [--quick] [--json] [--runs N]
        [--nats-url URL] [--postgres-url URL]

Without URLs it starts a throwaway nats-server and PostgreSQL on loopback, as the
tests do. Each figure is measured `--runs` times and the median is reported; with
``--json`` the output ends with one line of JSON holding every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Callable
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="a short run, for CI")
    parser.add_argument("--json", action="store_true", help="end with one line of JSON")
    parser.add_argument(
        "--runs",
        type=int,
        help="runs of every figure; the median is reported (default: 3, 1 quick)",
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    runs = args.runs or (1 if args.quick else 3)
    began = time.monotonic()

    def say(text: str) -> None:
        print(text, flush=True)

    with servers(args.nats_url, args.postgres_url) as found:
        results = []
        for run in range(1, runs + 1):
            say(f"== run {run} of {runs}")
            results.append(one_run(found, sizes, say))

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
