"""Tables people read: rich tables rendered to text, and the measure report.

Everything here turns a JSON-ready result into text; nothing measures.
Tables are :class:`rich.table.Table` rendered without colour at a fixed
width, so the output is the same in a terminal, a pipe or a test.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from xlio.sim.accounting import COLUMNS, GLOSSARY, SUMMARY_KEYS

WIDTH = 160  # wide tables stay on one line; a last column of words wraps


def render(*items: Any) -> str:
    """Rich renderables (or strings) as plain text."""
    out = io.StringIO()
    console = Console(file=out, width=WIDTH, color_system=None, force_terminal=False,
                      highlight=False, emoji=False, markup=False)  # fmt: skip
    parts = []
    for item in items:
        start = out.tell()
        console.print(item, soft_wrap=isinstance(item, str))
        text = out.getvalue()[start:]
        parts.append("\n".join(line.rstrip() for line in text.split("\n")).strip("\n"))
    return "\n\n".join(parts)


def num(v: float, digits: int = 2) -> str:
    """An integer with thousands separators, or a float with ``digits`` decimals."""
    if float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:,.{digits}f}"


def figure(v: Any) -> str:
    """A measured figure: whole numbers with separators, others to 4 significant digits."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return str(v)
    if float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.4g}"


def signed(v: float) -> str:
    """A difference: always signed, as :func:`figure` writes numbers."""
    return ("+" if v >= 0 else "-") + figure(abs(v))


def table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    left: int = 1,
    title: str | None = None,
) -> Table:
    """A plain table: the first ``left`` columns left-aligned, numbers right."""
    t = Table(
        box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False, show_edge=False
    )
    for i, c in enumerate(columns):
        text = i < left and i == len(columns) - 1  # a last column of words may wrap
        t.add_column(c, justify="left" if i < left else "right", no_wrap=not text, min_width=len(c))
    for r in rows:
        t.add_row(*(x if isinstance(x, str) else num(x) for x in r))
    return t


def _shown(v: Any) -> str:
    return str(v) if isinstance(v, bool | str) else num(v)


def key_values(d: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items())


#: The config keys a measure report's header shows (the rest is in --json).
HEADER_KEYS = ("shadow_vmcs", "vmcs_exits", "operand", "cache_reg", "dirty_tracking", "apicv",
               "virtual_idle")  # fmt: skip
#: ... on SVM, where the VMCS switches do not exist
SVM_HEADER_KEYS = ("arch", "vls", "vgif", "apicv", "virtual_idle")


def header_keys(cfg: dict[str, Any]) -> tuple[str, ...]:
    return SVM_HEADER_KEYS if cfg.get("arch") == "svm" else HEADER_KEYS


def measure_table(r: dict[str, Any]) -> Table:
    """Exits by level and reason, then the work that is no exit, then the total:
    Time% adds up to 100%."""
    clock = r["config"]["clock_ghz"]
    units = r["count"] or 1
    total = r["totals"]["cycles"] or 1.0
    exits = sum(row["count"] for row in r["by_reason"]) or 1

    def us(cycles: float) -> str:
        return f"{cycles / (clock * 1000):,.3f}"

    rows: list[list[str]] = []
    for row in r["by_reason"]:
        n = row["count"]
        rows.append([
            row["level"], row["reason"], f"{n:,}", f"{100 * n / exits:.2f}%",
            f"{100 * row['cycles'] / total:.2f}%", us(row["min_cycles"]), us(row["max_cycles"]),
            us(row["cycles"] / n), us(row["cycles"] / units),
        ])  # fmt: skip
    for row in r["by_work"]:
        rows.append([
            row["level"], f"({row['work']})", "", "", f"{100 * row['cycles'] / total:.2f}%",
            "", "", "", us(row["cycles"] / units),
        ])  # fmt: skip
    accounted = sum(x["cycles"] for x in r["by_reason"]) + sum(x["cycles"] for x in r["by_work"])
    rows.append([
        "total", "", f"{sum(x['count'] for x in r['by_reason']):,}", "100.00%",
        f"{100 * accounted / total:.2f}%", "", "", "", us(r["totals"]["cycles"] / units),
    ])  # fmt: skip
    cols = ("Level", "Event", "Samples", "Samples%", "Time%", "Min us", "Max us", "Avg us",
            f"us/{r['per']}")  # fmt: skip
    return table(cols, rows, left=2)


