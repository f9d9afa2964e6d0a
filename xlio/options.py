"""The ``xlio`` command line's shared grammar: the parser class, the option
types and their limits, the option groups several commands share (cost
model, model switches, network and paging options), and what parsed options
resolve to (the cost model, the model's switches, a workload's options).
Each command declares its own arguments (:mod:`xlio.commands`).

Every bounded number is parsed by :func:`int_in` or :func:`seconds_in`, whose
``limits`` the limit walk in ``tests/test_limits.py`` reads; a value outside
them is one line and exit status 2 (:class:`Parser`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from xlio.backends.datapath import KICKS
from xlio.backends.netperf import Test
from xlio.measure import (
    WORKLOADS,
    UsageError,
)
from xlio.sim.config import ARCH_ONLY, NO_AVIC_FOR_L2, OPERANDS
from xlio.sim.costs import Arch
from xlio.sim.guest_mmu import L2_MMUS
from xlio.sim.presets import PRESETS, CostModel, costs_from_toml, override, parse_value
from xlio.sim.profiles import CACHE_MODES
from xlio.sim.vmexit import TESTS as VMEXIT_TESTS
from xlio.sim.workloads import PATHS


class Help(argparse.HelpFormatter):
    """Help that shows each option's default (argparse's own shows "None" too)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, [], argparse.SUPPRESS)
        if shown and action.option_strings and "default" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def int_in(lo: int, hi: int) -> Callable[[str], int]:
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


def seconds_in(hi: float, lo: float = 0.0) -> Callable[[str], float]:
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


#: The preset an ``--arch`` alone stands for.
ARCH_PRESET = {Arch.VMX: None, Arch.SVM: "epyc-2019"}  # VMX: the command's own default


def add_costs(p: argparse.ArgumentParser, default: str = "turtles-2010") -> None:
    """--preset, --arch, --vls, --vgif, --set PARAM=VALUE (repeatable) and --costs FILE.toml."""
    g = p.add_argument_group("cost model (see `xlio presets NAME`)")
    g.add_argument(
        "--preset", default=None, choices=PRESETS,
        help=f"cost preset (default: {default}; epyc-2019 with --arch svm)",
    )  # fmt: skip
    p.set_defaults(default_preset=default)
    g.add_argument(
        "--arch", default=None, choices=[x.value for x in Arch],
        help="vmx (Intel) or svm (AMD); default: the preset's",
    )  # fmt: skip
    g.add_argument(
        "--vls", action=argparse.BooleanOptionalAction, default=None,
        help="SVM: virtual VMLOAD/VMSAVE for L1 (default: the preset's)",
    )  # fmt: skip
    g.add_argument(
        "--vgif", action=argparse.BooleanOptionalAction, default=None,
        help="SVM: virtual GIF, L1's STGI/CLGI do not exit (default: the preset's)",
    )  # fmt: skip
    g.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="PARAM=VALUE", type=set_value,
        help="set one cost parameter of the preset (repeatable)",
    )  # fmt: skip
    g.add_argument(
        "--costs", default=None, metavar="FILE.toml", type=readable_file,
        help="a cost model of your own: base = \"PRESET\" and a [params] table",
    )  # fmt: skip


def set_value(text: str) -> str:
    """An argparse type: PARAM=VALUE with a parameter the presets have."""
    name, eq, value = text.partition("=")
    if not eq or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"takes PARAM=VALUE, got {text!r}")
    if not any(name.strip() in p.params for p in PRESETS.values()):
        raise argparse.ArgumentTypeError(
            f"unknown parameter {name.strip()!r} (see `xlio presets NAME`)"
        )
    return text


def path_list(text: str) -> list[str]:
    paths = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in paths if p not in PATHS]
    if not paths or bad or len(set(paths)) != len(paths):
        raise argparse.ArgumentTypeError(
            f"comma-separated paths from {', '.join(PATHS)}, got {text!r}"
        )
    return paths


def param_values(text: str) -> tuple[str, list[str]]:
    from xlio.sweep import parse_param

    try:
        return parse_param(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("argument --param: ")) from None


