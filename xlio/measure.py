"""Run a workload on a path under a configuration and report what it cost.

``measure()`` is pure (no I/O): it returns the JSON-ready result that
``xlio measure --json`` prints. ``format_report()`` renders it for people, in
the spirit of ``perf kvm stat report``.
"""

from __future__ import annotations

from typing import Any

from xlio.backends.datapath import BUILDERS
from xlio.sim.accounting import SUMMARY_KEYS
from xlio.sim.nested import Config, NestedVmx
from xlio.sim.presets import PRESETS
from xlio.sim.workloads import L0_CHANGES, PATHS, Workload
from xlio.sim.workloads import WORKLOADS as MODEL_WORKLOADS

#: Every workload ``xlio measure`` runs: the model's micro and memory workloads,
#: and the datapath's network workloads (per frame, or per request for echo).
WORKLOADS: dict[str, Workload] = {
    **MODEL_WORKLOADS,
    "tx": Workload("tx", BUILDERS["tx"], "L2 sends UDP frames to the peer", "frame", True),
    "rx": Workload("rx", BUILDERS["rx"], "the peer sends UDP frames to L2", "frame", True),
    "echo": Workload(
        "echo", BUILDERS["echo"], "the peer sends UDP echo requests, L2 answers", "request", True
    ),
}


class UsageError(ValueError):
    """A user's mistake: reported in one line, exit status 2."""


