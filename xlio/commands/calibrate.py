"""``xlio calibrate``: a preset fitted to kvm-unit-tests vmexit output and
perf kvm stat reports from the user's machine (:mod:`xlio.calibrate`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

from xlio.commands.common import emit, envelope
from xlio.measure import UsageError
from xlio.options import writable_file
from xlio.sim.presets import PRESETS

NAME = "calibrate"


def _level_file(text: str) -> tuple[str, str]:
    level, sep, path = text.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError("needs LEVEL=FILE (l1=vmexit-l1.log, l2=vmexit-l2.log)")
    return level, path


def _clock(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a clock in GHz") from None
    if not 0.1 <= v <= 10:
        raise argparse.ArgumentTypeError(f"{text} GHz: a clock between 0.1 and 10 GHz")
    return v


def _tests(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("needs TEST,... (vmexit test names)")
    return names


def add_parser(sub: Any) -> None:
    c = sub.add_parser(
        "calibrate", help="fit a preset to kvm-unit-tests vmexit output from your machine"
    )
    c.add_argument(
        "--vmexit", dest="vmexit", action="append", type=_level_file, required=True,
        metavar="LEVEL=FILE",
        help="x86/vmexit.c output: l1 (a plain VM of L0) or l2 (a nested guest); repeatable",
    )  # fmt: skip
    c.add_argument(
        "--perf-kvm-stat", dest="perf", action="append", type=_level_file, default=[],
        metavar="LEVEL=FILE",
        help="perf kvm stat report (or xlio measure's table) of a workload at that level; "
        "repeatable",
    )  # fmt: skip
    c.add_argument("--base", default="kvm-2019", choices=PRESETS, help="the preset to start from")
    c.add_argument("--clock", type=_clock, default=None, metavar="GHZ",
                   help="the machine's TSC clock (default: the base's)")  # fmt: skip
    c.add_argument("--hold-out", type=_tests, default=None, metavar="TEST,...",
                   help="tests left out of the fit: their prediction error is shown")  # fmt: skip
    c.add_argument("-o", "--output", type=writable_file, default=None, metavar="FILE.toml",
                   help="the calibrated preset, for --costs FILE.toml")  # fmt: skip
    c.add_argument("--json", action="store_true", help="one JSON object on stdout")


def run(a: argparse.Namespace) -> int:
    from xlio.calibrate import (
        FitFailed,
        calibrate,
        format_report,
        parse_level,
        read_vmexit,
        to_toml,
    )
    from xlio.perf_kvm import InputError, read_perf_kvm_stat

    runs: dict[int, Any] = {}
    base = PRESETS[a.base]
    clock = a.clock or base.clock_ghz
    try:
        for level, path in a.vmexit:
            read_vmexit(level, path, runs)
        perf = [read_perf_kvm_stat(parse_level(lv), path, clock) for lv, path in a.perf]
        r = calibrate(base, runs, perf=perf, hold_out=a.hold_out, clock_ghz=a.clock)
    except InputError as e:
        raise UsageError(str(e)) from None
    except FitFailed as e:
        best = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(e.best.items()))
        print(f"xlio calibrate: error: {e}; best point reached: {best}", file=sys.stderr)
        return 1
    if a.output:  # whole or not at all: written beside, then renamed over
        d = os.path.dirname(os.path.abspath(a.output))
        fd, tmp = tempfile.mkstemp(prefix=".xlio-calibrate-", dir=d)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(to_toml(r))
            os.replace(tmp, a.output)
        except OSError as e:
            os.unlink(tmp)
            raise UsageError(f"cannot write {a.output}: {e.strerror}") from None
    doc = {k: v for k, v in r.items() if k != "model"}
    if a.json:
        print(json.dumps(envelope("calibrate", doc), indent=1, default=str))
        return 0
    return emit(a, doc, lambda: format_report(r))
