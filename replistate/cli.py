"""The `replistate` command: parses the command line and calls the command.

`demo` lives in `replistate.demo`; `ops`, `watch` and `schema` in
`replistate.admin`. docs/cli.md describes every command, option and exit code.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, TypeAlias

from replistate.admin.command import ExitCode, run
from replistate.admin.connections import (
    DEFAULT_NATS_URL,
    DEFAULT_POSTGRES_URL,
    NATS_URL_ENV,
    POSTGRES_URL_ENV,
    url_from_env,
)
from replistate.admin.ops import cancel_operation, list_operations, show_operation
from replistate.admin.schema import apply_schema, print_schema
from replistate.admin.watch import watch
from replistate.store.base import ACTIVE_WINDOW
from replistate.store.postgres import DEFAULT_TABLE
from replistate.subjects import DEFAULT_CACHE_PREFIX, DEFAULT_PREFIX

__all__ = ["build_parser", "main"]


MIN_INSTALL_SECONDS = 3.0
MAX_INSTALL_SECONDS = 3600.0
"""Longest simulated install of `demo`: an hour, far longer than a demo needs."""
MAX_WINDOW_SECONDS = 1e9
"""Widest window of `ops list`, about 31 years: older than any stored row, and
small enough for Python's timedelta and PostgreSQL's timestamps."""


def _seconds(text: str) -> float:
    """Parse a finite number of seconds; argparse reports the error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(
            f"invalid number {text!r}: use a finite number of seconds"
        )
    return value


def install_seconds(text: str) -> float:
    """Parse the `--install-seconds` value, rejecting installs too short to check
    and longer than `MAX_INSTALL_SECONDS`."""
    value = _seconds(text)
    if value < MIN_INSTALL_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{value:g} s is too short: use at least {MIN_INSTALL_SECONDS:g} s"
        )
    if value > MAX_INSTALL_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{value:g} s is too long: use at most {MAX_INSTALL_SECONDS:g} s"
        )
    return value


def window_seconds(text: str) -> float:
    """Parse the `--window-seconds` value: greater than zero and at most
    `MAX_WINDOW_SECONDS`."""
    value = _seconds(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not greater than zero")
    if value > MAX_WINDOW_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{value:g} s is too long: use at most {MAX_WINDOW_SECONDS:g} s "
            "(about 31 years)"
        )
    return value


def positive_integer(text: str) -> int:
    """Parse a whole number greater than zero."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid whole number {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not greater than zero")
    return value


Dispatch = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the `replistate` command line.

    The URL defaults are read from the environment when this is called.
    """
    parser = argparse.ArgumentParser(
        prog="replistate",
        description="Operation state kept consistent across web app replicas.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(commands)
    _add_ops(commands)
    _add_watch(commands)
    _add_schema(commands)
    return parser


if TYPE_CHECKING:
    # argparse gives the type of its subparsers no public name.
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


def _add_postgres_options(parser: argparse.ArgumentParser, *, used: str = "") -> None:
    parser.add_argument(
        "--postgres-url",
        metavar="URL",
        default=url_from_env(POSTGRES_URL_ENV, DEFAULT_POSTGRES_URL),
        help=f"PostgreSQL URL{used} (default: ${POSTGRES_URL_ENV}, else "
        f"{DEFAULT_POSTGRES_URL})",
    )
    parser.add_argument(
        "--table",
        default=DEFAULT_TABLE,
        help="table of the operations, optionally as SCHEMA.TABLE "
        "(default: %(default)s)",
    )


def _add_nats_options(parser: argparse.ArgumentParser, *, used: str = "") -> None:
    parser.add_argument(
        "--nats-url",
        metavar="URL",
        default=url_from_env(NATS_URL_ENV, DEFAULT_NATS_URL),
        help=f"NATS server URL{used} (default: ${NATS_URL_ENV}, else "
        f"{DEFAULT_NATS_URL})",
    )
    parser.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help=f"subject prefix of the operations{used} (default: %(default)s)",
    )


def _add_json_option(parser: argparse.ArgumentParser, output: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {output}")


def _add_demo(commands: Subparsers) -> None:
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
        default=os.environ.get(NATS_URL_ENV),
        help="use this NATS server instead of a throwaway one "
        f"(default: ${NATS_URL_ENV})",
    )
    demo.add_argument(
        "--postgres-url",
        default=os.environ.get(POSTGRES_URL_ENV),
        help="use this PostgreSQL instead of a throwaway one "
        f"(default: ${POSTGRES_URL_ENV})",
    )
    demo.add_argument(
        "--install-seconds",
        type=install_seconds,
        default=6.0,
        help="duration of each simulated install, in seconds, at least "
        f"{MIN_INSTALL_SECONDS:g} so a fourth replica can start during it, and at "
        f"most {MAX_INSTALL_SECONDS:g} (default: %(default)s)",
    )
    _add_json_option(demo, "one line of JSON holding the results at the end")
    demo.set_defaults(dispatch=_dispatch_demo)


