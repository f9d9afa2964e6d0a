"""``xlio sweep``: one or two parameters over values: a table, CSV, JSON and a plot."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from xlio.commands.common import (
    envelope,
    progress_bar,
    set_values,
)
from xlio.measure import (
    WORKLOADS,
    UsageError,
)
from xlio.options import (
    MAX_COUNT,
    SWEEPABLE,
    add_costs,
    add_executor,
    cost_model,
    figure_name,
    int_in,
    json_target,
    param_values,
    path_list,
    path_ratio,
    plot_file,
    writable_file,
)
from xlio.sim.workloads import PATHS
from xlio.sweep import Of

NAME = "sweep"


def add_parser(sub: Any) -> None:
    sw = sub.add_parser("sweep", help="one or two parameters over values: table, CSV, JSON, plot")
    sw.add_argument(
        "--of", default="measure", choices=[o.value for o in Of],
        help="what each point runs (--workload is a vmexit test or a netperf -t test there)",
    )  # fmt: skip
    sw.add_argument(
        "--workload", required=True, choices=SWEEPABLE, metavar="WORKLOAD",
        help="a workload (measure), a test of `xlio vmexit` or a netperf -t test",
    )  # fmt: skip
    sw.add_argument(
        "--path", type=path_list, default=None,
        help="comma-separated paths (default: single,l1,l0; vmexit: single,l1)",
    )  # fmt: skip
    sw.add_argument(
        "--param", dest="params", action="append", type=param_values, required=True,
        metavar="NAME=V1,V2,...",
        help="a parameter and its values (one or two swept; one value is a setting)",
    )  # fmt: skip
    sw.add_argument(
        "--metric", default=None, type=figure_name,
        help="the figure shown and plotted (default: l0_exits; vmexit: cycles; netperf: "
        "throughput_mbps); any numeric key of the result, dotted for nested ones",
    )  # fmt: skip
    sw.add_argument("--ratio", type=path_ratio, default=None, metavar="A/B",
                    help="plot the metric of path A over path B (l1/l0)")  # fmt: skip
    sw.add_argument("--count", type=int_in(1, MAX_COUNT), default=1000,
                    help="operations per point (measure)")  # fmt: skip
    sw.add_argument("--csv", type=writable_file, default=None, metavar="FILE")
    sw.add_argument("--json", type=json_target, default=None, metavar="FILE",
                    help="the rows as one JSON document (- for stdout)")  # fmt: skip
    sw.add_argument("--plot", type=plot_file, default=None, metavar="FILE.png|svg")
    add_costs(sw)
    add_executor(sw)


def run(a: argparse.Namespace) -> int:
    import csv

    from xlio.report import figure, render, table
    from xlio.sweep import (
        DEFAULT_METRIC,
        Interrupted,
        check_metric,
        grid,
        metric_label,
        param_label,
        run_all,
    )

    of = Of(a.of)
    costs = cost_model(a)
    paths = a.path or (["single", "l1"] if of is Of.VMEXIT else list(PATHS))
    if a.ratio and not set(a.ratio) <= set(paths):
        raise UsageError(f"argument --ratio: {'/'.join(a.ratio)} needs both paths in --path")
    points = grid(
        of, a.workload, paths, costs, a.params, count=a.count, switches={}, options={},
        sets=set_values(a, costs),
    )  # fmt: skip
    metric = a.metric or DEFAULT_METRIC[of]
    check_metric(of, metric)
    if a.plot:
        from xlio.plot import require_matplotlib

        require_matplotlib()  # before the sweep runs, not after
    swept = [n for n, v in a.params if len(v) > 1]
    interrupted = False
    with progress_bar(len(points), f"xlio sweep: {len(points)} points") as advance:
        try:
            rows = run_all(points, a.jobs, lambda: advance(), a.scheduler, a.cache)
        except Interrupted as e:
            rows, interrupted = e.rows, True
    if rows and metric not in rows[0]:
        keys = ", ".join(k for k in rows[0] if k not in swept and k not in ("path", "per"))
        raise UsageError(f"argument --metric: no figure {metric!r}; the rows have: {keys}")
    per = rows[0]["per"] if rows else WORKLOADS[a.workload].per if a.workload in WORKLOADS else ""
    doc = {
        "of": of.value, "workload": a.workload, "paths": paths, "metric": metric,
        "params": {n: v for n, v in a.params}, "swept": swept, "count": a.count,
        "preset": costs.name,
        "costs": {k: p.value for k, p in sorted(costs.params.items())},
        "costs_set": {k: p.source for k, p in costs.params.items() if p.kind == "user"},
        "interrupted": interrupted, "rows": rows,
    }  # fmt: skip
    if a.csv:
        cols = [*swept, "path", "per", metric]
        cols += sorted({k for r in rows for k in r} - set(cols))
        with open(a.csv, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    if a.json and a.json != "-":
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(envelope("sweep", doc), f, indent=1)
            f.write("\n")
    if a.plot and rows:
        from xlio.plot import plot_sweep

        title = f"xlio sweep: {a.of} {a.workload}, preset {costs.name}" + (
            f", {a.count:,} per point" if of is Of.MEASURE else ""
        )
        labels = (param_label(swept[0], costs), metric_label(metric, per))
        plot_sweep(rows, swept, metric, labels, title, a.plot, a.ratio)
    if a.json == "-":
        json.dump(envelope("sweep", doc), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        cols = [*swept, "path", metric]
        body = [[str(r[c]) if c in swept or c == "path" else figure(r.get(c, "")) for c in cols]
                for r in rows]  # fmt: skip
        if a.ratio:
            cols.append(f"{a.ratio[0]}/{a.ratio[1]}")
            for r, line in zip(rows, body, strict=True):
                other = next((o for o in rows if o["path"] == a.ratio[1] and all(
                    o[n] == r[n] for n in swept)), None)  # fmt: skip
                ok = r["path"] == a.ratio[0] and other and other.get(metric)
                line.append(f"{r[metric] / other[metric]:.2f}" if ok else "")  # type: ignore[index]
        head = (f"xlio sweep: {a.of} {a.workload}, preset {costs.name}, {metric_label(metric, per)}"
                + ("; INTERRUPTED: the rows done so far" if interrupted else ""))  # fmt: skip
        print(render(head, table(cols, body, left=len(swept) + 1)))
    return 130 if interrupted else 0