def format_measure(r: dict[str, Any], explain: bool = False, command: str = "measure") -> str:
    cfg = r["config"]
    per = r["per"]
    head = [
        f"xlio {command}: {r['workload']} on path {r['path']}, preset {cfg['preset']}, "
        f"{num(r['count'])} {per}s"
        + (" (steady state)" if "first_op" in r else "")
        + ("; INTERRUPTED: figures cover what was done" if r.get("interrupted") else ""),
        f"  model: {key_values({k: cfg[k] for k in header_keys(cfg)})} "
        f"clock={cfg['clock_ghz']} GHz",
    ]
    opts = {k: cfg[k] for k in cfg.get("options", ())}
    if opts:
        head.append(f"  workload: {key_values(opts)}")
    if cfg.get("costs_set"):
        head.append(
            "  costs set: "
            + ", ".join(
                f"{k}={_shown(cfg['costs'][k])} ({src})" for k, src in cfg["costs_set"].items()
            )
        )
    lines = ["", f"per {per} (totals / {num(r['count'])}):"]
    for k in (*SUMMARY_KEYS, "cycles", "time_us"):
        v = r["per_op"].get(k, 0)
        if v or k in ("l0_exits", "l2_exits", "l1_exits", "reflected", "crossings", "cycles"):
            lines.append(f"  {k:<26}{num(v, 3 if abs(v) < 1 else 2):>14}")
    if "cycles_per_second" in r["totals"]:
        cps = r["totals"]["cycles_per_second"]
        clock = cfg["clock_ghz"]
        lines.append(
            f"  {'cycles_per_second':<26}{num(cps):>14}"
            f"   ({cps / (clock * 1e9):.2%} of one {clock} GHz CPU)"
        )
    for change in r.get("l0_changes", ()):
        lines.append(f"  assumes an L0 change: {change}")
    lv = r["cycles_by_level"]
    lines.append(
        "  cycles by level: " + ", ".join(f"{k} {num(v / r['count'])}" for k, v in lv.items() if v)
    )
    if r["by_cause"]:
        lines.append(
            "  L1 exits by cause (per op): "
            + ", ".join(f"{k} {num(v / r['count'])}" for k, v in sorted(r["by_cause"].items()))
        )
    once = []
    if r.get("setup", {}).get("cycles"):
        once.append(
            f"set-up {num(r['setup']['cycles'])} cycles, {num(r['setup']['l0_exits'])} exits"
        )
    if r.get("first_op", {}).get("cycles"):
        f = r["first_op"]
        once.append(f"warm-up {num(f['cycles'])} cycles, {num(f['l0_exits'])} exits")
    if once:
        lines.append("  one-time, not in the figures above: " + "; ".join(once))
    text = "\n".join(head) + "\n\n" + render(measure_table(r)) + "\n" + "\n".join(lines)
    if explain:
        text += "\n\n" + explain_text()
    return text


def format_perf_kvm_stat(r: dict[str, Any], hw_exit: float) -> str:
    """The run's exits as ``perf kvm stat report`` prints them at L0
    (tools/perf/builtin-kvm.c, print_result): one row per reason, L2's and
    L1's exits of a reason merged (both are exits of L1's vCPU threads),
    sorted by samples, each timed from ``kvm_exit`` to ``kvm_entry``: L0's
    work without the exit's hardware round trip (``hw_exit`` cycles). The
    model keeps no per-exit spread, so the ``( +- x% )`` of the average is
    printed only where every exit of the reason cost the same (0.00%). The
    xlio header above it names the run, for ``xlio calibrate``."""
    clock = r["config"]["clock_ghz"]
    merged: dict[str, list[float]] = {}
    for row in r["by_reason"]:
        n = row["count"]
        m = merged.setdefault(row["reason"], [0, 0.0, float("inf"), 0.0])
        m[0] += n
        m[1] += row["cycles"] - n * hw_exit
        m[2] = min(m[2], row["min_cycles"] - hw_exit)
        m[3] = max(m[3], row["max_cycles"] - hw_exit)
    total_n = sum(m[0] for m in merged.values()) or 1
    total_t = sum(m[1] for m in merged.values()) or 1.0

    def us(cycles: float) -> float:
        return cycles / (clock * 1000)

    head = format_measure(r).split("\n\n", 1)[0]
    lines = [head, "", "", "Analyze events for all VMs, all VCPUs:", ""]
    lines.append(f"{'VM-EXIT':>20} {'Samples':>10} {'Samples%':>9} {'Time%':>9} "
                 f"{'Min Time':>11} {'Max Time':>11} {'Avg time':>16} ")  # fmt: skip
    lines.append("")
    for reason, (n, t, lo, hi) in sorted(merged.items(), key=lambda kv: (-kv[1][0], kv[0])):
        spread = " ( +-   0.00% )" if abs(hi - lo) < 1e-9 else ""
        lines.append(
            f"{reason:>20} {int(n):>10} {100 * n / total_n:>8.2f}% {100 * t / total_t:>8.2f}% "
            f"{us(lo):>9.2f}us {us(hi):>9.2f}us {us(t / n):>9.2f}us{spread}"
        )
    lines.append("")
    lines.append(f"Total Samples:{int(total_n)}, Total events handled time:{us(total_t):.2f}us.")
    return "\n".join(lines)


