"""``xlio netperf``: netperf's tests in modeled time, in netperf's output format."""

from __future__ import annotations

import argparse
from typing import Any

from xlio.backends.netperf import LINKS, Test
from xlio.commands.common import (
    emit,
    interrupted_status,
    progress_bar,
    put_intervals,
    run_study,
    study_lines,
)
from xlio.options import (
    add_apic_switches,
    add_costs,
    add_samples,
    cost_model,
    int_in,
    seconds_in,
)
from xlio.sim.workloads import PATHS

NAME = "netperf"


def add_parser(sub: Any) -> None:
    npf = sub.add_parser("netperf", help="netperf tests in modeled time: Gb/s, latency, CPU")
    npf.add_argument(
        "-t",
        dest="test",
        default="TCP_STREAM",
        choices=[t.value for t in Test],
        help="netperf test",
    )
    npf.add_argument("--path", default="single", choices=PATHS)
    add_costs(npf)
    npf.add_argument("--link", default="1g", choices=LINKS)
    npf.add_argument(
        "--duration",
        type=seconds_in(60, lo=0.01),  # below 10 ms, frames in flight at the window edges exceed 1%
        default=1.0,
        metavar="MODELED_SECONDS",
        help="modeled seconds (the first tenth is warm-up; default 1)",
    )
    npf.add_argument(
        "--size",
        type=int_in(1, 1 << 20),
        default=None,
        metavar="BYTES",
        help="payload per packet (streams) or per message (RR)",
    )
    npf.add_argument(
        "--seed", type=int_in(0, 2**32 - 1), default=1,
        help="seed of the peer's jitter and of --samples",
    )  # fmt: skip
    npf.add_argument("--burst", type=int_in(1, 1024), default=1, help="RR transactions in flight")
    npf.add_argument(
        "--l1-backend-vcpu",
        default="other",
        choices=("same", "other"),
        help="L1's vhost on L2's vCPU (same) or another (other, default)",
    )
    npf.add_argument(
        "--l1-backend",
        default="vhost",
        choices=("vhost", "qemu"),
        help="L1's backend: vhost (in L1's kernel, default) or qemu (userspace virtio)",
    )
    npf.add_argument(
        "--tso",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="TCP segmentation offload (default: the preset's)",
    )
    npf.add_argument(
        "--ticks", action=argparse.BooleanOptionalAction, default=True,
        help="the guest's timer tick at the preset's guest_hz while it runs (default on)",
    )  # fmt: skip
    add_apic_switches(npf)
    npf.add_argument("--json", action="store_true", help="one JSON object on stdout")
    add_samples(npf, seed=False)


def study_task(a: argparse.Namespace, costs: Any = None) -> Any:
    """The run a study repeats (--samples, xlio sensitivity): an :class:`xlio.study.Task`."""
    from xlio.study import Task
    from xlio.sweep import Of, Point

    costs = costs or cost_model(a)
    options = {"link": a.link, "duration": a.duration, "size": a.size, "seed": a.seed,
               "burst": a.burst, "l1_backend_vcpu": a.l1_backend_vcpu,
               "l1_backend": a.l1_backend, "tso": a.tso, "ticks": a.ticks}  # fmt: skip
    switches = {"apicv": a.apicv, "virtual_idle": a.virtual_idle}
    point = Point(Of.NETPERF, a.test, a.path, costs, 0, switches, options)
    return Task("netperf", (point,), (costs,))


def run(a: argparse.Namespace) -> int:
    from xlio.netperf import format_netperf, netperf

    costs = cost_model(a)
    with progress_bar(100, f"xlio netperf: {a.test} on {a.path}") as advance:
        r = netperf(
            a.test, a.path, costs, link=a.link, duration=a.duration, size=a.size, seed=a.seed,
            burst=a.burst, l1_backend_vcpu=a.l1_backend_vcpu, l1_backend=a.l1_backend, tso=a.tso,
            ticks=a.ticks,
            apicv=a.apicv,
            virtual_idle=a.virtual_idle, progress=advance,
        )  # fmt: skip
    if a.samples is None or r.get("interrupted"):
        emit(a, r, lambda: format_netperf(r))
        return interrupted_status(a, r)
    study = run_study(a, study_task(a, costs))
    keys = [k for k in HEADLINE if k in study["intervals"]]
    report = "" if a.json else "\n".join([format_netperf(r), "", *study_lines(study, keys)])
    put_intervals(r, study)
    emit(a, r, lambda: report)
    return interrupted_status(a, study)


#: The figures a netperf study prints (every numeric one is in --json).
HEADLINE = ("throughput_mbps", "transactions_per_s", "packets_per_s", "latency_us.p50",
            "latency_us.p90", "latency_us.p99", "cpu_busiest.utilization")  # fmt: skip
