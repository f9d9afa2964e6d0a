"""The ``xlio`` command line's grammar: every command, its options, their
types and limits, and what parsed options resolve to (the cost model, the
model's switches, a workload's options).

Every bounded number is parsed by :func:`_int` or :func:`_seconds`, whose
``limits`` the limit walk in ``tests/test_limits.py`` reads; a value outside
them is one line and exit status 2 (:class:`_Parser`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from xlio import __version__
from xlio.backends.datapath import KICKS
from xlio.backends.netperf import LINKS, Test
from xlio.measure import (
    MAX_TRACE_OPS,
    TRACEABLE,
    WORKLOADS,
    UsageError,
)
from xlio.profiles import SHIPPED as SHIPPED_PROFILES
from xlio.sim.config import OPERANDS
from xlio.sim.ept import PAGE_SHIFTS
from xlio.sim.guest_mmu import L2_MMUS
from xlio.sim.presets import PRESETS, CostModel, costs_from_toml, override, parse_value
from xlio.sim.profiles import CACHE_MODES
from xlio.sim.vept import SCHEMES
from xlio.sim.vmexit import TESTS as VMEXIT_TESTS
from xlio.sim.workloads import PATHS
from xlio.sweep import Of


class _Help(argparse.HelpFormatter):
    """Help that shows each option's default (argparse's own shows "None" too)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, [], argparse.SUPPRESS)
        if shown and action.option_strings and "default" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _int(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``lo`` to ``hi``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be from {lo:,} to {hi:,}, got {text}")
        return v

    parse.limits = (lo, hi)  # type: ignore[attr-defined]  # what the limit walk in tests reads
    return parse


def _seconds(hi: float, lo: float = 0.0) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds above ``lo`` (at least
    ``lo`` when it is not 0) and at most ``hi``."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (math.isfinite(v) and (lo <= v if lo else 0 < v) and v <= hi):
            least = f"at least {lo:g}" if lo else "above 0"
            raise argparse.ArgumentTypeError(f"must be {least} and at most {hi:g}, got {text}")
        return v

    parse.limits = (lo or math.ulp(0.0), hi)  # type: ignore[attr-defined]
    return parse


#: What ``xlio sweep --workload`` names: a workload, a vmexit test or a netperf test.
SWEEPABLE = tuple(
    dict.fromkeys([*WORKLOADS, *(t.name for t in VMEXIT_TESTS), *(t.value for t in Test)])
)
MAX_COUNT = 10_000_000  # operations of one measure run (about an hour of model time here)
MAX_DEMO_COUNT = 1_000_000
MAX_TAP_DEMO_COUNT = 200  # guest pings and echoes are one at a time: about 3 ms each


def _add_costs(p: argparse.ArgumentParser, default: str = "turtles-2010") -> None:
    """--preset, --set PARAM=VALUE (repeatable) and --costs FILE.toml."""
    g = p.add_argument_group("cost model (see `xlio presets NAME`)")
    g.add_argument("--preset", default=default, choices=PRESETS, help="cost preset")
    g.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="PARAM=VALUE", type=_setting,
        help="set one cost parameter of the preset (repeatable)",
    )  # fmt: skip
    g.add_argument(
        "--costs", default=None, metavar="FILE.toml", type=_readable_file,
        help="a cost model of your own: base = \"PRESET\" and a [params] table",
    )  # fmt: skip


def _setting(text: str) -> str:
    """An argparse type: PARAM=VALUE with a parameter the presets have."""
    name, eq, value = text.partition("=")
    if not eq or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"takes PARAM=VALUE, got {text!r}")
    if name.strip() not in PRESETS["turtles-2010"].params:
        raise argparse.ArgumentTypeError(
            f"unknown parameter {name.strip()!r} (see `xlio presets NAME`)"
        )
    return text


def _paths(text: str) -> list[str]:
    paths = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in paths if p not in PATHS]
    if not paths or bad or len(set(paths)) != len(paths):
        raise argparse.ArgumentTypeError(
            f"comma-separated paths from {', '.join(PATHS)}, got {text!r}"
        )
    return paths


