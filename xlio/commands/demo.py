"""``xlio demo``: loopback UDP echo on single, l1 and l0 side by side, or over a real tap."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from xlio.commands.common import (
    emit,
    interrupted_status,
    progress_bar,
    tap_ready,
)
from xlio.measure import (
    UsageError,
    demo,
)
from xlio.options import (
    MAX_DEMO_COUNT,
    MAX_TAP_DEMO_COUNT,
    add_apic_switches,
    add_costs,
    cost_model,
    int_in,
)
from xlio.report import format_demo
from xlio.stop import Stopped

NAME = "demo"


def add_parser(sub: Any) -> None:
    dm = sub.add_parser("demo", help="loopback UDP echo on single, l1 and l0, side by side")
    add_costs(dm)
    dm.add_argument(
        "--count", type=int_in(1, MAX_DEMO_COUNT), default=200,
        help=f"requests per path (at most {MAX_TAP_DEMO_COUNT} with --tap)",
    )  # fmt: skip
    dm.add_argument("--batch", type=int_in(1, 32768), default=None, help="requests per burst")
    dm.add_argument("--frame-size", type=int_in(60, 9000), default=None, metavar="BYTES")
    dm.add_argument("--json", action="store_true")
    dm.add_argument("--tap", action="store_true", help="over a real tap in a fresh namespace")
    add_apic_switches(dm)


def run(a: argparse.Namespace) -> int:
    if a.tap:
        from xlio.tapsession import demo_tap, format_demo_tap

        if a.count > MAX_TAP_DEMO_COUNT:
            raise UsageError(f"--count with --tap must be at most {MAX_TAP_DEMO_COUNT}")
        if a.batch is not None or a.frame_size is not None:
            raise UsageError("--batch and --frame-size do not apply to --tap")

        costs = cost_model(a)
        tap_ready()
        n = a.count
        status = 0
        with progress_bar(3, "xlio demo --tap: single, l1, l0") as advance:
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
        emit(a, obj, lambda: format_demo_tap(rows, costs.name, n))
        return status
    opts = {k: v for k, v in (("batch", a.batch), ("frame_size", a.frame_size)) if v}
    switches = {"apicv": a.apicv, "virtual_idle": a.virtual_idle}
    costs = cost_model(a)
    with progress_bar(1, "xlio demo: echo on single, l1, l0") as advance:
        d = demo(costs, a.count, switches=switches, progress=advance, **opts)
    emit(a, d, lambda: format_demo(d))
    return interrupted_status(a, d)