def make_config(
    preset: str,
    path: str,
    *,
    shadow_vmcs: bool | None = None,
    vmcs_exits: bool = True,
    operand: str = "register",
    cache_reg: str | None = None,
    apicv: bool | None = None,
    virtual_idle: bool = False,
    trace: bool = False,
) -> Config:
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if path not in PATHS:
        raise UsageError(f"unknown path {path!r} (choose from {', '.join(PATHS)})")
    try:
        return Config.from_preset(
            PRESETS[preset],
            nested=path != "single",
            shadow_vmcs=shadow_vmcs,
            vmcs_exits=vmcs_exits,
            operand=operand,
            cache_reg=cache_reg,
            apicv=apicv,
            virtual_idle=virtual_idle,
            trace=trace,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


def measure(
    workload: str,
    path: str,
    preset: str,
    *,
    count: int = 1,
    options: dict[str, Any] | None = None,
    **switches: Any,
) -> dict[str, Any]:
    """Build a machine, run ``count`` operations, return per-op and total figures."""
    if workload not in WORKLOADS:
        raise UsageError(f"unknown workload {workload!r} (choose from {', '.join(WORKLOADS)})")
    if count < 1:
        raise UsageError(f"--count must be at least 1, got {count}")
    cfg = make_config(preset, path, **switches)
    m = NestedVmx(cfg)
    w = WORKLOADS[workload]
    try:
        op = w.build(m, path, {"count": count, **(options or {})})
    except ValueError as e:
        raise UsageError(str(e)) from None
    setup = m.stats.summary()
    m.reset_stats()
    units = 0.0
    for _ in range(1 if w.once else count):
        done = op()
        units += 1 if done is None else done
    return result_of(m, workload, path, units, w.per, setup=setup, options=options)


def result_of(
    m: NestedVmx,
    workload: str,
    path: str,
    units: float,
    per: str,
    *,
    setup: dict[str, float] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    s = m.stats
    totals = s.summary()
    totals["time_us"] = m.costs.cycles_to_us(totals["cycles"])
    per_op = {k: v / units for k, v in totals.items()}
    if per == "second":
        totals["cycles_per_second"] = totals["cycles"] / units
    if m.memory is not None:
        totals["host_resident_mib"] = m.memory[0].host.resident_bytes() / (1 << 20)
    out: dict[str, Any] = {
        "workload": workload,
        "path": path,
        "count": units,
        "per": per,
        "config": {**m.cfg.describe(), "path": path, **(options or {})},
        "per_op": per_op,
        "totals": totals,
        "cycles_by_level": s.cycles_by_level(),
        "by_reason": s.reason_rows(),
        "by_cause": dict(s.by_cause),
    }
    changes = l0_changes(m, workload, path, options or {})
    if changes:
        out["l0_changes"] = changes
    if m.datapath is not None:
        out["devices"] = m.datapath.metrics()
    if setup is not None and setup.get("cycles"):
        out["setup"] = setup
    if s.trace is not None:
        out["trace"] = [list(e) for e in s.trace]
    return out


def l0_changes(m: NestedVmx, workload: str, path: str, options: dict[str, Any]) -> list[str]:
    """The changes to today's KVM (Linux 6.1) in L0 that this run's path assumes."""
    if path != "l0":
        return []
    network = workload in ("tx", "rx", "echo", "tap")
    out = []
    if network or workload in ("io-kick", "io-user", "mmio-kick"):
        out.append(L0_CHANGES["delegation"])
    if workload == "mmio-kick" or (network and options.get("kick") == "mmio"):
        out.append(L0_CHANGES["fast-mmio-in-guest-mode"])
    if network and m.cfg.apicv:
        out.append(L0_CHANGES["nested-posting"])
    return out


def _num(v: float) -> str:
    if float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:,.2f}"


def format_report(r: dict[str, Any]) -> str:
    cfg = r["config"]
    cyc_total = r["totals"]["cycles"] or 1.0
    clock = cfg["clock_ghz"]
    lines = [
        f"xlio measure: workload={r['workload']} path={r['path']} count={_num(r['count'])} "
        f"preset={cfg['preset']}",
        f"  shadow_vmcs={cfg['shadow_vmcs']} vmcs_exits={cfg['vmcs_exits']} "
        f"operand={cfg['operand']} cache_reg={cfg['cache_reg']} "
        f"dirty_tracking={cfg['dirty_tracking']} apicv={cfg['apicv']} "
        f"virtual_idle={cfg['virtual_idle']} clock={clock} GHz",
        "",
        f"{'level':<6}{'exit reason':<22}{'samples':>10}{'samples%':>10}"
        f"{'time%':>8}{'time/exit (us)':>16}",
    ]
    nexits = sum(row["count"] for row in r["by_reason"]) or 1
    for row in r["by_reason"]:
        lines.append(
            f"{row['level']:<6}{row['reason']:<22}{row['count']:>10,}"
            f"{100.0 * row['count'] / nexits:>9.2f}%"
            f"{100.0 * row['cycles'] / cyc_total:>7.2f}%"
            f"{row['cycles'] / row['count'] / (clock * 1000):>16.3f}"
        )
    lines.append("")
    lines.append(f"per {r['per']} (totals / {_num(r['count'])}):")
    for k in (*SUMMARY_KEYS, "cycles", "time_us"):
        v = r["per_op"].get(k, 0)
        if v or k in ("l0_exits", "l2_exits", "l1_exits", "reflected", "crossings", "cycles"):
            lines.append(f"  {k:<26}{_num(v):>14}")
    if "cycles_per_second" in r["totals"]:
        cps = r["totals"]["cycles_per_second"]
        lines.append(
            f"  {'cycles_per_second':<26}{_num(cps):>14}"
            f"   ({cps / (clock * 1e9):.2%} of one {clock} GHz CPU)"
        )
    for change in r.get("l0_changes", ()):
        lines.append(f"  assumes an L0 change: {change}")
    lv = r["cycles_by_level"]
    lines.append(
        "  cycles by level: " + ", ".join(f"{k} {_num(v / r['count'])}" for k, v in lv.items() if v)
    )
    if r["by_cause"]:
        lines.append(
            "  L1 exits by cause (per op): "
            + ", ".join(f"{k} {_num(v / r['count'])}" for k, v in sorted(r["by_cause"].items()))
        )
    return "\n".join(lines)


DEMO_COLUMNS = (
    ("l2_exits", "L2 exits"),
    ("reflected", "reflected"),
    ("l1_exits", "L1 exits"),
    ("l1_be_exits", "L1 BE exits"),
    ("l0_exits", "L0 exits"),
    ("crossings", "crossings"),
    ("time_us", "time (us)"),
)


def demo(
    preset: str = "turtles-2010",
    count: int = 200,
    switches: dict[str, Any] | None = None,
    **opts: Any,
) -> dict[str, Any]:
    """The loopback echo on single, l1 and l0, per request, side by side."""
    sw = {k: v for k, v in (switches or {}).items() if v is not None}
    rows = {p: measure("echo", p, preset, count=count, options=opts, **sw) for p in PATHS}
    l0 = rows["l0"]["per_op"]["cycles"] or 1.0
    return {
        "workload": "echo",
        "preset": preset,
        "count": count,
        "options": opts,
        "config": rows["l0"]["config"],
        "paths": {p: r["per_op"] for p, r in rows.items()},
        "devices": {p: r.get("devices", {}) for p, r in rows.items()},
        "l1_over_l0": rows["l1"]["per_op"]["cycles"] / l0,
    }


def format_demo(d: dict[str, Any]) -> str:
    head = f"{'path':<8}" + "".join(f"{t:>13}" for _, t in DEMO_COLUMNS)
    lines = [
        f"xlio demo: UDP echo over the loopback wire, {d['count']} requests per path, "
        f"preset {d['preset']}, APICv {'on' if d['config']['apicv'] else 'off'}, "
        f"virtual idle {'on' if d['config']['virtual_idle'] else 'off'}; figures per request",
        "",
        head,
        "-" * len(head),
    ]
    for p, row in d["paths"].items():
        lines.append(f"{p:<8}" + "".join(f"{_num(round(row[k], 2)):>13}" for k, _ in DEMO_COLUMNS))
    lines.append("")
    lines.append(f"L1 path / L0 direct path, modeled time per request: {d['l1_over_l0']:.1f}x")
    return "\n".join(lines)