def name_value(text: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    if not eq or not name.strip() or not value.strip() or "," in value:
        raise argparse.ArgumentTypeError(f"takes NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def path_ratio(text: str) -> tuple[str, str]:
    a, slash, b = text.partition("/")
    if not slash or a not in PATHS or b not in PATHS or a == b:
        raise argparse.ArgumentTypeError(f"takes PATH/PATH (l1/l0), got {text!r}")
    return a, b


def json_target(text: str) -> str:
    return text if text == "-" else writable_file(text)


def plot_file(text: str) -> str:
    if not text.endswith((".png", ".svg")):
        raise argparse.ArgumentTypeError(f"a .png or .svg file, got {text!r}")
    return writable_file(text)


def figure_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][\w.%-]*", text):
        raise argparse.ArgumentTypeError(f"a figure's key (l0_exits, latency_us.p99), got {text!r}")
    return text


def readable_file(text: str) -> str:
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"cannot read {text!r}")
    return text


#: The command line's spelling of each switch of one architecture
#: (:data:`xlio.sim.config.ARCH_ONLY` says which and why): its flag, its
#: dest, and the value that means "not given".
_ARCH_FLAGS: dict[str, tuple[str, str, Any]] = {
    "shadow_vmcs": ("--shadow-vmcs", "shadow_vmcs", None),
    "vmcs_exits": ("--no-vmcs-exits", "no_vmcs_exits", False),
    "operand": ("--operand", "operand", None),
    "cache_reg": ("--cache-reg", "cache_reg", None),
    "vls": ("--vls", "vls", None),
    "vgif": ("--vgif", "vgif", None),
}


def _check_arch(a: argparse.Namespace, costs: CostModel, where: str) -> None:
    """--arch against the cost model's machine, and the switches of the other arch."""
    arch = Arch(costs.arch)
    if a.arch is not None and a.arch != arch.value:
        hint = f" (SVM: --preset {ARCH_PRESET[Arch.SVM]})" if a.arch == Arch.SVM else ""
        raise UsageError(
            f"argument --arch: {a.arch} does not match {where}, a {arch.value} machine{hint}"
        )
    for switch, only, why in ARCH_ONLY:
        flag, dest, unset = _ARCH_FLAGS[switch]
        if getattr(a, dest, unset) != unset and only is not arch:
            raise UsageError(f"argument {flag}: not for {arch.value} ({where}): {why}")
    if arch is Arch.SVM and getattr(a, "apicv", None):
        raise UsageError(f"argument --apicv: not for svm ({where}): {NO_AVIC_FOR_L2}")


def cost_model(a: argparse.Namespace) -> CostModel:
    """The cost model the user asked for: a preset or a TOML file, then --set;
    --arch checked against it, --vls and --vgif set in it."""
    name = a.preset
    if name is None:
        name = (ARCH_PRESET.get(Arch(a.arch)) if a.arch else None) or a.default_preset
    base = PRESETS[name]
    where = f"preset {name}"
    if a.costs is not None:
        where = f"{a.costs} (base {base.name})"
        try:
            with open(a.costs, encoding="utf-8") as f:
                base = costs_from_toml(f.read(), a.costs)
        except OSError as e:
            raise UsageError(f"argument --costs: cannot read {a.costs}: {e.strerror}") from None
        except ValueError as e:
            raise UsageError(f"argument --costs: {e}") from None
        where = f"{a.costs} (base {base.name.partition('+')[0]})"
    _check_arch(a, base, where)
    try:
        values: dict[str, Any] = {}
        for item in a.sets:
            key, _, text = item.partition("=")
            key = key.strip()
            if key not in base.params:
                raise ValueError(f"unknown parameter {key!r} for {where} (see `xlio presets`)")
            values[key] = parse_value(key, text.strip(), base.params[key].value)
        if "arch" in values and values["arch"] != base.arch:
            raise ValueError("arch is the preset's machine: choose a preset (--arch, --preset)")
        costs = override(base, values, "--set") if values else base
    except ValueError as e:
        raise UsageError(f"argument --set: {e}") from None
    for k in ("vls", "vgif"):
        v = getattr(a, k, None)
        if v is not None:
            costs = override(costs, {k: v}, f"--{'' if v else 'no-'}{k}")
    return costs


def add_model_switches(p: argparse.ArgumentParser, trace: bool = True) -> None:
    add_costs(p)
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
    p.add_argument(
        "--operand", default=None, choices=OPERANDS,
        help="VMREAD/VMWRITE operand (default: register)",
    )  # fmt: skip
    p.add_argument(
        "--cache-reg", default=None, choices=CACHE_MODES,
        help="L1 register cache (default: the preset's)",
    )  # fmt: skip
    add_apic_switches(p)
    if trace:
        p.add_argument("--trace", action="store_true", help="record every event in --json (slower)")


def add_apic_switches(p: argparse.ArgumentParser, *, idle: bool = True) -> None:
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


