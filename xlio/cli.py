"""The ``xlio`` command line: argument parsing and printing only.

A user's mistake (unknown name, bad number) is one line on stderr and exit
status 2; everything else lives in sans-IO modules.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from xlio import __version__
from xlio.backends.datapath import KICKS
from xlio.backends.netperf import LINKS, Test
from xlio.measure import (
    MAX_TRACE_OPS,
    TRACEABLE,
    WORKLOADS,
    UsageError,
    demo,
    measure,
    trace,
    whole,
)
from xlio.report import format_demo, format_measure
from xlio.sim.ept import PAGE_SHIFTS
from xlio.sim.nested import OPERANDS
from xlio.sim.presets import PRESETS, CostModel, costs_from_toml, override, parse_value
from xlio.sim.profiles import CACHE_MODES
from xlio.sim.vept import SCHEMES
from xlio.sim.vmexit import TESTS as VMEXIT_TESTS
from xlio.sim.workloads import PATHS
from xlio.stop import Stopped, StopState
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


def _costs(a: argparse.Namespace) -> CostModel:
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


def _switches(a: argparse.Namespace) -> dict[str, Any]:
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
    _add_network_options(m)
    return parser


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


def _workload_options(a: argparse.Namespace) -> dict[str, Any]:
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


SCHEMA_VERSION = 1  # of every --json document (README: "JSON results")


def envelope(command: str, obj: dict[str, Any]) -> dict[str, Any]:
    """A command's result as the one JSON schema: version keys first, whole
    numbers as integers."""
    return {
        "schema_version": SCHEMA_VERSION,
        "xlio_version": __version__,
        "command": command,
        **whole(obj),
    }


def _emit(a: argparse.Namespace, obj: dict[str, Any], text: Callable[[], str]) -> int:
    """One JSON document, or the text a person reads, on stdout."""
    if a.json:
        json.dump(envelope(a.command, obj), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(text())
    return 0


def _cmd_measure(a: argparse.Namespace) -> int:
    costs = _costs(a)
    with _progress(1, f"xlio measure: {a.workload} on {a.path}") as advance:
        r = measure(
            a.workload, a.path, costs, count=a.count, options=_workload_options(a),
            progress=advance, **_switches(a),
        )  # fmt: skip
    _emit(a, r, lambda: format_measure(r, a.explain))
    return _interrupted(a, r)


def _interrupted(a: argparse.Namespace, r: dict[str, Any]) -> int:
    """After a stop signal the result printed covers what was measured: say
    so, exit 128 + the signal (130 for Ctrl-C)."""
    if r.get("interrupted"):
        status = StopState.status()
        print(f"xlio {a.command}: stopped by {signal.Signals(status - 128).name}", file=sys.stderr)
        return status
    return 0


def _cmd_trace(a: argparse.Namespace) -> int:
    from xlio.report import format_trace

    opts = {
        "batch": a.batch, "frame_size": a.frame_size, "queue_size": a.queue_size,
        "event_idx": False if a.no_event_idx else None, "kick": a.kick,
    }  # fmt: skip
    r = trace(
        a.workload, a.path, _costs(a), count=a.count,
        options={k: v for k, v in opts.items() if v is not None}, **_switches(a),
    )  # fmt: skip
    return _emit(a, r, lambda: format_trace(r))


def _cmd_sweep(a: argparse.Namespace) -> int:
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
    costs = _costs(a)
    paths = a.path or (["single", "l1"] if of is Of.VMEXIT else list(PATHS))
    if a.ratio and not set(a.ratio) <= set(paths):
        raise UsageError(f"argument --ratio: {'/'.join(a.ratio)} needs both paths in --path")
    points = grid(
        of, a.workload, paths, costs, a.params, count=a.count, switches={}, options={},
        sets=_set_values(a, costs),
    )  # fmt: skip
    metric = a.metric or DEFAULT_METRIC[of]
    check_metric(of, metric)
    if a.plot:
        from xlio.plot import require_matplotlib

        require_matplotlib()  # before the sweep runs, not after
    swept = [n for n, v in a.params if len(v) > 1]
    interrupted = False
    with _progress(len(points), f"xlio sweep: {len(points)} points") as advance:
        try:
            rows = run_all(points, a.jobs, lambda row: advance())
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


def _cmd_compare(a: argparse.Namespace) -> int:
    from xlio.compare import describe, diff
    from xlio.report import figure, render, signed, table
    from xlio.sweep import Point, with_setting

    if a.files:
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
        if a.workload is None or not (a.a_sets or a.b_sets):
            raise UsageError("give --workload and at least one --a or --b setting (or two files)")
        costs = _costs(a)
        base = Point(Of.MEASURE, a.workload, "l1", costs, a.count)
        sets = _set_values(a, costs)
        points = []
        for settings in (a.a_sets, a.b_sets):
            p = base
            for name, value in settings:
                p = with_setting(p, name, value, sets)
            points.append(p)
        sides: list[dict[str, Any]] = []
        total = sum(p.count for p in points)
        b_total = points[1].count
        with _progress(total, f"xlio compare: {a.workload}, A then B") as advance:
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
        return render(head, table(("figure", "A", "B", "B - A", "B / A"), body))

    _emit(a, obj, text)
    return _interrupted(a, obj)


def _set_values(a: argparse.Namespace, costs: CostModel) -> dict[str, Any]:
    """The --set values, to apply again on a swept preset."""
    return {k: p.value for k, p in costs.params.items() if p.kind == "user" and p.source == "--set"}


@contextlib.contextmanager
def _progress(total: int, what: str) -> Iterator[Callable[..., None]]:
    """A progress bar on stderr (never stdout), shown once the work takes over a
    second, also when no step has finished yet (a timer shows it)."""
    import threading

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)  # a pipe or a file gets no progress at all
    bar: Progress | None = None
    task = None
    done = 0
    lock = threading.Lock()

    def show() -> None:
        nonlocal bar, task
        with lock:
            if bar is None:
                bar = Progress(
                    "{task.description}", BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console, transient=True,
                )  # fmt: skip
                bar.start()
                task = bar.add_task(what, total=total, completed=done)

    def advance(now: int | None = None, of: int | None = None) -> None:
        """One more done, or ``now`` done of ``of``."""
        nonlocal done, total
        done = done + 1 if now is None else now
        total = total if of is None else of
        if bar is not None and task is not None:
            bar.update(task, completed=done, total=total)

    timer = threading.Timer(1.0, show) if console.is_terminal else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        yield advance
    finally:
        if timer is not None:
            timer.cancel()
        with lock:
            if bar is not None:
                bar.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return COMMANDS[a.command](a)
    except UsageError as e:
        print(f"xlio {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP during a tap run
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"xlio {a.command}: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:  # `xlio ... | head`: the reader left, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _tap_ready() -> None:
    from xlio.backends.netns import HostSetupError, check_privileges

    try:
        check_privileges()
    except HostSetupError as e:
        raise UsageError(str(e)) from None


def _serve_text(r: dict[str, Any]) -> str:
    lines = [
        format_measure(r, command="serve"),
        "tap: " + ", ".join(f"{k} {v}" for k, v in r["tap"].items()),
    ]
    for name, metrics in r.get("devices", {}).items():
        shown = ", ".join(f"{k} {v}" for k, v in metrics.items() if v)
        lines.append(f"device {name}: {shown or 'idle'}")
    return "\n".join(lines)


def _cmd_serve(a: argparse.Namespace) -> int:
    from xlio.backends.netns import HostSetupError
    from xlio.backends.tap import CaptureFailed, PcapBatcher, TapGone
    from xlio.tapsession import serve

    _tap_ready()
    out = sys.stderr if a.json else sys.stdout

    def announce(text: str) -> None:
        print(text, file=out, flush=True)

    def ready(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def emit(metrics: dict[str, Any]) -> None:
        print(json.dumps(metrics, separators=(",", ":")), flush=True)

    costs = _costs(a)
    try:  # the capture is test-written before any namespace exists
        pcap = PcapBatcher(a.pcap) if a.pcap else None
    except CaptureFailed as e:
        raise UsageError(str(e)) from None

    try:
        r = serve(
            a.path, a.netns, a.duration, costs, pcap, announce, ready=ready,
            interval=a.interval, emit=emit,
        )  # fmt: skip
    except HostSetupError as e:
        raise UsageError(str(e)) from None
    except TapGone as e:
        print(f"xlio serve: error: {e}; namespace removed", file=sys.stderr)
        return 1
    except CaptureFailed as e:  # disk full during the run: the report still says what was done
        if e.report is not None:
            report = e.report
            _emit(a, report, lambda: _serve_text(report))
        print(
            f"xlio serve: error: {e} after {e.written} frames captured; namespace removed",
            file=sys.stderr,
        )
        return 1

    _emit(a, r, lambda: _serve_text(r))
    stopped = r["stopped_by"]
    return 128 + signal.Signals[stopped] if stopped else 0


def _cmd_demo(a: argparse.Namespace) -> int:
    if a.tap:
        from xlio.tapsession import demo_tap, format_demo_tap

        if a.count > MAX_TAP_DEMO_COUNT:
            raise UsageError(f"--count with --tap must be at most {MAX_TAP_DEMO_COUNT}")
        if a.batch is not None or a.frame_size is not None:
            raise UsageError("--batch and --frame-size do not apply to --tap")

        costs = _costs(a)
        _tap_ready()
        n = a.count
        status = 0
        with _progress(3, "xlio demo --tap: single, l1, l0") as advance:
            try:
                rows = demo_tap(costs, n, advance)
            except Stopped as e:
                rows = getattr(e, "rows", {})
                if not rows:
                    raise
                print(f"xlio demo: stopped by {signal.Signals(e.signum).name}", file=sys.stderr)
                status = 128 + e.signum
        obj = {"workload": "echo", "tap": True, "preset": costs.name, "count": n, "paths": rows,
               "interrupted": bool(status)}  # fmt: skip
        _emit(a, obj, lambda: format_demo_tap(rows, costs.name, n))
        return status
    opts = {k: v for k, v in (("batch", a.batch), ("frame_size", a.frame_size)) if v}
    switches = {"apicv": a.apicv, "virtual_idle": a.virtual_idle}
    costs = _costs(a)
    with _progress(1, "xlio demo: echo on single, l1, l0") as advance:
        d = demo(costs, a.count, switches=switches, progress=advance, **opts)
    _emit(a, d, lambda: format_demo(d))
    return _interrupted(a, d)


def _cmd_netperf(a: argparse.Namespace) -> int:
    from xlio.netperf import format_netperf, netperf

    costs = _costs(a)
    with _progress(100, f"xlio netperf: {a.test} on {a.path}") as advance:
        r = netperf(
            a.test, a.path, costs, link=a.link, duration=a.duration, size=a.size, seed=a.seed,
            burst=a.burst, l1_backend_vcpu=a.l1_backend_vcpu, l1_backend=a.l1_backend, tso=a.tso,
            apicv=a.apicv,
            virtual_idle=a.virtual_idle, progress=advance,
        )  # fmt: skip
    _emit(a, r, lambda: format_netperf(r))
    return _interrupted(a, r)


def _cmd_vmexit(a: argparse.Namespace) -> int:
    from xlio.sim.vmexit import format_lines, run

    costs = _costs(a)
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
    return _emit(a, obj, lambda: format_lines(res))


def _cmd_presets(a: argparse.Namespace) -> int:
    from xlio.report import render, table
    from xlio.sim.presets import format_value, parameter_rows

    if a.name is None:
        listing = {name: p.description for name, p in PRESETS.items()}
        return _emit(
            a, {"presets": listing},
            lambda: render(table(("preset", "what it describes"), listing.items(), left=2)),
        )  # fmt: skip
    p = PRESETS[a.name]
    rows = parameter_rows(p)
    obj = {
        "preset": a.name, "description": p.description, "clock_ghz": p.clock_ghz,
        "params": {k: {"value": v.value, "unit": v.unit, "kind": v.kind, "source": v.source}
                   for k, v in rows},
    }  # fmt: skip

    def text() -> str:
        body = [(k, format_value(v.value), v.unit, v.kind, v.source) for k, v in rows]
        cols = ("parameter", "value", "unit", "kind", "source")
        t = table(cols, body, left=1)
        for c in t.columns[2:]:
            c.justify = "left"
        t.columns[-1].no_wrap = False
        return render(f"{a.name}: {p.description}", t)

    return _emit(a, obj, text)


def _cmd_cleanup(a: argparse.Namespace) -> int:
    from xlio.backends.netns import reap_orphans

    _tap_ready()
    removed = reap_orphans()
    return _emit(
        a,
        {"removed": removed},
        lambda: (
            "\n".join(f"removed {n} (its owner is dead)" for n in removed)
            or "nothing to remove: every xlio- namespace has a live owner"
        ),
    )


COMMANDS = {
    "measure": _cmd_measure,
    "trace": _cmd_trace,
    "sweep": _cmd_sweep,
    "compare": _cmd_compare,
    "demo": _cmd_demo,
    "serve": _cmd_serve,
    "vmexit": _cmd_vmexit,
    "netperf": _cmd_netperf,
    "cleanup": _cmd_cleanup,
    "presets": _cmd_presets,
}


if __name__ == "__main__":
    raise SystemExit(main())