def _param(text: str) -> tuple[str, list[str]]:
    from xlio.sweep import parse_param

    try:
        return parse_param(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("argument --param: ")) from None


def _setting_kv(text: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    if not eq or not name.strip() or not value.strip() or "," in value:
        raise argparse.ArgumentTypeError(f"takes NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def _ratio(text: str) -> tuple[str, str]:
    a, slash, b = text.partition("/")
    if not slash or a not in PATHS or b not in PATHS or a == b:
        raise argparse.ArgumentTypeError(f"takes PATH/PATH (l1/l0), got {text!r}")
    return a, b


def _json_target(text: str) -> str:
    return text if text == "-" else _writable_file(text)


def _plot_file(text: str) -> str:
    if not text.endswith((".png", ".svg")):
        raise argparse.ArgumentTypeError(f"a .png or .svg file, got {text!r}")
    return _writable_file(text)


def _figure_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][\w.%]*", text):
        raise argparse.ArgumentTypeError(f"a figure's key (l0_exits, latency_us.p99), got {text!r}")
    return text


def _readable_file(text: str) -> str:
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"cannot read {text!r}")
    return text


def cost_model(a: argparse.Namespace) -> CostModel:
    """The cost model the user asked for: a preset or a TOML file, then --set."""
    base = PRESETS[a.preset]
    if a.costs is not None:
        try:
            with open(a.costs, encoding="utf-8") as f:
                base = costs_from_toml(f.read(), a.costs)
        except OSError as e:
            raise UsageError(f"argument --costs: cannot read {a.costs}: {e.strerror}") from None
        except ValueError as e:
            raise UsageError(f"argument --costs: {e}") from None
    try:
        values = {}
        for item in a.sets:
            name, _, text = item.partition("=")
            name = name.strip()
            values[name] = parse_value(name, text.strip(), base.params[name].value)
        return override(base, values, "--set") if values else base
    except ValueError as e:
        raise UsageError(f"argument --set: {e}") from None