def scale_to(text: str) -> Any:
    from xlio.estimate import parse_scale_to

    try:
        return parse_scale_to(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--scale-to ")) from None


def add_l2_mmu(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("guest paging workloads (guest-pf, pte-write, cr3-load, invlpg)")
    g.add_argument(
        "--l2-mmu", default=None, choices=L2_MMUS,
        help="how L2's paging is virtualized (default nested-ept; on --path single: "
        "a shadow mode means the guest's own shadow paging)",
    )  # fmt: skip


def add_network_options(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("network workloads (tx, rx, echo)")
    d.add_argument(
        "--batch", type=int_in(1, 32768), default=None, help="frames per kick (default 1)"
    )
    d.add_argument("--frame-size", type=int_in(60, 9000), default=None, metavar="BYTES")
    d.add_argument("--queue-size", type=int_in(2, 32768), default=None, help="default 256")
    d.add_argument("--no-event-idx", action="store_true", help="flag-based notification")
    d.add_argument(
        "--kick", default=None, choices=KICKS, help="notify by port I/O (default) or MMIO"
    )


def netns_name(text: str) -> str:
    """A namespace name we may create and remove: ``xlio-`` then letters,
    digits, ``-``, ``_``, ``.``; no ``..``; at most NAME_MAX bytes (a file
    in /run/netns)."""
    from xlio.backends.netns import netns_name_problem

    problem = netns_name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def socket_file(text: str) -> str:
    """A unix socket path we may create: in an existing directory, short
    enough for ``sockaddr_un`` (107 bytes), not an existing non-socket."""
    import stat

    writable_file(text)
    if len(os.fsencode(os.path.abspath(text))) > 107:
        raise argparse.ArgumentTypeError(f"{text}: longer than a unix socket path may be")
    if os.path.exists(text) and not stat.S_ISSOCK(os.stat(text).st_mode):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a socket")
    return text


def existing_socket(text: str) -> str:
    """A unix socket that exists (a server listens there, or did)."""
    import stat

    try:
        mode = os.stat(text).st_mode
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text}: {e.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise argparse.ArgumentTypeError(f"{text} is not a socket")
    return text


def command_text(text: str) -> str:
    """A shell command: not empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty command")
    return text


def writable_file(text: str) -> str:
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


# ---------------------------------------------------------------- studies
MAX_SAMPLES_ASKED = 10**15  # parsed; a study too long to run is refused with its time


def scheduler_address(text: str) -> str:
    """``tcp://host:8786`` (or ``host:8786``): a Dask scheduler's address."""
    if not re.fullmatch(r"((tcp|tls|inproc|ucx|ws|wss)://)?[\w.\-\[\]:]+:\d{1,5}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a scheduler address (tcp://host:8786)")
    return text


def cache_dir(text: str) -> str:
    """A directory for a study's results: created if missing, must be writable."""
    if not text:
        raise argparse.ArgumentTypeError("empty directory name")
    path = os.path.abspath(text)
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text} is not a directory")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{probe} is not writable")
    return text


def add_executor(p: argparse.ArgumentParser, *, jobs: bool = True) -> None:
    """--jobs, --scheduler, --cache: where a fan-out runs (xlio.executor)."""
    g = p.add_argument_group("where the runs of a study go")
    if jobs:
        g.add_argument("--jobs", type=int_in(1, 64), default=1, help="local processes")
    g.add_argument("--scheduler", type=scheduler_address, default=None, metavar="ADDRESS",
                   help="a Dask distributed scheduler (tcp://host:8786; xlio[dask])")  # fmt: skip
    g.add_argument("--cache", type=cache_dir, default=None, metavar="DIR",
                   help="keep each run's result: a rerun runs only what is missing")  # fmt: skip


def add_samples(p: argparse.ArgumentParser, *, seed: bool = True) -> None:
    """--samples, --seed (unless the command has its own), --dist and the
    executor's options (xlio.study)."""
    from xlio.study import Dist

    g = p.add_argument_group("parameter uncertainty (Latin hypercube within each range)")
    g.add_argument("--samples", type=int_in(1, MAX_SAMPLES_ASKED), default=None, metavar="N",
                   help="repeat the run over N parameter sets: 5th-95th percentiles")  # fmt: skip
    if seed:
        g.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, help="of the sampling")
    g.add_argument("--dist", default=Dist.UNIFORM.value, choices=[d.value for d in Dist],
                   help="how a parameter is drawn within its range")  # fmt: skip
    add_executor(p)
