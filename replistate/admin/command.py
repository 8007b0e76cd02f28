"""Exit codes, one-line errors, and the event loop an administration command runs in.

Every command is a coroutine returning an `ExitCode`, and `run` runs it on a new
event loop. A `CommandError` or a server failure becomes one line on stderr. Ctrl-C
and SIGTERM cancel the coroutine, so its `finally` blocks close the connections
before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
import sys
import threading
from collections.abc import Coroutine
from typing import Any

import psycopg

from replistate.admin.render import printable
from replistate.errors import BusError, InvalidIdError, StoreError

__all__ = ["CommandError", "ExitCode", "print_error", "run"]


class ExitCode(enum.IntEnum):
    """Exit codes of the administration commands, as docs/cli.md lists them."""

    OK = 0
    ERROR = 1
    """A server failed during the command, or the table does not exist."""
    USAGE = 2
    """Invalid option or value, such as a job id that cannot name a subject.
    argparse exits with the same code for its own usage errors."""
    UNREACHABLE = 3
    """NATS or PostgreSQL cannot be connected to."""
    NOT_FOUND = 4
    """The job is not in the table."""
    TOO_LATE = 5
    """The cancel came too late: the job already ended."""
    NOT_CANCELLABLE = 6
    """The job is marked as not cancellable."""
    FAILED = 7
    """The followed operation failed."""
    CANCELLED = 8
    """The followed operation was cancelled."""
    INTERRUPTED = 130
    """Ctrl-C or SIGTERM stopped the command, as shells report for SIGINT."""


class CommandError(Exception):
    """An error that ends a command, printed by `run` as one line.

    Attributes:
        code: the exit code of the process.
    """

    def __init__(self, message: str, code: ExitCode) -> None:
        self.code = code
        super().__init__(message)


def print_error(message: str) -> None:
    """Print `message` on stderr as the command's one-line error, with its
    control characters shown as escapes such as ``\\x1b``."""
    text = printable(" ".join(message.split()))
    print(f"replistate: {text}", file=sys.stderr, flush=True)


def run(
    command: Coroutine[Any, Any, ExitCode],
    *,
    interrupted: ExitCode = ExitCode.INTERRUPTED,
) -> int:
    """Run `command` on a new event loop; return the process exit code.

    Args:
        command: the command's coroutine.
        interrupted: the exit code when Ctrl-C or SIGTERM stops the command.
            Signal handlers are installed only in the main thread, because
            Python delivers signals there alone.
    """
    try:
        return int(asyncio.run(_supervise(command, interrupted)))
    except KeyboardInterrupt:
        # Ctrl-C before the handlers were in place, or outside the main thread.
        return int(interrupted)


async def _supervise(
    command: Coroutine[Any, Any, ExitCode], interrupted: ExitCode
) -> ExitCode:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    stopping = False

    def stop() -> None:
        nonlocal stopping
        stopping = True
        task.cancel()

    handled: list[signal.Signals] = []
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop)
            handled.append(signum)
    try:
        return await command
    except asyncio.CancelledError:
        if not stopping:
            raise
        task.uncancel()
        return interrupted
    except CommandError as exc:
        print_error(str(exc))
        return exc.code
    except InvalidIdError as exc:
        print_error(str(exc))
        return ExitCode.USAGE
    except (StoreError, BusError, psycopg.Error) as exc:
        print_error(str(exc))
        return ExitCode.ERROR
    except BrokenPipeError:
        # The reader of stdout went away, as `head` does: nothing is left to do.
        _silence_stdout()
        return ExitCode.OK
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the flush at exit does not fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
