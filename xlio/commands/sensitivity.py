"""``xlio sensitivity``: which parameters move a figure of a run (:mod:`xlio.sensitivity`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from xlio.commands.common import emit, interrupted_status, progress_bar
from xlio.measure import UsageError
from xlio.options import add_executor, figure_name, int_in, writable_file

NAME = "sensitivity"
#: The commands whose runs a study can repeat, and the figure each ranks by default.
STUDIED = {
    "measure": ("time_us",),
    "vmexit": (),  # the first test given
    "netperf": ("throughput_mbps", "transactions_per_s"),
    "compare": ("ratio.time_us",),
    "estimate": ("l2-nested-ept.seconds",),
}


def add_parser(sub: Any) -> None:
    from xlio.sensitivity import MORRIS_TRAJECTORIES, Method

    s = sub.add_parser(
        "sensitivity",
        help="which parameters move a figure: Morris screen, Sobol indices, tornado",
        description="Rank the parameters with a range by how much they move one figure of a "
        "run: xlio sensitivity [options] -- COMMAND ARGS... (measure, vmexit, netperf, "
        "compare, estimate).",
    )
    s.add_argument("--figure", default=None, metavar="KEY", type=figure_name,
                   help="the figure (time_us, throughput_mbps, a vmexit test, ratio.time_us "
                   "for compare; default: the command's headline)")  # fmt: skip
    s.add_argument("--method", default=Method.SOBOL.value, choices=[m.value for m in Method],
                   help="morris: the screen; sobol: and Sobol indices of the top")  # fmt: skip
    s.add_argument("--top", type=int_in(1, 20), default=5, metavar="K",
                   help="parameters given Sobol indices and shown in the tornado")  # fmt: skip
    s.add_argument("--trajectories", type=int_in(2, 1000), default=MORRIS_TRAJECTORIES,
                   help="Morris trajectories (each d + 1 runs)")  # fmt: skip
    s.add_argument("--sobol-n", type=int_in(16, 1 << 16), default=256, metavar="N",
                   help="Saltelli base samples, a power of two (N x (K + 2) runs)")  # fmt: skip
    s.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, help="of the sampling")
    s.add_argument("--plot", type=writable_file, default=None, metavar="FILE.png",
                   help="the tornado plot (matplotlib, xlio[plot])")  # fmt: skip
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")
    add_executor(s)
    s.add_argument("run", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS",
                   help="measure, vmexit, netperf, compare or estimate, with options")  # fmt: skip


def _inner(a: argparse.Namespace) -> tuple[str, Any]:
    """The studied command's name and its study task, parsed as that command would."""
    from xlio.cli import build_parser
    from xlio.commands import COMMANDS

    argv = a.run[1:] if a.run and a.run[0] == "--" else a.run
    if not argv or argv[0] not in STUDIED:
        raise UsageError(
            "give the run after --: measure, vmexit, netperf, compare or estimate with its options"
        )
    try:
        inner = build_parser().parse_args(argv)
    except SystemExit:  # the inner parser has printed its own one line
        raise SystemExit(2) from None
    if getattr(inner, "samples", None) is not None:
        raise UsageError("the run takes no --samples here: the study draws its own")
    module = next(c for c in COMMANDS if c.NAME == argv[0])
    return argv[0], module.study_task(inner)


def _evaluator(task: Any, names: list[str], figure: str, ex: Any, advance: Any) -> Any:
    """Rows of parameter values -> the figure, through the executor."""
    from dataclasses import replace

    import numpy as np

    from xlio.sim.costs import P, with_params
    from xlio.study import figures

    def at(costs: Any, row: Any) -> Any:
        changes = {}
        for k, v in zip(names, row, strict=True):
            p = costs.params.get(k)
            if p is not None:
                value = round(float(v)) if isinstance(p.value, int) else float(v)
                changes[k] = P(value, "xlio sensitivity", p.kind, p.unit)
        return with_params(costs, costs.name, costs.description, **changes)

    def evaluate(X: Any) -> Any:
        tasks = [replace(task, costs=tuple(at(c, row) for c in task.costs)) for row in X]
        results = ex.map(figures, tasks, advance)
        return np.array([r.get(figure, np.nan) for r in results], dtype=float)

    return evaluate


