"""``xlio measure``: charge one workload on one path: a table of exits by level
and reason, ``--explain``, ``--json``."""

from __future__ import annotations

import argparse
from typing import Any

from xlio.commands.common import (
    emit,
    interrupted_status,
    progress_bar,
    put_intervals,
    run_study,
    study_lines,
)
from xlio.measure import (
    WORKLOADS,
    measure,
)
from xlio.options import (
    MAX_COUNT,
    add_l2_mmu,
    add_model_switches,
    add_network_options,
    add_samples,
    cost_model,
    int_in,
    model_switches,
    seconds_in,
    workload_options,
)
from xlio.report import format_measure, format_perf_kvm_stat
from xlio.sim.ept import PAGE_SHIFTS
from xlio.sim.vept import SCHEMES
from xlio.sim.workloads import PATHS

NAME = "measure"


def add_parser(sub: Any) -> None:
    m = sub.add_parser("measure", help="charge one workload on one path")
    m.add_argument("--workload", required=True, choices=WORKLOADS)
    m.add_argument("--path", default="l1", choices=PATHS)
    m.add_argument(
        "--count",
        type=int_in(1, MAX_COUNT),
        default=1000,
        help="operations (micro workloads), frames (tx, rx) or requests (echo); "
        "ept-touch and ept-churn run once (see --working-set, --seconds)",
    )
    m.add_argument("--json", action="store_true", help="one JSON object on stdout")
    m.add_argument("--explain", action="store_true", help="say what each column and counter means")
    m.add_argument(
        "--perf-kvm-stat", action="store_true",
        help="print the exits as perf kvm stat report does at L0 (for xlio calibrate)",
    )  # fmt: skip
    add_model_switches(m)
    e = m.add_argument_group("memory workloads (ept-touch, ept-churn)")
    e.add_argument(
        "--virtual-ept", default=None, choices=SCHEMES, help="EPT12 scheme (default: the preset's)"
    )
    e.add_argument("--static-ept", action="store_true", help="L1 pre-builds EPT12")
    e.add_argument(
        "--static-ept02", action="store_true", help="L1 pre-builds EPT12 and L0 pre-builds EPT02"
    )
    e.add_argument("--swap", default=None, choices=("l1", "l0"), help="who swaps (default l1)")
    e.add_argument(
        "--avoid-invept", action=argparse.BooleanOptionalAction, default=None,
        help="no INVEPT for new mappings (default: the preset's L1)",
    )  # fmt: skip
    e.add_argument("--defer-rebuild", action="store_true", help="L0 defers the EPT02 rebuild")
    e.add_argument("--working-set", type=int_in(1, 1 << 20), default=None, metavar="MiB")
    e.add_argument("--rate", type=int_in(1, 10**7), default=None, help="EPT modifications/s")
    e.add_argument("--seconds", type=seconds_in(3600), default=None, help="modeled duration")
    e.add_argument("--touch-hz", type=int_in(1, 10**6), default=None, help="L2 sweeps per second")
    e.add_argument("--page-size", default=None, choices=PAGE_SHIFTS, help="default 4k")
    e.add_argument("--l2-mem", type=int_in(1, 1024), default=None, metavar="GiB")
    e.add_argument("--l1-mem", type=int_in(1, 2048), default=None, metavar="GiB")
    add_l2_mmu(m)
    add_network_options(m)
    add_samples(m)


def study_task(a: argparse.Namespace, costs: Any = None) -> Any:
    """The run a study repeats (--samples, xlio sensitivity): an :class:`xlio.study.Task`."""
    from xlio.study import Task
    from xlio.sweep import Of, Point

    costs = costs or cost_model(a)
    point = Point(Of.MEASURE, a.workload, a.path, costs, a.count, model_switches(a),
                  workload_options(a))  # fmt: skip
    return Task("measure", (point,), (costs,))


def run(a: argparse.Namespace) -> int:
    costs = cost_model(a)
    with progress_bar(1, f"xlio measure: {a.workload} on {a.path}") as advance:
        r = measure(
            a.workload, a.path, costs, count=a.count, options=workload_options(a),
            progress=advance, **model_switches(a),
        )  # fmt: skip
    text = (
        (lambda: format_perf_kvm_stat(r, costs.hw_exit))
        if a.perf_kvm_stat
        else (lambda: format_measure(r, a.explain))
    )
    if a.samples is None or r.get("interrupted"):
        emit(a, r, text)
        return interrupted_status(a, r)
    study = run_study(a, study_task(a, costs))
    report = "" if a.json else "\n".join([text(), "", *study_lines(study)])
    put_intervals(r, study, ("per_op",))
    emit(a, r, lambda: report)
    return interrupted_status(a, study)
