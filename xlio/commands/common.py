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

SCHEMA_VERSION = 2  # of every --json document (README: "JSON results")


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


def _duration(seconds: float) -> str:
    for unit, s in (("years", 365 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * s:
            return f"{seconds / s:,.0f} {unit}"
    return f"{seconds:,.1f} s"


def run_study(a: argparse.Namespace, task: Any) -> dict[str, Any]:
    """``task`` (an :class:`xlio.study.Task`) at the preset and over
    ``--samples`` parameter sets drawn within the ranges: the figures at the
    preset, each figure's interval, and how the study went (``interrupted``:
    a stop signal ended it; the intervals cover the runs finished)."""
    import time

    from xlio.executor import Executor, Interrupted
    from xlio.study import MAX_SAMPLES, Dist, Study, figures, intervals

    t0 = time.perf_counter()
    point = figures(task)
    one = time.perf_counter() - t0
    if a.samples > MAX_SAMPLES:
        est = one * a.samples / (1 if a.scheduler else a.jobs)
        raise UsageError(
            f"argument --samples: {a.samples:,} runs would take about {_duration(est)} here "
            f"({one * 1000:,.1f} ms each); at most {MAX_SAMPLES:,}"
        )
    study = Study(task, a.samples, a.seed, Dist(a.dist))
    interrupted = False
    with (
        Executor(a.jobs, a.scheduler, a.cache) as ex,
        progress_bar(len(study.tasks), f"xlio {a.command}: {a.samples:,} samples") as advance,
    ):
        try:
            results = ex.map(figures, study.tasks, lambda: advance())
        except Interrupted as e:
            results, interrupted = e.results, True
    done = sum(r is not None for r in results)
    if a.cache:
        print(f"xlio {a.command}: {ex.from_cache:,} of {done:,} runs came from the cache "
              f"{a.cache}", file=sys.stderr)  # fmt: skip
    return {
        "samples": a.samples, "done": done, "seed": a.seed, "dist": a.dist,
        "method": "Latin hypercube (scipy.stats.qmc)", "parameters": study.names,
        "interrupted": interrupted, "from_cache": ex.from_cache,
        "point": point, "intervals": intervals(point, results),
    }  # fmt: skip


def study_lines(s: dict[str, Any], keys: list[str] | None = None) -> list[str]:
    """The text of a study: each figure ``value [p05-p95]``."""
    from xlio.study import with_interval

    ivs = s["intervals"]
    head = (f"parameter uncertainty: {s['done']:,} of {s['samples']:,} parameter sets "
            f"({s['dist']}, seed {s['seed']}, {len(s['parameters'])} parameters drawn); "
            "value [5th-95th percentile]")  # fmt: skip
    if s["interrupted"]:
        head += "; INTERRUPTED: the intervals cover the sets finished"
    out = [head]
    for k in keys if keys is not None else list(ivs):
        if k in ivs and (ivs[k]["value"] or ivs[k]["p05"] != ivs[k]["p95"]):
            v = ivs[k]["value"]
            fmt = "{:,.0f}" if abs(v) >= 100 else "{:,.3g}"
            out.append(f"  {k:<40}{with_interval(v, ivs[k], fmt):>32}")
    return out


def put_intervals(doc: dict[str, Any], study: dict[str, Any], under: tuple[str, ...] = ()) -> None:
    """Each figure of ``doc`` a study gave an interval, at its dotted key
    (below ``under``), becomes ``{"value", "p05", "p50", "p95"}``; the
    study's own account goes under ``study``."""
    for key, iv in study["intervals"].items():
        parts = [*under, *key.split(".")]
        node: Any = doc
        for p in parts[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(parts[-1]), int | float):
            node[parts[-1]] = iv
    doc["study"] = {k: v for k, v in study.items() if k not in ("point", "intervals")}
