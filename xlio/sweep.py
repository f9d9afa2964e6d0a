"""``xlio sweep``: one or two parameters over values, on one or more paths.

Theory of operation. A sweep is a grid: the paths (``--path l1,l0``) times
the values of one or two ``--param NAME=V1,V2,...``. Each grid point is a
:class:`Point`, a plain description of one ``measure``, ``vmexit`` or
``netperf`` run (cost model, switches, workload options), built and checked
here before anything runs, so a typo fails in one line and not after an
hour. :func:`run_point` runs one point and returns its row: the point's
values and every numeric figure of the result, flattened (``l0_exits``,
``latency_us.p99``). :func:`run_all` fans points out to ``--jobs``
processes and keeps the rows done so far when interrupted; the edge
(``xlio.cli``) shows progress on stderr and writes rows as CSV, JSON and a
plot.

A parameter is any of: ``path``, ``preset``, a model switch
(``shadow_vmcs``, ``apicv``, ...), a workload option (``batch``,
``frame_size``, ...), a netperf option (``link``, ``size``, ...), ``count``,
or any cost parameter of the preset (``hw_exit``, ``handler.io_kick``, ...).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from xlio.measure import OPTION_GROUPS, WORKLOADS, UsageError, measure
from xlio.sim.accounting import SUMMARY_KEYS
from xlio.sim.presets import PRESETS, CostModel, costs_from_toml, override, parse_value
from xlio.sim.workloads import PATHS


class Of(StrEnum):
    """What each point of a sweep runs."""

    MEASURE = "measure"
    VMEXIT = "vmexit"
    NETPERF = "netperf"


SWITCHES = ("shadow_vmcs", "vmcs_exits", "operand", "cache_reg", "apicv", "virtual_idle")
NETPERF_OPTIONS = ("link", "size", "burst", "duration", "seed", "l1_backend_vcpu", "l1_backend",
                   "tso", "ticks")  # fmt: skip
WORKLOAD_OPTIONS = tuple(k for _, keys in OPTION_GROUPS.values() for k in keys)
#: The default figure a sweep of each kind shows (any flattened key can be asked for).
DEFAULT_METRIC = {Of.MEASURE: "l0_exits", Of.VMEXIT: "cycles", Of.NETPERF: "throughput_mbps"}
#: Units of the figures people sweep most, for axis labels ("per" is filled in).
UNITS = {
    "cycles": "cycles per {per}", "time_us": "µs per {per}", "throughput_mbps": "Mb/s",
    "transactions_per_s": "transactions/s", "packets_per_s": "packets/s",
    "latency_us.p50": "µs", "latency_us.p90": "µs", "latency_us.p99": "µs",
    "cpu_busiest.utilization": "share of one CPU",
}  # fmt: skip
MAX_POINTS = 10_000
#: The figures each kind of point gives (netperf's nested ones by prefix).
METRICS = {
    Of.MEASURE: (*SUMMARY_KEYS, "cycles", "time_us"),
    Of.VMEXIT: ("cycles", "exits", "ipi", "eoi"),
    Of.NETPERF: ("transactions_per_s", "throughput_mbps", "packets_per_s", "link_utilization",
                 "latency_us.", "cpu.", "cpu_by_level.", "cpu_busiest.", "exits_per_s.",
                 "per_packet."),
}  # fmt: skip


def check_metric(of: Of, metric: str) -> None:
    """Refuse a figure a point of ``of`` never gives, before anything runs."""
    known = METRICS[of]
    if metric in known or any(k.endswith(".") and metric.startswith(k) for k in known):
        return
    names = ", ".join(k + "..." if k.endswith(".") else k for k in known)
    raise UsageError(f"argument --metric: {of.value} gives no {metric!r} (one of: {names})")


@dataclass(frozen=True)
class Point:
    """One run of a sweep."""

    of: Of
    workload: str
    path: str
    costs: CostModel
    count: int
    switches: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)  # the swept values of this point


def parse_param(text: str) -> tuple[str, list[str]]:
    """``NAME=V1,V2,...`` as (name, values)."""
    name, eq, values = text.partition("=")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not eq or not name.strip() or not vals:
        raise UsageError(f"argument --param: takes NAME=V1,V2,..., got {text!r}")
    if len(set(vals)) != len(vals):
        raise UsageError(f"argument --param: {name.strip()} repeats a value")
    return name.strip(), vals


def _typed(name: str, text: str, like: Any) -> Any:
    try:
        return parse_value(name, text, like)
    except ValueError as e:
        raise UsageError(f"argument --param: {e}") from None


def with_setting(p: Point, name: str, text: str, base_sets: dict[str, Any]) -> Point:
    """``p`` with parameter ``name`` set to ``text``."""
    if name == "path":
        if text not in PATHS:
            raise UsageError(f"argument --param: path takes {', '.join(PATHS)}, got {text!r}")
        return replace(p, path=text, values={**p.values, name: text})
    if name == "preset":
        if text not in PRESETS:
            raise UsageError(f"argument --param: preset takes {', '.join(PRESETS)}, got {text!r}")
        costs = _set_costs(PRESETS[text], base_sets)
        return replace(p, costs=costs, values={**p.values, name: text})
    if name == "costs":  # a preset file, as --costs takes it (xlio calibrate -o writes one)
        try:
            with open(text, encoding="utf-8") as f:
                costs = costs_from_toml(f.read(), text)
        except OSError as e:
            raise UsageError(f"costs={text}: cannot read it: {e.strerror}") from None
        except ValueError as e:
            raise UsageError(f"costs={text}: {e}") from None
        return replace(p, costs=_set_costs(costs, base_sets), values={**p.values, name: text})
    if name == "count":
        return replace(p, count=_typed(name, text, 1), values={**p.values, name: int(text)})
    if name in SWITCHES:
        like: Any = True if name in ("shadow_vmcs", "vmcs_exits", "apicv", "virtual_idle") else ""
        v = _typed(name, text, like)
        return replace(p, switches={**p.switches, name: v}, values={**p.values, name: v})
    if name in WORKLOAD_OPTIONS or name in NETPERF_OPTIONS:
        like = True if name in ("event_idx", "tso", "static_ept", "static_ept02",
                                "avoid_invept", "defer_rebuild") else 0  # fmt: skip
        if name in ("kick", "virtual_ept", "page_size", "swap", "link", "l1_backend_vcpu",
                    "l1_backend"):  # fmt: skip
            like = ""
        v = _typed(name, text, like)
        return replace(p, options={**p.options, name: v}, values={**p.values, name: v})
    if name in p.costs.params:
        v = _typed(name, text, p.costs.params[name].value)
        try:
            costs = override(p.costs, {name: v}, "xlio sweep --param")
        except ValueError as e:
            raise UsageError(f"argument --param: {e}") from None
        return replace(p, costs=costs, values={**p.values, name: v})
    raise UsageError(
        f"argument --param: unknown parameter {name!r} (a path, preset, switch, workload or "
        "netperf option, count, or a cost parameter of `xlio presets NAME`)"
    )


def _set_costs(costs: CostModel, sets: dict[str, Any]) -> CostModel:
    return override(costs, sets, "--set") if sets else costs


def grid(
    of: Of,
    workload: str,
    paths: list[str],
    costs: CostModel,
    params: list[tuple[str, list[str]]],
    *,
    count: int,
    switches: dict[str, Any],
    options: dict[str, Any],
    sets: dict[str, Any] | None = None,
) -> list[Point]:
    """Every point of the sweep, in order: first parameter outermost, paths innermost."""
    swept = [n for n, v in params if len(v) > 1]
    if not 1 <= len(swept) <= 2:
        raise UsageError(
            "argument --param: sweep one or two parameters (a parameter with one value is a "
            "setting)"
        )
    names = [n for n, _ in params]
    if len(set(names)) != len(names):
        raise UsageError("argument --param: a parameter is given twice")
    if "path" in names and len(paths) > 1:
        raise UsageError("argument --param: path is swept; leave --path to its default")
    if of is Of.VMEXIT and "l0" in paths:
        raise UsageError("argument --path: vmexit runs single (level 1) or l1 (level 2)")
    if of is Of.MEASURE and workload not in WORKLOADS:
        raise UsageError(f"argument --workload: unknown workload {workload!r}")
    base = Point(of, workload, paths[0], costs, count, dict(switches), dict(options))
    n = math.prod(len(v) for _, v in params) * len(paths)
    if n > MAX_POINTS:
        raise UsageError(f"the sweep has {n:,} points; at most {MAX_POINTS:,}")
    points = []
    for combo in itertools.product(*(v for _, v in params)):
        p = base
        for name, text in zip(names, combo, strict=True):
            p = with_setting(p, name, text, sets or {})
        for path in paths if "path" not in names else [p.path]:
            points.append(replace(p, path=path))
    return points


def run_point(p: Point) -> dict[str, Any]:
    """Run one point; its row: the swept values, the path, every numeric figure."""
    if p.of is Of.MEASURE:
        r = measure(p.workload, p.path, p.costs, count=p.count, options=p.options, **p.switches)
        if r.get("interrupted"):  # Ctrl-C inside the point: it is not a result
            raise KeyboardInterrupt
        figures = dict(r["per_op"])
        per = r["per"]
    elif p.of is Of.VMEXIT:
        from xlio.sim.vmexit import run

        try:
            res = run(p.costs, 1 if p.path == "single" else 2, [p.workload], **_vmexit_switches(p))
        except KeyError as e:
            raise UsageError(f"argument --workload: unknown vmexit test {e.args[0]}") from None
        figures = {k: v for k, v in res[p.workload].items() if isinstance(v, (int, float))}
        per = "iteration"
    else:
        from xlio.netperf import netperf

        r = netperf(p.workload, p.path, p.costs, **p.options, **_netperf_switches(p))
        figures = _flatten({k: v for k, v in r.items() if k != "config"})
        per = "second"
    row: dict[str, Any] = {**p.values, "path": p.path, "per": per}
    row.update({k: v for k, v in figures.items() if isinstance(v, (int, float))})
    return row


def _vmexit_switches(p: Point) -> dict[str, Any]:
    unknown = set(p.switches) - {"apicv"}
    if unknown or p.options:
        wrong = sorted(unknown or p.options)[0]
        raise UsageError(f"vmexit takes apicv and cost parameters only, not {wrong}")
    return {"apicv": p.switches.get("apicv")}


def _netperf_switches(p: Point) -> dict[str, Any]:
    unknown = set(p.switches) - {"apicv", "virtual_idle"}
    if unknown:
        raise UsageError(f"netperf does not take {sorted(unknown)[0]}")
    bad = set(p.options) - set(NETPERF_OPTIONS)
    if bad:
        raise UsageError(f"netperf does not take {sorted(bad)[0]}")
    return dict(p.switches)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


#: Units of the parameters people sweep most (cost parameters carry their own).
PARAM_UNITS = {
    "batch": "frames per kick", "frame_size": "bytes", "queue_size": "descriptors",
    "working_set_mib": "MiB", "rate": "EPT changes/s", "seconds": "modeled s",
    "size": "bytes", "burst": "transactions in flight", "duration": "modeled s",
    "count": "operations",
}  # fmt: skip


def param_label(name: str, costs: CostModel) -> str:
    unit = PARAM_UNITS.get(name)
    if unit is None and name in costs.params:
        unit = costs.params[name].unit or None
    return f"{name} ({unit})" if unit else name


def metric_label(metric: str, per: str) -> str:
    """An axis label: "L0 exits per frame", "cycles per request", "Mb/s"."""
    words = re.sub(r"\bl([012])\b", r"L\1", metric.replace("_", " "))
    unit = UNITS.get(metric)
    if unit is not None:
        unit = unit.format(per=per)
        return unit if unit.startswith(metric) else f"{metric} ({unit})"
    if per in ("second", "iteration", ""):
        return words
    return f"{words} per {per}"


def run_all(
    points: list[Point],
    jobs: int,
    done: Callable[[], None],
    scheduler: str | None = None,
    cache: str | None = None,
) -> list[dict[str, Any]]:
    """Run every point through :class:`xlio.executor.Executor` (``jobs``
    processes or a Dask ``scheduler``), in order; ``done`` is called as each finishes.

    Ctrl-C raises :class:`Interrupted` carrying the rows finished so far.
    """
    from xlio.executor import Executor
    from xlio.executor import Interrupted as Stopped

    with Executor(jobs, scheduler, cache) as ex:
        try:
            return ex.map(run_point, points, done)
        except Stopped as e:  # the rows done before the first missing one, in order
            rows = []
            for r in e.results:
                if r is None:
                    break
                rows.append(r)
            raise Interrupted(rows) from None


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: ``rows`` holds the points finished before it."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        super().__init__()
        self.rows = rows
