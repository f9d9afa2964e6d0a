"""The ``xlio`` command line: argument parsing and printing only.

A user's mistake (unknown name, bad number) is one line on stderr and exit
status 2; everything else lives in sans-IO modules.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from xlio import __version__
from xlio.backends.datapath import KICKS
from xlio.backends.netperf import LINKS, Test
from xlio.measure import WORKLOADS, UsageError, demo, format_demo, format_report, measure
from xlio.sim.ept import PAGE_SHIFTS
from xlio.sim.nested import OPERANDS
from xlio.sim.presets import PRESETS, CostModel, costs_from_toml, override, parse_value
from xlio.sim.profiles import CACHE_MODES
from xlio.sim.vept import SCHEMES
from xlio.sim.workloads import PATHS


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

    return parse


def _seconds(hi: float) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds above 0 and at most ``hi``."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (math.isfinite(v) and 0 < v <= hi):
            raise argparse.ArgumentTypeError(f"must be above 0 and at most {hi:g}, got {text}")
        return v

    return parse


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


def _add_model_switches(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--trace", action="store_true", help="record every event (slower)")


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
        "trace": a.trace,
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
        type=_seconds(60),
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
    d = m.add_argument_group("network workloads (tx, rx, echo)")
    d.add_argument("--batch", type=_int(1, 32768), default=None, help="frames per kick (default 1)")
    d.add_argument("--frame-size", type=_int(60, 9000), default=None, metavar="BYTES")
    d.add_argument("--queue-size", type=_int(2, 32768), default=None, help="default 256")
    d.add_argument("--no-event-idx", action="store_true", help="flag-based notification")
    d.add_argument(
        "--kick", default=None, choices=KICKS, help="notify by port I/O (default) or MMIO"
    )
    return parser


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


def _emit(as_json: bool, obj: Any, text: Callable[[], str]) -> int:
    """One JSON document, or the text a person reads, on stdout."""
    if as_json:
        json.dump(obj, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(text())
    return 0


def _cmd_measure(a: argparse.Namespace) -> int:
    r = measure(
        a.workload, a.path, _costs(a), count=a.count, options=_workload_options(a), **_switches(a)
    )
    return _emit(a.json, r, lambda: format_report(r, a.explain))


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


def _cmd_serve(a: argparse.Namespace) -> int:
    from xlio.backends.netns import HostSetupError
    from xlio.backends.tap import TapGone
    from xlio.tapsession import serve

    _tap_ready()
    out = sys.stderr if a.json else sys.stdout

    def announce(text: str) -> None:
        print(text, file=out, flush=True)

    try:
        r = serve(a.path, a.netns, a.duration, _costs(a), a.pcap, announce)
    except HostSetupError as e:
        raise UsageError(str(e)) from None
    except TapGone as e:
        print(f"xlio serve: error: {e}; namespace removed", file=sys.stderr)
        return 1

    def text() -> str:
        lines = [format_report(r), "tap: " + ", ".join(f"{k} {v}" for k, v in r["tap"].items())]
        for name, metrics in r.get("devices", {}).items():
            shown = ", ".join(f"{k} {v}" for k, v in metrics.items() if v)
            lines.append(f"device {name}: {shown or 'idle'}")
        return "\n".join(lines)

    _emit(a.json, r, text)
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
        rows = demo_tap(costs, n)
        return _emit(a.json, rows, lambda: format_demo_tap(rows, costs.name, n))
    opts = {k: v for k, v in (("batch", a.batch), ("frame_size", a.frame_size)) if v}
    switches = {"apicv": a.apicv, "virtual_idle": a.virtual_idle}
    d = demo(_costs(a), a.count, switches=switches, **opts)
    return _emit(a.json, d, lambda: format_demo(d))


def _cmd_netperf(a: argparse.Namespace) -> int:
    from xlio.netperf import format_netperf, netperf

    r = netperf(
        a.test, a.path, _costs(a), link=a.link, duration=a.duration, size=a.size, seed=a.seed,
        burst=a.burst, l1_backend_vcpu=a.l1_backend_vcpu, l1_backend=a.l1_backend, tso=a.tso,
        apicv=a.apicv,
        virtual_idle=a.virtual_idle,
    )  # fmt: skip
    return _emit(a.json, r, lambda: format_netperf(r))


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
        "detail": res,
    }
    return _emit(a.json, obj, lambda: format_lines(res))


def _cmd_presets(a: argparse.Namespace) -> int:
    from xlio.sim.presets import format_value, parameter_rows

    if a.name is None:
        listing = {name: p.description for name, p in PRESETS.items()}
        return _emit(
            a.json, {"presets": listing},
            lambda: "\n".join(f"{name:<14}{text}" for name, text in listing.items()),
        )  # fmt: skip
    p = PRESETS[a.name]
    rows = parameter_rows(p)
    obj = {
        "preset": a.name, "description": p.description, "clock_ghz": p.clock_ghz,
        "params": {k: {"value": v.value, "unit": v.unit, "kind": v.kind, "source": v.source}
                   for k, v in rows},
    }  # fmt: skip

    def text() -> str:
        width = max(len(k) for k, _ in rows)
        lines = [f"{a.name}: {p.description}", ""]
        lines += [f"{'parameter':<{width}}  {'value':>12} {'unit':<7} {'kind':<10} source", ""]
        for k, v in rows:
            lines.append(
                f"{k:<{width}}  {format_value(v.value):>12} {v.unit:<7} {v.kind:<10} {v.source}"
            )
        return "\n".join(lines)

    return _emit(a.json, obj, text)


def _cmd_cleanup(a: argparse.Namespace) -> int:
    from xlio.backends.netns import reap_orphans

    _tap_ready()
    removed = reap_orphans()
    return _emit(
        a.json,
        {"removed": removed},
        lambda: (
            "\n".join(f"removed {n} (its owner is dead)" for n in removed)
            or "nothing to remove: every xlio- namespace has a live owner"
        ),
    )


COMMANDS = {
    "measure": _cmd_measure,
    "demo": _cmd_demo,
    "serve": _cmd_serve,
    "vmexit": _cmd_vmexit,
    "netperf": _cmd_netperf,
    "cleanup": _cmd_cleanup,
    "presets": _cmd_presets,
}


if __name__ == "__main__":
    raise SystemExit(main())
