"""``xlio presets``: the cost presets, or every parameter of one with its source."""

from __future__ import annotations

import argparse
from typing import Any

from xlio.commands.common import (
    emit,
)
from xlio.sim.presets import PRESETS

NAME = "presets"


def add_parser(sub: Any) -> None:
    pr = sub.add_parser(
        "presets", help="the cost presets, or every parameter of one with its source"
    )
    pr.add_argument("name", nargs="?", choices=PRESETS, help="a preset (default: list them)")
    pr.add_argument("--json", action="store_true", help="one JSON object on stdout")


def run(a: argparse.Namespace) -> int:
    from xlio.report import render, table
    from xlio.sim.costs import param_range
    from xlio.sim.presets import format_value, parameter_rows

    if a.name is None:
        listing = {name: p.description for name, p in PRESETS.items()}
        return emit(
            a, {"presets": listing},
            lambda: render(table(("preset", "what it describes"), listing.items(), left=2)),
        )  # fmt: skip
    p = PRESETS[a.name]
    rows = parameter_rows(p)
    spans = {k: param_range(v) for k, v in rows}
    obj = {
        "preset": a.name, "description": p.description, "clock_ghz": p.clock_ghz,
        "params": {k: {"value": v.value, "unit": v.unit, "kind": v.kind, "source": v.source,
                       **({"low": r.low, "high": r.high, "range_basis": r.basis}
                          if (r := spans[k]) else {})}
                   for k, v in rows},
    }  # fmt: skip

    def span(k: str) -> str:
        r = spans[k]
        if r is None:
            return ""
        if isinstance(p.params[k].value, int):
            return f"{round(r.low):,}-{round(r.high):,}"
        return f"{format_value(r.low)}-{format_value(r.high)}"

    def text() -> str:
        body = [
            (k, format_value(v.value), span(k), v.unit, v.kind,
             v.source + (f" (range: {r.basis})" if (r := spans[k]) else ""))
            for k, v in rows
        ]  # fmt: skip
        cols = ("parameter", "value", "range", "unit", "kind", "source")
        t = table(cols, body, left=1)
        for c in t.columns[3:]:
            c.justify = "left"
        t.columns[-1].no_wrap = False
        return render(f"{a.name}: {p.description}", t)

    return emit(a, obj, text)
