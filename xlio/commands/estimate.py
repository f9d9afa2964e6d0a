"""``xlio estimate``: a profiled program's run time natively, at one level and in L2
by MMU mode (:mod:`xlio.estimate`)."""

from __future__ import annotations

import argparse
from typing import Any

from xlio.commands.common import (
    emit,
    interrupted_status,
    put_intervals,
    run_study,
    study_lines,
)
from xlio.measure import (
    UsageError,
)
from xlio.options import (
    add_costs,
    add_samples,
    cost_model,
    int_in,
    scale_to,
    writable_file,
)
from xlio.profiles import SHIPPED as SHIPPED_PROFILES
from xlio.sim.guest_mmu import L2_MMUS
from xlio.sim.vept import SCHEMES

NAME = "estimate"


def add_parser(sub: Any) -> None:
    es = sub.add_parser(
        "estimate",
        help="a profiled program's run time natively, at one level and in L2 by MMU mode",
    )
    es.add_argument(
        "profile", metavar="PROFILE",
        help=f"a profile file, or a shipped one ({', '.join(SHIPPED_PROFILES)})",
    )  # fmt: skip
    add_costs(es)
    es.add_argument("--l2-mmu", default=None, choices=L2_MMUS, help="only this L2 row")
    es.add_argument(
        "--scale-to", type=scale_to, default=None, metavar="CONFIG=SECONDS",
        help="scale the CPU work so that CONFIG (single, native, l2-nested-ept, ...) takes SECONDS",
    )  # fmt: skip
    es.add_argument("--shadow-vmcs", action=argparse.BooleanOptionalAction, default=None,
                    help="VMCS shadowing (default: the preset's)")  # fmt: skip
    es.add_argument("--no-vmcs-exits", action="store_true",
                    help="hypothetical: VMREAD/VMWRITE never exit")  # fmt: skip
    em = es.add_argument_group("memory (first touches and host swap, as ept-touch and ept-churn)")
    em.add_argument(
        "--virtual-ept", default=None, choices=SCHEMES, help="EPT12 scheme (default: the preset's)"
    )
    em.add_argument("--static-ept", action="store_true", help="L1 pre-builds EPT12")
    em.add_argument(
        "--avoid-invept", action=argparse.BooleanOptionalAction, default=None,
        help="no INVEPT for new mappings (default: the preset's L1)",
    )  # fmt: skip
    em.add_argument("--swap", default=None, choices=("l1", "l0"), help="who swaps (with --rate)")
    em.add_argument(
        "--rate", type=int_in(1, 10**7), default=None,
        help="host swap's EPT modifications per second while the program runs",
    )  # fmt: skip
    es.add_argument("--json", action="store_true", help="one JSON object on stdout")
    es.add_argument(
        "--plot", type=writable_file, default=None, metavar="FILE.png",
        help="the breakdown as stacked bars (matplotlib, xlio[plot])",
    )  # fmt: skip
    add_samples(es)


def _inputs(a: argparse.Namespace) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """(cost model, profile, switches, memory options) of an estimate."""
    from xlio.profile import ProfileError, load
    from xlio.profiles import SHIPPED

    costs = cost_model(a)
    try:
        prof = load(SHIPPED.get(a.profile, a.profile))
    except ProfileError as e:
        raise UsageError(str(e)) from None
    switches = {"shadow_vmcs": a.shadow_vmcs, "vmcs_exits": not a.no_vmcs_exits}
    ept = {
        "virtual_ept": a.virtual_ept, "static_ept": a.static_ept or None,
        "avoid_invept": a.avoid_invept, "swap": a.swap, "rate": a.rate,
    }  # fmt: skip
    if a.swap and not a.rate:
        raise UsageError("--swap needs --rate (EPT modifications per second)")
    return costs, prof, switches, {k: v for k, v in ept.items() if v is not None}


def study_task(a: argparse.Namespace) -> Any:
    """The run a study repeats (--samples, xlio sensitivity): an :class:`xlio.study.Task`."""
    from xlio.study import Task

    costs, prof, switches, ept = _inputs(a)
    return Task("estimate", (prof, a.l2_mmu, a.scale_to, switches, ept), (costs,))


def run(a: argparse.Namespace) -> int:
    from xlio.estimate import estimate, format_estimate

    costs, prof, switches, ept = _inputs(a)
    r = estimate(prof, costs, l2_mmu=a.l2_mmu, scale_to=a.scale_to, switches=switches,
                 ept=ept)  # fmt: skip
    if a.plot:
        from xlio.plot import plot_estimate

        plot_estimate([r], a.plot)
    if a.samples is None:
        return emit(a, r, lambda: format_estimate(r))
    study = run_study(a, study_task(a))
    report = "" if a.json else "\n".join([format_estimate(r), "", *study_lines(study)])
    for row in r["rows"]:  # each configuration's figures, with their intervals
        for k in ("seconds", "slowdown_vs_native", "slowdown_vs_single"):
            iv = study["intervals"].get(f"{row['config']}.{k}")
            if iv is not None:
                row[k] = iv
    put_intervals(r, {**study, "intervals": {}})
    emit(a, r, lambda: report)
    return interrupted_status(a, study)