def explain_text() -> str:
    cols = table(("column", "meaning"), COLUMNS.items(), left=2, title="Columns")
    counters = table(("counter", "meaning"), GLOSSARY.items(), left=2, title="Counters")
    notes = (
        "Steady state: set-up (device bring-up, delegation) and a warm-up (one operation, or a\n"
        "ring's worth of frames: first kicks, first touch of each buffer page) run first and\n"
        "are reported apart. Times are modeled cycles at the preset's clock, not wall time."
    )
    return render(cols, counters, notes)


def format_trace(r: dict[str, Any]) -> str:
    """``xlio trace``: one table per operation, one line per event."""
    cfg = r["config"]
    clock = cfg["clock_ghz"] * 1000.0
    noun = r["per"]
    plural = noun if r["count"] == 1 else noun + ("es" if noun == "batch" else "s")
    head = (
        f"xlio trace: {r['workload']} on path {r['path']}, preset {cfg['preset']}, "
        f"{r['count']} {plural} after set-up and warm-up; t = modeled time since the first, "
        f"at {cfg['clock_ghz']} GHz"
    )
    parts: list[Any] = [head]
    for op in r["operations"]:
        rows = [
            [f"{e['t_us']:,.3f}", e["level"], e["event"], str(e["what"]), str(e["detail"]),
             str(e["where"]), e["cycles"], e["total_cycles"]]
            for e in op["events"]
        ]  # fmt: skip
        title = (
            f"{noun} {op['operation']}: {num(op['cycles'])} cycles, "
            f"{op['cycles'] / clock:,.3f} us, {len(op['events'])} events"
            + (" (first events dropped: trace bound)" if op["truncated"] else "")
        )
        cols = ("t (us)", "level", "event", "reason / field", "detail", "where", "cycles", "total")
        parts.append(table(cols, rows, left=6, title=title))
    return render(*parts)


#: The per-request figures ``xlio demo`` shows, and their column heads.
DEMO_COLUMNS = (
    ("l2_exits", "L2 exits"),
    ("reflected", "reflected"),
    ("l1_exits", "L1 exits"),
    ("l1_be_exits", "L1 BE exits"),
    ("l0_exits", "L0 exits"),
    ("crossings", "crossings"),
    ("time_us", "time (us)"),
)


def format_demo(d: dict[str, Any]) -> str:
    """``xlio demo``: the loopback echo's paths side by side, per request."""
    rows = [[p] + [round(row[k], 2) for k, _ in DEMO_COLUMNS] for p, row in d["paths"].items()]
    head = (
        f"xlio demo: UDP echo over the loopback wire, {d['count']:,} requests per path, "
        f"preset {d['preset']}, APICv {'on' if d['config']['apicv'] else 'off'}, "
        f"virtual idle {'on' if d['config']['virtual_idle'] else 'off'}; figures per request "
        "(steady state)"
    )
    if d["l1_over_l0"] is None:
        foot = (
            "INTERRUPTED: the paths measured so far (requests: "
            + ", ".join(f"{p} {n:,}" for p, n in d["counts"].items())
            + ")"
        )
    else:
        foot = f"L1 path / L0 direct path, modeled time per request: {d['l1_over_l0']:.1f}x"
    return render(head, table(["path", *(t for _, t in DEMO_COLUMNS)], rows), foot)
