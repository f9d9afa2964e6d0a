"""``xlio compare``: two configurations, or two JSON results, side by side (as ``perf diff``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from xlio.commands.common import (
    emit,
    envelope,
    interrupted_status,
    progress_bar,
    put_intervals,
    run_study,
    set_values,
    study_lines,
)
from xlio.measure import (
    WORKLOADS,
    UsageError,
    measure,
)
from xlio.options import (
    MAX_COUNT,
    add_costs,
    add_samples,
    cost_model,
    int_in,
    name_value,
)
from xlio.sweep import Of

NAME = "compare"


def add_parser(sub: Any) -> None:
    cp = sub.add_parser(
        "compare", help="two configurations, or two JSON results, side by side (perf diff)"
    )
    cp.add_argument("files", nargs="*", metavar="RESULT.json", help="two --json results")
    cp.add_argument("--workload", default=None, choices=WORKLOADS)
    cp.add_argument("--a", dest="a_sets", action="append", type=name_value, default=[],
                    metavar="NAME=VALUE", help="configuration A (repeatable)")  # fmt: skip
    cp.add_argument("--b", dest="b_sets", action="append", type=name_value, default=[],
                    metavar="NAME=VALUE", help="configuration B (repeatable)")  # fmt: skip
    cp.add_argument("--count", type=int_in(1, MAX_COUNT), default=1000)
    cp.add_argument("--json", action="store_true", help="one JSON object on stdout")
    add_costs(cp)
    add_samples(cp)


def _points(a: argparse.Namespace) -> list[Any]:
    """The two configurations, as sweep points."""
    from xlio.sweep import Point, with_setting

    if a.files or a.workload is None or not (a.a_sets or a.b_sets):
        raise UsageError("give --workload and at least one --a or --b setting (or two files)")
    costs = cost_model(a)
    base = Point(Of.MEASURE, a.workload, "l1", costs, a.count)
    sets = set_values(a, costs)
    points = []
    for settings in (a.a_sets, a.b_sets):
        p = base
        for name, value in settings:
            p = with_setting(p, name, value, sets)
        points.append(p)
    return points


def study_task(a: argparse.Namespace, points: list[Any] | None = None) -> Any:
    """The run a study repeats (--samples, xlio sensitivity): an :class:`xlio.study.Task`
    of both sides, each with its own cost model."""
    from xlio.study import Task

    points = points or _points(a)
    return Task("compare", tuple(points), tuple(p.costs for p in points))


def run(a: argparse.Namespace) -> int:
    from xlio.compare import describe, diff
    from xlio.report import figure, render, signed, table

    study = None
    if a.files:
        if a.samples is not None:
            raise UsageError("--samples runs configurations: give --workload, --a and --b")
        if len(a.files) != 2 or a.a_sets or a.b_sets or a.workload:
            raise UsageError("give two result files, or --workload with --a and --b settings")
        docs = []
        for name in a.files:
            try:
                with open(name, encoding="utf-8") as f:
                    docs.append(json.load(f))
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot read {name} as a JSON result: {e}") from None
            if not isinstance(docs[-1], dict):
                raise UsageError(f"{name} is not a JSON result object")
        da, db = docs
        la, lb = a.files
        b_total = None  # a result file says what it covered, not what it was asked for
    else:
        points = _points(a)
        sides: list[dict[str, Any]] = []
        total = sum(p.count for p in points)
        b_total = points[1].count
        with progress_bar(total, f"xlio compare: {a.workload}, A then B") as advance:
            for k, p in enumerate(points):

                def tick(done: int, _total: int, before: int = points[0].count * k) -> None:
                    advance(before + done, total)

                r = measure(p.workload, p.path, p.costs, count=p.count, options=p.options,
                            progress=tick, **p.switches)  # fmt: skip
                sides.append(envelope("measure", r))
                if r.get("interrupted"):
                    break
        if len(sides) < 2:  # Ctrl-C while A ran: nothing to compare it with
            print("xlio compare: stopped by SIGINT before B was measured", file=sys.stderr)
            return 130
        da, db = sides
        if a.samples is not None and not db.get("interrupted"):
            study = run_study(a, study_task(a, points))
        la = " ".join(f"{k}={v}" for k, v in a.a_sets) or "(defaults)"
        lb = " ".join(f"{k}={v}" for k, v in a.b_sets) or "(defaults)"
    rows = diff(da, db)
    interrupted = bool(db.get("interrupted"))
    obj = {
        "a": {"label": la, "what": describe(da), "config": da.get("config", {})},
        "b": {"label": lb, "what": describe(db), "config": db.get("config", {})},
        "rows": rows,
        "interrupted": interrupted,
    }

    def text() -> str:
        body = [
            [r["figure"], figure(r["a"]) if r["a"] is not None else "",
             figure(r["b"]) if r["b"] is not None else "",
             signed(r["delta"]) if r["delta"] is not None else "",
             f"{r['ratio']:.3f}x" if r["ratio"] is not None else ""]
            for r in rows
        ]  # fmt: skip
        head = f"xlio compare: A = {la} ({describe(da)})\n              B = {lb} ({describe(db)})"
        if interrupted:
            of = f" of {b_total:,}" if b_total is not None else ""
            head += f"\nINTERRUPTED: B covers {db['count']:,}{of} operations"
        out = render(head, table(("figure", "A", "B", "B - A", "B / A"), body))
        if study is not None:
            keys = [f"{side}.{k}" for k in ("time_us", "cycles", "l0_exits", "l1_exits")
                    for side in ("a", "b", "ratio")]  # fmt: skip
            out += "\n" + "\n".join(study_lines(study, keys))
        return out

    if study is None:
        emit(a, obj, text)
        return interrupted_status(a, obj)
    report = "" if a.json else text()
    per = da.get("per", "op")
    ivs = study["intervals"]
    for row in rows:  # "cycles per op": the study's a.cycles, b.cycles, ratio.cycles
        k = row["figure"].removesuffix(f" per {per}")
        for side, col in (("a", "a"), ("b", "b"), ("ratio", "ratio")):
            if f"{side}.{k}" in ivs and row[col] is not None:
                row[col] = ivs[f"{side}.{k}"]
    put_intervals(obj, {**study, "intervals": {}})
    emit(a, obj, lambda: report)
    return interrupted_status(a, study)
