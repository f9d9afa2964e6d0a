"""``xlio vmexit``: kvm-unit-tests' ``x86/vmexit.c`` on the model, in its output format;
on SVM also ``x86/svm_tests.c``'s latency tests (``latency_run_exit``, ``latency_svm_insn``),
where the test itself is the L1 hypervisor (``--level 1``)."""

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
    vx.add_argument(
        "tests", nargs="*", metavar="TEST",
        help="tests to run (default: all of vmexit.c); on SVM also latency_run_exit and "
        "latency_svm_insn (svm_tests.c, --level 1)",
    )  # fmt: skip
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


def _svm_latency(a: argparse.Namespace, costs: Any, names: list[str]) -> int:
    """svm_tests.c's latency tests: the test is L1, so --level 1 only, SVM only."""
    from xlio.sim import svm_tests
    from xlio.sim.costs import Arch

    if Arch(costs.arch) is not Arch.SVM:
        raise UsageError(f"{names[0]} is an svm_tests.c test: it needs an SVM preset (--arch svm)")
    if a.level != 1:
        raise UsageError(f"{names[0]} runs the test as L1 (its own nested guest): use --level 1")
    if a.samples is not None:
        raise UsageError("--samples: for x86/vmexit.c's tests; svm_tests.c's are one figure each")
    res = svm_tests.run(costs, names)
    obj = {
        "preset": costs.name, "level": 1, "tests": res,
        "config": {"preset": costs.name, "clock_ghz": costs.clock_ghz, "arch": costs.arch,
                   "vls": costs.vls, "vgif": costs.vgif},
    }  # fmt: skip
    return emit(a, obj, lambda: svm_tests.format_lines(res))


def run(a: argparse.Namespace) -> int:
    from xlio.sim.svm_tests import LATENCY_TESTS
    from xlio.sim.vmexit import format_lines, run

    costs = cost_model(a)
    latency = [t for t in a.tests if t in LATENCY_TESTS]
    if latency:
        if len(latency) != len(a.tests):
            raise UsageError("svm_tests.c's latency tests run alone, not with vmexit.c's")
        return _svm_latency(a, costs, latency)
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
