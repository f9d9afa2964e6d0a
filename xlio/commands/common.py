"""What every command shares: the JSON envelope, text or JSON on stdout, the
exit status after a stop signal, the progress bar on stderr, the --set values
a sweep applies again, and the check before a run that needs taps."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

from xlio import __version__
from xlio.measure import UsageError, whole
from xlio.sim.presets import CostModel
from xlio.stop import StopState

SCHEMA_VERSION = 1  # of every --json document (README: "JSON results")


def envelope(command: str, obj: dict[str, Any]) -> dict[str, Any]:
    """A command's result as the one JSON schema: version keys first, whole
    numbers as integers."""
    return {
        "schema_version": SCHEMA_VERSION,
        "xlio_version": __version__,
        "command": command,
        **whole(obj),
    }


def emit(a: argparse.Namespace, obj: dict[str, Any], text: Callable[[], str]) -> int:
    """One JSON document, or the text a person reads, on stdout."""
    if a.json:
        json.dump(envelope(a.command, obj), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(text())
    return 0


def interrupted_status(a: argparse.Namespace, r: dict[str, Any]) -> int:
    """After a stop signal the result printed covers what was measured: say
    so, exit 128 + the signal (130 for Ctrl-C)."""
    if r.get("interrupted"):
        status = StopState.status()
        print(f"xlio {a.command}: stopped by {signal.Signals(status - 128).name}", file=sys.stderr)
        return status
    return 0


def set_values(a: argparse.Namespace, costs: CostModel) -> dict[str, Any]:
    """The --set values, to apply again on a swept preset."""
    return {k: p.value for k, p in costs.params.items() if p.kind == "user" and p.source == "--set"}


@contextlib.contextmanager
def progress_bar(total: int, what: str) -> Iterator[Callable[..., None]]:
    """A progress bar on stderr (never stdout), shown once the work takes over a
    second, also when no step has finished yet (a timer shows it)."""
    import threading

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)  # a pipe or a file gets no progress at all
    bar: Progress | None = None
    task = None
    done = 0
    lock = threading.Lock()

    def show() -> None:
        nonlocal bar, task
        with lock:
            if bar is None:
                bar = Progress(
                    "{task.description}", BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console, transient=True,
                )  # fmt: skip
                bar.start()
                task = bar.add_task(what, total=total, completed=done)

    def advance(now: int | None = None, of: int | None = None) -> None:
        """One more done, or ``now`` done of ``of``."""
        nonlocal done, total
        done = done + 1 if now is None else now
        total = total if of is None else of
        if bar is not None and task is not None:
            bar.update(task, completed=done, total=total)

    timer = threading.Timer(1.0, show) if console.is_terminal else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        yield advance
    finally:
        if timer is not None:
            timer.cancel()
        with lock:
            if bar is not None:
                bar.stop()


def tap_ready() -> None:
    from xlio.backends.netns import HostSetupError, check_privileges

    try:
        check_privileges()
    except HostSetupError as e:
        raise UsageError(str(e)) from None
