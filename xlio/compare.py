"""``xlio compare``: two results side by side, with deltas and ratios (``perf diff``).

Theory of operation. A result (``xlio measure``/``netperf``/``vmexit``
JSON, or a measure run made here from ``--a``/``--b`` settings) is reduced
to comparable figures by :func:`comparable`: per-operation counters, exits
per operation and time per operation by level and reason, work rows, or for
other commands every numeric leaf but the configuration. :func:`diff` pairs
the figures of A and B; rows present on one side only show a blank on the
other. Nothing here measures or prints.
"""

from __future__ import annotations

from typing import Any

from xlio.measure import UsageError

#: Keys of a result that are not figures to compare.
NOT_FIGURES = (
    "schema_version", "xlio_version", "command", "config", "trace", "detail", "setup",
    "first_op", "totals", "devices", "accounting", "params", "rows",
)  # fmt: skip


def comparable(doc: dict[str, Any]) -> dict[str, float]:
    """The figures of one result, by name, in report order."""
    out: dict[str, float] = {}
    if "per_op" in doc and "by_reason" in doc:  # xlio measure
        units = doc["count"] or 1
        clock = doc["config"]["clock_ghz"] * 1000.0
        per = doc["per"]
        for k, v in doc["per_op"].items():
            if v or k in ("l0_exits", "cycles"):
                out[f"{k} per {per}"] = v
        for row in doc["by_reason"]:
            name = f"{row['level']} {row['reason']}"
            out[f"{name}: exits per {per}"] = row["count"] / units
            out[f"{name}: us per {per}"] = row["cycles"] / units / clock
        for row in doc.get("by_work", ()):
            out[f"{row['level']} ({row['work']}): us per {per}"] = row["cycles"] / units / clock
        return out
    _flatten(doc, "", out)
    return out


def _flatten(d: dict[str, Any], prefix: str, out: dict[str, float]) -> None:
    for k, v in d.items():
        if not prefix and k in NOT_FIGURES:
            continue
        if isinstance(v, dict):
            _flatten(v, f"{prefix}{k}.", out)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v


def diff(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of (figure, A, B, delta, B/A) for every figure either side has."""
    fa, fb = comparable(a), comparable(b)
    if not fa or not fb:
        raise UsageError("nothing to compare: give results of xlio measure, netperf or vmexit")
    if a.get("command") != b.get("command") and a.get("command") and b.get("command"):
        raise UsageError(f"cannot compare a {a['command']} result with a {b['command']} result")
    rows = []
    for k in dict.fromkeys([*fa, *fb]):
        va, vb = fa.get(k), fb.get(k)
        delta = None if va is None or vb is None else vb - va
        ratio = None if va is None or vb is None or va == 0 else vb / va
        rows.append({"figure": k, "a": va, "b": vb, "delta": delta, "ratio": ratio})
    return rows


def describe(doc: dict[str, Any]) -> str:
    """One line naming what a result is."""
    cfg = doc.get("config", {})
    if "workload" in doc:
        return f"{doc['workload']} on {doc.get('path', '?')}, preset {cfg.get('preset', '?')}"
    if "tests" in doc:
        return f"vmexit level {doc.get('level')}, preset {doc.get('preset')}"
    if "test" in cfg:
        return f"netperf {cfg['test']} on {cfg['path']}, preset {cfg.get('preset')}"
    return doc.get("command", "result")