def run(a: argparse.Namespace) -> int:
    from xlio.executor import Executor, Interrupted
    from xlio.sensitivity import Method, Problem, morris, sobol, tornado
    from xlio.study import figures, ranges

    command, task = _inner(a)
    point = figures(task)
    figure = a.figure or next(
        (k for k in (*STUDIED[command], *point) if k in point), None
    )  # vmexit: its first test
    if figure is None or figure not in point:
        keys = ", ".join(list(point)[:12]) + (", ..." if len(point) > 12 else "")
        raise UsageError(f"argument --figure: no figure {a.figure!r} in this run; it has: {keys}")
    names: list[str] = []
    bounds: list[tuple[float, float]] = []
    for c in task.costs:
        for k, r in ranges(c).items():
            if k not in names:
                names.append(k)
                bounds.append((r.low, r.high))
    if not names:
        raise UsageError("nothing to rank: no parameter of the preset has a range")
    problem = Problem(tuple(names), tuple(bounds))
    centre = [float(next(c.params[k].value for c in task.costs if k in c.params)) for k in names]
    method = Method(a.method)
    runs = a.trajectories * (len(names) + 1) + 2 * a.top
    if method is Method.SOBOL:
        runs += a.sobol_n * (min(a.top, len(names)) + 2)
    interrupted = False
    doc: dict[str, Any] = {"command": command, "figure": figure, "value": point[figure],
                           "method": method.value, "parameters": len(names), "runs": runs,
                           "seed": a.seed}  # fmt: skip
    with (
        Executor(a.jobs, a.scheduler, a.cache) as ex,
        progress_bar(runs, f"xlio sensitivity: {runs:,} runs") as advance,
    ):
        evaluate = _evaluator(task, names, figure, ex, lambda: advance())
        try:
            screen = morris(problem, evaluate, a.seed, a.trajectories)
            top = [r["parameter"] for r in screen[: a.top]]
            indices: dict[str, dict[str, float]] = {}
            if method is Method.SOBOL:
                sub = problem.subset(top)
                sub_eval = _evaluator(task, top, figure, ex, lambda: advance())
                indices = {r["parameter"]: r for r in sobol(sub, sub_eval, a.seed, a.sobol_n)}
                top = sorted(top, key=lambda k: (-indices[k]["ST"], k))
            sub = problem.subset(top)
            bars = {r["parameter"]: r for r in tornado(
                sub, [centre[names.index(k)] for k in top],
                _evaluator(task, top, figure, ex, lambda: advance()))}  # fmt: skip
        except Interrupted:
            interrupted = True
            print("xlio sensitivity: stopped by SIGINT before the study finished", file=sys.stderr)
            return 130
    ranking = []
    for r in [*(next(x for x in screen if x["parameter"] == k) for k in top),
              *(x for x in screen if x["parameter"] not in top)]:  # fmt: skip
        k = r["parameter"]
        row = {**r, **{m: v for m, v in indices.get(k, {}).items() if m != "parameter"}}
        if k in bars:
            row.update({m: v for m, v in bars[k].items() if m != "parameter"})
        ranking.append(row)
    doc["ranking"] = ranking
    doc["interrupted"] = interrupted
    if a.cache:
        print(f"xlio sensitivity: {ex.from_cache:,} runs came from the cache {a.cache}",
              file=sys.stderr)  # fmt: skip
    if a.plot:
        from xlio.plot import plot_tornado

        plot_tornado(doc, a.plot)
    emit(a, doc, lambda: format_sensitivity(doc, a.top))
    return interrupted_status(a, doc)


def format_sensitivity(doc: dict[str, Any], top: int) -> str:
    from xlio.report import figure as fig
    from xlio.report import render, table

    sobol = f", Sobol indices of the top {top}" if doc["method"] == "sobol" else ""
    head = (f"xlio sensitivity: {doc['figure']} of {doc['command']} = {fig(doc['value'])}; "
            f"{doc['parameters']} parameters with a range, {doc['runs']:,} runs "
            f"(Morris screen{sobol})")  # fmt: skip
    rows = []
    for r in doc["ranking"][: max(top, 10)]:
        rows.append([
            r["parameter"], fig(r["mu_star"]), fig(r["sigma"]),
            f"{r['S1']:.2f}" if "S1" in r else "", f"{r['ST']:.2f}" if "ST" in r else "",
            f"{fig(r['at_low'])} .. {fig(r['at_high'])}" if "at_low" in r else "",
        ])  # fmt: skip
    t = table(("parameter", "mu*", "sigma", "S1", "ST", "figure at low .. high"), rows, left=1)
    return render(
        head,
        t,
        "mu*: Morris' mean absolute effect across the range; S1, ST: the "
        "share of the figure's variance a parameter explains alone, and with its "
        "interactions; the last column moves it alone from its low to its high end",
    )