def _add_model_switches(p: argparse.ArgumentParser, trace: bool = True) -> None:
    _add_costs(p)
    p.add_argument(
        "--shadow-vmcs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="VMCS shadowing (default: the preset's)",
    )
    p.add_argument(
        "--no-vmcs-exits",
        action="store_true",
        help="L1's VMREAD/VMWRITE never exit (Turtles' hypothetical)",
    )
    p.add_argument("--operand", default="register", choices=OPERANDS, help="VMREAD/VMWRITE operand")
    p.add_argument(
        "--cache-reg", default=None, choices=CACHE_MODES,
        help="L1 register cache (default: the preset's)",
    )  # fmt: skip
    _add_apic_switches(p)
    if trace:
        p.add_argument("--trace", action="store_true", help="record every event in --json (slower)")


def _add_apic_switches(p: argparse.ArgumentParser, *, idle: bool = True) -> None:
    p.add_argument(
        "--apicv",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="APICv: posted interrupts, virtual-interrupt delivery (default: the preset's)",
    )
    if not idle:
        return
    p.add_argument(
        "--virtual-idle", action="store_true", help="L0 keeps L2's HLT (DVH's virtual idle)"
    )


def model_switches(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "shadow_vmcs": a.shadow_vmcs,
        "vmcs_exits": not a.no_vmcs_exits,
        "operand": a.operand,
        "cache_reg": a.cache_reg,
        "apicv": a.apicv,
        "virtual_idle": a.virtual_idle,
        "trace": getattr(a, "trace", False),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xlio", description="Cross-layer paravirtual I/O for nested VMX")
    parser.add_argument("--version", action="version", version=f"xlio {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("measure", help="charge one workload on one path")
    m.add_argument("--workload", required=True, choices=WORKLOADS)
    m.add_argument("--path", default="l1", choices=PATHS)
    m.add_argument(
        "--count",
        type=_int(1, MAX_COUNT),
        default=1000,
        help="operations (micro workloads), frames (tx, rx) or requests (echo); "
        "ept-touch and ept-churn run once (see --working-set, --seconds)",
    )
    m.add_argument("--json", action="store_true", help="one JSON object on stdout")
    m.add_argument("--explain", action="store_true", help="say what each column and counter means")
    _add_model_switches(m)
    tr = sub.add_parser("trace", help="the timeline of a few operations, event by event")
    tr.add_argument("--workload", required=True, choices=TRACEABLE)
    tr.add_argument("--path", default="l1", choices=PATHS)
    tr.add_argument(
        "--count", type=_int(1, MAX_TRACE_OPS), default=1,
        help="operations (micro workloads) or batches (tx, rx, echo) to trace",
    )  # fmt: skip
    tr.add_argument("--json", action="store_true", help="one JSON object on stdout")
    _add_model_switches(tr, trace=False)
    _add_network_options(tr)
    _add_l2_mmu(tr)
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
        "--path", type=_paths, default=None,
        help="comma-separated paths (default: single,l1,l0; vmexit: single,l1)",
    )  # fmt: skip
    sw.add_argument(
        "--param", dest="params", action="append", type=_param, required=True,
        metavar="NAME=V1,V2,...",
        help="a parameter and its values (one or two swept; one value is a setting)",
    )  # fmt: skip
    sw.add_argument(
        "--metric", default=None, type=_figure_name,
        help="the figure shown and plotted (default: l0_exits; vmexit: cycles; netperf: "
        "throughput_mbps); any numeric key of the result, dotted for nested ones",
    )  # fmt: skip
    sw.add_argument("--ratio", type=_ratio, default=None, metavar="A/B",
                    help="plot the metric of path A over path B (l1/l0)")  # fmt: skip
    sw.add_argument("--count", type=_int(1, MAX_COUNT), default=1000,
                    help="operations per point (measure)")  # fmt: skip
    sw.add_argument("--jobs", type=_int(1, 64), default=1, help="processes")
    sw.add_argument("--csv", type=_writable_file, default=None, metavar="FILE")
    sw.add_argument("--json", type=_json_target, default=None, metavar="FILE",
                    help="the rows as one JSON document (- for stdout)")  # fmt: skip
    sw.add_argument("--plot", type=_plot_file, default=None, metavar="FILE.png|svg")
    _add_costs(sw)
    cp = sub.add_parser(
        "compare", help="two configurations, or two JSON results, side by side (perf diff)"
    )
    cp.add_argument("files", nargs="*", metavar="RESULT.json", help="two --json results")
    cp.add_argument("--workload", default=None, choices=WORKLOADS)
    cp.add_argument("--a", dest="a_sets", action="append", type=_setting_kv, default=[],
                    metavar="NAME=VALUE", help="configuration A (repeatable)")  # fmt: skip
    cp.add_argument("--b", dest="b_sets", action="append", type=_setting_kv, default=[],
                    metavar="NAME=VALUE", help="configuration B (repeatable)")  # fmt: skip
    cp.add_argument("--count", type=_int(1, MAX_COUNT), default=1000)
    cp.add_argument("--json", action="store_true", help="one JSON object on stdout")
    _add_costs(cp)
    dm = sub.add_parser("demo", help="loopback UDP echo on single, l1 and l0, side by side")
    _add_costs(dm)
    dm.add_argument(
        "--count", type=_int(1, MAX_DEMO_COUNT), default=200,
        help=f"requests per path (at most {MAX_TAP_DEMO_COUNT} with --tap)",
    )  # fmt: skip
    dm.add_argument("--batch", type=_int(1, 32768), default=None, help="requests per burst")
    dm.add_argument("--frame-size", type=_int(60, 9000), default=None, metavar="BYTES")
    dm.add_argument("--json", action="store_true")
    dm.add_argument("--tap", action="store_true", help="over a real tap in a fresh namespace")
    _add_apic_switches(dm)

    npf = sub.add_parser("netperf", help="netperf tests in modeled time: Gb/s, latency, CPU")
    npf.add_argument(
        "-t",
        dest="test",
        default="TCP_STREAM",
        choices=[t.value for t in Test],
        help="netperf test",
    )
    npf.add_argument("--path", default="single", choices=PATHS)
    _add_costs(npf)
    npf.add_argument("--link", default="1g", choices=LINKS)
    npf.add_argument(
        "--duration",
        type=_seconds(60, lo=0.01),  # below 10 ms, frames in flight at the window edges exceed 1%
        default=1.0,
        metavar="MODELED_SECONDS",
        help="modeled seconds (the first tenth is warm-up; default 1)",
    )
    npf.add_argument(
        "--size",
        type=_int(1, 1 << 20),
        default=None,
        metavar="BYTES",
        help="payload per packet (streams) or per message (RR)",
    )
    npf.add_argument("--seed", type=_int(0, 2**32 - 1), default=1, help="seed of the peer's jitter")
    npf.add_argument("--burst", type=_int(1, 1024), default=1, help="RR transactions in flight")
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
    _add_apic_switches(npf)
    npf.add_argument("--json", action="store_true", help="one JSON object on stdout")

    vx = sub.add_parser(
        "vmexit", help="kvm-unit-tests x86/vmexit.c on the model, in its output format"
    )
    vx.add_argument("tests", nargs="*", metavar="TEST", help="tests to run (default: all)")
    _add_costs(vx, "kvm-2019")
    vx.add_argument(
        "--level", type=int, choices=(1, 2), default=2,
        help="1: the test guest is a plain VM of L0; 2: it is L1's nested guest",
    )  # fmt: skip
    _add_apic_switches(vx, idle=False)
    vx.add_argument("--json", action="store_true", help="one JSON object on stdout")

    sv = sub.add_parser("serve", help="keep the L2 guest reachable on a real tap")
    sv.add_argument("--path", default="l1", choices=PATHS)
    sv.add_argument(
        "--netns", type=_netns_name, default=None,
        help="namespace name: xlio- then letters, digits, -, _, . (default: a fresh one)",
    )  # fmt: skip
    sv.add_argument("--duration", type=_seconds(7 * 86400), default=None, metavar="S")
    _add_costs(sv)
    sv.add_argument(
        "--pcap", type=_writable_file, default=None, metavar="FILE", help="capture every frame"
    )
    sv.add_argument("--json", action="store_true", help="one JSON document on stdout")
    sv.add_argument(
        "--interval", type=_seconds(3600), default=None, metavar="S",
        help="one JSON line of metrics on stdout every S seconds (the interval's counts)",
    )  # fmt: skip
    pf = sub.add_parser(
        "profile",
        help="run a command natively and record its paging, scheduling, timer and block "
        "events per CPU second",
    )
    pf.add_argument("-o", "--output", type=_writable_file, default=None, metavar="FILE.toml",
                    help="write the profile here (default: stdout)")  # fmt: skip
    pf.add_argument("--no-perf", action="store_true", help="read only getrusage and /proc")
    pf.add_argument("--json", action="store_true", help="one JSON object on stdout")
    pf.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    es = sub.add_parser(
        "estimate",
        help="a profiled program's run time natively, at one level and in L2 by MMU mode",
    )
    es.add_argument(
        "profile", metavar="PROFILE",
        help=f"a profile file, or a shipped one ({', '.join(SHIPPED_PROFILES)})",
    )  # fmt: skip
    _add_costs(es)
    es.add_argument("--l2-mmu", default=None, choices=L2_MMUS, help="only this L2 row")
    es.add_argument(
        "--scale-to", type=_scale_to, default=None, metavar="CONFIG=SECONDS",
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
        "--rate", type=_int(1, 10**7), default=None,
        help="host swap's EPT modifications per second while the program runs",
    )  # fmt: skip
    es.add_argument("--json", action="store_true", help="one JSON object on stdout")
    es.add_argument(
        "--plot", type=_writable_file, default=None, metavar="FILE.png",
        help="the breakdown as stacked bars (matplotlib, xlio[plot])",
    )  # fmt: skip
    pr = sub.add_parser(
        "presets", help="the cost presets, or every parameter of one with its source"
    )
    pr.add_argument("name", nargs="?", choices=PRESETS, help="a preset (default: list them)")
    pr.add_argument("--json", action="store_true", help="one JSON object on stdout")
    cl = sub.add_parser(
        "cleanup", help="remove xlio- namespaces whose owner died (a run killed by SIGKILL)"
    )
    cl.add_argument("--json", action="store_true", help="one JSON object on stdout")
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
    e.add_argument("--working-set", type=_int(1, 1 << 20), default=None, metavar="MiB")
    e.add_argument("--rate", type=_int(1, 10**7), default=None, help="EPT modifications/s")
    e.add_argument("--seconds", type=_seconds(3600), default=None, help="modeled duration")
    e.add_argument("--touch-hz", type=_int(1, 10**6), default=None, help="L2 sweeps per second")
    e.add_argument("--page-size", default=None, choices=PAGE_SHIFTS, help="default 4k")
    e.add_argument("--l2-mem", type=_int(1, 1024), default=None, metavar="GiB")
    e.add_argument("--l1-mem", type=_int(1, 2048), default=None, metavar="GiB")
    _add_l2_mmu(m)
    _add_network_options(m)
    return parser


def _scale_to(text: str) -> Any:
    from xlio.estimate import parse_scale_to

    try:
        return parse_scale_to(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--scale-to ")) from None


def _add_l2_mmu(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("guest paging workloads (guest-pf, pte-write, cr3-load, invlpg)")
    g.add_argument(
        "--l2-mmu", default=None, choices=L2_MMUS,
        help="how L2's paging is virtualized (default nested-ept; on --path single: "
        "a shadow mode means the guest's own shadow paging)",
    )  # fmt: skip


def _add_network_options(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("network workloads (tx, rx, echo)")
    d.add_argument("--batch", type=_int(1, 32768), default=None, help="frames per kick (default 1)")
    d.add_argument("--frame-size", type=_int(60, 9000), default=None, metavar="BYTES")
    d.add_argument("--queue-size", type=_int(2, 32768), default=None, help="default 256")
    d.add_argument("--no-event-idx", action="store_true", help="flag-based notification")
    d.add_argument(
        "--kick", default=None, choices=KICKS, help="notify by port I/O (default) or MMIO"
    )


def _netns_name(text: str) -> str:
    """A namespace name we may create and remove: ``xlio-`` then letters,
    digits, ``-``, ``_``, ``.``; no ``..``; at most NAME_MAX bytes (a file
    in /run/netns)."""
    from xlio.backends.netns import netns_name_problem

    problem = netns_name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _writable_file(text: str) -> str:
    """A file we can create or overwrite, checked before anything is built."""
    if not text:
        raise argparse.ArgumentTypeError("empty file name")
    path = os.path.abspath(text)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text} is a directory")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"directory {parent} does not exist")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text} is not writable")
    if not os.path.exists(path) and not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"directory {parent} is not writable")
    return text


def workload_options(a: argparse.Namespace) -> dict[str, Any]:
    opts = {
        "virtual_ept": a.virtual_ept,
        "static_ept": a.static_ept or None,
        "static_ept02": a.static_ept02 or None,
        "swap": a.swap,
        "avoid_invept": a.avoid_invept,
        "defer_rebuild": a.defer_rebuild or None,
        "working_set_mib": a.working_set,
        "rate": a.rate,
        "seconds": a.seconds,
        "touch_hz": a.touch_hz,
        "page_size": a.page_size,
        "l2_mem_gib": a.l2_mem,
        "l1_mem_gib": a.l1_mem,
        "l2_mmu": getattr(a, "l2_mmu", None),
    }
    opts.update(
        {
            "batch": a.batch,
            "frame_size": a.frame_size,
            "queue_size": a.queue_size,
            "event_idx": False if a.no_event_idx else None,
            "kick": a.kick,
        }
    )
    return {k: v for k, v in opts.items() if v is not None}
