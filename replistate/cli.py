"""The `replistate` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["main"]


MIN_INSTALL_SECONDS = 3.0


def install_seconds(text: str) -> float:
    """Parse the `--install-seconds` value, rejecting installs too short to check."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < MIN_INSTALL_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{value:g} s is too short: use at least {MIN_INSTALL_SECONDS:g} s"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the `replistate` command line."""
    parser = argparse.ArgumentParser(
        prog="replistate",
        description="Operation state kept consistent across web app replicas.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="run replicas of the example app and check they agree",
        description=(
            "Start a throwaway nats-server and PostgreSQL on loopback (unless URLs "
            "are given), run replicas of the aiohttp example, play a user whose "
            "requests go round-robin, and check that every replica agrees."
        ),
    )
    demo.add_argument(
        "--nats-url",
        default=os.environ.get("REPLISTATE_NATS_URL"),
        help="use this NATS server instead of a throwaway one "
        "(default: $REPLISTATE_NATS_URL)",
    )
    demo.add_argument(
        "--postgres-url",
        default=os.environ.get("REPLISTATE_POSTGRES_URL"),
        help="use this PostgreSQL instead of a throwaway one "
        "(default: $REPLISTATE_POSTGRES_URL)",
    )
    demo.add_argument(
        "--install-seconds",
        type=install_seconds,
        default=6.0,
        help="duration of each simulated install, in seconds, at least "
        f"{MIN_INSTALL_SECONDS:g} so a fourth replica can start during it "
        "(default: %(default)s)",
    )
    demo.add_argument(
        "--json",
        action="store_true",
        help="end the output with one line of JSON holding the results",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `replistate` command; return its exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.command == "demo":
        try:
            from replistate.demo import run_demo
        except ImportError as exc:
            print(
                f"the demo needs the 'demo' extra ({exc}): pip install -e '.[demo]'",
                file=sys.stderr,
            )
            return 2
        return run_demo(
            nats_url=args.nats_url,
            postgres_url=args.postgres_url,
            install_seconds=args.install_seconds,
            json_output=args.json,
        )
    return 2


if __name__ == "__main__":
    sys.exit(main())