def _add_ops(commands: Subparsers) -> None:
    ops = commands.add_parser(
        "ops",
        help="list, show or cancel operations",
        description="List, show or cancel the operations stored in PostgreSQL.",
    )
    actions = ops.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser(
        "list",
        help="list the active operations",
        description="List the operations that are not finished, as replicas "
        "load them at start-up: updated within the window, or with an owner "
        "still renewing its lease.",
    )
    _add_postgres_options(listing)
    listing.add_argument(
        "--all",
        action="store_true",
        help="list completed, failed and cancelled operations of the window too",
    )
    listing.add_argument(
        "--window-seconds",
        metavar="SECONDS",
        type=window_seconds,
        default=ACTIVE_WINDOW.total_seconds(),
        help="list only operations updated within this many seconds, at most "
        f"{MAX_WINDOW_SECONDS:g} (default: %(default)g)",
    )
    _add_json_option(listing, 'one line of JSON: {"table": ..., "operations": [...]}')
    listing.set_defaults(dispatch=_dispatch_list)

    show = actions.add_parser(
        "show",
        help="show one operation, or follow it until it ends",
        description="Show every stored field of one operation and the status "
        "replicas decode from it. With --follow, then print each change received "
        "on the bus until the operation ends, and exit with a code telling how.",
    )
    show.add_argument("job_id", metavar="JOB", help="the job id")
    _add_postgres_options(show)
    show.add_argument(
        "--follow",
        action="store_true",
        help="print each change until the operation completes (exit 0), fails "
        f"(exit {ExitCode.FAILED:d}) or is cancelled (exit {ExitCode.CANCELLED:d})",
    )
    _add_nats_options(show, used=", used with --follow")
    _add_json_option(show, "JSON, one object per line")
    show.set_defaults(dispatch=_dispatch_show)

    cancel = actions.add_parser(
        "cancel",
        help="cancel an operation, wherever it runs",
        description="Store the cancel request in the operation's row and publish "
        "it on the bus, as a replica does, so the replica running the operation "
        "stops it. The exit code tells the outcome.",
    )
    cancel.add_argument("job_id", metavar="JOB", help="the job id")
    _add_postgres_options(cancel)
    _add_nats_options(cancel)
    _add_json_option(
        cancel, 'one line of JSON: {"job_id", "outcome", "state", "owner"}'
    )
    cancel.set_defaults(dispatch=_dispatch_cancel)


def _add_watch(commands: Subparsers) -> None:
    watcher = commands.add_parser(
        "watch",
        help="print the messages on the bus as they arrive",
        description="Subscribe to the operation and invalidation subjects and print "
        "each message, decoded, until Ctrl-C, SIGTERM or --count. Payloads that "
        "replicas would reject are shown with the reason.",
    )
    _add_nats_options(watcher)
    watcher.add_argument(
        "--cache-prefix",
        metavar="PREFIX",
        default=DEFAULT_CACHE_PREFIX,
        help="subject prefix of the invalidations (default: %(default)s)",
    )
    watcher.add_argument("--job", metavar="JOB", help="show only this job's messages")
    watcher.add_argument(
        "--subject",
        metavar="PATTERN",
        action="append",
        default=[],
        help="subscribe to this NATS subject pattern instead, where * matches one "
        "token and a final > the rest; repeat for several",
    )
    watcher.add_argument(
        "--count",
        metavar="N",
        type=positive_integer,
        help="exit after printing N messages",
    )
    _add_json_option(watcher, "one JSON object per message and line")
    watcher.set_defaults(dispatch=_dispatch_watch)


def _add_schema(commands: Subparsers) -> None:
    schema = commands.add_parser(
        "schema",
        help="print or apply the SQL of the operations table",
        description="Print the SQL script that creates the operations table, as "
        "replicas run it at start-up, or apply it with --apply. Applying it again "
        "changes nothing.",
    )
    _add_postgres_options(schema, used=", used with --apply")
    schema.add_argument(
        "--apply",
        action="store_true",
        help="run the script on PostgreSQL instead of printing it",
    )
    schema.set_defaults(dispatch=_dispatch_schema)


def _dispatch_demo(args: argparse.Namespace) -> int:
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


def _dispatch_list(args: argparse.Namespace) -> int:
    return run(
        list_operations(
            postgres_url=args.postgres_url,
            table=args.table,
            window=timedelta(seconds=args.window_seconds),
            include_ended=args.all,
            json_output=args.json,
        )
    )


def _dispatch_show(args: argparse.Namespace) -> int:
    return run(
        show_operation(
            postgres_url=args.postgres_url,
            table=args.table,
            job_id=args.job_id,
            json_output=args.json,
            follow=args.follow,
            nats_url=args.nats_url,
            prefix=args.prefix,
        )
    )


def _dispatch_cancel(args: argparse.Namespace) -> int:
    return run(
        cancel_operation(
            postgres_url=args.postgres_url,
            nats_url=args.nats_url,
            table=args.table,
            prefix=args.prefix,
            job_id=args.job_id,
            json_output=args.json,
        )
    )


def _dispatch_watch(args: argparse.Namespace) -> int:
    # Ctrl-C is how a watch normally ends, so it exits with 0.
    return run(
        watch(
            nats_url=args.nats_url,
            prefix=args.prefix,
            cache_prefix=args.cache_prefix,
            job_id=args.job,
            patterns=args.subject,
            count=args.count,
            json_output=args.json,
        ),
        interrupted=ExitCode.OK,
    )


def _dispatch_schema(args: argparse.Namespace) -> int:
    if args.apply:
        return run(apply_schema(postgres_url=args.postgres_url, table=args.table))
    return run(print_schema(table=args.table))


def main(argv: list[str] | None = None) -> int:
    """Run the `replistate` command; return its exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    dispatch: Dispatch = args.dispatch
    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
