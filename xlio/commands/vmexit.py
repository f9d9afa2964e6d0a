"""``xlio vmexit``: kvm-unit-tests' ``x86/vmexit.c`` on the model, in its output format."""

from __future__ import annotations

import argparse
from typing import Any

from xlio.commands.common import (
    emit,
    interrupted_status,
    put_intervals,
    study_lines,
)
from xlio.measure import (
    UsageError,
)
from xlio.options import (
    add_apic_switches,
    add_costs,
    add_samples,
    cost_model,
)

NAME = "vmexit"


def add_parser(sub: Any) -> None:
    vx = sub.add_parser(
        "vmexit", help="kvm-unit-tests x86/vmexit.c on the model, in its output format"
    )
    vx.add_argument("tests", nargs="*", metavar="TEST", help="tests to run (default: all)")
    add_costs(vx, "kvm-2019")
    vx.add_argument(
        "--level", type=int, choices=(1, 2), default=2,
        help="1: the test guest is a plain VM of L0; 2: it is L1's nested guest",
    )  # fmt: skip
    add_apic_switches(vx, idle=False)
    vx.add_argument("--json", action="store_true", help="one JSON object on stdout")
    add_samples(vx)


def study_task(a: argparse.Namespace, costs: Any = None, res: Any = None) -> Any:
    """The run a study repeats (--samples, xlio sensitivity): an :class:`xlio.study.Task`
    of the tests that exit at this level."""
    from xlio.sim.vmexit import run
    from xlio.study import Task

    costs = costs or cost_model(a)
    if res is None:
        try:
            res = run(costs, a.level, a.tests, apicv=a.apicv)
        except KeyError as e:
            raise UsageError(f"unknown test {e.args[0]}") from None
    tests = tuple(k for k, v in res.items() if v["cycles"] is not None)
    return Task("vmexit", (a.level, tests, a.apicv), (costs,))


def run(a: argparse.Namespace) -> int:
    from xlio.sim.vmexit import format_lines, run

    costs = cost_model(a)
    try:
        res = run(costs, a.level, a.tests, apicv=a.apicv)
    except KeyError as e:
        raise UsageError(f"unknown test {e.args[0]}") from None
    obj = {
        "preset": costs.name,
        "level": a.level,
        "apicv": costs.apicv if a.apicv is None else a.apicv,
        "tests": {k: v["cycles"] for k, v in res.items()},
        "config": {
            "preset": costs.name,
            "clock_ghz": costs.clock_ghz,
            "level": a.level,
            "costs": {k: p.value for k, p in sorted(costs.params.items())},
            "costs_set": {k: p.source for k, p in sorted(costs.params.items()) if p.kind == "user"},
        },
        "detail": res,
    }
    if a.samples is None:
        return emit(a, obj, lambda: format_lines(res))
    from xlio.commands.common import run_study

    study = run_study(a, study_task(a, costs, res))
    ivs = study["intervals"]
    put_intervals(obj, study, ("tests",))

    def text() -> str:
        lines = []
        for line in format_lines(res).splitlines():
            name = line.split(" ", 1)[0]
            iv = ivs.get(name) if not line.startswith(" ") else None
            lines.append(f"{line} [{iv['p05']:.0f}-{iv['p95']:.0f}]" if iv else line)
        head = study_lines(study, [])[0]
        return "\n".join([*lines, head])

    emit(a, obj, text)
    return interrupted_status(a, study)
