"""``xlio trace``: the timeline of a few operations, event by event."""

from __future__ import annotations

import argparse
from typing import Any

from xlio.commands.common import (
    emit,
)
from xlio.measure import (
    MAX_TRACE_OPS,
    TRACEABLE,
    trace,
)
from xlio.options import (
    add_l2_mmu,
    add_model_switches,
    add_network_options,
    cost_model,
    int_in,
    model_switches,
)
from xlio.sim.workloads import PATHS

NAME = "trace"


def add_parser(sub: Any) -> None:
    tr = sub.add_parser("trace", help="the timeline of a few operations, event by event")
    tr.add_argument("--workload", required=True, choices=TRACEABLE)
    tr.add_argument("--path", default="l1", choices=PATHS)
    tr.add_argument(
        "--count", type=int_in(1, MAX_TRACE_OPS), default=1,
        help="operations (micro workloads) or batches (tx, rx, echo) to trace",
    )  # fmt: skip
    tr.add_argument("--json", action="store_true", help="one JSON object on stdout")
    add_model_switches(tr, trace=False)
    add_network_options(tr)
    add_l2_mmu(tr)


def run(a: argparse.Namespace) -> int:
    from xlio.report import format_trace

    opts = {
        "batch": a.batch, "frame_size": a.frame_size, "queue_size": a.queue_size,
        "event_idx": False if a.no_event_idx else None, "kick": a.kick, "l2_mmu": a.l2_mmu,
    }  # fmt: skip
    r = trace(
        a.workload, a.path, cost_model(a), count=a.count,
        options={k: v for k, v in opts.items() if v is not None}, **model_switches(a),
    )  # fmt: skip
    return emit(a, r, lambda: format_trace(r))
